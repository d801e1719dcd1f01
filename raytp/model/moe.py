"""A sparse mixture-of-experts block (Qwen3-MoE, Mixtral, Qwen3.5-MoE) in place of the dense MLP: a layer kind
(`raytp.model.kinds`) and one rank's forward.

    router   replicated: every rank holds the whole (experts, hidden) matrix and computes the same logits from the
             same all-reduced input, so every rank selects the same experts with the same weights, with no
             communication
    experts  rank r holds columns `expert_cols[r]` of EVERY expert (gate/up rows, down input columns): the same
             uneven range in each expert, like the dense MLP's columns, so each token's work is shared by the ranks
             as their memory is, whichever experts it selects; a rank may hold no columns at all. How they are held
             and run is raytp.model.experts' (act-order checkpoints permute each expert's columns by its own
             down_proj groups, `raytp.model.layout`)
    shared   (Qwen3.5-MoE) an always-on SwiGLU expert, its columns split as a dense MLP's (mlp_cols), times
             sigmoid(shared_expert_gate . x), which every rank computes alike from its whole (1, hidden) gate
    output   sum over each token's k experts of weight * down(swiglu(gate_up(x))) over the rank's columns, plus the
             gated shared expert's columns: a partial sum, all-reduced once per layer as down_proj's is

Routing follows transformers' Qwen3MoeTopKRouter and MixtralTopKRouter: softmax over all experts in float32, the
top k of those probabilities by torch.topk (so ties fall as they do there), renormalized to sum to 1 where the model
says so (Mixtral always: the softmax of the top-k logits; Qwen3-MoE when `norm_topk_prob`). The weights stay in
float32 up to the weighted sum (Qwen3-MoE's own code rounds them to the model dtype first, a difference below that
dtype's rounding of the sum).

Declared to the planner: expert columns (the same columns of every expert) in blocks of 16, or whole quantization
groups. A rank holds them for all experts, but a batch-1 decode step reads only the top-k experts the token selects:
the memory split counts all experts' bytes, the speed split and the roofline the expected reads, top_k of
num_experts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.moe_routing import top_k_routing
from raytp.model.experts import Experts, ExpertsLayout, load_experts
from raytp.model.formats import Weight, WeightReader, read_linear
from raytp.model.kinds import LinearBytes
from raytp.model.mlp import DENSE_MLP, MLP
from raytp.model.slice import linear, permuted, whole
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import PREFILL_CHUNK, Piece, PlanShape, Span

EXPERT_COLS = "expert_cols"
# Expert columns move in small blocks: one column of every expert weighs num_experts MLP columns (64 columns of
# Qwen3-30B-A3B's 128 experts are 4.8 GB in bf16), and 16 is still a whole tensor-core tile of the routed kernels.
EXPERT_BLOCK = 16


@dataclass(frozen=True)
class Routing:
    top_k: int  # experts per token (num_experts_per_tok)
    normalize: bool  # renormalize the top-k probabilities to sum to 1

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (tokens, experts) -> weights (tokens, top_k) float32, expert ids (tokens, top_k) int64."""
        return top_k_routing(logits, self.top_k, self.normalize)


class SparseMoeBlock:
    """y = all_reduce(routed experts over this rank's columns): the MoE layer of one rank.

    router (experts, hidden), whole; experts: this rank's columns of every expert (raytp.model.experts), or None
    where the rank holds no columns.
    """

    def __init__(self, router: torch.Tensor, experts: Experts | None, routing: Routing, comm: Communicator,
                 shared: MLP | None = None, shared_gate: Weight | None = None):
        self.router, self.experts, self.routing, self.comm = router, experts, routing, comm
        self.shared, self.shared_gate = shared, shared_gate

    @classmethod
    def load(cls, config, layout: ExpertsLayout, reader: WeightReader, comm: Communicator,
             act_quant_weight_only: bool) -> SparseMoeBlock:
        """The router and this rank's slices of every expert, and of the shared expert where the model has one
        (`act_quant_weight_only`: formats.for_device)."""
        moe = config.moe
        _, _, down = layout.experts[0]
        experts = load_experts(layout, reader, act_quant_weight_only) if down.cols else None
        shared = shared_gate = None
        if layout.shared is not None:
            shared = MLP(config, layout.shared, comm, reader, act_quant_weight_only)
            shared_gate = read_linear(reader, layout.shared_gate)
        return cls(reader.read(layout.router), experts, Routing(moe.top_k, moe.normalize), comm, shared, shared_gate)

    def partial(self, h: torch.Tensor) -> torch.Tensor:
        """(..., hidden) normed input -> this rank's partial output (..., hidden), before the all-reduce."""
        out = self._routed(h)
        if self.shared is not None:  # every rank's gate is the same: the gated partial sums add up to the gated sum
            out = out + torch.sigmoid(self.shared_gate.apply(h)) * self.shared.partial(h)
        return out

    def _routed(self, h: torch.Tensor) -> torch.Tensor:
        if self.experts is None:  # no columns here: this rank's share of the sum is zero
            return torch.zeros_like(h)
        x = h.reshape(-1, h.shape[-1])  # (tokens, hidden)
        weights, ids = self.routing.route(F.linear(x, self.router))
        return self.experts(x, ids, weights).view(h.shape)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.partial(h))

    def tensors(self) -> list[torch.Tensor]:
        shared = [] if self.shared is None else self.shared.tensors() + self.shared_gate.tensors()
        return [self.router] + (self.experts.tensors() if self.experts is not None else []) + shared


@dataclass(frozen=True)
class ExpertsKind:
    name: str = "experts"

    def layout(self, config, shard, prefix: str) -> ExpertsLayout:
        """`prefix`: the block's module (`config.moe.names.module` of its layer); its router is the module's `gate`."""
        c, names, H = config, config.moe.names, config.hidden_size
        E, C, cols, m = c.moe.num_experts, c.moe.expert_size, shard.expert_cols, prefix

        def expert(e: int):
            p, down = f"{m}experts.{e}.", f"{m}experts.{e}.{names.down}"
            order = permuted(c.quant, down)  # each expert's columns in its own down_proj's group order
            return (linear(c.quant, p + names.gate, (C, H), cols, order=order, split=EXPERT_COLS),
                    linear(c.quant, p + names.up, (C, H), cols, order=order, split=EXPERT_COLS),
                    linear(c.quant, down, (H, C), range(H), cols, order, EXPERT_COLS))

        shared = {}
        if c.shared_expert_size:
            shared = dict(shared=DENSE_MLP.layout(shared_mlp(c), shard, m + "shared_expert."),
                          shared_gate=linear(c.quant, m + "shared_expert_gate", (1, H), range(1)))
        return ExpertsLayout(router=whole(m + "gate.weight", (E, H)), experts=tuple(expert(e) for e in range(E)),
                             **shared)

    def pieces(self, config, shape: PlanShape) -> tuple[Piece, ...]:
        """A column of every expert held (gate, up rows and a down column each), of the top-k read."""
        b, E, k = LinearBytes.of(config, shape), config.moe.num_experts, config.moe.top_k
        block, group, group_bytes = shape.block(EXPERT_COLS, EXPERT_BLOCK), 1, 0
        if b.group is not None:  # each expert's down_proj scales, per started group; blocks of whole groups
            block, group, group_bytes = math.lcm(block, b.group), b.group, config.hidden_size * b.group_entry
        column = 2 * b.row + b.column
        shared = DENSE_MLP.pieces(shared_mlp(config), shape) if config.shared_expert_size else ()
        return (Piece((Span(EXPERT_COLS, "expert columns"),), config.moe.expert_size, block, E * column, k * column,
                      group=group, group_bytes=E * group_bytes, group_read_bytes=k * group_bytes,
                      unit="expert block"), *shared)

    def replicated_bytes(self, config, shape: PlanShape) -> int:
        """Every expert's down_proj per-row scales; with act-order every expert's gate/up group index (int32)."""
        b, E = LinearBytes.of(config, shape), config.moe.num_experts
        shared = DENSE_MLP.replicated_bytes(shared_mlp(config), shape) if config.shared_expert_size else 0
        if b.group is None:
            return E * b.row_scales(config, shape) + shared
        return (E * config.hidden_size * 4 if b.act_order else 0) + shared

    def buffer_bytes(self, config, shape: PlanShape) -> int:
        """One expert's gate/up at a time for at most every token of a prefill chunk, and the float32 sum."""
        tokens = shape.max_batch * min(shape.max_context, PREFILL_CHUNK)
        return tokens * (2 * config.moe.expert_size * LinearBytes.of(config, shape).nbytes + 4 * config.hidden_size)

    def state(self, config, shard, **_) -> None:
        return None

    def load(self, config, layout: ExpertsLayout, comm, reader, state, act_quant_weight_only: bool) -> SparseMoeBlock:
        return SparseMoeBlock.load(config, layout, reader, comm, act_quant_weight_only)


def shared_mlp(config):
    """The config a shared expert is a dense MLP of: its width as the MLP's."""
    return dataclasses.replace(config, intermediate_size=config.shared_expert_size)


EXPERTS = ExpertsKind()
