//! Global-norm gradient clipping (kernels/grad_clip.cu): PyTorch's `torch.nn.utils.clip_grad_norm_`,
//! the `max_grad_norm` (1.0 by default) of Hugging Face's Trainer, on the device. The norm over every
//! given gradient, `‖g‖ = √Σ gᵢ²`, and the coefficient `min(1, max_norm / (‖g‖ + 1e-6))` stay in device
//! memory and the gradients are scaled in place, so a training step clips without a host round trip,
//! and inside a graph ([`crate::Device::capture`]). Deterministic: fixed chunks and summation order, no
//! atomics, the same bits on every run.

use super::validate;
use crate::Device;
use crate::device::Arg;
use crate::error::{Error, Result};
use crate::kernel::kernels;
use crate::params::{
    LK_GRAD_CLIP_CHUNK, LK_SIMT_THREADS, LkGradClipCoefParams, LkGradClipParams, LkGradSumsqParams,
};
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

const OP: &str = "GradClip::clip";

/// Global-norm clipping of f32 gradients (the f32 master adapters' dA and dB of every layer that steps
/// together): [`GradClip::clip`] scales them by `min(1, max_norm / (norm + 1e-6))` in place, as PyTorch
/// does (a non-finite norm gives a NaN or 0 coefficient there too: check [`GradClip::norm`] when
/// logging). Holds its scratch memory (the partial sums, sized on first use) and the last result on
/// the device.
#[derive(Debug)]
pub struct GradClip {
    max_norm: f32,
    partials: Option<Tensor<f32>>,
    /// {norm, coefficient} of the last clip.
    result: Tensor<f32>,
}

impl GradClip {
    /// Clipping to `max_norm` (finite, > 0: an [`Error::OutOfRange`] naming it otherwise).
    pub fn new(device: &Device, max_norm: f32) -> Result<Self> {
        check_max_norm(max_norm)?;
        Ok(GradClip {
            max_norm,
            partials: None,
            result: Tensor::zeros(device, &[2])?,
        })
    }

    pub fn max_norm(&self) -> f32 {
        self.max_norm
    }

    /// Another bound from the next clip on (a schedule, say; a launch parameter: capture again).
    pub fn set_max_norm(&mut self, max_norm: f32) -> Result<()> {
        check_max_norm(max_norm)?;
        self.max_norm = max_norm;
        Ok(())
    }

    /// Computes the global norm of `grads` and scales each by the clip coefficient, in place, on the
    /// device (no synchronisation). Empty tensors count as zeros (all empty: norm 0, coefficient 1).
    /// A call needing more partial sums (Σ ⌈nᵢ / 16384⌉ over the tensors) than the scratch holds
    /// allocates a larger one, which a capture refuses, and which makes graphs captured before refuse to
    /// replay (their scratch is gone): in a graph, clip the same tensors once eagerly first. Checks come
    /// before the first launch, so a refused call leaves the gradients as they were (except a launch
    /// refused midway because another thread began a capture).
    pub fn clip(&mut self, grads: &mut [&mut Tensor<f32>]) -> Result<()> {
        let device = self.result.device().clone();
        if grads.is_empty() {
            return Err(Error::InvalidState {
                op: OP,
                message: "no gradients given".into(),
            });
        }
        // every check before the first launch: a refusal leaves the gradients as they were
        let mut blocks = Vec::with_capacity(grads.len());
        for g in grads.iter() {
            if g.device() != &device {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    arg: "grads",
                    expected: device.describe(),
                    got: g.device().describe(),
                });
            }
            validate::fits_u32(OP, "grads (one tensor's elements)", g.numel())?;
            blocks.push(g.numel().div_ceil(LK_GRAD_CLIP_CHUNK as usize));
        }
        let count: usize = blocks.iter().sum();
        let count32 = validate::fits_u32(OP, "grads (their partial sums)", count)?;
        // at least one element: the coefficient kernel takes the buffer even with no partial to add
        if self
            .partials
            .as_ref()
            .is_none_or(|p| p.numel() < count.max(1))
        {
            self.partials = Some(Tensor::zeros(&device, &[count.max(1)])?);
        }
        let partials = self.partials.as_mut().expect("made above");
        let mut first = 0usize;
        for (g, &nb) in grads.iter().zip(&blocks) {
            if nb == 0 {
                continue;
            }
            let n = g.numel() as u32;
            let plan = LaunchPlan {
                grid: [nb as u32, 1, 1],
                block: [LK_SIMT_THREADS, 1, 1],
                smem_bytes: 0,
            };
            let at = first;
            device.launch(
                OP,
                &kernels::GRAD_SUMSQ_F32,
                &plan,
                &mut [Arg::In("grads", &**g), Arg::Out("partials", &mut *partials)],
                |ptr| LkGradSumsqParams {
                    x: ptr[0] as *const f32,
                    partial: (ptr[1] + 4 * at as u64) as *mut f32,
                    n,
                },
            )?;
            first += nb;
        }
        let max_norm = self.max_norm;
        device.launch(
            OP,
            &kernels::GRAD_CLIP_COEF,
            &LaunchPlan {
                grid: [1, 1, 1],
                block: [32, 1, 1],
                smem_bytes: 0,
            },
            &mut [
                Arg::In("partials", &*partials),
                Arg::Out("result", &mut self.result),
            ],
            |ptr| LkGradClipCoefParams {
                partial: ptr[0] as *const f32,
                result: ptr[1] as *mut f32,
                count: count32,
                max_norm,
            },
        )?;
        for g in grads.iter_mut() {
            if g.numel() == 0 {
                continue;
            }
            let n = g.numel() as u32;
            device.launch(
                OP,
                &kernels::GRAD_CLIP_F32,
                &LaunchPlan::elementwise(g.numel(), LK_SIMT_THREADS, 4096),
                &mut [Arg::Out("grads", &mut **g), Arg::In("result", &self.result)],
                |ptr| LkGradClipParams {
                    x: ptr[0] as *mut f32,
                    result: ptr[1] as *const f32,
                    n,
                },
            )?;
        }
        Ok(())
    }

    /// The global norm before the last clip (a download: waits for the device).
    pub fn norm(&self) -> Result<f32> {
        Ok(self.result.to_vec()?[0])
    }

    /// The coefficient the last clip applied (1 where the norm was within the bound).
    pub fn coefficient(&self) -> Result<f32> {
        Ok(self.result.to_vec()?[1])
    }

    /// `{norm, coefficient}` of the last clip on the device, for a caller's own kernels or logging.
    pub fn result(&self) -> &Tensor<f32> {
        &self.result
    }
}

fn check_max_norm(max_norm: f32) -> Result<()> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::OutOfRange {
            op: "GradClip",
            arg: "max_norm",
            value: max_norm as f64,
            expected: "a finite bound > 0",
        });
    }
    Ok(())
}

/// The CPU reference: the f64 norm of `grads` and the coefficient the kernels compute from the f32 norm
/// (`min(1, max_norm / (norm + 1e-6))` in f32).
pub fn grad_clip_reference(grads: &[&[f32]], max_norm: f32) -> (f64, f32) {
    let sum: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| x as f64 * x as f64)
        .sum();
    let norm = sum.sqrt();
    (norm, clip_coefficient(norm as f32, max_norm))
}

/// `min(1, max_norm / (norm + 1e-6))` in f32, as the kernel computes it from its f32 norm (NaN stays NaN).
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    let c = max_norm / (norm + 1e-6);
    if c > 1.0 { 1.0 } else { c }
}
