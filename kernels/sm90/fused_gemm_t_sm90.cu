// fused_gemm_t_sm90.cu: the LoRA forward on Hopper (sm_90a) in one launch: Y = X·W0ᵀ + (s·T)·Bᵀ (+ bias)
// with T = X·Aᵀ computed here, from the X tiles the GEMM streams anyway, and written out for the backward;
// and the backward's dX the same way ("nn", kernels fused_gemm_u<TN>_sm90_nn*): dX = dY·W0 + (s·U)·A with
// U = dY·B computed from the dY tiles, and dB's and dA's partial sums too. fused_gemm_sm90.cu's kernels take
// T or U from a separate launch instead (ranks above 32, or LK_FUSED_GEMM=sm90-projection; dropout runs on
// the mma.sync kernels).
//
// Why: with the projection as its own launch the forward is that launch (X read once more, f32 partials,
// their finalize) plus the GEMM; docs/perf/bound.md has the time it leaves the GEMM. Here the only extra
// work is T's own product, and the schedule keeps it small:
// - Each persistent CTA takes a contiguous run of ceil(tiles / CTAs) tiles in row-major tile order (not
//   the grouped order of fused_gemm_sm90.cu). It computes T for a row block on the first tile of its run
//   and on every tile that starts a row block (column tile 0), and keeps it in registers for the rest of
//   the row block: T is computed once per run and per row block start, about twice per row block where a
//   run is at least a row block long (the headline shape: runs of 8 tiles, 16 per row block), once per tile
//   where there are no more tiles than SMs (TN/BN more tensor work per tile then).
// - On those tiles each main stage also carries the LoRA A's TN×64 slice (TN: the rank rounded up to 16
//   or 32; rows past the rank are TMA's zeros), and each consumer adds an m64nTNk16 wgmma per k16 step on
//   the X slice already in shared memory. T's accumulators are rounded to the layer dtype (T, written by
//   the tile of column 0, the one tile of each row block that writes it), scaled by s and rounded again
//   (exact when s is a power of two), and packed in registers as the A fragments of the last stage.
// - After the main stages, one more stage brings the LoRA B's BN×64 box (rank columns past r are zeros),
//   and TN/16 register-A wgmmas add (s·T)·Bᵀ onto X·W0ᵀ: acc = X·W0ᵀ + (s·T)·Bᵀ, + bias, one rounding.
//   Every main stage's group is retired first (wait<0>), as the low-rank stages' are in fused_gemm_sm90.cu.
//   The order is fixed for every tile whatever the schedule, so Y's and T's bits do not depend on the
//   number of SMs. (fused_gemm.cu and fused_gemm_sm90.cu add s·(T·Bᵀ) first, after the projection's
//   chunked T: the paths' bits differ, within the tolerances; which path runs depends on the rank alone,
//   ops/sm90.rs.)
// dX ("nn") is the same schedule with dY for X, U for T and the LoRA B and A swapped: W0's stage is
// BN/64 64×64 boxes read MN-major (as in fused_gemm_sm90.cu), B's TN×64 slice (rows k0.. of [n][rank]) is
// read MN-major in the 32- or 64-byte swizzle (U_ROW_BYTES), and the last stage brings A's BN/64 64×64
// boxes (rank rows past r are zeros), MN-major. The order is acc = dY·W0 + (s·U)·A (fused_gemm_sm90.cu's is
// s·(U·A) first; U itself is summed in one chain here, in the backward pass's row splits there). dX also
// computes dB's partial sums (TN = 16 or 32 wide: the rank padded): on each row block's tile of column 0, per
// stage, P = dYᵀ·T over the block's 128 rows for the stage's 64 columns of dY (issue_db: dY's box MN-major
// as A, the row block's T tile, brought by TMA after the output tile on the tail mbarriers, MN-major as B),
// the stages alternating between the consumers; each stores its P (f32, db_partial[row block][column][r])
// in its next stage, which waits for all its groups first (consume_stage_db), and lowrank_finalize adds
// the row blocks in order. It computes dA's partial sums too: on every tile, after its last stage, BN/128
// more stages each bring two of the layer input X's 128×64 boxes (the tile's columns, rows m0..; da_x_map),
// one per consumer, which adds Q = Xᵀ·U for the box's 64 columns over the row block's rows (the same
// m64nTNk128 product: X's box MN-major as A, the U tile as B) and writes it to da_partial[row block][r]
// [column] (consume_stage_da), added in order by lowrank_finalize. The U tile (128×TN, after T's, the 32- or
// 64-byte swizzle) holds the rounded U of the row block: each consumer stores its 64 rows where U is
// computed (finish_t), fences them to the async proxy and arrives on u_full, which both wait on before the
// first dA stage; before the next row block's U is stored, both wait on u_free, which they arrive on after
// the last dA stage of the tile before it. T's and U's 128×32 tiles would not fit beside the 128×256 ring:
// the U32 kernels have the narrow tiles alone, with 4 stages (ops/sm90.rs takes them at every M).
// Everything else (the producer warpgroup, the ring of full/empty mbarriers, the two consumers, the
// epilogue through shared memory and TMA stores) is fused_gemm_sm90.cu's, from lk_sm90_gemm.cuh.
// Tiles: fused_gemm_sm90.cu's two widths, 128×256 (3 stages of 16 + 32 KB + TN·128 bytes, the 64 KB output
// tile, 2 KB: 222 KB at TN = 32) and 128×128 (5 stages of 16 + 16 KB + TN·128 bytes, not 6: 214 KB at
// TN = 32), whichever ops/sm90.rs sm90_tile picks; the width does not change the bits.
// Tiles with the T and U tiles: the U16 kernels 8 KB more after the output tile (224 KB wide, 212 KB narrow);
// the U32 kernels, 128×128 only, 4 stages and 16 KB more (194 KB).
// Requirements the host checks (ops/sm90.rs): k and rank (and for dX n) multiples of 8, rank ≤ 32, 16-byte
// aligned operands, adapters in the layer dtype, no dropout, k > 0.
#include "lk_sm90_gemm.cuh"

namespace {
using namespace lk_sm90_gemm;

// The rings: fused_gemm_sm90.cu's tile widths, each slot with A's TN×64 slice after W0's box (the narrow
// tiles with 5 stages instead of 6: six do not fit with the slices).
template <uint32_t TN>
using WideT = Width<LK_SM90_BN, LK_SM90_STAGES, TN == 16 ? LK_SM90_T16_SMEM_BYTES : LK_SM90_T32_SMEM_BYTES,
                    TN * BK * 2>;
template <uint32_t TN>
using NarrowT = Width<LK_SM90_NARROW_BN, LK_SM90_T_NARROW_STAGES,
                      TN == 16 ? LK_SM90_T16_NARROW_SMEM_BYTES : LK_SM90_T32_NARROW_SMEM_BYTES, TN * BK * 2>;

// dX's slice of the LoRA B (rows k0.. of [n][rank], TN columns) is read MN-major: TN·2-byte rows (32 or 64,
// one swizzle span: the TMA map's swizzle and the descriptor's are 32- or 64-byte), 8 rows SBO apart, each
// k16 step 16 rows further; the TN columns are one swizzle atom, so LBO is unused (0).
template <uint32_t TN>
constexpr uint32_t U_ROW_BYTES = TN * 2;
template <uint32_t TN>
constexpr uint32_t U_SWIZZLE = TN == 16 ? LK_WGMMA_SWIZZLE_32B : LK_WGMMA_SWIZZLE_64B;
static_assert(U_ROW_BYTES<16> == 32 && U_ROW_BYTES<32> == 64, "a row is one 32- or 64-byte swizzle span");

// dX also computes dB's and dA's per-row-block partial sums P = dYᵀ·T and Q = Uᵀ·X (see the header
// comment): the row block's T tile, 128 rows × TN columns (TN·2-byte rows, the 32- or 64-byte swizzle:
// U_ROW_BYTES, U_SWIZZLE), sits after the output tile, and the U tile, the same shape, after it.
template <uint32_t TN>
constexpr uint32_t T_TILE_BYTES = BM * TN * 2;
template <uint32_t TN>
constexpr uint32_t GRAD_TAIL_BYTES = 2 * T_TILE_BYTES<TN>;  // T's tile, then U's
static_assert(T_TILE_BYTES<16> % 1024 == 0 && T_TILE_BYTES<32> % 1024 == 0,
              "U's tile after T's on the swizzles' period (the stores compute the swizzle from the tile's offsets)");
// dX with the gradients' partials: at TN = 16 both widths; at TN = 32 the narrow tiles with 4 stages (the
// wide ring has no room for the two 8 KB tiles; ops/sm90.rs takes the narrow tiles there)
template <uint32_t TN>
struct WideUOf;  // TN = 16 alone
template <>
struct WideUOf<16> {
    using type = Width<LK_SM90_BN, LK_SM90_STAGES, LK_SM90_U16_SMEM_BYTES, 16 * BK * 2, GRAD_TAIL_BYTES<16>>;
};
template <uint32_t TN>
using WideU = typename WideUOf<TN>::type;
template <uint32_t TN>
struct NarrowUOf {
    static_assert(TN == 32, "the U kernels are 16 or 32 wide");
    using type = Width<LK_SM90_NARROW_BN, LK_SM90_U32_NARROW_STAGES, LK_SM90_U32_NARROW_SMEM_BYTES, TN * BK * 2,
                       GRAD_TAIL_BYTES<TN>>;
};
template <>
struct NarrowUOf<16> {
    using type = Width<LK_SM90_NARROW_BN, LK_SM90_T_NARROW_STAGES, LK_SM90_U16_NARROW_SMEM_BYTES, 16 * BK * 2,
                       GRAD_TAIL_BYTES<16>>;
};
template <uint32_t TN>
using NarrowU = typename NarrowUOf<TN>::type;

// This CTA's run of tiles [first, end): ceil(tiles / CTAs) consecutive ones in row-major order.
__device__ __forceinline__ void run_of(uint32_t tiles, uint32_t& first, uint32_t& end) {
    const uint32_t per = (tiles + gridDim.x - 1) / gridDim.x;
    first = min(blockIdx.x * per, tiles);
    end = min(first + per, tiles);
}

// A main stage that also accumulates T: consume_stage's four k16 steps of X·W0ᵀ, each followed by the
// m64nTNk16 step of X·Aᵀ on the same X slice (A's TN×64 slice after W0's box in the slot); for "nn" those
// of dY·W0 and U = dY·B.
template <typename T, bool NN, typename W, uint32_t TN>
__device__ __forceinline__ void issue_stage_t(const unsigned char* a, const unsigned char* b, const unsigned char* l,
                                              float (&acc)[W::BN / 2], float (&tacc)[TN / 2], bool accumulate) {
    constexpr uint32_t BN = W::BN;
#pragma unroll
    for (uint32_t kk = 0; kk < BK / 16; ++kk) {
        const uint64_t da = lk_wgmma_desc(a + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B);
        if (NN) {  // W0's 64×64 boxes and B's 64×TN slice, both MN-major (see U_ROW_BYTES)
            lk_wgmma_ss<T, BN, 0, 1>(acc, da, lk_wgmma_desc(b + 2048 * kk, BOX_BYTES, 1024, LK_WGMMA_SWIZZLE_128B),
                                     accumulate || kk > 0);
            lk_wgmma_ss<T, TN, 0, 1>(tacc, da, lk_wgmma_desc(l + 16 * U_ROW_BYTES<TN> * kk, 0, 8 * U_ROW_BYTES<TN>,
                                                             U_SWIZZLE<TN>),
                                     accumulate || kk > 0);
        } else {
            lk_wgmma_ss<T, BN>(acc, da, lk_wgmma_desc(b + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B),
                               accumulate || kk > 0);
            lk_wgmma_ss<T, TN>(tacc, da, lk_wgmma_desc(l + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B),
                               accumulate || kk > 0);
        }
    }
}

template <typename T, bool NN, typename W, uint32_t TN>
__device__ __forceinline__ uint32_t consume_stage_t(uint64_t* full, uint64_t* empty, const unsigned char* ring,
                                                    uint32_t half, float (&acc)[W::BN / 2], float (&tacc)[TN / 2],
                                                    uint32_t s, uint32_t held, bool accumulate) {
    constexpr uint32_t STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    const uint32_t slot = s % STAGES, lap = s / STAGES;
    lk_mbarrier_wait_parity(&full[slot], lap & 1);
    const unsigned char* stage = ring + slot * STAGE_BYTES;
    lk_wgmma_fence();
    issue_stage_t<T, NN, W, TN>(stage + half * (A_BYTES / 2), stage + A_BYTES, stage + A_BYTES + W::B_BYTES, acc, tacc,
                                accumulate);
    lk_wgmma_commit();
    lk_wgmma_wait<1>();
    if (held < STAGES) lk_mbarrier_arrive(&empty[held]);
    return slot;
}

// P[64][TN] = boxᵀ·tile over a row block's 128 rows: a 128×64 box of a stage (128-byte rows, the 128-byte
// swizzle) read MN-major as A (k16 step kr at +16 rows = 2048 bytes, SBO 1024), a 128×TN tile (TN·2-byte
// rows, one 32- or 64-byte swizzle span) MN-major as B (SBO 8 rows, k16 step at +16 rows). dB's partial of
// stage j: dY's box and T's tile, issued by one consumer per stage, the stages alternating between them
// (`consume_stage_db`), so each keeps one P in flight; dA's: one of X's boxes and the U tile
// (`consume_stage_da`).
template <typename T, uint32_t TN>
__device__ __forceinline__ void issue_box_t_tile(const unsigned char* box, const unsigned char* tile,
                                                 float (&pacc)[TN / 2]) {
#pragma unroll
    for (uint32_t kr = 0; kr < BM / 16; ++kr)
        lk_wgmma_ss<T, TN, 1, 1>(pacc, lk_wgmma_desc(box + 2048 * kr, 0, 1024, LK_WGMMA_SWIZZLE_128B),
                                 lk_wgmma_desc(tile + 16 * U_ROW_BYTES<TN> * kr, 0, 8 * U_ROW_BYTES<TN>, U_SWIZZLE<TN>),
                                 kr > 0);
}

// Writes P of stage j (retired) to db_partial[rb][64·j + row][col], f32 pairs, clipped to k and the rank.
template <uint32_t TN>
__device__ __forceinline__ void store_db(const LkFusedGemmSm90Params& p, const float (&pacc)[TN / 2], uint32_t t,
                                         uint32_t rb, uint32_t j) {
#pragma unroll
    for (uint32_t i = 0; i < TN / 2; i += 2) {
        const uint32_t n = 64 * j + lk_wgmma_acc_row(t, i), col = lk_wgmma_acc_col(t, i);
        if (n < p.k && col < p.rank)  // the rank is a multiple of 8: col + 1 < rank too
            *reinterpret_cast<float2*>(p.db_partial + (size_t(rb) * p.k + n) * p.rank + col) =
                make_float2(pacc[i], pacc[i + 1]);
    }
}

// consume_stage_t on a tile that computes dB's partials: ISSUE adds this stage's P (issue_db) to the
// group; otherwise, once the previous stage's group (this consumer's P of stage j - 1, if j > 0) retired,
// its P is stored.
template <typename T, typename W, uint32_t TN, bool ISSUE>
__device__ __forceinline__ uint32_t consume_stage_db(const LkFusedGemmSm90Params& p, uint64_t* full, uint64_t* empty,
                                                     const unsigned char* ring, const unsigned char* t_tile,
                                                     uint32_t half, float (&acc)[W::BN / 2], float (&tacc)[TN / 2],
                                                     float (&pacc)[TN / 2], uint32_t s, uint32_t held, uint32_t rb,
                                                     uint32_t j) {
    constexpr uint32_t STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    const uint32_t slot = s % STAGES, lap = s / STAGES;
    lk_mbarrier_wait_parity(&full[slot], lap & 1);
    const unsigned char* stage = ring + slot * STAGE_BYTES;
    lk_wgmma_fence();
    issue_stage_t<T, true, W, TN>(stage + half * (A_BYTES / 2), stage + A_BYTES, stage + A_BYTES + W::B_BYTES, acc,
                                  tacc, j > 0);
    if (ISSUE) issue_box_t_tile<T, TN>(stage, t_tile, pacc);
    lk_wgmma_commit();
    // P is read only with no group in flight (else ptxas serialises the wgmmas, C7514): the stages that store
    // one wait for their own group too
    if (ISSUE)
        lk_wgmma_wait<1>();
    else
        lk_wgmma_wait<0>();
    if (held < STAGES) lk_mbarrier_arrive(&empty[held]);
    if (!ISSUE && j > 0) {
        lk_wgmma_fence_operands(pacc);  // read after the wait
        store_db<TN>(p, pacc, threadIdx.x % 128, rb, j - 1);
    }
    return slot;
}

// dA's stages, after the last one of a tile: each brings two of X's 128×64 boxes (rows
// m0.., columns n0 + 128·x.., + 64..), one per consumer, which adds Q[64][TN] = Xᵀ·U over the row block's
// rows for the box's 64 columns (the U tile, written by both consumers, complete: u_full), retires it,
// releases the stage and writes Q (row: the column of X, column: the rank) to da_partial[rb][rank][column]:
// dA's layout [rank][n], clipped to n and the rank.
template <typename T, typename W, uint32_t TN>
__device__ __forceinline__ void consume_stage_da(const LkFusedGemmSm90Params& p, uint64_t* full, uint64_t* empty,
                                                 const unsigned char* ring, const unsigned char* u_tile,
                                                 uint32_t half, float (&qacc)[TN / 2], uint32_t s, uint32_t t,
                                                 uint32_t rb, uint32_t n0) {
    constexpr uint32_t STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    const uint32_t slot = s % STAGES, lap = s / STAGES;
    lk_mbarrier_wait_parity(&full[slot], lap & 1);
    lk_wgmma_fence();
    issue_box_t_tile<T, TN>(ring + slot * STAGE_BYTES + half * A_BYTES, u_tile, qacc);
    lk_wgmma_commit();
    lk_wgmma_wait<0>();
    lk_mbarrier_arrive(&empty[slot]);
    lk_wgmma_fence_operands(qacc);  // read after the wait
#pragma unroll
    for (uint32_t i = 0; i < TN / 2; i += 2) {
        const uint32_t col = n0 + lk_wgmma_acc_row(t, i), r = lk_wgmma_acc_col(t, i);
        if (col < p.n && r < p.rank) {  // the rank is a multiple of 8: r + 1 < rank too
            p.da_partial[(size_t(rb) * p.rank + r) * p.n + col] = qacc[i];
            p.da_partial[(size_t(rb) * p.rank + r + 1) * p.n + col] = qacc[i + 1];
        }
    }
}

// The last stage of a tile: acc += (s·T)·Bᵀ, B's BN×64 box by descriptor (its k16 steps 32 bytes apart),
// s·T from the registers (`frag`); for "nn" acc += (s·U)·A, A's 64×64 boxes MN-major (k16 steps 2048 bytes
// apart). Unlike consume_stage it neither waits nor releases: the main stages'
// groups are retired before it and the epilogue needs this one at once, so the caller waits for all
// (wait<0>) and releases the returned slot.
template <typename T, bool NN, typename W, uint32_t TN>
__device__ __forceinline__ uint32_t consume_stage_rs(uint64_t* full, const unsigned char* ring,
                                                     float (&acc)[W::BN / 2], const uint32_t (&frag)[TN / 16][4],
                                                     uint32_t s) {
    constexpr uint32_t BN = W::BN, STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    const uint32_t slot = s % STAGES, lap = s / STAGES;
    lk_mbarrier_wait_parity(&full[slot], lap & 1);
    const unsigned char* b = ring + slot * STAGE_BYTES + A_BYTES;
    lk_wgmma_fence();
#pragma unroll
    for (uint32_t kb = 0; kb < TN / 16; ++kb) {
        if (NN)  // the LoRA A's 64×64 boxes, MN-major as W0's
            lk_wgmma_rs<T, BN, 1>(acc, frag[kb], lk_wgmma_desc(b + 2048 * kb, BOX_BYTES, 1024, LK_WGMMA_SWIZZLE_128B),
                                  true);
        else
            lk_wgmma_rs<T, BN>(acc, frag[kb], lk_wgmma_desc(b + 32 * kb, 16, 1024, LK_WGMMA_SWIZZLE_128B), true);
    }
    lk_wgmma_commit();
    return slot;
}

// T (or U) is complete (its group retired): round it to the layer dtype, write it (rows m0.., this consumer's 64,
// clipped to m and the rank) when `write`, and pack s·T, rounded, as the register-A fragments of the
// (s·T)·Bᵀ wgmmas: fragment kb's a[j] holds accumulators 8·kb + 2j and + 1 (the m64n16 accumulator layout
// and the A fragment's agree: rows l/4 and l/4 + 8, columns 2·(l%4) and + 8 of each 16-column block).
// With `u_tile` (dX), the rounded U (not s·U) also goes to this consumer's 64 rows of the U tile (`half`),
// RB = TN·2-byte rows in the RB-byte swizzle (16-byte chunk c of row r at c ^ (r·RB/128) mod (RB/16): at
// TN = 16 c ^ (r/4)%2, at 32 c ^ (r/2)%4; the tile is 1024-byte aligned), as dA's partial products read it.
template <typename T, uint32_t TN>
__device__ __forceinline__ void finish_t(const LkFusedGemmSm90Params& p, const float (&tacc)[TN / 2],
                                         uint32_t (&frag)[TN / 16][4], uint32_t t, uint32_t m0, bool write,
                                         unsigned char* u_tile, uint32_t half) {
    T* out = static_cast<T*>(p.t_out);
#pragma unroll
    for (uint32_t kb = 0; kb < TN / 16; ++kb) {
#pragma unroll
        for (uint32_t j = 0; j < 4; ++j) {
            const uint32_t i = 8 * kb + 2 * j;
            const T t0 = lk_from_f32<T>(tacc[i]), t1 = lk_from_f32<T>(tacc[i + 1]);
            const uint32_t row = m0 + lk_wgmma_acc_row(t, i), col = lk_wgmma_acc_col(t, i);
            if (write && row < p.m) {
                if (col < p.rank) out[size_t(row) * p.rank + col] = t0;
                if (col + 1 < p.rank) out[size_t(row) * p.rank + col + 1] = t1;
            }
            frag[kb][j] = lk_pack2<T>(p.scale * lk_to_f32(t0), p.scale * lk_to_f32(t1));
            if (u_tile != nullptr) {  // row r's 16-byte chunk c at c ^ (r·RB/128) mod (RB/16), RB = TN·2 bytes
                constexpr uint32_t RB = U_ROW_BYTES<TN>;
                const uint32_t r = 64 * half + lk_wgmma_acc_row(t, i);
                const uint32_t chunk = (col / 8) ^ ((r * RB / 128) % (RB / 16));
                *reinterpret_cast<uint32_t*>(u_tile + r * RB + chunk * 16 + (col % 8) * 2) =
                    lk_pack2<T>(lk_to_f32(t0), lk_to_f32(t1));
            }
        }
    }
}

template <typename T, bool NN, uint32_t TN, typename W>
__device__ __forceinline__ void fused_gemm_t_sm90_impl(const LkFusedGemmSm90Params& p) {
    constexpr uint32_t BN = W::BN, STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    constexpr bool DB = W::TAIL != 0;  // dX: dB's and dA's partials too
    static_assert(!DB || (NN && W::TAIL == GRAD_TAIL_BYTES<TN>), "the T and U tiles: dX, TN wide");
    static_assert(2 * A_BYTES <= STAGE_BYTES, "two of X's boxes per dA stage");
    constexpr uint32_t DA_STAGES = DB ? BN / 128 : 0;  // after the last stage: two of X's 64-column boxes each
    LK_DYNAMIC_SMEM(smem);
    const uint32_t tid = threadIdx.x, wg = tid / 128;
    const uint32_t tiles_n = (p.n + BN - 1) / BN, tiles = (p.m + BM - 1) / BM * tiles_n;
    const uint32_t main_stages = (p.k + BK - 1) / BK;
    uint32_t first, end;
    run_of(tiles, first, end);
    const Smem sm = smem_layout<W>(smem, tid);
    uint64_t *full = sm.full, *empty = sm.empty;
    unsigned char* ring = sm.ring;

    if (wg == 0) {  // the producer: per tile, the main stages (+ A's slice where T is computed), B's box, then
                    // (DB) X's boxes for dA
        lk_setmaxnreg_dec<40>();
        if (tid != 0) return;
        uint32_t s = 0, db_count = 0;
        for (uint32_t tile = first; tile < end; ++tile) {
            const uint32_t m0 = tile / tiles_n * BM, n0 = tile % tiles_n * BN;
            const bool with_t = tile == first || n0 == 0;
            if (DB && n0 == 0) {  // the row block's T tile, once the previous one's P products retired
                lk_mbarrier_wait_parity(sm.tail_empty, (db_count & 1) ^ 1);
                lk_mbarrier_arrive_expect_tx(sm.tail_full, T_TILE_BYTES<TN>);
                lk_tma_load_2d(sm.tail, &p.t_map, 0, int32_t(m0), sm.tail_full);
                ++db_count;
            }
            for (uint32_t j = 0; j <= main_stages + DA_STAGES; ++j, ++s) {
                const uint32_t slot = s % STAGES, lap = s / STAGES;
                lk_mbarrier_wait_parity(&empty[slot], (lap & 1) ^ 1);  // lap 0: the phase before the first
                unsigned char* a = ring + slot * STAGE_BYTES;
                if (j > main_stages) {  // dA's: X's boxes 2x and 2x + 1 of the tile, rows m0..
                    const uint32_t x = j - main_stages - 1;
                    lk_mbarrier_arrive_expect_tx(&full[slot], 2 * A_BYTES);
#pragma unroll
                    for (uint32_t h = 0; h < 2; ++h)
                        lk_tma_load_2d(a + h * A_BYTES, &p.da_x_map, nn_box_column(n0, 2 * x + h, p.n), int32_t(m0),
                                       &full[slot]);
                    continue;
                }
                if (j == main_stages) {  // the low-rank stage's second operand, rank rows/columns 0..63
                    lk_mbarrier_arrive_expect_tx(&full[slot], W::B_BYTES);
                    if (NN) {  // the LoRA A's columns n0.., n0 + 64.., ...
#pragma unroll
                        for (uint32_t c = 0; c < BN / 64; ++c)
                            lk_tma_load_2d(a + A_BYTES + c * BOX_BYTES, &p.b_map, nn_box_column(n0, c, p.n), 0, &full[slot]);
                    } else {  // the LoRA B's rows n0..
                        lk_tma_load_2d(a + A_BYTES, &p.b_map, 0, int32_t(n0), &full[slot]);
                    }
                    continue;
                }
                const int32_t k0 = int32_t(j * BK);
                unsigned char* l = a + A_BYTES + W::B_BYTES;
                lk_mbarrier_arrive_expect_tx(&full[slot], A_BYTES + W::B_BYTES + (with_t ? W::EXTRA : 0));
                lk_tma_load_2d(a, &p.x_map, k0, int32_t(m0), &full[slot]);
                if (NN) {  // W0's rows k0.., columns n0.., n0 + 64.., ...; the LoRA B's rows k0..
#pragma unroll
                    for (uint32_t c = 0; c < BN / 64; ++c)
                        lk_tma_load_2d(a + A_BYTES + c * BOX_BYTES, &p.w_map, nn_box_column(n0, c, p.n), k0, &full[slot]);
                    if (with_t) lk_tma_load_2d(l, &p.a_map, 0, k0, &full[slot]);
                } else {  // W0's rows n0.., columns k0..; the LoRA A's columns k0..
                    lk_tma_load_2d(a + A_BYTES, &p.w_map, k0, int32_t(n0), &full[slot]);
                    if (with_t) lk_tma_load_2d(l, &p.a_map, k0, 0, &full[slot]);
                }
            }
        }
        return;
    }

    lk_setmaxnreg_inc<232>();
    const uint32_t half = wg - 1;  // rows 64·half .. 64·half + 63 of the tile
    const uint32_t t = tid % 128;
    float acc[BN / 2];
    float tacc[TN / 2];
    uint32_t frag[TN / 16][4];  // s·T of the current row block, rounded: set on its first tile of the run
    float pacc[TN / 2];         // dB's partial of this consumer's last P stage (DB)
    float qacc[TN / 2];         // dA's partial of a box (DB)
    unsigned char* u_tile = DB ? sm.tail + T_TILE_BYTES<TN> : nullptr;
    uint32_t s = 0, tile_count = 0, db_count = 0, u_count = 0;
    for (uint32_t tile = first; tile < end; ++tile, ++tile_count) {
        const uint32_t m0 = tile / tiles_n * BM, n0 = tile % tiles_n * BN;
        const bool with_t = tile == first || n0 == 0;
        // the waits as in fused_gemm_sm90.cu: one group in flight across stages, every wait unconditional
        // in its loop body; the choice between the two loops is made once per tile, around whole stages.
        // All groups retire before the (s·T)·Bᵀ stage on every tile: with the last main stage's group left
        // in flight into it on the tiles that reuse T, ptxas serialises the f16 kernels' wgmmas (C7514).
        uint32_t held = STAGES;
        const bool with_db = DB && n0 == 0;
        if (with_db) {
            if constexpr (DB) {  // the stages alternate between the consumers for P: even ones consumer 0's
                lk_mbarrier_wait_parity(sm.tail_full, db_count & 1);
                for (uint32_t j = 0; j < main_stages; ++j, ++s) {
                    if ((j & 1) == half)
                        held = consume_stage_db<T, W, TN, true>(p, full, empty, ring, sm.tail, half, acc, tacc, pacc,
                                                                s, held, m0 / BM, j);
                    else
                        held = consume_stage_db<T, W, TN, false>(p, full, empty, ring, sm.tail, half, acc, tacc,
                                                                 pacc, s, held, m0 / BM, j);
                }
            }
        } else if (with_t) {
            for (uint32_t j = 0; j < main_stages; ++j, ++s)
                held = consume_stage_t<T, NN, W, TN>(full, empty, ring, half, acc, tacc, s, held, j > 0);
        } else {
            for (uint32_t j = 0; j < main_stages; ++j, ++s)
                held = consume_stage<T, NN, W>(full, empty, ring, half, acc, s, held, j > 0);
        }
        lk_wgmma_wait<0>();
        if (held < STAGES) lk_mbarrier_arrive(&empty[held]);  // none held only if k = 0 (the host sends none)
        if (with_db) {  // this consumer's last P, if the last stage was its; then the T tile is free
            if (((main_stages - 1) & 1) == half) {
                lk_wgmma_fence_operands(pacc);
                store_db<TN>(p, pacc, t, m0 / BM, main_stages - 1);
            }
            lk_mbarrier_arrive(sm.tail_empty);
            ++db_count;
        }
        if (with_t) {
            // U's tile is rewritten once both consumers are done reading the previous row block's (u_free)
            if (DB && u_count > 0) lk_mbarrier_wait_parity(sm.u_free, (u_count - 1) & 1);
            lk_wgmma_fence_operands(tacc);  // read after the wait, not before
            // T written by the tile of column 0 (the backward reads it); dX's U only goes to U's tile
            finish_t<T, TN>(p, tacc, frag, t, m0 + 64 * half, !NN && n0 == 0, u_tile, half);
#pragma unroll
            for (uint32_t kb = 0; kb < TN / 16; ++kb) lk_wgmma_fence_operands(frag[kb]);  // written before the fence
            if (DB) {  // the generic stores before wgmma's (async proxy) reads, once both halves are written
                lk_fence_proxy_async();
                lk_mbarrier_arrive(sm.u_full);
            }
        }
        held = consume_stage_rs<T, NN, W, TN>(full, ring, acc, frag, s);
        ++s;
        lk_wgmma_wait<0>();
        lk_wgmma_fence_operands(acc);  // the epilogue reads them after the wait
        lk_mbarrier_arrive(&empty[held]);
        if constexpr (DB) {  // dA's partials of the tile's columns, then U's tile is free where the next
                             // tile (in this run) starts a row block
            if (with_t) lk_mbarrier_wait_parity(sm.u_full, u_count++ & 1);
            for (uint32_t x = 0; x < DA_STAGES; ++x, ++s)
                consume_stage_da<T, W, TN>(p, full, empty, ring, u_tile, half, qacc, s, t, m0 / BM,
                                           n0 + 128 * x + 64 * half);
            if (tile + 1 < end && (tile + 1) % tiles_n == 0) lk_mbarrier_arrive(sm.u_free);
        }
        // + bias (+0 without one), one rounding
        store_tile<T, W>(p, acc, sm, half, t, m0, n0, tile_count);
    }
    if (p.y_tma && t == 0) lk_bulk_wait_group_read<0>();  // the buffer stays valid until the stores read it
}
}  // namespace

#define LK_FUSED_GEMM_T_SM90(name, T, NN, TN, W)                                                             \
    extern "C" __global__ void __launch_bounds__(LK_SM90_THREADS, 1) name(const __grid_constant__ LkFusedGemmSm90Params p) { \
        LK_KERNEL_ENTRY();                                                                                   \
        fused_gemm_t_sm90_impl<T, NN, TN, W<TN>>(p);                                                         \
    }

LK_FUSED_GEMM_T_SM90(fused_gemm_t16_sm90_bf16, __nv_bfloat16, false, 16, WideT)
LK_KERNEL_EXPORT(fused_gemm_t16_sm90_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_t16_sm90_f16, __half, false, 16, WideT)
LK_KERNEL_EXPORT(fused_gemm_t16_sm90_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_t32_sm90_bf16, __nv_bfloat16, false, 32, WideT)
LK_KERNEL_EXPORT(fused_gemm_t32_sm90_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_t32_sm90_f16, __half, false, 32, WideT)
LK_KERNEL_EXPORT(fused_gemm_t32_sm90_f16, LkFusedGemmSm90Params)
// 128×128 tiles (ops/sm90.rs sm90_tile takes them where the busiest SM has less work with them)
LK_FUSED_GEMM_T_SM90(fused_gemm_t16_sm90_narrow_bf16, __nv_bfloat16, false, 16, NarrowT)
LK_KERNEL_EXPORT(fused_gemm_t16_sm90_narrow_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_t16_sm90_narrow_f16, __half, false, 16, NarrowT)
LK_KERNEL_EXPORT(fused_gemm_t16_sm90_narrow_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_t32_sm90_narrow_bf16, __nv_bfloat16, false, 32, NarrowT)
LK_KERNEL_EXPORT(fused_gemm_t32_sm90_narrow_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_t32_sm90_narrow_f16, __half, false, 32, NarrowT)
LK_KERNEL_EXPORT(fused_gemm_t32_sm90_narrow_f16, LkFusedGemmSm90Params)
// dX = dY·W0 + (s·U)·A with U = dY·B computed inside ("nn": W0's, A's and B's operands MN-major)
LK_FUSED_GEMM_T_SM90(fused_gemm_u16_sm90_nn_bf16, __nv_bfloat16, true, 16, WideU)
LK_KERNEL_EXPORT(fused_gemm_u16_sm90_nn_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_u16_sm90_nn_f16, __half, true, 16, WideU)
LK_KERNEL_EXPORT(fused_gemm_u16_sm90_nn_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_u16_sm90_nn_narrow_bf16, __nv_bfloat16, true, 16, NarrowU)
LK_KERNEL_EXPORT(fused_gemm_u16_sm90_nn_narrow_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_u16_sm90_nn_narrow_f16, __half, true, 16, NarrowU)
LK_KERNEL_EXPORT(fused_gemm_u16_sm90_nn_narrow_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_u32_sm90_nn_narrow_bf16, __nv_bfloat16, true, 32, NarrowU)
LK_KERNEL_EXPORT(fused_gemm_u32_sm90_nn_narrow_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_T_SM90(fused_gemm_u32_sm90_nn_narrow_f16, __half, true, 32, NarrowU)
LK_KERNEL_EXPORT(fused_gemm_u32_sm90_nn_narrow_f16, LkFusedGemmSm90Params)
