// lowrank_finalize.cu: the last step of every split reduction: the gradients dB = s·dYᵀ·T, dA = s·Uᵀ·X
// and U = dY·B (lowrank_grad.cu, or dB's and dA's per-row-block partials of the sm_90a dX kernel,
// sm90/fused_gemm_t_sm90.cu), and the projection T = X·Aᵀ when it is split over K (fused_gemm.cu, or the
// small-batch shrink of multi_decode.cu, for one adapter or a set of them).
//
// Those kernels sum fixed chunks (token chunks, column strips, row blocks, K chunks) into f32 partials
// (splits × count); this kernel adds the partials of each element in chunk order, scales once and
// rounds once: G = round(s · Σ_chunk partial), or G = round(G + s · Σ_chunk partial) when accumulating
// gradients over micro-batches (f32 sum, one rounding). The chunks depend on the shape only
// (src/ops/launch.rs grad_splits for the tokens, projection_splits for K), so the same inputs give the
// same bits on every run, with no atomics.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kThreads = LK_SIMT_THREADS;

template <typename T>
__device__ __forceinline__ void lowrank_finalize_impl(const LkLowrankFinalizeParams& p) {
    T* g = static_cast<T*>(p.g);
    const size_t stride = size_t(gridDim.x) * blockDim.x;  // 64-bit: i + stride never wraps below count
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.count; i += stride) {
        float sum = 0.0f;
        for (uint32_t s = 0; s < p.splits; ++s) sum = __fadd_rn(sum, p.partial[size_t(s) * p.count + i]);
        const float v = __fmul_rn(p.scale, sum);
        g[i] = lk_from_f32<T>(p.accumulate ? __fadd_rn(lk_to_f32(g[i]), v) : v);
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) lowrank_finalize_bf16(LkLowrankFinalizeParams p) { LK_KERNEL_ENTRY(); lowrank_finalize_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(lowrank_finalize_bf16, LkLowrankFinalizeParams)
extern "C" __global__ void __launch_bounds__(kThreads) lowrank_finalize_f16(LkLowrankFinalizeParams p) { LK_KERNEL_ENTRY(); lowrank_finalize_impl<__half>(p); }
LK_KERNEL_EXPORT(lowrank_finalize_f16, LkLowrankFinalizeParams)
// f32 gradients (f32 adapters): G = s · Σ partial (+ G), no rounding to a narrower dtype.
extern "C" __global__ void __launch_bounds__(kThreads) lowrank_finalize_f32(LkLowrankFinalizeParams p) { LK_KERNEL_ENTRY(); lowrank_finalize_impl<float>(p); }
LK_KERNEL_EXPORT(lowrank_finalize_f32, LkLowrankFinalizeParams)
