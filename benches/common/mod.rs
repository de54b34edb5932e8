//! Shared by `benches/lora.rs` (criterion) and `examples/perf_table.rs` (the markdown table): the
//! benchmark cases, input sets rotated so that they do not fit in L2, and the cuBLAS baselines
//! (cudarc's `Gemm<bf16>`: bf16 in and out, f32 compute) for row-major tensors.
#![allow(dead_code)]

pub mod measure;
pub mod multi;

use std::sync::Arc;

use lora_kernels::cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use lora_kernels::cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use lora_kernels::cudarc::driver::CudaSlice;
use lora_kernels::ops::{DoraSaved, Workspace};
use lora_kernels::{Device, Result, Tensor, bf16, ops};

/// M tokens, N out, K in, r rank.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

/// The FLOPs each benchmarked op does on a case: the perf table's rooflines and criterion's throughput.
impl Case {
    fn mnkr(self) -> (u64, u64, u64, u64) {
        (self.m as u64, self.n as u64, self.k as u64, self.r as u64)
    }

    /// The frozen GEMM Y = X·W0ᵀ: full fine-tuning's forward.
    pub fn gemm_flops(self) -> u64 {
        let (m, n, k, _) = self.mnkr();
        2 * m * n * k
    }

    /// The LoRA forward: the frozen GEMM and the low-rank products T = X·Aᵀ and T·Bᵀ.
    pub fn forward_flops(self) -> u64 {
        let (m, n, k, r) = self.mnkr();
        self.gemm_flops() + 2 * m * r * (n + k)
    }

    /// Full fine-tuning's backward: dX = dY·W0 and dW = dYᵀ·X.
    pub fn full_backward_flops(self) -> u64 {
        2 * self.gemm_flops()
    }

    /// The LoRA backward: dX = dY·W0 + s·U·A with U = dY·B, dB = s·dYᵀ·T, dA = s·Uᵀ·X.
    pub fn backward_flops(self) -> u64 {
        let (m, n, k, r) = self.mnkr();
        self.gemm_flops() + 4 * m * r * (n + k)
    }
}

/// The grid: M in {16, 2048, 8192}, (N, K) in three Llama-7B-like pairs, r in {8, 16, 64}; plus
/// M = 256 and 1536 at N = K = 4096, r = 16, where the sm_90a GEMM takes its 128×128 tiles
/// (`ops::sm90_tile`; at M = 256 the mma.sync GEMM takes its 128×64 ones, `ops::mma_tile`).
/// `LK_BENCH_QUICK=1` keeps the headline case (M = 8192, N = K = 4096, r = 16) and the same at M = 16 and
/// M = 256.
pub fn cases() -> Vec<Case> {
    let square = |m| Case {
        m,
        n: 4096,
        k: 4096,
        r: 16,
    };
    if std::env::var("LK_BENCH_QUICK").as_deref() == Ok("1") {
        return vec![square(8192), square(256), square(16)];
    }
    let mut v = Vec::new();
    for m in [16, 2048, 8192] {
        for (n, k) in [(4096, 4096), (11008, 4096), (4096, 11008)] {
            for r in [8, 16, 64] {
                v.push(Case { m, n, k, r });
            }
        }
    }
    v.extend([square(256), square(1536)]);
    v
}

/// The tensors of a [`Set`] by name, so that the baselines can be written down as data
/// ([`RowMajorGemm`]) and checked on the CPU (tests/bench_baselines.rs) as well as run by cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buf {
    X,
    W0,
    A,
    B,
    T,
    Y,
    Dy,
    Dx,
    Dw,
    /// U = dY·B (M×r), the unfused backward's intermediate.
    U,
    Da,
    Db,
}

/// Row-major shape of `buf` in case `c`.
pub fn shape(c: Case, buf: Buf) -> [usize; 2] {
    match buf {
        Buf::X | Buf::Dx => [c.m, c.k],
        Buf::W0 | Buf::Dw => [c.n, c.k],
        Buf::A => [c.r, c.k],
        Buf::B => [c.n, c.r],
        Buf::T | Buf::U => [c.m, c.r],
        Buf::Y | Buf::Dy => [c.m, c.n],
        Buf::Da => [c.r, c.k],
        Buf::Db => [c.n, c.r],
    }
}

/// Merge does not depend on M: it is measured once per (N, K, r), at the first case that has them
/// (so the quick run, which has no M = 2048 case, still measures it).
pub fn measures_merge(cases: &[Case], index: usize) -> bool {
    let c = cases[index];
    !cases[..index]
        .iter()
        .any(|p| (p.n, p.k, p.r) == (c.n, c.k, c.r))
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
    /// The unfused backward's U = dY·B.
    pub u: Tensor<bf16>,
    /// Our ops' scratch memory, kept between calls as a training loop keeps it.
    pub ws: Workspace<bf16>,
    /// A DoRA magnitude vector (N, f32) for the DoRA rows.
    pub magnitude: Tensor<f32>,
    /// The DoRA forward's saved T, Z, norms and factors, and the magnitude's gradient.
    pub dora: DoraSaved<bf16>,
    pub dmagnitude: Tensor<f32>,
}

impl Set {
    /// cuBLAS's two inputs and its output, by name (distinct from the inputs).
    fn operands(
        &mut self,
        first: Buf,
        second: Buf,
        out: Buf,
    ) -> (&CudaSlice<bf16>, &CudaSlice<bf16>, &mut CudaSlice<bf16>) {
        assert!(
            out != first && out != second,
            "a GEMM's output is one of its inputs"
        );
        let Set {
            x,
            w0,
            a,
            b,
            dy,
            y,
            t,
            dx,
            dw,
            u,
            da,
            db,
            ws: _,
            magnitude: _,
            dora: _,
            dmagnitude: _,
        } = self;
        let named: [(Buf, &mut Tensor<bf16>); 12] = [
            (Buf::X, x),
            (Buf::W0, w0),
            (Buf::A, a),
            (Buf::B, b),
            (Buf::Dy, dy),
            (Buf::Y, y),
            (Buf::T, t),
            (Buf::Dx, dx),
            (Buf::Dw, dw),
            (Buf::U, u),
            (Buf::Da, da),
            (Buf::Db, db),
        ];
        let (mut f, mut s, mut o) = (None, None, None);
        for (name, tensor) in named {
            if name == out {
                o = tensor.as_cuda_slice_mut();
            } else {
                let tensor: &Tensor<bf16> = tensor;
                if name == first {
                    f = tensor.as_cuda_slice();
                }
                if name == second {
                    s = tensor.as_cuda_slice();
                }
            }
        }
        let on_gpu = "benchmarks run on a CUDA device";
        (f.expect(on_gpu), s.expect(on_gpu), o.expect(on_gpu))
    }
}

/// A tensor of `shape` with values uniform in ±amp (an LCG: reproducible, no dependency).
pub fn random(dev: &Device, shape: [usize; 2], amp: f32, seed: u64) -> Result<Tensor<bf16>> {
    let mut s = seed;
    let v: Vec<bf16> = (0..shape.iter().product::<usize>())
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp)
        })
        .collect();
    Tensor::from_slice(dev, &v, &shape)
}

/// The device's L2 size in bytes as the driver reports it (None on the emulator or when it cannot be read).
pub fn l2_attribute(dev: &Device) -> Option<u64> {
    use lora_kernels::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE;
    let cuda = dev.as_cuda()?;
    let bytes = cuda
        .context()
        .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .ok()?;
    u64::try_from(bytes).ok()
}

/// The device's L2 size in bytes (`l2_attribute`; 60 MiB, an H200's, where it cannot be read).
pub fn l2_bytes(dev: &Device) -> u64 {
    l2_attribute(dev).filter(|&b| b > 0).unwrap_or(60 << 20)
}

/// Input sets, enough of them that one round through all exceeds 2 × L2 (so no set is served from
/// L2 when its turn comes): at least 2.
pub fn sets(dev: &Device, c: Case) -> Result<Vec<Set>> {
    let bytes = 2 * (c.m * c.k + c.n * c.k + c.m * c.n) as u64;
    let count = (2 * l2_bytes(dev)).div_ceil(bytes).clamp(2, 8) as usize;
    (0..count).map(|i| set(dev, c, i)).collect()
}

/// Input set number `i` of case `c` (its random inputs depend on `i` only).
pub fn set(dev: &Device, c: Case, i: usize) -> Result<Set> {
    let zeros = |b: Buf| Tensor::zeros(dev, &shape(c, b));
    let s = 17 * i as u64 + 1;
    let kk = 1.0 / (c.k as f32).sqrt();
    Ok(Set {
        x: random(dev, shape(c, Buf::X), 1.0, s)?,
        w0: random(dev, shape(c, Buf::W0), kk, s + 1)?,
        a: random(dev, shape(c, Buf::A), kk, s + 2)?,
        b: random(dev, shape(c, Buf::B), 0.1, s + 3)?,
        dy: random(dev, shape(c, Buf::Dy), 1.0, s + 4)?,
        y: zeros(Buf::Y)?,
        t: zeros(Buf::T)?,
        dx: zeros(Buf::Dx)?,
        da: zeros(Buf::Da)?,
        db: zeros(Buf::Db)?,
        dw: zeros(Buf::Dw)?,
        u: zeros(Buf::U)?,
        ws: Workspace::new(),
        magnitude: Tensor::from_slice(dev, &vec![1.0f32; c.n], &[c.n])?,
        dora: DoraSaved {
            t: zeros(Buf::T)?,
            z: zeros(Buf::Y)?,
            norm: Tensor::zeros(dev, &[c.n])?,
            factor: Tensor::zeros(dev, &[c.n])?,
        },
        dmagnitude: Tensor::zeros(dev, &[c.n])?,
    })
}

/// One GEMM on row-major tensors: C (m×n) = alpha·op(A)·op(B) + beta·C, where A is stored m×k (k×m
/// when `ta`) and B is stored k×n (n×k when `tb`).
#[derive(Clone, Copy, Debug)]
pub struct RowMajorGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Buf,
    pub ta: bool,
    pub b: Buf,
    pub tb: bool,
    pub c: Buf,
    pub alpha: f32,
    pub beta: f32,
}

/// cuBLAS's column-major arguments for a [`RowMajorGemm`]. A row-major matrix read column-major is
/// its transpose, so cuBLAS computes Cᵀ (n×m) = op(B)ᵀ·op(A)ᵀ: its FIRST operand is our B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnMajorArgs {
    /// cuBLAS `transa`, `transb`: whether the first (our B) and second (our A) operands are transposed.
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
}

pub fn column_major(g: &RowMajorGemm) -> ColumnMajorArgs {
    ColumnMajorArgs {
        trans_first: g.tb,
        trans_second: g.ta,
        m: g.n,
        n: g.m,
        k: g.k,
        // The row length of each stored row-major operand.
        ld_first: if g.tb { g.k } else { g.n },
        ld_second: if g.ta { g.m } else { g.k },
        ldc: g.n,
    }
}

/// Runs `gemms` with cuBLAS (cudarc's `Gemm<bf16>`: bf16 in and out, f32 compute) on `s`.
pub fn run_cublas(blas: &CudaBlas, s: &mut Set, gemms: &[RowMajorGemm]) {
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    for g in gemms {
        let cm = column_major(g);
        let cfg = GemmConfig {
            transa: op(cm.trans_first),
            transb: op(cm.trans_second),
            m: cm.m as i32,
            n: cm.n as i32,
            k: cm.k as i32,
            alpha: bf16::from_f32(g.alpha),
            lda: cm.ld_first as i32,
            ldb: cm.ld_second as i32,
            beta: bf16::from_f32(g.beta),
            ldc: cm.ldc as i32,
        };
        let (first, second, out) = s.operands(g.b, g.a, g.c);
        // SAFETY: `column_major` maps the row-major shapes of `shape(case, buf)`, the shapes every Set
        // tensor was allocated with, to cuBLAS's sizes and leading dimensions; tests/bench_baselines.rs
        // checks on a CPU model of cuBLAS that every baseline reads and writes inside those buffers.
        unsafe { blas.gemm(cfg, first, second, out) }.expect("cuBLAS gemm");
    }
}

/// The frozen path's forward GEMM, Y = X·W0ᵀ (beta 0: it starts Y).
fn frozen_forward(c: Case) -> RowMajorGemm {
    gemm(
        (c.m, c.n, c.k),
        Buf::X,
        false,
        Buf::W0,
        true,
        Buf::Y,
        1.0,
        0.0,
    )
}

/// The frozen path's backward GEMM, dX = dY·W0 (beta 0: it starts dX).
fn frozen_dx(c: Case) -> RowMajorGemm {
    gemm(
        (c.m, c.k, c.n),
        Buf::Dy,
        false,
        Buf::W0,
        false,
        Buf::Dx,
        1.0,
        0.0,
    )
}

/// Baseline: the bare GEMM Y = X·W0ᵀ (what full fine-tuning's forward costs).
pub fn bare_forward_gemms(c: Case) -> Vec<RowMajorGemm> {
    vec![frozen_forward(c)]
}

// The lists below are tables, one GEMM per line: (m, n, k), A, ta, B, tb, C, alpha, beta.

/// Baseline: the unfused LoRA forward as PEFT runs it, three GEMMs: Y = X·W0ᵀ, T = X·Aᵀ, then
/// Y += s·T·Bᵀ (the scale and the add folded into the third GEMM's alpha and beta, kinder to the
/// baseline than PEFT's separate elementwise kernels).
#[rustfmt::skip]
pub fn unfused_forward_gemms(c: Case, scale: f32) -> Vec<RowMajorGemm> {
    vec![
        frozen_forward(c),
        gemm((c.m, c.r, c.k), Buf::X, false, Buf::A, true, Buf::T, 1.0, 0.0),
        gemm((c.m, c.n, c.r), Buf::T, false, Buf::B, true, Buf::Y, scale, 1.0),
    ]
}

/// Baseline: full fine-tuning's backward, dX = dY·W0 and dW = dYᵀ·X.
#[rustfmt::skip]
pub fn full_backward_gemms(c: Case) -> Vec<RowMajorGemm> {
    vec![
        frozen_dx(c),
        gemm((c.n, c.k, c.m), Buf::Dy, true, Buf::X, false, Buf::Dw, 1.0, 0.0),
    ]
}

/// Baseline: the unfused LoRA backward as autograd runs PEFT's layer, five GEMMs: dB = s·dYᵀ·T,
/// U = dY·B, dA = s·Uᵀ·X, dX = dY·W0, dX += s·U·A. Also the reference our dX, dA, dB are checked
/// against on the GPU.
#[rustfmt::skip]
pub fn unfused_backward_gemms(c: Case, scale: f32) -> Vec<RowMajorGemm> {
    vec![
        gemm((c.n, c.r, c.m), Buf::Dy, true, Buf::T, false, Buf::Db, scale, 0.0),
        gemm((c.m, c.r, c.n), Buf::Dy, false, Buf::B, false, Buf::U, 1.0, 0.0),
        gemm((c.r, c.k, c.m), Buf::U, true, Buf::X, false, Buf::Da, scale, 0.0),
        frozen_dx(c),
        gemm((c.m, c.k, c.r), Buf::U, false, Buf::A, false, Buf::Dx, scale, 1.0),
    ]
}

/// The GEMM of a cuBLAS merge, run on a copy of W0 in the dW buffer: dW = W0 + s·B·A. The reference
/// our in-place merge is checked against on the GPU.
#[rustfmt::skip]
pub fn merge_gemms(c: Case, scale: f32) -> Vec<RowMajorGemm> {
    vec![gemm((c.n, c.k, c.r), Buf::B, false, Buf::A, false, Buf::Dw, scale, 1.0)]
}

#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    a: Buf,
    ta: bool,
    b: Buf,
    tb: bool,
    c: Buf,
    alpha: f32,
    beta: f32,
) -> RowMajorGemm {
    RowMajorGemm {
        m,
        n,
        k,
        a,
        ta,
        b,
        tb,
        c,
        alpha,
        beta,
    }
}

/// A cuBLAS handle on the device's stream, or why there is none. cudarc loads libcublas at run time
/// by name (`libcublas.so`, `libcublas.so.13`), so a cuBLAS that only lives in a Python package must be
/// put on `LD_LIBRARY_PATH` (scripts/gpu-env.sh does that; scripts/gpu-check.sh sources it).
pub fn blas(dev: &Device) -> std::result::Result<Arc<CudaBlas>, String> {
    let cuda = dev.as_cuda().ok_or("the baselines need a CUDA device")?;
    // SAFETY: only tries to dlopen the cuBLAS library.
    if !unsafe { lora_kernels::cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "no cuBLAS library (libcublas.so / libcublas.so.13) on the loader path; \
                    add its directory to LD_LIBRARY_PATH"
                .into(),
        );
    }
    CudaBlas::new(cuda.stream().clone())
        .map(Arc::new)
        .map_err(|e| format!("creating a cuBLAS handle: {e}"))
}

/// The cuBLAS library the baselines ran on, as text ("cuBLAS 130001"; cuBLAS's own version number:
/// major·10000 + minor·100 + patch), so a record says which one it was.
pub fn blas_version(blas: &CudaBlas) -> String {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: `blas.handle()` is a live handle; cublasGetVersion_v2 writes one int through `v`.
    let status =
        unsafe { lora_kernels::cudarc::cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut v) };
    match status {
        lora_kernels::cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {
            format!("cuBLAS {v}")
        }
        e => format!("cuBLAS version unknown ({e:?})"),
    }
}

/// Our fused forward (the T projection + fused GEMM, or small-M) into the set's y and t.
pub fn ours_forward(s: &mut Set, scale: f32) {
    try_forward(s, scale).unwrap();
}

/// `ours_forward`, its error returned (a launch choice forced by the environment that this GPU, build
/// or shape cannot take).
pub fn try_forward(s: &mut Set, scale: f32) -> lora_kernels::Result<()> {
    ops::lora_forward_into(
        &s.x,
        &s.w0,
        &s.a,
        &s.b,
        None,
        scale,
        lora_kernels::Dropout::NONE,
        &mut s.y,
        &mut s.t,
        &mut s.ws,
    )
}

/// Runs `f` with `LK_FUSED_GEMM` set to `value` (the rows of the sm_90a GEMM: `sm90`), then unset again
/// (the default, the mma.sync kernel).
pub fn with_fused_gemm<R>(value: &str, f: impl FnOnce() -> R) -> R {
    with_env("LK_FUSED_GEMM", value, f)
}

/// `f` with the environment variable `name` set to `value`, then as it was before (unset, or the value
/// the user gave): the launch choices the ops read at run time (`LK_FUSED_GEMM`, `LK_MMA_TILE`).
pub fn with_env<R>(name: &str, value: &str, f: impl FnOnce() -> R) -> R {
    let before = std::env::var_os(name);
    // SAFETY: the benchmarks run on one thread, and nothing else reads the environment meanwhile.
    unsafe { std::env::set_var(name, value) };
    let out = f();
    // SAFETY: as above.
    unsafe {
        match before {
            Some(v) => std::env::set_var(name, v),
            None => std::env::remove_var(name),
        }
    }
    out
}

/// The launch choices set in the environment (`LK_FUSED_GEMM`, `LK_MMA_TILE`), as text for a header:
/// the "default" rows take them.
pub fn launch_choices_from_env() -> String {
    let set: Vec<String> = ["LK_FUSED_GEMM", "LK_MMA_TILE", "LK_PDL"]
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|x| format!("{v}={x}")))
        .collect();
    if set.is_empty() {
        "launch choices: the defaults".into()
    } else {
        format!(
            "launch choices from the environment (the default rows take them): {}",
            set.join(", ")
        )
    }
}

/// Whether this GPU and build run the sm_90a GEMM on this set (a forced forward and backward succeed),
/// or why not: the sm_90a rows are benchmarked only then.
pub fn sm90_runs(s: &mut Set, scale: f32) -> std::result::Result<(), String> {
    let dev = s.x.device();
    if dev.compute_capability() != 90 {
        return Err(format!("{} is not sm_90", dev.describe()));
    }
    with_fused_gemm("sm90", || {
        try_forward(s, scale)?;
        try_backward(s, scale)
    })
    .map_err(|e| e.to_string())
}

/// Our backward: dA, dB and dX.
pub fn ours_backward(s: &mut Set, scale: f32) {
    try_backward(s, scale).unwrap();
}

/// `ours_backward`, its error returned.
pub fn try_backward(s: &mut Set, scale: f32) -> lora_kernels::Result<()> {
    ops::lora_backward_into(
        &s.x,
        &s.w0,
        &s.a,
        &s.b,
        &s.t,
        &s.dy,
        scale,
        lora_kernels::Dropout::NONE,
        Some(&mut s.dx),
        &mut s.da,
        &mut s.db,
        ops::GradMode::Overwrite,
        &mut s.ws,
    )
}

/// Our in-place merge.
pub fn ours_merge(s: &mut Set, scale: f32) {
    ops::merge(&mut s.w0, &s.a, &s.b, scale).unwrap();
}

/// Ours: the in-place DoRA merge (three launches; its scratch and factors allocated per call).
pub fn ours_dora_merge(s: &mut Set, scale: f32) {
    ops::dora_merge(&mut s.w0, &s.a, &s.b, &s.magnitude, scale).unwrap();
}

/// Our DoRA forward (ops::dora_forward_into: the norm pass, the LoRA forward, the column scale; with
/// LoRA dropout also the residual pass and the GEMM of W0 on it).
pub fn ours_dora_forward(s: &mut Set, scale: f32, dropout: lora_kernels::Dropout) {
    ops::dora_forward_into(
        &s.x,
        &s.w0,
        &s.a,
        &s.b,
        &s.magnitude,
        None,
        scale,
        dropout,
        &mut s.y,
        &mut s.dora,
        &mut s.ws,
    )
    .unwrap();
}

/// Our DoRA backward (ops::dora_backward_into: dZ and the magnitude's gradient, then the LoRA backward;
/// with LoRA dropout also the GEMM of W0 for dX's residual term).
pub fn ours_dora_backward(s: &mut Set, scale: f32, dropout: lora_kernels::Dropout) {
    ops::dora_backward_into(
        &s.x,
        &s.w0,
        &s.a,
        &s.b,
        &s.dora,
        &s.dy,
        scale,
        dropout,
        Some(&mut s.dx),
        &mut s.da,
        &mut s.db,
        &mut s.dmagnitude,
        ops::GradMode::Overwrite,
        &mut s.ws,
    )
    .unwrap();
}

/// Baseline: the bare cuBLAS GEMM (full fine-tune forward).
pub fn cublas_forward(blas: &CudaBlas, s: &mut Set, c: Case) {
    run_cublas(blas, s, &bare_forward_gemms(c));
}

/// Baseline: the unfused three-GEMM LoRA forward.
pub fn cublas_unfused(blas: &CudaBlas, s: &mut Set, c: Case, scale: f32) {
    run_cublas(blas, s, &unfused_forward_gemms(c, scale));
}

/// Baseline: full fine-tuning's backward (dX and dW).
pub fn cublas_full_backward(blas: &CudaBlas, s: &mut Set, c: Case) {
    run_cublas(blas, s, &full_backward_gemms(c));
}

/// Baseline: the unfused LoRA backward (dB, U, dA, dX).
pub fn cublas_unfused_backward(blas: &CudaBlas, s: &mut Set, c: Case, scale: f32) {
    run_cublas(blas, s, &unfused_backward_gemms(c, scale));
}

/// Baseline for merge: a device-to-device copy of W0 (one read, one write).
pub fn copy_w0(dev: &Device, s: &mut Set) {
    let stream = dev.as_cuda().unwrap().stream();
    let src = s.w0.as_cuda_slice().unwrap();
    stream
        .memcpy_dtod(src, s.dw.as_cuda_slice_mut().unwrap())
        .expect("copy");
}
