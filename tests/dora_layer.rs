//! DoRA's unmerged layer (kernels/dora.cu around the fused LoRA GEMM) through `ops::dora_forward_into`,
//! `dora_backward_into` and their allocating forms: property tests against the f64 reference for bf16
//! and f16 layers with adapters in the layer dtype or f32, every output poisoned before the launch, the
//! same bits under a second thread order; the column passes bit for bit against their f32 arithmetic;
//! gradient accumulation; PEFT's own DoRA forward and gradients (tests/fixtures/peft/dora_layer); the
//! refusals.
//!
//! Each step is checked on the kernels' own intermediates, each of which is checked itself: the norms
//! and factors against the exact ones (1e-5 relative), T and Z against the plain forward's contract
//! (reference::forward_as_kernels: T rounded to the layer dtype), Y bit for bit as round(fma(factor, Z,
//! bias)), dA, dB, dX against reference::backward_as_kernels of dZ = round(factor·dY) and the saved T,
//! and dm against Σ dY·Z / norm in f64; then Y and dm end to end (the factors and norms on the
//! contract's Z) with the per-dtype tolerance, relative to the size of their terms (|f·Z| + |bias|;
//! Σ|dY·Z| / norm + |the old dm|), so a bias or an old gradient that cancels the rest cannot fail a
//! correct kernel.
//!
//! With LoRA dropout (half the property cases, p up to 0.9; edge shapes) the kernels compute PEFT's
//! layer regrouped (src/ops/dora_layer.rs): the saved Z is the fused forward's less D = (X − Xd)·W0ᵀ,
//! Y = f·Z + (1 − f)·D + bias (end to end only: Z and D are scratch), dX gains ((1 − f)·dY)·W0 under
//! the residual's mask. Those are checked as such, relative to the terms' sizes, and Y, dX and dm again
//! against PEFT's expression as written (peft_form: X·W0ᵀ + bias + (f − 1)⊙(Xd·W0ᵀ) + f⊙s·T·Bᵀ and its
//! autograd), so the regrouping itself is under test. reference::dora_forward(_dropout) /
//! dora_backward(_dropout) (the exact layer) are what the PEFT fixture test holds to PEFT's numbers.

mod common;

use common::Rng;
use common::lora::{Layer, dims};
use half::{bf16, f16};
use lora_kernels::reference::{self, Dims};
use lora_kernels::{DType, Device, Dropout, Element, Error, Tensor, ops};
use proptest::prelude::*;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 1e-3 }
}

/// Magnitudes near the row norms of W0 (PEFT starts them there), spread by ±50 %.
fn magnitude_for<T: Element, A: Element>(l: &Layer<T, A>, rng: &mut Rng) -> Vec<f32> {
    let k = l.d.k;
    (0..l.d.n)
        .map(|i| {
            let norm = l.w0[i * k..(i + 1) * k]
                .iter()
                .map(|v| v.to_f64().powi(2))
                .sum::<f64>()
                .sqrt();
            (norm * (1.0 + 0.5 * rng.uniform())) as f32
        })
        .collect()
}

/// One layer case: the layer, its magnitude, earlier gradients to accumulate into (dA, dB, dm), and
/// the LoRA dropout (PEFT's DoRA with dropout runs W0 on the dropped input too).
struct Case<T, A> {
    l: Layer<T, A>,
    magnitude: Vec<f32>,
    grads0: Option<(Vec<A>, Vec<A>, Vec<f32>)>,
    dropout: Dropout,
}

#[derive(Debug, PartialEq)]
struct Out<T, A> {
    y: Vec<T>,
    t: Vec<T>,
    z: Vec<T>,
    norm: Vec<f32>,
    factor: Vec<f32>,
    dx: Vec<T>,
    da: Vec<A>,
    db: Vec<A>,
    dm: Vec<f32>,
}

impl<T: Element, A: Element> Out<T, A> {
    fn bits(&self) -> Vec<Vec<u32>> {
        use common::bits;
        vec![
            bits(&self.y),
            bits(&self.t),
            bits(&self.z),
            bits(&self.norm),
            bits(&self.factor),
            bits(&self.dx),
            bits(&self.da),
            bits(&self.db),
            bits(&self.dm),
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

fn rows(lead: &[usize], last: usize) -> Vec<usize> {
    lead.iter().copied().chain([last]).collect()
}

/// Forward then backward through the `_into` forms, every output poisoned first (dA, dB, dm hold the
/// earlier gradients when the case accumulates).
fn run<T: Element, A: Element>(dev: &Device, c: &Case<T, A>) -> Out<T, A> {
    let l = &c.l;
    let dropout = c.dropout;
    let Dims { n, k, r, .. } = l.d;
    let x = up(dev, &l.x, &rows(&l.lead, k));
    let w0 = up(dev, &l.w0, &[n, k]);
    let a = up(dev, &l.a, &[r, k]);
    let b = up(dev, &l.b, &[n, r]);
    let m = up(dev, &c.magnitude, &[n]);
    let bias = l.bias.as_ref().map(|v| up(dev, v, &[n]));
    let mut y = poisoned(dev, &rows(&l.lead, n));
    let mut saved = ops::DoraSaved {
        t: poisoned(dev, &rows(&l.lead, r)),
        z: poisoned(dev, &rows(&l.lead, n)),
        norm: poisoned(dev, &[n]),
        factor: poisoned(dev, &[n]),
    };
    let mut ws = ops::Workspace::new();
    ops::dora_forward_into(
        &x,
        &w0,
        &a,
        &b,
        &m,
        bias.as_ref(),
        l.scale,
        dropout,
        &mut y,
        &mut saved,
        &mut ws,
    )
    .unwrap();
    let dy = up(dev, &l.dy, &rows(&l.lead, n));
    let mut dx = poisoned(dev, &rows(&l.lead, k));
    let (mut da, mut db, mut dm, mode) = match &c.grads0 {
        None => (
            poisoned(dev, &[r, k]),
            poisoned(dev, &[n, r]),
            poisoned(dev, &[n]),
            ops::GradMode::Overwrite,
        ),
        Some((da0, db0, dm0)) => (
            up(dev, da0, &[r, k]),
            up(dev, db0, &[n, r]),
            up(dev, dm0, &[n]),
            ops::GradMode::Accumulate,
        ),
    };
    ops::dora_backward_into(
        &x,
        &w0,
        &a,
        &b,
        &saved,
        &dy,
        l.scale,
        dropout,
        Some(&mut dx),
        &mut da,
        &mut db,
        &mut dm,
        mode,
        &mut ws,
    )
    .unwrap();
    Out {
        y: y.to_vec().unwrap(),
        t: saved.t.to_vec().unwrap(),
        z: saved.z.to_vec().unwrap(),
        norm: saved.norm.to_vec().unwrap(),
        factor: saved.factor.to_vec().unwrap(),
        dx: dx.to_vec().unwrap(),
        da: da.to_vec().unwrap(),
        db: db.to_vec().unwrap(),
        dm: dm.to_vec().unwrap(),
    }
}

fn fail(what: &str, d: Dims, name: &str, msg: String) -> ! {
    panic!(
        "{what} {d:?}: `{name}` {msg} (data: LK_TEST_SEED={})",
        common::seed()
    )
}

/// Every check of one run's outputs (see the file's comment).
fn check<T: Element, A: Element>(what: &str, c: &Case<T, A>, o: &Out<T, A>) {
    let l = &c.l;
    let d = l.d;
    let (n, s) = (d.n, l.scale as f64);
    let tol = tol(T::DTYPE);
    let rel = |name: &str, err: f64, tol: f64| {
        if !within(err, tol) {
            fail(what, d, name, format!("relative error {err:e} > {tol:e}"));
        }
    };
    let exact = reference::dora_forward(
        &l.x,
        &l.w0,
        &l.a,
        &l.b,
        &c.magnitude,
        l.bias.as_deref(),
        d,
        s,
    );
    // norms and factors: f32 sums of squares per 128 columns, f64 across, one rounding each, and the
    // merged values' own f32 errors where W0 and s·B·A cancel (common::dora_norm_slack)
    let slack = common::dora_norm_slack(&l.w0, &l.a, &l.b, n, d.k, d.r, s, &exact.norm);
    for (j, slack_j) in slack.iter().enumerate() {
        let (g, w) = (o.norm[j] as f64, exact.norm[j]);
        if !within((g - w).abs(), *slack_j) {
            fail(
                what,
                d,
                "norm",
                format!("[{j}] = {g}, exact {w}, slack {slack_j:e}"),
            );
        }
        let (g, w) = (o.factor[j] as f64, exact.factor[j]);
        let rel = slack_j / exact.norm[j] + 2f64.powi(-23);
        if !within((g - w).abs(), rel * w.abs()) {
            fail(what, d, "factor", format!("[{j}] = {g}, exact {w}"));
        }
    }
    // T and the fused forward's Z = X·W0ᵀ + s·T·Bᵀ: the plain LoRA forward's contract (with the
    // adapter's dropout, no bias); with dropout the saved Z is that minus D = (X − dropout(X))·W0ᵀ
    let dropout = c.dropout;
    let f = reference::forward_as_kernels(&l.x, &l.w0, &l.a, &l.b, None, d, s, &dropout);
    rel("t", reference::relative_error(&o.t, &f.t), tol);
    let res = residual_gemm(&l.x, &l.w0, d, &dropout);
    let z_contract: Vec<f64> = f.y.iter().zip(&res).map(|(z, r)| z - r).collect();
    let z_size: Vec<f64> =
        f.y.iter()
            .zip(&res)
            .map(|(z, r)| z.abs() + r.abs())
            .collect();
    let z_got: Vec<f64> = o.z.iter().map(|v| v.to_f64()).collect();
    rel("z", relative_to(&z_got, &z_contract, &z_size), tol);
    // Y from the kernels' own Z and factor: round(fma(factor, z, bias)) bit for bit (without dropout:
    // with it, Y comes from Z and D, which are scratch)
    for (e, got) in o.y.iter().enumerate() {
        if dropout.is_active() {
            break;
        }
        let bias = l.bias.as_ref().map_or(0.0, |b| b[e % n].to_f64() as f32);
        let want = T::from_f64(o.factor[e % n].mul_add(o.z[e].to_f64() as f32, bias) as f64);
        if common::bits(&[*got]) != common::bits(&[want]) {
            fail(what, d, "y", format!("[{e}] = {got:?}, fma gives {want:?}"));
        }
    }
    // Y end to end: the factors (checked above against the exact ones, within the f32 slack that rows
    // whose W0 and s·B·A cancel need) on the contract's Z (T rounded, as the plain forward's) and D,
    // f·Z + (1 − f)·D + bias, the error relative to the terms' size |f·Z| + |(1 − f)·D| + |bias| (Z's
    // rounding is relative to Z, not to a Y where the bias cancels f·Z)
    let bias_of = |e: usize| l.bias.as_ref().map_or(0.0, |b| b[e % n].to_f64());
    let fac = |e: usize| o.factor[e % n] as f64;
    let y_contract: Vec<f64> = (0..d.m * n)
        .map(|e| fac(e) * f.y[e] + (1.0 - fac(e)) * res[e] + bias_of(e))
        .collect();
    let y_size: Vec<f64> = (0..d.m * n)
        .map(|e| (fac(e) * f.y[e]).abs() + ((1.0 - fac(e)) * res[e]).abs() + bias_of(e).abs())
        .collect();
    let y_got: Vec<f64> = o.y.iter().map(|v| v.to_f64()).collect();
    rel("y", relative_to(&y_got, &y_contract, &y_size), tol);

    // backward: dZ = round(factor·dY), then the plain backward's contract with the kernels' T
    let dz: Vec<T> =
        l.dy.iter()
            .enumerate()
            .map(|(e, g)| T::from_f64((o.factor[e % n] * g.to_f64() as f32) as f64))
            .collect();
    let g = reference::backward_as_kernels(&l.x, &l.w0, &l.a, &l.b, &o.t, &dz, d, s, &dropout);
    // with dropout, dX also takes ((1 − f)·dY rounded)·W0 under the residual's mask
    let dx_res = if dropout.is_active() {
        let rest: Vec<T> =
            l.dy.iter()
                .enumerate()
                .map(|(e, g)| T::from_f64(((1.0 - o.factor[e % n]) * g.to_f64() as f32) as f64))
                .collect();
        let mut p = vec![0.0; d.m * d.k];
        for i in 0..d.m {
            for j in 0..n {
                let v = rest[i * n + j].to_f64();
                for q in 0..d.k {
                    p[i * d.k + q] += v * l.w0[j * d.k + q].to_f64();
                }
            }
        }
        masked_residual(&p, &dropout)
    } else {
        vec![0.0; d.m * d.k]
    };
    let dx_contract: Vec<f64> = g.dx.iter().zip(&dx_res).map(|(a, b)| a + b).collect();
    let dx_size: Vec<f64> =
        g.dx.iter()
            .zip(&dx_res)
            .map(|(a, b)| a.abs() + b.abs())
            .collect();
    let mut dm = reference::dora_magnitude_grad(&l.dy, &o.z, &o.norm, d.m, n);
    // dm end to end: the contract's Z (T rounded, minus D) and the norms (checked above)
    let mut dm_contract: Vec<f64> = (0..n)
        .map(|j| {
            (0..d.m)
                .map(|i| l.dy[i * n + j].to_f64() * z_contract[i * n + j])
                .sum::<f64>()
                / o.norm[j] as f64
        })
        .collect();
    // its size: the old gradient's and this call's terms' (Z's rounding is relative to them, not to a sum
    // where they cancel)
    let mut dm_size: Vec<f64> = (0..n)
        .map(|j| {
            (0..d.m)
                .map(|i| (l.dy[i * n + j].to_f64() * z_size[i * n + j]).abs())
                .sum::<f64>()
                / o.norm[j] as f64
        })
        .collect();
    let (mut da, mut db) = (g.da, g.db);
    if let Some((da0, db0, dm0)) = &c.grads0 {
        for (want, old) in da.iter_mut().zip(da0).chain(db.iter_mut().zip(db0)) {
            *want += old.to_f64();
        }
        for (j, old) in dm0.iter().enumerate() {
            dm[j] += *old as f64;
            dm_contract[j] += *old as f64;
            dm_size[j] += old.abs() as f64;
        }
    }
    let dx_got: Vec<f64> = o.dx.iter().map(|v| v.to_f64()).collect();
    rel("dx", relative_to(&dx_got, &dx_contract, &dx_size), tol);
    rel("da", reference::relative_error(&o.da, &da), tol);
    rel("db", reference::relative_error(&o.db, &db), tol);
    // dm from the kernels' Z and norms: f32 sums of at most LK_DORA_ROWS products, then f64
    for (j, want) in dm.iter().enumerate() {
        let mass: f64 = (0..d.m)
            .map(|i| (l.dy[i * n + j].to_f64() * o.z[i * n + j].to_f64()).abs())
            .sum::<f64>()
            / o.norm[j] as f64;
        let old = c.grads0.as_ref().map_or(0.0, |g| g.2[j].abs() as f64);
        let err = (o.dm[j] as f64 - want).abs();
        if !within(err, 1e-5 * (mass + old) + 1e-30) {
            fail(
                what,
                d,
                "dmagnitude",
                format!("[{j}] = {}, want {want}", o.dm[j]),
            );
        }
    }
    let dm_got: Vec<f64> = o.dm.iter().map(|v| *v as f64).collect();
    rel(
        "dmagnitude",
        relative_to(&dm_got, &dm_contract, &dm_size),
        tol,
    );
    if dropout.is_active() {
        peft_form(
            what,
            c,
            o,
            &dropout,
            &f.y,
            &g.u,
            (&y_size, &dx_size, &dm_size),
        );
    }
}

/// With dropout, Y, dX and dm against PEFT's expression as written (not the kernels' regrouping), on the
/// kernels' factors, the contract's T (rounded) and U, Xd exact: `Y = X·W0ᵀ + bias + (f − 1)⊙(Xd·W0ᵀ) +
/// f⊙s·T·Bᵀ`, `dX = dY·W0 + dropout'((f − 1)⊙dY·W0 + s·U·A)`, `dm = Σ dY⊙(Xd·W0ᵀ + s·T·Bᵀ) / norm`,
/// relative to the same term sizes as the contract checks.
#[allow(clippy::too_many_arguments)]
fn peft_form<T: Element, A: Element>(
    what: &str,
    c: &Case<T, A>,
    o: &Out<T, A>,
    dropout: &Dropout,
    z_contract: &[f64],
    u: &[f64],
    (y_size, dx_size, dm_size): (&[f64], &[f64], &[f64]),
) {
    let l = &c.l;
    let Dims { m, n, k, r } = l.d;
    let s = l.scale as f64;
    let tol = tol(T::DTYPE);
    let x: Vec<f64> = l.x.iter().map(|v| v.to_f64()).collect();
    let w0: Vec<f64> = l.w0.iter().map(|v| v.to_f64()).collect();
    let xd: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(e, v)| {
            if dropout.keeps(e as u64) {
                v * dropout.keep_scale()
            } else {
                0.0
            }
        })
        .collect();
    let nt = |p: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|q| p[i * k + q] * w0[j * k + q]).sum();
            }
        }
        out
    };
    let (base, base_dropped) = (nt(&x), nt(&xd));
    let f = |e: usize| o.factor[e % n] as f64;
    let bias = |e: usize| l.bias.as_ref().map_or(0.0, |b| b[e % n].to_f64());
    // s·T·Bᵀ of the contract's T: its Z less X·W0ᵀ
    let low = |e: usize| z_contract[e] - base[e];
    let y: Vec<f64> = (0..m * n)
        .map(|e| base[e] + bias(e) + (f(e) - 1.0) * base_dropped[e] + f(e) * low(e))
        .collect();
    let y_got: Vec<f64> = o.y.iter().map(|v| v.to_f64()).collect();
    let err = relative_to(&y_got, &y, y_size);
    if !within(err, tol) {
        fail(
            what,
            l.d,
            "y (PEFT's form)",
            format!("relative error {err:e}"),
        );
    }
    let dm: Vec<f64> = (0..n)
        .map(|j| {
            (0..m)
                .map(|i| l.dy[i * n + j].to_f64() * (base_dropped[i * n + j] + low(i * n + j)))
                .sum::<f64>()
                / o.norm[j] as f64
                + c.grads0.as_ref().map_or(0.0, |g| g.2[j] as f64)
        })
        .collect();
    let dm_got: Vec<f64> = o.dm.iter().map(|v| *v as f64).collect();
    let err = relative_to(&dm_got, &dm, dm_size);
    if !within(err, tol) {
        fail(
            what,
            l.d,
            "dmagnitude (PEFT's form)",
            format!("relative error {err:e}"),
        );
    }
    // dX: dY·W0 + dropout'((f − 1)⊙dY·W0 + s·U·A), U of dZ = round(f·dY) (the contract's)
    let a: Vec<f64> =
        l.a.iter()
            .map(|v| T::from_f64(v.to_f64()).to_f64())
            .collect();
    let mut dx = vec![0.0; m * k];
    for i in 0..m {
        for q in 0..k {
            let (mut plain, mut inner) = (0.0, 0.0);
            for j in 0..n {
                let g = l.dy[i * n + j].to_f64();
                plain += g * w0[j * k + q];
                inner += (f(i * n + j) - 1.0) * g * w0[j * k + q];
            }
            inner += s * (0..r).map(|t| u[i * r + t] * a[t * k + q]).sum::<f64>();
            let e = i * k + q;
            let kept = if dropout.keeps(e as u64) {
                inner * dropout.keep_scale()
            } else {
                0.0
            };
            dx[e] = plain + kept;
        }
    }
    let dx_got: Vec<f64> = o.dx.iter().map(|v| v.to_f64()).collect();
    let err = relative_to(&dx_got, &dx, dx_size);
    if !within(err, tol) {
        fail(
            what,
            l.d,
            "dx (PEFT's form)",
            format!("relative error {err:e}"),
        );
    }
}

/// ‖got − want‖ / ‖size‖: an error relative to the size of the terms that made `want` (NaN never passes).
fn relative_to(got: &[f64], want: &[f64], size: &[f64]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = size.iter().map(|v| v * v).sum();
    let err = (diff / norm).sqrt();
    if err.is_nan() { f64::INFINITY } else { err }
}

/// `err ≤ bound`, false for NaN.
fn within(err: f64, bound: f64) -> bool {
    err <= bound
}

/// `v − dropout(v)` in f64: v where the mask drops an element, `v·(1 − 1/(1 − p))` where it keeps one
/// (v dense, of the mask's element indices).
fn masked_residual(v: &[f64], dropout: &Dropout) -> Vec<f64> {
    let kept = 1.0 - dropout.keep_scale();
    v.iter()
        .enumerate()
        .map(|(e, &x)| if dropout.keeps(e as u64) { x * kept } else { x })
        .collect()
}

/// D = (X − dropout(X))·W0ᵀ in f64 from X rounded as the kernels round it (the residual in the layer
/// dtype); zeros without dropout.
fn residual_gemm<T: Element>(x: &[T], w0: &[T], d: Dims, dropout: &Dropout) -> Vec<f64> {
    let mut out = vec![0.0; d.m * d.n];
    if !dropout.is_active() {
        return out;
    }
    let xr: Vec<f64> = masked_residual(&x.iter().map(|v| v.to_f64()).collect::<Vec<_>>(), dropout)
        .into_iter()
        .map(|v| T::from_f64(v).to_f64())
        .collect();
    for i in 0..d.m {
        for j in 0..d.n {
            out[i * d.n + j] = (0..d.k)
                .map(|q| xr[i * d.k + q] * w0[j * d.k + q].to_f64())
                .sum();
        }
    }
    out
}

/// On the ascending thread order and one other (by `stream`): the checks, and the same bits; on the GPU
/// too where there is one.
fn run_case<T: Element, A: Element>(c: &Case<T, A>, stream: u64) {
    let d = c.l.d;
    if !common::gpu_only() {
        let emus = common::emulators_for(stream);
        let first = run(&emus[0], c);
        check("emulator", c, &first);
        let other = &emus[1 + (stream % 3) as usize];
        let second = run(other, c);
        assert!(
            first.bits() == second.bits(),
            "{} {d:?}: results differ between thread orders (a race): {other:?}",
            T::DTYPE
        );
    }
    if let Some(gpu) = common::gpu() {
        let on_gpu = run(&gpu, c);
        check("gpu", c, &on_gpu);
        assert!(
            on_gpu.bits() == run(&gpu, c).bits(),
            "GPU run not repeatable"
        );
    }
}

fn case<T: Element, A: Element>(d: Dims, scale: f32, bias: bool, accumulate: bool, stream: u64) {
    case_with::<T, A>(d, scale, bias, accumulate, 0.0, stream)
}

fn case_with<T: Element, A: Element>(
    d: Dims,
    scale: f32,
    bias: bool,
    accumulate: bool,
    p: f32,
    stream: u64,
) {
    let mut rng = Rng::new(stream);
    let dropout = Dropout::new(p, stream.rotate_left(17), stream % 1000).unwrap();
    let l = Layer::<T, A>::random(&mut rng, d, scale, bias);
    let magnitude = magnitude_for(&l, &mut rng);
    let grads0 = accumulate.then(|| {
        (
            rng.vec(d.r * d.k, 0.5),
            rng.vec(d.n * d.r, 0.5),
            rng.vec::<f32>(d.n, 1.0),
        )
    });
    run_case(
        &Case {
            l,
            magnitude,
            grads0,
            dropout,
        },
        stream,
    );
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // 64 shapes: each of the four (layer, adapter) dtype pairs about 16 times
        cases: common::proptest_cases(64),
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// M in 1..=200 (up to 4 row blocks of the column passes, M ≤ 16 on the small-M forward), N and K in
    /// 1..=300, r in 1..=128, bias or none, overwrite or accumulate, LoRA dropout (p 0 in half the
    /// cases, else up to 0.9).
    #[test]
    fn dora_layer_matches_reference(
        (d, _) in dims(200),
        scale in -4.0f32..4.0,
        bias in any::<bool>(),
        accumulate in any::<bool>(),
        p in prop_oneof![Just(0.0f32), 0.01f32..0.9],
        pair in 0..4u8,
        stream in any::<u64>(),
    ) {
        match pair {
            0 => case_with::<bf16, bf16>(d, scale, bias, accumulate, p, stream),
            1 => case_with::<bf16, f32>(d, scale, bias, accumulate, p, stream),
            2 => case_with::<f16, f16>(d, scale, bias, accumulate, p, stream),
            _ => case_with::<f16, f32>(d, scale, bias, accumulate, p, stream),
        }
    }
}

/// Ragged edges of the column passes: one row, 2^k ± 1 rows and columns (a partial row block, a partial
/// column block), K and r of 1.
#[test]
fn dora_layer_edge_shapes() {
    for (i, (m, n, k, r)) in [
        (1, 1, 1, 1),
        (1, 257, 33, 3),
        (63, 255, 1, 1),
        (65, 257, 65, 17),
        (129, 31, 127, 128),
    ]
    .into_iter()
    .enumerate()
    {
        let d = Dims { m, n, k, r };
        case::<bf16, f32>(d, 2.0, i % 2 == 0, i % 3 == 0, 1000 + i as u64);
        case::<f16, f16>(d, -0.5, i % 2 == 1, i % 3 == 1, 2000 + i as u64);
        // with dropout: a ragged last group of 4 mask elements where M·K is odd
        case_with::<bf16, bf16>(d, 1.5, i % 2 == 1, i % 3 == 2, 0.3, 3000 + i as u64);
        case_with::<f16, f32>(d, 0.75, i % 2 == 0, i % 3 == 0, 0.1, 4000 + i as u64);
    }
}

/// The allocating forms give the `_into` forms' bits, on activations with leading dimensions [2, 3, 11].
#[test]
fn dora_forward_and_backward_allocate_as_into() {
    let d = Dims {
        m: 66,
        n: 40,
        k: 24,
        r: 8,
    };
    let mut rng = Rng::new(7);
    let l = Layer::<bf16, f32>::random(&mut rng, d, 1.5, true).with_lead(vec![2, 3, 11]);
    let magnitude = magnitude_for(&l, &mut rng);
    let c = Case {
        l,
        magnitude,
        grads0: None,
        dropout: Dropout::NONE,
    };
    let dev = Device::emulator();
    let want = run(&dev, &c);
    let l = &c.l;
    let x = up(&dev, &l.x, &[2, 3, 11, d.k]);
    let w0 = up(&dev, &l.w0, &[d.n, d.k]);
    let a = up(&dev, &l.a, &[d.r, d.k]);
    let b = up(&dev, &l.b, &[d.n, d.r]);
    let m = up(&dev, &c.magnitude, &[d.n]);
    let bias = up(&dev, l.bias.as_ref().unwrap(), &[d.n]);
    let f = ops::dora_forward(&x, &w0, &a, &b, &m, Some(&bias), l.scale).unwrap();
    assert_eq!(f.y.shape(), &[2, 3, 11, d.n]);
    assert_eq!(f.y.to_vec().unwrap(), want.y);
    assert_eq!(f.saved.z.to_vec().unwrap(), want.z);
    let dy = up(&dev, &l.dy, &[2, 3, 11, d.n]);
    let g = ops::dora_backward(&x, &w0, &a, &b, &f.saved, &dy, l.scale, true).unwrap();
    assert_eq!(g.dx.unwrap().to_vec().unwrap(), want.dx);
    assert_eq!(g.da.to_vec().unwrap(), want.da);
    assert_eq!(g.db.to_vec().unwrap(), want.db);
    assert_eq!(
        common::bits(&g.dmagnitude.to_vec().unwrap()),
        common::bits(&want.dm)
    );
    let g = ops::dora_backward(&x, &w0, &a, &b, &f.saved, &dy, l.scale, false).unwrap();
    assert!(g.dx.is_none());
    assert_eq!(g.da.to_vec().unwrap(), want.da);
}

/// With magnitude = the norms, the factors are 1 (to rounding) and the layer is plain LoRA's: the DoRA
/// forward's Y equals `lora_forward`'s within a few ulps, and dA, dB, dX its backward's.
#[test]
fn dora_with_unit_factors_is_plain_lora() {
    let d = Dims {
        m: 40,
        n: 24,
        k: 32,
        r: 4,
    };
    let mut rng = Rng::new(11);
    let l = Layer::<f16, f16>::random(&mut rng, d, 1.0, false);
    let dev = Device::emulator();
    let x = up(&dev, &l.x, &[d.m, d.k]);
    let w0 = up(&dev, &l.w0, &[d.n, d.k]);
    let a = up(&dev, &l.a, &[d.r, d.k]);
    let b = up(&dev, &l.b, &[d.n, d.r]);
    let norms = ops::dora_factor(&w0, &a, &b, &up(&dev, &vec![1.0f32; d.n], &[d.n]), 1.0)
        .unwrap()
        .to_vec()
        .unwrap()
        .iter()
        .map(|f| 1.0 / f)
        .collect::<Vec<f32>>();
    let m = up(&dev, &norms, &[d.n]);
    let fd = ops::dora_forward(&x, &w0, &a, &b, &m, None, 1.0).unwrap();
    let fl = ops::lora_forward(&x, &w0, &a, &b, None, 1.0).unwrap();
    for f in fd.saved.factor.to_vec().unwrap() {
        assert!((f - 1.0).abs() < 1e-6, "factor {f}");
    }
    assert_eq!(fd.saved.z.to_vec().unwrap(), fl.y.to_vec().unwrap());
    let dy = up(&dev, &l.dy, &[d.m, d.n]);
    let gd = ops::dora_backward(&x, &w0, &a, &b, &fd.saved, &dy, 1.0, true).unwrap();
    let gl = ops::lora_backward(&x, &w0, &a, &b, &fl.t, &dy, 1.0, true).unwrap();
    let close = |name: &str, p: Vec<f16>, q: Vec<f16>| {
        let q: Vec<f64> = q.iter().map(|v| v.to_f64()).collect();
        let err = reference::relative_error(&p, &q);
        assert!(err < 2e-3, "{name}: {err}");
    };
    close("y", fd.y.to_vec().unwrap(), fl.y.to_vec().unwrap());
    close(
        "dx",
        gd.dx.unwrap().to_vec().unwrap(),
        gl.dx.unwrap().to_vec().unwrap(),
    );
    close("da", gd.da.to_vec().unwrap(), gl.da.to_vec().unwrap());
    close("db", gd.db.to_vec().unwrap(), gl.db.to_vec().unwrap());
}

/// Bad input: an `Error` naming the argument before any launch (the emulator's launch record is empty
/// after each refusal), so no output is touched: wrong shapes, dtypes, a non-finite scale, and every
/// tensor on another device, in the forward and in the accumulating backward.
#[test]
fn dora_layer_bad_input_is_refused() {
    let dev = Device::emulator();
    let other = Device::emulator();
    let (m, n, k, r) = (5, 6, 8, 2);
    let ones = |d: &Device, shape: &[usize]| {
        let len = shape.iter().product();
        Tensor::<bf16>::from_slice(d, &vec![bf16::ONE; len], shape).unwrap()
    };
    let f32s =
        |d: &Device, len: usize| Tensor::<f32>::from_slice(d, &vec![1.0; len], &[len]).unwrap();
    let x = ones(&dev, &[m, k]);
    let w0 = ones(&dev, &[n, k]);
    let a = ones(&dev, &[r, k]);
    let b = ones(&dev, &[n, r]);
    let mag = f32s(&dev, n);
    let arg_of = |e: Error| match e {
        Error::Shape { arg, .. }
        | Error::DeviceMismatch { arg, .. }
        | Error::NonFinite { arg, .. }
        | Error::UnsupportedDType { arg, .. } => arg,
        other => panic!("unexpected error {other:?}"),
    };
    // the refusal's argument, with no launch before it
    let refused = |e: Error| {
        let launched = dev.take_launches();
        assert!(
            launched.is_empty(),
            "launched before refusing: {launched:?}"
        );
        arg_of(e)
    };
    dev.take_launches();
    let fwd = |mag: &Tensor<f32>, s: f32| ops::dora_forward(&x, &w0, &a, &b, mag, None, s);
    assert_eq!(
        refused(fwd(&f32s(&dev, n - 1), 1.0).unwrap_err()),
        "magnitude"
    );
    assert_eq!(
        refused(fwd(&f32s(&other, n), 1.0).unwrap_err()),
        "magnitude"
    );
    assert_eq!(refused(fwd(&mag, f32::NAN).unwrap_err()), "scale");
    let e = ops::dora_forward(&x, &w0, &a, &b, &mag, Some(&ones(&dev, &[n + 1])), 1.0);
    assert_eq!(refused(e.unwrap_err()), "bias");
    let e = ops::dora_forward(&x, &w0, &a, &b, &mag, Some(&ones(&other, &[n])), 1.0);
    assert_eq!(refused(e.unwrap_err()), "bias");
    let e = ops::dora_forward(&x, &w0, &ones(&other, &[r, k]), &b, &mag, None, 1.0);
    assert_eq!(refused(e.unwrap_err()), "a");
    let x32 = Tensor::<f32>::zeros(&dev, &[m, k]).unwrap();
    let w32 = Tensor::<f32>::zeros(&dev, &[n, k]).unwrap();
    let a32 = Tensor::<f32>::zeros(&dev, &[r, k]).unwrap();
    let b32 = Tensor::<f32>::zeros(&dev, &[n, r]).unwrap();
    let e = ops::dora_forward(&x32, &w32, &a32, &b32, &mag, None, 1.0).unwrap_err();
    assert_eq!(refused(e), "x");

    // into forms: a wrong output or saved buffer, and one on another device
    let mut ws = ops::Workspace::new();
    let forward =
        |y: &mut Tensor<bf16>, saved: &mut ops::DoraSaved<bf16>, ws: &mut ops::Workspace<bf16>| {
            ops::dora_forward_into(
                &x,
                &w0,
                &a,
                &b,
                &mag,
                None,
                1.0,
                Dropout::NONE,
                y,
                saved,
                ws,
            )
        };
    let saved_on = |d: &Device, n: usize| ops::DoraSaved {
        t: ones(d, &[m, r]),
        z: ones(d, &[m, n]),
        norm: f32s(d, n),
        factor: f32s(d, n),
    };
    let mut y = ones(&dev, &[m, n]);
    for (mut saved, arg) in [
        (saved_on(&dev, n + 1), "saved.z"),
        (
            ops::DoraSaved {
                t: ones(&other, &[m, r]),
                ..saved_on(&dev, n)
            },
            "saved.t",
        ),
        (
            ops::DoraSaved {
                z: ones(&other, &[m, n]),
                ..saved_on(&dev, n)
            },
            "saved.z",
        ),
    ] {
        let e = forward(&mut y, &mut saved, &mut ws);
        assert_eq!(refused(e.unwrap_err()), arg);
        assert!(
            saved.factor.to_vec().unwrap().iter().all(|v| *v == 1.0),
            "{arg}: factor written"
        );
    }
    for mut y_bad in [ones(&dev, &[m, n + 1]), ones(&other, &[m, n])] {
        let mut saved = saved_on(&dev, n);
        let e = forward(&mut y_bad, &mut saved, &mut ws);
        assert_eq!(refused(e.unwrap_err()), "y");
    }
    let mut saved = saved_on(&dev, n);
    forward(&mut y, &mut saved, &mut ws).unwrap();
    dev.take_launches();

    // the accumulating backward: dA, dB, dm keep their values when refused
    let dy = ones(&dev, &[m, n]);
    let backward = |dy: &Tensor<bf16>,
                    dx: Option<&mut Tensor<bf16>>,
                    da: &mut Tensor<bf16>,
                    db: &mut Tensor<bf16>,
                    dm: &mut Tensor<f32>,
                    ws: &mut ops::Workspace<bf16>| {
        ops::dora_backward_into(
            &x,
            &w0,
            &a,
            &b,
            &saved,
            dy,
            1.0,
            Dropout::NONE,
            dx,
            da,
            db,
            dm,
            ops::GradMode::Accumulate,
            ws,
        )
    };
    let untouched = |da: &Tensor<bf16>, db: &Tensor<bf16>, dm: &Tensor<f32>, arg: &str| {
        let one = |v: Vec<bf16>| v.iter().all(|x| *x == bf16::ONE);
        assert!(
            one(da.to_vec().unwrap()) && one(db.to_vec().unwrap()),
            "{arg}: dA/dB written"
        );
        assert!(
            dm.to_vec().unwrap().iter().all(|v| *v == 1.0),
            "{arg}: dm written"
        );
    };
    let (mut da, mut db, mut dm) = (ones(&dev, &[r, k]), ones(&dev, &[n, r]), f32s(&dev, n));
    for (d, arg) in [(&dev, "shape"), (&other, "device")] {
        let mut da_bad = ones(d, &[r, k + usize::from(arg == "shape")]);
        let e = backward(&dy, None, &mut da_bad, &mut db, &mut dm, &mut ws);
        assert_eq!(refused(e.unwrap_err()), "da");
        let mut db_bad = ones(d, &[n + usize::from(arg == "shape"), r]);
        let e = backward(&dy, None, &mut da, &mut db_bad, &mut dm, &mut ws);
        assert_eq!(refused(e.unwrap_err()), "db");
        let mut dx_bad = ones(d, &[m, k + usize::from(arg == "shape")]);
        let e = backward(&dy, Some(&mut dx_bad), &mut da, &mut db, &mut dm, &mut ws);
        assert_eq!(refused(e.unwrap_err()), "dx");
        let dy_bad = ones(d, &[m, n + usize::from(arg == "shape")]);
        let e = backward(&dy_bad, None, &mut da, &mut db, &mut dm, &mut ws);
        assert_eq!(refused(e.unwrap_err()), "dy");
        let mut dm_bad = f32s(d, n + usize::from(arg == "shape"));
        let e = backward(&dy, None, &mut da, &mut db, &mut dm_bad, &mut ws);
        assert_eq!(refused(e.unwrap_err()), "dmagnitude");
        untouched(&da, &db, &dm, arg);
    }
    let wrong_t = ops::DoraSaved {
        t: ones(&dev, &[m, r + 1]),
        ..saved_on(&dev, n)
    };
    let e = ops::dora_backward(&x, &w0, &a, &b, &wrong_t, &dy, 1.0, true).unwrap_err();
    assert_eq!(refused(e), "t");
    // and a valid call then adds to them
    backward(&dy, None, &mut da, &mut db, &mut dm, &mut ws).unwrap();
    assert!(
        dm.to_vec().unwrap().iter().all(|v| *v != 1.0),
        "accumulated"
    );
}

/// PEFT's own DoRA layer (tests/fixtures/peft/dora_layer, made by scripts/make_dora_layer_fixture.py with
/// PEFT 0.21.2 in f64, train mode; layer.safetensors without dropout, dropout.safetensors with LoRA
/// dropout under the crate's mask): its forward and its gradients of lora_A, lora_B, the magnitude and X. The f64 reference equals them to 1e-12 (the same math, detached norm included); the
/// kernels (bf16 layer, f32 adapters) are within bf16's tolerance of them.
#[test]
fn dora_layer_matches_peft() {
    for file in ["layer", "dropout"] {
        let fx = common::Fixture::open(&format!("dora_layer/{file}.safetensors"));
        for case in ["case0", "case1"] {
            peft_case(&fx, file, case);
        }
    }
}

/// One case of a PEFT DoRA fixture: the f64 reference equals PEFT, the kernels are within 1e-2 of it.
fn peft_case(fx: &common::Fixture, file: &str, case: &str) {
    let case = &format!("{file} {case}");
    let key = |name: &str| format!("{}.{name}", case.split(' ').nth(1).unwrap());
    {
        let bf = |name: &str| fx.bf16(&key(name));
        let f32s = |name: &str| fx.f32(&key(name));
        let f64s = |name: &str| fx.f64(&key(name)).0;
        let (x, x_shape) = bf("x");
        let (w0, w_shape) = bf("w0");
        let (dy, _) = bf("dy");
        let (a, a_shape) = f32s("lora_A");
        let (b, _) = f32s("lora_B");
        let (magnitude, _) = f32s("magnitude");
        let bias = fx.names().contains(&key("bias")).then(|| bf("bias").0);
        // [p, seed, offset]: the crate's mask, which the fixture gave PEFT's dropout
        let dropout = if fx.names().contains(&key("dropout")) {
            let v = f64s("dropout");
            Dropout::new(v[0] as f32, v[1] as u64, v[2] as u64).unwrap()
        } else {
            Dropout::NONE
        };
        let scale = f64s("scale")[0];
        let (n, k, r) = (w_shape[0], w_shape[1], a_shape[0]);
        let m = x.len() / k;
        let d = Dims { m, n, k, r };
        let want = |name: &str| f64s(name);

        // the f64 reference is PEFT's layer
        let f = reference::dora_forward_dropout(
            &x,
            &w0,
            &a,
            &b,
            &magnitude,
            bias.as_deref(),
            d,
            scale,
            &dropout,
        );
        let g =
            reference::dora_backward_dropout(&x, &w0, &a, &b, &magnitude, &dy, d, scale, &dropout);
        for (name, got, peft) in [
            ("y", &f.y, want("y")),
            ("grad_lora_A", &g.da, want("grad_lora_A")),
            ("grad_lora_B", &g.db, want("grad_lora_B")),
            ("grad_magnitude", &g.dmagnitude, want("grad_magnitude")),
            ("grad_x", &g.dx, want("grad_x")),
        ] {
            let err = relative_f64(got, &peft);
            assert!(
                err < 1e-12,
                "{case} reference {name}: relative error {err:e}"
            );
        }

        // the kernels
        for dev in common::all_devices() {
            let up_x = Tensor::from_slice(&dev, &x, &x_shape).unwrap();
            let w0 = Tensor::from_slice(&dev, &w0, &[n, k]).unwrap();
            let at = Tensor::from_slice(&dev, &a, &[r, k]).unwrap();
            let bt = Tensor::from_slice(&dev, &b, &[n, r]).unwrap();
            let mt = Tensor::from_slice(&dev, &magnitude, &[n]).unwrap();
            let bias_t = bias
                .as_ref()
                .map(|v| Tensor::from_slice(&dev, v, &[n]).unwrap());
            let mut lead = x_shape.clone();
            *lead.last_mut().unwrap() = n;
            let mut y = poisoned(&dev, &lead);
            let mut saved = ops::DoraSaved::for_layer(&up_x, n, r).unwrap();
            let mut ws = ops::Workspace::new();
            let s = scale as f32;
            ops::dora_forward_into(
                &up_x,
                &w0,
                &at,
                &bt,
                &mt,
                bias_t.as_ref(),
                s,
                dropout,
                &mut y,
                &mut saved,
                &mut ws,
            )
            .unwrap();
            let dyt = Tensor::from_slice(&dev, &dy, &lead).unwrap();
            let mut dx = poisoned(&dev, &x_shape);
            let (mut da, mut db) = (poisoned(&dev, &[r, k]), poisoned(&dev, &[n, r]));
            let mut dm = poisoned(&dev, &[n]);
            ops::dora_backward_into(
                &up_x,
                &w0,
                &at,
                &bt,
                &saved,
                &dyt,
                s,
                dropout,
                Some(&mut dx),
                &mut da,
                &mut db,
                &mut dm,
                ops::GradMode::Overwrite,
                &mut ws,
            )
            .unwrap();
            let errs = [
                (
                    "y",
                    reference::relative_error(&y.to_vec().unwrap(), &want("y")),
                ),
                (
                    "grad_lora_A",
                    reference::relative_error(&da.to_vec().unwrap(), &want("grad_lora_A")),
                ),
                (
                    "grad_lora_B",
                    reference::relative_error(&db.to_vec().unwrap(), &want("grad_lora_B")),
                ),
                (
                    "grad_magnitude",
                    reference::relative_error(&dm.to_vec().unwrap(), &want("grad_magnitude")),
                ),
                (
                    "grad_x",
                    reference::relative_error(&dx.to_vec().unwrap(), &want("grad_x")),
                ),
            ];
            for (name, err) in errs {
                assert!(
                    err <= 1e-2,
                    "{case} {}: {name} relative error {err:e} against PEFT",
                    dev.describe()
                );
            }
        }
    }
}

/// ‖got − want‖ / ‖want‖ of f64 values (NaN never passes).
fn relative_f64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    let err = (diff / norm).sqrt();
    if err.is_nan() { f64::INFINITY } else { err }
}
