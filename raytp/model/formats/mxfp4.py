"""MXFP4 weights (gpt-oss's experts): one projection of every expert, 4-bit e2m1 values with one e8m0 scale per 32
input columns, held as stored (`raytp.kernels.mxfp4` has the layout and the arithmetic). A rank holds rows and
whole 32-column groups of every expert's matrix, as `raytp.model.quant.mxfp4` reads them: half a byte per weight and
one byte per 32, the bytes the planner counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels.mxfp4 import FP4_VALUES, GROUP, dequantize_mxfp4
from raytp.model.quant.base import QuantConfig


@dataclass
class MXFP4Weight:
    """blocks (experts, out, in_local / 2) uint8, scales (experts, out, in_local / 32) uint8, and the slice's
    bias (experts, out) in the model dtype or None (a row-parallel projection's bias lives on one rank only)."""

    blocks: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def experts(self) -> int:
        return self.blocks.shape[0]

    @property
    def out_features(self) -> int:
        return self.blocks.shape[1]

    @property
    def in_features(self) -> int:
        return self.blocks.shape[2] * 2

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Every expert's slice (experts, out, in_local) in `dtype`, exactly."""
        return dequantize_mxfp4(self.blocks, self.scales, dtype)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(blocks, scales, bias): what the expert kernels take."""
        return self.blocks, self.scales, self.bias

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.blocks, self.scales, self.bias) if t is not None]


class MXFP4Format:
    """What an MXFP4 matrix weighs: half a byte per value and a one-byte scale per row and group of 32 inputs."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def row_bytes(self, width: int, nbytes: int) -> int:
        return -(-width // 2) + -(-width // GROUP)

    def column_bytes(self, height: int, nbytes: int) -> int:
        return -(-height // 2)

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return 0  # no scale a split leaves whole

    def group_entry_bytes(self, nbytes: int) -> int:
        return 1

    def synthetic_scale(self, std: float) -> float:
        # random bytes: every e2m1 value equally likely, a spread of sqrt(mean of their squares) = 2.93
        return std / (sum(v * v for v in FP4_VALUES) / len(FP4_VALUES)) ** 0.5
