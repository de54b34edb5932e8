//! Safe functional ops: each validates shapes, dtypes, devices, sizes and scalars, returns an [`Error`]
//! naming the argument on the first problem, then launches through [`crate::Device`].
//!
//! [`Error`]: crate::Error

mod launch;
mod lora;
mod merge;
mod scale;
pub(crate) mod validate;
mod workspace;

pub use lora::{
    ForwardOutput, GradMode, Gradients, lora_backward, lora_backward_into, lora_forward,
    lora_forward_into,
};
pub use merge::{
    NonFiniteCounts, merge, merge_counted, safe_merge, safe_unmerge, unmerge, unmerge_counted,
};
pub use scale::scale;
pub use validate::MAX_RANK;
pub use workspace::Workspace;
