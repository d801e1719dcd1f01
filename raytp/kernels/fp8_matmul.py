"""y = x @ W.T for an FP8 weight (float8_e4m3fn, one float32 scale per output row or per tensor) by dequantizing
it, W = weight * scale: what CPU ranks (and CUDA ranks with the kernels off) run. CUDA ranks read a layout of
their own, made at load time, with the weight-only tensor-core kernel (raytp.kernels.packed_gemv): x stays in the
model dtype, so results match this path up to summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (weight * scale).T -> (..., out) in x's dtype; `scale` float32 (out, 1) or ()."""
    return F.linear(x, dequantize_fp8(weight, scale, x.dtype))
