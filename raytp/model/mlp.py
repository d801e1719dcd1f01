"""The dense gated MLP, down(act(gate(x)) * up(x)): a layer kind (`raytp.model.kinds`) and its forward.

    gate/up     column-parallel: rank r computes mlp_cols[r], fused into one matmul [gate | up]
    down_proj   row-parallel: partial sums                               -> one all-reduce
    act         SiLU (SwiGLU: Llama, Qwen, Mistral) or tanh-approximated GELU (GeGLU: Gemma), config.hidden_act

Declared to the planner: MLP columns, in blocks of 64 (or whole quantization groups of down_proj): a column costs a
rank its gate and up rows and its down_proj column. With act-order checkpoints a rank's columns are positions in the
order that sorts down_proj's group index (`raytp.model.layout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.norm import swiglu
from raytp.model.kinds import LinearBytes
from raytp.model.layers import ColumnParallelLinear, RowParallelLinear
from raytp.model.slice import Slice, linear, permuted
from raytp.parallel.plan import PREFILL_CHUNK, Piece, PlanShape, Span

MLP_COLS = "mlp_cols"
DEFAULT_BLOCK = 64  # MLP columns move between ranks in blocks of this many (the last may be partial)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for the fused (..., 2 * cols) projection output [gate | up], as transformers'
    gelu_pytorch_tanh."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


ACTIVATIONS = {"silu": swiglu, "gelu_pytorch_tanh": geglu}


@dataclass(frozen=True)
class MLPLayout:
    gate_up: tuple[Slice, ...]  # fused in this order: gate rows, up rows of this rank's MLP columns
    down: Slice  # input columns of this rank's MLP columns

    def slices(self) -> Iterator[Slice]:
        yield from (*self.gate_up, self.down)


class MLP:
    """One layer's MLP on one rank: (batch, seq, hidden) normed input -> output summed over ranks."""

    def __init__(self, config, layout: MLPLayout, comm, reader, act_quant_weight_only: bool):
        self.gate_up = ColumnParallelLinear(layout.gate_up).load(reader, act_quant_weight_only)
        self.down = RowParallelLinear(layout.down, comm).load(reader, act_quant_weight_only)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.down.width:  # no columns here: down_proj adds zeros
            return self.down(h[..., :0])
        return self.down(self.act(self.gate_up(h)))  # gate/up: (batch, seq, 2 * local cols)

    def tensors(self) -> list[torch.Tensor]:
        return [t for x in (self.gate_up, self.down) for t in x.weight.tensors()]


@dataclass(frozen=True)
class DenseMLPKind:
    name: str = "dense_mlp"

    def layout(self, config, shard, prefix: str) -> MLPLayout:
        c, H, I = config, config.hidden_size, config.intermediate_size
        down = prefix + "down_proj"
        order = permuted(c.quant, down)
        return MLPLayout(
            gate_up=tuple(linear(c.quant, prefix + n, (I, H), shard.mlp_cols, order=order, split=MLP_COLS)
                          for n in ("gate_proj", "up_proj")),
            down=linear(c.quant, down, (H, I), range(H), shard.mlp_cols, order, MLP_COLS))

    def pieces(self, config, shape: PlanShape) -> tuple[Piece, ...]:
        b = LinearBytes.of(config, shape)
        block, group, group_bytes = shape.block(MLP_COLS, DEFAULT_BLOCK), 1, 0
        if b.group is not None:  # down_proj's scales, per started group; blocks of whole groups
            block, group, group_bytes = math.lcm(block, b.group), b.group, config.hidden_size * b.group_entry
        column = 2 * b.row + b.column
        return (Piece((Span(MLP_COLS, "MLP columns"),), config.intermediate_size, block, column, column, group=group,
                      group_bytes=group_bytes, unit="MLP block"),)

    def replicated_bytes(self, config, shape: PlanShape) -> int:
        """down_proj's per-row scales; with act-order its columns' group index (int32) is kept whole."""
        b = LinearBytes.of(config, shape)
        if b.group is None:
            return b.row_scales(config, shape)
        return config.hidden_size * 4 if b.act_order else 0

    def buffer_bytes(self, config, shape: PlanShape) -> int:
        """gate and up of a prefill chunk at full width."""
        tokens = shape.max_batch * min(shape.max_context, PREFILL_CHUNK)
        return tokens * 2 * config.intermediate_size * LinearBytes.of(config, shape).nbytes

    def state(self, config, shard, **_) -> None:
        return None

    def load(self, config, layout: MLPLayout, comm, reader, state, act_quant_weight_only: bool) -> MLP:
        return MLP(config, layout, comm, reader, act_quant_weight_only)


DENSE_MLP = DenseMLPKind()
