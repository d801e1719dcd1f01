"""y = x @ W.T for quantized weights repacked at load time into the layout a decode GEMV reads fastest.

Decode at batch 1-16 reads every weight once per step, so the kernel must stream the weights at the memory's speed
and spend as few instructions per weight as it can: on an H200 a 4-bit weight arrives every ~0.12 ns, and the
integer-to-float conversion alone (a quarter-rate instruction) would cap the kernel at ~40% of the bandwidth.

The layout (`KNPacked`), made once per rank from its own slice (`pack_int` / `pack_fp8`):
    values  int32 (K' / per, N): per = 32 // bits integers of consecutive inputs in one word, the outputs
            contiguous, so a warp's loads run along the outputs in 16-byte vectors (int4: 8 inputs, int8: 4);
            float8 e4m3 (K', N) for FP8
    scales  (groups, N) in float32 (a group is `group_words` consecutive words), zeros likewise or None
    x_index (K',) int32 or None: the input column each row of the layout multiplies, -1 for padding

Act-order and mid-group slices need no per-column group lookups in the hot loop: the rows are sorted by group at
load time and every group padded to the same width (a multiple of `per`) with rows that multiply a zero input, so
each packed word belongs to exactly one group. Where that moves rows, the kernel reads x through `x_index` (one
gathered load per input, shared by all the outputs of a program): exact, since it only reorders the sum, and used
for o_proj's act-order columns, which the attention heads fix; the column-parallel layers and down_proj (already
permuted at load, see raytp.model.formats) keep the identity and read x directly.

Dequantization: an integer q < 2**23 OR'ed into the mantissa of 2**23 (bits 0x4B000000) is the float 2**23 + q,
and subtracting 2**23 + zero is exact: two integer operations (shift, and+or) and one float add per weight instead
of the conversion. Each program sums x * (q - zero) over a word's values, then scales the word's sum once, so the
scale costs one multiply per word, not per weight. More than one row of x (batched decode) goes through tl.dot with
the weights dequantized into the model dtype.

Split-K without atomics on the output: where the row blocks alone give too few programs to keep every SM's memory
pipe busy, the inputs are cut into SPLIT_K slices; each program writes its float32 partial into a workspace, and
the last program of an output block to finish (a per-block counter, acquire/release) adds the slices in slice
order, writes y and resets the counter. Results are the same bits on every run and in CUDA graphs, one launch, no
memset. Longer inputs (prefill) dequantize into the model dtype once and take one cuBLAS matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import triton

MAX_ROWS = 16  # rows of x one weight pass serves; more (prefill) dequantize once and use cuBLAS
MAGIC = float(2 ** 23)  # 0x4B000000: the float whose mantissa an integer below 2**23 is OR'ed into


@dataclass
class KNPacked:
    """One rank's quantized matrix in the decode kernel's layout (see the module docstring)."""

    values: torch.Tensor  # int32 (K' / per, N), or float8_e4m3fn (K', N)
    scales: torch.Tensor  # float32 (groups, N); FP8: (1, N) per output row
    zeros: torch.Tensor | None  # float32 (groups, N) integer zero points; None: symmetric (2 ** (bits - 1))
    bits: int  # 4 or 8; 8 with float8 values for FP8
    group_words: int  # rows of `values` per group (int); FP8: K'
    in_features: int  # K: the inputs x has
    x_index: torch.Tensor | None  # int32 (K',): the input each layout row multiplies (-1: padding), None: identity

    @property
    def fp8(self) -> bool:
        return self.values.dtype == torch.float8_e4m3fn

    @property
    def per(self) -> int:
        return 1 if self.fp8 else 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.values.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.scales, self.zeros, self.x_index) if t is not None]


def _unpack_values(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, cols // per) with value j of a row in bits [bits * (j % per), ...) of word j // per -> int32
    (rows, cols)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def _pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (K', N) unsigned values, K' a multiple of per -> int32 (K' / per, N): value r in bits
    [bits * (r % per), ...) of word row r // per."""
    per = 32 // bits
    v = values.view(-1, per, values.shape[1])
    words = torch.zeros((v.shape[0], v.shape[2]), dtype=torch.int32, device=values.device)
    for j in range(per):
        words |= v[:, j] << (bits * j)
    return words


def pack_int(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int, group_size: int,
             group_start: int = 0, g_idx: torch.Tensor | None = None) -> KNPacked:
    """The IntWeight layout (raytp.model.formats: int32 (N, K / per) packed along the inputs, scales and zeros
    (N, groups), a column's group g_idx[j] or (j + group_start) // group_size) in the kernel's layout.

    Rows are sorted by group (stable) and each group padded to the widest group's width rounded up to `per`; the
    padding rows hold the zero point (so they add nothing) and multiply no input."""
    per = 32 // bits
    q = _unpack_values(packed, bits)  # (N, K)
    n_out, k_in = q.shape
    if g_idx is not None:
        group = g_idx.long().to(q.device)
    else:
        group = (torch.arange(k_in, device=q.device) + group_start) // group_size
    used, local = torch.unique(group, return_inverse=True)  # the groups this slice touches, dense ids
    counts = torch.bincount(local, minlength=len(used)) if k_in else torch.zeros(0, dtype=torch.long)
    width = -(-int(counts.max()) // per) * per if k_in else per
    order = torch.sort(local, stable=True).indices  # inputs grouped, each group in column order
    first = torch.cumsum(counts, 0) - counts  # where each group starts in `order`
    rank_in_group = torch.arange(k_in, device=q.device) - first[local[order]]
    row = local[order] * width + rank_in_group  # layout row of input order[i]
    n_rows = len(used) * width
    x_index = torch.full((n_rows,), -1, dtype=torch.int32, device=q.device)
    x_index[row] = order.to(torch.int32)
    zero_of_group = (zeros[:, used].round().to(torch.int32) if zeros is not None
                     else torch.full((n_out, len(used)), 1 << (bits - 1), dtype=torch.int32, device=q.device))
    values = zero_of_group.t().repeat_interleave(width, dim=0).contiguous()  # padding rows: the zero point
    values[row] = q.t()[order]
    identity = n_rows >= k_in and torch.equal(x_index[:k_in].long(), torch.arange(k_in, device=q.device)) \
        and bool((x_index[k_in:] < 0).all())
    return KNPacked(_pack_along_rows(values, bits), scales[:, used].float().t().contiguous(),
                    zeros[:, used].float().t().contiguous() if zeros is not None else None, bits, width // per,
                    k_in, None if identity else x_index)


def pack_fp8(weight: torch.Tensor, scale: torch.Tensor) -> KNPacked:
    """float8 e4m3 (N, K) with float32 scales (N, 1) or () -> the kernel's layout: values (K, N), scales (1, N)."""
    n_out, k_in = weight.shape
    scales = scale.float().reshape(-1, 1).expand(n_out, 1).t().contiguous()
    return KNPacked(weight.t().contiguous(), scales, None, 8, k_in, k_in, None)


def dequantize_kn(w: KNPacked, dtype: torch.dtype) -> torch.Tensor:
    """The weight in the layout's row order, (K', N) in `dtype`: (q - zero) * scale rounded once."""
    if w.fp8:
        return (w.values.float() * w.scales).to(dtype)
    rows = w.values.shape[0] * w.per
    q = _unpack_values(w.values.t().contiguous(), w.bits).t().float()  # (K', N)
    group = torch.arange(rows, device=q.device) // (w.group_words * w.per)
    zero = w.zeros[group] if w.zeros is not None else float(1 << (w.bits - 1))
    return ((q - zero) * w.scales[group]).to(dtype)


def gather_inputs(x: torch.Tensor, w: KNPacked) -> torch.Tensor:
    """x (..., K) -> (..., K') in the layout's row order, zeros for padding rows."""
    rows = w.values.shape[0] * w.per
    if w.x_index is None:
        return F.pad(x, (0, rows - x.shape[-1]))
    idx = w.x_index.long()
    return torch.where(idx >= 0, x[..., idx.clamp(min=0)], x.new_zeros(()))


def kn_linear_torch(x: torch.Tensor, w: KNPacked) -> torch.Tensor:
    """The reference and prefill path: dequantize, then one matmul."""
    return gather_inputs(x, w) @ dequantize_kn(w, x.dtype)


@dataclass(frozen=True)
class Launch:
    """How one call is cut into programs: a pure function of the shapes (see `launch_for`)."""

    block_n: int  # outputs per program (contiguous in memory)
    block_kw: int  # rows of the layout's values per inner step (packed words for int, inputs for FP8)
    split_k: int  # programs sharing one output block, each over a contiguous slice of the inputs
    num_warps: int = 4
    num_stages: int = 3


def launch_for(rows: int, n_out: int, n_rows: int, fp8: bool, sms: int) -> Launch:
    """Enough programs for ~4 per SM: output blocks of 128 (64 for batched rows, whose dequantized tile feeds
    tl.dot), then split-K over the value rows, never below 4 steps per slice."""
    block_n = 128 if rows == 1 else 64
    block_kw = (64 if rows == 1 else 32) if fp8 else (8 if rows == 1 else 4)
    n_blocks = -(-n_out // block_n)
    steps = -(-n_rows // block_kw)
    split = 1
    while n_blocks * split < 4 * sms and steps // (2 * split) >= 4:
        split *= 2
    return Launch(block_n, block_kw, split)


class _Workspace:
    """Per device: the float32 split-K partials and the per-output-block counters (zero between calls, each
    call's last program resets its own). Grown only outside CUDA-graph capture: `reserve` at load time sizes it
    for the largest call a weight can make."""

    def __init__(self):
        self.partials: dict[torch.device, torch.Tensor] = {}
        self.counters: dict[torch.device, torch.Tensor] = {}

    def reserve(self, device: torch.device, partials: int, counters: int) -> None:
        for store, size, dtype in ((self.partials, partials, torch.float32), (self.counters, counters, torch.int32)):
            have = store.get(device)
            if have is None or have.numel() < size:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("packed GEMV workspace grown during CUDA-graph capture; reserve() it at load")
                store[device] = torch.zeros(max(size, 1), dtype=dtype, device=device)

    def get(self, device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reserve(device, partials, counters)
        return self.partials[device], self.counters[device]


WORKSPACE = _Workspace()
_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:  # a property lookup per call would cost more than a small GEMV
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _layout_rows(w: KNPacked) -> int:
    return w.values.shape[0]


def reserve(w: KNPacked) -> None:
    """Size the device's workspace for every call `w` can get (1..MAX_ROWS rows), before any graph capture."""
    device = w.values.device
    for rows in (1, MAX_ROWS):
        launch = launch_for(rows, w.out_features, _layout_rows(w), w.fp8, sm_count(device))
        if launch.split_k > 1:
            WORKSPACE.reserve(device, launch.split_k * rows * w.out_features, -(-w.out_features // launch.block_n))


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _store_or_reduce(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, m, n, M, N,
                         SPLIT_K: tl.constexpr):
        """acc (BLOCK_M, BLOCK_N) float32 -> y; split: partial into the workspace, the last program adds them."""
        ok = (m < M)[:, None] & (n < N)[None, :]
        out = out_ptr + m[:, None] * N + n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            mine = ws_ptr + (pid_k * M + m[:, None]) * N + n[None, :]
            tl.store(mine, acc, mask=ok)
            tl.debug_barrier()  # every thread's partial is written before the counter moves (release)
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:  # the last slice of this block: sum all slices in slice order
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    part = ws_ptr + (s * M + m[:, None]) * N + n[None, :]
                    total += tl.load(part, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(out, total.to(out_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call (graph replays included)

    @triton.jit
    def _int_gemv_kernel(x_ptr, xidx_ptr, q_ptr, s_ptr, z_ptr, ws_ptr, cnt_ptr, out_ptr,
                         M, N, K, n_words, words_per_split, group_words,
                         BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_XIDX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                         SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        j = tl.arange(0, PER)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_lo = pid_k * words_per_split
        w_hi = tl.minimum(w_lo + words_per_split, n_words)
        for w0 in range(w_lo, w_lo + words_per_split, BLOCK_KW):  # a ragged last slice's extra steps load nothing
            wi = w0 + tl.arange(0, BLOCK_KW)
            w_ok = wi < w_hi
            tile_ok = w_ok[:, None] & n_ok[None, :]
            words = tl.load(q_ptr + wi[:, None] * N + n[None, :], mask=tile_ok, other=0,
                            eviction_policy="evict_first")
            # (BLOCK_KW, PER, BLOCK_N): 2**23 + q, exact, without an int-to-float conversion
            bits = ((words[:, None, :] >> (j * BITS)[None, :, None]) & ((1 << BITS) - 1)) | 0x4B000000
            f = bits.to(tl.float32, bitcast=True)
            g = wi // group_words
            sz = g[:, None] * N + n[None, :]
            scale = tl.load(s_ptr + sz, mask=tile_ok, other=0.0)
            if HAS_ZEROS:
                offset = tl.load(z_ptr + sz, mask=tile_ok, other=0.0) + 8388608.0
            else:
                offset = tl.full((BLOCK_KW, BLOCK_N), 8388608.0 + (1 << (BITS - 1)), tl.float32)
            qz = f - offset[:, None, :]  # q - zero, exact
            k = wi[:, None] * PER + j[None, :]  # (BLOCK_KW, PER) layout rows
            if HAS_XIDX:
                kx = tl.load(xidx_ptr + k, mask=w_ok[:, None], other=-1)
            else:
                kx = tl.where(w_ok[:, None] & (k < K), k, -1)
            if BLOCK_M == 1:
                x = tl.load(x_ptr + kx, mask=kx >= 0, other=0.0).to(tl.float32)
                word_sums = tl.sum(qz * x[:, :, None], axis=1)  # (BLOCK_KW, BLOCK_N)
                acc += tl.sum(word_sums * scale, axis=0)[None, :]
            else:
                w = tl.reshape(qz * scale[:, None, :], (BLOCK_KW * PER, BLOCK_N)).to(x_ptr.dtype.element_ty)
                kx2 = tl.reshape(kx, (BLOCK_KW * PER,))
                x = tl.load(x_ptr + m[:, None] * K + kx2[None, :], mask=(m < M)[:, None] & (kx2 >= 0)[None, :],
                            other=0.0)
                acc += tl.dot(x, w, input_precision=PRECISION)
        _store_or_reduce(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, m, n, M, N, SPLIT_K)

    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, ws_ptr, cnt_ptr, out_ptr, M, N, K, rows_per_split,
                         NATIVE_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * rows_per_split
        k_hi = tl.minimum(k_lo + rows_per_split, K)
        for k0 in range(k_lo, k_lo + rows_per_split, BLOCK_KW):
            k = k0 + tl.arange(0, BLOCK_KW)
            k_ok = k < k_hi
            b = tl.load(w_ptr + k[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0,
                        eviction_policy="evict_first")
            if NATIVE_FP8:  # compute capability 8.9+: the hardware converts two e4m3 at a time
                w = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:  # s eeee mmm -> the float16 s 0eeee mmm 0000000 is value / 2**8 (normal and subnormal alike)
                bi = b.to(tl.int32)
                half = (((bi & 0x7F) << 7) | ((bi & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True)
                w = half.to(tl.float32) * 256.0
            if BLOCK_M == 1:
                x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                acc += tl.sum(w * x[:, None], axis=0)[None, :]
            else:
                x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m < M)[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(x, w.to(x_ptr.dtype.element_ty), input_precision=PRECISION)
        scale = tl.load(s_ptr + n, mask=n_ok, other=0.0)
        _store_or_reduce(acc * scale[None, :], out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, m, n, M, N, SPLIT_K)


_NATIVE_FP8: dict[int, bool] = {}


def _native_fp8(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NATIVE_FP8:
        _NATIVE_FP8[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _NATIVE_FP8[index]


def kn_linear(x: torch.Tensor, w: KNPacked, launch: Launch | None = None) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N) in x's dtype: the Triton kernel for 1..MAX_ROWS rows of x on CUDA, else
    dequantize and one matmul. `launch` overrides the shape heuristic (the benchmark's sweep uses it)."""
    rows = x.numel() // x.shape[-1]
    if triton is None or not x.is_cuda or rows > MAX_ROWS or rows == 0:
        return kn_linear_torch(x, w)
    K, N = x.shape[-1], w.out_features
    x2 = x.reshape(rows, K).contiguous()
    n_rows = _layout_rows(w)
    if launch is None:
        launch = launch_for(rows, N, n_rows, w.fp8, sm_count(x.device))
    per_split = -(-n_rows // (launch.split_k * launch.block_kw)) * launch.block_kw
    split = -(-n_rows // per_split)
    n_blocks = triton.cdiv(N, launch.block_n)
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    ws, counters = WORKSPACE.get(x.device, split * rows * N if split > 1 else 0, n_blocks if split > 1 else 0)
    block_m = 1 if rows == 1 else MAX_ROWS
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if w.fp8:
        _fp8_gemv_kernel[(n_blocks, split)](
            x2, w.values.view(torch.uint8), w.scales, ws, counters, out, rows, N, K, per_split,
            NATIVE_FP8=_native_fp8(x.device), BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_KW=launch.block_kw,
            SPLIT_K=split, PRECISION=precision, num_warps=launch.num_warps, num_stages=launch.num_stages)
    else:
        _int_gemv_kernel[(n_blocks, split)](
            x2, w.x_index if w.x_index is not None else w.values, w.values, w.scales,
            w.zeros if w.zeros is not None else w.scales, ws, counters, out, rows, N, K, n_rows, per_split,
            w.group_words, BITS=w.bits, HAS_ZEROS=w.zeros is not None, HAS_XIDX=w.x_index is not None,
            BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_KW=launch.block_kw, SPLIT_K=split,
            PRECISION=precision, num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out.view(*x.shape[:-1], N)
