// fused_gemm_multi.cu: the LoRA forward for a batch whose rows use different adapters of one set
// (Punica/S-LoRA-style multi-adapter serving), on fused_gemm's tiles and k loop (lk_fused_gemm.cuh):
//
//   shrink: T_i = X_i·A_{a(i)}ᵀ for every row in one launch (f32 partials per fixed K chunk, then
//           lowrank_finalize rounds their in-order sum once), zero for rows without an adapter;
//   fused:  Y_i = X_i·W0ᵀ + s_{a(i)}·T_i·B_{a(i)}ᵀ (+ bias), Y written once; for a row of a DoRA
//           adapter (DoRA's unmerged layer, served) Y_i = round(f_{a(i)} ⊙ Z_i + bias) with Z_i that sum
//           rounded without the bias and f = m / ‖W0 + s·B·A‖ from the set's factor table: the bits of
//           ops::dora_forward's scale pass over the fused GEMM's Z.
//
// Adapters are packed in one arena without padding (rank_a × K and N × rank_a each) and described by a
// table (LkAdapterDesc); each row carries an adapter index (or LK_NO_ADAPTER). Rows need not be sorted.
//
// How a 128-row tile with several adapters is multiplied: warp 0 lists the distinct adapters of the
// tile's rows (the "passes"); the low-rank phase of the k loop runs each pass's k-tiles in turn, loading
// the pass's A (shrink) or B (fused) and the rows' X or T with every row of another adapter zeroed. So a
// row's accumulator sees exactly the k-tiles it would see with its adapter alone, in the same order, and
// the other passes add exact zeros to it (+0 products; a finite sum plus zero is unchanged). Then each
// row is scaled by its own s and the main k-tiles (X·W0ᵀ) go on top, as in fused_gemm. The shrink's K
// chunks are those of the single-adapter projection (launch::projection_splits, from K only).
// Consequences:
//   - batch invariance: a row's bits depend on its own X row, adapter, W0 and bias only, never on the
//     batch size, the row's position or the other rows' adapters;
//   - a row's Y and T are bit-identical to lora_forward with its adapter alone (on the general path,
//     M > LK_SMALL_M_MAX, and the mma.sync kernels, LK_FUSED_GEMM unset or mma; the small-M kernel and
//     the opt-in sm_90a ones sum in another order), which the tests check.
// The cost of a tile grows with the number of distinct adapters in it (each pass is ceil(r_a/32) extra
// k-tiles of 128 rows): rows grouped by adapter, as servers batch requests, keep it at one or two.
// Caveat: a non-finite value in one adapter's B reaches the other rows of its tiles as 0·inf = NaN (and
// one in A the other rows of its shrink block). Finite adapters, with any X, keep every row to itself.
#include "lk_fused_gemm.cuh"
#include "lk_multi.cuh"

namespace {
// The low-rank phase of a multi-adapter block: k-tile j belongs to pass q (first[q] ≤ j < first[q+1]),
// which multiplies the rows of adapter pass[q] only.
template <typename T, typename RT>
struct MultiLow {
    static constexpr bool plain = false;  // per-row masking: never the unchecked cursor path
    const T* l;                           // X (shrink) or T (fused), rows m0..
    uint32_t ldl;
    bool l_vec;
    const RT* arena;
    const LkAdapterDesc* adapters;
    const uint32_t* idx;    // [BM] the tile rows' adapters (shared memory)
    const uint32_t* pass;   // [BM] the distinct adapters, in order of first appearance
    const uint32_t* first;  // [BM + 1] each pass's first k-tile
    bool shrink;
    uint32_t k_begin, k_end;  // shrink: this split's K range
    uint32_t tiles_per_pass;  // shrink: the same for every pass
};

template <bool NN, bool VEC, int NI, typename T, typename RT>
__device__ __forceinline__ void load_tile(const MultiLow<T, RT>& ph, int j, T* as, T* bs, uint32_t m0, uint32_t n0,
                                          uint32_t m, uint32_t n, const LkDropout&) {
    static_assert(!NN, "the multi-adapter kernel is the forward (nt) only");
    constexpr int b_chunks = chunks_per_thread(Width<NI>::BN);  // R's 16-byte chunks per thread
    uint32_t q = 0;
    if (ph.shrink)
        q = uint32_t(j) / ph.tiles_per_pass;
    else
        while (ph.first[q + 1] <= uint32_t(j)) ++q;
    const uint32_t a = ph.pass[q], jj = uint32_t(j) - ph.first[q];
    const LkAdapterDesc& d = ph.adapters[a];
    // shrink: L = X over the split's K chunk, R = A_a (rank_a × K); fused: L = T, R = B_a (N × rank_a),
    // both over [0, rank_a)
    const uint32_t k0 = ph.shrink ? ph.k_begin + jj * BK : jj * BK;
    const uint32_t kext = ph.shrink ? ph.k_end : d.rank;
    const RT* r = ph.arena + (ph.shrink ? d.a_offset : d.b_offset);
    const uint32_t r_outer = ph.shrink ? d.rank : n, r_ld = ph.shrink ? ph.ldl : d.rank;
    const bool r_vec = (d.flags & (ph.shrink ? LK_ALIGNED_R : LK_ALIGNED_B)) != 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint32_t c = threadIdx.x + i * THREADS, row = c / 4, kc = (c % 4) * 8;
        T* dst = as + row * ROW_LD + kc;
        if (ph.idx[row] != a)
            *lk_vec<uint4>(dst) = uint4{0u, 0u, 0u, 0u};  // another adapter's row: contributes 0
        else if (ph.l_vec)
            lk_load_chunk<true>(dst, ph.l, m0 + row, m, ph.ldl, k0 + kc, kext);
        else
            lk_load_chunk<false>(dst, ph.l, m0 + row, m, ph.ldl, k0 + kc, kext);
    }
#pragma unroll
    for (int i = 0; i < b_chunks; ++i) {
        const uint32_t c = threadIdx.x + i * THREADS, row = c / 4, kc = (c % 4) * 8;
        T* dst = bs + row * ROW_LD + kc;
        if (r_vec)
            lk_load_chunk<true>(dst, r, n0 + row, r_outer, r_ld, k0 + kc, kext);
        else
            lk_load_chunk<false>(dst, r, n0 + row, r_outer, r_ld, k0 + kc, kext);
    }
}

// The smallest value of `key` over the warp (a butterfly over shuffles: every lane gets it).
__device__ __forceinline__ uint32_t warp_min(uint32_t key) {
#pragma unroll
    for (int d = 16; d > 0; d /= 2) key = min(key, __shfl_xor_sync(0xffffffffu, key, d));
    return key;
}

// Warp 0: the rows' adapters (an index out of the table or naming an empty slot counts as none: the host
// validates indices, this only keeps the kernel in bounds), their scales (0 without an adapter), the
// distinct adapters in order of first appearance, and the prefix sums of their k-tile counts.
__device__ __forceinline__ void list_passes(const LkFusedGemmMultiParams& p, uint32_t m0, uint32_t tiles_per_pass,
                                            bool shrink, uint32_t* s_idx, float* s_scale, uint32_t* s_pass,
                                            uint32_t* s_first, uint32_t* s_npass) {
    const uint32_t lane = threadIdx.x % 32;
    uint32_t count = 0;
    for (uint32_t base = 0; base < BM; base += 32) {
        const uint32_t row = m0 + base + lane;
        uint32_t v = row < p.m ? p.index[row] : LK_NO_ADAPTER;
        if (v != LK_NO_ADAPTER && (v >= p.n_adapters || p.adapters[v].rank == 0)) v = LK_NO_ADAPTER;
        s_idx[base + lane] = v;
        s_scale[base + lane] = v != LK_NO_ADAPTER ? p.adapters[v].scale : 0.0f;
        bool pending = v != LK_NO_ADAPTER;
        for (uint32_t q = 0; q < count; ++q)
            if (s_pass[q] == v) pending = false;
        for (;;) {  // one new adapter per round: the lowest pending lane's
            const uint32_t leader = warp_min(pending ? lane : 32u);
            if (leader == 32u) break;
            const uint32_t a = __shfl_sync(0xffffffffu, v, int(leader));
            if (lane == 0) s_pass[count] = a;
            ++count;
            if (v == a) pending = false;
        }
        __syncwarp();
    }
    uint32_t running = 0;
    for (uint32_t base = 0; base < count; base += 32) {
        const uint32_t q = base + lane;
        uint32_t c = 0;
        if (q < count) c = shrink ? tiles_per_pass : (p.adapters[s_pass[q]].rank + BK - 1) / BK;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const uint32_t o = __shfl_up_sync(0xffffffffu, c, d);
            if (lane >= uint32_t(d)) c += o;
        }
        if (q < count) s_first[q + 1] = running + c;
        running += __shfl_sync(0xffffffffu, c, 31);
    }
    if (lane == 0) {
        s_first[0] = 0;
        s_npass[0] = count;
    }
}

// The epilogue of a tile when the set holds DoRA adapters (store_c's otherwise). A DoRA row is DoRA's layer:
// Z = round(acc + 0) (the fused GEMM's output without a bias), then round(fma(f, Z, bias)) with its
// adapter's factors f (the bits of kernels/dora.cu's scale pass over that Z); every other row is store_c's
// round(acc + bias). The accumulators are staged as f32, 64 rows (one warp row) at a time, in the
// pipeline's shared memory, and the write-back computes each element with them dead (element stores,
// not store_c's 16-byte ones). frow: [BM] where each tile row's factors start in p.factors, or
// LK_NO_FACTOR.
template <typename T, int NI>
__device__ __forceinline__ void store_c_dora(const float (&acc)[4][NI][4], float* smem, const LkFusedGemmMultiParams& p,
                                             const uint32_t* frow, uint32_t m0, uint32_t n0) {
    constexpr uint32_t TBN = Width<NI>::BN, F_LD = TBN + 4;  // staged rows 4 words apart: fewer bank conflicts
    const uint32_t tid = fresh_tid(), lane = tid % 32, warp = tid / 32, wm = warp / 4, wn = warp % 4;
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    for (uint32_t half = 0; half < 2; ++half) {
        __syncthreads();  // the pipeline's (or the last half's) shared memory is free
        if (wm == half) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const uint32_t r = mi * 16 + lane / 4 + h * 8, cc = wn * Width<NI>::WN + ni * 8 + (lane % 4) * 2;
                        smem[r * F_LD + cc] = acc[mi][ni][2 * h];
                        smem[r * F_LD + cc + 1] = acc[mi][ni][2 * h + 1];
                    }
        }
        __syncthreads();
        for (uint32_t e = tid; e < 64 * TBN; e += THREADS) {
            const uint32_t r = e / TBN, cc = e % TBN, row = m0 + half * 64 + r, col = n0 + cc;
            if (row >= p.m || col >= p.n) continue;
            const float a = smem[r * F_LD + cc];
            const float b = bias != nullptr ? lk_to_f32(bias[col]) : 0.0f;
            const uint32_t at = frow[half * 64 + r];
            T out;
            if (at == LK_NO_FACTOR) {
                out = lk_from_f32<T>(a + b);
            } else {
                const float z = lk_to_f32(lk_from_f32<T>(a + 0.0f));
                out = lk_from_f32<T>(__fmaf_rn(p.factors[at + col], z, b));
            }
            y[size_t(row) * p.n + col] = out;
        }
    }
}

template <typename T, typename RT, int NI, bool DORA>
__device__ __forceinline__ void fused_gemm_multi_impl(const LkFusedGemmMultiParams& p) {
    LK_DYNAMIC_SMEM(smem);
    T* as_all = reinterpret_cast<T*>(smem);
    T* bs_all = as_all + STAGES * A_STAGE;
    LK_SHARED(16, uint32_t, s_idx, [BM]);
    LK_SHARED(16, float, s_scale, [BM]);
    LK_SHARED(16, uint32_t, s_pass, [BM]);
    LK_SHARED(16, uint32_t, s_first, [BM + 1]);
    LK_SHARED(16, uint32_t, s_npass, [1]);
    const bool shrink = (p.flags & LK_MULTI_SHRINK) != 0;
    // the shrink's one column tile holds T's r_max columns: the narrow kernel only where r_max ≤ 64
    // (src/ops/multi.rs chooses; this keeps a wrong launch from leaving T's last columns unwritten)
    if (shrink && p.ldt > uint32_t(Width<NI>::BN)) __trap();
    const uint32_t n_out = shrink ? p.ldt : p.n;  // the shrink's output is T's partial sums, m × ldt
    uint32_t m0 = blockIdx.x * BM, n0 = 0;
    if (!shrink) grouped_tile<NI>(p.m, p.n, m0, n0);
    const uint32_t k_begin = shrink ? blockIdx.z * p.k_per_split : 0;
    const uint32_t k_end = shrink ? min(p.k, k_begin + p.k_per_split) : 0;
    const uint32_t tiles_per_pass = (k_end - k_begin + BK - 1) / BK;
    if (threadIdx.x < 32)
        list_passes(p, m0, tiles_per_pass, shrink, s_idx, s_scale, s_pass, s_first, s_npass);
    __syncthreads();
    int lt = int(s_first[s_npass[0]]);
    // The shrink's passes are spread over grid y: block y takes passes y, y + Y, ... and writes the rows
    // of those (block 0 also the rows without an adapter, as zeros). A row's sums start from +0 in the
    // block of its own pass either way, so its bits do not depend on Y, for finite adapters: a block that
    // runs several passes also adds the other passes' products 0·A to the row, exact zeros unless an A
    // holds an infinity or NaN (the caveat on B in the header, here for A).
    LK_SHARED(16, uint32_t, s_mine, [BM]);
    if (shrink) {
        const uint32_t y = blockIdx.y, ny = gridDim.y, npass = s_npass[0];
        if (threadIdx.x < BM) {
            const uint32_t v = s_idx[threadIdx.x];
            uint32_t owner = 0;
            for (uint32_t q = 0; q < npass; ++q)
                if (s_pass[q] == v) owner = q % ny;
            s_mine[threadIdx.x] = owner == y;
        }
        __syncthreads();
        const uint32_t local = npass > y ? (npass - y + ny - 1) / ny : 0;
        if (threadIdx.x == 0)
            for (uint32_t i = 0; i < local; ++i) s_pass[i] = s_pass[y + i * ny];  // in place: y + i·ny ≥ i
        // s_first stays as it is: every shrink pass has tiles_per_pass k-tiles, so s_first[q] =
        // q·tiles_per_pass whichever adapter pass q is after the compaction.
        __syncthreads();
        if (local == 0 && y > 0) return;
        lt = int(local * tiles_per_pass);
    }

    const MultiLow<T, RT> low{shrink ? static_cast<const T*>(p.x) : static_cast<const T*>(p.t),
                              shrink ? p.k : p.ldt,
                              (p.flags & (shrink ? LK_ALIGNED_A : LK_ALIGNED_L)) != 0,
                              static_cast<const RT*>(p.arena),
                              p.adapters,
                              s_idx,
                              s_pass,
                              s_first,
                              shrink,
                              k_begin,
                              k_end,
                              tiles_per_pass};
    const Phase<T, T, false> main{static_cast<const T*>(p.x), static_cast<const T*>(p.w0), p.k, p.k, 0u,
                                  shrink ? 0u : p.k};
    float acc[4][NI][4];
    zero_acc(acc);
    // each row's low-rank sum times its own adapter's scale (0 without one); the shrink's sums stay unscaled
    auto after_low = [&]() {
        if (shrink) return;
        const uint32_t lane = threadIdx.x % 32, wm = threadIdx.x / 32 / 4;
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float s = s_scale[wm * 64 + mi * 16 + lane / 4 + h * 8];
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    acc[mi][ni][2 * h] *= s;
                    acc[mi][ni][2 * h + 1] *= s;
                }
            }
    };
    const bool interior = m0 + BM <= p.m && n0 + Width<NI>::BN <= n_out;
    const LkDropout none{0, 0, 0, 0, nullptr};
    // main tiles (fused only) by 16-byte copies when X and W0 allow them
    if (shrink || (p.flags & (LK_ALIGNED_A | LK_ALIGNED_B)) == (LK_ALIGNED_A | LK_ALIGNED_B))
        k_loop<false, true>(low, main, lt, false, acc, as_all, bs_all, m0, n0, p.m, n_out, interior, none, after_low);
    else
        k_loop<false, false>(low, main, lt, false, acc, as_all, bs_all, m0, n0, p.m, n_out, interior, none, after_low);

    if (shrink) {
        store_partial(acc, p.partial + size_t(blockIdx.z) * p.m * p.ldt, p.m, p.ldt, m0, 0,
                      [&](uint32_t row) { return s_mine[row] != 0; });
        return;
    }
    if constexpr (DORA) {  // DoRA adapters in the set (lk_multi_factor_at: where each row's factors are)
        LK_SHARED(16, uint32_t, s_frow, [BM]);
        if (threadIdx.x < BM) s_frow[threadIdx.x] = lk_multi_factor_at(p, s_idx[threadIdx.x]);
        store_c_dora<T>(acc, reinterpret_cast<float*>(smem), p, s_frow, m0, n0);  // it syncs before reading s_frow
    } else {
        store_c<T>(acc, as_all, static_cast<T*>(p.y), p.n, static_cast<const T*>(p.bias), p.m, p.n, m0, n0);
    }
}
}  // namespace

// As fused_gemm: two blocks per SM. "_f32ad": the set's adapters are f32, rounded to T as they are loaded;
// "_narrow": the 64-column tiles, for batches whose 128-column tiles leave SMs idle, and the shrink where
// the set's ranks are all ≤ 64 (half the padded columns of T). "_dora": the fused mode for a set that holds
// DoRA adapters (store_c_dora's epilogue), kernels of their own so that the plain ones keep their code and
// registers: those sit at the 128 that two blocks per SM allow, and with the DoRA epilogue ptxas spills on
// sm_90, so the "_dora" kernels are built for one block per SM (the wide ones take 161 registers: half
// the resident warps of the plain kernels in batches with DoRA rows; not measured).
#define LK_FUSED_GEMM_MULTI(name, T, RT, NI, DORA)                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, DORA ? 1 : 2) name(LkFusedGemmMultiParams p) { \
        LK_KERNEL_ENTRY();                                                                            \
        fused_gemm_multi_impl<T, RT, NI, DORA>(p);                                                    \
    }

LK_FUSED_GEMM_MULTI(fused_gemm_multi_bf16, __nv_bfloat16, __nv_bfloat16, WIDE_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_bf16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_f16, __half, __half, WIDE_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_f16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_bf16_f32ad, __nv_bfloat16, float, WIDE_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_bf16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_f16_f32ad, __half, float, WIDE_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_f16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_narrow_bf16, __nv_bfloat16, __nv_bfloat16, NARROW_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_narrow_bf16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_narrow_f16, __half, __half, NARROW_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_narrow_f16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_narrow_bf16_f32ad, __nv_bfloat16, float, NARROW_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_narrow_bf16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_narrow_f16_f32ad, __half, float, NARROW_NI, false)
LK_KERNEL_EXPORT(fused_gemm_multi_narrow_f16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_bf16, __nv_bfloat16, __nv_bfloat16, WIDE_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_bf16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_f16, __half, __half, WIDE_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_f16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_bf16_f32ad, __nv_bfloat16, float, WIDE_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_bf16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_f16_f32ad, __half, float, WIDE_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_f16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_narrow_bf16, __nv_bfloat16, __nv_bfloat16, NARROW_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_narrow_bf16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_narrow_f16, __half, __half, NARROW_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_narrow_f16, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_narrow_bf16_f32ad, __nv_bfloat16, float, NARROW_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_narrow_bf16_f32ad, LkFusedGemmMultiParams)
LK_FUSED_GEMM_MULTI(fused_gemm_multi_dora_narrow_f16_f32ad, __half, float, NARROW_NI, true)
LK_KERNEL_EXPORT(fused_gemm_multi_dora_narrow_f16_f32ad, LkFusedGemmMultiParams)
