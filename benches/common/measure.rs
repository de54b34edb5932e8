//! How the perf table (examples/perf_table.rs) times a row and checks it.
//!
//! Timing: the candidates of a row (ours and the cuBLAS baselines it is compared with) are timed
//! together. Each is first warmed up by time (module loads, cuBLAS's heuristics, the workspace, the GPU's
//! clocks), which also sizes its batch, then they take turns for `ROUNDS` rounds, the order rotating
//! every round, each timing one batch of about `BATCH_S` seconds: a synchronize, the batch's calls with
//! no synchronize between them (no idle gap per call), a synchronize, the host clock. A candidate's time
//! is the median of its rounds; a ratio is the median of the per-round ratios (ours and the baseline
//! measured seconds apart, so a drift of the clocks moves both), printed with their range, which is the
//! spread to read a difference against (a difference smaller than it is noise).
//!
//! Checking: each output tensor of ours against the same tensor computed by cuBLAS, by relative norm,
//! one tensor and one row at a time (pooled, a large dA would hide a wrong dX, and a whole tensor's norm
//! one wrong row); ours written over NaN, so an element it leaves unwritten fails.

use std::time::Instant;

use lora_kernels::{Device, bf16};

/// Rounds per candidate.
pub const ROUNDS: usize = 9;
/// Seconds of warm-up per candidate (at least; the last doubling batch may take longer).
pub const WARM_UP_S: f64 = 0.05;
/// Seconds per candidate per round.
pub const BATCH_S: f64 = 0.02;
/// The relative difference between ours and cuBLAS above which a row is a MISMATCH: both round to
/// bf16 (their difference is a few 1e-3), so above this one of them computed something else.
pub const MISMATCH_ABOVE: f64 = 2e-2;

/// The seconds per call of each of a row's candidates, one sample per round.
#[derive(Clone, Debug)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn median(&self) -> f64 {
        median(&self.0)
    }

    /// Ours over `baseline`, round by round: (median, lowest, highest).
    pub fn ratio_to(&self, baseline: &Samples) -> (f64, f64, f64) {
        let r: Vec<f64> = self.0.iter().zip(&baseline.0).map(|(a, b)| a / b).collect();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(&r), lo, hi)
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// `ROUNDS` samples of each of `n` candidates (see the module doc): `call(j, i)` runs candidate j's call
/// number i (counted from its warm-up on, to rotate its input sets). `warm_up_s` and `batch_s` are
/// normally `WARM_UP_S` and `BATCH_S`.
pub fn time_together(
    dev: &Device,
    n: usize,
    call: &mut dyn FnMut(usize, usize),
    (warm_up_s, batch_s): (f64, f64),
) -> Vec<Samples> {
    let mut calls = vec![0usize; n];
    // timed: a synchronize, `count` calls of candidate j, a synchronize
    let mut run = |j: usize, calls: &mut usize, count: usize| {
        dev.synchronize().unwrap();
        let start = Instant::now();
        for _ in 0..count {
            call(j, *calls);
            *calls += 1;
        }
        dev.synchronize().unwrap();
        start.elapsed().as_secs_f64()
    };
    let mut batch = vec![1usize; n];
    for j in 0..n {
        // doubling batches until the warm-up time is spent; the last one's rate sizes the rounds' batch
        let (mut spent, mut count) = (0.0, 1usize);
        loop {
            let t = run(j, &mut calls[j], count);
            spent += t;
            // at least 4 batches (15 calls): a slow first call (a module load, cuBLAS choosing its
            // algorithm) must not size the rounds' batches alone
            if (spent >= warm_up_s && count >= 8) || count >= 1 << 20 {
                let per_call = t / count as f64;
                batch[j] = if per_call > 0.0 {
                    ((batch_s / per_call).ceil() as usize).clamp(1, 1 << 20)
                } else {
                    1 << 20
                };
                break;
            }
            count *= 2;
        }
    }
    let mut samples: Vec<Vec<f64>> = (0..n).map(|_| Vec::with_capacity(ROUNDS)).collect();
    for round in 0..ROUNDS {
        for o in 0..n {
            let j = (round + o) % n;
            let t = run(j, &mut calls[j], batch[j]);
            samples[j].push(t / batch[j] as f64);
        }
    }
    samples.into_iter().map(Samples).collect()
}

/// One output of a row's check: its name, ours, cuBLAS's, and its row length (the last dimension).
pub type Output<'a> = (&'a str, &'a [bf16], &'a [bf16], usize);

/// The check column's text: of each output's rows, ‖ours − reference‖ / ‖reference‖ row by row (so one
/// wrong row among thousands still shows: over the whole tensor it would be diluted under the limit), the
/// largest, with its output's name; "MISMATCH" first when it is above `MISMATCH_ABOVE` or not a number
/// (NaN left where ours wrote nothing, lengths that differ, nothing compared).
pub fn compare(outputs: &[Output<'_>]) -> String {
    // NaN ranks above every number: the worst is a MISMATCH whenever any row is one
    let rank = |e: f64| if e.is_nan() { f64::INFINITY } else { e };
    let worst = outputs
        .iter()
        .map(|&(name, ours, reference, row)| (name, worst_row_difference(ours, reference, row)))
        .max_by(|a, b| rank(a.1).total_cmp(&rank(b.1)));
    match worst {
        None => "MISMATCH (nothing compared)".into(),
        Some((name, rel)) if rel.is_nan() || rel > MISMATCH_ABOVE => {
            format!("MISMATCH {name} {rel:.1e}")
        }
        Some((name, rel)) => format!("{rel:.1e} ({name})"),
    }
}

/// The largest `relative_difference` over the rows of `row` elements; NaN when the lengths differ, are
/// empty or not a multiple of `row`.
pub fn worst_row_difference(ours: &[bf16], reference: &[bf16], row: usize) -> f64 {
    if ours.len() != reference.len() || ours.is_empty() || row == 0 || ours.len() % row != 0 {
        return f64::NAN;
    }
    ours.chunks(row)
        .zip(reference.chunks(row))
        .map(|(o, r)| relative_difference(o, r))
        .fold(0.0, |w, e| {
            if e.is_nan() || w.is_nan() {
                f64::NAN
            } else {
                w.max(e)
            }
        })
}

/// ‖ours − reference‖ / ‖reference‖ in f64; NaN when the lengths differ or either holds a NaN or an
/// infinity; 0 when both are all zeros, infinite when only the reference is.
pub fn relative_difference(ours: &[bf16], reference: &[bf16]) -> f64 {
    if ours.len() != reference.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (o, r) in ours.iter().zip(reference) {
        let (o, r) = (o.to_f64(), r.to_f64());
        if !o.is_finite() || !r.is_finite() {
            return f64::NAN;
        }
        num += (o - r).powi(2);
        den += r.powi(2);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}
