// lk_philox.cuh: the LoRA dropout mask, from the counter-based generator Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the generator of cuRAND and PyTorch's CUDA
// dropout). A mask bit is a pure function of (seed, offset, element index), so every kernel that needs
// the mask (the forward's T, the backward's dA and dX) regenerates it instead of storing it, the
// emulator and the GPU compute the same bits, and src/dropout.rs implements the same function for the
// CPU reference. The 32×32→64-bit products are written as plain 64-bit multiplies (mul.wide.u32 on the
// GPU), so the emulator needs no intrinsic.
#pragma once
#include "lora_params.h"
#include "lk_intrinsics.cuh"

struct LkPhiloxWords {
    uint32_t w[4];
};

// Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1), the constants of the paper.
__device__ __forceinline__ LkPhiloxWords lk_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                         uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
        const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return LkPhiloxWords{{c0, c1, c2, c3}};
}

// Word i (0..3, a run-time value) of a generator call, without indexing the array at run time (which
// would put it in local memory).
__device__ __forceinline__ uint32_t lk_philox_word(const LkPhiloxWords& w, uint32_t i) {
    return i == 0 ? w.w[0] : i == 1 ? w.w[1] : i == 2 ? w.w[2] : w.w[3];
}

// The mask's offset: the launch's, or the one in device memory (a schedule: read at each use, a cached
// load beside the generator's ten rounds, so no kernel has to thread a resolved copy through).
__device__ __forceinline__ uint64_t lk_dropout_offset(const LkDropout& d) {
    return d.offset_words ? (uint64_t(d.offset_words[1]) << 32) | d.offset_words[0] : d.offset;
}

// The four 32-bit words of element group e / 4 (elements 4q .. 4q + 3 share one generator call) under
// the mask's offset (lk_dropout_offset(d), which a loop over many groups reads once).
__device__ __forceinline__ LkPhiloxWords lk_dropout_words_at(const LkDropout& d, uint64_t offset, uint64_t group) {
    return lk_philox4x32_10(uint32_t(group), uint32_t(group >> 32), uint32_t(offset), uint32_t(offset >> 32),
                            uint32_t(d.seed), uint32_t(d.seed >> 32));
}

__device__ __forceinline__ LkPhiloxWords lk_dropout_words(const LkDropout& d, uint64_t group) {
    return lk_dropout_words_at(d, lk_dropout_offset(d), group);
}

// Whether element e of X is kept.
__device__ __forceinline__ bool lk_dropout_keep_at(const LkDropout& d, uint64_t offset, uint64_t e) {
    return lk_philox_word(lk_dropout_words_at(d, offset, e / 4), uint32_t(e % 4)) >= d.threshold;
}

__device__ __forceinline__ bool lk_dropout_keep(const LkDropout& d, uint64_t e) {
    return lk_dropout_keep_at(d, lk_dropout_offset(d), e);
}
