"""float8 e4m3 weights with per-channel or per-tensor float32 scales (compressed-tensors `float-quantized`), or with
one scale per block of rows x columns (transformers' fine-grained FP8: Qwen3-*-FP8, DeepSeek-V3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.fp8_matmul import dequantize_fp8, fp8_linear
from raytp.model.config import QuantConfig
from raytp.model.formats.base import WeightReader
from raytp.model.layout import Slice


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
            grouped = self.weight.float().view(out, groups, self.group_size) * self.scale[:, :, None]
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


class FP8Format:
    """8-bit values stored unpacked (out, in) with float32 scales per row or per tensor, held with one float32
    scale per row (per-tensor scales become per-row when the q/k/v or gate/up parts fuse); or, fine-grained, with
    `weight_scale_inv` (ceil(out / block_rows), ceil(in / group_size)) per block, held as one scale per row and
    group of columns, so that any split of the rows is exact."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def stored_shapes(self, name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        base, q = name.removesuffix("weight"), self.quant
        if q.block_rows:
            return {base + "weight": shape,
                    base + "weight_scale_inv": (-(-shape[0] // q.block_rows), -(-shape[1] // q.group_size))}
        return {base + "weight": shape, base + "weight_scale": (1,) if q.per_tensor else (shape[0], 1)}

    def group_entry_bytes(self, nbytes: int) -> int:
        """Bytes per output row and group held in memory: its float32 scale."""
        return 4

    def row_bytes(self, width: int, nbytes: int) -> int:
        return width + 4 * (-(-width // self.quant.group_size) if self.quant.group_size else 1)

    def column_bytes(self, height: int, nbytes: int) -> int:
        return height

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return 4 if self.quant.per_tensor else 4 * height

    def read(self, reader: WeightReader, s: Slice) -> FP8Weight:
        shapes, base = self.stored_shapes(s.name, s.shape), s.name.removesuffix("weight")
        weight = reader.read(Slice(base + "weight", s.shape, s.rows, s.cols), stored=True)
        if s.quant.block_rows:
            return self._read_blocks(reader, s, weight, base + "weight_scale_inv", shapes)
        scale_name = base + "weight_scale"
        if s.quant.per_tensor:
            scale = reader.read(Slice(scale_name, shapes[scale_name], range(1)), stored=True).reshape(())
        else:
            scale = reader.read(Slice(scale_name, shapes[scale_name], s.rows), stored=True)
        return FP8Weight(weight, scale.float())

    def _read_blocks(self, reader: WeightReader, s: Slice, weight: torch.Tensor, name: str,
                     shapes: dict[str, tuple[int, ...]]) -> FP8Weight:
        """The block scales covering the slice, one row of them per weight row: only the slice's blocks are read."""
        rows_per, group_size = self.quant.block_rows, self.quant.group_size
        cols = s.cols if s.cols is not None else range(s.shape[1])
        row_blocks = range(s.rows.start // rows_per, -(-s.rows.stop // rows_per)) if s.rows else range(0)
        groups = range(cols.start // group_size, -(-cols.stop // group_size)) if cols else range(0)
        blocks = reader.read(Slice(name, shapes[name], row_blocks, groups), stored=True).float()
        local = torch.arange(s.rows.start, s.rows.stop) // rows_per - row_blocks.start
        scale = blocks[local.to(blocks.device)].contiguous()  # (rows, groups)
        return FP8Weight(weight, scale, group_size=group_size, group_start=cols.start - groups.start * group_size)
