//! Zero-copy from a framework's cudarc stream and slices (`Device::from_cuda_stream`,
//! `Tensor::from_cuda_slice` / `into_cuda_slice`): the same bits as the crate's own device, the
//! results handed back as the framework's slices. Needs a GPU (skipped without one, unless
//! LK_REQUIRE_GPU=1 makes that a failure: see tests/common).

mod common;

use common::Rng;
use half::bf16;
use lora_kernels::cudarc::driver::CudaContext;
use lora_kernels::{Device, Element, Error, Tensor, ops};

#[test]
fn framework_slices_run_without_copies() {
    let Some(own) = common::gpu() else {
        return;
    };
    let (m, n, k, r) = (40, 48, 64, 8);
    let mut rng = Rng::new(3);
    let (x, w0): (Vec<bf16>, Vec<bf16>) = (rng.vec(m * k, 1.0), rng.vec(n * k, 0.2));
    let (a, b): (Vec<f32>, Vec<f32>) = (rng.vec(r * k, 0.2), rng.vec(n * r, 0.2));
    // the crate's own device
    let up = |d: &Device| {
        (
            Tensor::from_slice(d, &x, &[m, k]).unwrap(),
            Tensor::from_slice(d, &w0, &[n, k]).unwrap(),
            Tensor::from_slice(d, &a, &[r, k]).unwrap(),
            Tensor::from_slice(d, &b, &[n, r]).unwrap(),
        )
    };
    let (xo, w0o, ao, bo) = up(&own);
    let want = ops::lora_forward(&xo, &w0o, &ao, &bo, None, 1.5)
        .unwrap()
        .y
        .to_vec()
        .unwrap();

    // a framework's context, stream and slices
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let dev = Device::from_cuda_stream(stream.clone()).unwrap();
    let xs = Tensor::from_cuda_slice(&dev, stream.clone_htod(&x).unwrap(), &[m, k]).unwrap();
    let w0s = Tensor::from_cuda_slice(&dev, stream.clone_htod(&w0).unwrap(), &[n, k]).unwrap();
    let a_s = Tensor::from_cuda_slice(&dev, stream.clone_htod(&a).unwrap(), &[r, k]).unwrap();
    let bs = Tensor::from_cuda_slice(&dev, stream.clone_htod(&b).unwrap(), &[n, r]).unwrap();
    let y = ops::lora_forward(&xs, &w0s, &a_s, &bs, None, 1.5)
        .unwrap()
        .y;
    let y_slice = y.into_cuda_slice().expect("a GPU tensor");
    let got: Vec<bf16> = stream.clone_dtoh(&y_slice).unwrap();
    let bits = |v: &[bf16]| v.iter().map(|e| e.to_bits_u32()).collect::<Vec<_>>();
    assert!(
        bits(&got) == bits(&want),
        "the framework's stream gave other bits"
    );

    // a slice of another context is refused, not used
    let other = CudaContext::new(0).unwrap().default_stream();
    let e = Tensor::from_cuda_slice(&dev, other.clone_htod(&x).unwrap(), &[m, k]).unwrap_err();
    assert!(
        matches!(e, Error::DeviceMismatch { arg: "slice", .. }),
        "{e}"
    );
}
