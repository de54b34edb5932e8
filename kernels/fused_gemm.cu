// fused_gemm.cu: C = A·op(B) + s·L·op(R) (+ bias), the LoRA forward and dX in ONE tensor-core kernel.
//
//   forward ("nt"): Y  = X·W0ᵀ + s·T·Bᵀ      A = X (m×k),  B = W0 (n×k),  L = T (m×r), R = B (n×r)
//   dX      ("nn"): dX = dY·W0 + s·U·A       A = dY (m×k), B = W0 (k×n),  L = U (m×r), R = A (r×n)
//   T, U    ("nt"/"nn", rank 0): T = X·Aᵀ, U = dY·B as plain GEMMs with N = r.
//   dB, dA  ("tn", k = 0): dB = s·dYᵀ·T, dA = s·Uᵀ·X as the low-rank part alone, its "rank" being the
//           M tokens: L = dY or U read transposed (k-major tiles, ldmatrix.trans), R = T or X; split
//           over the tokens into fixed chunks (blockIdx.z) whose f32 partials lowrank_finalize adds in
//           order (deterministic, no atomics).
//
// The low-rank product is not a second GEMM: [A | L] · [B | R] is one GEMM over k + r, so the
// main loop simply runs ceil(r/32) extra k-tiles that read L and R instead of A and B. They run FIRST:
// acc = L·op(R), then acc *= s (exact f32 scaling of the whole low-rank sum), then the main tiles add
// A·op(B) on top. C is written once, there is no m×n temporary, and no second accumulator set.
//
// Tiles: 128×128 per block of 256 threads (8 warps as 2×4, 64×32 per warp = 4×4 mma.m16n8k16 tiles,
// 64 f32 accumulators per thread), BK = 32, a 3-stage cp.async pipeline (60 KiB dynamic shared memory).
// Rows are padded ([BM][40] for A, [BN][40] for nt-B, [BK][136] for nn-B and transposed A), which makes
// every ldmatrix phase hit 8 distinct 16-byte bank groups. nt-B is read with ldmatrix (rows = n),
// nn-B with ldmatrix.trans (rows = k): the same fragment comes out of both layouts; likewise A.
//
// Shapes: any m, n ≥ 1, k ≥ 0, any rank (k + rank ≥ 1). Out-of-range
// rows/columns are zero-filled (cp.async src-size), so ragged edges are exact. An operand whose base is
// not 16-byte aligned or whose leading dimension is not a multiple of 8 (flags bit clear) is loaded
// element by element into the same shared-memory tile: slower, same result.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int BM = LK_FUSED_GEMM_BM, BN = LK_FUSED_GEMM_BN, BK = 32, STAGES = 3;
constexpr int THREADS = LK_FUSED_GEMM_THREADS;
static_assert(BM == BN, "A and B tiles share one layout per storage order");
constexpr int ROW_LD = BK + 8;   // an outer-major tile [128][ROW_LD] (A, nt-B)
constexpr int KMAJ_LD = BM + 8;  // a k-major tile [BK][KMAJ_LD] (nn-B, transposed A)
constexpr int A_STAGE = BM * ROW_LD;
constexpr int B_STAGE = BN * ROW_LD;
static_assert(BK * KMAJ_LD <= A_STAGE && BK * KMAJ_LD <= B_STAGE, "k-major tiles fit the stages");
static_assert(STAGES * (A_STAGE + B_STAGE) * 2 == LK_FUSED_GEMM_SMEM_BYTES, "header and kernel agree");

// One 8-element (16-byte) chunk of row `row` starting at column `col` (both in the operand's own
// coordinates) into shared memory; zero outside rows < nrows, cols < ncols.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* base, uint32_t row, uint32_t nrows, uint32_t ld,
                                           uint32_t col, uint32_t ncols, bool vec) {
    const bool row_ok = row < nrows;
    if (vec) {
        const int bytes = (row_ok && col < ncols) ? int(min(8u, ncols - col)) * 2 : 0;
        const T* src = bytes > 0 ? base + size_t(row) * ld + col : base;  // never form an address past the data
        lk_cp_async_16(dst, src, bytes);
    } else {
        uint4 raw;
        uint16_t* e = reinterpret_cast<uint16_t*>(&raw);
        const T* src = base + size_t(row) * ld;
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i) {
            uint16_t bits = 0;
            if (row_ok && col + i < ncols) memcpy(&bits, &src[col + i], 2);
            e[i] = bits;
        }
        *lk_vec<uint4>(dst) = raw;
    }
}

// One operand's BK-wide k-slice into shared memory, 2 chunks of 8 elements per thread. `outer` is the
// operand's m (A, L) or n (B, R) dimension, 128 wide in the tile. Stored outer-major (KMAJOR false): 128
// rows of 4 chunks along k, tile [128][ROW_LD]; stored k-major: BK rows of 16 chunks along outer, tile
// [BK][KMAJ_LD]. Either way ldmatrix (.trans for k-major) yields the same fragments.
template <bool KMAJOR, typename T>
__device__ __forceinline__ void load_operand(T* dst, const T* src, uint32_t o0, uint32_t nouter, uint32_t ld,
                                             uint32_t k0, uint32_t kext, bool vec) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint32_t c = threadIdx.x + i * THREADS;
        if (!KMAJOR) {
            const uint32_t row = c / 4, kc = (c % 4) * 8;
            load_chunk(dst + row * ROW_LD + kc, src, o0 + row, nouter, ld, k0 + kc, kext, vec);
        } else {
            const uint32_t row = c / 16, oc = (c % 16) * 8;
            load_chunk(dst + row * KMAJ_LD + oc, src, k0 + row, kext, ld, o0 + oc, nouter, vec);
        }
    }
}

// Loads virtual k-tile `kt` (tiles < lt are low-rank tiles of L/R over [r_begin, r_end), the rest main
// tiles of A/B).
template <typename T, bool NN, bool TA>
__device__ __forceinline__ void load_tile(const LkFusedGemmParams& p, int kt, int lt, T* as, T* bs,
                                          uint32_t m0, uint32_t n0, uint32_t r_begin, uint32_t r_end) {
    const bool low = kt < lt;
    const T* a = static_cast<const T*>(low ? p.l : p.a);
    const T* b = static_cast<const T*>(low ? p.r : p.b);
    const uint32_t lda = low ? p.ldl : p.lda, ldb = low ? p.ldr : p.ldb;
    const uint32_t kext = low ? r_end : p.k;
    const uint32_t k0 = low ? r_begin + uint32_t(kt) * BK : uint32_t(kt - lt) * BK;
    const bool a_vec = p.flags & (low ? LK_ALIGNED_L : LK_ALIGNED_A);
    const bool b_vec = p.flags & (low ? LK_ALIGNED_R : LK_ALIGNED_B);
    load_operand<TA>(as, a, m0, p.m, lda, k0, kext, a_vec);
    load_operand<NN>(bs, b, n0, p.n, ldb, k0, kext, b_vec);
}

template <typename T> struct IsF16 { static constexpr bool value = false; };
template <> struct IsF16<__half> { static constexpr bool value = true; };

template <bool F16>
__device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    if (F16)
        lk_mma_m16n8k16_f16(d, a, b, d);
    else
        lk_mma_m16n8k16_bf16(d, a, b, d);
}

// acc *= s, once, over the low-rank sum (exact f32 scaling, before any main tile is added).
__device__ __forceinline__ void scale_acc(float (&acc)[4][4][4], float s) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] *= s;
}

template <typename T, bool NN, bool TA>
__device__ __forceinline__ void fused_gemm_impl(const LkFusedGemmParams& p) {
    constexpr bool F16 = IsF16<T>::value;
    LK_DYNAMIC_SMEM(smem);
    T* as_all = reinterpret_cast<T*>(smem);
    T* bs_all = as_all + STAGES * A_STAGE;
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const uint32_t wm = warp / 4, wn = warp % 4;
    const uint32_t m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    // the rank range of this block: all of it, or split z of a split reduction
    const uint32_t r_begin = p.rank_per_split ? blockIdx.z * p.rank_per_split : 0;
    const uint32_t r_end = p.rank_per_split ? min(p.rank, r_begin + p.rank_per_split) : p.rank;
    const int lt = int((r_end - r_begin + BK - 1) / BK);
    const int kt_total = lt + int((p.k + BK - 1) / BK);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < kt_total)
            load_tile<T, NN, TA>(p, s, lt, as_all + s * A_STAGE, bs_all + s * B_STAGE, m0, n0, r_begin, r_end);
        lk_cp_async_commit();
    }

    for (int kt = 0; kt < kt_total; ++kt) {
        lk_cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed ...
        __syncthreads();                 // ... everyone's, and everyone is done with tile kt - 1
        const int next = kt + STAGES - 1;
        if (next < kt_total)
            load_tile<T, NN, TA>(p, next, lt, as_all + (next % STAGES) * A_STAGE,
                                 bs_all + (next % STAGES) * B_STAGE, m0, n0, r_begin, r_end);
        lk_cp_async_commit();
        if (kt == lt) scale_acc(acc, p.scale);  // low-rank sum complete: scale it once, then the main GEMM
        const T* as = as_all + (kt % STAGES) * A_STAGE;
        const T* bs = bs_all + (kt % STAGES) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                if (!TA) {
                    lk_ldmatrix_x4(af[mi], as + (wm * 64 + mi * 16 + lane % 16) * ROW_LD + kk + (lane / 16) * 8);
                } else {  // matrices (m 0-7 | 8-15) × (k 0-7 | 8-15) from k-major rows, transposed
                    const uint32_t mat = lane / 8, rin = lane % 8;
                    lk_ldmatrix_x4_trans(af[mi],
                                         as + (kk + (mat >> 1) * 8 + rin) * KMAJ_LD + wm * 64 + mi * 16 + (mat & 1) * 8);
                }
            }
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                uint32_t r[4];
                const uint32_t mat = lane / 8, rin = lane % 8;
                if (!NN)
                    lk_ldmatrix_x4(r, bs + (wn * 32 + np * 16 + (mat >> 1) * 8 + rin) * ROW_LD + kk + (mat & 1) * 8);
                else
                    lk_ldmatrix_x4_trans(r, bs + (kk + (mat & 1) * 8 + rin) * KMAJ_LD + wn * 32 + np * 16 + (mat >> 1) * 8);
                bf[np * 2][0] = r[0];
                bf[np * 2][1] = r[1];
                bf[np * 2 + 1][0] = r[2];
                bf[np * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma<F16>(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    lk_cp_async_wait<0>();
    if (kt_total == lt) scale_acc(acc, p.scale);  // no main tiles (k = 0): the low-rank sum is all there is
    if (p.partial != nullptr) {  // split reduction: this chunk's f32 sums, no bias, no rounding
        float* part = p.partial + size_t(blockIdx.z) * p.m * p.n;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const uint32_t col = n0 + wn * 32 + ni * 8 + (lane % 4) * 2;
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t row = m0 + wm * 64 + mi * 16 + lane / 4 + h * 8;
                    if (row >= p.m) continue;
                    if (col < p.n) part[size_t(row) * p.n + col] = acc[mi][ni][2 * h];
                    if (col + 1 < p.n) part[size_t(row) * p.n + col + 1] = acc[mi][ni][2 * h + 1];
                }
        }
        return;
    }

    // Epilogue: bias, one rounding, one write of C. Fragment: c0,c1 at (g, 2t..2t+1), c2,c3 at (g+8, ...).
    T* c = static_cast<T*>(p.c);
    const T* bias = static_cast<const T*>(p.bias);
    const bool pair_ok = (p.ldc % 2 == 0) && ((reinterpret_cast<uintptr_t>(c) & 3u) == 0);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
        const uint32_t col = n0 + wn * 32 + ni * 8 + (lane % 4) * 2;
        float b0 = 0.0f, b1 = 0.0f;
        if (bias != nullptr) {
            if (col < p.n) b0 = lk_to_f32(bias[col]);
            if (col + 1 < p.n) b1 = lk_to_f32(bias[col + 1]);
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t row = m0 + wm * 64 + mi * 16 + lane / 4 + h * 8;
                if (row >= p.m || col >= p.n) continue;
                T* dst = c + size_t(row) * p.ldc + col;
                const T v0 = lk_from_f32<T>(acc[mi][ni][2 * h] + b0);
                const T v1 = lk_from_f32<T>(acc[mi][ni][2 * h + 1] + b1);
                if (pair_ok && col + 1 < p.n) {
                    uint32_t packed;
                    uint16_t lo, hi;
                    memcpy(&lo, &v0, 2);
                    memcpy(&hi, &v1, 2);
                    packed = uint32_t(lo) | (uint32_t(hi) << 16);
                    *lk_vec<uint32_t>(dst) = packed;
                } else {
                    dst[0] = v0;
                    if (col + 1 < p.n) dst[1] = v1;
                }
            }
        }
    }
}
}  // namespace

// Registers for two blocks per SM (2 × 256 threads × ≤ 128 registers); shared memory allows two on sm_80
// and sm_90 (2 × 60 KiB), one on sm_86/89 (100 KB per SM).
#define LK_FUSED_GEMM(name, T, NN, TA)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(LkFusedGemmParams p) { \
        fused_gemm_impl<T, NN, TA>(p);                                                \
    }

LK_FUSED_GEMM(fused_gemm_nt_bf16, __nv_bfloat16, false, false)
LK_KERNEL_EXPORT(fused_gemm_nt_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_f16, __half, false, false)
LK_KERNEL_EXPORT(fused_gemm_nt_f16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_bf16, __nv_bfloat16, true, false)
LK_KERNEL_EXPORT(fused_gemm_nn_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_f16, __half, true, false)
LK_KERNEL_EXPORT(fused_gemm_nn_f16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_tn_bf16, __nv_bfloat16, true, true)
LK_KERNEL_EXPORT(fused_gemm_tn_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_tn_f16, __half, true, true)
LK_KERNEL_EXPORT(fused_gemm_tn_f16, LkFusedGemmParams)
