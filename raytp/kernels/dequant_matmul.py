"""y = x @ W.T for an int4/int8 weight W in the IntWeight layout, by dequantizing it: what CPU ranks (and CUDA ranks
with the kernels off) run.

W is the IntWeight layout (raytp.model.formats): `qweight` int32 (out, in // per), per = 32 // bits values
packed along the inputs, value j of a row in bits [bits * (j % per), bits * (j % per) + bits) of word j // per,
unsigned; `scales` (out, n_groups) in the model dtype; `zeros` (out, n_groups) holding integer zero points, or
None for symmetric weights (zero point 2**(bits - 1)). Input column j belongs to group g_idx[j] when an act-order
index is given, else to (j + group_start) // group_size, and

    W[o, j] = (q[o, j] - zero[o, g(j)]) * scale[o, g(j)]

rounded once to the model dtype (the order transformers' compressed-tensors decompression uses). The GPU decode
kernel reads a layout of its own, made from this one at load time (raytp.kernels.packed_gemv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (out, in // per) packed along the inputs -> the unsigned values, int32 (out, in)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    return ((qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(qweight.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int,
               group_size: int, group_start: int = 0, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (out, in) in the scales' dtype."""
    q = unpack(qweight, bits)
    if g_idx is not None:  # act order: columns of a group are scattered, gather each column's scale
        g = g_idx.long()  # (index_select gathers several times faster than advanced indexing on CPUs)
        zero = torch.index_select(zeros, 1, g) if zeros is not None else 1 << (bits - 1)
        return (q.to(scales.dtype) - zero) * torch.index_select(scales, 1, g)
    # contiguous groups: broadcast each group's scale over its columns (a gather of one scale per weight costs
    # several times the arithmetic); the slice may start mid-group, so pad to whole groups and drop the padding
    out, n = q.shape
    padded = F.pad(q, (group_start, -(group_start + n) % group_size)).view(out, -1, group_size)
    zero = zeros[:, :padded.shape[1], None] if zeros is not None else 1 << (bits - 1)
    w = (padded.to(scales.dtype) - zero) * scales[:, :padded.shape[1], None]
    return w.view(out, -1)[:, group_start:group_start + n]


def int_linear_torch(x, qweight, scales, zeros, *, bits, group_size, group_start=0, g_idx=None) -> torch.Tensor:
    return F.linear(x, dequantize(qweight, scales, zeros, bits=bits, group_size=group_size,
                                  group_start=group_start, g_idx=g_idx).to(x.dtype))


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
               bits: int, group_size: int, group_start: int = 0, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W.T -> (..., out) in x's dtype, W dequantized first. CUDA ranks with the kernels on never get
    here: their weights are repacked at load time for raytp.kernels.packed_gemv (raytp.model.formats.for_device)."""
    return int_linear_torch(x, qweight, scales, zeros, bits=bits, group_size=group_size, group_start=group_start,
                            g_idx=g_idx)
