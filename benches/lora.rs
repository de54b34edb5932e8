//! criterion benchmarks: our kernels against cuBLAS baselines in the same run (see benches/common).
//!
//!   forward   fused forward, DoRA forward | bare cuBLAS GEMM (full fine-tune forward) | unfused 3-GEMM
//!             LoRA (PEFT)
//!   backward  ours (dX, dA, dB), DoRA's (and dm) | full fine-tune backward (cuBLAS dX + dW) | unfused 5-GEMM LoRA
//!             backward (autograd on PEFT's layer)
//!   merge     in-place merge, DoRA merge | device-to-device copy of W0 (once per N, K, r)
//!   small_m   M = 16 cases of the forward group (the small-M kernel)
//!   multi     many adapters in one batch (benches/common/multi.rs): ours (lora_forward_multi) | a loop
//!             of lora_forward per adapter | cuBLAS Y = X·W0ᵀ plus two GEMMs per adapter on its rows;
//!             M = 16, 64, 256, 4096 with 4, 16, 64 adapters of ranks 8/16/64, N = K = 4096
//!   forward_sm90a, backward_sm90a (on sm_90, after all the others, so that a fault in them cannot lose
//!             the rest): the same with the sm_90a GEMM (`ours_fused_sm90a`, `ours_dx_da_db_sm90a`: T, or
//!             U, dB and dA in dX, inside at r <= 32) and with T and U from their own launches
//!             (`..._sm90a_projection`) | the bare cuBLAS GEMM, cuBLAS dX + dW again
//!
//! Throughput is reported as the FLOPs each row itself does (criterion "elements": ours counts the low-rank
//! products too, the bare GEMM only its own; the multi rows all the frozen GEMM's) and bytes for merge. Criterion times batches of calls with
//! no synchronize between them (no idle gap per call) and one device synchronize at the end, inside the
//! timed region; input sets rotate so none is served from L2. Where the sm_90a rows cannot run (not an
//! sm_90 GPU, or a build without sm_90a), a line says why.
//! Without a GPU: prints that it skipped and why, and exits 0. `LK_BENCH_QUICK=1`: the headline cases and M = 256.

mod common;

use std::time::{Duration, Instant};

use common::Case;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use lora_kernels::cudarc::cublas::CudaBlas;
use lora_kernels::{Device, Dropout};

const SCALE: f32 = 2.0;

/// The LoRA dropout of the DoRA rows that take one (a common recipe's 0.05; the mask fixed).
fn bench_dropout() -> Dropout {
    Dropout::new(0.05, 0, 0).expect("0.05 is a probability")
}

/// One timed row of `flops` (or bytes) per call: `op` on the next input set (they rotate, so none is
/// served from L2), `iters` calls per timed batch, then a device synchronize inside the timed region.
fn row<S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    (name, work): (&str, Throughput),
    dev: &Device,
    sets: &mut [S],
    mut op: impl FnMut(&mut S),
) {
    let mut i = 0;
    g.throughput(work);
    g.bench_function(BenchmarkId::new(name, ""), |b| {
        b.iter_custom(|iters| {
            dev.synchronize().unwrap();
            let start = Instant::now();
            for _ in 0..iters {
                i = (i + 1) % sets.len();
                op(&mut sets[i]);
            }
            dev.synchronize().unwrap();
            start.elapsed()
        })
    });
}

fn group_name(c: Case) -> String {
    format!("M{}_N{}_K{}_r{}", c.m, c.n, c.k, c.r)
}

fn bench_case(cr: &mut Criterion, dev: &Device, blas: &CudaBlas, c: Case, merge: bool) {
    let mut sets = common::sets(dev, c).expect("allocating benchmark inputs");
    // the FLOPs of each row: the frozen GEMMs, and ours and the unfused LoRA paths' low-rank products
    let gemm = Throughput::Elements(c.gemm_flops());
    let forward = Throughput::Elements(c.forward_flops());
    let full_backward = Throughput::Elements(c.full_backward_flops());
    let backward = Throughput::Elements(c.backward_flops());
    let family = if c.m <= 16 { "small_m" } else { "forward" };
    let mut g = cr.benchmark_group(format!("{family}/{}", group_name(c)));
    row(
        &mut g,
        ("ours_fused", forward.clone()),
        dev,
        &mut sets,
        |s| common::ours_forward(s, SCALE),
    );
    // DoRA (ops::dora_forward_into): the same FLOPs plus its column passes, timed against the same rows
    row(
        &mut g,
        ("ours_dora_fused", forward.clone()),
        dev,
        &mut sets,
        |s| common::ours_dora_forward(s, SCALE, Dropout::NONE),
    );
    // DoRA with LoRA dropout: the same useful FLOPs, W0 run on the dropped input too (PEFT's layer)
    row(
        &mut g,
        ("ours_dora_dropout_fused", forward.clone()),
        dev,
        &mut sets,
        |s| common::ours_dora_forward(s, SCALE, bench_dropout()),
    );
    row(&mut g, ("cublas_bare_gemm", gemm), dev, &mut sets, |s| {
        common::cublas_forward(blas, s, c)
    });
    row(
        &mut g,
        ("cublas_unfused_lora", forward),
        dev,
        &mut sets,
        |s| common::cublas_unfused(blas, s, c, SCALE),
    );
    g.finish();
    if c.m > 16 {
        let mut g = cr.benchmark_group(format!("backward/{}", group_name(c)));
        row(
            &mut g,
            ("ours_dx_da_db", backward.clone()),
            dev,
            &mut sets,
            |s| common::ours_backward(s, SCALE),
        );
        row(
            &mut g,
            ("ours_dora_dx_da_db", backward.clone()),
            dev,
            &mut sets,
            |s| common::ours_dora_backward(s, SCALE, Dropout::NONE),
        );
        row(
            &mut g,
            ("ours_dora_dropout_dx_da_db", backward.clone()),
            dev,
            &mut sets,
            |s| common::ours_dora_backward(s, SCALE, bench_dropout()),
        );
        row(
            &mut g,
            ("cublas_full_dx_dw", full_backward),
            dev,
            &mut sets,
            |s| common::cublas_full_backward(blas, s, c),
        );
        row(
            &mut g,
            ("cublas_unfused_lora_backward", backward),
            dev,
            &mut sets,
            |s| common::cublas_unfused_backward(blas, s, c, SCALE),
        );
        g.finish();
    }
    if !merge {
        return;
    }
    let mut g = cr.benchmark_group(format!("merge/N{}_K{}_r{}", c.n, c.k, c.r));
    // a read and a write of W0 (merge and copy alike)
    let bytes = Throughput::Bytes(4 * (c.n * c.k) as u64);
    row(&mut g, ("ours_merge", bytes.clone()), dev, &mut sets, |s| {
        common::ours_merge(s, SCALE)
    });
    // the same bytes as the merge, so the rates compare (it reads W0 twice: docs/perf/bound.md)
    row(
        &mut g,
        ("ours_dora_merge", bytes.clone()),
        dev,
        &mut sets,
        |s| common::ours_dora_merge(s, SCALE),
    );
    row(&mut g, ("copy_w0", bytes), dev, &mut sets, |s| {
        common::copy_w0(dev, s)
    });
    g.finish();
}

/// On sm_90, after every default row (a fault in a kernel that has not run on a GPU before cannot lose
/// them): case `c`'s forward and backward with the sm_90a GEMM (`LK_FUSED_GEMM=sm90`: T, or U in dX,
/// inside at r <= 32) and with T and U from their own launches (`sm90-projection`), with the bare cuBLAS
/// GEMM and full fine-tuning's dX + dW timed again beside them; where they cannot run, a line says why.
fn bench_sm90_case(cr: &mut Criterion, dev: &Device, blas: &CudaBlas, c: Case) {
    if c.m <= 16 {
        return;
    }
    let mut sets = common::sets(dev, c).expect("allocating benchmark inputs");
    if let Err(why) = common::sm90_runs(&mut sets[0], SCALE) {
        println!("{}: no sm_90a rows ({why})", group_name(c));
        return;
    }
    let forward = Throughput::Elements(c.forward_flops());
    let backward = Throughput::Elements(c.backward_flops());
    let mut g = cr.benchmark_group(format!("forward_sm90a/{}", group_name(c)));
    for (value, name) in [
        ("sm90", "ours_fused_sm90a"),
        ("sm90-projection", "ours_fused_sm90a_projection"),
    ] {
        common::with_fused_gemm(value, || {
            row(&mut g, (name, forward.clone()), dev, &mut sets, |s| {
                common::ours_forward(s, SCALE)
            });
        });
    }
    let gemm = Throughput::Elements(c.gemm_flops());
    // DoRA (ops::dora_forward_into): the same FLOPs plus its column passes, timed against the same rows
    row(
        &mut g,
        ("ours_dora_fused", forward.clone()),
        dev,
        &mut sets,
        |s| common::ours_dora_forward(s, SCALE, Dropout::NONE),
    );
    row(&mut g, ("cublas_bare_gemm", gemm), dev, &mut sets, |s| {
        common::cublas_forward(blas, s, c)
    });
    g.finish();
    let mut g = cr.benchmark_group(format!("backward_sm90a/{}", group_name(c)));
    for (value, name) in [
        ("sm90", "ours_dx_da_db_sm90a"),
        ("sm90-projection", "ours_dx_da_db_sm90a_projection"),
    ] {
        common::with_fused_gemm(value, || {
            // every set's T from this path's forward, as a training step has it
            sets.iter_mut().for_each(|s| common::ours_forward(s, SCALE));
            row(&mut g, (name, backward.clone()), dev, &mut sets, |s| {
                common::ours_backward(s, SCALE)
            });
        });
    }
    let full = Throughput::Elements(c.full_backward_flops());
    row(&mut g, ("cublas_full_dx_dw", full), dev, &mut sets, |s| {
        common::cublas_full_backward(blas, s, c)
    });
    g.finish();
}

fn bench_multi(cr: &mut Criterion, dev: &Device, blas: &CudaBlas, m: usize, adapters: usize) {
    use common::multi;
    let mut sets = multi::multi_sets(dev, m, adapters).expect("allocating benchmark inputs");
    let mut g = cr.benchmark_group(format!(
        "multi/M{m}_A{adapters}_N{}_K{}",
        multi::N,
        multi::K
    ));
    // the frozen GEMM's FLOPs for every row (the low-rank work differs by rank and path; the rows
    // compare times)
    let work = Throughput::Elements(2 * (m * multi::N * multi::K) as u64);
    row(
        &mut g,
        ("ours_multi", work.clone()),
        dev,
        &mut sets,
        multi::ours,
    );
    row(
        &mut g,
        ("loop_lora_forward", work.clone()),
        dev,
        &mut sets,
        multi::loop_lora_forward,
    );
    row(&mut g, ("cublas_gather_gemms", work), dev, &mut sets, |s| {
        multi::cublas_gather_gemms(blas, s)
    });
    g.finish();
}

fn main() {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("lora-kernels benches skipped: no usable GPU ({e})");
            return;
        }
    };
    let blas = match common::blas(&dev) {
        Ok(b) => b,
        Err(e) => {
            // A GPU without its baseline is an error, not a skip: ours alone compares to nothing.
            eprintln!(
                "lora-kernels benches: no cuBLAS baseline on {} ({e})",
                dev.describe()
            );
            std::process::exit(2);
        }
    };
    println!("lora-kernels benches on {}", dev.describe());
    let mut cr = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let cases = common::cases();
    for (index, &c) in cases.iter().enumerate() {
        bench_case(
            &mut cr,
            &dev,
            &blas,
            c,
            common::measures_merge(&cases, index),
        );
    }
    let quick = std::env::var("LK_BENCH_QUICK").as_deref() == Ok("1");
    for (m, adapters) in common::multi::cases() {
        if quick && (m, adapters) != (256, 16) {
            continue;
        }
        bench_multi(&mut cr, &dev, &blas, m, adapters);
    }
    if dev.compute_capability() == 90 {
        for &c in &cases {
            bench_sm90_case(&mut cr, &dev, &blas, c);
        }
    } else {
        println!("no sm_90a rows: {} is not sm_90", dev.describe());
    }
    cr.final_summary();
}
