//! One fused AdamW step over f32 master weights on the device (kernels/adamw.cu): the moments, the
//! weights and, optionally, the layer-dtype copy the LoRA kernels read, in one pass, with nothing read
//! back to the host. The formula is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias
//! correction); every f32 operation is rounded once in a fixed order, so [`reference_step`] on the CPU
//! gives the same bits.

use super::validate;
use crate::device::{Arg, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel::kernels;
use crate::params::{LK_SIMT_THREADS, LkAdamwParams};
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

const OP: &str = "adamw_step";
const MAX_BLOCKS: u32 = 4096;

/// AdamW's hyperparameters (PyTorch's defaults with [`AdamW::default`], `lr` 1e-3, betas (0.9, 0.999),
/// eps 1e-8, weight decay 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The per-step f32 constants of the kernel (computed in f64 on the host, each rounded once).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwConstants {
    pub decay: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamW {
    fn check(&self) -> Result<()> {
        let range = |arg: &'static str, v: f32, ok: bool, expected: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(Error::OutOfRange {
                    op: OP,
                    arg,
                    value: v as f64,
                    expected,
                })
            }
        };
        range(
            "lr",
            self.lr,
            self.lr.is_finite() && self.lr >= 0.0,
            "a finite lr >= 0",
        )?;
        range(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "0 <= beta1 < 1",
        )?;
        range(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "0 <= beta2 < 1",
        )?;
        range(
            "eps",
            self.eps,
            self.eps.is_finite() && self.eps > 0.0,
            "a finite eps > 0",
        )?;
        range(
            "weight_decay",
            self.weight_decay,
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "a finite weight_decay >= 0",
        )
    }

    /// The constants of step `t` (1 for the first step).
    pub fn constants(&self, t: u64) -> AdamwConstants {
        let (lr, b1, b2) = (self.lr as f64, self.beta1 as f64, self.beta2 as f64);
        let t = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        AdamwConstants {
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            beta1: self.beta1,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: self.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps,
        }
    }
}

/// AdamW's state for one parameter tensor: the f32 moments and the number of steps taken.
#[derive(Debug)]
pub struct AdamState {
    pub m: Tensor<f32>,
    pub v: Tensor<f32>,
    pub step: u64,
}

impl AdamState {
    /// Zero moments for a parameter of `shape`, no step taken.
    pub fn new(device: &Device, shape: &[usize]) -> Result<Self> {
        Ok(AdamState {
            m: Tensor::zeros(device, shape)?,
            v: Tensor::zeros(device, shape)?,
            step: 0,
        })
    }
}

/// One AdamW step on `param` (f32 master weights) with `grad` (f32, same shape), updating `state`.
pub fn adamw_step(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    hp: &AdamW,
) -> Result<()> {
    step_impl::<half::bf16>(param, grad, state, None, hp)
}

/// [`adamw_step`] that also writes `copy = round(param)` (bf16 or f16, same shape) in the same pass:
/// the layer-dtype adapter a 16-bit-adapter forward reads.
pub fn adamw_step_with_copy<C: Element>(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    copy: &mut Tensor<C>,
    hp: &AdamW,
) -> Result<()> {
    step_impl(param, grad, state, Some(copy), hp)
}

fn step_impl<C: Element>(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    copy: Option<&mut Tensor<C>>,
    hp: &AdamW,
) -> Result<()> {
    hp.check()?;
    validate::non_empty(OP, "param", param)?;
    // the step count (bias correction) is a launch parameter: a replay would repeat this step's
    param.device().refuse_changing_params_in_capture(
        "adamw_step (its step count, for the bias correction, is a launch parameter)",
    )?;
    let shape = param.shape().to_vec();
    validate::shape(OP, "grad", grad, &shape, "the shape of param")?;
    validate::shape(OP, "state.m", &state.m, &shape, "the shape of param")?;
    validate::shape(OP, "state.v", &state.v, &shape, "the shape of param")?;
    let kernel = match C::DTYPE {
        DType::BF16 => &kernels::ADAMW_BF16,
        DType::F16 => &kernels::ADAMW_F16,
        got => {
            return Err(Error::UnsupportedDType {
                op: OP,
                arg: "copy",
                got,
                supported: "bf16 and f16 (the f32 master weights are `param` itself)",
            });
        }
    };
    if let Some(c) = copy.as_deref() {
        validate::shape(OP, "copy", c, &shape, "the shape of param")?;
    }
    let n = validate::fits_u32(OP, "param", param.numel())?;
    // the step this call takes (1 for the first); a count that cannot advance is an error, not a wrap
    // to step 0 (whose bias corrections are 0: inf and NaN weights)
    let t = state.step.checked_add(1).ok_or(Error::OutOfRange {
        op: OP,
        arg: "state.step",
        value: state.step as f64,
        expected: "below u64::MAX (the steps taken so far)",
    })?;
    let c = hp.constants(t);
    let plan = LaunchPlan::elementwise(param.numel(), LK_SIMT_THREADS, MAX_BLOCKS);
    let device = param.device().clone();
    let has_copy = copy.is_some();
    let mut args = vec![
        Arg::In("grad", grad),
        Arg::Out("param", param),
        Arg::Out("state.m", &mut state.m),
        Arg::Out("state.v", &mut state.v),
    ];
    if let Some(copy) = copy {
        args.push(Arg::Out("copy", copy));
    }
    device.launch(OP, kernel, &plan, &mut args, |ptr| LkAdamwParams {
        grad: ptr[0] as *const f32,
        param: ptr[1] as *mut f32,
        m: ptr[2] as *mut f32,
        v: ptr[3] as *mut f32,
        copy: if has_copy {
            ptr[4] as *mut _
        } else {
            std::ptr::null_mut()
        },
        n,
        decay: c.decay,
        beta1: c.beta1,
        one_minus_beta1: c.one_minus_beta1,
        beta2: c.beta2,
        one_minus_beta2: c.one_minus_beta2,
        step_size: c.step_size,
        bc2_sqrt: c.bc2_sqrt,
        eps: c.eps,
    })?;
    state.step = t;
    Ok(())
}

/// The CPU reference of one step: the kernel's formula, operation for operation in f32 (Rust never
/// contracts `a * b + c` into an FMA), so it gives the kernel's bits.
pub fn reference_step(
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    c: &AdamwConstants,
) {
    for i in 0..param.len() {
        let g = grad[i];
        let w = param[i] * c.decay;
        let mi = c.beta1 * m[i] + c.one_minus_beta1 * g;
        let vi = c.beta2 * v[i] + c.one_minus_beta2 * (g * g);
        let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
        param[i] = w + -(c.step_size * (mi / denom));
        m[i] = mi;
        v[i] = vi;
    }
}
