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
use crate::params::{LK_SIMT_THREADS, LkAdamwConstants, LkAdamwParams};
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

/// AdamW's per-step constants in device memory, for steps captured into a graph
/// ([`crate::Device::capture`]): a replay repeats its launches' parameters, so [`adamw_step_scheduled`]
/// reads the step's constants from here, and the host calls [`AdamwSchedule::advance`] before each
/// replay (an upload, outside the capture). One schedule serves every parameter tensor that steps
/// together; the bits are [`adamw_step`]'s at the same step.
#[derive(Debug)]
pub struct AdamwSchedule {
    constants: Tensor<f32>,
    hp: AdamW,
    step: u64,
}

/// The constants' f32 words on the device, in `LkAdamwConstants`' order.
const SCHEDULE_WORDS: usize = std::mem::size_of::<LkAdamwConstants>() / 4;

impl AdamwSchedule {
    /// A schedule at step 0 (no constants yet: [`AdamwSchedule::advance`] before the first step).
    pub fn new(device: &Device, hp: AdamW) -> Result<Self> {
        hp.check()?;
        Ok(AdamwSchedule {
            constants: Tensor::zeros(device, &[SCHEDULE_WORDS])?,
            hp,
            step: 0,
        })
    }

    /// Uploads the constants of the next step and returns its number (1 for the first). Call it once
    /// before each replay of a graph holding [`adamw_step_scheduled`] (or before each eager call).
    pub fn advance(&mut self) -> Result<u64> {
        let t = self.step.checked_add(1).ok_or(Error::OutOfRange {
            op: "AdamwSchedule::advance",
            arg: "step",
            value: self.step as f64,
            expected: "below u64::MAX (the steps taken so far)",
        })?;
        let c = self.hp.constants(t);
        let words = [
            c.decay,
            c.beta1,
            c.one_minus_beta1,
            c.beta2,
            c.one_minus_beta2,
            c.step_size,
            c.bc2_sqrt,
            c.eps,
        ];
        self.constants.copy_from_slice(&words)?;
        self.step = t;
        Ok(t)
    }

    /// New hyperparameters (a learning-rate schedule, say) from the next [`AdamwSchedule::advance`] on.
    pub fn set_hyperparameters(&mut self, hp: AdamW) -> Result<()> {
        hp.check()?;
        self.hp = hp;
        Ok(())
    }

    /// The step whose constants are on the device (0 before the first advance).
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn hyperparameters(&self) -> &AdamW {
        &self.hp
    }
}

/// One AdamW step on `param` (f32 master weights) with `grad` (f32, same shape), updating `state`.
pub fn adamw_step(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    hp: &AdamW,
) -> Result<()> {
    step_impl::<half::bf16>(param, grad, state, None, Constants::Host(hp))
}

/// [`adamw_step`] with the step's constants read from `schedule` on the device, so it can be captured
/// into a graph (advance the schedule before each replay). `state.step` is left alone: the schedule
/// counts the steps.
pub fn adamw_step_scheduled(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    schedule: &AdamwSchedule,
) -> Result<()> {
    step_impl::<half::bf16>(param, grad, state, None, Constants::Device(schedule))
}

/// [`adamw_step_with_copy`] with the constants from `schedule` ([`adamw_step_scheduled`]).
pub fn adamw_step_scheduled_with_copy<C: Element>(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    copy: &mut Tensor<C>,
    schedule: &AdamwSchedule,
) -> Result<()> {
    step_impl(param, grad, state, Some(copy), Constants::Device(schedule))
}

/// Where a step's constants come from.
enum Constants<'a> {
    /// Computed on the host for `state.step + 1`, in the launch parameters (not capturable).
    Host(&'a AdamW),
    /// Read from a schedule's device memory.
    Device(&'a AdamwSchedule),
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
    step_impl(param, grad, state, Some(copy), Constants::Host(hp))
}

fn step_impl<C: Element>(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    state: &mut AdamState,
    copy: Option<&mut Tensor<C>>,
    constants: Constants<'_>,
) -> Result<()> {
    validate::non_empty(OP, "param", param)?;
    match constants {
        Constants::Host(hp) => {
            hp.check()?;
            // the step count (bias correction) is a launch parameter: a replay would repeat this step's
            param.device().refuse_changing_params_in_capture(
                "adamw_step (its step count, for the bias correction, is a launch parameter; \
                 adamw_step_scheduled reads it from device memory)",
            )?;
        }
        Constants::Device(schedule) => {
            if schedule.step == 0 {
                return Err(Error::InvalidState {
                    op: OP,
                    message:
                        "the AdamwSchedule is at step 0: call its advance() before the first step"
                            .into(),
                });
            }
        }
    }
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
    // the constants of the step this call takes (1 for the first); a count that cannot advance is an
    // error, not a wrap to step 0 (whose bias corrections are 0: inf and NaN weights)
    let (c, next_step, schedule) = match constants {
        Constants::Host(hp) => {
            let t = state.step.checked_add(1).ok_or(Error::OutOfRange {
                op: OP,
                arg: "state.step",
                value: state.step as f64,
                expected: "below u64::MAX (the steps taken so far)",
            })?;
            (hp.constants(t), t, None)
        }
        // the kernel reads the schedule's; the launch's own are NaN, so a kernel that used them
        // would poison every weight
        Constants::Device(s) => {
            let nan = AdamwConstants {
                decay: f32::NAN,
                beta1: f32::NAN,
                one_minus_beta1: f32::NAN,
                beta2: f32::NAN,
                one_minus_beta2: f32::NAN,
                step_size: f32::NAN,
                bc2_sqrt: f32::NAN,
                eps: f32::NAN,
            };
            (nan, state.step, Some(&s.constants))
        }
    };
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
    let has_schedule = schedule.is_some();
    if let Some(schedule) = schedule {
        args.push(Arg::In("schedule", schedule));
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
        schedule: if has_schedule {
            ptr[ptr.len() - 1] as *const LkAdamwConstants
        } else {
            std::ptr::null()
        },
        n,
        c: LkAdamwConstants {
            decay: c.decay,
            beta1: c.beta1,
            one_minus_beta1: c.one_minus_beta1,
            beta2: c.beta2,
            one_minus_beta2: c.one_minus_beta2,
            step_size: c.step_size,
            bc2_sqrt: c.bc2_sqrt,
            eps: c.eps,
        },
    })?;
    state.step = next_step;
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
