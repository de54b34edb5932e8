//! One LoRA layer case run through the public ops on a device, with every output poisoned before the
//! launch, and checked against the f64 reference.

use lora_kernels::reference::{self, Dims};
use lora_kernels::{Device, Dropout, DropoutArg, Element, Tensor, ops};
use proptest::prelude::*;

use super::Rng;

/// Host inputs of one layer: activations and W0 in the layer dtype `T`, adapters (and their gradients)
/// in `A` (T, or f32 master adapters).
pub struct Layer<T, A = T> {
    pub d: Dims,
    pub scale: f32,
    pub x: Vec<T>,
    pub w0: Vec<T>,
    pub a: Vec<A>,
    pub b: Vec<A>,
    pub bias: Option<Vec<T>>,
    pub dy: Vec<T>,
    /// X's leading dimensions (their product is M): `[M]` for a plain matrix.
    pub lead: Vec<usize>,
    /// Gradients already in dA, dB: the backward accumulates into them ([`ops::GradMode::Accumulate`]).
    pub grads0: Option<(Vec<A>, Vec<A>)>,
    /// LoRA dropout on the adapter input (forward and backward alike).
    pub dropout: Dropout,
}

impl<T: Element, A: Element> Layer<T, A> {
    /// Fresh random inputs; amplitudes keep |Y| near 1 whatever K is.
    pub fn random(rng: &mut Rng, d: Dims, scale: f32, with_bias: bool) -> Self {
        let wk = 1.0 / (d.k as f64).sqrt();
        Layer {
            d,
            scale,
            x: rng.vec(d.m * d.k, 1.0),
            w0: rng.vec(d.n * d.k, 2.0 * wk),
            a: rng.vec(d.r * d.k, 2.0 * wk),
            b: rng.vec(d.n * d.r, 1.0 / (d.r as f64).sqrt()),
            bias: with_bias.then(|| rng.vec(d.n, 1.0)),
            dy: rng.vec(d.m * d.n, 1.0),
            lead: vec![d.m],
            grads0: None,
            dropout: Dropout::NONE,
        }
    }

    /// The first `rows` rows of this layer's batch (X and dY), with the same weights, adapters and
    /// settings: a smaller batch, for checks that a row's bits do not depend on the batch size.
    pub fn first_rows(&self, rows: usize) -> Self {
        let Dims { n, k, .. } = self.d;
        Layer {
            d: Dims { m: rows, ..self.d },
            scale: self.scale,
            x: self.x[..rows * k].to_vec(),
            w0: self.w0.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            bias: self.bias.clone(),
            dy: self.dy[..rows * n].to_vec(),
            lead: vec![rows],
            grads0: self.grads0.clone(),
            dropout: self.dropout,
        }
    }

    /// Forward and backward with this dropout.
    pub fn with_dropout(mut self, dropout: Dropout) -> Self {
        self.dropout = dropout;
        self
    }

    /// The activations as [lead..., features] (the product of `lead` must be M).
    pub fn with_lead(mut self, lead: Vec<usize>) -> Self {
        assert_eq!(
            lead.iter().product::<usize>(),
            self.d.m,
            "leading dimensions of M rows"
        );
        self.lead = lead;
        self
    }

    /// dA and dB start from random gradients of an earlier micro-batch, which the backward adds to. Their
    /// amplitude is this call's own gradients' (their RMS by the reference), so that an accumulation
    /// which dropped this call's term, or added it twice, is off by far more than the tolerance.
    pub fn with_accumulation(mut self, rng: &mut Rng) -> Self {
        let (scale, dropout) = (self.scale as f64, &self.dropout);
        let f = reference::forward_as_kernels(
            &self.x, &self.w0, &self.a, &self.b, None, self.d, scale, dropout,
        );
        let t: Vec<T> = f.t.iter().map(|&v| T::from_f64(v)).collect();
        let g = reference::backward_as_kernels(
            &self.x, &self.w0, &self.a, &self.b, &t, &self.dy, self.d, scale, dropout,
        );
        let rms = |v: &[f64]| {
            let r = (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt();
            if r > 0.0 && r.is_finite() { r } else { 1.0 }
        };
        self.grads0 = Some((
            rng.vec(self.d.r * self.d.k, rms(&g.da)),
            rng.vec(self.d.n * self.d.r, rms(&g.db)),
        ));
        self
    }

    fn rows(&self, last: usize) -> Vec<usize> {
        self.lead.iter().copied().chain([last]).collect()
    }
}

/// Device results, downloaded.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<T, A = T> {
    pub y: Vec<T>,
    pub t: Vec<T>,
    pub dx: Vec<T>,
    pub da: Vec<A>,
    pub db: Vec<A>,
}

impl<T: Element, A: Element> Outputs<T, A> {
    /// Bit patterns, so NaNs compare equal to themselves and -0 differs from +0.
    pub fn bits(&self) -> Vec<Vec<u32>> {
        vec![
            super::bits(&self.y),
            super::bits(&self.t),
            super::bits(&self.dx),
            super::bits(&self.da),
            super::bits(&self.db),
        ]
    }
}

fn up<T: Element>(dev: &Device, v: &[T], shape: &[usize]) -> Tensor<T> {
    Tensor::from_slice(dev, v, shape).unwrap()
}

fn poisoned<T: Element>(dev: &Device, shape: &[usize]) -> Tensor<T> {
    let mut t = Tensor::zeros(dev, shape).unwrap();
    t.poison().unwrap();
    t
}

/// Forward, then backward with the forward's T, outputs poisoned first. `backward: false` skips it.
pub fn run<T: Element, A: Element>(dev: &Device, l: &Layer<T, A>, backward: bool) -> Outputs<T, A> {
    run_in(dev, l, backward, &mut ops::Workspace::new())
}

/// [`run`] with scratch memory from `ws` (forward and backward share it).
pub fn run_in<T: Element, A: Element>(
    dev: &Device,
    l: &Layer<T, A>,
    backward: bool,
    ws: &mut ops::Workspace<T>,
) -> Outputs<T, A> {
    run_with(dev, l, backward, ws, l.dropout.into())
}

/// [`run_in`] with `dropout` given to the ops instead of the layer's (a `DropoutSchedule`, say).
pub fn run_with<T: Element, A: Element>(
    dev: &Device,
    l: &Layer<T, A>,
    backward: bool,
    ws: &mut ops::Workspace<T>,
    dropout: DropoutArg<'_>,
) -> Outputs<T, A> {
    let Dims { n, k, r, .. } = l.d;
    let x = up(dev, &l.x, &l.rows(k));
    let w0 = up(dev, &l.w0, &[n, k]);
    let a = up(dev, &l.a, &[r, k]);
    let b = up(dev, &l.b, &[n, r]);
    let bias = l.bias.as_ref().map(|v| up(dev, v, &[n]));
    let mut y = poisoned(dev, &l.rows(n));
    let mut t = poisoned(dev, &l.rows(r));
    ops::lora_forward_into(
        &x,
        &w0,
        &a,
        &b,
        bias.as_ref(),
        l.scale,
        dropout,
        &mut y,
        &mut t,
        ws,
    )
    .unwrap();
    let mut out = Outputs {
        y: y.to_vec().unwrap(),
        t: t.to_vec().unwrap(),
        dx: vec![],
        da: vec![],
        db: vec![],
    };
    if backward {
        let dy = up(dev, &l.dy, &l.rows(n));
        let mut dx = poisoned(dev, &l.rows(k));
        let (mut da, mut db, mode) = match &l.grads0 {
            None => (
                poisoned(dev, &[r, k]),
                poisoned(dev, &[n, r]),
                ops::GradMode::Overwrite,
            ),
            Some((da0, db0)) => (
                up(dev, da0, &[r, k]),
                up(dev, db0, &[n, r]),
                ops::GradMode::Accumulate,
            ),
        };
        ops::lora_backward_into(
            &x,
            &w0,
            &a,
            &b,
            &t,
            &dy,
            l.scale,
            dropout,
            Some(&mut dx),
            &mut da,
            &mut db,
            mode,
            ws,
        )
        .unwrap();
        out.dx = dx.to_vec().unwrap();
        out.da = da.to_vec().unwrap();
        out.db = db.to_vec().unwrap();
    }
    out
}

/// Relative-norm errors of every output against the f64 reference; panics with the case on failure.
pub fn check<T: Element, A: Element>(what: &str, l: &Layer<T, A>, o: &Outputs<T, A>, tol: f64) {
    // The documented contract: T in the layer dtype (and Y computed from it), U kept in the layer
    // dtype; everything else exact. See reference::forward_as_kernels.
    let f = reference::forward_as_kernels(
        &l.x,
        &l.w0,
        &l.a,
        &l.b,
        l.bias.as_deref(),
        l.d,
        l.scale as f64,
        &l.dropout,
    );
    let mut checks = vec![
        ("y", reference::relative_error(&o.y, &f.y)),
        ("t", reference::relative_error(&o.t, &f.t)),
    ];
    if !o.dx.is_empty() {
        let g = reference::backward_as_kernels(
            &l.x,
            &l.w0,
            &l.a,
            &l.b,
            &o.t,
            &l.dy,
            l.d,
            l.scale as f64,
            &l.dropout,
        );
        let (mut da, mut db) = (g.da, g.db);
        if let Some((da0, db0)) = &l.grads0 {
            // accumulation: the earlier gradients plus this call's
            for (want, old) in da.iter_mut().zip(da0).chain(db.iter_mut().zip(db0)) {
                *want += old.to_f64();
            }
        }
        checks.extend([
            ("dx", reference::relative_error(&o.dx, &g.dx)),
            ("da", reference::relative_error(&o.da, &da)),
            ("db", reference::relative_error(&o.db, &db)),
        ]);
    }
    for (name, err) in checks {
        assert!(
            err <= tol,
            "{what} {} (adapters {}) {:?} scale {} {:?}: `{name}` relative error {err:e} > {tol:e} (data: LK_TEST_SEED={})",
            T::DTYPE,
            A::DTYPE,
            l.d,
            l.scale,
            l.dropout,
            super::seed()
        );
    }
}

/// Property-test shapes: M in 1..=max_m, N and K in 1..=300, r in each rank class of lowrank_grad (16, 32,
/// 64, 128) equally often; half of them (the bool) with N, K and r rounded up to multiples of 8, so both
/// the 16-byte vector path and the element-wise one run.
pub fn dims(max_m: usize) -> impl Strategy<Value = (Dims, bool)> {
    (
        1..=max_m,
        1..=300usize,
        1..=300usize,
        prop_oneof![1..=16usize, 17..=32usize, 33..=64usize, 65..=128usize],
        any::<bool>(),
    )
        .prop_map(|(m, n, k, r, round8)| {
            let up8 = |v: usize| if round8 { v.div_ceil(8) * 8 } else { v };
            (
                Dims {
                    m,
                    n: up8(n),
                    k: up8(k),
                    r: up8(r).min(128),
                },
                round8,
            )
        })
}
