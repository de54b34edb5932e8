//! Shared by `benches/lora.rs` (criterion) and `examples/perf_table.rs` (the markdown table): the
//! benchmark cases, input sets rotated so that they do not fit in L2, and the cuBLAS baselines
//! (cudarc's `Gemm<bf16>`: bf16 in and out, f32 compute) for row-major tensors.
#![allow(dead_code)]

use std::sync::Arc;

use lora_kernels::cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use lora_kernels::cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use lora_kernels::cudarc::driver::CudaSlice;
use lora_kernels::{Device, Result, Tensor, bf16, ops};

/// M tokens, N out, K in, r rank.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

/// The grid: M in {16, 2048, 8192}, (N, K) in three Llama-7B-like pairs, r in {8, 16, 64}.
/// `LK_BENCH_QUICK=1` keeps the headline case only (M = 8192, N = K = 4096, r = 16) plus M = 16.
pub fn cases() -> Vec<Case> {
    if std::env::var("LK_BENCH_QUICK").as_deref() == Ok("1") {
        return vec![
            Case {
                m: 8192,
                n: 4096,
                k: 4096,
                r: 16,
            },
            Case {
                m: 16,
                n: 4096,
                k: 4096,
                r: 16,
            },
        ];
    }
    let mut v = Vec::new();
    for m in [16, 2048, 8192] {
        for (n, k) in [(4096, 4096), (11008, 4096), (4096, 11008)] {
            for r in [8, 16, 64] {
                v.push(Case { m, n, k, r });
            }
        }
    }
    v
}

/// One layer's tensors.
pub struct Set {
    pub x: Tensor<bf16>,
    pub w0: Tensor<bf16>,
    pub a: Tensor<bf16>,
    pub b: Tensor<bf16>,
    pub dy: Tensor<bf16>,
    pub y: Tensor<bf16>,
    pub t: Tensor<bf16>,
    pub dx: Tensor<bf16>,
    pub da: Tensor<bf16>,
    pub db: Tensor<bf16>,
    /// Full fine-tuning's dW (N×K), for the baseline.
    pub dw: Tensor<bf16>,
}

/// A tensor of `shape` with values uniform in ±amp (an LCG: reproducible, no dependency).
fn random(dev: &Device, shape: &[usize], amp: f32, seed: u64) -> Result<Tensor<bf16>> {
    let mut s = seed;
    let v: Vec<bf16> = (0..shape.iter().product::<usize>())
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp)
        })
        .collect();
    Tensor::from_slice(dev, &v, shape)
}

/// Input sets, enough of them that one round through all exceeds 2 × L2 (so no set is served from
/// L2 when its turn comes): at least 2.
pub fn sets(dev: &Device, c: Case) -> Result<Vec<Set>> {
    let bytes = 2 * (c.m * c.k + c.n * c.k + c.m * c.n) as u64;
    let l2 = 50u64 << 20; // H100/H200: 50 MiB
    let count = (2 * l2).div_ceil(bytes).clamp(2, 8) as usize;
    (0..count)
        .map(|i| {
            let s = 17 * i as u64 + 1;
            let kk = 1.0 / (c.k as f32).sqrt();
            Ok(Set {
                x: random(dev, &[c.m, c.k], 1.0, s)?,
                w0: random(dev, &[c.n, c.k], kk, s + 1)?,
                a: random(dev, &[c.r, c.k], kk, s + 2)?,
                b: random(dev, &[c.n, c.r], 0.1, s + 3)?,
                dy: random(dev, &[c.m, c.n], 1.0, s + 4)?,
                y: Tensor::zeros(dev, &[c.m, c.n])?,
                t: Tensor::zeros(dev, &[c.m, c.r])?,
                dx: Tensor::zeros(dev, &[c.m, c.k])?,
                da: Tensor::zeros(dev, &[c.r, c.k])?,
                db: Tensor::zeros(dev, &[c.n, c.r])?,
                dw: Tensor::zeros(dev, &[c.n, c.k])?,
            })
        })
        .collect()
}

fn slice(t: &Tensor<bf16>) -> &CudaSlice<bf16> {
    t.as_cuda_slice().expect("benchmarks run on a CUDA device")
}

/// cuBLAS for row-major operands: C (m×n) = alpha·op(A)·op(B) + beta·C, where A is stored m×k (or
/// k×m when `ta`), B is stored k×n (or n×k when `tb`). Runs as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rm(
    blas: &CudaBlas,
    (m, n, k): (usize, usize, usize),
    a: &CudaSlice<bf16>,
    ta: bool,
    b: &CudaSlice<bf16>,
    tb: bool,
    c: &mut CudaSlice<bf16>,
    alpha: f32,
    beta: f32,
) {
    let cfg = GemmConfig {
        transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
        transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::from_f32(alpha),
        lda: if tb { k as i32 } else { n as i32 },
        ldb: if ta { m as i32 } else { k as i32 },
        beta: bf16::from_f32(beta),
        ldc: n as i32,
    };
    // SAFETY: the sizes and leading dimensions above describe exactly the row-major buffers, whose
    // lengths the callers allocated from the same (m, n, k).
    unsafe { blas.gemm(cfg, b, a, c) }.expect("cuBLAS gemm");
}

pub fn blas(dev: &Device) -> Arc<CudaBlas> {
    let cuda = dev.as_cuda().expect("a CUDA device");
    Arc::new(CudaBlas::new(cuda.stream().clone()).expect("cuBLAS handle"))
}

/// Our fused forward (shrink + fused GEMM, or small-M) into the set's y and t.
pub fn ours_forward(s: &mut Set, scale: f32) {
    ops::lora_forward_into(&s.x, &s.w0, &s.a, &s.b, None, scale, &mut s.y, &mut s.t).unwrap();
}

/// Our backward: dA, dB and dX.
pub fn ours_backward(s: &mut Set, scale: f32) {
    ops::lora_backward_into(
        &s.x,
        &s.w0,
        &s.a,
        &s.b,
        &s.t,
        &s.dy,
        scale,
        Some(&mut s.dx),
        &mut s.da,
        &mut s.db,
    )
    .unwrap();
}

/// Our in-place merge.
pub fn ours_merge(s: &mut Set, scale: f32) {
    ops::merge(&mut s.w0, &s.a, &s.b, scale).unwrap();
}

/// Baseline: the bare GEMM Y = X·W0ᵀ (what full fine-tuning's forward costs).
pub fn cublas_forward(blas: &CudaBlas, s: &mut Set, c: Case) {
    let y = s.y.as_cuda_slice_mut().unwrap();
    gemm_rm(
        blas,
        (c.m, c.n, c.k),
        slice(&s.x),
        false,
        slice(&s.w0),
        true,
        y,
        1.0,
        0.0,
    );
}

/// Baseline: the unfused LoRA forward as PEFT runs it, three cuBLAS GEMMs (the scale and the add
/// folded into the third GEMM's alpha and beta, which is kinder to the baseline than PEFT's separate
/// elementwise kernels).
pub fn cublas_unfused(blas: &CudaBlas, s: &mut Set, c: Case, scale: f32) {
    let (x, w0, a, b) = (slice(&s.x), slice(&s.w0), slice(&s.a), slice(&s.b));
    let y = s.y.as_cuda_slice_mut().unwrap();
    gemm_rm(blas, (c.m, c.n, c.k), x, false, w0, true, y, 1.0, 0.0);
    let t = s.t.as_cuda_slice_mut().unwrap();
    gemm_rm(blas, (c.m, c.r, c.k), x, false, a, true, t, 1.0, 0.0);
    let t = s.t.as_cuda_slice().unwrap();
    let y = s.y.as_cuda_slice_mut().unwrap();
    gemm_rm(blas, (c.m, c.n, c.r), t, false, b, true, y, scale, 1.0);
}

/// Baseline: full fine-tuning's backward, dX = dY·W0 and dW = dYᵀ·X.
pub fn cublas_full_backward(blas: &CudaBlas, s: &mut Set, c: Case) {
    let (dy, w0, x) = (slice(&s.dy), slice(&s.w0), slice(&s.x));
    gemm_rm(
        blas,
        (c.m, c.k, c.n),
        dy,
        false,
        w0,
        false,
        s.dx.as_cuda_slice_mut().unwrap(),
        1.0,
        0.0,
    );
    gemm_rm(
        blas,
        (c.n, c.k, c.m),
        dy,
        true,
        x,
        false,
        s.dw.as_cuda_slice_mut().unwrap(),
        1.0,
        0.0,
    );
}

/// Baseline for merge: a device-to-device copy of W0 (one read, one write).
pub fn copy_w0(dev: &Device, s: &mut Set) {
    let stream = dev.as_cuda().unwrap().stream();
    let src = s.w0.as_cuda_slice().unwrap();
    stream
        .memcpy_dtod(src, s.dw.as_cuda_slice_mut().unwrap())
        .expect("copy");
}
