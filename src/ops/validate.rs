//! Argument checks shared by the ops; each returns the error that names the argument.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Every dimension at least 1.
pub(crate) fn non_empty<T: Element>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<T>,
) -> Result<()> {
    if t.shape().is_empty() {
        return Err(Error::Shape {
            op,
            arg,
            expected: "at least 1 dimension (a 0-d tensor was given)".into(),
            got: Vec::new(),
        });
    }
    if t.numel() == 0 {
        return Err(Error::Empty {
            op,
            arg,
            shape: t.shape().to_vec(),
        });
    }
    Ok(())
}

/// Exactly `expected` (rendered in the error as e.g. `[M, K] = [3, 5]`).
pub(crate) fn shape<T: Element>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<T>,
    expected: &[usize],
    names: &str,
) -> Result<()> {
    if t.shape() != expected {
        return Err(Error::Shape {
            op,
            arg,
            expected: format!("{names} = {expected:?}"),
            got: t.shape().to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn dtype(
    op: &'static str,
    arg: &'static str,
    got: DType,
    expected: DType,
) -> Result<()> {
    if got != expected {
        return Err(Error::DType {
            op,
            arg,
            expected,
            got,
        });
    }
    Ok(())
}

pub(crate) fn finite(op: &'static str, arg: &'static str, v: f32) -> Result<()> {
    if !v.is_finite() {
        return Err(Error::NonFinite {
            op,
            arg,
            value: v as f64,
        });
    }
    Ok(())
}

/// `value` of `arg` is at most `max` (a kernel's or a grid's limit).
pub(crate) fn at_most(op: &'static str, arg: &'static str, value: usize, max: usize) -> Result<()> {
    if value > max {
        return Err(Error::TooLarge {
            op,
            arg,
            value,
            max,
        });
    }
    Ok(())
}

/// The largest M, N or K (rows, columns) the kernels take: below 2^31, so that their u32 tile arithmetic
/// (`(m + 127) / 128`, an index plus a tile) cannot wrap.
pub const MAX_DIM: usize = i32::MAX as usize;

/// Fits the kernels' 32-bit sizes.
pub(crate) fn fits_u32(op: &'static str, arg: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::TooLarge {
        op,
        arg,
        value: v,
        max: u32::MAX as usize,
    })
}

/// A non-empty rank-2 tensor; returns (rows, cols).
pub(crate) fn matrix<T: Element>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<T>,
    names: &str,
) -> Result<(usize, usize)> {
    non_empty(op, arg, t)?;
    match t.shape() {
        &[rows, cols] => Ok((rows, cols)),
        other => Err(Error::Shape {
            op,
            arg,
            expected: format!("a matrix {names}"),
            got: other.to_vec(),
        }),
    }
}

/// A non-empty tensor of rank ≥ 1 read as rows of its last dimension (activations [..., K]): returns
/// (the leading dimensions, rows = their product, the last dimension).
pub(crate) fn rows<T: Element>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<T>,
) -> Result<(Vec<usize>, usize, usize)> {
    non_empty(op, arg, t)?;
    let (&last, lead) = t.shape().split_last().expect("non_empty checked the rank");
    Ok((lead.to_vec(), lead.iter().product(), last))
}

/// Exactly `[lead..., last]` (the leading dimensions of the layer's input); `names` renders the
/// expected shape in the error, e.g. `[..., N]`.
pub(crate) fn rows_shape<T: Element>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<T>,
    lead: &[usize],
    last: usize,
    names: &str,
) -> Result<()> {
    shape(op, arg, t, &rows_of(lead, last), names)
}

/// The shape `[lead..., last]`.
pub(crate) fn rows_of(lead: &[usize], last: usize) -> Vec<usize> {
    lead.iter().copied().chain([last]).collect()
}

/// bf16 or f16: the tensor-core kernels' element types.
pub(crate) fn half_dtype(op: &'static str, arg: &'static str, got: DType) -> Result<()> {
    match got {
        DType::BF16 | DType::F16 => Ok(()),
        DType::F32 | DType::U32 => Err(Error::UnsupportedDType {
            op,
            arg,
            got,
            supported: "bf16 and f16",
        }),
    }
}

/// The largest LoRA rank the kernels take.
pub const MAX_RANK: usize = crate::params::LK_MAX_RANK as usize;

pub(crate) fn rank(op: &'static str, r: usize) -> Result<()> {
    if r == 0 || r > MAX_RANK {
        return Err(Error::Rank {
            op,
            r,
            max: MAX_RANK,
        });
    }
    Ok(())
}

/// The adapter pair of a layer with `n` outputs and `k` inputs: A [r, K] with 1 ≤ r ≤ 128 and
/// B [N, r]; `k_source` names where K comes from in the error. Returns r.
pub(crate) fn adapter<T: Element, U: Element>(
    op: &'static str,
    a: &Tensor<T>,
    b: &Tensor<U>,
    (n, k): (usize, usize),
    k_source: &str,
) -> Result<usize> {
    let (r, k_a) = matrix(op, "a", a, "[r, K]")?;
    rank(op, r)?;
    if k_a != k {
        return Err(Error::Shape {
            op,
            arg: "a",
            expected: format!("[r, K] with K = {k} ({k_source})"),
            got: a.shape().to_vec(),
        });
    }
    shape(op, "b", b, &[n, r], "[N, r]")?;
    Ok(r)
}

/// Every tensor of `others` is on `base`'s device (named `base_arg`): checked before an op's first
/// launch, where the launches would find a mismatch only one at a time, after earlier ones had written.
pub(crate) fn same_device(
    op: &'static str,
    (base_arg, base): (&'static str, &crate::device::Device),
    others: &[(&'static str, &crate::device::Device)],
) -> Result<()> {
    for (arg, dev) in others {
        if *dev != base {
            return Err(Error::DeviceMismatch {
                op,
                arg,
                expected: format!("{} ({base_arg}'s device)", base.describe()),
                got: dev.describe(),
            });
        }
    }
    Ok(())
}
