"""The prefill path of packed quantized weights: the whole matrix dequantized into the model dtype in one Triton pass.

More than 16 rows of x (prefill) multiply the dequantized matrix with one cuBLAS matmul
(`raytp.kernels.packed_gemv.mma_linear_torch`). Its torch dequantization (`dequantize_mma`) expands the packed
words into int32, float32 and a gathered float32 scale per element (~50 bytes moved per weight), which made a
prefill with int4 weights several times slower than with bf16 ones. This kernel reads each
word once and writes each weight once in the model dtype (~2.5 bytes per 4-bit weight), with the same float32
arithmetic, so its output equals `dequantize_mma`'s bit for bit:

    int   (q - zero) * scale, zero the group's zero point or 2 ** (bits - 1)
    e4m3  the code decoded exactly (subnormals included) times the row's scale

One program per 64-output x 32-input tile of the layout (`raytp.kernels.packed_gemv`'s module docstring): it
recomputes, for each element, which lane, word and bit field the tile put it in.
"""

from __future__ import annotations

import torch

from raytp.kernels.dispatch import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _dequant_tile_kernel(values_ptr, scales_ptr, zeros_ptr, out_ptr, N, Np, k_tiles, group_tiles,
                             KIND: tl.constexpr, HAS_ZEROS: tl.constexpr):
        nb = tl.program_id(0)
        kb = tl.program_id(1)
        k = tl.arange(0, 32)[:, None]  # input in the tile: 8t + 4s + 2a + h
        n = tl.arange(0, 64)[None, :]  # output in the tile: 16i + 8b + g
        t, s, a, h = k // 8, (k // 4) % 2, (k // 2) % 2, k % 2
        i, b, g = n // 16, (n // 8) % 2, n % 8
        if KIND == 4:
            WORDS: tl.constexpr = 8
            word = 2 * i + s
            shift = 4 * (2 * a + b + 4 * h)
        else:
            WORDS: tl.constexpr = 16
            word = 4 * i + 2 * s + a
            shift = 8 * (2 * b + h)
        lane = 4 * g + t
        packed = tl.load(values_ptr + ((nb * k_tiles + kb) * 32 + lane) * WORDS + word)
        q = (packed >> shift) & (15 if KIND == 4 else 255)  # the mask also clears an arithmetic shift's sign bits
        col = nb * 64 + n
        group = kb // group_tiles
        scale = tl.load(scales_ptr + group * Np + col).to(tl.float32)
        if KIND == 0:  # e4m3: s eeee mmm; (8 + m) * 2 ** (e - 10), or m * 2 ** -9 for e = 0
            e = (q >> 3) & 15
            m = (q & 7).to(tl.float32)
            power = ((tl.maximum(e, 1) + 117) << 23).to(tl.float32, bitcast=True)  # 2 ** (e - 10), exact
            value = tl.where(e == 0, m * 0.001953125, (m + 8.0) * power)
            value = tl.where((q >> 7) == 1, -value, value)
        else:
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + group * Np + col).to(tl.float32)
            else:
                zero = 8.0 if KIND == 4 else 128.0
            value = q.to(tl.float32) - zero
        out = (value * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (kb * 32 + k) * N + col, out, mask=col < N)


def dequantize_tiles(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, kind,
                     group_tiles: int, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The packed weight in physical input order, (Kp, out_features) in `dtype`: what `dequantize_mma` returns
    (`kind`: the weight's `packed_gemv.PackKind`)."""
    n_blocks, k_tiles = values.shape[0], values.shape[1]
    out = torch.empty((k_tiles * 32, out_features), dtype=dtype, device=values.device)
    _dequant_tile_kernel[(n_blocks, k_tiles)](values, scales, zeros if zeros is not None else scales, out,
                                              out_features, scales.shape[1], k_tiles, group_tiles,
                                              KIND=kind.code,
                                              HAS_ZEROS=zeros is not None)
    return out
