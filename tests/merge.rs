//! In-place merge / unmerge (kernels/merge.cu) through `ops::merge` / `ops::unmerge`: property tests
//! against the f64 reference for every supported (W dtype, adapter dtype) pair, identical bits under two
//! thread orders, and the merge-then-unmerge contract in bf16 and f16.

mod common;

use common::{Rng, ulp};
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
/// 1e-5 relative norm; the same bits under both thread orders and on the GPU's repeat.
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
    let mut devices = common::emulators();
    devices.extend(common::gpu());
    let mut first_bits: Option<Vec<u32>> = None;
    for (i, dev) in devices.iter().enumerate() {
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
        if i < 2 {
            match &first_bits {
                None => first_bits = Some(bits),
                Some(f) => assert!(*f == bits, "{what}: differs between thread orders"),
            }
        } else {
            let again = merged_on(dev, &w, &a, &b, nkr, scale);
            assert!(again == got, "{what}: GPU merge not repeatable");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
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
