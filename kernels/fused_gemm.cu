// fused_gemm.cu: C = A·op(B) + s·L·op(R) (+ bias), the LoRA forward and dX in ONE tensor-core kernel.
//
//   forward ("nt"): Y  = X·W0ᵀ + s·T·Bᵀ      A = X (m×k),  B = W0 (n×k),  L = T (m×r), R = B (n×r)
//   dX      ("nn"): dX = dY·W0 + s·U·A       A = dY (m×k), B = W0 (k×n),  L = U (m×r), R = A (r×n)
//   T       ("nt"): T = X·Aᵀ as the low-rank part alone (k = 0, L = X, R = A, K as the "rank"), split
//           over K into fixed chunks (blockIdx.z) whose f32 partials lowrank_finalize adds in order
//           (deterministic, no atomics; src/ops/launch.rs project). The backward's U, dA and dB are
//           lowrank_grad.cu's.
//
// The low-rank product is not a second GEMM: [A | L] · [B | R] is one GEMM over k + r, so the k loop
// runs ceil(r/32) extra k-tiles that read L and R instead of A and B. They run FIRST: acc = L·op(R), then
// acc *= s (exact f32 scaling of the whole low-rank sum), then the main tiles add A·op(B) on top. C is
// written once, there is no m×n temporary, and no second accumulator set.
//
// f32 adapters ("_f32ad" kernels): R (B in the forward, A in dX and the projection) is read as f32 and
// rounded once to the layer dtype as it enters shared memory (a register-staged load, lk_tile.cuh): the
// tensor cores take 16-bit operands. LoRA dropout (lk_philox.cuh): the projection's L = X is masked as it
// is loaded (LK_DROPOUT_L), and dX's low-rank sum is masked element by element before it is scaled
// (LK_DROPOUT_ACC), which is why the low-rank tiles run first: s·(U·A) ⊙ mask needs no second
// accumulator. The 1/(1 − p) of the kept elements is in the scale.
//
// Tiles: 128×128 per block of 256 threads (8 warps as 2×4, 64×32 per warp = 4×4 mma.m16n8k16 tiles,
// 64 f32 accumulators per thread), BK = 32, a 3-stage cp.async pipeline (60 KiB dynamic shared memory),
// ≤ 128 registers so that two blocks fit an SM (__launch_bounds__(256, 2)). The "_narrow" kernels take
// 128×64 tiles (64×16 per warp, 45 KiB): where M is a few hundred rows the 128-column tiles are fewer
// than the SMs (64 at M = 256, N = 4096, for 132 SMs) and one block's work bounds the launch; twice the
// blocks halve it. At N ≤ 64 (the projection T = X·Aᵀ; at M ≤ 128 over several K chunks without dropout
// src/ops/launch.rs small_projection runs kernels/multi_decode.cu instead) they halve the padded columns.
// Every element of C is the same chain of mma k16 steps at either width (an mma's element depends on
// its row of A, its column of B and its own accumulator only), so the width, which the launch picks
// from the shape and the GPU's SM count (src/ops/launch.rs mma_tile; LK_MMA_TILE forces one), never
// changes the bits.
// Rows are padded ([BM][40] for A, [BN][40] for nt-B, [BK][BN + 8] for nn-B), which makes every ldmatrix
// phase hit 8 distinct 16-byte bank groups. nt-B is read with ldmatrix (rows = n), nn-B with
// ldmatrix.trans (rows = k): the same fragment comes out of both layouts.
//
// No run-time operand choice in the hot loops (k_loop): the low-rank and the main tiles are separate
// loops, each with its pointers, leading dimensions and extents fixed; the cp.async ring flows across the
// boundary (the last low-rank iterations, unrolled, already prefetch the first main tiles). Vector or
// element loads are chosen once per block (a template argument): 16-byte cp.async when every operand the
// block reads is aligned (flags), else element loads. A block whose tile lies wholly inside the operands
// walks precomputed source pointers with no bounds checks (`Cursor`); edge blocks check every chunk.
//
// Block order: blockIdx.x is mapped to tiles in groups of 8 tile rows, column by column, so the blocks
// resident together share their B (W0) tiles in L2. Epilogue: bias, one rounding to T, the C tile staged
// in shared memory (the pipeline's, once drained), then written back in 16-byte row chunks where C's rows
// are aligned (element stores at a ragged right edge or on a misaligned C). Split reductions write f32
// partials straight from the fragments.
//
// Shapes: any m, n ≥ 1, k ≥ 0, any rank (k + rank ≥ 1). Out-of-range
// rows/columns are zero-filled (cp.async src-size), so ragged edges are exact. An operand whose base is
// not 16-byte aligned or whose leading dimension is not a multiple of 8 (flags bit clear) is loaded
// element by element into the same shared-memory tile: slower, same result.
#include "lk_fused_gemm.cuh"

namespace {
template <typename T, typename RT, bool NN, bool VEC, bool DROP_L, int NI>
__device__ __forceinline__ void run_k_loop(const LkFusedGemmParams& p, float (&acc)[4][NI][4], T* as_all, T* bs_all,
                                           uint32_t m0, uint32_t n0, uint32_t r_begin, uint32_t r_end, int lt,
                                           bool interior) {
    const Phase<T, RT, DROP_L> low{static_cast<const T*>(p.l), static_cast<const RT*>(p.r), p.ldl, p.ldr, r_begin,
                                   r_end};
    const Phase<T, T, false> main{static_cast<const T*>(p.a), static_cast<const T*>(p.b), p.lda, p.ldb, 0u, p.k};
    // the low-rank sum once complete: scaled once (under the dropout mask for dX)
    auto after_low = [&]() {
        if (NN && (p.flags & LK_DROPOUT_ACC))
            scale_acc_dropout(acc, p.scale, p.dropout, m0, n0, p.n);
        else
            scale_acc(acc, p.scale);
    };
    k_loop<NN, VEC>(low, main, lt, interior && (r_end - r_begin) % BK == 0, acc, as_all, bs_all, m0, n0, p.m, p.n,
                    interior, p.dropout, after_low);
}

template <typename T, typename RT, bool NN, int NI>
__device__ __forceinline__ void fused_gemm_impl(const LkFusedGemmParams& p) {
    LK_DYNAMIC_SMEM(smem);
    T* as_all = reinterpret_cast<T*>(smem);
    T* bs_all = as_all + STAGES * A_STAGE;
    uint32_t m0, n0;
    grouped_tile<NI>(p.m, p.n, m0, n0);
    // the rank range of this block: all of it, or split z of a split reduction
    const uint32_t r_begin = p.rank_per_split ? blockIdx.z * p.rank_per_split : 0;
    const uint32_t r_end = p.rank_per_split ? min(p.rank, r_begin + p.rank_per_split) : p.rank;
    const int lt = int((r_end - r_begin + BK - 1) / BK);

    float acc[4][NI][4];
    zero_acc(acc);

    // 16-byte copies when every operand this block reads allows them, else element loads throughout.
    const uint32_t needed = (p.k > 0 ? LK_ALIGNED_A | LK_ALIGNED_B : 0u) | (lt > 0 ? LK_ALIGNED_L | LK_ALIGNED_R : 0u);
    const bool interior = m0 + BM <= p.m && n0 + Width<NI>::BN <= p.n;  // no row or column of the tile out of range
    const bool vec = (p.flags & needed) == needed;
    // The dropout of L exists for the projection only (nt, k = 0: L = X); no other kernel pays for it.
    if (!NN && (p.flags & LK_DROPOUT_L)) {
        if (vec)
            run_k_loop<T, RT, NN, true, !NN, NI>(p, acc, as_all, bs_all, m0, n0, r_begin, r_end, lt, interior);
        else
            run_k_loop<T, RT, NN, false, !NN, NI>(p, acc, as_all, bs_all, m0, n0, r_begin, r_end, lt, interior);
    } else if (vec) {
        run_k_loop<T, RT, NN, true, false, NI>(p, acc, as_all, bs_all, m0, n0, r_begin, r_end, lt, interior);
    } else {
        run_k_loop<T, RT, NN, false, false, NI>(p, acc, as_all, bs_all, m0, n0, r_begin, r_end, lt, interior);
    }

    if (p.partial != nullptr) {  // split reduction: this chunk's f32 sums, no bias, no rounding
        store_partial(acc, p.partial + size_t(blockIdx.z) * p.m * p.n, p.m, p.n, m0, n0);
        return;
    }
    store_c<T>(acc, as_all, static_cast<T*>(p.c), p.ldc, static_cast<const T*>(p.bias), p.m, p.n, m0, n0);
}
}  // namespace

// Registers for two blocks per SM (2 × 256 threads × ≤ 128 registers); shared memory allows two on sm_80
// and sm_90 (2 × 60 KiB), one on sm_86/89 (100 KB per SM). "_f32ad": R (the adapter) is f32; "_narrow":
// the 64-column tiles (45 KiB of shared memory: two blocks on sm_86/89 too).
#define LK_FUSED_GEMM(name, T, RT, NN, NI)                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(LkFusedGemmParams p) { \
        LK_KERNEL_ENTRY();                                                            \
        fused_gemm_impl<T, RT, NN, NI>(p);                                            \
    }

LK_FUSED_GEMM(fused_gemm_nt_bf16, __nv_bfloat16, __nv_bfloat16, false, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_f16, __half, __half, false, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_f16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_bf16_f32ad, __nv_bfloat16, float, false, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_bf16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_f16_f32ad, __half, float, false, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_f16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_bf16, __nv_bfloat16, __nv_bfloat16, true, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_f16, __half, __half, true, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_f16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_bf16_f32ad, __nv_bfloat16, float, true, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_bf16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_f16_f32ad, __half, float, true, WIDE_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_f16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_narrow_bf16, __nv_bfloat16, __nv_bfloat16, false, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_narrow_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_narrow_f16, __half, __half, false, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_narrow_f16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_narrow_bf16_f32ad, __nv_bfloat16, float, false, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_narrow_bf16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nt_narrow_f16_f32ad, __half, float, false, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nt_narrow_f16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_narrow_bf16, __nv_bfloat16, __nv_bfloat16, true, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_narrow_bf16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_narrow_f16, __half, __half, true, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_narrow_f16, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_narrow_bf16_f32ad, __nv_bfloat16, float, true, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_narrow_bf16_f32ad, LkFusedGemmParams)
LK_FUSED_GEMM(fused_gemm_nn_narrow_f16_f32ad, __half, float, true, NARROW_NI)
LK_KERNEL_EXPORT(fused_gemm_nn_narrow_f16_f32ad, LkFusedGemmParams)
