"""What every weight format shares: the reader its slices come through, and the format's interface."""

from __future__ import annotations

from typing import Protocol

import torch

from raytp.model.layout import Slice


class WeightReader(Protocol):
    dtype: torch.dtype  # the model dtype

    def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
        """Rows `s.rows` (and columns `s.cols`) of global tensor `s.name`, in the model's dtype (`stored`: in the
        dtype it is stored in, for packed integers, float8 weights and group indices) on the rank's device.
        Raises a ValueError naming the tensor when it is missing or its global shape is not `s.shape`."""


class WeightFormat(Protocol):
    """How a Linear matrix is stored and held in one format: the tensors a checkpoint stores for it, the bytes a
    rank holds once it is read (what the planner counts, `raytp.model.pieces`), and the reading of a rank's slice
    into the weight object whose `apply` runs the format's kernel."""

    def stored_shapes(self, name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """The tensors a checkpoint stores for the matrix `name` ("...weight") of global `shape`, by name."""

    def row_bytes(self, width: int, nbytes: int) -> int:
        """One output row holding all `width` of its input columns (column-parallel), scales included, in memory
        (`nbytes`: the model dtype's size)."""

    def column_bytes(self, height: int, nbytes: int) -> int:
        """The values of one input column of a matrix of `height` output rows (row-parallel), without scales."""

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        """Scales of a matrix of `height` rows that a row-parallel split leaves whole on every rank."""

    def read(self, reader: WeightReader, s: Slice):
        """Rank slice `s` of the matrix, touching only its stored rows and columns."""
