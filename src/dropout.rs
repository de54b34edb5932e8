//! LoRA dropout (PEFT's `lora_dropout`): the adapter sees `dropout(X) = X ⊙ mask / (1 − p)`, so
//! `T = dropout(X)·Aᵀ`, `dA = s·Uᵀ·dropout(X)` and `dX = dY·W0 + s·(U·A) ⊙ mask / (1 − p)`.
//!
//! The mask is never stored. Element `e` of X (its row-major index in the dense `[M, K]` X, whatever
//! leading dimensions X has) is kept iff word `e % 4` of Philox4x32-10 with key `seed` and counter
//! `(e / 4, offset)` is at least `round(p·2³²)`: a pure function of `(seed, offset, e)`, so the forward
//! and the backward regenerate the same mask, the GPU and the emulator compute the same bits (one
//! source, kernels/include/lk_philox.cuh), and [`Dropout::keeps`] here is the same function for the CPU
//! reference. A trainer draws a new `offset` per step (or per layer call) to get a fresh mask, and
//! passes the forward's [`Dropout`] to the backward.

use crate::error::{Error, Result};
use crate::params::LkDropout;

/// The dropout of one layer call: probability `p ∈ [0, 1)`, and the `(seed, offset)` that pick the mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    p: f32,
    seed: u64,
    offset: u64,
}

impl Default for Dropout {
    fn default() -> Self {
        Self::NONE
    }
}

/// Philox4x32-10 (Salmon et al., SC 2011): counter `c`, key `k`; the same rounds as lk_philox.cuh.
pub fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * c[0] as u64;
        let p1 = 0xCD9E_8D57u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k[0] = k[0].wrapping_add(0x9E37_79B9);
        k[1] = k[1].wrapping_add(0xBB67_AE85);
    }
    c
}

impl Dropout {
    /// No dropout: the ops take their plain path (the bits of a call without dropout).
    pub const NONE: Dropout = Dropout {
        p: 0.0,
        seed: 0,
        offset: 0,
    };

    /// Dropout with probability `p` (0 ≤ p < 1; an [`Error::OutOfRange`] naming `p` otherwise, NaN
    /// included), the mask chosen by `seed` and `offset`.
    pub fn new(p: f32, seed: u64, offset: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::OutOfRange {
                op: "Dropout::new",
                arg: "p",
                value: p as f64,
                expected: "0 <= p < 1 (the probability of dropping an element)",
            });
        }
        Ok(Dropout { p, seed, offset })
    }

    /// The same dropout with another offset (a fresh mask, e.g. the next training step).
    pub fn with_offset(self, offset: u64) -> Self {
        Dropout { offset, ..self }
    }

    pub fn p(&self) -> f32 {
        self.p
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether any element can be dropped (p > 0); with p = 0 the ops run exactly as without dropout.
    pub fn is_active(&self) -> bool {
        self.threshold() > 0
    }

    /// `round(p·2³²)`: an element is dropped iff its generator word is below this.
    pub fn threshold(&self) -> u32 {
        // p < 1 in f32 is at most 1 − 2⁻²⁴, so the product is at most 2³² − 2⁸: it fits.
        (self.p as f64 * 4_294_967_296.0).round() as u32
    }

    /// The factor of the kept elements, 1 / (1 − p), in f64 (the kernels fold it into their f32 scale).
    pub fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.p as f64)
    }

    /// Whether element `e` (row-major index into the dense [M, K] X) is kept: the CPU side of the mask.
    pub fn keeps(&self, e: u64) -> bool {
        if !self.is_active() {
            return true;
        }
        let q = e / 4;
        let words = philox4x32_10(
            [
                q as u32,
                (q >> 32) as u32,
                self.offset as u32,
                (self.offset >> 32) as u32,
            ],
            [self.seed as u32, (self.seed >> 32) as u32],
        );
        words[(e % 4) as usize] >= self.threshold()
    }

    /// The kernels' view of it.
    pub(crate) fn params(&self) -> LkDropout {
        LkDropout {
            seed: self.seed,
            offset: self.offset,
            threshold: self.threshold(),
            reserved: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Philox4x32-10 (Random123's kat_vectors, as cuRAND's generator).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn bad_p_is_an_error() {
        for p in [-0.1, 1.0, 1.5, f32::NAN, f32::INFINITY] {
            let e = Dropout::new(p, 1, 2).unwrap_err();
            assert!(matches!(e, Error::OutOfRange { arg: "p", .. }), "{p}: {e}");
        }
        assert!(!Dropout::new(0.0, 1, 2).unwrap().is_active());
        assert!(Dropout::new(0.999_999, 1, 2).unwrap().threshold() > 4_000_000_000);
    }
}
