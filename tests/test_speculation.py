"""Speculative decoding with n-gram drafting on CPU ranks (threads, in-process collectives): the embedded SmolLM2 in
float32, on 3 uneven ranks (the third holds no attention head), emits the same tokens drafting as without, greedy and
seeded, in mixed batches with n > 1; after a rejected draft the KV cache holds what plain decoding wrote; a stop string
inside a drafted run cuts the text where plain decoding does.

What does not depend on where the drafts come from is tested once, with a draft model on a tiny one
(tests/test_draft_model.py): the verify step at 1, 2, 3 uneven and 5 ranks, and an end token or max_tokens inside a
drafted run."""

import dataclasses

import pytest
import torch
import transformers

from raytp.actors.driver import _SampleText
from raytp.runtime.engine import Add, Request
from raytp.runtime.errors import RequestError
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import (PAUSE_TOKENS, SPECULATE_MAX_BATCH, SPECULATE_MAX_K, START_GAIN, NgramDrafter,
                                       RowSpeculation, drafted_tokens)
from raytp.weights.tokenizer import Tokenizer
from tests.sharded import LocalGroup, shared_group
from tests.test_decode_loop import run_loop, tokens_of

# Answers that copy their prompt, so that prompt lookup drafts often and is sometimes wrong
COPY = "Repeat this list exactly, one item per line: apples, pears, plums, cherries, grapes, lemons, figs."
EDIT = "Correct the spelling and give the sentence back: The quik brown fox jumpd over the lazzy dog by the rivr."


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in (COPY, EDIT)]


UNEVEN = (3.0, 2.0, 1.0)


@pytest.fixture
def group(smollm2_dir) -> LocalGroup:
    return shared_group(smollm2_dir, list(UNEVEN))


def requests(prompts, params: list[SamplingParams]) -> list[Add]:
    return [Add(Request(f"r{i}", prompts[i % len(prompts)], p, [2])) for i, p in enumerate(params)]


def samples(seen, rid):
    """{sample index: its tokens} of request `rid`."""
    return {i: [e.token_id for e in seen if e.request_id == rid and e.index == i and e.token_id is not None]
            for i in sorted({e.index for e in seen if e.request_id == rid})}


def off(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, speculate="off")


def drafted_steps(seen):
    """(drafted, accepted) of every row's verify steps."""
    return [(e.drafted, e.accepted) for e in seen if e.drafted]


def test_speculate_values_are_checked_naming_the_value():
    assert [drafted_tokens(v) for v in ("off", "ngram", "ngram:1", f"ngram:{SPECULATE_MAX_K}")] == \
        [0, 4, 1, SPECULATE_MAX_K]
    for bad in ("ngram:0", f"ngram:{SPECULATE_MAX_K + 1}", "ngram:-1", "ngram:x", "draft:x", "on", "", "off:2",
                "ngram:", "off:"):
        with pytest.raises(RequestError, match=repr(bad).replace("[", r"\[")) as e:
            SamplingParams(speculate=bad)
        assert e.value.param == "speculate"


def test_ngram_drafter_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    def brute(tokens, k):
        for n in (3, 2):
            suffix = tokens[-n:]
            for i in range(len(tokens) - n - 1, -1, -1):
                if tokens[i : i + n] == suffix:
                    period = tokens[i + n :]  # what followed; where it runs out the text repeats it
                    return (period * k)[:k]
        return []

    torch.manual_seed(0)
    drafter, tokens = NgramDrafter(), []
    for _ in range(400):  # grown a token at a time, as a sequence is: the index keeps up incrementally
        tokens.append(int(torch.randint(0, 6, ())))
        assert drafter.propose(tokens, 3) == brute(tokens, 3)


def test_greedy_and_seeded_tokens_are_those_of_plain_decoding_in_a_mixed_batch(group, prompts):
    """Four rows: greedy n=2 drafting 4, greedy without drafting, seeded top-k/top-p drafting 3 with a repetition
    penalty and logprobs, seeded plain temperature drafting 8; run again with drafting off everywhere."""
    params = [SamplingParams(max_tokens=40, n=2, speculate="ngram:4"),
              SamplingParams(max_tokens=32),
              SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=7, max_tokens=32,
                             logprobs=2, speculate="ngram:3")]
    joining = SamplingParams(temperature=0.5, seed=3, max_tokens=24, speculate="ngram:8")

    def run(params, late):
        def join(event, submit, seen):  # a fourth request arrives mid-run
            if event.request_id == "r0" and len(tokens_of(seen, "r0")) == 10:
                submit(Add(Request("late", prompts[1], late, [2])))
        return run_loop(group, requests(prompts, params), join)[0]

    fast = run(params, joining)
    plain = run([off(p) for p in params], off(joining))
    for rid in ("r0", "r1", "r2", "late"):
        assert samples(fast, rid) == samples(plain, rid), rid
    lp = {e.token_id: e.logprob for e in fast if e.request_id == "r2" and e.token_id is not None}
    lp_plain = {e.token_id: e.logprob for e in plain if e.request_id == "r2" and e.token_id is not None}
    assert lp == pytest.approx(lp_plain, abs=1e-4)
    steps = drafted_steps(fast)
    assert any(a > 0 for _, a in steps) and any(a < d for d, a in steps)  # drafts accepted, and drafts rejected
    assert not drafted_steps(plain) and not [e for e in fast if e.request_id == "r1" and e.drafted]


def test_the_cache_after_a_rejected_draft_holds_what_plain_decoding_wrote(group, prompts):
    params = SamplingParams(max_tokens=40, speculate="ngram:4")

    def run(p):  # r0 in slot 0, r1 in slot 1
        seen, _ = run_loop(group, requests(prompts, [p, p]))
        return seen, [(torch.stack([s.k[:2] for s in m.states]), torch.stack([s.v[:2] for s in m.states]))
                      for m in group.models]

    for m in group.models:  # what a previous run left in the slots must not matter
        for t in m.cache_tensors():
            t.normal_()
    fast, fast_cache = run(params)
    assert any(a < d for d, a in drafted_steps(fast))
    plain, plain_cache = run(off(params))
    for slot, rid in enumerate(("r0", "r1")):
        tokens = tokens_of(plain, rid)
        assert tokens_of(fast, rid) == tokens
        written = len(prompts[slot]) + len(tokens) - 1  # the last token was drawn, never fed back
        # float32 rounding only (a product over k + 1 rows may sum in another order than over one): a rejected
        # draft's keys, or the noise, left where the sequence reads would differ by O(1)
        for (k, v), (k_plain, v_plain) in zip(fast_cache, plain_cache):  # (layers, slots, kv heads, positions, dim)
            torch.testing.assert_close(k[:, slot, :, :written], k_plain[:, slot, :, :written], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v[:, slot, :, :written], v_plain[:, slot, :, :written], rtol=1e-4, atol=1e-4)


@pytest.fixture
def drafted_run(group, prompts):
    """A greedy speculating run of one request: the group and its events."""
    seen, _ = run_loop(group, requests(prompts, [SamplingParams(max_tokens=60, speculate="ngram:4")]))
    return group, seen


def inside_a_drafted_run(seen):
    """(index in r0's tokens, token) of a token accepted in the middle of a verify step's run: not the run's first
    (which any step would emit) and, for a stop token, not seen before in the answer."""
    events = [e for e in seen if e.request_id == "r0" and e.token_id is not None]
    tokens = [e.token_id for e in events]
    for i, e in enumerate(events):
        if e.accepted >= 2 and tokens[i + 1] not in tokens[: i + 1]:
            return i + 1, tokens[i + 1]
    raise AssertionError("no verify step accepted two drafted tokens")


def test_a_stop_string_inside_a_drafted_run_cuts_the_text_where_plain_decoding_does(drafted_run, tokenizer, prompts):
    group, seen = drafted_run
    at, _ = inside_a_drafted_run(seen)
    tokens = tokens_of(seen, "r0")
    stop = tokenizer.decode(tokens[at : at + 1]).strip() or tokenizer.decode(tokens[at - 1 : at + 1])
    assert stop and stop not in tokenizer.decode(tokens[:at])

    def text(events):
        sample, pieces = _SampleText(tokenizer, [stop]), []
        for e in events:
            if e.request_id == "r0" and sample.finish is None:
                pieces.append(sample.take(e))
        return "".join(pieces), sample.finish

    plain, _ = run_loop(group, [Add(Request("r0", prompts[0], SamplingParams(max_tokens=60), [2]))])
    assert text(seen) == text(plain) and text(plain)[1] == "stop"


def test_a_row_whose_drafts_keep_failing_pauses_then_tries_again():
    row = RowSpeculation(k=4)
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]  # (1, 2) was followed by 3: always a draft
    assert row.draft(tokens, generated=0, room=8) == [3, 1, 2, 3]  # the period (3, 1, 2) goes on
    row.record(0, generated=1)  # gain 1 -> 0.5
    assert row.draft(tokens, generated=1, room=8)
    row.record(0, generated=2)  # 0.25, below MIN_GAIN
    assert [bool(row.draft(tokens, g, room=8)) for g in range(2, 2 + PAUSE_TOKENS + 1)] == \
        [False] * PAUSE_TOKENS + [True]
    assert row.gain == START_GAIN
    assert row.draft(tokens, generated=20, room=2) == [3, 1]  # never past the room left


def test_a_batch_above_the_threshold_takes_plain_steps(tmp_path):
    """SPECULATE_MAX_BATCH + 1 drafting rows of a tiny random model (repetitive prompts: drafts always found): no
    verify step while all of them decode, verify steps while fewer do."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=64, num_hidden_layers=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    rows = SPECULATE_MAX_BATCH + 1
    group = LocalGroup(tmp_path, [1.0, 1.0], max_context=128, max_batch=rows)
    params = SamplingParams(max_tokens=30, speculate="ngram:4")
    seen, _ = run_loop(group, [Add(Request(f"r{i}", [7, 8, 9 + i] * 4, params)) for i in range(rows)])
    ids = [e.request_id for e in seen]
    all_in = max(ids.index(f"r{i}") for i in range(rows))  # the last row's first token: the batch is whole
    first_out = next(i for i, e in enumerate(seen) if e.finish)
    assert all_in < first_out and not any(e.drafted for e in seen[all_in:first_out])
    assert any(e.drafted for e in seen[:all_in] + seen[first_out:])
