//! The emulator backend: host buffers with guard zones, and the launch through `lk_emu_launch`
//! (kernels/emu/lk_emu_runtime.cpp), which runs every block of the kernel's own CUDA source, compiled by
//! the host C++ compiler, with one fiber per CUDA thread.
//!
//! Out-of-bounds accesses are caught with bounds-checked buffers rather than AddressSanitizer: every
//! allocation sits between two guard zones filled with 0xFF bytes (NaN in f32, bf16 and f16). A read past
//! either end brings NaN into the result, which no test tolerates; a write there changes a guard, and the
//! launch returns [`Error::OutOfBounds`].

use std::alloc::{Layout, alloc, dealloc};
use std::ffi::{c_char, c_void};

use super::{Arg, StorageMut, StorageRef};
use crate::error::{Error, Result};
use crate::kernel::{EmuBody, Kernel};
use crate::params::{KernelParams, LkEmuLaunch};
use crate::plan::LaunchPlan;

/// Order in which the emulator schedules the threads of a block: a kernel whose result depends on it
/// has a race. Tests run kernels under at least two orders and require identical bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum ThreadOrder {
    #[default]
    Ascending = 0,
    Descending = 1,
    /// A permutation drawn from the seed.
    Shuffled = 2,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuConfig {
    pub order: ThreadOrder,
    pub seed: u64,
}

unsafe extern "C" {
    fn lk_emu_launch(
        body: EmuBody,
        params: *const c_void,
        cfg: *const LkEmuLaunch,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Bytes of guard zone on each side of an emulator allocation.
pub(crate) const GUARD: usize = 256;
const ALIGN: usize = 256;
const GUARD_BYTE: u8 = 0xFF;

/// A host allocation `[guard | data | guard]`, data 256-byte aligned like cudaMalloc's.
pub(crate) struct GuardedBuf {
    base: *mut u8,
    layout: Layout,
    len: usize,
}

// SAFETY: an owned heap allocation, like a Vec<u8>.
unsafe impl Send for GuardedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for GuardedBuf {}

impl GuardedBuf {
    /// `len` bytes of data, filled with `fill`.
    pub(crate) fn new(len: usize, fill: u8) -> Self {
        let total = GUARD + len.div_ceil(ALIGN) * ALIGN + GUARD;
        let layout = Layout::from_size_align(total, ALIGN).expect("tensor too large");
        // SAFETY: layout has non-zero size (two guards).
        let base = unsafe { alloc(layout) };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: base points to `total` writable bytes.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, total);
            std::ptr::write_bytes(base.add(GUARD), fill, len);
        }
        GuardedBuf { base, layout, len }
    }

    pub(crate) fn data_ptr(&self) -> *mut u8 {
        // SAFETY: GUARD < layout.size().
        unsafe { self.base.add(GUARD) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: data_ptr .. +len lies inside the allocation and is initialised.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.len) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), self.len) }
    }

    /// First changed guard byte, as an offset relative to the start of the data.
    pub(crate) fn check_guards(&self) -> Option<isize> {
        // SAFETY: the whole layout is initialised memory owned by self.
        let all = unsafe { std::slice::from_raw_parts(self.base, self.layout.size()) };
        let tail = GUARD + self.len;
        all[..GUARD]
            .iter()
            .position(|&b| b != GUARD_BYTE)
            .map(|i| i as isize - GUARD as isize)
            .or_else(|| {
                all[tail..]
                    .iter()
                    .position(|&b| b != GUARD_BYTE)
                    .map(|i| (self.len + i) as isize)
            })
    }
}

impl Drop for GuardedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

pub(crate) fn launch<P: KernelParams>(
    cfg: &EmuConfig,
    kernel: &'static Kernel<P>,
    plan: &LaunchPlan,
    args: &mut [Arg<'_>],
    build: impl FnOnce(&[u64]) -> P,
) -> Result<()> {
    let ptrs: Vec<u64> = args
        .iter_mut()
        .map(|arg| match arg {
            Arg::In(_, b) => match b.storage() {
                StorageRef::Host(h) => h.data_ptr() as u64,
                StorageRef::Cuda(_) => unreachable!("device checked by Device::launch"),
            },
            Arg::Out(_, b) => match b.storage_mut() {
                StorageMut::Host(h) => h.data_ptr() as u64,
                StorageMut::Cuda(_) => unreachable!("device checked by Device::launch"),
            },
        })
        .collect();
    let params = build(&ptrs);
    let launch = LkEmuLaunch {
        grid: plan.grid,
        block: plan.block,
        dyn_smem_bytes: plan.smem_bytes,
        order: cfg.order as u32,
        seed: cfg.seed,
    };
    let mut err = vec![0 as c_char; 1024];
    // SAFETY: `params` is the kernel's own #[repr(C)] params struct (generated from lora_params.h) whose
    // pointers are the data addresses of live host buffers borrowed by `args` for this whole call;
    // the op validated shapes, so the kernel's accesses stay inside them (guard zones check that).
    let rc = unsafe {
        run_emulated(
            kernel.emu_body,
            &params as *const P as *const c_void,
            &launch,
            &mut err,
        )
    };
    if rc != 0 {
        return Err(Error::Emulator {
            kernel: kernel.name,
            message: c_message(&err),
        });
    }
    check_all_guards(kernel.name, args)
}

/// # Safety
/// `params` must point to the params struct `body` expects, valid for the call.
pub(crate) unsafe fn run_emulated(
    body: EmuBody,
    params: *const c_void,
    launch: &LkEmuLaunch,
    err: &mut [c_char],
) -> i32 {
    // SAFETY: forwarded contract; `err` is a writable buffer of err.len() bytes.
    unsafe { lk_emu_launch(body, params, launch, err.as_mut_ptr(), err.len()) }
}

pub(crate) fn c_message(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check_all_guards(kernel: &'static str, args: &[Arg<'_>]) -> Result<()> {
    for arg in args {
        if let StorageRef::Host(h) = arg.buffer().storage() {
            if let Some(offset) = h.check_guards() {
                return Err(Error::OutOfBounds {
                    kernel,
                    arg: arg.name(),
                    detail: format!(
                        "byte offset {offset} relative to its {} data bytes",
                        h.bytes().len()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Launches an emulated kernel that is not in the library's table (the test kernels of
/// `tests/kernels/`), returning the emulator's message on failure.
///
/// # Safety
/// `params` must be the params struct `body`'s kernel takes, and every pointer in it must be valid for
/// every access the kernel makes under `plan`.
#[doc(hidden)]
pub unsafe fn launch_raw<P: Copy>(
    config: &EmuConfig,
    body: EmuBody,
    plan: &LaunchPlan,
    params: &P,
) -> std::result::Result<(), String> {
    let launch = LkEmuLaunch {
        grid: plan.grid,
        block: plan.block,
        dyn_smem_bytes: plan.smem_bytes,
        order: config.order as u32,
        seed: config.seed,
    };
    let mut err = vec![0 as c_char; 1024];
    // SAFETY: forwarded to the caller.
    let rc = unsafe { run_emulated(body, params as *const P as *const c_void, &launch, &mut err) };
    if rc == 0 {
        Ok(())
    } else {
        Err(c_message(&err))
    }
}
