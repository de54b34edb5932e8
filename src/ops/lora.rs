//! The LoRA forward and backward over [`Tensor`]s (kernels/fused_gemm.cu, small_m.cu,
//! lowrank_grad.cu, lowrank_finalize.cu). Every argument is validated before the first launch.
//!
//! forward:  `T = X·Aᵀ`, `Y = X·W0ᵀ + s·T·Bᵀ (+ bias)`: T on the tensor-core GEMM (N = r; at most 128
//!           rows over several 1024-column K chunks without dropout: the small-batch shrink of
//!           kernels/multi_decode.cu), then ONE fused GEMM; for M ≤ 16 with adapters in the layer dtype
//!           and no dropout the small-M kernel instead, which streams W0 once and computes T from the
//!           same X on the way (then a small finalize launch). On sm_90 under `LK_FUSED_GEMM=auto` or
//!           `sm90` the sm_90a GEMM (ops/sm90.rs: T inside it up to rank 32).
//! backward: `U = dY·B` and `dB = s·dYᵀ·T` in one pass over dY, `dA = s·Uᵀ·X` in one over X, then
//!           `dX = dY·W0 + s·U·A` (optional) on the fused GEMM: dY is read twice, X once. Never dW0.
//!
//! Adapters (A, B, and so dA, dB) are in the layer dtype or in f32 (PEFT's f32 master adapters over a
//! bf16/f16 base): the kernels read f32 A and B as f32 and round them once to the layer dtype where
//! they enter the tensor cores, and write f32 dA, dB. The `_into` forms also take a [`Dropout`] on the
//! adapter input (PEFT's `lora_dropout`); [`Dropout::NONE`] is the plain path, bit for bit.

use super::launch::{self, FusedGemm, MaskAt, Orient, PLayout, same_dtype};
use super::validate::{self, rows_of};
use super::workspace::Workspace;
use crate::dropout::{Dropout, DropoutArg};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::params::LK_SMALL_M_MAX;
use crate::reference::Dims;
use crate::tensor::Tensor;

/// Y and the saved `T = X·Aᵀ` (M×r), which is all the backward needs besides X.
#[derive(Debug)]
pub struct ForwardOutput<T: Element> {
    pub y: Tensor<T>,
    pub t: Tensor<T>,
}

/// dA (r×K), dB (N×r) in the adapters' dtype `A` and, when asked for, dX (M×K) in the layer's.
#[derive(Debug)]
pub struct Gradients<T: Element, A: Element = T> {
    pub dx: Option<Tensor<T>>,
    pub da: Tensor<A>,
    pub db: Tensor<A>,
}

/// What the backward does with the dA and dB it is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradMode {
    /// Overwrite them; their contents are never read.
    #[default]
    Overwrite,
    /// Add this call's gradients to them (gradient accumulation over micro-batches): the old value
    /// plus the new sum in f32, one rounding to the gradient's dtype, so micro-batches need no extra
    /// buffer or pass.
    Accumulate,
}

/// The shape of a layer call: [`Dims`] with M = the product of the activations' leading dimensions
/// (`lead`: X is [lead..., K], Y and dY [lead..., N], dX [lead..., K], T [lead..., r] or [M, r]).
#[derive(Clone, Debug)]
pub(crate) struct LayerShape {
    pub d: Dims,
    pub lead: Vec<usize>,
}

/// The layer's base operands, shared by every forward: X [..., K] (any number of leading dimensions,
/// M = their product) in bf16/f16, W0 [N, K], adapters of dtype `A` (X's or f32). Returns (leading
/// dimensions, M, N, K).
pub(crate) fn base_dims<T: Element, A: Element>(
    op: &'static str,
    x: &Tensor<T>,
    w0: &Tensor<T>,
) -> Result<(Vec<usize>, usize, usize, usize)> {
    validate::half_dtype(op, "x", T::DTYPE)?;
    launch::check_pair(op, T::DTYPE, A::DTYPE)?;
    let (lead, m, k) = validate::rows(op, "x", x)?;
    let (n, k_w) = validate::matrix(op, "w0", w0, "[N, K]")?;
    if k_w != k {
        return Err(Error::Shape {
            op,
            arg: "w0",
            expected: format!("[N, K] with K = {k} (the columns of x)"),
            got: w0.shape().to_vec(),
        });
    }
    Ok((lead, m, n, k))
}

/// The layer's sizes within the kernels' 32-bit arithmetic: M, N and K each at most
/// [`validate::MAX_DIM`] (tile counts such as `(m + 127) / 128` are u32), and the element count of the
/// operands and outputs the kernels index or finalize as a whole at most `u32::MAX`: X and dX (M·K), W0
/// (N·K), T and U (M·r), A and dA (r·K), B and dB (N·r), where `r` is the rank (the largest rank of a set
/// of adapters). Y (M·N) may be larger: its rows are addressed in 64 bits.
pub(crate) fn base_sizes_fit(
    op: &'static str,
    (m, n, k): (usize, usize, usize),
    r: usize,
) -> Result<()> {
    for (arg, v) in [
        ("M (rows of x)", m),
        ("N (rows of w0)", n),
        ("K (columns of x)", k),
    ] {
        validate::at_most(op, arg, v, validate::MAX_DIM)?;
    }
    // each factor is below 2^31 (r below 2^8): no product overflows
    for (arg, v) in [
        ("x", m * k),
        ("w0", n * k),
        ("t (M·r)", m * r),
        ("a (r·K)", r * k),
        ("b (N·r)", n * r),
    ] {
        validate::fits_u32(op, arg, v)?;
    }
    Ok(())
}

/// Checks X [..., K] (any number of leading dimensions, M = their product), W0 [N, K], A [r, K],
/// B [N, r], dtype bf16/f16, adapters in that dtype or f32, 1 ≤ r ≤ 128, sizes within u32.
pub(crate) fn layer_dims<T: Element, A: Element>(
    op: &'static str,
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
) -> Result<LayerShape> {
    let (lead, m, n, k) = base_dims::<T, A>(op, x, w0)?;
    let r = validate::adapter(op, a, b, (n, k), "the columns of x")?;
    base_sizes_fit(op, (m, n, k), r)?;
    Ok(LayerShape {
        d: Dims { m, n, k, r },
        lead,
    })
}

/// T as the forward writes it ([lead..., r]) or as a plain matrix [M, r].
pub(super) fn check_t<T: Element>(
    op: &'static str,
    t: &Tensor<T>,
    s: &LayerShape,
    what: &str,
) -> Result<()> {
    if t.shape() == [s.d.m, s.d.r] {
        return Ok(());
    }
    validate::rows_shape(op, "t", t, &s.lead, s.d.r, what)
}

/// `Y = X·W0ᵀ + s·(X·Aᵀ)·Bᵀ (+ bias)` for X [..., K] (any leading dimensions, M rows); returns Y
/// [..., N] and T [..., r]. A and B in X's dtype or f32. No dropout ([`lora_forward_into`] takes one).
pub fn lora_forward<T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    bias: Option<&Tensor<T>>,
    scale: f32,
) -> Result<ForwardOutput<T>> {
    let s = layer_dims("lora_forward", x, w0, a, b)?;
    let mut y = Tensor::for_output(x.device(), &rows_of(&s.lead, s.d.n))?;
    let mut t = Tensor::for_output(x.device(), &rows_of(&s.lead, s.d.r))?;
    lora_forward_into(
        x,
        w0,
        a,
        b,
        bias,
        scale,
        Dropout::NONE,
        &mut y,
        &mut t,
        &mut Workspace::new(),
    )?;
    Ok(ForwardOutput { y, t })
}

/// [`lora_forward`] into existing `y` [..., N] and `t` [..., r] (or [M, r]), with scratch memory from
/// `ws`: for callers that reuse buffers (a training loop allocates nothing per step), and with LoRA
/// dropout on the adapter input: `T = dropout(X)·Aᵀ` (pass the same `dropout` to the backward).
/// `dropout` is a [`Dropout`] or a `&`[`DropoutSchedule`] (the offset read from device memory: for
/// graphs, see [`crate::Device::capture`]).
///
/// [`DropoutSchedule`]: crate::dropout::DropoutSchedule
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_into<'d, T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    bias: Option<&Tensor<T>>,
    scale: f32,
    dropout: impl Into<DropoutArg<'d>>,
    y: &mut Tensor<T>,
    t: &mut Tensor<T>,
    ws: &mut Workspace<T>,
) -> Result<()> {
    const OP: &str = "lora_forward";
    let dropout = dropout.into();
    let s = layer_dims(OP, x, w0, a, b)?;
    let d = s.d;
    if let Some(bias) = bias {
        validate::shape(OP, "bias", bias, &[d.n], "[N]")?;
    }
    validate::finite(OP, "scale", scale)?;
    validate::rows_shape(
        OP,
        "y",
        y,
        &s.lead,
        d.n,
        "[..., N] (x's leading dimensions)",
    )?;
    check_t(OP, t, &s, "[..., r] (x's leading dimensions) or [M, r]")?;
    let mut devices = vec![
        ("w0", w0.device()),
        ("a", a.device()),
        ("b", b.device()),
        ("y", y.device()),
        ("t", t.device()),
    ];
    if let Some(bias) = bias {
        devices.push(("bias", bias.device()));
    }
    validate::same_device(OP, ("x", x.device()), &devices)?;
    // The small-M kernel streams [W0; A] in the layer dtype with one X: adapters in the layer dtype, no
    // dropout. Otherwise (f32 adapters, dropout) small M takes the general path.
    check_dropout(OP, x, &dropout)?;
    if d.m <= LK_SMALL_M_MAX as usize && A::DTYPE == T::DTYPE && !dropout.is_active() {
        let (a, b) = (same_dtype::<A, T>(a)?, same_dtype::<A, T>(b)?);
        return launch::small_m(OP, x, w0, a, b, bias, y, t, (d.m, d.n, d.k, d.r), scale, ws);
    }
    // On sm_90 (opt-in, ops/sm90.rs): T inside the GEMM, one launch, where the Hopper kernel takes it.
    let dims = (d.m, d.n, d.k, d.r);
    if !dropout.is_active()
        && super::sm90::try_forward_with_t(OP, x, w0, a, b, bias, scale, y, t, dims)?
    {
        return Ok(());
    }
    launch::project(OP, x, a, t, (d.m, d.k, d.r), dropout, ws)?;
    let g = FusedGemm {
        orient: Orient::Nt,
        a: x,
        b: w0,
        l: t,
        r: b,
        bias,
        m: d.m,
        n: d.n,
        k: d.k,
        rank: d.r,
        scale,
        dropout: None,
    };
    launch::fused_gemm(OP, &g, y, None)
}

/// Gradients of the layer given dY [..., N] and the forward's T: dA, dB (in the adapters' dtype) and
/// (if `want_dx`) dX [..., K]. No dropout ([`lora_backward_into`] takes one).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    t: &Tensor<T>,
    dy: &Tensor<T>,
    scale: f32,
    want_dx: bool,
) -> Result<Gradients<T, A>> {
    let s = layer_dims("lora_backward", x, w0, a, b)?;
    let d = s.d;
    let dev = x.device();
    let mut dx = if want_dx {
        Some(Tensor::for_output(dev, &rows_of(&s.lead, d.k))?)
    } else {
        None
    };
    let mut da = Tensor::for_output(dev, &[d.r, d.k])?;
    let mut db = Tensor::for_output(dev, &[d.n, d.r])?;
    let mut ws = Workspace::new();
    lora_backward_into(
        x,
        w0,
        a,
        b,
        t,
        dy,
        scale,
        Dropout::NONE,
        dx.as_mut(),
        &mut da,
        &mut db,
        GradMode::Overwrite,
        &mut ws,
    )?;
    Ok(Gradients { dx, da, db })
}

/// [`lora_backward`] into existing `dx` [..., K] (or none), `da` [r, K], `db` [N, r], with scratch memory
/// (U and the gradients' partial sums) from `ws`. With [`GradMode::Accumulate`] dA and dB are added to
/// (micro-batches), dX is always overwritten. `dropout` must be the forward's: `dA = s·Uᵀ·dropout(X)`,
/// `dX = dY·W0 + s·(U·A) ⊙ mask / (1 − p)` (dB needs none: the forward's T has it).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_into<'d, T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    a: &Tensor<A>,
    b: &Tensor<A>,
    t: &Tensor<T>,
    dy: &Tensor<T>,
    scale: f32,
    dropout: impl Into<DropoutArg<'d>>,
    dx: Option<&mut Tensor<T>>,
    da: &mut Tensor<A>,
    db: &mut Tensor<A>,
    mode: GradMode,
    ws: &mut Workspace<T>,
) -> Result<()> {
    const OP: &str = "lora_backward";
    let dropout = dropout.into();
    let s = layer_dims(OP, x, w0, a, b)?;
    let d = s.d;
    check_t(OP, t, &s, "[..., r] or [M, r] (the forward's T)")?;
    validate::rows_shape(
        OP,
        "dy",
        dy,
        &s.lead,
        d.n,
        "[..., N] (x's leading dimensions)",
    )?;
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
        ("t", t.device()),
        ("dy", dy.device()),
        ("da", da.device()),
        ("db", db.device()),
    ];
    if let Some(dx) = dx.as_deref() {
        devices.push(("dx", dx.device()));
    }
    // every operand first: the launches would find a mismatch one at a time, dB written before dA's
    validate::same_device(OP, ("x", x.device()), &devices)?;
    let acc = mode == GradMode::Accumulate;
    // dA and dX see the mask; the kept elements' 1/(1 − p) joins their scale (one f32 rounding of s/(1 − p))
    check_dropout(OP, x, &dropout)?;
    let (mask, masked_scale) = if dropout.is_active() {
        let s_eff = (scale as f64 * dropout.dropout().keep_scale()) as f32;
        validate::finite(OP, "scale / (1 - p)", s_eff)?;
        (Some(dropout), s_eff)
    } else {
        (None, scale)
    };
    // On sm_90 (opt-in, ops/sm90.rs): dX, U = dY·B and dB's and dA's partials in one launch where the Hopper
    // kernel takes it (ranks up to 32, no dropout), then their finalizes, U never leaving the kernel;
    // otherwise one pass over dY for dB and U (kernels/lowrank_grad.cu), one over X for dA, and dX after.
    let mut dx = dx;
    if let Some(dx) = dx.as_deref_mut()
        && mask.is_none()
        && super::sm90::try_dx_with_u(
            OP,
            dy,
            w0,
            a,
            b,
            scale,
            dx,
            super::sm90::Grads {
                t,
                x,
                db: &mut *db,
                da: &mut *da,
                accumulate: acc,
            },
            (d.m, d.n, d.k, d.r),
            ws,
        )?
    {
        return Ok(()); // dX, dA and dB written
    }
    ws.with_layer(x.device(), &[d.m, d.r], |u, ws| {
        let dims = (d.m, d.n, d.r);
        launch::lowrank_grad(
            OP,
            dy,
            t,
            db,
            PLayout::ColsByRank,
            Some((b, &mut *u)),
            dims,
            scale,
            acc,
            None,
            ws,
        )?;
        let dims = (d.m, d.k, d.r);
        launch::lowrank_grad(
            OP,
            x,
            u,
            da,
            PLayout::RankByCols,
            None::<(&Tensor<A>, &mut Tensor<T>)>,
            dims,
            masked_scale,
            acc,
            mask,
            ws,
        )?;
        if let Some(dx) = dx {
            let g = FusedGemm {
                orient: Orient::Nn,
                a: dy,
                b: w0,
                l: u,
                r: a,
                bias: None,
                m: d.m,
                n: d.k,
                k: d.n,
                rank: d.r,
                scale: masked_scale,
                dropout: mask.map(|m| (m, MaskAt::LowRankSum)),
            };
            launch::fused_gemm(OP, &g, dx, None)?;
        }
        Ok(())
    })
}

/// A schedule on x's device (checked before any launch, so a mismatch writes nothing); a fixed
/// dropout's seed and offset are launch parameters: a captured graph would apply the same mask at every
/// replay, so it is refused during a capture (a [`DropoutSchedule`] is not).
///
/// [`DropoutSchedule`]: crate::dropout::DropoutSchedule
pub(super) fn check_dropout<T: Element>(
    op: &'static str,
    x: &Tensor<T>,
    dropout: &DropoutArg<'_>,
) -> Result<()> {
    match dropout {
        DropoutArg::Scheduled(s) if s.device() != x.device() => Err(Error::DeviceMismatch {
            op,
            arg: "dropout (a DropoutSchedule)",
            expected: x.device().describe(),
            got: s.device().describe(),
        }),
        DropoutArg::Fixed(d) if d.is_active() => {
            x.device().refuse_changing_params_in_capture(&format!(
                "{op} with a Dropout (its seed and offset are launch parameters: every replay would \
                 apply the same mask; a DropoutSchedule's offset is read from device memory)"
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each dimension below 2^31 and every u32-counted operand (X, W0, T, A, B) at most u32::MAX; Y may
    /// be larger. Shapes no test could allocate, checked where the ops check them.
    #[test]
    fn base_sizes_fit_names_the_size_past_the_limit() {
        let max = validate::MAX_DIM;
        base_sizes_fit("op", (4096, 4096, 4096), 128).unwrap();
        // Y of 2^33 elements is fine (64-bit row addressing); X of 2^32 is not
        base_sizes_fit("op", (1 << 19, 1 << 14, 4096), 16).unwrap();
        let too_large = |dims, r| match base_sizes_fit("op", dims, r) {
            Err(Error::TooLarge { arg, .. }) => arg,
            other => panic!("{dims:?} r {r}: {other:?}"),
        };
        assert_eq!(too_large((max + 1, 1, 1), 1), "M (rows of x)");
        assert_eq!(too_large((1, max + 1, 1), 1), "N (rows of w0)");
        assert_eq!(too_large((1, 1, max + 1), 1), "K (columns of x)");
        assert_eq!(too_large((1 << 21, 1, 1 << 11), 1), "x");
        assert_eq!(too_large((1, 1 << 21, 1 << 11), 1), "w0");
        // the review's case: M = N = 1, K = 2^25 + 1, r = 128 (dA of 2^32 + 128 elements)
        assert_eq!(too_large((1, 1, (1 << 25) + 1), 128), "a (r·K)");
        assert_eq!(too_large((1 << 26, 1, 1), 128), "t (M·r)");
        assert_eq!(too_large((1, 1 << 26, 1), 128), "b (N·r)");
    }
}
