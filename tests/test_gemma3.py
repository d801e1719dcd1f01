"""Gemma 3's text model against transformers' Gemma3ForCausalLM on the same weights, through the real loader from a
saved directory: five sliding-window layers to a full one, prompts and generations longer than the window, head
counts that do not divide the rank counts, prefill chunks shorter and longer than the window; the window cache holds
the window, and what the plan counts is what the ranks hold."""

import pytest
import torch
import transformers

from raytp.actors.worker import _tensor_bytes
from raytp.model.layout import param_count
from raytp.model.pieces import plan_model
from raytp.runtime.sampling import SamplingParams
from raytp.weights.synthetic import synthetic_config
from tests.sharded import LocalGroup

WINDOW = 7
SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0], 5: [1.0, 4.0, 1.0, 2.0, 3.0]}
GREEDY_TOKENS = 32
PROMPT = 19


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """7 layers (sliding x5, full, sliding), 6 query heads on 3 KV heads of 16 (scores scaled by 24 ** -0.5, not
    16 ** -0.5), an MLP of 200 columns, the global RoPE linearly scaled, every norm weight drawn (transformers
    initializes them to zero, where (1 + w) is 1)."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=1000, hidden_size=48, intermediate_size=200, num_hidden_layers=7, num_attention_heads=6,
        num_key_value_heads=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        max_position_embeddings=512, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_config_reads_the_layer_types_window_and_ropes(tiny_gemma3):
    path, reference = tiny_gemma3
    group = LocalGroup(path, [1.0])
    c = group.config
    assert c.mixers == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (c.sliding_window, c.local_rope_theta, c.rope_theta, c.rope_scaling["factor"]) == (WINDOW, 1e4, 1e6, 2.0)
    assert param_count(c) == sum(p.numel() for p in reference.parameters())  # the tied table once, 4 norms a layer


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_logits_match_gemma3_for_causal_lm(tiny_gemma3, ranks):
    path, reference = tiny_gemma3
    tokens = torch.randint(0, 1000, (2, PROMPT), generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    group = LocalGroup(path, SPLITS[ranks])
    if ranks == 5:
        assert any(not r.kv_heads for r in group.plan.ranks)  # some ranks hold no attention at all
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ranks, chunk", [(1, 512), (2, 5), (3, 12), (5, 5)])  # chunks inside and beyond the window
def test_greedy_tokens_match_gemma3_for_causal_lm(tiny_gemma3, ranks, chunk):
    path, reference = tiny_gemma3
    prompt = torch.randint(0, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, PROMPT:].tolist()
    group = LocalGroup(path, SPLITS[ranks])
    out = group.generate([prompt[0].tolist()], SamplingParams(max_tokens=GREEDY_TOKENS), prefill_chunk=chunk)
    assert out["r0"] == expected


def test_the_window_cache_holds_the_window_and_the_plan_counts_it(tiny_gemma3):
    path, _ = tiny_gemma3
    group = LocalGroup(path, SPLITS[3], max_context=256, max_batch=4)
    c, D = group.config, group.config.head_dim
    for shard, model in zip(group.plan.ranks, group.models):
        # six sliding layers keep WINDOW positions, the full one max_context, of each local KV head and slot, K and V
        expected = 2 * 4 * len(shard.kv_heads) * (6 * WINDOW + 256) * D * 4
        assert _tensor_bytes(model.cache_tensors()) == shard.kv_cache_bytes == expected
        # shown apart: the sliding layers' window cache, the full layer's KV cache
        assert shard.state_bytes == {"window cache": 2 * 4 * len(shard.kv_heads) * 6 * WINDOW * D * 4,
                                     "KV cache": 2 * 4 * len(shard.kv_heads) * 256 * D * 4}
    assert sum(r.kv_cache_bytes for r in group.plan.ranks) == 2 * 4 * c.num_kv_heads * (6 * WINDOW + 256) * D * 4


def test_synthetic_gemma3_27b_has_the_published_shape():
    c = synthetic_config("synthetic:gemma-3-27b")
    assert 26.5e9 < param_count(c) < 27.5e9  # Gemma 3 27B's text model: 27.0B parameters
    assert c.mixers.count("full_attention") == 10 and c.sliding_window == 1024
    GiB = 1 << 30
    plan = plan_model(c, [("cuda:0@32GiB", 32 * GiB), ("cuda:1@20GiB", 20 * GiB), ("cuda:2@20GiB", 20 * GiB)],
                      max_context=32768, max_batch=1)
    kv = next(p for p in plan.pieces if p.name == "kv_heads")
    row = 2 * 128 * 2  # K and V of one head at one position, bf16
    assert kv.cache_bytes == row * (52 * 1024 + 10 * 32768)  # 52 layers keep the window, 10 the context


def test_fp8_window_cache_is_planned_as_held_and_chunked_prefill_agrees(tiny_gemma3):
    """An FP8 window cache: the bytes held are the bytes planned, and a prompt prefilled in chunks shorter than the
    window (the ring plus each chunk's own rows) decodes the same tokens as one prefill of it whole."""
    path, _ = tiny_gemma3
    prompt = torch.randint(0, 1000, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    group = LocalGroup(path, SPLITS[3], kv_dtype="fp8")
    for shard, model in zip(group.plan.ranks, group.models):
        assert _tensor_bytes(model.cache_tensors()) == shard.kv_cache_bytes
    whole, chunked = (group.generate([prompt], SamplingParams(max_tokens=12), prefill_chunk=c)["r0"] for c in (512, 3))
    assert whole == chunked and len(whole) == 12


def test_a_request_that_asks_to_speculate_decodes_plainly(tiny_gemma3, monkeypatch):
    """Drafted positions overwrite the window cache's ring, which holds positions the next query still sees: a
    sliding-window model must not draft (raytp.runtime.speculation.unsupported_reason). A drafter that always
    proposes would give other tokens than transformers' if it did."""
    from raytp.runtime.engine import Add, Request
    from raytp.runtime.speculation import RowSpeculation, unsupported_reason
    from tests.test_decode_loop import run_loop, tokens_of

    path, reference = tiny_gemma3
    prompt = torch.randint(0, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, PROMPT:].tolist()
    monkeypatch.setattr(RowSpeculation, "draft", lambda self, tokens, generated, room: [5, 6, 7, 8][:room])
    group = LocalGroup(path, SPLITS[2])
    seen, _ = run_loop(group, [Add(Request("r0", prompt[0].tolist(), SamplingParams(max_tokens=16,
                                                                                    speculate="ngram:4")))])
    assert tokens_of(seen, "r0") == expected and not any(e.drafted for e in seen)
    assert "sliding-window" in unsupported_reason(group.config)
