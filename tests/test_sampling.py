"""Sampling over vocab shards: same draw at every split, Hugging Face filter semantics, right distribution."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from raytp.parallel.comm import InProcessGroup
from raytp.runtime.sampling import (
    TOP_LOGPROBS_MAX,
    SamplingParams,
    ShardedSampler,
    apply_repetition_penalty,
    seen_mask,
)
from tests.test_comm import run_ranks

V = 500


def split_bounds(world_size, seed):
    """Random uneven contiguous vocab ranges; some ranks may hold nothing."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, V + 1, (world_size - 1,), generator=g).tolist())
    edges = [0, *cuts, V]
    return list(zip(edges[:-1], edges[1:]))


def sharded_sample(logits, params, positions, world_size, seed=0, histories=None):
    bounds = split_bounds(world_size, seed)
    group = InProcessGroup(world_size)
    histories = histories or [torch.empty(0, dtype=torch.int64)] * logits.shape[0]

    def body(comm):
        lo, hi = bounds[comm.rank]
        return ShardedSampler(comm, lo).sample(logits[:, lo:hi].clone(), params, positions, histories)

    results = run_ranks(world_size, group.communicator, body)
    assert all(r == results[0] for r in results)  # every rank draws the same tokens
    return results[0]


CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.8, seed=3),
    SamplingParams(temperature=1.3, top_k=5, seed=4),
    SamplingParams(temperature=1.0, top_p=0.9, seed=5),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.5, seed=6),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=7),
]


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_every_split_draws_what_one_rank_draws(world_size):
    g = torch.Generator().manual_seed(world_size)
    logits = torch.randn(len(CASES), V, generator=g) * 3
    positions = list(range(len(CASES)))
    histories = [torch.randint(0, V, (20,), generator=g) for _ in CASES]
    for seed in range(4):
        one = sharded_sample(logits, CASES, positions, 1, histories=histories)
        assert sharded_sample(logits, CASES, positions, world_size, seed, histories) == one


def test_greedy_is_argmax_with_ties_to_the_lower_id():
    logits = torch.zeros(1, V)
    logits[0, [123, 321, 400]] = 5.0
    assert sharded_sample(logits, [SamplingParams()], [0], 4, seed=1) == [123]


def test_flat_distribution_top_p_needs_more_candidates_and_stays_exact():
    # nearly uniform: the 0.95 nucleus holds ~475 tokens, far more than the first 64 candidates per rank
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 0.01
    p = 0.95
    reference = TopPLogitsWarper(top_p=p)(None, logits.clone())
    allowed = set(torch.isfinite(reference[0]).nonzero().view(-1).tolist())
    drawn = {sharded_sample(logits, [SamplingParams(temperature=1.0, top_p=p, seed=s)], [0], 3)[0]
             for s in range(200)}
    assert drawn <= allowed
    assert len(drawn) > 100  # really sampling from the wide nucleus


def test_top_k_top_p_draws_only_what_transformers_keeps():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2)) * 4
    reference = TopPLogitsWarper(top_p=0.6)(None, TopKLogitsWarper(top_k=8)(None, logits.clone()))
    allowed = set(torch.isfinite(reference[0]).nonzero().view(-1).tolist())
    params = [SamplingParams(temperature=1.0, top_k=8, top_p=0.6, seed=s) for s in range(300)]
    drawn = set(sharded_sample(logits.repeat(len(params), 1), params, [0] * len(params), 4))
    assert drawn == allowed


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
    drawn = torch.tensor(sharded_sample(logits.repeat(n, 1), params, [0] * n, 3))
    freq = torch.bincount(drawn, minlength=V)[:4].float() / n
    expected = torch.softmax(logits[0, :4], 0)
    assert torch.allclose(freq, expected, atol=0.03)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, V)
    history = torch.tensor([[3, 7, 7, 450, 499]])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    ours = logits.clone()
    for lo, hi in [(0, 200), (200, 460), (460, V)]:
        ours[0, lo:hi] = apply_repetition_penalty(ours[0, lo:hi], seen_mask(history[0], lo, hi - lo), 1.5)
    torch.testing.assert_close(ours, expected)


def test_bad_parameters_name_the_value():
    for kwargs, text in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                         ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(ValueError, match=text):
            SamplingParams(**kwargs)

def test_a_tiny_temperature_draws_greedily_with_finite_logprobs():
    """1e-40 is inside [0, 2] but divides float32 logits to inf: it draws as temperature 0 does, and its
    log-probabilities are the unscaled distribution's, as greedy rows report them."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, V, generator=g) * 3
    tiny, zero = SamplingParams(temperature=1e-40, seed=2), SamplingParams()
    tokens, rows = sharded_draw(logits, [tiny, zero], 3)
    assert tokens == [logits[0].argmax().item(), logits[1].argmax().item()]
    want = torch.log_softmax(logits[0].double(), dim=-1)
    assert rows[0][0] == pytest.approx(want[tokens[0]].item(), abs=1e-6)
    assert all(math.isfinite(v) for _, v in rows[0][1])


# ---- log-probabilities ---------------------------------------------------------------------------------------

def reference_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers, then log-softmax: the distribution a row is drawn from (-inf outside top-k / top-p);
    greedy rows: the unscaled distribution."""
    scores = logits.clone() if params.greedy else logits / params.temperature
    if not params.greedy and params.top_k:
        scores = TopKLogitsWarper(top_k=params.top_k)(None, scores)
    if not params.greedy and params.top_p < 1:
        scores = TopPLogitsWarper(top_p=params.top_p)(None, scores)
    return torch.log_softmax(scores.double(), dim=-1)


def sharded_draw(logits, params, world_size, seed=0):
    bounds = split_bounds(world_size, seed)
    group = InProcessGroup(world_size)
    empty = [torch.empty(0, dtype=torch.int64)] * logits.shape[0]

    def body(comm):
        lo, hi = bounds[comm.rank]
        draw = ShardedSampler(comm, lo).draw_exact(logits[:, lo:hi].clone(), params, [0] * len(params), empty,
                                                   logprobs=True)
        return draw.tokens.tolist(), [draw.logprobs.rows(b, TOP_LOGPROBS_MAX) for b in range(len(params))]

    results = run_ranks(world_size, group.communicator, body)
    assert all(r == results[0] for r in results)  # every rank holds the same numbers
    return results[0]


LOGPROB_CASES = CASES[:5] + [SamplingParams(temperature=0.9, top_p=0.95, seed=8)]


@pytest.mark.parametrize("world_size", [1, 3, 7])
def test_logprobs_are_transformers_log_softmax_of_the_drawn_distribution(world_size):
    g = torch.Generator().manual_seed(10 + world_size)
    logits = torch.randn(len(LOGPROB_CASES), V, generator=g) * 3
    tokens, rows = sharded_draw(logits, LOGPROB_CASES, world_size, seed=world_size)
    for b, (params, token, (chosen, top)) in enumerate(zip(LOGPROB_CASES, tokens, rows)):
        want = reference_logprobs(logits[b : b + 1], params)[0]
        assert chosen == pytest.approx(want[token].item(), abs=1e-9)
        kept = int(torch.isfinite(want).sum())
        values, ids = want.topk(min(TOP_LOGPROBS_MAX, kept))
        assert [i for i, _ in top] == ids.tolist()  # random logits: no ties
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-9)


@pytest.mark.parametrize("world_size", [1, 3])
def test_prompt_logprobs_are_the_log_softmax_of_the_given_tokens(world_size):
    g = torch.Generator().manual_seed(world_size)
    logits = torch.randn(9, V, generator=g) * 2
    following = torch.randint(0, V, (9,), generator=g)
    bounds = split_bounds(world_size, 5)

    def body(comm):
        lo, hi = bounds[comm.rank]
        lp = ShardedSampler(comm, lo).prompt_logprobs(logits[:, lo:hi].clone(), following)
        return [lp.rows(t, 3) for t in range(9)]

    results = run_ranks(world_size, InProcessGroup(world_size).communicator, body)
    assert all(r == results[0] for r in results)
    want = torch.log_softmax(logits.double(), dim=-1)
    for t, (chosen, top) in enumerate(results[0]):
        assert chosen == pytest.approx(want[t, following[t]].item(), abs=1e-9)
        values, ids = want[t].topk(3)
        assert [i for i, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-9)


def test_logprobs_ride_along_without_changing_the_draw():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(len(CASES), V, generator=g) * 3
    assert sharded_draw(logits, CASES, 3)[0] == sharded_sample(logits, CASES, [0] * len(CASES), 3)


def test_flat_top_p_logprobs_stay_exact_when_the_exchange_grows():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 0.01
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1)
    (token,), ((chosen, top),) = sharded_draw(logits, [params], 3)
    want = reference_logprobs(logits, params)[0]
    assert chosen == pytest.approx(want[token].item(), abs=1e-9)
    assert [v for _, v in top] == pytest.approx(want.topk(TOP_LOGPROBS_MAX).values.tolist(), abs=1e-9)
