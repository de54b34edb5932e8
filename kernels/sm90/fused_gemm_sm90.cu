// fused_gemm_sm90.cu: the LoRA fused GEMMs on Hopper (sm_90a), with TMA, mbarriers and wgmma (lk_tma.cuh,
// lk_mbarrier.cuh, lk_wgmma.cuh): the forward's Y = X·W0ᵀ + s·T·Bᵀ (+ bias) ("nt") and the backward's
// dX = dY·W0 + s·U·A ("nn", the second operand read MN-major). T and U come from their own launches, as
// for the mma.sync kernel (fused_gemm.cu), whose order of operations this keeps.
//
// Structure (one CTA per SM, persistent over the 128×128 output tiles in grouped order):
// - warpgroup 0, the producer: setmaxnreg down; one thread walks the virtual k-stages of every tile this
//   CTA owns, ceil(rank/64) low-rank stages (T and B tiles) then ceil(k/64) main stages (X and W0 tiles),
//   each two 128×64 TMA boxes with the 128-byte swizzle into a ring of STAGES slots: wait for the slot's
//   "empty" mbarrier, arrive.expect_tx(32 KB) on its "full" one, issue both loads. Out-of-bounds rows and
//   columns (ragged m, n, k, rank) arrive as zeros.
// - warpgroups 1 and 2, the consumers: setmaxnreg up; each owns 64 rows of the tile, with 64 f32
//   accumulators per thread (m64n128). Per stage: wait "full", four wgmma k16 steps (descriptors 32 bytes
//   apart in the 128-byte rows, SBO 1024), commit, wait, arrive "empty". After the low-rank stages the
//   accumulators are scaled by s, so the order of operations is fused_gemm.cu's: s·(T·Bᵀ) first, then
//   X·W0ᵀ on top, + bias, one rounding. The epilogue stores straight from the registers.
// Choices (docs/perf/bound.md has the numbers): the projection stays a separate launch (T is needed by the
// backward anyway, and at rank ≤ 128 it is ~3 % of the FLOPs); the epilogue stores from registers rather
// than through shared memory and a TMA store; each stage waits for its own wgmma before releasing the slot
// (no wgmma overlap across stages yet); no clusters.
// Requirements the host checks (ops/launch.rs): k and rank multiples of 8 and 16-byte aligned operands
// (TMA's row strides), layer-dtype adapters, no dropout.
#include "lk_convert.cuh"
#include "lk_mbarrier.cuh"
#include "lk_sm90.cuh"
#include "lk_tma.cuh"
#include "lk_wgmma.cuh"
#include "lora_params.h"

namespace {
constexpr uint32_t BM = LK_SM90_BM, BN = LK_SM90_BN, BK = LK_SM90_BK, STAGES = LK_SM90_STAGES;
constexpr uint32_t TILE_BYTES = BM * BK * 2;  // one 128×64 box of 2-byte elements
constexpr uint32_t STAGE_BYTES = 2 * TILE_BYTES;
constexpr uint32_t GROUP_M = 8;
static_assert(BM == BN && BK * 2 == 128, "128-byte rows: the 128-byte swizzle, 4 k16 steps per stage");
static_assert(STAGES * STAGE_BYTES + 2048 == LK_SM90_SMEM_BYTES, "header and kernel agree");

__device__ __forceinline__ void tile_of(uint32_t tile, uint32_t tiles_m, uint32_t tiles_n, uint32_t& m0,
                                        uint32_t& n0) {
    const uint32_t per_group = GROUP_M * tiles_n, group = tile / per_group;
    const uint32_t first_m = group * GROUP_M, rows = min(tiles_m - first_m, GROUP_M);
    const uint32_t in_group = tile - group * per_group;
    m0 = (first_m + in_group % rows) * BM;
    n0 = (in_group / rows) * BN;
}

// NN (dX = dY·W0 + s·U·A): the second operand is stored reduction-major ([k][n] row-major), so a stage's B
// is two 64-row × 64-column boxes (columns n0.. and n0+64..: the 128-byte swizzle's span is 64 elements),
// 8 KB apart, read by wgmma as MN-major (transpose bit), each k16 step 16 rows = 2048 bytes further.
template <typename T, bool NN>
__device__ __forceinline__ void fused_gemm_sm90_impl(const LkFusedGemmSm90Params& p) {
    LK_DYNAMIC_SMEM(smem);
    // barriers first, then the ring at the next 1024-byte boundary (the swizzle's period)
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    uint64_t* empty = full + STAGES;
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem);
    unsigned char* ring = smem + ((base + 1024 + 1023) / 1024 * 1024 - base);
    const uint32_t tid = threadIdx.x, wg = tid / 128;
    const uint32_t tiles_m = (p.m + BM - 1) / BM, tiles_n = (p.n + BN - 1) / BN, tiles = tiles_m * tiles_n;
    const uint32_t low = (p.rank + BK - 1) / BK, stages_per_tile = low + (p.k + BK - 1) / BK;
    if (tid == 0) {
        for (uint32_t s = 0; s < STAGES; ++s) {
            lk_mbarrier_init(&full[s], 1);
            lk_mbarrier_init(&empty[s], 256);  // every consumer thread releases the slot
        }
        lk_fence_mbarrier_init();
    }
    __syncthreads();

    if (wg == 0) {  // the producer
        lk_setmaxnreg_dec<40>();
        if (tid != 0) return;
        uint32_t s = 0;  // virtual stage counter over all of this CTA's tiles
        for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            uint32_t m0, n0;
            tile_of(tile, tiles_m, tiles_n, m0, n0);
            for (uint32_t j = 0; j < stages_per_tile; ++j, ++s) {
                const uint32_t slot = s % STAGES, lap = s / STAGES;
                lk_mbarrier_wait_parity(&empty[slot], (lap & 1) ^ 1);  // lap 0: the phase before the first
                unsigned char* a = ring + slot * STAGE_BYTES;
                lk_mbarrier_arrive_expect_tx(&full[slot], STAGE_BYTES);
                const bool lr = j < low;
                const int32_t k0 = int32_t((lr ? j : j - low) * BK);
                lk_tma_load_2d(a, lr ? &p.t_map : &p.x_map, k0, int32_t(m0), &full[slot]);
                const LkTensorMap* bm = lr ? &p.b_map : &p.w_map;
                if (NN) {  // B rows k0.., columns n0.. and n0 + 64..
                    lk_tma_load_2d(a + TILE_BYTES, bm, int32_t(n0), k0, &full[slot]);
                    lk_tma_load_2d(a + TILE_BYTES + TILE_BYTES / 2, bm, int32_t(n0 + BN / 2), k0, &full[slot]);
                } else {
                    lk_tma_load_2d(a + TILE_BYTES, bm, k0, int32_t(n0), &full[slot]);
                }
            }
        }
        return;
    }

    lk_setmaxnreg_inc<232>();
    const uint32_t half = wg - 1;  // rows 64·half .. 64·half + 63 of the tile
    const uint32_t t = tid % 128;
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    float acc[BN / 2];
    uint32_t s = 0;
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        uint32_t m0, n0;
        tile_of(tile, tiles_m, tiles_n, m0, n0);
        for (uint32_t j = 0; j < stages_per_tile; ++j, ++s) {
            const uint32_t slot = s % STAGES, lap = s / STAGES;
            lk_mbarrier_wait_parity(&full[slot], lap & 1);
            const unsigned char* a = ring + slot * STAGE_BYTES + half * (TILE_BYTES / 2);
            const unsigned char* b = ring + slot * STAGE_BYTES + TILE_BYTES;
            lk_wgmma_fence();
#pragma unroll
            for (uint32_t kk = 0; kk < BK / 16; ++kk) {
                const uint64_t da = lk_wgmma_desc(a + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B);
                if (NN) {
                    const uint64_t db = lk_wgmma_desc(b + 2048 * kk, TILE_BYTES / 2, 1024, LK_WGMMA_SWIZZLE_128B);
                    lk_wgmma_ss<T, BN, 0, 1>(acc, da, db, j > 0 || kk > 0);
                } else {
                    const uint64_t db = lk_wgmma_desc(b + 32 * kk, 16, 1024, LK_WGMMA_SWIZZLE_128B);
                    lk_wgmma_ss<T, BN>(acc, da, db, j > 0 || kk > 0);
                }
            }
            lk_wgmma_commit();
            lk_wgmma_wait<0>();
            lk_mbarrier_arrive(&empty[slot]);
            if (j + 1 == low)  // the low-rank sums are complete: times the scale
#pragma unroll
                for (uint32_t i = 0; i < BN / 2; ++i) acc[i] *= p.scale;
        }
        // + bias (+0 without one), one rounding, straight from the registers
#pragma unroll
        for (uint32_t i = 0; i < BN / 2; ++i) {
            const uint32_t row = m0 + 64 * half + lk_wgmma_acc_row(t, i), col = n0 + lk_wgmma_acc_col(t, i);
            if (row >= p.m || col >= p.n) continue;
            const float bv = bias != nullptr ? lk_to_f32(bias[col]) : 0.0f;
            y[size_t(row) * p.ldc + col] = lk_from_f32<T>(acc[i] + bv);
        }
    }
}
}  // namespace

#define LK_FUSED_GEMM_SM90(name, T, NN)                                                                      \
    extern "C" __global__ void __launch_bounds__(LK_SM90_THREADS, 1) name(const __grid_constant__ LkFusedGemmSm90Params p) { \
        fused_gemm_sm90_impl<T, NN>(p);                                                                      \
    }

LK_FUSED_GEMM_SM90(fused_gemm_sm90_bf16, __nv_bfloat16, false)
LK_KERNEL_EXPORT(fused_gemm_sm90_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_f16, __half, false)
LK_KERNEL_EXPORT(fused_gemm_sm90_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_nn_bf16, __nv_bfloat16, true)
LK_KERNEL_EXPORT(fused_gemm_sm90_nn_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_nn_f16, __half, true)
LK_KERNEL_EXPORT(fused_gemm_sm90_nn_f16, LkFusedGemmSm90Params)
