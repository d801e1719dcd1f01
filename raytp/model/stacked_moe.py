"""A mixture of experts stored stacked, one tensor per projection of every expert (gpt-oss): a layer kind
(`raytp.model.kinds`) and one rank's forward.

    router   weight (experts, hidden) and bias (experts,), replicated: every rank computes the same logits from the
             same all-reduced input and routes alike, with no communication; each token's weights are the softmax
             of its top-k logits (transformers' GptOssTopKRouter; raytp's routing takes the softmax over every
             expert and renormalizes its top k: the same weights, ties falling alike)
    experts  `<module>.experts.gate_up_proj` (experts, 2 * width, hidden) and `down_proj` (experts, hidden, width),
             in MXFP4 (`raytp.model.quant.mxfp4`), with biases. Rank r holds columns expert_cols[r] of every expert,
             in whole groups of 32 (MXFP4 scales a group of 32 of down_proj's inputs): gate_up's rows 2c and 2c + 1
             (gate and up interleave) and their biases, down_proj's input columns c. A rank may hold none
    output   sum over each token's k experts of weight * (down(clamped_swiglu(gate_up(x) + b_gu)) + b_down): a
             partial sum, all-reduced once per layer; b_down is added by the rank holding column 0, and every rank
             holds it (a bias per expert of the hidden size: the planner counts it replicated, and so it is)

The clamped SwiGLU with alpha and the kernels are `raytp.kernels.mxfp4`'s: the routed Triton kernels on GPUs (decode
and prefill), each selected expert dequantized then F.linear elsewhere.

Declared to the planner: expert columns in blocks of whole 32-column groups; a column of every expert is held (its
two gate_up rows with their scales and biases, its down_proj column), the top k of them read by a decode step,
and down_proj's scales per started group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import use_triton
from raytp.kernels.moe_routing import top_k_routing
from raytp.kernels.mxfp4 import GROUP, mxfp4_experts_torch, mxfp4_routed_experts
from raytp.model.formats import weight_format
from raytp.model.moe import EXPERT_BLOCK, EXPERT_COLS
from raytp.model.slice import Slice, whole
from raytp.parallel.plan import DTYPE_BYTES, PREFILL_CHUNK, Piece, PlanShape, Span


@dataclass(frozen=True)
class StackedExpertsLayout:
    router: Slice  # (experts, hidden), whole
    router_bias: Slice  # (experts,), whole
    gate_up: Slice  # stacked (experts, 2 * width, hidden): rows 2c, 2c + 1 of the rank's columns c
    gate_up_bias: Slice  # stacked (experts, 2 * width): the same rows
    down: Slice  # stacked (experts, hidden, width): input columns of the rank's columns
    down_bias: Slice  # (experts, hidden), whole

    def slices(self) -> Iterator[Slice]:
        yield from (self.router, self.router_bias, self.gate_up, self.gate_up_bias, self.down, self.down_bias)


class StackedMoeBlock:
    """y = all_reduce(this rank's columns of the routed experts): the layer of one rank."""

    def __init__(self, config, layout: StackedExpertsLayout, comm, reader):
        moe, self.comm = config.moe, comm
        self.router, self.router_bias = reader.read(layout.router), reader.read(layout.router_bias)
        self.top_k, (self.alpha, self.limit) = moe.top_k, moe.swiglu_clamp
        cols = layout.down.cols
        self.gate_up = self.down = None
        self.down_bias = reader.read(layout.down_bias)  # (experts, hidden)
        if cols:  # no columns here: this rank's share of the sum is zero
            quant = layout.gate_up.quant
            self.gate_up = quant.read(reader, layout.gate_up)
            self.gate_up.bias = reader.read(layout.gate_up_bias)
            self.down = quant.read(reader, layout.down)
            self.down.bias = self.down_bias if cols.start == 0 else None  # added once over the ranks

    def partial(self, h: torch.Tensor) -> torch.Tensor:
        """(..., hidden) normed input -> this rank's partial output (..., hidden), before the all-reduce."""
        if self.down is None:
            return torch.zeros_like(h)
        x = h.reshape(-1, h.shape[-1])  # (tokens, hidden)
        weights, ids = top_k_routing(F.linear(x, self.router, self.router_bias), self.top_k, True)
        run = mxfp4_routed_experts if use_triton(x) else mxfp4_experts_torch
        return run(x, ids, weights, self.gate_up.stored(), self.down.stored(), self.alpha, self.limit).view(h.shape)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.partial(h))

    def tensors(self) -> list[torch.Tensor]:
        """What the rank holds, each tensor once (down_proj's bias is the whole one, where this rank adds it)."""
        experts = [] if self.down is None else [*self.gate_up.tensors(), self.down.blocks, self.down.scales]
        return [self.router, self.router_bias, self.down_bias] + experts


@dataclass(frozen=True)
class StackedExpertsKind:
    name: str = "stacked_experts"

    def layout(self, config, shard, prefix: str) -> StackedExpertsLayout:
        """`prefix`: the block's module ("model.layers.0.mlp.")."""
        c, E, H, C = config, config.moe.num_experts, config.hidden_size, config.moe.expert_size
        cols, e = shard.expert_cols, prefix + "experts."
        quant = c.quant if c.quant is not None and c.quant.quantizes(e + "gate_up_proj") else None
        if quant is None:
            raise ValueError(f"{prefix}experts are not stored in MXFP4; raytp runs gpt-oss's experts as published "
                             f"(quantization_config quant_method 'mxfp4')")
        rows = range(2 * cols.start, 2 * cols.stop)
        return StackedExpertsLayout(
            router=whole(prefix + "router.weight", (E, H)), router_bias=whole(prefix + "router.bias", (E,)),
            gate_up=Slice(e + "gate_up_proj", (E, 2 * C, H), rows, None, quant, split=EXPERT_COLS, stacked=True),
            gate_up_bias=Slice(e + "gate_up_proj_bias", (E, 2 * C), rows, split=EXPERT_COLS, stacked=True),
            down=Slice(e + "down_proj", (E, H, C), range(H), cols, quant, split=EXPERT_COLS, stacked=True),
            down_bias=whole(e + "down_proj_bias", (E, H)))

    def pieces(self, config, shape: PlanShape) -> tuple[Piece, ...]:
        """A column of every expert held: two gate_up rows (values, scales, biases) and a down_proj column; its
        down_proj scales per started group of 32."""
        c, nbytes = config, DTYPE_BYTES[shape.dtype]
        fmt, E, k, H = weight_format(c.quant), c.moe.num_experts, c.moe.top_k, c.hidden_size
        column = 2 * (fmt.row_bytes(H, nbytes) + nbytes) + fmt.column_bytes(H, nbytes)
        group_bytes = H * fmt.group_entry_bytes(nbytes)
        return (Piece((Span(EXPERT_COLS, "expert columns"),), c.moe.expert_size,
                      math.lcm(shape.block(EXPERT_COLS, EXPERT_BLOCK), GROUP), E * column, k * column, group=GROUP,
                      group_bytes=E * group_bytes, group_read_bytes=k * group_bytes, unit="expert block"),)

    def replicated_bytes(self, config, shape: PlanShape) -> int:
        return 0  # MXFP4 keeps no scale whole: the router and down_proj's bias are whole tensors of the layout

    def buffer_bytes(self, config, shape: PlanShape) -> int:
        """Every (token, choice)'s activation and float32 output for a prefill chunk; one expert's gate_up
        dequantized at a time where the torch path runs (its float32 values, exponents and the result)."""
        c, nbytes = config, DTYPE_BYTES[shape.dtype]
        pairs = shape.max_batch * min(shape.max_context, PREFILL_CHUNK) * c.moe.top_k
        return pairs * (c.moe.expert_size * nbytes + 4 * c.hidden_size) + 2 * c.moe.expert_size * c.hidden_size * (
            8 + nbytes)

    def state(self, config, shard, **_) -> None:
        return None

    def load(self, config, layout: StackedExpertsLayout, comm, reader, state, act_quant_weight_only: bool
             ) -> StackedMoeBlock:
        return StackedMoeBlock(config, layout, comm, reader)


STACKED_EXPERTS = StackedExpertsKind()
