"""Dense weights: the model dtype, applied with F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.model.formats.base import WeightReader
from raytp.model.layout import Slice


class DenseWeight:
    """A matrix (and optional bias) kept as is in the model dtype, applied with F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])


class DenseFormat:
    """Every weight in the model dtype, as the checkpoint stores it."""

    def stored_shapes(self, name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return {name: shape}

    def row_bytes(self, width: int, nbytes: int) -> int:
        return width * nbytes

    def column_bytes(self, height: int, nbytes: int) -> int:
        return height * nbytes

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return 0

    def read(self, reader: WeightReader, s: Slice) -> DenseWeight:
        return DenseWeight(reader.read(s))
