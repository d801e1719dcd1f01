"""Quantized Linear shards: how a rank's slice of a matrix is stored and applied (siblings of layers.DenseWeight).

The minimal version written by the quant-kernels helper so that synthetic quantized weights and the GPTQ/AWQ
readers have a class to fill; quant-formats' version of this file (with DenseWeight moved here) supersedes it and
keeps these fields and methods (the contract in HELPERS.md).

    IntWeight   int4/int8 values packed along the inputs, group scales, optional zero points and act-order index
    FP8Weight   float8_e4m3fn values, one float32 scale per output row or per tensor
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# unpack is the GPTQ/AWQ readers' too: raytp.weights may not import the kernels directly
from raytp.kernels.dequant_matmul import dequantize, int_linear, unpack
from raytp.kernels.fp8_matmul import fp8_linear


@dataclass
class IntWeight:
    """W[o, j] = (q[o, j] - zero[o, g(j)]) * scale[o, g(j)], g(j) = g_idx[j] or (j + group_start) // group_size."""

    packed: torch.Tensor  # int32 (out, in // (32 // bits)): value j in bits [bits * (j % per), ...) of word j // per
    scales: torch.Tensor  # (out, n_groups), model dtype
    zeros: torch.Tensor | None  # (out, n_groups) integer zero points in the model dtype; None: 2 ** (bits - 1)
    bits: int
    group_size: int  # input columns per group (in when channel-wise)
    group_start: int = 0  # offset of local column 0 inside its group
    g_idx: torch.Tensor | None = None  # int32 (in,) local group of each column, where act-order stays

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return int_linear(x, self.packed, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                          group_start=self.group_start, g_idx=self.g_idx)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.packed, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                          group_start=self.group_start, g_idx=self.g_idx)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scales, self.zeros, self.g_idx) if t is not None]


@dataclass
class FP8Weight:
    """W = weight.float() * scale."""

    weight: torch.Tensor  # float8_e4m3fn (out, in)
    scale: torch.Tensor  # float32 (out, 1) per output row, or () per tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scale]


def stack_rows(parts: Sequence[IntWeight | FP8Weight]) -> IntWeight | FP8Weight:
    """The output rows of several matrices of one input slice (q, k, v or gate, up) as one fused weight."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, FP8Weight):
        scales = [p.scale.expand(p.weight.shape[0], 1) for p in parts]  # per-tensor scales become per-row
        return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat(scales))
    same = {(p.bits, p.group_size, p.group_start, p.scales.shape[1], p.zeros is None) for p in parts}
    assert len(same) == 1 and all(p.g_idx is None for p in parts), "fused parts share one input grouping"
    return IntWeight(torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]),
                     None if first.zeros is None else torch.cat([p.zeros for p in parts]),
                     first.bits, first.group_size, first.group_start)
