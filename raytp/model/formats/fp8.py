"""float8 e4m3 weights with per-channel or per-tensor float32 scales (compressed-tensors `float-quantized`), or with
one scale per row and group of columns (from the block scales of transformers' fine-grained FP8: Qwen3-*-FP8,
DeepSeek-V3), as their checkpoint methods (`raytp.model.quant`) read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.fp8_matmul import dequantize_fp8, fp8_linear, to_float32
from raytp.kernels.packed_gemv import MMAPacked, fp8_packs, pack_fp8
from raytp.model.quant.base import QuantConfig


@dataclass
class FP8Weight:
    """float8 e4m3 weights (out, in_local) with float32 scales (out, 1) per channel or () per tensor:
    W = weight.float() * scale. With `group_size`, scales (out, groups): input column j of the slice takes group
    (j + group_start) // group_size, as IntWeight's do."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None
    group_size: int | None = None
    group_start: int = 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.group_size is None:
            return dequantize_fp8(self.weight, self.scale, dtype)
        (out, k), groups = self.weight.shape, self.scale.shape[1]
        if self.group_start == 0 and k == groups * self.group_size:  # whole groups: scale them as they lie
            grouped = to_float32(self.weight).view(out, groups, self.group_size) * self.scale[:, :, None]
            return grouped.view(out, k).to(dtype)
        group = (torch.arange(k, device=self.scale.device) + self.group_start) // self.group_size
        return dequantize_fp8(self.weight, self.scale[:, group], dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            y = fp8_linear(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scale, self.bias) if t is not None]

    takes_amax = False  # `apply` takes no activation statistics

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def fused(self, parts: Sequence[FP8Weight], bias: torch.Tensor | None) -> FP8Weight | None:
        """Row slices `parts` (this one first) as one matrix: per-tensor scales become per-row (exact, and fusable);
        block scales fuse where the parts share their groups. Else None."""
        if all(p.group_size is None for p in parts):
            scales = [p.scale.expand(p.weight.shape[0], 1) for p in parts]
            return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat(scales), bias)
        if all((p.group_size, p.group_start, p.scale.shape[1])
               == (self.group_size, self.group_start, self.scale.shape[1]) for p in parts):
            return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), bias,
                             self.group_size, self.group_start)
        return None

    decode_layout = None  # not held in the GPU decode kernel's layout (PackedWeight is)

    def repacked(self, dtype: torch.dtype) -> MMAPacked | None:
        """The weight in the GPU decode kernel's layout (`raytp.kernels.packed_gemv`) where the kernel takes its
        groups, else None."""
        if not fp8_packs(self.group_size, self.group_start):
            return None
        return pack_fp8(self.weight, self.scale, dtype, self.group_size)


class FP8Format:
    """8-bit values stored unpacked (out, in), held with one float32 scale per row (per-tensor scales become
    per-row when the q/k/v or gate/up parts fuse), or per row and group of columns (block scales), so that any split
    of the rows is exact."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def group_entry_bytes(self, nbytes: int) -> int:
        return 4

    def row_bytes(self, width: int, nbytes: int) -> int:
        return width + 4 * (-(-width // self.quant.group_size) if self.quant.group_size else 1)

    def column_bytes(self, height: int, nbytes: int) -> int:
        return height

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return 4 if self.quant.per_tensor else 4 * height

    def synthetic_scale(self, std: float) -> float:
        return std  # values drawn N(0, 1)
