// lk_tma.cuh: TMA copies (sm_90) between global memory, described by a tensor map (LkTensorMap, encoded on
// the host by lora_kernels::tma), and shared memory: 2-D tile loads that complete on an mbarrier
// (lk_mbarrier.cuh) and 2-D tile stores in bulk groups.
//
// Under nvcc: inline PTX, for sm_90 and later (older architectures trap). Under the emulator:
// kernels/emu/lk_emu_tma.cpp (swizzle on absolute shared-memory address bits, zero fill out of bounds,
// clipped stores, race and memcheck on every byte). The tensor map must be in parameter space: the kernel
// takes its parameter struct as `const __grid_constant__` and passes &p.map.
#pragma once
#include "lk_mbarrier.cuh"
#include "lora_params.h"

// Loads the box at (c0, c1) (innermost coordinate first; negative and past-the-end coordinates read
// zeros) into smem_dst (128-byte aligned; 1024 for the 128-byte swizzle to follow the tile's own rows),
// completing the box's full byte count on `bar`.
__device__ __forceinline__ void lk_tma_load_2d(void* smem_dst, const LkTensorMap* map, int32_t c0, int32_t c1,
                                               uint64_t* bar) {
#ifdef LK_EMU
    const int32_t c[2] = {c0, c1};
    ::lk_emu::tma_load(smem_dst, map, c, 2, bar);
#else
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(lk_smem_addr(smem_dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(lk_smem_addr(bar))
        : "memory");
#endif
#endif
}

// Stores the box at (c0, c1) from smem_src; elements outside the tensor are not written. smem_src may not
// be written until lk_bulk_wait_group_read retires the store's group. Other threads' writes to smem_src
// must happen before (a barrier) and be fenced to the async proxy (lk_fence_proxy_async) first.
__device__ __forceinline__ void lk_tma_store_2d(const LkTensorMap* map, int32_t c0, int32_t c1, const void* smem_src) {
#ifdef LK_EMU
    const int32_t c[2] = {c0, c1};
    ::lk_emu::tma_store(map, c, 2, smem_src);
#else
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(c0), "r"(c1), "r"(lk_smem_addr(smem_src))
                 : "memory");
#endif
#endif
}

// Closes this thread's current group of bulk stores.
__device__ __forceinline__ void lk_bulk_commit_group() {
#ifdef LK_EMU
    ::lk_emu::bulk_commit_group();
#else
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
#endif
}

// Waits until at most N of this thread's committed store groups still read their shared memory.
template <int N>
__device__ __forceinline__ void lk_bulk_wait_group_read() {
#ifdef LK_EMU
    ::lk_emu::bulk_wait_group(N);
#else
    LK_SM90_ONLY();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
#endif
}

// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (TMA stores, wgmma).
// The emulator checks that a byte a thread stored is read by a wgmma or a bulk tensor store only after a
// fence by that thread since the store (not where the fence sits relative to the barrier that orders them).
__device__ __forceinline__ void lk_fence_proxy_async() {
#if defined(LK_EMU)
    lk_emu::fence_proxy_async();
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
