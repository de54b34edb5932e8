//! The crate's error type: every bad input is a value naming the argument and what was expected.

use crate::dtype::DType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: argument `{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: Vec<usize>,
    },
    #[error("{op}: argument `{arg}` has dtype {got}, expected {expected}")]
    DType {
        op: &'static str,
        arg: &'static str,
        expected: DType,
        got: DType,
    },
    #[error(
        "{op}: argument `{arg}` is empty (shape {shape:?}); every dimension must be at least 1"
    )]
    Empty {
        op: &'static str,
        arg: &'static str,
        shape: Vec<usize>,
    },
    #[error("{op}: argument `{arg}` has dtype {got}; this op supports {supported}")]
    UnsupportedDType {
        op: &'static str,
        arg: &'static str,
        got: DType,
        supported: &'static str,
    },
    #[error("{op}: LoRA rank r = {r} is out of range, expected 1 ..= {max}")]
    Rank {
        op: &'static str,
        r: usize,
        max: usize,
    },
    #[error("{op}: argument `{arg}` lives on {got}, expected a tensor of {expected}")]
    DeviceMismatch {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: String,
    },
    #[error("{op}: argument `{arg}` {requirement}")]
    Alignment {
        op: &'static str,
        arg: &'static str,
        requirement: String,
    },
    #[error(
        "{op}: arguments `{a}` and `{b}` overlap in memory; the output must not alias an input"
    )]
    Aliasing {
        op: &'static str,
        a: &'static str,
        b: &'static str,
    },
    #[error("{op}: argument `{arg}` = {value} is out of range, expected {expected}")]
    OutOfRange {
        op: &'static str,
        arg: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("{op}: argument `{arg}` = {value} must be finite")]
    NonFinite {
        op: &'static str,
        arg: &'static str,
        value: f64,
    },
    #[error(
        "{op}: argument `{arg}` has {got} elements, expected {expected} (the product of shape {shape:?})"
    )]
    DataLength {
        op: &'static str,
        arg: &'static str,
        expected: usize,
        got: usize,
        shape: Vec<usize>,
    },
    #[error("{op}: size {value} of `{arg}` exceeds the limit of {max}")]
    TooLarge {
        op: &'static str,
        arg: &'static str,
        value: usize,
        max: usize,
    },
    #[error(
        "{op}: {target}: {created} of {elements} elements finite in the base would become NaN or \
         ±Inf ({nan} NaN, {inf} ±Inf: lora_A or lora_B holds NaN or Inf, or merged values overflow \
         {dtype}); {outcome}",
        created = .nan + .inf
    )]
    NonFiniteMerge {
        op: &'static str,
        /// The weight: `w0`, or the module (by name) in a checkpoint.
        target: String,
        nan: u64,
        inf: u64,
        /// Elements of the weight.
        elements: u64,
        dtype: DType,
        /// What was left as it was.
        outcome: &'static str,
    },
    #[error(
        "{op}: argument `adapter_index`: row {row} names adapter slot {value}, which holds no adapter \
         (occupied slots: {occupied:?}; u32::MAX is no adapter)"
    )]
    AdapterIndex {
        op: &'static str,
        row: usize,
        value: u32,
        occupied: Vec<u32>,
    },
    #[error("{op}: {message}")]
    InvalidState { op: &'static str, message: String },
    #[error("{op}: no adapter named `{name}` (adapters: {known:?})")]
    UnknownAdapter {
        op: &'static str,
        name: String,
        known: Vec<String>,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("{what} is not supported: {hint}")]
    Unsupported { what: String, hint: String },
    #[error("CUDA backend unavailable: {0}")]
    CudaUnavailable(String),
    #[error("CUDA driver error during {context}: {source}")]
    Cuda {
        context: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("emulator: {bytes} bytes of host memory for a tensor could not be allocated")]
    HostAlloc { bytes: usize },
    #[error("emulator: kernel `{kernel}` failed: {message}")]
    Emulator {
        kernel: &'static str,
        message: String,
    },
    #[error("emulator: kernel `{kernel}` wrote outside argument `{arg}` ({detail})")]
    OutOfBounds {
        kernel: &'static str,
        arg: &'static str,
        detail: String,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn format(path: &std::path::Path, message: impl Into<String>) -> Error {
        Error::Format {
            path: path.display().to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn cuda(
        context: impl Into<String>,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        let context = context.into();
        move |source| Error::Cuda { context, source }
    }
}
