"""Quantized experts: tiny Qwen3-MoE and Mixtral checkpoints quantized by llmcompressor's GPTQ (w4a16, groups of
64, act-order: every expert with its own column order; and without act-order, with zero points) and rewritten in
GPTQ's and AWQ's layouts, against transformers' Qwen3MoeForCausalLM / MixtralForCausalLM holding compressed-tensors'
own decompression of the same weights, at 1 to 5 ranks whose expert columns leave some ranks none, and through
`raytp generate`; and the synthetic presets in every weight-only quantization, the same at uneven and zero-width
splits as on one rank."""

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from raytp.kernels.packed_gemv import pack_int
from raytp.kernels.routed_packed_gemv import StackedMMA
from raytp.model import experts
from raytp.model.formats import fused, pack
from raytp.model.moe import EXPERT_COLS
from raytp.model.experts import PackedExperts, TorchExperts
from raytp.model.pieces import quant_replicated_bytes
from raytp.runtime.sampling import SamplingParams
from raytp.weights.tokenizer import Tokenizer
from tests.llmcompressed import Checkpoint, add_smollm2_tokenizer
from tests.quantized import awq_checkpoint, gptq_checkpoint, reference_model
from tests.sharded import LocalGroup, assert_matches_reference
from tests.test_synthetic import _logits

VOCAB = 49152  # SmolLM2's tokenizer calibrates the quantization
# Expert width 192: three groups of 64, so 1, 2, 3 and 5 ranks split them unevenly and 5 ranks leave two with none
ATTENTION = dict(hidden_size=128, num_attention_heads=6, num_key_value_heads=3, head_dim=32)
TINY = {
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(**ATTENTION, moe_intermediate_size=192, num_experts=6,
                                                     num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": lambda: transformers.MixtralConfig(**ATTENTION, intermediate_size=192, num_local_experts=5,
                                                  num_experts_per_tok=2),
}
# llmcompressor 0.13 under transformers 5 writes Mixtral's experts under Qwen's names; published Mixtral checkpoints
# (and transformers' own) name them w1 (gate), w3 (up) and w2 (down)
MIXTRAL_NAMES = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}
GREEDY_TOKENS = 32


def _float_moe(family: str, out: Path) -> None:
    """A tiny seeded `family` checkpoint with SmolLM2's tokenizer (which calibrates the quantization)."""
    config = TINY[family]()
    config.update(dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:  # experts as large as the residual: a wrong one shows in the logits
                p.normal_(0, 0.2)
            elif name.endswith(".gate.weight"):  # routers with clear winners
                p.normal_(0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    add_smollm2_tokenizer(out)


# made by llmcompressor in the run's one llmcompressor invocation (tests/llmcompressed.py)
LLMCOMPRESSED = {family: Checkpoint(partial(_float_moe, family), ("w4a16", "w4a16-noactorder")) for family in TINY}


@pytest.fixture(scope="module")
def quantized_moe(llmcompressed, tmp_path_factory):
    """(family, scheme) -> its directory made by llmcompressor (w4a16 or w4a16-noactorder); Mixtral's a copy with
    its experts renamed as published checkpoints name them."""
    renamed = {}

    def get(family: str, scheme: str = "w4a16"):
        made = llmcompressed[family] / scheme
        if family != "mixtral":
            return made
        if scheme not in renamed:
            renamed[scheme] = shutil.copytree(made, tmp_path_factory.mktemp(f"mixtral-{scheme}"), dirs_exist_ok=True)
            _rename_tensors(renamed[scheme], MIXTRAL_NAMES)
        return renamed[scheme]
    return get


def _rename_tensors(model_dir, names: dict[str, str]) -> None:
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        renamed = {}
        for k, v in tensors.items():
            for old, new in names.items():
                k = k.replace(old, new) if ".experts." in k else k
            renamed[k] = v
        save_file(renamed, f, metadata={"format": "pt"})


@pytest.mark.parametrize("ranks", list(SPLITS))
@pytest.mark.parametrize("family", list(TINY))
def test_w4a16_experts_match_transformers(quantized_moe, family, ranks):
    path = quantized_moe(family)
    reference = reference_model(path)  # compressed-tensors' decompression, loaded by transformers' MoE model
    assert type(reference).__name__ == transformers.AutoConfig.from_pretrained(path).architectures[0]
    group = LocalGroup(path, SPLITS[ranks], blocks={EXPERT_COLS: 16})
    assert group.config.quant.act_order and group.config.quant.group_size == 64
    widths = [len(r.expert_cols) for r in group.plan.ranks]
    assert sum(widths) == 192 and all(w % 64 == 0 for w in widths) and (ranks < 5 or 0 in widths)
    held = [m.layers[0].mlp.experts for m in group.models]
    assert all(isinstance(e, TorchExperts) if w else e is None for e, w in zip(held, widths))
    # each expert's columns permuted into its down_proj's group order: plain contiguous groups, no per-column index
    assert all(d.g_idx is None for e in held if e is not None for d in e.down)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(ranks))
    assert_matches_reference(group, reference, tokens, prompt_len=7, greedy_tokens=GREEDY_TOKENS)


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-noactorder"])
def test_planned_bytes_are_the_bytes_each_rank_holds(quantized_moe, scheme):
    """Each rank's share of attention, experts and vocabulary plus the quantization data every rank keeps whole (and
    the routers) are exactly what it loads (act-order: at most, o_proj's scales being counted for every group)."""
    group = LocalGroup(quantized_moe("qwen3-moe", scheme), SPLITS[3], blocks={EXPERT_COLS: 16})
    config = group.config
    replicated = quant_replicated_bytes(config, "float32")
    for model, shard in zip(group.models, group.plan.ranks):
        held = sum(t.numel() * t.element_size() for layer in model.layers
                   for t in [*layer.attention.qkv.weight.tensors(), *layer.attention.o_proj.weight.tensors(), *layer.mlp.tensors()])
        held += (model.embed.table.numel() + model.lm_head.weight.weight.numel()) * 4
        routers = sum(layer.mlp.router.numel() * 4 for layer in model.layers)  # whole: not in weight_bytes
        planned = shard.weight_bytes + replicated + routers
        exact = shard.kv_heads and not config.quant.act_order
        assert held == planned if exact else held <= planned, (shard.rank, held, planned)


@pytest.mark.parametrize("zeros", [False, True])
def test_experts_packed_in_one_pass_equal_experts_packed_one_by_one(zeros):
    """A layer's experts repacked as one matrix of their rows one after another, then split (what a load does where
    they share a format), hold exactly what repacking each expert and stacking them holds."""
    g = torch.Generator().manual_seed(3)
    experts, rows, cols, group = 5, 128, 256, 64
    q = torch.randint(0, 16, (experts * rows, cols), generator=g)
    scales = torch.rand(experts * rows, cols // group, generator=g).bfloat16()
    zero = torch.randint(0, 16, scales.shape, generator=g).bfloat16() if zeros else None
    packed = pack(q, 4)
    at = lambda t, e: None if t is None else t[e * rows:(e + 1) * rows]  # noqa: E731
    one = StackedMMA.split(pack_int(packed, scales, zero, bits=4, group_size=group), experts)
    each = StackedMMA.stack([pack_int(at(packed, e), at(scales, e), at(zero, e), bits=4, group_size=group)
                             for e in range(experts)])
    for a, b in zip(one.tensors(), each.tensors()):
        assert torch.equal(a, b)
    assert one.like.out_features == each.like.out_features == rows


@pytest.mark.parametrize("family,scheme", [("qwen3-moe", "w4a16"), ("mixtral", "w4a16-noactorder")])
def test_experts_stacked_for_the_routed_gemv_match_transformers(quantized_moe, monkeypatch, family, scheme):
    """A CUDA rank repacks its quantized experts for the packed GEMV and stacks them (PackedExperts). Here on the
    CPU, the same load path (packing forced) and the routed orchestration (pairs, act-order gathers, SwiGLU, the
    weighted sum; the products one pair at a time by the kernel's torch version, the CUDA kernel itself is checked
    in tests/gpu/test_routed_packed_gemv.py) give transformers' logits, at decode sizes and in a prefill (pairs
    sorted by expert, in chunks of tokens), and only the stacks are held."""
    monkeypatch.setattr(fused, "use_triton", lambda t: True)  # repack as a CUDA rank does
    monkeypatch.setattr(fused, "reserve", lambda packed: None)  # the CUDA kernel's workspace: none on a CPU
    monkeypatch.setattr(experts, "use_triton", lambda t: True)  # choose the backend a CUDA rank does
    path = quantized_moe(family, scheme)
    group = LocalGroup(path, SPLITS[3], blocks={EXPERT_COLS: 16})
    held = [m.layers[0].mlp.experts for m in group.models if m.layers[0].mlp.experts is not None]
    assert held and all(isinstance(e, PackedExperts) for e in held)
    assert all((e.gate_up.x_index is not None) == (scheme == "w4a16") for e in held)  # act-order: own orders
    assert all(len(e.tensors()) == len(e.gate_up.tensors()) + len(e.down.tensors()) for e in held)
    reference = reference_model(path)
    # 2 x 7 tokens: within ROUTED_ROWS, so the logits come through the routed decode too, as every decode step does
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(11))
    assert_matches_reference(group, reference, tokens, prompt_len=5, greedy_tokens=8)
    # 3 x 9 tokens: a prefill, its pairs sorted by expert, in launches of at most 8 pairs (4 tokens of 2 choices)
    calls = []
    routed = experts.routed_packed_experts
    monkeypatch.setattr(experts, "routed_packed_experts",
                        lambda x, *a, sort=False: calls.append((sort, x.shape[0])) or routed(x, *a, sort=sort))
    monkeypatch.setattr(experts, "prefill_pairs", lambda gate_up: 8)
    tokens = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)
    assert calls and all(sort and rows <= 4 for sort, rows in calls) and 3 in {rows for _, rows in calls}


def test_greedy_16_tokens_over_mismatched_devices_match_transformers(quantized_moe):
    """The engine's decode loop on the directory over three unequal devices, greedy, gives transformers' tokens for
    the chat-free prompt; the planner gives the largest device the most expert columns, in whole groups. (The same
    loop under Ray actors, as `raytp generate` runs it, is tests/test_runtime.py's; nothing in it depends on the
    model's layers.)"""
    path = quantized_moe("mixtral")
    tokenizer = Tokenizer.from_dir(path)
    ids = tokenizer.encode("Once upon a time")
    with torch.no_grad():
        expected = reference_model(path).generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                                  eos_token_id=sorted(tokenizer.eos_token_ids))[0, len(ids):]
    group = LocalGroup(path, [2.0, 1.0, 1.0])
    out = group.generate([ids], SamplingParams(max_tokens=16), stop_ids=sorted(tokenizer.eos_token_ids))
    assert out["r0"] == expected.tolist()
    widths = [len(r.expert_cols) for r in group.plan.ranks]
    assert sum(widths) == 192 and all(w % 64 == 0 for w in widths) and widths[0] == max(widths), widths


# GPTQ's layout of the act-order checkpoint, AWQ's of the one with zero points (AWQ has no act-order)
LAYOUTS = {"gptq": ("w4a16", gptq_checkpoint), "awq": ("w4a16-noactorder", awq_checkpoint)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_experts_in_gptq_and_awq_layouts_match_transformers(quantized_moe, layout, tmp_path):
    scheme, convert = LAYOUTS[layout]
    path = quantized_moe("qwen3-moe", scheme)
    reference = reference_model(path)
    group = LocalGroup(convert(path, tmp_path / layout), SPLITS[3], blocks={EXPERT_COLS: 16})
    assert group.config.quant.quant_method == layout
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", ["w4a16", "w8a16", "fp8"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_synthetic_quantized_experts_are_the_same_at_uneven_and_zero_width_splits(tmp_path, family, quant):
    """synthetic:PATH/config.json of a small Qwen3-MoE or Mixtral, quantized as the presets say: 3 uneven ranks,
    one of them holding no expert columns, give the one-rank logits."""
    config = dict(model_type=family, vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, num_experts_per_tok=2,
                  tie_word_embeddings=True)
    config |= (dict(num_experts=6, moe_intermediate_size=384, norm_topk_prob=True) if family == "qwen3_moe"
               else dict(num_local_experts=4, intermediate_size=384))
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = f"synthetic:{tmp_path / 'config.json'}@{quant}"
    tokens = torch.tensor([[1, 17, 511, 300, 3]])
    reference = _logits(model, [1.0], tokens)
    torch.testing.assert_close(_logits(model, [1.0, 0.02, 1.0], tokens), reference, rtol=1e-4, atol=1e-4)
