//! The mma.sync fused GEMMs at both tile widths, forced with `LK_MMA_TILE` (128 and 64), on the same
//! layers: property cases over M, N, K in 1..=300 and r in 1..=128 (`common::lora::dims`),
//! bf16/f16 layers with adapters in the layer dtype or f32, bias, dropout on some; forward and backward,
//! outputs poisoned, every output against the f64 reference at each width, and the two widths' bits equal
//! (every element of C is the same chain of mma steps at either width). On the emulator (the launch
//! record says each GEMM took the forced width) and on the GPU when present: there the automatic choice
//! (`ops::mma_tile`) takes the 64-column tiles for every shape this small, so this binary is where the
//! 128-column ones run on small shapes.
//!
//! Then the many-adapter forward (`ops::lora_forward_multi`: its shrink on the 64-column kernel where every
//! rank is ≤ 64, its fused GEMM) at both widths, the same way (Y and T against the reference, their bits
//! equal): 64 property cases, M 17..=300 (a decoding batch, M ≤ 16, runs kernels/multi_decode.cu instead,
//! as does the shrink up to M = 128; tests/multi_adapter.rs), N, K 1..=300, 1 to 4 adapters of
//! ranks 1..=128 (all ≤ 64 in half the cases), random row maps (`common::multi::Batch`), bias or not.
//!
//! The variable is process-wide: this binary has ONE test, so nothing else reads it meanwhile.
//! Cases per run: `PROPTEST_CASES` (default 64).

mod common;

use common::Rng;
use common::bits;
use common::lora::{self, Layer, dims};
use common::multi::{Batch, run, set_of};
use half::{bf16, f16};
use lora_kernels::reference::{self, Dims};
use lora_kernels::{DType, Device, Dropout, Element, Error, Tensor, ops};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 1e-3 }
}

fn with_tile<R>(columns: &str, f: impl FnOnce() -> R) -> R {
    // SAFETY: this binary's only test runs on one thread, and nothing else reads the environment then.
    unsafe { std::env::set_var("LK_MMA_TILE", columns) };
    let out = f();
    // SAFETY: as above.
    unsafe { std::env::remove_var("LK_MMA_TILE") };
    out
}

/// The layer at both widths on `dev`: each against the reference, their bits equal; on the emulator the
/// launch record shows every fused GEMM at the forced width.
fn both_widths<T: Element, A: Element>(dev: &Device, l: &Layer<T, A>) {
    let mut bits = Vec::new();
    for columns in ["128", "64"] {
        dev.take_launches();
        let out = with_tile(columns, || lora::run(dev, l, true));
        lora::check(
            &format!("{} ({columns} columns)", dev.describe()),
            l,
            &out,
            tol(T::DTYPE),
        );
        let gemms: Vec<_> = dev
            .take_launches()
            .into_iter()
            .filter(|k| k.starts_with("fused_gemm_n"))
            .collect();
        if !dev.is_cuda() {
            assert!(!gemms.is_empty(), "{:?}: no fused GEMM ran", l.d);
            let narrow = columns == "64";
            assert!(
                gemms.iter().all(|k| k.contains("_narrow_") == narrow),
                "{:?}: LK_MMA_TILE={columns} but {gemms:?}",
                l.d
            );
        }
        bits.push(out.bits());
    }
    assert!(
        bits[0] == bits[1],
        "{} {:?}: the tile widths give different bits",
        dev.describe(),
        l.d
    );
}

fn case<T: Element, A: Element>(d: Dims, scale: f32, bias: bool, dropout: Dropout, stream: u64) {
    let mut rng = Rng::new(stream);
    let l = Layer::<T, A>::random(&mut rng, d, scale, bias).with_dropout(dropout);
    if !common::gpu_only() {
        both_widths(&common::emulators()[(stream % 4) as usize], &l);
    }
    if let Some(gpu) = common::gpu() {
        both_widths(&gpu, &l);
    }
}

#[test]
fn both_tile_widths_match_reference_with_the_same_bits() {
    let strategy = (
        dims(300).prop_map(|(d, _)| d),
        -4.0f32..4.0,
        any::<bool>(),
        0u8..6,
        any::<u64>(),
    );
    let mut runner = TestRunner::new(config_of(64));
    runner
        .run(&strategy, |(d, scale, bias, kind, stream)| {
            // a third with dropout (its masks in the projection's loads and dX's low-rank sum)
            let drop = if kind >= 4 {
                Dropout::new(0.25, stream, stream >> 7).unwrap()
            } else {
                Dropout::NONE
            };
            match kind % 4 {
                0 => case::<bf16, bf16>(d, scale, bias, drop, stream),
                1 => case::<f16, f16>(d, scale, bias, drop, stream),
                2 => case::<bf16, f32>(d, scale, bias, drop, stream),
                _ => case::<f16, f32>(d, scale, bias, drop, stream),
            }
            Ok(())
        })
        .unwrap();

    // the many-adapter forward, 64 property cases above M = 16 (a decoding batch runs neither GEMM
    // kernel: kernels/multi_decode.cu, whose shrink takes M ≤ 128 too), 1 to 4 adapters with every rank
    // ≤ 64 (above M = 128 the shrink narrow too) in half
    let multi = (
        (17..=300usize, 1..=300usize, 1..=300usize),
        proptest::collection::vec(1..=128usize, 1..=4),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    let mut runner = TestRunner::new(config_of(64));
    runner
        .run(&multi, |(dims, mut ranks, low, bias, stream)| {
            if low {
                ranks.iter_mut().for_each(|r| *r = (*r).div_ceil(2));
            }
            if !common::gpu_only() {
                let emu = &common::emulators()[(stream % 4) as usize];
                multi_both_widths(emu, dims, &ranks, bias, stream);
            }
            if let Some(gpu) = common::gpu() {
                multi_both_widths(&gpu, dims, &ranks, bias, stream);
            }
            Ok(())
        })
        .unwrap();

    bad_value_is_refused_before_any_launch();
}

/// A bad `LK_MMA_TILE` is refused by an op that launches other kernels before its GEMM (the DoRA forward's
/// norm pass writes its saved norms and factors) before anything runs.
fn bad_value_is_refused_before_any_launch() {
    let dev = Device::emulator();
    let (m, n, k, r) = (20, 6, 8, 2); // M > 16: the general path, whose GEMM reads LK_MMA_TILE
    let ones = |shape: &[usize]| {
        Tensor::<bf16>::from_slice(&dev, &vec![bf16::ONE; shape.iter().product()], shape).unwrap()
    };
    let (x, w0, a, b) = (ones(&[m, k]), ones(&[n, k]), ones(&[r, k]), ones(&[n, r]));
    let mag = Tensor::<f32>::from_slice(&dev, &vec![1.0; n], &[n]).unwrap();
    let mut y = ones(&[m, n]);
    let mut saved = ops::DoraSaved::for_layer(&x, n, r).unwrap();
    dev.take_launches();
    let e = with_tile("96", || {
        ops::dora_forward_into(
            &x,
            &w0,
            &a,
            &b,
            &mag,
            None,
            1.0,
            Dropout::NONE,
            &mut y,
            &mut saved,
            &mut ops::Workspace::new(),
        )
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { what, .. } if what.contains("LK_MMA_TILE")),
        "{e:?}"
    );
    let launched = dev.take_launches();
    assert!(
        launched.is_empty(),
        "launched before the refusal: {launched:?}"
    );
}

fn config_of(cases: u32) -> Config {
    Config {
        cases: common::proptest_cases(cases),
        max_shrink_iters: 16,
        ..Config::default()
    }
}

/// A many-adapter batch at both widths on `dev`: Y and T against the reference, their bits equal, and on
/// the emulator every fused_gemm_multi launch at the forced width (the shrink at 128 columns when a rank
/// is above 64, whatever is forced; up to M = 128 the shrink is multi_decode_shrink, no fused_gemm_multi).
fn multi_both_widths(
    dev: &Device,
    dims: (usize, usize, usize),
    ranks: &[usize],
    bias: bool,
    stream: u64,
) {
    let b = Batch::<bf16, bf16>::with_ranks(&mut Rng::new(stream), dims, ranks, bias);
    let mut outs = Vec::new();
    for columns in ["128", "64"] {
        let set = set_of(dev, &b);
        let r_max = set.max_rank();
        dev.take_launches();
        let (y, t) = with_tile(columns, || run(dev, &b, &set));
        let narrow = dev
            .take_launches()
            .into_iter()
            .filter(|k| k.starts_with("fused_gemm_multi") && k.contains("_narrow"))
            .count();
        let want = b.reference(r_max);
        let what = format!(
            "{} {dims:?} ranks {ranks:?} at {columns} columns",
            dev.describe()
        );
        let ey = reference::relative_error(&y, &want.y);
        let et = reference::relative_error(&t, &reference::rounded::<bf16>(&want.t));
        assert!(ey <= tol(DType::BF16), "{what}: y relative error {ey:e}");
        assert!(et <= tol(DType::BF16), "{what}: t relative error {et:e}");
        if !dev.is_cuda() {
            let expected = if columns == "128" {
                0
            } else {
                usize::from(r_max <= 64 && b.m > 128) + 1
            };
            assert_eq!(narrow, expected, "{what}: narrow launches");
        }
        outs.push((bits(&y), bits(&t)));
    }
    assert!(
        outs[0] == outs[1],
        "{} {dims:?} ranks {ranks:?}: the tile widths give different bits",
        dev.describe()
    );
}
