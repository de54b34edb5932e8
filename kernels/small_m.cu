// small_m.cu: the decoding forward, m ≤ 16 tokens through an unmerged adapter:
// Y = X·W0ᵀ + s·T·Bᵀ (+ bias), with T = X·Aᵀ from shrink.cu.
//
// At m ≤ 16 a 128-row GEMM tile is mostly padding and the layer is bound by reading W0 (n × k) once,
// so this is a GEMV-style kernel that streams W0 exactly once at full width: each warp owns 2 rows of
// W0 (a block of 8 warps owns 16), its 32 lanes split k (lane l reads elements 8l..8l+7 of every
// 256-wide chunk, one 16-byte vector per row), the chunk of X (≤ 16 × 256) sits in shared memory as f32
// and is reused by every row of the block. At the end each of the 2·m partial sums is reduced across
// the lanes by a fixed xor butterfly (deterministic), then lane j < m adds s·Σ_i T[j][i]·B[n][i] and
// the bias and writes Y[j][n]: Y is written once.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kMaxM = LK_SMALL_M_MAX, kChunk = 256, kRowsPerWarp = 2, kWarps = 8, kThreads = 32 * kWarps;
static_assert(kThreads == LK_SIMT_THREADS && kRowsPerWarp * kWarps == LK_SMALL_M_ROWS,
              "small_m's tiling must match the launch geometry in lora_params.h");

template <typename T>
__device__ __forceinline__ void small_m_impl(const LkSmallMParams& p) {
    LK_SHARED(16, float, xs, [kMaxM][kChunk]);
    const T* x = static_cast<const T*>(p.x);
    const T* w0 = static_cast<const T*>(p.w0);
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const uint32_t n_base = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
    const bool x_vec = lk_is_aligned16(x) && p.k % 8 == 0;
    const bool w_vec = lk_is_aligned16(w0) && p.k % 8 == 0;
    float acc[kRowsPerWarp][kMaxM];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
        for (int j = 0; j < kMaxM; ++j) acc[r][j] = 0.0f;

    for (uint32_t k0 = 0; k0 < p.k; k0 += kChunk) {
        __syncthreads();  // previous chunk of X consumed
        for (uint32_t c = tid; c < kMaxM * (kChunk / 8); c += kThreads) {
            const uint32_t j = c / (kChunk / 8), kc = (c % (kChunk / 8)) * 8;
            float v[8];
            if (j < p.m)
                lk_load8(x + size_t(j) * p.k, k0 + kc, p.k, x_vec, v);
            else
                for (int e = 0; e < 8; ++e) v[e] = 0.0f;
            for (int e = 0; e < 8; ++e) xs[j][kc + e] = v[e];
        }
        __syncthreads();
        const uint32_t kk = k0 + lane * 8;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
            const uint32_t n = n_base + r;
            if (n >= p.n || kk >= p.k) continue;
            float w[8];
            lk_load8(w0 + size_t(n) * p.k, kk, p.k, w_vec, w);
#pragma unroll
            for (int j = 0; j < kMaxM; ++j) {
                if (j >= int(p.m)) break;
                float s = acc[r][j];
#pragma unroll
                for (int e = 0; e < 8; ++e) s = __fmaf_rn(w[e], xs[j][lane * 8 + e], s);
                acc[r][j] = s;
            }
        }
    }

    const T* t = static_cast<const T*>(p.t);
    const T* b = static_cast<const T*>(p.b);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const uint32_t n = n_base + r;  // uniform across the warp: the shuffles below see all 32 lanes
        float mine = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxM; ++j) {
            float s = acc[r][j];
#pragma unroll
            for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (int(lane) == j) mine = s;
        }
        if (n >= p.n || lane >= p.m) continue;
        float low = 0.0f;
        for (uint32_t i = 0; i < p.rank; ++i)
            low = __fmaf_rn(lk_to_f32(t[size_t(lane) * p.rank + i]), lk_to_f32(b[size_t(n) * p.rank + i]), low);
        float v = __fadd_rn(mine, __fmul_rn(p.scale, low));
        if (bias != nullptr) v = __fadd_rn(v, lk_to_f32(bias[n]));
        y[size_t(lane) * p.n + n] = lk_from_f32<T>(v);
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) small_m_bf16(LkSmallMParams p) { small_m_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(small_m_bf16, LkSmallMParams)
extern "C" __global__ void __launch_bounds__(kThreads) small_m_f16(LkSmallMParams p) { small_m_impl<__half>(p); }
LK_KERNEL_EXPORT(small_m_f16, LkSmallMParams)
