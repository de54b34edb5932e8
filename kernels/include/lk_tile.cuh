// lk_tile.cuh: moving 16-bit operand tiles from global to shared memory, shared by the tensor-core
// kernels (fused_gemm, lowrank_grad): one 8-element chunk at a time, a 16-byte cp.async where the operand
// allows it, else element loads, zero outside the operand, so ragged edges need no other handling.
#pragma once
#include "lk_convert.cuh"

__device__ __forceinline__ bool lk_is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// One 8-element (16-byte) chunk of a 16-bit operand into shared memory (fused_gemm, lowrank_grad): row
// `row` from column `col`, both in the operand's own coordinates; zero outside rows < nrows, cols <
// ncols. VEC: one cp.async (the operand is 16-byte aligned with ld % 8 == 0), else element loads.
template <bool VEC, typename T>
__device__ __forceinline__ void lk_load_chunk(T* dst, const T* base, uint32_t row, uint32_t nrows, uint32_t ld,
                                              uint32_t col, uint32_t ncols) {
    const bool row_ok = row < nrows;
    if (VEC) {
        const int bytes = (row_ok && col < ncols) ? int(min(8u, ncols - col)) * 2 : 0;
        const T* src = bytes > 0 ? base + size_t(row) * ld + col : base;  // never form an address past the data
        lk_cp_async_16(dst, src, bytes);
    } else {
        uint4 raw;
        uint16_t* e = reinterpret_cast<uint16_t*>(&raw);
        const T* src = base + size_t(row) * ld;
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i) {
            // memcpy, not lk_bits16: the latter halves this (slow) path's loads but, at the 128-register
            // limit, costs the sm_80 "nn" vector loop 4 instructions per k-tile (ptxas, nvcc 13.0)
            uint16_t bits = 0;
            if (row_ok && col + i < ncols) memcpy(&bits, &src[col + i], 2);
            e[i] = bits;
        }
        *lk_vec<uint4>(dst) = raw;
    }
}
