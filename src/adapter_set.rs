//! Many LoRA adapters of one layer on the device, for batches whose rows use different adapters
//! ([`crate::ops::lora_forward_multi`]): what a server that keeps one base model and many adapters needs.
//!
//! - [`AdapterSet`]: the adapters' A (r×K) and B (N×r) packed one after another in one device arena,
//!   each at its own rank (1..=128, mixed), never padded to the largest; a small table (one
//!   `LkAdapterDesc` per slot: offsets, rank, scale) tells the kernels where each one is. Adding copies
//!   the new adapter into free space of the arena (device to device) and rewrites the table; removing
//!   frees its space and its slot. Neither moves nor re-uploads the other adapters, except when the arena
//!   is full: then it grows to twice its size with one device-to-device copy (reserve capacity with
//!   [`AdapterSet::with_capacity`] to avoid that). Replacing ([`AdapterSet::replace`]) writes new values
//!   of an adapter into its own space, at its rank: indices and captured graphs stay valid.
//! - [`AdapterIndex`]: the adapter slot of every row of a batch (or none), on the device, checked once
//!   against the set when it is built, so a server builds it once per batch and uses it for every layer.
//! - DoRA adapters ([`AdapterSet::add_dora`], PEFT's `use_dora`) served unmerged: their rows are
//!   `f ⊙ (X·W0ᵀ + s·(X·Aᵀ)·Bᵀ) + bias`, `f = m / ‖W0 + s·B·A‖` per output feature, the factors computed
//!   once when the adapter is added (from the layer's W0 then) and kept in a table beside the arena.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::validate;
use crate::params::{
    LK_ALIGNED_B, LK_ALIGNED_R, LK_NO_ADAPTER, LK_NO_FACTOR, LK_SMALL_M_MAX, LkAdapterDesc,
};
use crate::tensor::Tensor;

/// The u32 words of one `LkAdapterDesc` in the table.
const DESC_WORDS: usize = std::mem::size_of::<LkAdapterDesc>() / 4;
const _: () = assert!(std::mem::size_of::<LkAdapterDesc>() == 32);
/// Every adapter's A and B start at a multiple of this many elements of the arena (16 bytes for 16-bit
/// adapters, 32 for f32), so the kernels may use 16-byte loads on them.
const ALIGN_ELEMS: usize = 8;

/// An adapter read back to the host: A (r×K), B (N×r), scale.
pub type HostAdapter<A> = (Vec<A>, Vec<A>, f32);

static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Clone, Debug)]
struct Slot {
    offset: usize,
    /// Elements reserved in the arena (A's r·K and B's N·r, each rounded up to [`ALIGN_ELEMS`]).
    len: usize,
    rank: usize,
    scale: f32,
    /// A DoRA adapter: its factors are row `slot` of the factor table.
    dora: bool,
}

/// The adapters of one layer with base weight N×K, in the adapter dtype `A` (the layer dtype, or f32
/// master adapters over a bf16/f16 layer). Slots are numbered from 0; a removed adapter's slot is
/// reused by the next [`AdapterSet::add`].
pub struct AdapterSet<A: Element> {
    device: Device,
    n: usize,
    k: usize,
    arena: Tensor<A>,
    /// Free ranges of the arena below `end`, sorted by offset, never adjacent (coalesced).
    free: Vec<(usize, usize)>,
    /// The arena is unused from here on.
    end: usize,
    slots: Vec<Option<Slot>>,
    /// Bumped whenever a slot's adapter is added or removed, so an [`AdapterIndex`] notices.
    generations: Vec<u64>,
    table: Tensor<u32>,
    /// DoRA adapters' factors, N per row, row i for slot i (rows of other slots unused); None until the
    /// first DoRA adapter.
    factors: Option<Tensor<f32>>,
    id: u64,
}

impl<A: Element> std::fmt::Debug for AdapterSet<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AdapterSet<{}>(N={}, K={}, {} adapters, ranks {:?})",
            A::DTYPE,
            self.n,
            self.k,
            self.len(),
            self.slots
                .iter()
                .map(|s| s.as_ref().map(|s| s.rank))
                .collect::<Vec<_>>()
        )
    }
}

/// `v` up to a multiple of ALIGN_ELEMS; saturating, so a size past memory (a capacity asked of
/// `with_capacity`) becomes Tensor::zeros's TooLarge, not a wrapped small size.
fn round_up(v: usize) -> usize {
    v.div_ceil(ALIGN_ELEMS).saturating_mul(ALIGN_ELEMS)
}

impl<A: Element> AdapterSet<A> {
    /// An empty set for a layer whose W0 is `n`×`k`.
    pub fn new(device: &Device, n: usize, k: usize) -> Result<Self> {
        Self::with_capacity(device, n, k, 0)
    }

    /// An empty set whose arena holds `elements` adapter elements before it has to grow (an adapter of
    /// rank r takes about r·(N + K)).
    pub fn with_capacity(device: &Device, n: usize, k: usize, elements: usize) -> Result<Self> {
        const OP: &str = "AdapterSet::new";
        if A::DTYPE == DType::U32 {
            return Err(Error::UnsupportedDType {
                op: OP,
                arg: "A",
                got: A::DTYPE,
                supported: "bf16, f16 or f32 adapters",
            });
        }
        for (arg, v) in [("n", n), ("k", k)] {
            if v == 0 {
                return Err(Error::OutOfRange {
                    op: OP,
                    arg,
                    value: 0.0,
                    expected: "at least 1",
                });
            }
            validate::fits_u32(OP, arg, v)?;
        }
        Ok(AdapterSet {
            device: device.clone(),
            n,
            k,
            arena: Tensor::zeros(device, &[round_up(elements.max(1))])?,
            free: Vec::new(),
            end: 0,
            slots: Vec::new(),
            generations: Vec::new(),
            table: Tensor::zeros(device, &[DESC_WORDS])?,
            factors: None,
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// (N, K) of the layer.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The number of adapters in the set.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The number of slots (occupied or free): valid indices are below it.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }
    /// The rank of the adapter in `slot`, if there is one.
    pub fn rank(&self, slot: u32) -> Option<usize> {
        self.slot(slot).map(|s| s.rank)
    }
    /// The scale of the adapter in `slot`, if there is one.
    pub fn scale(&self, slot: u32) -> Option<f32> {
        self.slot(slot).map(|s| s.scale)
    }
    /// The largest rank in the set (1 when it is empty): the columns of the multi-adapter forward's T.
    pub fn max_rank(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .map(|s| s.rank)
            .max()
            .unwrap_or(1)
    }
    /// Adapter elements the arena holds before it grows.
    pub fn capacity(&self) -> usize {
        self.arena.numel()
    }

    fn slot(&self, slot: u32) -> Option<&Slot> {
        self.slots.get(slot as usize).and_then(|s| s.as_ref())
    }

    /// Adds an adapter: A [r, K], B [N, r] (1 ≤ r ≤ 128) on this set's device, and its scale s (the
    /// forward adds s·(X·Aᵀ)·Bᵀ). Returns its slot. The tensors are copied into the arena on the device.
    /// Their values are not scanned (that would need a read-back): a NaN or ±inf in A or B reaches the
    /// other rows of the tiles it is multiplied in (0·inf = NaN), so keep adapters finite.
    pub fn add(&mut self, a: &Tensor<A>, b: &Tensor<A>, scale: f32) -> Result<u32> {
        self.add_impl("AdapterSet::add", a, b, scale, None)
    }

    /// Adds a DoRA adapter (PEFT's `use_dora`) for serving unmerged: A, B and s as [`AdapterSet::add`],
    /// its magnitude `[N]` f32 (`lora_magnitude_vector`), and the layer's base weight `w0` `[N, K]`, from
    /// which its factors `m / ‖W0 + s·B·A‖` are computed now ([`crate::ops::dora_factor`]) and kept:
    /// its rows of the many-adapter forward are `factor ⊙ (X·W0ᵀ + s·(X·Aᵀ)·Bᵀ) + bias`. The set then
    /// serves that W0 only (add the adapter again after W0 changes). The factor table holds N f32 per
    /// slot up to the highest DoRA adapter's (doubling as it grows), and its row of a DoRA slot must end
    /// within u32::MAX elements (the kernels' index). Returns its slot.
    pub fn add_dora<T: Element>(
        &mut self,
        a: &Tensor<A>,
        b: &Tensor<A>,
        magnitude: &Tensor<f32>,
        scale: f32,
        w0: &Tensor<T>,
    ) -> Result<u32> {
        const OP: &str = "AdapterSet::add_dora";
        self.device
            .refuse_in_capture("AdapterSet::add_dora (a norm pass, copies and an upload)")?;
        self.check_dora_base(OP, magnitude, w0)?;
        let factor = crate::ops::dora_factor(w0, a, b, magnitude, scale)?;
        self.add_impl(OP, a, b, scale, Some(&factor))
    }

    /// [`AdapterSet::add`], with a DoRA adapter's factors `[N]` f32 when it is one.
    fn add_impl(
        &mut self,
        op: &'static str,
        a: &Tensor<A>,
        b: &Tensor<A>,
        scale: f32,
        factor: Option<&Tensor<f32>>,
    ) -> Result<u32> {
        // before any change: uploads and copies cannot be captured, and a half-made slot must not stay
        self.device
            .refuse_in_capture("AdapterSet::add (copies and an upload)")?;
        let r = self.check_adapter(op, a, b, scale)?;
        // the slot it will take: the first free one, else a new one at the end
        let slot = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .unwrap_or(self.slots.len());
        validate::fits_u32(op, "adapter slots", slot + 1)?;
        if let Some(factor) = factor {
            // before the arena changes: a failure here leaves the set as it was (the row is unused)
            self.store_factor(op, slot, factor)?;
        }
        let (a_len, b_len) = (round_up(r * self.k), round_up(self.n * r));
        let len = a_len + b_len;
        let offset = self.allocate(len)?;
        self.arena.copy_range_from(offset, a, 0, r * self.k)?;
        self.arena
            .copy_range_from(offset + a_len, b, 0, self.n * r)?;
        if slot == self.slots.len() {
            self.slots.push(None);
            self.generations.push(0);
        }
        self.slots[slot] = Some(Slot {
            offset,
            len,
            rank: r,
            scale,
            dora: factor.is_some(),
        });
        self.generations[slot] += 1;
        self.upload_table()?;
        Ok(slot as u32)
    }

    /// A and B of this set's layer on its device, a finite scale; returns the rank.
    fn check_adapter(
        &self,
        op: &'static str,
        a: &Tensor<A>,
        b: &Tensor<A>,
        scale: f32,
    ) -> Result<usize> {
        let r = validate::adapter(op, a, b, (self.n, self.k), "the set's K")?;
        if !scale.is_finite() {
            return Err(Error::NonFinite {
                op,
                arg: "scale",
                value: scale as f64,
            });
        }
        self.on_device(op, [("a", a.device()), ("b", b.device())])?;
        Ok(r)
    }

    /// Every argument is on the set's device.
    fn on_device<const N: usize>(
        &self,
        op: &'static str,
        args: [(&'static str, &Device); N],
    ) -> Result<()> {
        match args.into_iter().find(|(_, d)| **d != self.device) {
            Some((arg, d)) => Err(Error::DeviceMismatch {
                op,
                arg,
                expected: self.device.describe(),
                got: d.describe(),
            }),
            None => Ok(()),
        }
    }

    /// A DoRA adapter's base weight and magnitude: the set's layer, on its device.
    fn check_dora_base<T: Element>(
        &self,
        op: &'static str,
        magnitude: &Tensor<f32>,
        w0: &Tensor<T>,
    ) -> Result<()> {
        validate::shape(op, "w0", w0, &[self.n, self.k], "[N, K] (the set's layer)")?;
        self.on_device(op, [("w0", w0.device()), ("magnitude", magnitude.device())])
    }

    /// Writes a DoRA adapter's factors into row `slot` of the factor table, growing it (to twice its rows,
    /// at least `slot + 1`, with one device copy) when it has fewer rows.
    fn store_factor(&mut self, op: &'static str, slot: usize, factor: &Tensor<f32>) -> Result<()> {
        // the kernels index the table in u32 (kernels/include/lk_multi.cuh: row·N + column)
        let max_rows = u32::MAX as usize / self.n;
        if slot >= max_rows {
            return Err(Error::OutOfRange {
                op,
                arg: "DoRA adapter slot",
                value: slot as f64,
                expected: "a slot whose factors end within u32::MAX elements of the factor table (slot + 1 ≤ u32::MAX / N)",
            });
        }
        let rows = self.factors.as_ref().map_or(0, |t| t.numel() / self.n);
        if slot >= rows {
            // a row for every slot the set has too, so that replace_dora of a plain adapter's slot
            // rarely has to grow it (a new table: the graphs captured with the old one refuse)
            let grown = (slot + 1).max(2 * rows).max(self.slots.len()).min(max_rows);
            let mut table = Tensor::zeros(&self.device, &[grown * self.n])?;
            if let Some(old) = &self.factors {
                table.copy_range_from(0, old, 0, rows * self.n)?;
            }
            self.factors = Some(table);
        }
        let table = self.factors.as_mut().expect("made above");
        table.copy_range_from(slot * self.n, factor, 0, self.n)
    }

    /// The factor table for the forward, when the set holds a DoRA adapter.
    pub(crate) fn factor_table(&self) -> Option<&Tensor<f32>> {
        let any = self.slots.iter().flatten().any(|s| s.dora);
        self.factors.as_ref().filter(|_| any)
    }

    /// Whether the adapter in `slot` is a DoRA adapter ([`AdapterSet::add_dora`]).
    pub fn is_dora(&self, slot: u32) -> bool {
        self.slot(slot).is_some_and(|s| s.dora)
    }

    /// The factors `m / ‖W0 + s·B·A‖` (`[N]`) of the DoRA adapter in `slot` as a host copy, for
    /// references and tests; None for a plain adapter or an empty slot.
    pub fn dora_factors(&self, slot: u32) -> Result<Option<Vec<f32>>> {
        match (self.is_dora(slot), &self.factors) {
            (true, Some(table)) => {
                let all = table.to_vec()?;
                let at = slot as usize * self.n;
                Ok(Some(all[at..at + self.n].to_vec()))
            }
            _ => Ok(None),
        }
    }

    /// Adds module `module` of a PEFT adapter (e.g. `model.layers.0.self_attn.v_proj` of one adapter
    /// directory, loaded with [`PeftAdapter::load`](crate::peft::PeftAdapter::load)) with PEFT's scale
    /// for it (alpha / r, or alpha / √r with rsLoRA, with rank and alpha patterns). The file's values
    /// are kept exactly: f32 files need an f32 set; a 16-bit file goes into a set of its dtype or f32.
    /// Several directories go into one set by calling this once per directory. Returns the slot.
    pub fn add_peft_module(
        &mut self,
        adapter: &crate::peft::PeftAdapter,
        module: &str,
    ) -> Result<u32> {
        let (a, b) = adapter.module_tensors::<A>(
            "AdapterSet::add_peft_module",
            module,
            &self.device,
            "values the set holds exactly: its own dtype, or bf16/f16 into an f32 set",
        )?;
        self.add(&a, &b, adapter.config.scale_for(module) as f32)
    }

    /// [`AdapterSet::add_peft_module`] for an adapter that may be a DoRA one (`use_dora`): with the
    /// layer's base weight `w0` `[N, K]`, from which a DoRA module's factors are computed
    /// ([`AdapterSet::add_dora`], its `lora_magnitude_vector` as the magnitude); a plain module is added
    /// as by `add_peft_module`. Returns the slot.
    pub fn add_peft_module_with_base<T: Element>(
        &mut self,
        adapter: &crate::peft::PeftAdapter,
        module: &str,
        w0: &Tensor<T>,
    ) -> Result<u32> {
        let (a, b, magnitude) = adapter.module_adapter_tensors::<A>(
            "AdapterSet::add_peft_module_with_base",
            module,
            &self.device,
            "values the set holds exactly: its own dtype, or bf16/f16 into an f32 set",
        )?;
        let scale = adapter.config.scale_for(module) as f32;
        match magnitude {
            Some(m) => self.add_dora(&a, &b, &m, scale, w0),
            None => self.add(&a, &b, scale),
        }
    }

    /// Replaces the values of the adapter in `slot` with A [r, K], B [N, r] and scale `s`, at the slot's
    /// rank (copied into the slot's arena space on the device, in stream order): new weights of the same
    /// adapter, e.g. a newer version of a tenant's adapter or one that is being trained. The slot keeps
    /// its number, so an [`AdapterIndex`] that names it stays valid; a graph captured with the set
    /// ([`crate::device::Device::capture`]) stays valid too and replays with the new values, unless a
    /// DoRA adapter becomes a plain one (the graph's kernels depend on it: capture again). Another rank
    /// is refused (remove and add). Not capturable (copies and an upload).
    pub fn replace(&mut self, slot: u32, a: &Tensor<A>, b: &Tensor<A>, scale: f32) -> Result<()> {
        self.replace_impl("AdapterSet::replace", slot, a, b, scale, None)
    }

    /// [`AdapterSet::replace`] with a DoRA adapter (its magnitude `[N]` and the layer's W0, from which its
    /// factors are computed as [`AdapterSet::add_dora`] does). A plain adapter that becomes a DoRA one
    /// keeps graphs captured with the set valid only if the set already held a DoRA adapter then and
    /// its factor table has the slot's row (it holds a row for every slot the set had when it was
    /// made or last grew); otherwise those graphs refuse to replay (their kernels would not apply the
    /// factors, or read the old table): capture again.
    pub fn replace_dora<T: Element>(
        &mut self,
        slot: u32,
        a: &Tensor<A>,
        b: &Tensor<A>,
        magnitude: &Tensor<f32>,
        scale: f32,
        w0: &Tensor<T>,
    ) -> Result<()> {
        const OP: &str = "AdapterSet::replace_dora";
        self.device
            .refuse_in_capture("AdapterSet::replace_dora (a norm pass, copies and an upload)")?;
        self.check_dora_base(OP, magnitude, w0)?;
        self.replaced_slot(OP, slot, a)?;
        let factor = crate::ops::dora_factor(w0, a, b, magnitude, scale)?;
        self.replace_impl(OP, slot, a, b, scale, Some(&factor))
    }

    /// The slot `replace` may write: holding an adapter of A's rank.
    fn replaced_slot(&self, op: &'static str, slot: u32, a: &Tensor<A>) -> Result<Slot> {
        let s = self
            .slot(slot)
            .cloned()
            .ok_or_else(|| Error::InvalidState {
                op,
                message: format!(
                    "slot {slot} holds no adapter (occupied: {:?}); add one",
                    self.occupied()
                ),
            })?;
        let r = a.shape().first().copied().unwrap_or(0);
        if a.shape().len() == 2 && r != s.rank {
            return Err(Error::Shape {
                op,
                arg: "a",
                expected: format!(
                    "[{}, {}] (the rank of the adapter in slot {slot}; remove it and add one of another rank)",
                    s.rank, self.k
                ),
                got: a.shape().to_vec(),
            });
        }
        Ok(s)
    }

    fn replace_impl(
        &mut self,
        op: &'static str,
        slot: u32,
        a: &Tensor<A>,
        b: &Tensor<A>,
        scale: f32,
        factor: Option<&Tensor<f32>>,
    ) -> Result<()> {
        self.device
            .refuse_in_capture("AdapterSet::replace (copies and an upload)")?;
        let old = self.replaced_slot(op, slot, a)?;
        let r = self.check_adapter(op, a, b, scale)?;
        debug_assert_eq!(r, old.rank);
        // a graph captured while the set held no DoRA adapter ran the plain kernels, and one whose
        // adapter turns plain would still apply its old factors: those graphs must not replay
        let had_dora = self.factor_table().is_some();
        let written = (|| -> Result<()> {
            if let Some(factor) = factor {
                self.store_factor(op, slot as usize, factor)?;
            }
            let a_len = round_up(r * self.k);
            self.arena.copy_range_from(old.offset, a, 0, r * self.k)?;
            self.arena
                .copy_range_from(old.offset + a_len, b, 0, self.n * r)
        })();
        if let Err(e) = written {
            // half written (a device error): no graph may replay over it
            self.table.renew_liveness();
            return Err(e);
        }
        let dora = factor.is_some();
        self.slots[slot as usize] = Some(Slot {
            scale,
            dora,
            ..old.clone()
        });
        let keep_graphs = (old.dora == dora) || (dora && had_dora);
        self.upload_table_keeping(keep_graphs)
    }

    /// Removes the adapter in `slot`; its arena space and the slot are reused by later adds. An
    /// [`AdapterIndex`] that names the slot is refused by the forward from now on.
    pub fn remove(&mut self, slot: u32) -> Result<()> {
        self.device
            .refuse_in_capture("AdapterSet::remove (an upload)")?;
        let s = self
            .slot(slot)
            .cloned()
            .ok_or_else(|| Error::InvalidState {
                op: "AdapterSet::remove",
                message: format!(
                    "slot {slot} holds no adapter (occupied: {:?})",
                    self.occupied()
                ),
            })?;
        self.release(s.offset, s.len);
        self.slots[slot as usize] = None;
        self.generations[slot as usize] += 1;
        self.upload_table()
    }

    /// The occupied slots, ascending.
    pub fn occupied(&self) -> Vec<u32> {
        (0..self.slots.len() as u32)
            .filter(|&i| self.slot(i).is_some())
            .collect()
    }

    /// First fit in the free ranges, else at the end (growing the arena when it is full).
    fn allocate(&mut self, len: usize) -> Result<usize> {
        if let Some(i) = self.free.iter().position(|&(_, l)| l >= len) {
            let (off, l) = self.free[i];
            if l == len {
                self.free.remove(i);
            } else {
                self.free[i] = (off + len, l - len);
            }
            return Ok(off);
        }
        let off = self.end;
        let need = off + len;
        if need > self.arena.numel() {
            let grown = need.max(2 * self.arena.numel());
            let mut arena = Tensor::zeros(&self.device, &[grown])?;
            arena.copy_range_from(0, &self.arena, 0, self.end)?;
            self.arena = arena;
        }
        self.end = need;
        Ok(off)
    }

    fn release(&mut self, off: usize, len: usize) {
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, len));
        // coalesce with the next, then the previous
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
        // a free range at the end gives the space back to the tail
        if let Some(&(o, l)) = self.free.last()
            && o + l == self.end
        {
            self.end = o;
            self.free.pop();
        }
    }

    /// The descriptor table, as the kernels read it (lora_params.h `LkAdapterDesc`, little-endian words).
    fn table_words(&self) -> Vec<u32> {
        let mut w = vec![0u32; DESC_WORDS * self.slots.len().max(1)];
        for (i, s) in self.slots.iter().enumerate() {
            let Some(s) = s else { continue };
            let a_off = s.offset as u64;
            let b_off = (s.offset + round_up(s.rank * self.k)) as u64;
            let mut flags = 0;
            if self.k % ALIGN_ELEMS == 0 {
                flags |= LK_ALIGNED_R;
            }
            if s.rank % ALIGN_ELEMS == 0 {
                flags |= LK_ALIGNED_B;
            }
            let d = &mut w[i * DESC_WORDS..(i + 1) * DESC_WORDS];
            d[0] = a_off as u32;
            d[1] = (a_off >> 32) as u32;
            d[2] = b_off as u32;
            d[3] = (b_off >> 32) as u32;
            d[4] = s.rank as u32;
            d[5] = s.scale.to_bits();
            d[6] = flags;
            // a DoRA adapter's factors are the table's row of its slot
            d[7] = if s.dora { i as u32 } else { LK_NO_FACTOR };
        }
        w
    }

    fn upload_table(&mut self) -> Result<()> {
        self.upload_table_keeping(false)
    }

    /// Uploads the table; graphs captured with the set may replay over it only with `keep_graphs`
    /// (the same slots, ranks and offsets: only values the kernels read at run time changed).
    fn upload_table_keeping(&mut self, keep_graphs: bool) -> Result<()> {
        let words = self.table_words();
        if self.table.numel() == words.len() {
            // a graph captured with the set keeps the old table's counts and ranks in its launch
            // parameters: it must not replay over a new one
            if !keep_graphs {
                self.table.renew_liveness();
            }
            self.table.copy_from_slice(&words)
        } else {
            self.table = Tensor::from_slice(&self.device, &words, &[words.len()])?;
            Ok(())
        }
    }

    /// The adapter in `slot` as host copies (A [r·K], B [N·r], scale), for references and tests.
    pub fn to_host(&self, slot: u32) -> Result<Option<HostAdapter<A>>> {
        let Some(s) = self.slot(slot) else {
            return Ok(None);
        };
        let all = self.arena.to_vec()?;
        let a_len = s.rank * self.k;
        let b0 = s.offset + round_up(a_len);
        Ok(Some((
            all[s.offset..s.offset + a_len].to_vec(),
            all[b0..b0 + self.n * s.rank].to_vec(),
            s.scale,
        )))
    }

    pub(crate) fn arena(&self) -> &Tensor<A> {
        &self.arena
    }
    pub(crate) fn table(&self) -> &Tensor<u32> {
        &self.table
    }
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
    pub(crate) fn generation(&self, slot: u32) -> Option<u64> {
        self.generations.get(slot as usize).copied()
    }
}

/// The adapter of every row of a batch, on the device: a slot of one [`AdapterSet`] or none. Checked
/// against the set when built (every slot named holds an adapter); the forward checks that none of them
/// was removed (or removed and added again) since; [`AdapterSet::replace`] keeps it valid.
#[derive(Debug)]
pub struct AdapterIndex {
    index: Tensor<u32>,
    set_id: u64,
    /// (slot, its generation when the index was built) for every slot the rows name.
    used: Vec<(u32, u64)>,
    /// The most distinct slots among the rows of one 16-row group (rows 16g..16g+15): the decode
    /// shrink's blocks per group (kernels/multi_decode.cu).
    group_passes: usize,
}

impl AdapterIndex {
    /// From the host: row i uses slot `rows[i]`, or no adapter (`None`: Y = X·W0ᵀ + bias).
    pub fn new<A: Element>(set: &AdapterSet<A>, rows: &[Option<u32>]) -> Result<Self> {
        let words: Vec<u32> = rows.iter().map(|r| r.unwrap_or(LK_NO_ADAPTER)).collect();
        Self::checked(set, words, "AdapterIndex::new")
    }

    /// From a device tensor of u32 slots (`u32::MAX`: no adapter), e.g. computed by the caller's own
    /// kernels: 1-D, dtype u32. It is read back once to check it (one device-to-host copy, which waits
    /// for the stream).
    pub fn from_tensor<A: Element, I: Element>(
        set: &AdapterSet<A>,
        index: &Tensor<I>,
    ) -> Result<Self> {
        const OP: &str = "AdapterIndex::from_tensor";
        if I::DTYPE != DType::U32 {
            return Err(Error::UnsupportedDType {
                op: OP,
                arg: "adapter_index",
                got: I::DTYPE,
                supported: "u32 (one adapter slot per row, u32::MAX for none)",
            });
        }
        if index.shape().len() != 1 {
            return Err(Error::Shape {
                op: OP,
                arg: "adapter_index",
                expected: "[M] (one slot per row)".into(),
                got: index.shape().to_vec(),
            });
        }
        let words: Vec<u32> = index
            .to_vec()?
            .into_iter()
            .map(|v| v.to_bits_u32())
            .collect();
        Self::checked(set, words, OP)
    }

    /// Replaces the rows' slots in place (the same number of rows; `None`: no adapter), checked against
    /// `set`, the set the index was built for, as [`AdapterIndex::new`] does, into the same device
    /// memory: a graph that captured a many-adapter forward with this index replays with the new map
    /// (README, "Graphs"). An upload, so not during a capture.
    pub fn update<A: Element>(&mut self, set: &AdapterSet<A>, rows: &[Option<u32>]) -> Result<()> {
        const OP: &str = "AdapterIndex::update";
        if rows.len() != self.len() {
            return Err(Error::Shape {
                op: OP,
                arg: "rows",
                expected: format!("[{}] (the index's rows)", self.len()),
                got: vec![rows.len()],
            });
        }
        if set.id() != self.set_id {
            // a graph holding this index holds the set it was built for, whose table the new slots
            // must be in
            return Err(Error::InvalidState {
                op: OP,
                message: "`set` is not the AdapterSet the index was built for".into(),
            });
        }
        let words: Vec<u32> = rows.iter().map(|r| r.unwrap_or(LK_NO_ADAPTER)).collect();
        let (used, group_passes) = Self::scan(set, &words, OP)?;
        self.index.copy_from_slice(&words)?;
        (self.used, self.group_passes) = (used, group_passes);
        Ok(())
    }

    fn checked<A: Element>(set: &AdapterSet<A>, words: Vec<u32>, op: &'static str) -> Result<Self> {
        let (used, group_passes) = Self::scan(set, &words, op)?;
        Ok(AdapterIndex {
            index: Tensor::from_slice(set.device(), &words, &[words.len()])?,
            set_id: set.id(),
            used,
            group_passes,
        })
    }

    /// The slots `words` name, with their generations, and the most distinct slots of a 16-row group;
    /// an error for an empty index or a slot the set does not hold.
    #[allow(clippy::type_complexity)]
    fn scan<A: Element>(
        set: &AdapterSet<A>,
        words: &[u32],
        op: &'static str,
    ) -> Result<(Vec<(u32, u64)>, usize)> {
        if words.is_empty() {
            return Err(Error::Empty {
                op,
                arg: "adapter_index",
                shape: vec![0],
            });
        }
        validate::fits_u32(op, "adapter_index", words.len())?;
        let mut used: Vec<u32> = Vec::new();
        for (row, &v) in words.iter().enumerate() {
            if v == LK_NO_ADAPTER {
                continue;
            }
            if set.slot(v).is_none() {
                return Err(Error::AdapterIndex {
                    op,
                    row,
                    value: v,
                    occupied: set.occupied(),
                });
            }
            used.push(v);
        }
        used.sort_unstable();
        used.dedup();
        let group_passes = words
            .chunks(LK_SMALL_M_MAX as usize)
            .map(|group| {
                let mut slots: Vec<u32> = group
                    .iter()
                    .copied()
                    .filter(|&v| v != LK_NO_ADAPTER)
                    .collect();
                slots.sort_unstable();
                slots.dedup();
                slots.len()
            })
            .max()
            .unwrap_or(0);
        let used = used
            .into_iter()
            .map(|s| (s, set.generation(s).unwrap_or(0)))
            .collect();
        Ok((used, group_passes))
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.index.numel()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The slots the rows name, ascending, each once.
    pub fn slots(&self) -> Vec<u32> {
        self.used.iter().map(|&(s, _)| s).collect()
    }

    /// The most distinct slots that the rows of one 16-row group (rows 16g..16g+15) name.
    pub(crate) fn group_passes(&self) -> usize {
        self.group_passes
    }

    /// Still valid for `set`: built for it, and none of its slots changed since.
    pub(crate) fn check<A: Element>(&self, op: &'static str, set: &AdapterSet<A>) -> Result<()> {
        if self.set_id != set.id() {
            return Err(Error::InvalidState {
                op,
                message: "adapter_index was built for another AdapterSet".into(),
            });
        }
        for &(slot, generation) in &self.used {
            if set.generation(slot) != Some(generation) {
                return Err(Error::InvalidState {
                    op,
                    message: format!(
                        "adapter slot {slot}, which adapter_index uses, was removed (or removed and added \
                         again) after the index was built; build the index again"
                    ),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn tensor(&self) -> &Tensor<u32> {
        &self.index
    }
}

#[cfg(test)]
mod factor_table_tests {
    use super::AdapterSet;
    use crate::device::Device;
    use crate::error::Error;
    use crate::tensor::Tensor;

    /// The kernels index the DoRA factor table in u32: a slot whose factors would end past u32::MAX
    /// elements is refused before anything is allocated (N = 2^30: rows 0..=2 fit, row 3 would end at 2^32).
    #[test]
    fn factor_rows_past_u32_are_refused() {
        let dev = Device::emulator();
        let mut set = AdapterSet::<f32>::new(&dev, 1 << 30, 1).unwrap();
        let factor = Tensor::<f32>::zeros(&dev, &[1]).unwrap();
        let e = set
            .store_factor("AdapterSet::add_dora", 3, &factor)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutOfRange {
                    arg: "DoRA adapter slot",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(set.factors.is_none(), "nothing allocated");
    }
}
