//! In-place merge / unmerge (kernels/merge.cu) through `ops::merge` / `ops::unmerge`: property tests
//! against the f64 reference for every supported (W dtype, adapter dtype) pair, identical bits under every
//! thread order, and the merge-then-unmerge contract in bf16 and f16.

mod common;

use common::{Rng, bits, ulp};
use half::{bf16, f16};
use lora_kernels::{Device, Element, Tensor, ops, reference};
use proptest::prelude::*;

fn merged_on<T: Element, U: Element>(
    dev: &Device,
    w: &[T],
    a: &[U],
    b: &[U],
    (n, k, r): (usize, usize, usize),
    scale: f32,
) -> Vec<T> {
    let mut wt = Tensor::from_slice(dev, w, &[n, k]).unwrap();
    let at = Tensor::from_slice(dev, a, &[r, k]).unwrap();
    let bt = Tensor::from_slice(dev, b, &[n, r]).unwrap();
    ops::merge(&mut wt, &at, &bt, scale).unwrap();
    wt.to_vec().unwrap()
}

/// Every element within 1 ulp of the correctly rounded merge (f32 arithmetic inside), f32 W within
/// 1e-5 relative norm; the same bits under every thread order and on the GPU's repeat.
fn check<T: Element, U: Element>(nkr: (usize, usize, usize), scale: f32, stream: u64) {
    let (n, k, r) = nkr;
    let mut rng = Rng::new(stream);
    let w: Vec<T> = rng.vec(n * k, 1.0);
    let a: Vec<U> = rng.vec(r * k, 1.0);
    let b: Vec<U> = rng.vec(n * r, 1.0 / (r as f64).sqrt());
    let exact = reference::merge(&w, &a, &b, n, k, r, scale as f64);
    let want: Vec<f64> = {
        let d = reference::delta(&a, &b, n, k, r, scale as f64);
        w.iter().zip(&d).map(|(w, d)| w.to_f64() + d).collect()
    };
    let abs = |v: &[U]| -> Vec<U> { v.iter().map(|x| U::from_f64(x.to_f64().abs())).collect() };
    let magnitude = reference::delta(&abs(&a), &abs(&b), n, k, r, scale.abs() as f64);
    // the emulators (not under LK_TEST_DEVICES=gpu), then the GPU if present
    let devices = common::all_devices();
    let mut first_bits: Option<Vec<u32>> = None;
    for dev in &devices {
        let got = merged_on(dev, &w, &a, &b, nkr, scale);
        let what = format!(
            "{dev:?} W {} adapter {} {nkr:?} scale {scale}",
            T::DTYPE,
            U::DTYPE
        );
        if T::DTYPE == lora_kernels::DType::F32 {
            let err = reference::relative_error(&got, &want);
            assert!(err <= 1e-5, "{what}: relative error {err:e}");
        } else {
            // 1 ulp of the correctly rounded result, plus the f32 arithmetic's own error where W and
            // s·B·A cancel (the result's ulp is then far below the f32 error of the terms).
            for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
                let slack = 2f64.powi(-20) * (w[i].to_f64().abs() + magnitude[i]);
                let diff = (g.to_f64() - want[i]).abs();
                let one_ulp = reference::ulp_distance(*g, *e) <= 1;
                assert!(
                    one_ulp || diff <= slack,
                    "{what}: element {i} = {g:?}, correctly rounded {e:?} (exact {})",
                    want[i]
                );
            }
        }
        let bits: Vec<u32> = got.iter().map(|v| v.to_bits_u32()).collect();
        if !dev.is_cuda() {
            // every thread order gives the first one's bits
            match &first_bits {
                None => first_bits = Some(bits),
                Some(f) => assert!(*f == bits, "{what}: differs between thread orders"),
            }
        } else {
            let again = merged_on(dev, &w, &a, &b, nkr, scale);
            assert!(
                common::bits(&again) == bits,
                "{what}: GPU merge not repeatable"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::proptest_cases(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn merge_matches_reference(
        n in 1..=300usize, k in 1..=300usize, r in 1..=128usize,
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

/// Edge shapes: 1, 2^k ± 1, the tile (64 × 128) and one past it, rank 1 and 128.
#[test]
fn merge_edge_shapes() {
    for (i, &nkr) in [
        (1, 1, 1),
        (64, 128, 128),
        (65, 129, 33),
        (63, 127, 7),
        (2, 1000, 1),
    ]
    .iter()
    .enumerate()
    {
        check::<bf16, f32>(nkr, 2.0, 10 + i as u64);
        check::<f16, f16>(nkr, -1.0, 20 + i as u64);
    }
}

/// The kernel's f32 computation of the merged value, replayed on the host (fma chain over j, then
/// round(s·acc), then round(W + d)) to know where the merged rounding lost nothing.
fn merged_f32<U: Element>(
    w: f32,
    a: &[U],
    b: &[U],
    (k, r): (usize, usize),
    (row, col): (usize, usize),
    s: f32,
) -> (f32, f32) {
    let mut acc = 0f32;
    for j in 0..r {
        acc = b[row * r + j]
            .to_f32()
            .mul_add(a[j * k + col].to_f32(), acc);
    }
    let d = s * acc;
    (w + d, d)
}

/// The kernel against the host replay of its f32 arithmetic (`merged_f32`), bit for bit, where the
/// products underflow: A and B of magnitude ≤ 2⁻⁷⁵ make many products round to ±0 or a subnormal, and
/// W holds −0 and +0, so the sign of a zero acc decides the merged bits (−0 + −0 = −0, −0 + +0 = +0).
/// Ranks that are not a multiple of the kernel's rank chunk make it pad the rank product: the padding
/// must leave every acc as the FMA chain over the real rank left it, −0 included.
#[test]
fn merge_keeps_the_sign_of_zero() {
    fn run<T: Element>(stream: u64, (n, k, r): (usize, usize, usize), s: f32) {
        let mut rng = Rng::new(stream);
        let tiny = 2f64.powi(-75);
        let w: Vec<T> = (0..n * k)
            .map(|i| T::from_f64(if i % 2 == 0 { -0.0 } else { 0.0 }))
            .collect();
        let a: Vec<f32> = rng.vec(r * k, tiny);
        let b: Vec<f32> = rng.vec(n * r, tiny);
        for dev in common::emulators() {
            let got = merged_on(&dev, &w, &a, &b, (n, k, r), s);
            let mut zeros = [0usize; 2];
            for (i, g) in got.iter().enumerate() {
                let (sum, _) = merged_f32(w[i].to_f32(), &a, &b, (k, r), (i / k, i % k), s);
                let want = T::from_f64(sum as f64);
                zeros[(sum.to_bits() >> 31) as usize] += (sum == 0.0) as usize;
                assert_eq!(
                    g.to_bits_u32(),
                    want.to_bits_u32(),
                    "{dev:?} W {} ({n}, {k}, {r}) scale {s}: element {i} = {g:?}, f32 replay {sum:e}",
                    T::DTYPE
                );
            }
            assert!(
                zeros[0] > 0 && zeros[1] > 0,
                "({n}, {k}, {r}): the data must give both +0 and −0 ({zeros:?})"
            );
        }
    }
    for (i, &nkr) in [
        (3, 24, 1),
        (5, 40, 5),
        (66, 136, 17),
        (9, 16, 16),
        (4, 130, 33),
    ]
    .iter()
    .enumerate()
    {
        run::<f32>(60 + i as u64, nkr, 2.0);
        run::<bf16>(70 + i as u64, nkr, -0.5);
    }
}

/// merge then unmerge: bf16/f16 cannot always give W0 back (rounding the merged value drops bits);
/// the contract is: within ½ ulp(merged) + ½ ulp(W0) of W0 everywhere (ulp of the larger of W0 and
/// the result at a binade edge), bit-exact wherever the merged rounding lost nothing. Prints the
/// fraction bit-exact.
fn round_trip<T: Element>(stream: u64, dyadic: bool) {
    let (n, k, r) = (96, 200, 16);
    let mut rng = Rng::new(stream);
    // Random data: the merged rounding nearly always loses bits. Dyadic data (multiples of 1/16 in
    // W0, of 1/4 in A and B) makes many merged values exact, which exercises the bit-exact branch.
    let mut draw = |len: usize, amp: f64, step: f64| -> Vec<f64> {
        (0..len)
            .map(|_| {
                let v = rng.uniform() * amp;
                if dyadic { (v / step).round() * step } else { v }
            })
            .collect()
    };
    let w0: Vec<T> = draw(n * k, 1.0, 1.0 / 16.0)
        .into_iter()
        .map(T::from_f64)
        .collect();
    let a: Vec<f32> = draw(r * k, 0.5, 0.25)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let b: Vec<f32> = draw(n * r, 0.5, 0.25)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let s = 2.0f32;
    let dev = &common::emulators()[0];
    let mut w = Tensor::from_slice(dev, &w0, &[n, k]).unwrap();
    let at = Tensor::from_slice(dev, &a, &[r, k]).unwrap();
    let bt = Tensor::from_slice(dev, &b, &[n, r]).unwrap();
    ops::merge(&mut w, &at, &bt, s).unwrap();
    let merged = w.to_vec().unwrap();
    ops::unmerge(&mut w, &at, &bt, s).unwrap();
    let back = w.to_vec().unwrap();
    let (mut exact, mut lossless, mut lossless_exact) = (0, 0, 0);
    for i in 0..n * k {
        let (row, col) = (i / k, i % k);
        let (sum, d) = merged_f32(w0[i].to_f32(), &a, &b, (k, r), (row, col), s);
        let no_loss =
            merged[i].to_f64() == w0[i].to_f64() + d as f64 && sum as f64 == merged[i].to_f64();
        let diff = (back[i].to_f64() - w0[i].to_f64()).abs();
        let bound = 0.5 * ulp(merged[i]) + 0.5 * ulp(w0[i]).max(ulp(back[i]));
        assert!(
            diff <= bound,
            "{} element {i}: |unmerged − W0| = {diff:e} > {bound:e}",
            T::DTYPE
        );
        // Exact means equal values: IEEE gives −0 + 0 = +0, so a −0 in W0 may come back as +0.
        let same = back[i].to_f64() == w0[i].to_f64();
        exact += same as usize;
        if no_loss {
            lossless += 1;
            lossless_exact += same as usize;
        }
    }
    eprintln!(
        "{} {} data, merge→unmerge: {exact}/{} exact ({:.2} %); merged rounding lossless on {lossless}, all of them exact: {}",
        T::DTYPE,
        if dyadic { "dyadic" } else { "random" },
        n * k,
        100.0 * exact as f64 / (n * k) as f64,
        lossless_exact == lossless
    );
    assert_eq!(
        lossless_exact,
        lossless,
        "{}: an element whose merge lost nothing did not come back exactly",
        T::DTYPE
    );
    if dyadic {
        assert!(
            lossless > n * k / 10,
            "dyadic data must give many lossless merges ({lossless})"
        );
    }
}

#[test]
fn merge_then_unmerge_contract() {
    for dyadic in [false, true] {
        round_trip::<bf16>(5, dyadic);
        round_trip::<f16>(6, dyadic);
    }
}

/// PEFT stores adapters in f32: merging the fixture adapter into the fixture base through the kernel
/// must reproduce PEFT's merged checkpoint (≥ 99.99 % bit-exact, ≤ 1 ulp everywhere), and unmerging
/// PEFT's merged checkpoint must match the f64 unmerge (expected_unmerged.safetensors).
#[test]
fn checkpoint_merge_through_kernel_matches_peft() {
    use common::Fixture;
    use common::peft::{Agreement, adapter, compare};
    let (modules, scale) = adapter();
    let base = Fixture::open("base.safetensors");
    let merged = Fixture::open("merged.safetensors");
    let unmerged = Fixture::open("expected_unmerged.safetensors");
    for dev in common::all_devices() {
        let (mut m_acc, mut u_acc) = (Agreement::default(), Agreement::default());
        for (module, a, b, r) in &modules {
            let key = format!("{module}.weight");
            let (w0, shape) = base.bf16(&key);
            let (n, k) = (shape[0], shape[1]);
            let at = Tensor::from_slice(&dev, a, &[*r, k]).unwrap();
            let bt = Tensor::from_slice(&dev, b, &[n, *r]).unwrap();
            let mut w = Tensor::from_slice(&dev, &w0, &[n, k]).unwrap();
            ops::merge(&mut w, &at, &bt, scale as f32).unwrap();
            compare(&w.to_vec().unwrap(), &merged.bf16(&key).0, &mut m_acc);
            let mut wm = Tensor::from_slice(&dev, &merged.bf16(&key).0, &[n, k]).unwrap();
            ops::unmerge(&mut wm, &at, &bt, scale as f32).unwrap();
            compare(&wm.to_vec().unwrap(), &unmerged.bf16(&key).0, &mut u_acc);
        }
        for (what, acc) in [("merge", &m_acc), ("unmerge", &u_acc)] {
            let frac = acc.exact as f64 / acc.total as f64;
            eprintln!(
                "{dev:?} {what}: {}/{} bit-exact ({:.4} %), max {} ulp",
                acc.exact,
                acc.total,
                100.0 * frac,
                acc.max_ulp
            );
            assert!(
                frac >= 0.9999 && acc.max_ulp <= 1,
                "{dev:?} {what}: {:.4} % exact, max {} ulp",
                100.0 * frac,
                acc.max_ulp
            );
        }
    }
}

// ---- Non-finite results: ops::safe_merge / safe_unmerge / merge_counted (PEFT's safe_merge) ----

/// Values of magnitude in [0.25, 1), random sign: no zero, so an Inf in A or B meets no 0 (∞·0 = NaN).
fn nonzero<T: Element>(rng: &mut Rng, len: usize) -> Vec<T> {
    (0..len)
        .map(|_| {
            let u = rng.uniform();
            T::from_f64(u.signum() * (0.25 + 0.75 * u.abs()))
        })
        .collect()
}

/// On every emulator thread order: `merge_counted` gives `want` and the bits of plain `merge`;
/// `safe_merge` (and `safe_unmerge` with −scale, the same arithmetic) refuses when `want.created() > 0`
/// with those counts, leaving W untouched (bit for bit), and otherwise returns `want` and the merge's
/// bits. Returns the merged W (of the plain merge).
fn nonfinite_case<T: Element, U: Element>(
    what: &str,
    w: &[T],
    a: &[U],
    b: &[U],
    (n, k, r): (usize, usize, usize),
    scale: f32,
    want: ops::NonFiniteCounts,
) -> Vec<T> {
    let mut reference_bits: Option<Vec<u32>> = None;
    let mut merged = Vec::new();
    for dev in common::emulators() {
        let what = format!("{what} ({dev:?}, W {} adapter {})", T::DTYPE, U::DTYPE);
        let at = Tensor::from_slice(&dev, a, &[r, k]).unwrap();
        let bt = Tensor::from_slice(&dev, b, &[n, r]).unwrap();
        let plain = merged_on(&dev, w, a, b, (n, k, r), scale);
        let mut wt = Tensor::from_slice(&dev, w, &[n, k]).unwrap();
        let counts = ops::merge_counted(&mut wt, &at, &bt, scale).unwrap();
        assert_eq!(counts, want, "{what}: merge_counted");
        let counted = wt.to_vec().unwrap();
        assert!(
            bits(&counted) == bits(&plain),
            "{what}: counting changed bits"
        );
        match &reference_bits {
            None => reference_bits = Some(bits(&plain)),
            Some(r) => assert!(*r == bits(&plain), "{what}: differs between thread orders"),
        }
        for unmerge in [false, true] {
            let mut wt = Tensor::from_slice(&dev, w, &[n, k]).unwrap();
            let result = match unmerge {
                false => ops::safe_merge(&mut wt, &at, &bt, scale),
                true => ops::safe_unmerge(&mut wt, &at, &bt, -scale),
            };
            let after = wt.to_vec().unwrap();
            if want.created() > 0 {
                let e = result.expect_err(&what);
                match &e {
                    lora_kernels::Error::NonFiniteMerge {
                        nan, inf, elements, ..
                    } => assert_eq!(
                        (*nan, *inf, *elements),
                        (want.nan, want.inf, (n * k) as u64),
                        "{what}: {e}"
                    ),
                    other => panic!("{what}: unexpected error {other}"),
                }
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!(
                        "w0: {} of {} elements finite in the base would become NaN or ±Inf",
                        want.created(),
                        n * k
                    )) && msg.ends_with("w0 is unchanged"),
                    "{what}: {msg}"
                );
                assert!(
                    bits(&after) == bits(w),
                    "{what}: W0 changed by a refused merge"
                );
            } else {
                assert_eq!(result.unwrap(), want, "{what}: safe merge counts");
                assert!(bits(&after) == bits(&plain), "{what}: safe merge bits");
            }
        }
        merged = plain;
    }
    merged
}

fn counts(nan: u64, inf: u64, in_base: u64) -> ops::NonFiniteCounts {
    ops::NonFiniteCounts { nan, inf, in_base }
}

/// A NaN or an Inf in A or in B (f32 and bf16 adapters, bf16 and f16 W): the product column or row
/// turns NaN or ±Inf, the check counts exactly those elements and a safe merge refuses.
#[test]
fn nan_and_inf_in_the_adapter_are_refused() {
    // 70 × 130 spans two tiles each way; rank 5 (< one rank chunk).
    let (n, k, r) = (70, 130, 5);
    fn run<T: Element, U: Element>(stream: u64, nkr: (usize, usize, usize)) {
        let (n, k, r) = nkr;
        let mut rng = Rng::new(stream);
        let w: Vec<T> = rng.vec(n * k, 1.0);
        let a: Vec<U> = nonzero(&mut rng, r * k);
        let b: Vec<U> = nonzero(&mut rng, n * r);
        let (nan, inf) = (U::from_f64(f64::NAN), U::from_f64(f64::INFINITY));
        // NaN in A[2][17]: column 17 of every row is NaN.
        let mut bad = a.clone();
        bad[2 * k + 17] = nan;
        let got = nonfinite_case("NaN in A", &w, &bad, &b, nkr, 2.0, counts(n as u64, 0, 0));
        assert!((0..n).all(|i| got[i * k + 17].to_f64().is_nan()));
        // Inf in A[4][129] (the last column, in the second, ragged tile): column 129 is ±Inf.
        let mut bad = a.clone();
        bad[4 * k + 129] = inf;
        nonfinite_case("Inf in A", &w, &bad, &b, nkr, -0.5, counts(0, n as u64, 0));
        // NaN in B[65][3]: row 65 is NaN.
        let mut bad = b.clone();
        bad[65 * r + 3] = nan;
        nonfinite_case("NaN in B", &w, &a, &bad, nkr, 2.0, counts(k as u64, 0, 0));
        // −Inf in B[0][0] and NaN in B[1][1]: row 0 ±Inf, row 1 NaN.
        let mut bad = b.clone();
        bad[0] = U::from_f64(f64::NEG_INFINITY);
        bad[r + 1] = nan;
        let got = nonfinite_case(
            "Inf, NaN in B",
            &w,
            &a,
            &bad,
            nkr,
            1.0,
            counts(k as u64, k as u64, 0),
        );
        assert!((0..k).all(|c| got[c].to_f64().is_infinite()));
    }
    run::<bf16, f32>(30, (n, k, r));
    run::<bf16, bf16>(31, (n, k, r));
    run::<f16, f16>(32, (n, k, r));
    run::<f32, f32>(33, (n, k, r));
}

/// Large but finite factors: s·B·A past f32's range (bf16 W, bf16 adapter), or within f32 but past
/// f16's (f16 W, f32 adapter): ±Inf after the merge, refused.
#[test]
fn overflow_from_finite_factors_is_refused() {
    let (n, k) = (9, 20);
    let mut rng = Rng::new(40);
    let w: Vec<bf16> = rng.vec(n * k, 1.0);
    let a: Vec<bf16> = nonzero::<bf16>(&mut rng, k)
        .iter()
        .map(|v| bf16::from_f64(v.to_f64() * 1e20))
        .collect();
    let mut b: Vec<bf16> = nonzero(&mut rng, n);
    // rows 2 and 7: |B·A| ≥ 1e20 · 2.5e19 overflows f32; the other rows stay near 1e20
    b[2] = bf16::from_f64(1e20);
    b[7] = bf16::from_f64(-1e20);
    let got = nonfinite_case(
        "f32 overflow",
        &w,
        &a,
        &b,
        (n, k, 1),
        16.0,
        counts(0, 2 * k as u64, 0),
    );
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, v)| v.to_f64().is_finite() == (i / k != 2 && i / k != 7))
    );

    let r = 2;
    let w: Vec<f16> = rng.vec(n * k, 1.0);
    let a: Vec<f32> = nonzero(&mut rng, r * k);
    let mut b: Vec<f32> = vec![0.0; n * r];
    b[4 * r] = 1e6; // row 4: |s·B·A| ≥ 2.5e5·… > 65520, finite in f32
    nonfinite_case(
        "f16 overflow",
        &w,
        &a,
        &b,
        (n, k, r),
        1.0,
        counts(0, k as u64, 0),
    );
}

/// Exactly at the rounding thresholds: the largest finite value plus just under half an ulp stays
/// finite, plus half an ulp (a tie, to the even Inf) is ±Inf; W + s·B·A is exact in f32 here, so
/// this pins the overflow test of each dtype.
#[test]
fn overflow_threshold_of_each_dtype() {
    // r = 1, B = 1, s = 1: merged = W + A[0][c], one column per value of `add`.
    fn run<T: Element>(w: f64, add: &[f64], infs: u64) {
        let k = add.len();
        let w = vec![T::from_f64(w); k];
        let a: Vec<f32> = add.iter().map(|&v| v as f32).collect();
        let b = vec![1.0f32];
        nonfinite_case("threshold", &w, &a, &b, (1, k, 1), 1.0, counts(0, infs, 0));
    }
    let p = |e: i32| 2f64.powi(e);
    // f16: max 65504, ulp 32; 65519 stays finite, 65520 rounds to Inf
    run::<f16>(65504.0, &[15.0, 15.99, 16.0, 1000.0, -100000.0], 2);
    run::<f16>(-65504.0, &[-15.0, -16.0], 1);
    // bf16: max (2 − 2⁻⁷)·2¹²⁷, ulp 2¹²⁰; + (2¹¹⁹ − 2¹⁰⁴) is finite, + 2¹¹⁹ is Inf
    let max = (2.0 - p(-7)) * p(127);
    run::<bf16>(max, &[p(119) - p(104), p(119), p(120)], 2);
    run::<bf16>(-max, &[-p(119)], 1);
    // f32: max (2 − 2⁻²³)·2¹²⁷, ulp 2¹⁰⁴; + 2¹⁰² stays max, + 2¹⁰³ (a tie) is Inf
    let max = f32::MAX as f64;
    run::<f32>(max, &[p(102), p(103), -p(103)], 1);
}

/// NaN and ±Inf already in the base: no error (counted, `in_base`), and they stay NaN and the same
/// Inf; every other element is merged as usual. With a NaN in the adapter too, a base element that
/// was NaN already counts as in the base, not as made by the merge.
#[test]
fn nonfinite_in_the_base_passes_through() {
    let (n, k, r) = (66, 70, 8);
    fn run<T: Element, U: Element>(stream: u64, (n, k, r): (usize, usize, usize)) {
        let mut rng = Rng::new(stream);
        let mut w: Vec<T> = rng.vec(n * k, 1.0);
        let a: Vec<U> = nonzero(&mut rng, r * k);
        let b: Vec<U> = nonzero(&mut rng, n * r);
        w[5] = T::from_f64(f64::NAN);
        w[64 * k + 69] = T::from_f64(f64::INFINITY);
        w[3 * k] = T::from_f64(f64::NEG_INFINITY);
        let got = nonfinite_case(
            "NaN, ±Inf in W",
            &w,
            &a,
            &b,
            (n, k, r),
            2.0,
            counts(0, 0, 3),
        );
        assert!(got[5].to_f64().is_nan());
        assert_eq!(got[64 * k + 69].to_f64(), f64::INFINITY);
        assert_eq!(got[3 * k].to_f64(), f64::NEG_INFINITY);
        let finite = got.iter().filter(|v| v.to_f64().is_finite()).count();
        assert_eq!(finite, n * k - 3);
        // a NaN in A[1][5] too: column 5 is NaN; W[0][5] was NaN already
        let mut bad = a.clone();
        bad[k + 5] = U::from_f64(f64::NAN);
        let want = counts(n as u64 - 1, 0, 3);
        nonfinite_case("NaN in W and in A", &w, &bad, &b, (n, k, r), 2.0, want);
    }
    run::<bf16, bf16>(50, (n, k, r));
    run::<bf16, f32>(51, (n, k, r));
    run::<f16, f32>(52, (n, k, r));
    run::<f32, f32>(53, (n, k, r));
}
