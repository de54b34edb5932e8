//! The mma.sync fused GEMMs at both tile widths, forced with `LK_MMA_TILE` (128 and 64), on the same
//! layers: property cases over M, N, K in 1..=300 and r in 1..=128 (`common::lora::dims`),
//! bf16/f16 layers with adapters in the layer dtype or f32, bias, dropout on some; forward and backward,
//! outputs poisoned, every output against the f64 reference at each width, and the two widths' bits equal
//! (every element of C is the same chain of mma steps at either width). On the emulator (the launch
//! record says each GEMM took the forced width) and on the GPU when present: there the automatic choice
//! (`ops::mma_tile`) takes the 64-column tiles for every shape this small, so this binary is where the
//! 128-column ones run on small shapes.
//!
//! The variable is process-wide: this binary has ONE test, so nothing else reads it meanwhile.
//! Cases per run: `PROPTEST_CASES` (default 64).

mod common;

use common::Rng;
use common::lora::{self, Layer, dims};
use half::{bf16, f16};
use lora_kernels::reference::Dims;
use lora_kernels::{DType, Device, Dropout, Element};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 2e-3 }
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
    let config = Config {
        cases: common::proptest_cases(64),
        max_shrink_iters: 16,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
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
}
