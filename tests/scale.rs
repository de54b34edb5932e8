//! The trivial kernel through the whole path (build.rs -> embedded module / emulator -> launch plan ->
//! safe op) against the reference, on the emulator under its four thread orders and on the GPU if present.

mod common;

use common::Rng;
use half::{bf16, f16};
use lora_kernels::{Device, Element, Tensor, ops, reference};

/// Sizes around the block (256) and vector widths: 1, 2^k ± 1, several blocks.
const SIZES: &[usize] = &[1, 2, 7, 255, 256, 257, 1023, 4097];

fn check<T: Element>(device: &Device, tol: f64) {
    let mut rng = Rng::new(T::DTYPE as u64);
    for &n in SIZES {
        let s = (rng.uniform() * 4.0) as f32;
        let x: Vec<T> = rng.vec(n, 8.0);
        let xt = Tensor::from_slice(device, &x, &[n]).unwrap();
        let mut y = Tensor::<T>::zeros(device, &[n]).unwrap();
        y.poison().unwrap();
        ops::scale(&xt, s, &mut y).unwrap();
        let got = y.to_vec().unwrap();
        // one f32 multiply, one rounding: the reference's single rounding of the exact product agrees
        // bit for bit except where f32 rounding of the product moved a bf16/f16 tie.
        let want: Vec<f64> = x.iter().map(|v| v.to_f64() * s as f64).collect();
        let err = reference::relative_error(&got, &want);
        assert!(
            err <= tol,
            "{device:?} {} n={n}: relative error {err:e} > {tol:e}",
            T::DTYPE
        );
        let exact = reference::scale(&x, s);
        let same = got
            .iter()
            .zip(&exact)
            .filter(|(a, b)| a.to_bits_u32() == b.to_bits_u32())
            .count();
        assert!(
            same as f64 >= 0.99 * n as f64,
            "{device:?} {} n={n}: only {same}/{n} bit-exact",
            T::DTYPE
        );
    }
}

#[test]
fn scale_matches_reference_on_every_device() {
    for device in common::all_devices() {
        check::<bf16>(&device, 1e-2);
        check::<f16>(&device, 1e-3);
        check::<f32>(&device, 1e-6);
    }
}

/// Back-to-back launches where each reads what the one before wrote and writes what it read: on an H100
/// or H200 they are made with programmatic dependent launch (each may be scheduled while the one ahead
/// runs), so a kernel touching global memory before its
/// griddepcontrol.wait would read half-written inputs or overwrite inputs still being read. 64 launches
/// of y = 2·x over 4 MiB (many blocks per SM, so the launches overlap if they may) must give x·2^64
/// exactly; on an sm_90 GPU with this build's sm_90 code the device must really have launched them that
/// way (unless `LK_PDL=0`).
#[test]
fn dependent_launches_back_to_back_see_each_others_results() {
    let Some(dev) = common::gpu() else { return };
    let n = 1 << 20;
    let mut rng = Rng::new(7);
    let x: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 + 0.5).collect();
    let mut a = Tensor::from_slice(&dev, &x, &[n]).unwrap();
    let mut b = Tensor::<f32>::zeros(&dev, &[n]).unwrap();
    for i in 0..64 {
        if i % 2 == 0 {
            ops::scale(&a, 2.0, &mut b).unwrap();
        } else {
            ops::scale(&b, 2.0, &mut a).unwrap();
        }
    }
    let got = a.to_vec().unwrap();
    let wrong = got
        .iter()
        .zip(&x)
        .filter(|(g, v)| **g != **v * 2f32.powi(64))
        .count();
    assert_eq!(
        wrong, 0,
        "{dev:?}: {wrong} of {n} elements differ from x·2^64"
    );
    // an H100 running this build's sm_90 SASS (build.rs's list of architectures) must have used it
    let built_90 = env!("LK_BUILT_ARCHS").split(',').any(|a| a.trim() == "90");
    let pdl_off = std::env::var("LK_PDL").as_deref() == Ok("0");
    if dev.compute_capability() == 90 && built_90 && !pdl_off {
        assert!(
            dev.programmatic_launch().unwrap(),
            "{dev:?}: the launches were not programmatic: {:?}",
            dev.programmatic_refused()
        );
    }
}

#[test]
fn scale_is_identical_under_every_thread_order() {
    let mut rng = Rng::new(99);
    let x: Vec<bf16> = rng.vec(1000, 3.0);
    let outs: Vec<Vec<bf16>> = common::emulators()
        .iter()
        .map(|d| {
            let xt = Tensor::from_slice(d, &x, &[10, 100]).unwrap();
            let mut y = Tensor::<bf16>::zeros(d, &[10, 100]).unwrap();
            y.poison().unwrap();
            ops::scale(&xt, 1.5, &mut y).unwrap();
            y.to_vec().unwrap()
        })
        .collect();
    let want: Vec<f64> = x.iter().map(|v| 1.5 * v.to_f64()).collect();
    let err = reference::relative_error(&outs[0], &want);
    assert!(err <= 1e-2, "relative error {err:e}");
    for (i, out) in outs.iter().enumerate().skip(1) {
        assert!(
            common::bits(out) == common::bits(&outs[0]),
            "thread order {i} gave other bits than the ascending one"
        );
    }
}

/// The loss gradient `dy = round(s·(y − target))`: bit for bit the reference's f32 formula, every
/// size around the block, bf16 and f16, every device; the shapes and dtypes checked.
#[test]
fn mse_grad_matches_reference_bit_for_bit() {
    fn one<T: Element>(device: &Device, rng: &mut Rng) {
        for &n in SIZES {
            let s = (rng.uniform() * 2.0) as f32;
            let (y, t): (Vec<T>, Vec<T>) = (rng.vec(n, 4.0), rng.vec(n, 4.0));
            let yt = Tensor::from_slice(device, &y, &[n]).unwrap();
            let tt = Tensor::from_slice(device, &t, &[n]).unwrap();
            let mut dy = Tensor::<T>::zeros(device, &[n]).unwrap();
            dy.poison().unwrap();
            ops::mse_grad(&yt, &tt, s, &mut dy).unwrap();
            let got: Vec<u32> = dy
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bits_u32())
                .collect();
            let want: Vec<u32> = reference::mse_grad(&y, &t, s)
                .iter()
                .map(|v| v.to_bits_u32())
                .collect();
            assert!(
                got == want,
                "{device:?} {} n={n}: dy differs from the reference",
                T::DTYPE
            );
        }
    }
    let mut rng = Rng::new(5);
    for device in common::all_devices() {
        one::<bf16>(&device, &mut rng);
        one::<f16>(&device, &mut rng);
    }
    let d = Device::emulator();
    let y = Tensor::<bf16>::zeros(&d, &[4]).unwrap();
    let mut dy = Tensor::<bf16>::zeros(&d, &[4]).unwrap();
    let e = ops::mse_grad(&y, &Tensor::zeros(&d, &[5]).unwrap(), 1.0, &mut dy).unwrap_err();
    assert!(
        matches!(e, lora_kernels::Error::Shape { arg: "target", .. }),
        "{e}"
    );
    let y32 = Tensor::<f32>::zeros(&d, &[4]).unwrap();
    let mut dy32 = Tensor::<f32>::zeros(&d, &[4]).unwrap();
    let e = ops::mse_grad(&y32, &y32, 1.0, &mut dy32).unwrap_err();
    assert!(
        matches!(e, lora_kernels::Error::UnsupportedDType { .. }),
        "{e}"
    );
}

/// The emulator's launch record (`Device::take_launches`): each launch's kernel by name, in order, on the
/// device and its clones, cleared by taking it, the last 4096 kept (the oldest dropped); a GPU keeps none.
#[test]
fn the_emulator_records_its_launches() {
    let dev = Device::emulator_unchecked();
    let x = Tensor::from_slice(&dev, &[bf16::ONE], &[1]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&dev, &[1]).unwrap();
    let xh = Tensor::from_slice(&dev, &[f16::ONE], &[1]).unwrap();
    let mut yh = Tensor::<f16>::zeros(&dev, &[1]).unwrap();
    assert!(dev.take_launches().is_empty());
    ops::scale(&x, 2.0, &mut y).unwrap();
    ops::scale(&xh, 2.0, &mut yh).unwrap();
    assert_eq!(dev.clone().take_launches(), ["scale_bf16", "scale_f16"]);
    assert!(
        dev.take_launches().is_empty(),
        "taking the record clears it"
    );
    ops::scale(&xh, 2.0, &mut yh).unwrap();
    for _ in 0..4096 {
        ops::scale(&x, 2.0, &mut y).unwrap();
    }
    let record = dev.take_launches();
    assert_eq!(record.len(), 4096);
    assert!(
        record.iter().all(|k| *k == "scale_bf16"),
        "the oldest went first"
    );
    if let Some(gpu) = common::gpu() {
        assert!(gpu.take_launches().is_empty());
    }
}
