// planted_tma.cu (test-only): a TMA round trip (lk_tma.cuh) checked element by element by
// tests/emulator_tma.rs. One 2-D box of a bf16 tensor is loaded at (c0, c1) (zero-filled out of bounds)
// into shared memory aligned to 1024 bytes, every element is read back through the map's swizzle (the
// address bits XOR of lk_tma.cuh) into y, and the box is stored at (d0, d1) of a second tensor (clipped).
// `bug` plants one mistake: 1 reads with the 64-byte pattern under the 128-byte swizzle; 2 assumes dynamic
// shared memory is 1024-byte aligned (box at +1024, pattern from the offset within the box); 3 writes the
// box while its store still reads it; 4 exits without waiting for the store; 5 issues the store before
// the programmatic-dependent-launch wait (it writes global memory only when retired, after the wait).
#include "lk_tma.cuh"

struct TmaParams {
    LkTensorMap in_map;
    LkTensorMap out_map;
    uint16_t* y;
    int32_t c0, c1, d0, d1;
    uint32_t box_cols, box_rows, swizzle;
    int32_t bug;
};

extern "C" __global__ void planted_tma_roundtrip(const __grid_constant__ TmaParams p) {
    LK_DYNAMIC_SMEM(smem);
    // the swizzle follows absolute address bits: align the box to the 1024-byte period ourselves
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem);
    unsigned char* box = p.bug == 2 ? smem + 1024 : smem + ((base + 64 + 1023) / 1024 * 1024 - base);
    if (p.bug == 5) {
        if (threadIdx.x == 0) {
            lk_fence_proxy_async();
            lk_tma_store_2d(&p.out_map, p.d0, p.d1, box);
            lk_bulk_commit_group();
        }
        LK_KERNEL_ENTRY();
        if (threadIdx.x == 0) lk_bulk_wait_group_read<0>();
        return;
    }
    LK_KERNEL_ENTRY();
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    const uint32_t bytes = p.box_cols * p.box_rows * 2;
    if (threadIdx.x == 0) {
        lk_mbarrier_init(bar, 1);
        lk_fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        lk_mbarrier_arrive_expect_tx(bar, bytes);
        lk_tma_load_2d(box, &p.in_map, p.c0, p.c1, bar);
    }
    lk_mbarrier_wait_parity(bar, 0);
    const uint32_t mode = p.bug == 1 && p.swizzle == 3 ? 2 : p.swizzle;
    for (uint32_t e = threadIdx.x; e < p.box_cols * p.box_rows; e += blockDim.x) {
        // bug 2: the pattern of the offset within the box, right only for a box at a multiple of 1024
        const uintptr_t a = p.bug == 2 ? e * 2 : reinterpret_cast<uintptr_t>(box) + e * 2;
        const uintptr_t at = mode ? a ^ (((a >> 7) & ((1u << mode) - 1)) << 4) : a;
        p.y[e] = *reinterpret_cast<const uint16_t*>(p.bug == 2 ? box + at : reinterpret_cast<unsigned char*>(at));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        lk_fence_proxy_async();
        lk_tma_store_2d(&p.out_map, p.d0, p.d1, box);
        lk_bulk_commit_group();
        if (p.bug == 3) box[0] = 0;
        if (p.bug != 4) lk_bulk_wait_group_read<0>();
    }
}
LK_KERNEL_EXPORT(planted_tma_roundtrip, TmaParams)
