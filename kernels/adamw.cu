// adamw.cu: one fused AdamW step over the adapter parameters, on the device, in one pass: f32 master
// weights, f32 moments, the f32 gradient, and optionally the layer-dtype copy of the weights the LoRA
// kernels read, written in the same pass (so a training step never leaves the device).
//
// The formula is PyTorch's AdamW (decoupled weight decay, bias-corrected moments), with every operation
// an explicitly rounded f32 operation (__fmul_rn, __fadd_rn, __fsqrt_rn, __fdiv_rn: never contracted into
// an FMA) in the order written in lora_params.h, so the CPU reference of the same formula
// (src/ops/adamw.rs) gives the same bits. Elementwise: no reduction, nothing to make deterministic.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int kThreads = LK_SIMT_THREADS;

template <typename C>
__device__ __forceinline__ void adamw_impl(const LkAdamwParams& p) {
    C* copy = static_cast<C*>(p.copy);
    const size_t stride = size_t(gridDim.x) * blockDim.x;  // 64-bit: i + stride never wraps below n
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float g = p.grad[i];
        float w = __fmul_rn(p.param[i], p.decay);
        const float m = __fadd_rn(__fmul_rn(p.beta1, p.m[i]), __fmul_rn(p.one_minus_beta1, g));
        const float v = __fadd_rn(__fmul_rn(p.beta2, p.v[i]), __fmul_rn(p.one_minus_beta2, __fmul_rn(g, g)));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), p.bc2_sqrt), p.eps);
        w = __fadd_rn(w, -__fmul_rn(p.step_size, __fdiv_rn(m, denom)));
        p.m[i] = m;
        p.v[i] = v;
        p.param[i] = w;
        if (copy != nullptr) copy[i] = lk_from_f32<C>(w);
    }
}
}  // namespace

// The suffix is the dtype of the optional copy (NULL: no copy, either kernel).
extern "C" __global__ void __launch_bounds__(kThreads) adamw_bf16(LkAdamwParams p) { LK_KERNEL_ENTRY(); adamw_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(adamw_bf16, LkAdamwParams)
extern "C" __global__ void __launch_bounds__(kThreads) adamw_f16(LkAdamwParams p) { LK_KERNEL_ENTRY(); adamw_impl<__half>(p); }
LK_KERNEL_EXPORT(adamw_f16, LkAdamwParams)
