// lowrank_grad.cu: the adapter gradients, G = s·Pᵀ·Q, reductions over the m (token) rows.
//
//   dB = s·dYᵀ·T    P = dY (m × n), Q = T (m × r)   -> G is n × r
//   dA = s·Uᵀ·X     P = U (m × r),  Q = X (m × k)   -> G is r × k
//
// Deterministic by construction, with no atomics: the m range is cut into `splits` chunks whose
// count and size depend on the shape only (src/ops/backward.rs); block (x, y, z) sums chunk z of a
// 64 × 64 tile of G in a fixed order (rows of the chunk ascending, 32 at a time through shared memory)
// and writes f32 partials; `lowrank_finalize` adds the partials in chunk order, scales once and rounds
// once. With one chunk the first kernel writes G itself. Same inputs, same bits, on every run.
//
// SIMT f32: these are 2·m·r·(n or k) flops, a few percent of the dX GEMM at the ranks LoRA uses, and
// they stream dY and X once; tensor cores would not change the backward's total time much.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kTile = LK_GRAD_TILE, kChunk = LK_GRAD_CHUNK, kThreads = LK_SIMT_THREADS;

template <typename T>
__device__ __forceinline__ void lowrank_grad_impl(const LkLowrankGradParams& p) {
    LK_SHARED(4, float, ps, [kChunk][kTile]);
    LK_SHARED(4, float, qs, [kChunk][kTile]);
    const T* pm = static_cast<const T*>(p.p);
    const T* qm = static_cast<const T*>(p.q);
    const uint32_t tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    const uint32_t r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
    const uint32_t m_begin = blockIdx.z * p.rows_per_split;
    const uint32_t m_end = min(p.m, m_begin + p.rows_per_split);
    const bool p_vec = lk_is_aligned16(pm) && p.ldp % 8 == 0;
    const bool q_vec = lk_is_aligned16(qm) && p.ldq % 8 == 0;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (uint32_t mc = m_begin; mc < m_end; mc += kChunk) {
        __syncthreads();
        {  // 32 rows × 8 vectors of P's and of Q's tile columns: one vector of each per thread
            const uint32_t r = tid / 8, c = (tid % 8) * 8, m = mc + r;
            float v[8], w[8];
            if (m < m_end) {
                lk_load8(pm + size_t(m) * p.ldp, r0 + c, p.rows_g, p_vec, v);
                lk_load8(qm + size_t(m) * p.ldq, c0 + c, p.cols_g, q_vec, w);
            } else {
                for (int e = 0; e < 8; ++e) v[e] = w[e] = 0.0f;
            }
            for (int e = 0; e < 8; ++e) {
                ps[r][c + e] = v[e];
                qs[r][c + e] = w[e];
            }
        }
        __syncthreads();
#pragma unroll 4
        for (int mm = 0; mm < kChunk; ++mm) {
            float pv[4], qv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                pv[i] = ps[mm][ty * 4 + i];
                qv[i] = qs[mm][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(pv[i], qv[j], acc[i][j]);
        }
    }

    T* g = static_cast<T*>(p.g);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t row = r0 + ty * 4 + i;
        if (row >= p.rows_g) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t col = c0 + tx * 4 + j;
            if (col >= p.cols_g) continue;
            const size_t idx = size_t(row) * p.cols_g + col;
            if (p.partial != nullptr)
                p.partial[size_t(blockIdx.z) * p.rows_g * p.cols_g + idx] = acc[i][j];
            else
                g[idx] = lk_from_f32<T>(__fmul_rn(p.scale, acc[i][j]));
        }
    }
}

template <typename T>
__device__ __forceinline__ void lowrank_finalize_impl(const LkLowrankFinalizeParams& p) {
    T* g = static_cast<T*>(p.g);
    const uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += stride) {
        float sum = 0.0f;
        for (uint32_t s = 0; s < p.splits; ++s) sum = __fadd_rn(sum, p.partial[size_t(s) * p.count + i]);
        g[i] = lk_from_f32<T>(__fmul_rn(p.scale, sum));
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) lowrank_grad_bf16(LkLowrankGradParams p) { lowrank_grad_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(lowrank_grad_bf16, LkLowrankGradParams)
extern "C" __global__ void __launch_bounds__(kThreads) lowrank_grad_f16(LkLowrankGradParams p) { lowrank_grad_impl<__half>(p); }
LK_KERNEL_EXPORT(lowrank_grad_f16, LkLowrankGradParams)
extern "C" __global__ void __launch_bounds__(kThreads) lowrank_finalize_bf16(LkLowrankFinalizeParams p) { lowrank_finalize_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(lowrank_finalize_bf16, LkLowrankFinalizeParams)
extern "C" __global__ void __launch_bounds__(kThreads) lowrank_finalize_f16(LkLowrankFinalizeParams p) { lowrank_finalize_impl<__half>(p); }
LK_KERNEL_EXPORT(lowrank_finalize_f16, LkLowrankFinalizeParams)
