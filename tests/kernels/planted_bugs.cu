// planted_bugs.cu (test-only): kernels with one planted bug each, switched on by `bug`; with bug = 0 they
// are correct. tests/emulator.rs checks that the emulator catches every bug: an error, NaN from poison, or
// output that differs between thread orders or from the bug-free run.
#include "lk_intrinsics.cuh"

struct PlantedParams {
    const float* x;
    float* y;
    int n;
    int bug;
};

// y[i] = 2 * x[(i+1) % n] through shared memory; the bug drops the barrier between write and read.
extern "C" __global__ void planted_missing_sync(PlantedParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    s[i] = 2.f * p.x[i];
    if (!p.bug) __syncthreads();
    p.y[i] = s[(i + 1) % p.n];
}
LK_KERNEL_EXPORT(planted_missing_sync, PlantedParams)

// Each thread copies 4 floats with cp.async, then all read a neighbour's; the bug drops wait_group.
extern "C" __global__ void planted_missing_wait(PlantedParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    lk_cp_async_16(s + 4 * i, p.x + 4 * i, 16);
    lk_cp_async_commit();
    if (!p.bug) lk_cp_async_wait<0>();
    __syncthreads();
    for (int j = 0; j < 4; ++j) p.y[4 * i + j] = s[(4 * i + 4 + j) % p.n];
}
LK_KERNEL_EXPORT(planted_missing_wait, PlantedParams)

// bug = 1: the barrier sits in a branch only half the block takes (the others exit);
// bug = 2: the two halves wait at two different barriers.
extern "C" __global__ void planted_divergent_barrier(PlantedParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    s[i] = p.x[i];
    if (p.bug == 1) {
        if (i < 16) __syncthreads();
    } else if (p.bug == 2) {
        if (i < 16) __syncthreads();
        else __syncthreads();
    } else {
        __syncthreads();
    }
    if (i < 16 || p.bug != 1) p.y[i] = s[(i + 1) % p.n];
}
LK_KERNEL_EXPORT(planted_divergent_barrier, PlantedParams)

// y[i] = x[i] + x[i+1], the last element adding 0; the bug reads x[n], one past the end.
extern "C" __global__ void planted_oob_read(PlantedParams p) {
    LK_KERNEL_ENTRY();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float next = (i + 1 < p.n || p.bug) ? p.x[i + 1] : 0.f;
    p.y[i] = p.x[i] + next;
}
LK_KERNEL_EXPORT(planted_oob_read, PlantedParams)

// Each thread copies 4 floats with one 16-byte load; the bug shifts the load by one float, which the
// GPU faults on ("misaligned address") and the emulator must refuse the same way (x86 would not care).
extern "C" __global__ void planted_misaligned_vector(PlantedParams p) {
    LK_KERNEL_ENTRY();
    const int i = threadIdx.x;
    if (4 * i + 4 > p.n) return;
    const uint4 v = *lk_vec<uint4>(p.x + 4 * i + (i == 5 ? p.bug : 0));
    const float* f = reinterpret_cast<const float*>(&v);
    for (int j = 0; j < 4; ++j) p.y[4 * i + j] = f[j];
}
LK_KERNEL_EXPORT(planted_misaligned_vector, PlantedParams)
