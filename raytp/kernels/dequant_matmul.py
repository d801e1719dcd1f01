"""y = x @ W.T for an int4/int8 weight W kept packed: dequantized on the fly, never written out.

W is the IntWeight layout (raytp.model.formats): `qweight` int32 (out, in // per), per = 32 // bits values
packed along the inputs, value j of a row in bits [bits * (j % per), bits * (j % per) + bits) of word j // per,
unsigned; `scales` (out, n_groups) in the model dtype; `zeros` (out, n_groups) holding integer zero points, or
None for symmetric weights (zero point 2**(bits - 1)). Input column j belongs to group g_idx[j] when an act-order
index is given, else to (j + group_start) // group_size, and

    W[o, j] = (q[o, j] - zero[o, g(j)]) * scale[o, g(j)]

rounded once to the model dtype (the order transformers' compressed-tensors decompression uses).

Decode at batch 1 is bound by the weight bytes read: a 4-bit weight is a quarter of bf16's. The Triton kernel
gives each program BLOCK_N whole output rows (rows are contiguous in memory, so its loads are long runs) and,
where the rows alone make too few programs to keep every SM's memory pipe busy, a slice of the inputs too
(split-K, as gpt-fast's and exllama's GEMVs do): the slices' float32 partial sums land in a workspace that one
torch sum adds up in a fixed order, so results do not depend on timing. Where groups fall on word boundaries
(group size and group_start multiples of the values per word: every real layout) scales and zeros are loaded
once per word, not per value. Up to MAX_ROWS rows of x (batched decode) go through one pass over the weight,
with tl.dot for more than one row; longer inputs (prefill) are compute bound and take the fallback, dequantize
then one cuBLAS matmul. Shapes alone pick the launch, so a CUDA graph captures and replays it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import triton, use_triton

MAX_ROWS = 16  # rows of x one weight pass serves; more (prefill) dequantize once and use cuBLAS
BITS = (4, 8)


def group_index(n_cols: int, group_size: int, group_start: int, g_idx: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """The local group of each input column (long, shape (n_cols,))."""
    if g_idx is not None:
        return g_idx.long()
    return (torch.arange(n_cols, device=device) + group_start) // group_size


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (out, in // per) packed along the inputs -> the unsigned values, int32 (out, in)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    return ((qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(qweight.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int,
               group_size: int, group_start: int = 0, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (out, in) in the scales' dtype."""
    q = unpack(qweight, bits)
    g = group_index(q.shape[1], group_size, group_start, g_idx, q.device)
    zero = zeros[:, g] if zeros is not None else 1 << (bits - 1)
    return (q.to(scales.dtype) - zero) * scales[:, g]


def int_linear_torch(x, qweight, scales, zeros, *, bits, group_size, group_start=0, g_idx=None) -> torch.Tensor:
    return F.linear(x, dequantize(qweight, scales, zeros, bits=bits, group_size=group_size,
                                  group_start=group_start, g_idx=g_idx).to(x.dtype))


@dataclass(frozen=True)
class Launch:
    """How one call is cut into programs: a pure function of the shapes (see `launch_for`)."""

    block_n: int  # output rows per program; at least 16 for more than one row of x (tl.dot's smallest tile)
    block_k: int  # input columns per inner step
    split_k: int  # programs sharing one row block, each over a contiguous slice of the inputs
    num_warps: int = 4
    num_stages: int = 3


def launch_for(rows: int, out_features: int, in_features: int, bits: int, sms: int) -> Launch:
    """Enough programs to fill every SM a few times over, each reading long contiguous runs of its rows.

    A step of block_k columns reads block_k * bits / 8 bytes of each row (128 bytes for int4 at 256 columns);
    split-K only where the row blocks alone give fewer than ~4 programs per SM, and never below 4 steps per slice.
    """
    block_k = 256 if bits == 4 else 128
    block_n = 16 if rows > 1 else 32
    n_blocks = -(-out_features // block_n)
    steps = -(-in_features // block_k)
    split = 1
    while n_blocks * split < 4 * sms and steps // (2 * split) >= 4:
        split *= 2
    return Launch(block_n, block_k, split)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _int_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, out_ptr, M, N, K, n_groups, group_size, group_start,
                           k_chunk, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr,
                           WORD_GROUPS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
        pid_n, split = tl.program_id(0), tl.program_id(1)
        PER: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        shifts = tl.arange(0, PER) * BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # whole words of each row, then their PER values: column k0 + w * PER + s is value s of word w
            w_idx = k0 // PER + tl.arange(0, WORDS)
            w_ok = w_idx * PER < k_hi
            words = tl.load(q_ptr + n[:, None] * (K // PER) + w_idx[None, :], mask=n_ok[:, None] & w_ok[None, :],
                            other=0)
            q = ((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            if WORD_GROUPS:
                # a word's values share one group: a scale (and zero) per word, 1/PER of the loads of one per value
                g = (w_idx * PER + group_start) // group_size
                g_ok = n_ok[:, None] & w_ok[None, :]
            else:
                g = tl.load(g_ptr + k, mask=k_ok, other=0) if HAS_GIDX else (k + group_start) // group_size
                g_ok = n_ok[:, None] & k_ok[None, :]
            sz = n[:, None] * n_groups + g[None, :]
            scale = tl.load(s_ptr + sz, mask=g_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + sz, mask=g_ok, other=0.0).to(tl.float32)
            else:
                zero = tl.full(scale.shape, 1 << (BITS - 1), tl.float32)
            if WORD_GROUPS:
                w = tl.reshape((q - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, BLOCK_K))
            else:
                w = (tl.reshape(q, (BLOCK_N, BLOCK_K)) - zero) * scale
            w = w.to(x_ptr.dtype.element_ty)  # rounded to the model dtype once, as the torch dequantization rounds
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
            else:
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        out = out_ptr + split * M * N + m[:, None] * N + n[None, :]  # (split, M, N), or (M, N) unsplit
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
               bits: int, group_size: int, group_start: int = 0, g_idx: torch.Tensor | None = None,
               launch: Launch | None = None) -> torch.Tensor:
    """x (..., in) @ W.T -> (..., out) in x's dtype; the Triton kernel on CUDA for up to MAX_ROWS rows of x.

    `launch` overrides the shape heuristic (the benchmark's sweep uses it)."""
    rows = x.numel() // x.shape[-1]
    if not use_triton(x) or rows > MAX_ROWS or rows == 0:
        return int_linear_torch(x, qweight, scales, zeros, bits=bits, group_size=group_size,
                                group_start=group_start, g_idx=g_idx)
    return _launch_int(x, qweight, scales, zeros, bits, group_size, group_start, g_idx, launch)


def _launch_int(x, qweight, scales, zeros, bits, group_size, group_start, g_idx, launch):
    K, N = x.shape[-1], qweight.shape[0]
    per = 32 // bits
    assert bits in BITS and qweight.shape[1] * per == K, (qweight.shape, bits, K)
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if launch is None:
        launch = launch_for(M, N, K, bits, sm_count(x.device))
    block_m = 1 if M == 1 else MAX_ROWS
    assert block_m == 1 or launch.block_n >= 16, launch
    k_chunk, out = split_output(x2, N, launch)
    split_k = out.shape[0]
    _int_matmul_kernel[(triton.cdiv(N, launch.block_n), split_k)](
        x2, qweight, scales.contiguous(), zeros.contiguous() if zeros is not None else scales,
        g_idx if g_idx is not None else qweight, out, M, N, K, scales.shape[1], group_size, group_start,
        k_chunk, BITS=bits, HAS_ZEROS=zeros is not None, HAS_GIDX=g_idx is not None, BLOCK_M=block_m,
        WORD_GROUPS=g_idx is None and group_size % per == 0 and group_start % per == 0,
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return sum_splits(out, x)


def split_output(x2: torch.Tensor, N: int, launch: Launch) -> tuple[int, torch.Tensor]:
    """(input columns per split-K slice, the kernel's output (splits, M, N)) for x2 (M, K).

    Each slice is a whole number of BLOCK_K steps, so a step never straddles two slices. Unsplit, the kernel writes
    the result in x's dtype itself; split, it writes float32 partials."""
    K = x2.shape[1]
    k_chunk = -(-K // (launch.split_k * launch.block_k)) * launch.block_k
    splits = -(-K // k_chunk)
    return k_chunk, torch.empty((splits, x2.shape[0], N), dtype=torch.float32 if splits > 1 else x2.dtype,
                                device=x2.device)


def sum_splits(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's output -> (..., N) like x: the split-K partials summed in slice order, not in arrival order."""
    y = out[0] if out.shape[0] == 1 else out.sum(0).to(x.dtype)
    return y.view(*x.shape[:-1], out.shape[2])


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:  # a property lookup per call would cost more than a small GEMV
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]
