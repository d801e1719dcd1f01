"""y = x @ W.T for an FP8 weight (float8_e4m3fn, one float32 scale per output row or per tensor): W = weight * scale.

Weight-only: x stays in the model dtype, so results match the fallback's dequantize-then-matmul up to summation
order. torch._scaled_mm was the other candidate; it multiplies two FP8 operands, so x would have to be quantized
to FP8 too (a different model, W8A8, with its own error), it needs shapes in multiples of 16 (a decode batch of 1
padded to 16 rows) and it runs only on compute capability 8.9 and up. Batch-1 decode is bound by the weight bytes
read, not by arithmetic, so reading one byte per weight is the whole gain and the Triton kernel gets it.

The kernel is the int kernel's loop (raytp.kernels.dequant_matmul: rows per program, split-K, fixed summation
order) with an FP8 load. It decodes e4m3 with integer operations instead of Triton's float8 type, which needs
compute capability 8.9: the bits s eeee mmm moved to s 0eeee mmm 0000000 are the float16 of value / 2**8 (normal
and subnormal alike, e4m3's exponent bias being 7 and float16's 15), so the same kernel runs on Ampere cards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.kernels.dequant_matmul import MAX_ROWS, Launch, launch_for, sm_count, split_output, sum_splits
from raytp.kernels.dispatch import triton, use_triton


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale).to(dtype)


def fp8_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_fp8(weight, scale, x.dtype))


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _fp8_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, k_chunk, PER_CHANNEL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
        pid_n, split = tl.program_id(0), tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        if PER_CHANNEL:
            scale = tl.load(s_ptr + n, mask=n_ok, other=0.0)[:, None]
        else:
            scale = tl.load(s_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            b = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
            half = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True)
            w = (half.to(tl.float32) * 256.0 * scale).to(x_ptr.dtype.element_ty)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
            else:
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        out = out_ptr + split * M * N + m[:, None] * N + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
               launch: Launch | None = None) -> torch.Tensor:
    """x (..., in) @ (weight * scale).T -> (..., out) in x's dtype; `scale` float32 (out, 1) or ()."""
    rows = x.numel() // x.shape[-1]
    if not use_triton(x) or rows > MAX_ROWS or rows == 0:
        return fp8_linear_torch(x, weight, scale)
    return _launch_fp8(x, weight, scale, launch)


def _launch_fp8(x, weight, scale, launch):
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if launch is None:
        launch = launch_for(M, N, K, 8, sm_count(x.device))
    k_chunk, out = split_output(x2, N, launch)
    _fp8_matmul_kernel[(triton.cdiv(N, launch.block_n), out.shape[0])](
        x2, weight.view(torch.uint8), scale.float().contiguous(), out, M, N, K, k_chunk,
        PER_CHANNEL=scale.numel() > 1,
        BLOCK_M=1 if M == 1 else MAX_ROWS, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return sum_splits(out, x)
