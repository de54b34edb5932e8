//! TMA tensor maps: the host side of `kernels/include/lk_tma.cuh`, the building block of the sm_90
//! kernels (public so that test kernels can use it; the ops build their maps themselves).
//!
//! A tensor map describes a global tensor (address, dimensions, strides) and the box one TMA copy moves.
//! On a GPU the driver encodes it (`cuTensorMapEncodeTiled`); under the emulator it is an
//! `LkEmuTensorMap` (kernels/emu/lk_emu.h) in the same 128 bytes. Both go through [`TensorMapSpec::check`]
//! first, the driver's documented rules, so a map the driver would refuse is an [`Error`] naming the
//! rule on every backend, before any launch.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::params::{LK_EMU_TENSOR_MAP_MAGIC, LkEmuTensorMap, LkTensorMap};

/// How a box is laid out in shared memory: 16-byte chunks XOR-permuted within spans of 32, 64 or 128
/// bytes (the tensor map's `CUtensorMapSwizzle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    None,
    B32,
    B64,
    B128,
}

impl Swizzle {
    /// The span a box row may not exceed, in bytes (None: no limit).
    pub fn span_bytes(self) -> Option<usize> {
        match self {
            Swizzle::None => None,
            Swizzle::B32 => Some(32),
            Swizzle::B64 => Some(64),
            Swizzle::B128 => Some(128),
        }
    }
    /// `CUtensorMapSwizzle`'s value (also the emulator's).
    pub fn code(self) -> u32 {
        match self {
            Swizzle::None => 0,
            Swizzle::B32 => 1,
            Swizzle::B64 => 2,
            Swizzle::B128 => 3,
        }
    }
}

/// A tiled tensor map: dimensions innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapSpec {
    /// Bytes per element: 2 (bf16, f16) or 4 (f32).
    pub elem_bytes: usize,
    /// Elements per dimension.
    pub dims: Vec<u64>,
    /// Byte strides of dimensions 1.. (dimension 0 is contiguous).
    pub strides: Vec<u64>,
    /// Elements per dimension of the box.
    pub box_dims: Vec<u32>,
    pub swizzle: Swizzle,
}

impl TensorMapSpec {
    /// A dense row-major `[rows, cols]` matrix of `elem_bytes`-byte elements (row stride `cols` elements)
    /// in boxes of `box_rows × box_cols` elements.
    pub fn row_major(
        elem_bytes: usize,
        rows: usize,
        cols: usize,
        box_cols: u32,
        box_rows: u32,
        swizzle: Swizzle,
    ) -> Self {
        TensorMapSpec {
            elem_bytes,
            dims: vec![cols as u64, rows as u64],
            strides: vec![(cols * elem_bytes) as u64],
            box_dims: vec![box_cols, box_rows],
            swizzle,
        }
    }

    /// The driver's rules for `cuTensorMapEncodeTiled` (CUDA driver API, tensor map object management)
    /// for a tensor at `address`: rank 1..=5; a 16-byte aligned address; every dimension 1..=2^32; strides
    /// multiples of 16 below 2^40; box dimensions 1..=256 with the inner one a multiple of 16 bytes and,
    /// when swizzled, at most the swizzle span.
    pub fn check(&self, op: &'static str, address: u64) -> Result<()> {
        let rank = self.dims.len();
        let bad = |arg: &'static str, requirement: String| {
            Err(Error::Alignment {
                op,
                arg,
                requirement,
            })
        };
        if !(1..=5).contains(&rank) || self.strides.len() + 1 != rank || self.box_dims.len() != rank
        {
            return bad(
                "tensor map",
                format!(
                    "must have rank 1..=5 with rank - 1 strides and rank box dimensions, got {} dims, {} strides, {} box dims",
                    rank,
                    self.strides.len(),
                    self.box_dims.len()
                ),
            );
        }
        if ![1, 2, 4, 8].contains(&self.elem_bytes) {
            return bad(
                "elem_bytes",
                format!("must be 1, 2, 4 or 8, got {}", self.elem_bytes),
            );
        }
        if address % 16 != 0 {
            return bad(
                "global address",
                format!("must be 16-byte aligned, got {address:#x}"),
            );
        }
        if let Some(d) = self.dims.iter().find(|&&d| d == 0 || d > 1 << 32) {
            return bad("dims", format!("must each be 1..=2^32, got {d}"));
        }
        if let Some(s) = self.strides.iter().find(|&&s| s % 16 != 0 || s >= 1 << 40) {
            return bad(
                "strides",
                format!("must each be a multiple of 16 bytes below 2^40, got {s}"),
            );
        }
        if let Some(b) = self.box_dims.iter().find(|&&b| b == 0 || b > 256) {
            return bad("box", format!("dimensions must each be 1..=256, got {b}"));
        }
        let inner = self.box_dims[0] as usize * self.elem_bytes;
        if inner % 16 != 0 {
            return bad(
                "box",
                format!("inner dimension must be a multiple of 16 bytes, got {inner} bytes"),
            );
        }
        if let Some(span) = self.swizzle.span_bytes()
            && inner > span
        {
            return bad(
                "box",
                format!(
                    "inner dimension ({inner} bytes) must not exceed the {span}-byte swizzle span"
                ),
            );
        }
        Ok(())
    }

    /// Bytes one copy moves (the mbarrier's expect_tx count, out-of-bounds elements included).
    pub fn box_bytes(&self) -> usize {
        self.box_dims.iter().map(|&b| b as usize).product::<usize>() * self.elem_bytes
    }

    /// The map for the tensor at `address` on `device`, after [`check`](Self::check).
    pub fn encode(&self, op: &'static str, device: &Device, address: u64) -> Result<LkTensorMap> {
        self.check(op, address)?;
        match device.as_cuda() {
            None => Ok(self.encode_emulator(address)),
            Some(_) => self.encode_driver(op, address),
        }
    }

    fn encode_emulator(&self, address: u64) -> LkTensorMap {
        let mut m = LkEmuTensorMap {
            magic: LK_EMU_TENSOR_MAP_MAGIC,
            rank: self.dims.len() as u32,
            elem_bytes: self.elem_bytes as u32,
            swizzle: self.swizzle.code(),
            global_address: address,
            dims: [0; 5],
            strides: [0; 5],
            box_: [0; 5],
            reserved: 0,
        };
        m.dims[..self.dims.len()].copy_from_slice(&self.dims);
        m.strides[0] = self.elem_bytes as u64;
        m.strides[1..self.dims.len()].copy_from_slice(&self.strides);
        m.box_[..self.box_dims.len()].copy_from_slice(&self.box_dims);
        let mut out = LkTensorMap { opaque: [0; 16] };
        const _: () = assert!(size_of::<LkEmuTensorMap>() == size_of::<LkTensorMap>());
        // SAFETY: both are plain-old-data structs of 128 bytes (asserted above); the emulator reads the
        // map's bytes as an LkEmuTensorMap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                &m as *const LkEmuTensorMap as *const u8,
                out.opaque.as_mut_ptr() as *mut u8,
                size_of::<LkTensorMap>(),
            )
        };
        out
    }

    fn encode_driver(&self, op: &'static str, address: u64) -> Result<LkTensorMap> {
        use cudarc::driver::sys;
        let dtype = match self.elem_bytes {
            2 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            4 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
            8 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT64,
            _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        };
        let swizzle = match self.swizzle {
            Swizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
            Swizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
            Swizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
            Swizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        };
        let element_strides = vec![1u32; self.dims.len()];
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: every pointer is to a live local of the length the rank says; the driver writes the
        // 128-byte map and reads nothing else (the address is only recorded).
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                self.dims.len() as u32,
                address as *mut std::ffi::c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.box_dims.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Unsupported {
                what: format!(
                    "{op}: cuTensorMapEncodeTiled refused {self:?} at {address:#x}: {r:?}"
                ),
                hint: "the map passed this crate's checks; please report it".into(),
            });
        }
        Ok(LkTensorMap { opaque: map.opaque })
    }
}
