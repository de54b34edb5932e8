//! Zero-copy use from a framework that owns its cudarc memory (candle, burn, an inference server):
//! the framework's stream becomes a [`Device`], its `CudaSlice`s become [`Tensor`]s without a copy, a
//! LoRA training step (forward, backward, AdamW) runs on that stream in order with the framework's own
//! work, and the results go back to the framework as `CudaSlice`s. Nothing is copied and nothing waits
//! for the GPU until the framework reads a value back.
//!
//! Needs a CUDA GPU (on a machine without one it says so and exits). `cargo run --release --example zero_copy`

use std::sync::Arc;

use lora_kernels::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use lora_kernels::ops::{self, AdamState, AdamW, GradMode, Workspace};
use lora_kernels::{Device, Dropout, Result, Tensor, bf16};

/// What the framework has: its stream and its buffers (here filled from the host for the demo).
struct Framework {
    stream: Arc<CudaStream>,
}

impl Framework {
    fn buffer<T: lora_kernels::Element>(&self, host: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(host).expect("upload")
    }
}

fn main() -> Result<()> {
    // (The crate's own check, so that a machine without a driver gets a message, not a panic.)
    if let Err(why) = Device::cuda(0) {
        println!("this example shows the zero-copy path on a GPU and needs one: {why}");
        return Ok(());
    }
    let ctx = CudaContext::new(0).expect("a CUDA context");
    let fw = Framework {
        stream: ctx.new_stream().expect("a stream"),
    };
    let (m, n, k, r) = (256, 512, 512, 16);
    let wave = |i: usize, f: f32| bf16::from_f32(((i as f32 * f).sin()) * 0.05);

    // The framework's tensors, as cudarc slices on its own stream.
    let x = fw.buffer(&(0..m * k).map(|i| wave(i, 0.37)).collect::<Vec<_>>());
    let w0 = fw.buffer(&(0..n * k).map(|i| wave(i, 0.11)).collect::<Vec<_>>());
    let a = fw.buffer(
        &(0..r * k)
            .map(|i| ((i as f32 * 0.7).cos()) * 0.02)
            .collect::<Vec<f32>>(),
    );
    let b = fw.buffer(&vec![0.01f32; n * r]);
    let dy = fw.buffer(&(0..m * n).map(|i| wave(i, 0.05)).collect::<Vec<_>>());

    // Wrap them: same context, same stream, no copy.
    let dev = Device::from_cuda_stream(fw.stream.clone())?;
    let x = Tensor::from_cuda_slice(&dev, x, &[m, k])?;
    let w0 = Tensor::from_cuda_slice(&dev, w0, &[n, k])?;
    let mut a = Tensor::from_cuda_slice(&dev, a, &[r, k])?;
    let mut b = Tensor::from_cuda_slice(&dev, b, &[n, r])?;
    let dy = Tensor::from_cuda_slice(&dev, dy, &[m, n])?;

    // One training step with f32 adapters and dropout, every buffer the caller's.
    let (scale, dropout) = (2.0, Dropout::new(0.05, 1234, 0)?);
    let mut ws = Workspace::new();
    let mut y = Tensor::<bf16>::zeros(&dev, &[m, n])?;
    let mut t = Tensor::<bf16>::zeros(&dev, &[m, r])?;
    ops::lora_forward_into(
        &x, &w0, &a, &b, None, scale, dropout, &mut y, &mut t, &mut ws,
    )?;
    let mut dx = Tensor::<bf16>::zeros(&dev, &[m, k])?;
    let mut da = Tensor::<f32>::zeros(&dev, &[r, k])?;
    let mut db = Tensor::<f32>::zeros(&dev, &[n, r])?;
    ops::lora_backward_into(
        &x,
        &w0,
        &a,
        &b,
        &t,
        &dy,
        scale,
        dropout,
        Some(&mut dx),
        &mut da,
        &mut db,
        GradMode::Overwrite,
        &mut ws,
    )?;
    let hp = AdamW::default();
    let (mut sa, mut sb) = (
        AdamState::new(&dev, &[r, k])?,
        AdamState::new(&dev, &[n, r])?,
    );
    ops::adamw_step(&mut a, &da, &mut sa, &hp)?;
    ops::adamw_step(&mut b, &db, &mut sb, &hp)?;

    // Back to the framework, still without a copy: Y and dX as its own slices.
    let y: CudaSlice<bf16> = y.into_cuda_slice().expect("a GPU tensor");
    let dx: CudaSlice<bf16> = dx.into_cuda_slice().expect("a GPU tensor");
    // Only now does anything wait: the framework reads a value back.
    let y_host = fw.stream.clone_dtoh(&y).expect("download");
    let dx_host = fw.stream.clone_dtoh(&dx).expect("download");
    let norm = |v: &[bf16]| v.iter().map(|e| e.to_f64().powi(2)).sum::<f64>().sqrt();
    println!(
        "{}: Y {m}×{n} (‖Y‖ = {:.4}), dX {m}×{k} (‖dX‖ = {:.4}), A and B stepped in place: all on the caller's stream, no copies",
        dev.describe(),
        norm(&y_host),
        norm(&dx_host)
    );
    Ok(())
}
