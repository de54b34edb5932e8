//! Bad input gives a clear `Error` naming the argument, never a panic or a launch.

use half::{bf16, f16};
use lora_kernels::{Device, Dropout, Error, Tensor, ops};

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

/// The LoRA ops: every mismatch is an `Error` naming the argument, before any launch.
mod lora_ops {
    use super::*;

    struct L {
        x: Tensor<bf16>,
        w0: Tensor<bf16>,
        a: Tensor<bf16>,
        b: Tensor<bf16>,
        dy: Tensor<bf16>,
        t: Tensor<bf16>,
    }

    fn layer(d: &Device, (m, n, k, r): (usize, usize, usize, usize)) -> L {
        let z = |shape: &[usize]| Tensor::<bf16>::zeros(d, shape).unwrap();
        L {
            x: z(&[m, k]),
            w0: z(&[n, k]),
            a: z(&[r, k]),
            b: z(&[n, r]),
            dy: z(&[m, n]),
            t: z(&[m, r]),
        }
    }

    fn fwd_err(l: &L, scale: f32) -> Error {
        ops::lora_forward(&l.x, &l.w0, &l.a, &l.b, None, scale).unwrap_err()
    }

    #[test]
    fn forward_shapes() {
        let d = emu();
        let mut l = layer(&d, (3, 4, 5, 2));
        l.w0 = Tensor::zeros(&d, &[4, 6]).unwrap();
        let e = fwd_err(&l, 1.0);
        assert!(
            matches!(e, Error::Shape { arg: "w0", .. }) && e.to_string().contains("K = 5"),
            "{e}"
        );
        let mut l = layer(&d, (3, 4, 5, 2));
        l.b = Tensor::zeros(&d, &[4, 3]).unwrap();
        assert!(matches!(fwd_err(&l, 1.0), Error::Shape { arg: "b", .. }));
        let mut l = layer(&d, (3, 4, 5, 2));
        l.x = Tensor::zeros(&d, &[]).unwrap();
        assert!(matches!(fwd_err(&l, 1.0), Error::Shape { arg: "x", .. }));
        let l = layer(&d, (3, 4, 5, 2));
        let bias = Tensor::<bf16>::zeros(&d, &[5]).unwrap();
        let e = ops::lora_forward(&l.x, &l.w0, &l.a, &l.b, Some(&bias), 1.0).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "bias", .. }), "{e}");
        let mut y = Tensor::<bf16>::zeros(&d, &[3, 5]).unwrap();
        let mut t = Tensor::<bf16>::zeros(&d, &[3, 2]).unwrap();
        let mut ws = ops::Workspace::new();
        let e = ops::lora_forward_into(
            &l.x,
            &l.w0,
            &l.a,
            &l.b,
            None,
            1.0,
            Dropout::NONE,
            &mut y,
            &mut t,
            &mut ws,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "y", .. }), "{e}");
    }

    /// Batched activations: Y, T, dY and dX must carry X's leading dimensions; dA and dB keep their
    /// shapes whether the backward overwrites or accumulates.
    #[test]
    fn batched_and_accumulated_shapes() {
        let d = emu();
        let z = |shape: &[usize]| Tensor::<bf16>::zeros(&d, shape).unwrap();
        let mut l = layer(&d, (6, 4, 5, 2));
        l.x = z(&[2, 3, 5]);
        let mut ws = ops::Workspace::new();
        // y as a plain [M, N] matrix is not [..., N] with x's leading dimensions
        let (mut y, mut t) = (z(&[6, 4]), z(&[2, 3, 2]));
        let e = ops::lora_forward_into(
            &l.x,
            &l.w0,
            &l.a,
            &l.b,
            None,
            1.0,
            Dropout::NONE,
            &mut y,
            &mut t,
            &mut ws,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Shape { arg: "y", .. }) && e.to_string().contains("[..., N]"),
            "{e}"
        );
        // t may be [..., r] or [M, r]; [3, 2, 2] is neither
        let (mut y, mut t) = (z(&[2, 3, 4]), z(&[3, 2, 2]));
        let e = ops::lora_forward_into(
            &l.x,
            &l.w0,
            &l.a,
            &l.b,
            None,
            1.0,
            Dropout::NONE,
            &mut y,
            &mut t,
            &mut ws,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "t", .. }), "{e}");
        let out = ops::lora_forward(&l.x, &l.w0, &l.a, &l.b, None, 1.0).unwrap();
        assert_eq!(
            (out.y.shape(), out.t.shape()),
            (&[2, 3, 4][..], &[2, 3, 2][..])
        );
        // dy with other leading dimensions (same M)
        let e = ops::lora_backward(&l.x, &l.w0, &l.a, &l.b, &out.t, &z(&[3, 2, 4]), 1.0, true)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "dy", .. }), "{e}");
        let dy = z(&[2, 3, 4]);
        let mut dx = z(&[6, 5]);
        let (mut da, mut db) = (z(&[2, 5]), z(&[4, 2]));
        let mut back = |dx: &mut Tensor<bf16>, da: &mut Tensor<bf16>, db: &mut Tensor<bf16>| {
            ops::lora_backward_into(
                &l.x,
                &l.w0,
                &l.a,
                &l.b,
                &out.t,
                &dy,
                1.0,
                Dropout::NONE,
                Some(dx),
                da,
                db,
                ops::GradMode::Accumulate,
                &mut ws,
            )
            .unwrap_err()
        };
        let e = back(&mut dx, &mut da, &mut db);
        assert!(matches!(e, Error::Shape { arg: "dx", .. }), "{e}");
        // accumulating into a wrong-shaped gradient
        let mut dx = z(&[2, 3, 5]);
        let e = back(&mut dx, &mut z(&[5, 2]), &mut db);
        assert!(
            matches!(e, Error::Shape { arg: "da", .. }) && e.to_string().contains("[r, K]"),
            "{e}"
        );
        let e = back(&mut dx, &mut da, &mut z(&[2, 4]));
        assert!(matches!(e, Error::Shape { arg: "db", .. }), "{e}");
    }

    #[test]
    fn rank_out_of_range() {
        let d = emu();
        let l = layer(&d, (3, 4, 5, 129));
        let e = fwd_err(&l, 1.0);
        assert!(
            matches!(
                e,
                Error::Rank {
                    r: 129,
                    max: 128,
                    ..
                }
            ),
            "{e}"
        );
        let mut l = layer(&d, (3, 4, 5, 2));
        l.a = Tensor::zeros(&d, &[0, 5]).unwrap();
        assert!(matches!(fwd_err(&l, 1.0), Error::Empty { arg: "a", .. }));
    }

    #[test]
    fn non_finite_scale() {
        let d = emu();
        let l = layer(&d, (3, 4, 5, 2));
        for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(matches!(
                fwd_err(&l, s),
                Error::NonFinite { arg: "scale", .. }
            ));
            let e = ops::lora_backward(&l.x, &l.w0, &l.a, &l.b, &l.t, &l.dy, s, true).unwrap_err();
            assert!(matches!(e, Error::NonFinite { arg: "scale", .. }));
        }
        let mut w = Tensor::<bf16>::zeros(&d, &[4, 5]).unwrap();
        let e = ops::merge(&mut w, &l.a, &l.b, f32::NAN).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    }

    #[test]
    fn f32_layers_are_refused_with_the_supported_dtypes() {
        let d = emu();
        let z = |shape: &[usize]| Tensor::<f32>::zeros(&d, shape).unwrap();
        let e = ops::lora_forward(
            &z(&[2, 3]),
            &z(&[4, 3]),
            &z(&[1, 3]),
            &z(&[4, 1]),
            None,
            1.0,
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
        assert!(e.to_string().contains("bf16 and f16"), "{e}");
    }

    #[test]
    fn merge_adapter_dtype_must_be_f32_or_w_dtype() {
        let d = emu();
        let mut w = Tensor::<bf16>::zeros(&d, &[4, 5]).unwrap();
        let a = Tensor::<f16>::zeros(&d, &[2, 5]).unwrap();
        let b = Tensor::<f16>::zeros(&d, &[4, 2]).unwrap();
        let e = ops::merge(&mut w, &a, &b, 1.0).unwrap_err();
        assert!(matches!(e, Error::UnsupportedDType { arg: "a", .. }), "{e}");
    }

    #[test]
    fn backward_shapes_and_devices() {
        let d = emu();
        let l = layer(&d, (3, 4, 5, 2));
        let t_bad = Tensor::<bf16>::zeros(&d, &[3, 3]).unwrap();
        let e = ops::lora_backward(&l.x, &l.w0, &l.a, &l.b, &t_bad, &l.dy, 1.0, true).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "t", .. }), "{e}");
        let dy_bad = Tensor::<bf16>::zeros(&d, &[4, 3]).unwrap();
        let e = ops::lora_backward(&l.x, &l.w0, &l.a, &l.b, &l.t, &dy_bad, 1.0, true).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "dy", .. }), "{e}");
        // Another device: a second emulator is a different device.
        let other = Device::emulator();
        let w_other = Tensor::<bf16>::zeros(&other, &[4, 5]).unwrap();
        let e = ops::lora_forward(&l.x, &w_other, &l.a, &l.b, None, 1.0).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e}");
        // every operand's device is checked before the first launch: an accumulating backward with dA
        // elsewhere leaves dB as it was (it used to add to dB, then refuse dA)
        let mut da_other = Tensor::<bf16>::zeros(&other, &[2, 5]).unwrap();
        let mut db = Tensor::<bf16>::from_slice(&d, &[bf16::ONE; 8], &[4, 2]).unwrap();
        d.take_launches();
        let e = ops::lora_backward_into(
            &l.x,
            &l.w0,
            &l.a,
            &l.b,
            &l.t,
            &l.dy,
            1.0,
            lora_kernels::Dropout::NONE,
            None,
            &mut da_other,
            &mut db,
            ops::GradMode::Accumulate,
            &mut ops::Workspace::new(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { arg: "da", .. }), "{e}");
        assert!(d.take_launches().is_empty());
        assert!(db.to_vec().unwrap().iter().all(|v| *v == bf16::ONE));
    }

    /// Adapters in another 16-bit dtype than the layer's are refused (f32 or the layer dtype only),
    /// in the forward and the backward; f32 gradients must have dA's and dB's shapes too.
    #[test]
    fn adapter_dtype_pairs() {
        let d = emu();
        let l = layer(&d, (3, 4, 5, 2));
        let (a16, b16) = (
            Tensor::<f16>::zeros(&d, &[2, 5]).unwrap(),
            Tensor::<f16>::zeros(&d, &[4, 2]).unwrap(),
        );
        let e = ops::lora_forward(&l.x, &l.w0, &a16, &b16, None, 1.0).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedDType { arg: "a", .. }) && e.to_string().contains("f32"),
            "{e}"
        );
        let e = ops::lora_backward(&l.x, &l.w0, &a16, &b16, &l.t, &l.dy, 1.0, true).unwrap_err();
        assert!(matches!(e, Error::UnsupportedDType { arg: "a", .. }), "{e}");
        // f32 adapters are taken, and so must their gradients be shaped
        let z32 = |shape: &[usize]| Tensor::<f32>::zeros(&d, shape).unwrap();
        let (a32, b32) = (z32(&[2, 5]), z32(&[4, 2]));
        ops::lora_forward(&l.x, &l.w0, &a32, &b32, None, 1.0).unwrap();
        let mut ws = ops::Workspace::new();
        for (da_shape, db_shape, arg) in [([5, 2], [4, 2], "da"), ([2, 5], [2, 4], "db")] {
            let (mut da, mut db) = (z32(&da_shape), z32(&db_shape));
            let e = ops::lora_backward_into(
                &l.x,
                &l.w0,
                &a32,
                &b32,
                &l.t,
                &l.dy,
                1.0,
                Dropout::NONE,
                None,
                &mut da,
                &mut db,
                ops::GradMode::Accumulate,
                &mut ws,
            )
            .unwrap_err();
            assert!(matches!(e, Error::Shape { arg: a, .. } if a == arg), "{e}");
        }
        // a 1-element b of the wrong dtype cannot be built: A and B share one type parameter
    }

    /// Dropout probabilities outside [0, 1) (NaN included) are an Error naming `p`; p close to 1 that
    /// makes s / (1 - p) overflow f32 is an Error naming the scale.
    #[test]
    fn bad_dropout() {
        for p in [-0.01f32, 1.0, 2.0, f32::NAN, f32::NEG_INFINITY] {
            let e = Dropout::new(p, 0, 0).unwrap_err();
            assert!(
                matches!(e, Error::OutOfRange { arg: "p", .. })
                    && e.to_string().contains("0 <= p < 1"),
                "{p}: {e}"
            );
        }
        let d = emu();
        let l = layer(&d, (3, 4, 5, 2));
        let drop = Dropout::new(1.0 - f32::EPSILON / 2.0, 1, 2).unwrap();
        let (mut da, mut db) = (
            Tensor::<bf16>::zeros(&d, &[2, 5]).unwrap(),
            Tensor::<bf16>::zeros(&d, &[4, 2]).unwrap(),
        );
        let e = ops::lora_backward_into(
            &l.x,
            &l.w0,
            &l.a,
            &l.b,
            &l.t,
            &l.dy,
            3.0e38,
            drop,
            None,
            &mut da,
            &mut db,
            ops::GradMode::Overwrite,
            &mut ops::Workspace::new(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    }
}

/// Sizes past what the kernels' 32-bit arithmetic or a GPU's grid takes are errors naming the size,
/// before any allocation or launch: a shape whose element count overflows (no wrapped, small buffer), a
/// set's capacity past memory, a tensor past the host's memory on the emulator, W0 with more rows than the merge's grid covers (4194240), AdamW's step
/// count at its end (no wrap to step 0), and a merge into a u32 "weight" names w0, not the adapter.
#[test]
fn sizes_past_the_kernels_limits_are_refused() {
    let d = emu();
    for shape in [&[usize::MAX, 2][..], &[1 << 40, 1 << 40], &[1usize << 62]] {
        let e = Tensor::<f32>::zeros(&d, shape).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLarge {
                    op: "Tensor::zeros",
                    ..
                }
            ),
            "{shape:?}: {e}"
        );
        let e = Tensor::<f32>::from_slice(&d, &[], shape).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{shape:?}: {e}");
    }
    let e = lora_kernels::AdapterSet::<f32>::with_capacity(&d, 16, 16, 1 << 62).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    // within Rust's allocation limit but past this machine's memory (2^60 bytes): the emulator's
    // allocation fails with an error, not an abort of the process
    let e = Tensor::<f32>::zeros(&d, &[1 << 58]).unwrap_err();
    assert!(
        matches!(e, Error::HostAlloc { bytes } if bytes == 1 << 60),
        "{e}"
    );

    // 4194305 rows: one past 65535 blocks of 64 rows (8 MiB in bf16)
    let n = 65535 * 64 + 1;
    let mut w0 = Tensor::<bf16>::zeros(&d, &[n, 1]).unwrap();
    let a = Tensor::<bf16>::zeros(&d, &[1, 1]).unwrap();
    let b = Tensor::<bf16>::zeros(&d, &[n, 1]).unwrap();
    let e = ops::merge(&mut w0, &a, &b, 1.0).unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { arg: "N (rows of w0)", value, max: 4194240, .. } if value == n),
        "{e}"
    );

    let mut param = Tensor::<f32>::zeros(&d, &[4]).unwrap();
    let grad = Tensor::<f32>::zeros(&d, &[4]).unwrap();
    let mut state = ops::AdamState::new(&d, &[4]).unwrap();
    state.step = u64::MAX;
    let e = ops::adamw_step(&mut param, &grad, &mut state, &ops::AdamW::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                arg: "state.step",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(state.step, u64::MAX, "the state is unchanged");

    let mut w = Tensor::<u32>::zeros(&d, &[2, 2]).unwrap();
    let a32 = Tensor::<f32>::zeros(&d, &[1, 2]).unwrap();
    let b32 = Tensor::<f32>::zeros(&d, &[2, 1]).unwrap();
    let e = ops::merge(&mut w, &a32, &b32, 1.0).unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedDType { arg: "w0", .. }),
        "{e}"
    );
}
