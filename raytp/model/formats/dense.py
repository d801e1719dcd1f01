"""Dense weights: the model dtype, applied with F.linear."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class DenseWeight:
    """A matrix (and optional bias) kept as is in the model dtype, applied with F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    takes_amax = False  # `apply` takes no activation statistics

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def fused(self, parts: Sequence[DenseWeight], bias: torch.Tensor | None) -> DenseWeight:
        return DenseWeight(torch.cat([p.weight for p in parts]), bias)

    decode_layout = None  # not held in the GPU decode kernel's layout (PackedWeight is)

    def repacked(self, dtype: torch.dtype) -> None:
        """F.linear reads it as it is on every device."""
        return None


class DenseFormat:
    """Every weight in the model dtype, as the checkpoint stores it."""

    def row_bytes(self, width: int, nbytes: int) -> int:
        return width * nbytes

    def column_bytes(self, height: int, nbytes: int) -> int:
        return height * nbytes

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return 0

    def group_entry_bytes(self, nbytes: int) -> int:
        return 0

    def synthetic_scale(self, std: float) -> float:
        return std
