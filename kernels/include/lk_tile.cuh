// lk_tile.cuh: moving 16-bit operand tiles from global to shared memory, shared by the tensor-core
// kernels (fused_gemm, lowrank_grad): one 8-element chunk at a time, a 16-byte cp.async where the operand
// allows it, else element loads, zero outside the operand, so ragged edges need no other handling.
#pragma once
#include "lk_convert.cuh"
#include "lk_philox.cuh"

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

// The register-staged chunk loaders: one 8-element chunk is read into registers, transformed, and stored
// to shared memory with one 16-byte store (a plain store, not cp.async: visible after the next barrier,
// like the ring's cp.async copies once waited for). For operands that cannot be copied as they are.

// An f32 operand (f32 master adapters) as 8 elements of T, each rounded once to nearest even. VEC: two
// 16-byte loads (the operand is 16-byte aligned with ld % 8 == 0), else element loads.
template <bool VEC, typename T>
__device__ __forceinline__ void lk_load_chunk(T* dst, const float* base, uint32_t row, uint32_t nrows, uint32_t ld,
                                              uint32_t col, uint32_t ncols) {
    float v[8];
    const bool row_ok = row < nrows;
    const float* src = base + (row_ok ? size_t(row) * ld : 0);
    if (VEC && row_ok && col + 8 <= ncols) {
        const float4 lo = *lk_vec<float4>(src + col), hi = *lk_vec<float4>(src + col + 4);
        v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i) v[i] = (row_ok && col + i < ncols) ? src[col + i] : 0.0f;
    }
    uint4 raw;
    uint16_t* e = reinterpret_cast<uint16_t*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const T h = lk_from_f32<T>(v[i]);
        memcpy(&e[i], &h, 2);
    }
    *lk_vec<uint4>(dst) = raw;
}

// A 16-bit operand under the dropout mask (lk_philox.cuh): the chunk of X at (row, col), dropped elements
// zeroed (the 1/(1 − p) of the kept ones is in the kernel's scale), so the tile holds X ⊙ mask exactly.
// The element index is row·ld + col: X is dense, ld = K.
template <bool VEC, typename T>
__device__ __forceinline__ void lk_load_chunk_dropout(T* dst, const T* base, uint32_t row, uint32_t nrows,
                                                      uint32_t ld, uint32_t col, uint32_t ncols,
                                                      const LkDropout& d) {
    uint4 raw = {0u, 0u, 0u, 0u};
    uint16_t* e = reinterpret_cast<uint16_t*>(&raw);
    if (row < nrows && col < ncols) {
        const T* src = base + size_t(row) * ld;
        const uint64_t e0 = uint64_t(row) * ld + col, offset = lk_dropout_offset(d);
        if (VEC && col + 8 <= ncols) {  // e0 % 8 == 0 (ld % 8 == 0): two whole generator calls
            raw = *lk_vec<uint4>(src + col);
            const LkPhiloxWords w0 = lk_dropout_words_at(d, offset, e0 / 4),
                                w1 = lk_dropout_words_at(d, offset, e0 / 4 + 1);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (w0.w[i] < d.threshold) e[i] = 0;
                if (w1.w[i] < d.threshold) e[4 + i] = 0;
            }
        } else {
#pragma unroll
            for (uint32_t i = 0; i < 8; ++i)
                if (col + i < ncols && lk_dropout_keep_at(d, offset, e0 + i)) e[i] = lk_bits16(&src[col + i]);
        }
    }
    *lk_vec<uint4>(dst) = raw;
}
