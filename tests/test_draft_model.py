"""Speculative decoding with a draft model on CPU ranks (threads, in-process collectives): a tiny Qwen3 target and a
smaller draft of its vocabulary (one decoder layer, built with transformers) emit in float32 the tokens plain decoding
emits, greedy and seeded, at 1, 2, 3 (uneven) and 5 ranks, in a mixed batch with n > 1; the draft's cache holds what
a clean run of the draft model writes; requests that stop inside a drafted run stop where plain decoding stops; a
draft that is the target itself has nearly every drafted token accepted."""

import dataclasses

import pytest
import torch
import transformers

from raytp.model.config import ModelConfig
from raytp.model.pieces import plan_model, plan_with_draft
from raytp.runtime.engine import Add, Request
from raytp.runtime.errors import RequestError
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import (PAUSE_TOKENS, check_drafter, draft_model_option, drafting,
                                       speculate_option)
from tests.sharded import LocalGroup, shared_group
from tests.test_decode_loop import run_loop, tokens_of

MiB = 1 << 20
VOCAB = 1000
SPLITS = {"1-rank": (1.0,), "2-ranks": (1.0, 1.0), "3-uneven": (3.0, 2.0, 1.0), "5-ranks": (1.0, 4.0, 1.0, 2.0, 3.0)}
SHAPE = dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=200,
             tie_word_embeddings=True, max_position_embeddings=512, rope_theta=1e6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target dir, draft dir, stranger dir): a 3-layer Qwen3; a 1-layer one sharing its embedding, first layer and
    final norm, so that the draft agrees with the target often, not always (weights drawn wider than transformers'
    0.02, so that the target's other layers matter); and a 1-layer one of its own, sharper weights: a draft that fails
    (where both distributions are flat, the shared noise alone would make them agree)."""
    torch.manual_seed(0)
    target = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=VOCAB, num_hidden_layers=3,
                                                                     initializer_range=0.06, **SHAPE)).eval()
    with torch.no_grad():  # transformers initializes the norms to ones: make q_norm and k_norm matter
        for name, p in target.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.5)
    draft = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=VOCAB, num_hidden_layers=1, **SHAPE))
    draft.load_state_dict(target.state_dict(), strict=False)  # layers 1 and 2 have no place in it
    stranger = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=VOCAB, num_hidden_layers=1,
                                                                       initializer_range=0.3, **SHAPE))
    dirs = tuple(tmp_path_factory.mktemp(name) for name in ("target", "draft", "stranger"))
    for model, path in zip((target, draft, stranger), dirs):
        model.save_pretrained(path, safe_serialization=True)
    return dirs


def group_of(models, split, draft=None) -> LocalGroup:
    return shared_group(models[0], list(split), max_context=128, max_batch=4,
                        draft_dir=models[1] if draft is None else draft)


@pytest.fixture(params=list(SPLITS))
def group(request, models):
    return group_of(models, SPLITS[request.param])


PROMPTS = [[5, 17, 300, 42, 9, 9, 250, 31, 7], [999, 3, 3, 3, 64, 0, 12, 501, 77, 18, 640, 2]]


def requests(params: list[SamplingParams]) -> list[Add]:
    return [Add(Request(f"r{i}", PROMPTS[i % 2], p, [])) for i, p in enumerate(params)]


def samples(seen, rid):
    """{sample index: its tokens} of request `rid`."""
    return {i: [e.token_id for e in seen if e.request_id == rid and e.index == i and e.token_id is not None]
            for i in sorted({e.index for e in seen if e.request_id == rid})}


def off(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, speculate="off")


def drafted_steps(seen, rid=None):
    """(drafted, accepted) of the verify steps of every row (of request `rid`)."""
    return [(e.drafted, e.accepted) for e in seen if e.drafted and rid in (None, e.request_id)]


def test_speculate_values_name_the_draft_model_on_the_command_line_and_only_its_k_in_a_request():
    assert [drafting(v) for v in ("draft", "draft:1", "draft:8")] == [("draft", 4), ("draft", 1), ("draft", 8)]
    assert draft_model_option("draft:/m/small") == ("/m/small", "draft")
    assert draft_model_option("draft:/m/small:3") == ("/m/small", "draft:3")
    assert draft_model_option("draft:synthetic:llama-1b:2") == ("synthetic:llama-1b", "draft:2")
    assert draft_model_option("ngram:3") == (None, "ngram:3")
    for value in ("draft:/m/small", "draft:synthetic:llama-1b:2", "ngram:3", "off"):
        assert speculate_option(*draft_model_option(value)) == value
    for bad in ("draft", "draft:", "draft:3"):
        with pytest.raises(ValueError, match="name the draft model"):
            draft_model_option(bad)
    for bad in ("draft:/m/small", "draft:0", "draft:9"):  # a request may not name a path, nor a k out of range
        with pytest.raises(RequestError, match=repr(bad)):
            SamplingParams(speculate=bad)
    with pytest.raises(RequestError, match="started without one") as e:
        check_drafter("draft:2", None)
    assert e.value.param == "speculate"
    check_drafter("draft:2", "/m/small")
    check_drafter("ngram", None)


def test_the_plan_splits_the_draft_over_the_same_ranks_and_each_budget_holds_both(models):
    target, draft = (ModelConfig.from_file(d) for d in models[:2])
    budgets = [("cpu0", 12 * MiB), ("cpu1", 8 * MiB), ("cpu2", 5 * MiB)]
    shape = dict(max_context=128, max_batch=4, dtype="float32")
    plan, draft_plan = plan_with_draft(target, draft, budgets, **shape)
    for (_, cap), t, d in zip(budgets, plan.ranks, draft_plan.ranks):
        used = t.weight_bytes + t.kv_cache_bytes + t.overhead_bytes + d.weight_bytes + d.kv_cache_bytes + \
            d.overhead_bytes
        assert used <= cap and d.budget_bytes == cap and t.budget_bytes == cap - (used - t.weight_bytes -
                                                                                  t.kv_cache_bytes - t.overhead_bytes)
        assert d.weight_bytes > 0  # every rank holds a share of the draft, as of the target
    assert draft_plan.ranks[0].weight_bytes > draft_plan.ranks[2].weight_bytes
    alone = plan_model(target, budgets, **shape)
    assert sum(r.weight_bytes for r in alone.ranks) == sum(r.weight_bytes for r in plan.ranks)


def test_greedy_and_seeded_tokens_are_those_of_plain_decoding_in_a_mixed_batch(group):
    """Greedy n=2 drafting 4, greedy without drafting, seeded top-k/top-p drafting 3 with a repetition penalty and
    logprobs, and a seeded request drafting 8 that joins mid-run; again with drafting off everywhere."""
    params = [SamplingParams(max_tokens=30, n=2, speculate="draft:4"),
              SamplingParams(max_tokens=24),
              SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=7, max_tokens=24,
                             logprobs=2, speculate="draft:3")]
    joining = SamplingParams(temperature=0.5, seed=3, max_tokens=20, speculate="draft:8")

    def run(params, late):
        def join(event, submit, seen):
            if event.request_id == "r0" and len(tokens_of(seen, "r0")) == 8:
                submit(Add(Request("late", PROMPTS[1], late, [])))
        return run_loop(group, requests(params), join)[0]

    fast = run(params, joining)
    plain = run([off(p) for p in params], off(joining))
    for rid in ("r0", "r1", "r2", "late"):
        assert samples(fast, rid) == samples(plain, rid), rid
    lp = [e.logprob for e in fast if e.request_id == "r2" and e.token_id is not None]
    lp_plain = [e.logprob for e in plain if e.request_id == "r2" and e.token_id is not None]
    assert lp == pytest.approx(lp_plain, abs=1e-4)
    steps = drafted_steps(fast)
    assert any(a > 0 for _, a in steps) and any(a < d for d, a in steps)  # drafts accepted, and drafts rejected
    assert not drafted_steps(plain) and not drafted_steps(fast, "r1")
    assert drafted_steps(fast, "r2") and drafted_steps(fast, "late")


@pytest.mark.parametrize("draft", ["draft", "stranger"])
def test_the_draft_cache_after_rejected_drafts_holds_what_a_clean_draft_run_writes(models, draft):
    """With the draft, accepted runs and rejections; with the stranger, rejections, pauses (plain steps the draft
    catches up with, in prefill chunks of 4, as its prompt) and drafting again."""
    group = group_of(models, SPLITS["3-uneven"], draft=models[2] if draft == "stranger" else None)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=40, speculate="draft:4")
    seen, engines = run_loop(group, requests([seeded]), prefill_chunk=512 if draft == "draft" else 4)
    steps = drafted_steps(seen)
    assert any(a < d for d, a in steps)
    if draft == "draft":
        assert any(a > 0 for _, a in steps)
    else:
        assert len(steps) + sum(a for _, a in steps) < 40 - 2 * PAUSE_TOKENS  # paused at least twice
    tokens = PROMPTS[0] + tokens_of(seen, "r0")
    held, _ = engines[0].drafter.cached[0]  # slot 0: the positions the drafter counts as the sequence's
    assert held >= len(tokens) - PAUSE_TOKENS - 1  # it drafted near the end
    clean = 3  # a slot nobody used: the draft model run over the sequence in one go

    def cache(m, slot):  # (layers, kv heads, positions, dim) of this rank's share
        return [torch.stack([getattr(s, kv)[slot, :, :held] for s in m.states]) for kv in ("k", "v")]

    def compare(r, m):
        m.forward(torch.tensor([tokens[:held]]), torch.arange(held)[None], torch.tensor([clean]))
        for got, want in zip(cache(m, 0), cache(m, clean)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    group.on_all_ranks(lambda r, m: compare(r, group.drafts[r]))


def inside_a_drafted_run(seen):
    """(index in r0's tokens, token) of a token accepted in the middle of a verify step's run, not seen before."""
    events = [e for e in seen if e.request_id == "r0" and e.token_id is not None]
    tokens = [e.token_id for e in events]
    for i, e in enumerate(events):
        if e.accepted >= 2 and tokens[i + 1] not in tokens[: i + 1]:
            return i + 1, tokens[i + 1]
    raise AssertionError("no verify step accepted two drafted tokens")


def test_an_end_token_and_max_tokens_inside_a_drafted_run_stop_where_plain_decoding_stops(models):
    group = group_of(models, SPLITS["2-ranks"])
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=60, speculate="draft:4")
    seen, _ = run_loop(group, requests([seeded]))
    at, token = inside_a_drafted_run(seen)
    for params, stop_ids, finish, length in ((seeded, [token], "stop", at + 1),
                                             (dataclasses.replace(seeded, max_tokens=at), [], "length", at)):
        got = {}
        for p in (params, off(params)):
            events, _ = run_loop(group, [Add(Request("r0", PROMPTS[0], p, stop_ids))])
            got[p.speculate] = [(e.token_id, e.finish) for e in events]
        assert got["draft:4"] == got["off"]
        assert len(got["off"]) == length and got["off"][-1][1] == finish


def test_a_draft_that_is_the_target_has_nearly_every_drafted_token_accepted(models):
    """The drafter really drafts what the target will draw: its own weights, its own noise, its cache in step."""
    group = group_of(models, SPLITS["3-uneven"], draft=models[0])
    params = [SamplingParams(max_tokens=40, speculate="draft:4"),
              SamplingParams(temperature=0.8, seed=5, max_tokens=40, speculate="draft:4")]
    seen, _ = run_loop(group, requests(params))
    for rid in ("r0", "r1"):
        steps = drafted_steps(seen, rid)
        drafted, accepted = sum(d for d, _ in steps), sum(a for _, a in steps)
        assert drafted >= 30 and accepted >= 0.9 * drafted, (rid, steps)
        assert len(steps) <= 40 // 4 + 2  # several tokens per step
