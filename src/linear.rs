//! `LoraLinear`: the trainer-facing layer. A frozen `W0` (+ optional bias) and one or more named
//! adapters (A, B, rank, alpha, rsLoRA), initialised like PEFT (A Kaiming-uniform, B zero, so a fresh
//! adapter leaves the layer's output unchanged); forward and backward through the fused kernels; merge
//! and unmerge in place with a flag so a merged layer never adds its adapter twice; and the paper's task
//! switching: [`LoraLinear::set_active`] on a merged layer swaps `B·A` in place (unmerge the old, merge
//! the new) without copying W0.

use std::collections::BTreeMap;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{self, ForwardOutput, Gradients, NonFiniteCounts, validate};
use crate::tensor::Tensor;

/// Rank and scaling of one adapter (PEFT's `r`, `lora_alpha`, `use_rslora`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA: scale = alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f32) -> Self {
        LoraConfig {
            rank,
            alpha,
            use_rslora: false,
        }
    }

    /// `s` of `Y = X·W0ᵀ + s·X·Aᵀ·Bᵀ`: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// One adapter's trainable tensors: A [r, K] and B [N, r].
#[derive(Debug)]
pub struct Adapter<T: Element> {
    pub config: LoraConfig,
    pub a: Tensor<T>,
    pub b: Tensor<T>,
}

/// A linear layer `Y = X·W0ᵀ (+ bias)` with LoRA adapters.
#[derive(Debug)]
pub struct LoraLinear<T: Element> {
    w0: Tensor<T>,
    bias: Option<Tensor<T>>,
    adapters: BTreeMap<String, Adapter<T>>,
    active: Option<String>,
    /// Name of the adapter currently added into `w0`, if any.
    merged: Option<String>,
}

/// splitmix64 → uniform in [-1, 1): deterministic initialisation without a `rand` dependency.
fn uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

impl<T: Element> LoraLinear<T> {
    /// A layer around a frozen `w0` [N, K] and optional `bias` [N], with no adapter yet.
    pub fn new(w0: Tensor<T>, bias: Option<Tensor<T>>) -> Result<Self> {
        const OP: &str = "LoraLinear::new";
        let shape = w0.shape().to_vec();
        if shape.len() != 2 || w0.numel() == 0 {
            return Err(Error::Shape {
                op: OP,
                arg: "w0",
                expected: "a non-empty matrix [N, K]".into(),
                got: shape,
            });
        }
        if let Some(b) = &bias {
            if b.shape() != [shape[0]] {
                return Err(Error::Shape {
                    op: OP,
                    arg: "bias",
                    expected: format!("[N] = [{}]", shape[0]),
                    got: b.shape().to_vec(),
                });
            }
            if b.device() != w0.device() {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    arg: "bias",
                    expected: w0.device().describe(),
                    got: b.device().describe(),
                });
            }
        }
        Ok(LoraLinear {
            w0,
            bias,
            adapters: BTreeMap::new(),
            active: None,
            merged: None,
        })
    }

    /// (N, K): output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.w0.shape()[0], self.w0.shape()[1])
    }

    /// Adds a fresh adapter initialised as PEFT does: A ~ Kaiming-uniform(a = √5), i.e. uniform in
    /// ±1/√K, from `seed`; B = 0. The first adapter added becomes the active one.
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        const OP: &str = "LoraLinear::add_adapter";
        let (n, k) = self.dims();
        validate::rank(OP, config.rank)?;
        let bound = 1.0 / (k as f64).sqrt();
        let mut state = seed;
        let a: Vec<T> = (0..config.rank * k)
            .map(|_| T::from_f64(uniform(&mut state) * bound))
            .collect();
        let dev = self.w0.device().clone();
        let a = Tensor::from_slice(&dev, &a, &[config.rank, k])?;
        let b = Tensor::zeros(&dev, &[n, config.rank])?;
        self.insert_adapter(name, config, a, b)
    }

    /// Adds an adapter with given A [r, K] and B [N, r] (e.g. loaded from a PEFT checkpoint).
    pub fn insert_adapter(
        &mut self,
        name: &str,
        config: LoraConfig,
        a: Tensor<T>,
        b: Tensor<T>,
    ) -> Result<()> {
        const OP: &str = "LoraLinear::insert_adapter";
        let (n, k) = self.dims();
        let r = config.rank;
        validate::rank(OP, r)?;
        for (arg, t, want) in [("a", &a, [r, k]), ("b", &b, [n, r])] {
            if t.shape() != want {
                return Err(Error::Shape {
                    op: OP,
                    arg,
                    expected: format!("{want:?} (rank {r}, w0 {n}×{k})"),
                    got: t.shape().to_vec(),
                });
            }
        }
        if !config.scale().is_finite() {
            return Err(Error::NonFinite {
                op: OP,
                arg: "config.alpha",
                value: config.alpha as f64,
            });
        }
        if self.merged.as_deref() == Some(name) {
            return Err(Error::InvalidState {
                op: OP,
                message: format!(
                    "adapter `{name}` is merged into w0; unmerge it before replacing it"
                ),
            });
        }
        self.adapters
            .insert(name.to_string(), Adapter { config, a, b });
        if self.active.is_none() {
            self.active = Some(name.to_string());
        }
        Ok(())
    }

    fn unknown(&self, op: &'static str, name: &str) -> Error {
        Error::UnknownAdapter {
            op,
            name: name.to_string(),
            known: self.adapters.keys().cloned().collect(),
        }
    }

    fn active_adapter(&self, op: &'static str) -> Result<(&str, &Adapter<T>)> {
        let name = self.active.as_deref().ok_or_else(|| Error::InvalidState {
            op,
            message: "the layer has no adapter; call add_adapter or insert_adapter first".into(),
        })?;
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| self.unknown(op, name))?;
        Ok((name, adapter))
    }

    /// The active adapter's name.
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    pub fn adapter(&self, name: &str) -> Option<&Adapter<T>> {
        self.adapters.get(name)
    }

    /// Mutable access for an optimizer step. Refused while that adapter is merged (W0 would no
    /// longer equal base + s·B·A).
    pub fn adapter_mut(&mut self, name: &str) -> Result<&mut Adapter<T>> {
        const OP: &str = "LoraLinear::adapter_mut";
        if self.merged.as_deref() == Some(name) {
            return Err(Error::InvalidState {
                op: OP,
                message: format!("adapter `{name}` is merged into w0; unmerge before updating it"),
            });
        }
        if !self.adapters.contains_key(name) {
            return Err(self.unknown(OP, name));
        }
        Ok(self.adapters.get_mut(name).expect("checked above"))
    }

    pub fn w0(&self) -> &Tensor<T> {
        &self.w0
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Forward through the active adapter: `Y = X·W0ᵀ + s·(X·Aᵀ)·Bᵀ (+ bias)`, and T for backward.
    /// On a merged layer W0 already holds the adapter, so the low-rank term is computed with scale 0
    /// (the same kernel, nothing added twice).
    pub fn forward(&self, x: &Tensor<T>) -> Result<ForwardOutput<T>> {
        let (_, ad) = self.active_adapter("LoraLinear::forward")?;
        let scale = if self.merged.is_some() {
            0.0
        } else {
            ad.config.scale()
        };
        ops::lora_forward(x, &self.w0, &ad.a, &ad.b, self.bias.as_ref(), scale)
    }

    /// Gradients of the active adapter (dA, dB) and optionally dX, given dY and the forward's T.
    /// Refused on a merged layer: training happens unmerged.
    pub fn backward(
        &self,
        x: &Tensor<T>,
        t: &Tensor<T>,
        dy: &Tensor<T>,
        want_dx: bool,
    ) -> Result<Gradients<T>> {
        const OP: &str = "LoraLinear::backward";
        if let Some(name) = &self.merged {
            return Err(Error::InvalidState {
                op: OP,
                message: format!("adapter `{name}` is merged into w0; unmerge before training"),
            });
        }
        let (_, ad) = self.active_adapter(OP)?;
        ops::lora_backward(x, &self.w0, &ad.a, &ad.b, t, dy, ad.config.scale(), want_dx)
    }

    /// Adds the active adapter into W0 in place. A no-op when it is already merged.
    pub fn merge(&mut self) -> Result<()> {
        const OP: &str = "LoraLinear::merge";
        if self.merged.is_some() {
            return Ok(());
        }
        let name = self.active_adapter(OP)?.0.to_string();
        let ad = &self.adapters[&name];
        ops::merge(&mut self.w0, &ad.a, &ad.b, ad.config.scale())?;
        self.merged = Some(name);
        Ok(())
    }

    /// Subtracts the merged adapter from W0 in place. A no-op when nothing is merged.
    pub fn unmerge(&mut self) -> Result<()> {
        const OP: &str = "LoraLinear::unmerge";
        let Some(name) = self.merged.clone() else {
            return Ok(());
        };
        let ad = self
            .adapters
            .get(&name)
            .ok_or_else(|| self.unknown(OP, &name))?;
        ops::unmerge(&mut self.w0, &ad.a, &ad.b, ad.config.scale())?;
        self.merged = None;
        Ok(())
    }

    /// [`LoraLinear::merge`], refusing to make a finite element of W0 NaN or ±Inf (PEFT's
    /// `merge(safe_merge=True)`): then [`Error::NonFiniteMerge`], W0 unchanged and the layer still
    /// unmerged. Elements already NaN or ±Inf in W0 are no error; the counts say how many
    /// ([`ops::safe_merge`]: a counting pass, then the merge). All zero when already merged.
    pub fn safe_merge(&mut self) -> Result<NonFiniteCounts> {
        const OP: &str = "LoraLinear::safe_merge";
        if self.merged.is_some() {
            return Ok(NonFiniteCounts::default());
        }
        let name = self.active_adapter(OP)?.0.to_string();
        let ad = &self.adapters[&name];
        let counts = ops::safe_merge(&mut self.w0, &ad.a, &ad.b, ad.config.scale())?;
        self.merged = Some(name);
        Ok(counts)
    }

    /// [`LoraLinear::unmerge`] with the check of [`LoraLinear::safe_merge`]: on failure W0 is
    /// unchanged and the layer stays merged. All zero when nothing is merged.
    pub fn safe_unmerge(&mut self) -> Result<NonFiniteCounts> {
        const OP: &str = "LoraLinear::safe_unmerge";
        let Some(name) = self.merged.clone() else {
            return Ok(NonFiniteCounts::default());
        };
        let ad = self
            .adapters
            .get(&name)
            .ok_or_else(|| self.unknown(OP, &name))?;
        let counts = ops::safe_unmerge(&mut self.w0, &ad.a, &ad.b, ad.config.scale())?;
        self.merged = None;
        Ok(counts)
    }

    /// Makes `name` the active adapter. On a merged layer this is the paper's task switch: the old
    /// adapter is subtracted from W0 and the new one added, in place.
    pub fn set_active(&mut self, name: &str) -> Result<()> {
        const OP: &str = "LoraLinear::set_active";
        if !self.adapters.contains_key(name) {
            return Err(self.unknown(OP, name));
        }
        let was_merged = self.merged.is_some();
        self.unmerge()?;
        self.active = Some(name.to_string());
        if was_merged {
            self.merge()?;
        }
        Ok(())
    }
}
