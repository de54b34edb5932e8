//! The emulator backend: host buffers with guard zones, and the launch through `lk_emu_launch`
//! (kernels/emu/lk_emu_runtime.cpp), which runs every block of the kernel's own CUDA source, compiled by
//! the host C++ compiler, with one fiber per CUDA thread.
//!
//! Every memory access of an emulated kernel is checked by the runtime (kernels/emu/lk_emu_check.cpp):
//! global accesses against the allocations passed to the launch (memcheck: outside every allocation,
//! straddling one's end, a write to an input, a read of bytes never written), shared-memory accesses
//! for bounds and races. On top of that every allocation sits between two guard zones filled with 0xFF
//! bytes (NaN in f32, bf16 and f16): a changed guard after the launch (corruption from anywhere) is an
//! [`Error::OutOfBounds`].

use std::alloc::{Layout, alloc, dealloc};
use std::ffi::{CString, c_char, c_void};

use super::{Arg, StorageMut, StorageRef};
use crate::error::{Error, Result};
use crate::kernel::{EmuBody, Kernel};
use crate::params::{KernelParams, LkEmuLaunch, LkEmuRegion};
use crate::plan::LaunchPlan;

/// Order in which the emulator schedules the threads of a block: a kernel whose result depends on it
/// has a race. Tests run kernels under several orders and require identical bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum ThreadOrder {
    #[default]
    Ascending = 0,
    Descending = 1,
    /// A permutation drawn from the seed.
    Shuffled = 2,
    /// Ascending, and after each thread the ready lanes of its warp until the whole warp blocks.
    WarpGreedyAscending = 3,
    /// Descending, warp-greedy likewise.
    WarpGreedyDescending = 4,
}

/// How the emulated `mma.sync` accumulates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum MmaModel {
    /// Exact products summed in f64, rounded once to f32: the reference the kernel contract is written for.
    #[default]
    Exact = 0,
    /// Like the published tensor-core models (aligned to the largest exponent, truncated, round toward
    /// zero): not bit-exact to any GPU, but with the same kind and size of error, so tolerances meant for
    /// hardware can be exercised without one.
    TensorCore = 1,
}

/// The emulator's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuConfig {
    pub order: ThreadOrder,
    /// Seeds the shuffled thread order and, when non-zero, the order in which blocks run.
    pub seed: u64,
    /// The compute capability whose shared-memory limits apply (e.g. 80, 86, 89, 90). The default, 86,
    /// has the smallest limit of the default build architectures (99 KB per block), so a kernel that
    /// fits it fits them all.
    pub arch: u32,
    pub mma: MmaModel,
    /// The access checks of every launch: the shared-memory race detector and bounds, memcheck and
    /// initcheck of global memory. On by default (tests, development); off, the kernels run for their
    /// results only, several times faster (what [`Device::auto`](crate::Device::auto) falls back to).
    pub checks: bool,
    /// The multiprocessors a persistent grid is sized for (the sm_90a GEMM's one block per SM, and its
    /// choice of tile width). The default, 3, makes every block loop over several tiles in small tests;
    /// 1 puts them all in one block, a GPU's count (132 on an H100) gives its launch geometry.
    pub sms: u32,
}

impl Default for EmuConfig {
    fn default() -> Self {
        EmuConfig {
            order: ThreadOrder::Ascending,
            seed: 0,
            arch: 86,
            mma: MmaModel::Exact,
            checks: true,
            sms: 3,
        }
    }
}

impl EmuConfig {
    /// Static + dynamic shared memory one block may use on `arch` (the CUDA guide's per-architecture
    /// maximum with opt-in).
    pub fn smem_limit(&self) -> Result<u32> {
        Ok(match self.arch {
            70 | 72 => 96 * 1024,
            75 => 64 * 1024,
            80 | 87 => 163 * 1024,
            86 | 89 | 120 => 99 * 1024,
            90 | 100 | 103 => 227 * 1024,
            other => {
                return Err(Error::Emulator {
                    kernel: "(launch)",
                    message: format!(
                        "EmuConfig::arch {other} is not a compute capability the emulator knows \
                         (70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 120)"
                    ),
                });
            }
        })
    }

    fn launch_config(&self, plan: &LaunchPlan, regions: &[LkEmuRegion]) -> Result<LkEmuLaunch> {
        Ok(LkEmuLaunch {
            grid: plan.grid,
            block: plan.block,
            dyn_smem_bytes: plan.smem_bytes,
            order: self.order as u32,
            seed: self.seed,
            smem_limit: self.smem_limit()?,
            mma_model: self.mma as u32,
            regions: regions.as_ptr(),
            region_count: regions.len() as u64,
            checks: self.checks as u32,
            // every kernel begins with LK_KERNEL_ENTRY (griddepcontrol.wait): checked in every launch,
            // since on sm_90 GPUs every launch may overlap the one before it
            dependent: 1,
        })
    }
}

/// A buffer a raw emulator launch may access (see [`launch_raw`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct EmuRegion {
    pub name: &'static str,
    pub ptr: *const u8,
    pub len: usize,
    pub writable: bool,
    /// Initcheck shadow, one byte per data byte (0: never written); null when all is initialised.
    pub init: *mut u8,
}

impl EmuRegion {
    pub fn input<T>(name: &'static str, data: &[T]) -> Self {
        EmuRegion {
            name,
            ptr: data.as_ptr() as *const u8,
            len: std::mem::size_of_val(data),
            writable: false,
            init: std::ptr::null_mut(),
        }
    }
    pub fn output<T>(name: &'static str, data: &mut [T]) -> Self {
        EmuRegion {
            name,
            ptr: data.as_mut_ptr() as *const u8,
            len: std::mem::size_of_val(data),
            writable: true,
            init: std::ptr::null_mut(),
        }
    }
    /// An output whose bytes count as written only where `shadow` (one byte per data byte) is non-zero;
    /// the launch marks the bytes it writes.
    pub fn tracked_output<T>(name: &'static str, data: &mut [T], shadow: &mut [u8]) -> Self {
        assert_eq!(
            shadow.len(),
            std::mem::size_of_val(data),
            "one shadow byte per data byte"
        );
        EmuRegion {
            init: shadow.as_mut_ptr(),
            ..EmuRegion::output(name, data)
        }
    }
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

/// A host allocation `[guard | data | guard]`, data 256-byte aligned like cudaMalloc's, with an
/// initcheck shadow when it was allocated uninitialised (one byte per data byte, non-zero once written).
pub(crate) struct GuardedBuf {
    base: *mut u8,
    layout: Layout,
    len: usize,
    init: Option<Vec<u8>>,
}

// SAFETY: an owned heap allocation, like a Vec<u8>.
unsafe impl Send for GuardedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for GuardedBuf {}

impl GuardedBuf {
    /// `len` bytes of data, filled with `fill`; an allocation the allocator refuses is an error, not an
    /// abort of the process (the emulator is `Device::auto`'s fallback). Not covered: an allocation the
    /// allocator grants beyond the memory there is (Linux's overcommit), which the fill then touches.
    pub(crate) fn new(len: usize, fill: u8) -> Result<Self> {
        let too_large = || Error::HostAlloc { bytes: len };
        let total = len
            .checked_next_multiple_of(ALIGN)
            .and_then(|v| v.checked_add(2 * GUARD))
            .ok_or_else(too_large)?;
        let layout = Layout::from_size_align(total, ALIGN).map_err(|_| too_large())?;
        // SAFETY: layout has non-zero size (two guards).
        let base = unsafe { alloc(layout) };
        if base.is_null() {
            return Err(too_large());
        }
        // SAFETY: base points to `total` writable bytes.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, total);
            std::ptr::write_bytes(base.add(GUARD), fill, len);
        }
        Ok(GuardedBuf {
            base,
            layout,
            len,
            init: None,
        })
    }

    /// Holds nothing: what a tensor's storage becomes when it is freed or handed out (never launched on).
    pub(crate) fn empty() -> Self {
        GuardedBuf {
            base: std::ptr::null_mut(),
            layout: Layout::new::<u8>(),
            len: 0,
            init: None,
        }
    }

    /// `len` bytes that count as never written: filled with 0xFF (NaN) and tracked by initcheck until a
    /// kernel or the host writes them.
    pub(crate) fn uninit(len: usize) -> Result<Self> {
        let mut b = GuardedBuf::new(len, GUARD_BYTE)?;
        let mut shadow = Vec::new();
        shadow
            .try_reserve_exact(len)
            .map_err(|_| Error::HostAlloc { bytes: len })?;
        shadow.resize(len, 0);
        b.init = Some(shadow);
        Ok(b)
    }

    /// Back to the state of [`GuardedBuf::uninit`]: poisoned, and every byte counts as never written
    /// (a reused scratch buffer is checked like a fresh one).
    pub(crate) fn forget_writes(&mut self) {
        // SAFETY: data_ptr .. +len lies inside the allocation; &mut self gives exclusive access.
        unsafe { std::ptr::write_bytes(self.data_ptr(), GUARD_BYTE, self.len) };
        self.init = Some(vec![0; self.len]);
    }

    /// The initcheck shadow for a launch (null: every byte is initialised).
    fn init_ptr(&self) -> *mut u8 {
        match &self.init {
            Some(v) => v.as_ptr() as *mut u8,
            None => std::ptr::null_mut(),
        }
    }

    pub(crate) fn data_ptr(&self) -> *mut u8 {
        // SAFETY: GUARD < layout.size().
        unsafe { self.base.add(GUARD) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: data_ptr .. +len lies inside the allocation and is initialised.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.len) }
    }

    /// The data for the host to overwrite: every byte counts as written from now on.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        self.init = None;
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), self.len) }
    }

    /// First changed guard byte, as an offset relative to the start of the data.
    pub(crate) fn check_guards(&self) -> Option<isize> {
        // SAFETY: the whole layout is initialised memory owned by self.
        unsafe { self.guards().breach() }
    }

    /// The allocation's bounds, for a recorded launch to check its guards at replay.
    fn guards(&self) -> Guards {
        Guards {
            base: self.base,
            total: self.layout.size(),
            len: self.len,
        }
    }
}

/// Where a [`GuardedBuf`]'s guard zones are.
#[derive(Clone, Copy)]
struct Guards {
    base: *mut u8,
    total: usize,
    len: usize,
}

impl Guards {
    /// First changed guard byte, as an offset relative to the start of the data.
    ///
    /// # Safety
    /// The allocation must be alive.
    unsafe fn breach(&self) -> Option<isize> {
        // SAFETY: the caller keeps the allocation alive; all of it is initialised.
        let all = unsafe { std::slice::from_raw_parts(self.base, self.total) };
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
        if !self.base.is_null() {
            // SAFETY: allocated in `new` with this layout (an `empty` one allocated nothing).
            unsafe { dealloc(self.base, self.layout) }
        }
    }
}

/// A launch argument's host buffer (Device::launch has checked it is on this emulator) and whether the
/// kernel may write it.
fn host_arg<'a>(arg: &'a mut Arg<'_>) -> (&'a GuardedBuf, bool) {
    match arg {
        Arg::In(_, b) => match b.storage() {
            StorageRef::Host(h) => (h, false),
            StorageRef::Cuda(_) => unreachable!("device checked by Device::launch"),
        },
        Arg::Out(_, b) => match b.storage_mut() {
            StorageMut::Host(h) => (&*h, true),
            StorageMut::Cuda(_) => unreachable!("device checked by Device::launch"),
        },
    }
}

/// The error for a changed guard byte of argument `arg` (`offset` from its `len` data bytes).
fn guard_breached(kernel: &'static str, arg: &'static str, offset: isize, len: usize) -> Error {
    Error::OutOfBounds {
        kernel,
        arg,
        detail: format!("byte offset {offset} relative to its {len} data bytes"),
    }
}

pub(crate) fn launch<P: KernelParams>(
    cfg: &EmuConfig,
    kernel: &'static Kernel<P>,
    plan: &LaunchPlan,
    args: &mut [Arg<'_>],
    build: impl FnOnce(&[u64]) -> P,
) -> Result<()> {
    let names: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.name()).expect("argument names have no NUL"))
        .collect();
    let regions: Vec<LkEmuRegion> = args
        .iter_mut()
        .zip(&names)
        .map(|(arg, name)| {
            let (h, writable) = host_arg(arg);
            LkEmuRegion {
                base: h.data_ptr() as u64,
                len: h.len as u64,
                name: name.as_ptr(),
                init: h.init_ptr(),
                writable: writable as u32,
            }
        })
        .collect();
    let ptrs: Vec<u64> = regions.iter().map(|r| r.base).collect();
    let params = build(&ptrs);
    let launch = cfg.launch_config(plan, &regions)?;
    let mut err = vec![0 as c_char; 2048];
    // SAFETY: `params` is the kernel's own #[repr(C)] params struct (generated from lora_params.h) whose
    // pointers are the data addresses of live host buffers borrowed by `args` for this whole call, and
    // `regions` describes exactly those buffers (and their initcheck shadows, which the runtime writes
    // only for outputs, borrowed mutably here); the runtime refuses every access outside them.
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

/// A launch recorded during a graph capture ([`crate::Device::capture`]): run at each replay, not when
/// captured, with the same params and buffers (addresses, as a GPU graph keeps them).
pub(crate) struct Recorded {
    pub(crate) kernel: &'static str,
    plan: LaunchPlan,
    /// Per argument: its name, data address and length, whether the kernel may write it, its guards.
    args: Vec<RecordedArg>,
    run: Box<RunRecorded>,
}

/// A recorded launch's call into the emulator runtime (its params inside), returning its status.
type RunRecorded = dyn Fn(&LkEmuLaunch, &mut [c_char]) -> i32 + Send;

// SAFETY: the raw pointers are addresses of buffers, dereferenced only by `replay`, whose caller
// guarantees the buffers are alive and untouched by other code for the call; the params are Send.
unsafe impl Send for Recorded {}

struct RecordedArg {
    name: &'static str,
    c_name: CString,
    writable: bool,
    guards: Guards,
}

/// Records what [`launch`] would run, without running it.
pub(crate) fn record<P: KernelParams>(
    kernel: &'static Kernel<P>,
    plan: &LaunchPlan,
    args: &mut [Arg<'_>],
    build: impl FnOnce(&[u64]) -> P,
) -> Recorded {
    let recorded: Vec<RecordedArg> = args
        .iter_mut()
        .map(|arg| {
            let (h, writable) = host_arg(arg);
            let guards = h.guards();
            RecordedArg {
                name: arg.name(),
                c_name: CString::new(arg.name()).expect("argument names have no NUL"),
                writable,
                guards,
            }
        })
        .collect();
    let ptrs: Vec<u64> = recorded
        .iter()
        // SAFETY: GUARD < total, inside the allocation.
        .map(|a| unsafe { a.guards.base.add(GUARD) } as u64)
        .collect();
    let params = build(&ptrs);
    let body = kernel.emu_body;
    Recorded {
        kernel: kernel.name,
        plan: *plan,
        args: recorded,
        // SAFETY (of the call inside): `params` is the kernel's own params struct; the replay runs this
        // only after checking that every buffer it points into is still alive (Graph::replay), and the
        // launch's regions describe exactly those buffers.
        run: Box::new(move |launch, err| unsafe {
            run_emulated(body, &params as *const P as *const c_void, launch, err)
        }),
    }
}

impl Recorded {
    /// Runs the recorded launch with `cfg` (the device's), checked as an eager launch is, but for
    /// initcheck: every byte counts as written at a replay.
    ///
    /// # Safety
    /// Every buffer the launch recorded must be alive, and no other code may touch them during the call.
    pub(crate) unsafe fn replay(&self, cfg: &EmuConfig) -> Result<()> {
        let regions: Vec<LkEmuRegion> = self
            .args
            .iter()
            .map(|a| LkEmuRegion {
                // SAFETY: GUARD < total, inside the allocation.
                base: unsafe { a.guards.base.add(GUARD) } as u64,
                len: a.guards.len as u64,
                name: a.c_name.as_ptr(),
                init: std::ptr::null_mut(),
                writable: a.writable as u32,
            })
            .collect();
        let launch = cfg.launch_config(&self.plan, &regions)?;
        let mut err = vec![0 as c_char; 2048];
        if (self.run)(&launch, &mut err) != 0 {
            return Err(Error::Emulator {
                kernel: self.kernel,
                message: c_message(&err),
            });
        }
        for a in &self.args {
            // SAFETY: alive, by the caller's guarantee.
            if let Some(offset) = unsafe { a.guards.breach() } {
                return Err(guard_breached(self.kernel, a.name, offset, a.guards.len));
            }
        }
        Ok(())
    }
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
                return Err(guard_breached(kernel, arg.name(), offset, h.bytes().len()));
            }
        }
    }
    Ok(())
}

/// Launches an emulated kernel that is not in the library's table (the test kernels of
/// `tests/kernels/`), returning the emulator's message on failure. `regions` are the buffers the kernel
/// may access (all initialised); any other global access fails the launch.
///
/// # Safety
/// `params` must be the params struct `body`'s kernel takes, and every region must be valid for reads
/// (and for writes when `writable`) for the whole call.
#[doc(hidden)]
pub unsafe fn launch_raw<P: Copy>(
    config: &EmuConfig,
    body: EmuBody,
    plan: &LaunchPlan,
    params: &P,
    regions: &[EmuRegion],
) -> std::result::Result<(), String> {
    let names: Vec<CString> = regions
        .iter()
        .map(|r| CString::new(r.name).expect("region names have no NUL"))
        .collect();
    let raw: Vec<LkEmuRegion> = regions
        .iter()
        .zip(&names)
        .map(|(r, name)| LkEmuRegion {
            base: r.ptr as u64,
            len: r.len as u64,
            name: name.as_ptr(),
            init: r.init,
            writable: r.writable as u32,
        })
        .collect();
    let launch = config
        .launch_config(plan, &raw)
        .map_err(|e| e.to_string())?;
    let mut err = vec![0 as c_char; 2048];
    // SAFETY: forwarded to the caller.
    let rc = unsafe { run_emulated(body, params as *const P as *const c_void, &launch, &mut err) };
    if rc == 0 {
        Ok(())
    } else {
        Err(c_message(&err))
    }
}
