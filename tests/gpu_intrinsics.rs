//! The emulator against the hardware, bit for bit: the probe kernels of tests/kernels/emu_layout.cu
//! (ldmatrix x1/x2/x4 [.trans], mma.m16n8k16 bf16/f16) run on the GPU (nvcc-built fatbin) and in the
//! emulator on the same inputs. Data movement (ldmatrix) and mma on small integers (every sum exact)
//! must agree bit for bit; mma on random bf16/f16 inputs is reported (max difference in f32 ulp) and
//! must agree to f32 accumulation precision. Skips with the reason printed when there is no GPU
//! (`LK_REQUIRE_GPU=1` makes that a failure).

mod common;

use common::Rng;
use common::probes::{LdmatrixProbeParams, MmaProbeParams};
use half::{bf16, f16};
use lora_kernels::cudarc::driver::{
    CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use lora_kernels::cudarc::nvrtc::Ptx;
use lora_kernels::device::emu_launch_raw;
use lora_kernels::kernel::EmuBody;
use lora_kernels::{Device, EmuConfig, LaunchPlan};

#[allow(dead_code)]
mod emu_bodies {
    include!(concat!(env!("OUT_DIR"), "/test_kernel_decls.rs"));
}
use emu_bodies::{
    lk_emu_body_ldmatrix_probe, lk_emu_body_mma_probe_bf16, lk_emu_body_mma_probe_f16,
};
#[allow(dead_code)]
mod test_modules {
    include!(concat!(env!("OUT_DIR"), "/cuda_test_modules.rs"));
}

fn emu<P: Copy>(body: EmuBody, smem: u32, p: &P) {
    let plan = LaunchPlan {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        smem_bytes: smem,
    };
    // SAFETY: the params point into live host buffers sized for the probe (one warp).
    unsafe { emu_launch_raw(&EmuConfig::default(), body, &plan, p) }.unwrap();
}

/// A probe kernel of emu_layout.cu, loaded from its nvcc-built fatbin.
fn probe(dev: &Device, kernel: &str) -> CudaFunction {
    let image = test_modules::MODULES
        .iter()
        .find(|(m, _)| *m == "emu_layout")
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
            emu(lk_emu_body_ldmatrix_probe, 512, &p);
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

fn check_mma(dev: &Device, kernel: &str, body: EmuBody, bits: fn(f32) -> u16, stream: u64) {
    let mut rng = Rng::new(stream);
    for exact in [true, false] {
        let (a, b, c) = if exact {
            fragments(|| ((rng.next_u64() % 9) as i32 - 4) as f32, bits)
        } else {
            fragments(|| rng.uniform() as f32, bits)
        };
        let mut d = vec![f32::NAN; 128];
        let p = MmaProbeParams {
            a: a.as_ptr(),
            b: b.as_ptr(),
            c: c.as_ptr(),
            d: d.as_mut_ptr(),
        };
        emu(body, 0, &p);
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
            let worst = d
                .iter()
                .zip(&hw)
                .map(|(x, y)| (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs())
                .max()
                .unwrap();
            eprintln!(
                "{kernel} random inputs: {same}/128 bit-identical, max {worst} f32 ulp apart"
            );
            for (x, y) in d.iter().zip(&hw) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                    "{kernel}: emulator {x} vs hardware {y}"
                );
            }
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
        |v| bf16::from_f32(v).to_bits(),
        41,
    );
    check_mma(
        &dev,
        "mma_probe_f16",
        lk_emu_body_mma_probe_f16,
        |v| f16::from_f32(v).to_bits(),
        42,
    );
}
