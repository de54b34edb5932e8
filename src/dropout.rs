//! LoRA dropout (PEFT's `lora_dropout`): the adapter sees `dropout(X) = X ⊙ mask / (1 − p)`, so
//! `T = dropout(X)·Aᵀ`, `dA = s·Uᵀ·dropout(X)` and `dX = dY·W0 + s·(U·A) ⊙ mask / (1 − p)`.
//!
//! The mask is never stored. Element `e` of X (its row-major index in the dense `[M, K]` X, whatever
//! leading dimensions X has) is kept iff word `e % 4` of Philox4x32-10 with key `seed` and counter
//! `(e / 4, offset)` is at least `round(p·2³²)`: a pure function of `(seed, offset, e)`, so the forward
//! and the backward regenerate the same mask, the GPU and the emulator compute the same bits (one
//! source, kernels/include/lk_philox.cuh), and [`Dropout::keeps`] here is the same function for the CPU
//! reference. A trainer draws a new `offset` per step (or per layer call) to get a fresh mask, and
//! passes the forward's [`Dropout`] to the backward. In a captured graph the offset cannot be a launch
//! parameter (a replay repeats those): a [`DropoutSchedule`] keeps it in device memory, where the
//! kernels read it, and the host moves it between replays.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::params::LkDropout;
use crate::tensor::U32Buffer;

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
            offset_words: std::ptr::null(),
        }
    }
}

/// A dropout whose offset lives in device memory, for graphs ([`crate::Device::capture`]): a replay
/// repeats its launches' parameters, so an op given `&schedule` reads the mask's offset from here, and
/// the host moves it on before each replay ([`DropoutSchedule::advance`], an upload outside the
/// capture). The probability and the seed are fixed. Pass the same schedule, unmoved, to the forward
/// and its backward (they must apply the same mask); the masks are [`Dropout`]'s at the same offset,
/// bit for bit.
pub struct DropoutSchedule {
    dropout: Dropout,
    /// The offset on the device: two u32 words, the low one first.
    words: U32Buffer,
}

impl std::fmt::Debug for DropoutSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropoutSchedule")
            .field("dropout", &self.dropout)
            .finish_non_exhaustive()
    }
}

fn offset_words(offset: u64) -> [u32; 2] {
    [offset as u32, (offset >> 32) as u32]
}

impl DropoutSchedule {
    /// A schedule on `device` whose first mask is `dropout`'s (its p, seed and offset).
    pub fn new(device: &Device, dropout: Dropout) -> Result<Self> {
        let words = U32Buffer::from_slice(
            device,
            &offset_words(dropout.offset),
            "DropoutSchedule::new (an allocation and an upload)",
        )?;
        Ok(DropoutSchedule { dropout, words })
    }

    /// The mask the next op given this schedule applies: p, seed and the offset now on the device (for
    /// the CPU reference, [`Dropout::keeps`]).
    pub fn dropout(&self) -> Dropout {
        self.dropout
    }

    /// Sets the offset on the device (an upload, queued after the work before it).
    pub fn set_offset(&mut self, offset: u64) -> Result<()> {
        self.words.write(
            &offset_words(offset),
            "DropoutSchedule::set_offset (an upload)",
        )?;
        self.dropout.offset = offset;
        Ok(())
    }

    /// Moves to the next offset (a fresh mask) and returns it: call it once per training step, before
    /// each replay of a graph holding the step (or before an eager step's forward; never between a
    /// forward and its backward, which must apply the same mask).
    pub fn advance(&mut self) -> Result<u64> {
        let next = self
            .dropout
            .offset
            .checked_add(1)
            .ok_or(Error::OutOfRange {
                op: "DropoutSchedule::advance",
                arg: "offset",
                value: self.dropout.offset as f64,
                expected: "below u64::MAX",
            })?;
        self.set_offset(next)?;
        Ok(next)
    }

    /// Another p and seed, and the offset on the device kept (host only: for a capture, whose launches
    /// take p and seed as parameters and read the offset from here).
    pub(crate) fn retarget(&mut self, dropout: Dropout) {
        self.dropout = Dropout {
            offset: self.dropout.offset,
            ..dropout
        };
    }

    pub(crate) fn device(&self) -> &Device {
        crate::device::RawBuffer::device(&self.words)
    }
}

/// The `dropout` argument of the ops: a [`Dropout`], its offset a launch parameter, or a
/// [`DropoutSchedule`] (`&schedule`), its offset read from device memory at each run (graphs). Both
/// convert with `.into()`; the ops take `impl Into<DropoutArg>`, so either is passed as it is.
#[derive(Clone, Copy, Debug)]
pub enum DropoutArg<'a> {
    Fixed(Dropout),
    Scheduled(&'a DropoutSchedule),
}

impl From<Dropout> for DropoutArg<'_> {
    fn from(d: Dropout) -> Self {
        DropoutArg::Fixed(d)
    }
}

impl<'a> From<&'a DropoutSchedule> for DropoutArg<'a> {
    fn from(s: &'a DropoutSchedule) -> Self {
        DropoutArg::Scheduled(s)
    }
}

impl<'a> DropoutArg<'a> {
    /// The mask it applies now (a schedule's: the offset on the device).
    pub fn dropout(&self) -> Dropout {
        match self {
            DropoutArg::Fixed(d) => *d,
            DropoutArg::Scheduled(s) => s.dropout,
        }
    }

    pub fn is_active(&self) -> bool {
        self.dropout().is_active()
    }

    /// The buffer holding the offset, for a schedule.
    pub(crate) fn offset_buffer(&self) -> Option<&'a U32Buffer> {
        match self {
            DropoutArg::Fixed(_) => None,
            DropoutArg::Scheduled(s) => Some(&s.words),
        }
    }

    /// The kernels' view of it, with `offset_words` the device address of [`DropoutArg::offset_buffer`]
    /// (null for a fixed dropout). A schedule's launch offset is the complement of the one on the
    /// device, so a kernel that read it instead would apply another mask (the tests would see it).
    pub(crate) fn params(&self, offset_words: Option<u64>) -> LkDropout {
        let mut p = self.dropout().params();
        if let DropoutArg::Scheduled(_) = self {
            p.offset = !p.offset;
            p.offset_words = offset_words.unwrap_or(0) as *const u32;
        }
        p
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
