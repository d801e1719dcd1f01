"""Integers packed into int32 words with group or channel scales, optional zero points and per-column groups
(act-order), held as IntWeight whichever checkpoint method stored them (compressed-tensors' `pack-quantized`, GPTQ,
AWQ: `raytp.model.quant`, each telling `read_packed` where its tensors are through a `PackedLayout`).

Groups under tensor parallelism: a rank's input columns of a row-parallel layer start at a group boundary when the
planner splits them in whole groups; where a split falls mid-group (attention heads narrower than a group) the
slice keeps `group_start`, its first column's offset inside the group. Act-order checkpoints give each input column
its group (compressed-tensors' `weight_g_idx`, GPTQ's `g_idx` with desc_act, handled alike); `read_packed`
keeps a per-column `g_idx` only where the columns could not be brought into whole contiguous groups: the
column-parallel layers (q/k/v, gate/up), whose input is every column anyway, and o_proj, whose columns are fixed
by the attention heads (an exact alternative to permuting: each column looks up its own group's scale, local group
indices into the scales of the groups the rank's columns use). down_proj is permuted at load time instead
(`Slice.order`, see `raytp.model.layout`) and keeps plain contiguous groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from raytp.kernels.dequant_matmul import dequantize, int_linear, unpack
from raytp.kernels.packed_gemv import MMAPacked, pack_int
from raytp.model.formats.base import WeightReader
from raytp.model.quant.base import QuantConfig
from raytp.model.slice import Slice

ROWS_PER_READ = 256  # rows unpacked at a time while loading: bounds the int32 scratch of a wide slice


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of the kernels' `unpack`: unsigned values (rows, cols) -> int32 words (rows, ceil(cols * bits / 32)),
    value j in bits [bits * (j % per), bits * (j % per) + bits) of word j // per, per = 32 // bits (compressed-tensors'
    layout)."""
    per = 32 // bits
    v = F.pad(values.to(torch.int32), (0, -values.shape[1] % per)).view(values.shape[0], -1, per)
    words = torch.zeros(v.shape[:2], dtype=torch.int32, device=values.device)
    for k in range(per):
        words |= v[..., k] << (bits * k)
    return words


@dataclass
class IntWeight:
    """Packed unsigned integers with scales: W[o, j] = (q[o, j] - zero[o, g(j)]) * scale[o, g(j)],
    g(j) = g_idx[j] if g_idx is not None else (j + group_start) // group_size.

    packed (out, in_local // (32 // bits)) int32, whole words: in_local is a multiple of the values per word;
    scales (out, n_groups) in the model dtype; zeros like scales, holding the unsigned integer zero point, or None:
    symmetric, zero = 2 ** (bits - 1).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int  # in_features for one scale per row
    group_start: int = 0
    g_idx: torch.Tensor | None = None  # (in_local,) int32 local group of each column
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """The input columns this rank holds."""
        return self.packed.shape[1] * 32 // self.bits

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.packed, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                          group_start=self.group_start, g_idx=self.g_idx)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = int_linear(x, self.packed, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                       group_start=self.group_start, g_idx=self.g_idx)
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scales, self.zeros, self.g_idx, self.bias) if t is not None]

    takes_amax = False  # `apply` takes no activation statistics

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def fused(self, parts: Sequence[IntWeight], bias: torch.Tensor | None) -> IntWeight | None:
        """Row slices `parts` (this one first) as one matrix, where they share bits, columns, groups and zero-point
        presence; else None."""
        same = lambda p: ((p.bits, p.in_features, p.group_size, p.group_start)  # noqa: E731
                          == (self.bits, self.in_features, self.group_size, self.group_start)
                          and (p.zeros is None) == (self.zeros is None) and p.scales.shape[1] == self.scales.shape[1]
                          and (p.g_idx is None if self.g_idx is None else p.g_idx is not None
                               and torch.equal(p.g_idx, self.g_idx)))
        if not all(same(p) for p in parts):
            return None
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return IntWeight(cat("packed"), cat("scales"), None if self.zeros is None else cat("zeros"), self.bits,
                         self.group_size, self.group_start, self.g_idx, bias)

    decode_layout = None  # not held in the GPU decode kernel's layout (PackedWeight is)

    def repacked(self, dtype: torch.dtype) -> MMAPacked:
        """The weight in the GPU decode kernel's layout (`raytp.kernels.packed_gemv`)."""
        return pack_int(self.packed, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                        group_start=self.group_start, g_idx=self.g_idx)


class IntFormat:
    """4- or 8-bit integers held as IntWeight, its scales and zero points in the model dtype."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def group_entry_bytes(self, nbytes: int) -> int:
        return nbytes * (1 if self.quant.symmetric else 2)

    def row_bytes(self, width: int, nbytes: int) -> int:
        groups = -(-width // self.quant.group_size) if self.quant.group_size else 1
        return -(-width * self.quant.bits // 32) * 4 + groups * self.group_entry_bytes(nbytes)

    def column_bytes(self, height: int, nbytes: int) -> int:
        return height * self.quant.bits // 8

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return height * self.group_entry_bytes(nbytes)

    def synthetic_scale(self, std: float) -> float:
        # uniform values in [0, 2**bits) less the midpoint have a spread of 2**bits / sqrt(12) steps
        return std * 12 ** 0.5 / (1 << self.quant.bits)


# (rows, columns or None for all) -> that block of a matrix in IntWeight's orientation (rows are outputs)
Blocks = Callable[[range, "range | None"], torch.Tensor]


class PackedLayout(Protocol):
    """Where a checkpoint method stores the tensors of a packed-integer matrix (`module` names the Linear, `out`
    and `inp` its global shape), as `read_packed` asks for them."""

    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool

    def packed_blocks(self, reader: WeightReader, module: str, out: int, inp: int) -> Blocks:
        """Blocks of the packed values as IntWeight's words: (out, ceil(inp / per)), `per` values along the inputs
        in each."""

    def scale_blocks(self, reader: WeightReader, module: str, out: int, groups: int) -> Blocks:
        """Blocks of the scales (out, groups), in the model dtype."""

    def zero_points(self, reader: WeightReader, module: str, out: int, inp: int, words: range) -> torch.Tensor:
        """The unsigned zero points of the output rows packed in words `words` (of `per` rows each), every group:
        (len(words) * per, groups), int32."""

    def g_idx_name(self, module: str) -> str:
        """The tensor giving each input column its group (act-order)."""


def read_packed(layout: PackedLayout, reader: WeightReader, s: Slice) -> IntWeight:
    """Rank slice `s` of a packed-integer matrix stored as `layout` says."""
    q, module = layout, s.name.removesuffix(".weight")
    per, (out, inp) = 32 // q.bits, s.shape
    rows, cols = _positions(reader, s)
    width = len(cols)
    if width % per:  # the kernels read whole words
        raise ValueError(f"{s.name}: a rank's {width} input columns are not whole {per}-value words of {q.bits}-bit "
                         f"packing; raytp needs the Linear input sizes and their splits in multiples of {per}")

    # the packed integers of the slice: whole words when its columns start and end on word boundaries, else
    # unpacked and repacked a chunk of rows at a time
    words_of = layout.packed_blocks(reader, module, out, inp)
    if isinstance(cols, range) and cols.start % per == 0 and cols.stop % per == 0:
        packed = _read_rows(words_of, out, rows, range(cols.start // per, cols.stop // per))
    else:
        if isinstance(cols, range):
            words = range(cols.start // per, -(-cols.stop // per))
            pick = slice(cols.start - words.start * per, cols.stop - words.start * per)
        else:
            words, pick = None, cols
        packed = torch.cat([pack(unpack(raw, q.bits)[:, pick], q.bits)
                            for raw in _row_pieces(words_of, out, rows, words)])

    # each local column's group, then the scales (and zero points) of the groups the slice uses
    if q.group_size is None:  # one scale per row
        groups, group_size, start, g_idx = range(1), max(width, 1), 0, None
    else:
        group_size = q.group_size
        if q.act_order:
            gathered = isinstance(cols, torch.Tensor)  # permuted columns: look theirs up in the whole g_idx
            g = reader.read(Slice(layout.g_idx_name(module), (inp,), range(inp) if gathered else cols),
                            stored=True).cpu()
            g = g[cols] if gathered else g
        else:
            g = torch.arange(cols.start, cols.stop) // group_size
        g = g.long()
        first = int(g.min()) if width else 0
        position = s.cols.start if s.cols is not None else 0  # the slice's first column in the (sorted) order
        start = position - first * group_size
        contiguous = 0 <= start < group_size and torch.equal(g, first + (torch.arange(width) + start) // group_size)
        if contiguous:
            groups, g_idx = range(first, int(g.max()) + 1 if width else first), None
        else:  # act-order columns that are not whole contiguous groups: each keeps its own group
            groups, local = torch.unique(g, return_inverse=True)
            g_idx, start = local.to(torch.int32).to(packed.device), 0
    n_groups = -(-inp // q.group_size) if q.group_size else 1
    scales = _read_rows(layout.scale_blocks(reader, module, out, n_groups), out, rows, groups)
    zeros = None
    if not q.symmetric:  # packed along the output rows, `per` rows to a word
        lo, hi = (rows.start, rows.stop) if isinstance(rows, range) else (0, out)
        unpacked = layout.zero_points(reader, module, out, inp, range(lo // per, -(-hi // per)))
        local_rows = slice(lo % per, lo % per + hi - lo) if isinstance(rows, range) else rows.to(unpacked.device)
        zeros = unpacked[local_rows]
        zeros = zeros[:, groups.start:groups.stop] if isinstance(groups, range) else zeros[:, groups.to(zeros.device)]
        zeros = zeros.to(scales.dtype).contiguous()
    return IntWeight(packed.contiguous(), scales.contiguous(), zeros, q.bits, group_size, start, g_idx)


def stored_blocks(reader: WeightReader, name: str, shape: tuple[int, int], transposed: bool, stored: bool) -> Blocks:
    """Blocks of the (rows, cols) matrix `shape`, stored as tensor `name` as is or (GPTQ, AWQ) transposed."""
    if not transposed:
        return lambda rows, cols: reader.read(Slice(name, shape, rows, cols), stored=stored)
    return lambda rows, cols: reader.read(Slice(name, shape[::-1], cols if cols is not None else range(shape[1]),
                                                rows), stored=stored).t()


def _row_pieces(read: Blocks, n_rows: int, rows: range | torch.Tensor, cols: range | None):
    """Rows `rows` (columns `cols`) of a matrix of `n_rows` rows read through `read`, at most ROWS_PER_READ at a
    time. `rows` is a range, or row indices in any order (act-order MLP rows): those are gathered from chunks of
    contiguous rows, each read once."""
    if isinstance(rows, range):
        for i in range(0, len(rows), ROWS_PER_READ):
            yield read(rows[i:i + ROWS_PER_READ], cols)
        return
    if not len(rows):  # a rank without MLP columns: `_read_rows` reads the empty block
        return
    order = rows.argsort()
    wanted, picked = rows[order], []
    for lo in range(0, n_rows, ROWS_PER_READ):
        mine = wanted[(wanted >= lo) & (wanted < lo + ROWS_PER_READ)]
        if len(mine):
            chunk = read(range(lo, min(lo + ROWS_PER_READ, n_rows)), cols)
            picked.append(chunk[(mine - lo).to(chunk.device)])
    gathered = torch.cat(picked)[order.argsort().to(picked[0].device)]  # back to the requested order
    yield from gathered.split(ROWS_PER_READ)


def _read_rows(read: Blocks, n_rows: int, rows: range | torch.Tensor,
               cols: range | torch.Tensor | None = None) -> torch.Tensor:
    """Rows `rows` and columns `cols` (a range, or indices taken from whole rows) of a matrix read through `read`."""
    if isinstance(cols, torch.Tensor):
        pieces = [p[:, cols.to(p.device)] for p in _row_pieces(read, n_rows, rows, None)]
    else:
        pieces = list(_row_pieces(read, n_rows, rows, cols))
    if not pieces:
        return read(range(0), cols if isinstance(cols, range) else None)
    return torch.cat(pieces)


def _positions(reader: WeightReader, s: Slice) -> tuple[range | torch.Tensor, range | torch.Tensor]:
    """The stored rows and columns of slice `s`: its ranges, or for an ordered slice the stored indices at those
    positions of the stable sort of the group index of Linear `s.order`."""
    rows, cols = s.rows, s.cols if s.cols is not None else range(s.shape[1])
    if s.order is None:
        return rows, cols
    size = s.shape[0] if s.cols is None else s.shape[1]
    # the whole order key (4 bytes per position) is read: which stored columns sort into this rank's positions
    key = reader.read(Slice(s.quant.g_idx_name(s.order), (size,), range(size)), stored=True)
    perm = torch.sort(key.cpu(), stable=True).indices
    return (perm[rows.start:rows.stop], cols) if s.cols is None else (rows, perm[cols.start:cols.stop])
