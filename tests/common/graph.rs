//! Graph capture helpers shared by tests/graph.rs and the sm_90a tests: one layer's tensors on a device
//! and the check that a captured forward and backward replay with the eager ops' bits.

use half::bf16;
use lora_kernels::ops::{self, GradMode, Workspace};
use lora_kernels::reference::Dims;
use lora_kernels::{Device, Dropout, DropoutArg, Element, Tensor};

use super::lora::{Layer, Outputs, run};
use super::{Rng, bits};

/// A layer's tensors on a device: inputs, outputs (poisoned), gradients, workspace.
pub struct Step<T: Element> {
    pub x: Tensor<T>,
    pub w0: Tensor<T>,
    pub a: Tensor<T>,
    pub b: Tensor<T>,
    pub bias: Option<Tensor<T>>,
    pub dy: Tensor<T>,
    pub y: Tensor<T>,
    pub t: Tensor<T>,
    pub dx: Tensor<T>,
    pub da: Tensor<T>,
    pub db: Tensor<T>,
    pub ws: Workspace<T>,
    pub scale: f32,
}

pub fn up<T: Element>(dev: &Device, v: &[T], shape: &[usize]) -> Tensor<T> {
    Tensor::from_slice(dev, v, shape).unwrap()
}

pub fn poisoned<T: Element>(dev: &Device, shape: &[usize]) -> Tensor<T> {
    let mut t = Tensor::zeros(dev, shape).unwrap();
    t.poison().unwrap();
    t
}

impl<T: Element> Step<T> {
    pub fn new(dev: &Device, l: &Layer<T, T>) -> Self {
        let Dims { m, n, k, r } = l.d;
        Step {
            x: up(dev, &l.x, &[m, k]),
            w0: up(dev, &l.w0, &[n, k]),
            a: up(dev, &l.a, &[r, k]),
            b: up(dev, &l.b, &[n, r]),
            bias: l.bias.as_ref().map(|v| up(dev, v, &[n])),
            dy: up(dev, &l.dy, &[m, n]),
            y: poisoned(dev, &[m, n]),
            t: poisoned(dev, &[m, r]),
            dx: poisoned(dev, &[m, k]),
            da: poisoned(dev, &[r, k]),
            db: poisoned(dev, &[n, r]),
            ws: Workspace::new(),
            scale: l.scale,
        }
    }

    /// The forward of `x` (this step's X when None) with `dropout` into this step's Y and T.
    pub fn forward<'d>(
        &mut self,
        x: Option<&Tensor<T>>,
        dropout: impl Into<DropoutArg<'d>>,
    ) -> lora_kernels::Result<()> {
        ops::lora_forward_into(
            x.unwrap_or(&self.x),
            &self.w0,
            &self.a,
            &self.b,
            self.bias.as_ref(),
            self.scale,
            dropout,
            &mut self.y,
            &mut self.t,
            &mut self.ws,
        )
    }

    /// The forward and (when `backward`) the backward into this step's tensors.
    pub fn ops(&mut self, backward: bool, mode: GradMode) -> lora_kernels::Result<()> {
        self.ops_with(backward, mode, Dropout::NONE.into())
    }

    /// [`Step::ops`] with `dropout` (the same for the forward and the backward).
    pub fn ops_with(
        &mut self,
        backward: bool,
        mode: GradMode,
        dropout: DropoutArg<'_>,
    ) -> lora_kernels::Result<()> {
        self.forward(None, dropout)?;
        if backward {
            ops::lora_backward_into(
                &self.x,
                &self.w0,
                &self.a,
                &self.b,
                &self.t,
                &self.dy,
                self.scale,
                dropout,
                Some(&mut self.dx),
                &mut self.da,
                &mut self.db,
                mode,
                &mut self.ws,
            )?;
        }
        Ok(())
    }

    pub fn poison_outputs(&mut self) {
        for t in [
            &mut self.y,
            &mut self.t,
            &mut self.dx,
            &mut self.da,
            &mut self.db,
        ] {
            t.poison().unwrap();
        }
    }

    pub fn outputs(&self) -> Outputs<T, T> {
        Outputs {
            y: self.y.to_vec().unwrap(),
            t: self.t.to_vec().unwrap(),
            dx: self.dx.to_vec().unwrap(),
            da: self.da.to_vec().unwrap(),
            db: self.db.to_vec().unwrap(),
        }
    }
}

/// `l` with fresh X and dY (same weights and adapters).
pub fn new_inputs<T: Element>(rng: &mut Rng, l: &Layer<T, T>) -> Layer<T, T> {
    let mut next = Layer::random(rng, l.d, l.scale, false);
    next.w0 = l.w0.clone();
    next.a = l.a.clone();
    next.b = l.b.clone();
    next.bias = l.bias.clone();
    next
}

/// Captures the forward and backward of `d` on `dev` and checks two replays (the second after new
/// inputs) against the eager ops on fresh tensors, bit for bit, and that the capture ran nothing.
pub fn check_replay(dev: &Device, d: Dims, stream: u64) {
    let mut rng = Rng::new(stream);
    let l1 = Layer::<bf16, bf16>::random(&mut rng, d, 0.75, true);
    let l2 = new_inputs(&mut rng, &l1);
    let eager1 = run(dev, &l1, true);
    let eager2 = run(dev, &l2, true);
    assert_ne!(bits(&eager1.y), bits(&eager2.y), "new inputs, new outputs");

    let mut s = Step::new(dev, &l1);
    dev.take_launches();
    s.ops(true, GradMode::Overwrite).unwrap(); // warm-up: loads the kernels, fills the workspace
    let eager_launches = dev.take_launches();
    s.poison_outputs();
    let graph = dev
        .capture(|| s.ops(true, GradMode::Overwrite))
        .unwrap_or_else(|e| panic!("{dev:?} {d:?}: capture failed: {e}"));
    assert!(!dev.is_capturing());
    let poison = bf16::poison().to_bits_u32();
    for (name, out) in ["y", "t", "dx", "dA", "dB"].iter().zip(s.outputs().bits()) {
        assert!(
            out.iter().all(|&b| b == poison),
            "{dev:?} {d:?}: {name} was written by the capture, which runs nothing"
        );
    }
    if dev.is_emulator() {
        assert_eq!(graph.launches(), eager_launches.len(), "{d:?}");
        assert!(dev.take_launches().is_empty(), "the capture ran nothing");
    }

    graph.replay().unwrap();
    assert_eq!(s.outputs().bits(), eager1.bits(), "{dev:?} {d:?}: replay 1");
    if dev.is_emulator() {
        assert_eq!(
            dev.take_launches(),
            eager_launches,
            "the replay runs what was captured"
        );
    }
    s.x.copy_from_slice(&l2.x).unwrap();
    s.dy.copy_from_slice(&l2.dy).unwrap();
    s.poison_outputs();
    graph.replay().unwrap();
    assert_eq!(
        s.outputs().bits(),
        eager2.bits(),
        "{dev:?} {d:?}: replay after new inputs"
    );
}
