// lk_intrinsics.cuh: the only way kernels reach tensor-core and async-copy instructions.
// Under nvcc: inline PTX (mma.sync m16n8k16, ldmatrix, cp.async). Under the emulator (LK_EMU, host
// compiler with lk_emu_prelude.h): calls into the emulator runtime, which implements the PTX ISA's
// semantics and fragment layouts. Kernels include this header and nothing architecture-specific.
//
// Also: LK_KERNEL_EXPORT(name, Params), which gives every kernel an emulator entry point (and is read by
// build.rs to generate the Rust kernel table), LK_DYNAMIC_SMEM(name) for dynamic shared memory, and
// LK_KERNEL_ENTRY(), the first statement of every kernel (programmatic dependent launch, below).
#pragma once
#include <stdint.h>

#ifndef LK_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#ifdef LK_EMU
// The params copy is the runtime's, not the kernel's: it is not instrumented (and not inlined into the
// instrumented kernel, whose own accesses are all checked).
#define LK_KERNEL_EXPORT(name, Params)                                   \
    extern "C" __attribute__((no_sanitize_thread)) void lk_emu_body_##name(const void* p) { \
        name(*static_cast<const Params*>(p));                            \
    }
#define LK_DYNAMIC_SMEM(name) unsigned char* name = ::lk_emu::dyn_smem()
// Static shared memory: `LK_SHARED(16, float, xs, [16][256]);` declares `__shared__ __align__(16) float
// xs[16][256];`. Under the emulator it is a reference into the block's static arena (red zones around it,
// poisoned at block start, bounds- and race-checked, 48 KB per block at most).
#define LK_SHARED(align, type, name, dims)                                                                \
    static char lk_shared_site_##name;                                                                    \
    type(&name) dims = *reinterpret_cast<type(*) dims>(                                                   \
        ::lk_emu::static_smem(&lk_shared_site_##name, sizeof(type dims), alignof(type) > (align) ? alignof(type) : (align), #name))
#else
#define LK_KERNEL_EXPORT(name, Params)
// One declaration per translation unit: every kernel's dynamic shared memory starts here.
extern __shared__ __align__(128) unsigned char lk_dyn_smem[];
#define LK_DYNAMIC_SMEM(name) unsigned char* name = lk_dyn_smem
#define LK_SHARED(align, type, name, dims) __shared__ __align__(align) type name dims
#endif

// A vector access (uint4: 16 B, uint32_t: 4 B) through `p`. The GPU faults on one that is not aligned
// to its size ("misaligned address"); x86 does not, so under the emulator this checks it and fails the
// launch the way the GPU would. Every wide load or store in the kernels goes through here.
__device__ __forceinline__ void lk_check_vec_aligned(const void* p, unsigned bytes) {
#ifdef LK_EMU
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
        ::lk_emu::fail("a %u-byte vector access at %p is not %u-byte aligned (the GPU faults on it)", bytes, p,
                       bytes);
#else
    (void)p;
    (void)bytes;
#endif
}
template <typename V, typename P>
__device__ __forceinline__ V* lk_vec(P* p) {
    lk_check_vec_aligned(p, sizeof(V));
    return reinterpret_cast<V*>(p);
}
template <typename V, typename P>
__device__ __forceinline__ const V* lk_vec(const P* p) {
    lk_check_vec_aligned(p, sizeof(V));
    return reinterpret_cast<const V*>(p);
}

// Programmatic dependent launch (sm_90 and later; src/device/cuda.rs). On a GPU of compute capability 9.0
// or newer running code built for sm_90 or newer, every kernel of the crate is launched with programmatic
// stream serialization allowed: it may be scheduled while the kernel before it in the stream is still
// running, so its blocks can be resident when that one finishes instead of being launched after it (a
// latency that weighs most on an op of a few µs in several launches, like the decoding forward). In
// exchange a kernel must execute griddepcontrol.wait (all prerequisite grids complete, their memory
// visible) before it touches global memory. LK_KERNEL_ENTRY() is therefore every kernel's first
// statement: the wait, then griddepcontrol.launch_dependents, which lets the next kernel, if it is
// launched that way, be scheduled once every block of this one has started (its blocks take only
// resources this grid leaves free). The wait is a no-op in a launch without the attribute; both are
// compiled out below sm_90, whose code is never launched that way. The emulator checks the rule (a
// global access before the thread's wait fails the launch), CI the SASS (scripts/sass-entry.awk).
__device__ __forceinline__ void lk_grid_dependency_wait() {
#ifdef LK_EMU
    ::lk_emu::grid_dependency_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void lk_launch_dependents() {
#if !defined(LK_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
#define LK_KERNEL_ENTRY()            \
    do {                             \
        lk_grid_dependency_wait();   \
        lk_launch_dependents();      \
    } while (0)

// D = A·B + C, A 16x16 (row), B 16x8 (col), f32 accumulators; fragments as in the PTX ISA.
__device__ __forceinline__ void lk_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#ifdef LK_EMU
    ::lk_emu::mma_m16n8k16(false, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

__device__ __forceinline__ void lk_mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#ifdef LK_EMU
    ::lk_emu::mma_m16n8k16(true, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// d += a·b with the mma of a kernel's element type T (bf16 or f16 operands, f32 accumulators).
template <typename T> __device__ __forceinline__ void lk_mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <> __device__ __forceinline__ void lk_mma_m16n8k16<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    lk_mma_m16n8k16_bf16(d, a, b, d);
}
template <> __device__ __forceinline__ void lk_mma_m16n8k16<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    lk_mma_m16n8k16_f16(d, a, b, d);
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of matrix i.
#ifdef LK_EMU
#define LK_LDMATRIX(N, TRANS, SUFFIX)                                                              \
    __device__ __forceinline__ void lk_ldmatrix_x##N##SUFFIX(uint32_t r[N], const void* row) {    \
        ::lk_emu::ldmatrix(N, TRANS, r, row);                                                      \
    }
LK_LDMATRIX(1, false, )
LK_LDMATRIX(2, false, )
LK_LDMATRIX(4, false, )
LK_LDMATRIX(1, true, _trans)
LK_LDMATRIX(2, true, _trans)
LK_LDMATRIX(4, true, _trans)
#undef LK_LDMATRIX
#else
__device__ __forceinline__ uint32_t lk_smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void lk_ldmatrix_x1(uint32_t r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(lk_smem_addr(row)));
}
__device__ __forceinline__ void lk_ldmatrix_x2(uint32_t r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(lk_smem_addr(row)));
}
__device__ __forceinline__ void lk_ldmatrix_x4(uint32_t r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(lk_smem_addr(row)));
}
__device__ __forceinline__ void lk_ldmatrix_x1_trans(uint32_t r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(lk_smem_addr(row)));
}
__device__ __forceinline__ void lk_ldmatrix_x2_trans(uint32_t r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(lk_smem_addr(row)));
}
__device__ __forceinline__ void lk_ldmatrix_x4_trans(uint32_t r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(lk_smem_addr(row)));
}
#endif

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies src_bytes (0..16), zero-fills the rest.
__device__ __forceinline__ void lk_cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
#ifdef LK_EMU
    ::lk_emu::cp_async_16(smem_dst, gmem_src, src_bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(lk_smem_addr(smem_dst)), "l"(gmem_src), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void lk_cp_async_commit() {
#ifdef LK_EMU
    ::lk_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void lk_cp_async_wait() {
#ifdef LK_EMU
    ::lk_emu::cp_async_wait(N);
#else
    // "memory": the shared-memory reads after the wait (merge.cu reads its own copies with no barrier
    // between) must not be moved above it by the compiler
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ uint32_t lk_pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return uint32_t(l) | (uint32_t(h) << 16);
}
__device__ __forceinline__ uint32_t lk_pack_f16x2(__half lo, __half hi) {
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return uint32_t(l) | (uint32_t(h) << 16);
}
