"""Qwen3 (per-head q/k RMSNorm, no bias) against transformers' Qwen3ForCausalLM on the same weights, through the real
loader from a saved directory, at even, uneven and zero-width splits; and a W4A16 checkpoint of it made by
llmcompressor."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from raytp.model.layout import model_layout, param_count
from raytp.model.pieces import plan_model
from raytp.runtime.sampling import SamplingParams
from raytp.weights.synthetic import synthetic_config
from tests.llmcompressed import Checkpoint, add_smollm2_tokenizer
from tests.quantized import reference_model
from tests.sharded import LocalGroup, assert_matches_reference
from tests.test_synthetic import _logits

# Head counts that do not divide the rank counts: 3 KV groups over 2 and 5 ranks (5: zero-width attention ranks)
TINY = {
    "tied-6h-3kv": dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                        intermediate_size=200, tie_word_embeddings=True),
    "untied-8h-2kv": dict(hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                          intermediate_size=136, tie_word_embeddings=False),
}
SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}
GREEDY_TOKENS = 32


def _tiny_qwen3(vocab_size: int, **kwargs) -> transformers.Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=vocab_size, num_hidden_layers=3, max_position_embeddings=512,
                                      rope_theta=1e6, **kwargs)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initializes the norms to ones: make q_norm and k_norm matter
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.5)
    return model


@pytest.fixture(scope="module", params=list(TINY))
def tiny_qwen3(request, tmp_path_factory):
    model = _tiny_qwen3(1000, **TINY[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_logits_match_qwen3_for_causal_lm(tiny_qwen3, ranks):
    path, reference = tiny_qwen3
    tokens = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    group = LocalGroup(path, SPLITS[ranks])
    assert group.config.qk_norm
    if ranks == 5:
        assert any(not r.kv_heads for r in group.plan.ranks)  # some ranks hold no attention at all
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_greedy_tokens_match_qwen3_for_causal_lm(tiny_qwen3, ranks):
    path, reference = tiny_qwen3
    prompt = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 11:].tolist()
    out = LocalGroup(path, SPLITS[ranks]).generate([prompt[0].tolist()], SamplingParams(max_tokens=GREEDY_TOKENS))
    assert out["r0"] == expected


def test_layout_and_plan_count_the_qk_norms_as_replicated(tiny_qwen3):
    path, reference = tiny_qwen3
    group = LocalGroup(path, [1.0])
    assert param_count(group.config) == sum(p.numel() for p in reference.parameters())  # a tied table once
    layout = model_layout(group.config, group.plan.ranks[0])
    names = {s.name for s in layout.slices() if s.split is None}
    assert "model.layers.2.self_attn.q_norm.weight" in names and "model.layers.2.self_attn.k_norm.weight" in names


def _float_qwen3_for_w4a16(out: Path) -> None:
    """A tiny untied Qwen3 with SmolLM2's tokenizer (so the vocabulary is its 49152 tokens); widths in whole groups
    of 64."""
    _tiny_qwen3(49152, hidden_size=128, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                intermediate_size=320, tie_word_embeddings=False).save_pretrained(out, safe_serialization=True)
    add_smollm2_tokenizer(out)


# made by llmcompressor in the run's one llmcompressor invocation (tests/llmcompressed.py)
LLMCOMPRESSED = {"qwen3": Checkpoint(_float_qwen3_for_w4a16, ("w4a16",))}


@pytest.fixture(scope="module")
def w4a16_qwen3(llmcompressed):
    """The tiny Qwen3 quantized by llmcompressor's GPTQ (w4a16: 4-bit, groups of 64, act-order), calibrated with
    SmolLM2's tokenizer."""
    return llmcompressed["qwen3"] / "w4a16"


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_w4a16_qwen3_made_by_llmcompressor_matches_transformers(w4a16_qwen3, ranks):
    reference = reference_model(w4a16_qwen3)  # compressed-tensors' own decompression into Qwen3ForCausalLM
    assert type(reference).__name__ == "Qwen3ForCausalLM"
    group = LocalGroup(w4a16_qwen3, SPLITS[ranks])
    assert group.config.quant.act_order and group.config.quant.group_size == 64
    tokens = torch.randint(0, 49152, (2, 13), generator=torch.Generator().manual_seed(ranks))
    assert_matches_reference(group, reference, tokens, prompt_len=7, greedy_tokens=GREEDY_TOKENS)


def test_synthetic_qwen3_presets_have_the_published_sizes():
    GiB = 1 << 30
    assert 8.1e9 < param_count(synthetic_config("synthetic:qwen3-8b")) < 8.3e9  # Qwen3-8B: 8.2B parameters
    assert 32.5e9 < param_count(synthetic_config("synthetic:qwen3-32b")) < 33e9  # Qwen3-32B: 32.8B
    plan = plan_model(synthetic_config("synthetic:qwen3-8b@w4a16"), [("cuda:0@12GiB", 12 * GiB),
                                                                     ("cuda:1@6GiB", 6 * GiB)],
                      max_context=4096, max_batch=1)
    assert [len(r.kv_heads) for r in plan.ranks] == [5, 3] and plan.quant.startswith("w4a16")


def test_raytp_plan_shows_the_pieces_of_qwen3(capsys):
    from raytp.cli import main

    devices = "cuda:0@24GiB,cuda:1@16GiB,cuda:2@8GiB"
    assert main(["plan", "--model", "synthetic:qwen3-8b", "--devices", devices, "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for title in ("query heads", "KV heads", "MLP columns", "vocab rows"):
        assert title in header
    assert "split: 8 KV heads in blocks of 1 (KV group), 12288 MLP columns in blocks of 64 (MLP block), 151936 " \
           "vocab rows in blocks of 64 (vocab block)" in out
    assert main(["plan", "--model", "synthetic:qwen3-8b", "--devices", devices, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in plan["pieces"]] == ["kv_heads", "mlp_cols", "vocab_rows"]
    assert sum(r["q_heads"] for r in plan["ranks"]) == 32 and plan["ranks"][2]["kv_heads_range"][1] == 8


@pytest.mark.parametrize("quant", ["w4a16", "w8a16", "fp8"])  # weight-only: see test_synthetic
def test_synthetic_qwen3_in_every_quantization_is_the_same_at_uneven_and_zero_width_splits(tmp_path, quant):
    """synthetic:PATH/config.json of a small Qwen3 (q/k norms drawn like the other norms), quantized as the presets
    say: 3 uneven ranks, one of them nearly empty, give the one-rank logits."""
    config = dict(model_type="qwen3", vocab_size=512, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = f"synthetic:{tmp_path / 'config.json'}@{quant}"
    tokens = torch.tensor([[1, 17, 511, 300, 3]])
    reference = _logits(model, [1.0], tokens)
    torch.testing.assert_close(_logits(model, [1.0, 0.02, 1.0], tokens), reference, rtol=1e-4, atol=1e-4)
