"""Weights made of others: the parts of one column-parallel layer applied one by one, and a quantized weight
repacked for the GPU decode kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raytp.kernels.dispatch import use_triton
from raytp.kernels.packed_gemv import MMAPacked, fp8_packs, mma_linear, pack_fp8, pack_int, reserve
from raytp.model.formats.act_quant import ActQuantWeight
from raytp.model.formats.dense import DenseWeight
from raytp.model.formats.fp8 import FP8Weight
from raytp.model.formats.int_packed import IntWeight


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


class PackedWeight:
    """An IntWeight or FP8Weight (or an ActQuantWeight held as one of them) repacked on its GPU, at load time, into
    the layout of the decode kernel (raytp.kernels.packed_gemv): tensor cores at 1-16 rows, dequantize-then-cuBLAS
    for prefill."""

    def __init__(self, packed: MMAPacked, bias: torch.Tensor | None):
        self.packed, self.bias = packed, bias
        reserve(packed)  # the kernel's workspace, sized before any CUDA-graph capture

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = mma_linear(x, self.packed)
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        return self.packed.tensors() + ([self.bias] if self.bias is not None else [])


Weight = DenseWeight | IntWeight | FP8Weight | ActQuantWeight | ConcatWeight | PackedWeight


def fuse(parts: Sequence[Weight], bias: torch.Tensor | None = None) -> Weight:
    """Row slices of several matrices (q, k, v or gate, up) as one matrix when their formats allow, else a
    ConcatWeight."""
    first = parts[0]
    if all(isinstance(p, DenseWeight) for p in parts):
        return DenseWeight(torch.cat([p.weight for p in parts]), bias)
    if all(isinstance(p, ActQuantWeight) for p in parts):
        return ActQuantWeight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), bias)
    if all(isinstance(p, FP8Weight) and p.group_size is None for p in parts):  # per-tensor scales become per-row:
        scales = [p.scale.expand(p.weight.shape[0], 1) for p in parts]  # exact, and fusable
        return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat(scales), bias)
    if all(isinstance(p, FP8Weight) and (p.group_size, p.group_start, p.scale.shape[1])
           == (first.group_size, first.group_start, first.scale.shape[1]) for p in parts):  # block scales, per row
        return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), bias,
                         first.group_size, first.group_start)
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


def for_device(weight: Weight, dtype: torch.dtype, act_quant_weight_only: bool) -> Weight:
    """`weight` in the layout its device's kernels read fastest, made from the rank's own slice once at load time:
    with `act_quant_weight_only` (the group's choice: raytp.model.formats.act_quant.runs_weight_only)
    activation-quantized ones first become their weight-only format; quantized weights on a CUDA rank with the kernels
    on become PackedWeight; everything else stays as it is."""
    if isinstance(weight, ConcatWeight):
        return ConcatWeight([for_device(p, dtype, act_quant_weight_only) for p in weight.parts], weight.bias)
    # a rank with no heads or columns has an empty slice: nothing to repack, its checkpoint format serves
    if isinstance(weight, ActQuantWeight) and act_quant_weight_only and weight.weight.numel():
        return for_device(weight.weight_only(dtype), dtype, act_quant_weight_only)
    if isinstance(weight, IntWeight) and use_triton(weight.packed) and weight.packed.numel():
        return PackedWeight(pack_int(weight.packed, weight.scales, weight.zeros, bits=weight.bits,
                                     group_size=weight.group_size, group_start=weight.group_start,
                                     g_idx=weight.g_idx), weight.bias)
    if (isinstance(weight, FP8Weight) and use_triton(weight.weight) and weight.weight.numel()
            and fp8_packs(weight.group_size, weight.group_start)):
        return PackedWeight(pack_fp8(weight.weight, weight.scale, dtype, weight.group_size), weight.bias)
    return weight
