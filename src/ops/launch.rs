//! One function per kernel: builds the launch plan and the params struct from already validated
//! tensors and launches once. The public ops (forward, backward, merge) validate, then call these.

use crate::device::Arg;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, kernels};
use crate::params::*;
use crate::plan::LaunchPlan;
use crate::tensor::{Tensor, U32Buffer};

/// Which way round the second operand is stored (see kernels/fused_gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Orient {
    /// Stored output-major (`W0` as N×K for `X·W0ᵀ`): the forward.
    Nt,
    /// Stored reduction-major (`W0` as N×K for `dY·W0`): the backward's dX and U.
    Nn,
    /// As `Nn`, with the first operands (A, L) stored transposed too: the gradients `dYᵀ·T`, `Uᵀ·X`.
    Tn,
}

fn pick<P>(
    op: &'static str,
    dtype: DType,
    bf16: &'static Kernel<P>,
    f16: &'static Kernel<P>,
) -> Result<&'static Kernel<P>> {
    match dtype {
        DType::BF16 => Ok(bf16),
        DType::F16 => Ok(f16),
        DType::F32 => Err(Error::UnsupportedDType {
            op,
            arg: "x",
            got: dtype,
            supported: "bf16 and f16",
        }),
    }
}

/// 16-byte vector loads are legal: aligned base and a leading dimension that keeps every row aligned.
fn vec_ok(addr: u64, ld: u32) -> bool {
    addr % 16 == 0 && ld % 8 == 0
}

fn u32_of(v: usize) -> u32 {
    // Sizes were checked by `validate::fits_u32` before any launch function is called.
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// `out (m×rank) = p (m×inner) · op(q)`; q is rank×inner (Nt) or inner×rank (Nn): the low-rank
/// projections T = X·Aᵀ and U = dY·B. They run on the fused tensor-core GEMM with no low-rank part (an
/// N = rank GEMM over `inner`): f32 accumulation of exact products, one rounding to the output dtype.
pub(crate) fn project<T: Element>(
    op: &'static str,
    orient: Orient,
    p: &Tensor<T>,
    q: &Tensor<T>,
    out: &mut Tensor<T>,
    (m, inner, rank): (usize, usize, usize),
) -> Result<()> {
    let g = FusedGemm {
        orient,
        a: p,
        b: q,
        // no low-rank part (rank 0): l and r are never read
        l: p,
        r: q,
        bias: None,
        m,
        n: rank,
        k: inner,
        rank: 0,
        scale: 1.0,
    };
    fused_gemm(op, &g, out, None)
}

/// Operands of the fused GEMM, all dense row-major.
pub(crate) struct FusedGemm<'a, T: Element> {
    pub orient: Orient,
    pub a: &'a Tensor<T>,
    pub b: &'a Tensor<T>,
    pub l: &'a Tensor<T>,
    pub r: &'a Tensor<T>,
    pub bias: Option<&'a Tensor<T>>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub rank: usize,
    pub scale: f32,
}

/// A reduction over `rank` cut into `splits` fixed chunks of `per_split` (grid z): each block writes its
/// chunk's unscaled f32 sums to `partial` [splits, m, n] instead of C (`lowrank_finalize` adds them).
pub(crate) struct Split<'a> {
    pub splits: usize,
    pub per_split: usize,
    pub partial: &'a mut Tensor<f32>,
}

/// `c (m×n) = a·op(b) + scale·l·op(r) (+ bias)` in one tensor-core kernel; with `split`, the partial
/// sums of the low-rank part instead (c is then left alone).
pub(crate) fn fused_gemm<T: Element>(
    op: &'static str,
    g: &FusedGemm<'_, T>,
    c: &mut Tensor<T>,
    split: Option<Split<'_>>,
) -> Result<()> {
    let kernel = match g.orient {
        Orient::Nt => pick(
            op,
            T::DTYPE,
            &kernels::FUSED_GEMM_NT_BF16,
            &kernels::FUSED_GEMM_NT_F16,
        )?,
        Orient::Nn => pick(
            op,
            T::DTYPE,
            &kernels::FUSED_GEMM_NN_BF16,
            &kernels::FUSED_GEMM_NN_F16,
        )?,
        Orient::Tn => pick(
            op,
            T::DTYPE,
            &kernels::FUSED_GEMM_TN_BF16,
            &kernels::FUSED_GEMM_TN_F16,
        )?,
    };
    // One block per 128×128 tile of C in a 1-D grid (the kernel maps the block index to a tile in a
    // grouped order, see kernels/fused_gemm.cu); grid z: the chunks of a split reduction.
    let tiles = g.m.div_ceil(LK_FUSED_GEMM_BM as usize) * g.n.div_ceil(LK_FUSED_GEMM_BN as usize);
    const MAX_GRID_X: usize = i32::MAX as usize;
    if tiles > MAX_GRID_X {
        return Err(Error::TooLarge {
            op,
            arg: "output tiles (128×128)",
            value: tiles,
            max: MAX_GRID_X,
        });
    }
    let (splits, rank_per_split) = split.as_ref().map_or((1, 0), |s| (s.splits, s.per_split));
    let plan = LaunchPlan {
        grid: [tiles as u32, 1, u32_of(splits)],
        block: [LK_FUSED_GEMM_THREADS, 1, 1],
        smem_bytes: LK_FUSED_GEMM_SMEM_BYTES,
    };
    let (m, n, k, rank) = (u32_of(g.m), u32_of(g.n), u32_of(g.k), u32_of(g.rank));
    // Leading dimensions of the dense operands: a is m×k (k×m for Tn), l is m×rank (rank×m for Tn);
    // b is n×k (Nt) or k×n; r is n×rank (Nt) or rank×n.
    let (lda, ldl) = match g.orient {
        Orient::Nt | Orient::Nn => (k, rank),
        Orient::Tn => (m, m),
    };
    let (ldb, ldr) = match g.orient {
        Orient::Nt => (k, rank),
        Orient::Nn | Orient::Tn => (n, n),
    };
    let mut args = vec![
        Arg::In("a", g.a),
        Arg::In("b", g.b),
        Arg::In("l", g.l),
        Arg::In("r", g.r),
    ];
    if let Some(bias) = g.bias {
        args.push(Arg::In("bias", bias));
    }
    let c_index = args.len();
    match split {
        None => args.push(Arg::Out("c", c)),
        Some(s) => {
            // The kernel leaves c alone when it writes partials; listing c keeps the argument order.
            args.push(Arg::In("c", &*c));
            args.push(Arg::Out("partial", s.partial));
        }
    }
    let has_bias = g.bias.is_some();
    let device = g.a.device().clone();
    device.launch(op, kernel, &plan, &mut args, |ptr| {
        let mut flags = 0;
        for (i, (ld, bit)) in [
            (lda, LK_ALIGNED_A),
            (ldb, LK_ALIGNED_B),
            (ldl, LK_ALIGNED_L),
            (ldr, LK_ALIGNED_R),
        ]
        .into_iter()
        .enumerate()
        {
            if vec_ok(ptr[i], ld) {
                flags |= bit;
            }
        }
        LkFusedGemmParams {
            a: ptr[0] as *const _,
            b: ptr[1] as *const _,
            l: ptr[2] as *const _,
            r: ptr[3] as *const _,
            bias: if has_bias {
                ptr[4] as *const _
            } else {
                std::ptr::null()
            },
            c: ptr[c_index] as *mut _,
            m,
            n,
            k,
            rank,
            lda,
            ldb,
            ldl,
            ldr,
            ldc: n,
            flags,
            scale: g.scale,
            partial: ptr
                .get(c_index + 1)
                .map_or(std::ptr::null_mut(), |&p| p as *mut f32),
            rank_per_split: u32_of(rank_per_split),
        }
    })
}

/// Small-M forward: `y = x·w0ᵀ + scale·t·bᵀ (+ bias)` for m ≤ [`LK_SMALL_M_MAX`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_m<T: Element>(
    op: &'static str,
    x: &Tensor<T>,
    w0: &Tensor<T>,
    t: &Tensor<T>,
    b: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    y: &mut Tensor<T>,
    (m, n, k, rank): (usize, usize, usize, usize),
    scale: f32,
) -> Result<()> {
    let kernel = pick(op, T::DTYPE, &kernels::SMALL_M_BF16, &kernels::SMALL_M_F16)?;
    let plan = LaunchPlan {
        grid: [u32_of(n.div_ceil(LK_SMALL_M_ROWS as usize)), 1, 1],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let mut args = vec![
        Arg::In("x", x),
        Arg::In("w0", w0),
        Arg::In("t", t),
        Arg::In("b", b),
    ];
    if let Some(bias) = bias {
        args.push(Arg::In("bias", bias));
    }
    args.push(Arg::Out("y", y));
    let has_bias = bias.is_some();
    let device = x.device().clone();
    device.launch(op, kernel, &plan, &mut args, |ptr| LkSmallMParams {
        x: ptr[0] as *const _,
        w0: ptr[1] as *const _,
        t: ptr[2] as *const _,
        b: ptr[3] as *const _,
        bias: if has_bias {
            ptr[4] as *const _
        } else {
            std::ptr::null()
        },
        y: ptr[ptr.len() - 1] as *mut _,
        m: u32_of(m),
        n: u32_of(n),
        k: u32_of(k),
        rank: u32_of(rank),
        scale,
    })
}

/// Target number of blocks for the gradient reductions: enough to fill a large GPU. A constant (not
/// the device's SM count) so the m-chunks, and therefore the result bits, depend on the shape only.
const GRAD_TARGET_BLOCKS: usize = 264;
/// Fewest rows per chunk: below this a chunk's partial sums cost more than they save.
const GRAD_MIN_ROWS: usize = 64;

/// (splits, rows per split) for a reduction over `m` rows with `tiles` output tiles.
pub(crate) fn grad_splits(m: usize, tiles: usize) -> (usize, usize) {
    let want = GRAD_TARGET_BLOCKS.div_ceil(tiles).max(1);
    let most = m.div_ceil(GRAD_MIN_ROWS).max(1);
    let splits = want.min(most);
    let chunk = LK_GRAD_CHUNK as usize;
    let rows = m.div_ceil(splits).div_ceil(chunk) * chunk;
    (m.div_ceil(rows), rows)
}

/// `g (rows×cols) = scale · pᵀ (rows×m) · q (m×cols)` on tensor cores (the "tn" fused GEMM: pᵀ read
/// transposed, the m tokens as its rank), deterministic: the tokens are cut into fixed chunks chosen
/// from the shape only; with several, each block writes its chunk's f32 sums and `lowrank_finalize`
/// adds them in chunk order, scales and rounds once.
pub(crate) fn lowrank_grad<T: Element>(
    op: &'static str,
    p: &Tensor<T>,
    q: &Tensor<T>,
    g: &mut Tensor<T>,
    (m, rows, cols): (usize, usize, usize),
    scale: f32,
) -> Result<()> {
    let tiles = rows.div_ceil(LK_FUSED_GEMM_BM as usize) * cols.div_ceil(LK_FUSED_GEMM_BN as usize);
    let (splits, per_split) = grad_splits(m, tiles);
    // pᵀ·q as the low-rank part alone (k = 0): L = p read transposed, R = q, the m tokens its rank
    let gemm = |scale| FusedGemm {
        orient: Orient::Tn,
        a: p,
        b: q,
        l: p,
        r: q,
        bias: None,
        m: rows,
        n: cols,
        k: 0,
        rank: m,
        scale,
    };
    if splits == 1 {
        return fused_gemm(op, &gemm(scale), g, None);
    }
    let device = p.device().clone();
    let mut partial = Tensor::<f32>::for_output(&device, &[splits, rows, cols])?;
    let split = Split {
        splits,
        per_split,
        partial: &mut partial,
    };
    fused_gemm(op, &gemm(1.0), g, Some(split))?;
    let finalize = pick(
        op,
        T::DTYPE,
        &kernels::LOWRANK_FINALIZE_BF16,
        &kernels::LOWRANK_FINALIZE_F16,
    )?;
    let count = rows * cols;
    device.launch(
        op,
        finalize,
        &LaunchPlan::elementwise(count, LK_SIMT_THREADS, 4096),
        &mut [Arg::In("partial", &partial), Arg::Out("g", g)],
        |ptr| LkLowrankFinalizeParams {
            partial: ptr[0] as *const f32,
            g: ptr[1] as *mut _,
            count: u32_of(count),
            splits: u32_of(splits),
            scale,
        },
    )
}

/// What the merge kernel does with W and whether it counts non-finite elements (kernels/merge.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MergeMode {
    /// Writes W, counts nothing.
    Write,
    /// Writes W and counts, in the same pass.
    WriteCount,
    /// Counts only; W is read, never written.
    CountOnly,
}

/// The merge kernel's counts, added over its blocks (see [`crate::ops::NonFiniteCounts`]).
pub(crate) type MergeCounts = [u64; LK_MERGE_COUNTS as usize];

/// In place (unless [`MergeMode::CountOnly`]): `w (n×k) ← round(w + scale·b·a)`; with counting, the
/// block counts added on the host.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge<T: Element, U: Element>(
    op: &'static str,
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    (n, k, rank): (usize, usize, usize),
    scale: f32,
    mode: MergeMode,
) -> Result<Option<MergeCounts>> {
    let kernel: &'static Kernel<LkMergeParams> = match (T::DTYPE, U::DTYPE) {
        (DType::BF16, DType::BF16) => &kernels::MERGE_BF16,
        (DType::BF16, DType::F32) => &kernels::MERGE_BF16_F32AD,
        (DType::F16, DType::F16) => &kernels::MERGE_F16,
        (DType::F16, DType::F32) => &kernels::MERGE_F16_F32AD,
        (DType::F32, DType::F32) => &kernels::MERGE_F32,
        (_, got) => {
            return Err(Error::UnsupportedDType {
                op,
                arg: "a",
                got,
                supported: "adapters in f32 or in the dtype of w (bf16 w: bf16 or f32 adapters; f16 w: f16 or f32; f32 w: f32)",
            });
        }
    };
    let plan = LaunchPlan {
        grid: [
            u32_of(k.div_ceil(LK_MERGE_COLS as usize)),
            u32_of(n.div_ceil(LK_MERGE_ROWS as usize)),
            1,
        ],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let blocks = plan.grid[0] as usize * plan.grid[1] as usize;
    let device = w.device().clone();
    let params = |ptr: &[u64], counts: *mut u32, flags: u32| LkMergeParams {
        w: ptr[2] as *mut _,
        a: ptr[0] as *const _,
        b: ptr[1] as *const _,
        counts,
        n: u32_of(n),
        k: u32_of(k),
        rank: u32_of(rank),
        scale,
        flags,
    };
    if mode == MergeMode::Write {
        device.launch(
            op,
            kernel,
            &plan,
            &mut [Arg::In("a", a), Arg::In("b", b), Arg::Out("w", w)],
            |ptr| params(ptr, std::ptr::null_mut(), 0),
        )?;
        return Ok(None);
    }
    let mut counts = U32Buffer::for_output(&device, LK_MERGE_COUNTS as usize * blocks)?;
    let w_arg = match mode {
        MergeMode::CountOnly => Arg::In("w", &*w),
        _ => Arg::Out("w", w),
    };
    let flags = match mode {
        MergeMode::CountOnly => LK_MERGE_COUNT_ONLY,
        _ => 0,
    };
    device.launch(
        op,
        kernel,
        &plan,
        &mut [
            Arg::In("a", a),
            Arg::In("b", b),
            w_arg,
            Arg::Out("counts", &mut counts),
        ],
        |ptr| params(ptr, ptr[3] as *mut u32, flags),
    )?;
    let per_block = counts.to_vec()?;
    let mut total = MergeCounts::default();
    for (c, t) in total.iter_mut().enumerate() {
        *t = per_block[c * blocks..(c + 1) * blocks]
            .iter()
            .map(|&v| v as u64)
            .sum();
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::grad_splits;

    #[test]
    fn grad_splits_cover_m_in_order() {
        for &(m, tiles) in &[
            (1, 1),
            (300, 1),
            (8192, 64),
            (8192, 1024),
            (257, 5),
            (100_000, 1),
        ] {
            let (s, rows) = grad_splits(m, tiles);
            assert!(
                s >= 1 && rows % 32 == 0 && s * rows >= m && (s - 1) * rows < m,
                "{m} {tiles}"
            );
        }
        assert_eq!(grad_splits(8192, 64).0, 5);
        assert_eq!(grad_splits(300, 1).0, 5);
        assert_eq!(grad_splits(64, 1).0, 1);
    }
}
