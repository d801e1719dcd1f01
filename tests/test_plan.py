import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytp.model.layout import param_count
from raytp.model.config import ModelConfig
from raytp.parallel.plan import DTYPE_BYTES, PlanError
from raytp.model.pieces import plan_model, replicated_overhead_bytes

GiB, MiB = 2**30, 2**20
SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


@st.composite
def configs(draw):
    kv, q = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    return ModelConfig(
        arch="llama", vocab_size=draw(st.integers(100, 5000)), hidden_size=draw(st.integers(16, 256)),
        intermediate_size=draw(st.integers(64, 3000)), num_layers=draw(st.integers(1, 4)), num_heads=kv * q,
        num_kv_heads=kv, head_dim=draw(st.sampled_from([8, 16, 64])), tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
    )


# wildly uneven: a 1..16-rank cluster whose largest device can be a million times the smallest
weights = st.lists(st.one_of(st.integers(1, 10), st.integers(1, 10**6)), min_size=1, max_size=16)
shapes = st.fixed_dictionaries({"max_context": st.integers(1, 4096), "max_batch": st.integers(1, 8),
                                "dtype": st.sampled_from(sorted(DTYPE_BYTES)),
                                "blocks": st.fixed_dictionaries({"mlp_cols": st.sampled_from([1, 32, 64, 128]),
                                                                 "vocab_rows": st.sampled_from([1, 64, 256])})})


def model_bytes(config, max_context, max_batch, dtype, **_):
    """Sharded bytes from the layout's param_count, independent of the planner's per-unit arithmetic."""
    nbytes = DTYPE_BYTES[dtype]
    norms = (2 * config.num_layers + 1) * config.hidden_size
    cache = 2 * config.num_layers * max_batch * max_context * config.head_dim * config.num_kv_heads
    return (param_count(config) - norms) * nbytes, cache * nbytes


def check_invariants(config, plan, budgets, shape):
    ranks = plan.ranks
    assert [r.device for r in ranks] == [name for name, _ in budgets]
    for attr, size in (("kv_heads", config.num_kv_heads), ("q_heads", config.num_heads),
                       ("mlp_cols", config.intermediate_size), ("vocab_rows", config.vocab_size)):
        spans = [getattr(r, attr) for r in ranks]
        # contiguous, in rank order, disjoint, covering the whole dimension
        assert spans[0].start == 0 and spans[-1].stop == size
        assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
        assert all(s.step == 1 and s.start <= s.stop for s in spans)
        assert sum(len(s) for s in spans) == size
    q = config.q_per_kv
    for r in ranks:
        assert list(r.q_heads) == [h for kv in r.kv_heads for h in range(kv * q, (kv + 1) * q)]
        assert r.weight_bytes + r.kv_cache_bytes + r.overhead_bytes <= r.budget_bytes
        assert r.headroom_bytes >= 0
        assert r.budget_bytes == budgets[r.rank][1]
    weights_total, cache_total = model_bytes(config, **shape)
    assert sum(r.weight_bytes for r in ranks) == weights_total
    assert sum(r.kv_cache_bytes for r in ranks) == cache_total


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), weights, shapes, st.floats(0.3, 3.0))
def test_any_budgets_give_a_valid_plan_or_plan_error(config, ws, shape, scale):
    overhead = replicated_overhead_bytes(config, max_context=shape["max_context"], max_batch=shape["max_batch"],
                                         dtype=shape["dtype"])
    need = sum(model_bytes(config, **shape))
    budgets = [(f"cuda:{i}", overhead + int(need * scale * w / sum(ws))) for i, w in enumerate(ws)]
    try:
        plan = plan_model(config, budgets, **shape)
    except PlanError as e:
        message = str(e)
        for i, (name, _) in enumerate(budgets):
            assert re.search(rf"rank {i} {re.escape(name)}: needs [\d.]+ \w*B, has [\d.]+ \w*B", message)
        fits_in_total = sum(b for _, b in budgets) - len(budgets) * overhead >= need
        assert fits_in_total == ("indivisible pieces, although the total would" in message)
        return
    assert sum(b for _, b in budgets) - len(budgets) * overhead >= need
    check_invariants(config, plan, budgets, shape)


@settings(max_examples=300, deadline=None)
@given(configs(), weights, shapes)
def test_generous_budgets_split_in_proportion_within_one_block(config, ws, shape):
    # Left-over memory of 2 x (the whole model) per unit of weight covers each rank's ideal share plus one block
    # of every piece, so the plan must succeed without rebalancing and stay within a block of proportional.
    overhead = replicated_overhead_bytes(config, max_context=shape["max_context"], max_batch=shape["max_batch"],
                                         dtype=shape["dtype"])
    unit = 2 * sum(model_bytes(config, **shape))
    budgets = [(f"cpu@{w}", overhead + w * unit) for w in ws]
    plan = plan_model(config, budgets, **shape)
    check_invariants(config, plan, budgets, shape)
    for r, w in zip(plan.ranks, ws):
        share = w / sum(ws)
        assert abs(len(r.kv_heads) - config.num_kv_heads * share) <= 1
        assert abs(len(r.mlp_cols) - config.intermediate_size * share) <= shape["blocks"]["mlp_cols"]
        assert abs(len(r.vocab_rows) - config.vocab_size * share) <= shape["blocks"]["vocab_rows"]


@settings(max_examples=300, deadline=None)
@given(configs(), weights, shapes, st.floats(1.0, 2.0))
def test_fails_only_when_kv_groups_cannot_be_placed_or_the_margin_is_under_a_block(config, ws, shape, scale):
    # Unit sizes from the layout's param_count by subtraction, not from the planner's own arithmetic.
    nbytes, h, layers = DTYPE_BYTES[shape["dtype"]], config.hidden_size, config.num_layers
    rows = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    attention = param_count(config) - 3 * h * config.intermediate_size * layers - rows - (2 * layers + 1) * h
    cache = 2 * layers * shape["max_batch"] * shape["max_context"] * config.head_dim
    group = (attention // config.num_kv_heads + cache) * nbytes
    mlp_block, vocab_block = shape["blocks"]["mlp_cols"], shape["blocks"]["vocab_rows"]
    blocks = (mlp_block * 3 * h * layers + vocab_block * rows // config.vocab_size) * nbytes
    overhead = replicated_overhead_bytes(config, max_context=shape["max_context"], max_batch=shape["max_batch"],
                                         dtype=shape["dtype"])
    need = sum(model_bytes(config, **shape))
    room = [int(need * scale * w / sum(ws)) for w in ws]
    if sum(r // group for r in room) < config.num_kv_heads or sum(room) - need < len(ws) * blocks:
        return
    budgets = [(f"cuda:{i}", overhead + r) for i, r in enumerate(room)]
    check_invariants(config, plan_model(config, budgets, **shape), budgets, shape)


def test_kv_groups_are_placed_before_the_finer_pieces_fill_the_room():
    # Rank 2's proportional share rounds to one of the 4 KV groups (8.25 MiB each), but it has 6.4 MiB. Only
    # rank 4 can take that group, and only while its MLP columns and vocab rows have not yet filled it.
    config = ModelConfig(arch="qwen2", vocab_size=165, hidden_size=256, intermediate_size=1299, num_layers=1,
                         num_heads=12, num_kv_heads=4, head_dim=64, tie_word_embeddings=True, attention_bias=True)
    shape = dict(max_context=4096, max_batch=8, dtype="bfloat16", blocks={"mlp_cols": 128, "vocab_rows": 256})
    overhead = replicated_overhead_bytes(config, max_context=4096, max_batch=8, dtype="bfloat16")
    room = [168739, 37497, 6730838, 18748, 36429024]
    budgets = [(f"cuda:{i}", overhead + r) for i, r in enumerate(room)]
    plan = plan_model(config, budgets, **shape)
    check_invariants(config, plan, budgets, shape)
    assert [len(r.kv_heads) for r in plan.ranks] == [0, 0, 0, 0, 4]


def test_smollm2_on_3_2_1_gib():
    budgets = [("cpu@3GiB", 3 * GiB), ("cpu@2GiB", 2 * GiB), ("cpu@1GiB", GiB)]
    shape = dict(max_context=2048, max_batch=4, dtype="bfloat16", blocks={"mlp_cols": 64, "vocab_rows": 64})
    plan = plan_model(SMOLLM2, budgets, **shape)
    check_invariants(SMOLLM2, plan, budgets, shape)
    overhead = plan.ranks[0].overhead_bytes
    assert overhead < 32 * MiB  # small next to the budgets, so the split stays close to 3:2:1
    room = [b - overhead for _, b in budgets]
    for r, left in zip(plan.ranks, room):
        assert abs(len(r.mlp_cols) - 1536 * left / sum(room)) <= 64
        assert abs(len(r.vocab_rows) - 49152 * left / sum(room)) <= 64
    mlp = [len(r.mlp_cols) for r in plan.ranks]
    vocab = [len(r.vocab_rows) for r in plan.ranks]
    assert mlp == [768, 512, 256]
    assert vocab[0] / vocab[2] == pytest.approx(3, rel=0.05) and vocab[1] / vocab[2] == pytest.approx(2, rel=0.05)
    assert [len(r.kv_heads) for r in plan.ranks] == [2, 1, 0]  # 1.5 / 1.0 / 0.5 heads, rounded at the boundaries


def test_twelve_ranks_three_kv_heads_leaves_nine_zero_width_attention_ranks():
    budgets = [(f"cuda:{i}", GiB // 4) for i in range(12)]
    plan = plan_model(SMOLLM2, budgets, max_context=2048, max_batch=4)
    heads = [len(r.kv_heads) for r in plan.ranks]
    assert sorted(heads) == [0] * 9 + [1] * 3  # no replication: every KV head lives on exactly one rank
    for r in plan.ranks:
        assert len(r.q_heads) == 3 * len(r.kv_heads)
        assert (r.kv_cache_bytes == 0) == (not r.kv_heads)
        assert len(r.mlp_cols) == 128 and len(r.vocab_rows) == 4096
    check_invariants(SMOLLM2, plan, budgets, dict(max_context=2048, max_batch=4, dtype="bfloat16"))


def test_rank_over_budget_after_rounding_hands_blocks_to_ranks_with_room():
    # One KV group is ~60% of the model: proportional rounding gives it to rank 0, which must then give up MLP
    # columns and vocab rows to rank 1 rather than exceed its budget.
    config = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    shape = dict(max_context=4096, max_batch=1, dtype="bfloat16", blocks={"mlp_cols": 64, "vocab_rows": 64})
    overhead = replicated_overhead_bytes(config, max_context=4096, max_batch=1, dtype="bfloat16")
    room = int(0.7 * sum(model_bytes(config, **shape)))
    budgets = [("cpu", overhead + room), ("cpu", overhead + room)]
    plan = plan_model(config, budgets, **shape)
    check_invariants(config, plan, budgets, shape)
    first, second = plan.ranks
    assert len(first.kv_heads) == 1
    assert len(first.mlp_cols) + len(first.vocab_rows) < len(second.mlp_cols) + len(second.vocab_rows)


def test_indivisible_kv_group_too_big_for_any_device():
    # Two devices hold the model in total, but the single KV group (cache included) is bigger than either.
    config = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    shape = dict(max_context=16384, max_batch=1, dtype="bfloat16")
    overhead = replicated_overhead_bytes(config, max_context=16384, max_batch=1, dtype="bfloat16")
    room = sum(model_bytes(config, **shape)) // 2 + 1
    with pytest.raises(PlanError, match="indivisible pieces, although the total would") as info:
        plan_model(config, [("cuda:0@1GiB", overhead + room), ("cuda:1@1GiB", overhead + room)], **shape)
    assert "one KV group 2.0 MiB" in str(info.value)


def test_impossible_fit_names_every_device_with_figures():
    budgets = [("cpu@200MiB", 200 * MiB), ("cpu@100MiB", 100 * MiB), ("cpu@50MiB", 50 * MiB)]
    with pytest.raises(PlanError) as info:
        plan_model(SMOLLM2, budgets, max_context=2048, max_batch=4)
    message = str(info.value)
    for i, (name, _) in enumerate(budgets):
        line = re.search(rf"rank {i} {re.escape(name)}: needs ([\d.]+) MiB, has ([\d.]+) MiB \(short ([\d.]+) MiB\)",
                         message)
        assert line, message
        need, has, short = map(float, line.groups())
        assert need - has == pytest.approx(short, abs=0.1)
    assert "180.0 MiB of KV cache" in message
    for hint in ("more devices", "more memory", "--max-context", "--max-batch", "--dtype"):
        assert hint in message


def test_device_that_cannot_hold_the_replicated_part_is_short_even_if_others_have_room():
    with pytest.raises(PlanError) as info:
        plan_model(SMOLLM2, [("cuda:0@80GiB", 80 * GiB), ("cuda:1@1MiB", MiB)], max_context=2048, max_batch=4)
    assert re.search(r"rank 0 cuda:0@80GiB: needs [\d.]+ MiB, has 80.00 GiB\n", str(info.value))
    assert re.search(r"rank 1 cuda:1@1MiB: needs [\d.]+ MiB, has 1.0 MiB \(short", str(info.value))


def test_float32_doubles_weights_and_cache():
    budgets = [("cpu", 4 * GiB), ("cpu", 2 * GiB)]
    half = plan_model(SMOLLM2, budgets, max_context=1024, max_batch=2, dtype="bfloat16")
    full = plan_model(SMOLLM2, budgets, max_context=1024, max_batch=2, dtype="float32")
    assert sum(r.weight_bytes for r in full.ranks) == 2 * sum(r.weight_bytes for r in half.ranks)
    assert sum(r.kv_cache_bytes for r in full.ranks) == 2 * sum(r.kv_cache_bytes for r in half.ranks)


def test_to_dict_and_table():
    budgets = [("cuda:0@24GiB", 24 * GiB), ("cuda:1@8GiB", 8 * GiB)]
    plan = plan_model(SMOLLM2, budgets, max_context=2048, max_batch=4)
    d = json.loads(json.dumps(plan.to_dict()))
    assert [r["device"] for r in d["ranks"]] == ["cuda:0@24GiB", "cuda:1@8GiB"]
    for r, shard in zip(d["ranks"], plan.ranks):
        assert r["q_heads"] == len(shard.q_heads) and r["kv_heads"] == len(shard.kv_heads)
        assert r["mlp_cols"] == len(shard.mlp_cols) and r["vocab_rows"] == len(shard.vocab_rows)
        assert r["budget_bytes"] == shard.budget_bytes and r["weight_bytes"] == shard.weight_bytes
        assert r["kv_cache_bytes"] == shard.kv_cache_bytes
        assert r["mlp_cols_range"] == [shard.mlp_cols.start, shard.mlp_cols.stop]
    assert sum(r["vocab_rows"] for r in d["ranks"]) == 49152
    table = plan.format_table()
    header, *rows = table.splitlines()
    for column in ("device", "budget", "query heads", "KV heads", "MLP columns", "vocab rows", "weights", "KV cache",
                   "headroom"):
        assert column in header
    assert len(rows) == 2 and "cuda:0@24GiB" in rows[0] and "24.00 GiB" in rows[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(max_context=0, max_batch=1), "max_context must be at least 1"),
     (dict(max_context=8, max_batch=0), "max_batch must be at least 1"),
     (dict(max_context=8, max_batch=1, dtype="int3"), "unsupported dtype 'int3'"),
     (dict(max_context=8, max_batch=1, blocks={"mlp_cols": 0}), "the block of mlp_cols must be at least 1"),
     (dict(max_context=8, max_batch=1, blocks={"experts": 4}), "no piece named experts")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_model(SMOLLM2, [("cpu", GiB)], **kwargs)


def test_no_devices():
    with pytest.raises(ValueError, match="number of devices must be at least 1"):
        plan_model(SMOLLM2, [], max_context=8, max_batch=1)
