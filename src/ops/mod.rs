//! Safe functional ops: each validates shapes, dtypes, devices, sizes and scalars, returns an [`Error`]
//! naming the argument on the first problem, then launches once through [`crate::Device`].

mod scale;
mod validate;

pub use scale::scale;
