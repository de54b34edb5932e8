//! The emulator against the hardware, bit for bit: the probe kernels of tests/kernels/emu_layout.cu
//! (ldmatrix x1/x2/x4 [.trans], mma.m16n8k16 bf16/f16) run on the GPU (nvcc-built fatbin) and in the
//! emulator on the same inputs. Data movement (ldmatrix) and mma on small integers (every sum exact)
//! must agree bit for bit: the hardware guarantees those. mma on random data need not: tensor cores
//! align the products to the largest exponent and truncate (published models of A100/H100: blocks of
//! 8 or 16 products, 1-2 extra alignment bits, round toward zero; Fasi et al. 2021, PeerJ CS 7:e330),
//! where the emulator sums exactly and rounds once. So random data (magnitudes up to 1e2, with
//! cancellation) must agree per element to |Δ| ≤ 2⁻²¹·(Σ|aₖbₖ| + |c|), and the bit-identical share is
//! reported. The GPU tests skip with the reason printed when there is no GPU (`LK_REQUIRE_GPU=1` makes
//! that a failure); the tolerance itself is exercised without a GPU against the emulator's
//! tensor-core model (`MmaModel::TensorCore`). On an sm_90 GPU: TMA loads and stores (every swizzle,
//! ragged coordinates) byte for byte, and wgmma (A in shared memory or registers, B K- or MN-major) bit
//! for bit on small integers, against the emulator; and that programmatic dependent launch, which the
//! crate uses there, overlaps two kernels on the device's stream and on a stream of its own, while the
//! kernels' entry wait still orders them.

mod common;

use common::Rng;
use common::probes::{LdmatrixProbeParams, MmaProbeParams, PdlProbeParams, TmaParams, WgmmaParams};
use half::{bf16, f16};
use lora_kernels::cudarc::driver::{
    CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use lora_kernels::cudarc::nvrtc::Ptx;
use lora_kernels::device::{EmuRegion, cuda_launch_programmatic, emu_launch_raw};
use lora_kernels::kernel::EmuBody;
use lora_kernels::params::LkTensorMap;
use lora_kernels::tma::{Swizzle, TensorMapSpec};
use lora_kernels::{Device, EmuConfig, LaunchPlan, MmaModel};

#[allow(dead_code)]
mod emu_bodies {
    include!(concat!(env!("OUT_DIR"), "/test_kernel_decls.rs"));
}
use emu_bodies::{
    lk_emu_body_ldmatrix_probe, lk_emu_body_mma_probe_bf16, lk_emu_body_mma_probe_f16,
    lk_emu_body_planted_tma_roundtrip, lk_emu_body_planted_wgmma_tile,
};
#[allow(dead_code)]
mod test_modules {
    include!(concat!(env!("OUT_DIR"), "/cuda_test_modules.rs"));
}

fn emu<P: Copy>(cfg: &EmuConfig, body: EmuBody, smem: u32, p: &P, regions: &[EmuRegion]) {
    let plan = LaunchPlan {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        smem_bytes: smem,
    };
    // SAFETY: the params point into the live host buffers `regions` describes, sized for the probe.
    unsafe { emu_launch_raw(cfg, body, &plan, p, regions) }.unwrap();
}

/// The emulator's mma probe on register images, under `model`.
fn emu_mma(body: EmuBody, model: MmaModel, a: &[u32], b: &[u32], c: &[f32]) -> Vec<f32> {
    let mut d = vec![f32::NAN; 128];
    let p = MmaProbeParams {
        a: a.as_ptr(),
        b: b.as_ptr(),
        c: c.as_ptr(),
        d: d.as_mut_ptr(),
    };
    let cfg = EmuConfig {
        mma: model,
        ..EmuConfig::default()
    };
    let regions = [
        EmuRegion::input("a", a),
        EmuRegion::input("b", b),
        EmuRegion::input("c", c),
        EmuRegion::output("d", &mut d),
    ];
    emu(&cfg, body, 0, &p, &regions);
    d
}

/// A probe kernel of emu_layout.cu, loaded from its nvcc-built fatbin.
fn probe(dev: &Device, kernel: &str) -> CudaFunction {
    test_function(dev, "emu_layout", kernel)
}

/// One block of one warp with `smem` bytes of dynamic shared memory: what every probe takes.
fn one_warp(smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The ldmatrix probe on the GPU.
fn gpu_ldmatrix(dev: &Device, src: &[u16], variant: i32) -> Vec<u32> {
    let stream = dev.as_cuda().unwrap().stream();
    let f = probe(dev, "ldmatrix_probe");
    let src_d = stream.clone_htod(src).unwrap();
    let mut out_d = stream.alloc_zeros::<u32>(128).unwrap();
    {
        let (s, _gs) = src_d.device_ptr(stream);
        let (o, _go) = out_d.device_ptr_mut(stream);
        let p = LdmatrixProbeParams {
            src: s as *const u16,
            out: o as *mut u32,
            variant,
        };
        // SAFETY: one warp reads 256 u16 and writes 128 u32, both allocated above.
        unsafe { stream.launch_builder(&f).arg(&p).launch(one_warp(512)) }.unwrap();
    }
    stream.clone_dtoh(&out_d).unwrap()
}

fn gpu_mma(dev: &Device, kernel: &str, a: &[u32], b: &[u32], c: &[f32]) -> Vec<f32> {
    let stream = dev.as_cuda().unwrap().stream();
    let f = probe(dev, kernel);
    let (a_d, b_d, c_d) = (
        stream.clone_htod(a).unwrap(),
        stream.clone_htod(b).unwrap(),
        stream.clone_htod(c).unwrap(),
    );
    let mut d_d = stream.alloc_zeros::<f32>(128).unwrap();
    {
        let (ap, _ga) = a_d.device_ptr(stream);
        let (bp, _gb) = b_d.device_ptr(stream);
        let (cp, _gc) = c_d.device_ptr(stream);
        let (dp, _gd) = d_d.device_ptr_mut(stream);
        let p = MmaProbeParams {
            a: ap as *const u32,
            b: bp as *const u32,
            c: cp as *const f32,
            d: dp as *mut f32,
        };
        // SAFETY: one warp reads 128 + 64 + 128 elements and writes 128, all allocated above.
        unsafe { stream.launch_builder(&f).arg(&p).launch(one_warp(0)) }.unwrap();
    }
    stream.clone_dtoh(&d_d).unwrap()
}

#[test]
fn ldmatrix_emulator_equals_hardware() {
    let Some(dev) = common::gpu() else { return };
    let mut rng = Rng::new(31);
    for src in [
        (0..256).collect::<Vec<u16>>(),
        (0..256).map(|_| rng.next_u64() as u16).collect(),
    ] {
        for variant in 0..6 {
            let mut out = vec![0u32; 128];
            let p = LdmatrixProbeParams {
                src: src.as_ptr(),
                out: out.as_mut_ptr(),
                variant,
            };
            let regions = [
                EmuRegion::input("src", &src),
                EmuRegion::output("out", &mut out),
            ];
            emu(
                &EmuConfig::default(),
                lk_emu_body_ldmatrix_probe,
                512,
                &p,
                &regions,
            );
            assert_eq!(
                out,
                gpu_ldmatrix(&dev, &src, variant),
                "ldmatrix variant {variant}"
            );
        }
    }
}

/// (A, B, C) register images: `value()` draws each element (as f32), `bits` converts to b16.
fn fragments(
    mut value: impl FnMut() -> f32,
    bits: fn(f32) -> u16,
) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let a: Vec<u32> = (0..128)
        .map(|_| bits(value()) as u32 | ((bits(value()) as u32) << 16))
        .collect();
    let b: Vec<u32> = (0..64)
        .map(|_| bits(value()) as u32 | ((bits(value()) as u32) << 16))
        .collect();
    let c: Vec<f32> = (0..128).map(|_| value()).collect();
    (a, b, c)
}

/// Lane `l`'s element (row, col) of the A (16×16), B (16×8) and C/D (16×8) fragments, per the PTX
/// ISA ("Matrix Fragments for mma.m16n8k16"): A reg r half h, B reg r half h, C index i.
fn a_pos(l: usize, reg: usize, half: usize) -> (usize, usize) {
    (
        l / 4 + 8 * (reg & 1),
        (l % 4) * 2 + half + 8 * (reg >= 2) as usize,
    )
}
fn b_pos(l: usize, reg: usize, half: usize) -> (usize, usize) {
    ((l % 4) * 2 + half + 8 * reg, l / 4)
}
fn c_pos(l: usize, i: usize) -> (usize, usize) {
    (l / 4 + 8 * (i >= 2) as usize, (l % 4) * 2 + (i & 1))
}

/// Random register images with magnitudes up to `amp`, where every other output element gets a C that
/// cancels its A·B sum to within a few units in its last place (the hard case for alignment and
/// truncation); `bits`/`value` convert to and from the 16-bit type.
fn cancelling_fragments(
    rng: &mut Rng,
    amp: f64,
    bits: fn(f32) -> u16,
    value: fn(u16) -> f32,
) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let mut draw = || bits(((rng.uniform() * 2.0 - 1.0) * amp) as f32);
    let a: Vec<u32> = (0..128)
        .map(|_| draw() as u32 | ((draw() as u32) << 16))
        .collect();
    let b: Vec<u32> = (0..64)
        .map(|_| draw() as u32 | ((draw() as u32) << 16))
        .collect();
    let (am, bm, _) = matrices(&a, &b, &[0.0; 128], value);
    let mut c = vec![0f32; 128];
    for l in 0..32 {
        for i in 0..4 {
            let (row, col) = c_pos(l, i);
            let sum: f64 = (0..16).map(|k| am[row][k] * bm[k][col]).sum();
            c[l * 4 + i] = if (row + col) % 2 == 0 {
                -(sum as f32) * (1.0 + 3.0 * f32::EPSILON)
            } else {
                ((rng.uniform() * 2.0 - 1.0) * amp) as f32
            };
        }
    }
    (a, b, c)
}

/// A (16×16), B (16×8), C (16×8) as f64 matrices, decoded from register images.
#[allow(clippy::type_complexity)]
fn matrices(
    a: &[u32],
    b: &[u32],
    c: &[f32],
    value: fn(u16) -> f32,
) -> ([[f64; 16]; 16], [[f64; 8]; 16], [[f64; 8]; 16]) {
    let (mut am, mut bm, mut cm) = ([[0f64; 16]; 16], [[0f64; 8]; 16], [[0f64; 8]; 16]);
    for l in 0..32 {
        for reg in 0..4 {
            for half in 0..2 {
                let (r, k) = a_pos(l, reg, half);
                am[r][k] = value((a[l * 4 + reg] >> (16 * half)) as u16) as f64;
            }
        }
        for reg in 0..2 {
            for half in 0..2 {
                let (k, col) = b_pos(l, reg, half);
                bm[k][col] = value((b[l * 2 + reg] >> (16 * half)) as u16) as f64;
            }
        }
        for i in 0..4 {
            let (r, col) = c_pos(l, i);
            cm[r][col] = c[l * 4 + i] as f64;
        }
    }
    (am, bm, cm)
}

/// The tolerance of the GPU comparison, per output element (in D's register order):
/// 2⁻²¹·(Σₖ|aₖbₖ| + |c|).
fn mma_tolerance(a: &[u32], b: &[u32], c: &[f32], value: fn(u16) -> f32) -> Vec<f64> {
    let (am, bm, cm) = matrices(a, b, c, value);
    (0..128)
        .map(|j| {
            let (row, col) = c_pos(j / 4, j % 4);
            let mag: f64 = (0..16).map(|k| (am[row][k] * bm[k][col]).abs()).sum();
            (mag + cm[row][col].abs()) * 2f64.powi(-21)
        })
        .collect()
}

/// Elements of `x` and `y` further apart than `tol`: (index, |Δ|, tolerance), NaN counting as apart.
fn beyond(x: &[f32], y: &[f32], tol: &[f64]) -> Vec<(usize, f64, f64)> {
    x.iter()
        .zip(y)
        .zip(tol)
        .enumerate()
        .filter_map(|(j, ((x, y), t))| {
            let d = (*x as f64 - *y as f64).abs();
            (d.is_nan() || d > *t).then_some((j, d, *t))
        })
        .collect()
}

/// Without a GPU: the emulator's tensor-core model against its exact model on magnitudes up to 1e2
/// with cancellation. They differ (so the comparison is not vacuous: a tolerance 64× tighter fails), and
/// stay within the GPU tolerance, which is what the hardware test relies on.
#[test]
fn mma_tolerance_holds_for_the_tensor_core_model() {
    let kinds: [(EmuBody, Conv); 2] = [
        (
            lk_emu_body_mma_probe_bf16,
            (
                |v| bf16::from_f32(v).to_bits(),
                |b| bf16::from_bits(b).to_f32(),
            ),
        ),
        (
            lk_emu_body_mma_probe_f16,
            (
                |v| f16::from_f32(v).to_bits(),
                |b| f16::from_bits(b).to_f32(),
            ),
        ),
    ];
    let mut rng = Rng::new(common::seed() ^ 0x7c);
    for (body, (bits, value)) in kinds {
        let (mut differing, mut tight_fails) = (0, 0);
        for _ in 0..20 {
            let (a, b, c) = cancelling_fragments(&mut rng, 100.0, bits, value);
            let exact = emu_mma(body, MmaModel::Exact, &a, &b, &c);
            let model = emu_mma(body, MmaModel::TensorCore, &a, &b, &c);
            let tol = mma_tolerance(&a, &b, &c, value);
            assert_eq!(
                beyond(&exact, &model, &tol),
                vec![],
                "model outside the tolerance"
            );
            differing += exact
                .iter()
                .zip(&model)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            let tight: Vec<f64> = tol.iter().map(|t| t / 64.0).collect();
            tight_fails += beyond(&exact, &model, &tight).len();
        }
        eprintln!(
            "tensor-core model vs exact: {differing}/2560 elements differ, {tight_fails} beyond tolerance/64"
        );
        assert!(
            differing > 0 && tight_fails > 0,
            "the model must differ from the exact sum"
        );
    }
}

/// f32 → 16-bit bits, and back.
type Conv = (fn(f32) -> u16, fn(u16) -> f32);

fn check_mma(dev: &Device, kernel: &str, body: EmuBody, (bits, value): Conv, stream: u64) {
    let mut rng = Rng::new(stream);
    for exact in [true, false] {
        let (a, b, c) = if exact {
            let (a, b, c) = fragments(|| ((rng.next_u64() % 9) as i32 - 4) as f32, bits);
            (a, b, c)
        } else {
            cancelling_fragments(&mut rng, 100.0, bits, value)
        };
        let d = emu_mma(body, MmaModel::Exact, &a, &b, &c);
        let hw = gpu_mma(dev, kernel, &a, &b, &c);
        if exact {
            assert_eq!(
                d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                hw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{kernel}: small-integer mma differs between emulator and hardware"
            );
        } else {
            let same = d
                .iter()
                .zip(&hw)
                .filter(|(x, y)| x.to_bits() == y.to_bits())
                .count();
            let tol = mma_tolerance(&a, &b, &c, value);
            let worst = d
                .iter()
                .zip(&hw)
                .zip(&tol)
                .map(|((x, y), t)| (*x as f64 - *y as f64).abs() / (t * 2f64.powi(21)))
                .fold(0f64, f64::max);
            eprintln!(
                "{kernel} random inputs (|x| <= 1e2, cancelling): {same}/128 bit-identical, max |Δ| = \
                 {worst:.3e}·(Σ|ab|+|c|) (tolerance 2^-21 = {:.3e})",
                2f64.powi(-21)
            );
            assert_eq!(
                beyond(&d, &hw, &tol),
                vec![],
                "{kernel}: emulator vs hardware beyond 2^-21·(Σ|ab|+|c|)"
            );
        }
    }
}

#[test]
fn mma_emulator_equals_hardware() {
    let Some(dev) = common::gpu() else { return };
    check_mma(
        &dev,
        "mma_probe_bf16",
        lk_emu_body_mma_probe_bf16,
        (
            |v| bf16::from_f32(v).to_bits(),
            |b| bf16::from_bits(b).to_f32(),
        ),
        41,
    );
    check_mma(
        &dev,
        "mma_probe_f16",
        lk_emu_body_mma_probe_f16,
        (
            |v| f16::from_f32(v).to_bits(),
            |b| f16::from_bits(b).to_f32(),
        ),
        42,
    );
}

// ---- sm_90: TMA (tests/kernels/planted_tma.cu) and wgmma (tests/kernels/sm90/planted_wgmma.cu) ----

/// The GPU when it is sm_90 and this build embeds the sm_90a test module; otherwise None, with the reason.
fn hopper_gpu() -> Option<Device> {
    let dev = common::gpu()?;
    if dev.compute_capability() != 90 {
        eprintln!(
            "TMA/wgmma probes skipped: the GPU is sm_{}, they need sm_90",
            dev.compute_capability()
        );
        return None;
    }
    if !test_modules::MODULES
        .iter()
        .any(|(m, _)| *m == "planted_wgmma")
    {
        eprintln!("TMA/wgmma probes skipped: built without 90 in LK_CUDA_ARCHS");
        return None;
    }
    Some(dev)
}

fn test_function(dev: &Device, module: &str, kernel: &str) -> CudaFunction {
    let image = test_modules::MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap()
        .1;
    let module = dev
        .as_cuda()
        .unwrap()
        .context()
        .load_module(Ptx::from_binary(image.to_vec()))
        .unwrap();
    module.load_function(kernel).unwrap()
}

fn map_2d(
    dev: &Device,
    addr: u64,
    rows: u64,
    cols: u64,
    box_cols: u32,
    box_rows: u32,
    sw: Swizzle,
) -> LkTensorMap {
    TensorMapSpec::row_major(2, rows as usize, cols as usize, box_cols, box_rows, sw)
        .encode("probe", dev, addr)
        .unwrap()
}

/// TMA loads (every swizzle, ragged coordinates) and clipped stores: the GPU's bytes equal the emulator's.
#[test]
fn tma_emulator_equals_hardware() {
    let Some(dev) = hopper_gpu() else { return };
    let stream = dev.as_cuda().unwrap().stream().clone();
    let f = test_function(&dev, "planted_tma", "planted_tma_roundtrip");
    let (rows, cols) = (50u64, 104u64);
    let x: Vec<u16> = (0..rows * cols)
        .map(|i| (i as u16).wrapping_mul(7) | 1)
        .collect();
    for (sw, bc, br) in [
        (Swizzle::None, 40, 7),
        (Swizzle::B32, 16, 9),
        (Swizzle::B64, 32, 17),
        (Swizzle::B128, 64, 24),
    ] {
        let (c, d) = (
            (cols as i32 - bc as i32 / 2, -3),
            (cols as i32 - bc as i32 + 5, rows as i32 - br as i32 + 2),
        );
        // the same probe on either device: the maps over x and z, the box into y
        let params = |on: &Device, x: u64, z: u64, y: *mut u16| TmaParams {
            in_map: map_2d(on, x, rows, cols, bc, br, sw),
            out_map: map_2d(on, z, rows, cols, bc, br, sw),
            y,
            c0: c.0,
            c1: c.1,
            d0: d.0,
            d1: d.1,
            box_cols: bc,
            box_rows: br,
            swizzle: sw.code(),
            bug: 0,
        };
        let run_emu = || {
            let emu = Device::emulator();
            let mut z = vec![0xFFFFu16; (rows * cols) as usize];
            let mut y = vec![0xFFFFu16; (bc * br) as usize];
            let p = params(&emu, x.as_ptr() as u64, z.as_ptr() as u64, y.as_mut_ptr());
            let regions = [
                EmuRegion::input("x", &x),
                EmuRegion::output("z", &mut z),
                EmuRegion::output("y", &mut y),
            ];
            let plan = LaunchPlan {
                grid: [1, 1, 1],
                block: [128, 1, 1],
                smem_bytes: 8192,
            };
            // SAFETY: the params point into x, y and z, which `regions` describe and which outlive the call.
            unsafe {
                emu_launch_raw(
                    &EmuConfig::default(),
                    lk_emu_body_planted_tma_roundtrip,
                    &plan,
                    &p,
                    &regions,
                )
            }
            .unwrap();
            (y, z)
        };
        let (ye, ze) = run_emu();
        let x_d = stream.clone_htod(&x).unwrap();
        let mut z_d = stream
            .clone_htod(&vec![0xFFFFu16; (rows * cols) as usize])
            .unwrap();
        let mut y_d = stream
            .clone_htod(&vec![0xFFFFu16; (bc * br) as usize])
            .unwrap();
        {
            let (xp, _gx) = x_d.device_ptr(&stream);
            let (zp, _gz) = z_d.device_ptr_mut(&stream);
            let (yp, _gy) = y_d.device_ptr_mut(&stream);
            let p = params(&dev, xp, zp, yp as *mut u16);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 8192,
            };
            // SAFETY: the maps describe x and z as allocated above; y holds the box.
            unsafe { stream.launch_builder(&f).arg(&p).launch(cfg) }.unwrap();
        }
        assert_eq!(
            stream.clone_dtoh(&y_d).unwrap(),
            ye,
            "{sw:?}: the box read back differs from the emulator's"
        );
        assert_eq!(
            stream.clone_dtoh(&z_d).unwrap(),
            ze,
            "{sw:?}: the stored tensor differs from the emulator's"
        );
    }
}

/// wgmma m64n64k16 (A from shared memory or registers, B K- or MN-major, TMA-loaded, 128-byte swizzle), and
/// m64n16k16 / m64n32k16 with B [64][16] / [64][32] MN-major in the 32- / 64-byte swizzle (dX's one-launch
/// kernel reads the LoRA B's slice so), and A read MN-major from shared memory (as that kernel reads dY's
/// and X's boxes for dB's and dA's partials, with the 16-wide B), on small integers, where every sum is exact: the GPU's accumulators
/// equal the emulator's bit for bit.
#[test]
fn wgmma_emulator_equals_hardware() {
    let Some(dev) = hopper_gpu() else { return };
    let stream = dev.as_cuda().unwrap().stream().clone();
    let f = test_function(&dev, "planted_wgmma", "planted_wgmma_tile");
    let mut rng = Rng::new(90);
    let mut ints = || -> Vec<u16> {
        (0..64 * 64)
            .map(|_| bf16::from_f32((rng.next_u64() % 7) as f32 - 3.0).to_bits())
            .collect()
    };
    let (a, b) = (ints(), ints());
    // (A from registers, A MN-major, B MN-major, B's columns)
    let cases = [
        (false, false, false, 64),
        (true, false, false, 64),
        (false, false, true, 64),
        (true, false, true, 64),
        (false, false, true, 16),
        (false, false, true, 32),
        (false, true, false, 64),
        (false, true, true, 64),
        (false, true, true, 16),
    ];
    for (a_regs, a_mn, b_mn, cols) in cases {
        let b_sw = match cols {
            16 => Swizzle::B32,
            32 => Swizzle::B64,
            _ => Swizzle::B128,
        };
        let b_cols = if cols == 64 { 0 } else { cols as i32 };
        let b = &b[..64 * cols];
        let emu = Device::emulator();
        let mut ye = vec![f32::NAN; 64 * cols];
        let p = WgmmaParams {
            a_map: map_2d(&emu, a.as_ptr() as u64, 64, 64, 64, 64, Swizzle::B128),
            b_map: map_2d(
                &emu,
                b.as_ptr() as u64,
                64,
                cols as u64,
                cols as u32,
                64,
                b_sw,
            ),
            a: a.as_ptr(),
            y: ye.as_mut_ptr(),
            a_regs: a_regs as i32,
            b_mn_major: b_mn as i32,
            bug: 0,
            b_cols,
            a_mn_major: a_mn as i32,
        };
        let regions = [
            EmuRegion::input("a", &a),
            EmuRegion::input("b", b),
            EmuRegion::output("y", &mut ye),
        ];
        let plan = LaunchPlan {
            grid: [1, 1, 1],
            block: [128, 1, 1],
            smem_bytes: 2 * 8192 + 2048,
        };
        // SAFETY: the params point into a, b and y, which `regions` describe and which outlive the call.
        unsafe {
            emu_launch_raw(
                &EmuConfig::default(),
                lk_emu_body_planted_wgmma_tile,
                &plan,
                &p,
                &regions,
            )
        }
        .unwrap();
        let (a_d, b_d) = (
            stream.clone_htod(&a).unwrap(),
            stream.clone_htod(b).unwrap(),
        );
        let mut y_d = stream.alloc_zeros::<f32>(64 * cols).unwrap();
        {
            let (ap, _ga) = a_d.device_ptr(&stream);
            let (bp, _gb) = b_d.device_ptr(&stream);
            let (yp, _gy) = y_d.device_ptr_mut(&stream);
            let p = WgmmaParams {
                a_map: map_2d(&dev, ap, 64, 64, 64, 64, Swizzle::B128),
                b_map: map_2d(&dev, bp, 64, cols as u64, cols as u32, 64, b_sw),
                a: ap as *const u16,
                y: yp as *mut f32,
                a_regs: a_regs as i32,
                b_mn_major: b_mn as i32,
                bug: 0,
                b_cols,
                a_mn_major: a_mn as i32,
            };
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 2 * 8192 + 2048,
            };
            // SAFETY: the maps describe a and b as allocated above; y holds 64×cols f32.
            unsafe { stream.launch_builder(&f).arg(&p).launch(cfg) }.unwrap();
        }
        let yg = stream.clone_dtoh(&y_d).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&yg),
            bits(&ye),
            "A in registers {a_regs}, A MN-major {a_mn}, B MN-major {b_mn}, {cols} columns: GPU and emulator differ"
        );
    }
}

/// Programmatic dependent launch (the crate's own launch, `device::cuda_launch_programmatic`) on the
/// device's stream (cudarc's default, the legacy stream) and on a stream of its own: a primary that
/// spins 200 µs before writing a token, then a dependent launched with the attribute. Without the entry
/// wait (a planted bug) the dependent must sometimes read the previous token: it ran while the primary spun, which is the overlap the crate's launches rely on (none would
/// mean the attribute gains nothing on that stream). With the wait it must always read this token. The
/// same with an event recorded between the two launches, which cudarc does around every launch once a
/// context has several streams (a framework's): the overlap there is written to the log, not required.
#[test]
fn programmatic_launch_overlaps_and_the_entry_wait_orders() {
    let Some(dev) = hopper_gpu() else { return };
    let ctx = dev.as_cuda().unwrap().context().clone();
    let primary = test_function(&dev, "pdl_probe", "pdl_probe_primary");
    let dependent = test_function(&dev, "pdl_probe", "pdl_probe_dependent");
    const TRIALS: u32 = 16;
    let own = ctx.new_stream().unwrap();
    // (name, stream, an event recorded between the two launches, as cudarc does around every launch in
    // a context with several streams: reported, not required)
    for (name, stream, event_between) in [
        (
            "the device's stream",
            dev.as_cuda().unwrap().stream().clone(),
            false,
        ),
        ("a stream of its own", own.clone(), false),
        ("a stream of its own, an event recorded between", own, true),
    ] {
        let mut flag = stream.clone_htod(&[0u32]).unwrap();
        let mut out = stream.clone_htod(&vec![0u32; 2 * TRIALS as usize]).unwrap();
        {
            let (fp, _gf) = flag.device_ptr_mut(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            for t in 0..2 * TRIALS {
                let mut p = PdlProbeParams {
                    flag: fp,
                    out: op + 4 * t as u64,
                    spin_ns: 200_000,
                    token: t + 1,
                    wait: u32::from(t >= TRIALS),
                };
                let cfg = LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: PdlProbeParams by value; flag and out are live and guarded until the sync below.
                unsafe { stream.launch_builder(&primary).arg(&p).launch(cfg) }.unwrap();
                if event_between {
                    stream.record_event(None).unwrap();
                }
                let plan = LaunchPlan {
                    grid: [1, 1, 1],
                    block: [32, 1, 1],
                    smem_bytes: 0,
                };
                // SAFETY: as above; the dependent without the wait is the planted bug this test watches
                // for (it reads a flag, nothing it could corrupt).
                unsafe { cuda_launch_programmatic(&dependent, &stream, &plan, &mut p) }.unwrap();
            }
        }
        stream.synchronize().unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        let (early, waited) = got.split_at(TRIALS as usize);
        for (t, v) in waited.iter().enumerate() {
            assert_eq!(
                *v,
                TRIALS + t as u32 + 1,
                "{name}: a dependent that waits read {v}, not its primary's token"
            );
        }
        let overlapped = early
            .iter()
            .enumerate()
            .filter(|(t, v)| **v != *t as u32 + 1)
            .count();
        // straight to the log (libtest captures eprintln! of a passing test): gpu-check keeps it
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "programmatic dependent launch, {name}: the dependent ran during its primary in \
             {overlapped} of {TRIALS} trials"
        );
        assert!(
            event_between || overlapped > 0,
            "{name}: programmatic dependent launch never overlapped the two kernels (the attribute \
             gains nothing on this stream)"
        );
    }
}
