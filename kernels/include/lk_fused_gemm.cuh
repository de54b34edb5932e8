// lk_fused_gemm.cuh: the machinery of the fused tensor-core GEMM, shared by fused_gemm.cu (one adapter)
// and fused_gemm_multi.cu (a set of adapters, one per row): tile constants, the operand loaders, the
// mma over one k-tile, the bounds-check-free cursors, the pipelined k loop over a low-rank phase and a
// main phase, and the two epilogues (rounded C through shared memory; f32 partial sums). The design and
// its reasons are in fused_gemm.cu's header comment.
#pragma once
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int BM = LK_FUSED_GEMM_BM, BK = 32, STAGES = 3;
constexpr int THREADS = LK_FUSED_GEMM_THREADS;
constexpr int ROW_LD = BK + 8;  // an outer-major tile [outer][ROW_LD] (A, nt-B)
constexpr int A_STAGE = BM * ROW_LD;
constexpr uint32_t GROUP_M = 8;  // tile rows per group of the grouped block order
// An operand tile `outer` wide (BM for A, the tile's width for B): its 16-byte chunks per thread per
// k-tile, and the row pitch of its k-major form [BK][outer + 8] (nn-B)
__host__ __device__ constexpr int chunks_per_thread(int outer) { return outer * BK / 8 / THREADS; }
__host__ __device__ constexpr int kmajor_ld(int outer) { return outer + 8; }

// The tile's width: the 4 warps across it take NI n8 mma tiles each, 32·NI columns of C per block:
// NI = 4 is the 128-column tile, NI = 2 the 64-column one that doubles the blocks where the 128-column
// tiles leave SMs idle (src/ops/launch.rs mma_tile_columns). Every element of C is the same chain of
// mma k16 steps at either width, so both give the same bits.
template <int NI>
struct Width {
    static constexpr int BN = 32 * NI;          // columns of C per block
    static constexpr int WN = 8 * NI;           // columns per warp
    static constexpr int KMAJ_LD = kmajor_ld(BN);
    static constexpr int B_STAGE = BN * ROW_LD;
    static constexpr int C_LD = BN + 8;         // the staged C tile [BM][C_LD] of the epilogue
    static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
    static_assert(NI == 2 || NI == 4, "B's fragments come in pairs of n8 tiles; 64 or 128 columns");
    static_assert(BK * KMAJ_LD <= B_STAGE, "k-major tiles fit the stages");
    static_assert(BM * C_LD * 2 <= SMEM_BYTES && (C_LD * 2) % 16 == 0, "C tile fits, rows 16-B aligned");
};
constexpr int WIDE_NI = LK_FUSED_GEMM_BN / 32, NARROW_NI = LK_FUSED_GEMM_NARROW_BN / 32;
using Wide = Width<WIDE_NI>;
using Narrow = Width<NARROW_NI>;
static_assert(BM == Wide::BN, "A and the wide B tiles share one layout per storage order");
static_assert(Wide::SMEM_BYTES == LK_FUSED_GEMM_SMEM_BYTES && Narrow::SMEM_BYTES == LK_FUSED_GEMM_NARROW_SMEM_BYTES,
              "header and kernel agree");

// One operand's BK-wide k-slice into shared memory, OUTER·BK/8/THREADS chunks of 8 elements per thread.
// `outer` is the operand's m (A, L) or n (B, R) dimension, OUTER wide in the tile (BM, or the tile's
// width for B). Stored outer-major (KMAJOR false): OUTER rows of 4 chunks along k, tile [OUTER][ROW_LD];
// stored k-major: BK rows of OUTER/8 chunks along outer, tile [BK][OUTER + 8]. Either way ldmatrix
// (.trans for k-major) yields the same fragments. The source is S = T (copied as it is), or f32 (R of the
// "_f32ad" kernels: rounded to T on the way); DROP: the chunk is masked by the dropout (L = X of the
// projection; outer-major only).
template <bool KMAJOR, int OUTER, bool VEC, bool DROP, typename T, typename S>
__device__ __forceinline__ void load_operand_chunk(T* dst, const S* src, uint32_t o0, uint32_t nouter, uint32_t ld,
                                                   uint32_t k0, uint32_t kext, uint32_t c, const LkDropout& d) {
    if constexpr (!KMAJOR) {
        const uint32_t row = c / 4, kc = (c % 4) * 8;
        if constexpr (DROP)
            lk_load_chunk_dropout<VEC>(dst + row * ROW_LD + kc, src, o0 + row, nouter, ld, k0 + kc, kext, d);
        else
            lk_load_chunk<VEC>(dst + row * ROW_LD + kc, src, o0 + row, nouter, ld, k0 + kc, kext);
    } else {
        static_assert(!DROP, "the dropout operand is outer-major");
        constexpr uint32_t per_row = OUTER / 8, ld_s = kmajor_ld(OUTER);
        const uint32_t row = c / per_row, oc = (c % per_row) * 8;
        lk_load_chunk<VEC>(dst + row * ld_s + oc, src, k0 + row, kext, ld, o0 + oc, nouter);
    }
}
template <bool KMAJOR, int OUTER, bool VEC, bool DROP, typename T, typename S>
__device__ __forceinline__ void load_operand(T* dst, const S* src, uint32_t o0, uint32_t nouter, uint32_t ld,
                                             uint32_t k0, uint32_t kext, const LkDropout& d) {
    constexpr int chunks = chunks_per_thread(OUTER);
    static_assert(chunks * 8 * THREADS == OUTER * BK, "whole chunks per thread");
    if (VEC) {
#pragma unroll
        for (int i = 0; i < chunks; ++i)
            load_operand_chunk<KMAJOR, OUTER, VEC, DROP>(dst, src, o0, nouter, ld, k0, kext,
                                                         threadIdx.x + i * THREADS, d);
    } else {  // one chunk at a time: 8 loads in flight, not 16 (the registers are taken by the accumulators)
#pragma unroll 1
        for (int i = 0; i < chunks; ++i)
            load_operand_chunk<KMAJOR, OUTER, VEC, DROP>(dst, src, o0, nouter, ld, k0, kext,
                                                         threadIdx.x + i * THREADS, d);
    }
}

// The operands of one phase of the k loop: the low-rank tiles (L, R over k in [r_begin, r_end)) or the
// main tiles (A, B over [0, k)). Within a phase nothing about the source changes from tile to tile. SB:
// the n-side operand's storage (f32 for the low phase's R of the "_f32ad" kernels); DROP: the m-side
// operand is masked by the dropout as it is loaded.
template <typename T, typename SB, bool DROP>
struct Phase {
    const T* a;   // A or L (m side)
    const SB* b;  // B or R (n side)
    uint32_t lda, ldb, k_begin, k_end;
    // copied with cp.async as they are: the bounds-check-free Cursor path applies
    static constexpr bool plain = lk_same<T, SB>::value && !DROP;
};

template <bool NN, bool VEC, int NI, typename T, typename SB, bool DROP>
__device__ __forceinline__ void load_tile(const Phase<T, SB, DROP>& ph, int j, T* as, T* bs, uint32_t m0, uint32_t n0,
                                          uint32_t m, uint32_t n, const LkDropout& d) {
    const uint32_t k0 = ph.k_begin + uint32_t(j) * BK;
    load_operand<false, BM, VEC, DROP>(as, ph.a, m0, m, ph.lda, k0, ph.k_end, d);
    load_operand<NN, Width<NI>::BN, VEC, false>(bs, ph.b, n0, n, ph.ldb, k0, ph.k_end, d);
}

// threadIdx.x, read anew: the epilogue's indices are recomputed after the k loop instead of being held
// in registers across it (where every register is taken).
__device__ __forceinline__ uint32_t fresh_tid() {
#ifdef LK_EMU
    return threadIdx.x;
#else
    uint32_t t;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
    return t;
#endif
}

// acc *= s, once, over the low-rank sum (exact f32 scaling, before any main tile is added).
template <int NI>
__device__ __forceinline__ void scale_acc(float (&acc)[4][NI][4], float s) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] *= s;
}

// The dropout form of scale_acc (LK_DROPOUT_ACC, dX): acc *= s where C's element (row, col) is kept
// (element index row·n + col of X, whose shape dX has), 0 where it is dropped; s includes 1/(1 − p).
// A fragment pair (col even) shares one generator call when its index is even, as it is for even n.
template <int NI>
__device__ __forceinline__ void scale_acc_dropout(float (&acc)[4][NI][4], float s, const LkDropout& d, uint32_t m0,
                                               uint32_t n0, uint32_t n) {
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    const uint64_t offset = lk_dropout_offset(d);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint64_t row = m0 + wm * 64 + mi * 16 + lane / 4 + h * 8;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const uint64_t e = row * n + n0 + wn * Width<NI>::WN + ni * 8 + (lane % 4) * 2;
                bool k0, k1;
                if (e % 2 == 0) {
                    const LkPhiloxWords w = lk_dropout_words_at(d, offset, e / 4);
                    const bool hi = e % 4 != 0;  // the pair is words 0, 1 or words 2, 3
                    k0 = (hi ? w.w[2] : w.w[0]) >= d.threshold;
                    k1 = (hi ? w.w[3] : w.w[1]) >= d.threshold;
                } else {
                    k0 = lk_dropout_keep_at(d, offset, e);
                    k1 = lk_dropout_keep_at(d, offset, e + 1);
                }
                // a dropped element contributes exactly 0 (not 0·acc, which is NaN for an infinite acc)
                acc[mi][ni][2 * h] = k0 ? acc[mi][ni][2 * h] * s : 0.0f;
                acc[mi][ni][2 * h + 1] = k1 ? acc[mi][ni][2 * h + 1] * s : 0.0f;
            }
        }
}

// acc += the BK-deep product of the A and B tiles in shared memory (this warp's 64×8·NI).
template <typename T, bool NN, int NI>
__device__ __forceinline__ void mma_tile(float (&acc)[4][NI][4], const T* as, const T* bs, uint32_t lane,
                                         uint32_t wm, uint32_t wn) {
    constexpr int WN = Width<NI>::WN, KMAJ_LD = Width<NI>::KMAJ_LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        uint32_t af[4][4], bf[NI][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
            lk_ldmatrix_x4(af[mi], as + (wm * 64 + mi * 16 + lane % 16) * ROW_LD + kk + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < NI / 2; ++np) {
            uint32_t r[4];
            const uint32_t mat = lane / 8, rin = lane % 8;
            if (!NN)
                lk_ldmatrix_x4(r, bs + (wn * WN + np * 16 + (mat >> 1) * 8 + rin) * ROW_LD + kk + (mat & 1) * 8);
            else
                lk_ldmatrix_x4_trans(r, bs + (kk + (mat & 1) * 8 + rin) * KMAJ_LD + wn * WN + np * 16 + (mat >> 1) * 8);
            bf[np * 2][0] = r[0];
            bf[np * 2][1] = r[1];
            bf[np * 2 + 1][0] = r[2];
            bf[np * 2 + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) lk_mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni]);
    }
}

// This thread's 16-byte chunks of one operand, OUTER wide (the same places load_operand<KMAJOR, OUTER>
// copies: two for the 128-wide tiles, one for the 64-wide B tile), walked k-tile by k-tile without bounds
// checks: for tiles wholly inside the operand (an interior block, a phase whose extent is a multiple of
// BK) and vector loads only.
template <bool KMAJOR, int OUTER, typename T>
struct Cursor {
    static constexpr int CHUNKS = chunks_per_thread(OUTER);
    static_assert(CHUNKS == 1 || CHUNKS == 2, "one or two chunks per thread");
    const T* src0;
    const T* src1;
    size_t step;  // elements from one k-tile to the next
    uint32_t dst0, dst1;  // the chunks' offsets in a stage
    __device__ __forceinline__ Cursor(const T* base, uint32_t o0, uint32_t ld, uint32_t k0) {
        const uint32_t c = threadIdx.x;
        // chunk 1 (two chunks only; one chunk leaves src1 null, not a pointer past the tile)
        size_t next = 0;
        uint32_t next_dst = 0;
        if (!KMAJOR) {  // OUTER rows of 4 chunks along k; chunk 1 is THREADS/4 rows further down
            const uint32_t row = c / 4, kc = (c % 4) * 8;
            src0 = base + size_t(o0 + row) * ld + k0 + kc;
            next = size_t(THREADS / 4) * ld;
            step = BK;
            dst0 = row * ROW_LD + kc;
            next_dst = (THREADS / 4) * ROW_LD;
        } else {  // BK k-rows of OUTER/8 chunks along outer; chunk 1 is THREADS/(OUTER/8) k-rows further down
            constexpr uint32_t per_row = OUTER / 8, ld_s = kmajor_ld(OUTER);
            const uint32_t row = c / per_row, oc = (c % per_row) * 8;
            src0 = base + size_t(k0 + row) * ld + o0 + oc;
            next = size_t(THREADS / per_row) * ld;
            step = size_t(BK) * ld;
            dst0 = row * ld_s + oc;
            next_dst = (THREADS / per_row) * ld_s;
        }
        src1 = CHUNKS == 2 ? src0 + next : nullptr;
        dst1 = dst0 + next_dst;
    }
    __device__ __forceinline__ void load(T* stage) {
        lk_cp_async_16(stage + dst0, src0, 16);
        src0 += step;
        if constexpr (CHUNKS == 2) {
            lk_cp_async_16(stage + dst1, src1, 16);
            src1 += step;
        }
    }
};

// The whole k loop of one block: acc = s·L·op(R) + A·op(B) over the virtual k-tiles 0 .. total-1 (tiles
// < lt low-rank from `low`, the rest main from `main`; `after_low` scales the low-rank sum in between), through the STAGES-deep cp.async ring. Iteration t waits for tile t,
// refills the stage tile t-1 used with tile t + STAGES-1, and multiplies tile t. Which phase that refill
// reads only depends on t, so the iterations are cut into runs with one fixed refill source each: the
// two loops (low refilling low, main refilling main) have no operand choice left in them, and where the
// block's tiles lie wholly inside the operands (`full_*`) they walk precomputed source pointers with no
// bounds checks. The at most STAGES-1 iterations around each boundary are unrolled, with checked loads.
template <bool NN, bool VEC, typename T, typename LP, typename MP, typename AfterLow, int NI>
__device__ __forceinline__ void k_loop(const LP& low, const MP& main, int lt, bool low_full, float (&acc)[4][NI][4],
                                       T* as_all, T* bs_all, uint32_t m0, uint32_t n0, uint32_t m, uint32_t n,
                                       bool interior, const LkDropout& dropout, AfterLow after_low) {
    constexpr int AHEAD = STAGES - 1, B_STAGE = Width<NI>::B_STAGE;
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const uint32_t wm = warp / 4, wn = warp % 4;
    const int total = lt + int((main.k_end - main.k_begin + BK - 1) / BK);
    auto refill = [&](const auto& ph, int j, int t) {  // tile t (phase tile j) into its stage, checked
        load_tile<NN, VEC, NI>(ph, j, as_all + (t % STAGES) * A_STAGE, bs_all + (t % STAGES) * B_STAGE, m0, n0, m, n,
                           dropout);
    };
    auto wait_tile = [&]() {
        lk_cp_async_wait<STAGES - 2>();  // this thread's copies of tile t have landed ...
        __syncthreads();                 // ... everyone's, and everyone is done with tile t - 1
    };
    auto multiply = [&](int t) {
        lk_cp_async_commit();
        mma_tile<T, NN>(acc, as_all + (t % STAGES) * A_STAGE, bs_all + (t % STAGES) * B_STAGE, lane, wm, wn);
    };
    // Iterations [t0, t1) refilling from `ph` (tile t + AHEAD is its tile t + AHEAD - first).
    auto run = [&](const auto& ph, int t0, int t1, int first, bool full) {
        if constexpr (VEC && lk_remove_cvref<decltype(ph)>::type::plain) {
            if (full) {
            Cursor<false, BM, T> ca(ph.a, m0, ph.lda, ph.k_begin + uint32_t(t0 + AHEAD - first) * BK);
            Cursor<NN, Width<NI>::BN, T> cb(ph.b, n0, ph.ldb, ph.k_begin + uint32_t(t0 + AHEAD - first) * BK);
            int rd = t0 % STAGES;  // the stage of tile t; tile t + AHEAD goes to the one before it
            for (int t = t0; t < t1; ++t) {
                wait_tile();
                const int wr = rd == 0 ? STAGES - 1 : rd - 1;
                ca.load(as_all + wr * A_STAGE);
                cb.load(bs_all + wr * B_STAGE);
                lk_cp_async_commit();
                mma_tile<T, NN>(acc, as_all + rd * A_STAGE, bs_all + rd * B_STAGE, lane, wm, wn);
                rd = rd == STAGES - 1 ? 0 : rd + 1;
            }
            return;
            }
        }
        for (int t = t0; t < t1; ++t) {
            wait_tile();
            refill(ph, t + AHEAD - first, t + AHEAD);
            multiply(t);
        }
    };

#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < lt)
            refill(low, s, s);
        else if (s < total)
            refill(main, s - lt, s);
        lk_cp_async_commit();
    }
    const int low_refills_low = max(lt - AHEAD, 0);    // iterations whose refill is a low-rank tile
    const int main_refills_end = max(total - AHEAD, 0);  // iterations t < this refill at all
    // 1. low-rank tiles, refilling low-rank tiles
    run(low, 0, low_refills_low, 0, low_full);
    // 2. the last (at most AHEAD) low-rank tiles, refilling the first main tiles
#pragma unroll
    for (int i = 0; i < AHEAD; ++i) {
        const int t = low_refills_low + i;
        if (t < lt) {
            wait_tile();
            if (t + AHEAD < total) refill(main, t + AHEAD - lt, t + AHEAD);
            multiply(t);
        }
    }
    // the low-rank sum is complete: scale it once (the caller's rule), then the main GEMM on top
    after_low();
    // 3. main tiles, refilling main tiles
    run(main, lt, main_refills_end, lt, interior && (main.k_end - main.k_begin) % BK == 0);
    // 4. the last (at most AHEAD) main tiles: nothing left to refill
#pragma unroll
    for (int i = 0; i < AHEAD; ++i) {
        const int t = max(lt, main_refills_end) + i;
        if (t < total) {
            wait_tile();
            multiply(t);
        }
    }
    lk_cp_async_wait<0>();
}

// The output tile of this block (BM × Width<NI>::BN): blockIdx.x walks GROUP_M tile rows down one tile
// column before moving right, so the blocks running at the same time share their B (W0) tiles, and their
// A tiles, in L2.
template <int NI>
__device__ __forceinline__ void grouped_tile(uint32_t m, uint32_t n, uint32_t& m0, uint32_t& n0) {
    constexpr uint32_t TBN = Width<NI>::BN;
    const uint32_t tiles_m = (m + BM - 1) / BM, tiles_n = (n + TBN - 1) / TBN;
    const uint32_t per_group = GROUP_M * tiles_n, group = blockIdx.x / per_group;
    const uint32_t first_m = group * GROUP_M, group_rows = min(tiles_m - first_m, uint32_t(GROUP_M));
    const uint32_t in_group = blockIdx.x - group * per_group;
    m0 = (first_m + in_group % group_rows) * BM;
    n0 = (in_group / group_rows) * TBN;
}

template <int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[4][NI][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
}

// Every row of the tile is written (store_partial's default).
struct AllRows {
    __device__ __forceinline__ bool operator()(uint32_t) const { return true; }
};

// This thread's accumulators as f32 partial sums of a split reduction: part (m × n, dense), no bias, no
// rounding; only the rows (offsets in the tile) that `mine` accepts.
template <int NI, typename Mine = AllRows>
__device__ __forceinline__ void store_partial(const float (&acc)[4][NI][4], float* part, uint32_t m, uint32_t n,
                                              uint32_t m0, uint32_t n0, Mine mine = Mine()) {
    const uint32_t tid = fresh_tid(), lane = tid % 32, warp = tid / 32;
    const uint32_t wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
        const uint32_t col = n0 + wn * Width<NI>::WN + ni * 8 + (lane % 4) * 2;
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t tr = wm * 64 + mi * 16 + lane / 4 + h * 8, row = m0 + tr;
                if (row >= m || !mine(tr)) continue;
                if (col < n) part[size_t(row) * n + col] = acc[mi][ni][2 * h];
                if (col + 1 < n) part[size_t(row) * n + col + 1] = acc[mi][ni][2 * h + 1];
            }
    }
}

// Epilogue: bias, one rounding, the C tile staged in shared memory (the pipeline's, `smem`, free once
// every warp is past its last tile), then written row by row in 16-byte chunks. Fragment: c0,c1 at
// (g, 2t..2t+1), c2,c3 at (g+8, ...); the staged rows are C_LD apart, so a warp's 32-bit stores of one
// fragment hit 32 distinct banks.
template <typename T, int NI>
__device__ __forceinline__ void store_c(const float (&acc)[4][NI][4], T* smem, T* c, uint32_t ldc, const T* bias,
                                        uint32_t m, uint32_t n, uint32_t m0, uint32_t n0) {
    constexpr int TBN = Width<NI>::BN, C_LD = Width<NI>::C_LD;
    const uint32_t tid = fresh_tid(), lane = tid % 32, warp = tid / 32;
    const uint32_t wm = warp / 4, wn = warp % 4;
    __syncthreads();
    T* cs = smem;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
        const uint32_t cc = wn * Width<NI>::WN + ni * 8 + (lane % 4) * 2, col = n0 + cc;
        float b0 = 0.0f, b1 = 0.0f;
        if (bias != nullptr) {
            if (col < n) b0 = lk_to_f32(bias[col]);
            if (col + 1 < n) b1 = lk_to_f32(bias[col + 1]);
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t cr = wm * 64 + mi * 16 + lane / 4 + h * 8;
                const T v0 = lk_from_f32<T>(acc[mi][ni][2 * h] + b0);
                const T v1 = lk_from_f32<T>(acc[mi][ni][2 * h + 1] + b1);
                uint16_t lo, hi;
                memcpy(&lo, &v0, 2);
                memcpy(&hi, &v1, 2);
                *lk_vec<uint32_t>(cs + cr * C_LD + cc) = uint32_t(lo) | (uint32_t(hi) << 16);
            }
        }
    }
    __syncthreads();
    // 16-byte stores where the rows allow them (ldc % 8 == 0, aligned base) and the chunk is whole; element
    // stores at a ragged right edge or on a misaligned C.
    const bool vec_c = ldc % 8 == 0 && lk_is_aligned16(c);
#pragma unroll
    for (int i = 0; i < BM * TBN / 8 / THREADS; ++i) {
        const uint32_t chunk = tid + i * THREADS, cr = chunk / (TBN / 8), cc = (chunk % (TBN / 8)) * 8;
        const uint32_t row = m0 + cr, col = n0 + cc;
        if (row >= m || col >= n) continue;
        const uint4 v = *lk_vec<uint4>(cs + cr * C_LD + cc);
        T* dst = c + size_t(row) * ldc + col;
        if (vec_c && col + 8 <= n) {
            *lk_vec<uint4>(dst) = v;
        } else {
            const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (uint32_t j = 0; j < 8; ++j)
                if (col + j < n) dst[j] = e[j];
        }
    }
}
}  // namespace
