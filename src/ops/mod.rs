//! Safe functional ops: each validates shapes, dtypes, devices, sizes and scalars, returns an [`Error`]
//! naming the argument on the first problem, then launches through [`crate::Device`].
//!
//! [`Error`]: crate::Error

mod adamw;
mod dora;
mod dora_layer;
mod grad_clip;
mod launch;
mod lora;
mod merge;
mod multi;
mod scale;
mod sm90;
pub(crate) mod validate;
mod workspace;

pub use adamw::{
    AdamState, AdamW, AdamwConstants, AdamwSchedule, adamw_step, adamw_step_scheduled,
    adamw_step_scheduled_with_copy, adamw_step_with_copy, reference_step as adamw_reference_step,
};
pub use dora::{
    dora_factor, dora_merge, dora_merge_counted, dora_norm, dora_unmerge, safe_dora_merge,
    safe_dora_unmerge,
};
pub use dora_layer::{
    DoraForwardOutput, DoraGradients, DoraSaved, dora_backward, dora_backward_into, dora_forward,
    dora_forward_into,
};
pub use grad_clip::{GradClip, clip_coefficient, grad_clip_reference};
pub use launch::mma_tile;
pub use lora::{
    ForwardOutput, GradMode, Gradients, lora_backward, lora_backward_into, lora_forward,
    lora_forward_into,
};
pub use merge::{
    NonFiniteCounts, merge, merge_counted, safe_merge, safe_unmerge, unmerge, unmerge_counted,
};
pub use multi::{lora_forward_multi, lora_forward_multi_into};
pub use scale::{mse_grad, scale};
pub use sm90::sm90_tile;
pub use validate::MAX_RANK;
pub use workspace::Workspace;
