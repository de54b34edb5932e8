//! Graph capture: a sequence of ops recorded once and replayed with one call ([`Device::capture`],
//! [`Graph::replay`]). On a GPU this is a CUDA graph captured from the device's stream, so a replay
//! costs one launch on the host instead of one (plus the ops' checks) per kernel: what a decoding
//! server's M = 16 forward, a few microseconds of GPU work per layer, needs. The emulator records the
//! launches and runs them at each replay, with the same rules, so a capture that would not work on a GPU
//! fails in the tests too.
//!
//! The rules, the same on both backends: during a capture only kernel launches are recorded. Anything
//! else an op would do on the device is an error naming it: allocating (an op's output, a workspace's
//! first buffer of a size), a host transfer, `synchronize`, and the first launch of a kernel on the device
//! (its code is loaded then, which a capture cannot record). So run each op once with its shapes before
//! capturing it, and use the `_into` forms with their outputs and workspace allocated. A replay writes
//! the tensors the capture used, at their addresses: it checks first that every one of them is alive
//! (not dropped, and its CUDA slice not handed out mutably since) and refuses to run otherwise.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::{Mutex, MutexGuard, Weak};
use std::thread::ThreadId;

use super::{Arg, Backend, Device, emu};
use crate::error::{Error, Result};

/// The hint of every refusal during a capture.
const CAPTURE_HINT: &str = "during a graph capture only kernel launches are recorded: allocate the \
    outputs, run each op once with its shapes (its workspace then holds its buffers and its kernels are \
    loaded), then capture the `_into` forms; read results after a replay (README, \"Graphs\")";

/// A device's capture state: the capture in progress, if any, and the kernels launched on it so far.
#[derive(Default)]
pub(crate) struct CaptureState {
    pub(crate) active: Option<CaptureLog>,
    pub(crate) warm: HashSet<&'static str>,
}

/// What a capture has recorded so far.
pub(crate) struct CaptureLog {
    /// The thread that began the capture: launches from others are refused.
    pub(crate) owner: ThreadId,
    /// The emulator's launches (a GPU records its own).
    records: Vec<emu::Recorded>,
    buffers: Vec<Captured>,
    launches: usize,
    /// Storage of tensors dropped during the capture, freed once it has ended.
    deferred: Vec<Box<dyn Send>>,
    /// Unique among the process's captures ([`Device::capture_serial`]).
    serial: u64,
}

impl CaptureLog {
    fn new() -> Self {
        CaptureLog {
            owner: std::thread::current().id(),
            records: Vec::new(),
            buffers: Vec::new(),
            launches: 0,
            deferred: Vec::new(),
            serial: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        }
    }

    /// Notes the buffers of a launch of `kernel` by `op` (each once).
    pub(crate) fn note(&mut self, op: &'static str, kernel: &'static str, args: &[Arg<'_>]) {
        for a in args {
            let alive = a.buffer().alive();
            if !self.buffers.iter().any(|c| c.alive.ptr_eq(&alive)) {
                self.buffers.push(Captured {
                    op,
                    kernel,
                    arg: a.name(),
                    alive,
                });
            }
        }
        self.launches += 1;
    }

    pub(crate) fn push(&mut self, record: emu::Recorded) {
        self.records.push(record);
    }
}

/// A tensor a captured launch uses, for the replay's check that it is still there.
struct Captured {
    op: &'static str,
    kernel: &'static str,
    arg: &'static str,
    alive: Weak<()>,
}

impl std::fmt::Display for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tensor passed as `{}` to kernel `{}` (in {})",
            self.arg, self.kernel, self.op
        )
    }
}

/// The first of `buffers` whose tensor is gone (or whose memory may have changed).
fn first_gone(buffers: &[Captured]) -> Option<&Captured> {
    buffers.iter().find(|c| c.alive.strong_count() == 0)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The error for a launch from another thread than the capturing one.
pub(crate) fn other_thread(op: &'static str, device: &Device) -> Error {
    Error::Unsupported {
        what: format!(
            "{op}: a launch from another thread while {} is capturing",
            device.describe()
        ),
        hint:
            "a capture records the launches of the thread that began it: launch from that thread, \
               or after the capture has ended"
                .into(),
    }
}

/// The error for a kernel whose first launch on the device would be inside a capture.
pub(crate) fn cold_kernel(op: &'static str, kernel: &'static str) -> Error {
    Error::Unsupported {
        what: format!(
            "{op}: kernel `{kernel}` would run for the first time on this device inside a graph capture"
        ),
        hint: CAPTURE_HINT.into(),
    }
}

/// A recorded sequence of launches ([`Device::capture`]), replayed with [`Graph::replay`]. Not `Send`:
/// replay it on the thread that captured it (a CUDA graph object is not thread-safe).
pub struct Graph {
    device: Device,
    launches: usize,
    buffers: Vec<Captured>,
    body: Body,
    _not_send: PhantomData<*const ()>,
}

enum Body {
    /// None when the capture launched nothing.
    Cuda(Option<cudarc::driver::CudaGraph>),
    Emulator(Vec<emu::Recorded>),
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Graph of {} launches on {}",
            self.launches,
            self.device.describe()
        )
    }
}

impl Device {
    /// Records the kernel launches that `f`'s ops make on this device, without running them, into a
    /// [`Graph`] that [`Graph::replay`] runs, as often as wanted, with the tensors (addresses) the ops were
    /// given: write new inputs into them between replays (`Tensor::copy_from_slice`, or a framework's own
    /// kernels on the same stream) and read the outputs after.
    ///
    /// During the capture, ops may only launch kernels: allocating, a host transfer, `synchronize`, or a
    /// kernel's first launch on this device fail with an error naming it (the module doc says why), and
    /// so does a launch on this device from another thread; a tensor the captured launches use being
    /// dropped before the capture ends fails the capture (others may be dropped: they are freed when it
    /// ends). An error from `f`
    /// ends the capture and is returned; the device is then as before. On a GPU the device needs a stream
    /// of its own with cudarc's event tracking off ([`Device::from_cuda_stream`]; README, "Graphs"):
    /// the legacy default stream of [`Device::cuda`] cannot be captured.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
        {
            // the queue lock first, as every host access takes it before its check: none of them is
            // between its check and its stream operation while the capture begins
            let _queue = lock(&self.inner.queue);
            let mut state = lock(&self.inner.capture);
            if state.active.is_some() {
                return Err(Error::Unsupported {
                    what: format!(
                        "Device::capture while {} is already capturing",
                        self.describe()
                    ),
                    hint:
                        "end the first capture (return from its closure) before beginning another"
                            .into(),
                });
            }
            if let Backend::Cuda(c) = &self.inner.backend {
                c.begin_capture()?;
            }
            state.active = Some(CaptureLog::new());
        }
        let mut ending = Ending {
            device: self,
            ended: false,
        };
        let result = f();
        let (mut log, cuda) = ending.end();
        // the tensors dropped during the capture: freed now that it has ended
        log.deferred.clear();
        result?;
        if let Some(c) = first_gone(&log.buffers) {
            return Err(Error::InvalidState {
                op: "Device::capture",
                message: format!(
                    "{c} was freed before the capture ended: the graph would use freed memory"
                ),
            });
        }
        let body = match cuda {
            Some(graph) => Body::Cuda(graph?),
            None => Body::Emulator(log.records),
        };
        Ok(Graph {
            device: self.clone(),
            launches: log.launches,
            buffers: log.buffers,
            body,
            _not_send: PhantomData,
        })
    }

    /// Whether a capture is in progress on this device: a [`Device::capture`], or on a GPU one that
    /// someone else began on the device's stream (cudarc's `CudaStream::begin_capture`: the driver is
    /// asked), under which the ops refuse what a capture cannot record just the same.
    pub fn is_capturing(&self) -> bool {
        lock(&self.inner.capture).active.is_some() || self.stream_capturing()
    }

    /// The serial number of the [`Device::capture`] in progress (unique in the process), so state kept
    /// across calls can tell one capture from the next; None outside one, and in a capture someone else
    /// began on the stream.
    pub(crate) fn capture_serial(&self) -> Option<u64> {
        lock(&self.inner.capture)
            .active
            .as_ref()
            .map(|log| log.serial)
    }

    /// Frees `storage` (a dropped tensor's) now, or when the capture in progress has ended. The caller
    /// holds the queue lock, so no capture begins meanwhile.
    pub(crate) fn free_after_capture(&self, storage: Box<dyn Send>) {
        let mut state = lock(&self.inner.capture);
        match state.active.as_mut() {
            Some(log) => log.deferred.push(storage),
            None => drop(storage),
        }
    }

    /// Whether the driver says the device's stream is capturing (false on the emulator).
    pub(crate) fn stream_capturing(&self) -> bool {
        match &self.inner.backend {
            Backend::Cuda(c) => c.stream_capturing(),
            Backend::Emulator(..) => false,
        }
    }

    /// An error when a capture is in progress: `what` (e.g. "Tensor::to_vec (a download)") is not a
    /// kernel launch and cannot be recorded.
    pub(crate) fn refuse_in_capture(&self, what: &str) -> Result<()> {
        self.refuse_with(what, CAPTURE_HINT)
    }

    /// The queue lock (see `Inner::queue`), for host work on the device's memory (`what`: an allocation,
    /// a transfer, a copy), or an error when a capture is in progress. The check is made under the lock,
    /// which a capture takes to begin and end, so the work cannot land in a capture that begins meanwhile.
    pub(crate) fn host_access(&self, what: &str) -> Result<MutexGuard<'_, ()>> {
        let queue = lock(&self.inner.queue);
        self.refuse_in_capture(what)?;
        Ok(queue)
    }

    /// An error when a capture is in progress: `what` launches kernels whose parameters change from
    /// call to call (a step count, a fixed dropout's offset), which a replay would repeat.
    pub(crate) fn refuse_changing_params_in_capture(&self, what: &str) -> Result<()> {
        self.refuse_with(
            what,
            "run it eagerly, between replays: a graph replays its launches with the parameters they \
             were captured with",
        )
    }

    fn refuse_with(&self, what: &str, hint: &str) -> Result<()> {
        if self.is_capturing() {
            return Err(self.capture_refusal(what, hint));
        }
        Ok(())
    }

    fn capture_refusal(&self, what: &str, hint: &str) -> Error {
        Error::Unsupported {
            what: format!(
                "{what}: not possible during a graph capture of {}",
                self.describe()
            ),
            hint: hint.into(),
        }
    }
}

/// Ends a capture once, also when `f` panics (so the device and its stream leave capture mode).
struct Ending<'a> {
    device: &'a Device,
    ended: bool,
}

/// What a capture left: its log, and on a GPU the captured graph (or the error that ended it).
type Ended = (
    CaptureLog,
    Option<Result<Option<cudarc::driver::CudaGraph>>>,
);

impl Ending<'_> {
    fn end(&mut self) -> Ended {
        self.ended = true;
        // the stream leaves capture mode under the locks that eager launches and host accesses hold, so
        // none of them can slip into the capture meanwhile
        let _queue = lock(&self.device.inner.queue);
        let mut state = lock(&self.device.inner.capture);
        let cuda = match &self.device.inner.backend {
            Backend::Cuda(c) => Some(c.end_capture()),
            Backend::Emulator(..) => None,
        };
        let log = state.active.take().unwrap_or_else(CaptureLog::new);
        (log, cuda)
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.end();
        }
    }
}

impl Graph {
    /// Runs the captured launches again, in order, on the captured tensors. Checks first that each of
    /// those tensors is alive (an error names the first that is not, and nothing runs); refused during a
    /// capture on the same device. On a GPU it is queued on the device's stream like any op.
    pub fn replay(&self) -> Result<()> {
        // the queue lock keeps a tensor from being dropped (or written by the host), and a capture of
        // this device from beginning, between the checks and the end of the replay
        let _queue = lock(&self.device.inner.queue);
        // a capture of this device (a framework's capture of the stream may hold a replay: a child graph)
        if lock(&self.device.inner.capture).active.is_some() {
            return Err(self.device.capture_refusal("Graph::replay", CAPTURE_HINT));
        }
        if let Some(c) = first_gone(&self.buffers) {
            return Err(Error::InvalidState {
                op: "Graph::replay",
                message: format!(
                    "{c} was dropped, its CUDA slice taken mutably, or (an adapter table) its \
                     AdapterSet changed since the capture: capture again with the tensors in use"
                ),
            });
        }
        match (&self.body, &self.device.inner.backend) {
            (Body::Cuda(Some(g)), _) => g
                .launch()
                .map_err(Error::cuda("launching a captured graph")),
            (Body::Cuda(None), _) => Ok(()),
            (Body::Emulator(records), Backend::Emulator(cfg, _)) => {
                for r in records {
                    self.device.note_launch(r.kernel);
                    // SAFETY: every buffer the records point into is alive (checked above, and kept so
                    // by the queue lock, which every host access and tensor drop on this device takes).
                    unsafe { r.replay(cfg)? };
                }
                Ok(())
            }
            (Body::Emulator(_), Backend::Cuda(_)) => unreachable!("a graph stays on its device"),
        }
    }

    /// How many kernel launches the graph holds.
    pub fn launches(&self) -> usize {
        self.launches
    }

    /// The device the graph was captured on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}
