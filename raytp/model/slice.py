"""A rank's rows and columns of one Hugging Face tensor: what every weight source reads and every layer is given.

Apart from `raytp.model.layout`, which decides the slices, so that the checkpoint methods (`raytp.model.quant`),
which read them, need nothing of the model config.
"""

from __future__ import annotations

from dataclasses import dataclass

from raytp.model.quant.base import QuantConfig


@dataclass(frozen=True)
class Slice:
    """Rows `rows` (and columns `cols`, None = all of them) of the global tensor `name` of shape `shape`.

    `quant`: the matrix is stored quantized by that checkpoint method. `order`: the sliced dimension (rows, or
    columns when `cols` is given) counts positions in the stable sort of the group index of the Linear named `order`
    (its act-order weight_g_idx or g_idx), not stored indices. `split`: the piece whose range the sliced dimension
    follows (a KV_HEADS slice of q_proj holds the rows of the rank's KV groups' query heads), None for a tensor
    every rank holds whole. `stacked`: the tensor holds one matrix per expert along its first dimension (gpt-oss's
    experts): every expert is read, and `rows` and `cols` count the dimensions after it.
    """

    name: str
    shape: tuple[int, ...]
    rows: range
    cols: range | None = None
    quant: QuantConfig | None = None
    order: str | None = None
    split: str | None = None
    stacked: bool = False


def whole(name: str, shape: tuple[int, ...]) -> Slice:
    return Slice(name, shape, range(shape[0]))


def linear(quant: QuantConfig | None, module: str, shape: tuple[int, int], rows: range, cols: range | None = None,
           order: str | None = None, split: str | None = None) -> Slice:
    """The weight of the Linear `module`, stored quantized where the config's `quant` quantizes it."""
    stored = quant if quant is not None and quant.quantizes(module) else None
    return Slice(module + ".weight", shape, rows, cols, stored, order, split)


def permuted(quant: QuantConfig | None, down: str) -> str | None:
    """The order of an MLP's (or an expert's) columns: sorting `down`'s group index with act-order, else as stored
    (`Slice.order`; `raytp.model.layout` says why)."""
    return down if quant is not None and quant.act_order and quant.quantizes(down) else None
