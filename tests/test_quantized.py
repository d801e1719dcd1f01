"""Quantized SmolLM2 (compressed-tensors, written by llmcompressor; and the same weights in the GPTQ and AWQ
layouts) sharded unevenly, against compressed-tensors' own decompression run by transformers (tests/quantized.py)."""

import dataclasses
import json
import shutil

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raytp.model.config import ModelConfig, UnsupportedModelError
from raytp.model.formats import IntWeight, read_linear
from raytp.model.layout import Slice
from raytp.model.quant.compressed_tensors import CompressedTensors
from raytp.parallel.comm.base import Communicator
from raytp.model.pieces import plan_model, quant_replicated_bytes
from raytp.runtime.sampling import SamplingParams
from raytp.weights.checkpoint import SafetensorsReader
from raytp.weights.source import ModelSource
from raytp.weights.tokenizer import Tokenizer
from tests.quantized import awq_checkpoint, gptq_checkpoint, reference_model
from tests.sharded import GiB, LocalGroup

SCHEMES = ("w4a16", "w4a16-noactorder", "w8a16", "fp8")
# The GPTQ (act-order) and AWQ layouts of two of those checkpoints: the same weights, so the same reference
LAYOUTS = {"gptq": ("w4a16", gptq_checkpoint), "awq": ("w4a16-noactorder", awq_checkpoint)}
SPLITS = {2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [5.0, 1.0, 3.0, 1.0, 2.0]}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(quantized_smollm2, tmp_path_factory):
    """Scheme or layout -> (its directory, the compressed-tensors scheme whose decompression is its reference)."""
    made = {}

    def make(name):
        if name not in made:
            source, write = LAYOUTS[name]
            made[name] = write(quantized_smollm2[source], tmp_path_factory.mktemp(name))
        return made[name]

    return lambda name: ((make(name), LAYOUTS[name][0]) if name in LAYOUTS else (quantized_smollm2[name], name))


@pytest.fixture(scope="module")
def references(quantized_smollm2):
    made = {}
    return lambda scheme: made.setdefault(scheme, reference_model(quantized_smollm2[scheme]))


# 3: uneven, every rank with heads; 5: uneven, two ranks without heads. One rank is the 12-ranks test's reference
# and 2:1 the greedy runs' split, against transformers
@pytest.mark.parametrize("scheme,ranks", [(s, r) for s in SCHEMES for r in (3, 5)] + [(s, 3) for s in LAYOUTS])
def test_logits_match_transformers_at_uneven_splits(checkpoint, references, scheme, ranks):
    model_dir, reference = checkpoint(scheme)
    tokens = torch.tensor([Tokenizer.from_dir(model_dir).encode("Gravity bends light; 42 photons, café, naïve.")])
    with torch.no_grad():
        expected = references(reference)(tokens).logits[:, -1]
    got = LocalGroup(model_dir, SPLITS[ranks]).logits(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)


# Each weight format once: the GPTQ layout holds w4a16's weights and AWQ's the no-act-order ones (their logits are
# checked at every split above), and the CPU fallback's greedy runs are the suite's slowest
@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "fp8", "awq"])
def test_greedy_16_tokens_match_transformers(checkpoint, references, scheme):
    model_dir, reference = checkpoint(scheme)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("Once upon a time, there was a little")
    with torch.no_grad():
        expected = references(reference).generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                               eos_token_id=sorted(tokenizer.eos_token_ids))[0, len(prompt):]
    # 2:1, not 3:2:1 (the logits cover that): each step dequantizes every weight in the CPU fallback, so three
    # threads on two cores cost half as much again
    out = LocalGroup(model_dir, SPLITS[2]).generate([prompt], SamplingParams(max_tokens=16),
                                                   stop_ids=sorted(tokenizer.eos_token_ids))
    assert out["r0"] == expected.tolist()


def _ct_dense(model_dir, module: str) -> torch.Tensor:
    """compressed-tensors' own decompression of one Linear."""
    q = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    group = q["config_groups"]["group_0"]
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        local = {k.removeprefix(module + "."): f.get_tensor(k) for k in f.keys() if k.startswith(module + ".")}
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    return compressor.decompress(local, QuantizationScheme.model_validate(group))["weight"].float()


# (module, rows, cols) slices: mid-group and mid-word starts, odd group counts, a partial last group, none at all
SLICES = [("model.layers.1.self_attn.o_proj", range(576), range(64, 256)),  # 3 groups of 64
          ("model.layers.1.self_attn.o_proj", range(576), range(96, 328)),  # starts mid-group and mid-word
          ("model.layers.2.mlp.down_proj", range(576), range(320, 1536)),  # 19 groups
          ("model.layers.2.mlp.down_proj", range(576), range(0)),  # a zero-width rank
          ("model.layers.3.mlp.gate_proj", range(5, 777), None),  # odd rows: zero points packed along rows
          ("model.layers.3.self_attn.k_proj", range(64, 192), None)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantized_slices_equal_compressed_tensors_unpacking(quantized_smollm2, scheme):
    model_dir = quantized_smollm2[scheme]
    quant = ModelConfig.from_file(model_dir).quant
    with SafetensorsReader(model_dir, torch.float32, CPU) as reader:
        for module, rows, cols in SLICES:
            dense = _ct_dense(model_dir, module)
            s = Slice(module + ".weight", tuple(dense.shape), rows, cols, quant)
            got = read_linear(reader, s).dequantize()
            want = dense[rows.start:rows.stop]
            want = want[:, cols.start:cols.stop] if cols is not None else want
            assert torch.equal(got, want), (module, rows, cols)


def test_fp8_per_tensor_scales_equal_compressed_tensors_unpacking(tmp_path):
    """A per-tensor FP8 matrix made with compressed-tensors' own compressor from random weights."""
    scheme = QuantizationScheme.model_validate(
        {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}})
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    weight = torch.randn(40, 24)
    scale = (weight.abs().max() / torch.finfo(torch.float8_e4m3fn).max).reshape(1)
    stored = compressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    save_file({f"m.{k}": v.contiguous() for k, v in stored.items()}, tmp_path / "model.safetensors")
    dense = compressor.decompress(dict(stored), scheme)["weight"].float()
    with SafetensorsReader(tmp_path, torch.float32, CPU) as reader:
        got = read_linear(reader, Slice("m.weight", (40, 24), range(7, 31), range(5, 19),
                                        CompressedTensors("fp8", 8, None, per_tensor=True))).dequantize()
    assert torch.equal(got, dense[7:31, 5:19])


class CountingCommunicator(Communicator):
    """Counts every collective a rank issues (the in-process group has all_reduce and the gathers)."""

    def __init__(self, inner: Communicator):
        self.inner, self.calls = inner, []
        self.rank, self.world_size = inner.rank, inner.world_size

    def all_reduce(self, t):
        self.calls.append("all_reduce")
        return self.inner.all_reduce(t)

    def all_gather_equal(self, t):
        self.calls.append("all_gather")
        return self.inner.all_gather_equal(t)


@pytest.mark.parametrize("scheme", ["w4a16", "gptq"])
def test_act_order_mlp_is_permuted_at_load_time_with_two_all_reduces_per_layer(checkpoint, scheme):
    """down_proj's columns on every rank are whole contiguous groups (no g_idx, so no gathered activations), gate/up
    rows follow the same permutation, a forward issues exactly two all-reduces per layer (plus the embedding's), and
    each rank's slices equal compressed-tensors' unpermuted matrices at the permuted positions; compressed-tensors'
    weight_g_idx and GPTQ's desc_act g_idx alike."""
    loaded, source = checkpoint(scheme)
    model_dir = checkpoint(source)[0]
    group = LocalGroup(loaded, SPLITS[3])
    for model in group.models:
        model.comm = CountingCommunicator(model.comm)
        for layer in model.layers:
            layer.attention.o_proj.comm = layer.mlp.down.comm = model.comm
        model.embed.comm = model.comm
    group.logits(torch.tensor([[1, 504, 3458, 282]]))
    for model in group.models:
        assert model.comm.calls == ["all_reduce"] * (1 + 2 * len(model.layers))

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        g_idx = f.get_tensor("model.layers.2.mlp.down_proj.weight_g_idx")
    perm = torch.sort(g_idx, stable=True).indices
    down, gate = (_ct_dense(model_dir, f"model.layers.2.mlp.{m}_proj") for m in ("down", "gate"))
    for model, shard in zip(group.models, group.plan.ranks):
        cols = perm[shard.mlp_cols.start:shard.mlp_cols.stop]
        layer = model.layers[2]
        assert isinstance(layer.mlp.down.weight, IntWeight) and layer.mlp.down.weight.g_idx is None
        assert shard.mlp_cols.start % 64 == 0
        assert torch.equal(layer.mlp.down.weight.dequantize(), down[:, cols])
        assert torch.equal(layer.mlp.gate_up.weight.dequantize()[:len(cols)], gate[cols])


@pytest.mark.parametrize("scheme", SCHEMES + tuple(LAYOUTS))
def test_planned_bytes_are_the_bytes_each_rank_holds(checkpoint, scheme):
    """Each rank's sharded weights plus the quantization data every rank keeps whole are exactly what it loads
    (act-order: at most, since o_proj's scales are counted for every group); MLP splits fall on whole groups."""
    group = LocalGroup(checkpoint(scheme)[0], SPLITS[3])
    config, replicated = group.config, quant_replicated_bytes(group.config, "float32")
    for model, shard in zip(group.models, group.plan.ranks):
        held = sum(t.numel() * t.element_size() for layer in model.layers
                   for linear in (layer.attention.qkv, layer.attention.o_proj, layer.mlp.gate_up, layer.mlp.down) for t in linear.weight.tensors())
        held += model.embed.table.numel() * 4
        planned = shard.weight_bytes + replicated  # a rank without heads holds less of the replicated part
        exact = shard.kv_heads and not config.quant.act_order
        assert held == planned if exact else held <= planned, (shard.rank, held, planned)
        if config.quant.group_size:
            assert shard.mlp_cols.start % config.quant.group_size == 0
    dense = plan_model(dataclasses.replace(config, quant=None), [("a", 3 * GiB)], max_context=256, max_batch=4,
                        dtype="float32")
    assert group.plan.ranks[0].weight_bytes < dense.ranks[0].weight_bytes


def test_zero_width_ranks_still_allowed(quantized_smollm2):
    """12 ranks on 3 KV heads and 24 groups of MLP columns: most hold no heads, some no MLP columns, all agree."""
    model_dir = quantized_smollm2["w4a16"]
    config = ModelConfig.from_file(model_dir)
    plan = plan_model(config, [(f"cpu{i}", GiB) for i in range(12)], max_context=256, max_batch=4, dtype="float32")
    assert sum(1 for r in plan.ranks if not r.kv_heads) == 9
    assert all(len(r.mlp_cols) % 64 == 0 for r in plan.ranks)
    tokens = torch.tensor([[1, 504, 3458, 282]])
    torch.testing.assert_close(LocalGroup(model_dir, [1.0] * 12).logits(tokens),
                               LocalGroup(model_dir, [1.0]).logits(tokens), rtol=1e-4, atol=2e-4)


@pytest.fixture
def quantized_copy(quantized_smollm2, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(quantized_smollm2["w4a16-noactorder"], copy)
    return copy


def test_check_names_a_misshaped_scale(quantized_copy):
    weights = quantized_copy / "model.safetensors"
    name = "model.layers.4.mlp.down_proj.weight_scale"
    tensors = load_file(weights)
    tensors[name] = tensors[name][:, :23].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"{name}.*\(576, 23\).*\(576, 24\)"):
        ModelSource.parse(str(quantized_copy)).check()


def test_check_names_a_missing_gptq_group_index(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint("gptq")[0], tmp_path / "gptq")
    name = "model.layers.7.self_attn.o_proj.g_idx"
    tensors = load_file(copy / "model.safetensors")
    del tensors[name]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match=name):
        ModelSource.parse(str(copy)).check()


def test_unsupported_quantization_is_refused_naming_what_is_supported(quantized_copy):
    config = quantized_copy / "config.json"
    d = json.loads(config.read_text())
    d["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    config.write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match="2-bit.*raytp reads compressed-tensors.*W4A16, W8A16"):
        ModelSource.parse(str(quantized_copy)).check()
    d["quantization_config"] = {"quant_method": "bitsandbytes"}
    config.write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match="quant_method='bitsandbytes'"):
        ModelSource.parse(str(quantized_copy)).check()


def test_plan_shows_bytes_per_rank_for_a_quantized_model(quantized_smollm2, capsys):
    from raytp.cli import main

    main(["plan", "--model", str(quantized_smollm2["w4a16"]), "--devices", "cpu@3GiB,cpu@2GiB,cpu@1GiB",
          "--dtype", "float32", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["quant"].startswith("w4a16") and {p["name"]: p["block"] for p in plan["pieces"]}["mlp_cols"] == 64
    assert all(r["weight_bytes"] > 0 for r in plan["ranks"])
