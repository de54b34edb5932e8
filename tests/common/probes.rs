//! Params of the probe kernels in tests/kernels/emu_layout.cu (ldmatrix, mma), shared by the emulator
//! layout tests and the emulator-vs-hardware tests.

use lora_kernels::cudarc::driver::DeviceRepr;

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
