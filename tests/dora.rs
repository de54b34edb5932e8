//! DoRA merge and unmerge (kernels/merge.cu, the dora_merge_* kernels and dora_factor_f32) through
//! `ops::dora_merge`, `dora_factor`, `safe_dora_merge`, `dora_unmerge`: property tests against the f64
//! reference for every (W dtype, adapter dtype) pair, the same bits under every thread order, PEFT's own
//! merge of a DoRA adapter (tests/fixtures/peft/dora), the unmerge contract, and the refusals.

mod common;

use common::{Fixture, Rng};
use half::{bf16, f16};
use lora_kernels::{DType, Device, Element, Error, Tensor, ops, reference};
use proptest::prelude::*;

struct Case<T, U> {
    w: Vec<T>,
    a: Vec<U>,
    b: Vec<U>,
    magnitude: Vec<f32>,
    nkr: (usize, usize, usize),
    scale: f32,
}

/// Random W0, A, B, and a magnitude near each merged row's norm (PEFT starts it at W0's row norms).
fn case<T: Element, U: Element>(nkr: (usize, usize, usize), scale: f32, stream: u64) -> Case<T, U> {
    let (n, k, r) = nkr;
    let mut rng = Rng::new(stream);
    let w: Vec<T> = rng.vec(n * k, 1.0);
    let a: Vec<U> = rng.vec(r * k, 1.0);
    let b: Vec<U> = rng.vec(n * r, 0.3 / (r as f64).sqrt());
    let magnitude = (0..n)
        .map(|i| {
            let norm = (0..k)
                .map(|j| w[i * k + j].to_f64().powi(2))
                .sum::<f64>()
                .sqrt();
            (norm * (1.0 + 0.5 * rng.uniform())) as f32
        })
        .collect();
    Case {
        w,
        a,
        b,
        magnitude,
        nkr,
        scale,
    }
}

fn upload<T: Element, U: Element>(
    dev: &Device,
    c: &Case<T, U>,
) -> (Tensor<T>, Tensor<U>, Tensor<U>, Tensor<f32>) {
    let (n, k, r) = c.nkr;
    (
        Tensor::from_slice(dev, &c.w, &[n, k]).unwrap(),
        Tensor::from_slice(dev, &c.a, &[r, k]).unwrap(),
        Tensor::from_slice(dev, &c.b, &[n, r]).unwrap(),
        Tensor::from_slice(dev, &c.magnitude, &[n]).unwrap(),
    )
}

/// The merged W0 and the factors on `dev`.
fn merged_on<T: Element, U: Element>(dev: &Device, c: &Case<T, U>) -> (Vec<T>, Vec<f32>) {
    let (mut w, a, b, m) = upload(dev, c);
    let factor = ops::dora_merge(&mut w, &a, &b, &m, c.scale).unwrap();
    (w.to_vec().unwrap(), factor.to_vec().unwrap())
}

/// The factors within 1e-5 relative of the exact ones (f32 sums of squares over 128 columns); the merged
/// elements within 1 ulp of the correctly rounded DoRA merge, or within the f32 arithmetic's error
/// where W and s·B·A cancel; f32 W within 1e-5 relative norm. The same bits under every thread order
/// and on the GPU's repeat.
fn check<T: Element, U: Element>(nkr: (usize, usize, usize), scale: f32, stream: u64) {
    let c = case::<T, U>(nkr, scale, stream);
    let (n, k, r) = nkr;
    let (exact, factor) =
        reference::dora_merge(&c.w, &c.a, &c.b, &c.magnitude, n, k, r, scale as f64);
    let d = reference::delta(&c.a, &c.b, n, k, r, scale as f64);
    let want: Vec<f64> = (0..n * k)
        .map(|e| factor[e / k] * (c.w[e].to_f64() + d[e]))
        .collect();
    let abs = |v: &[U]| -> Vec<U> { v.iter().map(|x| U::from_f64(x.to_f64().abs())).collect() };
    let size = reference::delta(&abs(&c.a), &abs(&c.b), n, k, r, scale.abs() as f64);
    let norm: Vec<f64> = factor
        .iter()
        .zip(&c.magnitude)
        .map(|(f, m)| *m as f64 / f)
        .collect();
    let norm_slack = common::dora_norm_slack(&c.w, &c.a, &c.b, n, k, r, scale as f64, &norm);
    let mut first: Option<(Vec<u32>, Vec<u32>)> = None;
    for dev in common::all_devices() {
        let (got, got_factor) = merged_on(&dev, &c);
        let what = format!(
            "{dev:?} W {} adapter {} {nkr:?} scale {scale}",
            T::DTYPE,
            U::DTYPE
        );
        for (i, (g, f)) in got_factor.iter().zip(&factor).enumerate() {
            // 1e-5, or the merged values' f32 errors where W0 and s·B·A cancel (common::dora_norm_slack)
            let rel = (*g as f64 - f).abs() / f.abs();
            let allowed = norm_slack[i] / norm[i] + 2f64.powi(-23);
            assert!(rel <= allowed, "{what}: factor {i} = {g}, exact {f}");
        }
        if T::DTYPE == DType::F32 {
            let err = reference::relative_error(&got, &want);
            assert!(err <= 1e-5, "{what}: relative error {err:e}");
        } else {
            for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
                let f = factor[i / k].abs();
                let slack = 2f64.powi(-20) * f * (c.w[i].to_f64().abs() + size[i]);
                let diff = (g.to_f64() - want[i]).abs();
                assert!(
                    reference::ulp_distance(*g, *e) <= 1 || diff <= slack,
                    "{what}: element {i} = {g:?}, correctly rounded {e:?} (exact {})",
                    want[i]
                );
            }
        }
        let bits = (common::bits(&got), common::bits(&got_factor));
        if dev.is_cuda() {
            assert!(
                merged_on(&dev, &c) == (got, got_factor),
                "{what}: GPU merge not repeatable"
            );
        } else {
            match &first {
                None => first = Some(bits),
                Some(f) => assert!(*f == bits, "{what}: differs between thread orders"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::proptest_cases(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn dora_merge_matches_reference(
        n in 1..=200usize, k in 1..=400usize, r in 1..=128usize,
        scale in -4.0f32..4.0, pair in 0..5u8, stream in any::<u64>(),
    ) {
        let nkr = (n, k, r);
        match pair {
            0 => check::<bf16, bf16>(nkr, scale, stream),
            1 => check::<bf16, f32>(nkr, scale, stream),
            2 => check::<f16, f16>(nkr, scale, stream),
            3 => check::<f16, f32>(nkr, scale, stream),
            _ => check::<f32, f32>(nkr, scale, stream),
        }
    }
}

/// Edge shapes: 1, 2^k ± 1, the tile (64 × 128) and one past it, rank 1 and 128, and rows of many
/// column blocks (K = 5000: 40 partial sums per row).
#[test]
fn dora_merge_edge_shapes() {
    for (i, &nkr) in [
        (1, 1, 1),
        (64, 128, 128),
        (65, 129, 33),
        (63, 127, 7),
        (2, 1000, 1),
        (3, 5000, 16),
    ]
    .iter()
    .enumerate()
    {
        check::<bf16, f32>(nkr, 2.0, 10 + i as u64);
        check::<f16, f16>(nkr, -1.0, 20 + i as u64);
        check::<f32, f32>(nkr, 0.5, 30 + i as u64);
    }
}

/// `dora_factor` gives the merge's factors and leaves W0 as it was.
#[test]
fn dora_factor_is_the_merges_and_reads_only() {
    let c = case::<bf16, f32>((70, 300, 12), 1.5, 41);
    for dev in common::all_devices() {
        let (w, a, b, m) = upload(&dev, &c);
        let f = ops::dora_factor(&w, &a, &b, &m, c.scale).unwrap();
        assert_eq!(common::bits(&w.to_vec().unwrap()), common::bits(&c.w));
        assert_eq!(
            common::bits(&f.to_vec().unwrap()),
            common::bits(&merged_on(&dev, &c).1)
        );
    }
}

/// PEFT's merge of its own DoRA adapter (tests/fixtures/peft/dora): ≥ 99.99 % of the merged elements
/// bit-exact and the rest within 1 ulp, the factors within 2 f32 ulps of PEFT's.
#[test]
fn dora_merge_matches_peft() {
    let dir = common::fixture("dora/adapter");
    let adapter = lora_kernels::peft::PeftAdapter::load(&dir).unwrap();
    assert!(adapter.config.use_dora);
    let base = Fixture::open("base.safetensors");
    let merged = Fixture::open("dora/merged.safetensors");
    let factors = Fixture::open("dora/dora_factor.safetensors");
    for dev in common::all_devices() {
        let (mut exact, mut total, mut max_ulp, mut factor_ulp) = (0usize, 0usize, 0u64, 0u64);
        for m in &adapter.modules {
            let key = format!("{}.weight", m.name);
            let (w0, shape) = base.bf16(&key);
            let (n, k, r) = (shape[0], shape[1], m.a.rows);
            let scale = adapter.config.scale_for(&m.name) as f32;
            let mag = m.magnitude.as_ref().expect("a DoRA module has a magnitude");
            let mut w = Tensor::from_slice(&dev, &w0, &[n, k]).unwrap();
            let at = Tensor::from_slice(&dev, &m.a.to_f32(), &[r, k]).unwrap();
            let bt = Tensor::from_slice(&dev, &m.b.to_f32(), &[n, r]).unwrap();
            let mt = Tensor::from_slice(&dev, &mag.to_f32(), &[n]).unwrap();
            let f = ops::dora_merge(&mut w, &at, &bt, &mt, scale).unwrap();
            for (g, p) in w.to_vec().unwrap().iter().zip(&merged.bf16(&key).0) {
                let d = reference::ulp_distance(*g, *p);
                exact += (d == 0) as usize;
                total += 1;
                max_ulp = max_ulp.max(d);
            }
            for (g, p) in f.to_vec().unwrap().iter().zip(&factors.f32(&m.name).0) {
                factor_ulp = factor_ulp.max(reference::ulp_distance(*g, *p));
            }
        }
        let frac = exact as f64 / total as f64;
        eprintln!(
            "{dev:?} DoRA merge vs PEFT: {exact}/{total} bit-exact ({:.4} %), max {max_ulp} ulp; factors max {factor_ulp} f32 ulp",
            100.0 * frac
        );
        assert_eq!(total, 40960, "8 modules of the fixture");
        assert!(
            frac >= 0.9999 && max_ulp <= 1,
            "{dev:?}: {:.4} % exact",
            100.0 * frac
        );
        assert!(
            factor_ulp <= 2,
            "{dev:?}: factors {factor_ulp} ulp from PEFT's"
        );
    }
}

/// Merge then unmerge with the merge's factors gives W0 back up to the roundings: f32 within 1e-6
/// relative norm, bf16 and f16 within their tolerance (1e-2, 1e-3), and every element of f32 W
/// within the merged value's rounding divided by its factor.
#[test]
fn dora_merge_then_unmerge() {
    fn round_trip<T: Element>(tol: f64, stream: u64) {
        let c = case::<T, f32>((67, 259, 9), 1.25, stream);
        let (n, k, _) = c.nkr;
        let want: Vec<f64> = c.w.iter().map(|v| v.to_f64()).collect();
        for dev in common::all_devices() {
            let (mut w, a, b, m) = upload(&dev, &c);
            let factor = ops::dora_merge(&mut w, &a, &b, &m, c.scale).unwrap();
            let merged = w.to_vec().unwrap();
            ops::dora_unmerge(&mut w, &a, &b, &factor, c.scale).unwrap();
            let back = w.to_vec().unwrap();
            let err = reference::relative_error(&back, &want);
            assert!(err <= tol, "{dev:?} {}: relative error {err:e}", T::DTYPE);
            assert_ne!(
                common::bits(&merged),
                common::bits(&back),
                "unmerge changed nothing"
            );
            // it divides by the factor first: with factors ½ it is the plain unmerge of 2·W (exact)
            let halves = Tensor::from_slice(&dev, &vec![0.5f32; n], &[n]).unwrap();
            let mut w1 = Tensor::from_slice(&dev, &merged, &[n, k]).unwrap();
            ops::dora_unmerge(&mut w1, &a, &b, &halves, c.scale).unwrap();
            let doubled: Vec<T> = merged
                .iter()
                .map(|v| T::from_f64(2.0 * v.to_f64()))
                .collect();
            let mut w2 = Tensor::from_slice(&dev, &doubled, &[n, k]).unwrap();
            ops::unmerge(&mut w2, &a, &b, c.scale).unwrap();
            assert_eq!(
                common::bits(&w1.to_vec().unwrap()),
                common::bits(&w2.to_vec().unwrap())
            );
        }
    }
    round_trip::<f32>(1e-6, 51);
    round_trip::<bf16>(1e-2, 52);
    round_trip::<f16>(1e-3, 53);
}

/// A row whose merged norm is 0 (W0 and B rows zero) gets m/0 = Inf and 0·Inf = NaN, as in PEFT:
/// `dora_merge` writes it and counts it, `safe_dora_merge` refuses and leaves W0 as it was; a NaN
/// magnitude likewise.
#[test]
fn dora_merge_refuses_nonfinite_results() {
    let mut c = case::<bf16, f32>((5, 40, 3), 1.0, 61);
    let (_, k, r) = c.nkr;
    for j in 0..k {
        c.w[2 * k + j] = bf16::ZERO;
    }
    for j in 0..r {
        c.b[2 * r + j] = 0.0;
    }
    let mut nan_mag = case::<bf16, f32>((5, 40, 3), 1.0, 62);
    nan_mag.magnitude[4] = f32::NAN;
    for dev in common::all_devices() {
        for (what, c) in [("zero row", &c), ("NaN magnitude", &nan_mag)] {
            let (mut w, a, b, m) = upload(&dev, c);
            let e = ops::safe_dora_merge(&mut w, &a, &b, &m, c.scale).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::NonFiniteMerge {
                        nan: 40,
                        inf: 0,
                        ..
                    }
                ),
                "{what}: {e}"
            );
            assert_eq!(
                common::bits(&w.to_vec().unwrap()),
                common::bits(&c.w),
                "{what}"
            );
            let (_, counts) = ops::dora_merge_counted(&mut w, &a, &b, &m, c.scale).unwrap();
            assert_eq!((counts.nan, counts.inf), (40, 0), "{what}");
        }
        // and a finite case passes, with the merge's bits
        let ok = case::<bf16, f32>((5, 40, 3), 1.0, 63);
        let (mut w, a, b, m) = upload(&dev, &ok);
        let (f, counts) = ops::safe_dora_merge(&mut w, &a, &b, &m, ok.scale).unwrap();
        assert_eq!(counts.created(), 0);
        let (want_w, want_f) = merged_on(&dev, &ok);
        assert_eq!(common::bits(&w.to_vec().unwrap()), common::bits(&want_w));
        assert_eq!(common::bits(&f.to_vec().unwrap()), common::bits(&want_f));
    }
}

/// Bad input: errors naming the argument, before any launch (W0 unchanged).
#[test]
fn dora_bad_input_is_refused() {
    let dev = Device::emulator();
    let c = case::<bf16, f32>((6, 20, 4), 1.0, 71);
    let (mut w, a, b, _) = upload(&dev, &c);
    let short = Tensor::from_slice(&dev, &[1.0f32; 5], &[5]).unwrap();
    let e = ops::dora_merge(&mut w, &a, &b, &short, 1.0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "magnitude",
                ..
            }
        ) && e.to_string().contains("[N]"),
        "{e}"
    );
    let e = ops::dora_unmerge(&mut w, &a, &b, &short, 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "factor", .. }), "{e}");
    let m = Tensor::from_slice(&dev, &c.magnitude, &[6]).unwrap();
    let e = ops::dora_merge(&mut w, &a, &b, &m, f32::NAN).unwrap_err();
    assert!(e.to_string().contains("scale"), "{e}");
    let other = Device::emulator();
    let m_other = Tensor::from_slice(&other, &c.magnitude, &[6]).unwrap();
    let e = ops::dora_merge(&mut w, &a, &b, &m_other, 1.0).unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch { .. }), "{e}");
    assert_eq!(common::bits(&w.to_vec().unwrap()), common::bits(&c.w));
}
