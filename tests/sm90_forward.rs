//! The sm_90a fused GEMM (kernels/sm90/fused_gemm_sm90.cu: TMA, mbarriers, wgmma, warp-specialised,
//! persistent) run by the emulator as a compute-capability-9.0 device, through `lora_forward`: property
//! tests over ragged m and n (not multiples of the 128-row tiles; m > 16 so the small-M kernel stays out),
//! k and r multiples of 8 (TMA's row strides) from 8 to 320 and 8 to 128, bf16/f16, bias or not, each
//! against the f64 reference with the outputs poisoned, under the ascending thread order and one of the
//! other four (rotating over the cases) with identical bits (the race detector in its happens-before mode
//! watching every access, the seeds varying the shared-memory alignment), and each block looping over several
//! tiles (the emulator's persistent grid is 3 blocks). Then dX (`lora_backward`, the "nn" kernel: W0 and
//! A read MN-major from 64×64 boxes) on 13 shapes. `LK_FUSED_GEMM=sm90` is set for this whole test
//! binary, so a forward the Hopper kernel cannot take fails instead of falling back.
//!
//! Cases per run: `PROPTEST_CASES` (default 64).

mod common;

use common::Rng;
use half::{bf16, f16};
use lora_kernels::dropout::Dropout;
use lora_kernels::ops::Workspace;
use lora_kernels::ops::lora_forward_into;
use lora_kernels::reference::{self, Dims};
use lora_kernels::{DType, Device, Element, EmuConfig, Tensor, ThreadOrder};
use proptest::prelude::*;

fn force_sm90() {
    // SAFETY: every test of this binary sets the same value before any kernel runs, and nothing reads
    // the environment concurrently in a way that a torn write could confuse (the value never changes).
    unsafe { std::env::set_var("LK_FUSED_GEMM", "sm90") };
}

fn hopper(order: ThreadOrder, seed: u64) -> Device {
    Device::emulator_with(EmuConfig {
        order,
        seed,
        arch: 90,
        ..EmuConfig::default()
    })
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 2e-3 }
}

fn case<T: Element>((m, n, k, r): (usize, usize, usize, usize), bias: bool, stream: u64) {
    force_sm90();
    let mut rng = Rng::new(stream);
    let x = rng.vec::<T>(m * k, 1.0);
    let w0 = rng.vec::<T>(n * k, 1.0 / (k as f64).sqrt());
    let a = rng.vec::<T>(r * k, 1.0 / (k as f64).sqrt());
    let b = rng.vec::<T>(n * r, 1.0 / (r as f64).sqrt());
    let bias_v = bias.then(|| rng.vec::<T>(n, 0.5));
    let scale = 0.5 + rng.uniform().abs() as f32;
    let want = reference::forward_as_kernels(
        &x,
        &w0,
        &a,
        &b,
        bias_v.as_deref(),
        Dims { m, n, k, r },
        scale as f64,
        &Dropout::NONE,
    );
    let mut first: Option<Vec<u32>> = None;
    // ascending, then one of the other four orders (by case): every order over the run
    let others = [
        ThreadOrder::Descending,
        ThreadOrder::Shuffled,
        ThreadOrder::WarpGreedyAscending,
        ThreadOrder::WarpGreedyDescending,
    ];
    let second = others[(stream % 4) as usize];
    for dev in [
        hopper(ThreadOrder::Ascending, 0),
        hopper(second, stream | 1),
    ] {
        let up = |v: &[T], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
        let (xt, wt, at, bt) = (
            up(&x, &[m, k]),
            up(&w0, &[n, k]),
            up(&a, &[r, k]),
            up(&b, &[n, r]),
        );
        let bias_t = bias_v.as_ref().map(|v| up(v, &[n]));
        let mut y = Tensor::<T>::zeros(&dev, &[m, n]).unwrap();
        let mut t = Tensor::<T>::zeros(&dev, &[m, r]).unwrap();
        y.poison().unwrap();
        t.poison().unwrap();
        lora_forward_into(
            &xt,
            &wt,
            &at,
            &bt,
            bias_t.as_ref(),
            scale,
            Dropout::NONE,
            &mut y,
            &mut t,
            &mut Workspace::new(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{:?} {m}×{n}×{k} r {r} on {}: {e}",
                T::DTYPE,
                dev.describe()
            )
        });
        let yv = y.to_vec().unwrap();
        let err = reference::relative_error(&yv, &want.y);
        assert!(
            err <= tol(T::DTYPE),
            "{:?} {m}×{n}×{k} r {r} bias {bias} on {}: relative error {err:e}",
            T::DTYPE,
            dev.describe()
        );
        let bits: Vec<u32> = yv.iter().map(|v| v.to_bits_u32()).collect();
        match &first {
            None => first = Some(bits),
            Some(f) => assert!(
                *f == bits,
                "{m}×{n}×{k} r {r}: bits differ between thread orders"
            ),
        }
    }
}

fn shape() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    (17usize..=300, 1usize..=300, 1usize..=40, 1usize..=16)
        .prop_map(|(m, n, k8, r8)| (m, n, 8 * k8, 8 * r8))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn sm90_forward_matches_reference(dims in shape(), f16_layer in any::<bool>(), bias in any::<bool>(), stream in any::<u64>()) {
        if f16_layer { case::<f16>(dims, bias, stream) } else { case::<bf16>(dims, bias, stream) }
    }
}

/// Edges: one row past a tile, one full tile, rank 128 (two low-rank stages), k = 8 (one partial stage),
/// the largest ragged tile grid here (3×3 tiles over 3 blocks).
#[test]
fn sm90_forward_edges() {
    for (i, dims) in [
        (129, 128, 64, 8),
        (128, 129, 8, 128),
        (17, 1, 72, 16),
        (300, 260, 136, 64),
    ]
    .into_iter()
    .enumerate()
    {
        case::<bf16>(dims, i % 2 == 0, 0x5e90 + i as u64);
    }
}

/// A forward the Hopper kernel cannot take (k not a multiple of 8) is an error under LK_FUSED_GEMM=sm90.
#[test]
fn sm90_forced_refuses_what_it_cannot_run() {
    force_sm90();
    let dev = hopper(ThreadOrder::Ascending, 0);
    let (m, n, k, r) = (20, 8, 12, 8);
    let z = |len: usize, shape: &[usize]| {
        Tensor::from_slice(&dev, &vec![bf16::ZERO; len], shape).unwrap()
    };
    let (x, w0, a, b) = (
        z(m * k, &[m, k]),
        z(n * k, &[n, k]),
        z(r * k, &[r, k]),
        z(n * r, &[n, r]),
    );
    let e = lora_kernels::ops::lora_forward(&x, &w0, &a, &b, None, 1.0).unwrap_err();
    assert!(e.to_string().contains("multiples of 8"), "{e}");
}

/// dX = dY·W0 + s·U·A on the Hopper kernel ("nn": W0 and A read MN-major), through `lora_backward`.
fn backward_case<T: Element>((m, n, k, r): (usize, usize, usize, usize), stream: u64) {
    force_sm90();
    let mut rng = Rng::new(stream);
    let x = rng.vec::<T>(m * k, 1.0);
    let w0 = rng.vec::<T>(n * k, 1.0 / (k as f64).sqrt());
    let a = rng.vec::<T>(r * k, 1.0 / (k as f64).sqrt());
    let b = rng.vec::<T>(n * r, 1.0 / (r as f64).sqrt());
    let t = rng.vec::<T>(m * r, 1.0);
    let dy = rng.vec::<T>(m * n, 1.0);
    let scale = 0.5 + rng.uniform().abs() as f32;
    let want = reference::backward_as_kernels(
        &x,
        &w0,
        &a,
        &b,
        &t,
        &dy,
        Dims { m, n, k, r },
        scale as f64,
        &Dropout::NONE,
    );
    let dev = hopper(ThreadOrder::WarpGreedyDescending, stream | 1);
    let up = |v: &[T], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
    let g = lora_kernels::ops::lora_backward(
        &up(&x, &[m, k]),
        &up(&w0, &[n, k]),
        &up(&a, &[r, k]),
        &up(&b, &[n, r]),
        &up(&t, &[m, r]),
        &up(&dy, &[m, n]),
        scale,
        true,
    )
    .unwrap_or_else(|e| panic!("{:?} {m}×{n}×{k} r {r}: {e}", T::DTYPE));
    let dx = g.dx.unwrap().to_vec().unwrap();
    let err = reference::relative_error(&dx, &want.dx);
    assert!(
        err <= tol(T::DTYPE),
        "{:?} {m}×{n}×{k} r {r}: dX relative error {err:e}",
        T::DTYPE
    );
}

/// dX on the Hopper kernel: ragged m, n and k multiples of 8 (W0's rows in both orientations), ranks 8..128.
#[test]
fn sm90_dx_matches_reference() {
    let mut rng = Rng::new(common::seed() ^ 0xd0);
    for i in 0..12u64 {
        let dims = (
            17 + (rng.next_u64() % 260) as usize,
            8 * (1 + (rng.next_u64() % 30) as usize),
            8 * (1 + (rng.next_u64() % 30) as usize),
            8 * (1 + (rng.next_u64() % 16) as usize),
        );
        if i % 2 == 0 {
            backward_case::<bf16>(dims, rng.next_u64());
        } else {
            backward_case::<f16>(dims, rng.next_u64());
        }
    }
    backward_case::<bf16>((129, 136, 264, 128), 7);
}
