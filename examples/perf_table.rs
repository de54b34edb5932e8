//! Runs the benchmark cases once each and prints ONE markdown table: time of our kernels, our ratio to
//! each cuBLAS baseline measured in the same run, % of a roofline built from peaks measured in the
//! same run (a large cuBLAS bf16 GEMM for FLOP/s, a large device-to-device copy for bytes/s; the rate
//! L2 feeds the SMs is measured and printed beside them, for the sm_90a GEMM's bound), and a
//! check that ours computed the same thing as cuBLAS (relative difference on the case's first input
//! set; "MISMATCH" above 2e-2 or NaN). Then the device memory one training step of the headline layer
//! adds, LoRA vs full fine-tuning, measured (free memory before and after) next to `memory::LayerStep`.
//! Needs a GPU; without one it says so and exits 0.
//!
//! The multi-adapter rows (lora_forward_multi, benches/common/multi.rs) come after the single-adapter ones.
//! On an sm_90 GPU each forward and backward (M > 16) gets a second row with the sm_90a GEMM
//! (`LK_FUSED_GEMM=auto`, opt-in; T, or U in dX, inside the GEMM at r ≤ 32) and a third with T and U from
//! their own launches (`LK_FUSED_GEMM=sm90-projection`) beside the default mma.sync one, all against the
//! same cuBLAS baselines. Where the mma.sync GEMM takes its 128×64 tiles (`ops::mma_tile`: M of a few
//! hundred rows), the forward and backward get a row on the 128×128 ones too (`LK_MMA_TILE=128`, which
//! also puts the projection T = X·Aᵀ, narrow at every M, on them).
//!
//! `cargo run --release --example perf_table` (`LK_BENCH_QUICK=1`: the headline cases and M = 256). Results
//! from GPU runs are kept in docs/perf/ with device, driver, date and commit.

#[path = "../benches/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Buf, Case, Set};
use lora_kernels::cudarc::cublas::CudaBlas;
use lora_kernels::memory::{LayerStep, human};
use lora_kernels::{Device, Tensor, bf16, ops};

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

/// The rate L2 feeds the SMs (src/probe.rs): a buffer of a third of L2 (at most 16 MiB), read ~4 GiB's
/// worth per launch (at least 32 passes) by 8 blocks of 256 threads per SM with 16-byte loads cached in
/// L2 only, every thread's sum checked against the CPU; as text for the peaks line (bound.md's "L2 to SM"
/// column is the rate the sm_90a GEMM needs).
fn l2_read_rate(dev: &Device) -> String {
    use lora_kernels::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE;
    use lora_kernels::probe::{l2_read, l2_read_reference};
    let l2_bytes = dev
        .as_cuda()
        .unwrap()
        .context()
        .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE);
    let (Ok(l2_bytes), Ok(sms)) = (l2_bytes, dev.sm_count()) else {
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
    let t = time(dev, |_| l2_read(&src, passes, &mut sums).unwrap());
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

/// ‖ours − reference‖ / ‖reference‖ over the tensors' elements, as text; NaN or > 2e-2 is flagged.
fn check(pairs: &[(Vec<bf16>, Vec<bf16>)]) -> String {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (ours, reference) in pairs {
        for (o, r) in ours.iter().zip(reference) {
            num += (o.to_f64() - r.to_f64()).powi(2);
            den += r.to_f64().powi(2);
        }
    }
    let rel = (num / den).sqrt();
    if rel <= 2e-2 {
        format!("{rel:.1e}")
    } else {
        format!("MISMATCH {rel:.1e}")
    }
}

fn host(t: &Tensor<bf16>) -> Vec<bf16> {
    t.to_vec().unwrap()
}

/// Our forward vs cuBLAS's unfused LoRA forward on `s`.
fn check_forward(blas: &CudaBlas, s: &mut Set, c: Case) -> String {
    common::ours_forward(s, SCALE);
    let ours = host(&s.y);
    common::cublas_unfused(blas, s, c, SCALE);
    check(&[(ours, host(&s.y))])
}

/// Our dX, dA, dB vs cuBLAS's unfused LoRA backward on `s` (T from our forward).
fn check_backward(blas: &CudaBlas, s: &mut Set, c: Case) -> String {
    common::ours_forward(s, SCALE);
    common::ours_backward(s, SCALE);
    let ours = [host(&s.dx), host(&s.da), host(&s.db)];
    common::cublas_unfused_backward(blas, s, c, SCALE);
    let [dx, da, db] = ours;
    check(&[(dx, host(&s.dx)), (da, host(&s.da)), (db, host(&s.db))])
}

/// Our in-place merge vs a copy of W0 plus cuBLAS's s·B·A.
fn check_merge(dev: &Device, blas: &CudaBlas, s: &mut Set, c: Case) -> String {
    common::copy_w0(dev, s);
    common::run_cublas(blas, s, &common::merge_gemms(c, SCALE));
    common::ours_merge(s, SCALE);
    check(&[(host(&s.w0), host(&s.dw))])
}

/// Many adapters in one batch (benches/common/multi.rs): ours vs a loop of lora_forward per adapter and
/// vs cuBLAS's base GEMM plus two GEMMs per adapter, rows of the table's format with r = the ranks.
/// `LK_BENCH_QUICK=1`: M = 16 and 256 with 16 adapters only.
fn multi_rows(dev: &Device, blas: &CudaBlas, roof: impl Fn(f64, f64) -> f64) {
    use common::multi;
    let quick = std::env::var("LK_BENCH_QUICK").as_deref() == Ok("1");
    for (m, adapters) in multi::cases() {
        if quick && !matches!((m, adapters), (16, 16) | (256, 16)) {
            continue;
        }
        let mut sets = multi::multi_sets(dev, m, adapters).unwrap();
        multi::ours(&mut sets[0]);
        let ours_y = host(&sets[0].y);
        multi::cublas_gather_gemms(blas, &mut sets[0]);
        let chk = check(&[(ours_y, host(&sets[0].y))]);
        let ns = sets.len();
        let ours = time(dev, |i| multi::ours(&mut sets[i % ns]));
        let looped = time(dev, |i| multi::loop_lora_forward(&mut sets[i % ns]));
        let cublas = time(dev, |i| multi::cublas_gather_gemms(blas, &mut sets[i % ns]));
        let (mf, nf, kf) = (m as f64, multi::N as f64, multi::K as f64);
        let low: f64 = sets[0]
            .segments
            .iter()
            .map(|s| 4.0 * (s.end - s.begin) as f64 * kf * s.rank as f64)
            .sum();
        let roofline = roof(
            2.0 * mf * nf * kf + low,
            2.0 * (mf * kf + nf * kf + mf * nf),
        );
        for (base, tb) in [
            ("loop of lora_forward per adapter", looped),
            ("cuBLAS GEMM + 2 GEMMs per adapter", cublas),
        ] {
            println!(
                "| multi, {adapters} adapters | {m} | {} | {} | 8/16/64 | {:.1} | {base} | {:.1} | {:.3} | {:.0} % | {chk} |",
                multi::N,
                multi::K,
                ours * 1e6,
                tb * 1e6,
                ours / tb,
                100.0 * roofline / ours
            );
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
    let l2 = l2_read_rate(&dev);
    println!("device: {}", dev.describe());
    println!(
        "peaks measured in this run: cuBLAS bf16 GEMM 8192³ {:.0} TFLOP/s, device copy {:.0} GB/s (read + write), {l2}\n",
        peak_flops / 1e12,
        peak_bw / 1e9
    );
    println!(
        "| op | M | N | K | r | ours (µs) | baseline | baseline (µs) | ours / baseline | ours % roofline | check vs cuBLAS |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let roof = |flops: f64, bytes: f64| (flops / peak_flops).max(bytes / peak_bw);
    let cases = common::cases();
    for (index, &c) in cases.iter().enumerate() {
        let mut sets = common::sets(&dev, c).unwrap();
        let ns = sets.len();
        let (m, n, k, r) = (c.m as f64, c.n as f64, c.k as f64, c.r as f64);
        let row = |op: &str, ours: f64, base: &str, tb: f64, roofline: f64, chk: &str| {
            println!(
                "| {op} | {} | {} | {} | {} | {:.1} | {base} | {:.1} | {:.3} | {:.0} % | {chk} |",
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
        let chk = check_forward(&blas, &mut sets[0], c);
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
        row(op, fwd, "cuBLAS GEMM (full FT)", bare, f_roof, &chk);
        row(op, fwd, "cuBLAS unfused LoRA", unfused, f_roof, &chk);
        // the same op under another launch choice (the same cuBLAS baselines): on 128×128 tiles where
        // the mma.sync GEMM takes 128×64 ones (ops::mma_tile; the measured gain of the narrow tiles, the
        // same bits), and on sm_90 on the sm_90a GEMM (opt-in; T, or U in dX, inside it at r <= 32), and
        // with T and U always from their own launches. `gemm_n`: the columns of the op's fused GEMM.
        let sms = dev.sm_count().unwrap_or(1);
        let sm90 = c.m > 16 && dev.compute_capability() == 90;
        let variants = |gemm_n: usize| {
            let mut v: Vec<(&str, &str, &str)> = Vec::new();
            if c.m > 16 && ops::mma_tile(c.m, gemm_n, sms).1 == 64 {
                v.push(("LK_MMA_TILE", "128", "128×128 tiles (LK_MMA_TILE=128)"));
            }
            if sm90 {
                v.push(("LK_FUSED_GEMM", "auto", "sm_90a GEMM (LK_FUSED_GEMM=auto)"));
                v.push((
                    "LK_FUSED_GEMM",
                    "sm90-projection",
                    "sm_90a GEMM, T and U by their own launches (LK_FUSED_GEMM=sm90-projection)",
                ));
            }
            v
        };
        for (var, value, label) in variants(c.n) {
            let (chk_v, fwd_v) = common::with_env(var, value, || {
                (
                    check_forward(&blas, &mut sets[0], c),
                    time(&dev, |i| common::ours_forward(&mut sets[i % ns], SCALE)),
                )
            });
            row(
                &format!("forward, {label}"),
                fwd_v,
                "cuBLAS GEMM (full FT)",
                bare,
                f_roof,
                &chk_v,
            );
        }
        if c.m > 16 {
            let chk = check_backward(&blas, &mut sets[0], c);
            let bwd = time(&dev, |i| common::ours_backward(&mut sets[i % ns], SCALE));
            let full = time(&dev, |i| {
                common::cublas_full_backward(&blas, &mut sets[i % ns], c)
            });
            let unfused = time(&dev, |i| {
                common::cublas_unfused_backward(&blas, &mut sets[i % ns], c, SCALE)
            });
            let b_roof = roof(
                2.0 * m * n * k + 4.0 * m * (n + k) * r,
                2.0 * (3.0 * m * n + n * k + 2.0 * m * k),
            );
            row(
                "backward",
                bwd,
                "cuBLAS dX + dW (full FT)",
                full,
                b_roof,
                &chk,
            );
            row(
                "backward",
                bwd,
                "cuBLAS unfused LoRA",
                unfused,
                b_roof,
                &chk,
            );
            // dX's GEMM is m×k: its own width choice
            for (var, value, label) in variants(c.k) {
                let (chk_v, bwd_v) = common::with_env(var, value, || {
                    (
                        check_backward(&blas, &mut sets[0], c),
                        time(&dev, |i| common::ours_backward(&mut sets[i % ns], SCALE)),
                    )
                });
                row(
                    &format!("backward, {label}"),
                    bwd_v,
                    "cuBLAS dX + dW (full FT)",
                    full,
                    b_roof,
                    &chk_v,
                );
            }
        }
        if common::measures_merge(&cases, index) {
            let chk = check_merge(&dev, &blas, &mut sets[0], c);
            let merge = time(&dev, |i| common::ours_merge(&mut sets[i % ns], SCALE));
            let copy = time(&dev, |i| common::copy_w0(&dev, &mut sets[i % ns]));
            let roofline = roof(2.0 * n * k * r, 4.0 * n * k);
            row("merge", merge, "copy of W0", copy, roofline, &chk);
        }
    }

    multi_rows(&dev, &blas, roof);

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
