//! One function per kernel: builds the launch plan and the params struct from already validated
//! tensors and launches once. The public ops (forward, backward, merge) validate, then call these.

use crate::device::Arg;
use crate::dropout::{Dropout, DropoutArg};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, kernels};
use crate::params::*;
use crate::plan::LaunchPlan;
use crate::tensor::{Tensor, U32Buffer};

use super::workspace::Workspace;

/// Which way round the second operand is stored (see kernels/fused_gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Orient {
    /// Stored output-major (`W0` as N×K for `X·W0ᵀ`): the forward.
    Nt,
    /// Stored reduction-major (`W0` as N×K for `dY·W0`): the backward's dX.
    Nn,
}

pub(crate) fn pick<P>(
    op: &'static str,
    dtype: DType,
    bf16: &'static Kernel<P>,
    f16: &'static Kernel<P>,
) -> Result<&'static Kernel<P>> {
    match dtype {
        DType::BF16 => Ok(bf16),
        DType::F16 => Ok(f16),
        DType::F32 | DType::U32 => Err(Error::UnsupportedDType {
            op,
            arg: "x",
            got: dtype,
            supported: "bf16 and f16",
        }),
    }
}

/// The kernel for a (layer dtype, adapter dtype) pair: adapters in the layer dtype or in f32.
pub(crate) fn pick_pair<P>(
    op: &'static str,
    (layer, adapter): (DType, DType),
    same: [&'static Kernel<P>; 2],
    f32ad: [&'static Kernel<P>; 2],
) -> Result<&'static Kernel<P>> {
    check_pair(op, layer, adapter)?;
    let [bf16, f16] = if adapter == DType::F32 { f32ad } else { same };
    pick(op, layer, bf16, f16)
}

/// Adapters in the layer dtype or in f32, else the error naming `a` and what is supported.
pub(crate) fn check_pair(op: &'static str, layer: DType, adapter: DType) -> Result<()> {
    if adapter != layer && adapter != DType::F32 {
        return Err(Error::UnsupportedDType {
            op,
            arg: "a",
            got: adapter,
            supported: "adapters (a, b) in the layer dtype (that of x) or in f32, with a bf16 or f16 layer",
        });
    }
    Ok(())
}

/// 16-byte vector loads are legal: aligned base and a leading dimension that keeps every row aligned.
fn vec_ok(addr: u64, ld: u32) -> bool {
    addr % 16 == 0 && ld % 8 == 0
}

/// The `LK_ALIGNED_*` bits of the operands `(address, leading dimension, bit)` whose 16-byte vector
/// loads are legal ([`vec_ok`]).
pub(crate) fn aligned_flags(operands: &[(u64, u32, u32)]) -> u32 {
    operands
        .iter()
        .filter(|&&(addr, ld, _)| vec_ok(addr, ld))
        .fold(0, |flags, &(_, _, bit)| flags | bit)
}

pub(crate) fn u32_of(v: usize) -> u32 {
    // Sizes were checked by `validate::fits_u32` before any launch function is called.
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The K chunks of the forward's projection T = X·Aᵀ: (splits, columns per split), from K alone, so a
/// row's T has the same bits at every M (batch invariance; the multi-adapter shrink uses the same chunks,
/// which makes its T bit-identical to the single-adapter one). 1024 columns per chunk: at K = 4096 four
/// chunks, enough blocks at M of a few hundred rows, and the f32 partials (splits·M·r·4 bytes) stay far
/// below X's own size.
pub(crate) fn projection_splits(k: usize) -> (usize, usize) {
    const PER_SPLIT: usize = 1024;
    (k.div_ceil(PER_SPLIT).max(1), PER_SPLIT)
}

/// `out (m×rank) = p (m×inner) · qᵀ`, q rank×inner: the forward's projection T = X·Aᵀ, as the low-rank
/// part alone of the fused tensor-core GEMM (f32 accumulation) over the fixed K chunks of
/// [`projection_splits`] ([`split_reduction`]: f32 partials added in chunk order, one rounding); for one
/// row tile over several chunks without dropout, [`small_projection`] with the same sums.
///
/// With f32 adapters (`q` f32) its R operand reads f32; with dropout (`p` = X masked as it is loaded,
/// the kept elements' 1/(1 − p) in the scale) its L operand is masked.
pub(crate) fn project<T: Element, R: Element>(
    op: &'static str,
    p: &Tensor<T>,
    q: &Tensor<R>,
    out: &mut Tensor<T>,
    (m, inner, rank): (usize, usize, usize),
    dropout: DropoutArg<'_>,
    ws: &mut Workspace<T>,
) -> Result<()> {
    let chunks = projection_splits(inner);
    if m <= LK_FUSED_GEMM_BM as usize && chunks.0 > 1 && !dropout.is_active() {
        return small_projection(op, p, q, out, (m, inner, rank), chunks, ws);
    }
    split_reduction(op, p, q, out, (inner, m, rank), chunks, dropout, ws)
}

/// The small-batch shrink (kernels/multi_decode.cu `multi_decode_shrink`) for layer dtype `T` and
/// adapter dtype `R`, and its launch over `m` rows (m ≤ 128), T's `ldt` columns and `splits` K chunks:
/// a block per 32 of T's columns and 16-row group (x), per pass of the group (y: `passes`, the most
/// adapters one group has) and per chunk (z).
pub(crate) fn small_shrink<T: Element, R: Element>(
    op: &'static str,
    m: usize,
    ldt: usize,
    passes: usize,
    splits: usize,
) -> Result<(&'static Kernel<LkFusedGemmMultiParams>, LaunchPlan)> {
    let kernel = pick_pair(
        op,
        (T::DTYPE, R::DTYPE),
        [
            &kernels::MULTI_DECODE_SHRINK_BF16,
            &kernels::MULTI_DECODE_SHRINK_F16,
        ],
        [
            &kernels::MULTI_DECODE_SHRINK_BF16_F32AD,
            &kernels::MULTI_DECODE_SHRINK_F16_F32AD,
        ],
    )?;
    let plan = LaunchPlan {
        grid: [
            u32_of(
                ldt.div_ceil(LK_MULTI_DECODE_COLS as usize) * m.div_ceil(LK_SMALL_M_MAX as usize),
            ),
            u32_of(passes.max(1)),
            u32_of(splits),
        ],
        block: [LK_MULTI_DECODE_THREADS, 1, 1],
        smem_bytes: LK_MULTI_DECODE_SMEM_BYTES,
    };
    Ok((kernel, plan))
}

/// [`project`] for one row tile (m ≤ 128) over several K chunks, without dropout: the many-adapter
/// small-batch shrink (kernels/multi_decode.cu) with one adapter and no index, blocks of 32 of T's
/// columns for 16 rows and one K chunk instead of a 128-row tile per chunk. The same chains of mma steps
/// (the same bits); its partial sums are added by `lowrank_finalize` as the split reduction's are. With
/// one chunk the split reduction writes T directly and needs no second launch, so it keeps those.
fn small_projection<T: Element, R: Element>(
    op: &'static str,
    p: &Tensor<T>,
    q: &Tensor<R>,
    out: &mut Tensor<T>,
    (m, inner, rank): (usize, usize, usize),
    (splits, per_split): (usize, usize),
    ws: &mut Workspace<T>,
) -> Result<()> {
    // one adapter: one pass per 16-row group
    let (kernel, plan) = small_shrink::<T, R>(op, m, rank, 1, splits)?;
    let (k32, m32) = (u32_of(inner), u32_of(m));
    ws.with_partial(p.device(), &[splits, m, rank], |partial, _| {
        let mut args = [
            Arg::In("x", p),
            Arg::In("a", q),
            Arg::Out("partial", &mut *partial),
        ];
        p.device()
            .launch(op, kernel, &plan, &mut args, |ptr| LkFusedGemmMultiParams {
                x: ptr[0] as *const _,
                // no W0, T, bias or Y (the shrink), no adapter table or index (one adapter, A = arena)
                w0: ptr[0] as *const _,
                t: std::ptr::null(),
                bias: std::ptr::null(),
                y: std::ptr::null_mut(),
                partial: ptr[2] as *mut f32,
                arena: ptr[1] as *const _,
                adapters: std::ptr::null(),
                index: std::ptr::null(),
                factors: std::ptr::null(),
                n_adapters: 0,
                m: m32,
                n: 0,
                k: k32,
                ldt: u32_of(rank),
                k_per_split: u32_of(per_split),
                flags: aligned_flags(&[(ptr[0], k32, LK_ALIGNED_A), (ptr[1], k32, LK_ALIGNED_R)]),
            })?;
        finalize(op, partial, out, splits, 1.0, false)
    })
}

/// `t` as a tensor of `U` when `U` is its dtype (checked at run time: the generic ops branch on dtypes).
pub(crate) fn same_dtype<T: Element, U: Element>(t: &Tensor<T>) -> Result<&Tensor<U>> {
    t.cast_ref::<U>().ok_or_else(|| Error::InvalidState {
        op: "launch",
        message: format!("{} is not {}", T::DTYPE, U::DTYPE),
    })
}

/// Where a fused GEMM applies the dropout mask (kernels/fused_gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaskAt {
    /// The L operand as it is loaded (the projection's X).
    L,
    /// The low-rank sum, by C's element index, before it is scaled (dX).
    LowRankSum,
}

/// Operands of the fused GEMM, all dense row-major. R (the adapter operand) is in the layer dtype or f32.
pub(crate) struct FusedGemm<'a, T: Element, R: Element = T> {
    pub orient: Orient,
    pub a: &'a Tensor<T>,
    pub b: &'a Tensor<T>,
    pub l: &'a Tensor<T>,
    pub r: &'a Tensor<R>,
    pub bias: Option<&'a Tensor<T>>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub rank: usize,
    pub scale: f32,
    /// The dropout mask and where it applies (the scale then includes 1/(1 − p)).
    pub dropout: Option<(DropoutArg<'a>, MaskAt)>,
}

/// A reduction over `rank` cut into `splits` fixed chunks of `per_split` (grid z): each block writes its
/// chunk's unscaled f32 sums to `partial` [splits, m, n] instead of C (`lowrank_finalize` adds them).
pub(crate) struct Split<'a> {
    pub splits: usize,
    pub per_split: usize,
    pub partial: &'a mut Tensor<f32>,
}

/// The tile of the mma.sync fused GEMM (kernels/fused_gemm.cu) for an m×n C on a GPU of `sms` SMs,
/// (rows, columns): 128×128, or 128×64 (the "_narrow" kernels, twice the blocks) where they at least halve
/// the work of the SM with the most blocks: where the 128-column tiles leave at least half the SMs idle
/// (up to M = 256 at N = 4096 on 132 SMs), and at N ≤ 64 (half the padded columns). Not for a better
/// last wave alone: the narrow tiles move more bytes per flop. Both give the same bits: every element of
/// C is the same chain of mma steps at either width, so the choice (which depends on the GPU) does not
/// change the results.
pub fn mma_tile(m: usize, n: usize, sms: u32) -> (usize, usize) {
    mma_tile_of_split(m, n, 1, sms)
}

/// The tile width the mma.sync fused GEMMs take (fused_gemm, the many-adapter one): [`mma_tile`]'s for a
/// grid of `splits` blocks per tile, or the one `LK_MMA_TILE` forces (`128` or `64`; unset or `auto`:
/// [`mma_tile`]'s), for the perf table's rows of both widths. The bits are the same either way.
pub(crate) fn mma_tile_columns(
    op: &'static str,
    m: usize,
    n: usize,
    splits: usize,
    sms: u32,
) -> Result<usize> {
    let forced = forced_mma_tile(op, std::env::var("LK_MMA_TILE").ok().as_deref())?;
    Ok(forced.unwrap_or_else(|| mma_tile_of_split(m, n, splits, sms).1))
}

/// Dynamic shared memory of the mma.sync fused GEMMs (fused_gemm, fused_gemm_multi) at a tile width of
/// `bn` columns.
pub(crate) fn mma_tile_smem(bn: usize) -> u32 {
    if bn == LK_FUSED_GEMM_NARROW_BN as usize {
        LK_FUSED_GEMM_NARROW_SMEM_BYTES
    } else {
        LK_FUSED_GEMM_SMEM_BYTES
    }
}

/// The kernel choices the environment forces (`LK_FUSED_GEMM`, `LK_MMA_TILE`), checked: for an op that
/// launches other kernels before its first GEMM, so that a bad value is refused before anything is written.
pub(crate) fn check_kernel_choices(op: &'static str) -> Result<()> {
    super::sm90::choice(op)?;
    forced_mma_tile(op, std::env::var("LK_MMA_TILE").ok().as_deref()).map(|_| ())
}

/// The width an `LK_MMA_TILE` value forces, or None for the automatic choice.
fn forced_mma_tile(op: &'static str, value: Option<&str>) -> Result<Option<usize>> {
    match value {
        None | Some("") | Some("auto") => Ok(None),
        Some("128") => Ok(Some(LK_FUSED_GEMM_BN as usize)),
        Some("64") => Ok(Some(LK_FUSED_GEMM_NARROW_BN as usize)),
        Some(other) => Err(Error::Unsupported {
            what: format!("{op}: LK_MMA_TILE={other:?}"),
            hint: "use auto (the default), 128 or 64".into(),
        }),
    }
}

/// [`mma_tile`] for a grid of `splits` blocks per tile (a split reduction's chunks).
fn mma_tile_of_split(m: usize, n: usize, splits: usize, sms: u32) -> (usize, usize) {
    const _: () = assert!(2 * LK_FUSED_GEMM_NARROW_BN == LK_FUSED_GEMM_BN);
    let rows = m.div_ceil(LK_FUSED_GEMM_BM as usize);
    let busiest = |bn: u32| (rows * n.div_ceil(bn as usize) * splits).div_ceil(sms.max(1) as usize);
    let bn = if busiest(LK_FUSED_GEMM_NARROW_BN) <= busiest(LK_FUSED_GEMM_BN) {
        LK_FUSED_GEMM_NARROW_BN
    } else {
        LK_FUSED_GEMM_BN
    };
    (LK_FUSED_GEMM_BM as usize, bn as usize)
}

/// `c (m×n) = a·op(b) + scale·l·op(r) (+ bias)` in one tensor-core kernel; with `split`, the partial
/// sums of the low-rank part instead (c is then left alone).
pub(crate) fn fused_gemm<T: Element, R: Element>(
    op: &'static str,
    g: &FusedGemm<'_, T, R>,
    c: &mut Tensor<T>,
    split: Option<Split<'_>>,
) -> Result<()> {
    if super::sm90::try_fused_gemm(op, g, c, split.is_some())? {
        return Ok(());
    }
    mma_fused_gemm(op, g, c, split)
}

/// `C = A·op(B)` without a low-rank term (rank 0) on the mma.sync fused GEMM, whatever `LK_FUSED_GEMM`
/// says (the sm_90a kernels need a rank of at least 8): DoRA's GEMMs of W0 on the dropout residual.
/// Nt: `a` m×k, `b` n×k; Nn: `a` m×k, `b` k×n; `c` m×n.
pub(crate) fn plain_gemm<T: Element>(
    op: &'static str,
    orient: Orient,
    a: &Tensor<T>,
    b: &Tensor<T>,
    c: &mut Tensor<T>,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let g = FusedGemm {
        orient,
        a,
        b,
        // no low-rank tiles run at rank 0: L and R are never read
        l: a,
        r: b,
        bias: None,
        m,
        n,
        k,
        rank: 0,
        scale: 1.0,
        dropout: None,
    };
    mma_fused_gemm(op, &g, c, None)
}

/// [`fused_gemm`] on the mma.sync kernels (kernels/fused_gemm.cu).
fn mma_fused_gemm<T: Element, R: Element>(
    op: &'static str,
    g: &FusedGemm<'_, T, R>,
    c: &mut Tensor<T>,
    split: Option<Split<'_>>,
) -> Result<()> {
    use kernels::*;
    let pair = (T::DTYPE, R::DTYPE);
    let (splits, rank_per_split) = split.as_ref().map_or((1, 0), |s| (s.splits, s.per_split));
    let bn = mma_tile_columns(op, g.m, g.n, splits, g.a.device().sm_count()?)?;
    let narrow = bn == LK_FUSED_GEMM_NARROW_BN as usize;
    let kernel = match (g.orient, narrow) {
        (Orient::Nt, false) => pick_pair(
            op,
            pair,
            [&FUSED_GEMM_NT_BF16, &FUSED_GEMM_NT_F16],
            [&FUSED_GEMM_NT_BF16_F32AD, &FUSED_GEMM_NT_F16_F32AD],
        )?,
        (Orient::Nn, false) => pick_pair(
            op,
            pair,
            [&FUSED_GEMM_NN_BF16, &FUSED_GEMM_NN_F16],
            [&FUSED_GEMM_NN_BF16_F32AD, &FUSED_GEMM_NN_F16_F32AD],
        )?,
        (Orient::Nt, true) => pick_pair(
            op,
            pair,
            [&FUSED_GEMM_NT_NARROW_BF16, &FUSED_GEMM_NT_NARROW_F16],
            [
                &FUSED_GEMM_NT_NARROW_BF16_F32AD,
                &FUSED_GEMM_NT_NARROW_F16_F32AD,
            ],
        )?,
        (Orient::Nn, true) => pick_pair(
            op,
            pair,
            [&FUSED_GEMM_NN_NARROW_BF16, &FUSED_GEMM_NN_NARROW_F16],
            [
                &FUSED_GEMM_NN_NARROW_BF16_F32AD,
                &FUSED_GEMM_NN_NARROW_F16_F32AD,
            ],
        )?,
    };
    // One block per 128×bn tile of C in a 1-D grid (the kernel maps the block index to a tile in a
    // grouped order, see kernels/fused_gemm.cu); grid z: the chunks of a split reduction.
    let tiles = g.m.div_ceil(LK_FUSED_GEMM_BM as usize) * g.n.div_ceil(bn);
    const MAX_GRID_X: usize = i32::MAX as usize;
    super::validate::at_most(op, "output tiles (128×128 or 128×64)", tiles, MAX_GRID_X)?;
    let plan = LaunchPlan {
        grid: [tiles as u32, 1, u32_of(splits)],
        block: [LK_FUSED_GEMM_THREADS, 1, 1],
        smem_bytes: mma_tile_smem(bn),
    };
    let (m, n, k, rank) = (u32_of(g.m), u32_of(g.n), u32_of(g.k), u32_of(g.rank));
    // Leading dimensions of the dense operands: a is m×k, l is m×rank; b is n×k (Nt) or k×n; r is
    // n×rank (Nt) or rank×n.
    let (lda, ldl) = (k, rank);
    let (ldb, ldr) = match g.orient {
        Orient::Nt => (k, rank),
        Orient::Nn => (n, n),
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
    let partial_index = match split {
        None => {
            args.push(Arg::Out("c", c));
            None
        }
        Some(s) => {
            // The kernel leaves c alone when it writes partials; listing c keeps the argument order.
            args.push(Arg::In("c", &*c));
            args.push(Arg::Out("partial", s.partial));
            Some(c_index + 1)
        }
    };
    let has_bias = g.bias.is_some();
    let device = g.a.device().clone();
    let (dropout, mask_flag) = match g.dropout {
        None => (DropoutArg::Fixed(Dropout::NONE), 0),
        Some((d, MaskAt::L)) => (d, LK_DROPOUT_L),
        Some((d, MaskAt::LowRankSum)) => (d, LK_DROPOUT_ACC),
    };
    // a schedule's offset is read from its buffer: listed last, for the guards and the graph's checks
    let offset_index = dropout.offset_buffer().map(|b| {
        args.push(Arg::In("dropout offset", b));
        args.len() - 1
    });
    device.launch(op, kernel, &plan, &mut args, |ptr| {
        let flags = mask_flag
            | aligned_flags(&[
                (ptr[0], lda, LK_ALIGNED_A),
                (ptr[1], ldb, LK_ALIGNED_B),
                (ptr[2], ldl, LK_ALIGNED_L),
                (ptr[3], ldr, LK_ALIGNED_R),
            ]);
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
            partial: partial_index.map_or(std::ptr::null_mut(), |i| ptr[i] as *mut f32),
            rank_per_split: u32_of(rank_per_split),
            dropout: dropout.params(offset_index.map(|i| ptr[i])),
        }
    })
}

/// (splits, k per split) of the small-M kernel's k range: enough blocks to fill a large GPU (the
/// target as for the gradients), at least `LK_SMALL_M_KSPAN / 4` columns per split unless X's slice
/// would not fit, at most `LK_SMALL_M_KSPAN`, a multiple of `LK_SMALL_M_KSTEP`. From the shape only,
/// so the summation order, and the bits, do not depend on the device. Returns (splits, k per split,
/// blocks along [W0; A]'s 16-row tiles).
pub(crate) fn small_m_splits(n: usize, k: usize, rank: usize) -> (usize, usize, usize) {
    let tiles = n.div_ceil(16) + rank.div_ceil(16);
    let blocks = tiles.div_ceil(LK_SMALL_M_TILES as usize);
    let span = LK_SMALL_M_KSPAN as usize;
    let fewest = k.div_ceil(span).max(1);
    let most = k.div_ceil(span / 4).max(fewest);
    let splits = FILL_BLOCKS.div_ceil(blocks).clamp(fewest, most);
    let step = LK_SMALL_M_KSTEP as usize;
    let per = k.div_ceil(splits).div_ceil(step) * step;
    (k.div_ceil(per), per, blocks)
}

/// Small-M forward, m ≤ [`LK_SMALL_M_MAX`]: `t = x·aᵀ` and `y = x·w0ᵀ + scale·t·bᵀ (+ bias)` in two
/// launches: the f32 sums of `x·[w0; a]ᵀ` per k split, then T and Y from them (kernels/small_m.cu).
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_m<T: Element>(
    op: &'static str,
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<T>,
    b: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    y: &mut Tensor<T>,
    t: &mut Tensor<T>,
    (m, n, k, rank): (usize, usize, usize, usize),
    scale: f32,
    ws: &mut Workspace<T>,
) -> Result<()> {
    let (splits, per_split, blocks) = small_m_splits(n, k, rank);
    ws.with_partial(x.device(), &[splits, m, n + rank], |partial, _| {
        let kernel = pick(op, T::DTYPE, &kernels::SMALL_M_BF16, &kernels::SMALL_M_F16)?;
        let device = x.device().clone();
        let plan = LaunchPlan {
            grid: [u32_of(blocks), u32_of(splits), 1],
            block: [LK_SIMT_THREADS, 1, 1],
            smem_bytes: 0,
        };
        let mut args = [
            Arg::In("x", x),
            Arg::In("w0", w0),
            Arg::In("a", a),
            Arg::Out("partial", partial),
        ];
        let ku = u32_of(k);
        device.launch(op, kernel, &plan, &mut args, |ptr| {
            let flags = aligned_flags(&[
                (ptr[0], ku, LK_ALIGNED_A),
                (ptr[1], ku, LK_ALIGNED_B),
                (ptr[2], ku, LK_ALIGNED_R),
            ]);
            LkSmallMParams {
                x: ptr[0] as *const _,
                w0: ptr[1] as *const _,
                a: ptr[2] as *const _,
                partial: ptr[3] as *mut f32,
                m: u32_of(m),
                n: u32_of(n),
                k: ku,
                rank: u32_of(rank),
                k_per_split: u32_of(per_split),
                flags,
            }
        })?;

        let finalize = pick(
            op,
            T::DTYPE,
            &kernels::SMALL_M_FINALIZE_BF16,
            &kernels::SMALL_M_FINALIZE_F16,
        )?;
        let plan = LaunchPlan {
            grid: [u32_of(n.div_ceil(LK_SMALL_M_COLS as usize)), 1, 1],
            block: [LK_SIMT_THREADS, 1, 1],
            smem_bytes: 0,
        };
        let mut args = vec![Arg::In("partial", &*partial), Arg::In("b", b)];
        if let Some(bias) = bias {
            args.push(Arg::In("bias", bias));
        }
        args.push(Arg::Out("y", y));
        args.push(Arg::Out("t", t));
        let has_bias = bias.is_some();
        device.launch(op, finalize, &plan, &mut args, |ptr| {
            let last = ptr.len() - 1;
            LkSmallMFinalizeParams {
                partial: ptr[0] as *const f32,
                b: ptr[1] as *const _,
                bias: if has_bias {
                    ptr[2] as *const _
                } else {
                    std::ptr::null()
                },
                y: ptr[last - 1] as *mut _,
                t: ptr[last] as *mut _,
                m: u32_of(m),
                n: u32_of(n),
                rank: u32_of(rank),
                splits: u32_of(splits),
                scale,
            }
        })
    })
}

/// Target number of blocks for the split reductions (gradients, small-M): enough to fill a large GPU. A
/// constant (not the device's SM count) so the chunks, and therefore the result bits, depend on the
/// shape only.
const FILL_BLOCKS: usize = 264;
/// Fewest rows per chunk: below this a chunk's partial sums cost more than they save.
const GRAD_MIN_ROWS: usize = 64;

/// (splits, rows per split) for a reduction over `m` rows with `tiles` output tiles.
pub(crate) fn grad_splits(m: usize, tiles: usize) -> (usize, usize) {
    let want = FILL_BLOCKS.div_ceil(tiles).max(1);
    let most = m.div_ceil(GRAD_MIN_ROWS).max(1);
    let splits = want.min(most);
    let chunk = LK_GRAD_CHUNK as usize;
    let rows = m.div_ceil(splits).div_ceil(chunk) * chunk;
    (m.div_ceil(rows), rows)
}

/// The rank class of the lowrank_grad kernels: the rank padded to 16, 32, 64 or 128.
pub(crate) fn rank_class(rank: usize) -> usize {
    match rank {
        0..=16 => 16,
        17..=32 => 32,
        33..=64 => 64,
        _ => 128,
    }
}

/// Dynamic shared memory of a lowrank_grad kernel of rank class `class` (the formula in lora_params.h):
/// the ring of G and L tiles, and R's strip for the "_u" kernels.
pub(crate) fn lowrank_grad_smem(class: usize, with_u: bool) -> u32 {
    let (tm, tc, stages) = (
        LK_GRAD_TM as usize,
        LK_GRAD_TC as usize,
        LK_GRAD_STAGES as usize,
    );
    let ring = stages * tm * ((tc + 8) + (class + 8));
    let r = if with_u { tc * (class + 8) } else { 0 };
    u32_of(2 * (ring + r))
}

fn lowrank_grad_kernel(
    op: &'static str,
    (layer, adapter): (DType, DType),
    class: usize,
    with_u: bool,
) -> Result<&'static Kernel<LkLowrankGradParams>> {
    use kernels::*;
    if !with_u {
        // no adapter operand: the layer dtype alone picks it
        let (bf16, f16) = match class {
            16 => (&LOWRANK_GRAD_R16_BF16, &LOWRANK_GRAD_R16_F16),
            32 => (&LOWRANK_GRAD_R32_BF16, &LOWRANK_GRAD_R32_F16),
            64 => (&LOWRANK_GRAD_R64_BF16, &LOWRANK_GRAD_R64_F16),
            _ => (&LOWRANK_GRAD_R128_BF16, &LOWRANK_GRAD_R128_F16),
        };
        return pick(op, layer, bf16, f16);
    }
    let (same, f32ad) = match class {
        16 => (
            [&LOWRANK_GRAD_U_R16_BF16, &LOWRANK_GRAD_U_R16_F16],
            [
                &LOWRANK_GRAD_U_R16_BF16_F32AD,
                &LOWRANK_GRAD_U_R16_F16_F32AD,
            ],
        ),
        32 => (
            [&LOWRANK_GRAD_U_R32_BF16, &LOWRANK_GRAD_U_R32_F16],
            [
                &LOWRANK_GRAD_U_R32_BF16_F32AD,
                &LOWRANK_GRAD_U_R32_F16_F32AD,
            ],
        ),
        64 => (
            [&LOWRANK_GRAD_U_R64_BF16, &LOWRANK_GRAD_U_R64_F16],
            [
                &LOWRANK_GRAD_U_R64_BF16_F32AD,
                &LOWRANK_GRAD_U_R64_F16_F32AD,
            ],
        ),
        _ => (
            [&LOWRANK_GRAD_U_R128_BF16, &LOWRANK_GRAD_U_R128_F16],
            [
                &LOWRANK_GRAD_U_R128_BF16_F32AD,
                &LOWRANK_GRAD_U_R128_F16_F32AD,
            ],
        ),
    };
    pick_pair(op, (layer, adapter), same, f32ad)
}

/// Where lowrank_grad writes P = gᵀ·l.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PLayout {
    /// cols×rank (dB is N×r).
    ColsByRank,
    /// rank×cols (dA is r×K).
    RankByCols,
}

/// The backward's reductions over the m tokens on tensor cores, reading `g` (m×cols) once
/// (kernels/lowrank_grad.cu): `p_out = scale · gᵀ·l` (l: m×rank; stored as `p_layout` says; with
/// `accumulate`, `p_out += scale · gᵀ·l`, the sum in f32 and one rounding) and, with
/// `u = Some((r, q_out))`, also `q_out (m×rank) = g·r` (r: cols×rank) in the same pass. The tokens are
/// cut into fixed chunks and the columns into strips of 128, both from the shape only
/// ([`grad_splits`]); the blocks write f32 partial sums, which `lowrank_finalize` adds in order and
/// rounds once: the same bits on every run, no atomics.
///
/// `r` may be f32 (f32 adapters: read as f32, rounded once to T in shared memory), P's output is in the
/// adapter dtype `G` (T or f32). With `dropout`, g (= X) is masked as it is loaded; `scale` then
/// includes 1/(1 − p).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lowrank_grad<T: Element, R: Element, G: Element>(
    op: &'static str,
    g: &Tensor<T>,
    l: &Tensor<T>,
    p_out: &mut Tensor<G>,
    p_layout: PLayout,
    u: Option<(&Tensor<R>, &mut Tensor<T>)>,
    (m, cols, rank): (usize, usize, usize),
    scale: f32,
    accumulate: bool,
    dropout: Option<DropoutArg<'_>>,
    ws: &mut Workspace<T>,
) -> Result<()> {
    // cols fits u32 (validated), so the strips stay far below the grid's 2^31 - 1 blocks
    let strips = cols.div_ceil(LK_GRAD_TC as usize);
    let (splits, rows_per_split) = grad_splits(m, strips);
    let class = rank_class(rank);
    let with_u = u.is_some();
    let kernel = lowrank_grad_kernel(op, (T::DTYPE, R::DTYPE), class, with_u)?;
    let (dropout, drop_flag) = match dropout {
        Some(d) => (d, LK_DROPOUT_G),
        None => (DropoutArg::Fixed(Dropout::NONE), 0),
    };
    let plan = LaunchPlan {
        grid: [u32_of(strips), u32_of(splits), 1],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: lowrank_grad_smem(class, with_u),
    };
    let device = g.device().clone();
    let transposed = match p_layout {
        PLayout::ColsByRank => 0,
        PLayout::RankByCols => LK_GRAD_P_TRANSPOSED,
    };
    let (m32, cols32, rank32) = (u32_of(m), u32_of(cols), u32_of(rank));
    // a schedule's offset is read from its buffer: listed last, for the guards and the graph's checks
    let offset_buffer = dropout.offset_buffer();
    let params = move |ptr: &[u64], r: u64, q_partial: u64| {
        let flags = aligned_flags(&[
            (ptr[0], cols32, LK_ALIGNED_A),
            (ptr[1], rank32, LK_ALIGNED_L),
            (r, rank32, LK_ALIGNED_R),
        ]);
        LkLowrankGradParams {
            g: ptr[0] as *const _,
            l: ptr[1] as *const _,
            r: r as *const _,
            p_partial: ptr[2] as *mut f32,
            q_partial: q_partial as *mut f32,
            m: m32,
            cols: cols32,
            rank: rank32,
            rows_per_split: u32_of(rows_per_split),
            flags: flags | transposed | drop_flag,
            dropout: dropout.params(offset_buffer.map(|_| ptr[ptr.len() - 1])),
        }
    };
    ws.with_partial(&device, &[splits, cols, rank], |p_partial, ws| {
        match u {
            None => {
                let mut args = vec![
                    Arg::In("g", g),
                    Arg::In("l", l),
                    Arg::Out("p_partial", &mut *p_partial),
                ];
                args.extend(offset_buffer.map(|b| Arg::In("dropout offset", b)));
                device.launch(op, kernel, &plan, &mut args, |ptr| params(ptr, 0, 0))?
            }
            Some((r, q_out)) => ws.with_partial(&device, &[strips, m, rank], |q_partial, _| {
                let mut args = vec![
                    Arg::In("g", g),
                    Arg::In("l", l),
                    Arg::Out("p_partial", &mut *p_partial),
                    Arg::In("r", r),
                    Arg::Out("q_partial", &mut *q_partial),
                ];
                args.extend(offset_buffer.map(|b| Arg::In("dropout offset", b)));
                device.launch(op, kernel, &plan, &mut args, |ptr| {
                    params(ptr, ptr[3], ptr[4])
                })?;
                finalize(op, q_partial, q_out, strips, 1.0, false)
            })?,
        }
        finalize(op, p_partial, p_out, splits, scale, accumulate)
    })
}

/// `out = round(scale · Σ_split partial[split])`, adding the `splits` chunks in order; with
/// `accumulate`, `out = round(out + scale · Σ ...)` (kernels/lowrank_finalize.cu).
pub(crate) fn finalize<T: Element>(
    op: &'static str,
    partial: &Tensor<f32>,
    out: &mut Tensor<T>,
    splits: usize,
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    let kernel = match T::DTYPE {
        DType::F32 => &kernels::LOWRANK_FINALIZE_F32,
        dtype => pick(
            op,
            dtype,
            &kernels::LOWRANK_FINALIZE_BF16,
            &kernels::LOWRANK_FINALIZE_F16,
        )?,
    };
    let count = out.numel();
    partial.device().launch(
        op,
        kernel,
        &LaunchPlan::elementwise(count, LK_SIMT_THREADS, 4096),
        &mut [Arg::In("partial", partial), Arg::Out("g", out)],
        |ptr| LkLowrankFinalizeParams {
            partial: ptr[0] as *const f32,
            g: ptr[1] as *mut _,
            count: u32_of(count),
            splits: u32_of(splits),
            scale,
            accumulate: accumulate as u32,
        },
    )
}

/// `g (rows×cols) = scale · Σ_j L[:, j] ⊗ R[j, :]` over a reduction of length `red`, as the low-rank
/// part alone of the "nt" fused GEMM (k = 0, its "rank" being `red`): L = p (rows×red), R = q
/// (cols×red). The reduction is cut into the given fixed
/// chunks, chosen from the shape only ([`projection_splits`]); with several, each block writes its chunk's f32
/// sums and `lowrank_finalize` adds them in chunk order, scales and rounds once: the same bits on every
/// run, no atomics.
/// With `dropout` active, p is X and is masked as it is loaded; the kept elements' 1/(1 − p) joins the
/// scale (applied once, to the f32 sum).
#[allow(clippy::too_many_arguments)]
fn split_reduction<T: Element, R: Element>(
    op: &'static str,
    p: &Tensor<T>,
    q: &Tensor<R>,
    g: &mut Tensor<T>,
    (red, rows, cols): (usize, usize, usize),
    (splits, per_split): (usize, usize),
    dropout: DropoutArg<'_>,
    ws: &mut Workspace<T>,
) -> Result<()> {
    let (scale, mask) = if dropout.is_active() {
        (
            dropout.dropout().keep_scale() as f32,
            Some((dropout, MaskAt::L)),
        )
    } else {
        (1.0, None)
    };
    let gemm = |scale| FusedGemm {
        orient: Orient::Nt,
        a: p,
        // no main part (k = 0): b is never read
        b: p,
        l: p,
        r: q,
        bias: None,
        m: rows,
        n: cols,
        k: 0,
        rank: red,
        scale,
        dropout: mask,
    };
    if splits == 1 {
        return fused_gemm(op, &gemm(scale), g, None);
    }
    ws.with_partial(p.device(), &[splits, rows, cols], |partial, _| {
        let split = Split {
            splits,
            per_split,
            partial: &mut *partial,
        };
        fused_gemm(op, &gemm(1.0), g, Some(split))?;
        finalize(op, partial, g, splits, scale, false)
    })
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

/// DoRA's row pass of the merge kernel (the `dora_merge_*` kernels; kernels/merge.cu).
#[derive(Clone, Copy)]
pub(crate) enum DoraRows<'a> {
    /// Plain LoRA: the `merge_*` kernels.
    None,
    /// `w ← round(factor·(w + scale·b·a))` per row.
    Scale(&'a Tensor<f32>),
    /// `w ← round(w/factor + scale·b·a)` per row (unmerge, scale negative).
    Divide(&'a Tensor<f32>),
}

fn merge_kernel<T: Element, U: Element>(
    op: &'static str,
    dora: bool,
) -> Result<&'static Kernel<LkMergeParams>> {
    Ok(match (T::DTYPE, U::DTYPE, dora) {
        (DType::BF16, DType::BF16, false) => &kernels::MERGE_BF16,
        (DType::BF16, DType::F32, false) => &kernels::MERGE_BF16_F32AD,
        (DType::F16, DType::F16, false) => &kernels::MERGE_F16,
        (DType::F16, DType::F32, false) => &kernels::MERGE_F16_F32AD,
        (DType::F32, DType::F32, false) => &kernels::MERGE_F32,
        (DType::BF16, DType::BF16, true) => &kernels::DORA_MERGE_BF16,
        (DType::BF16, DType::F32, true) => &kernels::DORA_MERGE_BF16_F32AD,
        (DType::F16, DType::F16, true) => &kernels::DORA_MERGE_F16,
        (DType::F16, DType::F32, true) => &kernels::DORA_MERGE_F16_F32AD,
        (DType::F32, DType::F32, true) => &kernels::DORA_MERGE_F32,
        (DType::U32, _, _) => {
            return Err(Error::UnsupportedDType {
                op,
                arg: "w0",
                got: DType::U32,
                supported: "bf16, f16 or f32",
            });
        }
        (_, got, _) => {
            return Err(Error::UnsupportedDType {
                op,
                arg: "a",
                got,
                supported: "adapters in f32 or in the dtype of w0 (bf16 w0: bf16 or f32 adapters; f16 w0: f16 or f32; f32 w0: f32)",
            });
        }
    })
}

fn merge_plan(n: usize, k: usize) -> LaunchPlan {
    LaunchPlan {
        grid: [
            u32_of(k.div_ceil(LK_MERGE_COLS as usize)),
            u32_of(n.div_ceil(LK_MERGE_ROWS as usize)),
            1,
        ],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    }
}

/// The merge kernel's parameters; the pointers are filled in by the launch.
fn merge_params((n, k, rank): (usize, usize, usize), scale: f32, flags: u32) -> LkMergeParams {
    LkMergeParams {
        w: std::ptr::null_mut(),
        a: std::ptr::null(),
        b: std::ptr::null(),
        counts: std::ptr::null_mut(),
        row_sumsq: std::ptr::null_mut(),
        row_factor: std::ptr::null(),
        n: u32_of(n),
        k: u32_of(k),
        rank: u32_of(rank),
        scale,
        flags,
    }
}

/// In place (unless [`MergeMode::CountOnly`]): `w (n×k) ← round(w + scale·b·a)` (DoRA: scaled or
/// divided by its row factor, `dora`); with counting, the block counts added on the host.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge<T: Element, U: Element>(
    op: &'static str,
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    dims: (usize, usize, usize),
    scale: f32,
    mode: MergeMode,
    dora: DoraRows<'_>,
) -> Result<Option<MergeCounts>> {
    let (n, k, _) = dims;
    let (factor, row_flags) = match dora {
        DoraRows::None => (None, 0),
        DoraRows::Scale(f) => (Some(f), 0),
        DoraRows::Divide(f) => (Some(f), LK_MERGE_ROW_DIVIDE),
    };
    let kernel = merge_kernel::<T, U>(op, factor.is_some())?;
    let plan = merge_plan(n, k);
    let blocks = plan.grid[0] as usize * plan.grid[1] as usize;
    let device = w.device().clone();
    // a, b, w, then the counts and the factor where present: the pointers come in that order
    let mut counts = match mode {
        MergeMode::Write => None,
        _ => Some(U32Buffer::for_output(
            &device,
            LK_MERGE_COUNTS as usize * blocks,
        )?),
    };
    let flags = row_flags
        | match mode {
            MergeMode::CountOnly => LK_MERGE_COUNT_ONLY,
            _ => 0,
        };
    let w_arg = match mode {
        MergeMode::CountOnly => Arg::In("w", &*w),
        _ => Arg::Out("w", w),
    };
    let has_counts = counts.is_some();
    let mut args = vec![Arg::In("a", a), Arg::In("b", b), w_arg];
    if let Some(c) = counts.as_mut() {
        args.push(Arg::Out("counts", c));
    }
    if let Some(f) = factor {
        args.push(Arg::In("factor", f));
    }
    device.launch(op, kernel, &plan, &mut args, |ptr| {
        let mut p = merge_params(dims, scale, flags);
        p.a = ptr[0] as *const _;
        p.b = ptr[1] as *const _;
        p.w = ptr[2] as *mut _;
        let mut next = 3;
        if has_counts {
            p.counts = ptr[next] as *mut u32;
            next += 1;
        }
        if factor.is_some() {
            p.row_factor = ptr[next] as *const f32;
        }
        p
    })?;
    drop(args);
    let Some(counts) = counts else {
        return Ok(None);
    };
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

/// The row partials of DoRA's norm pass: `sumsq [blocks, n]` (blocks = the merge grid's column blocks,
/// [`dora_sumsq_blocks`]) ← per block of columns, the f32 sum of squares of the merged values of each
/// row; `w` is only read.
pub(crate) fn dora_row_sumsq<T: Element, U: Element>(
    op: &'static str,
    w: &Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    dims: (usize, usize, usize),
    scale: f32,
    sumsq: &mut Tensor<f32>,
) -> Result<()> {
    let (n, k, _) = dims;
    let kernel = merge_kernel::<T, U>(op, true)?;
    let plan = merge_plan(n, k);
    w.device().launch(
        op,
        kernel,
        &plan,
        &mut [
            Arg::In("a", a),
            Arg::In("b", b),
            Arg::In("w", w),
            Arg::Out("row sums of squares", sumsq),
        ],
        |ptr| {
            let mut p = merge_params(dims, scale, LK_MERGE_ROW_SUMSQ);
            p.a = ptr[0] as *const _;
            p.b = ptr[1] as *const _;
            p.w = ptr[2] as *mut _;
            p.row_sumsq = ptr[3] as *mut f32;
            p
        },
    )
}

/// Column blocks of the merge grid for K columns: the partial sums per row of [`dora_row_sumsq`].
pub(crate) fn dora_sumsq_blocks(k: usize) -> usize {
    k.div_ceil(LK_MERGE_COLS as usize)
}

/// `factor [n] ← magnitude / round_f32(√Σ sumsq[.., row])` (kernels/merge.cu, dora_factor_f32), and the
/// norms into `norm` where given.
pub(crate) fn dora_factor(
    op: &'static str,
    sumsq: &Tensor<f32>,
    magnitude: &Tensor<f32>,
    factor: &mut Tensor<f32>,
    norm: Option<&mut Tensor<f32>>,
    (n, blocks): (usize, usize),
) -> Result<()> {
    let plan = LaunchPlan {
        grid: [u32_of(n.div_ceil(LK_SIMT_THREADS as usize)), 1, 1],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let has_norm = norm.is_some();
    let mut args = vec![
        Arg::In("row sums of squares", sumsq),
        Arg::In("magnitude", magnitude),
        Arg::Out("factor", factor),
    ];
    if let Some(norm) = norm {
        args.push(Arg::Out("norm", norm));
    }
    sumsq
        .device()
        .clone()
        .launch(op, &kernels::DORA_FACTOR_F32, &plan, &mut args, |ptr| {
            LkDoraFactorParams {
                row_sumsq: ptr[0] as *const f32,
                magnitude: ptr[1] as *const f32,
                factor: ptr[2] as *mut f32,
                norm: if has_norm {
                    ptr[3] as *mut f32
                } else {
                    std::ptr::null_mut()
                },
                n: u32_of(n),
                blocks: u32_of(blocks),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::{forced_mma_tile, grad_splits, small_m_splits};
    use crate::params::{LK_SMALL_M_KSPAN, LK_SMALL_M_KSTEP};

    #[test]
    fn lk_mma_tile_values() {
        assert_eq!(forced_mma_tile("op", None).unwrap(), None);
        assert_eq!(forced_mma_tile("op", Some("")).unwrap(), None);
        assert_eq!(forced_mma_tile("op", Some("auto")).unwrap(), None);
        assert_eq!(forced_mma_tile("op", Some("128")).unwrap(), Some(128));
        assert_eq!(forced_mma_tile("op", Some("64")).unwrap(), Some(64));
        let e = forced_mma_tile("lora_forward", Some("96"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LK_MMA_TILE=\"96\"") && e.contains("128 or 64"),
            "{e}"
        );
    }

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

    #[test]
    fn small_m_splits_cover_k_within_the_span() {
        for &(n, k, r) in &[
            (1, 1, 1),
            (4096, 4096, 16),
            (4096, 11008, 64),
            (11008, 4096, 128),
            (40, 2500, 20),
            (7, 1031, 3),
            (300, 300, 128),
        ] {
            let (s, per, blocks) = small_m_splits(n, k, r);
            assert_eq!(
                blocks,
                (n.div_ceil(16) + r.div_ceil(16)).div_ceil(2),
                "{n} {r}"
            );
            let (span, step) = (LK_SMALL_M_KSPAN as usize, LK_SMALL_M_KSTEP as usize);
            assert!(
                s >= 1 && per % step == 0 && per <= span && s * per >= k && (s - 1) * per < k,
                "{n} {k} {r}: {s} x {per}"
            );
        }
        // the headline decode shape: 129 blocks of [W0; A] tiles, 4 splits of 1024 (X's slice fits)
        assert_eq!(small_m_splits(4096, 4096, 16), (4, 1024, 129));
        assert_eq!(small_m_splits(40, 2500, 20), (10, 256, 3));
    }
}
