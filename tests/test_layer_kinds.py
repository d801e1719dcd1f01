"""A layer kind raytp was never told about plugs in with no edit to the planner (raytp/parallel/plan.py) nor the
decoder: declared here, registered in MIXERS, it is planned (its own piece, its per-sequence state), held (memory
held equals memory planned) and run sharded unevenly with the same logits as on one rank."""

import dataclasses
import threading
from dataclasses import dataclass

import pytest
import torch

from raytp.actors.worker import _tensor_bytes
from raytp.model import layout as layout_module
from raytp.model.layers import ColumnParallelLinear, RowParallelLinear
from raytp.model.llama import ShardedLlama
from raytp.model.pieces import plan_model
from raytp.model.slice import Slice
from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.base import IdentityCheckingCommunicator
from raytp.parallel.plan import DTYPE_BYTES, Piece, PlanShape, Span
from raytp.weights.synthetic import SyntheticReader, synthetic_config

TOY_HEADS, HEADS = "toy_heads", 5  # 5 heads: uneven over 3 ranks


class RunningSum:
    """The toy's recurrent state: each slot's running sum of its values per head, (slots, heads, head_dim)."""

    def __init__(self, max_batch: int, heads: int, head_dim: int, device: torch.device):
        self.sum = torch.zeros((max_batch, heads, head_dim), dtype=torch.float32, device=device)

    def tensors(self):
        return [self.sum]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.sum[dst] = self.sum[src]


@dataclass(frozen=True)
class ToyLayout:
    v: Slice
    o: Slice

    def slices(self):
        yield from (self.v, self.o)


class ToyMixer:
    """y_t = o(v_1 + ... + v_t): a linear recurrence over each head's values, split by heads."""

    def __init__(self, config, layout: ToyLayout, comm, reader, state: RunningSum):
        self.v = ColumnParallelLinear((layout.v,)).load(reader, False)
        self.o = RowParallelLinear(layout.o, comm).load(reader, False)
        self.state, self.D = state, config.head_dim

    def __call__(self, h, positions, slots, step):
        B, T, _ = h.shape
        v = self.v(h).view(B, T, -1, self.D).float()  # (batch, seq, local heads, head_dim)
        fresh = (positions[:, 0] == 0).view(B, 1, 1)  # a sequence starts from zero: slots are reused uncleared
        sums = torch.where(fresh, 0.0, self.state.sum[slots]).unsqueeze(1) + v.cumsum(1)
        self.state.sum[slots] = sums[:, -1]
        return self.o(sums.to(h.dtype).reshape(B, T, -1))

    def tensors(self):
        return self.v.weight.tensors() + self.o.weight.tensors()


@dataclass(frozen=True)
class ToyKind:
    name: str = "toy_recurrent"

    def layout(self, config, shard, prefix):
        D, H = config.head_dim, config.hidden_size
        rows = range(shard.toy_heads.start * D, shard.toy_heads.stop * D)
        return ToyLayout(Slice(prefix + "toy_v.weight", (HEADS * D, H), rows, split=TOY_HEADS),
                         Slice(prefix + "toy_o.weight", (H, HEADS * D), range(H), rows, split=TOY_HEADS))

    def pieces(self, config, shape: PlanShape):
        head = 2 * config.head_dim * config.hidden_size * DTYPE_BYTES[shape.dtype]
        return (Piece((Span(TOY_HEADS, "toy heads"),), HEADS, 1, head, head,
                      (("running sums", shape.max_batch * config.head_dim * 4),), unit="toy head"),)

    def replicated_bytes(self, config, shape):
        return 0

    def buffer_bytes(self, config, shape):
        return 0

    def state(self, config, shard, *, max_batch, max_context, kv_dtype, dtype, device):
        return RunningSum(max_batch, len(shard.toy_heads), config.head_dim, device)

    def view(self, config, positions, span, max_context):
        return None

    def load(self, config, layout, comm, reader, state, act_quant_weight_only):
        return ToyMixer(config, layout, comm, reader, state)


@pytest.fixture
def toy_config(monkeypatch):
    monkeypatch.setitem(layout_module.MIXERS, "toy_recurrent", ToyKind())
    config = synthetic_config("synthetic:tiny")  # 4 layers, 4 KV groups
    return dataclasses.replace(config, layer_types=("toy_recurrent", "full_attention", "toy_recurrent",
                                                    "full_attention"))


def _ranks(config, weights, max_batch=2, max_context=32):
    plan = plan_model(config, [(f"cpu{i}", int(w * (1 << 30))) for i, w in enumerate(weights)],
                      max_context=max_context, max_batch=max_batch, dtype="float32")
    group, models = InProcessGroup(len(weights)), [None] * len(weights)

    def build(r):
        reader = SyntheticReader(config, torch.float32, torch.device("cpu"))
        comm = IdentityCheckingCommunicator(group.communicator(r))
        models[r] = ShardedLlama(config, plan.ranks[r], comm, reader, max_batch=max_batch, max_context=max_context)

    _on_threads(build, len(weights))
    return plan, models


def _on_threads(fn, n):
    out, threads = [None] * n, []
    for r in range(n):
        threads.append(threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r))))
        threads[-1].start()
    [t.join() for t in threads]
    return out


def test_the_planner_sums_a_kind_it_was_never_told_about(toy_config):
    plan, _ = _ranks(toy_config, [3.0, 2.0, 1.0])
    toy = next(p for p in plan.pieces if p.name == TOY_HEADS)
    c, nbytes = toy_config, 4
    assert toy.size == HEADS and toy.weight_bytes == 2 * 2 * c.head_dim * c.hidden_size * nbytes  # two toy layers
    assert toy.cache_bytes == 2 * 2 * c.head_dim * 4  # two layers' running sums of 2 slots
    assert [r.toy_heads for r in plan.ranks] == [range(0, 3), range(3, 4), range(4, 5)]  # in proportion, 3:2:1
    kv = next(p for p in plan.pieces if p.name == "kv_heads")  # only the two attention layers' KV groups
    assert kv.cache_bytes == 2 * 2 * 2 * 32 * c.head_dim * nbytes
    assert sum(r.kv_cache_bytes for r in plan.ranks) == HEADS * toy.cache_bytes + c.num_kv_heads * kv.cache_bytes
    # its state shown per rank under the name it declared, beside the KV cache
    assert [r.state_bytes for r in plan.ranks] == [{"running sums": len(r.toy_heads) * toy.cache_bytes,
                                                    "KV cache": len(r.kv_heads) * kv.cache_bytes} for r in plan.ranks]
    header = plan.format_table().splitlines()[0]
    assert header.index("weights") < header.index("running sums") < header.index("KV cache") < header.index("headroom")
    assert plan.to_dict()["ranks"][2]["state_bytes"] == plan.ranks[2].state_bytes


def test_memory_held_is_memory_planned_and_state_carries_across_steps_on_any_split(toy_config):
    """A prompt run whole, and the same prompt prefilled then decoded one token (the state carried between the
    steps, in slots the whole run used before), give the same logits, on one rank and on three uneven ones."""
    tokens = torch.tensor([[5, 17, 400, 3, 99, 250], [8, 1, 2, 3, 4, 5]])
    B, T = tokens.shape
    slots = torch.arange(B)
    for weights in ([1.0], [1.0, 2.0, 1.5]):
        plan, models = _ranks(toy_config, weights)
        for r, m in zip(plan.ranks, models):
            assert _tensor_bytes(m.cache_tensors()) == r.kv_cache_bytes > 0

        def logits(tokens, positions):
            return torch.cat(_on_threads(lambda r: models[r].forward(tokens, positions, slots), len(models)), dim=-1)

        whole = logits(tokens, torch.arange(T).repeat(B, 1))
        logits(tokens[:, :-1], torch.arange(T - 1).repeat(B, 1))
        stepped = logits(tokens[:, -1:], torch.full((B, 1), T - 1))
        torch.testing.assert_close(stepped, whole, rtol=1e-5, atol=1e-5)
        if len(weights) == 1:
            one_rank = whole
    torch.testing.assert_close(whole, one_rank, rtol=1e-5, atol=1e-5)
