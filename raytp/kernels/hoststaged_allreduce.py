"""GPU kernel of the host-staged all-reduce: partial sums meet in mapped host memory, no CPU in the loop.

The node's shared-memory segment is registered with cudaHostRegister (portable | mapped), so every GPU of
the node reads and writes it directly over PCIe. Each thread block owns one chunk of the message and runs
the protocol of raytp/comm/hoststaged.py for that chunk alone:

  1. seq = ++counter[block]            (device memory: a graph replay cannot change kernel arguments,
                                        and every rank launches the same blocks in the same order)
  2. write my chunk into my slot of bank seq % 2 (bf16 on the wire for bf16 models, else float32)
  3. __threadfence_system(); flag[rank][block] = seq
  4. spin until flag[r][block] >= seq for every rank r (thread r polls rank r), with __nanosleep back-off
  5. sum the chunk over ranks 0..W-1 in that order, accumulating in float32: identical bits everywhere

No block waits for another block, so the grid may be any size. Slots are laid out in bytes and a block's
chunk is CHUNK_BYTES whatever the dtype, so block b always uses the same bytes of each slot: the two-bank
argument holds per block even when messages of different sizes and dtypes follow each other. A rank that
never arrives makes the waiting blocks give up after `max_spins` polls and set the error word: the caller
raises, the GPU is freed.
Compiled at run time with NVRTC (torch.cuda._compile_kernel): no build step, no extra dependency.
"""

from __future__ import annotations

import functools

import torch

THREADS = 256
# Bytes per block: a bf16 decode message of 4096-8192 elements is 1-2 blocks. Measured on 4x H200 inside a
# graph, finer parts (one 16-byte vector per thread, 2 KiB per block) did not pay: 38 -> 32 us at 4096 bf16
# elements but 185 -> 376 us at 65536, as more blocks poll their flags over PCIe.
CHUNK_BYTES = 8192

_SOURCE = r"""
typedef unsigned short bf16_t;

__device__ __forceinline__ float wire_to_float(float v) { return v; }
__device__ __forceinline__ float wire_to_float(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ void float_to(float v, float* p) { *p = v; }
__device__ __forceinline__ bf16_t round_bf16(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                 // round to nearest even
}
__device__ __forceinline__ void float_to(float v, bf16_t* p) { *p = round_bf16(v); }

extern "C" __global__ void KERNEL_NAME(
        const T* __restrict__ x, T* __restrict__ out, volatile T* slots, volatile int* flags,
        int* counters, volatile int* error, int n, int slot_elems, int rank, int world, int max_blocks,
        int max_spins) {
    __shared__ int s_seq;
    const int block = blockIdx.x;
    if (threadIdx.x == 0) s_seq = ++counters[block];
    __syncthreads();
    const int seq = s_seq;
    const int bank = seq & 1;
    const int chunk = CHUNK_BYTES / sizeof(T);
    const int start = block * chunk;
    const int stop = min(n, start + chunk);
    volatile T* mine = slots + (long long)(bank * world + rank) * slot_elems;
    for (int i = start + threadIdx.x; i < stop; i += blockDim.x) mine[i] = x[i];
    __threadfence_system();  // my chunk is visible to every GPU and CPU before my flag is
    __syncthreads();
    if (threadIdx.x == 0) flags[rank * max_blocks + block] = seq;
    if (threadIdx.x < world) {
        volatile int* flag = flags + threadIdx.x * max_blocks + block;
        int spins = 0;
        while (*flag < seq) {
            if (++spins > max_spins || *error) { *error = 1; break; }
            __nanosleep(64);
        }
    }
    __syncthreads();
    __threadfence_system();
    if (*error) return;
    for (int i = start + threadIdx.x; i < stop; i += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < world; ++r)  // fixed order: the same bits on every rank
            acc += wire_to_float(slots[(long long)(bank * world + r) * slot_elems + i]);
        float_to(acc, out + i);
    }
}
"""

CTYPES = {torch.float32: "float", torch.bfloat16: "bf16_t"}


@functools.cache
def _kernel(dtype: torch.dtype):
    name = f"hoststaged_allreduce_{CTYPES[dtype]}"
    source = (f"#define T {CTYPES[dtype]}\n#define KERNEL_NAME {name}\n#define CHUNK_BYTES {CHUNK_BYTES}\n"
              + _SOURCE)
    return torch.cuda._compile_kernel(source, name)


def blocks_for(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Blocks for an n-element message (the default, the widest dtype on the wire, gives the most)."""
    return max(1, -(-n * dtype.itemsize // CHUNK_BYTES))


def launch(x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, flags: torch.Tensor, counters: torch.Tensor,
           error: torch.Tensor, *, rank: int, world: int, slot_bytes: int, max_blocks: int, max_spins: int) -> None:
    """out = sum over ranks of x (flat, contiguous, float32 or bfloat16), on the current stream."""
    n = x.numel()
    slot_elems = slot_bytes // x.element_size()
    _kernel(x.dtype)(grid=(blocks_for(n, x.dtype), 1, 1), block=(THREADS, 1, 1),
                     args=[x, out, slots, flags, counters, error, n, slot_elems, rank, world, max_blocks,
                           max_spins])
