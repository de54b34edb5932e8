// dora.cu: DoRA's unmerged layer (PEFT's use_dora while training or serving an unmerged adapter), the
// two column passes around the plain fused LoRA GEMM.
//
// DoRA (arXiv 2402.09353; PEFT's DoraLinearVariant.forward, no dropout) rescales each output feature:
//   Z = X·W0ᵀ + s·(X·Aᵀ)·Bᵀ                      the fused forward (kernels/fused_gemm.cu), no bias
//   Y = f ⊙ Z + bias,  f_j = m_j / ‖W0_j + s·(B·A)_j‖   the norm detached (the paper's §4.3, as PEFT)
// so the backward is the plain LoRA backward of dZ = f ⊙ dY, plus the magnitude's gradient
//   dm_j = Σ_i dY_ij·Z_ij / ‖W0_j + s·(B·A)_j‖.
// The factors and norms come from the DoRA merge's norm pass (kernels/merge.cu, dora_factor_f32).
//
//   dora_scale_*:  Y_ij ← round(fma(f_j, Z_ij, bias_j)): f32, one rounding to Y's dtype.
//   dora_grad_*:   dZ_ij ← round(f_j·dY_ij), and per block of LK_DORA_ROWS rows the f32 sum
//                  Σ_i fma(dY_ij, Z_ij, ·) in ascending rows into partials[blockIdx.x · n + j].
//   dora_magnitude_grad_f32: dm_j ← round_f32(Σ_b partials[b][j] / norm_j), the sum in f64 in block order
//                  (plus the old dm_j in f64 when accumulating).
// With LoRA dropout (PEFT: Y = X·W0ᵀ + bias + (f − 1) ⊙ (dropout(X)·W0ᵀ) + f ⊙ s·(dropout(X)·Aᵀ)·Bᵀ) the
// layer is computed as Y = f ⊙ Z + (1 − f) ⊙ D + bias with Z the fused forward under the adapter's
// dropout and D = (X − dropout(X))·W0ᵀ (a plain GEMM of dropout_residual_*'s output): the same sum,
// regrouped so that the one extra GEMM is W0 on the part of X the adapter did not see. The scale pass
// then also saves Z − D = dropout(X)·W0ᵀ + s·T·Bᵀ (what f multiplies, dm's other factor), the grad
// pass also writes (1 − f) ⊙ dY, whose product with W0, through dropout_residual_*, is added to dX.
//   dropout_residual_*: out ← round(c ⊙ x) or round(out + c ⊙ x), c = 1 where the mask drops an element
//                  and 1 − 1/(1 − p) where it keeps one: x − dropout(x) for X, and for dX's added term.
// No atomics and no order that depends on the grid's schedule: the same bits on every run.
//
// Geometry (both column passes): a block of LK_SIMT_THREADS threads, one column each (a warp reads 32
// consecutive elements of a row), LK_DORA_ROWS rows in ascending order; grid x over the row blocks
// (up to 2^31 − 1), grid y over the column blocks, grid-stride where there are more than 65535.
#include "lk_philox.cuh"
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
template <typename T, bool kGrad>
__device__ __forceinline__ void columns_impl(const LkDoraColumnsParams& p) {
    const T* z = static_cast<const T*>(p.z);
    const T* dy = static_cast<const T*>(p.dy);
    const T* bias = static_cast<const T*>(p.bias);
    T* out = static_cast<T*>(p.out);
    const T* residual = static_cast<const T*>(p.residual);
    T* aux = static_cast<T*>(p.aux);
    const uint32_t row0 = blockIdx.x * LK_DORA_ROWS;
    const uint32_t rows = min(LK_DORA_ROWS, p.m - row0);
    const uint32_t col_blocks = (p.n + LK_SIMT_THREADS - 1) / LK_SIMT_THREADS;
    for (uint32_t cb = blockIdx.y; cb < col_blocks; cb += gridDim.y) {
        const uint32_t col = cb * LK_SIMT_THREADS + threadIdx.x;
        if (col >= p.n) continue;
        const float f = p.factor[col];
        const float rest = __fsub_rn(1.0f, f);  // the factor of the dropout residual's term (dropout only)
        if constexpr (kGrad) {
            float sum = 0.0f;
            for (uint32_t i = 0; i < rows; ++i) {
                const size_t e = size_t(row0 + i) * p.n + col;  // 64-bit: M·N may pass 2^32
                const float g = lk_to_f32(dy[e]);
                sum = __fmaf_rn(g, lk_to_f32(z[e]), sum);
                out[e] = lk_from_f32<T>(__fmul_rn(f, g));
                if (aux) aux[e] = lk_from_f32<T>(__fmul_rn(rest, g));
            }
            p.partials[size_t(blockIdx.x) * p.n + col] = sum;
        } else {
            const float b = bias ? lk_to_f32(bias[col]) : 0.0f;
            for (uint32_t i = 0; i < rows; ++i) {
                const size_t e = size_t(row0 + i) * p.n + col;
                const float zv = lk_to_f32(z[e]);
                if (residual) {
                    const float dv = lk_to_f32(residual[e]);
                    out[e] = lk_from_f32<T>(__fmaf_rn(f, zv, __fmaf_rn(rest, dv, b)));
                    aux[e] = lk_from_f32<T>(__fsub_rn(zv, dv));
                } else {
                    out[e] = lk_from_f32<T>(__fmaf_rn(f, zv, b));
                }
            }
        }
    }
}
}  // namespace

#define LK_DORA_COLUMNS(name, T, GRAD) \
    extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) name(LkDoraColumnsParams p) { LK_KERNEL_ENTRY(); columns_impl<T, GRAD>(p); }

LK_DORA_COLUMNS(dora_scale_bf16, __nv_bfloat16, false)
LK_KERNEL_EXPORT(dora_scale_bf16, LkDoraColumnsParams)
LK_DORA_COLUMNS(dora_scale_f16, __half, false)
LK_KERNEL_EXPORT(dora_scale_f16, LkDoraColumnsParams)
LK_DORA_COLUMNS(dora_grad_bf16, __nv_bfloat16, true)
LK_KERNEL_EXPORT(dora_grad_bf16, LkDoraColumnsParams)
LK_DORA_COLUMNS(dora_grad_f16, __half, true)
LK_KERNEL_EXPORT(dora_grad_f16, LkDoraColumnsParams)

// dm[j] = round_f32(Σ_b partials[b][j] / norm[j]) (+ the old dm[j]), in f64: one thread per column.
extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) dora_magnitude_grad_f32(LkDoraMagnitudeGradParams p) {
    LK_KERNEL_ENTRY();
    const uint32_t col = blockIdx.x * LK_SIMT_THREADS + threadIdx.x;
    if (col >= p.n) return;
    double sum = 0.0;
    for (uint32_t b = 0; b < p.blocks; ++b) sum += double(p.partials[size_t(b) * p.n + col]);
    double g = sum / double(p.norm[col]);
    if (p.accumulate) g += double(p.dmagnitude[col]);
    p.dmagnitude[col] = float(g);
}
LK_KERNEL_EXPORT(dora_magnitude_grad_f32, LkDoraMagnitudeGradParams)

// out ← round(c ⊙ x) (+ out), c_e = 1 (dropped) or keep_residual (kept): X − dropout(X), element by element
// with the mask of lk_philox.cuh. One thread per group of 4 elements (one generator call), grid-stride.
namespace {
template <typename T>
__device__ __forceinline__ void dropout_residual_impl(const LkDropoutResidualParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    const uint64_t offset = lk_dropout_offset(p.dropout);
    const uint64_t groups = (p.count + 3) / 4;
    const uint64_t stride = uint64_t(gridDim.x) * LK_SIMT_THREADS;
    for (uint64_t q = uint64_t(blockIdx.x) * LK_SIMT_THREADS + threadIdx.x; q < groups; q += stride) {
        const LkPhiloxWords w = lk_dropout_words_at(p.dropout, offset, q);
        for (uint32_t i = 0; i < 4; ++i) {
            const uint64_t e = q * 4 + i;
            if (e >= p.count) break;
            const float c = lk_philox_word(w, i) >= p.dropout.threshold ? p.keep_residual : 1.0f;
            const float v = lk_to_f32(x[e]);
            out[e] = lk_from_f32<T>(p.accumulate ? __fmaf_rn(c, v, lk_to_f32(out[e])) : __fmul_rn(c, v));
        }
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) dropout_residual_bf16(LkDropoutResidualParams p) {
    LK_KERNEL_ENTRY();
    dropout_residual_impl<__nv_bfloat16>(p);
}
LK_KERNEL_EXPORT(dropout_residual_bf16, LkDropoutResidualParams)
extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) dropout_residual_f16(LkDropoutResidualParams p) {
    LK_KERNEL_ENTRY();
    dropout_residual_impl<__half>(p);
}
LK_KERNEL_EXPORT(dropout_residual_f16, LkDropoutResidualParams)
