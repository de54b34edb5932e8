//! `y = s * x` elementwise (kernels/scale.cu): the trivial op that exercises the whole path.

use super::validate;
use crate::device::Arg;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, kernels};
use crate::params::{LK_SIMT_THREADS, LkScaleParams};
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

const OP: &str = "scale";
/// Grid cap: the kernel is grid-stride, more blocks only add scheduling.
const MAX_BLOCKS: u32 = 4096;

fn kernel_for(dtype: DType) -> Result<&'static Kernel<LkScaleParams>> {
    match dtype {
        DType::BF16 => Ok(&kernels::SCALE_BF16),
        DType::F16 => Ok(&kernels::SCALE_F16),
        DType::F32 => Ok(&kernels::SCALE_F32),
        DType::U32 => Err(Error::UnsupportedDType {
            op: OP,
            arg: "x",
            got: dtype,
            supported: "bf16, f16 and f32",
        }),
    }
}

/// `y[i] = s * x[i]`, computed in f32 and rounded once to the dtype. `x` and `y` must have the same
/// shape and dtype, be on the same device, be non-empty, and `s` must be finite.
pub fn scale<T: Element, U: Element>(x: &Tensor<T>, s: f32, y: &mut Tensor<U>) -> Result<()> {
    validate::non_empty(OP, "x", x)?;
    validate::dtype(OP, "y", U::DTYPE, T::DTYPE)?;
    validate::shape(OP, "y", y, x.shape(), "shape of x")?;
    validate::finite(OP, "s", s)?;
    let n = validate::fits_u32(OP, "x", x.numel())?;
    let plan = LaunchPlan::elementwise(x.numel(), LK_SIMT_THREADS, MAX_BLOCKS);
    let device = x.device().clone();
    device.launch(
        OP,
        kernel_for(T::DTYPE)?,
        &plan,
        &mut [Arg::In("x", x), Arg::Out("y", y)],
        |ptrs| LkScaleParams {
            x: ptrs[0] as *const _,
            y: ptrs[1] as *mut _,
            scale: s,
            n,
        },
    )
}

/// `dy[i] = round(s · (y[i] − target[i]))` (kernels/mse_grad.cu): the gradient of the loss
/// `½·s·Σ(y − target)²` with respect to `y`, on the device (with `s = 1/numel`, of ½·mean((y − target)²)).
/// bf16 or f16; `y`, `target` and `dy` of one shape and device; `s` finite. f32 arithmetic, one rounding:
/// the same bits as `reference::mse_grad`.
pub fn mse_grad<T: Element>(
    y: &Tensor<T>,
    target: &Tensor<T>,
    s: f32,
    dy: &mut Tensor<T>,
) -> Result<()> {
    const OP: &str = "mse_grad";
    validate::non_empty(OP, "y", y)?;
    validate::half_dtype(OP, "y", T::DTYPE)?;
    validate::shape(OP, "target", target, y.shape(), "the shape of y")?;
    validate::shape(OP, "dy", dy, y.shape(), "the shape of y")?;
    validate::finite(OP, "s", s)?;
    let n = validate::fits_u32(OP, "y", y.numel())?;
    let kernel = match T::DTYPE {
        DType::BF16 => &kernels::MSE_GRAD_BF16,
        _ => &kernels::MSE_GRAD_F16,
    };
    let plan = LaunchPlan::elementwise(y.numel(), LK_SIMT_THREADS, MAX_BLOCKS);
    let device = y.device().clone();
    device.launch(
        OP,
        kernel,
        &plan,
        &mut [
            Arg::In("y", y),
            Arg::In("target", target),
            Arg::Out("dy", dy),
        ],
        |ptrs| crate::params::LkMseGradParams {
            y: ptrs[0] as *const _,
            target: ptrs[1] as *const _,
            dy: ptrs[2] as *mut _,
            n,
            scale: s,
        },
    )
}
