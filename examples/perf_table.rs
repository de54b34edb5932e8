//! Runs the benchmark cases and prints ONE markdown table: time of our kernels, our ratio to each cuBLAS
//! baseline measured in the same run, % of a roofline built from peaks measured in the same run (a large
//! cuBLAS bf16 GEMM for FLOP/s, a large device-to-device copy for bytes/s; the rate L2 feeds the SMs is
//! measured and printed beside them, for the sm_90a GEMM's bound), and a check that ours computed what
//! cuBLAS computed. Then the device memory one training step of the headline layer adds, LoRA vs full
//! fine-tuning, measured (free memory before and after) next to `memory::LayerStep`. Needs a GPU;
//! without one it says so and exits 0.
//!
//! How a row is measured (benches/common/measure.rs): ours and its baselines timed together, each warmed
//! up by time, then in interleaved rounds (batches of calls with no synchronize between them); the times
//! are medians over the rounds, the ratio the median of the per-round ratios with their range beside it.
//! The check: each output of ours (written over NaN) against cuBLAS's, tensor by tensor (forward: Y and
//! T; backward: dX, dA, dB; merge: the update W0 gained), the largest relative difference shown,
//! `MISMATCH` above 2e-2 or NaN. DoRA's unmerged layer (`ops::dora_forward`, `dora_backward`) has rows
//! against the bare GEMM (cuBLAS's dX + dW) and against our plain LoRA op in the same rounds; its check
//! is against our plain op (Z = the plain Y, Y = factor·Z; dX, dA, dB = the plain backward of
//! factor·dY) and the magnitude's gradient against Σ dY·Z / norm on the host.
//!
//! First the rows of the default launch choices (the single-adapter cases, then the many-adapter ones);
//! then, after all of them, the same ops under the other launch choices against the same baselines
//! (timed again with them): where the device launches with programmatic dependent launch (an H100 or
//! H200: `Device::programmatic_launch`), the forward (and at M > 16 the backward) with ordinary launches
//! (`LK_PDL=0`: what it gains); on an sm_90 GPU the sm_90a GEMM (`LK_FUSED_GEMM=sm90`, opt-in; T, or U
//! in dX, inside the GEMM at r ≤ 32) and with T and U from their own launches
//! (`LK_FUSED_GEMM=sm90-projection`); where the mma.sync GEMM takes its 128×64 tiles (`ops::mma_tile`: M
//! of a few hundred rows), its 128×128 ones (`LK_MMA_TILE=128`, which also puts the projection T = X·Aᵀ,
//! narrow at every M, on them). They come last so that a kernel that faults there (the CUDA context is
//! then lost) cannot take the default rows with it. Last, the M ≤ 16 forwards replayed from a captured
//! graph (`Device::capture`) against the same forward launched op by op: the kernels' time without the
//! host's per-launch work.
//!
//! `cargo run --release --example perf_table` (`LK_BENCH_QUICK=1`: the headline cases and M = 256). Results
//! from GPU runs are kept in docs/perf/ with device, driver, date and commit.

#[path = "../benches/common/mod.rs"]
mod common;

use common::measure::{self, Samples, compare};
use common::{Buf, Case, Set};
use lora_kernels::cudarc::cublas::CudaBlas;
use lora_kernels::memory::{LayerStep, human};
use lora_kernels::{Device, Dropout, Tensor, bf16, ops};

const SCALE: f32 = 2.0;
const TIMING: (f64, f64) = (measure::WARM_UP_S, measure::BATCH_S);

/// The M ≤ 16 forwards replayed from a captured graph (`Device::capture`: one host call per forward, no
/// per-launch host work) against the same forward launched op by op, on a device of its own (a stream of
/// its own and cudarc's event tracking off, which a capture needs; the same GPU), each set's replay first
/// checked bit for bit against its eager forward.
fn graph_rows(cases: &[Case], roof: Roof) {
    let dev = match capturable_device() {
        Ok(d) => d,
        Err(e) => {
            println!("\ngraph replay rows skipped: {e}");
            return;
        }
    };
    for &c in cases.iter().filter(|c| c.m <= 16) {
        let mut sets = common::sets(&dev, c).unwrap();
        let mut graphs = Vec::with_capacity(sets.len());
        let mut chk = "replay = eager, bit for bit".to_string();
        for s in sets.iter_mut() {
            common::ours_forward(s, SCALE); // loads the kernels and fills the workspace
            let eager = (host(&s.y), host(&s.t));
            poison(&mut [&mut s.y, &mut s.t]);
            let graph = dev.capture(|| common::try_forward(s, SCALE)).unwrap();
            graph.replay().unwrap();
            if !same_bits(&host(&s.y), &eager.0) || !same_bits(&host(&s.t), &eager.1) {
                chk = "MISMATCH: a replay differs from the eager forward".into();
            }
            graphs.push(graph);
        }
        let ns = sets.len();
        let t = measure::time_together(
            &dev,
            2,
            &mut |j, i| match j {
                0 => graphs[i % ns].replay().unwrap(),
                _ => common::ours_forward(&mut sets[i % ns], SCALE),
            },
            TIMING,
        );
        row(
            ("forward (small-M), graph replay", dims(c)),
            &t[0],
            ("ours, launched op by op", &t[1]),
            forward_roofline(roof, c),
            &chk,
        );
    }
}

/// GPU 0 on a stream of its own in a context whose cudarc event tracking is off.
fn capturable_device() -> Result<Device, String> {
    let ctx = lora_kernels::cudarc::driver::CudaContext::new(0).map_err(|e| e.to_string())?;
    // SAFETY: this device's tensors are made and used on its one stream only.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(|e| e.to_string())?;
    Device::from_cuda_stream(stream).map_err(|e| e.to_string())
}

fn same_bits(a: &[bf16], b: &[bf16]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The rate L2 feeds the SMs (src/probe.rs): a buffer of a third of L2 (at most 16 MiB), read ~4 GiB's
/// worth per launch (at least 32 passes) by 8 blocks of 256 threads per SM with 16-byte loads cached in
/// L2 only, every thread's sum checked against the CPU; as text for the peaks line (bound.md's "L2 to SM"
/// column is the rate the sm_90a GEMM needs).
fn l2_read_rate(dev: &Device) -> String {
    use lora_kernels::probe::{l2_read, l2_read_reference};
    let (Some(l2_bytes), Ok(sms)) = (common::l2_attribute(dev), dev.sm_count()) else {
        return "L2 read not measured (no L2 size or SM count)".into();
    };
    let words = ((l2_bytes as usize / 3).min(16 << 20) / 16).max(1) * 4;
    // ~4 GiB per launch (about a millisecond), so launch gaps and the first pass (from device memory)
    // are a small share of the time
    let passes = ((4usize << 30) / (words * 4)).clamp(32, 1 << 20) as u32;
    let threads = 8 * 256 * sms as usize;
    let data: Vec<u32> = (0..words as u32)
        .map(|i| i.wrapping_mul(2654435761))
        .collect();
    let src = Tensor::from_slice(dev, &data, &[words]).unwrap();
    let mut sums = Tensor::<u32>::zeros(dev, &[threads]).unwrap();
    let t = measure::time_together(
        dev,
        1,
        &mut |_, _| l2_read(&src, passes, &mut sums).unwrap(),
        TIMING,
    )[0]
    .median();
    let ok = sums.to_vec().unwrap() == l2_read_reference(&data, passes, threads);
    format!(
        "L2 read {:.0} GB/s ({} MiB of {} MiB of L2 read {passes} times, each pass spread over all SMs{})",
        (words * 4) as f64 * passes as f64 / t / 1e9,
        (words * 4) >> 20,
        l2_bytes >> 20,
        if ok {
            ""
        } else {
            "; MISMATCH: wrong sums, the rate means nothing"
        }
    )
}

fn host(t: &Tensor<bf16>) -> Vec<bf16> {
    t.to_vec().unwrap()
}

/// NaN in every element of `tensors`, so that what a run leaves unwritten shows in the check.
fn poison(tensors: &mut [&mut Tensor<bf16>]) {
    for t in tensors {
        t.poison().unwrap();
    }
}

/// Our forward vs cuBLAS's unfused LoRA forward on `s`: Y and T.
fn check_forward(blas: &CudaBlas, s: &mut Set, c: Case) -> String {
    poison(&mut [&mut s.y, &mut s.t]);
    common::ours_forward(s, SCALE);
    let (y, t) = (host(&s.y), host(&s.t));
    poison(&mut [&mut s.y, &mut s.t]);
    common::cublas_unfused(blas, s, c, SCALE);
    compare(&[("Y", &y, &host(&s.y), c.n), ("T", &t, &host(&s.t), c.r)])
}

/// Our dX, dA, dB vs cuBLAS's unfused LoRA backward on `s` (both from our forward's T, which
/// `check_forward` compares with cuBLAS's).
fn check_backward(blas: &CudaBlas, s: &mut Set, c: Case) -> String {
    common::ours_forward(s, SCALE);
    poison(&mut [&mut s.dx, &mut s.da, &mut s.db]);
    common::ours_backward(s, SCALE);
    let (dx, da, db) = (host(&s.dx), host(&s.da), host(&s.db));
    poison(&mut [&mut s.dx, &mut s.da, &mut s.db, &mut s.u]);
    common::cublas_unfused_backward(blas, s, c, SCALE);
    compare(&[
        ("dX", &dx, &host(&s.dx), c.k),
        ("dA", &da, &host(&s.da), c.k),
        ("dB", &db, &host(&s.db), c.r),
    ])
}

/// Our DoRA forward vs our plain forward on `s`: Z (the DoRA forward's pre-scale output) must be the
/// plain forward's Y, and the DoRA Y `round(fma(factor, Z, 0))` of its own Z and factors.
fn check_dora_forward(s: &mut Set, c: Case) -> String {
    common::ours_forward(s, SCALE);
    let plain = host(&s.y);
    poison(&mut [&mut s.y, &mut s.dora.z, &mut s.dora.t]);
    common::ours_dora_forward(s, SCALE, Dropout::NONE);
    let (y, z) = (host(&s.y), host(&s.dora.z));
    let f = s.dora.factor.to_vec().unwrap();
    let want: Vec<bf16> = z
        .iter()
        .enumerate()
        .map(|(e, z)| bf16::from_f32(f[e % c.n] * z.to_f32()))
        .collect();
    compare(&[("Z", &z, &plain, c.n), ("Y", &y, &want, c.n)])
}

/// Our DoRA backward vs our plain backward of dZ = round(factor·dY) (dX, dA, dB: the same kernels on the
/// same operands), and the magnitude's gradient vs Σ dY·Z / norm in f64 on the host.
fn check_dora_backward(s: &mut Set, c: Case) -> String {
    common::ours_dora_forward(s, SCALE, Dropout::NONE);
    poison(&mut [&mut s.dx, &mut s.da, &mut s.db]);
    common::ours_dora_backward(s, SCALE, Dropout::NONE);
    let (dx, da, db) = (host(&s.dx), host(&s.da), host(&s.db));
    let dm = s.dmagnitude.to_vec().unwrap();
    let (dy, z) = (host(&s.dy), host(&s.dora.z));
    let (f, norm) = (
        s.dora.factor.to_vec().unwrap(),
        s.dora.norm.to_vec().unwrap(),
    );
    let dz: Vec<bf16> = dy
        .iter()
        .enumerate()
        .map(|(e, g)| bf16::from_f32(f[e % c.n] * g.to_f32()))
        .collect();
    // the plain backward of dZ, with the DoRA forward's T (the plain forward's)
    let dy_saved = std::mem::replace(
        &mut s.dy,
        Tensor::from_slice(s.x.device(), &dz, &[c.m, c.n]).unwrap(),
    );
    common::ours_forward(s, SCALE);
    poison(&mut [&mut s.dx, &mut s.da, &mut s.db]);
    common::ours_backward(s, SCALE);
    s.dy = dy_saved;
    let mut want_dm = vec![0.0f64; c.n];
    for (e, (g, z)) in dy.iter().zip(&z).enumerate() {
        want_dm[e % c.n] += g.to_f64() * z.to_f64();
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for ((got, want), norm) in dm.iter().zip(&want_dm).zip(&norm) {
        let want = want / *norm as f64;
        num += (*got as f64 - want).powi(2);
        den += want * want;
    }
    let dm_err = (num / den).sqrt();
    let grads = compare(&[
        ("dX", &dx, &host(&s.dx), c.k),
        ("dA", &da, &host(&s.da), c.k),
        ("dB", &db, &host(&s.db), c.r),
    ]);
    if dm_err.is_nan() || dm_err > 1e-3 {
        format!("MISMATCH dm {dm_err:.1e}; {grads}")
    } else {
        format!("{grads}; dm {dm_err:.1e}")
    }
}

/// Our in-place merge vs a copy of W0 plus cuBLAS's s·B·A, compared on the update each made (W0 after
/// minus W0 before): on the whole matrix, rows ours left unmerged would pass on W0's size.
fn check_merge(dev: &Device, blas: &CudaBlas, s: &mut Set, c: Case) -> String {
    let before = host(&s.w0);
    poison(&mut [&mut s.dw]);
    common::copy_w0(dev, s);
    common::run_cublas(blas, s, &common::merge_gemms(c, SCALE));
    common::ours_merge(s, SCALE);
    let update = |after: Vec<bf16>| -> Vec<bf16> {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| bf16::from_f64(a.to_f64() - b.to_f64()))
            .collect()
    };
    let (ours, reference) = (update(host(&s.w0)), update(host(&s.dw)));
    compare(&[("s·B·A", &ours, &reference, c.k)])
}

/// The peaks line's roofline: the time `flops` and `bytes` need at the measured peaks.
#[derive(Clone, Copy)]
struct Roof {
    flops: f64,
    bytes: f64,
}

impl Roof {
    fn time(&self, flops: f64, bytes: f64) -> f64 {
        (flops / self.flops).max(bytes / self.bytes)
    }
}

/// One table row: `ours` against `baseline` (timed in the same rounds), `roofline` seconds.
fn row(
    (op, dims): (&str, String),
    ours: &Samples,
    (base, baseline): (&str, &Samples),
    roofline: f64,
    chk: &str,
) {
    let (ratio, lo, hi) = ours.ratio_to(baseline);
    println!(
        "| {op} | {dims} | {:.1} | {base} | {:.1} | {ratio:.3} ({lo:.3}–{hi:.3}) | {:.0} % | {chk} |",
        ours.median() * 1e6,
        baseline.median() * 1e6,
        100.0 * roofline / ours.median()
    );
}

/// The M | N | K | r cells of case `c`.
fn dims(c: Case) -> String {
    format!("{} | {} | {} | {}", c.m, c.n, c.k, c.r)
}

/// The forward's flops and least bytes (X, W0, Y once; A, B, T negligible).
fn forward_roofline(roof: Roof, c: Case) -> f64 {
    let (m, n, k) = (c.m as f64, c.n as f64, c.k as f64);
    roof.time(c.forward_flops() as f64, 2.0 * (m * k + n * k + m * n))
}

/// The backward's flops (`Case::backward_flops`) and least bytes (dY, W0, X read once, dX written once).
fn backward_roofline(roof: Roof, c: Case) -> f64 {
    let (m, n, k) = (c.m as f64, c.n as f64, c.k as f64);
    roof.time(
        c.backward_flops() as f64,
        2.0 * (m * n + n * k + 2.0 * m * k),
    )
}

/// What a row times on a [`Set`]: ours or a baseline.
#[derive(Clone, Copy)]
enum Run {
    Forward,
    Backward,
    DoraForward,
    DoraBackward,
    Merge,
    CublasGemm,
    CublasUnfused,
    CublasFullBackward,
    CublasUnfusedBackward,
    CopyW0,
}

impl Run {
    fn call(self, dev: &Device, blas: &CudaBlas, c: Case, s: &mut Set) {
        match self {
            Run::Forward => common::ours_forward(s, SCALE),
            Run::Backward => common::ours_backward(s, SCALE),
            Run::DoraForward => common::ours_dora_forward(s, SCALE, Dropout::NONE),
            Run::DoraBackward => common::ours_dora_backward(s, SCALE, Dropout::NONE),
            Run::Merge => common::ours_merge(s, SCALE),
            Run::CublasGemm => common::cublas_forward(blas, s, c),
            Run::CublasUnfused => common::cublas_unfused(blas, s, c, SCALE),
            Run::CublasFullBackward => common::cublas_full_backward(blas, s, c),
            Run::CublasUnfusedBackward => common::cublas_unfused_backward(blas, s, c, SCALE),
            Run::CopyW0 => common::copy_w0(dev, s),
        }
    }

    /// The baseline's name in the table.
    fn label(self) -> &'static str {
        match self {
            Run::CublasGemm => "cuBLAS GEMM (full FT)",
            Run::CublasUnfused | Run::CublasUnfusedBackward => "cuBLAS unfused LoRA",
            Run::CublasFullBackward => "cuBLAS dX + dW (full FT)",
            Run::CopyW0 => "copy of W0",
            Run::Forward | Run::Backward => "ours, plain LoRA",
            Run::DoraForward | Run::DoraBackward | Run::Merge => "ours",
        }
    }
}

/// `ours` and `baselines` timed together on case `c`'s input sets (rotating), then one row per baseline.
#[allow(clippy::too_many_arguments)]
fn rows(
    (dev, blas): (&Device, &CudaBlas),
    c: Case,
    sets: &mut [Set],
    op: &str,
    ours: Run,
    baselines: &[Run],
    roofline: f64,
    chk: &str,
) {
    let runs: Vec<Run> = std::iter::once(ours)
        .chain(baselines.iter().copied())
        .collect();
    let ns = sets.len();
    let t = measure::time_together(
        dev,
        runs.len(),
        &mut |j, i| runs[j].call(dev, blas, c, &mut sets[i % ns]),
        TIMING,
    );
    for (b, base) in baselines.iter().enumerate() {
        row(
            (op, dims(c)),
            &t[0],
            (base.label(), &t[b + 1]),
            roofline,
            chk,
        );
    }
}

/// The rows of case `c` under the default launch choices: forward vs the bare cuBLAS GEMM and the unfused
/// three-GEMM LoRA forward, backward (M > 16) vs cuBLAS's dX + dW and the unfused five-GEMM backward,
/// merge (`merge`: once per N, K, r) vs a copy of W0.
fn default_rows(dev: &Device, blas: &CudaBlas, c: Case, merge: bool, roof: Roof) {
    let mut sets = common::sets(dev, c).unwrap();
    let chk = check_forward(blas, &mut sets[0], c);
    let op = if c.m <= 16 {
        "forward (small-M)"
    } else {
        "forward"
    };
    let baselines = [Run::CublasGemm, Run::CublasUnfused];
    let f_roof = forward_roofline(roof, c);
    rows(
        (dev, blas),
        c,
        &mut sets,
        op,
        Run::Forward,
        &baselines,
        f_roof,
        &chk,
    );
    if c.m > 16 {
        let chk = check_backward(blas, &mut sets[0], c);
        let baselines = [Run::CublasFullBackward, Run::CublasUnfusedBackward];
        let b_roof = backward_roofline(roof, c);
        rows(
            (dev, blas),
            c,
            &mut sets,
            "backward",
            Run::Backward,
            &baselines,
            b_roof,
            &chk,
        );
    }
    // DoRA's unmerged layer: against the bare GEMM (or cuBLAS's dX + dW) and our plain LoRA op, timed in
    // the same rounds
    let chk = check_dora_forward(&mut sets[0], c);
    rows(
        (dev, blas),
        c,
        &mut sets,
        "DoRA forward",
        Run::DoraForward,
        &[Run::CublasGemm, Run::Forward],
        f_roof,
        &chk,
    );
    if c.m > 16 {
        for s in sets.iter_mut() {
            common::ours_dora_forward(s, SCALE, Dropout::NONE); // every set's saved Z, norms and factors
        }
        let chk = check_dora_backward(&mut sets[0], c);
        rows(
            (dev, blas),
            c,
            &mut sets,
            "DoRA backward",
            Run::DoraBackward,
            &[Run::CublasFullBackward, Run::Backward],
            backward_roofline(roof, c),
            &chk,
        );
    }
    if merge {
        let chk = check_merge(dev, blas, &mut sets[0], c);
        let (n, k, r) = (c.n as f64, c.k as f64, c.r as f64);
        let roofline = roof.time(2.0 * n * k * r, 4.0 * n * k);
        rows(
            (dev, blas),
            c,
            &mut sets,
            "merge",
            Run::Merge,
            &[Run::CopyW0],
            roofline,
            &chk,
        );
    }
}

/// The launch choices other than the default that case `c` can take, for a fused GEMM of `gemm_n`
/// columns: (variable, value, label).
fn variants(
    dev: &Device,
    c: Case,
    gemm_n: usize,
) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut v = Vec::new();
    let sms = dev.sm_count().unwrap_or(1);
    if c.m > 16 && ops::mma_tile(c.m, gemm_n, sms).1 == 64 {
        v.push(("LK_MMA_TILE", "128", "128×128 tiles (LK_MMA_TILE=128)"));
    }
    if dev.programmatic_launch().unwrap_or(false) {
        // every launch may overlap the one ahead of it by default here: what that gains
        v.push((
            "LK_PDL",
            "0",
            "ordinary launches (LK_PDL=0: no programmatic dependent launch)",
        ));
    }
    if c.m > 16 && dev.compute_capability() == 90 {
        v.push(("LK_FUSED_GEMM", "sm90", "sm_90a GEMM (LK_FUSED_GEMM=sm90)"));
        v.push((
            "LK_FUSED_GEMM",
            "sm90-projection",
            "sm_90a GEMM, T and U by their own launches (LK_FUSED_GEMM=sm90-projection)",
        ));
    }
    v
}

/// The rows of case `c` under the other launch choices (`variants`), each against the baseline of its
/// op's target, timed again in the same rounds. A choice this build or GPU cannot run on the case (an
/// error from the op, never a silent fallback: `sm90` refuses) is said in a note after the table.
fn variant_rows(dev: &Device, blas: &CudaBlas, c: Case, roof: Roof, notes: &mut Vec<String>) {
    // the forward's GEMM is m×n, dX's m×k: each its own width choice
    let mut groups = vec![(
        "forward",
        variants(dev, c, c.n),
        Run::Forward,
        Run::CublasGemm,
    )];
    if c.m > 16 {
        let choices = variants(dev, c, c.k);
        groups.push(("backward", choices, Run::Backward, Run::CublasFullBackward));
    }
    if groups.iter().all(|g| g.1.is_empty()) {
        return; // no input sets made for nothing
    }
    let mut sets = common::sets(dev, c).unwrap();
    for (op, choices, ours, baseline) in groups {
        for (var, value, label) in choices {
            common::with_env(var, value, || {
                // every set's T from this choice's forward (the backward reads it), or why it cannot
                let mut ran = sets
                    .iter_mut()
                    .try_for_each(|s| common::try_forward(s, SCALE));
                if let Run::Backward = ours {
                    ran = ran.and_then(|()| common::try_backward(&mut sets[0], SCALE));
                }
                if let Err(e) = ran {
                    notes.push(format!("{op}, {label}, {c:?}: not run ({e})"));
                    return;
                }
                let (chk, roofline) = match ours {
                    Run::Forward => (
                        check_forward(blas, &mut sets[0], c),
                        forward_roofline(roof, c),
                    ),
                    _ => (
                        check_backward(blas, &mut sets[0], c),
                        backward_roofline(roof, c),
                    ),
                };
                let what = format!("{op}, {label}");
                rows(
                    (dev, blas),
                    c,
                    &mut sets,
                    &what,
                    ours,
                    &[baseline],
                    roofline,
                    &chk,
                );
            });
        }
    }
}

/// Many adapters in one batch (benches/common/multi.rs): ours vs a loop of lora_forward per adapter and
/// vs cuBLAS's base GEMM plus two GEMMs per adapter, all three timed in the same rounds; rows of the
/// table's format with r = the ranks. `LK_BENCH_QUICK=1`: M = 16 and 256 with 16 adapters only.
fn multi_rows(dev: &Device, blas: &CudaBlas, roof: Roof) {
    use common::multi;
    let quick = std::env::var("LK_BENCH_QUICK").as_deref() == Ok("1");
    for (m, adapters) in multi::cases() {
        if quick && !matches!((m, adapters), (16, 16) | (256, 16)) {
            continue;
        }
        let mut sets = multi::multi_sets(dev, m, adapters).unwrap();
        sets[0].y.poison().unwrap();
        multi::ours(&mut sets[0]);
        let ours_y = host(&sets[0].y);
        sets[0].y.poison().unwrap();
        multi::cublas_gather_gemms(blas, &mut sets[0]);
        let chk = compare(&[("Y", &ours_y, &host(&sets[0].y), multi::N)]);
        let ns = sets.len();
        let t = measure::time_together(
            dev,
            3,
            &mut |j, i| {
                let s = &mut sets[i % ns];
                match j {
                    0 => multi::ours(s),
                    1 => multi::loop_lora_forward(s),
                    _ => multi::cublas_gather_gemms(blas, s),
                }
            },
            TIMING,
        );
        let (mf, nf, kf) = (m as f64, multi::N as f64, multi::K as f64);
        let low: f64 = sets[0]
            .segments
            .iter()
            .map(|s| 2.0 * (s.end - s.begin) as f64 * (nf + kf) * s.rank as f64)
            .sum();
        let roofline = roof.time(
            2.0 * mf * nf * kf + low,
            2.0 * (mf * kf + nf * kf + mf * nf),
        );
        let what = (
            format!("multi, {adapters} adapters"),
            format!("{m} | {} | {} | 8/16/64", multi::N, multi::K),
        );
        for (base, tb) in [
            ("loop of lora_forward per adapter", &t[1]),
            ("cuBLAS GEMM + 2 GEMMs per adapter", &t[2]),
        ] {
            row((&what.0, what.1.clone()), &t[0], (base, tb), roofline, &chk);
        }
    }
}

fn free_bytes(dev: &Device) -> i64 {
    dev.synchronize().unwrap();
    let (free, _) = dev.as_cuda().unwrap().context().mem_get_info().unwrap();
    free as i64
}

/// Device memory one training step of layer `c` adds (see `memory::LayerStep`), measured: for LoRA,
/// A and B, our forward (Y, T), our backward (dX, dA, dB) and Adam's f32 moments for A and B; for full
/// fine-tuning, Y, dX, dW, Adam's moments for W0 and cuBLAS's forward and backward. X, W0 and dY are
/// resident before either; everything a step made is freed before the next measurement.
fn step_memory(dev: &Device, blas: &CudaBlas, c: Case) -> (i64, i64) {
    let rnd =
        |b: Buf, amp: f32, seed: u64| common::random(dev, common::shape(c, b), amp, seed).unwrap();
    let f32_zeros = |rows: usize, cols: usize| Tensor::<f32>::zeros(dev, &[rows, cols]).unwrap();
    let bf_zeros = |b: Buf| Tensor::<bf16>::zeros(dev, &common::shape(c, b)).unwrap();
    let (x, w0, dy) = (
        rnd(Buf::X, 1.0, 1),
        rnd(Buf::W0, 0.02, 2),
        rnd(Buf::Dy, 1.0, 3),
    );

    let before = free_bytes(dev);
    let (a, b) = (rnd(Buf::A, 0.02, 4), rnd(Buf::B, 0.1, 5));
    let fwd = ops::lora_forward(&x, &w0, &a, &b, None, SCALE).unwrap();
    let grads = ops::lora_backward(&x, &w0, &a, &b, &fwd.t, &dy, SCALE, true).unwrap();
    let adam = [
        f32_zeros(c.r, c.k),
        f32_zeros(c.r, c.k),
        f32_zeros(c.n, c.r),
        f32_zeros(c.n, c.r),
    ];
    let lora = before - free_bytes(dev);
    drop((a, b, fwd, grads, adam));

    // Placeholders for the Set fields full fine-tuning does not use, made before the measurement.
    let unused = |seed| common::random(dev, [1, 1], 1.0, seed).unwrap();
    let (pa, pb, pt, pu, pda, pdb) = (
        unused(6),
        unused(7),
        unused(8),
        unused(9),
        unused(10),
        unused(11),
    );
    let f32_one = || lora_kernels::Tensor::from_slice(dev, &[1.0f32], &[1]).unwrap();
    let (pm, pdm) = (f32_one(), f32_one());
    let pdora = ops::DoraSaved {
        t: unused(12),
        z: unused(13),
        norm: f32_one(),
        factor: f32_one(),
    };
    let before = free_bytes(dev);
    let mut s = Set {
        x,
        w0,
        a: pa,
        b: pb,
        dy,
        y: bf_zeros(Buf::Y),
        t: pt,
        dx: bf_zeros(Buf::Dx),
        da: pda,
        db: pdb,
        dw: bf_zeros(Buf::Dw),
        u: pu,
        ws: ops::Workspace::new(),
        magnitude: pm,
        dora: pdora,
        dmagnitude: pdm,
    };
    let adam = [f32_zeros(c.n, c.k), f32_zeros(c.n, c.k)];
    common::cublas_forward(blas, &mut s, c);
    common::cublas_full_backward(blas, &mut s, c);
    let full = before - free_bytes(dev);
    drop((s, adam));
    (lora, full)
}

fn main() {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("perf_table skipped: no usable GPU ({e})");
            return;
        }
    };
    let blas = match common::blas(&dev) {
        Ok(b) => b,
        Err(e) => {
            // Without cuBLAS there is no baseline and no roofline peak: a table without them would
            // be numbers with nothing to compare to. Fail, so that the GPU run shows it.
            eprintln!("perf_table: no cuBLAS baseline on {} ({e})", dev.describe());
            std::process::exit(2);
        }
    };
    // Peaks measured now, on random data: an 8192³ bf16 GEMM and a 512 MiB copy (10 × L2).
    let big = Case {
        m: 8192,
        n: 8192,
        k: 8192,
        r: 8,
    };
    let mut peak_sets = common::sets(&dev, big).unwrap();
    let t = measure::time_together(
        &dev,
        1,
        &mut |_, i| {
            let ns = peak_sets.len();
            common::cublas_forward(&blas, &mut peak_sets[i % ns], big)
        },
        TIMING,
    )[0]
    .median();
    let peak_flops = 2.0 * 8192f64.powi(3) / t;
    drop(peak_sets);
    let n_copy = 1usize << 28; // 512 MiB of bf16
    let src = common::random(&dev, [1, n_copy], 1.0, 99).unwrap();
    let mut dst = Tensor::<bf16>::zeros(&dev, &[1, n_copy]).unwrap();
    let stream = dev.as_cuda().unwrap().stream().clone();
    let t = measure::time_together(
        &dev,
        1,
        &mut |_, _| {
            stream
                .memcpy_dtod(
                    src.as_cuda_slice().unwrap(),
                    dst.as_cuda_slice_mut().unwrap(),
                )
                .unwrap()
        },
        TIMING,
    )[0]
    .median();
    let peak_bw = 2.0 * (n_copy * 2) as f64 / t;
    drop((src, dst));
    let l2 = l2_read_rate(&dev);
    // after the L2 probe's launches: a driver that refused programmatic dependent launch has said so
    let pdl = match dev.programmatic_launch() {
        Ok(true) => "on",
        Ok(false) => "off",
        Err(e) => panic!("{e}"),
    };
    println!(
        "device: {}; {}; {}; programmatic dependent launch: {pdl}",
        dev.describe(),
        common::blas_version(&blas),
        common::launch_choices_from_env()
    );
    println!(
        "peaks measured in this run: cuBLAS bf16 GEMM 8192³ {:.0} TFLOP/s, device copy {:.0} GB/s (read + write), {l2}",
        peak_flops / 1e12,
        peak_bw / 1e9
    );
    println!(
        "times: medians of {} interleaved rounds (benches/common/measure.rs); ratio: the median of the per-round ratios (lowest–highest)\n",
        measure::ROUNDS
    );
    println!(
        "| op | M | N | K | r | ours (µs) | baseline | baseline (µs) | ours / baseline (range) | ours % roofline | check vs cuBLAS |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let roof = Roof {
        flops: peak_flops,
        bytes: peak_bw,
    };
    let cases = common::cases();
    for (index, &c) in cases.iter().enumerate() {
        default_rows(&dev, &blas, c, common::measures_merge(&cases, index), roof);
    }
    multi_rows(&dev, &blas, roof);
    // the other launch choices, after every default row (see the module doc)
    let mut notes = Vec::new();
    for &c in &cases {
        variant_rows(&dev, &blas, c, roof, &mut notes);
    }
    for note in notes {
        println!("\n{note}");
    }
    graph_rows(&cases, roof);

    let c = Case {
        m: 8192,
        n: 4096,
        k: 4096,
        r: 16,
    };
    let (lora_measured, full_measured) = step_memory(&dev, &blas, c);
    let (lora, full) = (
        LayerStep::lora(c.m, c.n, c.k, c.r, 2),
        LayerStep::full(c.m, c.n, c.k, 2),
    );
    println!(
        "\nmemory one training step adds, layer M {} N {} K {} r {} bf16 (X, W0, dY resident; see memory::LayerStep):\n",
        c.m, c.n, c.k, c.r
    );
    println!("| | computed | measured (free memory before − after) |");
    println!("| --- | --- | --- |");
    println!(
        "| LoRA (A, B, dA, dB, Adam, T, Y, dX) | {} B | {} B |",
        lora.total(),
        lora_measured
    );
    println!(
        "| full fine-tuning (dW, Adam, Y, dX) | {} B | {} B |",
        full.total(),
        full_measured
    );
    println!(
        "| of which trainable state (params, grads, Adam) | LoRA {} B, full {} B | |",
        human(lora.params + lora.gradients + lora.adam_state),
        human(full.gradients + full.adam_state)
    );
}
