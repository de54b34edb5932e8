// lk_multi.cuh: what the two multi-adapter forward kernels (fused_gemm_multi.cu, multi_decode.cu) share
// besides the tiles: where a DoRA row's factors are.
#pragma once
#include "lora_params.h"

// Where the factors of a row with adapter v (LK_NO_ADAPTER: none) start in p.factors, or LK_NO_FACTOR for a
// plain adapter, no adapter, or no table (lora_params.h LkFusedGemmMultiParams). The table's elements fit
// u32 (src/adapter_set.rs store_factor), so this plus a column does too.
__device__ __forceinline__ uint32_t lk_multi_factor_at(const LkFusedGemmMultiParams& p, uint32_t v) {
    if (p.factors == nullptr || v == LK_NO_ADAPTER) return LK_NO_FACTOR;
    const uint32_t row = p.adapters[v].factor_row;
    return row == LK_NO_FACTOR ? LK_NO_FACTOR : row * p.n;
}
