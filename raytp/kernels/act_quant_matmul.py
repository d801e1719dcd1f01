"""y = x @ W.T for 8-bit weights applied to activations quantized to 8 bits per token at run time (compressed-tensors'
FP8_DYNAMIC and W8A8 checkpoints), as their config says: the arithmetic of CPU ranks, and of GPU ranks under
`--no-triton` (GPU ranks with the kernels run these weights weight-only: `raytp.model.formats.fused.for_device`).

Both operands are symmetric with float32 scales. The weight is quantized once, per output channel (the checkpoint
stores q_w and s_w, shape (out, 1)); x at every call, one scale per token (row), exactly as compressed-tensors'
`compute_dynamic_scales_and_zp` and `fake_quantize` do it (quantization/utils/helpers.py, lifecycle/forward.py):

    s_x = amax(|x_row|) / Q    Q = 448 for e4m3 (its largest value); 127.5 for int8 (half the range 127 - (-128));
                               a zero scale (an all-zero row) becomes float32's eps
    q_x = clamp(x / s_x, lo, hi), then cast to e4m3 (round to nearest even) or torch.round (half to even) for int8
    y   = (q_x @ q_w.T) * s_x * s_w.T, computed as both operands dequantized to float32 and one matmul

The scales are float32 whatever the model dtype (compressed-tensors computes them in the activation's dtype; the two
agree bit for bit in float32).

Tensor parallelism: a row-parallel layer's input is split over ranks along its columns, and a token's scale must be
the amax of its whole row for every split to compute the one-device model; the caller passes that amax (`amax`,
gathered over the ranks by raytp.model.layers.RowParallelLinear), else it is taken from x. That gives every split
one device's arithmetic, not always its bits: the all-reduce sums in another order, and a value that lands on the
other side of a rounding boundary of the next quantization changes what follows (tests/test_act_quantized.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.kernels.fp8_matmul import to_float32

E4M3 = torch.float8_e4m3fn
# weight dtype -> (Q: amax / Q is the scale, clamp bounds of the quantized values): compressed-tensors' calculate_range
LEVELS = {E4M3: (448.0, -448.0, 448.0), torch.int8: (127.5, -128.0, 127.0)}
EPS = torch.finfo(torch.float32).eps  # compressed-tensors' stand-in for a zero scale


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


def act_quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     amax: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ (weight * scale).T with x quantized per token to weight's dtype (float8_e4m3fn or int8);
    `scale` float32 (out, 1); `amax` (..., 1) the rows' magnitudes when x holds part of each row. -> (..., out) in
    x's dtype."""
    q, s = quantize_per_token(x, weight.dtype, amax)
    return F.linear(to_float32(q) * s, to_float32(weight) * scale).to(x.dtype)
