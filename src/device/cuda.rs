//! The CUDA backend: a cudarc context and stream, the embedded fatbins loaded once per context, and the
//! launch. cudarc loads libcuda at run time, so none of this needs CUDA to build; every driver call that
//! could panic for a missing library is behind `is_culib_present`.

use std::collections::HashMap;
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
    /// Module cache: each fatbin loaded at most once per context; functions with the dynamic
    /// shared-memory limit already raised to.
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
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
        compat::route(capability_number(capability), &compat::built_archs())
            .map_err(|e| Error::CudaUnavailable(format!("GPU {ordinal}: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            capability,
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

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::cuda("synchronizing the stream"))
    }

    fn function(
        &self,
        module: &'static str,
        name: &'static str,
        smem: u32,
    ) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((f, limit)) = functions.get_mut(name) {
            if smem > *limit {
                raise_smem_limit(f, name, smem)?;
                *limit = smem;
            }
            return Ok(f.clone());
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
        functions.insert(name, (f.clone(), smem.max(limit)));
        Ok(f)
    }

    pub(crate) fn launch<P: KernelParams>(
        &self,
        kernel: &'static Kernel<P>,
        plan: &LaunchPlan,
        args: &mut [Arg<'_>],
        build: impl FnOnce(&[u64]) -> P,
    ) -> Result<()> {
        let func = self.function(kernel.module, kernel.name, plan.smem_bytes)?;
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
        let params = build(&ptrs);
        let cfg = LaunchConfig {
            grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
            block_dim: (plan.block[0], plan.block[1], plan.block[2]),
            shared_mem_bytes: plan.smem_bytes,
        };
        let mut builder = self.stream.launch_builder(&func);
        builder.arg(&params);
        // SAFETY: `params` is the #[repr(C)] struct generated from lora_params.h that this kernel takes
        // by value (one header for both sides); the op validated every shape, dtype and device, and the
        // pointers in it are live allocations of this context, held borrowed (and guarded) until after
        // the launch is queued.
        unsafe { builder.launch(cfg) }
            .map_err(Error::cuda(format!("launching `{}`", kernel.name)))?;
        drop(guards);
        Ok(())
    }
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
