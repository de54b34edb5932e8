// planted_wgmma.cu (test-only): one warpgroup computes Y[64×64] = A[64×64]·Bᵀ (B given as 64 rows of K,
// both bf16) the Hopper way, checked by tests/emulator_wgmma.rs against the f64 product: TMA loads both
// tiles 128-byte swizzled (rows of 64 elements) into 1024-byte aligned shared memory, completing on an
// mbarrier; then four k16 steps of wgmma m64n64k16, K-major, descriptors at +32 bytes per step with
// SBO = 1024 (or A from registers, built from global memory in mma.sync's fragment layout; or B given as
// [K][N], MN-major, each k16 step 16 rows = 2048 bytes further, SBO = 1024 between 8-row groups); commit, wait,
// and the accumulators written out through their layout (lk_wgmma_acc_row/col).
// `bug` plants one mistake: 1 describes the tiles with the 64-byte swizzle; 2 reads the accumulators
// before the wait; 3 issues without wgmma.fence; 4 writes the A tile while the wgmma still reads it;
// 5 exits without waiting; 6 has every thread store its 64 bytes of the A tile again (the same values,
// read and written by the generic proxy) before the wgmma reads it, with no fence.proxy.async between (7:
// with the fence, which is correct).
// With b_cols 16 or 32 (B MN-major only): B is [64][b_cols], TMA-loaded with the 32- or 64-byte swizzle
// (one span per row, as fused_gemm_t_sm90.cu's dX loads the LoRA B's slice), and m64n16k16 or m64n32k16
// reads it MN-major: k16 step at +16 rows, SBO = 8 rows, LBO unused (0); Y is [64][b_cols]. Bug 1 there
// describes the tile with the other of the two swizzles.
// With a_mn_major (A from shared memory): A given as [K][M] (64 rows of M), read MN-major as B is: its k16
// step at +16 rows (2048 bytes), SBO = 1024, LBO unused (one 64-element swizzle atom across M); with B
// [64][16] MN-major that is the product fused_gemm_t_sm90.cu's dX kernel computes dB's and dA's partials
// with (a 128×64 box of dY or X read MN-major as A, a 128×16 tile as B), over 64 rows of K here.
#include "lk_tma.cuh"
#include "lk_wgmma.cuh"

struct WgmmaParams {
    LkTensorMap a_map;
    LkTensorMap b_map;
    const uint16_t* a;  // [64][64], for A from registers
    float* y;           // [64][64]
    int32_t a_regs;
    int32_t b_mn_major;  // B given as [K][N] (64 rows of N): MN-major, its k16 step at +16 rows (2048 bytes)
    int32_t bug;
    int32_t b_cols;  // 0: 64 (B in 128-byte rows); 16 or 32: B [64][b_cols] MN-major, the 32- or 64-byte swizzle
    int32_t a_mn_major;  // A given as [K][M]: MN-major (not with a_regs)
};

// A's descriptor for k16 step kb: K-major (+32 bytes per step) or MN-major (+16 rows = 2048 bytes)
__device__ uint64_t a_desc(const WgmmaParams& p, const unsigned char* a_tile, uint32_t kb, uint32_t swz) {
    return p.a_mn_major ? lk_wgmma_desc(a_tile + 2048 * kb, 0, 1024, swz) : lk_wgmma_desc(a_tile + 32 * kb, 16, 1024, swz);
}

// Y[64×N] = A·B with B [64][N] MN-major in the 2N-byte swizzle (N = 16 or 32), A K-major from a_tile.
template <uint32_t N>
__device__ void narrow_b(const WgmmaParams& p, const unsigned char* a_tile, const unsigned char* b_tile,
                         uint32_t tid) {
    constexpr uint32_t W = 2 * N;  // bytes per row of B: one swizzle span
    const uint32_t swz = (N == 16) != (p.bug == 1) ? LK_WGMMA_SWIZZLE_32B : LK_WGMMA_SWIZZLE_64B;
    float acc[N / 2];
    lk_wgmma_fence();
    for (uint32_t kb = 0; kb < 4; ++kb) {
        const uint64_t da = a_desc(p, a_tile, kb, LK_WGMMA_SWIZZLE_128B);
        const uint64_t db = lk_wgmma_desc(b_tile + 16 * W * kb, 0, 8 * W, swz);
        if (p.a_mn_major)
            lk_wgmma_ss<__nv_bfloat16, N, 1, 1>(acc, da, db, kb > 0);
        else
            lk_wgmma_ss<__nv_bfloat16, N, 0, 1>(acc, da, db, kb > 0);
    }
    lk_wgmma_commit();
    lk_wgmma_wait<0>();
    for (uint32_t i = 0; i < N / 2; ++i) p.y[lk_wgmma_acc_row(tid, i) * N + lk_wgmma_acc_col(tid, i)] = acc[i];
}

extern "C" __global__ void __launch_bounds__(128) planted_wgmma_tile(const __grid_constant__ WgmmaParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem);
    unsigned char* a_tile = smem + ((base + 64 + 1023) / 1024 * 1024 - base);  // 64 × 128 bytes
    unsigned char* b_tile = a_tile + 64 * 128;
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    const uint32_t tid = threadIdx.x;
    if (tid == 0) {
        lk_mbarrier_init(bar, 1);
        lk_fence_mbarrier_init();
    }
    __syncthreads();
    const uint32_t b_bytes = 64 * 2 * (p.b_cols == 0 ? 64 : p.b_cols);
    if (tid == 0) {
        lk_mbarrier_arrive_expect_tx(bar, 64 * 128 + b_bytes);
        lk_tma_load_2d(a_tile, &p.a_map, 0, 0, bar);
        lk_tma_load_2d(b_tile, &p.b_map, 0, 0, bar);
    }
    lk_mbarrier_wait_parity(bar, 0);
    if (p.bug == 6 || p.bug == 7) {
        for (uint32_t i = 0; i < 64; ++i) a_tile[64 * tid + i] ^= uint8_t(p.bug >> 8);  // 0: the same value
        if (p.bug == 7) lk_fence_proxy_async();
        __syncthreads();
    }
    if (p.b_cols == 16) return narrow_b<16>(p, a_tile, b_tile, tid);
    if (p.b_cols == 32) return narrow_b<32>(p, a_tile, b_tile, tid);

    float acc[32];
    const uint32_t swz = p.bug == 1 ? LK_WGMMA_SWIZZLE_64B : LK_WGMMA_SWIZZLE_128B;
    if (p.bug != 3) lk_wgmma_fence();
    for (uint32_t kb = 0; kb < 4; ++kb) {
        const uint64_t db = p.b_mn_major ? lk_wgmma_desc(b_tile + 2048 * kb, 8192, 1024, swz)
                                         : lk_wgmma_desc(b_tile + 32 * kb, 16, 1024, swz);
        if (p.a_regs) {
            // mma.m16n8k16's A fragment of rows 16w..16w+15, columns 16kb..16kb+15
            const uint32_t w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
            uint32_t a[4];
            for (uint32_t r = 0; r < 4; ++r) {
                const uint32_t row = 16 * w + g + 8 * (r % 2), k = 16 * kb + 2 * q + 8 * (r / 2);
                a[r] = uint32_t(p.a[row * 64 + k]) | (uint32_t(p.a[row * 64 + k + 1]) << 16);
            }
            if (p.b_mn_major)
                lk_wgmma_rs<__nv_bfloat16, 64, 1>(acc, a, db, kb > 0);
            else
                lk_wgmma_rs<__nv_bfloat16, 64>(acc, a, db, kb > 0);
        } else {
            const uint64_t da = a_desc(p, a_tile, kb, swz);
            if (p.a_mn_major && p.b_mn_major)
                lk_wgmma_ss<__nv_bfloat16, 64, 1, 1>(acc, da, db, kb > 0);
            else if (p.a_mn_major)
                lk_wgmma_ss<__nv_bfloat16, 64, 1, 0>(acc, da, db, kb > 0);
            else if (p.b_mn_major)
                lk_wgmma_ss<__nv_bfloat16, 64, 0, 1>(acc, da, db, kb > 0);
            else
                lk_wgmma_ss<__nv_bfloat16, 64>(acc, da, db, kb > 0);
        }
    }
    lk_wgmma_commit();
    if (p.bug == 2)
        for (uint32_t i = 0; i < 32; ++i) p.y[lk_wgmma_acc_row(tid, i) * 64 + lk_wgmma_acc_col(tid, i)] = acc[i];
    if (p.bug == 4 && tid == 0) a_tile[0] = 0;
    if (p.bug == 5) return;
    lk_wgmma_wait<0>();
    if (p.bug != 2)
        for (uint32_t i = 0; i < 32; ++i) p.y[lk_wgmma_acc_row(tid, i) * 64 + lk_wgmma_acc_col(tid, i)] = acc[i];
}
LK_KERNEL_EXPORT(planted_wgmma_tile, WgmmaParams)
