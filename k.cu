#define KERNEL_NAME k
#define KIND 4
#define BF16 1
#define HAS_ZEROS 0
#define WARPS 8
#define STAGES 2
#define SCALED 0
#define MIN_BLOCKS 1
#define HALVES 2

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
        u16* __restrict__ y, int M, int N, int Np, int k_tiles, int tiles_per_split, int group_tiles) {
    __shared__ float sums[WARPS][16][65];  // +1: no bank conflicts between the rows
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
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
