/* lora_params.h: the parameter struct of every kernel in kernels/ (one .cu file per op family).
 *
 * Every kernel takes exactly ONE of these structs by value. This header is the single source of
 * truth for the argument lists: build.rs runs bindgen over it (src/params_bindings.rs is the
 * committed output, kept fresh by a test), so Rust and CUDA cannot drift apart.
 *
 * Rules: plain C, fixed-width integers, pointers as `void*` (a kernel is instantiated per dtype and
 * casts; the Rust side checks the dtype before filling the struct), sizes in elements, leading
 * dimensions in elements, row-major everywhere.
 */
#ifndef LORA_PARAMS_H
#define LORA_PARAMS_H

#include <stdint.h>

/* y[i] = scale * x[i] for i < n (kernels/scale.cu). The trivial kernel that carries the whole path
 * (build.rs -> embedded module -> launch plan -> safe op -> reference test) for both backends. */
typedef struct LkScaleParams {
    const void* x;
    void* y;
    float scale;
    uint32_t n;
} LkScaleParams;

/* l2_read_u32 (kernels/l2_probe.cu): a read-bandwidth probe for the speed bound, not a LoRA op. Thread
 * g of the grid (g = blockIdx.x · blockDim.x + threadIdx.x, G threads in all) reads, on pass p < passes,
 * the 16-byte words v, v + G, v + 2G, ... < n16 of src, v = (g + p · blockDim.x) mod G, and writes the
 * wrapping sum of all the u32 words it read to sums[g]. */
typedef struct LkL2ReadParams {
    const void* src;
    uint32_t* sums;
    uint32_t n16;
    uint32_t passes;
} LkL2ReadParams;

/* ---- flags shared by the LoRA kernels ---- */
/* Operand alignment bits: set by the Rust side when that operand's base address is 16-byte aligned and
 * its leading dimension a multiple of 8 elements, so 16-byte vector loads (cp.async) are legal. A clear
 * bit selects the element-wise, bounds-checked load path of the same kernel. */
#define LK_ALIGNED_A 1u
#define LK_ALIGNED_B 2u
#define LK_ALIGNED_L 4u
#define LK_ALIGNED_R 8u

/* LoRA dropout on the adapter input (kernels/include/lk_philox.cuh): element e of X (its row-major index
 * in the dense [M, K] X, e = row·K + col) is kept iff word e % 4 of Philox4x32-10(key = seed, counter =
 * (e / 4, offset)) is ≥ threshold, threshold = round(p·2^32); kept elements are scaled by 1/(1 − p), which
 * the host folds into the kernel's scale. The mask is regenerated wherever it is needed, never stored:
 * the forward's T, the backward's dA and dX see the same one. Which operand it applies to is a flag of
 * the kernel (LK_DROPOUT_*); without that flag the struct is not read. */
typedef struct LkDropout {
    uint64_t seed;
    uint64_t offset;
    uint32_t threshold;
    uint32_t reserved;
    /* Non-null: the offset is read from device memory here instead (two u32 words, the low one first;
     * a DropoutSchedule, src/dropout.rs), so a captured graph's replays can take a fresh mask each, and
     * `offset` is not read. */
    const uint32_t* offset_words;
} LkDropout;

/* fused_gemm tiling, shared with the Rust launch plan: BM × BN output tile per block of
 * LK_FUSED_GEMM_THREADS threads, LK_FUSED_GEMM_SMEM_BYTES of dynamic shared memory (3 cp.async stages).
 * The "_narrow" kernels: BM × LK_FUSED_GEMM_NARROW_BN tiles, LK_FUSED_GEMM_NARROW_SMEM_BYTES (the same
 * bits, twice the blocks, for shapes whose 128-column tiles leave SMs idle, and half the padded
 * columns at N ≤ 64: the projection T = X·Aᵀ, the many-adapter shrink where every rank ≤ 64). */
#define LK_FUSED_GEMM_BM 128u
#define LK_FUSED_GEMM_BN 128u
#define LK_FUSED_GEMM_NARROW_BN 64u
#define LK_FUSED_GEMM_THREADS 256u
#define LK_FUSED_GEMM_SMEM_BYTES 61440u
#define LK_FUSED_GEMM_NARROW_SMEM_BYTES 46080u

/* The largest LoRA rank the ops accept (validated on the Rust side; the range the tests cover). */
#define LK_MAX_RANK 128u

/* fused_gemm flags beyond the alignment bits: LK_DROPOUT_L masks the L operand as it is loaded (the
 * projection T = dropout(X)·Aᵀ, L = X); LK_DROPOUT_ACC masks the low-rank sum L·op(R) by C's element
 * index before it is scaled (dX = dY·W0 + s·(U·A) ⊙ mask / (1 − p)). */
#define LK_DROPOUT_L 32u
#define LK_DROPOUT_ACC 64u

/* Launch geometry of the SIMT kernels, shared with the Rust launch plans (src/ops/launch.rs) so that
 * a kernel's tiling and the grid that covers it cannot drift apart. */
#define LK_SIMT_THREADS 256u /* block size of small_m, lowrank_finalize, merge, scale */
#define LK_SMALL_M_TILES 2u    /* 16-row tiles of [W0; A] per small_m block (4 warps each) */
#define LK_SMALL_M_KSTEP 32u   /* small_m's k splits are multiples of it */
#define LK_SMALL_M_KSPAN 1024u /* the most k one small_m block covers (X's slice in shared memory) */
#define LK_SMALL_M_COLS 64u    /* Y columns per small_m_finalize block */
#define LK_GRAD_CHUNK 32u    /* chunks of the split reductions (tokens, or the projection's k) are multiples of it */
#define LK_MERGE_ROWS 64u    /* W rows per merge block */
#define LK_MERGE_COLS 128u   /* W columns per merge block */

/* C = A·op(B) + scale·L·op(R) (+ bias) in one tensor-core kernel (kernels/fused_gemm.cu): the low-rank
 * product is k-steps of the same main loop, C is written once.
 *   A: m × k (lda), L: m × rank (ldl), both row-major.
 *   "nt" kernels: B is n × k (ldb), R is n × rank (ldr)   -> forward: Y = X·W0ᵀ + s·T·Bᵀ.
 *   "nn" kernels: B is k × n (ldb), R is rank × n (ldr)   -> backward: dX = dY·W0 + s·U·A.
 *   bias: n elements or NULL. C: m × n (ldc).
 * Split reduction (k = 0: the projection T when its tiles are few): with rank_per_split > 0, block z sums
 * rank indices [z·rank_per_split, (z+1)·rank_per_split) only and, when `partial` is not NULL, writes its
 * f32 sums (times scale, which is then 1) to partial[z][m][n] instead of C (lowrank_finalize adds the
 * chunks in order, scales and rounds once). */
typedef struct LkFusedGemmParams {
    const void* a;
    const void* b;
    const void* l;
    const void* r;
    const void* bias;
    void* c;
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t rank;
    uint32_t lda;
    uint32_t ldb;
    uint32_t ldl;
    uint32_t ldr;
    uint32_t ldc;
    uint32_t flags;
    float scale;
    float* partial;
    uint32_t rank_per_split;
    LkDropout dropout;
} LkFusedGemmParams;

/* ---- many adapters in one batch (kernels/fused_gemm_multi.cu) ---- */
/* An adapter index of a row that has none. */
#define LK_NO_ADAPTER 0xffffffffu
/* The factor_row of a plain (not DoRA) adapter. */
#define LK_NO_FACTOR 0xffffffffu
/* One adapter of a set (src/adapter_set.rs): A (rank × k) from element a_offset of the set's arena, B
 * (n × rank) from element b_offset, both dense, no padding; s its scale. flags: LK_ALIGNED_R set when A's
 * rows allow 16-byte loads (A's start 16-byte aligned, k % 8 == 0), LK_ALIGNED_B when B's do (rank % 8 ==
 * 0). factor_row: a DoRA adapter's row of the set's factor table (the forward's `factors`), LK_NO_FACTOR
 * for a plain one. 32 bytes; the Rust side writes the table as 8 u32 words per adapter. rank 0: an
 * empty slot. */
typedef struct LkAdapterDesc {
    uint64_t a_offset;
    uint64_t b_offset;
    uint32_t rank;
    float scale;
    uint32_t flags;
    uint32_t factor_row;
} LkAdapterDesc;

/* Y = X·W0ᵀ + bias + s_a·T_i·B_aᵀ for each row i with adapter a = index[i] (none: LK_NO_ADAPTER), in two
 * modes of one kernel, both on fused_gemm's 128×128 tiles and k loop:
 *   shrink (LK_MULTI_SHRINK): partial[z] (m × ldt, f32) = X_i·A_aᵀ over the k range of split z =
 *     blockIdx.z ([z·k_per_split, ...) ∩ [0, k)), X_i·0 beyond rank_a (NaN where X_i holds an
 *     infinity), zero for rows without an adapter;
 *     lowrank_finalize rounds Σ_z to T (m × ldt). Grid: ceil(m / 128) × Y × splits (ldt ≤ 128): block y
 *     takes the tile's passes y, y + Y, ... (any Y ≥ 1; the bits do not depend on it).
 *   fused: the low-rank k-tiles of every adapter the block's rows use, each with the other rows' T
 *     masked to zero, then acc *= s_{a(i)} per row, then X·W0ᵀ, bias, one rounding: Y (m × n).
 * Row i's sums have exactly the k-tiles of lora_forward with its adapter alone (the masked tiles add
 * zeros), so its bits do not depend on the other rows. X: m × k, W0: n × k, T: m × ldt, dense.
 * flags: LK_ALIGNED_A (x), LK_ALIGNED_B (w0), LK_ALIGNED_L (t). */
#define LK_MULTI_SHRINK 16u
/* The small-batch forms of both modes (kernels/multi_decode.cu): a block of LK_MULTI_DECODE_THREADS
 * threads owns LK_MULTI_DECODE_COLS columns of Y for all rows (multi_decode, m ≤ LK_SMALL_M_MAX, streaming
 * its W0 rows once), or of T's partial sums for 16 rows, one adapter of theirs and one K chunk
 * (multi_decode_shrink, m ≤ LK_FUSED_GEMM_BM), through a cp.async ring of LK_MULTI_DECODE_SMEM_BYTES;
 * each element's sums are those of the mode, in the same order (same bits). Grid: ceil(n /
 * LK_MULTI_DECODE_COLS); or ceil(ldt / LK_MULTI_DECODE_COLS)·ceil(m / 16) × the most distinct adapters
 * of a 16-row group × splits (block y takes the group's pass y). multi_decode_shrink without a table
 * (adapters and index null) is the single-adapter projection T = X·Aᵀ (src/ops/launch.rs
 * small_projection): every row has the one adapter, A = arena (rank = ldt), its 16-byte loads allowed by
 * LK_ALIGNED_R in flags; grid y 1. */
#define LK_MULTI_DECODE_COLS 32u
#define LK_MULTI_DECODE_THREADS 128u
#define LK_MULTI_DECODE_SMEM_BYTES 69632u
typedef struct LkFusedGemmMultiParams {
    const void* x;
    const void* w0;
    const void* t;
    const void* bias;
    void* y;
    float* partial;
    const void* arena;
    const LkAdapterDesc* adapters;
    const uint32_t* index;
    /* DoRA adapters (the fused mode's "_dora" kernels and multi_decode): [rows, n] f32, row factor_row
     * of each DoRA adapter's descriptor holding its m / ‖W0 + s·B·A‖; their rows' outputs are
     * round(fma(f, Z, bias)) with Z = round(acc + 0) (DoRA's scale pass over the GEMM's Z); other rows
     * as without (round(acc + bias)). NULL when the batch has no DoRA row. */
    const float* factors;
    uint32_t n_adapters;
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t ldt;
    uint32_t k_per_split;
    uint32_t flags;
} LkFusedGemmMultiParams;

/* G = round(scale · Σ_split partial[split]) over `count` elements (kernels/lowrank_finalize.cu): the end of
 * every split reduction (lowrank_grad's P and Q, the fused GEMM's split projection). With `accumulate`
 * (gradient accumulation over micro-batches): G = round(G + scale · Σ_split partial[split]), the sum in
 * f32, one rounding to G's dtype. */
typedef struct LkLowrankFinalizeParams {
    const float* partial;
    void* g;
    uint32_t count;
    uint32_t splits;
    float scale;
    uint32_t accumulate;
} LkLowrankFinalizeParams;
/* The "_f32" finalize kernels write G as f32 (the gradients of f32 adapters). */

/* The backward's reductions over the M tokens in one pass over G (kernels/lowrank_grad.cu):
 *   P = Gᵀ·L (cols × rank), for the tokens of chunk z = blockIdx.y: rows [z·rows_per_split, ...) ∩ [0, m);
 *   Q = G·R  (m × rank), for the LK_GRAD_TC columns of strip x = blockIdx.x (the "_u" kernels only).
 * G: m × cols (dY, or X), L: m × rank (T, or U), R: cols × rank (B; the "_u" kernels) or NULL, dense.
 * p_partial[z]: P's unscaled f32 sums for strip x's columns, stored cols × rank, or rank × cols with
 * LK_GRAD_P_TRANSPOSED (dA is r × K); q_partial[x]: Q's f32 sums over strip x (m × rank). lowrank_finalize
 * adds the chunks (strips) in order, scales and rounds once. One kernel per rank class (rank padded to
 * 16, 32, 64 or 128: the "_r<class>" suffix). flags: LK_ALIGNED_A (g), LK_ALIGNED_L (l), LK_ALIGNED_R (r);
 * all of those read set selects 16-byte loads.
 * Dynamic shared memory, 2 bytes per element: LK_GRAD_STAGES × LK_GRAD_TM × ((LK_GRAD_TC + 8) + (class + 8))
 * for the G and L ring, plus LK_GRAD_TC × (class + 8) for R in the "_u" kernels. */
#define LK_GRAD_TM 32u     /* token rows per pipeline step */
#define LK_GRAD_TC 128u    /* columns of G per block (a strip) */
#define LK_GRAD_STAGES 3u  /* depth of the cp.async ring */
#define LK_GRAD_P_TRANSPOSED 16u
/* LK_DROPOUT_G: G (= X) is masked by `dropout` as it is loaded (dA = s·Uᵀ·dropout(X)). The "_u_..._f32ad"
 * kernels read R (= B) as f32, rounded to the layer dtype once as it enters shared memory. */
#define LK_DROPOUT_G 32u
typedef struct LkLowrankGradParams {
    const void* g;
    const void* l;
    const void* r;
    float* p_partial;
    float* q_partial;
    uint32_t m;
    uint32_t cols;
    uint32_t rank;
    uint32_t rows_per_split;
    uint32_t flags;
    LkDropout dropout;
} LkLowrankGradParams;

/* LK_SMALL_M_MAX: the largest m the small-M kernel takes; the launch plan picks it for m ≤ this. */
#define LK_SMALL_M_MAX 16u

/* Small-M forward (M ≤ 16, decoding; kernels/small_m.cu), two launches. small_m: for the k range
 * [z·k_per_split, min(k, (z+1)·k_per_split)) of split z = blockIdx.y, partial[z] (m × (n + rank), f32)
 * = X·[W0; A]ᵀ: Y's sums in columns 0..n, T's in n..n+rank. X: m × k, W0: n × k, A: rank × k, dense.
 * flags: LK_ALIGNED_A (x), LK_ALIGNED_B (w0), LK_ALIGNED_R (a); all three select the 16-byte path. */
typedef struct LkSmallMParams {
    const void* x;
    const void* w0;
    const void* a;
    float* partial;
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t rank;
    uint32_t k_per_split;
    uint32_t flags;
} LkSmallMParams;

/* small_m_finalize: T = round(Σ_z partial[z][:, n..]) (m × rank, written to t), then
 * Y = round(Σ_z partial[z][:, ..n] + scale·T·Bᵀ (+ bias)). B: n × rank, bias: n or NULL, Y: m × n. */
typedef struct LkSmallMFinalizeParams {
    const float* partial;
    const void* b;
    const void* bias;
    void* y;
    void* t;
    uint32_t m;
    uint32_t n;
    uint32_t rank;
    uint32_t splits;
    float scale;
} LkSmallMFinalizeParams;

/* In-place merge (kernels/merge.cu): W ← round(W + scale·B·A), f32 arithmetic, one rounding per
 * element, one read and one write of W. W: n × k, A: rank × k, B: n × rank, dense. Unmerge is the same
 * kernel with -scale.
 *
 * counts: NULL, or LK_MERGE_COUNTS u32 per block ([LK_MERGE_COUNTS][blocks], block = blockIdx.y ·
 * gridDim.x + blockIdx.x), every one written by the kernel: the block's elements finite in W whose
 * merged value (rounded to W's dtype) is NaN, those whose merged value is ±Inf, and those already NaN
 * or ±Inf in W. No atomics: each block reduces its own counts, the host adds the blocks'.
 * flags: LK_MERGE_COUNT_ONLY computes and counts without writing W (W is then only read).
 *
 * DoRA (the dora_merge_* kernels only; the merge_* kernels ignore row_sumsq, row_factor and the
 * LK_MERGE_ROW_* flags): with LK_MERGE_ROW_SUMSQ the kernel writes, instead of W and the counts, each
 * block's f32 sums of squares of the merged values v = round_f32(W + round_f32(s·B·A)) of its rows:
 * row_sumsq[blockIdx.x · n + row] (the row's columns col0..col0+LK_MERGE_COLS), which dora_factor_f32
 * adds in order. Without it, row_factor[row] (f32, [n]) scales the row: W ← round(factor·v); with
 * LK_MERGE_ROW_DIVIDE too (unmerge): W ← round(W/factor + s·B·A), s negative. */
#define LK_MERGE_COUNTS 3u
#define LK_MERGE_COUNT_NAN 0u     /* finite in W, NaN after the merge */
#define LK_MERGE_COUNT_INF 1u     /* finite in W, ±Inf after the merge */
#define LK_MERGE_COUNT_IN_W 2u    /* NaN or ±Inf in W already */
#define LK_MERGE_COUNT_ONLY 1u
#define LK_MERGE_ROW_SUMSQ 2u
#define LK_MERGE_ROW_DIVIDE 4u
typedef struct LkMergeParams {
    void* w;
    const void* a;
    const void* b;
    uint32_t* counts;
    float* row_sumsq;
    const float* row_factor;
    uint32_t n;
    uint32_t k;
    uint32_t rank;
    float scale;
    uint32_t flags;
} LkMergeParams;

/* DoRA's row factor (kernels/merge.cu, dora_factor_f32): factor[row] = magnitude[row] / ‖v_row‖, the
 * norm = round_f32(sqrt(Σ partials)) with the row's `blocks` partial sums of squares (row_sumsq of the
 * LK_MERGE_ROW_SUMSQ pass, [blocks][n]) added in f64 in block order; one thread per row. norm: NULL, or
 * [n] f32 that receives the norms (DoRA's unmerged backward divides by them). */
typedef struct LkDoraFactorParams {
    const float* row_sumsq;
    const float* magnitude;
    float* factor;
    float* norm;
    uint32_t n;
    uint32_t blocks;
} LkDoraFactorParams;

/* DoRA's unmerged layer (kernels/dora.cu): the column passes around the fused GEMM, over m × n row-major
 * matrices of the layer dtype (Z, the fused GEMM's output without bias; Y, dY, dZ) and factor [n] f32.
 *   dora_scale_*: out = Y ← round(fma(factor_j, Z_ij, bias_j)); bias NULL or [n]; dy, partials unused.
 *                 With LoRA dropout, residual = D = (X − dropout(X))·W0ᵀ [m, n] and
 *                 Y ← round(fma(factor_j, Z_ij, fma(1 − factor_j, D_ij, bias_j))), aux ← round(Z_ij − D_ij)
 *                 (the term the factor multiplies, saved for the backward); else both NULL.
 *   dora_grad_*:  out = dZ ← round(factor_j · dY_ij), and partials[b · n + j] ← the f32 sum over the rows
 *                 of row block b (LK_DORA_ROWS rows, ascending) of dY_ij·Z_ij; bias unused. aux: NULL,
 *                 or [m, n] ← round((1 − factor_j) · dY_ij) (with dropout, for dX); residual unused.
 * Grid: x = ceil(m / LK_DORA_ROWS) row blocks, y ≤ 65535 (column blocks of LK_SIMT_THREADS, strided). */
#define LK_DORA_ROWS 64u
typedef struct LkDoraColumnsParams {
    const void* z;
    const void* dy;
    const void* bias;
    const float* factor;
    void* out;
    float* partials;
    const void* residual;
    void* aux;
    uint32_t m;
    uint32_t n;
} LkDoraColumnsParams;

/* X − dropout(X), the part of X that LoRA dropout takes from the adapter's input (kernels/dora.cu,
 * dropout_residual_*; DoRA with dropout runs W0 on it): out[e] ← round(c_e · x[e]), or
 * round(fma(c_e, x[e], out[e])) when accumulate is 1, over `count` dense row-major elements (e is the
 * mask's element index, lk_philox.cuh), c_e = 1 for a dropped element and keep_residual = 1 − 1/(1 − p)
 * (f32, from the host) for a kept one. Grid-stride over groups of 4 elements (one generator call each). */
typedef struct LkDropoutResidualParams {
    const void* x;
    void* out;
    uint64_t count;
    LkDropout dropout;
    float keep_residual;
    uint32_t accumulate;
} LkDropoutResidualParams;

/* DoRA's magnitude gradient (kernels/dora.cu, dora_magnitude_grad_f32): dmagnitude[j] ←
 * round_f32(Σ_b partials[b · n + j] / norm[j] (+ dmagnitude[j] when accumulate is 1)), in f64, the
 * `blocks` partials of dora_grad_* added in block order; one thread per column. */
typedef struct LkDoraMagnitudeGradParams {
    const float* partials;
    const float* norm;
    float* dmagnitude;
    uint32_t n;
    uint32_t blocks;
    uint32_t accumulate;
} LkDoraMagnitudeGradParams;

/* One fused AdamW step over n f32 parameters (kernels/adamw.cu), PyTorch's AdamW formula with every
 * operation rounded once in f32, in this order (so a CPU reference of the same formula gives the same bits):
 *   p ← p·decay                       decay = 1 − lr·weight_decay
 *   m ← beta1·m + (1 − beta1)·g
 *   v ← beta2·v + (1 − beta2)·g·g
 *   p ← p − step_size · m / (sqrt(v) / bc2_sqrt + eps)     step_size = lr / (1 − beta1^t),
 *                                                           bc2_sqrt = sqrt(1 − beta2^t)
 * The host computes the per-step constants in f64 and rounds them to f32 once. copy: NULL, or n elements
 * of the kernel's 16-bit dtype that receive round(p) in the same pass (the layer-dtype adapter copy). */
typedef struct LkAdamwConstants {
    float decay;
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float step_size;
    float bc2_sqrt;
    float eps;
} LkAdamwConstants;

/* schedule: NULL (the step's constants are `c`), or device memory holding them (ops::AdamwSchedule,
 * which the host advances between replays of a captured graph: the launch parameters stay the same). */
typedef struct LkAdamwParams {
    float* param;
    float* m;
    float* v;
    const float* grad;
    void* copy;
    const LkAdamwConstants* schedule;
    uint32_t n;
    LkAdamwConstants c;
} LkAdamwParams;

/* The gradient of the loss ½·scale·Σ(y − target)² with respect to y (kernels/mse_grad.cu), the trainer's
 * last step before the backward: dy[i] = round(scale · (y[i] − target[i])), f32 arithmetic, one rounding. */
typedef struct LkMseGradParams {
    const void* y;
    const void* target;
    void* dy;
    uint32_t n;
    float scale;
} LkMseGradParams;

/* Global-norm gradient clipping (kernels/grad_clip.cu; PyTorch's clip_grad_norm_, the max_grad_norm of
 * Hugging Face's Trainer), on the device with no host round trip and a fixed summation order:
 * grad_sumsq: block b of a tensor sums the squares of its elements [b·CHUNK, (b + 1)·CHUNK) into
 * partial[b] (f32, each thread's strided elements in order, then a fixed tree); grad_clip_coef (one
 * block of 32) adds every tensor's partials in f64, thread t partials t, t + 32, ... in order, then
 * thread 0 the 32 sums in order, and writes result = {norm, coef}: norm = √Σ
 * rounded to f32, coef = max_norm / (norm + 1e-6) in f32, clamped to at most 1 (NaN stays NaN);
 * grad_clip: x[i] = x[i] · coef, one f32 rounding. */
#define LK_GRAD_CLIP_CHUNK 16384u
typedef struct LkGradSumsqParams {
    const float* x;
    float* partial; /* this tensor's first partial */
    uint32_t n;
} LkGradSumsqParams;

typedef struct LkGradClipCoefParams {
    const float* partial;
    float* result; /* {norm, coef} */
    uint32_t count;
    float max_norm;
} LkGradClipCoefParams;

typedef struct LkGradClipParams {
    float* x;
    const float* result;
    uint32_t n;
} LkGradClipParams;

/* ---- the sm_90 path ---- */
/* A TMA tensor map: a CUtensorMap (128 bytes, 64-byte aligned), encoded on the host (lora_kernels::tma:
 * cuTensorMapEncodeTiled on a GPU, LkEmuTensorMap of lk_emu.h under the emulator) and passed inside a
 * kernel's parameter struct, which the kernel takes as `const __grid_constant__`. */
typedef struct __attribute__((aligned(64))) LkTensorMap {
    uint64_t opaque[16];
} LkTensorMap;

/* C = A·op(B) + scale·L·op(R) (+ bias) on sm_90a (kernels/sm90/fused_gemm_sm90.cu): warp-specialised, TMA
 * loads of 128×64 and BN×64 tiles (128-byte swizzle) into a STAGES-deep mbarrier ring, wgmma m64nBNk16
 * in two consumer warpgroups, persistent over the 128×BN output tiles (BN 256, or 128 for the narrow
 * kernels). Maps (lora_kernels::tma): x_map A
 * [m, k], t_map L [m, rank] (boxes 64 columns × 128 rows); "nt" (forward): w_map B = W0 [n, k], b_map
 * R = B [n, rank] (boxes 64 × BN); "nn" (dX): w_map B = W0 [k, n], b_map R = A [rank, n] (boxes 64 × 64).
 * C is m × n (ldc). y_tma = 1: the epilogue stores C through shared memory with TMA stores on y_map (C
 * [m, n], boxes 64 × 64, 128-byte swizzle; needs ldc·size a multiple of 16 and C 16-byte aligned);
 * y_tma = 0: it stores from the registers to y (y_map unused). */
#define LK_SM90_BM 128u
#define LK_SM90_BN 256u
#define LK_SM90_BK 64u
#define LK_SM90_STAGES 3u
#define LK_SM90_THREADS 384u
/* 3 stages of 16 + 32 KB tiles, the 64 KB output tile, and 2 KB for the barriers (at the start) and the
 * padding that puts the ring on the swizzle's 1024-byte period after them: 210 KB of sm_90's 227 */
#define LK_SM90_SMEM_BYTES 215040u
/* The narrow variant (kernels named fused_gemm_sm90[_nn]_narrow_<dtype>): 128×128 output tiles, m64n128 per
 * consumer, for the GEMMs whose busiest SM has less work with them than with 128×256 tiles (ops/sm90.rs
 * sm90_tile picks the width): 6 stages of 16 + 16 KB, the 32 KB output tile, the same 2 KB: 226 KB */
#define LK_SM90_NARROW_BN 128u
#define LK_SM90_NARROW_STAGES 6u
#define LK_SM90_NARROW_SMEM_BYTES 231424u
/* The forward with T computed in the kernel (kernels/sm90/fused_gemm_t_sm90.cu, kernels named
 * fused_gemm_t<TN>_sm90[_narrow]_<dtype>, TN 16 or 32: the rank rounded up): the 128×256 tiles and 3 stages, each
 * slot also holding the TN×64 slice of the LoRA A (a_map: A [rank, k], boxes 64 columns × TN rows); T
 * [m, rank] is written to t_out (t_map unused). Up to rank 32; above it the projection is its own launch.
 * dX with U = dY·B computed in the kernel (fused_gemm_u<TN>_sm90_nn[_narrow]_<dtype>) has the same rings:
 * x_map dY [m, k], w_map W0 [k, n] and b_map A [rank, n] as "nn" above, a_map B [k, rank] (boxes TN
 * columns × 64 rows, the 32- or 64-byte swizzle: one span per row); U stays in the kernel (t_out unused). */
#define LK_SM90_T_MAX_RANK 32u
#define LK_SM90_T16_SMEM_BYTES 221184u
#define LK_SM90_T32_SMEM_BYTES 227328u
/* and with the narrow tiles (fused_gemm_t<TN>_sm90_narrow_<dtype>: 128×128, 5 stages of 16 + 16 KB + TN·128
 * bytes: six do not fit with A's slice) */
#define LK_SM90_T_NARROW_STAGES 5u
#define LK_SM90_T16_NARROW_SMEM_BYTES 208896u
#define LK_SM90_T32_NARROW_SMEM_BYTES 219136u
/* dX at ranks up to 16 (fused_gemm_u16_sm90_nn[_narrow]_<dtype>) also computes dB's and dA's partial sums
 * per row block (128 rows of dY and X): P = dYᵀ·T over its rows for every column of dY, written to
 * db_partial [ceil(m / 128)][k][rank], and Q = Uᵀ·X for every column of X, written to da_partial
 * [ceil(m / 128)][rank][n], both f32 (lowrank_finalize adds the row blocks in order). The forward's T comes
 * in by t_map (T [m, rank], one box of 16 columns × 128 rows, the 32-byte swizzle) into a 4 KB tile after
 * the output tile, the layer input X by da_x_map (X [m, n], boxes 64 columns × 128 rows), and U, rounded,
 * goes through a 4 KB tile after T's. */
#define LK_SM90_U16_SMEM_BYTES 229376u
#define LK_SM90_U16_NARROW_SMEM_BYTES 217088u
/* and at ranks 17 to 32 (fused_gemm_u32_sm90_nn_narrow_<dtype>, the only dX kernel there: the narrow tiles,
 * whatever the width ops::sm90_tile would pick, as the wide ring has no room for the 8 KB T and U tiles):
 * 4 stages of 16 + 16 + 4 KB, the 32 KB output tile, T's and U's 128 × 32 tiles (64-byte rows, the 64-byte
 * swizzle; t_map's box 32 columns), the 2 KB: 194 KB */
#define LK_SM90_U32_NARROW_STAGES 4u
#define LK_SM90_U32_NARROW_SMEM_BYTES 198656u
typedef struct LkFusedGemmSm90Params {
    LkTensorMap x_map;
    LkTensorMap w_map;
    LkTensorMap t_map;
    LkTensorMap b_map;
    LkTensorMap y_map;
    LkTensorMap a_map;
    LkTensorMap da_x_map;
    const void* bias;
    void* y;
    void* t_out;
    float* db_partial;
    float* da_partial;
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t rank;
    uint32_t ldc;
    uint32_t y_tma;
    float scale;
} LkFusedGemmSm90Params;

#endif /* LORA_PARAMS_H */
