"""float8 e4m3 weights with per-channel or per-tensor float32 scales (compressed-tensors `float-quantized`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.kernels.fp8_matmul import dequantize_fp8, fp8_linear
from raytp.model.config import QuantConfig
from raytp.model.formats.base import WeightReader
from raytp.model.layout import Slice


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


class FP8Format:
    """8-bit values stored unpacked (out, in) with float32 scales per row or per tensor. Held with one float32
    scale per row: per-tensor scales become per-row when the q/k/v or gate/up parts fuse."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def stored_shapes(self, name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        base = name.removesuffix("weight")
        return {base + "weight": shape, base + "weight_scale": (1,) if self.quant.per_tensor else (shape[0], 1)}

    def row_bytes(self, width: int, nbytes: int) -> int:
        return width + 4

    def column_bytes(self, height: int, nbytes: int) -> int:
        return height

    def row_scale_bytes(self, height: int, nbytes: int) -> int:
        return 4 if self.quant.per_tensor else 4 * height

    def read(self, reader: WeightReader, s: Slice) -> FP8Weight:
        shapes, base = self.stored_shapes(s.name, s.shape), s.name.removesuffix("weight")
        weight = reader.read(Slice(base + "weight", s.shape, s.rows, s.cols), stored=True)
        scale_name = base + "weight_scale"
        if s.quant.per_tensor:
            scale = reader.read(Slice(scale_name, shapes[scale_name], range(1)), stored=True).reshape(())
        else:
            scale = reader.read(Slice(scale_name, shapes[scale_name], s.rows), stored=True)
        return FP8Weight(weight, scale.float())
