//! Runs the benchmark cases once each and prints ONE markdown table: time of our kernels, our ratio to
//! each cuBLAS baseline measured in the same run, and % of a roofline built from peaks measured in
//! the same run (a large cuBLAS bf16 GEMM for FLOP/s, a large device-to-device copy for bytes/s).
//! Also measures the device memory one LoRA training step allocates for a layer (free memory before
//! and after) next to the computed figure. Needs a GPU; without one it says so and exits 0.
//!
//! `cargo run --release --example perf_table` (`LK_BENCH_QUICK=1`: headline cases only). Results
//! from GPU runs are kept in docs/perf/ with device, driver, date and commit.

#[path = "../benches/common/mod.rs"]
mod common;

use std::time::Instant;

use common::Case;
use lora_kernels::cudarc::driver::result::mem_get_info;
use lora_kernels::{Device, Tensor, bf16};

const SCALE: f32 = 2.0;

/// Mean seconds per call of `f` over enough calls to take ~0.3 s, after a warm-up; `f` gets the call
/// index (to rotate input sets) and the device is synchronized before the clock stops.
fn time(dev: &Device, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..3 {
        f(i);
    }
    dev.synchronize().unwrap();
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed().as_secs_f64() < 0.3 || calls < 5 {
        f(calls);
        calls += 1;
        if calls % 8 == 0 {
            dev.synchronize().unwrap();
        }
    }
    dev.synchronize().unwrap();
    start.elapsed().as_secs_f64() / calls as f64
}

fn main() {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("perf_table skipped: no usable GPU ({e})");
            return;
        }
    };
    let blas = common::blas(&dev);
    // Peaks measured now: an 8192³ bf16 GEMM and a 1 GiB copy.
    let big = Case {
        m: 8192,
        n: 8192,
        k: 8192,
        r: 8,
    };
    let mut peak_sets = common::sets(&dev, big).unwrap();
    let t = time(&dev, |i| {
        common::cublas_forward(&blas, &mut peak_sets[i % 2], big)
    });
    let peak_flops = 2.0 * 8192f64.powi(3) / t;
    drop(peak_sets);
    let n_copy = 1usize << 29; // 1 GiB of bf16
    let src = Tensor::<bf16>::zeros(&dev, &[n_copy]).unwrap();
    let mut dst = Tensor::<bf16>::zeros(&dev, &[n_copy]).unwrap();
    let stream = dev.as_cuda().unwrap().stream().clone();
    let t = time(&dev, |_| {
        stream
            .memcpy_dtod(
                src.as_cuda_slice().unwrap(),
                dst.as_cuda_slice_mut().unwrap(),
            )
            .unwrap()
    });
    let peak_bw = 2.0 * (n_copy * 2) as f64 / t;
    drop((src, dst));
    println!("device: {}", dev.describe());
    println!(
        "peaks measured in this run: cuBLAS bf16 GEMM 8192³ {:.0} TFLOP/s, device copy {:.0} GB/s (read + write)\n",
        peak_flops / 1e12,
        peak_bw / 1e9
    );
    println!(
        "| op | M | N | K | r | ours (µs) | baseline | baseline (µs) | ours / baseline | ours % roofline |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let roof = |flops: f64, bytes: f64| (flops / peak_flops).max(bytes / peak_bw);
    for c in common::cases() {
        let mut sets = common::sets(&dev, c).unwrap();
        let ns = sets.len();
        let (m, n, k, r) = (c.m as f64, c.n as f64, c.k as f64, c.r as f64);
        let row = |op: &str, ours: f64, base: &str, tb: f64, roofline: f64| {
            println!(
                "| {op} | {} | {} | {} | {} | {:.1} | {base} | {:.1} | {:.3} | {:.0} % |",
                c.m,
                c.n,
                c.k,
                c.r,
                ours * 1e6,
                tb * 1e6,
                ours / tb,
                100.0 * roofline / ours
            );
        };
        let fwd = time(&dev, |i| common::ours_forward(&mut sets[i % ns], SCALE));
        let bare = time(&dev, |i| {
            common::cublas_forward(&blas, &mut sets[i % ns], c)
        });
        let unfused = time(&dev, |i| {
            common::cublas_unfused(&blas, &mut sets[i % ns], c, SCALE)
        });
        let f_roof = roof(
            2.0 * m * n * k + 4.0 * m * k * r,
            2.0 * (m * k + n * k + m * n),
        );
        let op = if c.m <= 16 {
            "forward (small-M)"
        } else {
            "forward"
        };
        row(op, fwd, "cuBLAS GEMM (full FT)", bare, f_roof);
        row(op, fwd, "cuBLAS unfused LoRA", unfused, f_roof);
        if c.m > 16 {
            let bwd = time(&dev, |i| common::ours_backward(&mut sets[i % ns], SCALE));
            let full = time(&dev, |i| {
                common::cublas_full_backward(&blas, &mut sets[i % ns], c)
            });
            let b_roof = roof(
                2.0 * m * n * k + 4.0 * m * (n + k) * r,
                2.0 * (3.0 * m * n + n * k + 2.0 * m * k),
            );
            row("backward", bwd, "cuBLAS dX + dW (full FT)", full, b_roof);
        }
        if c.m == 2048 {
            let merge = time(&dev, |i| common::ours_merge(&mut sets[i % ns], SCALE));
            let copy = time(&dev, |i| common::copy_w0(&dev, &mut sets[i % ns]));
            row("merge", merge, "copy of W0", copy, roof(0.0, 4.0 * n * k));
        }
    }

    // Memory of one LoRA training step for the headline layer, measured vs computed.
    let c = Case {
        m: 8192,
        n: 4096,
        k: 4096,
        r: 16,
    };
    let mut sets = common::sets(&dev, c).unwrap();
    sets.truncate(1);
    dev.synchronize().unwrap();
    let (free0, _) = mem_get_info().unwrap();
    let s = &sets[0];
    let f = lora_kernels::ops::lora_forward(&s.x, &s.w0, &s.a, &s.b, None, SCALE).unwrap();
    let g = lora_kernels::ops::lora_backward(&s.x, &s.w0, &s.a, &s.b, &f.t, &s.dy, SCALE, true)
        .unwrap();
    dev.synchronize().unwrap();
    let (free1, _) = mem_get_info().unwrap();
    let computed = 2 * (c.m * c.n + c.m * c.r + c.m * c.k + c.r * c.k + c.n * c.r);
    println!(
        "\nmemory: one LoRA step (M {} N {} K {} r {}) holds Y, T, dX, dA, dB = {} bytes computed; device free memory fell by {} bytes (allocator granularity included)",
        c.m,
        c.n,
        c.k,
        c.r,
        computed,
        free0 as i64 - free1 as i64
    );
    drop((f, g));
}
