// planted_checks.cu (test-only): one planted bug per kernel for the emulator's race detector, shared-memory
// bounds, memcheck/initcheck and the programmatic-dependent-launch rule, switched on by `bug`; with bug = 0
// each kernel is correct. Every bug here passed the emulator before those checks existed (no NaN reaches
// an output, all thread orders agree), and tests/emulator_checks.rs requires each to fail its launch with
// a message naming the problem.
#include "lk_intrinsics.cuh"

struct CheckParams {
    const float* x;
    float* y;
    int n;
    int bug;
};

// Two cp.async stages, 2 warps: every thread copies 4 floats of tile t into stage t % 2, then reads the
// chunk of a thread in the OTHER warp. The refill of the next tile must come after the barrier that ends
// the previous tile's reads; the bug issues it before (fused_gemm's refill-before-barrier pattern): a
// write-after-read race across warps that still computes the right sums under every emulated order.
extern "C" __global__ void planted_pipeline_war(CheckParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* stage = reinterpret_cast<float*>(smem);  // [2][64 threads][4]
    const int i = threadIdx.x, tiles = p.n / 256;
    float acc = 0.f;
    lk_cp_async_16(stage + 4 * i, p.x + 4 * i, 16);
    lk_cp_async_commit();
    for (int t = 0; t < tiles; ++t) {
        lk_cp_async_wait<0>();
        if (!p.bug) __syncthreads();
        if (t + 1 < tiles) lk_cp_async_16(stage + ((t + 1) % 2) * 256 + 4 * i, p.x + (t + 1) * 256 + 4 * i, 16);
        lk_cp_async_commit();
        if (p.bug) __syncthreads();
        const float* other = stage + (t % 2) * 256 + 4 * ((i + 32) % 64);
        for (int j = 0; j < 4; ++j) acc += other[j];
    }
    p.y[i] = acc;
}
LK_KERNEL_EXPORT(planted_pipeline_war, CheckParams)

// Thread i writes s[i] and reads s[(i + 32) % 64], a thread of the other warp: the bug drops the barrier.
extern "C" __global__ void planted_cross_warp_raw(CheckParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    s[i] = p.x[i];
    if (!p.bug) __syncthreads();
    p.y[i] = s[(i + 32) % 64];
}
LK_KERNEL_EXPORT(planted_cross_warp_raw, CheckParams)

// Static shared memory: thread i writes buf[i + bug], so with the bug the last thread writes one float
// past the end of `buf` (into the next variable on a GPU; into its red zone here).
extern "C" __global__ void planted_static_overflow(CheckParams p) {
    LK_KERNEL_ENTRY();
    LK_SHARED(4, float, buf, [64]);
    LK_SHARED(4, float, next, [64]);
    const int i = threadIdx.x;
    next[i] = 0.f;
    buf[i + p.bug] = p.x[i];
    __syncthreads();
    p.y[i] = buf[i] + next[i];
}
LK_KERNEL_EXPORT(planted_static_overflow, CheckParams)

// Static shared memory beyond 48 KB per block (bug = 1): refused like nvcc/ptxas refuse it.
extern "C" __global__ void planted_static_too_large(CheckParams p) {
    LK_KERNEL_ENTRY();
    LK_SHARED(4, float, small, [64]);
    const int i = threadIdx.x;
    if (p.bug) {
        LK_SHARED(4, float, huge, [12288]);
        huge[i] = p.x[i];
        small[i] = huge[i];
    } else {
        small[i] = p.x[i];
    }
    __syncthreads();
    p.y[i] = small[(i + 1) % 64];
}
LK_KERNEL_EXPORT(planted_static_too_large, CheckParams)

// 256 bytes of dynamic shared memory; the bug makes each thread write 64 floats further, past its end.
extern "C" __global__ void planted_dynamic_canary(CheckParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    s[i + 64 * p.bug] = p.x[i];
    __syncthreads();
    p.y[i] = s[(i + 1) % 64];
}
LK_KERNEL_EXPORT(planted_dynamic_canary, CheckParams)

// y[i] = x[i] + x[i + 1] (0 for the last): the next element is loaded unconditionally from a clamped
// index and thrown away at the end. The bug clamps to n instead of n - 1: one read past the end of x
// whose value never reaches an output.
extern "C" __global__ void planted_oob_discarded(CheckParams p) {
    LK_KERNEL_ENTRY();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float next = p.x[min(i + 1, p.n - 1 + p.bug)];
    p.y[i] = p.x[i] + (i + 1 < p.n ? next : 0.f);
}
LK_KERNEL_EXPORT(planted_oob_discarded, CheckParams)

// Copies x to y with one 16-byte load per 4 floats and an element-wise tail; the bug takes the vector
// path for the last, partial group too: a 16-byte read that straddles the end of x.
extern "C" __global__ void planted_straddling_vector(CheckParams p) {
    LK_KERNEL_ENTRY();
    const int i = threadIdx.x, first = 4 * i;
    if (first >= p.n) return;
    if (first + 4 <= p.n || p.bug) {
        const uint4 v = *lk_vec<uint4>(p.x + first);
        const float* f = reinterpret_cast<const float*>(&v);
        for (int j = 0; j < 4 && first + j < p.n; ++j) p.y[first + j] = f[j];
    } else {
        for (int j = first; j < p.n; ++j) p.y[j] = p.x[j];
    }
}
LK_KERNEL_EXPORT(planted_straddling_vector, CheckParams)

// Copies x to y through shared memory with cp.async, src-size clipped to the bytes left in x; the bug
// always copies 16 bytes, so the last thread's copy reads past the end of x (the zero-fill would have
// hidden it: cp.async's source is read whole).
extern "C" __global__ void planted_cp_async_past_end(CheckParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x, first = 4 * i;
    const int left = p.n - first;
    const int bytes = left <= 0 ? 0 : (p.bug || left >= 4 ? 16 : 4 * left);
    lk_cp_async_16(s + first, bytes > 0 ? p.x + first : p.x, bytes);
    lk_cp_async_commit();
    lk_cp_async_wait<0>();
    for (int j = first; j < first + 4 && j < p.n; ++j) p.y[j] = s[j];
}
LK_KERNEL_EXPORT(planted_cp_async_past_end, CheckParams)

// y[i] = 2·x[i]; bug = 1 accumulates into y instead (y[i] += 2·x[i]), reading y before anything wrote it.
extern "C" __global__ void planted_uninit_read(CheckParams p) {
    LK_KERNEL_ENTRY();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    p.y[i] = (p.bug ? p.y[i] : 0.f) + 2.f * p.x[i];
}
LK_KERNEL_EXPORT(planted_uninit_read, CheckParams)

// y[i] = x[i] + 1, one block of n <= 32 threads, with LK_KERNEL_ENTRY (griddepcontrol.wait) before any
// global access. On an sm_90 GPU every launch may overlap the kernel before it in the stream (src/device/
// cuda.rs), so an access before the wait may see that kernel's writes half done or race with its reads.
// bug = 1: a prologue load of x hoisted above the wait; bug = 2: no wait at all (the first access fails);
// bug = 3: a cp.async of x issued before the wait.
extern "C" __global__ void planted_early_global_access(CheckParams p) {
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    float early = 0.f;
    if (p.bug == 1) early = p.x[i];
    if (p.bug == 3 && i % 4 == 0 && i + 4 <= p.n) lk_cp_async_16(s + i, p.x + i, 16);
    lk_cp_async_commit();
    if (p.bug != 2) LK_KERNEL_ENTRY();
    lk_cp_async_wait<0>();
    if (i < p.n) p.y[i] = p.x[i] + 1.f + 0.f * early;
}
LK_KERNEL_EXPORT(planted_early_global_access, CheckParams)

// Shuffle semantics (CUDA guide, warp shuffle functions), for tests/emulator_checks.rs:
// bug = 0: y[lane] = __shfl_xor_sync(full, x[lane], 16, 16);  bug = 3: the same with lane mask 1
// bug = 1: each half-warp shuffles with its own disjoint mask at the same time:
//          y[lane] = __shfl_sync(half_mask, x[lane], 0, 16)  (lane 0 of its half)
// bug = 2: lanes >= 16 exit first; the others shuffle with the FULL mask (only non-exited lanes take
//          part): y[lane] = __shfl_down_sync(full, x[lane], 1, 16), lanes < 16 only.
extern "C" __global__ void shfl_semantics(CheckParams p) {
    LK_KERNEL_ENTRY();
    const int lane = threadIdx.x;
    const float v = p.x[lane];
    if (p.bug == 0 || p.bug == 3) {
        p.y[lane] = __shfl_xor_sync(0xffffffffu, v, p.bug == 0 ? 16 : 1, 16);
    } else if (p.bug == 1) {
        const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
        p.y[lane] = __shfl_sync(half, v, 0, 16);
    } else {
        if (lane >= 16) return;
        p.y[lane] = __shfl_down_sync(0xffffffffu, v, 1, 16);
    }
}
LK_KERNEL_EXPORT(shfl_semantics, CheckParams)
