// lk_convert.cuh: dtype-generic load/store helpers for kernels instantiated per element type.
// Conversions to f32 are exact; lk_from_f32 rounds to nearest even (CUDA's __float2*_rn), which the
// emulator prelude reproduces bit for bit, so both backends round identically.
#pragma once
#include "lk_intrinsics.cuh"

// <type_traits> without the header (the emulator's prelude and nvcc's device code both take these).
template <typename A, typename B> struct lk_same { static constexpr bool value = false; };
template <typename A> struct lk_same<A, A> { static constexpr bool value = true; };
template <typename A> struct lk_remove_cvref { using type = A; };
template <typename A> struct lk_remove_cvref<const A&> { using type = A; };
template <typename A> struct lk_remove_cvref<A&> { using type = A; };

__device__ __forceinline__ float lk_to_f32(float v) { return v; }
__device__ __forceinline__ float lk_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float lk_to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T lk_from_f32(float v);
template <> __device__ __forceinline__ float lk_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 lk_from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half lk_from_f32<__half>(float v) { return __float2half(v); }

// The raw bits of one 16-bit element (bf16/f16), for copying elements into a fragment or a tile without
// converting: one 16-bit load (a 2-byte memcpy compiles to two byte loads).
template <typename T> __device__ __forceinline__ uint16_t lk_bits16(const T* p) {
    static_assert(sizeof(T) == 2, "a 16-bit element type");
    return *reinterpret_cast<const uint16_t*>(p);
}

// Two values rounded to T (bf16/f16) and packed, lo in the low half: one 4-byte store of two adjacent
// elements.
template <typename T> __device__ __forceinline__ uint32_t lk_pack2(float lo, float hi) {
    const T a = lk_from_f32<T>(lo), b = lk_from_f32<T>(hi);
    return uint32_t(lk_bits16(&a)) | (uint32_t(lk_bits16(&b)) << 16);
}
