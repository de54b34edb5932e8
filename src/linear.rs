//! `LoraLinear`: the trainer-facing layer. A frozen `W0` (+ optional bias) and one or more named
//! adapters (A, B, rank, alpha, rsLoRA), initialised like PEFT (A Kaiming-uniform, B zero, so a fresh
//! adapter leaves the layer's output unchanged); forward and backward through the fused kernels; merge
//! and unmerge in place with a flag so a merged layer never adds its adapter twice; and the paper's task
//! switching: [`LoraLinear::set_active`] on a merged layer swaps `B·A` in place (unmerge the old, merge
//! the new) without copying W0.
//!
//! DoRA adapters (a magnitude vector beside A and B, PEFT's `use_dora`: [`LoraLinear::add_dora_adapter`],
//! [`LoraLinear::insert_dora_adapter`], or a DoRA PEFT module) run DoRA's layer unmerged
//! ([`ops::dora_forward`], [`ops::dora_backward`]: the magnitude is trained too) and merge as PEFT does
//! ([`ops::dora_merge`]; the layer keeps the factors to unmerge).

use crate::adapter_set::{AdapterIndex, AdapterSet};
use std::collections::{BTreeMap, BTreeSet};

use crate::dropout::{Dropout, DropoutArg, DropoutSchedule};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::{
    self, AdamState, AdamW, DoraSaved, ForwardOutput, GradMode, Gradients, NonFiniteCounts,
    Workspace, validate,
};
use crate::tensor::Tensor;

/// Rank, scaling and dropout of one adapter (PEFT's `r`, `lora_alpha`, `use_rslora`, `lora_dropout`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    /// f64, as PEFT's `lora_alpha` (a Python float): the scale is computed from it and rounded once.
    pub alpha: f64,
    /// rsLoRA: scale = alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// Dropout probability on the adapter input while training ([`LoraLinear::train_forward`]);
    /// inference ([`LoraLinear::forward`]) never drops, as PEFT in eval mode.
    pub dropout: f32,
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            use_rslora: false,
            dropout: 0.0,
        }
    }

    /// The same config with LoRA dropout `p` (checked when the adapter is added: 0 ≤ p < 1).
    pub fn with_dropout(self, p: f32) -> Self {
        LoraConfig { dropout: p, ..self }
    }

    /// `s` of `Y = X·W0ᵀ + s·X·Aᵀ·Bᵀ`: alpha / r, or alpha / √r with rsLoRA, computed in f64 and
    /// rounded once to f32, as PEFT's Python float is when it scales an f32 tensor (in f32, √r would
    /// round first: one ulp off for many rsLoRA ranks).
    pub fn scale(&self) -> f32 {
        let (alpha, r) = (self.alpha, self.rank as f64);
        (if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }) as f32
    }
}

/// One adapter's trainable tensors: A [r, K] and B [N, r], in the layer dtype or f32, and for a DoRA
/// adapter its magnitude vector \[N\] (f32, PEFT's `lora_magnitude_vector`).
#[derive(Debug)]
pub struct Adapter<A: Element> {
    pub config: LoraConfig,
    pub a: Tensor<A>,
    pub b: Tensor<A>,
    pub magnitude: Option<Tensor<f32>>,
}

impl<A: Element> Adapter<A> {
    /// A DoRA adapter (it has a magnitude vector).
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }
}

/// A linear layer `Y = X·W0ᵀ (+ bias)` with LoRA adapters, W0 in `T` (bf16/f16), the adapters in `A`:
/// `T` itself, or f32 (PEFT's default for training: f32 master adapters over a 16-bit base).
#[derive(Debug)]
pub struct LoraLinear<T: Element, A: Element = T> {
    w0: Tensor<T>,
    bias: Option<Tensor<T>>,
    adapters: BTreeMap<String, Adapter<A>>,
    active: Option<String>,
    /// Name of the adapter currently added into `w0`, if any.
    merged: Option<String>,
    /// A merged DoRA adapter's row factors ([`ops::dora_merge`]), which its unmerge divides by.
    merged_factor: Option<Tensor<f32>>,
    /// The training buffers of the active adapter ([`LoraLinear::train_forward`]), made on first use.
    train: Option<Training<T, A>>,
    /// The seed of the training dropout masks, and the number of training forwards so far (the next
    /// mask's offset; per layer, so switching adapters never repeats a mask).
    dropout_seed: u64,
    dropout_calls: u64,
    /// All adapters as one device set for [`LoraLinear::forward_multi`], built on first use and dropped
    /// whenever an adapter changes (insert, `adapter_mut`, an optimizer step).
    multi: Option<MultiAdapters<A>>,
    /// Adapters whose optimizer step (or any change through `adapter_mut`) was captured into a graph:
    /// replays change their values without this layer seeing it, so [`LoraLinear::forward_multi`]
    /// copies them into its set at every call. Cleared for an adapter when it is merged (its graphs
    /// then refuse to replay) or replaced.
    stepped_in_graphs: BTreeSet<String>,
}

/// The layer's adapters packed for the multi-adapter forward, with each name's slot.
#[derive(Debug)]
struct MultiAdapters<A: Element> {
    set: AdapterSet<A>,
    slots: BTreeMap<String, u32>,
}

/// What the training API keeps between calls: the forward's Y and T, dX, the gradients, AdamW's state,
/// the dropout of the last forward, and the workspace of the ops. Built for one adapter and one
/// activation shape; a call with another shape rebuilds the activation buffers only.
#[derive(Debug)]
struct Training<T: Element, A: Element> {
    adapter: String,
    ws: Workspace<T>,
    y: Option<Tensor<T>>,
    t: Option<Tensor<T>>,
    dx: Option<Tensor<T>>,
    da: Tensor<A>,
    db: Tensor<A>,
    adam: Option<(AdamState, AdamState)>,
    /// A DoRA adapter's: what its backward needs from the forward, the magnitude's gradient, and
    /// AdamW's state for the magnitude.
    dora: Option<TrainDora<T>>,
    /// The mask of the last train_forward that ran (an eager backward's): a fixed one, or
    /// `dropout_schedule`'s once [`LoraLinear::advance_dropout`] has readied a replay of a captured one.
    dropout: TrainDropout,
    /// The mask's offset on the device, for a train_forward in a graph ([`LoraLinear::advance_dropout`]).
    dropout_schedule: DropoutSchedule,
    /// The capture (`Device::capture_serial`) holding this layer's train_forward with dropout, if any:
    /// a backward in the same capture takes the schedule's mask, and a second forward there is refused
    /// (it would repeat the mask).
    captured_forward: Option<u64>,
    /// A train_backward wrote da and db since these buffers were made (an optimizer step before that
    /// would apply the weight decay alone and count a step).
    has_grads: bool,
}

/// A DoRA adapter's training buffers.
#[derive(Debug)]
struct TrainDora<T: Element> {
    saved: Option<DoraSaved<T>>,
    dm: Tensor<f32>,
    adam: Option<AdamState>,
}

/// An adapter's config agrees with its tensors: `config.rank` (which its scale alpha/r or alpha/√r
/// uses) is A's row count, and a DoRA magnitude has one element per row of B. [`LoraLinear::adapter_mut`]
/// hands the tensors out, so a caller may have replaced them with another rank and not the config: an
/// error naming both, not a wrong scale.
fn consistent<A: Element>(op: &'static str, name: &str, ad: &Adapter<A>) -> Result<()> {
    if let Some(m) = &ad.magnitude {
        let n = ad.b.shape().first().copied().unwrap_or(0);
        if m.shape() != [n] || m.device() != ad.b.device() {
            return Err(Error::InvalidState {
                op,
                message: format!(
                    "adapter `{name}`: the DoRA magnitude has shape {:?} on {}, expected [{n}] (B's rows) on {}",
                    m.shape(),
                    m.device().describe(),
                    ad.b.device().describe()
                ),
            });
        }
    }
    if ad.a.shape().first() != Some(&ad.config.rank) {
        return Err(Error::InvalidState {
            op,
            message: format!(
                "adapter `{name}`: config.rank is {} but A has shape {:?} (set both through adapter_mut)",
                ad.config.rank,
                ad.a.shape()
            ),
        });
    }
    Ok(())
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

/// A tensor of `shape` in `slot`, reused when it already has that shape.
fn buffer<T: Element>(
    slot: &mut Option<Tensor<T>>,
    like: &Tensor<T>,
    shape: &[usize],
) -> Result<()> {
    if slot.as_ref().map(|t| t.shape()) != Some(shape) {
        *slot = Some(Tensor::zeros(like.device(), shape)?);
    }
    Ok(())
}

impl<T: Element> LoraLinear<T> {
    /// A layer around a frozen `w0` [N, K] and optional `bias` \[N\], with no adapter yet; adapters in
    /// the dtype of w0 ([`LoraLinear::with_f32_adapters`] for f32 ones).
    pub fn new(w0: Tensor<T>, bias: Option<Tensor<T>>) -> Result<Self> {
        Self::make(w0, bias)
    }
}

impl<T: Element> LoraLinear<T, f32> {
    /// [`LoraLinear::new`] with f32 adapters (PEFT's training default over a bf16/f16 base): the
    /// kernels read A and B as f32, write dA and dB as f32, and [`LoraLinear::optimizer_step`] updates
    /// them in place as AdamW's master weights.
    pub fn with_f32_adapters(w0: Tensor<T>, bias: Option<Tensor<T>>) -> Result<Self> {
        Self::make(w0, bias)
    }
}

impl<T: Element, A: Element> LoraLinear<T, A> {
    fn make(w0: Tensor<T>, bias: Option<Tensor<T>>) -> Result<Self> {
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
            merged_factor: None,
            train: None,
            dropout_seed: 0,
            dropout_calls: 0,
            multi: None,
            stepped_in_graphs: BTreeSet::new(),
        })
    }

    /// (N, K): output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.w0.shape()[0], self.w0.shape()[1])
    }

    /// Adds a fresh adapter initialised as PEFT does: A ~ Kaiming-uniform(a = √5), i.e. uniform in
    /// ±1/√K, from `seed`; B = 0. The first adapter added becomes the active one.
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        let (a, b) = self.fresh_adapter("LoraLinear::add_adapter", config, seed)?;
        self.insert_adapter(name, config, a, b)
    }

    /// [`LoraLinear::add_adapter`] for a DoRA adapter (PEFT's `use_dora`): the same A and B, and the
    /// magnitude initialised as PEFT does, to the row norms of `W0 + s·B·A` (with B = 0, W0's:
    /// [`ops::dora_norm`]), so a fresh DoRA adapter leaves the layer's output unchanged up to rounding.
    pub fn add_dora_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        const OP: &str = "LoraLinear::add_dora_adapter";
        if let Some(merged) = &self.merged {
            // the magnitude is the norms of the base rows, which a merged W0 no longer holds
            return Err(Error::InvalidState {
                op: OP,
                message: format!(
                    "adapter `{merged}` is merged into w0; unmerge before adding a DoRA adapter (its magnitude starts at the base weight's row norms)"
                ),
            });
        }
        let (a, b) = self.fresh_adapter(OP, config, seed)?;
        let magnitude = ops::dora_norm(&self.w0, &a, &b, config.scale())?;
        self.insert_impl(OP, name, config, a, b, Some(magnitude))
    }

    fn fresh_adapter(
        &self,
        op: &'static str,
        config: LoraConfig,
        seed: u64,
    ) -> Result<(Tensor<A>, Tensor<A>)> {
        let (n, k) = self.dims();
        validate::rank(op, config.rank)?;
        let bound = 1.0 / (k as f64).sqrt();
        let mut state = seed;
        let a: Vec<A> = (0..config.rank * k)
            .map(|_| A::from_f64(uniform(&mut state) * bound))
            .collect();
        let dev = self.w0.device().clone();
        let a = Tensor::from_slice(&dev, &a, &[config.rank, k])?;
        let b = Tensor::zeros(&dev, &[n, config.rank])?;
        Ok((a, b))
    }

    /// Adds an adapter with given A [r, K] and B [N, r] (e.g. loaded from a PEFT checkpoint).
    pub fn insert_adapter(
        &mut self,
        name: &str,
        config: LoraConfig,
        a: Tensor<A>,
        b: Tensor<A>,
    ) -> Result<()> {
        self.insert_impl("LoraLinear::insert_adapter", name, config, a, b, None)
    }

    /// [`LoraLinear::insert_adapter`] for a DoRA adapter: A, B and its magnitude vector \[N\] (f32, on
    /// W0's device; PEFT's `lora_magnitude_vector`).
    pub fn insert_dora_adapter(
        &mut self,
        name: &str,
        config: LoraConfig,
        a: Tensor<A>,
        b: Tensor<A>,
        magnitude: Tensor<f32>,
    ) -> Result<()> {
        let op = "LoraLinear::insert_dora_adapter";
        self.insert_impl(op, name, config, a, b, Some(magnitude))
    }

    fn insert_impl(
        &mut self,
        op: &'static str,
        name: &str,
        config: LoraConfig,
        a: Tensor<A>,
        b: Tensor<A>,
        magnitude: Option<Tensor<f32>>,
    ) -> Result<()> {
        if A::DTYPE != T::DTYPE && A::DTYPE != DType::F32 {
            return Err(Error::UnsupportedDType {
                op,
                arg: "a",
                got: A::DTYPE,
                supported: "adapters in the dtype of w0 or in f32",
            });
        }
        Dropout::new(config.dropout, 0, 0).map_err(|_| Error::OutOfRange {
            op,
            arg: "config.dropout",
            value: config.dropout as f64,
            expected: "0 <= dropout < 1",
        })?;
        let (n, k) = self.dims();
        let r = config.rank;
        validate::rank(op, r)?;
        for (arg, t, want) in [("a", &a, [r, k]), ("b", &b, [n, r])] {
            if t.shape() != want {
                return Err(Error::Shape {
                    op,
                    arg,
                    expected: format!("{want:?} (rank {r}, w0 {n}×{k})"),
                    got: t.shape().to_vec(),
                });
            }
        }
        if let Some(m) = &magnitude {
            validate::shape(op, "magnitude", m, &[n], "[N] (one per row of w0)")?;
            if m.device() != self.w0.device() {
                return Err(Error::DeviceMismatch {
                    op,
                    arg: "magnitude",
                    expected: self.w0.device().describe(),
                    got: m.device().describe(),
                });
            }
        }
        if !config.scale().is_finite() {
            return Err(Error::NonFinite {
                op,
                arg: "config.alpha",
                value: config.alpha,
            });
        }
        if self.merged.as_deref() == Some(name) {
            return Err(Error::InvalidState {
                op,
                message: format!(
                    "adapter `{name}` is merged into w0; unmerge it before replacing it"
                ),
            });
        }
        if self.train.as_ref().is_some_and(|t| t.adapter == name) {
            self.train = None; // its gradients and moments belonged to the replaced tensors
        }
        self.multi = None;
        // graphs that stepped the replaced tensors refuse to replay now (they were dropped)
        self.stepped_in_graphs.remove(name);
        self.adapters.insert(
            name.to_string(),
            Adapter {
                config,
                a,
                b,
                magnitude,
            },
        );
        if self.active.is_none() {
            self.active = Some(name.to_string());
        }
        Ok(())
    }

    /// Adds PEFT module `module` of `adapter` (e.g. `model.layers.0.self_attn.v_proj`) as adapter `name`,
    /// with its rank, alpha, rsLoRA and `lora_dropout`, and for a DoRA adapter (`use_dora`) its magnitude
    /// vector. The file's values are kept exactly: an f32
    /// file (PEFT's default) loads into f32 adapters ([`LoraLinear::with_f32_adapters`]); a bf16/f16 file
    /// into adapters of its own dtype or f32. Loading f32 values into 16-bit adapters would round them
    /// and is refused, as is another 16-bit dtype. An adapter of GPT-2's `Conv1D` layers
    /// (`fan_in_fan_out`) has the same lora_A and lora_B: this layer's W0 `[N, K]` is then the
    /// transpose of the stored `[K, N]` weight. Modules the adapter saved whole (`modules_to_save`) are
    /// not layers of this kind and are left to the caller.
    pub fn insert_peft_module(
        &mut self,
        name: &str,
        adapter: &crate::peft::PeftAdapter,
        module: &str,
    ) -> Result<()> {
        const OP: &str = "LoraLinear::insert_peft_module";
        let (a, b, magnitude) = adapter.module_adapter_tensors::<A>(
            OP,
            module,
            self.w0.device(),
            "values this layer's adapters hold exactly: the adapter dtype, or bf16/f16 into f32 adapters (load f32 files with LoraLinear::with_f32_adapters)",
        )?;
        let c = &adapter.config;
        let config = LoraConfig {
            rank: c.rank_for(module),
            alpha: c.alpha_for(module),
            use_rslora: c.use_rslora,
            dropout: c.lora_dropout as f32,
        };
        self.insert_impl(OP, name, config, a, b, magnitude)
    }

    fn unknown(&self, op: &'static str, name: &str) -> Error {
        Error::UnknownAdapter {
            op,
            name: name.to_string(),
            known: self.adapters.keys().cloned().collect(),
        }
    }

    fn active_adapter(&self, op: &'static str) -> Result<(&str, &Adapter<A>)> {
        let name = self.active.as_deref().ok_or_else(|| Error::InvalidState {
            op,
            message: "the layer has no adapter; call add_adapter or insert_adapter first".into(),
        })?;
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| self.unknown(op, name))?;
        consistent(op, name, adapter)?;
        Ok((name, adapter))
    }

    /// The active adapter's name.
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    pub fn adapter(&self, name: &str) -> Option<&Adapter<A>> {
        self.adapters.get(name)
    }

    /// Mutable access for an optimizer step. Refused while that adapter is merged (W0 would no
    /// longer equal base + s·B·A). Replacing A and B with tensors of another shape (another rank, with
    /// `config.rank` to match) is allowed: training then starts over for them (zero gradients, a fresh
    /// Adam state).
    pub fn adapter_mut(&mut self, name: &str) -> Result<&mut Adapter<A>> {
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
        self.multi = None; // the caller may change the adapter's values
        if self.w0.device().is_capturing() {
            // and, captured, so may every replay: unseen
            self.stepped_in_graphs.insert(name.to_string());
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
    ///
    /// A DoRA adapter, unmerged: DoRA's layer ([`ops::dora_forward`]), `Y = f ⊙ (X·W0ᵀ + s·T·Bᵀ) + bias`
    /// with `f = m/‖W0 + s·B·A‖` per output feature; merged, W0 holds `f ⊙ (W0 + s·B·A)` and the forward is
    /// the plain one with scale 0, as for any merged adapter. For training a DoRA adapter use
    /// [`LoraLinear::train_forward`] (its backward needs more of the forward than T). An unmerged DoRA
    /// forward also writes Z and drops it (the ops' saved state); for serving, merge.
    pub fn forward(&self, x: &Tensor<T>) -> Result<ForwardOutput<T>> {
        let (_, ad) = self.active_adapter("LoraLinear::forward")?;
        let scale = if self.merged.is_some() {
            0.0
        } else {
            ad.config.scale()
        };
        if let (Some(m), None) = (&ad.magnitude, &self.merged) {
            let out = ops::dora_forward(x, &self.w0, &ad.a, &ad.b, m, self.bias.as_ref(), scale)?;
            return Ok(ForwardOutput {
                y: out.y,
                t: out.saved.t,
            });
        }
        ops::lora_forward(x, &self.w0, &ad.a, &ad.b, self.bias.as_ref(), scale)
    }

    /// Forward for a batch whose rows use different adapters of this layer (serving many adapters over
    /// one base): row i of X [..., K] (M rows) goes through the adapter named `rows[i]`, or through the
    /// base alone (`None`): `Y_i = X_i·W0ᵀ (+ bias) + s_a·(X_i·A_aᵀ)·B_aᵀ`, one batch, one set of launches
    /// ([`ops::lora_forward_multi`]; a row's bits do not depend on the rest of the batch). The layer keeps
    /// its adapters packed as an [`AdapterSet`] on the device for this, built on first use and again
    /// after any adapter changes (a DoRA adapter's rows are DoRA's layer, `f ⊙ (X·W0ᵀ + s·T·Bᵀ) + bias`,
    /// its factors computed when the set is built: [`AdapterSet::add_dora`]). Refused on a merged layer
    /// (W0 holds one adapter already). The set is a copy, rebuilt after any change the layer makes; an
    /// adapter whose optimizer step (or any change through [`LoraLinear::adapter_mut`]) was captured
    /// into a graph changes at each replay without the layer seeing it, so from that capture on (until
    /// the adapter is merged or replaced) every call first copies that adapter's current values into
    /// the set ([`AdapterSet::replace`]; for DoRA also its factors, a pass over W0). Not capturable
    /// (it uploads the row map): capture [`ops::lora_forward_multi`] with a set of your own.
    pub fn forward_multi(
        &mut self,
        x: &Tensor<T>,
        rows: &[Option<&str>],
    ) -> Result<ForwardOutput<T>> {
        const OP: &str = "LoraLinear::forward_multi";
        if let Some(name) = &self.merged {
            return Err(Error::InvalidState {
                op: OP,
                message: format!(
                    "adapter `{name}` is merged into w0; unmerge before mixing adapters in a batch"
                ),
            });
        }
        let fresh = self.multi.is_none();
        if fresh {
            let (n, k) = self.dims();
            let mut set = AdapterSet::new(self.w0.device(), n, k)?;
            let mut slots = BTreeMap::new();
            for (name, ad) in &self.adapters {
                consistent(OP, name, ad)?;
                let scale = ad.config.scale();
                let slot = match &ad.magnitude {
                    // the factors from this (unmerged) W0; a merge or unmerge rebuilds the set
                    Some(m) => set.add_dora(&ad.a, &ad.b, m, scale, &self.w0)?,
                    None => set.add(&ad.a, &ad.b, scale)?,
                };
                slots.insert(name.clone(), slot);
            }
            self.multi = Some(MultiAdapters { set, slots });
        }
        if !fresh && !self.stepped_in_graphs.is_empty() {
            self.refresh_multi(OP)?;
        }
        let multi = self.multi.as_ref().expect("built above");
        let mut index = Vec::with_capacity(rows.len());
        for name in rows {
            index.push(match name {
                None => None,
                Some(name) => Some(
                    *multi
                        .slots
                        .get(*name)
                        .ok_or_else(|| self.unknown(OP, name))?,
                ),
            });
        }
        let index = AdapterIndex::new(&multi.set, &index)?;
        ops::lora_forward_multi(x, &self.w0, self.bias.as_ref(), &multi.set, &index)
    }

    /// Copies the current values of the adapters stepped in graphs into the multi-adapter set.
    fn refresh_multi(&mut self, op: &'static str) -> Result<()> {
        if self.w0.device().is_capturing() {
            return Err(Error::Unsupported {
                what: format!(
                    "{op} under a capture, after optimizer steps of {:?} were captured (their replays change the adapters, which this call copies into its set first)",
                    self.stepped_in_graphs
                ),
                hint: "capture ops::lora_forward_multi over an AdapterSet of your own, refreshed with AdapterSet::replace between replays".into(),
            });
        }
        let multi = self.multi.as_mut().expect("built");
        for name in &self.stepped_in_graphs {
            let (Some(ad), Some(&slot)) = (self.adapters.get(name), multi.slots.get(name)) else {
                continue;
            };
            let scale = ad.config.scale();
            match &ad.magnitude {
                Some(m) => multi
                    .set
                    .replace_dora(slot, &ad.a, &ad.b, m, scale, &self.w0)?,
                None => multi.set.replace(slot, &ad.a, &ad.b, scale)?,
            }
        }
        Ok(())
    }

    /// Gradients of the active adapter (dA, dB) and optionally dX, given dY and the forward's T.
    /// Refused on a merged layer: training happens unmerged.
    pub fn backward(
        &self,
        x: &Tensor<T>,
        t: &Tensor<T>,
        dy: &Tensor<T>,
        want_dx: bool,
    ) -> Result<Gradients<T, A>> {
        const OP: &str = "LoraLinear::backward";
        if let Some(name) = &self.merged {
            return Err(Error::InvalidState {
                op: OP,
                message: format!("adapter `{name}` is merged into w0; unmerge before training"),
            });
        }
        let (name, ad) = self.active_adapter(OP)?;
        if ad.is_dora() {
            return Err(Error::Unsupported {
                what: format!("{OP} of the DoRA adapter `{name}`"),
                hint: "DoRA's backward needs the forward's Z, norms and factors besides T: use train_forward and train_backward, or ops::dora_forward and ops::dora_backward".into(),
            });
        }
        ops::lora_backward(x, &self.w0, &ad.a, &ad.b, t, dy, ad.config.scale(), want_dx)
    }

    /// Adds the active adapter into W0 in place. A no-op when it is already merged. Graphs captured
    /// with the adapter's tensors (a training step, a forward) refuse to replay from then on.
    pub fn merge(&mut self) -> Result<()> {
        const OP: &str = "LoraLinear::merge";
        if self.merged.is_some() {
            return Ok(());
        }
        let name = self.active_adapter(OP)?.0.to_string();
        let ad = &self.adapters[&name];
        match &ad.magnitude {
            Some(m) => {
                let factor = ops::dora_merge(&mut self.w0, &ad.a, &ad.b, m, ad.config.scale())?;
                self.merged_factor = Some(factor);
            }
            None => ops::merge(&mut self.w0, &ad.a, &ad.b, ad.config.scale())?,
        }
        self.retire_graphs(&name);
        self.merged = Some(name);
        Ok(())
    }

    /// After adapter `name` was merged: graphs captured with its tensors refuse to replay (a replayed
    /// training step would change A and B under the merge, and unmerging would then subtract another
    /// s·B·A; a replayed forward would add the adapter twice). Capture again after unmerging.
    fn retire_graphs(&mut self, name: &str) {
        if let Some(ad) = self.adapters.get_mut(name) {
            ad.a.renew_liveness();
            ad.b.renew_liveness();
            if let Some(m) = ad.magnitude.as_mut() {
                m.renew_liveness();
            }
        }
        self.stepped_in_graphs.remove(name);
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
        let s = ad.config.scale();
        match &self.merged_factor {
            Some(f) => ops::dora_unmerge(&mut self.w0, &ad.a, &ad.b, f, s)?,
            None => ops::unmerge(&mut self.w0, &ad.a, &ad.b, s)?,
        }
        self.merged = None;
        self.multi = None; // W0 changed (by rounding): a DoRA adapter's factors are from the old one
        self.merged_factor = None;
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
        let s = ad.config.scale();
        let counts = match &ad.magnitude {
            Some(m) => {
                let (factor, counts) = ops::safe_dora_merge(&mut self.w0, &ad.a, &ad.b, m, s)?;
                self.merged_factor = Some(factor);
                counts
            }
            None => ops::safe_merge(&mut self.w0, &ad.a, &ad.b, s)?,
        };
        self.retire_graphs(&name);
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
        let s = ad.config.scale();
        let counts = match &self.merged_factor {
            Some(f) => ops::safe_dora_unmerge(&mut self.w0, &ad.a, &ad.b, f, s)?,
            None => ops::safe_unmerge(&mut self.w0, &ad.a, &ad.b, s)?,
        };
        self.merged = None;
        self.multi = None; // W0 changed (by rounding): a DoRA adapter's factors are from the old one
        self.merged_factor = None;
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

    /// Sets the seed of the training dropout masks (default 0); the offset of each mask is the number
    /// of [`LoraLinear::train_forward`] calls on this layer before it, so every step gets a fresh mask.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// For a graph ([`crate::Device::capture`]) holding this layer's [`LoraLinear::train_forward`] with
    /// dropout: call it before each replay. The captured forward and backward read the mask's offset
    /// from the layer's device memory (the probability and seed are the capture's); this uploads the
    /// offset an eager `train_forward` would take now (the count of training forwards) and counts the
    /// call, so replays and eager steps interleave with the masks of eager steps alone, and an eager
    /// `train_backward` after the replay takes the replayed forward's mask. Without it a replay repeats
    /// the last mask. One captured forward with dropout per layer and capture (a second is refused:
    /// capture one micro-batch and replay it per micro-batch). An upload: refused during a capture.
    pub fn advance_dropout(&mut self) -> Result<()> {
        const OP: &str = "LoraLinear::advance_dropout";
        let Some(tr) = self.train.as_mut().filter(|t| t.captured_forward.is_some()) else {
            return Err(Error::InvalidState {
                op: OP,
                message: "no train_forward with dropout of this layer was captured (run one \
                          eagerly, capture one, then advance before each replay)"
                    .into(),
            });
        };
        tr.dropout_schedule.set_offset(self.dropout_calls)?;
        self.dropout_calls += 1;
        tr.dropout = TrainDropout::Scheduled;
        Ok(())
    }

    fn new_training(&self, name: &str) -> Result<Training<T, A>> {
        let ad = &self.adapters[name];
        let dev = self.w0.device();
        Ok(Training {
            adapter: name.to_string(),
            ws: Workspace::new(),
            y: None,
            t: None,
            dx: None,
            da: Tensor::zeros(dev, ad.a.shape())?,
            db: Tensor::zeros(dev, ad.b.shape())?,
            adam: None,
            dora: match &ad.magnitude {
                Some(m) => Some(TrainDora {
                    saved: None,
                    dm: Tensor::zeros(dev, m.shape())?,
                    adam: None,
                }),
                None => None,
            },
            dropout: TrainDropout::Fixed(Dropout::NONE),
            dropout_schedule: DropoutSchedule::new(dev, Dropout::NONE)?,
            captured_forward: None,
            has_grads: false,
        })
    }

    /// The active adapter's name and its training state, (re)made when the active adapter changed.
    fn training(&mut self, op: &'static str) -> Result<String> {
        if let Some(name) = &self.merged {
            return Err(Error::InvalidState {
                op,
                message: format!("adapter `{name}` is merged into w0; unmerge before training"),
            });
        }
        let name = self.active_adapter(op)?.0.to_string();
        let ad = &self.adapters[&name];
        // `adapter_mut` gives the tensors out: a caller may have replaced them with others of another
        // shape (a new rank), which the training buffers, the gradients and Adam's moments, no longer fit
        let stale = |t: &Training<T, A>| {
            t.adapter != name
                || t.da.shape() != ad.a.shape()
                || t.db.shape() != ad.b.shape()
                || t.dora.is_some() != ad.is_dora()
        };
        if self.train.as_ref().is_none_or(stale) {
            // new buffers: zero gradients and a fresh Adam state for the new shapes
            self.train = Some(self.new_training(&name)?);
        }
        Ok(name)
    }

    /// Training forward through the active adapter, `Y = X·W0ᵀ + s·(dropout(X)·Aᵀ)·Bᵀ (+ bias)` with
    /// its config's dropout (a fresh mask per call, see [`LoraLinear::set_dropout_seed`]). Y and T
    /// live in the layer's own buffers, reused while the shape repeats (nothing is allocated per step);
    /// nothing waits for the device. Returns Y; pass the same `x` to [`LoraLinear::train_backward`].
    /// A DoRA adapter runs DoRA's layer ([`ops::dora_forward_into`]; its Z, norms and factors kept for
    /// the backward, which also writes [`LoraLinear::magnitude_grad`]); with LoRA dropout, PEFT's DoRA
    /// layer with dropout (W0 runs on the dropped input too: one more GEMM each way).
    pub fn train_forward(&mut self, x: &Tensor<T>) -> Result<&Tensor<T>> {
        const OP: &str = "LoraLinear::train_forward";
        let name = self.training(OP)?;
        let (n, _) = self.dims();
        let ad = &self.adapters[&name];
        let tr = self.train.as_mut().expect("made by training()");
        let (lead, _, _) = validate::rows(OP, "x", x)?;
        let rows = |last: usize| -> Vec<usize> { lead.iter().copied().chain([last]).collect() };
        let r = ad.config.rank;
        buffer(&mut tr.y, x, &rows(n))?;
        if let (true, Some(dora)) = (ad.is_dora(), tr.dora.as_mut()) {
            let fits = |d: &DoraSaved<T>| d.z.shape() == rows(n) && d.t.shape() == rows(r);
            if !dora.saved.as_ref().is_some_and(fits) {
                dora.saved = Some(DoraSaved::for_layer(x, n, r)?);
            }
        } else {
            buffer(&mut tr.t, x, &rows(r))?;
        }
        let dropout = if ad.config.dropout > 0.0 {
            Dropout::new(ad.config.dropout, self.dropout_seed, self.dropout_calls)?
        } else {
            Dropout::NONE
        };
        // In a graph the mask's offset is read from the layer's schedule, which advance_dropout moves
        // before each replay; nothing runs now, so no call is counted.
        let captured = dropout.is_active() && x.device().is_capturing();
        let serial = x.device().capture_serial();
        if captured {
            let Some(serial) = serial else {
                return Err(Error::Unsupported {
                    what: format!("{OP} with dropout in a capture begun outside Device::capture"),
                    hint: "capture with Device::capture (the layer tells its captures apart), or \
                           give the ops a DropoutSchedule yourself"
                        .into(),
                });
            };
            if tr.captured_forward == Some(serial) {
                return Err(Error::InvalidState {
                    op: OP,
                    message: "this layer's train_forward with dropout is in this capture already: \
                              a second would repeat its mask at every replay (capture one \
                              micro-batch and replay it per micro-batch, advance_dropout before each)"
                        .into(),
                });
            }
        }
        let dropout = if captured {
            tr.dropout_schedule.retarget(dropout);
            TrainDropout::Scheduled
        } else {
            TrainDropout::Fixed(dropout)
        };
        let y = tr.y.as_mut().expect("made");
        if let (Some(m), Some(dora)) = (&ad.magnitude, tr.dora.as_mut()) {
            let ran = ops::dora_forward_into(
                x,
                &self.w0,
                &ad.a,
                &ad.b,
                m,
                self.bias.as_ref(),
                ad.config.scale(),
                dropout.arg(&tr.dropout_schedule),
                y,
                dora.saved.as_mut().expect("made"),
                &mut tr.ws,
            );
            if ran.is_err() {
                dora.saved = None; // no backward from buffers this failed forward did not write
            }
            ran?;
        } else {
            let ran = ops::lora_forward_into(
                x,
                &self.w0,
                &ad.a,
                &ad.b,
                self.bias.as_ref(),
                ad.config.scale(),
                dropout.arg(&tr.dropout_schedule),
                y,
                tr.t.as_mut().expect("made"),
                &mut tr.ws,
            );
            if ran.is_err() {
                tr.t = None; // no backward from a T this failed forward may have left half made
            }
            ran?;
        }
        if captured {
            // the eager state stays the last forward that ran; this capture's backward finds it here
            tr.captured_forward = serial;
        } else {
            tr.dropout = dropout;
            self.dropout_calls += 1;
        }
        Ok(tr.y.as_ref().expect("made"))
    }

    /// Training backward for the last [`LoraLinear::train_forward`] (same `x`, its dropout mask): dA and
    /// dB into the layer's gradient buffers, overwritten or, with [`GradMode::Accumulate`], added to
    /// (micro-batches); dX, when `want_dx`, into the layer's buffer and returned.
    pub fn train_backward(
        &mut self,
        x: &Tensor<T>,
        dy: &Tensor<T>,
        mode: GradMode,
        want_dx: bool,
    ) -> Result<Option<&Tensor<T>>> {
        const OP: &str = "LoraLinear::train_backward";
        let name = self.training(OP)?;
        let ad = &self.adapters[&name];
        let tr = self.train.as_mut().expect("made by training()");
        // the mask of the forward that made T: this capture's own forward's, or the last that ran
        let serial = x.device().capture_serial();
        let mask = if serial.is_some() && tr.captured_forward == serial {
            TrainDropout::Scheduled
        } else {
            tr.dropout
        };
        if let (Some(dora), true) = (tr.dora.as_mut(), ad.is_dora()) {
            let Some(saved) = dora.saved.as_ref() else {
                return Err(Error::InvalidState {
                    op: OP,
                    message: "no train_forward before this backward".into(),
                });
            };
            if want_dx {
                buffer(&mut tr.dx, x, x.shape())?;
            }
            ops::dora_backward_into(
                x,
                &self.w0,
                &ad.a,
                &ad.b,
                saved,
                dy,
                ad.config.scale(),
                mask.arg(&tr.dropout_schedule),
                if want_dx { tr.dx.as_mut() } else { None },
                &mut tr.da,
                &mut tr.db,
                &mut dora.dm,
                mode,
                &mut tr.ws,
            )?;
            tr.has_grads = true;
            return Ok(if want_dx { tr.dx.as_ref() } else { None });
        }
        let Some(t) = tr.t.as_ref() else {
            return Err(Error::InvalidState {
                op: OP,
                message: "no train_forward before this backward".into(),
            });
        };
        if want_dx {
            buffer(&mut tr.dx, x, x.shape())?;
        }
        ops::lora_backward_into(
            x,
            &self.w0,
            &ad.a,
            &ad.b,
            t,
            dy,
            ad.config.scale(),
            mask.arg(&tr.dropout_schedule),
            if want_dx { tr.dx.as_mut() } else { None },
            &mut tr.da,
            &mut tr.db,
            mode,
            &mut tr.ws,
        )?;
        tr.has_grads = true;
        Ok(if want_dx { tr.dx.as_ref() } else { None })
    }

    /// The gradients (dA, dB) of the last [`LoraLinear::train_backward`] calls, if any.
    pub fn grads(&self) -> Option<(&Tensor<A>, &Tensor<A>)> {
        self.train.as_ref().map(|t| (&t.da, &t.db))
    }

    /// A DoRA adapter's magnitude gradient \[N\] (f32) of the last [`LoraLinear::train_backward`] calls
    /// (zeros before the first): `None` for a plain adapter or before the adapter's training state exists
    /// (its first training call).
    pub fn magnitude_grad(&self) -> Option<&Tensor<f32>> {
        self.train.as_ref()?.dora.as_ref().map(|d| &d.dm)
    }

    /// [`LoraLinear::magnitude_grad`], to change before [`LoraLinear::optimizer_step`]: it is one of a
    /// DoRA adapter's gradients, so a global-norm clip includes it beside [`LoraLinear::grads_mut`]'s (as
    /// PyTorch's `clip_grad_norm_` over PEFT's parameters includes `lora_magnitude_vector`).
    pub fn magnitude_grad_mut(&mut self) -> Option<&mut Tensor<f32>> {
        self.train.as_mut()?.dora.as_mut().map(|d| &mut d.dm)
    }

    /// The gradients, to change before [`LoraLinear::optimizer_step`]: global-norm clipping over every
    /// layer's ([`ops::GradClip`]), a loss scale, a gradient of the caller's own. A DoRA adapter has a
    /// third, [`LoraLinear::magnitude_grad_mut`].
    pub fn grads_mut(&mut self) -> Option<(&mut Tensor<A>, &mut Tensor<A>)> {
        self.train.as_mut().map(|t| (&mut t.da, &mut t.db))
    }

    /// One AdamW step on the active adapter's A and B (and a DoRA adapter's magnitude, with its own
    /// moments) with the gradients of
    /// [`LoraLinear::train_backward`], on the device in one fused kernel per tensor (no host round trip,
    /// no synchronisation). For f32 adapters (the f32 master weights are the adapter itself; a 16-bit
    /// adapter has no master copy to update: an [`Error::UnsupportedDType`]).
    pub fn optimizer_step(&mut self, hp: &AdamW) -> Result<()> {
        self.step_adapters("LoraLinear::optimizer_step", Optimizer::Host(hp))
    }

    /// [`LoraLinear::optimizer_step`] with the step's constants read from `schedule` on the device
    /// ([`ops::adamw_step_scheduled`]), so a whole training step (forward without dropout, loss
    /// gradient, backward, this) can be captured into a graph; advance the schedule before each step.
    pub fn optimizer_step_scheduled(&mut self, schedule: &ops::AdamwSchedule) -> Result<()> {
        self.step_adapters(
            "LoraLinear::optimizer_step_scheduled",
            Optimizer::Device(schedule),
        )
    }

    fn step_adapters(&mut self, op: &'static str, optimizer: Optimizer<'_>) -> Result<()> {
        if A::DTYPE != DType::F32 {
            return Err(Error::UnsupportedDType {
                op,
                arg: "adapter",
                got: A::DTYPE,
                supported: "f32 adapters (LoraLinear<T, f32>): AdamW updates f32 master weights",
            });
        }
        let name = self.training(op)?;
        let tr = self.train.as_mut().expect("made by training()");
        if !tr.has_grads {
            return Err(Error::InvalidState {
                op,
                message: format!(
                    "no train_backward of adapter `{name}` since its training state was made (it became active, or its A and B changed shape)"
                ),
            });
        }
        self.multi = None; // the step changes the adapter's values
        let ad = self.adapters.get_mut(&name).expect("active");
        let dev = ad.a.device().clone();
        if dev.is_capturing() {
            // and so does every replay of it, unseen
            self.stepped_in_graphs.insert(name.clone());
        }
        if tr.adam.is_none() {
            tr.adam = Some((
                AdamState::new(&dev, ad.a.shape())?,
                AdamState::new(&dev, ad.b.shape())?,
            ));
        }
        // the magnitude's state before any step, so a failure to make it steps nothing
        if let (Some(m), Some(dora)) = (ad.magnitude.as_ref(), tr.dora.as_mut())
            && dora.adam.is_none()
        {
            dora.adam = Some(AdamState::new(&dev, m.shape())?);
        }
        let (sa, sb) = tr.adam.as_mut().expect("made");
        // A is f32 (checked above): the statically typed views of the same tensors
        let not_f32 = || Error::InvalidState {
            op,
            message: "adapter tensors are not f32".into(),
        };
        let ga = tr.da.cast_ref::<f32>().ok_or_else(not_f32)?;
        let gb = tr.db.cast_ref::<f32>().ok_or_else(not_f32)?;
        let step =
            |param: &mut Tensor<f32>, grad: &Tensor<f32>, state: &mut AdamState| match optimizer {
                Optimizer::Host(hp) => ops::adamw_step(param, grad, state, hp),
                Optimizer::Device(schedule) => {
                    ops::adamw_step_scheduled(param, grad, state, schedule)
                }
            };
        step(ad.a.cast_mut::<f32>().ok_or_else(not_f32)?, ga, sa)?;
        step(ad.b.cast_mut::<f32>().ok_or_else(not_f32)?, gb, sb)?;
        if let (Some(m), Some(dora)) = (ad.magnitude.as_mut(), tr.dora.as_mut()) {
            step(m, &dora.dm, dora.adam.as_mut().expect("made above"))?;
        }
        Ok(())
    }
}

/// The mask of a train_forward: fixed (an eager call), or the layer's schedule's (a captured one).
#[derive(Clone, Copy, Debug)]
enum TrainDropout {
    Fixed(Dropout),
    Scheduled,
}

impl TrainDropout {
    fn arg(self, schedule: &DropoutSchedule) -> DropoutArg<'_> {
        match self {
            TrainDropout::Fixed(d) => DropoutArg::Fixed(d),
            TrainDropout::Scheduled => DropoutArg::Scheduled(schedule),
        }
    }
}

/// Where an optimizer step's constants come from: the host (`optimizer_step`) or a schedule on the
/// device (`optimizer_step_scheduled`).
#[derive(Clone, Copy)]
enum Optimizer<'a> {
    Host(&'a AdamW),
    Device(&'a ops::AdamwSchedule),
}
