// lk_sm90_gemm.cuh: the pieces the sm_90a GEMMs share (kernels/sm90/fused_gemm_sm90.cu, fused_gemm_t_sm90.cu):
// the tile shapes and their shared-memory ring, the grouped tile order, one consumer k-stage of wgmmas, and
// the two epilogues (through shared memory and a TMA store, or straight from the registers).
#pragma once
#include "lk_convert.cuh"
#include "lk_mbarrier.cuh"
#include "lk_sm90.cuh"
#include "lk_tma.cuh"
#include "lk_wgmma.cuh"
#include "lora_params.h"

namespace lk_sm90_gemm {
constexpr uint32_t BM = LK_SM90_BM, BK = LK_SM90_BK;
constexpr uint32_t A_BYTES = BM * BK * 2;    // a stage's first operand: 128×64 2-byte elements
constexpr uint32_t BOX_BYTES = 64 * 64 * 2;  // a 64×64 box (nn's second operand, the output's boxes)
constexpr uint32_t GROUP_M = 8;
static_assert(BM == 128 && BK * 2 == 128, "two 64-row consumers, 128-byte rows: the 128-byte swizzle, 4 k16 steps per stage");

// A tile width and its ring: BN columns per tile (m64nBN per consumer), STAGES slots of the first operand's
// 128×64 box, the second's BN×64 and EXTRA more bytes (fused_gemm_t_sm90.cu: the LoRA A's r×64 slice),
// TAIL bytes after the output tile (fused_gemm_t_sm90.cu's dX: T's row-block tile and the U tile), SMEM
// bytes in all.
template <uint32_t BN_, uint32_t STAGES_, uint32_t SMEM_, uint32_t EXTRA_ = 0, uint32_t TAIL_ = 0>
struct Width {
    static constexpr uint32_t BN = BN_, STAGES = STAGES_, EXTRA = EXTRA_, TAIL = TAIL_;
    static constexpr uint32_t B_BYTES = BN * BK * 2;    // a stage's second operand: BN×64
    static constexpr uint32_t OUT_BYTES = 64 * BN * 2;  // one consumer's 64 rows of the output tile
    static constexpr uint32_t STAGE_BYTES = A_BYTES + B_BYTES + EXTRA;
    static_assert(BN % 64 == 0 && BN <= 256, "whole 64-column boxes, wgmma's largest n");
    static_assert(EXTRA % 1024 == 0, "every box of a slot on the 128-byte swizzle's 1024-byte period");
    static_assert(TAIL % 1024 == 0, "the tile after the output tile on the swizzle's period too");
    static_assert(STAGES * STAGE_BYTES + 2 * OUT_BYTES + TAIL + 2048 == SMEM_, "header and kernel agree");
};
using Wide = Width<LK_SM90_BN, LK_SM90_STAGES, LK_SM90_SMEM_BYTES>;
using Narrow = Width<LK_SM90_NARROW_BN, LK_SM90_NARROW_STAGES, LK_SM90_NARROW_SMEM_BYTES>;

// The column of an "nn" stage's 64-column box c of the tile at n0, for an n-column operand: n0 + 64·c, or,
// for a box wholly past the last column (n mod BN in 1..BN-64 on the last column tile), the last box that
// holds columns: every load then reads inside the tensor and delivers its whole box, without relying on how
// the hardware counts the bytes of a box entirely out of bounds; the columns it fills are past n, which the
// epilogue drops.
__device__ __forceinline__ int32_t nn_box_column(uint32_t n0, uint32_t c, uint32_t n) {
    return int32_t(min(n0 + 64 * c, (n - 1) / 64 * 64));
}

template <uint32_t BN>
__device__ __forceinline__ void tile_of(uint32_t tile, uint32_t tiles_m, uint32_t tiles_n, uint32_t& m0,
                                        uint32_t& n0) {
    const uint32_t per_group = GROUP_M * tiles_n, group = tile / per_group;
    const uint32_t first_m = group * GROUP_M, rows = min(tiles_m - first_m, GROUP_M);
    const uint32_t in_group = tile - group * per_group;
    m0 = (first_m + in_group % rows) * BM;
    n0 = (in_group / rows) * BN;
}

// The shared memory of an sm_90a GEMM: the barriers first, then the ring at the next 1024-byte boundary
// (the 128-byte swizzle's period), then the output tile (two halves of 64 rows, one per consumer
// warpgroup).
struct Smem {
    uint64_t* full;      // [STAGES]: the slot's loads have landed (1 arrival, the producer's, + its bytes)
    uint64_t* empty;     // [STAGES]: the consumers are done with the slot (256 arrivals: all their threads)
    uint64_t* out_free;  // [2]: store_tile_tma's, one per consumer warpgroup
    uint64_t* out_full;  // [2]
    uint64_t* tail_full;   // the tail's load has landed (1 arrival + its bytes; fused_gemm_t_sm90.cu's T tile)
    uint64_t* tail_empty;  // the consumers are done with the tail (256 arrivals)
    uint64_t* u_full;      // the consumers have written the U tile (256 arrivals; fused_gemm_t_sm90.cu's dA)
    uint64_t* u_free;      // the consumers are done reading it (256 arrivals)
    unsigned char* ring;
    unsigned char* out_tile;
    unsigned char* tail;  // W::TAIL bytes after the output tile
};

// Lays out the dynamic shared memory `smem` for the ring W; thread 0 initialises the barriers. Called by
// every thread (it ends with __syncthreads).
template <typename W>
__device__ __forceinline__ Smem smem_layout(unsigned char* smem, uint32_t tid) {
    Smem sm;
    sm.full = reinterpret_cast<uint64_t*>(smem);
    sm.empty = sm.full + W::STAGES;
    sm.out_free = sm.empty + W::STAGES;
    sm.out_full = sm.out_free + 2;
    sm.tail_full = sm.out_full + 2;
    sm.tail_empty = sm.tail_full + 1;
    sm.u_full = sm.tail_empty + 1;
    sm.u_free = sm.u_full + 1;
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem);
    sm.ring = smem + ((base + 1024 + 1023) / 1024 * 1024 - base);
    sm.out_tile = sm.ring + W::STAGES * W::STAGE_BYTES;
    sm.tail = sm.out_tile + 2 * W::OUT_BYTES;
    if (tid == 0) {
        for (uint32_t s = 0; s < W::STAGES; ++s) {
            lk_mbarrier_init(&sm.full[s], 1);
            lk_mbarrier_init(&sm.empty[s], 256);
        }
        for (uint32_t h = 0; h < 2; ++h) {
            lk_mbarrier_init(&sm.out_free[h], 1);
            lk_mbarrier_init(&sm.out_full[h], 128);
        }
        lk_mbarrier_init(sm.tail_full, 1);
        lk_mbarrier_init(sm.tail_empty, 256);
        lk_mbarrier_init(sm.u_full, 256);
        lk_mbarrier_init(sm.u_free, 256);
        lk_fence_mbarrier_init();
    }
    __syncthreads();
    return sm;
}

// The epilogue through shared memory (p.y_tma): each consumer warpgroup writes its 64×BN rows of the
// tile, + bias, rounded, into BN/64 64×64 boxes of 128-byte rows in the 128-byte swizzle (conflict-free: a
// warp's 8 rows of 16 bytes land on 8 different 16-byte chunks), and one thread stores them with TMA
// (clipped at the tensor's edges). Two mbarriers per warpgroup order it: "out_free" (1 arrival: the storing
// thread, once its previous tile's stores have read the buffer) before the writes, "out_full" (128: every
// thread, after fence.proxy.async) before the stores.
template <typename T, uint32_t BN>
__device__ __forceinline__ void store_tile_tma(const LkFusedGemmSm90Params& p, const float* acc, unsigned char* out,
                                               uint64_t* out_free, uint64_t* out_full, uint32_t t, uint32_t m0,
                                               uint32_t n0, uint32_t tile_count) {
    const T* bias = static_cast<const T*>(p.bias);
    if (t == 0) {
        lk_bulk_wait_group_read<0>();
        lk_mbarrier_arrive(out_free);
    }
    lk_mbarrier_wait_parity(out_free, tile_count & 1);
#pragma unroll
    for (uint32_t i = 0; i < BN / 2; i += 4) {  // columns col, col + 1 of rows row and row + 8
        const uint32_t col = lk_wgmma_acc_col(t, i);
        float b0 = 0.0f, b1 = 0.0f;
        if (bias != nullptr && n0 + col < p.n) {
            b0 = lk_to_f32(bias[n0 + col]);
            if (n0 + col + 1 < p.n) b1 = lk_to_f32(bias[n0 + col + 1]);
        }
#pragma unroll
        for (uint32_t h = 0; h < 4; h += 2) {  // one 4-byte store each
            const uint32_t row = lk_wgmma_acc_row(t, i + h), c = col % 64, chunk = (c / 8) ^ (row % 8);
            *reinterpret_cast<uint32_t*>(out + (col / 64) * BOX_BYTES + row * 128 + chunk * 16 + (c % 8) * 2) =
                lk_pack2<T>(acc[i + h] + b0, acc[i + h + 1] + b1);
        }
    }
    lk_fence_proxy_async();
    lk_mbarrier_arrive(out_full);
    if (t == 0) {
        lk_mbarrier_wait_parity(out_full, tile_count & 1);
#pragma unroll
        for (uint32_t c = 0; c < BN / 64; ++c)  // boxes wholly past C's last column: nothing to store
            if (n0 + 64 * c < p.n) lk_tma_store_2d(&p.y_map, int32_t(n0 + 64 * c), int32_t(m0), out + c * BOX_BYTES);
        lk_bulk_commit_group();
    }
}

// The epilogue without a map (ldc·size not a multiple of 16): straight from the registers, clipped.
template <typename T, uint32_t BN>
__device__ __forceinline__ void store_tile_direct(const LkFusedGemmSm90Params& p, const float* acc, uint32_t t,
                                                  uint32_t m0, uint32_t n0) {
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (uint32_t i = 0; i < BN / 2; ++i) {
        const uint32_t row = m0 + lk_wgmma_acc_row(t, i), col = n0 + lk_wgmma_acc_col(t, i);
        if (row >= p.m || col >= p.n) continue;
        const float bv = bias != nullptr ? lk_to_f32(bias[col]) : 0.0f;
        y[size_t(row) * p.ldc + col] = lk_from_f32<T>(acc[i] + bv);
    }
}

// A consumer warpgroup's epilogue for its 64 rows (`half`) of the tile at (m0, n0): acc + bias, rounded,
// through shared memory and TMA stores when the host made C's map (p.y_tma), else from the registers.
template <typename T, typename W>
__device__ __forceinline__ void store_tile(const LkFusedGemmSm90Params& p, const float* acc, const Smem& sm,
                                           uint32_t half, uint32_t t, uint32_t m0, uint32_t n0,
                                           uint32_t tile_count) {
    if (p.y_tma)
        store_tile_tma<T, W::BN>(p, acc, sm.out_tile + half * W::OUT_BYTES, &sm.out_free[half], &sm.out_full[half],
                                 t, m0 + 64 * half, n0, tile_count);
    else
        store_tile_direct<T, W::BN>(p, acc, t, m0 + 64 * half, n0);
}

// One k-stage of a consumer warpgroup: wait for the slot to fill, issue its KS k16 wgmmas (four; fewer for
// the last low-rank stage, whose rank columns may end sooner: the rest are TMA's zeros), commit, wait until
// at most this group is in flight, and release the previous stage's slot (`held`, STAGES for none). Returns
// this stage's slot. KS is a template parameter: a branch between the wgmmas of a stage makes ptxas
// serialise them all (C7520); choosing among whole stages of 1-4 wgmmas does not (CI checks the report).
template <typename T, bool NN, typename W, uint32_t KS = BK / 16>
__device__ __forceinline__ uint32_t consume_stage(uint64_t* full, uint64_t* empty, const unsigned char* ring,
                                                  uint32_t half, float (&acc)[W::BN / 2], uint32_t s,
                                                  uint32_t held, bool accumulate) {
    constexpr uint32_t BN = W::BN, STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    const uint32_t slot = s % STAGES, lap = s / STAGES;
    lk_mbarrier_wait_parity(&full[slot], lap & 1);
    const unsigned char* a = ring + slot * STAGE_BYTES + half * (A_BYTES / 2);
    const unsigned char* b = ring + slot * STAGE_BYTES + A_BYTES;
    lk_wgmma_fence();
#pragma unroll
    for (uint32_t kk = 0; kk < KS; ++kk) {
        const uint64_t da = lk_wgmma_desc(a + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B);
        if (NN) {
            const uint64_t db = lk_wgmma_desc(b + 2048 * kk, BOX_BYTES, 1024, LK_WGMMA_SWIZZLE_128B);
            lk_wgmma_ss<T, BN, 0, 1>(acc, da, db, accumulate || kk > 0);
        } else {
            const uint64_t db = lk_wgmma_desc(b + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B);
            lk_wgmma_ss<T, BN>(acc, da, db, accumulate || kk > 0);
        }
    }
    lk_wgmma_commit();
    lk_wgmma_wait<1>();
    if (held < STAGES) lk_mbarrier_arrive(&empty[held]);
    return slot;
}

}  // namespace lk_sm90_gemm
