//! `Tensor<T>`: a row-major array with a shape, stored on a [`Device`]: a cudarc `CudaSlice` on a GPU,
//! a guarded host buffer on the emulator.

use std::sync::{Arc, Weak};

use cudarc::driver::CudaSlice;

use crate::device::{Backend, Device, GuardedBuf, RawBuffer, StorageMut, StorageRef};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

pub struct Tensor<T: Element> {
    shape: Vec<usize>,
    storage: Storage<T>,
    device: Device,
    /// Dropped with the storage, or replaced when the storage may change (see [`RawBuffer::alive`]).
    alive: Arc<()>,
}

impl<T: Element> Drop for Tensor<T> {
    fn drop(&mut self) {
        release(&self.device, &mut self.storage, &mut self.alive);
    }
}

/// Frees `storage` and ends its liveness token together, under the device's queue lock: a graph replay
/// either checked the token before (and its launches are queued before the free) or sees it gone. During
/// a [`Device::capture`] the memory itself is freed when the capture ends (a GPU's free would be a
/// stream operation the capture cannot take).
fn release<T: Send + 'static>(device: &Device, storage: &mut Storage<T>, alive: &mut Arc<()>) {
    let _queue = device.queue();
    let old = std::mem::replace(storage, Storage::Host(GuardedBuf::empty()));
    *alive = Arc::default();
    device.free_after_capture(Box::new(old));
}

enum Storage<T> {
    Cuda(CudaSlice<T>),
    Host(GuardedBuf),
}

impl<T: cudarc::driver::DeviceRepr + bytemuck::Pod> Storage<T> {
    /// New storage on `device` holding `data` (the caller holds the queue lock; `what` names the
    /// upload in a CUDA error).
    fn upload(device: &Device, data: &[T], what: &'static str) -> Result<Self> {
        Ok(match device.backend() {
            Backend::Cuda(c) => {
                Storage::Cuda(c.stream().clone_htod(data).map_err(Error::cuda(what))?)
            }
            Backend::Emulator(..) => {
                let mut buf = GuardedBuf::new(std::mem::size_of_val(data), 0)?;
                buf.bytes_mut().copy_from_slice(bytemuck::cast_slice(data));
                Storage::Host(buf)
            }
        })
    }

    /// Overwrites the storage with `data`, its length (queued after the work before it on a GPU).
    fn write(&mut self, device: &Device, data: &[T], what: &'static str) -> Result<()> {
        match self {
            Storage::Cuda(s) => cuda_stream(device)
                .memcpy_htod(data, s)
                .map_err(Error::cuda(what)),
            Storage::Host(h) => {
                h.bytes_mut().copy_from_slice(bytemuck::cast_slice(data));
                Ok(())
            }
        }
    }
}

impl<T> Storage<T> {
    /// (start address, length) of `bytes` bytes of this storage on `device`, for the aliasing check.
    fn byte_range(&self, device: &Device, bytes: usize) -> (u64, u64) {
        match self {
            Storage::Cuda(s) => {
                let stream = cuda_stream(device);
                let (ptr, _guard) = cudarc::driver::DevicePtr::device_ptr(s, stream);
                (ptr, bytes as u64)
            }
            Storage::Host(h) => (h.data_ptr() as u64, bytes as u64),
        }
    }
    fn as_ref(&self) -> StorageRef<'_> {
        match self {
            Storage::Cuda(s) => StorageRef::Cuda(s),
            Storage::Host(h) => StorageRef::Host(h),
        }
    }
    fn as_mut(&mut self) -> StorageMut<'_> {
        match self {
            Storage::Cuda(s) => StorageMut::Cuda(s),
            Storage::Host(h) => StorageMut::Host(h),
        }
    }
}

impl<T: Element> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor<{}>{:?} on {}",
            T::DTYPE,
            self.shape,
            self.device.describe()
        )
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The elements of `shape` when they and their bytes fit in memory (`isize::MAX` bytes, as Rust's
/// allocations): a shape whose product overflows is an error, not a wrapped size.
fn checked_numel<T>(op: &'static str, shape: &[usize]) -> Result<usize> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let max = isize::MAX as usize / std::mem::size_of::<T>().max(1);
    match n {
        Some(n) if n <= max => Ok(n),
        _ => Err(Error::TooLarge {
            op,
            arg: "shape (its element count)",
            value: shape.iter().fold(1usize, |acc, &d| acc.saturating_mul(d)),
            max,
        }),
    }
}

impl<T: Element> Tensor<T> {
    /// Uploads `data` (row-major, `shape.iter().product()` elements).
    pub fn from_slice(device: &Device, data: &[T], shape: &[usize]) -> Result<Self> {
        let _queue = device.host_access("Tensor::from_slice (an allocation and an upload)")?;
        let n = checked_numel::<T>("Tensor::from_slice", shape)?;
        if data.len() != n {
            return Err(Error::DataLength {
                op: "Tensor::from_slice",
                arg: "data",
                expected: n,
                got: data.len(),
                shape: shape.to_vec(),
            });
        }
        let storage = Storage::upload(device, data, "uploading a tensor")?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
            device: device.clone(),
            alive: Arc::default(),
        })
    }

    /// A tensor of zeros.
    pub fn zeros(device: &Device, shape: &[usize]) -> Result<Self> {
        let _queue = device.host_access("Tensor::zeros (an allocation)")?;
        let n = checked_numel::<T>("Tensor::zeros", shape)?;
        let storage = match device.backend() {
            Backend::Cuda(c) => Storage::Cuda(
                c.stream()
                    .alloc_zeros::<T>(n)
                    .map_err(Error::cuda("allocating a tensor"))?,
            ),
            Backend::Emulator(..) => {
                Storage::Host(GuardedBuf::new(n * std::mem::size_of::<T>(), 0)?)
            }
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
            device: device.clone(),
            alive: Arc::default(),
        })
    }

    /// An output buffer that the next kernel overwrites completely, so it is not zeroed (at the
    /// headline shape zeroing Y alone would move 64 MiB for nothing). On the emulator it is poisoned
    /// (NaN) and counts as never written: initcheck reports any kernel read of an element before a
    /// kernel wrote it, and the tests' reference comparison catches any element left unwritten.
    pub(crate) fn for_output(device: &Device, shape: &[usize]) -> Result<Self> {
        let _queue = device.host_access("allocating an output or scratch tensor (an op without its `_into` form, or a workspace without a buffer of this size yet)")?;
        checked_numel::<T>("Tensor::for_output", shape)?;
        match device.backend() {
            Backend::Cuda(c) => {
                // SAFETY: the memory is left unset. Every caller passes the tensor as the output of a
                // kernel that writes all of it before anything reads it (checked on the emulator, as
                // above), and any bit pattern is a valid bf16/f16/f32, so even a bug would give wrong
                // numbers, never undefined behaviour on the host.
                let slice = unsafe { c.stream().alloc::<T>(numel(shape)) }
                    .map_err(Error::cuda("allocating a tensor"))?;
                Ok(Tensor {
                    shape: shape.to_vec(),
                    storage: Storage::Cuda(slice),
                    device: device.clone(),
                    alive: Arc::default(),
                })
            }
            Backend::Emulator(..) => Ok(Tensor {
                shape: shape.to_vec(),
                storage: Storage::Host(GuardedBuf::uninit(
                    numel(shape) * std::mem::size_of::<T>(),
                )?),
                device: device.clone(),
                alive: Arc::default(),
            }),
        }
    }

    /// This tensor's memory as a fresh [`Tensor::for_output`] of `shape` (same number of elements): a
    /// reused scratch buffer. On the emulator it is poisoned and tracked as never written again.
    pub(crate) fn recycle_for_output(mut self, shape: &[usize]) -> Self {
        debug_assert_eq!(numel(shape), self.numel());
        if let Storage::Host(h) = &mut self.storage {
            let _queue = self.device.queue();
            h.forget_writes();
        }
        self.shape = shape.to_vec();
        self
    }

    /// Wraps an existing cudarc allocation without copying (candle and other cudarc users). The slice
    /// must belong to `device`'s CUDA context and hold exactly `shape.iter().product()` elements.
    pub fn from_cuda_slice(device: &Device, slice: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        let Some(cuda) = device.as_cuda() else {
            return Err(Error::DeviceMismatch {
                op: "Tensor::from_cuda_slice",
                arg: "device",
                expected: "a CUDA device".into(),
                got: device.describe(),
            });
        };
        if !std::sync::Arc::ptr_eq(slice.context(), cuda.context()) {
            return Err(Error::DeviceMismatch {
                op: "Tensor::from_cuda_slice",
                arg: "slice",
                expected: device.describe(),
                got: format!(
                    "another CUDA context (device {})",
                    slice.context().ordinal()
                ),
            });
        }
        let n = checked_numel::<T>("Tensor::from_cuda_slice", shape)?;
        if slice.len() != n {
            return Err(Error::DataLength {
                op: "Tensor::from_cuda_slice",
                arg: "slice",
                expected: n,
                got: slice.len(),
                shape: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda(slice),
            device: device.clone(),
            alive: Arc::default(),
        })
    }

    /// The underlying cudarc allocation, if on a GPU.
    pub fn as_cuda_slice(&self) -> Option<&CudaSlice<T>> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Host(_) => None,
        }
    }

    /// The underlying cudarc allocation, mutably (e.g. as the output of a cuBLAS call), if on a GPU. A
    /// [`crate::Graph`] captured with this tensor refuses to replay after this call (the slice could
    /// have been replaced by another).
    pub fn as_cuda_slice_mut(&mut self) -> Option<&mut CudaSlice<T>> {
        if matches!(self.storage, Storage::Cuda(_)) {
            self.renew_liveness();
        }
        match &mut self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Host(_) => None,
        }
    }

    /// Gives the cudarc allocation back (zero-copy), if on a GPU.
    pub fn into_cuda_slice(mut self) -> Option<CudaSlice<T>> {
        match std::mem::replace(&mut self.storage, Storage::Host(GuardedBuf::empty())) {
            Storage::Cuda(s) => Some(s),
            Storage::Host(h) => {
                self.storage = Storage::Host(h);
                None
            }
        }
    }

    /// A new liveness token ([`RawBuffer::alive`]): graphs captured with this tensor refuse to replay, as
    /// its memory may change under them (a swapped CUDA slice, an adapter table rewritten in place). Under
    /// the queue lock, so that a replay that passed its check is queued before the change.
    pub(crate) fn renew_liveness(&mut self) {
        let _queue = self.device.queue();
        self.alive = Arc::default();
    }

    /// Downloads the contents (waits for queued work on a GPU).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let _queue = self.device.host_access("Tensor::to_vec (a download)")?;
        match &self.storage {
            Storage::Cuda(s) => {
                let stream = cuda_stream(&self.device);
                stream
                    .clone_dtoh(s)
                    .map_err(Error::cuda("downloading a tensor"))
            }
            // data is 256-byte aligned, so the cast cannot fail
            Storage::Host(h) => Ok(bytemuck::cast_slice(h.bytes()).to_vec()),
        }
    }

    /// Overwrites the contents with `data` (same number of elements).
    pub fn copy_from_slice(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::DataLength {
                op: "Tensor::copy_from_slice",
                arg: "data",
                expected: self.numel(),
                got: data.len(),
                shape: self.shape.clone(),
            });
        }
        let _queue = self
            .device
            .host_access("Tensor::copy_from_slice (an upload)")?;
        self.storage.write(&self.device, data, "uploading a tensor")
    }

    /// Copies `len` elements of `src` from element `src_offset` into this tensor from element
    /// `dst_offset`, on the device (no host round trip). Both ranges must lie inside their tensors.
    pub(crate) fn copy_range_from(
        &mut self,
        dst_offset: usize,
        src: &Tensor<T>,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        let inside = |off: usize, n: usize| off.checked_add(len).is_some_and(|end| end <= n);
        if !inside(dst_offset, self.numel()) || !inside(src_offset, src.numel()) {
            return Err(Error::InvalidState {
                op: "Tensor::copy_range_from",
                message: format!(
                    "range of {len} elements at {dst_offset} (of {}) from {src_offset} (of {})",
                    self.numel(),
                    src.numel()
                ),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let _queue = self.device.host_access("a copy between tensors")?;
        match (&mut self.storage, &src.storage) {
            (Storage::Cuda(d), Storage::Cuda(s)) => {
                let stream = cuda_stream(&self.device);
                stream
                    .memcpy_dtod(
                        &s.slice(src_offset..src_offset + len),
                        &mut d.slice_mut(dst_offset..dst_offset + len),
                    )
                    .map_err(Error::cuda("copying on the device"))
            }
            (Storage::Host(d), Storage::Host(s)) => {
                let size = std::mem::size_of::<T>();
                d.bytes_mut()[dst_offset * size..(dst_offset + len) * size]
                    .copy_from_slice(&s.bytes()[src_offset * size..(src_offset + len) * size]);
                Ok(())
            }
            _ => Err(Error::DeviceMismatch {
                op: "Tensor::copy_range_from",
                arg: "src",
                expected: self.device.describe(),
                got: src.device.describe(),
            }),
        }
    }

    /// Fills with NaN (all bits set), so a kernel that leaves an element unwritten cannot pass a test.
    pub fn poison(&mut self) -> Result<()> {
        let data = vec![T::poison(); self.numel()];
        self.copy_from_slice(&data)
    }

    /// This tensor as a `Tensor<U>` when `U` is its element type (the generic ops branch on dtypes at run
    /// time and then need the statically typed view), else None.
    pub(crate) fn cast_ref<U: Element>(&self) -> Option<&Tensor<U>> {
        (self as &dyn std::any::Any).downcast_ref::<Tensor<U>>()
    }

    /// [`Tensor::cast_ref`], mutable.
    pub(crate) fn cast_mut<U: Element>(&mut self) -> Option<&mut Tensor<U>> {
        (self as &mut dyn std::any::Any).downcast_mut::<Tensor<U>>()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Data address of an emulator tensor (for test kernels launched with `emu_launch_raw`).
    #[doc(hidden)]
    pub fn emu_data_ptr(&mut self) -> Option<*mut T> {
        match &mut self.storage {
            Storage::Host(h) => Some(h.data_ptr() as *mut T),
            Storage::Cuda(_) => None,
        }
    }
}

impl<T: Element> RawBuffer for Tensor<T> {
    fn device(&self) -> &Device {
        &self.device
    }
    fn byte_range(&self) -> (u64, u64) {
        self.storage
            .byte_range(&self.device, self.numel() * std::mem::size_of::<T>())
    }
    fn alive(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }
    fn storage(&self) -> StorageRef<'_> {
        self.storage.as_ref()
    }
    fn storage_mut(&mut self) -> StorageMut<'_> {
        self.storage.as_mut()
    }
}

/// A small u32 buffer that one kernel fills and the host reads back (the merge kernel's per-block
/// non-finite counts). Not a [`Tensor`]: u32 is no element type of the ops.
pub(crate) struct U32Buffer {
    len: usize,
    storage: Storage<u32>,
    device: Device,
    alive: Arc<()>,
}

impl Drop for U32Buffer {
    fn drop(&mut self) {
        release(&self.device, &mut self.storage, &mut self.alive);
    }
}

impl U32Buffer {
    /// `len` values that the next kernel writes completely (zeroed on a GPU; on the emulator tracked as
    /// never written, as [`Tensor::for_output`]).
    pub(crate) fn for_output(device: &Device, len: usize) -> Result<Self> {
        let _queue = device.host_access(
            "allocating a count buffer (merge counts its non-finite values and reads them back)",
        )?;
        let storage = match device.backend() {
            Backend::Cuda(c) => Storage::Cuda(
                c.stream()
                    .alloc_zeros::<u32>(len)
                    .map_err(Error::cuda("allocating a count buffer"))?,
            ),
            Backend::Emulator(..) => Storage::Host(GuardedBuf::uninit(
                len.checked_mul(4)
                    .ok_or(Error::HostAlloc { bytes: usize::MAX })?,
            )?),
        };
        Ok(U32Buffer {
            len,
            storage,
            device: device.clone(),
            alive: Arc::default(),
        })
    }

    /// A buffer holding `data` (an upload; `what` names it in the errors).
    pub(crate) fn from_slice(device: &Device, data: &[u32], what: &'static str) -> Result<Self> {
        let _queue = device.host_access(what)?;
        let storage = Storage::upload(device, data, what)?;
        Ok(U32Buffer {
            len: data.len(),
            storage,
            device: device.clone(),
            alive: Arc::default(),
        })
    }

    /// Overwrites the values with `data` (its length; an upload queued after the work before it).
    pub(crate) fn write(&mut self, data: &[u32], what: &'static str) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::InvalidState {
                op: what,
                message: format!("{} values for a buffer of {}", data.len(), self.len),
            });
        }
        let _queue = self.device.host_access(what)?;
        self.storage.write(&self.device, data, what)
    }

    /// Downloads the values (waits for queued work on a GPU).
    pub(crate) fn to_vec(&self) -> Result<Vec<u32>> {
        let _queue = self.device.host_access("reading a count buffer back")?;
        match &self.storage {
            Storage::Cuda(s) => cuda_stream(&self.device)
                .clone_dtoh(s)
                .map_err(Error::cuda("downloading a count buffer")),
            Storage::Host(h) => Ok(bytemuck::pod_collect_to_vec(h.bytes())),
        }
    }
}

impl RawBuffer for U32Buffer {
    fn device(&self) -> &Device {
        &self.device
    }
    fn byte_range(&self) -> (u64, u64) {
        self.storage.byte_range(&self.device, self.len * 4)
    }
    fn alive(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }
    fn storage(&self) -> StorageRef<'_> {
        self.storage.as_ref()
    }
    fn storage_mut(&mut self) -> StorageMut<'_> {
        self.storage.as_mut()
    }
}

/// The stream of the device that holds a tensor's CUDA storage (a tensor keeps the device it was made on,
/// so CUDA storage implies a CUDA device).
fn cuda_stream(device: &Device) -> &std::sync::Arc<cudarc::driver::CudaStream> {
    device
        .as_cuda()
        .expect("CUDA storage on a CUDA device")
        .stream()
}
