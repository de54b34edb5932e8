//! In-place merge and unmerge of an adapter into its base weight (kernels/merge.cu):
//! `W0 ← round(W0 ± s·B·A)`, f32 arithmetic, one rounding per element, one read and one write of W0.
//!
//! [`merge`]/[`unmerge`] write whatever comes out. [`safe_merge`]/[`safe_unmerge`] (PEFT's
//! `merge(safe_merge=True)`) refuse to turn an element that is finite in W0 into NaN or ±Inf and then
//! leave W0 as it was; [`merge_counted`]/[`unmerge_counted`] merge and count in one pass, for callers
//! that keep the original W0 elsewhere (the checkpoint merge, which downloads the result only when the
//! counts allow it). The counts come from the merge kernel itself (per-block sums, no atomics, the
//! same on every run).

use super::launch::{self, DoraRows, MergeMode};
use super::validate;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::params::{LK_MERGE_COUNT_IN_W, LK_MERGE_COUNT_INF, LK_MERGE_COUNT_NAN, LK_MERGE_ROWS};
use crate::tensor::Tensor;

/// Non-finite elements of a merge, counted by the merge kernel in the pass that computes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonFiniteCounts {
    /// Elements finite in W0 that are NaN after the merge (a NaN in A or B, or ∞·0, ∞ − ∞ inside
    /// s·B·A).
    pub nan: u64,
    /// Elements finite in W0 that are ±Inf after the merge (an Inf in A or B, or a merged value past
    /// the range of W0's dtype, rounded to Inf).
    pub inf: u64,
    /// Elements already NaN or ±Inf in W0. Not an error: they go through the merge as the arithmetic
    /// leaves them (an Inf stays that Inf unless s·B·A is NaN or the opposite Inf; a NaN stays NaN).
    pub in_base: u64,
}

impl NonFiniteCounts {
    /// Elements finite in W0 and NaN or ±Inf after the merge: what a safe merge refuses.
    pub fn created(&self) -> u64 {
        self.nan + self.inf
    }

    pub(super) fn from_kernel(c: launch::MergeCounts) -> Self {
        NonFiniteCounts {
            nan: c[LK_MERGE_COUNT_NAN as usize],
            inf: c[LK_MERGE_COUNT_INF as usize],
            in_base: c[LK_MERGE_COUNT_IN_W as usize],
        }
    }

    /// The error a safe merge returns for these counts (`created() > 0`): `target` names the weight,
    /// `outcome` says what was left as it was.
    pub(crate) fn error(
        &self,
        op: &'static str,
        target: String,
        elements: usize,
        dtype: crate::DType,
        outcome: &'static str,
    ) -> Error {
        Error::NonFiniteMerge {
            op,
            target,
            nan: self.nan,
            inf: self.inf,
            elements: elements as u64,
            dtype,
            outcome,
        }
    }
}

/// The merge's checks (shared with the DoRA merge): (N, K, r) of W0 [N, K], A [r, K], B [N, r].
pub(super) fn check<T: Element, U: Element>(
    op: &'static str,
    w0: &Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<(usize, usize, usize)> {
    let (n, k) = validate::matrix(op, "w0", w0, "[N, K]")?;
    let r = validate::adapter(op, a, b, (n, k), "the columns of w0")?;
    validate::finite(op, "scale", scale)?;
    validate::at_most(op, "K (columns of w0)", k, validate::MAX_DIM)?;
    // one block row per LK_MERGE_ROWS rows of W: a launch grid's y of at most 65535
    validate::at_most(op, "N (rows of w0)", n, 65535 * LK_MERGE_ROWS as usize)?;
    validate::fits_u32(op, "w0", n * k)?;
    Ok((n, k, r))
}

/// `v` (`arg`) is `[N]` f32 on W0's device: a DoRA magnitude or row factor, checked before the first
/// launch, so a refusal changes nothing.
pub(super) fn check_rows<T: Element>(
    op: &'static str,
    arg: &'static str,
    v: &Tensor<f32>,
    w0: &Tensor<T>,
    n: usize,
) -> Result<()> {
    validate::shape(op, arg, v, &[n], "[N] (one per row of w0)")?;
    if v.device() != w0.device() {
        return Err(Error::DeviceMismatch {
            op,
            arg,
            expected: w0.device().describe(),
            got: v.device().describe(),
        });
    }
    Ok(())
}

/// The merge (DoRA's with its row factors, `dora`) after the checks, the factors' included.
pub(super) fn merge_impl<T: Element, U: Element>(
    op: &'static str,
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
    mode: MergeMode,
    dora: DoraRows<'_>,
) -> Result<Option<NonFiniteCounts>> {
    let dims @ (n, _, _) = check(op, w0, a, b, scale)?;
    if let DoraRows::Scale(f) | DoraRows::Divide(f) = dora {
        check_rows(op, "factor", f, w0, n)?;
    }
    let counts = launch::merge(op, w0, a, b, dims, scale, mode, dora)?;
    Ok(counts.map(NonFiniteCounts::from_kernel))
}

/// Checks first (a counting pass that only reads W0), then merges only when no finite element would
/// become NaN or ±Inf: an in-place merge cannot undo its own writes without a copy of W0, and this
/// costs one more read of W0 and the B·A products again, but no memory.
pub(super) fn safe_impl<T: Element, U: Element>(
    op: &'static str,
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
    dora: DoraRows<'_>,
) -> Result<NonFiniteCounts> {
    let counts = merge_impl(op, w0, a, b, scale, MergeMode::CountOnly, dora)?
        .expect("a counting launch returns counts");
    if counts.created() > 0 {
        return Err(counts.error(op, "w0".into(), w0.numel(), T::DTYPE, "w0 is unchanged"));
    }
    merge_impl(op, w0, a, b, scale, MergeMode::Write, dora)?;
    Ok(counts)
}

/// `W0 ← round(W0 + s·B·A)` in place. A [r, K], B [N, r] in f32 or in W0's dtype.
pub fn merge<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<()> {
    merge_impl("merge", w0, a, b, scale, MergeMode::Write, DoraRows::None).map(|_| ())
}

/// `W ← round(W − s·B·A)` in place: the inverse of [`merge`] up to the rounding of the merged value.
pub fn unmerge<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<()> {
    merge_impl("unmerge", w, a, b, -scale, MergeMode::Write, DoraRows::None).map(|_| ())
}

/// [`merge`], refusing to make a finite element of W0 NaN or ±Inf (PEFT's `safe_merge`): then it
/// returns [`Error::NonFiniteMerge`] with the counts and W0 is unchanged. Elements already NaN or ±Inf
/// in W0 are no error; the returned counts say how many (`in_base`). The merged bits are those of
/// [`merge`]. Cost: two launches, a counting pass that reads W0 (and computes B·A) without writing,
/// then the merge; no extra memory.
pub fn safe_merge<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<NonFiniteCounts> {
    safe_impl("safe_merge", w0, a, b, scale, DoraRows::None)
}

/// [`unmerge`] with the check of [`safe_merge`].
pub fn safe_unmerge<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<NonFiniteCounts> {
    safe_impl("safe_unmerge", w, a, b, -scale, DoraRows::None)
}

/// [`merge`] and the non-finite counts of the result in the same pass (one launch, one read and one
/// write of W0, as [`merge`]). W0 is written whatever the counts say: for callers that keep the
/// original (a checkpoint merge works on a copy and keeps it only when `created() == 0`).
pub fn merge_counted<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<NonFiniteCounts> {
    let counts = merge_impl(
        "merge",
        w0,
        a,
        b,
        scale,
        MergeMode::WriteCount,
        DoraRows::None,
    )?;
    Ok(counts.expect("a counting launch returns counts"))
}

/// [`unmerge`] and its counts in one pass, as [`merge_counted`].
pub fn unmerge_counted<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<NonFiniteCounts> {
    let counts = merge_impl(
        "unmerge",
        w,
        a,
        b,
        -scale,
        MergeMode::WriteCount,
        DoraRows::None,
    )?;
    Ok(counts.expect("a counting launch returns counts"))
}
