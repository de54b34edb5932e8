//! Scratch memory the LoRA ops reuse from call to call.

use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

/// Scratch memory for the intermediates of [`lora_forward_into`] and [`lora_backward_into`]: U = dY·B
/// and the f32 partial sums of the split reductions (the gradients, the projections when M is small,
/// the small-M forward).
///
/// The first call allocates what it needs; later calls with the same shapes reuse it, so a training
/// loop that keeps one workspace per layer allocates nothing per step. Buffers are matched by size;
/// one of another size (or device) is allocated beside them, so the workspace grows to the set of
/// sizes it has served ([`Workspace::bytes`]; drop it, or call [`Workspace::clear`], to free them).
/// Its contents between calls mean nothing: every op overwrites what it reads.
///
/// [`lora_forward_into`]: crate::ops::lora_forward_into
/// [`lora_backward_into`]: crate::ops::lora_backward_into
#[derive(Debug)]
pub struct Workspace<T: Element> {
    partials: Vec<Tensor<f32>>,
    layer: Vec<Tensor<T>>,
}

impl<T: Element> Default for Workspace<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Element> Workspace<T> {
    /// An empty workspace: nothing is allocated until an op needs it.
    pub fn new() -> Self {
        Workspace {
            partials: Vec::new(),
            layer: Vec::new(),
        }
    }

    /// Device memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.partials.iter().map(|t| t.numel() * 4).sum::<usize>()
            + self
                .layer
                .iter()
                .map(|t| t.numel() * std::mem::size_of::<T>())
                .sum::<usize>()
    }

    /// Frees everything held.
    pub fn clear(&mut self) {
        self.partials.clear();
        self.layer.clear();
    }

    /// Runs `f` with an f32 buffer of `shape` that the next kernel writes completely (and with the
    /// workspace, for scratch that nests); the buffer returns to the workspace whatever `f` returns.
    pub(crate) fn with_partial<R>(
        &mut self,
        device: &Device,
        shape: &[usize],
        f: impl FnOnce(&mut Tensor<f32>, &mut Self) -> Result<R>,
    ) -> Result<R> {
        let mut buf = take(&mut self.partials, device, shape)?;
        let out = f(&mut buf, self);
        self.partials.push(buf);
        out
    }

    /// As [`Workspace::with_partial`], for a buffer of the layer dtype (U).
    pub(crate) fn with_layer<R>(
        &mut self,
        device: &Device,
        shape: &[usize],
        f: impl FnOnce(&mut Tensor<T>, &mut Self) -> Result<R>,
    ) -> Result<R> {
        let mut buf = take(&mut self.layer, device, shape)?;
        let out = f(&mut buf, self);
        self.layer.push(buf);
        out
    }
}

fn take<E: Element>(
    pool: &mut Vec<Tensor<E>>,
    device: &Device,
    shape: &[usize],
) -> Result<Tensor<E>> {
    let n: usize = shape.iter().product();
    match pool
        .iter()
        .position(|t| t.numel() == n && t.device() == device)
    {
        Some(i) => Ok(pool.swap_remove(i).recycle_for_output(shape)),
        None => Tensor::for_output(device, shape),
    }
}

#[cfg(test)]
mod tests {
    use super::Workspace;
    use crate::device::Device;

    #[test]
    fn a_buffer_comes_back_poisoned_and_sized() {
        let dev = Device::emulator();
        let mut ws = Workspace::<half::bf16>::new();
        ws.with_partial(&dev, &[2, 3], |p, _| p.copy_from_slice(&[1.0; 6]))
            .unwrap();
        assert_eq!(ws.bytes(), 24);
        // same size, other shape: the same memory, poisoned again (stale sums can never pass for new)
        ws.with_partial(&dev, &[3, 2], |p, ws| {
            assert_eq!(p.shape(), &[3, 2]);
            assert!(p.to_vec()?.iter().all(|v| v.to_bits() == u32::MAX));
            assert_eq!(ws.bytes(), 0, "taken out while in use");
            Ok(())
        })
        .unwrap();
        ws.with_partial(&dev, &[4], |_, _| Ok(())).unwrap();
        assert_eq!(ws.bytes(), 24 + 16, "another size is allocated beside");
        ws.clear();
        assert_eq!(ws.bytes(), 0);
    }
}
