//! Element types: bf16 and f16 (the `half` crate), f32; and correctly rounded conversions from f64.

use std::fmt;

use half::{bf16, f16};

/// Runtime name of an element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
    /// Indices (the per-row adapter index of the multi-adapter forward), never a kernel's float operand.
    U32,
}

impl DType {
    pub fn size_of(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
    /// The suffix of kernel names (`scale_bf16`, ...).
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::U32 => "u32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_suffix())
    }
}

mod sealed {
    /// Only this crate's element types: the kernels are chosen by [`super::Element::DTYPE`] while
    /// buffers are sized by the Rust type, so a foreign type whose `DTYPE` did not match its size
    /// would let a kernel read or write past a buffer from safe code.
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
}

/// A type a [`crate::Tensor`] can hold: bf16, f16, f32 and u32 (sealed: no other crate can add one).
pub trait Element:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + fmt::Debug
    + PartialEq
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    const DTYPE: DType;
    /// Exact.
    fn to_f64(self) -> f64;
    /// Round to nearest even, once (no double rounding through f32).
    fn from_f64(v: f64) -> Self;
    /// Round to nearest even.
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Raw bits, zero-extended (to compare results bit for bit).
    fn to_bits_u32(self) -> u32;
    /// The all-ones bit pattern: a NaN in every dtype; used to poison outputs.
    fn poison() -> Self;
}

/// f64 -> f32 rounding to odd: correct intermediate for a second rounding to any format with at
/// least 2 fewer significand bits (bf16: 8, f16: 11), so `from_f64` rounds exactly once in effect.
fn f64_to_f32_round_odd(v: f64) -> f32 {
    let f = v as f32; // round to nearest even
    if v.is_nan() || f as f64 == v {
        return f;
    }
    let bits = f.to_bits();
    if bits & 1 == 1 {
        return f;
    }
    // inexact and even: step one ulp towards v, which gives the odd neighbour bracketing v
    let towards_zero = (f as f64).abs() > v.abs();
    let bits = if f.is_infinite() || towards_zero {
        bits - 1
    } else {
        bits + 1
    };
    f32::from_bits(bits)
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f32(f64_to_f32_round_odd(v))
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    fn poison() -> Self {
        bf16::from_bits(0xFFFF)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f32(f64_to_f32_round_odd(v))
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    fn poison() -> Self {
        f16::from_bits(0xFFFF)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
    fn poison() -> Self {
        f32::from_bits(0xFFFF_FFFF)
    }
}

/// Indices. The float conversions exist for the trait (tests, generic helpers): `from_f64` rounds to
/// the nearest integer and saturates; no kernel treats a u32 as a number to round.
impl Element for u32 {
    const DTYPE: DType = DType::U32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v.round() as u32
    }
    fn from_f32(v: f32) -> Self {
        v.round() as u32
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_bits_u32(self) -> u32 {
        self
    }
    fn poison() -> Self {
        u32::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounding f64 -> bf16 must match an exact rounding done with integer arithmetic on the f64 bits.
    #[test]
    fn from_f64_rounds_once() {
        // 1 + 2^-8 is exactly halfway between two bf16 values (8 significand bits): ties to even -> 1.0
        assert_eq!(
            bf16::from_f64(1.0 + 2f64.powi(-8)).to_bits(),
            bf16::from_f32(1.0).to_bits()
        );
        // a hair above the tie must round up; f64 -> f32 RNE alone would lose the hair and tie to even
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-7));
        // the truncating conversion of the half crate would give 1.0 here
        assert_ne!(
            bf16::from_f64(v).to_bits(),
            <bf16 as Element>::from_f64(v).to_bits()
        );
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-45);
        assert_eq!(<f16 as Element>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-10));
        assert_eq!(<bf16 as Element>::from_f64(-v).to_f64(), -1.0);
        assert!(<bf16 as Element>::from_f64(1e300).to_f32().is_infinite());
        assert!(<bf16 as Element>::from_f64(f64::NAN).to_f32().is_nan());
        assert!(<f16 as Element>::from_f64(70000.0).to_f32().is_infinite());
    }

    #[test]
    fn poison_is_nan() {
        assert!(bf16::poison().to_f32().is_nan());
        assert!(f16::poison().to_f32().is_nan());
        assert!(f32::poison().is_nan());
    }
}
