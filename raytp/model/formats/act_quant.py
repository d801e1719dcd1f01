"""8-bit weights whose inputs are quantized per token at run time (FP8_DYNAMIC, W8A8): float8 e4m3 or int8 stored
unpacked (compressed-tensors `float-quantized`, `int-quantized`) with per-channel float32 scales.

A group with a GPU rank running the kernels runs them weight-only, on every rank (`runs_weight_only`): the packed GEMV
(raytp.kernels.packed_gemv) reads the same bytes as a weight-only fp8 or int8 checkpoint, and quantizing the inputs
only adds kernels. On one H100 (synthetic Llama-3.1-8B, bf16, `raytp bench`) FP8_DYNAMIC decoded 239.4 tokens/s
weight-only against 178.0 with its activations quantized (torch._scaled_mm), W8A8 237.8 against 192.6 (torch._int_mm)
at batch 1, 1.31x and 1.19x at batch 8. Weight-only is slightly more accurate than the checkpoint's arithmetic.
A group of CPU ranks only (or `--no-triton`) quantizes the activations as the config says, with torch
(raytp.kernels.act_quant_matmul): it has no faster path to gain, and so computes what compressed-tensors computes,
the reference tests/test_act_quantized.py holds raytp to. The choice is the group's, not each rank's, so that every
rank runs one arithmetic and joins the same collectives (the per-token amax exchange of row-parallel layers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from raytp.kernels import dispatch
from raytp.kernels.act_quant_matmul import act_quant_linear
from raytp.kernels.fp8_matmul import to_float32
from raytp.model.formats.fp8 import FP8Format, FP8Weight
from raytp.model.formats.int_packed import IntFormat, IntWeight, pack


def runs_weight_only(device_kinds: Iterable[str], triton: bool) -> bool:
    """Whether a group of ranks on devices of `device_kinds` ("cuda", "cpu"), with the Triton kernels on or off,
    runs activation-quantized weights weight-only (see the module docstring)."""
    return triton and dispatch.triton is not None and "cuda" in device_kinds


@dataclass
class ActQuantWeight:
    """8-bit weights (out, in_local), float8 e4m3 or int8, with float32 scales (out, 1) per channel, whose inputs are
    quantized to the same type per token at every call (raytp.kernels.act_quant_matmul): W = weight.float() * scale.

    `amax` in `apply`: each token's largest magnitude over its whole input row, for a row-parallel slice (the rank
    holds some of the columns) that must use the same per-token scales as one device."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return to_float32(self.weight) * self.scale

    def apply(self, x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        y = act_quant_linear(x, self.weight, self.scale, amax)
        return y if self.bias is None else y + self.bias

    def weight_only(self, dtype: torch.dtype) -> FP8Weight | IntWeight:
        """The same weights in the weight-only format of their type (inputs left in the model dtype `dtype`): e4m3 as
        FP8Weight; int8 as IntWeight's symmetric 8-bit words (value + 128 around its zero point 128, one group of
        all inputs, scales in the model dtype as IntWeight holds them)."""
        if self.weight.dtype == torch.int8:
            return IntWeight(pack(self.weight.int() + 128, 8), self.scale.to(dtype), None, 8, self.weight.shape[1],
                             bias=self.bias)
        return FP8Weight(self.weight, self.scale, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scale, self.bias) if t is not None]

    takes_amax = True  # a row-parallel slice's `apply` takes the whole row's per-token amax

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def fused(self, parts: Sequence[ActQuantWeight], bias: torch.Tensor | None) -> ActQuantWeight:
        return ActQuantWeight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), bias)

    decode_layout = None  # not held in the GPU decode kernel's layout (PackedWeight is)

    def repacked(self, dtype: torch.dtype) -> None:
        """Applied as read (its kernel quantizes the activations), on every device."""
        return None


class ActQuantFormat(FP8Format):
    """Counted as FP8Format's per-channel case (int8 values are one byte too); int8 values drawn like packed
    integers' by a synthetic model."""

    def synthetic_scale(self, std: float) -> float:
        return IntFormat(self.quant).synthetic_scale(std) if self.quant.kind == "int" else std
