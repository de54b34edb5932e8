// grad_clip.cu: global-norm gradient clipping (PyTorch's torch.nn.utils.clip_grad_norm_, the
// max_grad_norm of Hugging Face's Trainer) on the device: the squares of every gradient summed in a fixed
// order, the norm and the clip coefficient computed by one block, and the gradients scaled in place, so
// a training step clips without a host round trip (and inside a graph). Deterministic: no atomics, the
// blocks' partial sums are added in order; the chunks depend on the tensors' sizes alone.
//
// grad_sumsq_f32:   one block per LK_GRAD_CLIP_CHUNK elements of one tensor; each thread sums the squares
//                   of its strided elements (fma, in order), then a fixed tree over the block.
// grad_clip_coef:   one block of 32 threads; thread t adds partials t, t + 32, ... in f64, thread 0 the
//                   32 sums in order; norm = f32(√Σ), coef = max_norm / (norm + 1e-6), at most 1.
// grad_clip_f32:    x[i] = x[i] · coef (elementwise, the coefficient read from device memory).
#include "lk_tile.cuh"
#include "lora_params.h"

namespace {
constexpr int SUMSQ_THREADS = LK_SIMT_THREADS;
constexpr int COEF_THREADS = 32;
}  // namespace

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) grad_sumsq_f32(LkGradSumsqParams p) {
    LK_KERNEL_ENTRY();
    LK_SHARED(16, float, sums, [SUMSQ_THREADS]);
    // offsets within the chunk: begin + CHUNK, or an index past the chunk, would wrap in u32 at the
    // end of a tensor of nearly 2^32 elements
    const uint32_t begin = blockIdx.x * LK_GRAD_CLIP_CHUNK;
    const uint32_t len = min(LK_GRAD_CLIP_CHUNK, p.n - begin);
    const float* x = p.x + begin;
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < len; j += SUMSQ_THREADS) acc = __fmaf_rn(x[j], x[j], acc);
    sums[threadIdx.x] = acc;
    __syncthreads();
#pragma unroll
    for (uint32_t stride = SUMSQ_THREADS / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) sums[threadIdx.x] = __fadd_rn(sums[threadIdx.x], sums[threadIdx.x + stride]);
        __syncthreads();
    }
    if (threadIdx.x == 0) p.partial[blockIdx.x] = sums[0];
}
LK_KERNEL_EXPORT(grad_sumsq_f32, LkGradSumsqParams)

extern "C" __global__ void __launch_bounds__(COEF_THREADS) grad_clip_coef(LkGradClipCoefParams p) {
    LK_KERNEL_ENTRY();
    LK_SHARED(16, double, sums, [COEF_THREADS]);
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < p.count; i += COEF_THREADS) acc += double(p.partial[i]);
    sums[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int t = 0; t < COEF_THREADS; ++t) total += sums[t];
        const float norm = float(sqrt(total));
        const float coef = __fdiv_rn(p.max_norm, __fadd_rn(norm, 1e-6f));
        p.result[0] = norm;
        p.result[1] = coef > 1.0f ? 1.0f : coef;  // a NaN coefficient stays NaN, as torch.clamp leaves it
    }
}
LK_KERNEL_EXPORT(grad_clip_coef, LkGradClipCoefParams)

extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) grad_clip_f32(LkGradClipParams p) {
    LK_KERNEL_ENTRY();
    const float coef = p.result[1];
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
        p.x[i] = __fmul_rn(p.x[i], coef);
}
LK_KERNEL_EXPORT(grad_clip_f32, LkGradClipParams)
