"""GPU kernels of the P2P all-reduce: the GPUs of one node write into each other's memory (NVLink or PCIe P2P).

Every rank holds one buffer of the same `Layout`, mapped into every peer by torch's symmetric memory
(raytp/parallel/comm/p2p.py), and a table of all ranks' buffer addresses in its own address space. Data is pushed:
a rank writes into its peers' buffers (remote writes are posted, they wait for no round trip) and then waits on
flags in its own memory. Both kernels follow the protocol of raytp/kernels/hoststaged_allreduce.py per block:

one-shot (decode sizes; block b owns bytes [b * ONE_CHUNK, (b + 1) * ONE_CHUNK) of the message)
  1. seq = ++counter[b]            (device memory: graph replays cannot change kernel arguments)
  2. write my chunk into slot [seq % 2][my rank] of every rank's buffer
  3. __threadfence_system(); flag[my rank][b] = seq in every rank's buffer
  4. wait until my own flag[r][b] reached seq, for every rank r (thread r waits for rank r)
  5. sum slots [seq % 2][0..W-1] of my own buffer in rank order, in float32: identical bits on every rank
two-shot (larger messages; block b's chunk is summed by rank b % W, its owner)
  1-3. as above, but my chunk goes only to the owner's staging slot, and only the owner's flag is raised
  4. the owner waits for every rank, sums in rank order (float32), writes the sum into its output and into the
     result slot [seq % 2] of every other rank, then raises their done[b] = seq
  5. every other rank waits for done[b] and copies its result slot into its output: the owner's bits

Two banks alternate by seq parity: for a given block a rank is at most one call ahead of any peer (it cannot
finish call s + 1 before every peer has arrived at s + 1, which each does only after finishing s), so it never
writes a slot that a peer is still reading. A block always owns the same bytes of a slot, so messages of mixed
sizes and dtypes may follow each other. "Reached" means seq or later (a peer one call ahead may already have
raised seq + 1), compared modulo 2**32 so the counters may wrap. A rank that never arrives: the waiting threads
give up after `timeout_us`, set the error word (pinned host memory: the host reads it without synchronizing, and
`abort` can set it) and the kernel returns. Compiled at run time with NVRTC, like the host-staged kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

VECTOR = 16  # bytes each thread moves per access: messages must be whole vectors, 16-byte aligned
ONE_CHUNK, ONE_THREADS = 2048, 128  # one 16-byte vector per thread; 4 blocks at 4096 bf16 elements, 8 at 8192
TWO_CHUNK, TWO_THREADS = 16384, 256
ONE_MAX_BYTES = 128 << 10  # larger messages take the two-shot kernel, faster beyond 64-128 KiB over NVLink
TWO_MAX_BYTES = 2 << 20  # per two-shot launch; larger messages take several launches
LINE = 128

_SOURCE = r"""
typedef unsigned short bf16_t;
#define VEC (16 / sizeof(T))

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ void from_float(float v, float* p) { *p = v; }
__device__ __forceinline__ void from_float(float v, bf16_t* p) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *p = (bf16_t)((u >> 16) | 0x40); return; }  // NaN stays NaN
    *p = (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                          // round to nearest even
}

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ char* buffer_of(const long long* peers, int r) { return (char*)peers[r]; }

// Threads 0..count-1 wait until flags[thread * stride] reached seq. False (and the error word set) if one gave up.
__device__ bool wait_flags(volatile unsigned* flags, int stride, int count, unsigned seq, volatile int* error,
                           int timeout_us) {
    __shared__ int s_failed;
    if (threadIdx.x == 0) s_failed = 0;
    __syncthreads();
    if (threadIdx.x < count) {
        volatile unsigned* flag = flags + threadIdx.x * stride;
        unsigned long long deadline = 0;
        for (unsigned polls = 1; (int)(*flag - seq) < 0; ++polls) {
            if ((polls & 255) == 0) {  // the clock and the host word are slow to read: not on every poll
                unsigned long long t = now_ns();
                if (deadline == 0) deadline = t + 1000ull * timeout_us;
                if (*error || t > deadline) { *error = 1; s_failed = 1; break; }
            }
        }
    }
    __syncthreads();
    __threadfence_system();  // what the peers wrote before their flags is visible from here on
    return !s_failed;
}

__device__ __forceinline__ void add(float* acc, uint4 v) {
    const T* e = reinterpret_cast<const T*>(&v);
    #pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += to_float(e[k]);
}

__device__ __forceinline__ void start(float* acc, uint4 v) {
    const T* e = reinterpret_cast<const T*>(&v);
    #pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = to_float(e[k]);
}

__device__ __forceinline__ uint4 pack(const float* acc) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
    #pragma unroll
    for (int k = 0; k < VEC; ++k) from_float(acc[k], e + k);
    return v;
}

// Sum of `world` slots `slot_bytes` apart at byte offset `at`, in rank order.
__device__ __forceinline__ uint4 sum_slots(const char* slots, long long slot_bytes, int world, long long at) {
    float acc[VEC];
    start(acc, __ldcv(reinterpret_cast<const uint4*>(slots + at)));
    for (int r = 1; r < world; ++r) add(acc, __ldcv(reinterpret_cast<const uint4*>(slots + r * slot_bytes + at)));
    return pack(acc);
}

extern "C" __global__ void ONE_NAME(
        const T* x, T* out, const long long* peers, unsigned* counters, volatile int* error, int n, int rank,
        int world, int flags_off, int slots_off, int slot_bytes, int max_blocks, int timeout_us) {
    __shared__ unsigned s_seq;
    const int b = blockIdx.x;
    if (threadIdx.x == 0) s_seq = ++counters[b];
    __syncthreads();
    const unsigned seq = s_seq;
    const long long bank = (seq & 1) * (long long)world * slot_bytes;
    const int first = b * (ONE_CHUNK / sizeof(T)), stop = min(n, first + (int)(ONE_CHUNK / sizeof(T)));
    for (int i = first + threadIdx.x * VEC; i < stop; i += blockDim.x * VEC) {
        const uint4 v = *reinterpret_cast<const uint4*>(x + i);
        const long long at = slots_off + bank + (long long)rank * slot_bytes + (long long)i * sizeof(T);
        for (int k = 0; k < world; ++k)  // staggered, so that not every rank writes to rank 0 first
            *reinterpret_cast<uint4*>(buffer_of(peers, (rank + k) % world) + at) = v;
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x < world)
        ((volatile unsigned*)(buffer_of(peers, threadIdx.x) + flags_off))[rank * max_blocks + b] = seq;
    char* mine = buffer_of(peers, rank);
    if (!wait_flags((volatile unsigned*)(mine + flags_off) + b, max_blocks, world, seq, error, timeout_us)) return;
    for (int i = first + threadIdx.x * VEC; i < stop; i += blockDim.x * VEC)
        *reinterpret_cast<uint4*>(out + i) = sum_slots(mine + slots_off + bank, slot_bytes, world,
                                                       (long long)i * sizeof(T));
}

extern "C" __global__ void TWO_NAME(
        const T* x, T* out, const long long* peers, unsigned* counters, volatile int* error, int n, int rank,
        int world, int arrive_off, int done_off, int stage_off, int result_off, int slot_bytes, int max_blocks,
        int timeout_us) {
    __shared__ unsigned s_seq;
    const int b = blockIdx.x;
    if (threadIdx.x == 0) s_seq = ++counters[b];
    __syncthreads();
    const unsigned seq = s_seq;
    const int parity = seq & 1;
    const int owner = b % world;
    const int first = b * (TWO_CHUNK / sizeof(T)), stop = min(n, first + (int)(TWO_CHUNK / sizeof(T)));
    char* mine = buffer_of(peers, rank);
    char* stage = buffer_of(peers, owner) + stage_off + (long long)(parity * world + rank) * slot_bytes;
    for (int i = first + threadIdx.x * VEC; i < stop; i += blockDim.x * VEC)
        *reinterpret_cast<uint4*>(stage + (long long)i * sizeof(T)) = *reinterpret_cast<const uint4*>(x + i);
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0)
        ((volatile unsigned*)(buffer_of(peers, owner) + arrive_off))[rank * max_blocks + b] = seq;
    const long long result = result_off + (long long)parity * slot_bytes;
    if (rank == owner) {
        if (!wait_flags((volatile unsigned*)(mine + arrive_off) + b, max_blocks, world, seq, error, timeout_us))
            return;
        const char* slots = mine + stage_off + (long long)parity * world * slot_bytes;
        for (int i = first + threadIdx.x * VEC; i < stop; i += blockDim.x * VEC) {
            const long long at = (long long)i * sizeof(T);
            const uint4 v = sum_slots(slots, slot_bytes, world, at);
            *reinterpret_cast<uint4*>(out + i) = v;
            for (int k = 1; k < world; ++k)
                *reinterpret_cast<uint4*>(buffer_of(peers, (rank + k) % world) + result + at) = v;
        }
        __threadfence_system();
        __syncthreads();
        if (threadIdx.x < world && threadIdx.x != rank)
            ((volatile unsigned*)(buffer_of(peers, threadIdx.x) + done_off))[b] = seq;
    } else {
        if (!wait_flags((volatile unsigned*)(mine + done_off) + b, 0, 1, seq, error, timeout_us)) return;
        for (int i = first + threadIdx.x * VEC; i < stop; i += blockDim.x * VEC)
            *reinterpret_cast<uint4*>(out + i) =
                __ldcv(reinterpret_cast<const uint4*>(mine + result + (long long)i * sizeof(T)));
    }
}
"""

CTYPES = {torch.float32: "float", torch.bfloat16: "bf16_t"}


def _align(n: int) -> int:
    return -(-n // LINE) * LINE


@dataclass(frozen=True)
class Layout:
    """Byte offsets inside every rank's buffer, the same on all ranks of a `world`."""

    world: int

    @property
    def one_blocks(self) -> int:
        return ONE_MAX_BYTES // ONE_CHUNK

    @property
    def two_blocks(self) -> int:
        return TWO_MAX_BYTES // TWO_CHUNK

    @property
    def one_flags(self) -> int:  # [world][one_blocks] unsigned
        return 0

    @property
    def arrive(self) -> int:  # [world][two_blocks] unsigned
        return _align(self.one_flags + 4 * self.world * self.one_blocks)

    @property
    def done(self) -> int:  # [two_blocks] unsigned
        return _align(self.arrive + 4 * self.world * self.two_blocks)

    @property
    def one_slots(self) -> int:  # [2][world][ONE_MAX_BYTES]
        return _align(self.done + 4 * self.two_blocks)

    @property
    def stage(self) -> int:  # [2][world][TWO_MAX_BYTES]
        return self.one_slots + 2 * self.world * ONE_MAX_BYTES

    @property
    def result(self) -> int:  # [2][TWO_MAX_BYTES]
        return self.stage + 2 * self.world * TWO_MAX_BYTES

    @property
    def nbytes(self) -> int:
        return self.result + 2 * TWO_MAX_BYTES


def fits(t: torch.Tensor) -> bool:
    """Whether the kernels take `t`: float32 or bfloat16, contiguous, whole 16-byte vectors, 16-byte aligned."""
    return (t.dtype in CTYPES and t.is_contiguous() and (t.numel() * t.element_size()) % VECTOR == 0
            and t.data_ptr() % VECTOR == 0)


@functools.cache
def _kernels(dtype: torch.dtype, device_index: int):
    """(one-shot, two-shot) for `dtype`, loaded into `device_index`'s context (NVRTC modules are per context)."""
    with torch.cuda.device(device_index):
        base = f"p2p_allreduce_{CTYPES[dtype]}"
        source = (f"#define T {CTYPES[dtype]}\n#define ONE_NAME {base}_one\n#define TWO_NAME {base}_two\n"
                  f"#define ONE_CHUNK {ONE_CHUNK}\n#define TWO_CHUNK {TWO_CHUNK}\n" + _SOURCE)
        return (torch.cuda._compile_kernel(source, f"{base}_one"), torch.cuda._compile_kernel(source, f"{base}_two"))


def launch(t: torch.Tensor, peers: torch.Tensor, counters: torch.Tensor, error: torch.Tensor, *, rank: int,
           world: int, layout: Layout, timeout_us: int) -> None:
    """t = sum over ranks of t, in place, on the current stream (`fits(t)` must hold). `counters` is int32
    [2, max(layout.one_blocks, layout.two_blocks)] in device memory, zero on every rank before the first call."""
    one, two = _kernels(t.dtype, t.device.index)
    flat = t.view(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes <= ONE_MAX_BYTES:
        one(grid=(-(-nbytes // ONE_CHUNK), 1, 1), block=(ONE_THREADS, 1, 1),
            args=[flat, flat, peers, counters[0], error, flat.numel(), rank, world, layout.one_flags,
                  layout.one_slots, ONE_MAX_BYTES, layout.one_blocks, timeout_us])
        return
    step = TWO_MAX_BYTES // flat.element_size()
    for first in range(0, flat.numel(), step):
        piece = flat[first : first + step]
        blocks = -(-piece.numel() * piece.element_size() // TWO_CHUNK)
        two(grid=(blocks, 1, 1), block=(TWO_THREADS, 1, 1),
            args=[piece, piece, peers, counters[1], error, piece.numel(), rank, world, layout.arrive, layout.done,
                  layout.stage, layout.result, TWO_MAX_BYTES, layout.two_blocks, timeout_us])
