"""The FP8 KV cache (`--kv-dtype fp8`): against Hugging Face transformers on the same weights, whose cache holds its
keys and values round-tripped through e4m3 with one scale per (token, KV head), written here independently of
raytp.kernels.kv_fp8: logits and greedy tokens at 1, 2 and 3 uneven ranks (chunked prefill and the decode loop
included). Then SmolLM2's logits with the FP8 cache against its full-precision cache (a bound on the accuracy cost,
not a substitute for the comparison above), the planner's bytes, and the quantization's edge cases."""

import json

import pytest
import torch
import transformers
from transformers.cache_utils import Cache, DynamicLayer

from raytp import cli
from raytp.actors.worker import _tensor_bytes
from raytp.kernels import kv_fp8
from raytp.model.config import ModelConfig
from raytp.parallel.plan import DTYPE_BYTES, PlanError
from raytp.model.pieces import plan_model
from raytp.runtime.sampling import SamplingParams
from raytp.weights.tokenizer import Tokenizer
from tests.sharded import LocalGroup

SPLITS = {1: [1.0], 2: [2.0, 1.0], 3: [3.0, 2.0, 1.0]}
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 rounding, as tests/test_model.py against transformers
GiB = 1 << 30


def e4m3_round_trip(x: torch.Tensor) -> torch.Tensor:
    """What an FP8 cache gives back for x (..., head_dim): each row scaled so its largest magnitude is e4m3's 448,
    rounded to e4m3, scaled back in float32."""
    rows = x.float()
    scale = rows.abs().amax(-1, keepdim=True) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((rows / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class E4M3Layer(DynamicLayer):
    """transformers' dynamic cache layer storing what an FP8 cache would: attention then reads, this step's own
    keys and values included, the round-tripped ones (transformers' update returns what it stored)."""

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(e4m3_round_trip(key_states), e4m3_round_trip(value_states), *args, **kwargs)


def e4m3_cache() -> Cache:
    return Cache(layer_class_to_replicate=E4M3Layer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A GQA Llama (8 query heads on 4 KV heads, head_dim 16): 3 ranks split its KV heads 2/1/1."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
                                      intermediate_size=256, num_hidden_layers=3, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama-fp8")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@torch.no_grad()
def last_logits(model, tokens: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    return model(tokens, past_key_values=cache, use_cache=cache is not None).logits[:, -1]


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_logits_equal_transformers_with_the_same_e4m3_cache(tiny, ranks):
    tokens = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(ranks))
    expected, dense = last_logits(tiny[1], tokens, e4m3_cache()), last_logits(tiny[1], tokens)
    got = LocalGroup(tiny[0], SPLITS[ranks], kv_dtype="fp8").logits(tokens)
    torch.testing.assert_close(got, expected, **TOL)
    # the tolerance tells the two caches apart: e4m3 moves these logits by ~1e-2, a hundred times more
    assert (dense - expected).abs().max() > 100 * TOL["atol"]


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_greedy_tokens_equal_transformers_with_the_same_e4m3_cache(tiny, ranks):
    """Two requests in two cache slots, their prompts prefilled in chunks of 4, then the decode loop."""
    path, reference = tiny
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (11, 6)]
    expected = {}
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, past_key_values=e4m3_cache())
        expected[f"r{i}"] = out[0, len(prompt):].tolist()
    group = LocalGroup(path, SPLITS[ranks], kv_dtype="fp8")
    assert group.generate(prompts, SamplingParams(max_tokens=24), prefill_chunk=4) == expected


def teacher_forced_logits(group: LocalGroup, ids: list[int], start: int) -> torch.Tensor:
    """The logits after ids[:start], then after each further token of ids, fed one decode step at a time."""
    rows = [group.logits(torch.tensor([ids[:start]]))]
    for t in range(start, len(ids)):
        tokens, positions, slots = torch.tensor([[ids[t]]]), torch.tensor([[t]]), torch.tensor([0])
        rows.append(torch.cat(group.on_all_ranks(lambda r, m: m.forward(tokens, positions, slots)), dim=-1))
    return torch.cat(rows)


def test_smollm2_logits_with_the_fp8_cache_stay_close_to_the_full_precision_cache(smollm2_dir):
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based ink and a wooden press adapted from winemaking. Within fifty years")
    ids = Tokenizer.from_dir(smollm2_dir).encode(text)
    full, fp8 = (teacher_forced_logits(LocalGroup(smollm2_dir, [2.0, 1.0], max_context=128, max_batch=1,
                                                  kv_dtype=kv), ids, 8) for kv in ("auto", "fp8"))
    agree = (full.argmax(-1) == fp8.argmax(-1)).float().mean()
    spread = full.std(-1, keepdim=True)  # each position's logit scale
    assert agree >= 0.9, f"top-1 agrees at {agree:.0%} of {len(full)} positions"
    assert ((fp8 - full).abs() / spread).max() < 0.5
    assert not torch.equal(fp8, full)  # the FP8 cache was used


def smollm2_config() -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                       num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_planner_counts_one_byte_per_element_and_a_float32_scale_per_row(dtype):
    config, budgets = smollm2_config(), [("cpu", 4 * GiB), ("cpu", 2 * GiB)]
    auto = plan_model(config, budgets, max_context=1000, max_batch=3, dtype=dtype)
    fp8 = plan_model(config, budgets, max_context=1000, max_batch=3, dtype=dtype, kv_dtype="fp8")
    d, nbytes = config.head_dim, DTYPE_BYTES[dtype]
    total = sum(r.kv_cache_bytes for r in auto.ranks)
    # exactly (1 + 4/head_dim) / dtype bytes of the auto figure, in integers
    assert sum(r.kv_cache_bytes for r in fp8.ranks) * d * nbytes == total * (d + 4)
    for r in fp8.ranks:
        assert r.kv_cache_bytes == 2 * config.num_layers * 3 * 1000 * len(r.kv_heads) * (d + 4)
    assert [r.weight_bytes for r in fp8.ranks] == [r.weight_bytes for r in auto.ranks]
    assert fp8.to_dict()["kv_dtype"] == "fp8" and "KV cache: fp8" in fp8.format_table()


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_each_rank_allocates_the_cache_bytes_its_plan_counts(tiny, kv_dtype):
    """The worker checks its budget with what ShardedLlama.cache_tensors() holds: it agrees with the plan."""
    group = LocalGroup(tiny[0], SPLITS[3], max_context=100, max_batch=3, kv_dtype=kv_dtype)
    for m in group.models:
        assert _tensor_bytes(m.cache_tensors()) == m.shard.kv_cache_bytes > 0


def test_a_cache_that_does_not_fit_in_bfloat16_fits_in_fp8():
    config, shape = smollm2_config(), dict(max_context=8192, max_batch=4)
    need = {kv: (lambda r: r.weight_bytes + r.kv_cache_bytes + r.overhead_bytes)(
        plan_model(config, [("cpu", 64 * GiB)], **shape, kv_dtype=kv).ranks[0]) for kv in ("auto", "fp8")}
    budget = [("cpu", (need["auto"] + need["fp8"]) // 2)]
    with pytest.raises(PlanError, match="--kv-dtype fp8"):
        plan_model(config, budget, **shape)
    plan = plan_model(config, budget, **shape, kv_dtype="fp8")
    assert plan.ranks[0].headroom_bytes >= 0


def test_raytp_plan_shows_the_fp8_cache(capsys):
    args = ["plan", "--model", "synthetic:llama-3.1-8b", "--devices", "cuda:0@24GiB,cuda:1@16GiB", "--max-batch", "2"]
    assert cli.main(args + ["--json"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert cli.main(args + ["--json", "--kv-dtype", "fp8"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert (auto["kv_dtype"], fp8["kv_dtype"]) == ("auto", "fp8")
    # Llama 3.1 8B: head_dim 128, so 132 bytes per cached row instead of 256
    assert sum(r["kv_cache_bytes"] for r in fp8["ranks"]) * 256 == sum(r["kv_cache_bytes"] for r in auto["ranks"]) * 132
    assert cli.main(args + ["--kv-dtype", "fp8"]) == 0
    assert "KV cache: fp8" in capsys.readouterr().out


def test_quantize_keeps_zero_rows_and_puts_each_rows_largest_on_448():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-3, -2e-3, 3e-3, 0.0], [-5000.0, 1.0, 2.0, 3.0]])
    values, scale = kv_fp8.quantize(x)
    back = values.float() * scale.unsqueeze(-1)
    assert scale[0] == 1 and torch.equal(back[0], x[0])  # an all-zero row round-trips exactly
    assert torch.equal(values.float().abs().amax(-1), torch.tensor([0.0, 448.0, 448.0]))
    # e4m3 keeps each element within 1/16 of itself, down to 1/28672 of its row's largest
    bound = x.abs() / 16 + x.abs().amax(-1, keepdim=True) / 28672
    assert ((back - x).abs() <= bound).all()


def test_cache_written_and_read_through_uint8_views():
    """The torch path indexes the cache through uint8 views: it reads back, per slot, the round trip it wrote."""
    cache = kv_fp8.zeros((3, 2, 5, 16), torch.device("cpu"))
    scales = torch.ones((3, 2, 5))
    x = torch.randn(2, 4, 2, 16, generator=torch.Generator().manual_seed(0))  # (batch, seq, kv heads, head_dim)
    cells = (torch.tensor([[2], [0]]), slice(None), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]]))
    kv_fp8.write(cache, scales, cells, x)
    assert cache.dtype == torch.float8_e4m3fn
    assert torch.equal(kv_fp8.read(cache, scales, cells, torch.float32), e4m3_round_trip(x))
    assert not cache[1].view(torch.uint8).any()  # slot 1 untouched


def test_torch_without_float8_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(kv_fp8, "FP8", None)
    args = ["generate", "--prompt", "hi", "--devices", "cpu@1GiB", "--kv-dtype", "fp8"]
    assert cli.main(args) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("raytp: error: --kv-dtype fp8 needs torch.float8_e4m3fn") and "--kv-dtype auto" in line
    assert "\n" not in line
