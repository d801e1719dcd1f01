"""Attention of this step's queries over the KV cache, with grouped-query heads.

The torch version gathers each sequence's cache rows over a span and calls scaled_dot_product_attention with
a mask. For a decode step inside a CUDA graph the span must be the whole max context (a graph cannot resize),
SDPA's grouped-query path materializes the expanded keys and values, and the gather, mask and expansion are
a dozen kernels per layer.

The Triton decode kernel (one query token per sequence, or a verify step's few) reads the cache in place, only up
to each query's own limit (read from device memory, so a graph replays it at any length), and serves all query
heads of a KV head, and all queries of a sequence, from one read of its keys and values. The span is cut into a
fixed number of splits (flash-decoding): one program per (sequence, KV head, split) keeps a running max, sum and
weighted value sum; a second kernel merges the splits. The split layout depends only on the cache size, so a head's
result never depends on how heads are spread over ranks. Attention sinks (gpt-oss: a learned logit per head in the
softmax's denominator) enter only there, in the merge.

An FP8 cache (k_scale and v_scale given, raytp.kernels.kv_fp8) is read by the torch version, which dequantizes the
span it gathers, except where dispatch.use_triton_fp8_kv allows the decode kernel: it loads the e4m3 bytes, converts
them to the model dtype (exact: every e4m3 value is a bfloat16, float16 and float32 value) and applies each row's
float32 scale to what the row produced, never to the row: scores = (q . k_e4m3) * k_scale, and each probability is
multiplied by its value row's scale before it weights the e4m3 values. Nothing dequantized is stored and the scales
cost one multiply per position, not per element; the results differ from the torch version's (which rounds each
dequantized element to the model dtype first) by that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.kernels import kv_fp8
from raytp.kernels.dispatch import triton, use_triton, use_triton_fp8_kv

BLOCK_N = 64  # cache positions per inner step
# An FP8 cache's rows are half as long, and its loads cannot go straight into the dot (they are converted first):
# twice the positions per step and two pipeline stages hide the conversion, where the model-dtype cache's launch
# configuration leaves its split kernel 10-25% slower at 8B shapes.
FP8_BLOCK_N, FP8_STAGES = 128, 2
MAX_SPLITS = 64
MIN_SPLIT = 256  # positions: shorter splits would cost more to merge than they save
# A verify step's queries (speculative decoding) in the split kernels: not yet timed on a GPU against the torch
# version (benchmarks/verify_cost.py), so off until a sitting does
TRITON_VERIFY = False


def cached_attention_torch(q, k_cache, v_cache, slots, step, k_scale=None, v_scale=None, scale=None,
                           sinks=None) -> torch.Tensor:
    """q (batch, n_q, seq, head_dim) over one layer's cache (slots, kv_heads, positions, head_dim), each row
    seeing the positions step.visible allows within step.span; an FP8 cache's scales are (slots, kv_heads,
    positions); scores scaled by `scale` (None: head_dim ** -0.5); `sinks` (n_q,): see `attention_with_sinks`.
    Returns (batch, seq, n_q * head_dim)."""
    B, n_q, T, D = q.shape
    span = (slots, slice(None), slice(None, step.span))
    if k_scale is None:
        keys, values = k_cache[span], v_cache[span]  # (batch, kv_heads, span, head_dim)
    else:
        keys, values = kv_fp8.read(k_cache, k_scale, span, q.dtype), kv_fp8.read(v_cache, v_scale, span, q.dtype)
    out = attention_with_sinks(q, keys, values, step.visible, sinks, scale)
    return out.transpose(1, 2).reshape(B, T, n_q * D)


def attention_with_sinks(q, keys, values, visible, sinks=None, scale=None) -> torch.Tensor:
    """Grouped-query SDPA of q (batch, n_q, seq, head_dim) over keys and values (batch, kv_heads, span, head_dim)
    where `visible` (batch, 1, seq, span) allows -> (batch, n_q, seq, head_dim). `sinks` (n_q,) (gpt-oss): each
    head's learned logit joins the softmax's denominator and adds nothing to its numerator, as transformers'
    eager_attention_forward does (a logit appended to the scores, dropped after the softmax). Here it is one more
    key of zeros whose value is zero, the sink as its additive mask, so that SDPA's fused kernels still run."""
    n_q, n_kv = q.shape[1], keys.shape[1]
    if sinks is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=n_q != n_kv)
    B, _, T, _ = q.shape
    zero = keys.new_zeros((B, n_kv, 1, keys.shape[-1]))
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    sink = sinks.to(q.dtype).view(1, n_q, 1, 1).expand(B, n_q, T, 1)
    mask = torch.cat((bias.expand(B, n_q, T, -1), sink), dim=-1)  # (batch, n_q, seq, span + 1)
    return F.scaled_dot_product_attention(q, torch.cat((keys, zero), 2), torch.cat((values, zero), 2),
                                          attn_mask=mask, scale=scale, enable_gqa=n_q != n_kv)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, slots_ptr, limits_ptr, acc_ptr, ml_ptr,
                             s_slot, s_head, s_pos, ss_slot, ss_head, n_q, n_splits, chunk, scale,
                             GROUP: tl.constexpr, QUERIES: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                             BLOCK: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr):
        """One (sequence, KV head, split): the rows (query t, head g of the group) that see limits[b, t] positions."""
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(slots_ptr + b)
        i = tl.arange(0, ROWS)
        t, heads = i // GROUP, h * GROUP + i % GROUP
        live = i < QUERIES * GROUP
        limit = tl.load(limits_ptr + b * QUERIES + t, mask=live, other=0).to(tl.int32)  # the loop bounds share a type
        d = tl.arange(0, D)
        q = tl.load(q_ptr + ((b * n_q + heads) * QUERIES + t)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        l = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32)
        start = split * chunk
        stop = tl.minimum(start + chunk, tl.max(limit, 0))
        k_base = k_ptr + slot * s_slot + h * s_head
        v_base = v_ptr + slot * s_slot + h * s_head
        k_scales = k_scale_ptr + slot * ss_slot + h * ss_head
        v_scales = v_scale_ptr + slot * ss_slot + h * ss_head
        for n0 in range(start, stop, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            valid = offs < stop
            k = tl.load(k_base + offs[:, None] * s_pos + d[None, :], mask=valid[:, None], other=0)
            if FP8:
                k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (ROWS, BLOCK)
            if FP8:
                scores = scores * tl.load(k_scales + offs, mask=valid, other=0.0)[None, :]
            seen = valid[None, :] & (offs[None, :] < limit[:, None])
            scores = tl.where(seen, scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays empty
            alpha = tl.exp(m - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs[:, None] * s_pos + d[None, :], mask=valid[:, None], other=0)
            if FP8:
                v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
                p = p * tl.load(v_scales + offs, mask=valid, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
            m = m_new
        row = ((b * QUERIES + t) * n_q + heads) * n_splits + split  # an empty split leaves m = -inf, l = 0, acc = 0
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=live[:, None])
        tl.store(ml_ptr + row * 2, m, mask=live)
        tl.store(ml_ptr + row * 2 + 1, l, mask=live)

    @triton.jit
    def _decode_merge_kernel(acc_ptr, ml_ptr, sinks_ptr, out_ptr, n_splits, n_q, D: tl.constexpr,
                             SPLITS: tl.constexpr, SINKS: tl.constexpr):
        row = tl.program_id(0)  # (batch * queries + query) * n_q + query head
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        used = s < n_splits
        m = tl.load(ml_ptr + (row * n_splits + s) * 2, mask=used, other=float("-inf"))
        l = tl.load(ml_ptr + (row * n_splits + s) * 2 + 1, mask=used, other=0.0)
        top = tl.max(m, 0)  # the split holding the query's own position is never empty, so this is finite
        if SINKS:  # the head's sink logit joins the denominator only
            sink = tl.load(sinks_ptr + row % n_q).to(tl.float32)
            top = tl.maximum(top, sink)
        w = tl.exp(m - top)
        acc = tl.load(acc_ptr + (row * n_splits + s)[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
        denominator = tl.sum(l * w, 0)
        if SINKS:
            denominator += tl.exp(sink - top)
        out = tl.sum(acc * w[:, None], 0) / denominator
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def split_layout(max_context: int) -> tuple[int, int]:
    """(splits, positions per split) for a cache of max_context positions: fixed per model, not per step."""
    splits = max(1, min(MAX_SPLITS, max_context // MIN_SPLIT))
    chunk = -(-max_context // splits)
    return splits, -(-chunk // BLOCK_N) * BLOCK_N


def cached_attention(q, k_cache, v_cache, slots, step, k_scale=None, v_scale=None, scale=None,
                     sinks=None) -> torch.Tensor:
    """As cached_attention_torch; the Triton kernels on CUDA over a model-dtype cache or (where
    dispatch.use_triton_fp8_kv allows) an FP8 one, for one query token per sequence that sees step.lengths (batch,)
    positions, this step's included; with TRITON_VERIFY, also for a verify step's queries over a KV cache, each
    seeing step.limits (batch, seq) positions (its own position + 1). A window cache (raytp.model.kv_cache.WindowCache)
    passes the cells each sequence holds as its lengths: the kernel reads them in ring order, which attention does
    not see; a window has no per-query limits."""
    B, n_q, T, D = q.shape
    n_kv = k_cache.shape[1]
    fp8 = k_scale is not None
    limits = step.lengths.view(B, 1) if T == 1 else getattr(step, "limits", None) if TRITON_VERIFY else None
    if limits is None or not (use_triton_fp8_kv(q) if fp8 else use_triton(q)) or D & (D - 1) or n_q % n_kv:
        return cached_attention_torch(q, k_cache, v_cache, slots, step, k_scale, v_scale, scale, sinks)
    group = n_q // n_kv
    splits, chunk = split_layout(k_cache.shape[2])
    q = q.contiguous()
    acc = torch.empty((B * T * n_q * splits, D), dtype=torch.float32, device=q.device)
    ml = torch.empty((B * T * n_q * splits, 2), dtype=torch.float32, device=q.device)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if fp8:  # bytes: the kernel bitcasts them to e4m3
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        assert k_scale.stride() == v_scale.stride() and k_scale.stride(-1) == 1
    else:  # the kernel does not read them
        k_scale = v_scale = k_cache
    _decode_split_kernel[(B, n_kv, splits)](
        q, k_cache, v_cache, k_scale, v_scale, slots, limits.contiguous(), acc, ml, k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), k_scale.stride(0) if fp8 else 0, k_scale.stride(1) if fp8 else 0, n_q,
        splits, chunk, scale or D ** -0.5, GROUP=group, QUERIES=T, ROWS=max(16, triton.next_power_of_2(T * group)),
        D=D, BLOCK=FP8_BLOCK_N if fp8 else BLOCK_N, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=fp8, **({"num_stages": FP8_STAGES} if fp8 else {}))
    out = torch.empty((B, T, n_q, D), dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(B * T * n_q,)](acc, ml, sinks if sinks is not None else ml, out, splits, n_q, D=D,
                                         SPLITS=triton.next_power_of_2(splits), SINKS=sinks is not None)
    return out.view(B, T, n_q * D)
