"""y = x @ W.T for int4, int8 and FP8 weights repacked at load time into the layout a decode GEMV reads fastest.

Decode at batch 1-16 reads every weight once per step, so the kernel must stream the weights at the memory's speed
and spend as few instructions per weight as it can: on an H200 a 4-bit weight arrives every ~0.12 ns, about 4
instructions per weight for the whole SM, and a plain dequantize-then-multiply spends more than that (the integer-
to-float conversion alone is a quarter-rate instruction). So the kernel (CUDA, compiled at run time with NVRTC):

- multiplies on the tensor cores: `mma.m16n8k16` with the weights as the 16 x 16 operand A, made in registers by
  the dequantization exactly where the mma wants them, and x as the 8-column operand B, two registers of the
  16-byte vector each lane loads (rows past the batch are zeros): one mma per 256 weights up to 8 rows of x, two
  up to 16, and no register moves to assemble fragments (x as the A operand cost ~60% more instructions a tile);
- dequantizes without conversions: a 4-bit value OR'ed into the mantissa of bf16 128 (fp16 1024) is 128 + q, and
  one packed fma subtracts 128 + zero exactly, two values per instruction (`lop3`, `fma.rn.bf16x2`); int8 goes
  through the float32 2**23 trick and one packed convert; e4m3 moves its bits into a bf16 (fp16) and one packed
  multiply by 2**120 (2**8) rescales, subnormals included;
- applies the group scale once per group on float32 accumulators (exact linear algebra: W = (q - z) * s), or
  (`Launch.scaled`, faster for 8-bit weights and zero points) multiplies it into the weights as they are made,
  rounding each weight once to the model dtype as the dequantize path does;
- reads each weight once with 16-byte loads that a warp issues as one contiguous 1 KiB run: the layout is made
  for the mma fragments, so no shuffles, no shared memory on the weights' path.

The layout (`MMAPacked`), made once per rank from its own slice (`pack_int` / `pack_fp8`). Inputs are in `Kp`
("physical") order, a multiple of 32, outputs padded to a multiple of 64:
    values   int32 [Np / 64][Kp / 32][32 lanes][words]: one warp's tile of 64 outputs x 32 inputs is 1 KiB,
             lane 4g + t holds outputs 16i + g and 16i + g + 8 (i = 0..3) at inputs 8t..8t+7 of the tile, as the
             mma's A fragments want them: register r of m-tile i's fragment at k16 step s holds output
             16i + g + 8 (r & 1) at inputs 8t + 4s + 2 (r >> 1) + {0, 1} (int4: word 2i + s, nibbles r and r + 4;
             8-bit: word 4i + 2s + (r >> 1), bytes 2 (r & 1) and 2 (r & 1) + 1)
    scales   (groups, Np) in the model dtype, as the checkpoint's; zeros likewise (integers), or None: symmetric
    x_index  int32 (Kp,): the input column each physical input is, -1 for padding; None: the identity
Act-order and mid-group slices need no per-column group lookups: the inputs are sorted by group at load time and
every group padded to the same width (a multiple of 32) with inputs that multiply zero, so each 32-input tile
belongs to one group. Where that moves inputs, x is gathered into physical order first (one small gather per
call: exact, it only reorders the sum; o_proj's act-order columns, which the heads fix, and slices that start
mid-group); everything else reads x as it is.

Each warp covers 64 outputs over a contiguous slice of the inputs; the warps of a block split the block's inputs
and add their accumulators through shared memory in warp order. Where the output blocks alone give too few warps
to keep the memory busy, SPLIT blocks share an output block: each writes its float32 partial into a workspace and
the last to finish (a per-block counter, fenced) adds them in split order, writes y and resets the counter. So the
result has the same bits on every run and in CUDA graphs, in one launch with no memset. More than 16 rows
(prefill) dequantize into the model dtype once and take one cuBLAS matmul. float32 models take that path too.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.kernels.dispatch import use_triton
from raytp.kernels.packed_dequant import dequantize_tiles

MAX_ROWS = 16  # rows of x one weight pass serves (the mma's M); more (prefill) dequantize once and use cuBLAS
TILE_N, TILE_K = 64, 32  # one warp's tile: outputs x inputs
PACK_CHUNK = 2048  # outputs repacked at a time (a multiple of TILE_N): bounds the load-time scratch


@dataclass(frozen=True)
class PackKind:
    """What a packed weight's values are: `bits` each, unsigned integers or float8 e4m3 bytes (`is_float`); `code`
    is the kernels' KIND (the bits, 0 for e4m3) and `name` goes into compiled kernels' names."""

    name: str
    bits: int
    is_float: bool
    code: int

    @property
    def per_word(self) -> int:
        return 32 // self.bits


INT4, INT8, FP8 = PackKind("int4", 4, False, 4), PackKind("int8", 8, False, 8), PackKind("fp8", 8, True, 0)
KINDS = {k.name: k for k in (INT4, INT8, FP8)}


@dataclass
class MMAPacked:
    """One rank's quantized matrix in the decode kernel's layout (see the module docstring)."""

    values: torch.Tensor  # int32 [Np / 64, Kp / 32, 32, words]
    scales: torch.Tensor  # (groups, Np) in the model dtype
    zeros: torch.Tensor | None  # (groups, Np) integer zero points in the model dtype; None: symmetric (2 ** (bits - 1))
    kind: PackKind
    group_tiles: int  # 32-input tiles per group
    in_features: int  # K: the inputs x has
    out_features: int  # N
    x_index: torch.Tensor | None  # int32 (Kp,), -1 for padding; None: physical order is x's own (padded to Kp)
    # The scales can be multiplied into the weights as they are dequantized (Launch.scaled): always for integers;
    # for e4m3 while scale * 2**120 (bf16's rescaling power) stays finite, checked at packing
    foldable: bool = True

    @property
    def padded(self) -> tuple[int, int]:
        """(Kp, Np)."""
        return self.values.shape[1] * TILE_K, self.values.shape[0] * TILE_N

    @property
    def bits(self) -> int:
        return self.kind.bits

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.scales, self.zeros, self.x_index) if t is not None]


def _unpack_values(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, cols // per), value j of a row in bits [bits * (j % per), ...) of word j // per -> int32
    (rows, cols)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def _tile_words(v: torch.Tensor, kind: PackKind) -> torch.Tensor:
    """Unsigned values (or e4m3 bytes) in physical order, (Kp, Np) int32 -> the kernel's words
    [Np / 64, Kp / 32, 32, words] (see the module docstring)."""
    kp, np_ = v.shape
    # k = kb*32 + 8t + 4s + 2a + h, n = nb*64 + 16i + 8b + g: A register r = 2a + b of m-tile i, k16 step s
    t = v.reshape(kp // 32, 4, 2, 2, 2, np_ // 64, 4, 2, 8)  # kb t s a h nb i b g
    if kind.bits == 4:  # nibble r + 4h of word 2i + s
        t = t.permute(5, 0, 8, 1, 6, 2, 4, 3, 7).reshape(np_ // 64, kp // 32, 32, 8, 8)  # nb kb g t i s h a b
    else:  # byte 2b + h of word 4i + 2s + a
        t = t.permute(5, 0, 8, 1, 6, 2, 3, 7, 4).reshape(np_ // 64, kp // 32, 32, 16, 4)  # nb kb g t i s a b h
    bits = 32 // t.shape[-1]
    words = torch.zeros(t.shape[:-1], dtype=torch.int32, device=v.device)
    for i in range(t.shape[-1]):
        words |= (t[..., i] & ((1 << bits) - 1)) << (bits * i)
    return words.contiguous()


def _physical_order(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each input's group (long, (K,)) -> (physical position of each input, the groups used, group width):
    inputs sorted by group (stable), each group padded to the widest one's count rounded up to TILE_K."""
    used, local = torch.unique(group, return_inverse=True)
    counts = torch.bincount(local, minlength=len(used))
    width = -(-int(counts.max()) // TILE_K) * TILE_K
    order = torch.sort(local, stable=True).indices
    first = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = local[order] * width + torch.arange(len(order), device=group.device) - first[local[order]]
    return position, used, width


def _finish(values: torch.Tensor, position: torch.Tensor, kp: int, n_out: int, fill: torch.Tensor | int):
    """(N, K) values -> (Kp, Np) in physical order, padding rows and columns filled with `fill`
    ((groups, N) per group of width kp // groups, or a constant)."""
    np_ = -(-n_out // TILE_N) * TILE_N
    if isinstance(fill, torch.Tensor):
        base = fill.t().repeat_interleave(kp // fill.shape[1], dim=0)
    else:
        base = torch.full((kp, n_out), fill, dtype=torch.int32, device=values.device)
    base = base.to(torch.int32).clone()
    base[position] = values.t().to(torch.int32)
    return F.pad(base, (0, np_ - n_out))


def _x_index(position: torch.Tensor, kp: int) -> torch.Tensor | None:
    k = len(position)
    if torch.equal(position, torch.arange(k, device=position.device)):
        return None  # physical order is x's own; the kernel pads x to kp with zeros
    index = torch.full((kp,), -1, dtype=torch.int32, device=position.device)
    index[position] = torch.arange(k, dtype=torch.int32, device=position.device)
    return index


def _padded_rows(t: torch.Tensor, np_: int, dtype: torch.dtype) -> torch.Tensor:
    return F.pad(t.to(dtype), (0, np_ - t.shape[1])).contiguous()


def pack_int(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int, group_size: int,
             group_start: int = 0, g_idx: torch.Tensor | None = None) -> MMAPacked:
    """The IntWeight layout (raytp.model.formats: int32 (N, K / per) packed along the inputs, scales and zeros
    (N, groups) in the model dtype, input j in group g_idx[j] or (j + group_start) // group_size) in the kernel's
    layout. Padding holds the zero point, so it adds nothing even before its zero input. Made CHUNK outputs at a
    time, so the int32 scratch stays small next to the weight."""
    n_out, k_in = packed.shape[0], packed.shape[1] * 32 // bits
    if g_idx is not None:
        group = g_idx.long().to(packed.device)
    else:
        group = (torch.arange(k_in, device=packed.device) + group_start) // group_size
    position, used, width = _physical_order(group)
    kp = len(used) * width
    chunks = []
    for lo in range(0, max(n_out, 1), PACK_CHUNK):
        q = _unpack_values(packed[lo:lo + PACK_CHUNK], bits)  # (chunk, K)
        zero = zeros[lo:lo + PACK_CHUNK, used].round() if zeros is not None else 1 << (bits - 1)
        chunks.append(_tile_words(_finish(q, position, kp, q.shape[0], zero), KINDS[f"int{bits}"]))
    np_ = -(-n_out // TILE_N) * TILE_N
    return MMAPacked(torch.cat(chunks), _padded_rows(scales[:, used].t(), np_, scales.dtype),
                     _padded_rows(zeros[:, used].t(), np_, scales.dtype) if zeros is not None else None,
                     KINDS[f"int{bits}"], width // TILE_K, k_in, n_out, _x_index(position, kp))


def fp8_packs(group_size: int | None, group_start: int = 0) -> bool:
    """Whether `pack_fp8` takes float8 weights with these groups: whole 32-input tiles per group, starting on one."""
    return group_size is None or group_size % TILE_K == 0 and group_start == 0


def pack_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
             group_size: int | None = None) -> MMAPacked:
    """float8 e4m3 (N, K) with float32 scales (N, 1) per row or () per tensor, or (N, groups) per row and group of
    `group_size` inputs (`fp8_packs`) -> the kernel's layout; the scales kept in the model dtype `dtype` (they are
    applied to float32 sums, and rounding a scale is rounding the weight once, as the fallback's dequantization
    into the model dtype does)."""
    n_out, k_in = weight.shape
    kp = -(-k_in // TILE_K) * TILE_K
    position = torch.arange(k_in, device=weight.device)
    chunks = [_tile_words(_finish(weight[lo:lo + PACK_CHUNK].view(torch.uint8).to(torch.int32), position, kp,
                                  min(PACK_CHUNK, n_out - lo), 0), FP8) for lo in range(0, n_out, PACK_CHUNK)]
    np_ = -(-n_out // TILE_N) * TILE_N
    if group_size is None:
        scales, group_tiles = scale.float().reshape(-1, 1).expand(n_out, 1).t(), kp // TILE_K
    else:
        scales, group_tiles = scale.float().t(), group_size // TILE_K
    foldable = bool(scales.abs().max() < 2.0 ** 7) if scales.numel() else True
    return MMAPacked(torch.cat(chunks), _padded_rows(scales, np_, dtype), None, FP8, group_tiles, k_in, n_out,
                     None, foldable)


def _untile(w: MMAPacked) -> torch.Tensor:
    """The kernel's words -> the values (Kp, Np) int32 in physical order (the inverse of `_tile_words`)."""
    kp, np_ = w.padded
    per, bits = w.kind.per_word, w.kind.bits
    vals = (w.values.unsqueeze(-1) >> (torch.arange(per, device=w.values.device) * bits)) & ((1 << bits) - 1)
    t = vals.reshape(np_ // 64, kp // 32, 8, 4, 4, 2, 2, 2, 2)
    if w.kind.bits == 4:  # nb kb g t i s h a b
        t = t.permute(1, 3, 5, 7, 6, 0, 4, 8, 2)  # kb t s a h nb i b g
    else:  # nb kb g t i s a b h
        t = t.permute(1, 3, 5, 6, 8, 0, 4, 7, 2)
    return t.reshape(kp, np_)


def dequantize_mma(w: MMAPacked, dtype: torch.dtype) -> torch.Tensor:
    """The weight in physical input order, (Kp, N) in `dtype`: (q - zero) * scale, e4m3 * scale."""
    kp, _ = w.padded
    v = _untile(w)[:, :w.out_features]
    group = torch.arange(kp, device=v.device) // (w.group_tiles * TILE_K)
    scale = w.scales[group, :w.out_features].float()
    if w.kind.is_float:
        return (v.to(torch.uint8).view(torch.float8_e4m3fn).float() * scale).to(dtype)
    zero = w.zeros[group, :w.out_features].float() if w.zeros is not None else float(1 << (w.bits - 1))
    return ((v.float() - zero) * scale).to(dtype)


def physical_inputs(x: torch.Tensor, w: MMAPacked) -> torch.Tensor:
    """x (..., K) -> (..., Kp) in the layout's input order, zeros for padding."""
    kp, _ = w.padded
    if w.x_index is None:
        return F.pad(x, (0, kp - x.shape[-1]))
    idx = w.x_index.long()
    return torch.where(idx >= 0, x[..., idx.clamp(min=0)], x.new_zeros(()))


def mma_linear_torch(x: torch.Tensor, w: MMAPacked) -> torch.Tensor:
    """The reference and prefill path: dequantize (in one Triton pass on GPUs), then one matmul."""
    if use_triton(w.values):
        dense = dequantize_tiles(w.values, w.scales, w.zeros, w.kind, w.group_tiles, w.out_features, x.dtype)
    else:
        dense = dequantize_mma(w, x.dtype)
    return physical_inputs(x, w) @ dense


@dataclass(frozen=True)
class Launch:
    """How one call is cut into blocks: a pure function of the shapes (see `launch_for`)."""

    warps: int  # warps per block, each over its own contiguous slice of the block's inputs
    split: int  # blocks sharing one 64-output block, each over a contiguous slice of the inputs
    stages: int = 3  # input tiles a warp holds at once: STAGES - 1 of them loading
    scaled: bool = False  # group scales multiplied into the weights as they are dequantized (see `tile`)
    min_blocks: int = 1  # blocks per SM the compiler must leave registers for (__launch_bounds__)

    def split_free(self) -> Launch:
        """The compiled kernel's key: the split is a grid dimension, not code."""
        return dataclasses.replace(self, split=1)


def launch_for(n_out: int, k_tiles: int, sms: int, kind: PackKind = INT4, zero_points: bool = False) -> Launch:
    """8 warps per block; a split along the inputs while the output blocks are few (at most 4 blocks per output
    block, at least 3 tiles per warp); tiles in flight per warp by weight width; the scales multiplied into the
    weights except for symmetric int4 (8-bit weights and zero points: 1.2-1.5x faster per layer that way, symmetric
    int4 3% slower). Fitted to the fastest launches of `benchmarks/quant_gemv.py --sweep` (one rank's and 4 ranks'
    Llama-3.1-8B shapes, batch 1); a GPU of another kind may want the sweep run again."""
    n_blocks = -(-n_out // TILE_N)
    warps, split = 8, 1
    while split < 4 and n_blocks * split * 2 <= 3 * sms and k_tiles // (warps * split * 2) >= 3:
        split *= 2
    # int4 tiles are 1 KiB a warp: two in registers keep enough in flight. 8-bit tiles are 2 KiB and cost more
    # registers; four of them pay where the warps are few and their slices short, two elsewhere
    stages = 2 if kind.bits == 4 or k_tiles > 128 or n_blocks * split >= 2 * sms else 4
    return Launch(warps, split, stages, scaled=kind.bits != 4 or zero_points)


class _Workspace:
    """Per device: float32 split partials and per-output-block counters (zero between calls: each call's last
    block resets its own). Grown only outside CUDA-graph capture: `reserve` at load time sizes it for the largest
    call a weight can make."""

    def __init__(self):
        self.partials: dict[torch.device, torch.Tensor] = {}
        self.counters: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        for store, size, dtype in ((self.partials, partials, torch.float32), (self.counters, counters, torch.int32)):
            have = store.get(device)
            if have is None or have.numel() < size:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("packed GEMV workspace grown during CUDA-graph capture; reserve() it at load")
                store[device] = torch.zeros(max(size, 1), dtype=dtype, device=device)
        return self.partials[device], self.counters[device]


WORKSPACE = _Workspace()


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _launch_of(w: MMAPacked, launch: Launch | None) -> Launch:
    return launch or launch_for(w.values.shape[0] * TILE_N, w.values.shape[1],
                                sm_count(_device_index(w.values.device)), w.kind, w.zeros is not None)


def reserve(w: MMAPacked) -> None:
    """Size the device's workspace for every call `w` can get, before any graph capture."""
    launch = _launch_of(w, None)
    if launch.split > 1:
        _, np_ = w.padded
        WORKSPACE.get(w.values.device, launch.split * MAX_ROWS * np_, np_ // TILE_N)


_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

// KIND 4: int4, 8: int8, 0: e4m3.  BF16 1: x and y bfloat16, 0: float16.
#if BF16
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#define FMA2 "fma.rn.bf16x2"
#define CVT2 "cvt.rn.bf16x2.f32"
#define MAGIC4 0x43004300u     // bf16 128: 128 + q for a 4-bit q OR'ed into its mantissa
#define ONE2 0x3F803F80u
#define FP8_SHIFT 4            // e4m3 s eeee mmm -> bf16 s 0000eeee mmm0000 = value * 2**-120
#define FP8_MASK 0x07F007F0u
#define FP8_RESCALE 0x7B807B80u  // 2**120
#else
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#define FMA2 "fma.rn.f16x2"
#define CVT2 "cvt.rn.f16x2.f32"
#define MAGIC4 0x64006400u     // fp16 1024
#define ONE2 0x3C003C00u
#define FP8_SHIFT 1            // e4m3 -> fp16 s 0eeee mmm0000000 = value * 2**-8
#define FP8_MASK 0x3F803F80u
#define FP8_RESCALE 0x5C005C00u  // 2**8
#endif
#define WORDS (KIND == 4 ? 8 : 16)   // per lane per 32-input tile

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm(FMA2 " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 mul2(u32 a, u32 b) {  // a * b, rounded once (fma with -0: exact for -0 products)
    return fma2(a, b, 0x80008000u);
}
__device__ __forceinline__ u32 lop_or_and(u32 a, u32 mask, u32 magic) {  // (a & mask) | magic
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
    return d;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
__device__ __forceinline__ u32 cvt2(float hi, float lo) {
    u32 d;
    asm(CVT2 " %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm(MMA " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u16 round_half(float f) {
    u16 h;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ float to_float(u16 h) {
#if BF16
    return __uint_as_float((u32)h << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ uint4 load16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// The weights are the mma's A operand (16 outputs x 16 inputs), x its B operand (16 inputs x 8 rows of x): one
// mma covers 256 weights, each register of A is made by the dequantization where the mma wants it, and x's
// fragment is two registers of the 16-byte vector the lane loaded. Register r of an A fragment holds output row
// g + 8 * (r & 1) of the m-tile at inputs 8t + 4s + 2 * (r >> 1) + {0, 1} of the tile (s: the k16 step); x's
// fragment holds row g of x at inputs 8t + 4s + {0, 1} and {2, 3}: the same inputs, so the products pair up.
// z[i][b], sc[i][b]: minus (magic + zero) and the scale of row 16i + g + 8b (packed twice where the dequantization
// works on pairs).
__device__ __forceinline__ void tile(float (*acc)[4][4], const u32* w, const uint4* xv, const u32 (*z)[2],
                                     const u32 (*sc)[2]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            u32 a[4];
#if KIND == 4
            const u32 q = w[2 * i + s];
#pragma unroll
            for (int r = 0; r < 4; ++r) {  // nibbles r and r + 4: the register's two inputs
                const u32 v = fma2(lop_or_and(q >> (4 * r), 0x000F000Fu, MAGIC4), ONE2, z[i][r & 1]);
                a[r] = SCALED ? mul2(v, sc[i][r & 1]) : v;
            }
#else
#pragma unroll
            for (int c = 0; c < 2; ++c) {  // word c: registers 2c (bytes 0, 1) and 2c + 1 (bytes 2, 3)
                const u32 q = w[4 * i + 2 * s + c];
#if KIND == 8
#pragma unroll
                for (int b = 0; b < 2; ++b) {  // 2**23 + q, exact; (q - z) * s is exact in float32
                    const float zf = __uint_as_float(z[i][b]);
                    const float m = SCALED ? __uint_as_float(sc[i][b]) : 1.f;
                    a[2 * c + b] = cvt2((__uint_as_float(prmt(q, 0x4B000000u, 0x7651u + 2 * b)) - zf) * m,
                                        (__uint_as_float(prmt(q, 0x4B000000u, 0x7650u + 2 * b)) - zf) * m);
                }
#else
#pragma unroll
                for (int b = 0; b < 2; ++b) {  // bytes 2b, 2b + 1 to bits 8..15 and 24..31, then a 16-bit float
                    const u32 v = prmt(q, 0u, b ? 0x3424u : 0x1404u);
                    const u32 f = (v & 0x80008000u) | ((v >> FP8_SHIFT) & FP8_MASK);
                    a[2 * c + b] = fma2(f, SCALED ? sc[i][b] : FP8_RESCALE, 0x80008000u);
                }
#endif
            }
#endif
#pragma unroll
            for (int h = 0; h < HALVES; ++h) {  // rows 0-7 of x, then 8-15
                const uint4 x = xv[h];
                mma(acc[h][i], a, s ? x.z : x.x, s ? x.w : x.y);
            }
        }
    }
}

__device__ __forceinline__ void fetch(const u32* w_tile, const u32* x0, const u32* x1, bool row0, bool row1,
                                      int kb, u32* wr, uint4* xv) {
    const uint4* wp = (const uint4*)(w_tile + kb * 32 * WORDS);
#pragma unroll
    for (int v = 0; v < WORDS / 4; ++v) {
        const uint4 q = load16(wp + v);
        wr[4 * v] = q.x; wr[4 * v + 1] = q.y; wr[4 * v + 2] = q.z; wr[4 * v + 3] = q.w;
    }
    xv[0] = row0 ? *(const uint4*)(x0 + kb * 16) : make_uint4(0, 0, 0, 0);
    if (HALVES == 2) xv[1] = row1 ? *(const uint4*)(x1 + kb * 16) : make_uint4(0, 0, 0, 0);
}

// A group's constants for this lane's 8 output rows (16i + g + 8b): minus (magic + zero), and the scale.
__device__ __forceinline__ void group_constants(const u16* __restrict__ zeros, const u16* __restrict__ scales,
                                                size_t row0, u32 (*z)[2], u32 (*sc)[2], float (*sf)[2]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const size_t n = row0 + 16 * i + 8 * b;
            const u16 s = scales[n];
            sf[i][b] = to_float(s);
#if KIND == 4
            const float zero = HAS_ZEROS ? to_float(zeros[n]) : 8.f;
#if BF16
            const u32 h = __float_as_uint(-128.f - zero) >> 16;  // minus (magic + zero), exact in bf16
#else
            const u32 h = round_half(-1024.f - zero);
#endif
            z[i][b] = h | (h << 16);
            sc[i][b] = (u32)s | ((u32)s << 16);
#elif KIND == 8
            const float zero = HAS_ZEROS ? to_float(zeros[n]) : 128.f;
            z[i][b] = __float_as_uint(8388608.f + zero);
            sc[i][b] = __float_as_uint(sf[i][b]);
#else
            z[i][b] = 0u;
            sc[i][b] = fma2((u32)s | ((u32)s << 16), FP8_RESCALE, 0x80008000u);  // exact: a power of two
#endif
        }
    }
}

// Tile kb: a new group's constants first, then the mma, then (unscaled) at a group's or the slice's end its scale.
__device__ __forceinline__ void step(float (*acc)[4][4], float (*part)[4][4], u32 (*z)[2], u32 (*sc)[2],
                                     float (*sf)[2], int& group_end, const u16* __restrict__ zeros,
                                     const u16* __restrict__ scales, int Np, int row, int group_tiles, int kb,
                                     int k1, const u32* wr, const uint4* xv) {
    if (kb == group_end) {  // the slice's first tile, or a group's: the one division per group
        const int group = kb / group_tiles;
        group_constants(zeros, scales, (size_t)group * Np + row, z, sc, sf);
        group_end = (group + 1) * group_tiles;
    }
    tile(SCALED ? acc : part, wr, xv, z, sc);
    if (!SCALED && (kb + 1 == group_end || kb + 1 == k1)) {
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) {  // c0, c1: row 16i + g; c2, c3: row 16i + g + 8
                    acc[h][i][c] += part[h][i][c] * sf[i][c >> 1];
                    part[h][i][c] = 0.f;
                }
    }
}

extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS) KERNEL_NAME(
        const u32* __restrict__ x, const u32* __restrict__ w, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, float* __restrict__ partials, int* __restrict__ counters,
        u16* __restrict__ y, int M, int N, int Np, int k_tiles, int tiles_per_split, int group_tiles,
        const long long* __restrict__ ids, int w_stride, int s_stride, int x_div) {
    __shared__ float sums[WARPS][16][65];  // +1: no bank conflicts between the rows
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#if ROUTED
    {  // blockIdx.z: one (token, choice) pair, one row of x times the chosen expert's matrix of the stack
        const int pair = blockIdx.z;
        const long long e = ids[pair];
        w += e * w_stride;  // int arguments (the launcher passes C ints), offsets in 64 bits
        scales += e * s_stride;
        if (HAS_ZEROS) zeros += e * s_stride;
        x += (size_t)(pair / x_div) * k_tiles * 16;  // a row of x: kp 16-bit values, 16 words a 32-input tile
        y += (size_t)pair * N;
    }
#endif
    const int nb = blockIdx.x, split = blockIdx.y;
    const int lo = split * tiles_per_split;
    const int hi = min(lo + tiles_per_split, k_tiles);
    const int per_warp = (hi - lo + WARPS - 1) / WARPS;
    const int k0 = lo + warp * per_warp, k1 = min(k0 + per_warp, hi);
    const int n0 = nb * 64;

    float acc[HALVES][4][4], part[HALVES][4][4];
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[h][i][c] = part[h][i][c] = 0.f;

    const int kp = k_tiles * 32;
    const bool row0 = g < M, row1 = g + 8 < M;
    const u32* w_tile = w + ((size_t)nb * k_tiles * 32 + lane) * WORDS;
    const u32* x0 = x + ((size_t)g * kp + 8 * t) / 2;
    const u32* x1 = x + ((size_t)(g + 8) * kp + 8 * t) / 2;
    u32 z[4][2], sc[4][2];
    float sf[4][2];
    int group_end = k0;  // the first tile reads its group's constants
    // STAGES tiles in registers: the loads of the next STAGES - 1 tiles are in flight while one is dequantized
    // and multiplied, so a warp keeps ~(STAGES - 1) KiB of int4 in flight: what the memory needs to stay busy.
    u32 wr[STAGES][WORDS];
    uint4 xv[STAGES][2];
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
        if (k0 + s < k1) fetch(w_tile, x0, x1, row0, row1, k0 + s, wr[s], xv[s]);
    for (int kb = k0; kb < k1; kb += STAGES) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {  // unrolled: every buffer index is a constant, the buffers stay registers
            if (kb + s < k1) {
                const int ahead = (s + STAGES - 1) % STAGES;
                if (kb + s + STAGES - 1 < k1)
                    fetch(w_tile, x0, x1, row0, row1, kb + s + STAGES - 1, wr[ahead], xv[ahead]);
                step(acc, part, z, sc, sf, group_end, zeros, scales, Np, n0 + g, group_tiles, kb + s, k1, wr[s],
                     xv[s]);
            }
        }
    }
    // acc[h][i]: c0, c1 at output 16i + g, rows 8h + 2t, + 1 of x; c2, c3 at output 16i + g + 8
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            sums[warp][8 * h + 2 * t][16 * i + g] = acc[h][i][0];
            sums[warp][8 * h + 2 * t + 1][16 * i + g] = acc[h][i][1];
            sums[warp][8 * h + 2 * t][16 * i + g + 8] = acc[h][i][2];
            sums[warp][8 * h + 2 * t + 1][16 * i + g + 8] = acc[h][i][3];
        }
    __syncthreads();
    const int splits = gridDim.y;
    __shared__ int last;
    for (int e = threadIdx.x; e < M * 64; e += 32 * WARPS) {  // warps added in warp order
        const int m = e >> 6, n = e & 63;
        float s = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) s += sums[v][m][n];
        if (splits == 1) {
            if (n0 + n < N) y[(size_t)m * N + n0 + n] = round_half(s);
        } else {
            partials[((size_t)split * M + m) * Np + n0 + n] = s;
        }
    }
    if (splits == 1) return;
    __threadfence();  // this block's partials are visible before its arrival is counted
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counters + nb, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int e = threadIdx.x; e < M * 64; e += 32 * WARPS) {  // the last block adds the splits in split order
        const int m = e >> 6, n = e & 63;
        float s = 0.f;
        for (int v = 0; v < splits; ++v) s += __ldcg(partials + ((size_t)v * M + m) * Np + n0 + n);
        if (n0 + n < N) y[(size_t)m * N + n0 + n] = round_half(s);
    }
    if (threadIdx.x == 0) counters[nb] = 0;  // ready for the next call, graph replays included
}
"""


@functools.cache
def _kernel(kind: PackKind, bf16: bool, has_zeros: bool, launch: Launch, halves: int, device: int,
            routed: bool = False):
    """The kernel for one launch shape; `halves`: x's rows fit one mma's 8 columns (1) or need two (2); `routed`:
    the grid's third dimension picks each block's expert and row of x (`raytp.kernels.routed_packed_gemv`)."""
    name = (f"packed_gemv_{kind.name}_{'bf16' if bf16 else 'f16'}_{'z' if has_zeros else 's'}_{launch.warps}"
            f"_{launch.stages}{'_scaled' if launch.scaled else ''}_{launch.min_blocks}_{halves}"
            f"{'_routed' if routed else ''}")
    defines = dict(KERNEL_NAME=name, KIND=kind.code, BF16=int(bf16),
                   HAS_ZEROS=int(has_zeros), WARPS=launch.warps, STAGES=launch.stages, SCALED=int(launch.scaled),
                   MIN_BLOCKS=launch.min_blocks, HALVES=halves, ROUTED=int(routed))
    source = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE
    with torch.cuda.device(device):  # a module is loaded into one device's context
        return torch.cuda._compile_kernel(source, name)


def runs_kernel(x: torch.Tensor, w: MMAPacked) -> bool:
    """Whether `mma_linear` runs the CUDA kernel for x (else dequantize, then one matmul): 1..MAX_ROWS rows of
    bfloat16 or float16 on CUDA, the layout's scales in the same dtype."""
    rows = x.numel() // x.shape[-1]
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.scales.dtype == x.dtype
            and 0 < rows <= MAX_ROWS)


def mma_linear(x: torch.Tensor, w: MMAPacked, launch: Launch | None = None) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N) in x's dtype. `launch` overrides the shape heuristic (the benchmark's sweep)."""
    if not runs_kernel(x, w):
        return mma_linear_torch(x, w)
    rows = x.numel() // x.shape[-1]
    kp, np_ = w.padded
    x2 = x.reshape(rows, x.shape[-1])
    x2 = physical_inputs(x2, w).contiguous() if (w.x_index is not None or kp != x.shape[-1]) else x2.contiguous()
    if x2.data_ptr() % 16:  # the kernel reads x in 16-byte vectors
        x2 = x2.clone()
    launch = _launch_of(w, launch)
    k_tiles = kp // TILE_K
    per_split = -(-k_tiles // launch.split)
    split = -(-k_tiles // per_split)
    n_blocks = np_ // TILE_N
    y = torch.empty((rows, w.out_features), dtype=x.dtype, device=x.device)
    partials, counters = WORKSPACE.get(x.device, split * rows * np_ if split > 1 else 0, n_blocks)
    if launch.scaled and not w.foldable:
        launch = dataclasses.replace(launch, scaled=False)
    kernel = _kernel(w.kind, x.dtype == torch.bfloat16, w.zeros is not None, launch.split_free(),
                     1 if rows <= 8 else 2, _device_index(x.device))
    kernel(grid=(n_blocks, split, 1), block=(32 * launch.warps, 1, 1),
           args=[x2, w.values, w.scales, w.zeros if w.zeros is not None else w.scales, partials, counters, y,
                 rows, w.out_features, np_, k_tiles, per_split, w.group_tiles, counters, 0, 0, 1])
    return y.view(*x.shape[:-1], w.out_features)
