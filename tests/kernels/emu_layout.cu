// emu_layout.cu (test-only): probes of the tensor-core intrinsics and a tiled GEMM built from them.
// tests/emulator.rs feeds them small integers, for which every sum is exact, and compares with the
// PTX ISA fragment formulas (ldmatrix, mma.m16n8k16) and a naive GEMM. On a GPU the same kernels let the
// emulator be compared with the hardware bit for bit.
#include "lk_intrinsics.cuh"

struct LdmatrixProbeParams {
    const uint16_t* src;  // 4 matrices of 8x8 b16, row-major, matrix after matrix
    uint32_t* out;        // 32 lanes x 4 registers
    int variant;          // 0 x1, 1 x2, 2 x4, 3 x1.trans, 4 x2.trans, 5 x4.trans
};

// One warp. Lane l holds row l%8 of matrix l/8 in shared memory and passes its address.
extern "C" __global__ void __launch_bounds__(32) ldmatrix_probe(LdmatrixProbeParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    uint16_t* s = reinterpret_cast<uint16_t*>(smem);
    const int lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) s[lane * 8 + i] = p.src[lane * 8 + i];
    __syncthreads();
    uint32_t r[4] = {0, 0, 0, 0};
    const void* row = s + lane * 8;
    switch (p.variant) {
        case 0: lk_ldmatrix_x1(r, row); break;
        case 1: lk_ldmatrix_x2(r, row); break;
        case 2: lk_ldmatrix_x4(r, row); break;
        case 3: lk_ldmatrix_x1_trans(r, row); break;
        case 4: lk_ldmatrix_x2_trans(r, row); break;
        default: lk_ldmatrix_x4_trans(r, row); break;
    }
    for (int j = 0; j < 4; ++j) p.out[lane * 4 + j] = r[j];
}
LK_KERNEL_EXPORT(ldmatrix_probe, LdmatrixProbeParams)

struct MmaProbeParams {
    const uint32_t* a;  // 32 lanes x 4 registers (2 b16 each)
    const uint32_t* b;  // 32 lanes x 2 registers
    const float* c;     // 32 lanes x 4
    float* d;           // 32 lanes x 4
};

// One warp: each lane passes its own fragment registers, as given, and writes back D.
template <bool F16>
__device__ __forceinline__ void mma_probe(const MmaProbeParams& p) {
    const int lane = threadIdx.x;
    uint32_t a[4], b[2];
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) a[i] = p.a[lane * 4 + i], c[i] = p.c[lane * 4 + i];
    for (int i = 0; i < 2; ++i) b[i] = p.b[lane * 2 + i];
    if (F16) lk_mma_m16n8k16_f16(d, a, b, c);
    else lk_mma_m16n8k16_bf16(d, a, b, c);
    for (int i = 0; i < 4; ++i) p.d[lane * 4 + i] = d[i];
}
extern "C" __global__ void __launch_bounds__(32) mma_probe_bf16(MmaProbeParams p) { LK_KERNEL_ENTRY(); mma_probe<false>(p); }
LK_KERNEL_EXPORT(mma_probe_bf16, MmaProbeParams)
extern "C" __global__ void __launch_bounds__(32) mma_probe_f16(MmaProbeParams p) { LK_KERNEL_ENTRY(); mma_probe<true>(p); }
LK_KERNEL_EXPORT(mma_probe_f16, MmaProbeParams)

struct TiledGemmParams {
    const __nv_bfloat16* a;  // M x K, row-major
    const __nv_bfloat16* b;  // N x K, row-major
    float* c;                // M x N
    int m, n, k;             // multiples of the block tile and of 32
};

// C = A·Bᵀ with BM x BN block tiles, BK = 32, warp tiles WM x WN, cp.async double buffering,
// ldmatrix x4 (A) / x2 (B) fragments and mma.m16n8k16. Test-only: sizes must be tile multiples.
template <int BM, int BN, int WM, int WN>
__device__ __forceinline__ void tiled_gemm(const TiledGemmParams& p) {
    constexpr int BK = 32;
    constexpr int WARPS_N = BN / WN;
    constexpr int THREADS = (BM / WM) * WARPS_N * 32;
    LK_DYNAMIC_SMEM(smem);
    __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(smem);  // [2][BM][BK]
    __nv_bfloat16* sb = sa + 2 * BM * BK;                         // [2][BN][BK]
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[WM / 16][WN / 8][4];
    for (int i = 0; i < WM / 16; ++i)
        for (int j = 0; j < WN / 8; ++j)
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    auto load = [&](int stage, int k0) {
        for (int c = tid; c < BM * BK / 8; c += THREADS) {
            const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
            lk_cp_async_16(sa + (stage * BM + row) * BK + col, p.a + (size_t)(m0 + row) * p.k + k0 + col, 16);
        }
        for (int c = tid; c < BN * BK / 8; c += THREADS) {
            const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
            lk_cp_async_16(sb + (stage * BN + row) * BK + col, p.b + (size_t)(n0 + row) * p.k + k0 + col, 16);
        }
        lk_cp_async_commit();
    };
    const int ktiles = p.k / BK;
    load(0, 0);
    for (int kt = 0; kt < ktiles; ++kt) {
        if (kt + 1 < ktiles) {
            load((kt + 1) & 1, (kt + 1) * BK);
            lk_cp_async_wait<1>();
        } else {
            lk_cp_async_wait<0>();
        }
        __syncthreads();
        const int stage = kt & 1;
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[WM / 16][4], bf[WN / 8][2];
            for (int i = 0; i < WM / 16; ++i) {
                const int row = wm * WM + i * 16 + (lane % 8) + 8 * ((lane / 8) & 1);
                lk_ldmatrix_x4(af[i], sa + (stage * BM + row) * BK + kk + 8 * (lane / 16));
            }
            for (int j = 0; j < WN / 8; ++j) {
                const int row = wn * WN + j * 8 + (lane % 8);
                lk_ldmatrix_x2(bf[j], sb + (stage * BN + row) * BK + kk + 8 * ((lane / 8) & 1));
            }
            for (int i = 0; i < WM / 16; ++i)
                for (int j = 0; j < WN / 8; ++j) lk_mma_m16n8k16_bf16(acc[i][j], af[i], bf[j], acc[i][j]);
        }
        __syncthreads();
    }
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < WM / 16; ++i)
        for (int j = 0; j < WN / 8; ++j)
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm * WM + i * 16 + g + 8 * (e >= 2);
                const int col = n0 + wn * WN + j * 8 + t * 2 + (e & 1);
                p.c[(size_t)row * p.n + col] = acc[i][j][e];
            }
}

// 64x64 tiles, 4 warps of 32x32 (128 threads), 16 KiB of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) tiled_gemm_bf16(TiledGemmParams p) { LK_KERNEL_ENTRY(); tiled_gemm<64, 64, 32, 32>(p); }
LK_KERNEL_EXPORT(tiled_gemm_bf16, TiledGemmParams)

// 128x128 tiles, 8 warps of 64x32 (256 threads), 32 KiB of dynamic shared memory: the emulator speed figure.
extern "C" __global__ void __launch_bounds__(256) tiled_gemm128_bf16(TiledGemmParams p) { LK_KERNEL_ENTRY(); tiled_gemm<128, 128, 64, 32>(p); }
LK_KERNEL_EXPORT(tiled_gemm128_bf16, TiledGemmParams)
