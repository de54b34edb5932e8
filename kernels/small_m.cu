// small_m.cu: the decoding forward, m ≤ 16 tokens through an unmerged adapter, in two launches:
//
//   small_m            partial[z] = X·[W0; A]ᵀ over the k range of split z (f32), on tensor cores
//   small_m_finalize   T = round(Σ_z partial_T[z]),  Y = round(Σ_z partial_Y[z] + s·T·Bᵀ (+ bias))
//
// At m ≤ 16 the layer is bound by reading W0 (n × k) once; a 128-row GEMM tile would be mostly padding
// and T = X·Aᵀ is too small to fill the GPU on its own. So T rides along with W0: A's r rows are extra
// rows below W0's n ("[W0; A]"), streamed by the same warps, and nothing runs before this kernel.
//
// small_m: the rows are cut into 16-row tiles, 2 tiles per block of 8 warps; the 4 warps of a tile split
// the block's k range in 32-wide steps (warp p takes steps p, p+4, ...). Per step a lane loads one 16-byte
// vector from each of its two rows (g and g+8, g = lane/4) at k offset 8·(lane%4), two steps per loop
// iteration so 4 independent 16-byte loads are in flight per lane, and feeds them straight to
// mma.m16n8k16 as the A operand, rows of W0 being the mma's m and the tokens its n (two n8 tiles): a
// reduction may take its k in any order as long as both operands agree, so the 8 consecutive elements
// of a lane's vector stand for mma columns {2t, 2t+1, 2t+8, 2t+9} of two k16 steps, and the lane reads
// the same 8 elements of X (tokens g and g+8) from shared memory. X's slice for the block (≤ 16 × 1024)
// is staged once with cp.async; its row pitch (1056 elements ≡ 64 bytes mod 128) puts the 16-byte reads
// of each 8-lane phase on distinct banks. The four warps' sums are added in shared memory in warp
// order, and the block writes its f32 sums for the 32 rows × m tokens to partial[z].
//
// The k range is split over blocks (grid y) only as far as needed to fill a large GPU and to fit X's
// slice in shared memory; the split depends on the shape alone (src/ops/launch.rs small_m_splits), and
// every sum runs in a fixed order (mma k steps ascending per warp, warps 0..3, splits 0..S-1): the same
// bits on every run. Rows, tokens and k past the ends are zero-filled; an operand whose base is not
// 16-byte aligned or whose k is not a multiple of 8 (flags) takes the element-wise path of the same
// kernel (VEC = false), chosen once at entry, never inside the loop.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kMaxM = LK_SMALL_M_MAX;   // tokens: two n8 tiles of the mma
constexpr int kTiles = LK_SMALL_M_TILES;  // 16-row tiles per block
constexpr int kParts = 4;                 // warps per tile, splitting the block's k range
constexpr int kWarps = kTiles * kParts;
constexpr int kThreads = 32 * kWarps;
constexpr int kStep = LK_SMALL_M_KSTEP;   // k per warp step: 4 lanes × 8 elements
constexpr int kSpan = LK_SMALL_M_KSPAN;   // the most k one block covers (X's slice in shared memory)
constexpr int kXPitch = kSpan + 32;       // ≡ 64 bytes mod 128 (see above)
constexpr int kUnroll = 2;                // steps per loop iteration: 2 rows × 2 = 4 loads in flight
static_assert(kMaxM == 16 && kStep == 32 && kSpan % kStep == 0, "the mma mapping assumes these");
static_assert(kThreads == LK_SIMT_THREADS, "small_m's block must match the launch geometry in lora_params.h");
static_assert((kXPitch * 2) % 128 == 64, "X's pitch must alternate bank halves between rows");

// 8 consecutive elements of `row` from column `col` as raw bits; zero where !ok or at/after `end`.
// VEC: one 16-byte load (legal: the caller guarantees alignment, and `end` is a multiple of 8).
template <bool VEC, typename T>
__device__ __forceinline__ uint4 load8(const T* row, uint32_t col, uint32_t end, bool ok) {
    uint4 v = {0u, 0u, 0u, 0u};
    if (VEC) {
        if (ok && col < end) v = *lk_vec<uint4>(row + col);
    } else {
        uint16_t* e = reinterpret_cast<uint16_t*>(&v);
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i)
            if (ok && col + i < end) e[i] = lk_bits16(&row[col + i]);
    }
    return v;
}

// One mma from loose registers (the fragments are assembled from 16-byte loads, see above).
template <typename T>
__device__ __forceinline__ void mma(float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    lk_mma_m16n8k16<T>(d, a, b);
}

// xs: X's slice, [kMaxM][kXPitch]; red: the warps' sums, [kWarps][32][kRedPitch] (odd pitch: the
// reads of the final sums spread over the banks).
constexpr int kRedPitch = 9;
template <bool VEC, typename T>
__device__ __forceinline__ void small_m_impl(const LkSmallMParams& p, T (*xs)[kXPitch], float (*red)[32][kRedPitch]) {
    const T* x = static_cast<const T*>(p.x);
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const uint32_t g = lane / 4, t = lane % 4;
    const uint32_t k0 = blockIdx.y * p.k_per_split, kend = min(p.k, k0 + p.k_per_split);
    const uint32_t steps = (kend - k0 + kStep - 1) / kStep, span = steps * kStep;

    // X[0..16)[k0, k0 + span) into shared memory, zero past m and kend
    const uint32_t vecs_per_row = span / 8;
    for (uint32_t c = tid; c < kMaxM * vecs_per_row; c += kThreads) {
        const uint32_t j = c / vecs_per_row, col = (c % vecs_per_row) * 8;
        T* dst = &xs[j][col];
        const bool ok = j < p.m;
        if (VEC) {
            const bool in = ok && k0 + col < kend;
            lk_cp_async_16(dst, in ? x + size_t(j) * p.k + k0 + col : x, in ? 16 : 0);
        } else {
            *lk_vec<uint4>(dst) = load8<false>(x + size_t(ok ? j : 0) * p.k, k0 + col, kend, ok);
        }
    }
    lk_cp_async_commit();

    // this warp's tile: W0 rows, or (past W0's tiles) A rows, whose sums are T's columns
    const uint32_t w0_tiles = (p.n + 15) / 16;
    const uint32_t tile = blockIdx.x * kTiles + warp / kParts, part = warp % kParts;
    const bool is_w0 = tile < w0_tiles;
    const T* base = static_cast<const T*>(is_w0 ? p.w0 : p.a);
    const uint32_t row0 = is_w0 ? tile * 16 : (tile - w0_tiles) * 16, rows = is_w0 ? p.n : p.rank;
    const bool g_ok = row0 + g < rows, h_ok = row0 + g + 8 < rows;
    const T* src_g = base + (g_ok ? size_t(row0 + g) * p.k : 0);
    const T* src_h = base + (h_ok ? size_t(row0 + g + 8) * p.k : 0);

    lk_cp_async_wait<0>();
    __syncthreads();

    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    for (uint32_t s0 = part; s0 < steps; s0 += kParts * kUnroll) {
        uint4 wg[kUnroll], wh[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // all loads first: they are independent
            const uint32_t s = s0 + u * kParts, col = k0 + s * kStep + t * 8;
            wg[u] = load8<VEC>(src_g, col, kend, g_ok && s < steps);
            wh[u] = load8<VEC>(src_h, col, kend, h_ok && s < steps);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const uint32_t s = s0 + u * kParts;
            if (s >= steps) break;
            const uint4 xg = *lk_vec<uint4>(&xs[g][s * kStep + t * 8]);
            const uint4 xh = *lk_vec<uint4>(&xs[g + 8][s * kStep + t * 8]);
            // elements 0-3 of each vector are mma columns {2t, 2t+1, 2t+8, 2t+9} of one k16 step, 4-7 of the next
            mma<T>(acc[0], wg[u].x, wh[u].x, wg[u].y, wh[u].y, xg.x, xg.y);
            mma<T>(acc[1], wg[u].x, wh[u].x, wg[u].y, wh[u].y, xh.x, xh.y);
            mma<T>(acc[0], wg[u].z, wh[u].z, wg[u].w, wh[u].w, xg.z, xg.w);
            mma<T>(acc[1], wg[u].z, wh[u].z, wg[u].w, wh[u].w, xh.z, xh.w);
        }
    }

    // the tile's four partial sums, added in warp order; accumulator e of lane (g, t) is
    // row g + 8·((e%4)/2), token 8·(e/4) + 2t + e%2
#pragma unroll
    for (int e = 0; e < 8; ++e) red[warp][lane][e] = acc[e / 4][e % 4];
    __syncthreads();
    const uint32_t out_tile = tid / 128, src_lane = (tid % 128) / 4, e0 = (tid % 4) * 2;
    const uint32_t tile_o = blockIdx.x * kTiles + out_tile;
    const bool o_w0 = tile_o < w0_tiles;
    const uint32_t orow0 = o_w0 ? tile_o * 16 : (tile_o - w0_tiles) * 16, orows = o_w0 ? p.n : p.rank;
    const uint32_t col0 = o_w0 ? 0 : p.n;  // partial's columns: Y's n, then T's rank
    const size_t ld = size_t(p.n) + p.rank;
    float* part_out = p.partial + size_t(blockIdx.y) * p.m * ld;
#pragma unroll
    for (uint32_t e = e0; e < e0 + 2; ++e) {
        float v = red[out_tile * kParts][src_lane][e];
#pragma unroll
        for (int w = 1; w < kParts; ++w) v += red[out_tile * kParts + w][src_lane][e];
        const uint32_t row = orow0 + src_lane / 4 + 8 * ((e % 4) / 2);
        const uint32_t token = 8 * (e / 4) + 2 * (src_lane % 4) + e % 2;
        if (row < orows && token < p.m) part_out[size_t(token) * ld + col0 + row] = v;
    }
}

// small_m_finalize: a block owns kCols columns of Y for all m tokens. Every block first adds T's splits
// (m × r, at most 16 × 128) and rounds T to the layer dtype (block 0 writes it out: the backward's T),
// and stages its kCols rows of B as f32; then each thread adds Y's splits for its column and tokens,
// s·(T·Bᵀ) (f32, rank ascending), the bias, and rounds once.
constexpr int kCols = LK_SMALL_M_COLS;
static_assert(kThreads % kCols == 0, "whole warps per token group");

template <typename T>
__device__ __forceinline__ void small_m_finalize_impl(const LkSmallMFinalizeParams& p) {
    LK_SHARED(16, float, ts, [kMaxM][LK_MAX_RANK]);
    LK_SHARED(4, float, bs, [kCols][LK_MAX_RANK + 1]);  // odd pitch: column reads across rows hit distinct banks
    const uint32_t tid = threadIdx.x, n0 = blockIdx.x * kCols;
    const size_t ld = size_t(p.n) + p.rank, plane = size_t(p.m) * ld;
    T* t_out = static_cast<T*>(p.t);
    for (uint32_t i = tid; i < p.m * p.rank; i += kThreads) {
        const uint32_t j = i / p.rank, c = i % p.rank;
        const float* src = p.partial + size_t(j) * ld + p.n + c;
        float s = src[0];
        for (uint32_t z = 1; z < p.splits; ++z) s += src[z * plane];
        const T v = lk_from_f32<T>(s);
        ts[j][c] = lk_to_f32(v);
        if (blockIdx.x == 0) t_out[i] = v;
    }
    const T* b = static_cast<const T*>(p.b);
    for (uint32_t i = tid; i < kCols * p.rank; i += kThreads) {
        const uint32_t row = i / p.rank, c = i % p.rank;
        bs[row][c] = n0 + row < p.n ? lk_to_f32(b[size_t(n0) * p.rank + i]) : 0.0f;
    }
    __syncthreads();

    const uint32_t col = tid % kCols, n = n0 + col;
    if (n >= p.n) return;
    const T* bias = static_cast<const T*>(p.bias);
    const float bias_v = bias != nullptr ? lk_to_f32(bias[n]) : 0.0f;
    T* y = static_cast<T*>(p.y);
    for (uint32_t j = tid / kCols; j < p.m; j += kThreads / kCols) {
        const float* src = p.partial + size_t(j) * ld + n;
        float main = src[0];
        for (uint32_t z = 1; z < p.splits; ++z) main += src[z * plane];
        float low = 0.0f;
        for (uint32_t i = 0; i < p.rank; ++i) low = __fmaf_rn(ts[j][i], bs[col][i], low);
        float v = __fadd_rn(main, __fmul_rn(p.scale, low));
        if (bias != nullptr) v = __fadd_rn(v, bias_v);
        y[size_t(j) * p.n + n] = lk_from_f32<T>(v);
    }
}

// Shared memory is declared once here: each instantiation declaring its own would add up.
template <typename T>
__device__ __forceinline__ void small_m_dispatch(const LkSmallMParams& p) {
    LK_SHARED(16, T, xs, [kMaxM][kXPitch]);
    LK_SHARED(4, float, red, [kWarps][32][kRedPitch]);
    constexpr uint32_t all = LK_ALIGNED_A | LK_ALIGNED_B | LK_ALIGNED_R;
    if ((p.flags & all) == all)
        small_m_impl<true, T>(p, xs, red);
    else
        small_m_impl<false, T>(p, xs, red);
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) small_m_bf16(LkSmallMParams p) { LK_KERNEL_ENTRY(); small_m_dispatch<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(small_m_bf16, LkSmallMParams)
extern "C" __global__ void __launch_bounds__(kThreads) small_m_f16(LkSmallMParams p) { LK_KERNEL_ENTRY(); small_m_dispatch<__half>(p); }
LK_KERNEL_EXPORT(small_m_f16, LkSmallMParams)
extern "C" __global__ void __launch_bounds__(kThreads) small_m_finalize_bf16(LkSmallMFinalizeParams p) {
    LK_KERNEL_ENTRY();
    small_m_finalize_impl<__nv_bfloat16>(p);
}
LK_KERNEL_EXPORT(small_m_finalize_bf16, LkSmallMFinalizeParams)
extern "C" __global__ void __launch_bounds__(kThreads) small_m_finalize_f16(LkSmallMFinalizeParams p) {
    LK_KERNEL_ENTRY();
    small_m_finalize_impl<__half>(p);
}
LK_KERNEL_EXPORT(small_m_finalize_f16, LkSmallMFinalizeParams)
