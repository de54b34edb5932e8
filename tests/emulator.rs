//! The emulator's own fidelity: ldmatrix and mma fragment layouts against the PTX ISA formulas on small
//! integers (exact sums), tiled GEMMs built from them, the speed figure, and planted bugs it must catch.
//! Test kernels: tests/kernels/*.cu (not part of the library).

mod common;

use std::ffi::c_void;
use std::time::Instant;

use common::Rng;
use common::probes::{LdmatrixProbeParams, MmaProbeParams};
use half::{bf16, f16};
use lora_kernels::device::{EmuRegion, emu_launch_raw};
use lora_kernels::kernel::EmuBody;
use lora_kernels::{Device, EmuConfig, LaunchPlan, Tensor, ThreadOrder};

include!(concat!(env!("OUT_DIR"), "/test_kernel_decls.rs"));

fn orders() -> [EmuConfig; 5] {
    let cfg = |order, seed| EmuConfig {
        order,
        seed,
        ..EmuConfig::default()
    };
    [
        cfg(ThreadOrder::Ascending, 0),
        cfg(ThreadOrder::Descending, 0),
        cfg(ThreadOrder::Shuffled, 0x5eed),
        cfg(ThreadOrder::WarpGreedyAscending, 0),
        cfg(ThreadOrder::WarpGreedyDescending, 7),
    ]
}

fn plan(grid: [u32; 3], threads: u32, smem: u32) -> LaunchPlan {
    LaunchPlan {
        grid,
        block: [threads, 1, 1],
        smem_bytes: smem,
    }
}

fn launch<P: Copy>(
    cfg: &EmuConfig,
    body: EmuBody,
    plan: &LaunchPlan,
    params: &P,
    regions: &[EmuRegion],
) -> Result<(), String> {
    // SAFETY: each caller passes the params struct its kernel declares, and regions describing live
    // buffers (the ones the params point into) that outlive the call.
    unsafe { emu_launch_raw(cfg, body, plan, params, regions) }
}

#[test]
fn ldmatrix_matches_ptx_layout() {
    // element (matrix j, row r, col c) = j*64 + r*8 + c: every value distinct and exact
    let src: Vec<u16> = (0..256).collect();
    let value = |j: usize, r: usize, c: usize| (j * 64 + r * 8 + c) as u32;
    for variant in 0..6 {
        let (n, trans) = ([1, 2, 4][variant % 3], variant >= 3);
        for cfg in &orders() {
            let mut out = vec![0xDEAD_BEEFu32; 128];
            let p = LdmatrixProbeParams {
                src: src.as_ptr(),
                out: out.as_mut_ptr(),
                variant: variant as i32,
            };
            launch(
                cfg,
                lk_emu_body_ldmatrix_probe,
                &plan([1, 1, 1], 32, 512),
                &p,
                &[
                    EmuRegion::input("src", &src),
                    EmuRegion::output("out", &mut out),
                ],
            )
            .unwrap();
            for lane in 0..32 {
                for j in 0..n {
                    let (lo, hi) = if trans {
                        (
                            value(j, 2 * (lane % 4), lane / 4),
                            value(j, 2 * (lane % 4) + 1, lane / 4),
                        )
                    } else {
                        (
                            value(j, lane / 4, 2 * (lane % 4)),
                            value(j, lane / 4, 2 * (lane % 4) + 1),
                        )
                    };
                    assert_eq!(
                        out[lane * 4 + j],
                        lo | (hi << 16),
                        "variant {variant} lane {lane} reg {j}"
                    );
                }
            }
        }
    }
}

/// Random small-integer A (16x16), B (16x8), C (16x8); registers laid out per the PTX ISA
/// ("Matrix Fragments for mma.m16n8k16"); D must equal A·B + C exactly at the formula's positions.
fn check_mma(body: EmuBody, bits: fn(f32) -> u16, stream: u64) {
    let mut rng = Rng::new(stream);
    let mut int = || ((rng.next_u64() % 9) as i32 - 4) as f32;
    let a: Vec<f32> = (0..256).map(|_| int()).collect();
    let b: Vec<f32> = (0..128).map(|_| int()).collect();
    let c: Vec<f32> = (0..128).map(|_| int()).collect();
    let (mut ar, mut br, mut cr) = (vec![0u32; 128], vec![0u32; 64], vec![0f32; 128]);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for e in 0..8 {
            let (reg, half) = (e / 2, e % 2);
            let (row, col) = (g + 8 * (reg & 1), t * 2 + half + 8 * (reg >= 2) as usize);
            ar[lane * 4 + reg] |= (bits(a[row * 16 + col]) as u32) << (16 * half);
        }
        for e in 0..4 {
            let (reg, half) = (e / 2, e % 2);
            let k = t * 2 + half + 8 * reg;
            br[lane * 2 + reg] |= (bits(b[k * 8 + g]) as u32) << (16 * half);
        }
        for i in 0..4 {
            cr[lane * 4 + i] = c[(g + 8 * (i >= 2) as usize) * 8 + t * 2 + (i & 1)];
        }
    }
    for cfg in &orders() {
        let mut d = vec![f32::NAN; 128];
        let p = MmaProbeParams {
            a: ar.as_ptr(),
            b: br.as_ptr(),
            c: cr.as_ptr(),
            d: d.as_mut_ptr(),
        };
        let regions = [
            EmuRegion::input("a", &ar),
            EmuRegion::input("b", &br),
            EmuRegion::input("c", &cr),
            EmuRegion::output("d", &mut d),
        ];
        launch(cfg, body, &plan([1, 1, 1], 32, 0), &p, &regions).unwrap();
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..4 {
                let (row, col) = (g + 8 * (i >= 2) as usize, t * 2 + (i & 1));
                let want: f32 = (0..16)
                    .map(|k| a[row * 16 + k] * b[k * 8 + col])
                    .sum::<f32>()
                    + c[row * 8 + col];
                assert_eq!(
                    d[lane * 4 + i],
                    want,
                    "lane {lane} d{i} (row {row}, col {col})"
                );
            }
        }
    }
}

#[test]
fn mma_bf16_matches_ptx_layout() {
    check_mma(
        lk_emu_body_mma_probe_bf16,
        |v| bf16::from_f32(v).to_bits(),
        1,
    );
}

#[test]
fn mma_f16_matches_ptx_layout() {
    check_mma(lk_emu_body_mma_probe_f16, |v| f16::from_f32(v).to_bits(), 2);
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TiledGemmParams {
    a: *const bf16,
    b: *const bf16,
    c: *mut f32,
    m: i32,
    n: i32,
    k: i32,
}

/// Runs a tiled GEMM on small integers and returns C; panics unless it equals the naive product.
fn tiled_gemm(
    body: EmuBody,
    tile: usize,
    threads: u32,
    smem: u32,
    (m, n, k): (usize, usize, usize),
    cfg: &EmuConfig,
) -> Vec<f32> {
    let mut rng = Rng::new(7);
    let mut int = || bf16::from_f32(((rng.next_u64() % 7) as i32 - 3) as f32);
    let a: Vec<bf16> = (0..m * k).map(|_| int()).collect();
    let b: Vec<bf16> = (0..n * k).map(|_| int()).collect();
    let mut c = vec![f32::NAN; m * n];
    let p = TiledGemmParams {
        a: a.as_ptr(),
        b: b.as_ptr(),
        c: c.as_mut_ptr(),
        m: m as i32,
        n: n as i32,
        k: k as i32,
    };
    let grid = [(n / tile) as u32, (m / tile) as u32, 1];
    let regions = [
        EmuRegion::input("a", &a),
        EmuRegion::input("b", &b),
        EmuRegion::output("c", &mut c),
    ];
    launch(cfg, body, &plan(grid, threads, smem), &p, &regions).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k)
                .map(|l| a[i * k + l].to_f32() * b[j * k + l].to_f32())
                .sum();
            assert_eq!(c[i * n + j], want, "C[{i}][{j}]");
        }
    }
    c
}

#[test]
fn tiled_gemm_64_is_exact_under_every_order() {
    let runs: Vec<Vec<f32>> = orders()
        .iter()
        .map(|cfg| {
            tiled_gemm(
                lk_emu_body_tiled_gemm_bf16,
                64,
                128,
                16 * 1024,
                (64, 64, 64),
                cfg,
            )
        })
        .collect();
    assert!(runs.windows(2).all(|w| w[0] == w[1]));
    tiled_gemm(
        lk_emu_body_tiled_gemm_bf16,
        64,
        128,
        16 * 1024,
        (128, 192, 96),
        &orders()[2],
    );
}

/// The speed figure of the README: a 128x128-tile bf16 GEMM, 256 threads, M = N = K = 256.
#[test]
fn tiled_gemm_128_speed() {
    let start = Instant::now();
    tiled_gemm(
        lk_emu_body_tiled_gemm128_bf16,
        128,
        256,
        32 * 1024,
        (256, 256, 256),
        &orders()[0],
    );
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "emulated 128x128-tile GEMM, 256 threads, M=N=K=256: {secs:.3} s (includes the CPU check)"
    );
    assert!(secs < 5.0, "the emulator took {secs:.2} s");
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PlantedParams {
    x: *const f32,
    y: *mut f32,
    n: i32,
    bug: i32,
}

/// Runs a planted-bug kernel under every order; returns each order's output or error.
fn run_planted(
    body: EmuBody,
    threads: u32,
    smem: u32,
    n: usize,
    bug: i32,
) -> Vec<Result<Vec<f32>, String>> {
    let x: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
    orders()
        .iter()
        .map(|cfg| {
            let mut y = vec![f32::NAN; n];
            let p = PlantedParams {
                x: x.as_ptr(),
                y: y.as_mut_ptr(),
                n: n as i32,
                bug,
            };
            let regions = [EmuRegion::input("x", &x), EmuRegion::output("y", &mut y)];
            launch(cfg, body, &plan([1, 1, 1], threads, smem), &p, &regions).map(|()| y)
        })
        .collect()
}

/// Caught: an error, or a NaN (poison) in the output, or outputs that differ between orders.
fn caught(runs: &[Result<Vec<f32>, String>]) -> bool {
    runs.iter().any(|r| match r {
        Err(_) => true,
        Ok(y) => y.iter().any(|v| v.is_nan()),
    }) || runs.windows(2).any(|w| w[0] != w[1])
}

fn clean(runs: &[Result<Vec<f32>, String>]) -> Vec<f32> {
    let first = runs[0].clone().unwrap();
    assert!(first.iter().all(|v| v.is_finite()));
    for r in runs {
        assert_eq!(r.as_ref().unwrap(), &first);
    }
    first
}

#[test]
fn catches_missing_syncthreads() {
    let good = clean(&run_planted(
        lk_emu_body_planted_missing_sync,
        64,
        256,
        64,
        0,
    ));
    assert_eq!(good[0], 4.0);
    assert!(caught(&run_planted(
        lk_emu_body_planted_missing_sync,
        64,
        256,
        64,
        1
    )));
}

#[test]
fn catches_missing_cp_async_wait() {
    let good = clean(&run_planted(
        lk_emu_body_planted_missing_wait,
        32,
        512,
        128,
        0,
    ));
    assert_eq!(good[0], 5.0);
    assert!(caught(&run_planted(
        lk_emu_body_planted_missing_wait,
        32,
        512,
        128,
        1
    )));
}

#[test]
fn catches_divergent_barriers() {
    clean(&run_planted(
        lk_emu_body_planted_divergent_barrier,
        32,
        128,
        32,
        0,
    ));
    for bug in [1, 2] {
        let runs = run_planted(lk_emu_body_planted_divergent_barrier, 32, 128, 32, bug);
        for r in &runs {
            let e = r.as_ref().expect_err("a barrier bug must be an error");
            let want = if bug == 1 {
                "partial __syncthreads"
            } else {
                "divergent __syncthreads"
            };
            assert!(e.contains(want), "{e}");
        }
    }
}

/// Runs a planted-bug kernel on guarded emulator tensors (x = `data`, y poisoned), one block of
/// `blocks` blocks of `threads`, ascending thread order: the launch's result and y.
fn run_planted_on_tensors(
    body: EmuBody,
    blocks: u32,
    threads: u32,
    data: &[f32],
    bug: i32,
) -> (Result<(), String>, Vec<f32>) {
    let dev = Device::emulator();
    let n = data.len();
    let mut x = Tensor::from_slice(&dev, data, &[n]).unwrap();
    let mut y = Tensor::<f32>::zeros(&dev, &[n]).unwrap();
    y.poison().unwrap();
    let (xp, yp) = (x.emu_data_ptr().unwrap(), y.emu_data_ptr().unwrap());
    let p = PlantedParams {
        x: xp,
        y: yp,
        n: n as i32,
        bug,
    };
    let regions = [
        EmuRegion {
            name: "x",
            ptr: xp as *const u8,
            len: 4 * n,
            writable: false,
            init: std::ptr::null_mut(),
        },
        EmuRegion {
            name: "y",
            ptr: yp as *const u8,
            len: 4 * n,
            writable: true,
            init: std::ptr::null_mut(),
        },
    ];
    let r = launch(
        &orders()[0],
        body,
        &plan([blocks, 1, 1], threads, 0),
        &p,
        &regions,
    );
    (r, y.to_vec().unwrap())
}

/// A read past the end is refused by memcheck (before the guard zone's NaN could reach the output).
#[test]
fn catches_read_past_the_end() {
    let n = 100;
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    for bug in [0, 1] {
        let (r, out) = run_planted_on_tensors(lk_emu_body_planted_oob_read, 4, 32, &data, bug);
        if bug == 0 {
            r.unwrap();
            assert_eq!(out[n - 1], (n - 1) as f32);
            assert!(out.iter().all(|v| v.is_finite()));
        } else {
            let e = r.expect_err("a read past the end must be an error");
            assert!(
                e.contains("out-of-bounds global read") && e.contains("argument `x`"),
                "{e}"
            );
        }
    }
}

#[test]
fn catches_misaligned_vector_access() {
    let data: Vec<f32> = (0..128).map(|i| i as f32).collect();
    for bug in [0, 1] {
        let (r, out) =
            run_planted_on_tensors(lk_emu_body_planted_misaligned_vector, 1, 32, &data, bug);
        if bug == 0 {
            r.unwrap();
            assert_eq!(out, data);
        } else {
            let e = r.expect_err("a misaligned 16-byte load must be an error");
            assert!(e.contains("not 16-byte aligned"), "{e}");
        }
    }
}

#[test]
fn bad_launch_configuration_is_an_error() {
    let p = PlantedParams {
        x: std::ptr::null(),
        y: std::ptr::null_mut(),
        n: 0,
        bug: 0,
    };
    let e = launch(
        &orders()[0],
        lk_emu_body_planted_oob_read,
        &plan([1, 1, 1], 2048, 0),
        &p,
        &[],
    )
    .unwrap_err();
    assert!(e.contains("1..=1024"), "{e}");
    let _ = std::ptr::null::<c_void>();
}
