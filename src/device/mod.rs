//! Devices: a CUDA GPU (through cudarc, whose driver library is loaded at run time) or the CPU emulator
//! that runs the kernels' own CUDA source. Ops validate their arguments, compute a [`LaunchPlan`], and
//! call `Device::launch`, the one place where a kernel is launched on either backend.

mod compat;
mod cuda;
mod emu;
mod graph;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

pub use cuda::{CudaDevice, launch_programmatic_raw as cuda_launch_programmatic};
pub use emu::{EmuConfig, EmuRegion, MmaModel, ThreadOrder, launch_raw as emu_launch_raw};
pub use graph::Graph;

use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::params::KernelParams;
use crate::plan::LaunchPlan;

/// A handle to a CUDA GPU or to the emulator. Cheap to clone; tensors remember the device they were
/// made on and ops refuse tensors of another device (two `Device::emulator()` calls are two devices).
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    /// Held while this device's memory is touched from the host side of the crate: an emulator launch, an
    /// allocation, a host transfer, a tensor's drop, a graph replay, a capture's beginning and end. The
    /// device is one stream: this keeps a replay (which checks its tensors are alive, then runs) whole
    /// against a tensor dropped or written on another thread, and another thread's host work out of a
    /// capture that begins or ends meanwhile. Taken before the capture lock, never after.
    queue: Mutex<()>,
    capture: Mutex<graph::CaptureState>,
}

impl Inner {
    fn new(backend: Backend) -> Arc<Inner> {
        Arc::new(Inner {
            backend,
            queue: Mutex::new(()),
            capture: Mutex::new(graph::CaptureState::default()),
        })
    }
}

/// How many launches the emulator's record keeps (the oldest go first).
const LAUNCH_RECORD: usize = 4096;

pub(crate) enum Backend {
    Cuda(CudaDevice),
    /// The configuration, and the names of the last (at most [`LAUNCH_RECORD`]) kernels launched since
    /// the last [`Device::take_launches`].
    Emulator(EmuConfig, Mutex<VecDeque<&'static str>>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for Device {}

impl Device {
    /// CUDA device `ordinal`, or an error saying why there is none (no nvcc at build time, no driver,
    /// no GPU, a GPU older than the compiled architectures).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device {
            inner: Inner::new(Backend::Cuda(CudaDevice::new(ordinal)?)),
        })
    }

    /// A device on an existing cudarc stream (and its context), e.g. the one a framework (candle, burn,
    /// an inference server) already runs on: the ops enqueue on that stream, in order with the
    /// framework's work, and the framework's `CudaSlice`s become [`crate::Tensor`]s without copies
    /// ([`crate::Tensor::from_cuda_slice`], back with [`crate::Tensor::into_cuda_slice`]).
    pub fn from_cuda_stream(stream: Arc<cudarc::driver::CudaStream>) -> Result<Device> {
        Ok(Device {
            inner: Inner::new(Backend::Cuda(CudaDevice::with_stream(stream)?)),
        })
    }

    /// The CPU emulator, threads in ascending order, every access checked.
    pub fn emulator() -> Device {
        Device::emulator_with(EmuConfig::default())
    }

    /// The CPU emulator without its access checks: for running the kernels for their results on a machine
    /// without a GPU (merging a checkpoint, a training step), several times faster than [`Device::emulator`].
    pub fn emulator_unchecked() -> Device {
        Device::emulator_with(EmuConfig {
            checks: false,
            ..EmuConfig::default()
        })
    }

    /// The CPU emulator with a given thread order (tests run kernels under several).
    pub fn emulator_with(config: EmuConfig) -> Device {
        Device {
            inner: Inner::new(Backend::Emulator(config, Mutex::new(VecDeque::new()))),
        }
    }

    /// CUDA device 0 when it can be used, else the emulator without access checks
    /// ([`Device::emulator_unchecked`]); prints which and why to stderr.
    pub fn auto() -> Device {
        let (device, reason) = Device::auto_quiet();
        eprintln!("lora-kernels: {reason}");
        device
    }

    /// As [`Device::auto`], returning the reason instead of printing it.
    pub fn auto_quiet() -> (Device, String) {
        match Device::cuda(0) {
            Ok(d) => {
                let reason = format!("using {}", d.describe());
                (d, reason)
            }
            Err(e) => (
                Device::emulator_unchecked(),
                format!("using the CPU emulator because the CUDA backend is unavailable: {e}"),
            ),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.inner.backend, Backend::Cuda(_))
    }

    pub fn is_emulator(&self) -> bool {
        matches!(self.inner.backend, Backend::Emulator(..))
    }

    /// The CUDA side (context, stream), for interop with other cudarc users.
    pub fn as_cuda(&self) -> Option<&CudaDevice> {
        match &self.inner.backend {
            Backend::Cuda(c) => Some(c),
            Backend::Emulator(..) => None,
        }
    }

    pub fn describe(&self) -> String {
        match &self.inner.backend {
            Backend::Cuda(c) => c.describe(),
            Backend::Emulator(cfg, _) => format!(
                "the CPU emulator ({:?} thread order{})",
                cfg.order,
                if cfg.checks {
                    ""
                } else {
                    ", access checks off"
                }
            ),
        }
    }

    /// The compute capability the kernels target, as 10·major + minor (90 for an H100): the GPU's, or the
    /// emulator's `EmuConfig::arch`. The launch plans pick the sm_90a kernels where it is 90.
    pub fn compute_capability(&self) -> u32 {
        match &self.inner.backend {
            Backend::Cuda(c) => c.capability_number(),
            Backend::Emulator(cfg, _) => cfg.arch,
        }
    }

    /// Streaming multiprocessors, the size of a persistent grid (and what [`crate::ops::sm90_tile`] takes):
    /// the GPU's; on the emulator `EmuConfig::sms` (3 by default, so that persistent kernels loop over
    /// several tiles per block there too; at least 1).
    pub fn sm_count(&self) -> Result<u32> {
        match &self.inner.backend {
            Backend::Cuda(c) => c.sm_count(),
            Backend::Emulator(cfg, _) => Ok(cfg.sms.max(1)),
        }
    }

    /// Whether this device's launches are made with programmatic dependent launch (README, "launches"):
    /// a GPU of compute capability 9.0 or newer running this build's code for sm_90 or newer (each
    /// kernel's loaded code is checked again at its launch), `LK_PDL` not `0`, and no such launch refused
    /// by the driver so far (one refused is retried the ordinary way, the device stops asking, and
    /// [`Device::programmatic_refused`] says why). Always false on the emulator, which runs launches one
    /// after another and instead checks that every kernel waits before touching global memory. An
    /// `LK_PDL` other than unset, `0` or `1` is an error on a GPU.
    pub fn programmatic_launch(&self) -> Result<bool> {
        match &self.inner.backend {
            Backend::Cuda(c) => c.programmatic_launch(),
            Backend::Emulator(..) => Ok(false),
        }
    }

    /// Why programmatic dependent launch was turned off on this GPU, if the driver refused it (its error
    /// and the kernel); None otherwise, and on the emulator.
    pub fn programmatic_refused(&self) -> Option<String> {
        match &self.inner.backend {
            Backend::Cuda(c) => c.programmatic_refused(),
            Backend::Emulator(..) => None,
        }
    }

    /// The emulator's record of the kernels launched on this device (and its clones) since the previous
    /// call, by `extern "C"` name, in launch order (the last 4096 at most), and clears it: which kernels an
    /// op took (the launch plans choose by shape, rank and device). Empty on a GPU, which keeps no record.
    pub fn take_launches(&self) -> Vec<&'static str> {
        match &self.inner.backend {
            Backend::Cuda(_) => Vec::new(),
            Backend::Emulator(_, launches) => {
                let mut record = launches.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::take(&mut *record).into()
            }
        }
    }

    /// Waits for all queued work (a no-op on the emulator, which runs synchronously).
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("Device::synchronize")?;
        match &self.inner.backend {
            Backend::Cuda(c) => c.synchronize(),
            Backend::Emulator(..) => Ok(()),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// Launches `kernel` with `plan` on this device. `args` are the tensors the kernel touches, each
    /// named for error messages; `build` turns their raw addresses (same order) into the params struct.
    /// Checks before the launch: every argument is on this device; no output overlaps another argument.
    /// On the emulator, after the launch: no argument's guard zones were written.
    pub(crate) fn launch<P: KernelParams>(
        &self,
        op: &'static str,
        kernel: &'static Kernel<P>,
        plan: &LaunchPlan,
        args: &mut [Arg<'_>],
        build: impl FnOnce(&[u64]) -> P,
    ) -> Result<()> {
        for arg in args.iter() {
            let buf = arg.buffer();
            if buf.device() != self {
                return Err(Error::DeviceMismatch {
                    op,
                    arg: arg.name(),
                    expected: self.describe(),
                    got: buf.device().describe(),
                });
            }
        }
        check_aliasing(op, args)?;
        check_grid(op, plan)?;
        let mut guard = graph::lock(&self.inner.capture);
        let state = &mut *guard;
        if let Some(log) = state.active.as_mut() {
            if log.owner != std::thread::current().id() {
                return Err(graph::other_thread(op, self));
            }
            if !state.warm.contains(kernel.name) {
                return Err(graph::cold_kernel(op, kernel.name));
            }
            log.note(op, kernel.name, args);
            return match &self.inner.backend {
                // the stream is capturing: the driver records the launch
                Backend::Cuda(c) => c.launch(kernel, plan, args, build),
                Backend::Emulator(..) => {
                    log.push(emu::record(kernel, plan, args, build));
                    Ok(())
                }
            };
        }
        // a capture someone else began on the stream (the driver says): the same rule
        if !state.warm.contains(kernel.name) && self.stream_capturing() {
            return Err(graph::cold_kernel(op, kernel.name));
        }
        match &self.inner.backend {
            Backend::Cuda(c) => {
                // with the capture lock held: no capture of this device begins or ends meanwhile, so an
                // eager launch never lands in one
                c.launch(kernel, plan, args, build)?;
                state.warm.insert(kernel.name);
            }
            Backend::Emulator(cfg, _) => {
                // the queue lock is never taken with the capture lock held (a tensor's drop takes them
                // in the other order)
                drop(guard);
                self.note_launch(kernel.name);
                let _queue = graph::lock(&self.inner.queue);
                emu::launch(cfg, kernel, plan, args, build)?;
                drop(_queue);
                graph::lock(&self.inner.capture).warm.insert(kernel.name);
            }
        }
        Ok(())
    }

    /// Adds a kernel to the emulator's record of launches ([`Device::take_launches`]).
    fn note_launch(&self, kernel: &'static str) {
        if let Backend::Emulator(_, launches) = &self.inner.backend {
            let mut record = graph::lock(launches);
            if record.len() == LAUNCH_RECORD {
                record.pop_front();
            }
            record.push_back(kernel);
        }
    }

    /// Held while the host side touches this device's memory (see `Inner::queue`).
    pub(crate) fn queue(&self) -> std::sync::MutexGuard<'_, ()> {
        graph::lock(&self.inner.queue)
    }
}

/// The grid within what a GPU launches (x < 2^31, y and z at most 65535; a larger one is
/// CUDA_ERROR_INVALID_VALUE there, and the emulator refuses it too): a launch whose shape would need
/// more blocks gets this error, naming the dimension, before it runs (in an op of several launches,
/// those before it have run). The ops check the shapes that reach these limits themselves where they
/// can name the argument.
fn check_grid(op: &'static str, plan: &LaunchPlan) -> Result<()> {
    let limits = [
        ("launch grid x (blocks)", i32::MAX as u32),
        ("launch grid y (blocks)", 65535),
        ("launch grid z (blocks)", 65535),
    ];
    for (&g, (arg, max)) in plan.grid.iter().zip(limits) {
        if g > max {
            return Err(Error::TooLarge {
                op,
                arg,
                value: g as usize,
                max: max as usize,
            });
        }
    }
    Ok(())
}

/// A tensor argument of a launch: read-only input or written output.
pub(crate) enum Arg<'a> {
    In(&'static str, &'a dyn RawBuffer),
    Out(&'static str, &'a mut dyn RawBuffer),
}

impl Arg<'_> {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Arg::In(n, _) | Arg::Out(n, _) => n,
        }
    }
    pub(crate) fn buffer(&self) -> &dyn RawBuffer {
        match self {
            Arg::In(_, b) => *b,
            Arg::Out(_, b) => &**b,
        }
    }
}

/// What a launch needs of a tensor, independent of its element type.
pub(crate) trait RawBuffer {
    fn device(&self) -> &Device;
    /// (start address, length in bytes) on its device, for the aliasing check.
    fn byte_range(&self) -> (u64, u64);
    /// Dropped with the buffer's memory (or when it may have changed): a graph keeps the weak side to check
    /// at each replay that the memory it writes is still the tensor's.
    fn alive(&self) -> std::sync::Weak<()>;
    fn storage(&self) -> StorageRef<'_>;
    fn storage_mut(&mut self) -> StorageMut<'_>;
}

pub(crate) enum StorageRef<'a> {
    Cuda(&'a dyn cuda::CudaPtr),
    Host(&'a emu::GuardedBuf),
}

pub(crate) enum StorageMut<'a> {
    Cuda(&'a mut dyn cuda::CudaPtr),
    Host(&'a mut emu::GuardedBuf),
}

fn check_aliasing(op: &'static str, args: &[Arg<'_>]) -> Result<()> {
    for (i, a) in args.iter().enumerate() {
        if !matches!(a, Arg::Out(..)) {
            continue;
        }
        let (a0, alen) = a.buffer().byte_range();
        for (j, b) in args.iter().enumerate() {
            if i == j {
                continue;
            }
            let (b0, blen) = b.buffer().byte_range();
            if alen > 0 && blen > 0 && a0 < b0 + blen && b0 < a0 + alen {
                return Err(Error::Aliasing {
                    op,
                    a: a.name(),
                    b: b.name(),
                });
            }
        }
    }
    Ok(())
}

pub(crate) use emu::GuardedBuf;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_past_a_gpus_limits_are_refused() {
        let plan = |grid| LaunchPlan {
            grid,
            block: [256, 1, 1],
            smem_bytes: 0,
        };
        check_grid("op", &plan([i32::MAX as u32, 65535, 65535])).unwrap();
        for (grid, arg) in [
            ([1u32 << 31, 1, 1], "launch grid x (blocks)"),
            ([1, 65536, 1], "launch grid y (blocks)"),
            ([1, 1, 65536], "launch grid z (blocks)"),
        ] {
            match check_grid("op", &plan(grid)) {
                Err(Error::TooLarge { arg: a, .. }) => assert_eq!(a, arg),
                other => panic!("{grid:?}: {other:?}"),
            }
        }
    }
}
