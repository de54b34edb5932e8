//! The sm_90a fused GEMM (kernels/sm90/fused_gemm_sm90.cu: TMA, mbarriers, wgmma, warp-specialised and
//! persistent): when it replaces fused_gemm.cu's mma.sync kernel, and its launch.
//!
//! It can run on a compute-capability-9.0 device (an emulator with `EmuConfig::arch` 90 too) for the
//! forward's `Y = X·W0ᵀ + s·T·Bᵀ (+ bias)` and the backward's `dX = dY·W0 + s·U·A` when TMA can describe
//! the operands: k and rank (and, for dX, n) multiples of 8 (16-byte row strides), 16-byte aligned
//! tensors, adapters in the layer dtype, no dropout, and a build that embeds the sm_90a module.
//!
//! The forward at ranks up to 32 is one launch (kernels/sm90/fused_gemm_t_sm90.cu,
//! [`try_forward_with_t`]): T = X·Aᵀ is computed inside the GEMM from the X tiles it streams, about twice
//! per row block (each CTA takes a contiguous run of tiles), and written for the backward. Otherwise T comes
//! from the projection launch first, as on the mma.sync path. The backward's dX at those ranks is one
//! launch the same way ([`try_dx_with_u`]: U = dY·B from the dY tiles, and dB's and dA's per-row-block
//! partials, then their finalizes, and no pass over dY or X; from rank 17 on the narrow tiles alone);
//! otherwise the pass over dY computes dB and U, the pass over X dA, and dX runs after.
//!
//! Bits: each kernel gives the same bits on every run, whatever the SM count, but the two forward
//! structures differ (T summed in one chain or in the projection's fixed K chunks; s·T·Bᵀ added last or
//! first), and so do the backward ones (U, hence dA, dX, and dB). Which one runs depends on the rank
//! alone (and on `LK_FUSED_GEMM`; the backward's also on whether dX is asked for and on dropout), not on M
//! or the SM count, so a row's bits are the same at every batch size over 16 and on every sm_90 GPU (the
//! tile width does not change them).
//!
//! Opt-in for now: the sm_90a kernels have run only in the emulator, so the default stays the mma.sync
//! kernel until they pass on a GPU (scripts/gpu-check.sh runs the LoRA tests with them on sm_90).
//! `LK_FUSED_GEMM=auto` takes the Hopper kernel where it applies and the mma.sync one elsewhere;
//! `LK_FUSED_GEMM=sm90` makes a GEMM the Hopper kernel cannot take an error instead of a fallback (tests);
//! `LK_FUSED_GEMM=sm90-projection` is `sm90` with T and U always from their own launches (to compare the
//! two structures of the forward and of the backward); unset or `mma`: always the mma.sync kernel.

use super::launch::{FusedGemm, Orient, u32_of};
use crate::device::{Arg, RawBuffer};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::kernel::{kernels, module_embedded};
use crate::params::*;
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;
use crate::tma::{Swizzle, TensorMapSpec};

use super::workspace::Workspace;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Choice {
    Auto,
    Mma,
    Sm90,
    /// As `Sm90`, but T and U always from their own launches (never fused_gemm_t_sm90.cu): the two
    /// structures of the forward and of the backward side by side in the perf table.
    Sm90Projection,
}

/// The default is the mma.sync kernel until the sm_90a kernels have passed the tests on a GPU (they have
/// only run in the emulator so far): `auto` opts in.
pub(super) fn choice(op: &'static str) -> Result<Choice> {
    match std::env::var("LK_FUSED_GEMM").as_deref() {
        Err(_) | Ok("") | Ok("mma") => Ok(Choice::Mma),
        Ok("auto") => Ok(Choice::Auto),
        Ok("sm90") => Ok(Choice::Sm90),
        Ok("sm90-projection") => Ok(Choice::Sm90Projection),
        Ok(other) => Err(Error::Unsupported {
            what: format!("{op}: LK_FUSED_GEMM={other:?}"),
            hint: "use mma (the default), auto, sm90 or sm90-projection".into(),
        }),
    }
}

/// Why the Hopper kernel cannot take this GEMM, or None when it can.
fn obstacle<T: Element, R: Element>(g: &FusedGemm<'_, T, R>) -> Option<String> {
    let device = g.a.device();
    if device.compute_capability() != 90 {
        return Some(format!("the device is sm_{}", device.compute_capability()));
    }
    if device.is_cuda() && !module_embedded("fused_gemm_sm90") {
        return Some("this build has no sm_90a kernels (LK_CUDA_ARCHS without 90)".into());
    }
    if g.dropout.is_some() {
        return Some("dropout runs on the mma.sync kernel".into());
    }
    if R::DTYPE != T::DTYPE {
        return Some("adapters not in the layer dtype".into());
    }
    if g.rank == 0 {
        // validate::rank refuses it before any launch; TMA could not describe the empty T and B either
        return Some("the rank is 0".into());
    }
    if g.k % 8 != 0 || g.rank % 8 != 0 {
        return Some(format!(
            "k = {} and r = {} must be multiples of 8 (TMA's 16-byte row strides)",
            g.k, g.rank
        ));
    }
    if g.orient == Orient::Nn && g.n % 8 != 0 {
        return Some(format!(
            "n = {} must be a multiple of 8 for dX (W0's and A's rows, TMA's 16-byte strides)",
            g.n
        ));
    }
    let unaligned = [
        ("x", g.a.byte_range().0),
        ("w0", g.b.byte_range().0),
        ("t", g.l.byte_range().0),
        ("b", g.r.byte_range().0),
    ]
    .into_iter()
    .find(|(_, a)| a % 16 != 0);
    if let Some((name, _)) = unaligned {
        return Some(format!("`{name}` is not 16-byte aligned"));
    }
    None
}

/// Runs the fused GEMM on the Hopper kernel when it can (see the module doc); false when the mma.sync
/// kernel should run instead.
pub(crate) fn try_fused_gemm<T: Element, R: Element>(
    op: &'static str,
    g: &FusedGemm<'_, T, R>,
    c: &mut Tensor<T>,
    split: bool,
) -> Result<bool> {
    // The forward's GEMM and the backward's dX have Hopper kernels; the projection (k = 0, or split) is
    // not a candidate, whatever LK_FUSED_GEMM says.
    if g.k == 0 || split {
        return Ok(false);
    }
    let choice = choice(op)?;
    if choice == Choice::Mma {
        return Ok(false);
    }
    if let Some(why) = obstacle(g) {
        if matches!(choice, Choice::Sm90 | Choice::Sm90Projection) {
            return Err(Error::Unsupported {
                what: format!("{op}: LK_FUSED_GEMM=sm90, but {why}"),
                hint: "unset LK_FUSED_GEMM to fall back to the mma.sync kernel".into(),
            });
        }
        return Ok(false);
    }
    let r = g.r.cast_ref::<T>().expect("R is T: checked by obstacle");
    launch(op, g, r, c)?;
    Ok(true)
}

/// The forward in one launch on the Hopper kernel that computes T itself (kernels/sm90/fused_gemm_t_sm90.cu)
/// when it can: everything the fused GEMM needs ([`obstacle`]), a rank of at most 32 and a 16-byte aligned
/// `a`; the tile width is [`sm90_tile`]'s, as for the fused GEMM. Writes `y` and `t`; false when the
/// projection and the fused GEMM should run instead (they report what stops the Hopper kernel under
/// `LK_FUSED_GEMM=sm90`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn try_forward_with_t<T: Element, R: Element>(
    op: &'static str,
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<R>,
    b: &Tensor<R>,
    bias: Option<&Tensor<T>>,
    scale: f32,
    y: &mut Tensor<T>,
    t: &mut Tensor<T>,
    (m, n, k, rank): (usize, usize, usize, usize),
) -> Result<bool> {
    let g = FusedGemm {
        orient: Orient::Nt,
        a: x,
        b: w0,
        l: &*t,
        r: b,
        bias,
        m,
        n,
        k,
        rank,
        scale,
        dropout: None,
    };
    let Some(a) = one_launch_takes(op, &g, a)? else {
        return Ok(false);
    };
    let b = b.cast_ref::<T>().expect("R is T: checked by obstacle");
    let one = OneLaunch {
        nn: false,
        first: x,
        w0,
        inner: a,
        last: b,
        bias,
        scale,
        dims: (g.m, g.n, g.k, g.rank),
    };
    one_launch(op, &one, y, Written::T(t))?;
    Ok(true)
}

/// The backward's inputs and outputs for dX's one-launch kernel: the forward's T [m, r] and input X [m, K],
/// and dB [N, r] and dA [r, K], set or accumulated onto.
pub(crate) struct Grads<'a, T: Element, R: Element> {
    pub t: &'a Tensor<T>,
    pub x: &'a Tensor<T>,
    pub db: &'a mut Tensor<R>,
    pub da: &'a mut Tensor<R>,
    pub accumulate: bool,
}

/// What a one-launch kernel writes besides its GEMM's result: the forward's T [m, rank], or, for dX (which
/// keeps U to itself), the gradients' partials, from T and X, of dB [ceil(m / 128), k, rank] and of dA
/// [ceil(m / 128), rank, n] (kernel dimensions), f32.
enum Written<'a, T: Element> {
    T(&'a mut Tensor<T>),
    Grads {
        t: &'a Tensor<T>,
        x: &'a Tensor<T>,
        db: &'a mut Tensor<f32>,
        da: &'a mut Tensor<f32>,
    },
}

/// The whole backward but dropout's in one launch on the Hopper kernel that computes U = dY·B itself
/// (kernels/sm90/fused_gemm_t_sm90.cu, the "nn" kernels): `dx = dY·W0 + (s·U)·A` (U stays in the kernel),
/// dB = s·dYᵀ·T and dA = s·Uᵀ·X (their per-row-block f32 partials from the kernel, from `ws`, each added in
/// order into its gradient, or onto it with `accumulate`, by a finalize). Returns whether it ran (then dX, dA
/// and dB are written). The conditions are [`try_forward_with_t`]'s, with B's alignment for A's, and `t`'s
/// and `x`'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn try_dx_with_u<T: Element, R: Element>(
    op: &'static str,
    dy: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<R>,
    b: &Tensor<R>,
    scale: f32,
    dx: &mut Tensor<T>,
    grads: Grads<'_, T, R>,
    (m, n, k, rank): (usize, usize, usize, usize),
    ws: &mut Workspace<T>,
) -> Result<bool> {
    let g = FusedGemm {
        orient: Orient::Nn,
        a: dy,
        b: w0,
        l: grads.t, // no U operand: T, of U's shape, for the checks (its alignment: T's tile is read by TMA)
        r: a,
        bias: None,
        m,
        n: k,
        k: n,
        rank,
        scale,
        dropout: None,
    };
    let Some(b) = one_launch_takes(op, &g, b)? else {
        return Ok(false);
    };
    if grads.x.byte_range().0 % 16 != 0 {
        return Ok(false);
    }
    let a = a.cast_ref::<T>().expect("R is T: checked by obstacle");
    let one = OneLaunch {
        nn: true,
        first: dy,
        w0,
        inner: b,
        last: a,
        bias: None,
        scale,
        dims: (g.m, g.n, g.k, g.rank),
    };
    let Grads {
        t,
        x,
        db,
        da,
        accumulate,
    } = grads;
    let db = db.cast_mut::<T>().expect("R is T: checked by obstacle");
    let da = da.cast_mut::<T>().expect("R is T: checked by obstacle");
    let row_blocks = m.div_ceil(LK_SM90_BM as usize);
    let device = dy.device();
    ws.with_partial(device, &[row_blocks, n, rank], |db_partial, ws| {
        ws.with_partial(device, &[row_blocks, rank, k], |da_partial, _| {
            let partials = Written::Grads {
                t,
                x,
                db: &mut *db_partial,
                da: &mut *da_partial,
            };
            one_launch(op, &one, dx, partials)?;
            super::launch::finalize(op, db_partial, db, row_blocks, scale, accumulate)?;
            super::launch::finalize(op, da_partial, da, row_blocks, scale, accumulate)
        })
    })?;
    Ok(true)
}

/// Whether a one-launch kernel takes `g` (whose `l` is the low-rank product it writes): under
/// `LK_FUSED_GEMM` auto or sm90, what the fused GEMM needs ([`obstacle`]), a rank of at most 32, the
/// module embedded and `inner` (the adapter the kernel multiplies the streamed operand by: A in the
/// forward, B for dX) 16-byte aligned. Returns `inner` in the layer dtype when it does.
fn one_launch_takes<'t, T: Element, R: Element>(
    op: &'static str,
    g: &FusedGemm<'_, T, R>,
    inner: &'t Tensor<R>,
) -> Result<Option<&'t Tensor<T>>> {
    if g.k == 0 || !matches!(choice(op)?, Choice::Auto | Choice::Sm90) {
        return Ok(None);
    }
    let device = g.a.device();
    if obstacle(g).is_some()
        || (device.is_cuda() && !module_embedded("fused_gemm_t_sm90"))
        || g.rank > LK_SM90_T_MAX_RANK as usize
        || inner.byte_range().0 % 16 != 0
    {
        return Ok(None);
    }
    Ok(Some(
        inner.cast_ref::<T>().expect("R is T: checked by obstacle"),
    ))
}

/// A one-launch kernel's GEMM (kernels/sm90/fused_gemm_t_sm90.cu), m × n × k with rank `rank` as the
/// kernel sees it: `c = first·op(w0) + (s·P)·op(last)` with `P = first·op(inner)` [m, rank] computed inside.
/// The forward (`nn` false): first X [m, k], W0 [n, k], inner A [rank, k], last B [n, rank]. dX (`nn`):
/// first dY [m, k], W0 [k, n], inner B [k, rank] (read MN-major), last A [rank, n].
struct OneLaunch<'a, T: Element> {
    nn: bool,
    first: &'a Tensor<T>,
    w0: &'a Tensor<T>,
    inner: &'a Tensor<T>,
    last: &'a Tensor<T>,
    bias: Option<&'a Tensor<T>>,
    scale: f32,
    dims: (usize, usize, usize, usize),
}

/// Launches `g` (checked by [`one_launch_takes`]), writing `c` [m, n] and `out`: the forward's T, or dX's
/// gradient partials (dB's and dA's per-row-block sums dYᵀ·T and Uᵀ·X).
fn one_launch<T: Element>(
    op: &'static str,
    g: &OneLaunch<'_, T>,
    c: &mut Tensor<T>,
    out: Written<'_, T>,
) -> Result<()> {
    let device = g.first.device().clone();
    let (m, n, k, rank) = g.dims;
    let nn = g.nn;
    let tn = rank.next_multiple_of(16) as u32;
    let sms = device.sm_count()?;
    // dX at ranks 17..32 has the narrow tiles alone (fused_gemm_t_sm90.cu: the wide ring has no room for
    // T's and U's 128×32 tiles)
    let bn = if nn && tn == 32 {
        LK_SM90_NARROW_BN
    } else {
        sm90_tile(m, n, sms).1 as u32
    };
    use kernels::*;
    let (pair, smem_bytes) = match (nn, tn, bn == LK_SM90_NARROW_BN) {
        (false, 16, false) => (
            (&FUSED_GEMM_T16_SM90_BF16, &FUSED_GEMM_T16_SM90_F16),
            LK_SM90_T16_SMEM_BYTES,
        ),
        (false, _, false) => (
            (&FUSED_GEMM_T32_SM90_BF16, &FUSED_GEMM_T32_SM90_F16),
            LK_SM90_T32_SMEM_BYTES,
        ),
        (false, 16, true) => (
            (
                &FUSED_GEMM_T16_SM90_NARROW_BF16,
                &FUSED_GEMM_T16_SM90_NARROW_F16,
            ),
            LK_SM90_T16_NARROW_SMEM_BYTES,
        ),
        (false, _, true) => (
            (
                &FUSED_GEMM_T32_SM90_NARROW_BF16,
                &FUSED_GEMM_T32_SM90_NARROW_F16,
            ),
            LK_SM90_T32_NARROW_SMEM_BYTES,
        ),
        (true, 16, false) => (
            (&FUSED_GEMM_U16_SM90_NN_BF16, &FUSED_GEMM_U16_SM90_NN_F16),
            LK_SM90_U16_SMEM_BYTES,
        ),
        (true, 16, true) => (
            (
                &FUSED_GEMM_U16_SM90_NN_NARROW_BF16,
                &FUSED_GEMM_U16_SM90_NN_NARROW_F16,
            ),
            LK_SM90_U16_NARROW_SMEM_BYTES,
        ),
        (true, _, _) => (
            (
                &FUSED_GEMM_U32_SM90_NN_NARROW_BF16,
                &FUSED_GEMM_U32_SM90_NN_NARROW_F16,
            ),
            LK_SM90_U32_NARROW_SMEM_BYTES,
        ),
    };
    let kernel = super::launch::pick(op, T::DTYPE, pair.0, pair.1)?;
    // the dX kernels always write dB's and dA's partials (and need T and X), the forward's T
    assert_eq!(
        matches!(out, Written::Grads { .. }),
        nn,
        "{op}: the gradients' partials with the dX kernels alone"
    );
    // T [m, rank]: its row block's 128 rows × TN columns, TN·2-byte rows in the 32- or 64-byte swizzle
    // (fused_gemm_t_sm90.cu T_TILE_BYTES); X [m, n] in the 128 × 64 boxes of the streamed operand
    let tn_swizzle = if tn == 16 { Swizzle::B32 } else { Swizzle::B64 };
    let (t_map, da_x_map) =
        match &out {
            Written::Grads { t, x, .. } => (
                TensorMapSpec::row_major(size_of::<T>(), m, rank, tn, LK_SM90_BM, tn_swizzle)
                    .encode(op, &device, t.byte_range().0)?,
                map(op, x, m, n, LK_SM90_BM)?,
            ),
            Written::T(_) => (LkTensorMap::default(), LkTensorMap::default()),
        };
    let (w_map, inner_map, last_map) = if nn {
        // W0 [k, n] and A [rank, n] in 64×64 boxes; B [k, rank] in 64 rows of TN columns, one 32- or
        // 64-byte swizzle span (fused_gemm_t_sm90.cu U_ROW_BYTES)
        let b_slice = TensorMapSpec::row_major(size_of::<T>(), k, rank, tn, LK_SM90_BK, tn_swizzle)
            .encode(op, &device, g.inner.byte_range().0)?;
        (
            map(op, g.w0, k, n, LK_SM90_BK)?,
            b_slice,
            map(op, g.last, rank, n, LK_SM90_BK)?,
        )
    } else {
        // W0 [n, k] and B [n, rank] in boxes of bn rows; A [rank, k] in boxes of TN rows
        (
            map(op, g.w0, n, k, bn)?,
            map(op, g.inner, rank, k, tn)?,
            map(op, g.last, n, rank, bn)?,
        )
    };
    let x_map = map(op, g.first, m, k, LK_SM90_BM)?;
    let y_map = y_map(op, c, m, n)?;
    // Each CTA a contiguous run of ceil(tiles / SMs) tiles, as many CTAs as there are runs.
    let tiles = m.div_ceil(LK_SM90_BM as usize) * n.div_ceil(bn as usize);
    let per_cta = tiles.div_ceil(sms.max(1) as usize).max(1);
    let plan = LaunchPlan {
        grid: [u32_of(tiles.div_ceil(per_cta)), 1, 1],
        block: [LK_SM90_THREADS, 1, 1],
        smem_bytes,
    };
    let names = if nn {
        ["dy", "w0", "b", "a", "dx"]
    } else {
        ["x", "w0", "a", "b", "y"]
    };
    let mut args = vec![
        Arg::In(names[0], g.first),
        Arg::In(names[1], g.w0),
        Arg::In(names[2], g.inner),
        Arg::In(names[3], g.last),
    ];
    if let Some(bias) = g.bias {
        args.push(Arg::In("bias", bias));
    }
    // after the inputs, c, then T (the forward) or the two partials (dX)
    let has_partials = matches!(out, Written::Grads { .. });
    let mut written = match out {
        Written::T(t) => vec![Arg::Out("t", t)],
        Written::Grads { t, x, db, da } => {
            args.push(Arg::In("t", t));
            args.push(Arg::In("x", x));
            vec![Arg::Out("db_partial", db), Arg::Out("da_partial", da)]
        }
    };
    let c_index = args.len();
    args.push(Arg::Out(names[4], c));
    args.append(&mut written);
    let after_c = c_index + 1;
    let has_bias = g.bias.is_some();
    let (m, n, k, rank) = (u32_of(m), u32_of(n), u32_of(k), u32_of(rank));
    device.launch(op, kernel, &plan, &mut args, |ptr| LkFusedGemmSm90Params {
        x_map,
        w_map,
        t_map,
        b_map: last_map,
        y_map: y_map.unwrap_or_default(),
        a_map: inner_map,
        da_x_map,
        bias: if has_bias {
            ptr[4] as *const _
        } else {
            std::ptr::null()
        },
        y: ptr[c_index] as *mut _,
        t_out: if has_partials {
            std::ptr::null_mut()
        } else {
            ptr[after_c] as *mut _
        },
        db_partial: if has_partials {
            ptr[after_c] as *mut f32
        } else {
            std::ptr::null_mut()
        },
        da_partial: if has_partials {
            ptr[after_c + 1] as *mut f32
        } else {
            std::ptr::null_mut()
        },
        m,
        n,
        k,
        rank,
        ldc: n,
        y_tma: u32::from(y_map.is_some()),
        scale: g.scale,
    })
}

/// The epilogue's TMA store map of C (m × n, boxes 64 × 64): it needs C's rows to be 16-byte multiples and
/// C 16-byte aligned; None otherwise (the kernel then stores from the registers).
fn y_map<T: Element>(
    op: &'static str,
    c: &Tensor<T>,
    m: usize,
    n: usize,
) -> Result<Option<LkTensorMap>> {
    if n % 8 == 0 && c.byte_range().0 % 16 == 0 {
        Ok(Some(map(op, c, m, n, LK_SM90_BM / 2)?))
    } else {
        Ok(None)
    }
}

/// The tensor map of a row-major [rows, cols] tensor in boxes of 64 columns × `box_rows` rows.
fn map<T: Element>(
    op: &'static str,
    t: &Tensor<T>,
    rows: usize,
    cols: usize,
    box_rows: u32,
) -> Result<LkTensorMap> {
    TensorMapSpec::row_major(
        size_of::<T>(),
        rows,
        cols,
        LK_SM90_BK,
        box_rows,
        Swizzle::B128,
    )
    .encode(op, t.device(), t.byte_range().0)
}

/// The output tile (rows, columns) of the sm_90a GEMM for an m × n result on `sms` multiprocessors:
/// 128×256, or 128×128 (the "_narrow" kernels) where the busiest SM of the persistent grid, which runs
/// ceil(tiles / SMs) tiles, has less work with those (a wide tile is two narrow tiles' work): when there
/// are at most half as many wide tiles as SMs (M = 256, N = 4096: 32 for an H100's 132), or a last wave
/// that narrow tiles fill better (M = 1536: 192 wide tiles put 2 on some SMs, 384 narrow ones 3). Ties
/// go to the wide tiles (a quarter less traffic from L2 per output element).
pub fn sm90_tile(m: usize, n: usize, sms: u32) -> (usize, usize) {
    const _: () = assert!(2 * LK_SM90_NARROW_BN == LK_SM90_BN);
    let rows = m.div_ceil(LK_SM90_BM as usize);
    let busiest = |bn: u32| (rows * n.div_ceil(bn as usize)).div_ceil(sms.max(1) as usize);
    let bn = if busiest(LK_SM90_NARROW_BN) < 2 * busiest(LK_SM90_BN) {
        LK_SM90_NARROW_BN
    } else {
        LK_SM90_BN
    };
    (LK_SM90_BM as usize, bn as usize)
}

fn launch<T: Element, R: Element>(
    op: &'static str,
    g: &FusedGemm<'_, T, R>,
    r: &Tensor<T>,
    c: &mut Tensor<T>,
) -> Result<()> {
    let device = g.a.device().clone();
    let sms = device.sm_count()?;
    let narrow = sm90_tile(g.m, g.n, sms).1 == LK_SM90_NARROW_BN as usize;
    let (bn, smem_bytes) = if narrow {
        (LK_SM90_NARROW_BN, LK_SM90_NARROW_SMEM_BYTES)
    } else {
        (LK_SM90_BN, LK_SM90_SMEM_BYTES)
    };
    let pair = match (g.orient, narrow) {
        (Orient::Nt, false) => (
            &kernels::FUSED_GEMM_SM90_BF16,
            &kernels::FUSED_GEMM_SM90_F16,
        ),
        (Orient::Nt, true) => (
            &kernels::FUSED_GEMM_SM90_NARROW_BF16,
            &kernels::FUSED_GEMM_SM90_NARROW_F16,
        ),
        (Orient::Nn, false) => (
            &kernels::FUSED_GEMM_SM90_NN_BF16,
            &kernels::FUSED_GEMM_SM90_NN_F16,
        ),
        (Orient::Nn, true) => (
            &kernels::FUSED_GEMM_SM90_NN_NARROW_BF16,
            &kernels::FUSED_GEMM_SM90_NN_NARROW_F16,
        ),
    };
    // The second operands: stored [n, k] and [n, rank] in the forward (boxes of bn rows), [k, n] and
    // [rank, n] for dX (bn/64 64×64 boxes per stage).
    let ((b_rows, b_cols), (r_rows, r_cols), box_rows) = match g.orient {
        Orient::Nt => ((g.n, g.k), (g.n, g.rank), bn),
        Orient::Nn => ((g.k, g.n), (g.rank, g.n), LK_SM90_BK),
    };
    let kernel = super::launch::pick(op, T::DTYPE, pair.0, pair.1)?;
    let maps = [
        map(op, g.a, g.m, g.k, LK_SM90_BM)?,
        map(op, g.b, b_rows, b_cols, box_rows)?,
        map(op, g.l, g.m, g.rank, LK_SM90_BM)?,
        map(op, r, r_rows, r_cols, box_rows)?,
    ];
    let y_map = y_map(op, c, g.m, g.n)?;
    let tiles = g.m.div_ceil(LK_SM90_BM as usize) * g.n.div_ceil(bn as usize);
    let plan = LaunchPlan {
        grid: [u32_of(tiles.min(sms as usize)), 1, 1],
        block: [LK_SM90_THREADS, 1, 1],
        smem_bytes,
    };
    let mut args = vec![
        Arg::In("x", g.a),
        Arg::In("w0", g.b),
        Arg::In("t", g.l),
        Arg::In("b", r),
    ];
    if let Some(bias) = g.bias {
        args.push(Arg::In("bias", bias));
    }
    let c_index = args.len();
    args.push(Arg::Out("y", c));
    let has_bias = g.bias.is_some();
    let (m, n, k, rank) = (u32_of(g.m), u32_of(g.n), u32_of(g.k), u32_of(g.rank));
    device.launch(op, kernel, &plan, &mut args, |ptr| LkFusedGemmSm90Params {
        x_map: maps[0],
        w_map: maps[1],
        t_map: maps[2],
        b_map: maps[3],
        y_map: y_map.unwrap_or_default(),
        a_map: LkTensorMap::default(),
        bias: if has_bias {
            ptr[4] as *const _
        } else {
            std::ptr::null()
        },
        y: ptr[c_index] as *mut _,
        t_out: std::ptr::null_mut(),
        db_partial: std::ptr::null_mut(),
        da_partial: std::ptr::null_mut(),
        da_x_map: LkTensorMap::default(),
        m,
        n,
        k,
        rank,
        ldc: n,
        y_tma: u32::from(y_map.is_some()),
        scale: g.scale,
    })
}

#[cfg(test)]
mod tests {
    use super::obstacle;
    use crate::ops::launch::{FusedGemm, Orient};
    use crate::{Device, EmuConfig, Tensor};
    use half::bf16;

    /// What `obstacle` refuses falls back under `auto`; a GEMM it lets through must have maps TMA can
    /// encode, so a rank of 0 (no T or B columns) has to be refused here, not by the map encoder.
    #[test]
    fn obstacle_refuses_rank_zero_and_admits_rank_eight() {
        let dev = Device::emulator_with(EmuConfig {
            arch: 90,
            ..EmuConfig::default()
        });
        let t = Tensor::<bf16>::zeros(&dev, &[16, 16]).unwrap();
        let g = |rank| FusedGemm {
            orient: Orient::Nt,
            a: &t,
            b: &t,
            l: &t,
            r: &t,
            bias: None,
            m: 16,
            n: 16,
            k: 16,
            rank,
            scale: 1.0,
            dropout: None,
        };
        assert_eq!(obstacle(&g(0)).as_deref(), Some("the rank is 0"));
        assert_eq!(obstacle(&g(8)), None);
    }

    /// The width the busiest SM decides: (m, n, SMs, the tile's columns).
    #[test]
    fn tile_width_follows_the_busiest_sm() {
        for (m, n, sms, bn) in [
            (8192, 4096, 132, 256), // 1024 wide tiles: 8 on the busiest SM = 16 narrow ones' work
            (256, 4096, 132, 128),  // 32 wide tiles for 132 SMs
            (1024, 4096, 132, 256), // 128 wide tiles, 1 per SM, or 256 narrow, 2 on some: a tie
            (1536, 4096, 132, 128), // 192 wide, 2 on some SMs (4 narrow tiles' work), or 384 narrow, 3
            (8192, 100, 132, 128),  // n under 128: the wide tile would be half zeros
            (128, 256, 1, 256),     // one SM: narrow only where n mod 256 is 1..=128
            (128, 384, 1, 128),
            (128, 257, 1, 128),
            (128, 512, 1, 256),
            (300, 516, 9, 256),
            (300, 516, 3, 128),
            (1, 1, 0, 128), // no SMs counts as one
        ] {
            assert_eq!(
                super::sm90_tile(m, n, sms),
                (128, bn),
                "{m}×{n} on {sms} SMs"
            );
        }
    }
}
