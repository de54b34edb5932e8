//! The sm_90a test cases shared by tests/sm90_forward.rs (`LK_FUSED_GEMM=sm90`: each rank's own
//! structure) and tests/sm90_projection.rs (`LK_FUSED_GEMM=sm90-projection`: T and U always from their
//! own launches): emulators of a compute-capability-9.0 device, the sm_90 GPU when there is one, and one
//! layer case run and checked on them.

use lora_kernels::reference::Dims;
use lora_kernels::{DType, Device, Element, EmuConfig, ThreadOrder};

use super::Rng;
use super::lora::{Layer, check, run};

/// An emulated sm_90 device of `sms` SMs.
pub fn hopper(order: ThreadOrder, seed: u64, sms: u32) -> Device {
    Device::emulator_with(EmuConfig {
        order,
        seed,
        arch: 90,
        sms,
        ..EmuConfig::default()
    })
}

pub fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 1e-3 }
}

/// The GPU, when there is one and it is sm_90 (these kernels' only hardware; `common::gpu` panics
/// without a GPU under LK_TEST_DEVICES=gpu, and on another GPU the cases stay on the emulator).
pub fn hopper_gpu() -> Option<Device> {
    let gpu = super::gpu()?;
    if gpu.compute_capability() == 90 {
        return Some(gpu);
    }
    eprintln!("sm_90a GPU run skipped: {}", gpu.describe());
    None
}

/// What a case checks in an emulator's launch record: (launches, rank, backward, what).
pub type Structure = fn(&[&str], usize, bool, &str);

/// What a test binary runs its layer cases under: the `LK_FUSED_GEMM` value it forces for the whole
/// process (`sm90` or `sm90-projection`) and the structure its cases must show in the launch record.
pub struct Mode {
    pub fused_gemm: &'static str,
    pub structure: Structure,
}

impl Mode {
    /// Sets `LK_FUSED_GEMM` to this mode's value.
    pub fn force(&self) {
        // SAFETY: a test binary has one Mode and every test of it sets the same value before any kernel
        // runs; the value never changes afterwards, so no concurrent read sees anything else.
        unsafe { std::env::set_var("LK_FUSED_GEMM", self.fused_gemm) };
    }

    /// `case_on` with 1, 3 or 132 emulated SMs, chosen by `stream`.
    pub fn case<T: Element>(
        &self,
        dims: (usize, usize, usize, usize),
        bias: bool,
        stream: u64,
        backward: bool,
    ) {
        let sms = [1, 3, 132][(stream >> 2) as usize % 3];
        self.case_on::<T>(dims, bias, stream, backward, sms);
    }

    /// The mode forced, then one layer case (`layer_case`) with this mode's structure required.
    pub fn case_on<T: Element>(
        &self,
        dims: (usize, usize, usize, usize),
        bias: bool,
        stream: u64,
        backward: bool,
        sms: u32,
    ) {
        self.force();
        layer_case::<T>(dims, bias, stream, backward, sms, self.structure);
    }
}

/// One layer case (fresh random inputs, a scale of either sign, outputs poisoned, every output against
/// the f64 reference): the forward, and with `backward` the backward too, on `sms` emulated SMs under the
/// ascending thread order and one of the other four (by `stream`) with identical bits, and `structure`
/// checked on each emulator's launch record; on an sm_90 GPU too (same reference, repeated bits).
fn layer_case<T: Element>(
    (m, n, k, r): (usize, usize, usize, usize),
    bias: bool,
    stream: u64,
    backward: bool,
    sms: u32,
    structure: Structure,
) {
    let mut rng = Rng::new(stream);
    let magnitude = 0.5 + rng.uniform().abs() as f32;
    let scale = if rng.next_u64() % 2 == 0 {
        magnitude
    } else {
        -magnitude
    };
    let l = Layer::<T>::random(&mut rng, Dims { m, n, k, r }, scale, bias);
    let others = [
        ThreadOrder::Descending,
        ThreadOrder::Shuffled,
        ThreadOrder::WarpGreedyAscending,
        ThreadOrder::WarpGreedyDescending,
    ];
    let mut first = None;
    // the emulators, unless LK_TEST_DEVICES=gpu and an sm_90 GPU is here to run the cases instead
    let gpu = hopper_gpu();
    let mut devices = Vec::new();
    if !super::gpu_only() || gpu.is_none() {
        devices.push(hopper(ThreadOrder::Ascending, 0, sms));
        devices.push(hopper(others[(stream % 4) as usize], stream | 1, sms));
    }
    devices.extend(gpu);
    for dev in devices {
        let sms = dev.sm_count().unwrap();
        let tiles = format!(
            "tiles {:?}, dX {:?}",
            lora_kernels::ops::sm90_tile(m, n, sms),
            lora_kernels::ops::sm90_tile(m, k, sms)
        );
        dev.take_launches();
        let o = run(&dev, &l, backward);
        let what = format!(
            "sm_90a {m}×{n}×{k} r {r} scale {scale} bias {bias} on {sms} SMs ({tiles}) of {}",
            dev.describe()
        );
        check(&what, &l, &o, tol(T::DTYPE));
        if dev.is_emulator() {
            structure(&dev.take_launches(), r, backward, &what);
        }
        if dev.is_cuda() {
            assert!(
                run(&dev, &l, backward).bits() == o.bits(),
                "{what}: GPU run not repeatable"
            );
            continue;
        }
        match &first {
            None => first = Some(o.bits()),
            Some(f) => assert!(*f == o.bits(), "{what}: bits differ between thread orders"),
        }
    }
}
