// l2_probe.cu: l2_read_u32, a read-bandwidth probe for the speed bound (docs/perf/bound.md), not a LoRA op.
//
// The sm_90a GEMM's TMA loads bring every stage's tiles from L2 into shared memory: 3.3 GB for the
// headline forward, which needs ~9 TB/s from L2 at the target time. Whether L2 delivers that decides
// whether two-CTA clusters (multicast, 2/3 of the bytes) are worth building, and nothing here knew
// L2's rate. This kernel measures it: every thread of a grid of several blocks per SM reads its share of
// a buffer that fits in L2, `passes` times (another thread's share each pass), with 16-byte loads that
// skip L1 (ld.global.cg), four in flight; after the first pass the bytes come from L2, so bytes read / time is the rate L2 feeds the
// SMs (examples/perf_table.rs prints it). Each thread writes the wrapping u32 sum of the words it read
// (no atomics: the same bits every run), which the host checks word for word (src/probe.rs).
#include "lk_intrinsics.cuh"
#include "lora_params.h"

// 16 bytes from global memory, cached in L2 only. volatile: the same addresses are read every pass, and
// the compiler must neither merge nor hoist those reads.
__device__ __forceinline__ uint4 lk_load_l2(const uint4* p) {
#ifdef LK_EMU
    return *lk_vec<uint4>(p);
#else
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(lk_vec<uint4>(p)));
    return v;
#endif
}

__device__ __forceinline__ uint32_t lk_word_sum(uint4 v) { return v.x + v.y + v.z + v.w; }

// The host keeps n16 + 4·G and G + passes·blockDim under 2^32 (src/probe.rs): no index below wraps.
extern "C" __global__ void __launch_bounds__(LK_SIMT_THREADS) l2_read_u32(LkL2ReadParams p) {
    LK_KERNEL_ENTRY();
    const uint4* src = static_cast<const uint4*>(p.src);
    const uint32_t stride = gridDim.x * blockDim.x, first = blockIdx.x * blockDim.x + threadIdx.x;
    uint32_t sum = 0;
    for (uint32_t pass = 0; pass < p.passes; ++pass) {
        // each pass, thread g reads the words thread (g + pass·blockDim) mod G read on the first: a kernel
        // that read them once (loads merged or hoisted) gives other sums, and no SM finds last pass's
        // lines in its L1
        uint32_t i = (first + pass * blockDim.x) % stride;
        for (; i + 3 * stride < p.n16; i += 4 * stride) {  // four loads issued before any is used
            uint4 v[4];
#pragma unroll
            for (uint32_t u = 0; u < 4; ++u) v[u] = lk_load_l2(src + i + u * stride);
#pragma unroll
            for (uint32_t u = 0; u < 4; ++u) sum += lk_word_sum(v[u]);
        }
        for (; i < p.n16; i += stride) sum += lk_word_sum(lk_load_l2(src + i));
    }
    p.sums[first] = sum;
}
LK_KERNEL_EXPORT(l2_read_u32, LkL2ReadParams)
