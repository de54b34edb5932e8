//! DoRA's unmerged layer, forward and backward (kernels/dora.cu around the fused LoRA GEMM): what a
//! trainer of a `use_dora` adapter runs every step, and a server of an unmerged one.
//!
//! forward:  `factor = m / ‖W0 + s·B·A‖` per output feature (the DoRA merge's norm pass, W0 read once),
//!           `Z = X·W0ᵀ + s·(X·Aᵀ)·Bᵀ` ([`lora_forward_into`], no bias), `Y = factor ⊙ Z + bias`
//!           (one column pass). The norm is a constant for the gradients (DoRA's §4.3, as PEFT detaches it).
//! backward: `dZ = factor ⊙ dY` and `dm_j = Σ_i dY_ij·Z_ij / norm_j` in one pass over dY and Z, then
//!           [`lora_backward_into`] of dZ: dA, dB and dX as for plain LoRA. Never dW0.
//!
//! PEFT's `DoraLinearVariant.forward`, in the crate's arithmetic: the norm and factor in f32 as the
//! DoRA merge computes them ([`super::dora_factor`]), Z rounded to the layer dtype (it is saved for the
//! backward), then `round(fma(factor, Z, bias))`. PEFT computes the norm in the layer dtype in its
//! forward; the results differ by that rounding.
//!
//! With LoRA dropout (`Xd = dropout(X)`) PEFT's layer is `Y = X·W0ᵀ + bias + (f − 1) ⊙ (Xd·W0ᵀ) +
//! f ⊙ s·(Xd·Aᵀ)·Bᵀ`: W0 also runs on the dropped input. These ops compute the same sum regrouped,
//! `Y = f ⊙ Z + (1 − f) ⊙ D + bias` with `Z = X·W0ᵀ + s·(Xd·Aᵀ)·Bᵀ` (the LoRA forward with dropout) and
//! `D = (X − Xd)·W0ᵀ` (a plain GEMM of the dropout residual, rounded to the layer dtype as a dropped
//! activation is in PEFT), and save `Z − D = Xd·W0ᵀ + s·T·Bᵀ` (what f multiplies). The backward adds
//! `(X − Xd)`'s share of dX: `((1 − f) ⊙ dY)·W0` under the residual's mask. So dropout costs one GEMM
//! of W0 each way (as PEFT's two `F.linear`s do), an elementwise pass over X, and scratch (the
//! forward: Z, D and `X − Xd`; the backward: `(1 − f)·dY` and its product with W0).
//!
//! Cost over plain LoRA: the norm pass (a read of W0 with the rank product), the column pass of the
//! forward (a read of Z and a write of Y) and that of the backward (reads of dY and Z, a write of dZ);
//! Z [M, N] is kept for the backward (PEFT keeps two such tensors).
//!
//! [`lora_forward_into`]: super::lora_forward_into
//! [`lora_backward_into`]: super::lora_backward_into

use super::launch::Orient;
use super::launch::{self, u32_of};
use super::lora::{self, GradMode, layer_dims};
use super::merge::{self, check_rows};
use super::validate::{self, rows_of};
use super::workspace::Workspace;
use crate::device::Arg;
use crate::dropout::{Dropout, DropoutArg};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, kernels};
use crate::params::{
    LK_DORA_ROWS, LK_SIMT_THREADS, LkDoraColumnsParams, LkDoraMagnitudeGradParams,
    LkDropoutResidualParams,
};
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

/// What the DoRA backward needs from its forward besides X: T = X·Aᵀ `[..., r]`, Z = X·W0ᵀ + s·T·Bᵀ
/// `[..., N]` (Y before the factors and the bias; with dropout `dropout(X)·W0ᵀ + s·T·Bᵀ`, T of the
/// dropped X: what the factors multiply), and per output feature the norm ‖W0 + s·B·A‖ and the
/// factor m / norm (`[N]` f32 each).
#[derive(Debug)]
pub struct DoraSaved<T: Element> {
    pub t: Tensor<T>,
    pub z: Tensor<T>,
    pub norm: Tensor<f32>,
    pub factor: Tensor<f32>,
}

impl<T: Element> DoraSaved<T> {
    /// Buffers for a layer call whose activations have leading dimensions `lead` (M = their product),
    /// `n` output features and rank `r`, on `x`'s device: for [`dora_forward_into`], so a training loop
    /// allocates them once.
    pub fn for_layer(x: &Tensor<T>, n: usize, r: usize) -> Result<Self> {
        let (lead, _, _) = validate::rows("DoraSaved::for_layer", "x", x)?;
        let dev = x.device();
        Ok(DoraSaved {
            t: Tensor::for_output(dev, &rows_of(&lead, r))?,
            z: Tensor::for_output(dev, &rows_of(&lead, n))?,
            norm: Tensor::for_output(dev, &[n])?,
            factor: Tensor::for_output(dev, &[n])?,
        })
    }
}

/// Y `[..., N]` and what the backward needs.
#[derive(Debug)]
pub struct DoraForwardOutput<T: Element> {
    pub y: Tensor<T>,
    pub saved: DoraSaved<T>,
}

/// dA, dB (adapters' dtype), the magnitude's gradient `[N]` f32 and, when asked for, dX.
#[derive(Debug)]
pub struct DoraGradients<T: Element, A: Element = T> {
    pub dx: Option<Tensor<T>>,
    pub da: Tensor<A>,
    pub db: Tensor<A>,
    pub dmagnitude: Tensor<f32>,
}

/// DoRA's layer `Y = factor ⊙ (X·W0ᵀ + s·(X·Aᵀ)·Bᵀ) + bias`, `factor = magnitude / ‖W0 + s·B·A‖` per
/// output feature (row of W0). X `[..., K]` bf16/f16, W0 `[N, K]`, A `[r, K]` and B `[N, r]` in X's dtype
/// or f32, magnitude `[N]` f32 (PEFT's `lora_magnitude_vector`), bias `[N]`. The norm pass is the
/// DoRA merge's, with its limit: N at most 4,194,240 (65535 blocks of 64 rows of W0).
pub fn dora_forward<T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    magnitude: &Tensor<f32>,
    bias: Option<&Tensor<T>>,
    scale: f32,
) -> Result<DoraForwardOutput<T>> {
    let s = layer_dims("dora_forward", x, w0, a, b)?;
    let mut y = Tensor::for_output(x.device(), &rows_of(&s.lead, s.d.n))?;
    let mut saved = DoraSaved::for_layer(x, s.d.n, s.d.r)?;
    let mut ws = Workspace::new();
    dora_forward_into(
        x,
        w0,
        a,
        b,
        magnitude,
        bias,
        scale,
        Dropout::NONE,
        &mut y,
        &mut saved,
        &mut ws,
    )?;
    Ok(DoraForwardOutput { y, saved })
}

/// [`dora_forward`] into existing `y` and `saved` (see [`DoraSaved::for_layer`]), scratch from `ws`,
/// with LoRA dropout: PEFT's DoRA layer with `lora_dropout` (module docs), `dropout` a [`Dropout`] or a
/// `&`[`DropoutSchedule`] as for [`lora_forward_into`](super::lora_forward_into); pass the same one
/// to [`dora_backward_into`]. Dropout adds a GEMM of W0 and scratch, all live at once: Z and D
/// (`[..., N]` each) and `X − dropout(X)` (`[..., K]`).
///
/// [`DropoutSchedule`]: crate::dropout::DropoutSchedule
#[allow(clippy::too_many_arguments)]
pub fn dora_forward_into<'d, T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    magnitude: &Tensor<f32>,
    bias: Option<&Tensor<T>>,
    scale: f32,
    dropout: impl Into<DropoutArg<'d>>,
    y: &mut Tensor<T>,
    saved: &mut DoraSaved<T>,
    ws: &mut Workspace<T>,
) -> Result<()> {
    const OP: &str = "dora_forward";
    let dropout = dropout.into();
    let s = layer_dims(OP, x, w0, a, b)?;
    let d = s.d;
    let dims = merge::check(OP, w0, a, b, scale)?;
    check_rows(OP, "magnitude", magnitude, w0, d.n)?;
    if let Some(bias) = bias {
        validate::shape(OP, "bias", bias, &[d.n], "[N]")?;
    }
    let lead = "[..., N] (x's leading dimensions)";
    validate::rows_shape(OP, "y", y, &s.lead, d.n, lead)?;
    check_saved(OP, saved, &s, w0)?;
    let mut devices = vec![
        ("w0", w0.device()),
        ("a", a.device()),
        ("b", b.device()),
        ("y", y.device()),
        ("saved.t", saved.t.device()),
        ("saved.z", saved.z.device()),
    ];
    if let Some(bias) = bias {
        devices.push(("bias", bias.device()));
    }
    validate::same_device(OP, ("x", x.device()), &devices)?;
    lora::check_dropout(OP, x, &dropout)?;
    // the norm pass writes saved.norm and saved.factor: no environment knob may refuse the GEMM after it
    launch::check_kernel_choices(OP)?;

    let blocks = launch::dora_sumsq_blocks(d.k);
    ws.with_partial(x.device(), &[blocks, d.n], |sumsq, _| {
        launch::dora_row_sumsq(OP, w0, a, b, dims, scale, sumsq)?;
        launch::dora_factor(
            OP,
            sumsq,
            magnitude,
            &mut saved.factor,
            Some(&mut saved.norm),
            (d.n, blocks),
        )
    })?;
    if !dropout.is_active() {
        lora::lora_forward_into(
            x,
            w0,
            a,
            b,
            None,
            scale,
            dropout,
            &mut saved.z,
            &mut saved.t,
            ws,
        )?;
        let pass = Columns::Scale {
            bias,
            residual: None,
        };
        return columns(
            OP,
            pass,
            &saved.z,
            &saved.factor,
            y,
            (d.m, d.n),
            MAX_COLUMN_BLOCKS,
        );
    }
    // Z = X·W0ᵀ + s·(Xd·Aᵀ)·Bᵀ and D = (X − Xd)·W0ᵀ in scratch; Y and Z − D from them
    let dev = x.device();
    let mn = rows_of(&s.lead, d.n);
    ws.with_layer(dev, &mn, |z, ws| {
        lora::lora_forward_into(x, w0, a, b, None, scale, dropout, z, &mut saved.t, ws)?;
        ws.with_layer(dev, &mn, |dres, ws| {
            ws.with_layer(dev, &rows_of(&s.lead, d.k), |xres, _| {
                dropout_residual(OP, x, dropout, xres, false, MAX_RESIDUAL_BLOCKS)?;
                launch::plain_gemm(OP, Orient::Nt, xres, w0, dres, (d.m, d.n, d.k))
            })?;
            let pass = Columns::Scale {
                bias,
                residual: Some((dres, &mut saved.z)),
            };
            columns(OP, pass, z, &saved.factor, y, (d.m, d.n), MAX_COLUMN_BLOCKS)
        })
    })
}

/// Gradients of [`dora_forward`] given dY `[..., N]` and its `saved`: dA, dB, the magnitude's (`[N]`
/// f32) and, if `want_dx`, dX `[..., K]`. The norm is a constant (detached, as in DoRA and PEFT).
#[allow(clippy::too_many_arguments)]
pub fn dora_backward<T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    saved: &DoraSaved<T>,
    dy: &Tensor<T>,
    scale: f32,
    want_dx: bool,
) -> Result<DoraGradients<T, A>> {
    let s = layer_dims("dora_backward", x, w0, a, b)?;
    let d = s.d;
    let dev = x.device();
    let mut dx = if want_dx {
        Some(Tensor::for_output(dev, &rows_of(&s.lead, d.k))?)
    } else {
        None
    };
    let mut da = Tensor::for_output(dev, &[d.r, d.k])?;
    let mut db = Tensor::for_output(dev, &[d.n, d.r])?;
    let mut dmagnitude = Tensor::for_output(dev, &[d.n])?;
    dora_backward_into(
        x,
        w0,
        a,
        b,
        saved,
        dy,
        scale,
        Dropout::NONE,
        dx.as_mut(),
        &mut da,
        &mut db,
        &mut dmagnitude,
        GradMode::Overwrite,
        &mut Workspace::new(),
    )?;
    Ok(DoraGradients {
        dx,
        da,
        db,
        dmagnitude,
    })
}

/// [`dora_backward`] into existing `dx` (or none), `da` `[r, K]`, `db` `[N, r]`, `dmagnitude` `[N]` f32,
/// scratch (dZ, the partial sums, U) from `ws`. With [`GradMode::Accumulate`] dA, dB and the magnitude's
/// gradient are added to (micro-batches); dX is always overwritten. `dropout` must be the forward's
/// ([`dora_forward_into`]); with dropout and dX, one more GEMM of W0 (the residual's share of dX) and
/// scratch of `(1 − f)·dY` (`[..., N]`) and its product with W0 (`[..., K]`).
#[allow(clippy::too_many_arguments)]
pub fn dora_backward_into<'d, T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    saved: &DoraSaved<T>,
    dy: &Tensor<T>,
    scale: f32,
    dropout: impl Into<DropoutArg<'d>>,
    dx: Option<&mut Tensor<T>>,
    da: &mut Tensor<A>,
    db: &mut Tensor<A>,
    dmagnitude: &mut Tensor<f32>,
    mode: GradMode,
    ws: &mut Workspace<T>,
) -> Result<()> {
    const OP: &str = "dora_backward";
    let dropout = dropout.into();
    let s = layer_dims(OP, x, w0, a, b)?;
    let d = s.d;
    let lead = "[..., N] (x's leading dimensions)";
    validate::rows_shape(OP, "dy", dy, &s.lead, d.n, lead)?;
    check_saved(OP, saved, &s, w0)?;
    check_rows(OP, "dmagnitude", dmagnitude, w0, d.n)?;
    validate::finite(OP, "scale", scale)?;
    validate::shape(OP, "da", da, &[d.r, d.k], "[r, K]")?;
    validate::shape(OP, "db", db, &[d.n, d.r], "[N, r]")?;
    if let Some(dx) = dx.as_deref() {
        validate::rows_shape(
            OP,
            "dx",
            dx,
            &s.lead,
            d.k,
            "[..., K] (x's leading dimensions)",
        )?;
    }
    let mut devices = vec![
        ("w0", w0.device()),
        ("a", a.device()),
        ("b", b.device()),
        ("dy", dy.device()),
        ("saved.t", saved.t.device()),
        ("saved.z", saved.z.device()),
        ("da", da.device()),
        ("db", db.device()),
    ];
    if let Some(dx) = dx.as_deref() {
        devices.push(("dx", dx.device()));
    }
    validate::same_device(OP, ("x", x.device()), &devices)?;
    lora::check_dropout(OP, x, &dropout)?;

    // dZ and the partials of dm first, then the LoRA backward of dZ, and dm last (the one gradient
    // this op adds to in place besides dA and dB). With dropout and dX, the grad pass also writes
    // (1 − f) ⊙ dY, and dX gains its product with W0 under the residual's mask.
    let row_blocks = d.m.div_ceil(LK_DORA_ROWS as usize);
    let dev = x.device();
    let mn = rows_of(&s.lead, d.n);
    let mut dx = dx;
    ws.with_layer(dev, &mn, |dz, ws| {
        ws.with_partial(dev, &[row_blocks, d.n], |partials, ws| {
            let mut lora_backward =
                |dz: &Tensor<T>, dx: Option<&mut Tensor<T>>, ws: &mut Workspace<T>| {
                    lora::lora_backward_into(
                        x, w0, a, b, &saved.t, dz, scale, dropout, dx, da, db, mode, ws,
                    )
                };
            // dZ ← round(f·dY) and dm's partial sums (and, for dX with dropout, (1 − f)·dY)
            let grad_pass = |dz: &mut Tensor<T>,
                             partials: &mut Tensor<f32>,
                             aux: Option<&mut Tensor<T>>|
             -> Result<()> {
                let pass = Columns::Grad { dy, partials, aux };
                let dims = (d.m, d.n);
                columns(
                    OP,
                    pass,
                    &saved.z,
                    &saved.factor,
                    dz,
                    dims,
                    MAX_COLUMN_BLOCKS,
                )
            };
            match dx.as_deref_mut().filter(|_| dropout.is_active()) {
                None => {
                    grad_pass(dz, partials, None)?;
                    lora_backward(dz, dx, ws)?;
                }
                Some(dx) => ws.with_layer(dev, &mn, |drest, ws| {
                    grad_pass(dz, partials, Some(&mut *drest))?;
                    lora_backward(dz, Some(&mut *dx), ws)?;
                    ws.with_layer(dev, &rows_of(&s.lead, d.k), |g, _| {
                        launch::plain_gemm(OP, Orient::Nn, drest, w0, g, (d.m, d.k, d.n))?;
                        dropout_residual(OP, g, dropout, dx, true, MAX_RESIDUAL_BLOCKS)
                    })
                })?,
            }
            magnitude_grad(
                OP,
                partials,
                &saved.norm,
                dmagnitude,
                (d.n, row_blocks),
                mode == GradMode::Accumulate,
            )
        })
    })
}

/// `saved` fits the layer call `s`: Z `[..., N]`, T `[..., r]` or `[M, r]`, norms and factors `[N]` on
/// W0's device (the forward writes them, the backward reads them: one check for both).
fn check_saved<T: Element>(
    op: &'static str,
    saved: &DoraSaved<T>,
    s: &lora::LayerShape,
    w0: &Tensor<T>,
) -> Result<()> {
    let lead = "[..., N] (x's leading dimensions)";
    validate::rows_shape(op, "saved.z", &saved.z, &s.lead, s.d.n, lead)?;
    lora::check_t(
        op,
        &saved.t,
        s,
        "[..., r] (x's leading dimensions) or [M, r]",
    )?;
    check_rows(op, "saved.norm", &saved.norm, w0, s.d.n)?;
    check_rows(op, "saved.factor", &saved.factor, w0, s.d.n)
}

/// Which column pass of kernels/dora.cu.
enum Columns<'a, T: Element> {
    /// `out = Y ← round(fma(factor, Z, bias))`; with dropout's `residual` (D, and where Z − D goes),
    /// `Y ← round(fma(factor, Z, fma(1 − factor, D, bias)))`.
    Scale {
        bias: Option<&'a Tensor<T>>,
        residual: Option<(&'a Tensor<T>, &'a mut Tensor<T>)>,
    },
    /// `out = dZ ← round(factor·dY)`, and the row blocks' sums of dY·Z into `partials`; `aux` (with
    /// dropout, for dX) `← round((1 − factor)·dY)`.
    Grad {
        dy: &'a Tensor<T>,
        partials: &'a mut Tensor<f32>,
        aux: Option<&'a mut Tensor<T>>,
    },
}

fn columns_kernel(
    op: &'static str,
    dtype: DType,
    grad: bool,
) -> Result<&'static Kernel<LkDoraColumnsParams>> {
    Ok(match (dtype, grad) {
        (DType::BF16, false) => &kernels::DORA_SCALE_BF16,
        (DType::F16, false) => &kernels::DORA_SCALE_F16,
        (DType::BF16, true) => &kernels::DORA_GRAD_BF16,
        (DType::F16, true) => &kernels::DORA_GRAD_F16,
        (got, _) => {
            return Err(Error::UnsupportedDType {
                op,
                arg: "x",
                got,
                supported: "bf16 and f16",
            });
        }
    })
}

/// The grid's y limit: the column passes stride over more column blocks than this.
const MAX_COLUMN_BLOCKS: usize = 65535;

/// One column pass over the m × n matrices: grid x over the row blocks, y over the column blocks (at most
/// `max_col_blocks`, the kernel strides past them; [`MAX_COLUMN_BLOCKS`] but in the test of that stride).
fn columns<T: Element>(
    op: &'static str,
    pass: Columns<'_, T>,
    z: &Tensor<T>,
    factor: &Tensor<f32>,
    out: &mut Tensor<T>,
    (m, n): (usize, usize),
    max_col_blocks: usize,
) -> Result<()> {
    let col_blocks = n.div_ceil(LK_SIMT_THREADS as usize).min(max_col_blocks);
    let plan = LaunchPlan {
        grid: [
            u32_of(m.div_ceil(LK_DORA_ROWS as usize)),
            u32_of(col_blocks),
            1,
        ],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let grad = matches!(pass, Columns::Grad { .. });
    let kernel = columns_kernel(op, T::DTYPE, grad)?;
    let mut args = vec![Arg::In("z", z), Arg::In("factor", factor)];
    // argument indices of the optional pointers (after z, factor, out)
    let (mut bias_at, mut residual_at, mut aux_at) = (None, None, None);
    match pass {
        Columns::Scale { bias, residual } => {
            args.push(Arg::Out("y", out));
            if let Some(bias) = bias {
                bias_at = Some(args.len());
                args.push(Arg::In("bias", bias));
            }
            if let Some((d, zd)) = residual {
                residual_at = Some(args.len());
                args.push(Arg::In("dropout residual (X − dropout(X))·W0ᵀ", d));
                aux_at = Some(args.len());
                args.push(Arg::Out("saved.z", zd));
            }
        }
        Columns::Grad { dy, partials, aux } => {
            args.push(Arg::Out("dz", out));
            args.push(Arg::In("dy", dy));
            args.push(Arg::Out("partials", partials));
            if let Some(aux) = aux {
                aux_at = Some(args.len());
                args.push(Arg::Out("(1 − factor)·dY", aux));
            }
        }
    };
    let device = z.device().clone();
    device.launch(op, kernel, &plan, &mut args, |ptr| {
        let at = |i: Option<usize>| i.map_or(std::ptr::null_mut(), |i| ptr[i] as *mut _);
        let mut p = LkDoraColumnsParams {
            z: ptr[0] as *const _,
            dy: std::ptr::null(),
            bias: at(bias_at),
            factor: ptr[1] as *const f32,
            out: ptr[2] as *mut _,
            partials: std::ptr::null_mut(),
            residual: at(residual_at),
            aux: at(aux_at),
            m: u32_of(m),
            n: u32_of(n),
        };
        if grad {
            p.dy = ptr[3] as *const _;
            p.partials = ptr[4] as *mut f32;
        }
        p
    })
}

/// The residual pass's grid: it strides past this many blocks of 4·LK_SIMT_THREADS elements.
const MAX_RESIDUAL_BLOCKS: usize = 1 << 16;

/// `out ← round(c ⊙ x)`, or `round(out + c ⊙ x)` when `accumulate`, with c = 1 where `dropout` drops an
/// element and `1 − 1/(1 − p)` where it keeps one: `x − dropout(x)` (x and out dense, of the mask's
/// element indices: X `[..., K]`, or dX's term).
fn dropout_residual<T: Element>(
    op: &'static str,
    x: &Tensor<T>,
    dropout: DropoutArg<'_>,
    out: &mut Tensor<T>,
    accumulate: bool,
    max_blocks: usize,
) -> Result<()> {
    let kernel = match T::DTYPE {
        DType::BF16 => &kernels::DROPOUT_RESIDUAL_BF16,
        DType::F16 => &kernels::DROPOUT_RESIDUAL_F16,
        got => {
            return Err(Error::UnsupportedDType {
                op,
                arg: "x",
                got,
                supported: "bf16 and f16",
            });
        }
    };
    let count = x.numel();
    // one thread per 4 elements; the kernel strides past `max_blocks`
    let blocks = count
        .div_ceil(4 * LK_SIMT_THREADS as usize)
        .clamp(1, max_blocks);
    let plan = LaunchPlan {
        grid: [u32_of(blocks), 1, 1],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let keep_residual = (1.0 - dropout.dropout().keep_scale()) as f32;
    let mut args = vec![Arg::In("x", x), Arg::Out("out", out)];
    let offset_index = dropout.offset_buffer().map(|b| {
        args.push(Arg::In("dropout offset", b));
        args.len() - 1
    });
    let device = x.device().clone();
    device.launch(op, kernel, &plan, &mut args, |ptr| {
        LkDropoutResidualParams {
            x: ptr[0] as *const _,
            out: ptr[1] as *mut _,
            count: count as u64,
            dropout: dropout.params(offset_index.map(|i| ptr[i])),
            keep_residual,
            accumulate: accumulate as u32,
        }
    })
}

/// `dmagnitude [n] ← Σ_b partials[b, ..] / norm` (+ the old value when accumulating).
fn magnitude_grad(
    op: &'static str,
    partials: &Tensor<f32>,
    norm: &Tensor<f32>,
    dmagnitude: &mut Tensor<f32>,
    (n, blocks): (usize, usize),
    accumulate: bool,
) -> Result<()> {
    let plan = LaunchPlan {
        grid: [u32_of(n.div_ceil(LK_SIMT_THREADS as usize)), 1, 1],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let device = norm.device().clone();
    device.launch(
        op,
        &kernels::DORA_MAGNITUDE_GRAD_F32,
        &plan,
        &mut [
            Arg::In("partials", partials),
            Arg::In("norm", norm),
            Arg::Out("dmagnitude", dmagnitude),
        ],
        |ptr| LkDoraMagnitudeGradParams {
            partials: ptr[0] as *const f32,
            norm: ptr[1] as *const f32,
            dmagnitude: ptr[2] as *mut f32,
            n: u32_of(n),
            blocks: u32_of(blocks),
            accumulate: accumulate as u32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use half::bf16;

    /// The column passes with the grid's y capped at 1 and 2 blocks (the kernel striding over the other
    /// column blocks, as past 65535 blocks) write every element with the uncapped grid's bits.
    #[test]
    fn column_passes_stride_past_the_grid() {
        let dev = Device::emulator();
        let (m, n) = (70, 600); // 2 row blocks, 3 column blocks (the last ragged)
        let vals = |len: usize, seed: u32| -> Vec<bf16> {
            (0..len)
                .map(|i| {
                    bf16::from_f32(
                        (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0,
                    )
                })
                .collect()
        };
        let z = Tensor::from_slice(&dev, &vals(m * n, 1), &[m, n]).unwrap();
        let dy = Tensor::from_slice(&dev, &vals(m * n, 2), &[m, n]).unwrap();
        let bias = Tensor::from_slice(&dev, &vals(n, 3), &[n]).unwrap();
        let f: Vec<f32> = vals(n, 4).iter().map(|v| v.to_f32() + 1.5).collect();
        let factor = Tensor::from_slice(&dev, &f, &[n]).unwrap();
        let run = |cap: usize| {
            let mut y = Tensor::<bf16>::for_output(&dev, &[m, n]).unwrap();
            let pass = Columns::Scale {
                bias: Some(&bias),
                residual: None,
            };
            columns("test", pass, &z, &factor, &mut y, (m, n), cap).unwrap();
            let mut dz = Tensor::<bf16>::for_output(&dev, &[m, n]).unwrap();
            let mut partials = Tensor::<f32>::for_output(&dev, &[2, n]).unwrap();
            let pass = Columns::Grad {
                dy: &dy,
                partials: &mut partials,
                aux: None,
            };
            columns("test", pass, &z, &factor, &mut dz, (m, n), cap).unwrap();
            let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let p: Vec<u32> = partials
                .to_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (bits(y.to_vec().unwrap()), bits(dz.to_vec().unwrap()), p)
        };
        let want = run(MAX_COLUMN_BLOCKS);
        assert!(want.2.iter().all(|b| f32::from_bits(*b).is_finite()));
        for cap in [1, 2] {
            assert!(run(cap) == want, "grid y capped at {cap}");
        }

        // with dropout's residual: the scale pass's D and Z − D, the grad pass's (1 − f)·dY
        let d = Tensor::from_slice(&dev, &vals(m * n, 5), &[m, n]).unwrap();
        let run_dropout = |cap: usize| {
            let mut y = Tensor::<bf16>::for_output(&dev, &[m, n]).unwrap();
            let mut zd = Tensor::<bf16>::for_output(&dev, &[m, n]).unwrap();
            let pass = Columns::Scale {
                bias: Some(&bias),
                residual: Some((&d, &mut zd)),
            };
            columns("test", pass, &z, &factor, &mut y, (m, n), cap).unwrap();
            let mut dz = Tensor::<bf16>::for_output(&dev, &[m, n]).unwrap();
            let mut rest = Tensor::<bf16>::for_output(&dev, &[m, n]).unwrap();
            let mut partials = Tensor::<f32>::for_output(&dev, &[2, n]).unwrap();
            let pass = Columns::Grad {
                dy: &dy,
                partials: &mut partials,
                aux: Some(&mut rest),
            };
            columns("test", pass, &z, &factor, &mut dz, (m, n), cap).unwrap();
            let bits = |t: &Tensor<bf16>| -> Vec<u16> {
                t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect()
            };
            [bits(&y), bits(&zd), bits(&dz), bits(&rest)]
        };
        let want = run_dropout(MAX_COLUMN_BLOCKS);
        for cap in [1, 2] {
            assert!(
                run_dropout(cap) == want,
                "with dropout, grid y capped at {cap}"
            );
        }
    }

    /// The dropout residual pass with its grid capped at 1 and 2 blocks (striding, as past
    /// MAX_RESIDUAL_BLOCKS) writes every element with the uncapped grid's bits, overwriting and
    /// accumulating, and is x − dropout(x) element by element.
    #[test]
    fn dropout_residual_strides_past_the_grid() {
        let dev = Device::emulator();
        let count = 3 * 4 * LK_SIMT_THREADS as usize + 5; // 4 blocks uncapped, a ragged last group
        let xs: Vec<bf16> = (0..count)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 250.0 - 2.0))
            .collect();
        let x = Tensor::from_slice(&dev, &xs, &[count]).unwrap();
        let drop = Dropout::new(0.3, 11, 4).unwrap();
        let run = |cap: usize, accumulate: bool| {
            let mut out = Tensor::from_slice(&dev, &vec![bf16::ONE; count], &[count]).unwrap();
            dropout_residual("test", &x, drop.into(), &mut out, accumulate, cap).unwrap();
            out.to_vec().unwrap()
        };
        for accumulate in [false, true] {
            let want = run(MAX_RESIDUAL_BLOCKS, accumulate);
            for (e, (got, v)) in want.iter().zip(&xs).enumerate() {
                let c = if drop.keeps(e as u64) {
                    (1.0 - drop.keep_scale()) as f32
                } else {
                    1.0
                };
                // out = 1 before an accumulating call; a plain one multiplies only (−0 stays −0)
                let exact = bf16::from_f32(if accumulate {
                    c.mul_add(v.to_f32(), 1.0)
                } else {
                    c * v.to_f32()
                });
                assert_eq!(
                    got.to_bits(),
                    exact.to_bits(),
                    "[{e}] accumulate {accumulate}"
                );
            }
            for cap in [1, 2] {
                assert!(
                    run(cap, accumulate) == want,
                    "capped at {cap}, accumulate {accumulate}"
                );
            }
        }
    }
}
