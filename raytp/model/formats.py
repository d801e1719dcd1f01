"""How one rank's slice of a Linear matrix is stored, read and applied: dense, packed integers or float8.

    DenseWeight  the model dtype, applied with F.linear
    IntWeight    4- or 8-bit integers packed into int32 words (compressed-tensors `pack-quantized`), with group or
                 channel scales, optional zero points, optional per-column groups (act-order)
    FP8Weight    float8 e4m3 with per-channel or per-tensor float32 scales

`read_linear` reads a `Slice` in the format its `quant` names, touching only the stored rows and columns of the
slice (a chunk of whole rows at a time where columns must be gathered), so no rank holds a whole quantized matrix
it does not own. Every `apply` calls the kernel of its format in `raytp.kernels` (Triton on CUDA, dequantize then
F.linear elsewhere), in one place per format.

Groups under tensor parallelism: a rank's input columns of a row-parallel layer start at a group boundary when the
planner splits them in whole groups; where a split falls mid-group (attention heads narrower than a group) the
slice keeps `group_start`, its first column's offset inside the group. Act-order checkpoints give each input column
its group (`weight_g_idx`); `read_linear` keeps a per-column `g_idx` only where the columns could not be brought
into whole contiguous groups: the column-parallel layers (q/k/v, gate/up), whose input is every column anyway, and
o_proj, whose columns are fixed by the attention heads (an exact alternative to permuting: each column looks up its
own group's scale, local group indices into the scales of the groups the rank's columns use). down_proj is
permuted at load time instead (`Slice.order`, see `raytp.model.layout`) and keeps plain contiguous groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from raytp.kernels.dequant_matmul import dequantize, int_linear, unpack
from raytp.kernels.fp8_matmul import dequantize_fp8, fp8_linear
from raytp.model.layout import Slice

ROWS_PER_READ = 256  # rows unpacked at a time while loading: bounds the int32 scratch of a wide slice


class WeightReader(Protocol):
    def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
        """Rows `s.rows` (and columns `s.cols`) of global tensor `s.name`, in the model's dtype (`stored`: in the
        dtype it is stored in, for packed integers, float8 weights and group indices) on the rank's device.
        Raises a ValueError naming the tensor when it is missing or its global shape is not `s.shape`."""


class DenseWeight:
    """A matrix (and optional bias) kept as is in the model dtype, applied with F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])


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


@dataclass
class FP8Weight:
    """float8 e4m3 weights (out, in_local) with float32 scales (out, 1) per channel or () per tensor:
    W = weight.float() * scale."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale, torch.float32)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scale, self.bias) if t is not None]


class ConcatWeight:
    """Parts of one column-parallel layer that cannot share a matrix (stored in different formats, or act-order
    parts with different column groups): applied one by one, outputs concatenated."""

    def __init__(self, parts: Sequence, bias: torch.Tensor | None):
        self.parts, self.bias = list(parts), bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p.apply(x) for p in self.parts], dim=-1)
        return y + self.bias if self.bias is not None else y

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()] + ([self.bias] if self.bias is not None else [])


Weight = DenseWeight | IntWeight | FP8Weight | ConcatWeight


def stored_shapes(s: Slice) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint stores for the matrix of `s` (its global shapes), by name."""
    if s.quant is None:
        return {s.name: s.shape}
    q, (out, inp), base = s.quant, s.shape, s.name.removesuffix("weight")
    if q.kind == "fp8":
        return {base + "weight": (out, inp), base + "weight_scale": (1,) if q.per_tensor else (out, 1)}
    per, groups = 32 // q.bits, -(-inp // q.group_size) if q.group_size else 1
    shapes = {base + "weight_packed": (out, -(-inp // per)), base + "weight_scale": (out, groups),
              base + "weight_shape": (2,)}
    if not q.symmetric:
        shapes[base + "weight_zero_point"] = (-(-out // per), groups)
    if q.act_order:
        shapes[base + "weight_g_idx"] = (inp,)
    return shapes


def read_linear(reader: WeightReader, s: Slice) -> DenseWeight | IntWeight | FP8Weight:
    """Rank slice `s` of a Linear matrix in the format it is stored in."""
    if s.quant is None:
        return DenseWeight(reader.read(s))
    return _read_fp8(reader, s) if s.quant.kind == "fp8" else _read_int(reader, s)


def fuse(parts: Sequence[Weight], bias: torch.Tensor | None = None) -> Weight:
    """Row slices of several matrices (q, k, v or gate, up) as one matrix when their formats allow, else a
    ConcatWeight."""
    first = parts[0]
    if all(isinstance(p, DenseWeight) for p in parts):
        return DenseWeight(torch.cat([p.weight for p in parts]), bias)
    if all(isinstance(p, FP8Weight) for p in parts):  # per-tensor scales become per-row: exact, and fusable
        scales = [p.scale.expand(p.weight.shape[0], 1) for p in parts]
        return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat(scales), bias)
    same = lambda p: (isinstance(p, IntWeight) and (p.bits, p.in_features, p.group_size, p.group_start)  # noqa: E731
                      == (first.bits, first.in_features, first.group_size, first.group_start)
                      and (p.zeros is None) == (first.zeros is None) and p.scales.shape[1] == first.scales.shape[1]
                      and (p.g_idx is None if first.g_idx is None else p.g_idx is not None
                           and torch.equal(p.g_idx, first.g_idx)))
    if all(same(p) for p in parts):
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return IntWeight(cat("packed"), cat("scales"), None if first.zeros is None else cat("zeros"), first.bits,
                         first.group_size, first.group_start, first.g_idx, bias)
    return ConcatWeight(parts, bias)


def _row_pieces(reader: WeightReader, name: str, shape: tuple[int, ...], rows: range | torch.Tensor,
                cols: range | None, stored: bool):
    """Rows `rows` of tensor `name` (columns `cols`), at most ROWS_PER_READ at a time. `rows` is a range, or row
    indices in any order (act-order MLP rows): those are gathered from chunks of contiguous rows, each read once."""
    if isinstance(rows, range):
        for i in range(0, len(rows), ROWS_PER_READ):
            yield reader.read(Slice(name, shape, rows[i:i + ROWS_PER_READ], cols), stored=stored)
        return
    order = rows.argsort()
    wanted, picked = rows[order], []
    for lo in range(0, shape[0], ROWS_PER_READ):
        mine = wanted[(wanted >= lo) & (wanted < lo + ROWS_PER_READ)]
        if len(mine):
            chunk = reader.read(Slice(name, shape, range(lo, min(lo + ROWS_PER_READ, shape[0])), cols), stored=stored)
            picked.append(chunk[(mine - lo).to(chunk.device)])
    gathered = torch.cat(picked)[order.argsort().to(picked[0].device)]  # back to the requested order
    yield from gathered.split(ROWS_PER_READ)


def _read_rows(reader: WeightReader, name: str, shape: tuple[int, ...], rows: range | torch.Tensor,
               cols: range | torch.Tensor | None = None, stored: bool = False) -> torch.Tensor:
    """Rows `rows` and columns `cols` (a range, or indices taken from whole rows) of tensor `name`."""
    if isinstance(cols, torch.Tensor):
        pieces = [p[:, cols.to(p.device)] for p in _row_pieces(reader, name, shape, rows, None, stored)]
    else:
        pieces = list(_row_pieces(reader, name, shape, rows, cols, stored))
    if not pieces:
        return reader.read(Slice(name, shape, range(0), cols if isinstance(cols, range) else None), stored=stored)
    return torch.cat(pieces)


def _positions(reader: WeightReader, s: Slice) -> tuple[range | torch.Tensor, range | torch.Tensor]:
    """The stored rows and columns of slice `s`: its ranges, or for an ordered slice the stored indices at those
    positions of the stable sort of the `s.order` tensor."""
    rows, cols = s.rows, s.cols if s.cols is not None else range(s.shape[1])
    if s.order is None:
        return rows, cols
    size = s.shape[0] if s.cols is None else s.shape[1]
    # the whole order key (4 bytes per position) is read: which stored columns sort into this rank's positions
    perm = torch.sort(reader.read(Slice(s.order, (size,), range(size)), stored=True).cpu(), stable=True).indices
    return (perm[rows.start:rows.stop], cols) if s.cols is None else (rows, perm[cols.start:cols.stop])


def _read_int(reader: WeightReader, s: Slice) -> IntWeight:
    q, shapes, base = s.quant, stored_shapes(s), s.name.removesuffix("weight")
    per, (out, inp) = 32 // q.bits, s.shape
    rows, cols = _positions(reader, s)
    width = len(cols)
    if width % per:  # the kernels read whole words
        raise ValueError(f"{s.name}: a rank's {width} input columns are not whole {per}-value words of {q.bits}-bit "
                         f"packing; raytp needs the Linear input sizes and their splits in multiples of {per}")

    # the packed integers of the slice: whole words as stored when its columns start and end on word boundaries,
    # else unpacked and repacked a chunk of rows at a time
    name = base + "weight_packed"
    if isinstance(cols, range) and cols.start % per == 0 and cols.stop % per == 0:
        packed = _read_rows(reader, name, shapes[name], rows, range(cols.start // per, -(-cols.stop // per)), True)
    else:
        if isinstance(cols, range):
            words = range(cols.start // per, -(-cols.stop // per))
            pick = slice(cols.start - words.start * per, cols.stop - words.start * per)
        else:
            words, pick = None, cols
        pieces = [pack(unpack(raw, q.bits)[:, pick], q.bits) for raw in
                  _row_pieces(reader, name, shapes[name], rows, words, stored=True)]
        packed = torch.cat(pieces)

    # each local column's group, then the scales (and zero points) of the groups the slice uses
    if q.group_size is None:  # one scale per row
        groups, group_size, start, g_idx = range(1), max(width, 1), 0, None
    else:
        group_size = q.group_size
        if q.act_order:
            gathered = isinstance(cols, torch.Tensor)  # permuted columns: look theirs up in the whole g_idx
            g = reader.read(Slice(base + "weight_g_idx", (inp,), range(inp) if gathered else cols), stored=True).cpu()
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
    scales = _read_rows(reader, base + "weight_scale", shapes[base + "weight_scale"], rows, groups)
    zeros = None
    if not q.symmetric:
        zname = base + "weight_zero_point"
        zshape = shapes[zname]
        lo, hi = (rows.start, rows.stop) if isinstance(rows, range) else (0, out)
        raw = reader.read(Slice(zname, zshape, range(lo // per, -(-hi // per)), None), stored=True)
        unpacked = unpack(raw.t().contiguous(), q.bits).t()  # packed along the output rows
        local_rows = slice(lo % per, lo % per + hi - lo) if isinstance(rows, range) else rows.to(raw.device)
        zeros = unpacked[local_rows]
        zeros = (zeros[:, groups.start:groups.stop] if isinstance(groups, range) else zeros[:, groups.to(raw.device)])
        zeros = zeros.to(scales.dtype)
    return IntWeight(packed, scales, zeros, q.bits, group_size, start, g_idx)


def _read_fp8(reader: WeightReader, s: Slice) -> FP8Weight:
    shapes, base = stored_shapes(s), s.name.removesuffix("weight")
    weight = reader.read(Slice(base + "weight", s.shape, s.rows, s.cols), stored=True)
    scale_name = base + "weight_scale"
    if s.quant.per_tensor:
        scale = reader.read(Slice(scale_name, shapes[scale_name], range(1)), stored=True).reshape(())
    else:
        scale = reader.read(Slice(scale_name, shapes[scale_name], s.rows), stored=True)
    return FP8Weight(weight, scale.float())
