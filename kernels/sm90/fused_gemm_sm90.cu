// fused_gemm_sm90.cu: the LoRA fused GEMMs on Hopper (sm_90a), with TMA, mbarriers and wgmma (lk_tma.cuh,
// lk_mbarrier.cuh, lk_wgmma.cuh): the forward's Y = X·W0ᵀ + s·T·Bᵀ (+ bias) ("nt") and the backward's
// dX = dY·W0 + s·U·A ("nn", the second operand read MN-major). T and U come from their own launches, as
// for the mma.sync kernel (fused_gemm.cu), whose order of operations this keeps.
//
// Structure (one CTA per SM, persistent over the 128×BN output tiles in grouped order; BN = 256, or 128
// for the "_narrow" kernels):
// - warpgroup 0, the producer: setmaxnreg down; one thread walks the virtual k-stages of every tile this
//   CTA owns, ceil(rank/64) low-rank stages (T and B tiles) then ceil(k/64) main stages (X and W0 tiles),
//   each a 128×64 box of the first operand and BN×64 of the second (one box; BN/64 64×64 ones for "nn"),
//   with the 128-byte swizzle, into a ring of STAGES slots: wait for the slot's "empty" mbarrier,
//   arrive.expect_tx(the stage's bytes: 48 KB, 32 narrow) on its "full" one, issue the loads.
//   Out-of-bounds rows and columns (ragged m, n, k, rank) arrive as zeros.
// - warpgroups 1 and 2, the consumers: setmaxnreg up; each owns 64 rows of the tile, with BN/2 f32
//   accumulators per thread (m64nBN). Per stage: wait "full", four wgmma k16 steps (descriptors 32 bytes
//   apart in the 128-byte rows, SBO 1024; the last low-rank stage only those that hold rank columns: one
//   at r = 16), commit, wait until only this stage's group is in flight, arrive
//   "empty" for the previous stage's slot: the tensor cores run one stage while the next one's wait and
//   issue happen. After the low-rank stages (all retired) the accumulators are scaled by s, so the order of
//   operations is fused_gemm.cu's: s·(T·Bᵀ) first, then X·W0ᵀ on top, + bias, one rounding.
// - the epilogue: when C's rows are 16-byte multiples (y_tma), each consumer writes its 64 rows, rounded,
//   into its half of the output tile (64 KB, 32 narrow) in the 128-byte swizzle, and one of its threads
//   stores the BN/64 64×64 boxes with TMA (clipped at the edges); its warps 1-3 go on to the next tile's
//   stages at once, warp 0 once that thread has issued the stores; the buffer is reused once those stores
//   have read it. Otherwise it stores from the registers.
// Choices (docs/perf/bound.md has the numbers): 128×256 tiles, not 128×128: per output element a stage
// brings 3/4 of the bytes from L2 (the bound lists the L2-to-SM traffic and the rate it needs), for three
// stages instead of four (48 KB each, + the 64 KB output tile: 210 KB of the 227). The narrow kernels
// (128×128, six stages of 32 KB: the most that fit, for the mid-M GEMMs that stream W0) are for the GEMMs
// whose busiest SM has less work with them (ops/sm90.rs sm90_tile): at most half as many wide tiles as
// SMs (M = 256, N = 4096: 32 wide tiles for 132 SMs), or a last wave they fill better (where the mma.sync
// kernel takes its 128×64 tiles, up to M = 256 at N = 4096, its busiest SM has less work than either
// width here: docs/perf/bound.md's by-M table). Here T comes from the
// projection launch: in the grouped tile order each of a row block's n/BN column tiles would compute it
// again (r/BN more tensor work). The forward at ranks up to 32 computes T inside instead, about twice per
// row block, with runs of consecutive tiles per CTA (fused_gemm_t_sm90.cu), and so does dX with U; this
// kernel takes the other ranks, and every rank under LK_FUSED_GEMM=sm90-projection (dropout runs on the
// mma.sync kernels: ops/sm90.rs refuses it here). No clusters yet (what the L2 throughput measured on
// a GPU decides).
// Requirements the host checks (ops/sm90.rs): k and rank multiples of 8 and 16-byte aligned operands
// (TMA's row strides), layer-dtype adapters, no dropout.
#include "lk_sm90_gemm.cuh"

namespace {
using namespace lk_sm90_gemm;

// NN (dX = dY·W0 + s·U·A): the second operand is stored reduction-major ([k][n] row-major), so a stage's B
// is BN/64 64-row × 64-column boxes (columns n0.., n0+64.., ...: the 128-byte swizzle's span is 64
// elements), 8 KB apart, read by wgmma as MN-major (transpose bit), each k16 step 16 rows = 2048 bytes further.
template <typename T, bool NN, typename W>
__device__ __forceinline__ void fused_gemm_sm90_impl(const LkFusedGemmSm90Params& p) {
    constexpr uint32_t BN = W::BN, STAGES = W::STAGES, STAGE_BYTES = W::STAGE_BYTES;
    LK_DYNAMIC_SMEM(smem);
    const uint32_t tid = threadIdx.x, wg = tid / 128;
    const uint32_t tiles_m = (p.m + BM - 1) / BM, tiles_n = (p.n + BN - 1) / BN, tiles = tiles_m * tiles_n;
    const uint32_t low = (p.rank + BK - 1) / BK, stages_per_tile = low + (p.k + BK - 1) / BK;
    const Smem sm = smem_layout<W>(smem, tid);
    uint64_t *full = sm.full, *empty = sm.empty;
    unsigned char* ring = sm.ring;

    if (wg == 0) {  // the producer
        lk_setmaxnreg_dec<40>();
        if (tid != 0) return;
        uint32_t s = 0;  // virtual stage counter over all of this CTA's tiles
        for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            uint32_t m0, n0;
            tile_of<BN>(tile, tiles_m, tiles_n, m0, n0);
            for (uint32_t j = 0; j < stages_per_tile; ++j, ++s) {
                const uint32_t slot = s % STAGES, lap = s / STAGES;
                lk_mbarrier_wait_parity(&empty[slot], (lap & 1) ^ 1);  // lap 0: the phase before the first
                unsigned char* a = ring + slot * STAGE_BYTES;
                lk_mbarrier_arrive_expect_tx(&full[slot], STAGE_BYTES);
                const bool lr = j < low;
                const int32_t k0 = int32_t((lr ? j : j - low) * BK);
                lk_tma_load_2d(a, lr ? &p.t_map : &p.x_map, k0, int32_t(m0), &full[slot]);
                const LkTensorMap* bm = lr ? &p.b_map : &p.w_map;
                if (NN) {  // B rows k0.., columns n0.., n0 + 64.., ...
#pragma unroll
                    for (uint32_t c = 0; c < BN / 64; ++c)
                        lk_tma_load_2d(a + A_BYTES + c * BOX_BYTES, bm, nn_box_column(n0, c, p.n), k0, &full[slot]);
                } else {
                    lk_tma_load_2d(a + A_BYTES, bm, k0, int32_t(n0), &full[slot]);
                }
            }
        }
        return;
    }

    lk_setmaxnreg_inc<232>();
    const uint32_t half = wg - 1;  // rows 64·half .. 64·half + 63 of the tile
    const uint32_t t = tid % 128;
    float acc[BN / 2];
    uint32_t s = 0, tile_count = 0;
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++tile_count) {
        uint32_t m0, n0;
        tile_of<BN>(tile, tiles_m, tiles_n, m0, n0);
        // One wgmma group in flight across stages: stage j's group is retired, and its slot released, by
        // stage j + 1's wait<1>; the last stage of each phase by the wait<0> after the phase's loop (the
        // accumulators are needed next: the scale, the epilogue). Every wait is unconditional in its loop
        // body: a wait on a branch makes ptxas serialise all the wgmmas (C7518).
        uint32_t held = STAGES;  // the slot whose group is in flight (none yet)
        for (uint32_t j = 0; j + 1 < low; ++j, ++s) {
            held = consume_stage<T, NN, W>(full, empty, ring, half, acc, s, held, j > 0);
        }
        if (low > 0) {  // the last low-rank stage: only the k16 steps with rank columns (r = 16: 1 of 4)
            const uint32_t ks = (p.rank - (low - 1) * BK + 15) / 16;
            const bool accumulate = low > 1;
            if (ks == 1)
                held = consume_stage<T, NN, W, 1>(full, empty, ring, half, acc, s, held, accumulate);
            else if (ks == 2)
                held = consume_stage<T, NN, W, 2>(full, empty, ring, half, acc, s, held, accumulate);
            else if (ks == 3)
                held = consume_stage<T, NN, W, 3>(full, empty, ring, half, acc, s, held, accumulate);
            else
                held = consume_stage<T, NN, W, 4>(full, empty, ring, half, acc, s, held, accumulate);
            ++s;
            // the low-rank sums are complete: times the scale
            lk_wgmma_wait<0>();
            lk_mbarrier_arrive(&empty[held]);
            held = STAGES;
            lk_wgmma_fence_operands(acc);  // scaled after the wait, and before the next stage's fence
#pragma unroll
            for (uint32_t i = 0; i < BN / 2; ++i) acc[i] *= p.scale;
            lk_wgmma_fence_operands(acc);
        }
        for (uint32_t j = low; j < stages_per_tile; ++j, ++s) {
            held = consume_stage<T, NN, W>(full, empty, ring, half, acc, s, held, j > 0);
        }
        lk_wgmma_wait<0>();
        lk_wgmma_fence_operands(acc);  // the epilogue reads them after the wait
        if (held < STAGES) lk_mbarrier_arrive(&empty[held]);  // none held only if k = 0 (the host sends none)
        // + bias (+0 without one), one rounding
        store_tile<T, W>(p, acc, sm, half, t, m0, n0, tile_count);
    }
    if (p.y_tma && t == 0) lk_bulk_wait_group_read<0>();  // the buffer stays valid until the stores read it
}
}  // namespace

#define LK_FUSED_GEMM_SM90(name, T, NN, W)                                                                   \
    extern "C" __global__ void __launch_bounds__(LK_SM90_THREADS, 1) name(const __grid_constant__ LkFusedGemmSm90Params p) { \
        LK_KERNEL_ENTRY();                                                                                   \
        fused_gemm_sm90_impl<T, NN, W>(p);                                                                   \
    }

LK_FUSED_GEMM_SM90(fused_gemm_sm90_bf16, __nv_bfloat16, false, Wide)
LK_KERNEL_EXPORT(fused_gemm_sm90_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_f16, __half, false, Wide)
LK_KERNEL_EXPORT(fused_gemm_sm90_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_nn_bf16, __nv_bfloat16, true, Wide)
LK_KERNEL_EXPORT(fused_gemm_sm90_nn_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_nn_f16, __half, true, Wide)
LK_KERNEL_EXPORT(fused_gemm_sm90_nn_f16, LkFusedGemmSm90Params)
// 128-column tiles (ops/sm90.rs sm90_tile takes them where the busiest SM has less work with them)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_narrow_bf16, __nv_bfloat16, false, Narrow)
LK_KERNEL_EXPORT(fused_gemm_sm90_narrow_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_narrow_f16, __half, false, Narrow)
LK_KERNEL_EXPORT(fused_gemm_sm90_narrow_f16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_nn_narrow_bf16, __nv_bfloat16, true, Narrow)
LK_KERNEL_EXPORT(fused_gemm_sm90_nn_narrow_bf16, LkFusedGemmSm90Params)
LK_FUSED_GEMM_SM90(fused_gemm_sm90_nn_narrow_f16, __half, true, Narrow)
LK_KERNEL_EXPORT(fused_gemm_sm90_nn_narrow_f16, LkFusedGemmSm90Params)
