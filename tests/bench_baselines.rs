//! The cuBLAS baselines of the benchmarks (benches/common) compute what they claim, checked without a
//! GPU: each baseline is a list of row-major GEMMs, `column_major` turns one into cuBLAS's arguments,
//! and here a CPU model of cuBLAS's documented column-major GEMM runs those arguments on f64 buffers
//! sized exactly as the benchmark allocates them. The model refuses what cuBLAS would refuse (a
//! leading dimension shorter than a column) and any read or write outside a buffer, so a wrong
//! transpose flag, size or leading dimension fails here instead of timing the wrong GEMM on the GPU.

#[path = "../benches/common/mod.rs"]
mod common;

use std::collections::HashMap;

use common::{Buf, Case, ColumnMajorArgs, RowMajorGemm, column_major, shape};

/// cuBLAS `gemm` (column-major): C (m×n) = alpha·op(first)·op(second) + beta·C, with element (i, j)
/// of a matrix with leading dimension ld at i + j·ld.
fn cublas_model(
    cm: ColumnMajorArgs,
    first: &[f64],
    second: &[f64],
    c: &mut [f64],
    alpha: f64,
    beta: f64,
) {
    // cuBLAS: lda >= max(1, m) when op(A) = A, else >= max(1, k); same for ldb with k / n; ldc >= m.
    let (rows_first, rows_second) = (
        if cm.trans_first { cm.k } else { cm.m },
        if cm.trans_second { cm.n } else { cm.k },
    );
    assert!(cm.ld_first >= rows_first.max(1), "lda too small: {cm:?}");
    assert!(cm.ld_second >= rows_second.max(1), "ldb too small: {cm:?}");
    assert!(cm.ldc >= cm.m.max(1), "ldc too small: {cm:?}");
    let at = |buf: &[f64], ld: usize, i: usize, j: usize| -> f64 {
        *buf.get(i + j * ld)
            .unwrap_or_else(|| panic!("read outside a buffer of {}: {cm:?}", buf.len()))
    };
    for j in 0..cm.n {
        for i in 0..cm.m {
            let mut acc = 0.0;
            for l in 0..cm.k {
                let f = if cm.trans_first {
                    at(first, cm.ld_first, l, i)
                } else {
                    at(first, cm.ld_first, i, l)
                };
                let s = if cm.trans_second {
                    at(second, cm.ld_second, j, l)
                } else {
                    at(second, cm.ld_second, l, j)
                };
                acc += f * s;
            }
            let idx = i + j * cm.ldc;
            assert!(idx < c.len(), "write outside the output: {cm:?}");
            // cuBLAS: "if beta == 0, C does not have to be a valid input" (it is not read).
            c[idx] = if beta == 0.0 {
                alpha * acc
            } else {
                alpha * acc + beta * c[idx]
            };
        }
    }
}

/// Runs a baseline's GEMMs through `column_major` and the cuBLAS model, as `run_cublas` does.
fn run(bufs: &mut HashMap<Buf, Vec<f64>>, gemms: &[RowMajorGemm]) {
    for g in gemms {
        let cm = column_major(g);
        let mut out = bufs.remove(&g.c).unwrap();
        cublas_model(
            cm,
            &bufs[&g.b],
            &bufs[&g.a],
            &mut out,
            g.alpha as f64,
            g.beta as f64,
        );
        bufs.insert(g.c, out);
    }
}

/// Every buffer of a Set, sized by `shape`, with distinct random values (outputs poisoned with NaN:
/// a GEMM with beta = 0 must not read them, and nothing may be left unwritten). T is an input of the
/// backward (saved by the forward) and an output of the forward.
fn buffers(c: Case, seed: u64, t_is_input: bool) -> HashMap<Buf, Vec<f64>> {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let all = [
        Buf::X,
        Buf::W0,
        Buf::A,
        Buf::B,
        Buf::T,
        Buf::Y,
        Buf::Dy,
        Buf::Dx,
        Buf::Dw,
        Buf::U,
        Buf::Da,
        Buf::Db,
    ];
    all.into_iter()
        .map(|b| {
            let n: usize = shape(c, b).iter().product();
            let output = matches!(b, Buf::Y | Buf::Dx | Buf::Dw | Buf::U | Buf::Da | Buf::Db)
                || (b == Buf::T && !t_is_input);
            let v = (0..n)
                .map(|_| if output { f64::NAN } else { next() })
                .collect();
            (b, v)
        })
        .collect()
}

/// Row-major (rows × cols) product with op(A) = A or Aᵀ, op(B) = B or Bᵀ, straight from the definition.
fn matmul(
    a: &[f64],
    a_t: bool,
    b: &[f64],
    b_t: bool,
    (m, n, k): (usize, usize, usize),
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|l| {
                    let x = if a_t { a[l * m + i] } else { a[i * k + l] };
                    let y = if b_t { b[j * k + l] } else { b[l * n + j] };
                    x * y
                })
                .sum();
        }
    }
    c
}

fn assert_close(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    let rel = (num / den).sqrt();
    // f64 on both sides, summed in different orders: agreement to rounding, and NaN never passes.
    assert!(rel <= 1e-12, "{name}: relative difference {rel:e}");
}

/// Odd sizes (no two equal, so a swapped m/n/k cannot pass), 1s, and the benchmark grid's ratios.
const CASES: [Case; 4] = [
    Case {
        m: 5,
        n: 7,
        k: 9,
        r: 3,
    },
    Case {
        m: 1,
        n: 17,
        k: 33,
        r: 1,
    },
    Case {
        m: 31,
        n: 1,
        k: 2,
        r: 8,
    },
    Case {
        m: 16,
        n: 43,
        k: 11,
        r: 16,
    },
];

#[test]
fn bare_forward_is_x_w0t() {
    for (i, c) in CASES.into_iter().enumerate() {
        let mut b = buffers(c, i as u64 + 1, false);
        run(&mut b, &common::bare_forward_gemms(c));
        let want = matmul(&b[&Buf::X], false, &b[&Buf::W0], true, (c.m, c.n, c.k));
        assert_close(&format!("{c:?} Y"), &b[&Buf::Y], &want);
    }
}

#[test]
fn unfused_forward_is_the_lora_forward() {
    let scale = 1.75;
    for (i, c) in CASES.into_iter().enumerate() {
        let mut b = buffers(c, i as u64 + 11, false);
        run(&mut b, &common::unfused_forward_gemms(c, scale as f32));
        let t = matmul(&b[&Buf::X], false, &b[&Buf::A], true, (c.m, c.r, c.k));
        let base = matmul(&b[&Buf::X], false, &b[&Buf::W0], true, (c.m, c.n, c.k));
        let low = matmul(&t, false, &b[&Buf::B], true, (c.m, c.n, c.r));
        let want: Vec<f64> = base.iter().zip(&low).map(|(y, l)| y + scale * l).collect();
        assert_close(&format!("{c:?} T"), &b[&Buf::T], &t);
        assert_close(&format!("{c:?} Y"), &b[&Buf::Y], &want);
    }
}

#[test]
fn full_backward_is_dx_and_dw() {
    for (i, c) in CASES.into_iter().enumerate() {
        let mut b = buffers(c, i as u64 + 21, false);
        run(&mut b, &common::full_backward_gemms(c));
        let dx = matmul(&b[&Buf::Dy], false, &b[&Buf::W0], false, (c.m, c.k, c.n));
        let dw = matmul(&b[&Buf::Dy], true, &b[&Buf::X], false, (c.n, c.k, c.m));
        assert_close(&format!("{c:?} dX"), &b[&Buf::Dx], &dx);
        assert_close(&format!("{c:?} dW"), &b[&Buf::Dw], &dw);
    }
}

#[test]
fn unfused_backward_is_the_lora_backward() {
    let scale = -0.625;
    for (i, c) in CASES.into_iter().enumerate() {
        let mut b = buffers(c, i as u64 + 31, true);
        run(&mut b, &common::unfused_backward_gemms(c, scale as f32));
        let dims = |m, n, k| (m, n, k);
        let u = matmul(&b[&Buf::Dy], false, &b[&Buf::B], false, dims(c.m, c.r, c.n));
        let db = matmul(&b[&Buf::Dy], true, &b[&Buf::T], false, dims(c.n, c.r, c.m));
        let da = matmul(&u, true, &b[&Buf::X], false, dims(c.r, c.k, c.m));
        let base = matmul(
            &b[&Buf::Dy],
            false,
            &b[&Buf::W0],
            false,
            dims(c.m, c.k, c.n),
        );
        let low = matmul(&u, false, &b[&Buf::A], false, dims(c.m, c.k, c.r));
        let scaled = |v: Vec<f64>| v.into_iter().map(|x| scale * x).collect::<Vec<_>>();
        let dx: Vec<f64> = base.iter().zip(&low).map(|(g, l)| g + scale * l).collect();
        assert_close(&format!("{c:?} dB"), &b[&Buf::Db], &scaled(db));
        assert_close(&format!("{c:?} dA"), &b[&Buf::Da], &scaled(da));
        assert_close(&format!("{c:?} dX"), &b[&Buf::Dx], &dx);
    }
}

#[test]
fn merge_gemm_is_w0_plus_sba() {
    let scale = 3.5;
    for (i, c) in CASES.into_iter().enumerate() {
        let mut b = buffers(c, i as u64 + 41, false);
        let w0 = b[&Buf::W0].clone();
        b.insert(Buf::Dw, w0.clone()); // copy_w0: the device-to-device copy before the GEMM
        run(&mut b, &common::merge_gemms(c, scale as f32));
        let ba = matmul(&b[&Buf::B], false, &b[&Buf::A], false, (c.n, c.k, c.r));
        let want: Vec<f64> = w0.iter().zip(&ba).map(|(w, d)| w + scale * d).collect();
        assert_close(&format!("{c:?} merged"), &b[&Buf::Dw], &want);
    }
}

/// The mapping on its own, for all four transpose combinations, against the same model: a wrong
/// leading dimension for one of them would be missed if no baseline used that combination.
#[test]
fn column_major_mapping_all_transposes() {
    let (m, n, k) = (3, 5, 7);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let c = Case { m, n, k, r: 1 };
        let mut bufs = buffers(c, 99, false);
        // A: m×k (k×m when ta) lives in X (m×k elements); B: k×n (n×k when tb) in a fresh buffer.
        let b_data: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.37).sin()).collect();
        bufs.insert(Buf::B, b_data.clone());
        bufs.insert(Buf::Y, vec![0.25; m * n]);
        let g = RowMajorGemm {
            m,
            n,
            k,
            a: Buf::X,
            ta,
            b: Buf::B,
            tb,
            c: Buf::Y,
            alpha: 2.0,
            beta: -1.0,
        };
        run(&mut bufs, &[g]);
        let prod = matmul(&bufs[&Buf::X], ta, &b_data, tb, (m, n, k));
        let want: Vec<f64> = prod.iter().map(|p| 2.0 * p - 0.25).collect();
        assert_close(&format!("ta {ta} tb {tb}"), &bufs[&Buf::Y], &want);
    }
}

/// The model itself can fail: a leading dimension one short is refused.
#[test]
#[should_panic(expected = "lda too small")]
fn model_refuses_a_short_leading_dimension() {
    let g = common::bare_forward_gemms(CASES[0])[0];
    let mut cm = column_major(&g);
    cm.ld_first -= 3;
    let b = buffers(CASES[0], 5, false);
    let mut y = vec![0.0; CASES[0].m * CASES[0].n];
    cublas_model(cm, &b[&Buf::W0], &b[&Buf::X], &mut y, 1.0, 0.0);
}

/// Merge is measured exactly once per (N, K, r): 9 times on the grid, and once (at the
/// headline case) in the quick run, which has no M = 2048 case.
#[test]
fn merge_is_measured_once_per_weight_and_rank() {
    let grid: Vec<Case> = [16, 2048, 8192]
        .into_iter()
        .flat_map(|m| {
            [(4096, 4096), (11008, 4096), (4096, 11008)]
                .into_iter()
                .flat_map(move |(n, k)| [8, 16, 64].map(|r| Case { m, n, k, r }))
        })
        .collect();
    let measured: Vec<Case> = (0..grid.len())
        .filter(|&i| common::measures_merge(&grid, i))
        .map(|i| grid[i])
        .collect();
    assert_eq!(measured.len(), 9);
    let mut keys: Vec<_> = measured.iter().map(|c| (c.n, c.k, c.r)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 9);
    let quick = [
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
    assert!(common::measures_merge(&quick, 0));
    assert!(!common::measures_merge(&quick, 1));
}

/// The perf table's check (benches/common/measure.rs `compare`) judges each tensor alone and each row
/// of it: a backward whose dX is wrong fails even when a large dA would dilute the error under the limit
/// pooled, one wrong row fails where the whole tensor's norm would dilute it; NaN left unwritten, a
/// length that differs and nothing compared are each a MISMATCH; the largest difference is shown with its
/// tensor's name.
#[test]
fn the_perf_check_judges_each_tensor_and_row() {
    use common::measure::{MISMATCH_ABOVE, compare, relative_difference};
    use lora_kernels::bf16;
    let v = |n: usize, amp: f64, seed: u64| -> Vec<bf16> {
        (0..n)
            .map(|i| {
                let x = ((i as u64 * 2654435761 + seed * 40503) % 1000) as f64 / 500.0 - 1.0;
                bf16::from_f64(amp * (x + 0.001))
            })
            .collect()
    };
    let (dx, da) = (v(4096, 0.4, 1), v(4096, 220.0, 2));
    // dX off by a quarter of itself: 25 % alone, far under 2e-2 of the pooled norm
    let wrong_dx: Vec<bf16> = dx
        .iter()
        .map(|x| bf16::from_f64(1.25 * x.to_f64()))
        .collect();
    let pooled = {
        let ours: Vec<bf16> = wrong_dx.iter().chain(&da).copied().collect();
        let reference: Vec<bf16> = dx.iter().chain(&da).copied().collect();
        relative_difference(&ours, &reference)
    };
    assert!(
        pooled < MISMATCH_ABOVE,
        "the case must hide in a pooled norm: {pooled}"
    );
    let out = compare(&[("dX", &wrong_dx, &dx, 64), ("dA", &da, &da, 64)]);
    assert!(out.starts_with("MISMATCH dX"), "{out}");

    // one row of 64 elements among 1024 at half its value: 1.6 % over the whole tensor, 50 % in its row
    let long = [da.as_slice(); 16].concat();
    let mut long_wrong = long.clone();
    for x in &mut long_wrong[640..704] {
        *x = bf16::from_f64(0.5 * x.to_f64());
    }
    let whole = relative_difference(&long_wrong, &long);
    assert!(
        whole < MISMATCH_ABOVE,
        "the case must hide in the whole norm: {whole}"
    );
    let out = compare(&[("Y", &long_wrong, &long, 64)]);
    assert!(out.starts_with("MISMATCH Y"), "{out}");

    // one element left NaN (unwritten over the poison) in an otherwise exact tensor
    let mut unwritten = da.clone();
    unwritten[77] = bf16::NAN;
    let out = compare(&[("dX", &dx, &dx, 64), ("dA", &unwritten, &da, 64)]);
    assert!(out.starts_with("MISMATCH dA"), "{out}");
    assert!(compare(&[("Y", &dx[1..], &dx, 64)]).starts_with("MISMATCH Y"));
    assert!(compare(&[("Y", &dx[1..], &dx[1..], 64)]).starts_with("MISMATCH Y")); // not whole rows
    assert!(compare(&[]).starts_with("MISMATCH"));
    // a zero row: equal is exact, anything else is infinitely off
    let zeros = vec![bf16::ZERO; 8];
    assert_eq!(compare(&[("T", &zeros, &zeros, 4)]), "0.0e0 (T)");
    assert!(compare(&[("T", &dx[..8], &zeros, 4)]).starts_with("MISMATCH T inf"));

    // within the limit: the largest, named
    let near: Vec<bf16> = da
        .iter()
        .map(|x| bf16::from_f64(1.004 * x.to_f64()))
        .collect();
    let out = compare(&[("dX", &dx, &dx, 64), ("dA", &near, &da, 64)]);
    assert!(!out.contains("MISMATCH") && out.ends_with("(dA)"), "{out}");
}

/// The perf table's timing (benches/common/measure.rs `time_together`), on stand-in candidates that
/// spin 1 and 2 ms per call: every candidate gets `ROUNDS` samples, its calls numbered on from its
/// warm-up without a gap, the rounds take the candidates in a rotating order, and the medians and the
/// per-round ratio see the 2 : 1.
#[test]
fn the_perf_timing_interleaves_rounds() {
    use common::measure::{ROUNDS, median, time_together};
    use std::time::{Duration, Instant};
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    assert!(median(&[]).is_nan());

    // the ratio is wall time: a busy machine (other tests on the same cores) can preempt one
    // candidate's calls more than the other's, so the timing is tried up to three times
    let mut last = String::new();
    for _attempt in 0..3 {
        let dev = lora_kernels::Device::emulator();
        let mut log: Vec<(usize, usize)> = Vec::new();
        let samples = time_together(
            &dev,
            2,
            &mut |j, i| {
                log.push((j, i));
                // a busy wait: a sleep may overshoot by more than the 1 ms told apart here
                let start = Instant::now();
                while start.elapsed() < Duration::from_micros(1000 * (j as u64 + 1)) {}
            },
            (0.006, 0.004),
        );
        assert_eq!(samples.len(), 2);
        for (j, s) in samples.iter().enumerate() {
            assert_eq!(s.0.len(), ROUNDS, "candidate {j}");
            let calls: Vec<usize> = log.iter().filter(|c| c.0 == j).map(|c| c.1).collect();
            assert_eq!(
                calls,
                (0..calls.len()).collect::<Vec<_>>(),
                "candidate {j}'s call numbers"
            );
        }
        // the log as runs of one candidate: the warm-ups (candidate 0, then 1), then the rounds, each
        // starting at candidate `round % 2`
        let mut runs: Vec<usize> = Vec::new();
        for &(j, _) in &log {
            if runs.last() != Some(&j) {
                runs.push(j);
            }
        }
        let rounds: Vec<usize> = (0..ROUNDS).flat_map(|r| [r % 2, (r + 1) % 2]).collect();
        let mut expected = vec![0, 1];
        expected.extend(rounds);
        expected.dedup();
        assert_eq!(runs, expected);
        let (ratio, lo, hi) = samples[1].ratio_to(&samples[0]);
        assert!(lo <= ratio && ratio <= hi);
        assert!(samples[0].median() >= 0.001 && samples[1].median() >= 0.002);
        if (1.4..2.6).contains(&ratio) {
            return;
        }
        last = format!("ratio {ratio} ({lo}..{hi})");
    }
    panic!("2 ms against 1 ms per call, three times out of 1.4..2.6: last {last}");
}

/// The FLOP counts behind the perf table's rooflines and criterion's throughput, at the headline case by
/// hand: the bare GEMM 2·M·N·K; the LoRA forward adds X·Aᵀ and T·Bᵀ (2·M·r·K + 2·M·r·N); full
/// fine-tuning's backward is two such GEMMs; the LoRA backward adds U = dY·B, U·A, dB and dA.
#[test]
fn flop_counts_by_hand() {
    let c = Case {
        m: 8192,
        n: 4096,
        k: 4096,
        r: 16,
    };
    let gemm = 2 * 8192 * 4096 * 4096u64;
    let low = 2 * 8192 * 16 * 4096u64; // one M×r×4096 product
    assert_eq!(c.gemm_flops(), gemm);
    assert_eq!(c.forward_flops(), gemm + 2 * low);
    assert_eq!(c.full_backward_flops(), 2 * gemm);
    assert_eq!(c.backward_flops(), gemm + 4 * low);
}
