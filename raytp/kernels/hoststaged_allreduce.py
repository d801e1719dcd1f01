"""GPU kernel of the host-staged all-reduce: partial sums meet in mapped host memory, no CPU in the loop.

The node's shared-memory segment is registered with cudaHostRegister (portable | mapped), so every GPU of
the node reads and writes it directly over PCIe. A message (a whole number of 16-byte vectors) is cut into
chunks of `chunk_bytes`, one vector per thread of a block; each chunk runs the protocol of
raytp/parallel/comm/hoststaged.py on its own:

  1. seq = counter[chunk] + 1          (device memory: a graph replay cannot change kernel arguments,
                                        and every rank launches the same chunks in the same order)
  2. load my vector of the chunk (16 bytes) and store it into my cell of bank seq % 2
  3. one fence for the block, then the cell's flag = seq (the flag sits in the line after the cell's data)
  4. one thread per peer polls that peer's flag of the same cell until it holds seq: spinning first, then
     sleeping (see wait_flag)
  5. load every peer's vector at once (uncached: they change under us) and sum over ranks 0..W-1 in that
     order, my own vector taken from registers, accumulating in float32: identical bits on every rank

Every byte crosses PCIe once per reader, and nothing waits for another chunk, so the grid may be any size; a
block that owns several chunks (messages over GRID_CAP chunks) publishes all of them before it waits for any.
The flag is the sequence number itself, compared for equality: no reset pass, and it survives the 32-bit
wrap. Cells are laid out in bytes, so chunk c always uses the same bytes whatever the dtype: the two-bank
argument holds per chunk even when messages of different sizes and dtypes follow each other. A rank that
never arrives makes its peers give up after `timeout_us` and set the error word at the head of the segment,
which every rank's kernel also checks while it sleeps: the caller raises CommError, the GPU is freed.
Compiled at run time with NVRTC (torch.cuda._compile_kernel): no build step, no extra dependency.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

VECTOR = 16  # bytes per thread per chunk: one 128-bit load or store
LINE = 64  # a flag gets a cache line of its own: the host never merges it with a neighbour's write
# 256 threads; 8192 bf16 elements are 4 chunks, each on its own SM. Smaller chunks save half a microsecond on
# decode-sized messages but cost more than they save at 65536 elements, and with them some graph replays take
# 20-80 us instead of ~10: this size is steady over replays.
DEFAULT_CHUNK_BYTES = 4096
# At most this many blocks per launch (messages over 32 chunks, 65536 bf16 elements, give a block several: at 64
# blocks, and at 32 of 64 threads, replays turn slow as above), and registers capped so that RESIDENT_THREADS_PER_SM
# threads of the kernel fit on an SM (it needs ~85: eight peers' vectors in flight): 8 ranks sharing one GPU in
# one process keep all their blocks resident (8 x 32 blocks of 256 threads = 2 per SM on 132 SMs), so none waits
# for an SM that a spinning peer holds.
GRID_CAP = 32
RESIDENT_THREADS_PER_SM = 512
SPIN_NS = 30_000  # poll without pause this long: a peer in lock-step arrives within microseconds
MAX_NAP_NS = 100_000  # the longest sleep between polls: how late a long-awaited peer is noticed at most

CTYPES = {torch.float32: "float", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class SegmentLayout:
    """Where each rank's data and flags live in the registered segment (byte offsets from its start).

        [error word, one line][rank 0: bank 0 cells 0..C-1, bank 1 cells 0..C-1][rank 1: ...] ...
        cell = [chunk_bytes of data][one line holding the flag]

    A rank writes only its own region; a peer reads a cell's flag, then the data just before it."""

    world: int
    max_bytes: int  # the largest message of one launch
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self):
        if self.chunk_bytes % LINE or not LINE <= self.chunk_bytes <= 1024 * VECTOR:
            raise ValueError(f"chunk_bytes={self.chunk_bytes}: use a multiple of {LINE} from {LINE} to "
                             f"{1024 * VECTOR} (one {VECTOR}-byte vector per thread, at most 1024 threads)")
        if self.world > self.threads:
            raise ValueError(f"the GPU host-staged kernel polls one rank per thread: {self.world} ranks need "
                             f"chunk_bytes >= {self.world * VECTOR}, not {self.chunk_bytes}")

    @property
    def threads(self) -> int:
        return self.chunk_bytes // VECTOR

    @property
    def chunks(self) -> int:
        """Cells per bank: chunks of the largest message."""
        return max(1, -(-self.max_bytes // self.chunk_bytes))

    @property
    def cell_bytes(self) -> int:
        return self.chunk_bytes + LINE

    @property
    def size(self) -> int:
        return LINE + self.world * 2 * self.chunks * self.cell_bytes

    def cell(self, rank: int, bank: int, chunk: int) -> int:
        """Offset of the data of `rank`'s cell for `chunk` in `bank`; its flag is at + chunk_bytes."""
        return LINE + ((rank * 2 + bank) * self.chunks + chunk) * self.cell_bytes


_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
struct alignas(16) Vec { u32 w[4]; };

#if ELEM_BYTES == 2
#define ELEMS 8
#else
#define ELEMS 4
#endif
#define GROUP 8  // peers' vectors in flight before the first is added

__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ u32 load_acquire(const char* p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// `peer`: host memory a peer wrote, loaded uncached (.cv) so that no stale copy of an earlier step is used.
__device__ __forceinline__ Vec load_vec(const char* p, bool peer) {
    Vec v;
    if (peer)
        asm volatile("ld.global.cv.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p) : "memory");
    else
        v = *(const Vec*)p;
    return v;
}

__device__ __forceinline__ void add(float* acc, const Vec& v) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#if ELEM_BYTES == 2
        acc[2 * k] += __uint_as_float(v.w[k] << 16);
        acc[2 * k + 1] += __uint_as_float(v.w[k] & 0xffff0000u);
#else
        acc[k] += __uint_as_float(v.w[k]);
#endif
    }
}
__device__ __forceinline__ u32 round_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40;  // NaN stays NaN
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                   // round to nearest even
}
__device__ __forceinline__ Vec pack(const float* acc) {
    Vec v;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#if ELEM_BYTES == 2
        v.w[k] = round_bf16(acc[2 * k]) | (round_bf16(acc[2 * k + 1]) << 16);
#else
        v.w[k] = __float_as_uint(acc[k]);
#endif
    }
    return v;
}

// Poll a peer's flag until it holds seq. Spin for SPIN_NS (each poll is a PCIe round trip, ~1 us), then
// sleep between polls, each nap an eighth of the time waited so far up to MAX_NAP_NS: a GPU waiting for a slow
// or idle peer issues few reads, leaves its SM to co-resident work, and notices the peer at most ~12% late.
__device__ bool wait_flag(const char* flag, u32 seq, volatile u32* error, int timeout_us) {
    if (load_acquire(flag) == seq) return true;
    const u64 start = now_ns();
    for (;;) {
        if (load_acquire(flag) == seq) return true;
        const u64 waited = now_ns() - start;
        if (waited < SPIN_NS) continue;
        if (*error) return false;  // a peer timed out or the host aborted the group
        if (waited > (u64)timeout_us * 1000) { *error = 1; return false; }
        __nanosleep((u32)min(waited / 8, (u64)MAX_NAP_NS));
    }
}

extern "C" __global__ void __launch_bounds__(CHUNK_BYTES / 16, MIN_BLOCKS_PER_SM) KERNEL_NAME(
        const char* x, char* out, char* seg, u32* counters, int nbytes, int rank, int world, int chunks,
        int timeout_us) {
    volatile u32* error = (volatile u32*)seg;
    char* cells = seg + LINE;
    const long long cell_bytes = CHUNK_BYTES + LINE;
    const int n_chunks = (nbytes + CHUNK_BYTES - 1) / CHUNK_BYTES;
    const int t = threadIdx.x;
    __shared__ int s_failed;
    if (t == 0) s_failed = 0;

    // publish: my vectors of every chunk of this block, then one fence, then the flags
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const u32 seq = counters[c] + 1;
        const int off = c * CHUNK_BYTES + t * 16;
        char* mine = cells + ((rank * 2 + (seq & 1)) * chunks + c) * cell_bytes;
        if (off < nbytes) *(Vec*)(mine + t * 16) = load_vec(x + off, false);
    }
    __syncthreads();
    if (t == 0) {
        __threadfence_system();  // every thread's data (ordered before it by the barrier) is visible first
        for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
            const u32 seq = counters[c] + 1;
            *(volatile u32*)(cells + ((rank * 2 + (seq & 1)) * chunks + c) * cell_bytes + CHUNK_BYTES) = seq;
        }
    }

    // wait for the peers of each chunk, then sum it in rank order
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const u32 seq = counters[c] + 1;
        const int bank = seq & 1;
        if (t < world && t != rank && !s_failed &&
            !wait_flag(cells + ((t * 2 + bank) * chunks + c) * cell_bytes + CHUNK_BYTES, seq, error, timeout_us))
            s_failed = 1;
        __syncthreads();  // orders every thread's loads after the pollers' acquire
        if (t == 0) counters[c] = seq;
        const int off = c * CHUNK_BYTES + t * 16;
        if (s_failed || off >= nbytes) continue;  // on failure the caller raises; no thread leaves the barriers
        const Vec own = load_vec(x + off, false);
        float acc[ELEMS];
#pragma unroll
        for (int k = 0; k < ELEMS; ++k) acc[k] = -0.0f;  // -0 + v == v bit for bit, so acc starts as rank 0's value
        for (int r0 = 0; r0 < world; r0 += GROUP) {
            Vec v[GROUP];
#pragma unroll
            for (int j = 0; j < GROUP; ++j) {
                const int r = r0 + j;
                if (r == rank) v[j] = own;
                else if (r < world)
                    v[j] = load_vec(cells + ((r * 2 + bank) * chunks + c) * cell_bytes + t * 16, true);
            }
#pragma unroll
            for (int j = 0; j < GROUP; ++j)  // fixed order: the same bits on every rank
                if (r0 + j < world) add(acc, v[j]);
        }
        *(Vec*)(out + off) = pack(acc);
    }
}
"""


@functools.cache
def _kernel(dtype: torch.dtype, chunk_bytes: int, device: int):
    name = f"hoststaged_allreduce_{CTYPES[dtype]}_{chunk_bytes}"
    defines = dict(KERNEL_NAME=name, ELEM_BYTES=dtype.itemsize, CHUNK_BYTES=chunk_bytes, LINE=LINE,
                   MIN_BLOCKS_PER_SM=max(1, RESIDENT_THREADS_PER_SM // (chunk_bytes // VECTOR)),
                   SPIN_NS=f"{SPIN_NS}ull", MAX_NAP_NS=f"{MAX_NAP_NS}ull")
    source = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE
    with torch.cuda.device(device):  # a module is loaded into one device's context
        return torch.cuda._compile_kernel(source, name)


@functools.cache
def _sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def resident_share(device: int, layout: SegmentLayout) -> int:
    """Blocks per launch such that every rank's blocks are resident at once even if all `world` ranks share this
    GPU from one process (a block spins until its peers' blocks have written: one that waits for an SM a spinning
    peer holds never runs, and the peers time out, as 8 or 12 ranks sharing one GPU can). One block's worth is
    kept spare. At 8 ranks or fewer on a 132-SM GPU this is above GRID_CAP: no change where ranks have GPUs."""
    per_sm = max(1, RESIDENT_THREADS_PER_SM // layout.threads)
    return max(1, _sms(device) * per_sm // (layout.world + 1))


def launch(x: torch.Tensor, out: torch.Tensor, segment: torch.Tensor, counters: torch.Tensor,
           layout: SegmentLayout, *, rank: int, timeout_us: int) -> None:
    """out = sum over ranks of x (flat, contiguous, float32 or bfloat16, 16-byte aligned and a whole number of
    16-byte vectors) on the current stream.

    `segment`: the registered segment as uint8; `counters`: int32 [layout.chunks] on x's device, zero at start."""
    nbytes = x.numel() * x.element_size()
    assert 0 < nbytes <= layout.max_bytes and nbytes % VECTOR == 0
    assert x.data_ptr() % VECTOR == 0 and out.data_ptr() % VECTOR == 0
    blocks = min(-(-nbytes // layout.chunk_bytes), GRID_CAP, resident_share(x.device.index, layout))
    _kernel(x.dtype, layout.chunk_bytes, x.device.index)(
        grid=(blocks, 1, 1), block=(layout.threads, 1, 1),
        args=[x, out, segment, counters, nbytes, rank, layout.world, layout.chunks, timeout_us])
