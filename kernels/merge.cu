// merge.cu: in-place merge / unmerge of a LoRA adapter, W ← round(W + s·B·A) (unmerge: s → −s).
//
// W (n × k) is read once and written once; A (rank × k) and B (n × rank) are small and re-read from
// L2. Per element: acc = Σ_j B[n][j]·A[j][k] in f32 (j ascending), d = round_f32(s·acc),
// w = round_f32(W + d), then one rounding to W's dtype: the order PyTorch/PEFT use for
// `W += (B @ A) * scaling` with an f32 adapter, so merges agree with PEFT's bit for bit on all but a
// handful of elements (tests/merge.rs measures the fraction). Explicit __fmul_rn/__fadd_rn keep nvcc
// from contracting the last two steps into an fma.
//
// Tiling: a block of 256 threads owns 64 rows × 128 columns of W; each thread 4 rows × 8 columns
// (one 16-byte vector per row when aligned). Rank is consumed in chunks of 32 staged in shared
// memory as f32, so any rank 1..=128 (or more) works with 24 KiB of static shared memory.
//
// Non-finite check (p.counts != NULL, src/ops/merge.rs `safe_merge`, the CLI's merge): in the same
// pass, each thread counts its elements that were finite in W and whose merged value, rounded to W's
// dtype, is NaN or ±Inf (an overflow: |v| at or past the dtype's rounding threshold to Inf), and those
// already NaN or ±Inf in W (which go through the arithmetic as before: Inf + finite stays that Inf, NaN
// stays NaN). The block adds its threads' counts (warp shuffles, then 8 warp sums through shared
// memory, in a fixed order) and thread 0 writes them to the block's slots of p.counts: no atomics, the
// same counts on every run. The merged values are computed exactly as without the check; with
// LK_MERGE_COUNT_ONLY nothing is written to W (a safe in-place merge runs this first, then the merge).
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kRows = LK_MERGE_ROWS, kCols = LK_MERGE_COLS, kRankChunk = 32, kThreads = LK_SIMT_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kF32Inf = 0x7f800000u;

// The f32 magnitude bits (sign cleared) from which rounding to T gives ±Inf: 2^128 for f32 itself,
// the midpoint between the largest finite value and 2^128 for bf16 (0x7f7f8000, a tie, rounds to the
// even Inf) and for f16 (65520.0f, likewise).
template <typename T> __device__ __forceinline__ uint32_t lk_inf_threshold();
template <> __device__ __forceinline__ uint32_t lk_inf_threshold<float>() { return kF32Inf; }
template <> __device__ __forceinline__ uint32_t lk_inf_threshold<__nv_bfloat16>() { return 0x7f7f8000u; }
template <> __device__ __forceinline__ uint32_t lk_inf_threshold<__half>() { return 0x477ff000u; }

__device__ __forceinline__ uint32_t lk_warp_sum(uint32_t v) {
#pragma unroll
    for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}

template <typename TW, typename TA>
__device__ __forceinline__ void merge_impl(const LkMergeParams& p) {
    LK_SHARED(4, float, bs, [kRows][kRankChunk + 1]);
    LK_SHARED(16, float, as, [kRankChunk][kCols]);
    TW* w = static_cast<TW*>(p.w);
    const TA* a = static_cast<const TA*>(p.a);
    const TA* b = static_cast<const TA*>(p.b);
    const uint32_t tid = threadIdx.x;
    const uint32_t row0 = blockIdx.y * kRows, col0 = blockIdx.x * kCols;
    const uint32_t my_col = col0 + (tid % 16) * 8;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;

    for (uint32_t j0 = 0; j0 < p.rank; j0 += kRankChunk) {
        __syncthreads();  // previous chunk fully consumed
        for (uint32_t i = tid; i < kRows * kRankChunk; i += kThreads) {
            const uint32_t r = i / kRankChunk, j = i % kRankChunk;
            const uint32_t gr = row0 + r, gj = j0 + j;
            bs[r][j] = (gr < p.n && gj < p.rank) ? lk_to_f32(b[size_t(gr) * p.rank + gj]) : 0.0f;
        }
        for (uint32_t i = tid; i < kRankChunk * kCols; i += kThreads) {
            const uint32_t j = i / kCols, c = i % kCols;
            const uint32_t gj = j0 + j, gc = col0 + c;
            as[j][c] = (gj < p.rank && gc < p.k) ? lk_to_f32(a[size_t(gj) * p.k + gc]) : 0.0f;
        }
        __syncthreads();
        const uint32_t jn = min(uint32_t(kRankChunk), p.rank - j0);
        for (uint32_t j = 0; j < jn; ++j) {
            float av[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) av[e] = as[j][(tid % 16) * 8 + e];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float bv = bs[tid / 16 + 16 * i][j];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[i][e] = __fmaf_rn(bv, av[e], acc[i][e]);
            }
        }
    }

    const bool vec = (p.k % 8 == 0) && lk_is_aligned16(w);
    const bool count = p.counts != nullptr;
    const bool write = (p.flags & LK_MERGE_COUNT_ONLY) == 0;
    const uint32_t inf_at = lk_inf_threshold<TW>();
    uint32_t made_nan = 0, made_inf = 0, in_w = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t row = row0 + tid / 16 + 16 * i;
        if (row >= p.n || my_col >= p.k) continue;
        TW* wrow = w + size_t(row) * p.k;
        float v[8];
        lk_load8(wrow, my_col, p.k, vec, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float merged = __fadd_rn(v[e], __fmul_rn(p.scale, acc[i][e]));
            if (count && my_col + e < p.k) {  // columns past k are padding (their acc may be NaN·0)
                const uint32_t wb = __float_as_uint(v[e]) & 0x7fffffffu;
                const uint32_t mb = __float_as_uint(merged) & 0x7fffffffu;
                const bool w_finite = wb < kF32Inf;
                in_w += !w_finite;
                made_nan += w_finite && mb > kF32Inf;
                made_inf += w_finite && mb >= inf_at && mb <= kF32Inf;
            }
            v[e] = merged;
        }
        if (write) lk_store8(wrow, my_col, p.k, vec, v);
    }
    if (count) {  // uniform across the block: every thread reaches the barrier
        LK_SHARED(4, uint32_t, warp_counts, [LK_MERGE_COUNTS][kWarps]);
        const uint32_t lane = tid % 32, warp = tid / 32;
        made_nan = lk_warp_sum(made_nan);
        made_inf = lk_warp_sum(made_inf);
        in_w = lk_warp_sum(in_w);
        if (lane == 0) {
            warp_counts[LK_MERGE_COUNT_NAN][warp] = made_nan;
            warp_counts[LK_MERGE_COUNT_INF][warp] = made_inf;
            warp_counts[LK_MERGE_COUNT_IN_W][warp] = in_w;
        }
        __syncthreads();
        if (tid < LK_MERGE_COUNTS) {
            uint32_t total = 0;
            for (int wi = 0; wi < kWarps; ++wi) total += warp_counts[tid][wi];
            const uint32_t blocks = gridDim.x * gridDim.y, block = blockIdx.y * gridDim.x + blockIdx.x;
            p.counts[size_t(tid) * blocks + block] = total;
        }
    }
}
}  // namespace

#define LK_MERGE(name, TW, TA) \
    extern "C" __global__ void __launch_bounds__(kThreads) name(LkMergeParams p) { merge_impl<TW, TA>(p); }

LK_MERGE(merge_bf16, __nv_bfloat16, __nv_bfloat16)
LK_KERNEL_EXPORT(merge_bf16, LkMergeParams)
LK_MERGE(merge_bf16_f32ad, __nv_bfloat16, float)
LK_KERNEL_EXPORT(merge_bf16_f32ad, LkMergeParams)
LK_MERGE(merge_f16, __half, __half)
LK_KERNEL_EXPORT(merge_f16, LkMergeParams)
LK_MERGE(merge_f16_f32ad, __half, float)
LK_KERNEL_EXPORT(merge_f16_f32ad, LkMergeParams)
LK_MERGE(merge_f32, float, float)
LK_KERNEL_EXPORT(merge_f32, LkMergeParams)
