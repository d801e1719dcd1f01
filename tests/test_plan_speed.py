"""The speed split: shares that minimize the slowest rank's weight reads over its bandwidth, within every budget."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raytp.parallel.plan import DTYPE_BYTES, PlanError
from raytp.model.layout import param_count
from raytp.model.pieces import plan_model, replicated_overhead_bytes
from raytp.weights.synthetic import synthetic_config
from tests.test_plan import check_invariants, configs, model_bytes, shapes

GiB = 2**30
# bandwidths from a slow consumer card to an HBM3e one, in GB/s
bandwidths = st.lists(st.integers(100, 5000), min_size=1, max_size=12)
room_weights = st.lists(st.integers(1, 100), min_size=12, max_size=12)


def _budgets(config, shape, scale, ws):
    overhead = replicated_overhead_bytes(config, max_context=shape["max_context"], max_batch=shape["max_batch"],
                                         dtype=shape["dtype"])
    need = sum(model_bytes(config, **shape))
    return [(f"cuda:{i}", overhead + int(need * scale * w / sum(ws))) for i, w in enumerate(ws)]


def _read_bytes(config, dtype):
    """Bytes a batch-1 step streams: every weight but the norms and the embedding table (from param_count)."""
    h, layers = config.hidden_size, config.num_layers
    embedding = config.vocab_size * h if not config.tie_word_embeddings else 0
    return (param_count(config) - embedding - (2 * layers + 1) * h) * DTYPE_BYTES[dtype]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), bandwidths, room_weights, shapes, st.floats(1.0, 4.0))
def test_speed_split_fits_and_is_never_slower_than_memory_split(config, gbs, ws, shape, scale):
    budgets = _budgets(config, shape, scale, ws[: len(gbs)])
    bw = [g * 1e9 for g in gbs]
    try:
        memory = plan_model(config, budgets, **shape, bandwidths=bw, split="memory")
    except PlanError:
        return
    speed = plan_model(config, budgets, **shape, bandwidths=bw)
    assert speed.split == "speed"
    check_invariants(config, speed, budgets, shape)
    assert speed.step_seconds <= memory.step_seconds
    assert sum(r.read_bytes for r in speed.ranks) == _read_bytes(config, shape["dtype"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), shapes, st.integers(1, 12), st.floats(1.0, 3.0))
def test_identical_devices_that_fit_get_the_even_split(config, shape, n, scale):
    budgets = _budgets(config, shape, scale * n, [1] * n)  # each device could hold the model `scale` times
    memory = plan_model(config, budgets, **shape)
    speed = plan_model(config, budgets, **shape, bandwidths=[1e12] * n)
    assert [(r.kv_heads, r.mlp_cols, r.vocab_rows) for r in speed.ranks] == \
           [(r.kv_heads, r.mlp_cols, r.vocab_rows) for r in memory.ranks]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), bandwidths, room_weights, shapes, st.floats(1.5, 8.0))
def test_speed_split_is_within_one_block_of_the_continuous_optimum(config, gbs, ws, shape, scale):
    """The continuous optimum: the time T at which every rank, filled to min(its room, T x its bandwidth),
    holds the model, found here by bisection (independent of the planner's breakpoint walk). Where every rank has
    room for its continuous share plus one block of every piece, rounding to blocks costs at most one block of
    every piece on the slowest rank."""
    budgets = _budgets(config, shape, scale, ws[: len(gbs)])
    bw = [g * 1e9 for g in gbs]
    overhead = replicated_overhead_bytes(config, max_context=shape["max_context"], max_batch=shape["max_batch"],
                                         dtype=shape["dtype"])
    held = sum(model_bytes(config, **shape))  # bytes the ranks hold (weights + cache)
    read = _read_bytes(config, shape["dtype"])
    room = [b - overhead for _, b in budgets]
    lo, hi = 0.0, read / min(bw)
    for _ in range(200):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if sum(min(r / held, t * b / read) for r, b in zip(room, bw)) < 1 else (lo, t)
    shares = [min(r / held, hi * b / read) for r, b in zip(room, bw)]
    h, layers, nbytes = config.hidden_size, config.num_layers, DTYPE_BYTES[shape["dtype"]]
    rows = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    cache = 2 * layers * shape["max_batch"] * shape["max_context"] * config.head_dim * nbytes
    kv_read = (param_count(config) - 3 * h * config.intermediate_size * layers - rows - (2 * layers + 1) * h) \
        // config.num_kv_heads * nbytes
    mlp_block = shape["blocks"]["mlp_cols"] * 3 * h * layers * nbytes
    vocab_block = shape["blocks"]["vocab_rows"] * h * nbytes
    held_blocks = kv_read + cache + mlp_block + vocab_block * (1 if config.tie_word_embeddings else 2)
    if any(r < f * held + held_blocks for r, f in zip(room, shares)):
        event("skipped: tight room")
        return  # some rank could not take one more block of each: rebalancing may move more than a block
    plan = plan_model(config, budgets, **shape, bandwidths=bw)
    assert plan.step_seconds <= hi + (kv_read + mlp_block + vocab_block) / min(bw) * 1.000001


def test_a_small_card_beside_a_big_one_fills_up_when_both_read_as_fast():
    """70B on a 48 GiB + 141 GiB pair of equally fast cards: the memory split leaves the small card 28% of the
    weights, so the big card paces the step; the speed split gives the small card all it can hold."""
    config = synthetic_config("synthetic:llama-3.1-70b")
    budgets = [("cuda:0@48GiB", 48 * GiB), ("cuda:1@141GiB", 141 * GiB)]
    shape = dict(max_context=2048, max_batch=8, dtype="bfloat16")
    memory = plan_model(config, budgets, **shape, bandwidths=[4.8e12] * 2, split="memory")
    speed = plan_model(config, budgets, **shape, bandwidths=[4.8e12] * 2)
    assert memory.pacing_rank == speed.pacing_rank == 1
    assert speed.step_seconds < 0.95 * memory.step_seconds
    assert speed.ranks[0].headroom_bytes < memory.ranks[0].headroom_bytes / 4


def test_a_fast_card_gets_more_than_its_memory_share():
    config = synthetic_config("synthetic:llama-3.1-8b")
    budgets = [("cuda:0@24GiB", 24 * GiB), ("cuda:1@24GiB", 24 * GiB)]
    plan = plan_model(config, budgets, max_context=2048, max_batch=1, bandwidths=[2.0e12, 1.0e12])
    assert len(plan.ranks[0].mlp_cols) > 1.8 * len(plan.ranks[1].mlp_cols)
    assert plan.ranks[0].step_seconds == pytest.approx(plan.ranks[1].step_seconds, rel=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="speed"), "needs every device's memory bandwidth"),
    (dict(split="fast", bandwidths=[1e12]), "unknown split 'fast'"),
    (dict(bandwidths=[1e12, 2e12]), "one positive bandwidth per device"),
    (dict(bandwidths=[0.0]), "one positive bandwidth per device"),
])
def test_bad_split_arguments(kwargs, match):
    config = synthetic_config("synthetic:tiny")
    with pytest.raises(ValueError, match=match):
        plan_model(config, [("cpu", GiB)], max_context=64, max_batch=1, **kwargs)


def test_raytp_plan_shows_both_splits_and_the_pacing_rank(capsys):
    from raytp.cli import main

    assert main(["plan", "--model", "synthetic:llama-3.1-8b", "--devices", "cuda:0@24GiB~2TB/s,cuda:1@24GiB~1TB/s"]) == 0
    out = capsys.readouterr().out
    memory = plan_model(synthetic_config("synthetic:llama-3.1-8b"), [("a", 24 * GiB), ("b", 24 * GiB)],
                         max_context=2048, max_batch=1, bandwidths=[2e12, 1e12], split="memory")  # generate's
    assert f"memory split: predicted step {1000 * memory.step_seconds:.2f} ms" in out
    assert "speed split: predicted step" in out and "<- this plan" in out.split("speed split")[1]
    assert "<- paces" in out
    assert main(["plan", "--model", "synthetic:tiny", "--devices", "cpu@1GiB", "--split", "speed"]) == 2
    assert "needs every device's bandwidth" in capsys.readouterr().err
