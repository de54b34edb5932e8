// lk_mbarrier.cuh: mbarriers and bulk async copies (sm_90), the synchronisation of the Hopper pipelines:
// a producer fills a stage with cp.async.bulk copies that complete their bytes on the stage's "full"
// mbarrier; consumers wait for its phase, read the stage and arrive on its "empty" mbarrier; the producer
// waits for that before it refills the stage.
//
// Under nvcc: inline PTX, for sm_90 and later only (on older architectures each call traps, so a kernel
// that uses them must not be launched there). Under the emulator (LK_EMU): the runtime's implementation
// (kernels/emu/lk_emu_mbarrier.cpp), which checks the protocol (init visibility, tx-counts, parity,
// deadlocks) and orders shared-memory accesses through the barriers for the race detector.
//
// The mbarrier object is a uint64_t in shared memory (8-byte aligned), touched only by these functions.
#pragma once
#include "lk_intrinsics.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define LK_SM90_ONLY() __trap()
#else
#define LK_SM90_ONLY()
#endif

// mbarrier.init: `count` arrivals complete each phase (1..2^20-1). One thread inits; then
// lk_fence_mbarrier_init() and a __syncthreads before any other thread uses it.
__device__ __forceinline__ void lk_mbarrier_init(uint64_t* bar, uint32_t count) {
#ifdef LK_EMU
    ::lk_emu::mbarrier_init(bar, count);
#else
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(lk_smem_addr(bar)), "r"(count) : "memory");
#endif
#endif
}

// Makes the inits visible to the async proxy (the bulk copies' complete_tx). Not checked by the emulator.
__device__ __forceinline__ void lk_fence_mbarrier_init() {
#if !defined(LK_EMU) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900)
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival (release: this thread's earlier shared-memory accesses happen before the phase completes).
__device__ __forceinline__ uint64_t lk_mbarrier_arrive(uint64_t* bar) {
#ifdef LK_EMU
    return ::lk_emu::mbarrier_arrive(bar);
#else
    uint64_t state = 0;
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(lk_smem_addr(bar)) : "memory");
#endif
    return state;
#endif
}

// Adds `bytes` to the phase's tx-count, then arrives: the phase completes when the arrivals and the bulk
// copies' bytes are all in. `bytes` must be exactly what the copies signalling this phase deliver.
__device__ __forceinline__ uint64_t lk_mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef LK_EMU
    return ::lk_emu::mbarrier_arrive_expect_tx(bar, bytes);
#else
    uint64_t state = 0;
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n"
                 : "=l"(state)
                 : "r"(lk_smem_addr(bar)), "r"(bytes)
                 : "memory");
#endif
    return state;
#endif
}

// Whether the phase of parity `parity` (0 or 1) has completed (acquire when it has). May fail spuriously.
__device__ __forceinline__ bool lk_mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
#ifdef LK_EMU
    return ::lk_emu::mbarrier_try_wait_parity(bar, parity);
#else
    uint32_t done = 0;
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(lk_smem_addr(bar)), "r"(parity)
        : "memory");
#endif
    return done != 0;
#endif
}

// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void lk_mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
    while (!lk_mbarrier_try_wait_parity(bar, parity)) {
    }
}

// cp.async.bulk global -> shared: `bytes` (a multiple of 16; both addresses 16-byte aligned), completed on
// `bar` as tx bytes. The destination must not be touched until a wait on `bar` sees the phase complete.
__device__ __forceinline__ void lk_bulk_copy_g2s(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
#ifdef LK_EMU
    ::lk_emu::bulk_copy_g2s(smem_dst, gmem_src, bytes, bar);
#else
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     lk_smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(bytes), "r"(lk_smem_addr(bar))
                 : "memory");
#endif
#endif
}
