//! Params of the probe kernels in tests/kernels/emu_layout.cu (ldmatrix, mma), planted_tma.cu and
//! sm90/planted_wgmma.cu and pdl_probe.cu, shared by the emulator tests and the emulator-vs-hardware tests.

use lora_kernels::cudarc::driver::DeviceRepr;
use lora_kernels::params::LkTensorMap;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct LdmatrixProbeParams {
    pub src: *const u16,
    pub out: *mut u32,
    pub variant: i32,
}
// SAFETY: plain C struct matching tests/kernels/emu_layout.cu, passed by value.
unsafe impl DeviceRepr for LdmatrixProbeParams {}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct MmaProbeParams {
    pub a: *const u32,
    pub b: *const u32,
    pub c: *const f32,
    pub d: *mut f32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for MmaProbeParams {}

/// tests/kernels/planted_tma.cu
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TmaParams {
    pub in_map: LkTensorMap,
    pub out_map: LkTensorMap,
    pub y: *mut u16,
    pub c0: i32,
    pub c1: i32,
    pub d0: i32,
    pub d1: i32,
    pub box_cols: u32,
    pub box_rows: u32,
    pub swizzle: u32,
    pub bug: i32,
}
// SAFETY: as above (the kernel takes it as a __grid_constant__ parameter).
unsafe impl DeviceRepr for TmaParams {}

/// tests/kernels/sm90/planted_wgmma.cu
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WgmmaParams {
    pub a_map: LkTensorMap,
    pub b_map: LkTensorMap,
    pub a: *const u16,
    pub y: *mut f32,
    pub a_regs: i32,
    pub b_mn_major: i32,
    pub bug: i32,
    /// 0: B 64×64 in 128-byte rows; 16 or 32: B [64][b_cols] MN-major in the 32- or 64-byte swizzle.
    pub b_cols: i32,
    /// A given as [K][M], read MN-major (A from shared memory only).
    pub a_mn_major: i32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for WgmmaParams {}

/// tests/kernels/pdl_probe.cu
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PdlProbeParams {
    pub flag: u64,
    pub out: u64,
    pub spin_ns: u64,
    pub token: u32,
    pub wait: u32,
}
// SAFETY: as above (tests/kernels/pdl_probe.cu).
unsafe impl DeviceRepr for PdlProbeParams {}
