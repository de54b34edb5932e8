// merge.cu: in-place merge / unmerge of a LoRA adapter, W ← round(W + s·B·A) (unmerge: s → −s).
//
// W (n × k) is read once and written once; A (rank × k) and B (n × rank) are small and re-read from
// L2. Per element: acc = Σ_j B[n][j]·A[j][k] in f32 (j ascending), d = round_f32(s·acc),
// w = round_f32(W + d), then one rounding to W's dtype: the order PyTorch/PEFT use for
// `W += (B @ A) * scaling` with an f32 adapter, so merges agree with PEFT's bit for bit on all but a
// handful of elements (tests/merge.rs measures the fraction). Explicit __fmul_rn/__fadd_rn keep nvcc
// from contracting the last two steps into an fma.
//
// Tiling: a block of 256 threads owns 64 rows × 128 columns of W (LK_MERGE_ROWS × LK_MERGE_COLS); each
// thread 4 consecutive rows × 8 consecutive columns. The thread first issues the copies of its part of
// W into the block's shared tile (cp.async, 16 bytes each: one per row, two for f32 W), so all its W
// loads are in flight during the rank product and no register holds them (which keeps the kernel at
// 3 blocks per SM); it waits for them only after the product. Rows of W that are not 16-byte aligned
// (k % 8 != 0) go through element loads instead.
//
// Rank product: rank is consumed in chunks of 16 staged in shared memory as f32, A as as[j][column]
// (column 8t + e of thread column t at (e / 4)·64 + 4t + e % 4, so each thread reads its 8 values with
// two conflict-free 16-byte loads), B transposed as bs[j][row] (a thread's 4 rows are one 16-byte
// load, shared by the 16 threads of a row group). Staging reads A with one 16-byte vector per thread
// (two for f32 adapters) and B with one 8-byte vector (16-byte for f32) per thread when the shapes and
// pointers allow, element loads otherwise, and stores them as f32 (cp.async would leave bf16/f16 in
// shared memory, to be converted in every rank step instead of once). Per rank step a thread executes
// 3 LDS.128 and 32 FFMA; the 16 steps of a chunk are fully unrolled. A rank that is not a multiple of
// 16 is padded with A = +0 and B = −0: the padded steps add the product −0, and x + (−0) = x for every
// f32 x (−0 and NaN included), so the padding changes no bit of acc.
//
// FFMA, not tensor cores, also for large ranks: an mma.sync adds its k products and the accumulator
// with its own alignment and rounding, not as the f32 FMA chain above, and an f32 adapter (PEFT's
// storage) would be cut to tf32 on the way in (far outside tests/merge.rs's tolerance); the merged bits
// would change, and the PEFT fixtures are rank 8, so their agreement tests would not even see a rank ≥ 32
// path. The cost: the rank product is r·n·k FFMA. On an H100 (132 SMs × 128 FP32 lanes, 1.98 GHz) the
// FFMA alone take as long as moving a bf16 W at r ≈ 45; with this kernel's 621 instructions per 16 rank
// steps (bf16, sm_90) the 4096² bf16 merge is bound by memory up to r = 32 (r = 16, the target: 10.0 µs
// of issue against 22.5 µs of memory) and by issue beyond (r = 64: 40.1 against 22.7; r = 128: 80.3
// against 23.1; docs/perf/bound.md, the last wave counted).
//
// Non-finite check (p.counts != NULL, src/ops/merge.rs `safe_merge`, the CLI's merge): in the same
// pass, each thread counts its elements that were finite in W and whose merged value, rounded to W's
// dtype, is NaN or ±Inf (an overflow: |v| at or past the dtype's rounding threshold to Inf), and those
// already NaN or ±Inf in W (which go through the arithmetic as before: Inf + finite stays that Inf, NaN
// stays NaN). The block adds its threads' counts (warp shuffles, then 8 warp sums through shared
// memory, in a fixed order) and thread 0 writes them to the block's slots of p.counts: no atomics, the
// same counts on every run. The merged values are computed exactly as without the check; with
// LK_MERGE_COUNT_ONLY nothing is written to W (a safe in-place merge runs this first, then the merge).
//
// DoRA (PEFT's use_dora; the dora_merge_* kernels, the same code with kDora): the merge is
// W ← round(factor_row · v), v = round_f32(W + round_f32(s·B·A)) as above and factor_row =
// magnitude_row / ‖v_row‖, PEFT's DoraLinearVariant.merge_safe in f32. Three launches: this kernel with
// LK_MERGE_ROW_SUMSQ (the rank product, then per thread the f32 sum of squares of its 8 merged values
// (fma, ascending columns), added over the 16 threads of a row by a fixed xor-shuffle tree, one partial
// per row and block of 128 columns, nothing written to W), dora_factor_f32 (the partials in f64 in
// block order, sqrt, one rounding, the division), and this kernel again with row_factor (the rank
// product recomputed: W is read twice, written once). Unmerge (LK_MERGE_ROW_DIVIDE) takes the merge's
// factors: W ← round(W/factor − s·B·A), PEFT's unmerge. The plain merge_* kernels compile without any
// of it (kDora = false).
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kRows = LK_MERGE_ROWS, kCols = LK_MERGE_COLS, kThreads = LK_SIMT_THREADS;
constexpr int kChunk = 16;                  // rank steps staged per round
constexpr int kTx = kCols / 8;              // threads across a row of the tile (8 columns each)
constexpr int kTy = kThreads / kTx;         // thread rows
constexpr int kRowsPerThread = kRows / kTy; // consecutive rows per thread
constexpr int kWarps = kThreads / 32;
static_assert(kRowsPerThread == 4, "a thread's rows of B are one 16-byte shared-memory load");
static_assert(kTy == kChunk, "A staging: one rank step of the chunk per thread row");
static_assert(kRows * kChunk == kThreads * 4, "B staging: 4 rank steps of one row per thread");
static_assert(kThreads % kRows == 0 && kRows % 32 == 0, "B staging: a warp stores 32 rows of one step");
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

// N consecutive elements of T kept raw (unconverted) in registers, as the vectors that load them:
// 16-byte vectors, or one 8-byte vector for 4 elements of a 2-byte type.
template <bool C, typename X, typename Y> struct Pick { using type = X; };
template <typename X, typename Y> struct Pick<false, X, Y> { using type = Y; };
template <typename T, int N> struct Raw {
    using V = typename Pick<(N * sizeof(T) >= 16), uint4, uint2>::type;
    static constexpr int kPer = int(sizeof(V) / sizeof(T));  // elements per vector
    V q[N / kPer];
};

// Elements col..col+N−1 of `row`: vector loads when `vec` (the caller checked that the group is inside
// the row and aligned to the vector), else element loads, those at or past `ncols` reading as `fill`.
template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* row, uint32_t col, uint32_t ncols, bool vec, T fill, Raw<T, N>& r) {
    using R = Raw<T, N>;
    if (vec) {
#pragma unroll
        for (int v = 0; v < N / R::kPer; ++v) r.q[v] = *lk_vec<typename R::V>(row + col + v * R::kPer);
        return;
    }
    T* e = reinterpret_cast<T*>(r.q);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = (col + i < ncols) ? row[col + i] : fill;
}

template <typename T, int N>
__device__ __forceinline__ void raw_to_f32(const Raw<T, N>& r, float out[N]) {
    const T* e = reinterpret_cast<const T*>(r.q);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = lk_to_f32(e[i]);
}

// Stores v[0..8) rounded to T at row[col..col+8): vectors when `vec` and the group is inside the row,
// element stores (skipping columns at or past `ncols`) else.
template <typename T>
__device__ __forceinline__ void store8(T* row, uint32_t col, uint32_t ncols, bool vec, const float v[8]) {
    Raw<T, 8> r;
    T* e = reinterpret_cast<T*>(r.q);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = lk_from_f32<T>(v[i]);
    if (vec && col + 8 <= ncols) {
#pragma unroll
        for (int q = 0; q < 8 / Raw<T, 8>::kPer; ++q) *lk_vec<uint4>(row + col + q * Raw<T, 8>::kPer) = r.q[q];
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
        if (col + i < ncols) row[col + i] = e[i];
}

template <typename TW, typename TA, bool kDora>
__device__ __forceinline__ void merge_impl(const LkMergeParams& p) {
    LK_SHARED(16, float, as, [kChunk][kCols]);  // A, f32, columns permuted (see the header)
    LK_SHARED(16, float, bs, [kChunk][kRows]);  // B transposed, f32
    LK_SHARED(16, TW, ws, [kRows][kCols]);      // the block's tile of W, as stored
    TW* w = static_cast<TW*>(p.w);
    const TA* a = static_cast<const TA*>(p.a);
    const TA* b = static_cast<const TA*>(p.b);
    const uint32_t tid = threadIdx.x, tx = tid % kTx, ty = tid / kTx;
    const uint32_t row0 = blockIdx.y * kRows, col0 = blockIdx.x * kCols;
    const uint32_t my_col = col0 + tx * 8, my_row = row0 + ty * kRowsPerThread;

    // W first: the thread's rows of W go to shared memory (cp.async, 16 bytes at a time, no registers
    // held) before the rank product, so their HBM latency overlaps it; element loads when W's rows are
    // not 16-byte aligned (columns past k stored as 0).
    const bool vec = (p.k % 8 == 0) && lk_is_aligned16(w);
    constexpr int kWPer = int(16 / sizeof(TW));  // elements per 16-byte copy
    if (vec) {
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            if (my_row + i < p.n && my_col < p.k) {
                const TW* src = w + size_t(my_row + i) * p.k + my_col;
#pragma unroll
                for (int q = 0; q < 8 / kWPer; ++q)
                    lk_cp_async_16(&ws[ty * kRowsPerThread + i][tx * 8 + q * kWPer], src + q * kWPer, 16);
            }
        }
        lk_cp_async_commit();
    } else {
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            if (my_row + i < p.n && my_col < p.k) {
                const TW* src = w + size_t(my_row + i) * p.k;
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    ws[ty * kRowsPerThread + i][tx * 8 + e] = my_col + e < p.k ? src[my_col + e] : lk_from_f32<TW>(0.0f);
            }
        }
    }

    // Staging, per chunk j0: A row j0 + ty, columns my_col..+8 (+0 past the rank and past k); B row
    // row0 + b_row, rank steps j0 + b_j..+4 (−0 past the rank: the padded steps then add −0).
    const bool a_vec = (p.k % 8 == 0) && lk_is_aligned16(a) && my_col + 8 <= p.k;
    const uint32_t b_row = tid % kRows, b_j = (tid / kRows) * 4;
    const bool b_row_in = row0 + b_row < p.n;
    const bool b_vec = (p.rank % 4 == 0) && (reinterpret_cast<uintptr_t>(b) % (4 * sizeof(TA)) == 0) && b_row_in;
    const TA* a_src = a + size_t(ty) * p.k;                                 // + j0 rows per chunk
    const TA* b_src = b + size_t(b_row_in ? row0 + b_row : 0) * p.rank;
    const TA plus0 = lk_from_f32<TA>(0.0f), minus0 = lk_from_f32<TA>(-0.0f);

    float acc[kRowsPerThread][8];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;

    for (uint32_t j0 = 0; j0 < p.rank; j0 += kChunk) {
        {
            // past the rank (or the rows of B): ncols 0, every element the fill, nothing read
            const bool a_in = j0 + ty < p.rank;
            Raw<TA, 8> araw;
            Raw<TA, 4> braw;
            load_raw(a_src + size_t(j0) * p.k, my_col, a_in ? p.k : 0, a_vec && a_in, plus0, araw);
            load_raw(b_src, j0 + b_j, b_row_in ? p.rank : 0, b_vec && j0 + b_j < p.rank, minus0, braw);
            float av[8], bv[4];
            raw_to_f32(araw, av);
            raw_to_f32(braw, bv);
            *lk_vec<float4>(&as[ty][tx * 4]) = make_float4(av[0], av[1], av[2], av[3]);
            *lk_vec<float4>(&as[ty][kCols / 2 + tx * 4]) = make_float4(av[4], av[5], av[6], av[7]);
#pragma unroll
            for (int e = 0; e < 4; ++e) bs[b_j + e][b_row] = bv[e];
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
            const float4 b4 = *lk_vec<float4>(&bs[j][ty * kRowsPerThread]);
            const float4 a0 = *lk_vec<float4>(&as[j][tx * 4]);
            const float4 a1 = *lk_vec<float4>(&as[j][kCols / 2 + tx * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[i][e] = __fmaf_rn(bv[i], av[e], acc[i][e]);
        }
        __syncthreads();  // the chunk fully consumed before the next is stored
    }

    const bool sumsq = kDora && (p.flags & LK_MERGE_ROW_SUMSQ) != 0;
    const bool divide = kDora && (p.flags & LK_MERGE_ROW_DIVIDE) != 0;
    const bool count = p.counts != nullptr && !sumsq;
    const bool write = (p.flags & LK_MERGE_COUNT_ONLY) == 0 && !sumsq;
    const uint32_t inf_at = lk_inf_threshold<TW>();
    uint32_t made_nan = 0, made_inf = 0, in_w = 0;
    lk_cp_async_wait<0>();  // the thread's own copies of W landed (it reads only those)
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
        const uint32_t row = my_row + i;
        float sq = 0.0f;  // DoRA: this thread's part of the row's sum of squares of the merged values
        if (row < p.n && my_col < p.k) {
            float v[8];
            Raw<TW, 8> raw;
#pragma unroll
            for (int q = 0; q < 8 / kWPer; ++q)
                raw.q[q] = *lk_vec<uint4>(&ws[ty * kRowsPerThread + i][tx * 8 + q * kWPer]);
            raw_to_f32(raw, v);
            const float factor = (kDora && !sumsq) ? p.row_factor[row] : 1.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                // DoRA, as PEFT: merge factor·(W + s·B·A), unmerge W/factor − s·B·A, each step rounded to f32
                const float base = divide ? __fdiv_rn(v[e], factor) : v[e];
                float merged = __fadd_rn(base, __fmul_rn(p.scale, acc[i][e]));
                if (kDora && !sumsq && !divide) merged = __fmul_rn(factor, merged);
                if (sumsq && my_col + e < p.k) sq = __fmaf_rn(merged, merged, sq);
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
            if (write) store8(w + size_t(row) * p.k, my_col, p.k, vec, v);
        }
        if (sumsq) {  // uniform across the block: every lane shuffles; the 16 threads of a row, fixed tree
#pragma unroll
            for (int d = kTx / 2; d > 0; d /= 2) sq = __fadd_rn(sq, __shfl_xor_sync(0xffffffffu, sq, d));
            if (tx == 0 && row < p.n) p.row_sumsq[size_t(blockIdx.x) * p.n + row] = sq;
        }
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

#define LK_MERGE(name, TW, TA, DORA) \
    extern "C" __global__ void __launch_bounds__(kThreads, 3) name(LkMergeParams p) { LK_KERNEL_ENTRY(); merge_impl<TW, TA, DORA>(p); }

LK_MERGE(merge_bf16, __nv_bfloat16, __nv_bfloat16, false)
LK_KERNEL_EXPORT(merge_bf16, LkMergeParams)
LK_MERGE(merge_bf16_f32ad, __nv_bfloat16, float, false)
LK_KERNEL_EXPORT(merge_bf16_f32ad, LkMergeParams)
LK_MERGE(merge_f16, __half, __half, false)
LK_KERNEL_EXPORT(merge_f16, LkMergeParams)
LK_MERGE(merge_f16_f32ad, __half, float, false)
LK_KERNEL_EXPORT(merge_f16_f32ad, LkMergeParams)
LK_MERGE(merge_f32, float, float, false)
LK_KERNEL_EXPORT(merge_f32, LkMergeParams)

// DoRA (PEFT's use_dora): the same kernel with the row passes of LkMergeParams, and the row factor.
LK_MERGE(dora_merge_bf16, __nv_bfloat16, __nv_bfloat16, true)
LK_KERNEL_EXPORT(dora_merge_bf16, LkMergeParams)
LK_MERGE(dora_merge_bf16_f32ad, __nv_bfloat16, float, true)
LK_KERNEL_EXPORT(dora_merge_bf16_f32ad, LkMergeParams)
LK_MERGE(dora_merge_f16, __half, __half, true)
LK_KERNEL_EXPORT(dora_merge_f16, LkMergeParams)
LK_MERGE(dora_merge_f16_f32ad, __half, float, true)
LK_KERNEL_EXPORT(dora_merge_f16_f32ad, LkMergeParams)
LK_MERGE(dora_merge_f32, float, float, true)
LK_KERNEL_EXPORT(dora_merge_f32, LkMergeParams)

// factor[row] = magnitude[row] / round_f32(sqrt(Σ_b row_sumsq[b][row])), the sum in f64 in block order.
// A row whose norm is 0 gets magnitude/0 (±Inf, or NaN for a zero magnitude), as PEFT's division does.
extern "C" __global__ void __launch_bounds__(kThreads) dora_factor_f32(LkDoraFactorParams p) {
    LK_KERNEL_ENTRY();
    const uint32_t row = blockIdx.x * kThreads + threadIdx.x;
    if (row >= p.n) return;
    double sum = 0.0;
    for (uint32_t b = 0; b < p.blocks; ++b) sum += double(p.row_sumsq[size_t(b) * p.n + row]);
    const float norm = float(sqrt(sum));  // sqrt correctly rounded in f64, then one rounding
    p.factor[row] = __fdiv_rn(p.magnitude[row], norm);
    if (p.norm) p.norm[row] = norm;
}
LK_KERNEL_EXPORT(dora_factor_f32, LkDoraFactorParams)
