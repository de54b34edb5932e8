//! Inputs and runners of the multi-adapter benchmarks (benches/lora.rs `multi/...`): M tokens whose rows
//! are grouped by adapter (adapter i owns rows [i·M/A, (i+1)·M/A), as a server batches requests), A
//! adapters of ranks 8, 16, 64 (cycling), N = K = 4096, bf16.
//!
//! - ours: `ops::lora_forward_multi_into`, all rows in one set of launches;
//! - loop: `ops::lora_forward_into` once per adapter on its rows (each adapter's rows already in their own
//!   tensors: the gather is not timed, in the baseline's favour);
//! - cuBLAS gather + GEMMs: Y = X·W0ᵀ for all rows, then per adapter T_a = X_a·A_aᵀ and Y_a += s·T_a·B_aᵀ
//!   on its rows (grouped rows: the gather is an offset, again in the baseline's favour).

use half::bf16;
use lora_kernels::cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use lora_kernels::cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use lora_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
use lora_kernels::ops::{self, Workspace};
use lora_kernels::{AdapterIndex, AdapterSet, Device, Dropout, Result, Tensor};

use super::random;

pub const N: usize = 4096;
pub const K: usize = 4096;
const RANKS: [usize; 3] = [8, 16, 64];

/// (M, adapters) of the benchmark.
pub fn cases() -> Vec<(usize, usize)> {
    let mut c = Vec::new();
    for m in [16, 64, 256, 4096] {
        for a in [4, 16, 64] {
            c.push((m, a));
        }
    }
    c
}

/// One adapter's rows [begin, end), its tensors, and the loop baseline's buffers for those rows.
pub struct Segment {
    pub begin: usize,
    pub end: usize,
    pub rank: usize,
    pub scale: f32,
    pub a: Tensor<bf16>,
    pub b: Tensor<bf16>,
    pub x: Tensor<bf16>,
    pub y: Tensor<bf16>,
    pub t: Tensor<bf16>,
}

pub struct MultiSet {
    pub m: usize,
    pub x: Tensor<bf16>,
    pub w0: Tensor<bf16>,
    pub y: Tensor<bf16>,
    pub t: Tensor<bf16>,
    pub set: AdapterSet<bf16>,
    pub index: AdapterIndex,
    /// The adapters with at least one row.
    pub segments: Vec<Segment>,
    pub ws: Workspace<bf16>,
}

/// Input sets per case (at least; more on a GPU whose L2 is over 64 MiB), used in turn: four W0 of
/// 32 MiB each are 128 MiB, over twice an H100's or H200's L2 (50, 60 MiB), so every call streams its W0
/// from memory as a server's would (one layer's W0 is not read again until the next token), rather than
/// from the L2 the previous calls filled.
pub const SETS: usize = 4;

pub fn multi_sets(dev: &Device, m: usize, adapters: usize) -> Result<Vec<MultiSet>> {
    // more where L2 is larger than that
    let sets = (2 * super::l2_bytes(dev))
        .div_ceil((2 * N * K) as u64)
        .max(SETS as u64);
    (0..sets)
        .map(|i| multi_set(dev, m, adapters, 1000 * i))
        .collect()
}

fn multi_set(dev: &Device, m: usize, adapters: usize, seed: u64) -> Result<MultiSet> {
    let kk = 1.0 / (K as f32).sqrt();
    let x = random(dev, [m, K], 1.0, seed + 101)?;
    let x_host = x.to_vec()?;
    let mut set = AdapterSet::<bf16>::with_capacity(dev, N, K, adapters * 64 * (N + K))?;
    let mut segments = Vec::new();
    let mut rows = vec![None; m];
    for i in 0..adapters {
        let rank = RANKS[i % RANKS.len()];
        let a = random(dev, [rank, K], kk, seed + 200 + i as u64)?;
        let b = random(dev, [N, rank], 0.1, seed + 300 + i as u64)?;
        let scale = 2.0;
        let slot = set.add(&a, &b, scale)?;
        let (begin, end) = (i * m / adapters, (i + 1) * m / adapters);
        if end == begin {
            continue;
        }
        rows[begin..end].fill(Some(slot));
        let len = end - begin;
        segments.push(Segment {
            begin,
            end,
            rank,
            scale,
            x: Tensor::from_slice(dev, &x_host[begin * K..end * K], &[len, K])?,
            y: Tensor::zeros(dev, &[len, N])?,
            t: Tensor::zeros(dev, &[len, rank])?,
            a,
            b,
        });
    }
    let index = AdapterIndex::new(&set, &rows)?;
    Ok(MultiSet {
        m,
        w0: random(dev, [N, K], kk, seed + 102)?,
        y: Tensor::zeros(dev, &[m, N])?,
        t: Tensor::zeros(dev, &[m, set.max_rank()])?,
        x,
        set,
        index,
        segments,
        ws: Workspace::new(),
    })
}

pub fn ours(s: &mut MultiSet) {
    ops::lora_forward_multi_into(
        &s.x, &s.w0, None, &s.set, &s.index, &mut s.y, &mut s.t, &mut s.ws,
    )
    .unwrap();
}

pub fn loop_lora_forward(s: &mut MultiSet) {
    for seg in s.segments.iter_mut() {
        ops::lora_forward_into(
            &seg.x,
            &s.w0,
            &seg.a,
            &seg.b,
            None,
            seg.scale,
            Dropout::NONE,
            &mut seg.y,
            &mut seg.t,
            &mut s.ws,
        )
        .unwrap();
    }
}

/// Row-major C (m×n) = alpha·A (m×k)·B (n×k)ᵀ + beta·C with cuBLAS (column-major: Cᵀ = B·Aᵀ, so its
/// first operand is our B, transposed).
#[allow(clippy::too_many_arguments)]
fn gemm_nt(
    blas: &CudaBlas,
    (m, n, k): (usize, usize, usize),
    a: &impl DevicePtr<bf16>,
    b: &impl DevicePtr<bf16>,
    c: &mut impl DevicePtrMut<bf16>,
    alpha: f32,
    beta: f32,
) {
    let cfg = GemmConfig {
        transa: CUBLAS_OP_T,
        transb: CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::from_f32(alpha),
        lda: k as i32,
        ldb: k as i32,
        beta: bf16::from_f32(beta),
        ldc: n as i32,
    };
    // SAFETY: every caller passes A with m·k, B with n·k and C with m·n elements (views of the set's
    // tensors at their own row offsets), which is what these sizes and leading dimensions address.
    unsafe { blas.gemm(cfg, b, a, c) }.expect("cuBLAS gemm");
}

pub fn cublas_gather_gemms(blas: &CudaBlas, s: &mut MultiSet) {
    let on_gpu = "benchmarks run on a CUDA device";
    let x = s.x.as_cuda_slice().expect(on_gpu);
    let w0 = s.w0.as_cuda_slice().expect(on_gpu);
    let y = s.y.as_cuda_slice_mut().expect(on_gpu);
    gemm_nt(blas, (s.m, N, K), x, w0, y, 1.0, 0.0);
    for seg in s.segments.iter_mut() {
        let len = seg.end - seg.begin;
        let xs = x.slice(seg.begin * K..seg.end * K);
        let a = seg.a.as_cuda_slice().expect(on_gpu);
        let t = seg.t.as_cuda_slice_mut().expect(on_gpu);
        gemm_nt(blas, (len, seg.rank, K), &xs, a, t, 1.0, 0.0);
        let b = seg.b.as_cuda_slice().expect(on_gpu);
        let t = seg.t.as_cuda_slice().expect(on_gpu);
        let mut ys = y.slice_mut(seg.begin * N..seg.end * N);
        gemm_nt(blas, (len, N, seg.rank), t, b, &mut ys, seg.scale, 1.0);
    }
}
