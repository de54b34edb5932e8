//! The CUDA backend: a cudarc context and stream, the embedded fatbins loaded once per context, and the
//! launch. cudarc loads libcuda at run time, so none of this needs CUDA to build; every driver call that
//! could panic for a missing library is behind `is_culib_present`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};

use super::{Arg, StorageMut, StorageRef, compat};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, cuda_compiled, modules};
use crate::params::KernelParams;
use crate::plan::LaunchPlan;

/// The driver's CUDA version (`cuDriverGetVersion`: 1000·major + 10·minor), None if it cannot say.
fn driver_version() -> Option<i32> {
    let mut v = 0;
    // SAFETY: called only once a context exists, so the driver library is loaded; writes one int.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// A compute capability (major, minor) as one number: (8, 6) is 86.
fn capability_number((major, minor): (i32, i32)) -> u32 {
    (major * 10 + minor) as u32
}

/// Oldest architecture the embedded kernels run on (mma.sync bf16, ldmatrix, cp.async: sm_80).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    capability: (i32, i32),
    /// Whether kernels are launched programmatically dependent here ([`programmatic_capable`]); cleared
    /// if the driver refuses such a launch that it takes the ordinary way, with its words in
    /// `programmatic_refused`.
    programmatic: AtomicBool,
    programmatic_refused: Mutex<Option<String>>,
    /// Module cache: each fatbin loaded at most once per context; functions with the dynamic
    /// shared-memory limit already raised to and whether their loaded code has the wait
    /// ([`code_waits`]).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, Function>>,
}

/// A kernel as loaded in this context.
struct Function {
    f: CudaFunction,
    smem_limit: u32,
    waits: bool,
}

/// Whether a loaded kernel's code executes `griddepcontrol.wait` at entry: LK_KERNEL_ENTRY compiles it
/// for PTX targets 9.0 and newer, and `ptx_version` is the virtual architecture the driver loaded the
/// function from (`CU_FUNC_ATTRIBUTE_PTX_VERSION`, 10·major + minor). The device-wide rule
/// ([`programmatic_capable`]) says what the driver should load; this is what it did (with
/// `CUDA_FORCE_PTX_JIT=1` an H100 compiles compute_80's PTX, no wait in it, instead of the sm_90 SASS).
fn code_waits(ptx_version: i32) -> bool {
    ptx_version >= 90
}

/// Whether kernels may be launched with programmatic stream serialization allowed (programmatic
/// dependent launch) on a GPU of capability `cc` (e.g. 90) that runs this build's code by `route`: the
/// GPU has it (9.0 and newer) and the code it runs does `griddepcontrol.wait` before touching global
/// memory, which LK_KERNEL_ENTRY compiles only for sm_90 and newer. A build for sm_80 to 89 alone runs on
/// an H100 through the driver compiling compute_80's PTX, without the wait: launched the ordinary way.
/// (The sm_90a kernels run only on sm_90, which they are built for, wait included.)
fn programmatic_capable(cc: u32, route: compat::Route) -> bool {
    let code = match route {
        compat::Route::Sass(a) | compat::Route::Ptx(a) => a,
    };
    cc >= 90 && code >= 90
}

/// `LK_PDL`: unset, empty or `1` launches every kernel that can be with programmatic dependent launch
/// (the default), `0` launches them the ordinary way (to compare, or to rule it out).
pub(crate) fn programmatic_launch_wanted(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("") | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(Error::Unsupported {
            what: format!("LK_PDL={other:?}"),
            hint: "use 1 (the default: programmatic dependent launch on sm_90 and newer) or 0"
                .into(),
        }),
    }
}

impl CudaDevice {
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        if !cuda_compiled() {
            return Err(Error::CudaUnavailable(
                "this build has no CUDA kernels: nvcc was not found when the crate was built \
                 (see README: scripts/install-cuda-toolchain.sh, NVCC)"
                    .into(),
            ));
        }
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "no CUDA driver library (libcuda.so) was found".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(Error::cuda("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::CudaUnavailable(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::cuda("creating the CUDA context"))?;
        let stream = ctx.default_stream();
        Self::with_stream(stream)
    }

    /// A device on a stream someone else made (a framework's): its context, its stream, so every op
    /// is ordered with the framework's own work on that stream and its `CudaSlice`s can be wrapped
    /// without copies.
    pub(crate) fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !cuda_compiled() {
            return Err(Error::CudaUnavailable(
                "this build has no CUDA kernels: nvcc was not found when the crate was built \
                 (see README: scripts/install-cuda-toolchain.sh, NVCC)"
                    .into(),
            ));
        }
        let ctx = stream.context().clone();
        let ordinal = ctx.ordinal();
        let capability = ctx
            .compute_capability()
            .map_err(Error::cuda("reading the compute capability"))?;
        if capability < MIN_COMPUTE_CAPABILITY {
            return Err(Error::CudaUnavailable(format!(
                "GPU {ordinal} is sm_{}{}, older than the kernels' minimum sm_{}{}",
                capability.0, capability.1, MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            )));
        }
        let cc = capability_number(capability);
        let route = compat::route(cc, &compat::built_archs())
            .map_err(|e| Error::CudaUnavailable(format!("GPU {ordinal}: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            capability,
            programmatic: AtomicBool::new(programmatic_capable(cc, route)),
            programmatic_refused: Mutex::new(None),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn capability_number(&self) -> u32 {
        capability_number(self.capability)
    }

    pub(crate) fn sm_count(&self) -> Result<u32> {
        let n = self
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(Error::cuda("reading the multiprocessor count"))?;
        Ok(n.max(1) as u32)
    }

    pub fn describe(&self) -> String {
        format!(
            "CUDA device {} ({}, sm_{}{})",
            self.ctx.ordinal(),
            self.name,
            self.capability.0,
            self.capability.1
        )
    }

    /// Puts the stream in capture mode for [`crate::Device::capture`], when it can be captured.
    pub(crate) fn begin_capture(&self) -> Result<()> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        let raw = self.stream.cu_stream() as usize;
        // the legacy default stream (null, or CU_STREAM_LEGACY = 1) synchronises with every other
        // blocking stream, which a capture cannot record: the driver refuses it
        if raw == 0 || raw == 1 {
            return Err(Error::Unsupported {
                what: format!(
                    "graph capture on the legacy default stream of {}",
                    self.describe()
                ),
                hint: "capture needs a stream of its own: Device::from_cuda_stream(context.new_stream()?) \
                       (README, \"Graphs\")"
                    .into(),
            });
        }
        if self.ctx.is_managing_stream_synchronization() {
            return Err(Error::Unsupported {
                what: "graph capture with cudarc's multi-stream event tracking on".into(),
                hint: "cudarc waits on and records an event around every use of a slice, which a \
                       capture cannot take: call CudaContext::disable_event_tracking before allocating \
                       (you then order your streams yourself; README, \"Graphs\")"
                    .into(),
            });
        }
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(Error::cuda("beginning a graph capture"))
    }

    /// Whether the stream is capturing (or its capture was invalidated and not yet ended), by the driver.
    pub(crate) fn stream_capturing(&self) -> bool {
        use cudarc::driver::sys::CUstreamCaptureStatus;
        matches!(
            self.stream.capture_status(),
            Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
                | CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED)
        )
    }

    /// Ends the stream's capture and instantiates what it recorded (None: nothing was launched).
    pub(crate) fn end_capture(&self) -> Result<Option<cudarc::driver::CudaGraph>> {
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(Error::cuda(
                "ending a graph capture (a call the capture could not take invalidates it)",
            ))?;
        if let Some(g) = &graph {
            g.upload()
                .map_err(Error::cuda("uploading a captured graph"))?;
        }
        Ok(graph)
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::cuda("synchronizing the stream"))
    }

    /// The kernel, loaded and allowed `smem` bytes of dynamic shared memory, and whether its loaded code
    /// waits at entry ([`code_waits`]).
    fn function(
        &self,
        module: &'static str,
        name: &'static str,
        smem: u32,
    ) -> Result<(CudaFunction, bool)> {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = functions.get_mut(name) {
            if smem > k.smem_limit {
                raise_smem_limit(&k.f, name, smem)?;
                k.smem_limit = smem;
            }
            return Ok((k.f.clone(), k.waits));
        }
        let module_handle = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(module) {
                Some(m) => m.clone(),
                None => {
                    let image = modules::MODULES
                        .iter()
                        .find(|(m, _)| *m == module)
                        .map(|(_, img)| *img)
                        .ok_or_else(|| {
                            Error::CudaUnavailable(format!("module `{module}` was not embedded"))
                        })?;
                    let loaded = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                        .map_err(|e| {
                            let why = compat::load_context(
                                self.capability_number(),
                                &compat::built_archs(),
                                driver_version(),
                                compat::nvcc_cuda_version(),
                            );
                            Error::cuda(format!("loading module `{module}` ({why})"))(e)
                        })?;
                    modules.insert(module, loaded.clone());
                    loaded
                }
            }
        };
        let f = module_handle
            .load_function(name)
            .map_err(Error::cuda(format!("looking up kernel `{name}`")))?;
        // the driver's limit on this function's dynamic shared memory as loaded (48 KiB less its static
        // shared memory), read rather than assumed: a kernel with both kinds can exceed it below 48 KiB
        let limit = f
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
            .map_err(Error::cuda(format!(
                "reading the dynamic shared memory limit of `{name}`"
            )))?;
        let limit = u32::try_from(limit).unwrap_or(0);
        if smem > limit {
            raise_smem_limit(&f, name, smem)?;
        }
        let ptx_version = f
            .ptx_version()
            .map_err(Error::cuda(format!("reading the PTX version of `{name}`")))?;
        let waits = code_waits(ptx_version);
        functions.insert(
            name,
            Function {
                f: f.clone(),
                smem_limit: smem.max(limit),
                waits,
            },
        );
        Ok((f, waits))
    }

    pub(crate) fn launch<P: KernelParams>(
        &self,
        kernel: &'static Kernel<P>,
        plan: &LaunchPlan,
        args: &mut [Arg<'_>],
        build: impl FnOnce(&[u64]) -> P,
    ) -> Result<()> {
        let (func, waits) = self.function(kernel.module, kernel.name, plan.smem_bytes)?;
        let programmatic = self.programmatic_launch()? && waits;
        // The guards record read/write events after the launch is queued (cudarc's multi-stream
        // tracking), so they are dropped only after `launch`.
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(args.len());
        let mut ptrs = Vec::with_capacity(args.len());
        for arg in args.iter_mut() {
            let (ptr, guard) = match arg {
                Arg::In(_, b) => match b.storage() {
                    StorageRef::Cuda(c) => c.read_ptr(&self.stream),
                    StorageRef::Host(_) => unreachable!("device checked by Device::launch"),
                },
                Arg::Out(_, b) => match b.storage_mut() {
                    StorageMut::Cuda(c) => c.write_ptr(&self.stream),
                    StorageMut::Host(_) => unreachable!("device checked by Device::launch"),
                },
            };
            ptrs.push(ptr);
            guards.push(guard);
        }
        let mut params = build(&ptrs);
        let launched = if programmatic {
            self.launch_programmatic(&func, plan, &mut params)
                .or_else(|e| {
                    // a driver, stream or capture that refuses the attribute (an argument error, which
                    // enqueues nothing and leaves the context usable): the ordinary launch, and no more
                    // programmatic ones on this device; any other error is the launch's
                    use cudarc::driver::sys::cudaError_enum::{
                        CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_SUPPORTED,
                    };
                    if !matches!(e.0, CUDA_ERROR_INVALID_VALUE | CUDA_ERROR_NOT_SUPPORTED) {
                        return Err(e);
                    }
                    let r = self.launch_ordinary(&func, plan, &params);
                    if r.is_ok() {
                        self.programmatic.store(false, Ordering::Relaxed);
                        let why = format!("the driver refused it for `{}`: {e}", kernel.name);
                        *self
                            .programmatic_refused
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(why);
                    }
                    r
                })
        } else {
            self.launch_ordinary(&func, plan, &params)
        };
        launched.map_err(Error::cuda(format!("launching `{}`", kernel.name)))?;
        drop(guards);
        Ok(())
    }

    /// Whether launches are made with programmatic dependent launch: a GPU and build that have it
    /// ([`programmatic_capable`]), `LK_PDL` not 0, and no launch of this kind refused so far (each
    /// kernel's loaded code is checked at its launch as well, [`code_waits`]).
    pub(crate) fn programmatic_launch(&self) -> Result<bool> {
        // read on every GPU, so a wrong value is an error everywhere, not only where it would matter
        let wanted = programmatic_launch_wanted(std::env::var("LK_PDL").ok().as_deref())?;
        Ok(wanted && self.programmatic.load(Ordering::Relaxed))
    }

    /// Why programmatic dependent launch was turned off on this device, if the driver refused it.
    pub(crate) fn programmatic_refused(&self) -> Option<String> {
        self.programmatic_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn launch_ordinary<P: KernelParams>(
        &self,
        func: &CudaFunction,
        plan: &LaunchPlan,
        params: &P,
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        let cfg = LaunchConfig {
            grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
            block_dim: (plan.block[0], plan.block[1], plan.block[2]),
            shared_mem_bytes: plan.smem_bytes,
        };
        let mut builder = self.stream.launch_builder(func);
        builder.arg(params);
        // SAFETY: `params` is the #[repr(C)] struct generated from lora_params.h that this kernel takes
        // by value (one header for both sides); the op validated every shape, dtype and device, and the
        // pointers in it are live allocations of this context, held borrowed (and guarded) by `launch`
        // until after the launch is queued.
        unsafe { builder.launch(cfg) }.map(|_| ())
    }

    /// `cuLaunchKernelEx` with programmatic stream serialization allowed on this device's stream.
    fn launch_programmatic<P: KernelParams>(
        &self,
        func: &CudaFunction,
        plan: &LaunchPlan,
        params: &mut P,
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        // SAFETY: `params` is the #[repr(C)] struct from lora_params.h that the kernel takes by value, its
        // pointers live allocations of this context, held (and guarded) by `launch` until the launch is
        // queued; `func` belongs to this context and its loaded code begins with griddepcontrol.wait
        // (`programmatic_capable`, `code_waits`).
        unsafe { launch_programmatic_raw(func, &self.stream, plan, params) }
    }
}

/// Launches `func` on `stream` with `cuLaunchKernelEx` and programmatic stream serialization allowed: the
/// kernel may be scheduled before the one ahead of it in the stream has finished, and must wait for it
/// (LK_KERNEL_ENTRY) before touching global memory. What every launch on an H100 or H200 does; public
/// (hidden) so that the GPU tests probe this very launch (tests/gpu_intrinsics.rs).
///
/// # Safety
/// `params` must be the parameter struct `func` takes by value, its pointers live allocations of the
/// stream's context until the kernel has run; `func` must belong to that context, and its code must
/// execute `griddepcontrol.wait` before any global memory access it needs ordered after the kernel
/// ahead of it.
#[doc(hidden)]
pub unsafe fn launch_programmatic_raw<P>(
    func: &CudaFunction,
    stream: &CudaStream,
    plan: &LaunchPlan,
    params: &mut P,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { pad: [0; 64] },
    };
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: plan.grid[0],
        gridDimY: plan.grid[1],
        gridDimZ: plan.grid[2],
        blockDimX: plan.block[0],
        blockDimY: plan.block[1],
        blockDimZ: plan.block[2],
        sharedMemBytes: plan.smem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut args = [params as *mut P as *mut std::ffi::c_void];
    stream.context().bind_to_thread()?;
    // SAFETY: the caller's contract (params, pointers, function, the wait); `cfg`, `attr` and `args`
    // outlive the call, which copies them.
    unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            func.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

fn raise_smem_limit(f: &CudaFunction, name: &str, smem: u32) -> Result<()> {
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(Error::cuda(format!(
        "allowing {smem} bytes of dynamic shared memory for `{name}`"
    )))
}

/// A CUDA allocation of any element type, as a launch sees it.
pub(crate) trait CudaPtr {
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
    fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

impl<T> CudaPtr for CudaSlice<T> {
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr(stream)
    }
    fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr_mut(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmatic_launch_needs_the_gpu_and_the_wait_in_the_code() {
        use compat::Route::{Ptx, Sass};
        // sm_90 code (the wait compiled in) on sm_90 and newer GPUs
        assert!(programmatic_capable(90, Sass(90)));
        assert!(programmatic_capable(100, Ptx(90)));
        assert!(programmatic_capable(120, Ptx(90)));
        // a build for sm_80..89 JIT-compiled on an H100 has no wait; an A100 or an L40 has no such launch
        assert!(!programmatic_capable(90, Ptx(80)));
        assert!(!programmatic_capable(100, Ptx(86)));
        assert!(!programmatic_capable(89, Sass(89)));
        assert!(!programmatic_capable(80, Sass(80)));
        // what the default build (80, 86, 89, 90) routes each of them to
        let built = [80, 86, 89, 90];
        let on = |cc| programmatic_capable(cc, compat::route(cc, &built).unwrap());
        assert!(on(90));
        assert!(!on(80) && !on(86) && !on(89));
        assert!(
            !on(100),
            "Blackwell takes compute_80's PTX from the default build: no wait in it"
        );
    }

    #[test]
    fn only_code_loaded_from_sm_90_ptx_or_newer_waits() {
        assert!(code_waits(90) && code_waits(100) && code_waits(120));
        assert!(!code_waits(80) && !code_waits(86) && !code_waits(89));
    }

    #[test]
    fn lk_pdl_takes_0_or_1_and_names_anything_else() {
        assert!(programmatic_launch_wanted(None).unwrap());
        assert!(programmatic_launch_wanted(Some("")).unwrap());
        assert!(programmatic_launch_wanted(Some("1")).unwrap());
        assert!(!programmatic_launch_wanted(Some("0")).unwrap());
        let e = programmatic_launch_wanted(Some("off"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LK_PDL=\"off\"") && e.contains("use 1"), "{e}");
    }
}
