// lk_sm90.cuh: sm_90a warpgroup register reallocation (setmaxnreg): a warp-specialised kernel gives its
// producer warpgroup few registers and its consumers many. Warpgroup-uniform, N a multiple of 8 in 24..256;
// the kernel needs __launch_bounds__(threads, 1). Under nvcc for anything but sm_90a it does nothing (the
// Hopper kernels are only built for sm_90a); under the emulator it checks N.
#pragma once
#include "lk_intrinsics.cuh"

template <int N>
__device__ __forceinline__ void lk_setmaxnreg_check() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in 24..256");
}

template <int N>
__device__ __forceinline__ void lk_setmaxnreg_inc() {
    lk_setmaxnreg_check<N>();
#if !defined(LK_EMU) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

template <int N>
__device__ __forceinline__ void lk_setmaxnreg_dec() {
    lk_setmaxnreg_check<N>();
#if !defined(LK_EMU) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
