// lk_wgmma.cuh: warpgroup MMA (wgmma.mma_async, sm_90a): D[64×N] (+)= A[64×16]·B[16×N] by the 128 threads of
// a warpgroup (warps 4g..4g+3), f32 accumulators in registers, A and B read from shared memory through
// matrix descriptors (A may come from registers instead), asynchronously: issue, commit a group, wait.
//
// Accumulators: thread t of the warpgroup (warp w = t/32, lane l) holds d[i], i < N/2, at
//   row 16w + l/4 + 8·((i/2)%2), column 8·(i/4) + 2·(l%4) + i%2      (lk_wgmma_acc_row/col)
// Descriptors (lk_wgmma_desc): start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29), stride
// byte offset >> 4 (32-45), base offset 0, swizzle (62-63: LK_WGMMA_SWIZZLE_*, NOT the tensor map's
// encoding). An operand element (row r of A's M or B's N, column k < 16), 2-byte elements:
//   K-major,  no swizzle: start + 16·(r%8) + SBO·(r/8) + 2·(k%8) + LBO·(k/8)
//   K-major,  W-byte swizzle: start + W·(r%8) + SBO·(r/8) + 2·k                (LBO unused)
//   MN-major, no swizzle: start + 2·(r%8) + SBO·(r/8) + 16·(k%8) + LBO·(k/8)
//   MN-major, W-byte swizzle: start + 2·(r%(W/2)) + LBO·(r/(W/2)) + W·(k%8) + SBO·(k/8)
// then the swizzle on the absolute shared-memory address (as TMA's, lk_tma.cuh). So a 128-byte swizzled
// TMA tile of 64-element rows at a 1024-byte boundary is K-major with SBO 1024, its k16 step kb at +32·kb.
//
// Rules the emulator enforces (kernels/emu/lk_emu_wgmma.cpp): all 128 threads issue the same wgmma; a
// thread issues only after lk_wgmma_fence() since its last wait (registers touched between); the
// accumulators read NaN until the lk_wgmma_wait that retires their group; shared memory an issued wgmma
// reads may not be written until every thread of the warpgroup has waited for it; a thread may not exit
// with wgmma results pending.
#pragma once
#include <type_traits>

#include "lk_intrinsics.cuh"

#define LK_WGMMA_SWIZZLE_NONE 0u
#define LK_WGMMA_SWIZZLE_128B 1u
#define LK_WGMMA_SWIZZLE_64B 2u
#define LK_WGMMA_SWIZZLE_32B 3u

#if !defined(LK_EMU) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LK_WGMMA_PTX 1
#include "lk_wgmma_ptx.cuh"
#endif

__device__ __forceinline__ uint32_t lk_wgmma_acc_row(uint32_t t, uint32_t i) {
    return 16 * ((t % 128) / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2);
}
__device__ __forceinline__ uint32_t lk_wgmma_acc_col(uint32_t t, uint32_t i) {
    return 8 * (i / 4) + 2 * (t % 4) + i % 2;
}

// The matrix descriptor of an operand at `smem` (16-byte aligned) with byte offsets lbo and sbo.
__device__ __forceinline__ uint64_t lk_wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo, uint32_t swizzle) {
#ifdef LK_EMU
    const uint32_t addr = ::lk_emu::smem_address(smem);
#else
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#endif
    return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
           (uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t(swizzle & 3) << 62);
}

#if !defined(LK_EMU) && !defined(LK_WGMMA_PTX)
// Not an sm_90a build: the kernels that use these are compiled only for sm_90a (build.rs).
#define LK_WGMMA_UNAVAILABLE() __trap()
#endif

__device__ __forceinline__ void lk_wgmma_fence() {
#ifdef LK_EMU
    ::lk_emu::wgmma_fence();
#elif defined(LK_WGMMA_PTX)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    LK_WGMMA_UNAVAILABLE();
#endif
}

__device__ __forceinline__ void lk_wgmma_commit() {
#ifdef LK_EMU
    ::lk_emu::wgmma_commit();
#elif defined(LK_WGMMA_PTX)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    LK_WGMMA_UNAVAILABLE();
#endif
}

// Waits until at most N of this thread's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void lk_wgmma_wait() {
#ifdef LK_EMU
    ::lk_emu::wgmma_wait(N);
#elif defined(LK_WGMMA_PTX)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
    LK_WGMMA_UNAVAILABLE();
#endif
}

// Tells the compiler that registers a wgmma reads or writes asynchronously are used here, so that it moves
// no arithmetic on them across this point: after a wait, before reading accumulators; before the fence
// that precedes a wgmma, after writing its accumulators or register-A fragments. (The wgmma asm names its
// registers only at the issue; the fence and the wait name none.) No instruction is emitted.
template <typename R, int N>
__device__ __forceinline__ void lk_wgmma_fence_operands(R (&regs)[N]) {
#if !defined(LK_EMU) && defined(LK_WGMMA_PTX)
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if constexpr (std::is_same<R, float>::value)
            asm volatile("" : "+f"(regs[i])::"memory");
        else
            asm volatile("" : "+r"(regs[i])::"memory");
    }
#else
    (void)regs;
#endif
}

// d (N/2 floats per thread) = A·B (+ d when `accumulate`); A, B by descriptor; TA/TB: 0 K-major, 1 MN-major.
template <typename T, int N, int TA = 0, int TB = 0>
__device__ __forceinline__ void lk_wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 128 || N == 256, "N of lk_wgmma_ptx.cuh");
#ifdef LK_EMU
    ::lk_emu::wgmma_mma_async(d, N, std::is_same<T, __half>::value, nullptr, desc_a, desc_b, accumulate, TA, TB);
#elif defined(LK_WGMMA_PTX)
#define LK_WGMMA_SS_CASE(n)                                                                         \
    if constexpr (N == n) {                                                                         \
        if constexpr (std::is_same<T, __half>::value)                                                \
            lk_wgmma_ss_m64n##n##k16_f16<TA, TB>(d, desc_a, desc_b, accumulate ? 1u : 0u);          \
        else                                                                                        \
            lk_wgmma_ss_m64n##n##k16_bf16<TA, TB>(d, desc_a, desc_b, accumulate ? 1u : 0u);         \
    }
    LK_WGMMA_SS_CASE(8)
    LK_WGMMA_SS_CASE(16)
    LK_WGMMA_SS_CASE(32)
    LK_WGMMA_SS_CASE(64)
    LK_WGMMA_SS_CASE(128)
    LK_WGMMA_SS_CASE(256)
#undef LK_WGMMA_SS_CASE
#else
    (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
    LK_WGMMA_UNAVAILABLE();
#endif
}

// As lk_wgmma_ss with A from registers: a[4] as mma.m16n8k16's A fragment, warp w holding rows 16w..16w+15.
template <typename T, int N, int TB = 0>
__device__ __forceinline__ void lk_wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
    static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 128 || N == 256, "N of lk_wgmma_ptx.cuh");
#ifdef LK_EMU
    ::lk_emu::wgmma_mma_async(d, N, std::is_same<T, __half>::value, a, 0, desc_b, accumulate, 0, TB);
#elif defined(LK_WGMMA_PTX)
#define LK_WGMMA_RS_CASE(n)                                                              \
    if constexpr (N == n) {                                                              \
        if constexpr (std::is_same<T, __half>::value)                                     \
            lk_wgmma_rs_m64n##n##k16_f16<TB>(d, a, desc_b, accumulate ? 1u : 0u);         \
        else                                                                             \
            lk_wgmma_rs_m64n##n##k16_bf16<TB>(d, a, desc_b, accumulate ? 1u : 0u);        \
    }
    LK_WGMMA_RS_CASE(8)
    LK_WGMMA_RS_CASE(16)
    LK_WGMMA_RS_CASE(32)
    LK_WGMMA_RS_CASE(64)
    LK_WGMMA_RS_CASE(128)
    LK_WGMMA_RS_CASE(256)
#undef LK_WGMMA_RS_CASE
#else
    (void)d, (void)a, (void)desc_b, (void)accumulate;
    LK_WGMMA_UNAVAILABLE();
#endif
}
