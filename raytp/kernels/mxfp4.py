"""MXFP4 experts (gpt-oss): 4-bit e2m1 values in groups of 32 sharing one e8m0 power-of-two scale, as the OCP
microscaling format and transformers' integration (`transformers.integrations.mxfp4`) store them.

    blocks  (experts, out, in / 2) uint8: input column 2j in the low nibble of byte j, 2j + 1 in the high one
    scales  (experts, out, in / 32) uint8: W[o, k] = FP4_VALUES[nibble] * 2 ** (scales[o, k // 32] - 127)

A nibble is s eem: sign s, then m * 0.5 for e = 0, else (1 + m / 2) * 2 ** (e - 1); every such value times a power of
two is exact in bfloat16, float16 (in range) and float32, so dequantizing is exact.

gpt-oss's experts (`raytp.model.mxfp4_experts`): gate_up's output rows interleave gate and up (row 2c is column c's
gate, 2c + 1 its up), both with biases, then a clamped SwiGLU (`clamped_swiglu_torch`); down_proj has a bias too,
added on one rank only (its outputs are partial sums).

    torch   (`mxfp4_experts_torch`: CPUs, and the reference): each selected expert's slice dequantized into the
            model dtype, then F.linear, one expert at a time after sorting the tokens on the host
    Triton  (`mxfp4_routed_experts`: GPUs): up to PAIRS_UP_TO (token, choice) pairs, two launches over a grid of
            (column block, pair), each program a GEMV of its pair's expert (no tile of mostly idle tokens, no
            program without work), every group of 32 inputs dotted unscaled and then scaled once; above it two
            launches over a grid of (column block, expert, tile of 16 tokens) as `raytp.kernels.moe_gemv`'s routed
            kernels; a program whose expert no token of its tile selected returns at once, so only the selected
            experts' bytes are read. The weights are decoded in registers from the bytes (half a byte per weight
            plus a byte per 32), never written out; the even and odd input columns (low and high nibbles) are two
            dots against the even and odd columns of x. Each projection accumulates in float32; gate_up's bias and
            the SwiGLU in float32 then rounded once to the model dtype; down's output rounded to the model dtype,
            weighted, summed over the choices in float32 (`combine_choices`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import triton
from raytp.kernels.moe_gemv import Launch, expert_groups
from raytp.kernels.moe_routing import combine_choices

GROUP = 32  # values sharing one scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127  # e8m0: the stored byte is the exponent plus 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks (..., out, in / 2) uint8, scales (..., out, in / 32) uint8 -> (..., out, in) in `dtype`."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), dim=-1)  # (..., out, in / 2, 2)
    grouped = values.view(*scales.shape, GROUP)  # (..., out, groups, 32)
    exponents = (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1)
    return torch.ldexp(grouped, exponents.float()).to(dtype).flatten(-2)


def clamped_swiglu_torch(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation of the interleaved (..., 2 * cols) projection (gate at even, up at odd positions):
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit); transformers' order of operations."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def mxfp4_experts_torch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: tuple, down: tuple,
                        alpha: float, limit: float) -> torch.Tensor:
    """x (tokens, hidden), ids (tokens, k) int64, weights (tokens, k) float32; gate_up and down each (blocks, scales,
    bias or None) of every expert -> (tokens, hidden) in x's dtype: each selected expert dequantized and applied, the
    weighted outputs summed in float32."""
    (gu_blocks, gu_scales, gu_bias), (d_blocks, d_scales, d_bias) = gate_up, down
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, tokens, w in expert_groups(ids, weights, gu_blocks.shape[0]):
        at = lambda bias: None if bias is None else bias[e]  # noqa: E731
        h = F.linear(x[tokens], dequantize_mxfp4(gu_blocks[e], gu_scales[e], x.dtype), at(gu_bias))
        h = clamped_swiglu_torch(h, alpha, limit)  # (n, cols)
        y = F.linear(h, dequantize_mxfp4(d_blocks[e], d_scales[e], x.dtype), at(d_bias))
        out.index_add_(0, tokens, y.float() * w[:, None])
    return out.to(x.dtype)


_TILE = 16  # tokens per program: the smallest M of a tensor-core tile
GATE_UP_LAUNCH, DOWN_LAUNCH = Launch(32, 128, 4), Launch(64, 128, 4)  # benchmarks/moe_gemv.py --mxfp4 --sweep
# The per-pair GEMVs have not yet been timed on a GPU: off (0 pairs) until the sweep above says where they win
PAIR_LAUNCHES, PAIRS_UP_TO = (Launch(16, 256, 4), Launch(32, 256, 4)), 0

if triton is not None:
    import triton.language as tl

    from raytp.kernels.moe_gemv import _tile_choices

    @triton.jit
    def _fp4_value(q, scale):
        """e2m1 codes q (int32) times their scales (float32): sign, then m / 2 for e = 0, else (1 + m / 2) 2 ** (e - 1)."""
        e, m = (q >> 1) & 3, (q & 1).to(tl.float32)
        power = ((tl.maximum(e, 1) + 126) << 23).to(tl.float32, bitcast=True)  # 2 ** (e - 1), exact
        magnitude = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * power) * scale
        return tl.where((q >> 3) == 1, -magnitude, magnitude)

    @triton.jit
    def _fp4_pair(blocks_ptr, scales_ptr, rows, row_ok, n_in, k0, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
        """Rows `rows` of one expert at its inputs k0 + 2j and k0 + 2j + 1 (j < BLOCK_K / 2), decoded from each byte's
        low and high nibble: two (rows, BLOCK_K / 2) tiles in DTYPE. Each byte and each scale is loaded once."""
        j = tl.arange(0, BLOCK_K // 2)
        ok = row_ok[:, None] & (k0 + 2 * j < n_in)[None, :]
        byte = tl.load(blocks_ptr + rows[:, None] * (n_in // 2) + (k0 // 2 + j)[None, :], mask=ok, other=0)
        byte = byte.to(tl.int32)
        g = tl.arange(0, BLOCK_K // 32)
        g_ok = row_ok[:, None] & (k0 + 32 * g < n_in)[None, :]
        s = tl.load(scales_ptr + rows[:, None] * (n_in // 32) + (k0 // 32 + g)[None, :], mask=g_ok, other=127)
        scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2 ** (s - 127); a zero byte reads as 0.0
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (scale.shape[0], BLOCK_K // 32, 16)),
                           (scale.shape[0], BLOCK_K // 2))  # each group's scale over its 16 bytes
        return _fp4_value(byte & 15, scale).to(DTYPE), _fp4_value(byte >> 4, scale).to(DTYPE)

    @triton.jit
    def _mxfp4_gate_up(x_ptr, ids_ptr, blocks_ptr, scales_ptr, bias_ptr, h_ptr, T, H, C, alpha, limit,
                       K: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        """h[t, j, cols] = clamped_swiglu(gate_up[e] @ x[t] + bias[e]) for the tile's tokens whose choice j is e."""
        expert = tl.program_id(1).to(tl.int64)
        tok, choice, live = _tile_choices(ids_ptr, expert, T, K, KP, TILE)
        if tl.max(live.to(tl.int32), axis=0) == 0:  # nobody here chose this expert: read none of it
            return
        dtype = h_ptr.dtype.element_ty
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        j = tl.arange(0, BLOCK_K // 2)
        blocks = blocks_ptr + expert * 2 * C * (H // 2)
        scales = scales_ptr + expert * 2 * C * (H // 32)
        gate = tl.zeros((TILE, BLOCK_N), tl.float32)
        up = tl.zeros((TILE, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            x_ok = live[:, None] & (k0 + 2 * j < H)[None, :]
            x_even = tl.load(x_ptr + tok[:, None] * H + (k0 + 2 * j)[None, :], mask=x_ok, other=0.0)
            x_odd = tl.load(x_ptr + tok[:, None] * H + (k0 + 2 * j + 1)[None, :], mask=x_ok, other=0.0)
            for r in tl.static_range(2):  # gate rows 2c, up rows 2c + 1
                lo, hi = _fp4_pair(blocks, scales, 2 * cols + r, col_ok, H, k0, BLOCK_K, dtype)
                part = tl.dot(x_even, tl.trans(lo), input_precision=PRECISION)
                part = tl.dot(x_odd, tl.trans(hi), part, input_precision=PRECISION)
                if r == 0:
                    gate += part
                else:
                    up += part
        if HAS_BIAS:
            bias = bias_ptr + expert * 2 * C + 2 * cols
            gate += tl.load(bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            up += tl.load(bias + 1, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        h = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
        tl.store(h_ptr + (tok * K + choice)[:, None] * C + cols[None, :], h.to(dtype),
                 mask=live[:, None] & col_ok[None, :])

    @triton.jit
    def _mxfp4_down(h_ptr, ids_ptr, weights_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr, T, H, C,
                    K: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        """y[t, j, rows] = weights[t, j] * (down[e] @ h[t, j] + bias[e])[rows] in float32, for the tile's tokens
        choosing e."""
        expert = tl.program_id(1).to(tl.int64)
        tok, choice, live = _tile_choices(ids_ptr, expert, T, K, KP, TILE)
        if tl.max(live.to(tl.int32), axis=0) == 0:
            return
        dtype = h_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < H
        j = tl.arange(0, BLOCK_K // 2)
        pair = tok * K + choice  # the (token, choice) row of h, y and weights
        blocks = blocks_ptr + expert * H * (C // 2)
        scales = scales_ptr + expert * H * (C // 32)
        acc = tl.zeros((TILE, BLOCK_N), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            h_ok = live[:, None] & (k0 + 2 * j < C)[None, :]
            h_even = tl.load(h_ptr + pair[:, None] * C + (k0 + 2 * j)[None, :], mask=h_ok, other=0.0)
            h_odd = tl.load(h_ptr + pair[:, None] * C + (k0 + 2 * j + 1)[None, :], mask=h_ok, other=0.0)
            lo, hi = _fp4_pair(blocks, scales, rows, row_ok, C, k0, BLOCK_K, dtype)
            acc = tl.dot(h_even, tl.trans(lo), acc, input_precision=PRECISION)
            acc = tl.dot(h_odd, tl.trans(hi), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * H + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        out = acc.to(dtype).to(tl.float32)  # down's output in the model dtype, then weighted
        w = tl.load(weights_ptr + pair, mask=live, other=0.0)
        tl.store(y_ptr + pair[:, None] * H + rows[None, :], out * w[:, None], mask=live[:, None] & row_ok[None, :])


    @triton.jit
    def _fp4_unscaled(q):
        """e2m1 codes q (int32) as float32 without their group's scale, by placing s, e and m in a float32's bits
        (e = 0 is m / 2: 0.5 is 2 ** -1)."""
        e, m = (q >> 1) & 3, q & 1
        bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
        return (bits | ((q >> 3) << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _mxfp4_gemv(blocks_ptr, scales_ptr, rows, row_ok, v_ptr, n_in, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        """(ROWS,) float32: rows `rows` of one expert's matrix times the vector of n_in values at v_ptr. Each group
        of 32 inputs (16 bytes) is dotted unscaled, then multiplied by its scale once."""
        g, b = tl.arange(0, BLOCK_K // 32), tl.arange(0, 16)
        acc = tl.zeros((ROWS,), tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            even = k0 + 32 * g[:, None] + 2 * b[None, :]  # (groups, 16): the even input of each byte
            in_ok = even < n_in
            v_even = tl.load(v_ptr + even, mask=in_ok, other=0.0).to(tl.float32)
            v_odd = tl.load(v_ptr + even + 1, mask=in_ok, other=0.0).to(tl.float32)
            q = tl.load(blocks_ptr + rows[:, None, None] * (n_in // 2) + (even // 2)[None, :, :],
                        mask=row_ok[:, None, None] & in_ok[None, :, :], other=0).to(tl.int32)
            part = tl.sum(_fp4_unscaled(q & 15) * v_even[None, :, :] + _fp4_unscaled(q >> 4) * v_odd[None, :, :],
                          axis=2)  # (ROWS, groups)
            s = tl.load(scales_ptr + rows[:, None] * (n_in // 32) + (k0 // 32 + g)[None, :],
                        mask=row_ok[:, None] & (k0 + 32 * g < n_in)[None, :], other=0)
            acc += tl.sum(part * (s.to(tl.int32) << 23).to(tl.float32, bitcast=True), axis=1)
        return acc

    @triton.jit
    def _mxfp4_gate_up_pairs(x_ptr, ids_ptr, blocks_ptr, scales_ptr, bias_ptr, h_ptr, H, C, alpha, limit,
                             K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """h[pair, cols] = clamped_swiglu(gate_up[e] @ x[t] + bias[e]) of one (token t, choice) pair choosing e:
        its gate rows 2c and up rows 2c + 1 read as one block of 2 BLOCK_N consecutive rows."""
        pair = tl.program_id(1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = 2 * tl.program_id(0) * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        row_ok = rows < 2 * C
        acc = _mxfp4_gemv(blocks_ptr + expert * 2 * C * (H // 2), scales_ptr + expert * 2 * C * (H // 32), rows,
                          row_ok, x_ptr + (pair // K) * H, H, 2 * BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * 2 * C + rows, mask=row_ok, other=0.0).to(tl.float32)
        gate, up = tl.split(tl.reshape(acc, (BLOCK_N, 2)))
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        h = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(h_ptr + pair * C + cols, h.to(h_ptr.dtype.element_ty), mask=cols < C)

    @triton.jit
    def _mxfp4_down_pairs(h_ptr, ids_ptr, weights_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr, H, C,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """y[pair, rows] = weight * (down[e] @ h[pair] + bias[e])[rows] in float32, of one (token, choice) pair."""
        pair = tl.program_id(1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < H
        acc = _mxfp4_gemv(blocks_ptr + expert * H * (C // 2), scales_ptr + expert * H * (C // 32), rows, row_ok,
                          h_ptr + pair * C, C, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * H + rows, mask=row_ok, other=0.0).to(tl.float32)
        out = acc.to(h_ptr.dtype.element_ty).to(tl.float32)  # down's output in the model dtype, then weighted
        tl.store(y_ptr + pair * H + rows, out * tl.load(weights_ptr + pair), mask=row_ok)


def mxfp4_routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: tuple, down: tuple,
                         alpha: float, limit: float, launches: tuple[Launch, Launch] | None = None,
                         pairs_up_to: int | None = None) -> torch.Tensor:
    """`mxfp4_experts_torch`'s result from the Triton kernels (CUDA tensors, or the interpreter's CPU ones): up to
    `pairs_up_to` (token, choice) pairs one GEMV per pair, above it the token tiles; `launches` (gate_up's, down's)
    the tiles of whichever runs (benchmarks/moe_gemv.py --mxfp4 --sweep times both)."""
    (gu_blocks, gu_scales, gu_bias), (d_blocks, d_scales, d_bias) = gate_up, down
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.float().contiguous()
    (T, H), k, (E, C) = x.shape, ids.shape[1], (d_blocks.shape[0], d_blocks.shape[2] * 2)
    h = torch.empty((T, k, C), dtype=x.dtype, device=x.device)  # every (token, choice) row is written once
    y = torch.empty((T, k, H), dtype=torch.float32, device=x.device)
    gu_bias_arg = gu_bias if gu_bias is not None else gu_scales
    d_bias_arg = d_bias if d_bias is not None else d_scales
    biased = dict(HAS_BIAS=gu_bias is not None), dict(HAS_BIAS=d_bias is not None)
    if T * k <= (PAIRS_UP_TO if pairs_up_to is None else pairs_up_to):
        a, b = launches or PAIR_LAUNCHES
        _mxfp4_gate_up_pairs[(triton.cdiv(C, a.block_n), T * k)](
            x, ids, gu_blocks, gu_scales, gu_bias_arg, h, H, C, alpha, limit, K=k, BLOCK_N=a.block_n,
            BLOCK_K=a.block_k, **biased[0], num_warps=a.warps)
        _mxfp4_down_pairs[(triton.cdiv(H, b.block_n), T * k)](
            h, ids, weights, d_blocks, d_scales, d_bias_arg, y, H, C, BLOCK_N=b.block_n, BLOCK_K=b.block_k,
            **biased[1], num_warps=b.warps)
        return combine_choices(y, None, x.dtype)
    tiles, kp = triton.cdiv(T, _TILE), triton.next_power_of_2(k)
    shape = dict(K=k, KP=kp, TILE=_TILE, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    a, b = launches or (GATE_UP_LAUNCH, DOWN_LAUNCH)
    _mxfp4_gate_up[(triton.cdiv(C, a.block_n), E, tiles)](
        x, ids, gu_blocks, gu_scales, gu_bias_arg, h, T, H, C, alpha, limit,
        **shape, BLOCK_N=a.block_n, BLOCK_K=a.block_k, **biased[0], num_warps=a.warps)
    _mxfp4_down[(triton.cdiv(H, b.block_n), E, tiles)](
        h, ids, weights, d_blocks, d_scales, d_bias_arg, y, T, H, C,
        **shape, BLOCK_N=b.block_n, BLOCK_K=b.block_k, **biased[1], num_warps=b.warps)
    return combine_choices(y, None, x.dtype)  # the choices in order, in float32
