"""y = x @ W.T for an FP8 weight (float8_e4m3fn, one float32 scale per output row or per tensor) by dequantizing
it, W = weight * scale: what CPU ranks (and CUDA ranks with the kernels off) run. CUDA ranks read a layout of
their own, made at load time, with the weight-only tensor-core kernel (raytp.kernels.packed_gemv): x stays in the
model dtype, so results match this path up to summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Every float32 value of an e4m3 code, indexed by the code's byte
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def to_float32(weight: torch.Tensor) -> torch.Tensor:
    """An 8-bit weight (float8 e4m3 or int8) in float32, exactly. CPUs convert float8 one element at a time in
    software; looking the 256 codes up in a table is several times faster there."""
    if weight.dtype != torch.float8_e4m3fn or weight.device.type != "cpu":
        return weight.float()
    codes = weight.contiguous().view(torch.uint8).view(-1).int()
    return torch.index_select(_E4M3_VALUES, 0, codes).view(weight.shape)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (to_float32(weight) * scale).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (weight * scale).T -> (..., out) in x's dtype; `scale` float32 (out, 1) or ()."""
    return F.linear(x, dequantize_fp8(weight, scale, x.dtype))
