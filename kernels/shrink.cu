// shrink.cu: the rank-r projection out = P·op(Q) (m × rank, rank ≤ 128), f32 accumulation.
//
//   forward  ("nt"): T = X·Aᵀ    P = X (m × k),  Q = A (rank × k)
//   backward ("nn"): U = dY·B    P = dY (m × n), Q = B (n × rank)
//
// Memory-bound (it reads its big operand P once and does 2·rank flops per element), so it is plain
// SIMT f32: a block of 256 threads owns 32 rows of P and every output column; the inner dimension
// is walked in chunks of 64, staged in shared memory as f32 (P chunk [32][65], Q chunk [64][129]).
// Thread (row = tid / 8, lane8 = tid % 8) accumulates columns lane8 + 8q, q < 16, in a fixed order:
// deterministic. Loads are 16-byte vectors when the operand is aligned with a multiple-of-8 leading
// dimension, element-wise with bounds checks otherwise.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kRows = LK_SHRINK_ROWS, kChunk = 64, kMaxRank = LK_MAX_RANK, kThreads = LK_SIMT_THREADS;

template <typename T, bool NN>
__device__ __forceinline__ void shrink_impl(const LkShrinkParams& p) {
    LK_SHARED(4, float, ps, [kRows][kChunk + 1]);
    LK_SHARED(4, float, qs, [kChunk][kMaxRank + 1]);
    const T* pm = static_cast<const T*>(p.p);
    const T* qm = static_cast<const T*>(p.q);
    T* out = static_cast<T*>(p.out);
    const uint32_t tid = threadIdx.x, row = tid / 8, lane8 = tid % 8;
    const uint32_t m0 = blockIdx.x * kRows;
    const bool p_vec = lk_is_aligned16(pm) && p.ldp % 8 == 0;
    const bool q_vec = lk_is_aligned16(qm) && p.ldq % 8 == 0;
    float acc[kMaxRank / 8];
#pragma unroll
    for (int q = 0; q < kMaxRank / 8; ++q) acc[q] = 0.0f;

    for (uint32_t i0 = 0; i0 < p.inner; i0 += kChunk) {
        __syncthreads();  // previous chunk consumed
        {                 // P chunk: 32 rows × 8 vectors, one per thread
            const uint32_t r = tid / 8, c = (tid % 8) * 8;
            float v[8];
            if (m0 + r < p.m)
                lk_load8(pm + size_t(m0 + r) * p.ldp, i0 + c, p.inner, p_vec, v);
            else
                for (int e = 0; e < 8; ++e) v[e] = 0.0f;
            for (int e = 0; e < 8; ++e) ps[r][c + e] = v[e];
        }
        if (!NN) {  // Q is rank × inner: rank rows × 8 vectors, stored transposed
            for (uint32_t c = tid; c < p.rank * 8; c += kThreads) {
                const uint32_t j = c / 8, ic = (c % 8) * 8;
                float v[8];
                lk_load8(qm + size_t(j) * p.ldq, i0 + ic, p.inner, q_vec, v);
                for (int e = 0; e < 8; ++e) qs[ic + e][j] = v[e];
            }
        } else {  // Q is inner × rank: 64 rows × ceil(rank / 8) vectors
            const uint32_t vecs = (p.rank + 7) / 8;
            for (uint32_t c = tid; c < kChunk * vecs; c += kThreads) {
                const uint32_t i = c / vecs, jc = (c % vecs) * 8;
                float v[8];
                if (i0 + i < p.inner)
                    lk_load8(qm + size_t(i0 + i) * p.ldq, jc, p.rank, q_vec, v);
                else
                    for (int e = 0; e < 8; ++e) v[e] = 0.0f;
                for (int e = 0; e < 8; ++e)
                    if (jc + e < p.rank) qs[i][jc + e] = v[e];
            }
        }
        __syncthreads();
        const uint32_t n_in = min(uint32_t(kChunk), p.inner - i0);
        for (uint32_t i = 0; i < n_in; ++i) {
            const float pv = ps[row][i];
#pragma unroll
            for (int q = 0; q < kMaxRank / 8; ++q) {
                const uint32_t j = lane8 + 8 * q;
                if (j < p.rank) acc[q] = __fmaf_rn(pv, qs[i][j], acc[q]);
            }
        }
    }
    if (m0 + row >= p.m) return;
#pragma unroll
    for (int q = 0; q < kMaxRank / 8; ++q) {
        const uint32_t j = lane8 + 8 * q;
        if (j < p.rank) out[size_t(m0 + row) * p.rank + j] = lk_from_f32<T>(acc[q]);
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) shrink_nt_bf16(LkShrinkParams p) { shrink_impl<__nv_bfloat16, false>(p); }
LK_KERNEL_EXPORT(shrink_nt_bf16, LkShrinkParams)
extern "C" __global__ void __launch_bounds__(kThreads) shrink_nt_f16(LkShrinkParams p) { shrink_impl<__half, false>(p); }
LK_KERNEL_EXPORT(shrink_nt_f16, LkShrinkParams)
extern "C" __global__ void __launch_bounds__(kThreads) shrink_nn_bf16(LkShrinkParams p) { shrink_impl<__nv_bfloat16, true>(p); }
LK_KERNEL_EXPORT(shrink_nn_bf16, LkShrinkParams)
extern "C" __global__ void __launch_bounds__(kThreads) shrink_nn_f16(LkShrinkParams p) { shrink_impl<__half, true>(p); }
LK_KERNEL_EXPORT(shrink_nn_f16, LkShrinkParams)
