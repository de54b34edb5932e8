//! lora-kernels: hand-written CUDA kernels for LoRA (Low-Rank Adaptation) fine-tuning.
//!
//! Layers, from the bottom:
//! - `kernels/*.cu` (CUDA C++), each kernel taking one params struct from `kernels/include/lora_params.h`
//!   ([`params`] is its bindgen output);
//! - [`kernel`]: the table of compiled kernels, [`plan`]: grid/block/shared-memory of a launch;
//! - [`Device`]: a CUDA GPU (cudarc, loaded at run time) or the CPU emulator that runs the same
//!   kernel source; [`Tensor`]: typed storage on a device;
//! - [`ops`]: safe functional ops that validate everything, then launch;
//! - [`LoraLinear`]: the trainer-facing layer (adapters, merge/unmerge, task switching);
//! - [`reference`](mod@reference): the f64 CPU oracle every kernel is tested against.

pub mod adapter_set;
pub mod checkpoint;
pub mod device;
pub mod dropout;
pub mod dtype;
pub mod error;
pub mod kernel;
pub mod linear;
pub mod memory;
pub mod ops;
pub mod params;
pub mod peft;
pub mod plan;
pub mod probe;
pub mod reference;
pub mod tensor;
pub mod tma;

pub use adapter_set::{AdapterIndex, AdapterSet};
pub use device::{Device, EmuConfig, Graph, MmaModel, ThreadOrder};
pub use dropout::{Dropout, DropoutArg, DropoutSchedule};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use linear::{Adapter, LoraConfig, LoraLinear};
pub use plan::LaunchPlan;
pub use tensor::Tensor;

/// Re-exported so users can pass their own `CudaSlice`s without a version clash.
pub use cudarc;
pub use half::{bf16, f16};
