//! Bad input gives a clear `Error` naming the argument, never a panic or a launch.

use half::{bf16, f16};
use lora_kernels::{Device, Error, Tensor, ops};

fn emu() -> Device {
    Device::emulator()
}

#[test]
fn wrong_shape_names_the_output() {
    let d = emu();
    let x = Tensor::from_slice(&d, &[bf16::ONE; 4], &[4]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&d, &[5]).unwrap();
    let e = ops::scale(&x, 2.0, &mut y).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "y", .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("`y`") && msg.contains("[5]") && msg.contains("[4]"),
        "{msg}"
    );
}

#[test]
fn zero_dimensional_tensor_is_refused() {
    let d = emu();
    let x = Tensor::from_slice(&d, &[bf16::ONE], &[]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&d, &[]).unwrap();
    let e = ops::scale(&x, 2.0, &mut y).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    assert!(e.to_string().contains("at least 1 dimension"), "{e}");
}

#[test]
fn mismatched_dtypes_name_both() {
    let d = emu();
    let x = Tensor::from_slice(&d, &[bf16::ONE; 3], &[3]).unwrap();
    let mut y = Tensor::<f16>::zeros(&d, &[3]).unwrap();
    let e = ops::scale(&x, 2.0, &mut y).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "y", .. }), "{e}");
    assert!(e.to_string().contains("dtype f16, expected bf16"), "{e}");
}

#[test]
fn empty_tensor_is_refused() {
    let d = emu();
    let x = Tensor::<bf16>::from_slice(&d, &[], &[0, 3]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&d, &[0, 3]).unwrap();
    let e = ops::scale(&x, 2.0, &mut y).unwrap_err();
    assert!(matches!(e, Error::Empty { arg: "x", .. }), "{e}");
}

#[test]
fn tensor_of_another_device_is_refused() {
    let (d1, d2) = (emu(), emu());
    let x = Tensor::from_slice(&d1, &[bf16::ONE; 3], &[3]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&d2, &[3]).unwrap();
    let e = ops::scale(&x, 2.0, &mut y).unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch { arg: "y", .. }), "{e}");
}

#[test]
fn non_finite_scale_is_refused() {
    let d = emu();
    let x = Tensor::from_slice(&d, &[bf16::ONE; 3], &[3]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&d, &[3]).unwrap();
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let e = ops::scale(&x, s, &mut y).unwrap_err();
        assert!(matches!(e, Error::NonFinite { arg: "s", .. }), "{e}");
    }
}

#[test]
fn data_of_wrong_length_is_refused() {
    let e = Tensor::from_slice(&emu(), &[bf16::ONE; 5], &[2, 3]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DataLength {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn cuda_slice_needs_a_cuda_device() {
    // Without a GPU, Device::cuda fails with a reason; it never panics.
    match Device::cuda(0) {
        Ok(_) => {}
        Err(e) => assert!(matches!(e, Error::CudaUnavailable(_)), "{e}"),
    }
    assert!(Device::cuda(1 << 20).is_err());
}
