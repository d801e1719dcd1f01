"""Weights made of others: the parts of one column-parallel layer applied one by one, and a quantized weight
repacked for the GPU decode kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raytp.kernels.dispatch import use_triton
from raytp.kernels.packed_gemv import MMAPacked, mma_linear, reserve
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

    takes_amax = False  # column-parallel: its input is whole on every rank

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def fused(self, parts: Sequence[ConcatWeight], bias: torch.Tensor | None) -> None:
        return None  # its parts could not share a matrix

    decode_layout = None  # `for_device` repacks its parts

    def repacked(self, dtype: torch.dtype) -> None:
        return None


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

    @property
    def decode_layout(self) -> MMAPacked:
        return self.packed

    takes_amax = False  # the decode kernel applies weights with 16-bit activations


Weight = DenseWeight | IntWeight | FP8Weight | ActQuantWeight | ConcatWeight | PackedWeight


def fuse(parts: Sequence[Weight], bias: torch.Tensor | None = None) -> Weight:
    """Row slices of several matrices (q, k, v or gate, up) as one matrix when their formats allow, else a
    ConcatWeight."""
    first = parts[0]
    fused = first.fused(parts, bias) if all(type(p) is type(first) for p in parts) else None
    if fused is not None:
        return fused
    return ConcatWeight(parts, bias)


def for_device(weight: Weight, dtype: torch.dtype, act_quant_weight_only: bool) -> Weight:
    """`weight` in the layout its device's kernels read fastest, made from the rank's own slice once at load time:
    with `act_quant_weight_only` (the group's choice: raytp.model.formats.act_quant.runs_weight_only)
    activation-quantized ones first become their weight-only format; quantized weights on a CUDA rank with the kernels
    on become PackedWeight; everything else stays as it is."""
    if isinstance(weight, ConcatWeight):
        return ConcatWeight([for_device(p, dtype, act_quant_weight_only) for p in weight.parts], weight.bias)
    # a rank with no heads or columns has an empty slice: nothing to repack, its checkpoint format serves
    if weight.takes_amax and act_quant_weight_only and weight.weight.numel():
        return for_device(weight.weight_only(dtype), dtype, act_quant_weight_only)
    values = weight.tensors()[0]
    packed = weight.repacked(dtype) if use_triton(values) and values.numel() else None  # None: read as it is
    return weight if packed is None else PackedWeight(packed, weight.bias)
