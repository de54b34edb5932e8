//! The CPU reference: plain loops, f64 accumulation, inputs of any [`Element`] type. It is the oracle
//! every kernel is tested against (and is itself checked against PyTorch + PEFT golden data in
//! `tests/reference_peft.rs`), not a fast path.
//!
//! Conventions (PyTorch `nn.Linear`, row-major): X is M×K, W0 is N×K, A is r×K, B is N×r, dY is M×N.

use crate::dropout::Dropout;
use crate::dtype::Element;

/// Problem sizes of one LoRA layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Tokens (rows of X).
    pub m: usize,
    /// Output features (rows of W0).
    pub n: usize,
    /// Input features (columns of W0).
    pub k: usize,
    /// LoRA rank.
    pub r: usize,
}

/// Forward results in f64: `y` (M×N) and the saved `t = X·Aᵀ` (M×r).
#[derive(Clone, Debug)]
pub struct Forward {
    pub y: Vec<f64>,
    pub t: Vec<f64>,
}

/// Backward results in f64: `dx` (M×K), `da` (r×K), `db` (N×r) and the intermediate `u = dY·B` (M×r).
#[derive(Clone, Debug)]
pub struct Backward {
    pub dx: Vec<f64>,
    pub da: Vec<f64>,
    pub db: Vec<f64>,
    pub u: Vec<f64>,
}

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn check_len(name: &str, got: usize, want: usize) {
    assert_eq!(
        got, want,
        "reference: `{name}` has {got} elements, expected {want}"
    );
}

/// C (rows×cols) = P (rows×inner) · Qᵀ where Q is cols×inner: the `x·wᵀ` of nn.Linear.
fn matmul_nt(p: &[f64], q: &[f64], rows: usize, cols: usize, inner: usize) -> Vec<f64> {
    let mut c = vec![0.0; rows * cols];
    for i in 0..rows {
        let pi = &p[i * inner..(i + 1) * inner];
        for j in 0..cols {
            let qj = &q[j * inner..(j + 1) * inner];
            c[i * cols + j] = pi.iter().zip(qj).map(|(a, b)| a * b).sum();
        }
    }
    c
}

/// Transposes a rows×cols matrix.
fn transpose(p: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = p[i * cols + j];
        }
    }
    t
}

/// Which intermediates are rounded to the layer's dtype: none (exact math) or, as the kernels do,
/// T (the forward's saved output) and U (the backward's dY·B).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Intermediates {
    Exact,
    AsKernels,
}

fn round_if<T: Element>(v: Vec<f64>, mode: Intermediates) -> Vec<f64> {
    match mode {
        Intermediates::Exact => v,
        Intermediates::AsKernels => rounded::<T>(&v),
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_impl<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    bias: Option<&[T]>,
    d: Dims,
    scale: f64,
    mode: Intermediates,
    dropout: &Dropout,
) -> Forward {
    check_len("x", x.len(), d.m * d.k);
    check_len("w0", w0.len(), d.n * d.k);
    check_len("a", a.len(), d.r * d.k);
    check_len("b", b.len(), d.n * d.r);
    let (x, w0) = (f64s(x), f64s(w0));
    let (a, b) = (adapter_as::<T, U>(a, mode), adapter_as::<T, U>(b, mode));
    let t = round_if::<T>(matmul_nt(&dropped(&x, dropout), &a, d.m, d.r, d.k), mode);
    let base = matmul_nt(&x, &w0, d.m, d.n, d.k);
    let lora = matmul_nt(&t, &b, d.m, d.n, d.r);
    let mut y: Vec<f64> = base.iter().zip(&lora).map(|(p, l)| p + scale * l).collect();
    if let Some(bias) = bias {
        check_len("bias", bias.len(), d.n);
        for (i, v) in y.iter_mut().enumerate() {
            *v += bias[i % d.n].to_f64();
        }
    }
    Forward { y, t }
}

/// `y = x·w0ᵀ + s·(x·aᵀ)·bᵀ (+ bias)`, `t = x·aᵀ`.
pub fn forward<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    bias: Option<&[T]>,
    d: Dims,
    scale: f64,
) -> Forward {
    forward_impl(
        x,
        w0,
        a,
        b,
        bias,
        d,
        scale,
        Intermediates::Exact,
        &Dropout::NONE,
    )
}

/// `dropout(X) = X ⊙ mask / (1 − p)` in f64, the mask of [`Dropout::keeps`] (X is dense, row-major:
/// element e is X's e-th value).
pub fn dropped(x: &[f64], dropout: &Dropout) -> Vec<f64> {
    if !dropout.is_active() {
        return x.to_vec();
    }
    let keep = dropout.keep_scale();
    x.iter()
        .enumerate()
        .map(|(e, &v)| {
            if dropout.keeps(e as u64) {
                v * keep
            } else {
                0.0
            }
        })
        .collect()
}

/// An adapter in f64: as given (exact), or as the kernels feed the tensor cores: an f32 adapter over a
/// 16-bit layer is rounded once to the layer dtype (a no-op for adapters already in it).
fn adapter_as<T: Element, U: Element>(v: &[U], mode: Intermediates) -> Vec<f64> {
    let v = f64s(v);
    round_if::<T>(v, mode)
}

/// The gradients from f64 inputs, the T to use (exact or as given) and how to treat U.
#[allow(clippy::too_many_arguments)]
fn backward_impl<T: Element>(
    x: &[f64],
    w0: &[f64],
    a: &[f64],
    b: &[f64],
    t: &[f64],
    dy: &[f64],
    d: Dims,
    scale: f64,
    mode: Intermediates,
    dropout: &Dropout,
) -> Backward {
    let bt = transpose(b, d.n, d.r); // r×N
    let u = round_if::<T>(matmul_nt(dy, &bt, d.m, d.r, d.n), mode); // M×r
    let dyt = transpose(dy, d.m, d.n); // N×M
    let tt = transpose(t, d.m, d.r); // r×M
    let db: Vec<f64> = matmul_nt(&dyt, &tt, d.n, d.r, d.m)
        .iter()
        .map(|v| scale * v)
        .collect();
    let ut = transpose(&u, d.m, d.r); // r×M
    let xt = transpose(&dropped(x, dropout), d.m, d.k); // K×M
    let da: Vec<f64> = matmul_nt(&ut, &xt, d.r, d.k, d.m)
        .iter()
        .map(|v| scale * v)
        .collect();
    let w0t = transpose(w0, d.n, d.k); // K×N
    let at = transpose(a, d.r, d.k); // K×r
    let base = matmul_nt(dy, &w0t, d.m, d.k, d.n);
    let mut lora = matmul_nt(&u, &at, d.m, d.k, d.r);
    if dropout.is_active() {
        // the mask has X's shape, and so has dX: ⊙ mask / (1 − p)
        let keep = dropout.keep_scale();
        for (e, v) in lora.iter_mut().enumerate() {
            *v = if dropout.keeps(e as u64) {
                *v * keep
            } else {
                0.0
            };
        }
    }
    let dx = base.iter().zip(&lora).map(|(p, l)| p + scale * l).collect();
    Backward { dx, da, db, u }
}

/// Gradients of the LoRA layer given `dy`: `u = dy·b`, `db = s·dyᵀ·t`, `da = s·uᵀ·x`,
/// `dx = dy·w0 + s·u·a` (no dW0: W0 is frozen).
pub fn backward<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    dy: &[T],
    d: Dims,
    scale: f64,
) -> Backward {
    check_len("x", x.len(), d.m * d.k);
    check_len("w0", w0.len(), d.n * d.k);
    check_len("a", a.len(), d.r * d.k);
    check_len("b", b.len(), d.n * d.r);
    check_len("dy", dy.len(), d.m * d.n);
    let (x, w0, a, b, dy) = (f64s(x), f64s(w0), f64s(a), f64s(b), f64s(dy));
    let t = matmul_nt(&x, &a, d.m, d.r, d.k); // M×r
    backward_impl::<T>(
        &x,
        &w0,
        &a,
        &b,
        &t,
        &dy,
        d,
        scale,
        Intermediates::Exact,
        &Dropout::NONE,
    )
}

/// Rounds every value to `T` (once, to nearest even) and back to f64.
pub fn rounded<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f64(x).to_f64()).collect()
}

/// The kernels' documented contract for the forward, in exact arithmetic: the saved
/// `T = round_T(X·Aᵀ)` is an output in the layer's dtype, and `Y = X·W0ᵀ + s·T·Bᵀ (+ bias)` uses that
/// T. Differs from [`forward`] only by the rounding of T (relative 2⁻⁹ in bf16), which matters only
/// where the base and low-rank terms cancel; kernel tests use this so their tolerances measure the
/// kernels' arithmetic, not that documented rounding. f32 adapters (`U` = f32) are rounded once to the
/// layer dtype, as the kernels feed them to the tensor cores; with `dropout`,
/// `T = round_T(dropout(X)·Aᵀ)`.
#[allow(clippy::too_many_arguments)]
pub fn forward_as_kernels<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    bias: Option<&[T]>,
    d: Dims,
    scale: f64,
    dropout: &Dropout,
) -> Forward {
    forward_impl(
        x,
        w0,
        a,
        b,
        bias,
        d,
        scale,
        Intermediates::AsKernels,
        dropout,
    )
}

/// One adapter of a multi-adapter reference: A (r×K), B (N×r), r, scale.
pub type MultiAdapter<'a, U> = (&'a [U], &'a [U], usize, f64);

/// The multi-adapter forward's contract (ops::lora_forward_multi): row i is [`forward_as_kernels`] of
/// that row alone with adapter `rows[i]` (an index into `adapters`), or X_i·W0ᵀ + bias without one.
/// Returns Y (M×N) and T (M×r_max, the row's T in its first r_a columns, zeros elsewhere).
#[allow(clippy::too_many_arguments)]
pub fn forward_multi_as_kernels<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    bias: Option<&[T]>,
    adapters: &[MultiAdapter<'_, U>],
    rows: &[Option<usize>],
    (m, n, k): (usize, usize, usize),
    r_max: usize,
) -> Forward {
    check_len("x", x.len(), m * k);
    check_len("rows", rows.len(), m);
    let mut y = Vec::with_capacity(m * n);
    let mut t = vec![0.0; m * r_max];
    for (i, row) in rows.iter().enumerate() {
        let xi = &x[i * k..(i + 1) * k];
        match row {
            Some(a) => {
                let (aa, bb, r, s) = adapters[*a];
                let f = forward_as_kernels(
                    xi,
                    w0,
                    aa,
                    bb,
                    bias,
                    Dims { m: 1, n, k, r },
                    s,
                    &Dropout::NONE,
                );
                y.extend_from_slice(&f.y);
                t[i * r_max..i * r_max + r].copy_from_slice(&f.t);
            }
            None => {
                let mut base = matmul_nt(&f64s(xi), &f64s(w0), 1, n, k);
                if let Some(bias) = bias {
                    for (v, b) in base.iter_mut().zip(bias) {
                        *v += b.to_f64();
                    }
                }
                y.extend_from_slice(&base);
            }
        }
    }
    Forward { y, t }
}

/// The kernels' documented contract for the backward, in exact arithmetic: `t` is the T the caller
/// passes (the forward's output), and the internal `U = round_T(dY·B)` is kept in the layer's dtype;
/// `dB = s·dYᵀ·t`, `dA = s·Uᵀ·X`, `dX = dY·W0 + s·U·A`; f32 adapters rounded once to the layer dtype
/// (as the kernels' tensor-core operands); with `dropout`, `dA = s·Uᵀ·dropout(X)` and
/// `dX = dY·W0 + s·(U·A) ⊙ mask / (1 − p)`.
#[allow(clippy::too_many_arguments)]
pub fn backward_as_kernels<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    t: &[T],
    dy: &[T],
    d: Dims,
    scale: f64,
    dropout: &Dropout,
) -> Backward {
    check_len("x", x.len(), d.m * d.k);
    check_len("w0", w0.len(), d.n * d.k);
    check_len("a", a.len(), d.r * d.k);
    check_len("b", b.len(), d.n * d.r);
    check_len("t", t.len(), d.m * d.r);
    check_len("dy", dy.len(), d.m * d.n);
    let mode = Intermediates::AsKernels;
    let (a, b) = (adapter_as::<T, U>(a, mode), adapter_as::<T, U>(b, mode));
    let (x, w0, t, dy) = (f64s(x), f64s(w0), f64s(t), f64s(dy));
    backward_impl::<T>(&x, &w0, &a, &b, &t, &dy, d, scale, mode, dropout)
}

/// `s·B·A` (N×K) in f64.
pub fn delta<U: Element>(a: &[U], b: &[U], n: usize, k: usize, r: usize, scale: f64) -> Vec<f64> {
    check_len("a", a.len(), r * k);
    check_len("b", b.len(), n * r);
    let at = transpose(&f64s(a), r, k); // K×r
    matmul_nt(&f64s(b), &at, n, k, r)
        .iter()
        .map(|v| scale * v)
        .collect()
}

/// `round(W0 + s·B·A)`: exact arithmetic, one rounding per element.
pub fn merge<T: Element, U: Element>(
    w0: &[T],
    a: &[U],
    b: &[U],
    n: usize,
    k: usize,
    r: usize,
    scale: f64,
) -> Vec<T> {
    check_len("w0", w0.len(), n * k);
    let d = delta(a, b, n, k, r, scale);
    w0.iter()
        .zip(&d)
        .map(|(w, d)| T::from_f64(w.to_f64() + d))
        .collect()
}

/// `round(W − s·B·A)`: the exact inverse of [`merge`] before rounding.
pub fn unmerge<T: Element, U: Element>(
    w: &[T],
    a: &[U],
    b: &[U],
    n: usize,
    k: usize,
    r: usize,
    scale: f64,
) -> Vec<T> {
    merge(w, a, b, n, k, r, -scale)
}

/// DoRA's row factors `m / ‖W0 + s·B·A‖` in f64 (exact arithmetic; the norm over each row of W0).
#[allow(clippy::too_many_arguments)]
pub fn dora_factor<T: Element, U: Element>(
    w0: &[T],
    a: &[U],
    b: &[U],
    magnitude: &[f32],
    n: usize,
    k: usize,
    r: usize,
    scale: f64,
) -> Vec<f64> {
    check_len("w0", w0.len(), n * k);
    dora_factor_of(w0, &delta(a, b, n, k, r, scale), magnitude, n, k)
}

/// The factors of [`dora_factor`] from W0 and `d = s·B·A`.
fn dora_factor_of<T: Element>(
    w0: &[T],
    d: &[f64],
    magnitude: &[f32],
    n: usize,
    k: usize,
) -> Vec<f64> {
    check_len("magnitude", magnitude.len(), n);
    dora_norms(w0, d, n, k)
        .iter()
        .zip(magnitude)
        .map(|(norm, &m)| m as f64 / norm)
        .collect()
}

/// The row norms ‖W0 + d‖ in f64.
fn dora_norms<T: Element>(w0: &[T], d: &[f64], n: usize, k: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            (0..k)
                .map(|j| (w0[i * k + j].to_f64() + d[i * k + j]).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// DoRA's unmerged layer forward in f64 (exact arithmetic): `z = x·w0ᵀ + s·t·bᵀ`, `t = x·aᵀ`,
/// `y = factor ⊙ z + bias` per output feature, with `norm = ‖w0 + s·b·a‖` (rows) and
/// `factor = magnitude / norm`.
#[derive(Clone, Debug)]
pub struct DoraForward {
    pub y: Vec<f64>,
    pub z: Vec<f64>,
    pub t: Vec<f64>,
    pub norm: Vec<f64>,
    pub factor: Vec<f64>,
}

/// The gradients of [`dora_forward`] in f64, the norm a constant (detached, as DoRA's §4.3 and PEFT):
/// `dz = factor ⊙ dy`, then `dx`, `da`, `db` of [`backward`] with `dz`, and
/// `dmagnitude_j = Σ_i dy_ij·z_ij / norm_j`.
#[derive(Clone, Debug)]
pub struct DoraBackward {
    pub dx: Vec<f64>,
    pub da: Vec<f64>,
    pub db: Vec<f64>,
    pub dmagnitude: Vec<f64>,
}

/// DoRA's layer `y = (magnitude / ‖w0 + s·b·a‖) ⊙ (x·w0ᵀ + s·(x·aᵀ)·bᵀ) + bias` (PEFT's
/// `DoraLinearVariant.forward` without dropout), exact.
#[allow(clippy::too_many_arguments)]
pub fn dora_forward<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    magnitude: &[f32],
    bias: Option<&[T]>,
    d: Dims,
    scale: f64,
) -> DoraForward {
    dora_forward_dropout(x, w0, a, b, magnitude, bias, d, scale, &Dropout::NONE)
}

/// [`dora_forward`] with LoRA dropout, PEFT's `DoraLinearVariant.forward` in training as written there:
/// with `xd = dropout(x)` ([`dropped`]), `t = xd·aᵀ`,
/// `y = x·w0ᵀ + bias + (factor − 1) ⊙ (xd·w0ᵀ) + factor ⊙ s·t·bᵀ`, and `z = xd·w0ᵀ + s·t·bᵀ` (what the
/// factor multiplies), exact.
#[allow(clippy::too_many_arguments)]
pub fn dora_forward_dropout<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    magnitude: &[f32],
    bias: Option<&[T]>,
    d: Dims,
    scale: f64,
    dropout: &Dropout,
) -> DoraForward {
    check_len("x", x.len(), d.m * d.k);
    check_len("w0", w0.len(), d.n * d.k);
    check_len("a", a.len(), d.r * d.k);
    check_len("b", b.len(), d.n * d.r);
    check_len("magnitude", magnitude.len(), d.n);
    if let Some(bias) = bias {
        check_len("bias", bias.len(), d.n);
    }
    let (x64, w64) = (f64s(x), f64s(w0));
    let xd = dropped(&x64, dropout);
    let t = matmul_nt(&xd, &f64s(a), d.m, d.r, d.k);
    let lora = matmul_nt(&t, &f64s(b), d.m, d.n, d.r);
    let base = matmul_nt(&x64, &w64, d.m, d.n, d.k);
    let base_dropped = matmul_nt(&xd, &w64, d.m, d.n, d.k);
    let norm = dora_norms(w0, &delta(a, b, d.n, d.k, d.r, scale), d.n, d.k);
    let factor: Vec<f64> = norm
        .iter()
        .zip(magnitude)
        .map(|(norm, &m)| m as f64 / norm)
        .collect();
    let bias_at = |e: usize| bias.map_or(0.0, |b| b[e % d.n].to_f64());
    let y = (0..d.m * d.n)
        .map(|e| {
            let f = factor[e % d.n];
            base[e] + bias_at(e) + (f - 1.0) * base_dropped[e] + f * scale * lora[e]
        })
        .collect();
    let z = (0..d.m * d.n)
        .map(|e| base_dropped[e] + scale * lora[e])
        .collect();
    DoraForward {
        y,
        z,
        t,
        norm,
        factor,
    }
}

/// The gradients of [`dora_forward`] given `dy`, exact.
#[allow(clippy::too_many_arguments)]
pub fn dora_backward<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    magnitude: &[f32],
    dy: &[T],
    d: Dims,
    scale: f64,
) -> DoraBackward {
    dora_backward_dropout(x, w0, a, b, magnitude, dy, d, scale, &Dropout::NONE)
}

/// The gradients of [`dora_forward_dropout`] given `dy` (the norm detached), exact, as autograd takes
/// them through PEFT's expression: `dz = factor ⊙ dy`, `u = dz·b`, `db = s·dzᵀ·t`, `da = s·uᵀ·xd`,
/// `dx = dy·w0 + dropout'((factor − 1) ⊙ dy·w0 + s·u·a)` (dropout's backward: the same mask and
/// 1/(1 − p)), `dmagnitude_j = Σ_i dy_ij·z_ij / norm_j`.
#[allow(clippy::too_many_arguments)]
pub fn dora_backward_dropout<T: Element, U: Element>(
    x: &[T],
    w0: &[T],
    a: &[U],
    b: &[U],
    magnitude: &[f32],
    dy: &[T],
    d: Dims,
    scale: f64,
    dropout: &Dropout,
) -> DoraBackward {
    check_len("dy", dy.len(), d.m * d.n);
    let f = dora_forward_dropout(x, w0, a, b, magnitude, None, d, scale, dropout);
    let dy = f64s(dy);
    let dz: Vec<f64> = dy
        .iter()
        .enumerate()
        .map(|(e, g)| f.factor[e % d.n] * g)
        .collect();
    let dmagnitude = dora_magnitude_grad_of(&dy, &f.z, &f.norm, d.m, d.n);
    let (x, w0, a, b) = (f64s(x), f64s(w0), f64s(a), f64s(b));
    let g = backward_impl::<T>(
        &x,
        &w0,
        &a,
        &b,
        &f.t,
        &dz,
        d,
        scale,
        Intermediates::Exact,
        dropout,
    );
    let w0t = transpose(&w0, d.n, d.k); // K×N
    let at = transpose(&a, d.r, d.k); // K×r
    let base = matmul_nt(&dy, &w0t, d.m, d.k, d.n);
    let rest: Vec<f64> = dz.iter().zip(&dy).map(|(z, g)| z - g).collect(); // (f − 1) ⊙ dy
    let rest_w0 = matmul_nt(&rest, &w0t, d.m, d.k, d.n);
    let ua = matmul_nt(&g.u, &at, d.m, d.k, d.r);
    let q: Vec<f64> = rest_w0
        .iter()
        .zip(&ua)
        .map(|(p, l)| p + scale * l)
        .collect();
    let dx = base
        .iter()
        .zip(dropped(&q, dropout))
        .map(|(p, q)| p + q)
        .collect();
    DoraBackward {
        dx,
        da: g.da,
        db: g.db,
        dmagnitude,
    }
}

/// The magnitude's gradient `Σ_i dy_ij·z_ij / norm_j` in f64 from the given Z and norms (the kernels'
/// saved ones, for a check of the reduction alone). `dy`, `z`: m×n; `norm`: n.
pub fn dora_magnitude_grad<T: Element>(
    dy: &[T],
    z: &[T],
    norm: &[f32],
    m: usize,
    n: usize,
) -> Vec<f64> {
    check_len("dy", dy.len(), m * n);
    check_len("z", z.len(), m * n);
    check_len("norm", norm.len(), n);
    let norm: Vec<f64> = norm.iter().map(|&v| v as f64).collect();
    dora_magnitude_grad_of(&f64s(dy), &f64s(z), &norm, m, n)
}

fn dora_magnitude_grad_of(dy: &[f64], z: &[f64], norm: &[f64], m: usize, n: usize) -> Vec<f64> {
    (0..n)
        .map(|j| (0..m).map(|i| dy[i * n + j] * z[i * n + j]).sum::<f64>() / norm[j])
        .collect()
}

/// DoRA merge `round(factor_i·(W0 + s·B·A))` per row i, exact arithmetic and one rounding per
/// element, with the factors of [`dora_factor`]; returns the merged W0 and the factors.
#[allow(clippy::too_many_arguments)]
pub fn dora_merge<T: Element, U: Element>(
    w0: &[T],
    a: &[U],
    b: &[U],
    magnitude: &[f32],
    n: usize,
    k: usize,
    r: usize,
    scale: f64,
) -> (Vec<T>, Vec<f64>) {
    check_len("w0", w0.len(), n * k);
    let d = delta(a, b, n, k, r, scale);
    let factor = dora_factor_of(w0, &d, magnitude, n, k);
    let merged = (0..n * k)
        .map(|e| T::from_f64(factor[e / k] * (w0[e].to_f64() + d[e])))
        .collect();
    (merged, factor)
}

/// `dy[i] = round(s · (y[i] − target[i]))` with the kernel's f32 operations (the same bits).
pub fn mse_grad<T: Element>(y: &[T], target: &[T], s: f32) -> Vec<T> {
    y.iter()
        .zip(target)
        .map(|(y, t)| {
            let d = y.to_f64() as f32 + -(t.to_f64() as f32);
            T::from_f32(s * d)
        })
        .collect()
}

/// `y[i] = round(s · x[i])`.
pub fn scale<T: Element>(x: &[T], s: f32) -> Vec<T> {
    x.iter()
        .map(|v| T::from_f64(v.to_f64() * s as f64))
        .collect()
}

/// `‖got − want‖₂ / ‖want‖₂` (absolute norm when `want` is all zero). Any NaN or infinity in `got` or
/// `want`, a length mismatch, or nothing to compare (empty slices) gives `f64::INFINITY`, so NaN never
/// passes a tolerance and neither does a check that compared nothing.
pub fn relative_error<T: Element>(got: &[T], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.is_empty() {
        return f64::INFINITY;
    }
    let mut num = 0.0;
    let mut den = 0.0;
    for (g, w) in got.iter().zip(want) {
        let g = g.to_f64();
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    let err = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    if err.is_nan() { f64::INFINITY } else { err }
}

/// Distance in units in the last place between two finite values of the same dtype (0 = same bits or
/// ±0), counting across zero; `u64::MAX` when either is NaN.
pub fn ulp_distance<T: Element>(a: T, b: T) -> u64 {
    let (fa, fb) = (a.to_f64(), b.to_f64());
    if fa.is_nan() || fb.is_nan() {
        return u64::MAX;
    }
    let bits = (std::mem::size_of::<T>() * 8) as u32;
    let key = |v: T| -> i64 {
        let raw = v.to_bits_u32() as i64;
        let sign = 1i64 << (bits - 1);
        if raw & sign != 0 {
            -(raw & (sign - 1))
        } else {
            raw
        }
    };
    key(a).abs_diff(key(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Small integers: every result is exact, so the formulas are checked, not just approximated.
    #[test]
    fn forward_and_backward_on_integers() {
        let d = Dims {
            m: 2,
            n: 3,
            k: 2,
            r: 1,
        };
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let w0 = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let a = [1.0f32, -1.0];
        let b = [2.0f32, 0.0, 1.0];
        let f = forward(&x, &w0, &a, &b, None, d, 0.5);
        assert_eq!(f.t, vec![-1.0, -1.0]);
        // X·W0ᵀ = [[1,2,3],[3,4,7]]; s·T·Bᵀ = 0.5·[[-2,0,-1],[-2,0,-1]]
        assert_eq!(f.y, vec![0.0, 2.0, 2.5, 2.0, 4.0, 6.5]);
        let dy = [1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0];
        let g = backward(&x, &w0, &a, &b, &dy, d, 0.5);
        assert_eq!(g.u, vec![3.0, 0.0]);
        // dB = 0.5·dYᵀ·T = 0.5·[[-1],[-1],[-1]]
        assert_eq!(g.db, vec![-0.5, -0.5, -0.5]);
        // dA = 0.5·Uᵀ·X = 0.5·[3·1+0·3, 3·2+0·4]
        assert_eq!(g.da, vec![1.5, 3.0]);
        // dX = dY·W0 + 0.5·U·A = [[2,1],[0,1]] + [[1.5,-1.5],[0,0]]
        assert_eq!(g.dx, vec![3.5, -0.5, 0.0, 1.0]);
    }

    #[test]
    fn merge_rounds_once_and_unmerge_inverts() {
        let w0: Vec<bf16> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let a = [1.0f32, 1.0];
        let b = [0.25f32, -0.5];
        let merged = merge(&w0, &a, &b, 2, 2, 1, 2.0);
        let got: Vec<f32> = merged.iter().map(|v| v.to_f32()).collect();
        assert_eq!(got, vec![1.5, 2.5, 2.0, 3.0]);
        assert_eq!(unmerge(&merged, &a, &b, 2, 2, 1, 2.0), w0);
    }

    #[test]
    fn relative_error_rejects_nan() {
        assert_eq!(relative_error(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(relative_error(&[1.0f32], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(relative_error(&[1.0f32], &[1.0]), 0.0);
        assert!((relative_error(&[1.1f32], &[1.0]) - 0.1).abs() < 1e-6);
        // infinities on either side, nothing compared
        assert_eq!(relative_error(&[f32::INFINITY], &[1.0]), f64::INFINITY);
        assert_eq!(relative_error(&[1.0f32], &[f64::INFINITY]), f64::INFINITY);
        assert_eq!(
            relative_error(&[f32::INFINITY], &[f64::INFINITY]),
            f64::INFINITY
        );
        assert_eq!(relative_error::<f32>(&[], &[]), f64::INFINITY);
        // an all-zero reference: the absolute norm
        assert!((relative_error(&[3.0f32, 4.0], &[0.0, 0.0]) - 5.0).abs() < 1e-12);
        assert_eq!(relative_error(&[0.0f32, -0.0], &[0.0, 0.0]), 0.0);
    }

    #[test]
    fn ulp_distance_counts_across_zero() {
        let one = bf16::from_f32(1.0);
        let next = bf16::from_bits(one.to_bits() + 1);
        assert_eq!(ulp_distance(one, next), 1);
        assert_eq!(
            ulp_distance(bf16::from_bits(0x0001), bf16::from_bits(0x8001)),
            2
        );
        assert_eq!(ulp_distance(bf16::from_f32(0.0), bf16::from_f32(-0.0)), 0);
        assert_eq!(ulp_distance(bf16::from_bits(0xFFFF), one), u64::MAX);
    }
}
