//! DoRA merge and unmerge (weight-decomposed LoRA, arXiv 2402.09353; PEFT's `use_dora`), on the merge
//! kernel (kernels/merge.cu, the `dora_merge_*` kernels).
//!
//! A DoRA adapter adds a magnitude vector m (one f32 per row of W0, PEFT's `lora_magnitude_vector`) to
//! lora_A and lora_B. Its merge rescales each row of the LoRA merge to that magnitude:
//! `W0 ← round(factor ⊙ v)`, `v = W0 + s·B·A`, `factor = m / ‖v‖` (row norms), as PEFT's
//! `merge_and_unload` computes it: v rounded to f32 as in [`super::merge`], the norm rounded to f32,
//! the division and the product in f32, one rounding to W0's dtype. The norm's sum of squares is f32
//! per block of 128 columns, then f64 across blocks in a fixed order: the same bits on every run.
//!
//! Cost: three launches and a scratch of `ceil(K/128)·N` f32. W0 is read twice (the norm pass, then the
//! merge, each recomputing B·A) and written once. They allocate, so they cannot be captured in a graph.
//!
//! The merge returns the row factors: undoing it needs them ([`dora_unmerge`]; PEFT caches its
//! `weight_norm` for the same reason). A merged checkpoint alone cannot be unmerged: the merged rows'
//! norms are the magnitudes whatever W0 was.

use super::launch::{self, DoraRows, MergeMode};
use super::merge::{self, NonFiniteCounts, check_rows};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

/// DoRA's row factors `m / ‖W0 + s·B·A‖` (f32, `[N]`) without merging: the norm pass and the factor
/// kernel of [`dora_merge`], W0 only read.
pub fn dora_factor<T: Element, U: Element>(
    w0: &Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: &Tensor<f32>,
    scale: f32,
) -> Result<Tensor<f32>> {
    factor_impl("dora_factor", w0, a, b, magnitude, scale, None)
}

/// The row norms `‖W0 + s·B·A‖` (f32, `[N]`) as the norm pass computes them: PEFT's `get_weight_norm`,
/// with which it initialises a DoRA adapter's magnitude (B = 0: the norms of W0's rows).
pub fn dora_norm<T: Element, U: Element>(
    w0: &Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<Tensor<f32>> {
    let op = "dora_norm";
    let (n, _, _) = merge::check(op, w0, a, b, scale)?;
    // factors of a unit magnitude, computed beside the norms and dropped
    let ones = Tensor::from_slice(w0.device(), &vec![1.0f32; n], &[n])?;
    let mut norm = Tensor::<f32>::for_output(w0.device(), &[n])?;
    factor_impl(op, w0, a, b, &ones, scale, Some(&mut norm))?;
    Ok(norm)
}

fn factor_impl<T: Element, U: Element>(
    op: &'static str,
    w0: &Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: &Tensor<f32>,
    scale: f32,
    norm: Option<&mut Tensor<f32>>,
) -> Result<Tensor<f32>> {
    let dims @ (n, k, _) = merge::check(op, w0, a, b, scale)?;
    check_rows(op, "magnitude", magnitude, w0, n)?;
    let device = w0.device();
    // ceil(K/128)·N partial sums: at most N·K, which merge::check keeps within u32
    let blocks = launch::dora_sumsq_blocks(k);
    let mut sumsq = Tensor::<f32>::for_output(device, &[blocks, n])?;
    launch::dora_row_sumsq(op, w0, a, b, dims, scale, &mut sumsq)?;
    let mut factor = Tensor::<f32>::for_output(device, &[n])?;
    launch::dora_factor(op, &sumsq, magnitude, &mut factor, norm, (n, blocks))?;
    Ok(factor)
}

fn merge_impl<T: Element, U: Element>(
    op: &'static str,
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: &Tensor<f32>,
    scale: f32,
    mode: MergeMode,
) -> Result<(Tensor<f32>, Option<NonFiniteCounts>)> {
    let factor = factor_impl(op, w0, a, b, magnitude, scale, None)?;
    let counts = merge::merge_impl(op, w0, a, b, scale, mode, DoraRows::Scale(&factor))?;
    Ok((factor, counts))
}

/// DoRA merge in place: `W0 ← round(factor ⊙ (W0 + s·B·A))` with `factor = magnitude / ‖W0 + s·B·A‖`
/// per row, PEFT's merge of a `use_dora` adapter. A [r, K], B [N, r] in f32 or in W0's dtype, magnitude
/// `[N]` f32. Returns the factors (`[N]` f32), which [`dora_unmerge`] needs. A row whose merged norm is 0
/// gets the factor m/0 (±Inf, NaN for m = 0) and NaN or ±Inf elements, as in PEFT: [`safe_dora_merge`]
/// refuses that.
pub fn dora_merge<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: &Tensor<f32>,
    scale: f32,
) -> Result<Tensor<f32>> {
    merge_impl("dora_merge", w0, a, b, magnitude, scale, MergeMode::Write).map(|(f, _)| f)
}

/// [`dora_merge`] and the non-finite counts of the result from its last pass (as
/// [`super::merge_counted`]): W0 is written whatever they say.
pub fn dora_merge_counted<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: &Tensor<f32>,
    scale: f32,
) -> Result<(Tensor<f32>, NonFiniteCounts)> {
    let (f, c) = merge_impl(
        "dora_merge",
        w0,
        a,
        b,
        magnitude,
        scale,
        MergeMode::WriteCount,
    )?;
    Ok((f, c.expect("a counting launch returns counts")))
}

/// [`dora_merge`], refusing to make a finite element of W0 NaN or ±Inf (PEFT's `safe_merge`): then it
/// returns [`crate::Error::NonFiniteMerge`] and W0 is unchanged. One more pass than [`dora_merge`] (a
/// counting pass that only reads W0), as [`super::safe_merge`].
pub fn safe_dora_merge<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: &Tensor<f32>,
    scale: f32,
) -> Result<(Tensor<f32>, NonFiniteCounts)> {
    let op = "safe_dora_merge";
    let factor = factor_impl(op, w0, a, b, magnitude, scale, None)?;
    let counts = merge::safe_impl(op, w0, a, b, scale, DoraRows::Scale(&factor))?;
    Ok((factor, counts))
}

/// Undoes [`dora_merge`] given its factors: `W ← round(W / factor − s·B·A)` per row, PEFT's unmerge
/// of a DoRA adapter (with its cached weight norm). The inverse of the merge up to its roundings.
pub fn dora_unmerge<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    factor: &Tensor<f32>,
    scale: f32,
) -> Result<()> {
    let rows = DoraRows::Divide(factor);
    merge::merge_impl("dora_unmerge", w, a, b, -scale, MergeMode::Write, rows).map(|_| ())
}

/// [`dora_unmerge`], refusing to make a finite element NaN or ±Inf (as [`super::safe_unmerge`]): then
/// [`crate::Error::NonFiniteMerge`] and W unchanged. A counting pass first.
pub fn safe_dora_unmerge<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    factor: &Tensor<f32>,
    scale: f32,
) -> Result<NonFiniteCounts> {
    merge::safe_impl(
        "safe_dora_unmerge",
        w,
        a,
        b,
        -scale,
        DoraRows::Divide(factor),
    )
}
