// multi_decode.cu: lora_forward_multi for small batches with one adapter per row (or none), in two kernels
// with the bits of fused_gemm_multi's two modes:
//
//   multi_decode_shrink  partial[z]: X_i·A_{a(i)}ᵀ over split z's K chunk (lowrank_finalize then rounds T),
//                        for m ≤ 128 (one of fused_gemm_multi's row tiles), in groups of 16 rows; without
//                        a table, the single-adapter projection X·Aᵀ (src/ops/launch.rs small_projection)
//   multi_decode         Y_i = X_i·W0ᵀ + s_{a(i)}·T_i·B_{a(i)}ᵀ (+ bias), for m ≤ 16 (decoding)
//
// Why kernels of their own: at m ≤ 16 the layer is bound by reading W0 once, and fused_gemm_multi's
// 128×128 tiles give only n/128 blocks (32 at n = 4096), too few to stream W0 at bandwidth. Its shrink
// multiplies a 128-row tile per adapter of the tile, however few of its rows use that adapter, on one
// block per adapter and K chunk. Here a block owns 32 columns (of Y, or of T) for 16 rows, each of its 4
// warps 8 of them: one mma.m16n8k16 per k16 step, the rows as the mma's m and W0's (or A_a's) rows as its
// n, as in fused_gemm; the shrink's blocks take one adapter of their 16 rows each.
//
// Why they give fused_gemm_multi's bits (and so, on the general path, lora_forward's with the row's
// adapter alone): every element is the same chain of mma k16 steps in the same order, and an mma's
// element (i, j) depends on row i of its A operand, column j of its B operand and its own accumulator
// only, whichever tile or lane holds it. No split-K beyond the projection's own chunks: a split would
// change the chain.
//   multi_decode, per element of Y:
//     for each pass (the distinct adapters of rows 0..m-1, in order of first appearance): ceil(r_a/32)·2
//       steps over T's columns with the rows of other adapters zeroed, T's and B_a's columns past r_a zero;
//     acc *= s_{a(i)} (0 without an adapter);
//     ceil(k/32)·2 steps over X·W0ᵀ, k ascending, zero past k;
//     + bias (+0 without one), one rounding; a DoRA adapter's row: rounded with +0, then
//     round(fma(f, that, bias)) with its factor f (fused_gemm_multi's epilogue).
//   multi_decode_shrink, per element of partial[z] (row i, column c of T):
//     from +0, 2 steps per 32-wide k-tile of split z's chunk (launch::projection_splits: K alone decides
//     it), ascending, X and A_a zero past the chunk, A_a's rows (T's columns) past r_a zero; stored by the
//     block of row i's pass only, so the other rows' products never reach it (fused_gemm_multi's shrink
//     zeroes them instead: the same bits for finite adapters). Rows without an adapter: +0.
//
// How: one cp.async ring of STAGES slots walks the virtual stages. In multi_decode they are
// 0..npass+ceil(k/KD)-1: a low-rank stage holds one pass's B_a rows for the block's columns (rank ≤ 128 =
// KD), a main stage X[0..16) and the block's W0 rows over KD columns of k; T's 16 rows stay in their own
// tile for all passes. In multi_decode_shrink they are the chunk's ceil(chunk/KD) stages of the group's 16
// rows of X and A_a's rows for the block's columns, for the block's one pass (the group's pass y; the
// host launches as many blocks in y as the most passes a group has). Stage t is waited for, the slot of
// stage t-1 refilled with stage t+STAGES-1, then stage t multiplied, so STAGES-1 stages are in flight per
// block. Rows, columns and k
// past the ends load as zero; operands that do not allow 16-byte copies (flags, or an adapter's
// LK_ALIGNED_B / LK_ALIGNED_R) take element loads.
#include "lk_multi.cuh"
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int ROWS = LK_SMALL_M_MAX;          // X and T rows in a stage
constexpr int COLS = LK_MULTI_DECODE_COLS;    // W0 (or B_a) rows in a stage: the block's columns of Y
constexpr int THREADS = LK_MULTI_DECODE_THREADS;
constexpr int KD = LK_MAX_RANK;               // k per stage; a low-rank stage holds a whole rank
constexpr int PITCH = KD + 8;                 // 272 bytes: ldmatrix's 8 rows land on distinct banks
constexpr int STAGE = (ROWS + COLS) * PITCH;  // elements per slot: X rows, then W0 rows
constexpr int STAGES = 5;
static_assert(COLS == 8 * (THREADS / 32), "a warp owns 8 columns");
static_assert(ROWS == 16 && KD % 32 == 0, "one m16 tile of rows; stages of whole 32-wide k-tiles");
static_assert((STAGES * STAGE + ROWS * PITCH) * 2 == LK_MULTI_DECODE_SMEM_BYTES, "header and kernel agree");

// Virtual stage s into ring slot `slot`: pass s's B_a (s < npass), else X and W0 over main stage s - npass.
template <bool VEC, typename T, typename RT>
__device__ __forceinline__ void load_stage(const LkFusedGemmMultiParams& p, T* slot, int s, int npass,
                                           const uint32_t* pass, uint32_t n0) {
    const uint32_t tid = threadIdx.x;
    T* ws = slot + ROWS * PITCH;
    if (s < npass) {
        const LkAdapterDesc& d = p.adapters[pass[s]];
        const RT* b = static_cast<const RT*>(p.arena) + d.b_offset;
        const uint32_t per_row = (d.rank + 31) / 32 * 4;  // 8-element chunks per row, whole 32-wide k-tiles
        const bool vec = (d.flags & LK_ALIGNED_B) != 0;
        for (uint32_t c = tid; c < COLS * per_row; c += THREADS) {
            const uint32_t row = c / per_row, kc = (c % per_row) * 8;
            if (vec)
                lk_load_chunk<true>(ws + row * PITCH + kc, b, n0 + row, p.n, d.rank, kc, d.rank);
            else
                lk_load_chunk<false>(ws + row * PITCH + kc, b, n0 + row, p.n, d.rank, kc, d.rank);
        }
        return;
    }
    const uint32_t k0 = uint32_t(s - npass) * KD;
    const T* x = static_cast<const T*>(p.x);
    const T* w0 = static_cast<const T*>(p.w0);
#pragma unroll
    for (int i = 0; i < ROWS * KD / 8 / THREADS; ++i) {
        const uint32_t c = tid + i * THREADS, row = c / (KD / 8), kc = (c % (KD / 8)) * 8;
        lk_load_chunk<VEC>(slot + row * PITCH + kc, x, row, p.m, p.k, k0 + kc, p.k);
    }
#pragma unroll
    for (int i = 0; i < COLS * KD / 8 / THREADS; ++i) {
        const uint32_t c = tid + i * THREADS, row = c / (KD / 8), kc = (c % (KD / 8)) * 8;
        lk_load_chunk<VEC>(ws + row * PITCH + kc, w0, n0 + row, p.n, p.k, k0 + kc, p.k);
    }
}

// The part of a fragment register (two elements, k and k+1, the lower k in the low half) that lies
// below `kend`: all of it, the low element, or none.
__device__ __forceinline__ uint32_t below_mask(uint32_t k, uint32_t kend) {
    return k + 1 < kend ? 0xffffffffu : (k < kend ? 0x0000ffffu : 0u);
}

// acc += the rows of `rows` (16 × PITCH) times this warp's 8 rows of `cols`, over k-tiles [0, 32·tiles);
// `keep_g` / `keep_h`: whether row g / g+8 takes part (a masked row's A fragment is +0, as
// fused_gemm_multi's zero-filled rows). RANK_END (the low-rank stages): the A fragment is +0 from
// column `kend` (the pass's rank) on, as fused_gemm_multi zero-fills T there. T's row holds the shrink's
// X_i·0 in those columns, NaN when X_i has an infinity; B_a's zero columns would turn it into NaN.
template <bool RANK_END, typename T>
__device__ __forceinline__ void mma_rows(float (&acc)[4], const T* rows, const T* cols, uint32_t tiles, bool keep_g,
                                         bool keep_h, uint32_t kend = 0) {
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (uint32_t kk = 0; kk < tiles * 32; kk += 32) {
        uint32_t b[4];
        lk_ldmatrix_x4(b, cols + (warp * 8 + lane % 8) * PITCH + kk + (lane / 8) * 8);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint32_t a[4];
            lk_ldmatrix_x4(a, rows + (lane % 16) * PITCH + kk + h * 16 + (lane / 16) * 8);
            if (!keep_g) a[0] = a[2] = 0u;
            if (!keep_h) a[1] = a[3] = 0u;
            if (RANK_END) {  // a[0], a[1]: columns 2t, 2t+1 of the k16 step; a[2], a[3]: 8 further on
                const uint32_t k = kk + h * 16 + 2 * (lane % 4);
                const uint32_t lo = below_mask(k, kend), hi = below_mask(k + 8, kend);
                a[0] &= lo;
                a[1] &= lo;
                a[2] &= hi;
                a[3] &= hi;
            }
            const uint32_t bf[2] = {b[2 * h], b[2 * h + 1]};
            lk_mma_m16n8k16<T>(acc, a, bf);
        }
    }
}

// Thread 0: the adapters of rows m0..m0+15 (an index out of the table or naming an empty slot counts as
// none: the host validates indices, this only keeps the kernel in bounds), their scales (0 without an
// adapter) and the passes, as fused_gemm_multi lists them.
__device__ __forceinline__ void list_rows(const LkFusedGemmMultiParams& p, uint32_t m0, uint32_t* s_idx,
                                          float* s_scale, uint32_t* s_pass, uint32_t* s_npass) {
    if (threadIdx.x == 0) {
        uint32_t count = 0;
        for (uint32_t row = 0; row < ROWS; ++row) {
            uint32_t v = m0 + row < p.m ? p.index[m0 + row] : LK_NO_ADAPTER;
            if (v != LK_NO_ADAPTER && (v >= p.n_adapters || p.adapters[v].rank == 0)) v = LK_NO_ADAPTER;
            s_idx[row] = v;
            s_scale[row] = v != LK_NO_ADAPTER ? p.adapters[v].scale : 0.0f;
            bool seen = v == LK_NO_ADAPTER;
            for (uint32_t q = 0; q < count; ++q) seen = seen || s_pass[q] == v;
            if (!seen) s_pass[count++] = v;
        }
        s_npass[0] = count;
    }
    __syncthreads();
}

template <bool VEC, typename T, typename RT>
__device__ __forceinline__ void multi_decode_impl(const LkFusedGemmMultiParams& p, T* ring, T* ts, uint32_t* s_idx,
                                                  float* s_scale, uint32_t* s_pass, uint32_t* s_npass) {
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
    const uint32_t n0 = blockIdx.x * COLS;
    const int npass = int(s_npass[0]);
    const int total = npass + int((p.k + KD - 1) / KD);
    const uint32_t k_tiles = (p.k + 31) / 32;  // the main chain's 32-wide k-tiles

    // T's rows for every pass, in the first group (they are waited for with stage 0)
    if (npass > 0) {
        const T* tm = static_cast<const T*>(p.t);
        const bool vec_t = (p.flags & LK_ALIGNED_L) != 0;
        for (uint32_t c = tid; c < ROWS * KD / 8; c += THREADS) {
            const uint32_t row = c / (KD / 8), kc = (c % (KD / 8)) * 8;
            if (vec_t)
                lk_load_chunk<true>(ts + row * PITCH + kc, tm, row, p.m, p.ldt, kc, p.ldt);
            else
                lk_load_chunk<false>(ts + row * PITCH + kc, tm, row, p.m, p.ldt, kc, p.ldt);
        }
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < total) load_stage<VEC, T, RT>(p, ring + s * STAGE, s, npass, s_pass, n0);
        lk_cp_async_commit();
    }

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < total; ++s) {
        lk_cp_async_wait<STAGES - 2>();  // this thread's copies of stage s have landed ...
        __syncthreads();                 // ... everyone's, and everyone is done with stage s - 1
        const int next = s + STAGES - 1;
        if (next < total) load_stage<VEC, T, RT>(p, ring + (next % STAGES) * STAGE, next, npass, s_pass, n0);
        lk_cp_async_commit();
        const T* slot = ring + (s % STAGES) * STAGE;
        if (s < npass) {
            const uint32_t a = s_pass[s];
            const uint32_t rank = p.adapters[a].rank;
            mma_rows<true>(acc, ts, slot + ROWS * PITCH, (rank + 31) / 32, s_idx[g] == a, s_idx[g + 8] == a, rank);
            if (s == npass - 1) {  // the low-rank sums are complete: each row times its own scale
                const float sg = s_scale[g], sh = s_scale[g + 8];
                acc[0] *= sg;
                acc[1] *= sg;
                acc[2] *= sh;
                acc[3] *= sh;
            }
        } else {
            const uint32_t first = uint32_t(s - npass) * (KD / 32);
            mma_rows<false>(acc, slot, slot + ROWS * PITCH, min(uint32_t(KD / 32), k_tiles - first), true, true);
        }
    }
    lk_cp_async_wait<0>();

    // bias (+0 without one, as fused_gemm_multi's epilogue adds), one rounding; c0, c1 at (g, 2t..2t+1),
    // c2, c3 at (g+8, ...)
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const uint32_t row = g + 8 * (e / 2), col = n0 + warp * 8 + 2 * t + e % 2;
        if (row >= p.m || col >= p.n) continue;
        const float b = bias != nullptr ? lk_to_f32(bias[col]) : 0.0f;
        const uint32_t at = lk_multi_factor_at(p, s_idx[row]);
        if (at == LK_NO_FACTOR) {
            y[size_t(row) * p.n + col] = lk_from_f32<T>(acc[e] + b);
        } else {  // a DoRA row: Z rounded without the bias, then round(fma(f, Z, bias)), as fused_gemm_multi
            const float z = lk_to_f32(lk_from_f32<T>(acc[e] + 0.0f));
            y[size_t(row) * p.n + col] = lk_from_f32<T>(__fmaf_rn(p.factors[at + col], z, b));
        }
    }
}

// The shrink's stage: X's rows m0..m0+15 and A_a's rows c0..c0+COLS over KD columns of k from k0, zero from
// the split's end k_end on and past A_a's rank, as fused_gemm_multi's shrink loads them (f32 A rounded to T).
template <bool VEC, typename T, typename RT>
__device__ __forceinline__ void load_shrink_stage(const LkFusedGemmMultiParams& p, T* slot, const RT* a, uint32_t rank,
                                                  uint32_t m0, uint32_t c0, uint32_t k0, uint32_t k_end) {
    const uint32_t tid = threadIdx.x;
    const T* x = static_cast<const T*>(p.x);
    T* as = slot + ROWS * PITCH;
#pragma unroll
    for (int i = 0; i < ROWS * KD / 8 / THREADS; ++i) {
        const uint32_t c = tid + i * THREADS, row = c / (KD / 8), kc = (c % (KD / 8)) * 8;
        lk_load_chunk<VEC>(slot + row * PITCH + kc, x, m0 + row, p.m, p.k, k0 + kc, k_end);
    }
#pragma unroll
    for (int i = 0; i < COLS * KD / 8 / THREADS; ++i) {
        const uint32_t c = tid + i * THREADS, row = c / (KD / 8), kc = (c % (KD / 8)) * 8;
        lk_load_chunk<VEC>(as + row * PITCH + kc, a, c0 + row, rank, p.k, k0 + kc, k_end);
    }
}

// One pass of the decode shrink: acc = X·A_aᵀ for the block's columns over [k_begin, k_end), a fresh chain
// of the chunk's k-tiles, ascending. VEC: X and A_a both allow 16-byte loads.
template <bool VEC, typename T, typename RT>
__device__ __forceinline__ void shrink_pass(const LkFusedGemmMultiParams& p, T* ring, const LkAdapterDesc& d,
                                            uint32_t m0, uint32_t c0, uint32_t k_begin, uint32_t k_end,
                                            float (&acc)[4]) {
    const RT* a = static_cast<const RT*>(p.arena) + d.a_offset;
    const uint32_t k_tiles = (k_end - k_begin + 31) / 32;
    const int total = int((k_end - k_begin + KD - 1) / KD);
#pragma unroll 1  // unrolled, the f32 adapters' synchronous loads of all four stages would be live at once
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < total) load_shrink_stage<VEC, T, RT>(p, ring + s * STAGE, a, d.rank, m0, c0, k_begin + s * KD, k_end);
        lk_cp_async_commit();
    }
#pragma unroll 1
    for (int s = 0; s < total; ++s) {
        lk_cp_async_wait<STAGES - 2>();  // as in multi_decode_impl
        __syncthreads();
        const int next = s + STAGES - 1;
        if (next < total)
            load_shrink_stage<VEC, T, RT>(p, ring + (next % STAGES) * STAGE, a, d.rank, m0, c0, k_begin + next * KD,
                                          k_end);
        lk_cp_async_commit();
        const T* slot = ring + (s % STAGES) * STAGE;
        const uint32_t first = uint32_t(s) * (KD / 32);
        mma_rows<false>(acc, slot, slot + ROWS * PITCH, min(uint32_t(KD / 32), k_tiles - first), true, true);
    }
    lk_cp_async_wait<0>();
}

// The decode shrink: block (x, y, z) writes partial[z]'s columns c0..c0+31 of rows m0..m0+15 (x: the
// column group and the 16-row group) for the rows of the group's pass y, if it has one (block y = 0 also
// the rows without an adapter, as zeros). The pass is one chain over split z's k-tiles with X's rows
// unmasked: only the pass's own rows are stored, and an mma's row never sees another row. The host
// launches as many blocks in y as the most passes a group has (AdapterIndex counts them), so every row
// is written; a row it missed would stay unwritten, which the emulator's initcheck reports.
template <typename T, typename RT>
__device__ __forceinline__ void multi_decode_shrink_impl(const LkFusedGemmMultiParams& p, T* ring, uint32_t m0,
                                                         uint32_t c0, const uint32_t* s_idx, const uint32_t* s_pass,
                                                         uint32_t npass) {
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
    const uint32_t k_begin = min(p.k, blockIdx.z * p.k_per_split), k_end = min(p.k, k_begin + p.k_per_split);
    float* partial = p.partial + size_t(blockIdx.z) * p.m * p.ldt;
    if (blockIdx.y == 0)
        for (uint32_t e = tid; e < ROWS * COLS; e += THREADS) {
            const uint32_t row = e / COLS, col = c0 + e % COLS;
            if (m0 + row < p.m && col < p.ldt && s_idx[row] == LK_NO_ADAPTER)
                partial[size_t(m0 + row) * p.ldt + col] = 0.0f;
        }
    if (blockIdx.y >= npass) return;
    const uint32_t a = s_pass[blockIdx.y];
    // no table: launch::small_projection's one adapter, A at the arena's start, rank ldt, its alignment in
    // p.flags
    const LkAdapterDesc d = p.adapters != nullptr ? p.adapters[a]
                                                  : LkAdapterDesc{0, 0, p.ldt, 1.0f, p.flags & LK_ALIGNED_R, 0};
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if ((p.flags & LK_ALIGNED_A) != 0 && (d.flags & LK_ALIGNED_R) != 0)
        shrink_pass<true, T, RT>(p, ring, d, m0, c0, k_begin, k_end, acc);
    else
        shrink_pass<false, T, RT>(p, ring, d, m0, c0, k_begin, k_end, acc);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const uint32_t row = g + 8 * (e / 2), col = c0 + warp * 8 + 2 * t + e % 2;
        if (m0 + row < p.m && col < p.ldt && s_idx[row] == a) partial[size_t(m0 + row) * p.ldt + col] = acc[e];
    }
}

// Shared memory is declared once here: each instantiation declaring its own would add up.
template <typename T, typename RT>
__device__ __forceinline__ void multi_decode_dispatch(const LkFusedGemmMultiParams& p) {
    LK_DYNAMIC_SMEM(smem);
    T* ring = reinterpret_cast<T*>(smem);
    T* ts = ring + STAGES * STAGE;
    LK_SHARED(16, uint32_t, s_idx, [ROWS]);
    LK_SHARED(16, float, s_scale, [ROWS]);
    LK_SHARED(16, uint32_t, s_pass, [ROWS]);
    LK_SHARED(16, uint32_t, s_npass, [1]);
    list_rows(p, 0, s_idx, s_scale, s_pass, s_npass);
    constexpr uint32_t both = LK_ALIGNED_A | LK_ALIGNED_B;
    if ((p.flags & both) == both)
        multi_decode_impl<true, T, RT>(p, ring, ts, s_idx, s_scale, s_pass, s_npass);
    else
        multi_decode_impl<false, T, RT>(p, ring, ts, s_idx, s_scale, s_pass, s_npass);
}
template <typename T, typename RT>
__device__ __forceinline__ void multi_decode_shrink_dispatch(const LkFusedGemmMultiParams& p) {
    LK_DYNAMIC_SMEM(smem);
    T* ring = reinterpret_cast<T*>(smem);
    LK_SHARED(16, uint32_t, s_idx, [ROWS]);
    LK_SHARED(16, float, s_scale, [ROWS]);
    LK_SHARED(16, uint32_t, s_pass, [ROWS]);
    LK_SHARED(16, uint32_t, s_npass, [1]);
    const uint32_t col_groups = (p.ldt + COLS - 1) / COLS;
    const uint32_t m0 = blockIdx.x / col_groups * ROWS, c0 = blockIdx.x % col_groups * COLS;
    if (p.adapters != nullptr) {
        list_rows(p, m0, s_idx, s_scale, s_pass, s_npass);
    } else {  // launch::small_projection: every row has the one adapter (slot 0 of no table)
        if (threadIdx.x < ROWS) s_idx[threadIdx.x] = 0;
        if (threadIdx.x == 0) {
            s_pass[0] = 0;
            s_npass[0] = 1;
        }
        __syncthreads();
    }
    multi_decode_shrink_impl<T, RT>(p, ring, m0, c0, s_idx, s_pass, s_npass[0]);
}
}  // namespace

// "_f32ad": the set's adapters are f32, rounded to T as they are loaded (as in fused_gemm_multi).
#define LK_MULTI_DECODE(name, T, RT)                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) name(LkFusedGemmMultiParams p) {       \
        LK_KERNEL_ENTRY();                                                                       \
        multi_decode_dispatch<T, RT>(p);                                                         \
    }

LK_MULTI_DECODE(multi_decode_bf16, __nv_bfloat16, __nv_bfloat16)
LK_KERNEL_EXPORT(multi_decode_bf16, LkFusedGemmMultiParams)
LK_MULTI_DECODE(multi_decode_f16, __half, __half)
LK_KERNEL_EXPORT(multi_decode_f16, LkFusedGemmMultiParams)
LK_MULTI_DECODE(multi_decode_bf16_f32ad, __nv_bfloat16, float)
LK_KERNEL_EXPORT(multi_decode_bf16_f32ad, LkFusedGemmMultiParams)
LK_MULTI_DECODE(multi_decode_f16_f32ad, __half, float)
LK_KERNEL_EXPORT(multi_decode_f16_f32ad, LkFusedGemmMultiParams)

// The decode shrink (src/ops/multi.rs takes it for m ≤ LK_FUSED_GEMM_BM, one of fused_gemm_multi's row
// tiles): grid ceil(ldt / 32)·ceil(m / 16) × the most passes of a 16-row group × splits. Without an
// index and table (p.index, p.adapters null) it is the single-adapter projection T = X·Aᵀ of
// launch::small_projection (m ≤ LK_FUSED_GEMM_BM): A = p.arena (rank = p.ldt, LK_ALIGNED_R in p.flags),
// grid y 1.
// 3 blocks per SM, as many as the ring's shared memory allows on an H100. Seen with nvcc 13.0: without a
// block count ptxas gave the bf16/f16 kernels 56–64 registers and a few bytes of spills; with it, 106–152
// registers and none.
#define LK_MULTI_DECODE_SHRINK(name, T, RT)                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, 3) name(LkFusedGemmMultiParams p) {    \
        LK_KERNEL_ENTRY();                                                                       \
        multi_decode_shrink_dispatch<T, RT>(p);                                                  \
    }

LK_MULTI_DECODE_SHRINK(multi_decode_shrink_bf16, __nv_bfloat16, __nv_bfloat16)
LK_KERNEL_EXPORT(multi_decode_shrink_bf16, LkFusedGemmMultiParams)
LK_MULTI_DECODE_SHRINK(multi_decode_shrink_f16, __half, __half)
LK_KERNEL_EXPORT(multi_decode_shrink_f16, LkFusedGemmMultiParams)
LK_MULTI_DECODE_SHRINK(multi_decode_shrink_bf16_f32ad, __nv_bfloat16, float)
LK_KERNEL_EXPORT(multi_decode_shrink_bf16_f32ad, LkFusedGemmMultiParams)
LK_MULTI_DECODE_SHRINK(multi_decode_shrink_f16_f32ad, __half, float)
LK_KERNEL_EXPORT(multi_decode_shrink_f16_f32ad, LkFusedGemmMultiParams)
