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
    // the step's constants: the launch's own, or a schedule's, read from device memory (a captured graph
    // replays the same launch while the host advances the schedule between replays)
    LkAdamwConstants c = p.c;
    if (p.schedule != nullptr) {
        const LkAdamwConstants* s = p.schedule;
        c.decay = s->decay;
        c.beta1 = s->beta1;
        c.one_minus_beta1 = s->one_minus_beta1;
        c.beta2 = s->beta2;
        c.one_minus_beta2 = s->one_minus_beta2;
        c.step_size = s->step_size;
        c.bc2_sqrt = s->bc2_sqrt;
        c.eps = s->eps;
    }
    const size_t stride = size_t(gridDim.x) * blockDim.x;  // 64-bit: i + stride never wraps below n
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float g = p.grad[i];
        float w = __fmul_rn(p.param[i], c.decay);
        const float m = __fadd_rn(__fmul_rn(c.beta1, p.m[i]), __fmul_rn(c.one_minus_beta1, g));
        const float v = __fadd_rn(__fmul_rn(c.beta2, p.v[i]), __fmul_rn(c.one_minus_beta2, __fmul_rn(g, g)));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.bc2_sqrt), c.eps);
        w = __fadd_rn(w, -__fmul_rn(c.step_size, __fdiv_rn(m, denom)));
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
