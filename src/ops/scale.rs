//! `y = s * x` elementwise (kernels/scale.cu): the trivial op that exercises the whole path.

use super::validate;
use crate::device::Arg;
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::kernel::{Kernel, kernels};
use crate::params::{LK_SIMT_THREADS, LkScaleParams};
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

const OP: &str = "scale";
/// Grid cap: the kernel is grid-stride, more blocks only add scheduling.
const MAX_BLOCKS: u32 = 4096;

fn kernel_for(dtype: DType) -> &'static Kernel<LkScaleParams> {
    match dtype {
        DType::BF16 => &kernels::SCALE_BF16,
        DType::F16 => &kernels::SCALE_F16,
        DType::F32 => &kernels::SCALE_F32,
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
        kernel_for(T::DTYPE),
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
