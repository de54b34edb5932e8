// lowrank_grad.cu: the backward's reductions over the M tokens, each big operand read once.
//
//   "_u" kernels, over G = dY:  P = dYᵀ·T (→ dB = s·P)  and  Q = dY·B (→ U)   in ONE pass over dY
//   plain kernels, over G = X:  P = Xᵀ·U  (→ dA = s·Pᵀ, written transposed: dA is r × K)
//
// dB and U reduce over different dimensions of dY (the tokens and the columns), so one pass needs partial
// sums for both: a block owns a strip of LK_GRAD_TC = 128 columns of G and a fixed chunk of the tokens
// (grid y, from the shape only: src/ops/launch.rs grad_splits). It walks its chunk TM = 32 rows at a time
// through a 3-stage cp.async ring; each step's G tile [32][128] serves both products from shared memory:
//   P[c, j] += Σ_m G[m, c]·L[m, j]: 8 warps × 16 columns, the whole rank in registers for the whole chunk
//            (the G tile read with ldmatrix.trans as the k-major A operand, L with ldmatrix.trans as B);
//   Q[m, j]  = Σ_c G[m, c]·R[c, j]: the step's 32 rows × rank over the strip's 128 columns (G with
//            ldmatrix as A, the strip's rows of R, staged once per block, with ldmatrix.trans as B),
//            written at once to q_partial[strip] (f32; lowrank_finalize adds the strips in order).
// At the end P goes to p_partial[chunk]. Every sum has a fixed order (mma over k16 steps, steps in order,
// chunks and strips in order in lowrank_finalize): the same bits on every run, no atomics.
//
// The rank is padded to its class (16, 32, 64, 128), one kernel per class, so at r = 16 no mma multiplies
// padding (the 128-wide GEMM tile of a plain N = r GEMM wastes 7/8). Ragged edges (rows past the chunk
// or M, columns past `cols`, rank past `rank`) are zero-filled loads and skipped stores. Loads are
// 16-byte cp.async where every operand allows it (flags), element loads otherwise.
//
// f32 adapters: the "_u_..._f32ad" kernels read R (= B) as f32, rounded once to the layer dtype as the
// strip is staged. LoRA dropout (dA = s·Uᵀ·dropout(X)): with LK_DROPOUT_G the X tile is masked as it is
// loaded (lk_philox.cuh; the 1/(1 − p) of the kept elements is in the finalize's scale).
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int TM = LK_GRAD_TM, TC = LK_GRAD_TC, STAGES = LK_GRAD_STAGES, THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int GP = TC + 8;  // G tile pitch: 272 B ≡ 16 mod 128, so 8 rows of an ldmatrix phase hit distinct banks
static_assert(TC == WARPS * 16, "P: one 16-column mma tile per warp");
static_assert(TM == 32 && LK_GRAD_CHUNK % TM == 0, "Q: two 16-row mma tiles per step; chunks are whole steps");

// The operands' shared-memory layout for rank class RP: the ring of G [TM][GP] and L [TM][LP] tiles, then
// R's strip [TC][LP]. LP = RP + 8 elements (2·RP + 16 bytes, an odd multiple of 16: conflict-free).
template <int RP>
struct Smem {
    static constexpr int LP = RP + 8;
    static constexpr int G_STAGE = TM * GP, L_STAGE = TM * LP;
};

template <int RP, bool VEC, bool DROP, typename T>
__device__ __forceinline__ void load_step(const LkLowrankGradParams& p, T* gs, T* ls, uint32_t row0, uint32_t row_end,
                                          uint32_t c0) {
    constexpr int LP = Smem<RP>::LP;
    const T* g = static_cast<const T*>(p.g);
    const T* l = static_cast<const T*>(p.l);
#pragma unroll
    for (int i = 0; i < TM * TC / 8 / THREADS; ++i) {
        const uint32_t chunk = threadIdx.x + i * THREADS, row = chunk / (TC / 8), col = (chunk % (TC / 8)) * 8;
        if constexpr (DROP)
            lk_load_chunk_dropout<VEC>(gs + row * GP + col, g, row0 + row, row_end, p.cols, c0 + col, p.cols,
                                       p.dropout);
        else
            lk_load_chunk<VEC>(gs + row * GP + col, g, row0 + row, row_end, p.cols, c0 + col, p.cols);
    }
    constexpr int L_CHUNKS = TM * RP / 8;
#pragma unroll
    for (int i = 0; i < (L_CHUNKS + THREADS - 1) / THREADS; ++i) {
        const uint32_t chunk = threadIdx.x + i * THREADS, row = chunk / (RP / 8), col = (chunk % (RP / 8)) * 8;
        if (L_CHUNKS % THREADS == 0 || chunk < L_CHUNKS)
            lk_load_chunk<VEC>(ls + row * LP + col, l, row0 + row, row_end, p.rank, col, p.rank);
    }
}

// R's rows [c0, c0 + TC) (B's rows of this strip), once per block; RT = float: f32 adapters, rounded to T.
template <int RP, bool VEC, typename RT, typename T>
__device__ __forceinline__ void load_r(const LkLowrankGradParams& p, T* rs, uint32_t c0) {
    constexpr int LP = Smem<RP>::LP, CHUNKS = TC * RP / 8;
    const RT* r = static_cast<const RT*>(p.r);
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const uint32_t chunk = threadIdx.x + i * THREADS, row = chunk / (RP / 8), col = (chunk % (RP / 8)) * 8;
        lk_load_chunk<VEC>(rs + row * LP + col, r, c0 + row, p.cols, p.rank, col, p.rank);
    }
}

template <typename T, typename RT, int RP, bool WITH_Q, bool VEC, bool DROP>
__device__ __forceinline__ void lowrank_grad_body(const LkLowrankGradParams& p, unsigned char* smem) {
    constexpr int LP = Smem<RP>::LP, NT = RP / 8;
    // Q's mma tiles (2 row tiles × NT column tiles) over the warps: row tile warp % 2, column tiles
    // warp / 2 + 4·i. At RP = 16 only 4 warps have one (the step is memory-bound either way).
    constexpr int QPW = NT >= 4 ? NT / 4 : 1;
    T* gs = reinterpret_cast<T*>(smem);
    T* ls = gs + STAGES * Smem<RP>::G_STAGE;
    T* rs = ls + STAGES * Smem<RP>::L_STAGE;
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const uint32_t mat = lane / 8, rin = lane % 8;
    const uint32_t c0 = blockIdx.x * TC;
    const uint32_t row_begin = blockIdx.y * p.rows_per_split;
    const uint32_t row_end = min(p.m, row_begin + p.rows_per_split);
    const int steps = int((row_end - row_begin + TM - 1) / TM);

    if (WITH_Q) load_r<RP, VEC, RT>(p, rs, c0);  // joins step 0's group (or, f32, plain stores)
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps)
            load_step<RP, VEC, DROP>(p, gs + s * Smem<RP>::G_STAGE, ls + s * Smem<RP>::L_STAGE, row_begin + s * TM, row_end,
                               c0);
        lk_cp_async_commit();
    }

    float accp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) accp[j][e] = 0.0f;

    for (int t = 0; t < steps; ++t) {
        lk_cp_async_wait<STAGES - 2>();  // this thread's copies of step t have landed ...
        __syncthreads();                 // ... everyone's, and everyone is done with step t - 1's stage
        const int pre = t + STAGES - 1;
        if (pre < steps)
            load_step<RP, VEC, DROP>(p, gs + (pre % STAGES) * Smem<RP>::G_STAGE, ls + (pre % STAGES) * Smem<RP>::L_STAGE,
                               row_begin + pre * TM, row_end, c0);
        lk_cp_async_commit();
        const T* gt = gs + (t % STAGES) * Smem<RP>::G_STAGE;
        const T* lt = ls + (t % STAGES) * Smem<RP>::L_STAGE;

        // P: this warp's 16 columns × the whole rank, k = the step's rows (G is k-major here)
#pragma unroll
        for (int kk = 0; kk < TM; kk += 16) {
            uint32_t af[4];
            lk_ldmatrix_x4_trans(af, gt + (kk + (mat >> 1) * 8 + rin) * GP + warp * 16 + (mat & 1) * 8);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t b[4];
                lk_ldmatrix_x4_trans(b, lt + (kk + (mat & 1) * 8 + rin) * LP + np * 16 + (mat >> 1) * 8);
                const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                lk_mma_m16n8k16<T>(accp[2 * np], af, b0);
                lk_mma_m16n8k16<T>(accp[2 * np + 1], af, b1);
            }
        }

        if (WITH_Q) {  // Q: the step's rows × this warp's column tiles, k = the strip's 128 columns
            const uint32_t mt = warp % 2;
            float q[QPW][4];
#pragma unroll
            for (int i = 0; i < QPW; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) q[i][e] = 0.0f;
            if (warp / 2 < uint32_t(NT)) {
#pragma unroll
                for (int kk = 0; kk < TC; kk += 16) {
                    uint32_t af[4];
                    lk_ldmatrix_x4(af, gt + (mt * 16 + lane % 16) * GP + kk + (lane / 16) * 8);
#pragma unroll
                    for (int i = 0; i < QPW; ++i) {
                        const uint32_t nt = warp / 2 + 4 * i;
                        uint32_t bf[2];
                        lk_ldmatrix_x2_trans(bf, rs + (kk + lane % 16) * LP + nt * 8);
                        lk_mma_m16n8k16<T>(q[i], af, bf);
                    }
                }
                float* qp = p.q_partial + size_t(blockIdx.x) * p.m * p.rank;
#pragma unroll
                for (int i = 0; i < QPW; ++i) {
                    const uint32_t j = (warp / 2 + 4 * i) * 8 + (lane % 4) * 2;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const uint32_t row = row_begin + t * TM + mt * 16 + lane / 4 + h * 8;
                        if (row >= row_end) continue;
                        if (j < p.rank) qp[size_t(row) * p.rank + j] = q[i][2 * h];
                        if (j + 1 < p.rank) qp[size_t(row) * p.rank + j + 1] = q[i][2 * h + 1];
                    }
                }
            }
        }
    }
    lk_cp_async_wait<0>();

    // P of this chunk: fragment rows are columns c of G, fragment columns the rank index j
    float* pp = p.p_partial + size_t(blockIdx.y) * p.cols * p.rank;
    const bool transposed = (p.flags & LK_GRAD_P_TRANSPOSED) != 0;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const uint32_t j = nt * 8 + (lane % 4) * 2;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t c = c0 + warp * 16 + lane / 4 + h * 8;
            if (c >= p.cols) continue;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                if (j + e >= p.rank) continue;
                const size_t at = transposed ? size_t(j + e) * p.cols + c : size_t(c) * p.rank + j + e;
                pp[at] = accp[nt][2 * h + e];
            }
        }
    }
}

template <typename T, typename RT, int RP, bool WITH_Q>
__device__ __forceinline__ void lowrank_grad_impl(const LkLowrankGradParams& p) {
    static_assert(RP % 16 == 0 && RP <= int(LK_MAX_RANK), "rank classes are multiples of 16");
    LK_DYNAMIC_SMEM(smem);
    const uint32_t needed = LK_ALIGNED_A | LK_ALIGNED_L | (WITH_Q ? LK_ALIGNED_R : 0u);
    const bool vec = (p.flags & needed) == needed;
    // The dropout of G exists for dA only (G = X, the plain kernels); the "_u" kernels never pay for it.
    if (!WITH_Q && (p.flags & LK_DROPOUT_G)) {
        if (vec)
            lowrank_grad_body<T, RT, RP, WITH_Q, true, !WITH_Q>(p, smem);
        else
            lowrank_grad_body<T, RT, RP, WITH_Q, false, !WITH_Q>(p, smem);
    } else if (vec) {
        lowrank_grad_body<T, RT, RP, WITH_Q, true, false>(p, smem);
    } else {
        lowrank_grad_body<T, RT, RP, WITH_Q, false, false>(p, smem);
    }
}
}  // namespace

#define LK_LOWRANK_GRAD(name, T, RT, RP, WITH_Q)                                          \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(LkLowrankGradParams p) { \
        LK_KERNEL_ENTRY();                                                               \
        lowrank_grad_impl<T, RT, RP, WITH_Q>(p);                                         \
    }

LK_LOWRANK_GRAD(lowrank_grad_r16_bf16, __nv_bfloat16, __nv_bfloat16, 16, false)
LK_KERNEL_EXPORT(lowrank_grad_r16_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r32_bf16, __nv_bfloat16, __nv_bfloat16, 32, false)
LK_KERNEL_EXPORT(lowrank_grad_r32_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r64_bf16, __nv_bfloat16, __nv_bfloat16, 64, false)
LK_KERNEL_EXPORT(lowrank_grad_r64_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r128_bf16, __nv_bfloat16, __nv_bfloat16, 128, false)
LK_KERNEL_EXPORT(lowrank_grad_r128_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r16_bf16, __nv_bfloat16, __nv_bfloat16, 16, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r16_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r32_bf16, __nv_bfloat16, __nv_bfloat16, 32, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r32_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r64_bf16, __nv_bfloat16, __nv_bfloat16, 64, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r64_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r128_bf16, __nv_bfloat16, __nv_bfloat16, 128, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r128_bf16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r16_bf16_f32ad, __nv_bfloat16, float, 16, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r16_bf16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r32_bf16_f32ad, __nv_bfloat16, float, 32, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r32_bf16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r64_bf16_f32ad, __nv_bfloat16, float, 64, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r64_bf16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r128_bf16_f32ad, __nv_bfloat16, float, 128, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r128_bf16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r16_f16, __half, __half, 16, false)
LK_KERNEL_EXPORT(lowrank_grad_r16_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r32_f16, __half, __half, 32, false)
LK_KERNEL_EXPORT(lowrank_grad_r32_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r64_f16, __half, __half, 64, false)
LK_KERNEL_EXPORT(lowrank_grad_r64_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_r128_f16, __half, __half, 128, false)
LK_KERNEL_EXPORT(lowrank_grad_r128_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r16_f16, __half, __half, 16, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r16_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r32_f16, __half, __half, 32, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r32_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r64_f16, __half, __half, 64, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r64_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r128_f16, __half, __half, 128, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r128_f16, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r16_f16_f32ad, __half, float, 16, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r16_f16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r32_f16_f32ad, __half, float, 32, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r32_f16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r64_f16_f32ad, __half, float, 64, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r64_f16_f32ad, LkLowrankGradParams)
LK_LOWRANK_GRAD(lowrank_grad_u_r128_f16_f32ad, __half, float, 128, true)
LK_KERNEL_EXPORT(lowrank_grad_u_r128_f16_f32ad, LkLowrankGradParams)
