//! The LoRA kernels (fused GEMM forward and dX, small-M, the gradients' lowrank_grad) through the public
//! ops against the f64 reference: property tests over M, N, K in 1..=300 and r in 1..=128 (odd sizes
//! in, half of the cases rounded to multiples of 8 so both the vector and the element-wise load paths
//! run), bf16 and f16, random scale; outputs poisoned before every launch; the emulator under two
//! thread orders must give identical bits; the GPU, when present, is checked against the reference too.
//!
//! Cases per run: `PROPTEST_CASES` (default 72 per test, so every kernel gets at least 64; the gradient
//! finalize kernel runs in every backward). Batched activations ([..., K]) and gradient accumulation
//! have their own property test, and so have f32 adapters and LoRA dropout (with the dropout mask's
//! keep rate, its equality with the CPU generator, and its dependence on the offset).

mod common;

use common::Rng;
use common::lora::{self, Layer, dims};
use half::{bf16, f16};
use lora_kernels::reference::Dims;
use lora_kernels::{DType, Dropout, Element};
use proptest::prelude::*;

const TOL_BF16: f64 = 1e-2;
const TOL_F16: f64 = 1e-3;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        TOL_BF16
    } else {
        TOL_F16
    }
}

/// Runs one case on both emulators (identical bits required) and the GPU if present.
fn case<T: Element>(d: Dims, scale: f32, bias: bool, backward: bool, stream: u64) {
    let mut rng = Rng::new(stream);
    let l = Layer::<T>::random(&mut rng, d, scale, bias);
    layer_case(&l, backward, stream);
}

/// One layer, forward (and backward) on two emulators, the ascending thread order and one of the other
/// three (by `stream`, so a run covers all of them; identical bits required; not under
/// `LK_TEST_DEVICES=gpu`), and the GPU if present.
fn layer_case<T: Element, A: Element>(l: &Layer<T, A>, backward: bool, stream: u64) {
    let d = l.d;
    if !common::gpu_only() {
        let emus = common::emulators_for(stream);
        let first = lora::run(&emus[0], l, backward);
        lora::check("emulator", l, &first, tol(T::DTYPE));
        let other = &emus[1 + (stream % 3) as usize];
        let second = lora::run(other, l, backward);
        assert!(
            first.bits() == second.bits(),
            "{} {d:?}: results differ between thread orders (a race): {other:?}",
            T::DTYPE
        );
    }
    if let Some(gpu) = common::gpu() {
        let on_gpu = lora::run(&gpu, l, backward);
        lora::check("gpu", l, &on_gpu, tol(T::DTYPE));
        let again = lora::run(&gpu, l, backward);
        assert!(on_gpu.bits() == again.bits(), "GPU run not repeatable");
    }
}

fn config() -> ProptestConfig {
    // 72: the fused GEMM forward runs for M > 16 (about 95 % of cases), so it still gets at least 64
    // (6 under compute-sanitizer: common::proptest_cases)
    ProptestConfig {
        cases: common::proptest_cases(72),
        // Each case already runs the kernels several times; shrinking a failure would take minutes.
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Forward (shrink + fused GEMM, or small-M for M ≤ 16) and backward (U, dB, dA, dX).
    #[test]
    fn forward_and_backward_match_reference(
        (d, _) in dims(300),
        scale in -4.0f32..4.0,
        bias in any::<bool>(),
        f16_case in any::<bool>(),
        stream in any::<u64>(),
    ) {
        if f16_case {
            case::<f16>(d, scale, bias, true, stream);
        } else {
            case::<bf16>(d, scale, bias, true, stream);
        }
    }

    /// The small-M (decoding) forward path, M ≤ 16.
    #[test]
    fn small_m_forward_matches_reference(
        (d, _) in dims(16),
        scale in -4.0f32..4.0,
        bias in any::<bool>(),
        f16_case in any::<bool>(),
        stream in any::<u64>(),
    ) {
        if f16_case {
            case::<f16>(d, scale, bias, false, stream);
        } else {
            case::<bf16>(d, scale, bias, false, stream);
        }
    }
}

/// Activations with 1 to 3 leading dimensions (M = their product, up to 320) and gradients accumulated
/// into dA and dB that already hold an earlier micro-batch's (GradMode::Accumulate).
fn batched_case<T: Element>(lead: Vec<usize>, nkr: (usize, usize, usize), scale: f32, stream: u64) {
    let (n, k, r) = nkr;
    let d = Dims {
        m: lead.iter().product(),
        n,
        k,
        r,
    };
    let mut rng = Rng::new(stream);
    let l = Layer::<T>::random(&mut rng, d, scale, stream % 2 == 0)
        .with_lead(lead)
        .with_accumulation(&mut rng);
    if !common::gpu_only() {
        let emus = common::emulators_for(stream);
        let first = lora::run(&emus[0], &l, true);
        lora::check("emulator", &l, &first, tol(T::DTYPE));
        let other = &emus[1 + (stream % 3) as usize];
        let second = lora::run(other, &l, true);
        assert!(
            first.bits() == second.bits(),
            "{d:?}: results differ between thread orders: {other:?}"
        );
    }
    if let Some(gpu) = common::gpu() {
        lora::check("gpu", &l, &lora::run(&gpu, &l, true), tol(T::DTYPE));
    }
}

proptest! {
    #![proptest_config(config())]

    /// Batched activations [..., K] and gradient accumulation, forward and backward.
    #[test]
    fn batched_accumulated_gradients_match_reference(
        (dims, (n, k, r, _)) in (
            (1..=4usize, 1..=4usize, 1..=20usize, 1..=3usize),
            dims(1).prop_map(|(d, round8)| (d.n, d.k, d.r, round8)),
        ),
        scale in -4.0f32..4.0,
        f16_case in any::<bool>(),
        stream in any::<u64>(),
    ) {
        let (a, b, c, ndim) = dims;
        let lead = [a, b, c][3 - ndim..].to_vec();
        if f16_case {
            batched_case::<f16>(lead, (n, k, r), scale, stream);
        } else {
            batched_case::<bf16>(lead, (n, k, r), scale, stream);
        }
    }
}

/// A layer with f32 master adapters (and, on odd streams, gradients accumulated into f32 dA, dB).
fn f32_adapter_case<T: Element>(d: Dims, scale: f32, bias: bool, dropout: Dropout, stream: u64) {
    let mut rng = Rng::new(stream);
    let mut l = Layer::<T, f32>::random(&mut rng, d, scale, bias).with_dropout(dropout);
    if stream % 2 == 1 {
        l = l.with_accumulation(&mut rng);
    }
    layer_case(&l, true, stream);
}

/// A layer in the layer dtype with LoRA dropout.
fn dropout_case<T: Element>(d: Dims, scale: f32, bias: bool, dropout: Dropout, stream: u64) {
    let mut rng = Rng::new(stream);
    let l = Layer::<T>::random(&mut rng, d, scale, bias).with_dropout(dropout);
    layer_case(&l, true, stream);
}

fn dropout_of(p: f32, seed: u64, offset: u64) -> Dropout {
    Dropout::new(p, seed, offset).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// f32 adapters over a bf16/f16 layer: A and B read as f32 (rounded once to the layer dtype at the
    /// tensor cores), dA and dB written as f32; M from 1 (the small-M range takes the general path).
    #[test]
    fn f32_adapters_match_reference(
        (d, _) in dims(300),
        scale in -4.0f32..4.0,
        bias in any::<bool>(),
        f16_case in any::<bool>(),
        stream in any::<u64>(),
    ) {
        if f16_case {
            f32_adapter_case::<f16>(d, scale, bias, Dropout::NONE, stream);
        } else {
            f32_adapter_case::<bf16>(d, scale, bias, Dropout::NONE, stream);
        }
    }

    /// LoRA dropout, p in [0.01, 0.9), random seed and offset, adapters in the layer dtype or f32: T,
    /// dA and dX against the reference with the same mask (the CPU generator).
    #[test]
    fn dropout_matches_reference(
        (d, _) in dims(300),
        scale in -4.0f32..4.0,
        p in 0.01f32..0.9,
        (seed, offset) in (any::<u64>(), any::<u64>()),
        (f16_case, f32_adapters) in (any::<bool>(), any::<bool>()),
        stream in any::<u64>(),
    ) {
        let drop = dropout_of(p, seed, offset);
        match (f16_case, f32_adapters) {
            (false, false) => dropout_case::<bf16>(d, scale, stream % 2 == 0, drop, stream),
            (true, false) => dropout_case::<f16>(d, scale, stream % 2 == 0, drop, stream),
            (false, true) => f32_adapter_case::<bf16>(d, scale, stream % 2 == 0, drop, stream),
            (true, true) => f32_adapter_case::<f16>(d, scale, stream % 2 == 0, drop, stream),
        }
    }
}

/// LoRA dropout where K spans several of the projection's 1024-column chunks (every real layer: the
/// property cases' K ≤ 300 have one): T = dropout(X)·Aᵀ as f32 partials per chunk with the mask indexed
/// by X's whole row, their finalize with the keep scale, dA and dX with the same mask; K ragged after
/// 1 or 2 chunks, or exactly 2; M in the small-M range, one past a row tile, and over two tiles; bf16 and
/// f16 with f32 adapters; against the reference, on two thread orders and the GPU when present.
#[test]
fn dropout_over_several_k_chunks_matches_reference() {
    let shapes = [
        (5, 2051, 24, 7),
        (17, 2104, 40, 16),
        (129, 2048, 33, 40),
        (300, 1025, 24, 3),
    ];
    for (i, &(m, k, n, r)) in shapes.iter().enumerate() {
        let d = Dims { m, n, k, r };
        let stream = common::seed() ^ (0xd509 + i as u64);
        let drop = dropout_of(0.1 + 0.2 * i as f32, stream, i as u64 * 1000);
        dropout_case::<bf16>(d, 1.5, i % 2 == 0, drop, stream);
        f32_adapter_case::<f16>(d, -0.75, i % 2 == 1, drop, stream ^ 1);
    }
}

/// The dropout mask as the kernels apply it, read element by element from dX: with W0 = 0, dY = 1,
/// B = 1 (N = 16, r = 1), A = 1/16 and s = 1, `dX = s·(U·A) ⊙ mask / (1 − p)` is 1/(1 − p) where an
/// element is kept and 0 where it is dropped. M·K = 2^20 elements per mask.
fn kernel_mask(dev: &lora_kernels::Device, dropout: Dropout, (m, k): (usize, usize)) -> Vec<bool> {
    use lora_kernels::{Tensor, ops};
    let (n, r) = (16, 1);
    let up = |v: Vec<bf16>, shape: &[usize]| Tensor::from_slice(dev, &v, shape).unwrap();
    let x = up(vec![bf16::ONE; m * k], &[m, k]);
    let w0 = up(vec![bf16::ZERO; n * k], &[n, k]);
    let a = up(vec![bf16::from_f32(1.0 / 16.0); r * k], &[r, k]);
    let b = up(vec![bf16::ONE; n * r], &[n, r]);
    let t = up(vec![bf16::ONE; m * r], &[m, r]);
    let dy = up(vec![bf16::ONE; m * n], &[m, n]);
    let mut dx = Tensor::<bf16>::zeros(dev, &[m, k]).unwrap();
    dx.poison().unwrap();
    let mut da = Tensor::<bf16>::zeros(dev, &[r, k]).unwrap();
    let mut db = Tensor::<bf16>::zeros(dev, &[n, r]).unwrap();
    ops::lora_backward_into(
        &x,
        &w0,
        &a,
        &b,
        &t,
        &dy,
        1.0,
        dropout,
        Some(&mut dx),
        &mut da,
        &mut db,
        ops::GradMode::Overwrite,
        &mut ops::Workspace::new(),
    )
    .unwrap();
    let kept = bf16::from_f64(dropout.keep_scale());
    dx.to_vec()
        .unwrap()
        .iter()
        .map(|&v| {
            assert!(
                v == kept || v == bf16::ZERO,
                "dX element {v} is neither 0 nor 1/(1 - p)"
            );
            v != bf16::ZERO
        })
        .collect()
}

/// The mask the kernels apply is the CPU generator's, element for element; its keep rate over 2^20
/// elements is within 4σ of 1 − p; another offset (or seed) gives another mask.
#[test]
fn dropout_mask_keep_rate_and_offsets() {
    let dev = &common::emulators()[0];
    let (m, k) = (1024, 1024);
    for &(p, seed, offset) in &[
        (0.05f32, 7u64, 0u64),
        (0.5, 1 << 40, 3 << 33),
        (0.9, 12345, 99),
    ] {
        let drop = dropout_of(p, seed, offset);
        let mask = kernel_mask(dev, drop, (m, k));
        for (e, &kept) in mask.iter().enumerate() {
            assert_eq!(
                kept,
                drop.keeps(e as u64),
                "p {p}: element {e} differs from the CPU generator"
            );
        }
        let n = mask.len() as f64;
        let rate = mask.iter().filter(|&&v| v).count() as f64 / n;
        let (want, sigma) = (1.0 - p as f64, (p as f64 * (1.0 - p as f64) / n).sqrt());
        assert!(
            (rate - want).abs() <= 4.0 * sigma,
            "p {p}: keep rate {rate} vs {want} ± 4·{sigma:e}"
        );
        // another offset, and another seed: masks that differ in about 2p(1 − p) of the elements
        for other in [
            drop.with_offset(offset + 1),
            dropout_of(p, seed + 1, offset),
        ] {
            let differ = mask
                .iter()
                .zip(kernel_mask(dev, other, (m, k)))
                .filter(|(a, b)| **a != *b)
                .count() as f64
                / n;
            let expect = 2.0 * p as f64 * (1.0 - p as f64);
            assert!(
                (differ - expect).abs() < 0.01,
                "p {p}: masks of {drop:?} and {other:?} differ in {differ} of the elements, expected about {expect}"
            );
        }
    }
    // K odd and past 2048 columns: the mask's index e = row·K + col crosses its Philox words (4
    // elements each) unaligned to the rows
    let drop = dropout_of(0.25, 99, 1 << 35);
    for (e, kept) in kernel_mask(dev, drop, (256, 2051)).into_iter().enumerate() {
        assert_eq!(kept, drop.keeps(e as u64), "K = 2051: element {e}");
    }
    if let Some(gpu) = common::gpu() {
        let drop = dropout_of(0.3, 5, 6);
        assert!(
            kernel_mask(&gpu, drop, (m, k)) == kernel_mask(dev, drop, (m, k)),
            "the GPU's dropout mask differs from the emulator's"
        );
    }
}

/// p = 0 is today's path, bit for bit, whatever the seed and offset.
#[test]
fn zero_dropout_gives_the_plain_bits() {
    let d = Dims {
        m: 70,
        n: 33,
        k: 48,
        r: 8,
    };
    let mut rng = Rng::new(21);
    let l = Layer::<bf16>::random(&mut rng, d, 1.25, true);
    let dev = &common::emulators()[0];
    let plain = lora::run(dev, &l, true);
    // against the reference too: two runs that both left an output unwritten would have equal bits
    lora::check("emulator", &l, &plain, TOL_BF16);
    let l0 = l.with_dropout(dropout_of(0.0, 77, 88));
    assert!(
        lora::run(dev, &l0, true).bits() == plain.bits(),
        "p = 0 changed the bits"
    );
}

/// Fixed edge shapes: 1, 2^k ± 1, tile multiples and one past them, rank 1 and 128, M on both sides
/// of the small-M threshold (16 / 17) and of a GEMM tile (128 / 129), N or K of 1 above it, and small-M shapes whose k the
/// kernel splits many ways (the property tests' k ≤ 300 gives at most 2 splits).
#[test]
fn edge_shapes_match_reference() {
    let shapes = [
        (1, 1, 1, 1),
        (16, 1, 9, 1),
        (17, 129, 127, 128),
        (128, 128, 128, 16),
        (129, 257, 65, 7),
        (255, 8, 8, 8),
        (2, 33, 300, 31),
        // N or K of 1 on the general paths (the fused GEMM, the passes over dY and X), rank 1 and 128
        (17, 1, 1, 1),
        (129, 1, 257, 5),
        (200, 300, 1, 16),
        (17, 65, 1, 128),
        // small-M with k split 10 ways (vector path) and 5 ways (k odd: element path)
        (16, 40, 2500, 20),
        (1, 7, 1031, 3),
    ];
    for (i, &(m, n, k, r)) in shapes.iter().enumerate() {
        let d = Dims { m, n, k, r };
        case::<bf16>(d, 2.0, i % 2 == 0, true, 1000 + i as u64);
        case::<f16>(d, -0.5, i % 2 == 1, true, 2000 + i as u64);
    }
}

/// The projection T = X·Aᵀ of one row tile (M ≤ 128) over several 1024-column K chunks runs the
/// small-batch shrink (kernels/multi_decode.cu, blocks of 16 rows, launch::small_projection), above 128
/// rows the fused GEMM's split reduction: each against the reference, and the first rows of a 160-row
/// batch keep their T and Y bits in a batch of their own (the same chains of mma steps), bf16 with
/// adapters in the layer dtype and f16 with f32 adapters, K a multiple of 8 (vector loads) and not
/// (element loads), M = 1 with f32 adapters (small_m takes only adapters in the layer dtype) as the
/// group with 15 rows past M. The launch record shows which kernel computed T. On the emulator and the
/// GPU when present.
#[test]
fn small_batch_projection_keeps_the_bits() {
    for (i, &(small, k, r)) in [(100, 2104, 40), (17, 2051, 128), (1, 1030, 7)]
        .iter()
        .enumerate()
    {
        let stream = common::seed() ^ (0x5a11 + i as u64);
        projection_case::<bf16, bf16>(small, k, r, i % 2 == 0, stream);
        projection_case::<f16, f32>(small, k, r, i % 2 == 1, stream ^ 1);
    }
}

fn projection_case<T: Element, A: Element>(
    small: usize,
    k: usize,
    r: usize,
    bias: bool,
    stream: u64,
) {
    let big = Dims {
        m: 160,
        n: 24,
        k,
        r,
    };
    let l = Layer::<T, A>::random(&mut Rng::new(stream), big, 1.25, bias);
    let s = l.first_rows(small);
    let mut devices = Vec::new();
    if !common::gpu_only() {
        devices.push(common::emulators().swap_remove(0));
    }
    devices.extend(common::gpu());
    for dev in &devices {
        let mut outs = Vec::new();
        for layer in [&l, &s] {
            let m = layer.d.m;
            dev.take_launches();
            let out = lora::run(dev, layer, false);
            let ran = dev.take_launches();
            lora::check(&dev.describe(), layer, &out, tol(T::DTYPE));
            // small_m computes T itself (M ≤ 16, adapters in the layer dtype); else the projection first
            let small_m =
                m <= lora_kernels::params::LK_SMALL_M_MAX as usize && A::DTYPE == T::DTYPE;
            if !dev.is_cuda() && !small_m {
                assert_eq!(
                    ran[0].starts_with("multi_decode_shrink_"),
                    m <= 128,
                    "{} M = {m}: {ran:?}",
                    T::DTYPE
                );
            }
            outs.push((out, small_m));
        }
        let ((yb, _), (ys, small_m)) = (&outs[0], &outs[1]);
        if !small_m {
            assert!(
                common::bits(&yb.y[..small * big.n]) == common::bits(&ys.y)
                    && common::bits(&yb.t[..small * r]) == common::bits(&ys.t),
                "{} {}/{} K = {k}, r = {r}: the first {small} rows of 160 changed bits in a batch of their own",
                dev.describe(),
                T::DTYPE,
                A::DTYPE
            );
        }
    }
}

/// Shapes whose GEMM tiles lie wholly inside the operands (m, n ≥ 128, k and r multiples of 32 with at
/// least 3 tiles): the fused GEMM's unchecked interior loops for the low-rank and the main tiles (forward
/// and dX), next to ragged edge tiles (m, n one past a tile) in the same launch.
#[test]
fn interior_tiles_match_reference() {
    let shapes = [(257, 256, 256, 128), (128, 257, 96, 96)];
    for (i, &(m, n, k, r)) in shapes.iter().enumerate() {
        let d = Dims { m, n, k, r };
        case::<bf16>(d, 1.5, i % 2 == 0, true, 3000 + i as u64);
        case::<f16>(d, -0.75, i % 2 == 1, true, 4000 + i as u64);
    }
}

/// Long reductions in one shape (it takes M·r·K ≥ 128²·264·96 multiply-adds, so one shape, one thread
/// order): T = X·Aᵀ split over K in 2 chunks (1024 and 72 columns) through the fused GEMM's unchecked
/// interior loop (K a multiple of 8: vector loads) next to K's ragged tile; and lowrank_grad at rank
/// class 128 with 24 token chunks of 128 rows (4 steps each) per strip, 9 strips of K for dA, the last
/// one ragged.
#[test]
fn split_reductions_run_their_interior_loops() {
    let d = Dims {
        m: 3072,
        n: 8,
        k: 1096,
        r: 128,
    };
    let mut rng = Rng::new(5);
    let l = Layer::<bf16>::random(&mut rng, d, 0.5, false);
    let out = lora::run(&common::emulators()[0], &l, true);
    lora::check("emulator", &l, &out, TOL_BF16);
}

/// Same inputs, same bits, call after call (no atomics, fixed reduction order); with M = 600 the
/// gradient reductions split M into chunks and go through the finalize kernel. On the emulator the
/// calls run under each of its four thread orders (a repeat under one order could not differ: the
/// emulator is deterministic), on the GPU three times.
#[test]
fn repeated_calls_give_identical_bits() {
    let d = Dims {
        m: 600,
        n: 40,
        k: 24,
        r: 8,
    };
    let mut rng = Rng::new(7);
    let l = Layer::<bf16>::random(&mut rng, d, 0.75, true);
    let mut devices = common::emulators();
    devices.extend(common::gpu());
    let first = lora::run(&devices[0], &l, true);
    lora::check("emulator", &l, &first, TOL_BF16);
    for dev in &devices[1..] {
        let repeats = if dev.is_cuda() { 3 } else { 1 };
        let mut outs = (0..repeats).map(|_| lora::run(dev, &l, true));
        let mine = outs.next().unwrap();
        if dev.is_cuda() {
            lora::check("gpu", &l, &mine, TOL_BF16);
            assert!(
                outs.all(|o| o.bits() == mine.bits()),
                "{dev:?}: a repeated call gave other bits"
            );
        } else {
            assert!(
                mine.bits() == first.bits(),
                "{dev:?}: other bits than the ascending thread order"
            );
        }
    }
}

/// One workspace kept across calls of different shapes (as a trainer keeps one across steps and
/// layers) gives the same bits as a fresh one per call: reused scratch is overwritten before it is read
/// (on the emulator a reused buffer is poisoned and tracked as never written again, so initcheck sees
/// a read of stale scratch), and it stops growing once it has served each size.
#[test]
fn a_reused_workspace_gives_the_same_bits() {
    let shapes = [
        (600, 40, 24, 8),  // split projections and gradients
        (5, 300, 1100, 3), // small-M with k split
        (129, 33, 70, 16),
        (600, 40, 24, 8), // the first shape again: buffers reused
    ];
    let mut rng = Rng::new(11);
    let layers: Vec<_> = shapes
        .iter()
        .map(|&(m, n, k, r)| Layer::<bf16>::random(&mut rng, Dims { m, n, k, r }, 1.5, true))
        .collect();
    let mut devices = vec![common::emulators().swap_remove(0)];
    devices.extend(common::gpu());
    for dev in &devices {
        let mut ws = lora_kernels::ops::Workspace::new();
        let mut held = Vec::new();
        for l in &layers {
            let reused = lora::run_in(dev, l, true, &mut ws);
            lora::check(&format!("{dev:?}"), l, &reused, TOL_BF16);
            assert!(
                reused.bits() == lora::run(dev, l, true).bits(),
                "{dev:?} {:?}: a reused workspace gave other bits",
                l.d
            );
            held.push(ws.bytes());
        }
        assert!(held[0] > 0, "the split reductions took no scratch memory");
        assert_eq!(
            held[3], held[2],
            "the workspace grew for a size it had served"
        );
    }
}

/// The two tile widths of the mma.sync fused GEMM (`ops::mma_tile`: 128 columns, or 64 where those at
/// least halve the busiest SM's work) give the same bits: every element of C is the same chain of mma
/// steps at either width. Each layer runs on an emulator of 1 SM, where every GEMM with more than 64
/// columns takes the 128-column tiles, and on one of 65536 SMs, where every GEMM takes the narrow ones:
/// the automatic choice at both ends. Forward (M > 16), dX and the projection (the 128-column tiles at
/// r > 64); bf16 and f16, f32 adapters, dropout; both against the reference, and the launch records say
/// which kernels ran.
#[test]
fn fused_gemm_tile_widths_give_the_same_bits() {
    use lora_kernels::Device;
    let Some((wide, narrow)) = common::tile_width_emulators() else {
        return;
    };
    fn both<T: Element, A: Element>(l: &Layer<T, A>, wide: &Device, narrow: &Device, label: usize) {
        let name = |kind: &str, narrow: bool| {
            let dtype = if T::DTYPE == DType::BF16 {
                "bf16"
            } else {
                "f16"
            };
            let ad = if A::DTYPE == DType::F32 { "_f32ad" } else { "" };
            let w = if narrow { "_narrow" } else { "" };
            format!("fused_gemm_{kind}{w}_{dtype}{ad}")
        };
        let mut bits = Vec::new();
        for (dev, is_narrow) in [(wide, false), (narrow, true)] {
            dev.take_launches();
            let out = lora::run(dev, l, true);
            lora::check(
                if is_narrow { "narrow" } else { "wide" },
                l,
                &out,
                tol(T::DTYPE),
            );
            let ran = dev.take_launches();
            let mut expected = vec![name("nn", is_narrow)];
            if l.d.m > 16 {
                expected.push(name("nt", is_narrow));
            }
            for k in expected {
                assert!(
                    ran.contains(&k.as_str()),
                    "case {label} {:?}: {k} did not run: {ran:?}",
                    l.d
                );
            }
            if !is_narrow {
                assert!(
                    !ran.iter().any(|k| k.starts_with("fused_gemm_nn_narrow")),
                    "case {label}: dX took the narrow tiles on one SM: {ran:?}"
                );
            }
            bits.push(out.bits());
        }
        assert!(
            bits[0] == bits[1],
            "case {label} {:?}: the tile widths give different bits",
            l.d
        );
    }
    let shapes = [
        (17, 65, 72, 5),
        (130, 100, 200, 33),
        (200, 256, 65, 70),
        (5, 80, 120, 16),
        (129, 250, 96, 128),
    ];
    let mut rng = Rng::new(common::seed() ^ 0x7769_6474);
    for (i, &(m, n, k, r)) in shapes.iter().enumerate() {
        let d = Dims { m, n, k, r };
        let scale = 1.5;
        match i % 3 {
            0 => both(
                &Layer::<bf16>::random(&mut rng, d, scale, true),
                &wide,
                &narrow,
                i,
            ),
            1 => both(
                &Layer::<f16, f32>::random(&mut rng, d, scale, false),
                &wide,
                &narrow,
                i,
            ),
            _ => {
                let l = Layer::<bf16>::random(&mut rng, d, scale, true)
                    .with_dropout(dropout_of(0.2, 7, i as u64));
                both(&l, &wide, &narrow, i)
            }
        }
    }
}

/// `ops::mma_tile` on the GPUs the bound table covers: the narrow tiles where the wide ones leave SMs
/// idle, the wide ones where both fill the GPU.
#[test]
fn mma_tile_takes_the_narrow_tiles_where_sms_idle() {
    use lora_kernels::ops::mma_tile;
    assert_eq!(mma_tile(256, 4096, 132), (128, 64)); // 64 wide tiles on 132 SMs
    assert_eq!(mma_tile(384, 4096, 132), (128, 128)); // 96 wide tiles, 192 narrow: two on some SMs
    assert_eq!(mma_tile(512, 4096, 132), (128, 128)); // 128 wide tiles: one per SM already
    assert_eq!(mma_tile(4096, 4096, 108), (128, 128)); // 10 wide tiles or 19 narrow on some SM
    assert_eq!(mma_tile(8192, 4096, 132), (128, 128));
    assert_eq!(mma_tile(256, 4096, 108), (128, 128)); // 64 wide tiles: 128 narrow ones need 2 on some SMs
    assert_eq!(mma_tile(128, 4096, 108), (128, 64));
    assert_eq!(mma_tile(8192, 16, 132), (128, 64)); // N ≤ 64: half the padded columns
    assert_eq!(mma_tile(8192, 4160, 132), (128, 128));
}

/// A `DropoutSchedule` (the mask's offset in device memory, for graphs) gives the bits of a `Dropout`
/// at the offset it holds, before and after `advance`, and a new offset gives a new mask: the forward's
/// T (masked X as it is loaded, one chunk or several), dA and dX, layer-dtype and f32 adapters, M in the
/// small-M range (with dropout the general path), 1 and ragged; on the emulator's four thread orders and
/// the GPU when present. The launch's own offset is the complement of the schedule's, so a kernel that
/// read it would fail here. A schedule on another device is refused before anything runs.
#[test]
fn dropout_schedule_gives_the_fixed_dropouts_bits() {
    use common::lora::{check, run, run_with};
    use lora_kernels::{DropoutSchedule, Error, Tensor, ops};
    let shapes = [
        (16, 64, 40, 8),
        (1, 40, 24, 3),
        (37, 97, 65, 16),
        (5, 1100, 24, 7),
    ];
    for (i, dev) in common::all_devices().iter().enumerate() {
        for (j, &(m, k, n, r)) in shapes.iter().enumerate() {
            let d = Dims { m, n, k, r };
            let stream = common::seed() ^ (0x5c4e + (i * 8 + j) as u64);
            let mut rng = Rng::new(stream);
            let first = 1 << 33 | j as u64;
            let drop = dropout_of(0.3, stream, first);
            let mut at = Layer::<bf16>::random(&mut rng, d, 1.25, j % 2 == 0);
            let mut at32 = Layer::<bf16, f32>::random(&mut rng, d, -0.5, j % 2 == 1);
            let mut schedule = DropoutSchedule::new(dev, drop).unwrap();
            let mut previous = None;
            for offset in [first, first + 1] {
                assert_eq!(schedule.dropout(), drop.with_offset(offset));
                at.dropout = drop.with_offset(offset);
                let got = run_with(
                    dev,
                    &at,
                    true,
                    &mut ops::Workspace::new(),
                    (&schedule).into(),
                );
                let want = run(dev, &at, true);
                assert_eq!(got.bits(), want.bits(), "{dev:?} {d:?} offset {offset}");
                check(&format!("{dev:?} {d:?} scheduled"), &at, &got, TOL_BF16);
                at32.dropout = drop.with_offset(offset);
                let got32 = run_with(
                    dev,
                    &at32,
                    true,
                    &mut ops::Workspace::new(),
                    (&schedule).into(),
                );
                assert_eq!(
                    got32.bits(),
                    run(dev, &at32, true).bits(),
                    "{dev:?} {d:?} f32 adapters"
                );
                if let Some(p) = previous.replace(got.bits()) {
                    assert_ne!(
                        p,
                        got.bits(),
                        "{dev:?} {d:?}: the advanced offset masks anew"
                    );
                }
                if offset == first {
                    assert_eq!(schedule.advance().unwrap(), first + 1);
                }
            }
        }
    }
    // a schedule on another device: refused, nothing written
    let (dev, other) = (
        lora_kernels::Device::emulator(),
        lora_kernels::Device::emulator(),
    );
    let (m, n, k, r) = (4, 8, 16, 2);
    let up = |v: &[bf16], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
    let mut rng = Rng::new(3);
    let l = Layer::<bf16>::random(&mut rng, Dims { m, n, k, r }, 1.0, false);
    let (x, w0, a, b) = (
        up(&l.x, &[m, k]),
        up(&l.w0, &[n, k]),
        up(&l.a, &[r, k]),
        up(&l.b, &[n, r]),
    );
    let mut y = Tensor::<bf16>::zeros(&dev, &[m, n]).unwrap();
    let mut t = Tensor::<bf16>::zeros(&dev, &[m, r]).unwrap();
    let elsewhere = DropoutSchedule::new(&other, dropout_of(0.5, 1, 2)).unwrap();
    let e = ops::lora_forward_into(
        &x,
        &w0,
        &a,
        &b,
        None,
        1.0,
        &elsewhere,
        &mut y,
        &mut t,
        &mut ops::Workspace::new(),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::DeviceMismatch { arg, .. } if arg.contains("DropoutSchedule")),
        "{e}"
    );
    assert_eq!(
        y.to_vec().unwrap(),
        vec![bf16::ZERO; m * n],
        "nothing written"
    );
}
