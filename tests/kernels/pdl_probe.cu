// pdl_probe.cu (test-only, run on a GPU by tests/gpu_intrinsics.rs): shows that programmatic dependent
// launch overlaps two kernels on a stream, and that LK_KERNEL_ENTRY's wait orders them.
// pdl_probe_primary (one block, launched the ordinary way): LK_KERNEL_ENTRY, then spins for spin_ns of
// the GPU's global timer, then writes flag = token. Its launch_dependents lets a dependent launched with
// the attribute be scheduled at once. pdl_probe_dependent: with wait = 1 it begins with LK_KERNEL_ENTRY
// and must read the token; with wait = 0 (a planted bug, never launched by the crate) it reads the flag
// first, and sees the previous token when it ran while the primary still spun: the overlap, observed.
#include "lk_intrinsics.cuh"

struct PdlProbeParams {
    uint32_t* flag;
    uint32_t* out;
    uint64_t spin_ns;
    uint32_t token;
    uint32_t wait;
};

extern "C" __global__ void pdl_probe_primary(PdlProbeParams p) {
    LK_KERNEL_ENTRY();
#ifndef LK_EMU
    uint64_t t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < p.spin_ns);
#endif
    if (threadIdx.x == 0) *reinterpret_cast<volatile uint32_t*>(p.flag) = p.token;
}
LK_KERNEL_EXPORT(pdl_probe_primary, PdlProbeParams)

extern "C" __global__ void pdl_probe_dependent(PdlProbeParams p) {
    if (p.wait) LK_KERNEL_ENTRY();
    if (threadIdx.x == 0) *p.out = *reinterpret_cast<volatile uint32_t*>(p.flag);
}
LK_KERNEL_EXPORT(pdl_probe_dependent, PdlProbeParams)
