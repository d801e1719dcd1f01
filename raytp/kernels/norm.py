"""RMSNorm, optionally fused with the residual add before it, and SwiGLU's silu(gate) * up.

In a CUDA-graph decode step launch cost is gone but every small kernel still costs ~1.5-2 us of GPU time;
torch spends ~8 kernels on one RMSNorm (cast, square, mean, add, rsqrt, multiply, cast, scale), 64 per
8B-shaped step for the norms alone. The Triton kernels do each in one pass over the row. The torch
functions are the fallback (CPU, no Triton) and the reference the kernels are tested against; both follow
Hugging Face's LlamaRMSNorm: normalize in float32, round to the input dtype, then scale by the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import triton, use_triton


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused (..., 2 * cols) projection output [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, n_cols, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_DELTA:  # residual add in the input dtype, as `x + delta` rounds in torch
            x = (x.to(tl.float32) + tl.load(delta_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        normed = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(gate_up_ptr, out_ptr, n, cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        src = (offs // cols) * (2 * cols) + offs % cols  # row-major [gate | up] halves of each row
        g = tl.load(gate_up_ptr + src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_up_ptr + src + cols, mask=mask, other=0.0)
        silu = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # torch rounds silu's result before the product
        tl.store(out_ptr + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not use_triton(x):
        return rms_norm_torch(x, weight, eps)
    return _launch_norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)): the residual stream and the next sublayer's input, in one pass."""
    if not use_triton(x):
        x = x + delta
        return x, rms_norm_torch(x, weight, eps)
    return _launch_norm(x, delta, weight, eps)


def _launch_norm(x, delta, weight, eps):
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    x = x.contiguous()
    total = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, delta.contiguous() if delta is not None else x, weight, total, out, n, eps,
                                  HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n))
    return total, out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    if not use_triton(gate_up):
        return swiglu_torch(gate_up)
    gate_up = gate_up.contiguous()
    cols = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], cols), dtype=gate_up.dtype, device=gate_up.device)
    n = out.numel()
    _swiglu_kernel[(triton.cdiv(n, 1024),)](gate_up, out, n, cols, BLOCK=1024)
    return out
