// lk_tile.cuh: bounds-checked loads and stores of 8 consecutive elements between global memory and
// f32 registers, shared by the SIMT kernels (merge, shrink, lowrank_grad, small_m).
//
// `vec` selects one 16-byte access (legal only when the caller checked that the row's base address is
// 16-byte aligned and `col` is a multiple of 8); without it, or at the ragged end of a row, elements are
// read one by one and those at or past `ncols` read as 0 (stores skip them). So every kernel has a fast
// path for aligned, multiple-of-8 shapes and a correct path for everything else, chosen at run time.
#pragma once
#include "lk_convert.cuh"

template <typename T>
__device__ __forceinline__ void lk_load8(const T* row, uint32_t col, uint32_t ncols, bool vec, float out[8]) {
    if (sizeof(T) == 2 && vec && col + 8 <= ncols) {
        uint4 raw = *lk_vec<uint4>(row + col);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = lk_to_f32(e[i]);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (col + i < ncols) ? lk_to_f32(row[col + i]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void lk_store8(T* row, uint32_t col, uint32_t ncols, bool vec, const float v[8]) {
    if (sizeof(T) == 2 && vec && col + 8 <= ncols) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = lk_from_f32<T>(v[i]);
        *lk_vec<uint4>(row + col) = raw;
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
        if (col + i < ncols) row[col + i] = lk_from_f32<T>(v[i]);
}

__device__ __forceinline__ bool lk_is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}
