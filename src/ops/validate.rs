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

/// Fits the kernels' 32-bit sizes.
pub(crate) fn fits_u32(op: &'static str, arg: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::TooLarge {
        op,
        arg,
        value: v,
        max: u32::MAX as usize,
    })
}
