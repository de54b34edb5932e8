//! wgmma in the emulator (kernels/emu/lk_emu_wgmma.cpp, kernels/include/lk_wgmma.cuh):
//! - the operand address of every (major-ness × swizzle) combination equals the PTX ISA's canonical
//!   layouts (the CuTe layouts of its "Shared Memory Matrix Layout" figures, evaluated here generically);
//! - a 64×64×64 bf16 tile (tests/kernels/planted_wgmma.cu: TMA 128-byte swizzled loads on an mbarrier,
//!   four k16 wgmma steps, A from shared memory or registers, B K-major or MN-major) matches the f64
//!   product under every thread order;
//! - B MN-major and 16 or 32 columns wide in the 32- or 64-byte swizzle (dX's one-launch kernel reads
//!   the LoRA B's slice so) matches the product too, and so does A read MN-major (as that kernel reads dY's
//!   and X's boxes for dB's and dA's partials);
//! - the planted bugs are caught: the wrong swizzle in the descriptors (wrong values), accumulators read
//!   before the wait (NaN), no wgmma.fence, writing an operand the wgmma still reads, exiting before the
//!   wait, an operand stored by the threads without fence.proxy.async before the wgmma reads it (and with
//!   the fence it passes).

mod common;

use common::probes::WgmmaParams;
use lora_kernels::params::LkTensorMap;

use common::Rng;
use lora_kernels::device::{EmuRegion, emu_launch_raw};
use lora_kernels::tma::{Swizzle, TensorMapSpec};
use lora_kernels::{Device, EmuConfig, LaunchPlan};

include!(concat!(env!("OUT_DIR"), "/test_kernel_decls.rs"));

unsafe extern "C" {
    fn lk_emu_wgmma_operand_address(desc: u64, mn_major: u32, r: u32, k: u32) -> u64;
}

/// A descriptor as lk_wgmma_desc builds it (swizzle in the descriptor's encoding: 1 = 128 B, 2 = 64, 3 = 32).
fn desc(start: u64, lbo: u64, sbo: u64, swizzle: u64) -> u64 {
    ((start & 0x3FFFF) >> 4)
        | (((lbo & 0x3FFFF) >> 4) << 16)
        | (((sbo & 0x3FFFF) >> 4) << 32)
        | (swizzle << 62)
}

/// A CuTe layout (shape, stride) of one mode evaluated at `i` (colexicographic: first sub-mode fastest).
fn mode(i: u64, shape: &[u64], stride: &[u64]) -> u64 {
    let (mut i, mut off) = (i, 0);
    for (s, d) in shape.iter().zip(stride) {
        off += (i % s) * d;
        i /= s;
    }
    off
}

fn swizzle(a: u64, bytes: u64) -> u64 {
    if bytes == 0 {
        a
    } else {
        a ^ (((a >> 7) & (bytes / 16 - 1)) << 4)
    }
}

#[test]
fn operand_addresses_follow_the_isa_layouts() {
    // (K-major?, swizzle bytes, descriptor code, (MN shape, stride), (K shape, stride) in bf16 elements,
    // LBO, SBO in bytes): the canonical layouts ((8,m),(T,2)) for K-major and ((T,W/16,m),(8,k)) for
    // MN-major with T = 8 (PTX ISA "Shared Memory Matrix Layout"; the MN-major none/32/64 cases are its
    // worked examples), 64 rows (A's M, or B's N = 64).
    type Case = (
        bool,
        u64,
        u64,
        (&'static [u64], &'static [u64]),
        (&'static [u64], &'static [u64]),
        u64,
        u64,
    );
    let cases: [Case; 8] = [
        (
            true,
            0,
            0,
            (&[8, 8], &[8, 256]),
            (&[8, 2], &[1, 128]),
            256,
            512,
        ),
        (
            true,
            32,
            3,
            (&[8, 8], &[16, 128]),
            (&[8, 2], &[1, 8]),
            16,
            256,
        ),
        (
            true,
            64,
            2,
            (&[8, 8], &[32, 256]),
            (&[8, 2], &[1, 8]),
            16,
            512,
        ),
        (
            true,
            128,
            1,
            (&[8, 8], &[64, 512]),
            (&[8, 2], &[1, 8]),
            16,
            1024,
        ),
        (
            false,
            0,
            0,
            (&[8, 1, 8], &[1, 8, 64]),
            (&[8, 2], &[8, 1024]),
            2048,
            128,
        ),
        (
            false,
            32,
            3,
            (&[8, 2, 4], &[1, 8, 128]),
            (&[8, 2], &[16, 256]),
            256,
            512,
        ),
        (
            false,
            64,
            2,
            (&[8, 4, 2], &[1, 8, 256]),
            (&[8, 2], &[32, 512]),
            512,
            1024,
        ),
        (
            false,
            128,
            1,
            (&[8, 8, 1], &[1, 8, 512]),
            (&[8, 2], &[64, 1024]),
            1024,
            2048,
        ),
    ];
    for (k_major, bytes, code, (ms, md), (ks, kd), lbo, sbo) in cases {
        // tiles at their pattern's boundary, and (K-major swizzled) advanced by 32 bytes for a k16 step
        let starts: &[u64] = if k_major && bytes > 0 {
            &[0x4000, 0x4020]
        } else {
            &[0x4000]
        };
        for &start in starts {
            let d = desc(start, lbo, sbo, code);
            for r in 0..64u32 {
                for k in 0..16u32 {
                    let want = swizzle(
                        start + 2 * (mode(r as u64, ms, md) + mode(k as u64, ks, kd)),
                        bytes,
                    );
                    // SAFETY: a pure function of its arguments.
                    let got = unsafe { lk_emu_wgmma_operand_address(d, (!k_major) as u32, r, k) };
                    assert_eq!(
                        got, want,
                        "K-major {k_major}, swizzle {bytes}, start {start:#x}: element ({r}, {k})"
                    );
                }
            }
        }
    }
    // a non-zero base offset is not modelled
    // SAFETY: as above.
    assert_eq!(
        unsafe { lk_emu_wgmma_operand_address(desc(0x4000, 16, 1024, 1) | (3 << 49), 0, 0, 0) },
        u64::MAX
    );
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct A16([u16; 8]);

struct Inputs {
    a: Vec<A16>,
    b: Vec<A16>,
}

fn u16s(v: &[A16]) -> &[u16] {
    // SAFETY: A16 is eight u16, repr(C), no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len() * 8) }
}

fn bf16_bits(x: f64) -> u16 {
    half::bf16::from_f64(x).to_bits()
}

fn bf16_value(b: u16) -> f64 {
    half::bf16::from_bits(b).to_f64()
}

fn inputs(seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let mut v = || {
        let mut t = vec![A16([0; 8]); 64 * 64 / 8];
        for x in t.iter_mut().flat_map(|c| c.0.iter_mut()) {
            *x = bf16_bits(rng.uniform());
        }
        t
    };
    Inputs { a: v(), b: v() }
}

fn map(dev: &Device, data: &[u16]) -> LkTensorMap {
    narrow_map(dev, data, 64)
}

/// The map of a [64][cols] bf16 tile in one box, rows in one swizzle span (128, 64 or 32 bytes).
fn narrow_map(dev: &Device, data: &[u16], cols: usize) -> LkTensorMap {
    let swizzle = match cols {
        16 => Swizzle::B32,
        32 => Swizzle::B64,
        _ => Swizzle::B128,
    };
    TensorMapSpec::row_major(2, 64, cols, cols as u32, 64, swizzle)
        .encode("test", dev, data.as_ptr() as u64)
        .unwrap()
}

fn run(
    inp: &Inputs,
    cfg: &EmuConfig,
    a_regs: bool,
    b_mn: bool,
    bug: i32,
) -> Result<Vec<f32>, String> {
    run_cols(inp, cfg, a_regs, b_mn, bug, 64)
}

/// As [`run_cols`], with A read MN-major (`inp.a` taken as [K][M]).
fn run_a_mn(inp: &Inputs, cfg: &EmuConfig, b_mn: bool, b_cols: usize) -> Result<Vec<f32>, String> {
    let tile = Tile {
        a_regs: false,
        a_mn: true,
        b_mn,
        bug: 0,
        b_cols,
    };
    launch_tile(inp, cfg, &tile)
}

/// The tile with B `b_cols` wide: 64 (128-byte rows), or 16 / 32 (B [64][b_cols] MN-major in the 32- or
/// 64-byte swizzle: the first 64·b_cols values of `inp.b`); Y is [64][b_cols].
fn run_cols(
    inp: &Inputs,
    cfg: &EmuConfig,
    a_regs: bool,
    b_mn: bool,
    bug: i32,
    b_cols: usize,
) -> Result<Vec<f32>, String> {
    let tile = Tile {
        a_regs,
        a_mn: false,
        b_mn,
        bug,
        b_cols,
    };
    launch_tile(inp, cfg, &tile)
}

/// What planted_wgmma_tile computes: A from registers or read MN-major, B MN-major, a planted bug, B's width.
struct Tile {
    a_regs: bool,
    a_mn: bool,
    b_mn: bool,
    bug: i32,
    b_cols: usize,
}

fn launch_tile(inp: &Inputs, cfg: &EmuConfig, t: &Tile) -> Result<Vec<f32>, String> {
    let b_cols = t.b_cols;
    let dev = Device::emulator();
    let (a, b) = (u16s(&inp.a), &u16s(&inp.b)[..64 * b_cols]);
    let mut y = vec![f32::NAN; 64 * b_cols];
    let p = WgmmaParams {
        a_map: map(&dev, a),
        b_map: narrow_map(&dev, b, b_cols),
        a: a.as_ptr(),
        y: y.as_mut_ptr(),
        a_regs: t.a_regs as i32,
        b_mn_major: t.b_mn as i32,
        bug: t.bug,
        b_cols: if b_cols == 64 { 0 } else { b_cols as i32 },
        a_mn_major: t.a_mn as i32,
    };
    let regions = [
        EmuRegion::input("a", a),
        EmuRegion::input("b", b),
        EmuRegion::output("y", &mut y),
    ];
    let plan = LaunchPlan {
        grid: [1, 1, 1],
        block: [128, 1, 1],
        smem_bytes: 2 * 8192 + 2048,
    };
    // SAFETY: the params point into a, b and y, which `regions` describe and which outlive the call.
    unsafe { emu_launch_raw(cfg, lk_emu_body_planted_wgmma_tile, &plan, &p, &regions) }
        .map_err(|e| e.to_string())?;
    Ok(y)
}

/// Y = A·B in f64, A as [M][K] or, with `a_mn`, [K][M]; B as [N][K] (`cols` 64, not `b_mn`) or [K][cols]
/// (the first 64·cols values of `inp.b`).
fn reference_general(inp: &Inputs, a_mn: bool, b_mn: bool, cols: usize) -> Vec<f64> {
    let (a, b) = (u16s(&inp.a), u16s(&inp.b));
    let mut y = vec![0.0; 64 * cols];
    for m in 0..64 {
        for n in 0..cols {
            y[m * cols + n] = (0..64)
                .map(|k| {
                    let av = if a_mn { a[k * 64 + m] } else { a[m * 64 + k] };
                    let bv = if b_mn { b[k * cols + n] } else { b[n * 64 + k] };
                    bf16_value(av) * bf16_value(bv)
                })
                .sum();
        }
    }
    y
}

/// Y = A·B with B as [64][cols] (the first 64·cols values of `inp.b`), in f64.
fn reference_cols(inp: &Inputs, cols: usize) -> Vec<f64> {
    let (a, b) = (u16s(&inp.a), u16s(&inp.b));
    let mut y = vec![0.0; 64 * cols];
    for m in 0..64 {
        for n in 0..cols {
            y[m * cols + n] = (0..64)
                .map(|k| bf16_value(a[m * 64 + k]) * bf16_value(b[k * cols + n]))
                .sum();
        }
    }
    y
}

/// Y = A·Bᵀ (B as [N][K]) or A·B (B as [K][N]), in f64.
fn reference(inp: &Inputs, b_mn: bool) -> Vec<f64> {
    let (a, b) = (u16s(&inp.a), u16s(&inp.b));
    let mut y = vec![0.0; 64 * 64];
    for m in 0..64 {
        for n in 0..64 {
            y[m * 64 + n] = (0..64)
                .map(|k| {
                    bf16_value(a[m * 64 + k])
                        * bf16_value(if b_mn { b[k * 64 + n] } else { b[n * 64 + k] })
                })
                .sum();
        }
    }
    y
}

fn rel_err(y: &[f32], want: &[f64]) -> f64 {
    if y.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = y
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

#[test]
fn wgmma_tile_matches_the_product_under_every_order() {
    for (i, cfg) in common::all_orders().into_iter().enumerate() {
        let inp = inputs(common::seed() ^ i as u64);
        for (a_regs, b_mn) in [(false, false), (true, false), (false, true), (true, true)] {
            let y = run(&inp, &cfg, a_regs, b_mn, 0).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
            let e = rel_err(&y, &reference(&inp, b_mn));
            assert!(
                e <= 1e-5,
                "{cfg:?} A from registers {a_regs}, B MN-major {b_mn}: relative error {e:e}"
            );
        }
    }
}

/// B MN-major and narrow, as dX's one-launch kernel reads the LoRA B's slice (fused_gemm_t_sm90.cu): 16
/// columns in the 32-byte swizzle (m64n16k16) and 32 in the 64-byte one (m64n32k16), LBO 0, SBO 8 rows,
/// match the product under every order; describing either with the other swizzle gives wrong values.
#[test]
fn wgmma_narrow_mn_major_b_matches_the_product() {
    for (i, cfg) in common::all_orders().into_iter().enumerate() {
        let inp = inputs(common::seed() ^ 0x40 ^ i as u64);
        for cols in [16, 32] {
            let want = reference_cols(&inp, cols);
            let y = run_cols(&inp, &cfg, false, true, 0, cols)
                .unwrap_or_else(|e| panic!("{cfg:?} {cols}: {e}"));
            let e = rel_err(&y, &want);
            assert!(e <= 1e-5, "{cfg:?} B [64][{cols}]: relative error {e:e}");
            let y = run_cols(&inp, &cfg, false, true, 1, cols).expect("a wrong swizzle still runs");
            assert!(
                rel_err(&y, &want) > 0.1,
                "{cfg:?} B [64][{cols}]: the other swizzle must give wrong values"
            );
        }
    }
}

/// A read MN-major from shared memory (given as [K][M], k16 step +16 rows, SBO 1024, LBO unused), with B
/// K-major, MN-major, and MN-major 16 wide in the 32-byte swizzle (the product of dX's dB and dA partials,
/// fused_gemm_t_sm90.cu issue_box_t_tile), matches the product under every order, and differs from it
/// read K-major.
#[test]
fn wgmma_mn_major_a_matches_the_product() {
    for (i, cfg) in common::all_orders().into_iter().enumerate() {
        let inp = inputs(common::seed() ^ 0x50 ^ i as u64);
        for (b_mn, cols) in [(false, 64), (true, 64), (true, 16)] {
            let want = reference_general(&inp, true, b_mn, cols);
            let y =
                run_a_mn(&inp, &cfg, b_mn, cols).unwrap_or_else(|e| panic!("{cfg:?} {cols}: {e}"));
            let e = rel_err(&y, &want);
            assert!(
                e <= 1e-5,
                "{cfg:?} A MN-major, B MN-major {b_mn}, {cols} columns: relative error {e:e}"
            );
            let y = run_cols(&inp, &cfg, false, b_mn, 0, cols).unwrap();
            assert!(
                rel_err(&y, &want) > 0.1,
                "{cfg:?}: A read K-major must differ from the MN-major product"
            );
        }
    }
}

#[test]
fn wgmma_planted_bugs_are_caught() {
    for cfg in common::all_orders() {
        let inp = inputs(common::seed() ^ 0x9);
        let want = reference(&inp, false);
        let y = run(&inp, &cfg, false, false, 1).expect("a wrong swizzle does not fail the launch");
        assert!(
            rel_err(&y, &want) > 0.1,
            "{cfg:?}: the 64-byte swizzle must give wrong values"
        );
        let y = run(&inp, &cfg, false, false, 2).expect("an early read does not fail the launch");
        assert!(
            y.iter().any(|v| v.is_nan()),
            "{cfg:?}: accumulators read before the wait must be NaN"
        );
        let e = run(&inp, &cfg, false, false, 3).expect_err("no fence must fail");
        assert!(e.contains("without a wgmma.fence"), "{e}");
        let e = run(&inp, &cfg, false, false, 4).expect_err("writing an operand in use must fail");
        assert!(e.contains("which an async operation still reads"), "{e}");
        let e = run(&inp, &cfg, false, false, 5).expect_err("exiting before the wait must fail");
        assert!(e.contains("exits with wgmma.mma_async results"), "{e}");
        let e = run(&inp, &cfg, false, false, 6)
            .expect_err("an operand stored without a proxy fence must fail");
        assert!(e.contains("no fence.proxy.async"), "{e}");
        let y = run(&inp, &cfg, false, false, 7).expect("an operand stored and fenced is fine");
        assert!(
            rel_err(&y, &want) < 1e-5,
            "{cfg:?}: the fenced rewrite keeps the product"
        );
    }
}
