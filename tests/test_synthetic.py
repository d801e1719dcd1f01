"""Synthetic models: every split draws the same weights, and the real Llama 3.1 shapes plan sensibly."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.base import IdentityCheckingCommunicator
from raytp.parallel.devices import parse_devices
from raytp.model.layout import model_layout, param_count
from raytp.model.llama import ShardedLlama
from raytp.model.formats import read_linear
from raytp.parallel.plan import PlanError
from raytp.model.pieces import plan_model, quant_replicated_bytes
from raytp.weights.source import ModelSource
from raytp.weights.synthetic import CONFIGS, SyntheticReader, synthetic_config

GiB = 1 << 30
MIXED = "cuda:0@24GiB,cuda:1@24GiB,cuda:2@48GiB,cuda:3@80GiB"


def _plan(config, weights, **kw):
    return plan_model(config, [(f"cpu{r}", int(w * GiB)) for r, w in enumerate(weights)],
                       max_context=64, max_batch=2, dtype="float32", **kw)


def _logits(model: str, weights: list[float], tokens: torch.Tensor) -> torch.Tensor:
    source = ModelSource.parse(model)
    config = source.config()
    plan = _plan(config, weights)
    group = InProcessGroup(len(weights))
    out: list = [None] * len(weights)

    def rank(r):
        with source.reader(torch.float32, torch.device("cpu")) as reader:
            # every all-reduce also checks that all ranks hold the same bits
            comm = IdentityCheckingCommunicator(group.communicator(r))
            lm = ShardedLlama(config, plan.ranks[r], comm, reader, max_batch=2, max_context=64)
        B, T = tokens.shape
        out[r] = lm.forward(tokens, torch.arange(T).repeat(B, 1), torch.arange(B))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(weights))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(o is not None for o in out), "a rank failed (see its thread's exception above)"
    return torch.cat(out, dim=-1)


def test_named_configs_have_the_published_shapes():
    c = synthetic_config("synthetic:llama-3.1-70b")
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == \
        (8192, 28672, 80, 64, 8, 128256)
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_theta == 500000.0
    assert 7.9e9 < param_count(synthetic_config("synthetic:llama-3.1-8b")) < 8.1e9
    assert 70e9 < param_count(c) < 71e9
    assert 405e9 < param_count(synthetic_config("synthetic:llama-3.1-405b")) < 406.5e9


def test_config_from_a_path(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["tiny"] | {"num_hidden_layers": 2}))
    assert synthetic_config(f"synthetic:{tmp_path / 'config.json'}").num_layers == 2
    with pytest.raises(ValueError, match="unknown synthetic model"):
        synthetic_config("synthetic:nope")


def _read(config, shard) -> dict[str, torch.Tensor]:
    reader = SyntheticReader(config, torch.float32, torch.device("cpu"))
    return {s.name: reader.read(s) for s in model_layout(config, shard).slices()}


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 2.0, 3.0], [3.0, 1.0, 1.0, 1.0, 2.0]])
def test_shards_concatenate_to_the_one_rank_weights(weights):
    config = synthetic_config("synthetic:tiny")
    full = _read(config, _plan(config, [1.0]).ranks[0])
    shards = [_read(config, s) for s in _plan(config, weights, blocks={"mlp_cols": 32}).ranks]
    for name, dim in [("model.embed_tokens.weight", 0), ("lm_head.weight", 0),
                      ("model.layers.1.self_attn.k_proj.weight", 0), ("model.layers.1.self_attn.o_proj.weight", 1),
                      ("model.layers.2.mlp.gate_proj.weight", 0), ("model.layers.2.mlp.up_proj.weight", 0),
                      ("model.layers.1.mlp.down_proj.weight", 1)]:
        assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), full[name]), name
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(shards[-1][norm], full[norm])


# [1.0, 0.02, 1.0]: the middle rank holds no heads, no MLP columns and no vocab rows, and adds zeros to every sum
@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 2.0, 3.0], [1.0, 0.02, 1.0]])
def test_tiny_logits_match_one_rank(weights):
    tokens = torch.tensor([[1, 17, 999, 512, 3], [42, 0, 7, 640, 64]])
    reference = _logits("synthetic:tiny", [1.0], tokens)
    assert reference.shape == (2, 1000) and reference.std() > 0.1  # not degenerate
    torch.testing.assert_close(_logits("synthetic:tiny", weights, tokens), reference, rtol=1e-4, atol=1e-4)


def _mixed_plan(name: str, dtype: str):
    devices = parse_devices(MIXED)
    return plan_model(synthetic_config(f"synthetic:{name}"), [(str(d), d.mem_bytes) for d in devices],
                       max_context=4096, max_batch=8, dtype=dtype)


def test_8b_and_70b_fit_mixed_gpus_in_proportion():
    for name in ("llama-3.1-8b", "llama-3.1-70b"):
        plan = _mixed_plan(name, "bfloat16")
        assert all(r.headroom_bytes >= 0 for r in plan.ranks)
        # the 80 GiB card carries the most, the 24 GiB cards the least
        assert plan.ranks[3].weight_bytes > plan.ranks[2].weight_bytes > plan.ranks[0].weight_bytes
        assert sum(len(r.kv_heads) for r in plan.ranks) == 8


def test_405b_does_not_fit_and_names_every_device():
    with pytest.raises(PlanError) as e:
        _mixed_plan("llama-3.1-405b", "bfloat16")
    message = str(e.value)
    for i, dev in enumerate(MIXED.split(",")):
        assert f"rank {i} {dev}: needs" in message
    assert "short" in message and "KV group" in message


QUANTS = ["w4a16", "w8a16", "fp8", "fp8-dynamic", "w8a8"]


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_shards_concatenate_to_the_one_rank_weights(quant):
    """Each rank's slices, read through the formats like a checkpoint's, are the one-rank matrices' columns/rows."""
    config = synthetic_config(f"synthetic:tiny@{quant}")
    reader = SyntheticReader(config, torch.float32, torch.device("cpu"))

    def linears(shard):
        return {s.name: read_linear(reader, s) for s in model_layout(config, shard).slices() if s.quant is not None}

    full = linears(_plan(config, [1.0]).ranks[0])
    plan = _plan(config, [1.0, 2.0, 3.0], blocks={"mlp_cols": 32})
    if quant == "w4a16":  # the planner widens MLP blocks to whole groups of down_proj
        assert plan.block("mlp_cols") == 128 and all(r.mlp_cols.start % 128 == 0 for r in plan.ranks)
    shards = [linears(s) for s in plan.ranks]
    for name, dim in [("model.layers.1.self_attn.q_proj.weight", 0), ("model.layers.1.self_attn.o_proj.weight", 1),
                      ("model.layers.2.mlp.up_proj.weight", 0), ("model.layers.0.mlp.down_proj.weight", 1)]:
        whole = full[name].dequantize()
        assert 0.015 < whole.std() < 0.025  # the dense synthetic weights' spread
        assert torch.equal(torch.cat([s[name].dequantize() for s in shards], dim=dim), whole), name
    dense = SyntheticReader(synthetic_config("synthetic:tiny"), torch.float32, torch.device("cpu"))
    embed = model_layout(config, plan.ranks[0]).embed
    assert embed.quant is None and torch.equal(reader.read(embed), dense.read(embed))  # the embedding stays dense


# [1.0, 0.02, 1.0]: a zero-width middle rank. Weight-only: with activations quantized a split's float sums can move
# a value across a rounding boundary and the logits part (tests/test_act_quantized.py checks those layer by layer)
@pytest.mark.parametrize("quant", ["w4a16", "w8a16", "fp8"])
@pytest.mark.parametrize("weights", [[1.0, 2.0, 3.0], [1.0, 0.02, 1.0]])
def test_quantized_tiny_logits_match_one_rank(quant, weights):
    tokens = torch.tensor([[1, 17, 999, 512, 3], [42, 0, 7, 640, 64]])
    reference = _logits(f"synthetic:tiny@{quant}", [1.0], tokens)
    assert reference.shape == (2, 1000) and reference.std() > 0.1
    assert not torch.allclose(reference, _logits("synthetic:tiny", [1.0], tokens), atol=1e-2)  # really quantized
    torch.testing.assert_close(_logits(f"synthetic:tiny@{quant}", weights, tokens), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [{"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                      "sym": False},
                                     {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}])
def test_a_quantized_checkpoints_config_is_drawn_in_its_quantization(tmp_path, method):
    """synthetic:PATH/config.json of an act-order GPTQ checkpoint with zero points, and of an AWQ one: drawn as
    their method's own tensors with the same bits, groups and zero points (groups in order), the same at every
    split."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["tiny"] | {"quantization_config": method}))
    model = f"synthetic:{tmp_path / 'config.json'}"
    quant = synthetic_config(model).quant
    assert (quant.quant_method, quant.bits, quant.group_size, quant.symmetric, quant.act_order) == (
        method["quant_method"], 4, 128, False, False)
    tokens = torch.tensor([[1, 17, 999, 512, 3]])
    torch.testing.assert_close(_logits(model, [1.0, 2.0, 3.0], tokens), _logits(model, [1.0], tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant,bits,group,scale_bytes", [("w4a16", 4, 128, 2), ("w8a16", 8, None, 2),
                                                          ("fp8", 8, None, 4), ("fp8-dynamic", 8, None, 4),
                                                          ("w8a8", 8, None, 4)])
def test_plan_counts_quantized_bytes(quant, bits, group, scale_bytes):
    """One rank's weights: every attention and MLP matrix at bits/8 per weight plus one scale per output row and
    group, the embedding and lm_head in bfloat16, counted here from the published shapes."""
    config = synthetic_config(f"synthetic:llama-3.1-8b@{quant}")
    h, kv, i = 4096, 1024, 14336
    matrices = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down
    layer = sum(o * n * bits // 8 + o * (n // group if group else 1) * scale_bytes for o, n in matrices)
    expected = 32 * layer + 2 * 128256 * h * 2
    plan = plan_model(config, [("cuda:0", 80 * GiB)], max_context=1024, max_batch=1, dtype="bfloat16")
    # the scales every rank keeps whole (row-parallel layers' per-row scales) count in the replicated overhead
    assert plan.ranks[0].weight_bytes + quant_replicated_bytes(config, "bfloat16") == expected
    assert plan.quant == config.quant.describe() and plan.quant.startswith(quant)
    bf16 = plan_model(synthetic_config("synthetic:llama-3.1-8b"), [("cuda:0", 80 * GiB)], max_context=1024,
                       max_batch=1, dtype="bfloat16")
    assert bf16.ranks[0].read_bytes > plan.ranks[0].read_bytes


def test_70b_w4a16_fits_three_24gib_cards_that_bf16_does_not():
    devices = [(f"cuda:{r}@24GiB", 24 * GiB) for r in range(3)]
    with pytest.raises(PlanError):
        plan_model(synthetic_config("synthetic:llama-3.1-70b"), devices, max_context=4096, max_batch=1,
                    dtype="bfloat16")
    plan = plan_model(synthetic_config("synthetic:llama-3.1-70b@w4a16"), devices, max_context=4096, max_batch=1,
                       dtype="bfloat16")
    assert [len(r.kv_heads) for r in plan.ranks] == [3, 2, 3] and all(r.headroom_bytes > 0 for r in plan.ranks)


def test_plan_command_takes_quant_as_a_flag_or_a_suffix(capsys):
    from raytp.cli import main

    devices = "cuda:0@24GiB,cuda:1@24GiB,cuda:2@24GiB"
    assert main(["plan", "--model", "synthetic:llama-3.1-70b", "--quant", "w4a16", "--devices", devices, "--json"]) == 0
    flag = json.loads(capsys.readouterr().out)
    assert main(["plan", "--model", "synthetic:llama-3.1-70b@w4a16", "--devices", devices, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == flag and flag["quant"].startswith("w4a16")
    assert main(["plan", "--model", "smollm2", "--quant", "fp8", "--devices", "cpu@1GiB"]) == 2
    assert "--quant fp8 applies to a synthetic model" in capsys.readouterr().err
    assert main(["plan", "--model", "synthetic:tiny@int3", "--devices", "cpu@1GiB"]) == 2
    assert "unknown quantization 'int3'" in capsys.readouterr().err
