"""y = x @ W.T for 8-bit weights applied to activations quantized to 8 bits per token at run time (compressed-tensors'
FP8_DYNAMIC and W8A8 checkpoints).

Both operands are symmetric with float32 scales. The weight is quantized once, per output channel (the checkpoint
stores q_w and s_w, shape (out, 1)); x at every call, one scale per token (row), exactly as compressed-tensors'
`compute_dynamic_scales_and_zp` and `fake_quantize` do it (quantization/utils/helpers.py, lifecycle/forward.py):

    s_x = amax(|x_row|) / Q    Q = 448 for e4m3 (its largest value); 127.5 for int8 (half the range 127 - (-128));
                               a zero scale (an all-zero row) becomes float32's eps
    q_x = clamp(x / s_x, lo, hi), then cast to e4m3 (round to nearest even) or torch.round (half to even) for int8
    y   = (q_x @ q_w.T) * s_x * s_w.T

The scales are float32 whatever the model dtype (compressed-tensors computes them in the activation's dtype; the two
agree bit for bit in float32).

Tensor parallelism: a row-parallel layer's input is split over ranks along its columns, and a token's scale must be
the amax of its whole row for every split to compute the one-device model; the caller passes that amax (`amax`,
gathered over the ranks by raytp.model.layers.RowParallelLinear), else it is taken from x. That gives every split
one device's arithmetic, not always its bits: the all-reduce sums in another order, and a value that lands on the
other side of a rounding boundary of the next quantization changes what follows (tests/test_act_quantized.py).

Where it runs:
    CPU, and the fallback  dequantize both operands, one float32 matmul (the arithmetic of the reference)
    CUDA, e4m3, cc >= 8.9  torch._scaled_mm on the two float8 operands with rowwise float32 scales (cuBLASLt), rows
                           padded to a multiple of 16
    CUDA, int8             torch._int_mm (exact int32 accumulation), rows padded to more than 16, scales applied after
A shape the fused ops refuse (a width or height that is not a multiple of 16, a rank with no columns) takes the
fallback. With Triton, the quantization of x (amax, scale, divide, clamp, round, and the zero rows of the padding)
is one kernel instead of about ten small torch ones, and so is int8's epilogue (int32 to float, both scales, the
model dtype); both do torch's CUDA operations in torch's order (a scalar divisor as its reciprocal, IEEE division
of tensors, round half to even), so their bits are the torch versions' (tests/gpu).

At batch 1 the step is bound by the weight bytes read, and quantizing x costs kernels of its own, so a weight-only
kernel (x kept in the model dtype, a slightly more accurate model) may be the faster: `WEIGHT_ONLY_MAX_ROWS` says up
to how many rows of x it runs instead, per weight dtype, to be set from measurements on a GPU (`route` decides, once
per call, from the shapes alone, so CUDA graphs capture one path). It is 0: the checkpoint runs as its config says.
(On an H200 the packed weight-only FP8 kernel, raytp.kernels.packed_gemv, takes 102 us per 8B layer at batch 1
against 138 for _scaled_mm and 122 for _int_mm: benchmarks/results/2026-12-02-h200-sitting7; running it changes the
model's arithmetic, which is the user's choice to make: RuntimeOptions.weight_only_act_quant repacks the weights for it
at load time, raytp.model.formats.fused.for_device.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import triton, use_triton
from raytp.kernels.fp8_matmul import fp8_linear

E4M3 = torch.float8_e4m3fn
# weight dtype -> (Q: amax / Q is the scale, clamp bounds of the quantized values): compressed-tensors' calculate_range
LEVELS = {E4M3: (448.0, -448.0, 448.0), torch.int8: (127.5, -128.0, 127.0)}
# torch on CUDA divides a tensor by a Python number as a product with the number's float32 reciprocal (a tensor by a
# tensor it divides exactly): the Triton kernel does the same, for the same bits
RECIPROCALS = {dtype: float(torch.tensor(1.0) / q) for dtype, (q, _, _) in LEVELS.items()}
PAD = 16  # _scaled_mm's rows, inner and outer sizes in multiples of 16
EPS = torch.finfo(torch.float32).eps  # compressed-tensors' stand-in for a zero scale
ROUND = 1.5 * 2 ** 23  # v + ROUND - ROUND rounds a float32 |v| <= 2**22 to an integer, half to even
BLOCK = 1024  # columns per step of the Triton kernels
INT_MM_MIN_ROWS = 17  # _int_mm needs more than 16 rows

# Rows of x up to which the weight-only kernel runs instead (see the module docstring): set from measurements
WEIGHT_ONLY_MAX_ROWS = {E4M3: 0}


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype,
                       amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., in) -> (q (..., in) in `dtype`, float32 scales (..., 1)); `amax` (..., 1): each row's largest magnitude
    over the whole row when x holds only some of its columns, else taken from x."""
    q_div, lo, hi = LEVELS[dtype]
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else xf.new_zeros((*x.shape[:-1], 1))
    scale = amax.float() / q_div
    scale = torch.where(scale == 0, EPS, scale)
    clamped = (xf / scale).clamp_(lo, hi)
    q = clamped.to(dtype) if dtype == E4M3 else clamped.round_().to(dtype)
    return q, scale


def act_quant_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           amax: torch.Tensor | None = None) -> torch.Tensor:
    """The reference arithmetic: both operands dequantized to float32, one matmul, the result in x's dtype."""
    q, s = quantize_per_token(x, weight.dtype, amax)
    return F.linear(q.float() * s, weight.float() * scale).to(x.dtype)


def route(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which path a call takes: "weight-only", "scaled_mm", "int_mm" or "torch" (from the device and the shapes)."""
    rows, (n, k) = x.numel() // max(x.shape[-1], 1), weight.shape
    if not x.is_cuda or not rows:
        return "torch"
    if rows <= WEIGHT_ONLY_MAX_ROWS.get(weight.dtype, 0):
        return "weight-only"
    if n % PAD or k % PAD or not k:
        return "torch"
    if weight.dtype == E4M3:
        return "scaled_mm" if torch.cuda.get_device_capability(x.device) >= (8, 9) else "torch"
    return "int_mm"


def act_quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     amax: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ (weight * scale).T with x quantized per token to weight's dtype (float8_e4m3fn or int8);
    `scale` float32 (out, 1); `amax` (..., 1) the rows' magnitudes when x holds part of each row. -> (..., out) in
    x's dtype."""
    path = route(x, weight)
    if path == "torch":
        return act_quant_linear_torch(x, weight, scale, amax)
    if path == "weight-only":
        return fp8_linear(x, weight, scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    padded = -(-rows // PAD) * PAD if path == "scaled_mm" else max(-(-rows // PAD) * PAD, INT_MM_MIN_ROWS)
    q, s = _quantize_padded(x2, weight.dtype, None if amax is None else amax.reshape(-1, 1), padded)
    if path == "scaled_mm":
        y = _scaled_mm(q, weight, s, scale, x.dtype)[:rows]
    else:
        y = _int_epilogue(torch._int_mm(q, weight.t()), s, scale, rows, x.dtype)
    return y.reshape(*lead, weight.shape[0])


def _quantize_padded(x2: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None,
                     padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token` of x2 (rows, K) into (padded, K) and scales (padded, 1): the rows past x2's are zeros
    with scale 1, for the matmuls' shape constraints, dropped after."""
    rows, k = x2.shape
    if not use_triton(x2):
        q, s = quantize_per_token(x2, dtype, amax)
        if padded == rows:
            return q, s
        return torch.cat([q, q.new_zeros((padded - rows, k))]), torch.cat([s, s.new_ones((padded - rows, 1))])
    x2 = x2.contiguous()
    q = torch.empty((padded, k), dtype=dtype, device=x2.device)
    s = torch.empty((padded, 1), dtype=torch.float32, device=x2.device)
    q_div, lo, hi = LEVELS[dtype]
    _quantize_rows_kernel[(padded,)](x2, x2 if amax is None else amax.contiguous(), q, s, rows, k, RECIPROCALS[dtype],
                                     lo, hi, HAS_AMAX=amax is not None, FLOAT8=dtype == E4M3, BLOCK=BLOCK)
    return q, s


def _int_epilogue(acc: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, rows: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """int32 products (padded, N) -> (rows, N) in `dtype`: acc * s * scale.T in float32, in that order."""
    if not use_triton(acc):
        return (acc[:rows].float() * s[:rows] * scale.t()).to(dtype)
    n = acc.shape[1]
    y = torch.empty((rows, n), dtype=dtype, device=acc.device)
    _int_epilogue_kernel[(rows, triton.cdiv(n, BLOCK))](acc, s, scale, y, n, BLOCK=BLOCK)
    return y


if triton is not None:
    import triton.language as tl

    _EPS, _ROUND = tl.constexpr(EPS), tl.constexpr(ROUND)  # kernels read globals only as constexpr

    @triton.jit
    def _quantize_rows_kernel(x_ptr, amax_ptr, q_ptr, s_ptr, M, K, RECIPROCAL, LO, HI, HAS_AMAX: tl.constexpr,
                              FLOAT8: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row of q: row < M quantizes x's row (amax given or found in a first pass), later rows
        are the padding's zeros with scale 1."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if row < M:
            if HAS_AMAX:
                amax = tl.load(amax_ptr + row).to(tl.float32)
            else:
                m = tl.zeros((BLOCK,), dtype=tl.float32)
                for k0 in range(0, K, BLOCK):
                    x = tl.load(x_ptr + row * K + k0 + cols, mask=k0 + cols < K, other=0.0)
                    m = tl.maximum(m, tl.abs(x.to(tl.float32)))
                amax = tl.max(m, axis=0)
            scale = amax * RECIPROCAL
            scale = tl.where(scale == 0, _EPS, scale)
            for k0 in range(0, K, BLOCK):
                ok = k0 + cols < K
                x = tl.load(x_ptr + row * K + k0 + cols, mask=ok, other=0.0).to(tl.float32)
                v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), LO), HI)
                if FLOAT8:
                    q = v.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # as torch's cast
                else:
                    q = ((v + _ROUND) - _ROUND).to(q_ptr.dtype.element_ty)
                tl.store(q_ptr + row * K + k0 + cols, q, mask=ok)
            tl.store(s_ptr + row, scale)
        else:
            for k0 in range(0, K, BLOCK):
                zero = tl.zeros((BLOCK,), dtype=tl.float32).to(q_ptr.dtype.element_ty)
                tl.store(q_ptr + row * K + k0 + cols, zero, mask=k0 + cols < K)
            tl.store(s_ptr + row, 1.0)

    @triton.jit
    def _int_epilogue_kernel(acc_ptr, s_ptr, w_ptr, y_ptr, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        acc = tl.load(acc_ptr + row * N + n, mask=ok, other=0).to(tl.float32)
        y = acc * tl.load(s_ptr + row) * tl.load(w_ptr + n, mask=ok, other=0.0)
        tl.store(y_ptr + row * N + n, y.to(y_ptr.dtype.element_ty), mask=ok)


def _scaled_mm(q: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt's FP8 GEMM with the rowwise scales in its epilogue; it writes rowwise-scaled results in bfloat16
    only, so other model dtypes get float32 products of unit scales, scaled after."""
    if dtype == torch.bfloat16:
        return torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=scale.t(), out_dtype=dtype)
    one = torch.ones((), dtype=torch.float32, device=q.device)
    y = torch._scaled_mm(q, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * s * scale.t()).to(dtype)
