//! In-place merge and unmerge of an adapter into its base weight (kernels/merge.cu):
//! `W0 ← round(W0 ± s·B·A)`, f32 arithmetic, one rounding per element, one read and one write of W0.

use super::launch;
use super::validate;
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

fn merge_impl<T: Element, U: Element>(
    op: &'static str,
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<()> {
    let (n, k) = validate::matrix(op, "w0", w0, "[N, K]")?;
    let r = validate::adapter(op, a, b, (n, k), "the columns of w0")?;
    validate::finite(op, "scale", scale)?;
    validate::fits_u32(op, "w0", n * k)?;
    launch::merge(op, w0, a, b, (n, k, r), scale)
}

/// `W0 ← round(W0 + s·B·A)` in place. A [r, K], B [N, r] in f32 or in W0's dtype.
pub fn merge<T: Element, U: Element>(
    w0: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<()> {
    merge_impl("merge", w0, a, b, scale)
}

/// `W ← round(W − s·B·A)` in place: the inverse of [`merge`] up to the rounding of the merged value.
pub fn unmerge<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    scale: f32,
) -> Result<()> {
    merge_impl("unmerge", w, a, b, -scale)
}
