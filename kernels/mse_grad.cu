// mse_grad.cu: dY of a mean-squared-error loss on the device, dy = round(scale · (y − target)), so a
// training loop computes its loss gradient without a host round trip (the finetune example). f32
// arithmetic with explicitly rounded operations (bit-identical to the CPU reference), one rounding.
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
template <typename T>
__device__ __forceinline__ void mse_grad_impl(const LkMseGradParams& p) {
    const T* y = static_cast<const T*>(p.y);
    const T* target = static_cast<const T*>(p.target);
    T* dy = static_cast<T*>(p.dy);
    const size_t stride = size_t(gridDim.x) * blockDim.x;  // 64-bit: i + stride never wraps below n
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
        dy[i] = lk_from_f32<T>(__fmul_rn(p.scale, __fadd_rn(lk_to_f32(y[i]), -lk_to_f32(target[i]))));
}
}  // namespace

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) mse_grad_bf16(LkMseGradParams p) { LK_KERNEL_ENTRY(); mse_grad_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(mse_grad_bf16, LkMseGradParams)
extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) mse_grad_f16(LkMseGradParams p) { LK_KERNEL_ENTRY(); mse_grad_impl<__half>(p); }
LK_KERNEL_EXPORT(mse_grad_f16, LkMseGradParams)
