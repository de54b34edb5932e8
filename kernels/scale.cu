// scale.cu: y[i] = s * x[i] for bf16, f16 and f32 (f32 arithmetic, one rounding per element).
//
// The trivial kernel family that carries the whole path end to end: build.rs compiles it with nvcc
// (embedded fatbin) and with the host compiler under the emulator prelude, src/ops/scale.rs plans and
// launches it on either backend, and tests/scale.rs checks it against src/reference.rs.
// A grid-stride loop, so any n runs with a capped grid.
#include "lk_intrinsics.cuh"
#include "lk_convert.cuh"
#include "lora_params.h"

template <typename T>
__device__ __forceinline__ void scale_impl(const LkScaleParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const size_t stride = size_t(gridDim.x) * blockDim.x;  // 64-bit: i + stride never wraps below n
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        y[i] = lk_from_f32<T>(lk_to_f32(x[i]) * p.scale);
    }
}

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) scale_bf16(LkScaleParams p) { LK_KERNEL_ENTRY(); scale_impl<__nv_bfloat16>(p); }
LK_KERNEL_EXPORT(scale_bf16, LkScaleParams)

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) scale_f16(LkScaleParams p) { LK_KERNEL_ENTRY(); scale_impl<__half>(p); }
LK_KERNEL_EXPORT(scale_f16, LkScaleParams)

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) scale_f32(LkScaleParams p) { LK_KERNEL_ENTRY(); scale_impl<float>(p); }
LK_KERNEL_EXPORT(scale_f32, LkScaleParams)
