"""What every weight format shares: the reader its slices come through, and the format's interface."""

from __future__ import annotations

from typing import Protocol

import torch

from raytp.model.slice import Slice


class WeightReader(Protocol):
    dtype: torch.dtype  # the model dtype

    def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
        """Rows `s.rows` (and columns `s.cols`) of global tensor `s.name`, in the model's dtype (`stored`: in the
        dtype it is stored in, for packed integers, float8 weights and group indices) on the rank's device.
        Raises a ValueError naming the tensor when it is missing or its global shape is not `s.shape`."""


class WeightFormat(Protocol):
    """How a rank holds a Linear matrix in one format once its checkpoint method (`raytp.model.quant`) has read it:
    the bytes it weighs (what the planner counts, `raytp.model.pieces`) and the scales a synthetic model draws for
    it."""

    def row_bytes(self, width: int, nbytes: int) -> int:
        """One output row holding all `width` of its input columns (column-parallel), scales included, in memory
        (`nbytes`: the model dtype's size)."""

    def column_bytes(self, height: int, nbytes: int) -> int:
        """The values of one input column of a matrix of `height` output rows (row-parallel), without scales."""

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        """Scales of a matrix of `height` rows that a row-parallel split leaves whole on every rank."""

    def group_entry_bytes(self, nbytes: int) -> int:
        """Bytes per output row and group of input columns held in memory: its scale (and zero point)."""

    def synthetic_scale(self, std: float) -> float:
        """The scale that gives the weights a spread of `std` where a synthetic model draws its stored values
        uniformly (packed integers) or N(0, 1) (float8)."""
