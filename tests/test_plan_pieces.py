"""The planner over pieces it has never heard of: any list a model declares is split exactly, within budgets, in
whole blocks; a new kind of piece needs nothing in plan.py."""

import dataclasses
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytp.parallel.plan import Piece, PlanError, PlanShape, Span, plan_shards


@dataclass(frozen=True)
class Declared:
    """A test-local model: whatever pieces it is given, and a fixed replicated part."""

    declared: tuple[Piece, ...]
    replicated: int = 0
    quant: str | None = None

    def pieces(self, shape: PlanShape):
        # a block asked by name replaces the declared one, as a model's declaration does
        return tuple(dataclasses.replace(p, block=shape.block(p.name, p.block)) for p in self.declared)

    def replicated_bytes(self, shape: PlanShape) -> int:
        return self.replicated

    def describe(self, shape: PlanShape) -> str:
        return shape.dtype


@st.composite
def piece_lists(draw):
    n = draw(st.integers(1, 4))
    pieces = []
    for i in range(n):
        block = draw(st.integers(1, 64))
        group = draw(st.sampled_from([g for g in range(1, block + 1) if block % g == 0]))
        weight = draw(st.integers(1, 10_000))
        followers = tuple(Span(f"p{i}_follow{j}", f"follow {j}", draw(st.integers(1, 8)))
                          for j in range(draw(st.integers(0, 2))))
        pieces.append(Piece((Span(f"p{i}", f"piece {i}"), *followers), size=draw(st.integers(1, 600)), block=block,
                            weight_bytes=weight, read_bytes=draw(st.integers(0, weight)),
                            cache=(("cache", draw(st.integers(0, 5_000))),), group=group,
                            group_bytes=draw(st.integers(0, 2_000)) if group > 1 else 0, unit=f"block {i}"))
    return Declared(tuple(pieces), replicated=draw(st.integers(0, 10**6)))


def total_bytes(p: Piece) -> int:
    """Every unit's weights and cache plus the scales of every group, counted without the planner's helpers."""
    return p.size * (p.weight_bytes + p.cache_bytes) + -(-p.size // p.group) * p.group_bytes


def check_plan(model: Declared, plan, budgets):
    assert [r.device for r in plan.ranks] == [name for name, _ in budgets]
    assert [p.name for p in plan.pieces] == [p.name for p in model.declared]
    for p in plan.pieces:
        own = [r.spans[p.name] for r in plan.ranks]
        assert own[0].start == 0 and own[-1].stop == p.size
        assert all(a.stop == b.start for a, b in zip(own, own[1:]))  # contiguous, in rank order, disjoint
        assert all(s.start % p.block == 0 for s in own if s)  # whole blocks: only the dimension's last is partial
        for follower in p.spans[1:]:
            assert [r.spans[follower.name] for r in plan.ranks] == [
                range(s.start * follower.per_unit, s.stop * follower.per_unit) for s in own]
            assert [getattr(r, follower.name) for r in plan.ranks] == [r.spans[follower.name] for r in plan.ranks]
    for r in plan.ranks:
        assert r.weight_bytes + r.kv_cache_bytes + r.overhead_bytes <= r.budget_bytes
        assert r.overhead_bytes == model.replicated
    assert sum(r.weight_bytes + r.kv_cache_bytes for r in plan.ranks) == sum(map(total_bytes, model.declared))
    assert sum(r.kv_cache_bytes for r in plan.ranks) == sum(p.size * p.cache_bytes for p in model.declared)


weights = st.lists(st.one_of(st.integers(1, 10), st.integers(1, 10**6)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(piece_lists(), weights, st.floats(0.5, 3.0))
def test_any_pieces_give_a_valid_plan_or_a_plan_error_naming_every_device(model, ws, scale):
    need = sum(map(total_bytes, model.declared))
    budgets = [(f"dev{i}", model.replicated + int(need * scale * w / sum(ws))) for i, w in enumerate(ws)]
    try:
        plan = plan_shards(model, budgets, max_context=1, max_batch=1)
    except PlanError as e:
        message = str(e)
        for i, (name, _) in enumerate(budgets):
            assert re.search(rf"rank {i} {name}: needs [\d.]+ \w*B, has [\d.]+ \w*B", message)
        for p in model.declared:
            assert f"one {p.unit} " in message  # every indivisible piece is named with its size
        fits_in_total = sum(b for _, b in budgets) - len(budgets) * model.replicated >= need
        assert fits_in_total == ("indivisible pieces, although the total would" in message)
        return
    assert sum(b for _, b in budgets) - len(budgets) * model.replicated >= need
    check_plan(model, plan, budgets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(piece_lists(), weights)
def test_generous_budgets_give_every_piece_in_proportion_within_one_block(model, ws):
    unit = 2 * sum(map(total_bytes, model.declared))  # room for each rank's share plus a block of every piece
    budgets = [(f"dev{i}", model.replicated + w * unit) for i, w in enumerate(ws)]
    plan = plan_shards(model, budgets, max_context=1, max_batch=1)
    check_plan(model, plan, budgets)
    for p in model.declared:
        for r, w in zip(plan.ranks, ws):
            assert abs(len(r.spans[p.name]) - p.size * w / sum(ws)) <= p.block


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(piece_lists(), st.lists(st.integers(100, 5000), min_size=1, max_size=8), st.floats(1.0, 4.0))
def test_speed_split_of_any_pieces_fits_and_is_never_slower(model, gbs, scale):
    need = sum(map(total_bytes, model.declared))
    budgets = [(f"dev{i}", model.replicated + int(need * scale / len(gbs)) + i) for i in range(len(gbs))]
    bandwidths = [g * 1e9 for g in gbs]
    try:
        memory = plan_shards(model, budgets, max_context=1, max_batch=1, bandwidths=bandwidths, split="memory")
    except PlanError:
        return
    speed = plan_shards(model, budgets, max_context=1, max_batch=1, bandwidths=bandwidths)
    check_plan(model, speed, budgets)
    assert speed.step_seconds <= memory.step_seconds


def test_a_new_kind_of_piece_is_planned_shown_and_reached_by_name():
    """A piece kind the planner was never told about (expert units of 3 expert columns each) beside a vocabulary:
    each rank gets a range of both, reached by name, and the tables show them."""
    experts = Piece((Span("expert_units", "expert units"), Span("expert_cols", "expert columns", 3)), size=100,
                    block=4, weight_bytes=1000, read_bytes=125, unit="expert block")
    vocab = Piece((Span("vocab", "vocab rows"),), size=50, block=8, weight_bytes=200, read_bytes=200,
                  unit="vocab block")
    model = Declared((experts, vocab), replicated=1000)
    budgets = [("big", 1000 + 90_000), ("small", 1000 + 30_000)]
    plan = plan_shards(model, budgets, max_context=1, max_batch=1, blocks={"expert_units": 2})
    check_plan(model, plan, budgets)
    big, small = plan.ranks
    assert plan.block("expert_units") == 2  # the block asked for by the piece's name
    # 3:1 of the room: 75 units, the split point half-way between block boundaries 74 and 76 rounds up
    assert (len(big.expert_units), len(small.expert_units)) == (76, 24)
    assert big.expert_cols == range(0, 3 * 76) and small.expert_cols == range(3 * 76, 300)
    d = plan.to_dict()
    assert d["ranks"][1]["expert_cols_range"] == [228, 300] and d["ranks"][1]["expert_units"] == 24
    assert [p["name"] for p in d["pieces"]] == ["expert_units", "vocab"]
    header = plan.format_table().splitlines()[0]
    assert header.index("expert columns") < header.index("expert units") < header.index("vocab rows")
    assert "100 expert units in blocks of 2 (expert block)" in plan.describe_pieces()
    with pytest.raises(AttributeError, match="no attribute or span 'kv_heads'"):
        big.kv_heads  # noqa: B018 - nothing here is a Llama


def test_indivisible_piece_too_big_for_either_device_is_named_in_the_error():
    coarse = Piece((Span("coarse", "coarse units"),), size=1, block=1, weight_bytes=600, read_bytes=600,
                   cache=(("cache", 400),), unit="coarse unit")
    fine = Piece((Span("fine", "fine units"),), size=100, block=1, weight_bytes=1, read_bytes=1, unit="fine unit")
    with pytest.raises(PlanError, match="although the total would") as info:
        plan_shards(Declared((coarse, fine)), [("a", 700), ("b", 700)], max_context=1, max_batch=1)
    assert "one coarse unit 1000 B (weights and cache), one fine unit 1 B." in str(info.value)


@pytest.mark.parametrize("model", ["synthetic:llama-3.1-8b", "synthetic:gemma-3-27b", "synthetic:qwen3.5-27b"])
def test_a_decode_step_reads_the_kv_cache_it_fills_the_window_up_to_its_window_and_recurrent_state_whole(model):
    from raytp.model.pieces import decode_read_bytes, plan_model
    from raytp.weights.synthetic import synthetic_config

    config = synthetic_config(model)
    plan = plan_model(config, [("cuda:0", 80 << 30), ("cuda:1", 40 << 30)], max_context=8192, max_batch=8,
                      dtype="bfloat16")
    window = config.sliding_window or 0

    def state(name, rows):
        return [rows / 8 * r.state_bytes.get(name, 0) for r in plan.ranks]

    for batch, context in ((1, 0), (2, 1024), (8, 8192), (4, window / 2), (4, window + 1)):
        fixed = [r.read_bytes for r in plan.ranks]
        kv = [b * context / 8192 for b in state("KV cache", batch)]
        win = [b * min(context, window) / max(window, 1) for b in state("window cache", batch)]
        recurrent = state("conv + recurrent state", batch)
        expected = [sum(parts) for parts in zip(fixed, kv, win, recurrent)]
        assert decode_read_bytes(config, plan, batch, context) == pytest.approx(expected, abs=len(plan.ranks))
    names = set().union(*(r.state_bytes for r in plan.ranks))
    assert names <= {"KV cache", "window cache", "conv + recurrent state"}, names  # a new state is read as declared
