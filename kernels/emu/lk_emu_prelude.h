// lk_emu_prelude.h: force-included (g++ -include) when the host compiler builds kernels/*.cu for the
// CPU emulator. It supplies what nvcc would: the CUDA keywords, the built-in thread variables, barriers,
// warp shuffles and the bf16/f16 types, with no NVIDIA header. The runtime behind it is
// lk_emu_*.cpp (see lk_emu_internal.h): one fiber per CUDA thread, a real __syncthreads, warp
// rendezvous for collectives, and checks on every memory access (the kernel files are compiled with
// -fsanitize=thread, whose hooks the runtime defines).
//
// Static shared memory is declared with LK_SHARED(align, type, name, dims) (lk_intrinsics.cuh), which
// the emulator places in a per-block arena with red zones, poisoned at every block start and covered by
// the race detector. A plain `__shared__` declaration does not compile under the emulator.
#pragma once
#ifndef LK_EMU
#define LK_EMU 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ LK_EMU_plain___shared___is_not_emulated_declare_static_shared_memory_with_LK_SHARED

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace lk_emu {

// The emulated thread the OS thread is running now (set by the scheduler before each switch).
struct ThreadCtx {
    uint3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local ThreadCtx* current;

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
unsigned char* dyn_smem();
// griddepcontrol.wait: from here on this thread may access global memory (LkEmuLaunch.dependent)
void grid_dependency_wait();

enum ShflKind { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
uint32_t shfl(ShflKind kind, unsigned mask, uint32_t value, int lane_arg, int width);

void mma_m16n8k16(bool f16, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
void ldmatrix(int n, bool trans, uint32_t* regs, const void* row_addr);
void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
void* static_smem(const void* site, size_t bytes, size_t align, const char* name);
void mbarrier_init(void* bar, uint32_t count);
uint64_t mbarrier_arrive(void* bar);
uint64_t mbarrier_arrive_expect_tx(void* bar, uint32_t bytes);
bool mbarrier_try_wait_parity(void* bar, uint32_t parity);
void bulk_copy_g2s(void* smem_dst, const void* gmem_src, uint32_t bytes, void* bar);
void tma_load(void* smem_dst, const void* map, const int32_t* coords, int ncoords, void* bar);
void tma_store(const void* map, const int32_t* coords, int ncoords, const void* smem_src);
void bulk_commit_group();
void bulk_wait_group(int n);
uint32_t smem_address(const void* p);  // the shared-memory address of p (as cvta.to.shared)
void wgmma_fence();
void fence_proxy_async();
void wgmma_commit();
void wgmma_wait(int n);
void wgmma_mma_async(float* d, int n, bool f16, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b,
                     bool accumulate, int trans_a, int trans_b);
void checked_copy(void* dst, const void* src, size_t n);
void checked_fill(void* dst, int value, size_t n);

// memcpy/memset in kernel code: constant small sizes become plain (instrumented) loads and stores;
// anything else is checked by the runtime, so no copy escapes memcheck and the race detector.
inline void* kernel_memcpy(void* dst, const void* src, size_t n) {
    if (__builtin_constant_p(n) && n <= 16) return __builtin_memcpy(dst, src, n);
    checked_copy(dst, src, n);
    return dst;
}
inline void* kernel_memset(void* dst, int value, size_t n) {
    if (__builtin_constant_p(n) && n <= 16) return __builtin_memset(dst, value, n);
    checked_fill(dst, value, n);
    return dst;
}

template <typename T>
T shfl_any(ShflKind kind, unsigned mask, T v, int lane_arg, int width) {
    static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                  "emulated shuffles take 4- or 8-byte values");
    uint32_t w[2] = {0, 0};
    std::memcpy(w, &v, sizeof(T));
    w[0] = shfl(kind, mask, w[0], lane_arg, width);
    if (sizeof(T) == 8) w[1] = shfl(kind, mask, w[1], lane_arg, width);
    T out;
    std::memcpy(&out, w, sizeof(T));
    return out;
}

}  // namespace lk_emu

#define threadIdx (::lk_emu::current->thread_idx)
#define blockIdx (::lk_emu::current->block_idx)
#define blockDim (::lk_emu::current->block_dim)
#define gridDim (::lk_emu::current->grid_dim)
#define warpSize 32

#define __syncthreads() ::lk_emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::lk_emu::syncwarp(mask, "__syncwarp", 0); }
inline void __threadfence_block() {}
inline void __threadfence() {}
[[noreturn]] inline void __trap() { ::lk_emu::fail("kernel called __trap()"); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return ::lk_emu::shfl_any(::lk_emu::SHFL_IDX, mask, v, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::lk_emu::shfl_any(::lk_emu::SHFL_UP, mask, v, int(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::lk_emu::shfl_any(::lk_emu::SHFL_DOWN, mask, v, int(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return ::lk_emu::shfl_any(::lk_emu::SHFL_XOR, mask, v, lane_mask, width);
}

// ---- bf16 / f16, bit-compatible with CUDA's, conversions rounding to nearest even ----

struct __nv_bfloat16 {
    uint16_t __x;
};
struct __half {
    uint16_t __x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct __half2 {
    __half x, y;
};
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2, "16-bit storage");

inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{uint16_t(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
// _Float16 conversions are IEEE (libgcc, round to nearest even, subnormals, overflow to inf).
inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.__x, 2);
    return float(v);
}
inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.__x, &v, 2);
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// Explicitly rounded f32 ops (never contracted into an fma), as CUDA's intrinsics.
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
inline float __fsub_rn(float a, float b) {
    volatile float r = a - b;
    return r;
}
inline float __fdiv_rn(float a, float b) {
    volatile float r = a / b;
    return r;
}
inline float __fsqrt_rn(float a) {
    volatile float r = std::sqrt(a);
    return r;
}
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

using std::max;
using std::min;

// Last, so the prelude's own helpers above use the real functions on their locals; kernel files only
// (the runtime, which includes this header too, copies with the real functions).
#ifndef LK_EMU_RUNTIME
#define memcpy(d, s, n) ::lk_emu::kernel_memcpy((d), (s), (n))
#define memset(d, v, n) ::lk_emu::kernel_memset((d), (v), (n))
#define memmove(d, s, n) ::lk_emu::kernel_memcpy((d), (s), (n))
#endif
