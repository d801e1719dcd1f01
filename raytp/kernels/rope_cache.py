"""RoPE on this step's queries and keys, and the keys and values written into the KV cache, in one kernel.

torch spends ~16 kernels on it per layer (split, rotate-half's negate and concatenate, four multiplies, two
adds, two indexed cache writes); in a decode step each costs more GPU time than the work it does. The kernel
gives one program to every (token, head) of the fused qkv projection: query heads are rotated into a new
tensor, key heads are rotated straight into their cache cell (slot, head, position), value heads are copied
into theirs. It rounds to the model dtype after each multiply and add exactly where torch does, so bfloat16
results match the torch version bit for bit.

Qwen3's q_norm and k_norm (q_norm, k_norm given) RMS-normalize each query and key head before RoPE; as kernels of
their own they cost ~3 more per layer (two norms and a concatenation). The kernel normalizes the row it already
holds by rms_norm_torch's arithmetic in the same order (float32 rsqrt of the mean square plus eps, the product
rounded to the model dtype, times the weight) and rotates the result. The sum of squares adds in another order than
torch's, and Triton's rsqrt is not torch's: on a GPU a few rows differ in their last bits even where the sums are
exact (raytp.kernels.norm's kernels are no closer to torch: they are tested within the same tolerance). Without
norms the kernel compiles as before (QK_NORM is a constexpr). The torch version normalizes by
raytp.kernels.norm.rms_norm, so where it runs on a GPU with Triton on (an FP8 cache the kernel does not write, a
head_dim not a power of two) the norms stay one kernel each.

An FP8 cache (k_scale and v_scale given) stores each key and value row as e4m3 with its float32 scale
(raytp.kernels.kv_fp8). The kernel writes it where dispatch.use_triton_fp8_kv allows, by kv_fp8.quantize's arithmetic
in the same order (the row's amax, a correctly rounded division by 448, x / scale correctly rounded, clamped, rounded to
nearest even in e4m3), so its values and scales equal the torch version's bit for bit; elsewhere the torch version
writes it.
"""

from __future__ import annotations

import torch

from raytp.kernels import kv_fp8
from raytp.kernels.dispatch import triton, use_triton, use_triton_fp8_kv
from raytp.kernels.norm import rms_norm


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, k_cache, v_cache, k_scale=None,
                         v_scale=None, q_norm=None, k_norm=None, eps=0.0) -> torch.Tensor:
    """qkv (batch, seq, (n_q + 2 n_kv) * head_dim); cos, sin (batch, seq, head_dim) in the model dtype;
    k_cache, v_cache one layer's (slots, kv_heads, positions, head_dim), and for an FP8 cache k_scale, v_scale its
    (slots, kv_heads, positions); q_norm, k_norm (head_dim,) in the model dtype, if given, RMS-normalize every query
    and key head (raytp.kernels.norm.rms_norm, eps) before RoPE. Returns q (batch, n_q, seq, head_dim)."""
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    q, k, v = qkv.split([n_q * D, n_kv * D, n_kv * D], dim=-1)
    q, k = q.view(B, T, n_q, D), k.view(B, T, n_kv, D)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (batch, heads, seq, head_dim)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    cells = (slots.view(B, 1), slice(None), positions)  # selects (batch, seq, kv_heads, head_dim)
    if k_scale is None:
        k_cache[cells] = k.transpose(1, 2)
        v_cache[cells] = v.view(B, T, n_kv, D)
    else:
        kv_fp8.write(k_cache, k_scale, cells, k.transpose(1, 2))
        kv_fp8.write(v_cache, v_scale, cells, v.view(B, T, n_kv, D))
    return q


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _store_row(dst, scale_dst, x1, x2, lo, HALF: tl.constexpr, FP8: tl.constexpr):
        """A row (its halves x1, x2 in the model dtype) into a cache cell: as it is, or as e4m3 bytes with its scale
        (FP8), exactly as kv_fp8.quantize computes them."""
        if FP8:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(f1), 0), tl.max(tl.abs(f2), 0))
            # div_rn: Triton's `/` on float32 is an approximate division, torch's is correctly rounded
            scale = tl.math.div_rn(amax, 448.0)
            scale = tl.where(scale > 0, scale, 1.0)
            e1 = tl.clamp(tl.math.div_rn(f1, scale), -448.0, 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
            e2 = tl.clamp(tl.math.div_rn(f2, scale), -448.0, 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
            tl.store(dst + lo, e1.to(tl.uint8, bitcast=True))
            tl.store(dst + HALF + lo, e2.to(tl.uint8, bitcast=True))
            tl.store(scale_dst, scale)
        else:
            tl.store(dst + lo, x1)
            tl.store(dst + HALF + lo, x2)

    @triton.jit
    def _rms_norm_row(f1, f2, w_ptr, eps, lo, HALF: tl.constexpr):
        """A row's halves f1, f2 (float32 of model-dtype values) normalized as rms_norm_torch does it: float32
        rsqrt(mean(x^2) + eps), the product rounded to the model dtype and then multiplied by the weight in it."""
        dt = w_ptr.dtype.element_ty
        # times 1 / head_dim, a power of two: exactly the mean that torch's division gives
        rstd = tl.math.rsqrt((tl.sum(f1 * f1, 0) + tl.sum(f2 * f2, 0)) * (0.5 / HALF) + eps)
        n1 = (f1 * rstd).to(dt).to(tl.float32)
        n2 = (f2 * rstd).to(dt).to(tl.float32)
        w1 = tl.load(w_ptr + lo).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + lo).to(tl.float32)
        return (w1 * n1).to(dt).to(tl.float32), (w2 * n2).to(dt).to(tl.float32)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slots_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                           k_scale_ptr, v_scale_ptr, q_norm_ptr, k_norm_ptr, eps, T, n_q, n_kv, s_slot, s_head, s_pos,
                           ss_slot, ss_head, HALF: tl.constexpr, FP8: tl.constexpr, QK_NORM: tl.constexpr):
        row = tl.program_id(0)  # token: batch * T + seq
        head = tl.program_id(1)  # query heads, then key heads, then value heads
        D = 2 * HALF
        lo = tl.arange(0, HALF)
        src = qkv_ptr + (row * (n_q + 2 * n_kv) + head) * D
        x1 = tl.load(src + lo)
        x2 = tl.load(src + HALF + lo)
        pos = tl.load(pos_ptr + row)
        slot = tl.load(slots_ptr + row // T)
        if head < n_q + n_kv:
            dt = x1.dtype
            c1 = tl.load(cos_ptr + row * D + lo).to(tl.float32)
            c2 = tl.load(cos_ptr + row * D + HALF + lo).to(tl.float32)
            s1 = tl.load(sin_ptr + row * D + lo).to(tl.float32)
            s2 = tl.load(sin_ptr + row * D + HALF + lo).to(tl.float32)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            if QK_NORM:
                if head < n_q:
                    f1, f2 = _rms_norm_row(f1, f2, q_norm_ptr, eps, lo, HALF)
                else:
                    f1, f2 = _rms_norm_row(f1, f2, k_norm_ptr, eps, lo, HALF)
            # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], rounded as torch rounds each op
            o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
            o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
            if head < n_q:
                dst = q_ptr + (row * n_q + head) * D
                tl.store(dst + lo, o1)
                tl.store(dst + HALF + lo, o2)
            else:
                kv_head = head - n_q
                _store_row(k_cache_ptr + slot * s_slot + kv_head * s_head + pos * s_pos,
                           k_scale_ptr + slot * ss_slot + kv_head * ss_head + pos, o1, o2, lo, HALF, FP8)
        else:
            kv_head = head - n_q - n_kv
            _store_row(v_cache_ptr + slot * s_slot + kv_head * s_head + pos * s_pos,
                       v_scale_ptr + slot * ss_slot + kv_head * ss_head + pos, x1, x2, lo, HALF, FP8)


def rope_and_cache(qkv, n_q, n_kv, cos, sin, positions, slots, k_cache, v_cache, k_scale=None,
                   v_scale=None, q_norm=None, k_norm=None, eps=0.0) -> torch.Tensor:
    """As rope_and_cache_torch; one Triton kernel on CUDA when head_dim is a power of two, for a model-dtype cache
    or (where dispatch.use_triton_fp8_kv allows) an FP8 one, q_norm and k_norm included."""
    D = k_cache.shape[-1]
    fp8 = k_scale is not None
    if not (use_triton_fp8_kv(qkv) if fp8 else use_triton(qkv)) or D & (D - 1):
        return rope_and_cache_torch(qkv, n_q, n_kv, cos, sin, positions, slots, k_cache, v_cache, k_scale, v_scale,
                                    q_norm, k_norm, eps)
    B, T, _ = qkv.shape
    qkv = qkv.contiguous()
    q = torch.empty((B, T, n_q, D), dtype=qkv.dtype, device=qkv.device)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if fp8:  # bytes in, bytes out: the kernel bitcasts them to e4m3
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        assert k_scale.stride() == v_scale.stride() and k_scale.stride(-1) == 1
    else:  # the kernel does not read them
        k_scale = v_scale = k_cache
    qk_norm = q_norm is not None
    if qk_norm:  # torch rounds the product by the weight to their common dtype, the kernel to the model's
        assert q_norm.dtype == k_norm.dtype == qkv.dtype and q_norm.is_contiguous() and k_norm.is_contiguous()
    else:  # the kernel does not read them
        q_norm = k_norm = qkv
    _rope_cache_kernel[(B * T, n_q + 2 * n_kv)](
        qkv, cos.contiguous(), sin.contiguous(), positions.contiguous(), slots.contiguous(), q, k_cache, v_cache,
        k_scale, v_scale, q_norm, k_norm, eps, T, n_q, n_kv, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0) if fp8 else 0, k_scale.stride(1) if fp8 else 0, HALF=D // 2, FP8=fp8, QK_NORM=qk_norm,
        enable_fp_fusion=False)  # no fused multiply-add: float32 rounds as torch's separate ops do
    return q.transpose(1, 2)
