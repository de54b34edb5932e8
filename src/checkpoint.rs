//! Merging a PEFT adapter into a safetensors checkpoint (single file, or a directory with
//! `model.safetensors.index.json` and its shards) with the merge kernel: every targeted weight becomes
//! `round(W0 ± s·B·A)`, every tensor of a module the adapter saved whole (`modules_to_save`) becomes the
//! adapter's (rounded to the base's dtype, as PEFT's load into the base model does), every other tensor
//! is copied byte for byte, dtypes, names and metadata are kept. Everything is validated before anything is written; output goes to temporary names renamed
//! into place at the end, so a failure never leaves a partial output, and the base is only read.
//!
//! A merge that would turn an element that is finite in the base into NaN or ±Inf (a NaN or Inf in
//! lora_A or lora_B, a merged value past the dtype's range) fails naming the module and the count,
//! as PEFT's `safe_merge` refuses it, unless [`MergeOptions::allow_nonfinite`]. The merge kernel counts
//! these in the merge pass itself; a merged weight is downloaded only when its counts allow it.
//! Elements already NaN or ±Inf in the base are no error: [`MergeSummary::nonfinite`] lists them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::{self, NonFiniteCounts};
use crate::peft::{self, AdapterModule, PeftAdapter, SavedTensor, temp_sibling, write_atomic};
use crate::tensor::Tensor;

const INDEX: &str = "model.safetensors.index.json";

/// Progress of [`merge_checkpoint`] and [`verify_merge`], reported per module. The library draws
/// nothing: a caller shows it however it likes (the `lora-kernels` command draws a progress bar on a
/// terminal and plain lines elsewhere). `()` reports nothing.
pub trait Progress {
    /// Called once, before the first module: how many modules, and the bytes of their weights.
    fn start(&mut self, _modules: usize, _bytes: u64) {}
    /// Called after each module: its name (as in the adapter) and the bytes of its weight.
    fn module_done(&mut self, _module: &str, _bytes: u64) {}
}

impl Progress for () {}

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeSummary {
    pub modules_merged: usize,
    /// Tensors of modules the adapter saved whole (`modules_to_save`), written in place of the base's.
    pub tensors_replaced: usize,
    pub tensors_copied: usize,
    pub files_written: usize,
    pub bytes_written: u64,
    /// The modules with non-finite elements, in the order merged: already NaN or ±Inf in the base
    /// (`in_base`; written as the merge leaves them), or, with
    /// [`MergeOptions::allow_nonfinite`] only, made NaN or ±Inf by the merge (`nan`, `inf`); a tensor
    /// saved whole that puts NaN or ±Inf where the base's element was finite is listed by its name.
    pub nonfinite: Vec<(String, NonFiniteCounts)>,
}

/// How [`merge_checkpoint_with`] merges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeOptions {
    /// Subtract the adapter: `round(W − s·B·A)`.
    pub unmerge: bool,
    /// Write the merge even where it turns finite elements of the base into NaN or ±Inf (they are
    /// then listed in [`MergeSummary::nonfinite`]); by default such a merge fails and writes nothing.
    pub allow_nonfinite: bool,
}

/// The shards of a checkpoint: (file name, path).
fn shards(base: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    if base.is_file() {
        return Ok((vec![base.to_path_buf()], None));
    }
    let index = base.join(INDEX);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(Error::io(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
        // every shard a file name beside the index: a path elsewhere would be read from outside the
        // checkpoint, and written to the output under its bare name while the copied index still
        // pointed at the path
        let files = map
            .iter()
            .map(|(tensor, f)| match f.as_str() {
                Some(name)
                    if !name.is_empty()
                        && Path::new(name).file_name() == Some(std::ffi::OsStr::new(name)) =>
                {
                    Ok(name.to_string())
                }
                _ => Err(Error::format(
                    &index,
                    format!(
                        "`weight_map` entry `{tensor}` is {f}: expected the file name of a shard \
                         beside the index"
                    ),
                )),
            })
            .collect::<Result<BTreeSet<String>>>()?;
        return Ok((files.iter().map(|f| base.join(f)).collect(), Some(index)));
    }
    let single = base.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], None));
    }
    Err(Error::format(
        base,
        format!("neither a .safetensors file nor a directory with {INDEX} or model.safetensors"),
    ))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, format!("corrupt or truncated safetensors file: {e}")))
}

fn metadata(path: &Path, bytes: &[u8]) -> Result<Option<HashMap<String, String>>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(path, format!("corrupt or truncated safetensors file: {e}")))?;
    Ok(meta.metadata().clone())
}

/// A safetensors file's header, validated as the safetensors crate validates a whole file (offsets
/// contiguous and matching each tensor's dtype and shape, sizes without overflow), and the file's
/// length checked against it, without reading the tensor data: a checkpoint of many shards is checked
/// before anything is written while only one shard at a time is held in memory.
fn read_header(path: &Path) -> Result<safetensors::tensor::Metadata> {
    use std::io::Read;
    let bad = |what: &str| {
        Error::format(
            path,
            format!("corrupt or truncated safetensors file: {what}"),
        )
    };
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let file_len = file.metadata().map_err(Error::io(path))?.len();
    let short = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad("shorter than its header"),
        _ => Error::io(path)(e),
    };
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(short)?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad("header too large"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(short)?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(&format!("header: {e}")))?;
    if 8 + len + meta.data_len() as u64 != file_len {
        return Err(bad(&format!(
            "the header describes {} bytes of data, the file holds {}",
            meta.data_len(),
            file_len.saturating_sub(8 + len)
        )));
    }
    Ok(meta)
}

/// The data bytes of the tensors `wanted` in a safetensors file, from its header alone.
fn header_bytes(path: &Path, wanted: impl Fn(&str) -> bool) -> Result<u64> {
    let meta = read_header(path)?;
    Ok(meta
        .tensors()
        .iter()
        .filter(|(name, _)| wanted(name))
        .map(|(_, t)| (t.data_offsets.1 - t.data_offsets.0) as u64)
        .sum())
}

/// Merge (or unmerge) in place, and the merge's non-finite counts from the same pass (DoRA: from
/// its last pass). A DoRA unmerge never gets here (refused before any work: [`dora_unmerge_refused`]).
fn counted<T: Element, U: Element>(
    w: &mut Tensor<T>,
    a: &Tensor<U>,
    b: &Tensor<U>,
    magnitude: Option<&Tensor<f32>>,
    scale: f32,
    unmerge: bool,
) -> Result<NonFiniteCounts> {
    match (unmerge, magnitude) {
        (false, Some(m)) => ops::dora_merge_counted(w, a, b, m, scale).map(|(_, c)| c),
        (true, Some(_)) => Err(Error::InvalidState {
            op: "unmerge",
            message: "a DoRA module cannot be unmerged from a merged checkpoint".into(),
        }),
        (true, None) => ops::unmerge_counted(w, a, b, scale),
        (false, None) => ops::merge_counted(w, a, b, scale),
    }
}

/// Every module has a magnitude vector exactly when the config sets `use_dora` (what
/// [`PeftAdapter::load`] gives; an adapter edited through its public fields may not).
fn dora_consistent(adapter: &PeftAdapter) -> Result<()> {
    let use_dora = adapter.config.use_dora;
    if let Some(m) = adapter
        .modules
        .iter()
        .find(|m| m.magnitude.is_some() != use_dora)
    {
        return Err(Error::InvalidState {
            op: "merge",
            message: format!(
                "module `{}` {} DoRA magnitude vector but the config's use_dora is {use_dora}",
                m.name,
                if use_dora { "has no" } else { "has a" }
            ),
        });
    }
    Ok(())
}

/// A DoRA adapter cannot be unmerged from a merged checkpoint: each merged row's norm is its
/// magnitude, whatever the base row was, so the factor the merge applied is not in the files.
/// Its callers check [`dora_consistent`] first, so the config says what the modules hold.
fn dora_unmerge_refused(adapter: &PeftAdapter, what: &str) -> Result<()> {
    if adapter.config.use_dora {
        return Err(Error::Unsupported {
            what: format!("{what} of a DoRA adapter (`use_dora`)"),
            hint: "a DoRA merge rescales each row by magnitude / ‖W0 + s·B·A‖, a factor the merged checkpoint does not keep (its rows' norms are the magnitudes, whatever W0 was); keep the base checkpoint, or unmerge on the device with the factors ops::dora_merge returned (ops::dora_unmerge)".into(),
        });
    }
    Ok(())
}

/// An adapter with modules saved whole cannot be unmerged: the base's tensors they replaced are not in
/// the adapter.
fn saved_unmerge_refused(adapter: &PeftAdapter, what: &str) -> Result<()> {
    if let Some(t) = adapter.modules_to_save.first() {
        return Err(Error::Unsupported {
            what: format!(
                "{what} of an adapter with modules saved whole (`modules_to_save`: {:?}, e.g. `{}`)",
                adapter.config.modules_to_save, t.name
            ),
            hint: "a merge replaces those modules' tensors with the adapter's, and the base's are not in the adapter; keep the base checkpoint".into(),
        });
    }
    Ok(())
}

/// The tensors of the modules saved whole by name, checked as [`PeftAdapter::load`] checks them (an
/// adapter built through the public fields may not be what load gives).
fn saved_by_name(adapter: &PeftAdapter) -> Result<BTreeMap<String, &SavedTensor>> {
    adapter.check_modules_to_save("merge")?;
    Ok(adapter
        .modules_to_save
        .iter()
        .map(|t| (t.name.clone(), t))
        .collect())
}

/// The weight a module's merge starts from: the checkpoint's `stored` bytes, or, for a merge of a module
/// whose base weight the adapter saved (PEFT's `save_embedding_layers`), that weight converted to the
/// checkpoint's dtype, as PEFT's load puts it in place of the base's (its shape must be the
/// checkpoint's). An unmerge starts from the checkpoint, the merged weight it takes the adapter out of.
fn merge_base<'a>(
    f: &Path,
    name: &str,
    m: &AdapterModule,
    shape: &[usize],
    dtype: DType,
    unmerge: bool,
    stored: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>> {
    saved_base_fits(f, name, m, shape)?;
    match (&m.base_weight, unmerge) {
        (Some(saved), false) => Ok(std::borrow::Cow::Owned(saved.bytes_as(dtype))),
        _ => Ok(std::borrow::Cow::Borrowed(stored)),
    }
}

/// A base weight the adapter saved has the checkpoint tensor's shape.
fn saved_base_fits(f: &Path, name: &str, m: &AdapterModule, shape: &[usize]) -> Result<()> {
    match &m.base_weight {
        Some(saved) if saved.shape != shape => Err(Error::format(
            f,
            format!(
                "adapter/base shape mismatch for `{name}`: the adapter saved the layer's base weight as {:?}, the checkpoint has {shape:?} (a vocabulary resized for training needs the base resized the same way)",
                saved.shape
            ),
        )),
        _ => Ok(()),
    }
}

/// An embedding's or an lm_head's weight stored twice, bit for bit (input and output embeddings tied,
/// `tie_word_embeddings`, in a checkpoint that keeps both names, in any shards), is one parameter to
/// PEFT, whose merge changes both: refused rather than merged into one copy. Skipped where the
/// checkpoint's `config.json` (beside it) says the embeddings are not tied. A checkpoint that stores
/// the tied weight once is merged into it, as PEFT does.
fn tied_copies_refused(
    base: &Path,
    adapter: &PeftAdapter,
    tensors: &BTreeMap<String, BaseTensor>,
) -> Result<()> {
    if ties_declared(base) == Some(false) {
        return Ok(());
    }
    let read = |t: &BaseTensor, name: &str| -> Result<Vec<u8>> {
        let bytes = std::fs::read(&t.file).map_err(Error::io(&t.file))?;
        let st = parse(&t.file, &bytes)?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::format(&t.file, e.to_string()))?;
        Ok(view.data().to_vec())
    };
    for m in &adapter.modules {
        let last = m.name.rsplit('.').next().unwrap_or(&m.name);
        if !m.embedding && last != "lm_head" {
            continue;
        }
        let name = format!("{}.weight", m.name);
        let Some(t) = tensors.get(&name) else {
            continue;
        };
        let twins: Vec<_> = tensors
            .iter()
            .filter(|(other, u)| **other != name && u.shape == t.shape && u.dtype == t.dtype)
            .collect();
        if twins.is_empty() {
            continue;
        }
        let data = read(t, &name)?;
        for (other, u) in twins {
            if read(u, other)? == data {
                return Err(Error::format(
                    &t.file,
                    format!(
                        "`{name}` is `{other}` bit for bit: a tied pair (tie_word_embeddings), which PEFT merges as one parameter, so that both change; not merged (a checkpoint that stores the tied weight once is merged into it; a config.json beside the checkpoint with tie_word_embeddings false skips this check)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `tie_word_embeddings` of the `config.json` beside the checkpoint (in its directory), if there is one
/// that says.
fn ties_declared(base: &Path) -> Option<bool> {
    let dir = if base.is_dir() { base } else { base.parent()? };
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("tie_word_embeddings")?.as_bool()
}

/// Every tensor saved whole has one to replace in the base.
fn saved_all_found(
    base: &Path,
    by_saved: &BTreeMap<String, &SavedTensor>,
    found: impl Fn(&str) -> bool,
) -> Result<()> {
    match by_saved.keys().find(|w| !found(w)) {
        Some(missing) => Err(Error::format(
            base,
            format!(
                "tensor `{missing}` of a module saved whole (`modules_to_save`) is missing from the base checkpoint: a head new to the model (a classifier trained on a causal-LM checkpoint: merge into the checkpoint of the task model, which has the head), or a weight tied to another and stored once, under the other's name (an lm_head tied to the embeddings)"
            ),
        )),
        None => Ok(()),
    }
}

/// The non-finite elements a tensor saved whole makes, written over the base's: NaN or ±Inf where the
/// base's element was finite (a NaN or Inf in the adapter, or a value past the range of the base's
/// dtype, rounded to Inf). `in_base` stays 0: the base's values are not written.
fn replaced_counts(base: &[u8], replaced: &[u8], dtype: DType) -> NonFiniteCounts {
    fn count<T: Element>(base: &[u8], replaced: &[u8]) -> NonFiniteCounts {
        let base: Vec<T> = bytemuck::pod_collect_to_vec(base);
        let replaced: Vec<T> = bytemuck::pod_collect_to_vec(replaced);
        let mut c = NonFiniteCounts::default();
        for (b, r) in base.iter().zip(&replaced) {
            let (b, r) = (b.to_f64(), r.to_f64());
            if !b.is_finite() {
                continue;
            } else if r.is_nan() {
                c.nan += 1;
            } else if r.is_infinite() {
                c.inf += 1;
            }
        }
        c
    }
    match dtype {
        DType::BF16 => count::<half::bf16>(base, replaced),
        DType::F16 => count::<half::f16>(base, replaced),
        DType::F32 => count::<f32>(base, replaced),
        DType::U32 => NonFiniteCounts::default(),
    }
}

/// A base tensor that a module saved whole replaces must have its shape (PEFT's load into the base
/// model refuses another size too) and a float dtype (the saved values are converted to it).
fn saved_fits(
    f: &Path,
    name: &str,
    t: &SavedTensor,
    dtype: Dtype,
    shape: &[usize],
) -> Result<DType> {
    let dtype = peft::dtype_of(f, name, dtype)?;
    if shape != t.shape.as_slice() {
        return Err(Error::format(
            f,
            format!(
                "adapter/base shape mismatch for `{name}` (of a module saved whole, `modules_to_save`): base {shape:?}, adapter {:?} (a vocabulary resized for training needs a base resized the same way)",
                t.shape
            ),
        ));
    }
    Ok(dtype)
}

/// Merged (or unmerged) bytes of one weight, through the merge kernel on `device`, and the non-finite
/// counts of the merge (the same pass). A merge that makes finite elements NaN or ±Inf fails before
/// its result is downloaded, unless `options.allow_nonfinite`.
fn merge_weight<T: Element>(
    device: &Device,
    w: &[u8],
    layout: Layout,
    m: &AdapterModule,
    scale: f32,
    options: &MergeOptions,
) -> Result<(Vec<u8>, NonFiniteCounts)> {
    let (n, k) = (layout.n, layout.k);
    let w: Vec<T> = layout.to_linear(bytemuck::pod_collect_to_vec(w));
    // PEFT merges an embedding's plain LoRA as `W += delta.to(W.dtype)`: the delta rounded to W's dtype
    // before the add, two roundings where a linear layer's merge has one. The kernel merges into zeros
    // (giving round(±delta)), and the add is PyTorch's, f32 then rounded, on the host.
    let rounded_delta = m.embedding && m.magnitude.is_none();
    let mut wt = if rounded_delta {
        Tensor::zeros(device, &[n, k])?
    } else {
        Tensor::from_slice(device, &w, &[n, k])?
    };
    let r = m.a.rows;
    // Adapters in W's dtype are used as stored; any other dtype goes through f32 (exact for bf16/f16).
    // DoRA's magnitude as f32 (exact from bf16/f16), whatever the adapter's dtype
    let magnitude = match &m.magnitude {
        Some(v) => Some(Tensor::from_slice(device, &v.to_f32(), &[n])?),
        None => None,
    };
    let magnitude = magnitude.as_ref();
    let counts = if m.a.dtype == T::DTYPE && m.b.dtype == T::DTYPE && T::DTYPE != DType::F32 {
        let a: Vec<T> = bytemuck::pod_collect_to_vec(&m.a.bytes);
        let b: Vec<T> = bytemuck::pod_collect_to_vec(&m.b.bytes);
        let at = Tensor::from_slice(device, &a, &[r, k])?;
        let bt = Tensor::from_slice(device, &b, &[n, r])?;
        counted(&mut wt, &at, &bt, magnitude, scale, options.unmerge)?
    } else {
        let at = Tensor::from_slice(device, &m.a.to_f32(), &[r, k])?;
        let bt = Tensor::from_slice(device, &m.b.to_f32(), &[n, r])?;
        counted(&mut wt, &at, &bt, magnitude, scale, options.unmerge)?
    };
    let (merged, counts) = if rounded_delta {
        let delta = wt.to_vec()?;
        let mut counts = NonFiniteCounts::default();
        let merged: Vec<T> = w
            .iter()
            .zip(&delta)
            .map(|(&w, &d)| {
                let v = T::from_f32(w.to_f32() + d.to_f32());
                let (w64, v64) = (w.to_f64(), v.to_f64());
                if !w64.is_finite() {
                    counts.in_base += 1;
                } else if v64.is_nan() {
                    counts.nan += 1;
                } else if v64.is_infinite() {
                    counts.inf += 1;
                }
                v
            })
            .collect();
        (merged, counts)
    } else {
        (wt.to_vec()?, counts)
    };
    if counts.created() > 0 && !options.allow_nonfinite {
        let op = if options.unmerge { "unmerge" } else { "merge" };
        let target = format!("module `{}`", m.name);
        return Err(counts.error(op, target, n * k, T::DTYPE, "nothing was written"));
    }
    let merged = layout.to_stored(merged);
    Ok((bytemuck::cast_slice(&merged).to_vec(), counts))
}

/// A module's scale as the merge kernel takes it (f32, rounded once from PEFT's f64), after checking its
/// rank is one the kernels take and the scale is finite: errors naming the module, before any work.
fn module_scale(op: &'static str, adapter: &PeftAdapter, m: &AdapterModule) -> Result<f32> {
    let r = m.a.rows;
    if !(1..=crate::params::LK_MAX_RANK as usize).contains(&r) {
        return Err(Error::Unsupported {
            what: format!("module `{}` of rank {r}", m.name),
            hint: format!(
                "{op} takes LoRA ranks 1 to {} (the kernels' limit)",
                crate::params::LK_MAX_RANK
            ),
        });
    }
    let scale = adapter.config.scale_for(&m.name) as f32;
    if !scale.is_finite() {
        return Err(Error::InvalidState {
            op,
            message: format!(
                "module `{}`: scale {} (alpha {} over rank {r}) is not finite in f32",
                m.name,
                adapter.config.scale_for(&m.name),
                adapter.config.alpha_for(&m.name)
            ),
        });
    }
    Ok(scale)
}

/// How a targeted weight is stored: `[N, K]` (out × in) as `nn.Linear`'s, or `[K, N]` (in × out) as
/// GPT-2's `Conv1D` (PEFT's `fan_in_fan_out`), which the merge transposes on the host around the kernel
/// (a transposition moves elements, so the merged values are those of the `[N, K]` merge).
#[derive(Clone, Copy, Debug)]
struct Layout {
    n: usize,
    k: usize,
    transposed: bool,
}

impl Layout {
    /// The stored elements as `[N, K]`.
    fn to_linear<T: Copy>(self, stored: Vec<T>) -> Vec<T> {
        if self.transposed {
            transpose(&stored, self.k, self.n)
        } else {
            stored
        }
    }

    /// `[N, K]` elements as stored.
    fn to_stored<T: Copy>(self, linear: Vec<T>) -> Vec<T> {
        if self.transposed {
            transpose(&linear, self.n, self.k)
        } else {
            linear
        }
    }

    /// The stored index of element `at` of the `[N, K]` view.
    fn stored_index(self, at: usize) -> usize {
        if self.transposed {
            (at % self.k) * self.n + at / self.k
        } else {
            at
        }
    }
}

/// `v` (`rows` × `cols`, row-major) transposed: `cols` × `rows`.
fn transpose<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = Vec::with_capacity(v.len());
    for c in 0..cols {
        t.extend((0..rows).map(|r| v[r * cols + c]));
    }
    t
}

/// GPT-2's `Conv1D` layers in transformers (the Conv1D layers PEFT meets in practice).
const GPT2_CONV1D: [&str; 4] = ["c_attn", "c_proj", "c_fc", "q_attn"];

/// What decides the layout of a targeted weight whose shape cannot: a square one, `[N, N]` read either
/// way. (A non-square weight's layout is its shape, as PEFT decides it per layer from its type; an
/// embedding's is always in × out.) PEFT also decides a square layer's layout from its type, and saves
/// `fan_in_fan_out` as the last layer it wrapped needed, so the flag does not speak for every layer.
/// A square weight under one of GPT-2's Conv1D names is a Conv1D's inside a block whose `c_attn` is
/// stored `[in, 3·in]` (GPT-2), an nn.Linear's inside one whose `c_attn` is stored `[out, in]` with
/// out > in (Qwen-1, GPTBigCode), and refused elsewhere; a square weight of any other name is an
/// nn.Linear's in a GPT-2-style checkpoint (its Conv1D layers carry those names), else with the flag
/// off; with the flag on, or where a non-square weight shows the adapter mixes both kinds, refused.
#[derive(Clone, Debug)]
struct LayoutRule {
    fan_in_fan_out: bool,
    /// The modules that hold a GPT-2 Conv1D `c_attn` (`….c_attn.weight` stored `[in, 3·in]`), each
    /// with a trailing dot: a GPT-2 block's layers are under one of them.
    gpt2_blocks: Vec<String>,
    /// The same for an nn.Linear `c_attn` (stored `[out, in]`, out > in: Qwen-1, GPTBigCode).
    linear_blocks: Vec<String>,
    /// A non-square targeted weight stored the other way than the flag says (module, how it is stored):
    /// the adapter mixes Conv1D and nn.Linear layers.
    contradiction: Option<(String, &'static str)>,
}

impl LayoutRule {
    /// From every tensor's shape in the checkpoint (`shapes`, by name).
    fn new(adapter: &PeftAdapter, shapes: &BTreeMap<String, Vec<usize>>) -> Self {
        let fan_in_fan_out = adapter.config.fan_in_fan_out;
        // a c_attn's attention module and block (`h.0.attn.` and `h.0.` for `h.0.attn.c_attn`), never
        // the model's root or its top-level modules above the blocks
        let blocks = |conv1d: bool| {
            let mut blocks: Vec<String> = shapes
                .iter()
                .filter(|(name, s)| {
                    name.ends_with(".c_attn.weight")
                        && s.len() == 2
                        && if conv1d {
                            s[1] == 3 * s[0]
                        } else {
                            s[0] > s[1]
                        }
                })
                .flat_map(|(name, _)| {
                    let module = name.strip_suffix(".weight").unwrap_or(name);
                    let parts: Vec<&str> = module.split('.').collect();
                    (parts.len().saturating_sub(2).max(1)..parts.len())
                        .map(|i| format!("{}.", parts[..i].join(".")))
                        .collect::<Vec<_>>()
                })
                .collect();
            blocks.sort();
            blocks.dedup();
            blocks
        };
        let (gpt2_blocks, linear_blocks) = (blocks(true), blocks(false));
        let contradiction = adapter
            .modules
            .iter()
            .filter(|m| !m.embedding && m.a.cols != m.b.rows)
            .find_map(|m| {
                let shape = shapes.get(&format!("{}.weight", m.name))?;
                let transposed = shape.as_slice() == [m.a.cols, m.b.rows];
                (transposed != fan_in_fan_out).then(|| {
                    let how = if transposed {
                        "in × out (a Conv1D's)"
                    } else {
                        "out × in (an nn.Linear's)"
                    };
                    (m.name.clone(), how)
                })
            });
        LayoutRule {
            fan_in_fan_out,
            gpt2_blocks,
            linear_blocks,
            contradiction,
        }
    }

    /// Whether module `m`'s square weight is stored in × out.
    fn square_transposed(&self, f: &Path, m: &AdapterModule) -> Result<bool> {
        let (parent, last) = match m.name.rsplit_once('.') {
            Some((parent, last)) => (format!("{parent}."), last),
            None => (String::new(), m.name.as_str()),
        };
        let within = |blocks: &[String]| blocks.iter().any(|b| parent.starts_with(b.as_str()));
        if GPT2_CONV1D.contains(&last) {
            // the block's c_attn shows the layout: a Conv1D's stored [in, 3·in] (GPT-2), an
            // nn.Linear's stored [out, in] with out > in (Qwen-1, GPTBigCode); elsewhere (CLVP's
            // Conv1D MLP beside nn.Linear attention) the name says nothing
            if within(&self.gpt2_blocks) {
                return Ok(true);
            }
            if within(&self.linear_blocks) {
                return Ok(false);
            }
            return Err(Error::format(
                f,
                format!(
                    "module `{}` has a square weight, whose layout (a Conv1D's in × out or an nn.Linear's out × in) its shape cannot tell, and a name GPT-2's Conv1D layers have outside any block whose c_attn shows the layout; not merged",
                    m.name
                ),
            ));
        }
        if !self.gpt2_blocks.is_empty() {
            // a GPT-2-style model's Conv1D layers carry those names; its others are nn.Linear's (a
            // classifier's score, ImageGPT's lm_head)
            return Ok(false);
        }
        let why = match (&self.contradiction, self.fan_in_fan_out) {
            (None, false) => return Ok(false),
            (Some((other, how)), _) => format!(
                "the adapter mixes both kinds: `{other}` is stored {how}, against the config's fan_in_fan_out = {}, which PEFT saves as the last layer it wrapped needed",
                self.fan_in_fan_out
            ),
            (None, true) => "the config's fan_in_fan_out is set, but the checkpoint does not show this layer is a Conv1D (GPT-2's c_attn, c_proj, c_fc or q_attn in a block whose c_attn is stored [in, 3·in]); PEFT decides from the layer's type".to_string(),
        };
        Err(Error::format(
            f,
            format!(
                "module `{}` has a square weight, whose layout (a Conv1D's in × out or an nn.Linear's out × in) its shape cannot tell: {why}; not merged",
                m.name
            ),
        ))
    }
}

/// A tensor of the checkpoint, from its shard's header.
#[derive(Clone, Debug)]
struct BaseTensor {
    shape: Vec<usize>,
    dtype: Dtype,
    file: PathBuf,
}

/// Every tensor of the checkpoint, from the shards' headers.
fn base_tensors(files: &[PathBuf]) -> Result<BTreeMap<String, BaseTensor>> {
    let mut tensors = BTreeMap::new();
    for f in files {
        for (name, t) in read_header(f)?.tensors() {
            let base = BaseTensor {
                shape: t.shape.clone(),
                dtype: t.dtype,
                file: f.clone(),
            };
            tensors.insert(name, base);
        }
    }
    Ok(tensors)
}

/// The shapes of [`base_tensors`].
fn shapes(tensors: &BTreeMap<String, BaseTensor>) -> BTreeMap<String, Vec<usize>> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect()
}

/// The base weight of module `m` (in file `f`) is [N, K] for its A [r, K] and B [N, r] (an
/// nn.Linear's), or [K, N] (in × out: a Conv1D's, PEFT's `fan_in_fan_out`, or an embedding's); a
/// non-square weight's shape says which, a square one's `rule`. Returns its layout.
fn module_shape(f: &Path, m: &AdapterModule, shape: &[usize], rule: &LayoutRule) -> Result<Layout> {
    let magnitude_fits = |n: usize| m.magnitude.as_ref().is_none_or(|v| v.rows * v.cols == n);
    let (n, k) = (m.b.rows, m.a.cols);
    let fits = m.a.rows == m.b.cols && magnitude_fits(n);
    let transposed = match *shape {
        _ if !fits => None,
        [x, y] if m.embedding => (x == k && y == n).then_some(true),
        [x, y] if n != k => match (x == n && y == k, x == k && y == n) {
            (true, _) => Some(false),
            (_, true) => Some(true),
            _ => None,
        },
        [x, y] if x == n && y == n => Some(rule.square_transposed(f, m)?),
        _ => None,
    };
    match transposed {
        Some(transposed) => Ok(Layout { n, k, transposed }),
        None => {
            let magnitude = match &m.magnitude {
                Some(v) => format!(", DoRA magnitude {} elements", v.rows * v.cols),
                None => String::new(),
            };
            Err(Error::format(
                f,
                format!(
                    "adapter/base shape mismatch for `{}`: base weight {:?}, lora_A {}×{}, lora_B {}×{}{magnitude} (expected W {}, A [r, K], B [N, r]{})",
                    m.name,
                    shape,
                    m.a.rows,
                    m.a.cols,
                    m.b.rows,
                    m.b.cols,
                    if m.embedding {
                        "[K, N] (an embedding's: vocabulary × dim, with lora_embedding_A [r, K] and lora_embedding_B [N, r])"
                    } else {
                        "[N, K] (an nn.Linear's) or [K, N] (a Conv1D's, PEFT's fan_in_fan_out)"
                    },
                    if m.magnitude.is_some() {
                        ", magnitude [N]"
                    } else {
                        ""
                    }
                ),
            ))
        }
    }
}

/// `out` would replace the base checkpoint file `base`, or what reading `base` gives: it names the same
/// directory entry (however the paths are spelled: `./m.safetensors` and `m.safetensors`, a symlinked
/// directory on the way), the entry of a symlink `base` goes through, or the file itself under another
/// name (a hard link, or another case on a case-insensitive file system). Paths that do not resolve (an
/// `out` in a directory that does not exist) are not the base.
fn replaces_base(base: &Path, out: &Path) -> bool {
    // the directory entry a path names: its parent resolved, then its own name (not followed)
    let entry = |p: &Path| -> Option<PathBuf> {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(parent).ok()?.join(p.file_name()?))
    };
    let Some(out_entry) = entry(out) else {
        return false;
    };
    // base's entry, then each entry its symlinks lead through, to the file (at most 40 links, as Linux)
    let mut p = base.to_path_buf();
    for _ in 0..40 {
        if entry(&p).as_ref() == Some(&out_entry) {
            return true;
        }
        let Ok(target) = std::fs::read_link(&p) else {
            break;
        };
        p = match p.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(o), Ok(b)) = (std::fs::symlink_metadata(out), std::fs::metadata(base)) {
            return o.file_type().is_file() && (o.dev(), o.ino()) == (b.dev(), b.ino());
        }
    }
    false
}

/// Merges `adapter` into the checkpoint `base` (file or directory) and writes `out` (a file for a
/// file base, a new directory for a directory base). `progress` hears about each merged module.
/// Refuses a merge that would make finite elements NaN or ±Inf ([`Error::NonFiniteMerge`], nothing
/// written); [`merge_checkpoint_with`] can allow it.
pub fn merge_checkpoint(
    base: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    device: &Device,
    unmerge: bool,
    progress: &mut dyn Progress,
) -> Result<MergeSummary> {
    let options = MergeOptions {
        unmerge,
        ..MergeOptions::default()
    };
    merge_checkpoint_with(base, adapter, out, device, &options, progress)
}

/// [`merge_checkpoint`] with [`MergeOptions`].
pub fn merge_checkpoint_with(
    base: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    device: &Device,
    options: &MergeOptions,
    progress: &mut dyn Progress,
) -> Result<MergeSummary> {
    let (files, index) = shards(base)?;
    let out_is_dir = index.is_some() || base.is_dir();
    if out_is_dir && out.exists() {
        return Err(Error::format(
            out,
            "already exists; the merged checkpoint is written to a new directory",
        ));
    }
    if !out_is_dir && replaces_base(base, out) {
        return Err(Error::format(
            out,
            format!(
                "is the base checkpoint {} (another spelling of its path): the base is never modified; write the merge elsewhere",
                base.display()
            ),
        ));
    }
    let by_weight: BTreeMap<String, &AdapterModule> = adapter
        .modules
        .iter()
        .map(|m| (format!("{}.weight", m.name), m))
        .collect();

    // Pass 1, from the shards' headers: validate everything (every module's rank and scale, every
    // module found, shapes and dtypes agree) before writing. The data is read shard by shard in pass 2.
    let op = if options.unmerge { "unmerge" } else { "merge" };
    dora_consistent(adapter)?;
    let by_saved = saved_by_name(adapter)?;
    if options.unmerge {
        dora_unmerge_refused(adapter, "an unmerge")?;
        saved_unmerge_refused(adapter, "an unmerge")?;
    }
    for m in by_weight.values() {
        module_scale(op, adapter, m)?;
    }
    let tensors = base_tensors(&files)?;
    let rule = LayoutRule::new(adapter, &shapes(&tensors));
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut weight_bytes = 0u64;
    for f in &files {
        let header = read_header(f)?;
        // in name order: the first error found is the same on every run
        let tensors: BTreeMap<String, _> = header.tensors().into_iter().collect();
        for (name, t) in tensors {
            if let Some(saved) = by_saved.get(&name) {
                saved_fits(f, &name, saved, t.dtype, &t.shape)?;
                found.insert(name.clone(), f.clone());
                continue;
            }
            let Some(m) = by_weight.get(&name) else {
                // a tensor of a module saved whole that the adapter lacks: half the module would be
                // replaced (PEFT's load fails on it)
                if adapter.config.saved_whole(&name) {
                    return Err(Error::format(
                        f,
                        format!(
                            "tensor `{name}` is in a module the adapter saves whole (`modules_to_save`: {:?}) but the adapter does not hold it (PEFT's load of the adapter onto this base fails on it too)",
                            adapter.config.modules_to_save
                        ),
                    ));
                }
                continue;
            };
            peft::dtype_of(f, &name, t.dtype)?;
            // first: a resized vocabulary shows in the saved base weight, with its own message
            saved_base_fits(f, &name, m, &t.shape)?;
            module_shape(f, m, &t.shape, &rule)?;
            found.insert(name.clone(), f.clone());
            weight_bytes += (t.data_offsets.1 - t.data_offsets.0) as u64;
        }
    }
    if let Some(missing) = by_weight.keys().find(|w| !found.contains_key(*w)) {
        return Err(Error::format(
            base,
            format!(
                "target module `{}` is missing from the base checkpoint (no tensor `{missing}`){}",
                by_weight[missing].name,
                if missing.ends_with("lm_head.weight") {
                    ": an lm_head tied to the embeddings is stored once, under the embeddings' name, and PEFT merges its LoRA into that shared weight; not supported"
                } else {
                    ""
                }
            ),
        ));
    }
    saved_all_found(base, &by_saved, |name| found.contains_key(name))?;
    tied_copies_refused(base, adapter, &tensors)?;

    // Pass 2: merge and write to temporary names.
    let work_dir = if out_is_dir {
        let tmp = temp_sibling(out);
        // a new directory (never one left by another run): create_dir fails if it exists
        std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
        Some(tmp)
    } else {
        None
    };
    let result = (|| -> Result<MergeSummary> {
        let mut summary = MergeSummary::default();
        progress.start(by_weight.len(), weight_bytes);
        for f in &files {
            let bytes = std::fs::read(f).map_err(Error::io(f))?;
            let st = parse(f, &bytes)?;
            let meta = metadata(f, &bytes)?;
            let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
            names.sort();
            let mut merged: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for name in &names {
                if let Some(saved) = by_saved.get(name) {
                    let t = st
                        .tensor(name)
                        .map_err(|e| Error::format(f, e.to_string()))?;
                    let dtype = saved_fits(f, name, saved, t.dtype(), t.shape())?;
                    let data = saved.bytes_as(dtype);
                    let counts = replaced_counts(t.data(), &data, dtype);
                    if counts.created() > 0 && !options.allow_nonfinite {
                        let target = format!("tensor `{name}` of a module saved whole");
                        let elements = data.len() / dtype.size_of();
                        return Err(counts.error(
                            op,
                            target,
                            elements,
                            dtype,
                            "nothing was written",
                        ));
                    }
                    if counts != NonFiniteCounts::default() {
                        summary.nonfinite.push((name.clone(), counts));
                    }
                    merged.insert(name.clone(), data);
                    summary.tensors_replaced += 1;
                    continue;
                }
                let Some(m) = by_weight.get(name) else {
                    continue;
                };
                let t = st
                    .tensor(name)
                    .map_err(|e| Error::format(f, e.to_string()))?;
                let shape = module_shape(f, m, t.shape(), &rule)?;
                let scale = module_scale(op, adapter, m)?;
                let dtype = peft::dtype_of(f, name, t.dtype())?;
                let w = merge_base(f, name, m, t.shape(), dtype, options.unmerge, t.data())?;
                let (data, counts) = match dtype {
                    DType::BF16 => {
                        merge_weight::<half::bf16>(device, &w, shape, m, scale, options)?
                    }
                    DType::F16 => merge_weight::<half::f16>(device, &w, shape, m, scale, options)?,
                    DType::F32 => merge_weight::<f32>(device, &w, shape, m, scale, options)?,
                    DType::U32 => unreachable_dtype(f, name)?,
                };
                if counts != NonFiniteCounts::default() {
                    summary.nonfinite.push((m.name.clone(), counts));
                }
                merged.insert(name.clone(), data);
                summary.modules_merged += 1;
                progress.module_done(&m.name, t.data().len() as u64);
            }
            let mut views = Vec::new();
            for name in &names {
                let t = st
                    .tensor(name)
                    .map_err(|e| Error::format(f, e.to_string()))?;
                let data: &[u8] = match merged.get(name) {
                    Some(d) => d,
                    None => {
                        summary.tensors_copied += 1;
                        t.data()
                    }
                };
                let view = TensorView::new(t.dtype(), t.shape().to_vec(), data)
                    .map_err(|e| Error::format(f, e.to_string()))?;
                views.push((name.clone(), view));
            }
            let out_bytes = safetensors::serialize(views, meta)
                .map_err(|e| Error::format(f, format!("serialising: {e}")))?;
            let target = match &work_dir {
                Some(dir) => dir.join(f.file_name().expect("a shard has a file name")),
                None => out.to_path_buf(),
            };
            write_atomic(&target, &out_bytes)?;
            summary.files_written += 1;
            summary.bytes_written += out_bytes.len() as u64;
        }
        if let (Some(index), Some(dir)) = (&index, &work_dir) {
            std::fs::copy(index, dir.join(INDEX)).map_err(Error::io(index))?;
            summary.files_written += 1;
        }
        Ok(summary)
    })();
    match (&result, &work_dir) {
        (Ok(_), Some(dir)) => {
            // `out` may have appeared meanwhile: then the merged shards go, as on any failure
            if let Err(e) = std::fs::rename(dir, out) {
                let _ = std::fs::remove_dir_all(dir);
                return Err(Error::io(out)(e));
            }
        }
        (Err(_), Some(dir)) => {
            let _ = std::fs::remove_dir_all(dir);
        }
        _ => {}
    }
    result
}

/// What [`verify_merge`] found.
///
/// The exact value of a merged element is `x = W + s·Σⱼ Bᵢⱼ·Aⱼₖ` (unmerge: `W − s·…`), computed in
/// f64 from the base, the adapter and its scale. One rounding of it is `round(x)`, to nearest (even)
/// in the output dtype: within half an ulp of `x`. The merge kernel gets there through f32
/// intermediates (`kernels/merge.cu`: the sum over the rank in f32, `round_f32(s·acc)`,
/// `round_f32(W + d)`, then the rounding to W's dtype), that is, it rounds to nearest a value within
/// `e = 2⁻²³·(|W| + (r + 3)·|s|·Σⱼ |Bᵢⱼ·Aⱼₖ|)` of `x` (twice the first-order bound of their error).
/// So a merged element is *within one rounding* when it lies between `round(x − e)` and `round(x + e)`:
/// `round(x)` itself wherever `x` is not within `e` of a half-way point between two values of the
/// dtype (almost everywhere in bf16 and f16), or the other value next to `x` where the f32
/// intermediates can tip the rounding (`x` next to a half-way point, `W` and `s·B·A` cancelling, or
/// an f32 output, whose ulp is of the order of `e`). A merge by the kernel has no element off, in any
/// dtype; a wrong scale, a wrong or missing module, a corrupted value are off. An embedding's plain
/// LoRA is checked against PEFT's arithmetic instead, `round(W + round(s·B·A))` (its delta rounded to
/// the dtype before the add: two roundings), with the f32 error of the delta around each rounding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifySummary {
    /// Merged elements checked (with the elements of tensors saved whole that replaced the base's,
    /// each of which must be the saved value rounded to nearest in the output dtype).
    pub elements: u64,
    /// Elements equal to `round(x)`, the exact value rounded to nearest (even) in the output dtype.
    pub correctly_rounded: u64,
    /// Elements off by more than one rounding (a NaN where `x` is not NaN counts as off).
    pub off: u64,
    /// The largest distance from `round(x)`, in ulps of the output dtype.
    pub max_ulp: u64,
    /// Of the elements off, the one farthest from `round(x)`.
    pub worst: Option<OffElement>,
}

/// A merged element off by more than one rounding.
#[derive(Clone, Debug, PartialEq)]
pub struct OffElement {
    /// The tensor (`….weight`).
    pub tensor: String,
    /// Row-major index in it.
    pub index: usize,
    pub merged: f64,
    /// `x`, the exact value.
    pub exact: f64,
    /// Distance from `round(x)` in ulps of the dtype.
    pub ulp: u64,
}

impl VerifySummary {
    /// Counts one checked element, `ulp` from its reference rounded to nearest: `rounded` (equal to
    /// it), `ok` (within its bound); one not ok and the farthest so far is the worst (`element`, made
    /// only then).
    fn count(&mut self, rounded: bool, ok: bool, ulp: u64, element: impl FnOnce() -> OffElement) {
        self.elements += 1;
        self.correctly_rounded += rounded as u64;
        if !ok {
            self.off += 1;
            if self.worst.as_ref().is_none_or(|o| ulp > o.ulp) {
                self.worst = Some(element());
            }
        }
        self.max_ulp = self.max_ulp.max(ulp);
    }

    fn add(&mut self, o: VerifySummary) {
        self.elements += o.elements;
        self.correctly_rounded += o.correctly_rounded;
        self.off += o.off;
        let worse = match (&self.worst, &o.worst) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(a), Some(b)) => b.ulp > a.ulp,
        };
        if worse {
            self.worst = o.worst;
        }
        self.max_ulp = self.max_ulp.max(o.max_ulp);
    }
}

/// How a weight was merged, for [`verify_weight`].
#[derive(Clone, Copy, Debug)]
enum Merge<'a> {
    /// `round(W ± s·B·A)`, the f32 arithmetic of the merge kernel.
    Plain,
    /// DoRA, with these magnitudes: `round(factor·(W + s·B·A))`.
    Dora(&'a [f64]),
    /// PEFT's merge of an embedding's plain LoRA: `round(W ± round(s·B·A))`, the delta rounded to W's
    /// dtype first (through its f32 value), then the add in f32, rounded.
    RoundedDelta,
}

/// Checks one merged weight against the exact merge ([`VerifySummary`]), row by row (N×K f64 is
/// never materialised).
#[allow(clippy::too_many_arguments)]
fn verify_weight<T: Element>(
    name: &str,
    w: &[u8],
    merged: &[u8],
    a: &[f64],
    b: &[f64],
    (n, k, r): (usize, usize, usize),
    scale: f64,
    merge: Merge<'_>,
) -> VerifySummary {
    let w: Vec<T> = bytemuck::pod_collect_to_vec(w);
    let merged: Vec<T> = bytemuck::pod_collect_to_vec(merged);
    let mut s = VerifySummary::default();
    let (mut ba, mut magnitude) = (vec![0f64; k], vec![0f64; k]);
    let f32_error = 2f64.powi(-23);
    let lora_error = |w0: f64, c: usize, magnitude: &[f64]| {
        f32_error * (w0.abs() + (r + 3) as f64 * scale.abs() * magnitude[c])
    };
    for i in 0..n {
        // (B·A)[i, :] with j ascending, then scaled: the same f64 sums as `reference::delta`.
        ba.fill(0.0);
        magnitude.fill(0.0);
        for j in 0..r {
            let bij = b[i * r + j];
            let row = &a[j * k..(j + 1) * k];
            for ((acc, mag), &ajc) in ba.iter_mut().zip(magnitude.iter_mut()).zip(row) {
                *acc += bij * ajc;
                *mag += (bij * ajc).abs();
            }
        }
        // DoRA: x = factor·v with v the LoRA merge and factor = m / ‖v‖ of the row; the kernel's
        // factor is off by the norm of the row's errors of v relative to ‖v‖, plus the f32 roundings
        // of its sums of squares (8 per thread, 4 levels of tree), sqrt, division and product (each
        // doubled, as e)
        let (factor, factor_error) = match merge {
            Merge::Plain | Merge::RoundedDelta => (1.0, 0.0),
            Merge::Dora(m) => {
                let (mut norm2, mut err2) = (0.0f64, 0.0f64);
                for (c, (wc, bac)) in w[i * k..(i + 1) * k].iter().zip(&ba).enumerate() {
                    let w0 = wc.to_f64();
                    norm2 += (w0 + scale * bac).powi(2);
                    err2 += lora_error(w0, c, &magnitude).powi(2);
                }
                let norm = norm2.sqrt();
                (m[i] / norm, (err2.sqrt() / norm) + 16.0 * f32_error)
            }
        };
        for (c, &bac) in ba.iter().enumerate() {
            let at = i * k + c;
            let w0 = w[at].to_f64();
            let v = w0 + scale * bac;
            // the value a merge gives without the f32 error: an embedding's, PEFT's two roundings
            let x = match merge {
                Merge::RoundedDelta => w0 + T::from_f64(scale * bac).to_f64(),
                _ => factor * v,
            };
            let e = factor.abs() * lora_error(w0, c, &magnitude) + x.abs() * factor_error;
            let got = merged[at];
            let g = got.to_f64();
            let dist = if x.is_nan() && g.is_nan() {
                0
            } else {
                crate::reference::ulp_distance(got, T::from_f64(x))
            };
            let ok = if g.is_nan() || x.is_nan() {
                g.is_nan() && x.is_nan()
            } else if x.is_infinite() {
                // an Inf in the base (or in the adapter): e is infinite too, only x itself is right
                g == x
            } else if let Merge::RoundedDelta = merge {
                // the delta's f32 error, its rounding to T (monotone), then the f32 add rounded to T
                let (d, ed) = (scale * bac, lora_error(0.0, c, &magnitude));
                let lo = w0 + T::from_f64(d - ed).to_f64();
                let hi = w0 + T::from_f64(d + ed).to_f64();
                let (lo, hi) = (lo - f32_error * lo.abs(), hi + f32_error * hi.abs());
                T::from_f64(lo).to_f64() <= g && g <= T::from_f64(hi).to_f64()
            } else {
                T::from_f64(x - e).to_f64() <= g && g <= T::from_f64(x + e).to_f64()
            };
            s.count(dist == 0, ok, dist, || OffElement {
                tensor: name.to_string(),
                index: at,
                merged: g,
                exact: x,
                ulp: dist,
            });
        }
    }
    s
}

/// [`verify_weight`] of a weight stored as `layout` says: a Conv1D's `[K, N]` is checked as its
/// transpose, and the element reported off is given by its index in the stored tensor.
#[allow(clippy::too_many_arguments)]
fn verify_stored<T: Element>(
    name: &str,
    w: &[u8],
    merged: &[u8],
    a: &[f64],
    b: &[f64],
    (layout, r): (Layout, usize),
    scale: f64,
    merge: Merge<'_>,
) -> VerifySummary {
    let dims = (layout.n, layout.k, r);
    if !layout.transposed {
        return verify_weight::<T>(name, w, merged, a, b, dims, scale, merge);
    }
    let w: Vec<T> = layout.to_linear(bytemuck::pod_collect_to_vec(w));
    let merged: Vec<T> = layout.to_linear(bytemuck::pod_collect_to_vec(merged));
    let (w, merged) = (bytemuck::cast_slice(&w), bytemuck::cast_slice(&merged));
    let mut s = verify_weight::<T>(name, w, merged, a, b, dims, scale, merge);
    if let Some(o) = &mut s.worst {
        o.index = layout.stored_index(o.index);
    }
    s
}

/// Checks a tensor that replaced the base's ([`SavedTensor`]): each element is the saved one rounded
/// to nearest in the output dtype (the value itself when the dtypes agree); NaN where it is NaN.
fn verify_replaced<T: Element>(name: &str, got: &[u8], saved: &SavedTensor) -> VerifySummary {
    let got: Vec<T> = bytemuck::pod_collect_to_vec(got);
    let mut s = VerifySummary::default();
    for (at, (&g, x)) in got.iter().zip(saved.to_f32()).enumerate() {
        let want = T::from_f64(x as f64);
        let (gf, x) = (g.to_f64(), x as f64);
        let ok = if gf.is_nan() || x.is_nan() {
            gf.is_nan() && x.is_nan()
        } else {
            // bits, not ==: -0 in place of +0 is off
            gf.to_bits() == want.to_f64().to_bits()
        };
        let dist = if gf.is_nan() && x.is_nan() {
            0
        } else {
            crate::reference::ulp_distance(g, want)
        };
        s.count(ok, ok, dist, || OffElement {
            tensor: name.to_string(),
            index: at,
            merged: gf,
            exact: x,
            ulp: dist,
        });
    }
    s
}

/// Checks a merge written by [`merge_checkpoint`] (same `base`, `adapter`, `out`, `unmerge`) on the
/// CPU: reads every merged weight back from `out`, computes the exact `W ± s·B·A` in f64 from the base
/// and the adapter, and counts the elements off by more than one rounding ([`VerifySummary`]); the
/// tensors of modules saved whole must hold the adapter's values (rounded to the base's dtype). Costs
/// one pass over the base and the output, `N·K·r` multiply-adds in f64 per module. `progress` hears
/// about each checked LoRA module.
pub fn verify_merge(
    base: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    unmerge: bool,
    progress: &mut dyn Progress,
) -> Result<VerifySummary> {
    dora_consistent(adapter)?;
    let by_saved = saved_by_name(adapter)?;
    if unmerge {
        dora_unmerge_refused(adapter, "verifying an unmerge")?;
        saved_unmerge_refused(adapter, "verifying an unmerge")?;
    }
    let (files, index) = shards(base)?;
    let out_is_dir = index.is_some() || base.is_dir();
    let by_weight: BTreeMap<String, &AdapterModule> = adapter
        .modules
        .iter()
        .map(|m| (format!("{}.weight", m.name), m))
        .collect();
    let mut bytes_total = 0u64;
    for f in &files {
        bytes_total += header_bytes(f, |name| by_weight.contains_key(name))?;
    }
    let rule = LayoutRule::new(adapter, &shapes(&base_tensors(&files)?));
    progress.start(by_weight.len(), bytes_total);
    let mut summary = VerifySummary::default();
    let mut saved_seen = std::collections::BTreeSet::new();
    for f in &files {
        let out_file = if out_is_dir {
            out.join(f.file_name().expect("a shard has a file name"))
        } else {
            out.to_path_buf()
        };
        let base_bytes = std::fs::read(f).map_err(Error::io(f))?;
        let out_bytes = std::fs::read(&out_file).map_err(Error::io(&out_file))?;
        let (bst, ost) = (parse(f, &base_bytes)?, parse(&out_file, &out_bytes)?);
        let mut names: Vec<String> = bst.names().into_iter().map(String::from).collect();
        names.sort();
        for name in &names {
            let (m, saved) = (by_weight.get(name), by_saved.get(name));
            if m.is_none() && saved.is_none() {
                continue;
            }
            let w = bst
                .tensor(name)
                .map_err(|e| Error::format(f, e.to_string()))?;
            let got = ost.tensor(name).map_err(|e| {
                Error::format(&out_file, format!("merged tensor `{name}` unreadable: {e}"))
            })?;
            if got.dtype() != w.dtype() || got.shape() != w.shape() {
                return Err(Error::format(
                    &out_file,
                    format!(
                        "`{name}` is {:?} {:?} in the output but {:?} {:?} in the base",
                        got.dtype(),
                        got.shape(),
                        w.dtype(),
                        w.shape()
                    ),
                ));
            }
            let Some(m) = m else {
                let saved = saved.expect("a module's weight or a tensor saved whole");
                saved_seen.insert(name.clone());
                let dtype = saved_fits(f, name, saved, w.dtype(), w.shape())?;
                summary.add(match dtype {
                    DType::BF16 => verify_replaced::<half::bf16>(name, got.data(), saved),
                    DType::F16 => verify_replaced::<half::f16>(name, got.data(), saved),
                    DType::F32 => verify_replaced::<f32>(name, got.data(), saved),
                    DType::U32 => unreachable_dtype(f, name)?,
                });
                continue;
            };
            let layout = module_shape(f, m, w.shape(), &rule)?;
            let dims = (layout, m.a.rows);
            let a: Vec<f64> = m.a.to_f32().iter().map(|&v| v as f64).collect();
            let b: Vec<f64> = m.b.to_f32().iter().map(|&v| v as f64).collect();
            let s = adapter.config.scale_for(&m.name);
            let scale = if unmerge { -s } else { s };
            let mag: Option<Vec<f64>> = m
                .magnitude
                .as_ref()
                .map(|v| v.to_f32().iter().map(|&x| x as f64).collect());
            let dora = match &mag {
                Some(m) => Merge::Dora(m),
                None if m.embedding => Merge::RoundedDelta,
                None => Merge::Plain,
            };
            let dtype = peft::dtype_of(f, name, w.dtype())?;
            let wd = merge_base(f, name, m, w.shape(), dtype, unmerge, w.data())?;
            let (wd, gd) = (&*wd, got.data());
            summary.add(match peft::dtype_of(f, name, w.dtype())? {
                DType::BF16 => verify_stored::<half::bf16>(name, wd, gd, &a, &b, dims, scale, dora),
                DType::F16 => verify_stored::<half::f16>(name, wd, gd, &a, &b, dims, scale, dora),
                DType::F32 => verify_stored::<f32>(name, wd, gd, &a, &b, dims, scale, dora),
                DType::U32 => unreachable_dtype(f, name)?,
            });
            progress.module_done(&m.name, wd.len() as u64);
        }
    }
    saved_all_found(base, &by_saved, |name| saved_seen.contains(name))?;
    Ok(summary)
}

/// `peft::dtype_of` only returns float dtypes; this keeps the matches on it exhaustive without a panic.
fn unreachable_dtype<R>(path: &std::path::Path, name: &str) -> Result<R> {
    Err(Error::format(
        path,
        format!("tensor `{name}` is not a float tensor"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// One bf16 element: W, and s·B·A = 2·b·a, against a merged value.
    fn check(w: f64, (b, a): (f64, f64), merged: f64) -> VerifySummary {
        let w = [bf16::from_f64(w)];
        let got = [bf16::from_f64(merged)];
        assert_eq!(got[0].to_f64(), merged, "test values are bf16");
        verify_weight::<bf16>(
            "w",
            bytemuck::cast_slice(&w),
            bytemuck::cast_slice(&got),
            &[a],
            &[b],
            (1, 1, 1),
            2.0,
            Merge::Plain,
        )
    }

    #[test]
    fn one_rounding_is_round_to_nearest_up_to_the_f32_error() {
        // W = 1, s·B·A = 0.3 ulp (bf16's ulp at 1 is 2⁻⁷): x = 1 + 0.3·2⁻⁷, round(x) = 1
        let ulp = 2f64.powi(-7);
        let ba = (0.5, 0.3 * ulp);
        let s = check(1.0, ba, 1.0);
        assert_eq!(
            (s.elements, s.correctly_rounded, s.off, s.max_ulp),
            (1, 1, 0, 0)
        );
        // the other value enclosing x, or the one below 1: off, 1 ulp from round(x)
        for wrong in [1.0 + ulp, 1.0 - ulp / 2.0] {
            let s = check(1.0, ba, wrong);
            assert_eq!(
                (s.correctly_rounded, s.off, s.max_ulp),
                (0, 1, 1),
                "{wrong}"
            );
            let worst = s.worst.unwrap();
            assert_eq!(
                (worst.merged, worst.exact, worst.ulp),
                (wrong, 1.0 + 0.3 * ulp, 1)
            );
        }
        let s = check(1.0, ba, 1.0 + 2.0 * ulp);
        assert_eq!((s.off, s.max_ulp), (1, 2));
        // x representable: only x
        assert_eq!(check(1.0, (0.5, ulp), 1.0 + ulp).correctly_rounded, 1);
        assert_eq!(check(1.0, (0.5, ulp), 1.0).off, 1);
        // x a hair (2⁻²⁶, below the f32 error) above the half-way point 1 + ulp/2: round(x) = 1 + ulp,
        // and 1 (the even neighbour, where the f32 sum rounding down to the half-way point leads)
        let ba = (0.5, ulp / 2.0 + 2f64.powi(-26));
        assert_eq!(check(1.0, ba, 1.0 + ulp).correctly_rounded, 1);
        let s = check(1.0, ba, 1.0);
        assert_eq!((s.correctly_rounded, s.off), (0, 0));
        assert_eq!(check(1.0, ba, 1.0 + 2.0 * ulp).off, 1);
        // around zero: x = 2⁻¹⁴⁰ rounds to 0 (bf16's least subnormal is 2⁻¹³³)
        let tiny = (0.5, 2f64.powi(-140));
        assert_eq!(check(0.0, tiny, 0.0).off, 0);
        assert_eq!(check(0.0, tiny, 2f64.powi(-133)).off, 1);
    }

    #[test]
    fn cancellation_is_judged_with_the_f32_error_of_the_terms() {
        // W = 1 and s·B·A = −(1 − 2⁻³⁰): x = 2⁻³⁰, the kernel's f32 terms carry errors of ~2⁻²⁴,
        // so anything that rounds from within e = 2⁻²³·(1 + 4·(1 − 2⁻³⁰)) ≈ 5·2⁻²³ of x passes.
        let ba = (-0.5, 1.0 - 2f64.powi(-30));
        let u = 2f64.powi(-23);
        for ok in [2f64.powi(-30), 0.0, 4.0 * u, -5.0 * u, 5.0 * u] {
            assert_eq!(check(1.0, ba, ok).off, 0, "{ok:e}");
        }
        for off in [6.0 * u, -6.0 * u] {
            assert_eq!(check(1.0, ba, off).off, 1, "{off:e}");
        }
    }

    #[test]
    fn exact_values_match_the_reference_merge() {
        let (n, k, r) = (5, 7, 3);
        let val = |i: usize, m: f64| bf16::from_f64(((i * 37 % 11) as f64 - 5.0) * m);
        let w: Vec<bf16> = (0..n * k).map(|i| val(i, 0.37)).collect();
        let a: Vec<bf16> = (0..r * k).map(|i| val(i + 3, 0.011)).collect();
        let b: Vec<bf16> = (0..n * r).map(|i| val(i + 7, 0.013)).collect();
        let f = |v: &[bf16]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };
        for scale in [2.0, -0.7] {
            let want = crate::reference::merge(&w, &a, &b, n, k, r, scale);
            let s = verify_weight::<bf16>(
                "w",
                bytemuck::cast_slice(&w),
                bytemuck::cast_slice(&want),
                &f(&a),
                &f(&b),
                (n, k, r),
                scale,
                Merge::Plain,
            );
            assert_eq!((s.elements, s.correctly_rounded, s.off), (35, 35, 0));
        }
    }

    /// Square weights: GPT-2's Conv1D names are a Conv1D's inside a block whose c_attn is stored
    /// [in, 3·in] (not an nn.Linear `c_proj` under another top-level module), an nn.Linear's inside one
    /// whose c_attn is stored [out, in] (Qwen-1), and refused elsewhere (CLVP's Conv1D MLP has no
    /// c_attn); other names are nn.Linear's in a GPT-2-style checkpoint whatever the flag (a square
    /// classifier `score`), and elsewhere with the flag off only.
    #[test]
    fn square_weights_follow_the_blocks_the_checkpoint_shows() {
        let module = |name: &str| AdapterModule {
            name: name.into(),
            a: peft::HostMatrix::from_f32(4, 64, &[0.0; 256]),
            b: peft::HostMatrix::from_f32(64, 4, &[0.0; 256]),
            magnitude: None,
            embedding: false,
            base_weight: None,
        };
        let rule = |flag: bool, names: &[&str], c_attn: &[(&str, [usize; 2])]| {
            let text = format!(
                r#"{{"r": 4, "lora_alpha": 8, "target_modules": ["x"], "fan_in_fan_out": {flag}}}"#
            );
            let config = peft::AdapterConfig::parse(&text, Path::new("c.json")).unwrap();
            let adapter = PeftAdapter {
                config,
                modules: names.iter().map(|n| module(n)).collect(),
                modules_to_save: Vec::new(),
            };
            let mut shapes = BTreeMap::new();
            for (n, s) in c_attn {
                shapes.insert(n.to_string(), s.to_vec());
            }
            for n in names {
                shapes.insert(format!("{n}.weight"), vec![64, 64]);
            }
            (LayoutRule::new(&adapter, &shapes), adapter)
        };
        let f = Path::new("base.safetensors");
        let gpt2 = [("model.gpt.h.0.attn.c_attn.weight", [64, 192])];
        let qwen = [("qwen.h.0.attn.c_attn.weight", [192, 64])];
        for flag in [false, true] {
            // (module, checkpoint's c_attn, Some(transposed) or None: refused)
            type Case<'a> = (&'a str, &'a [(&'a str, [usize; 2])], Option<bool>);
            let cases: [Case; 7] = [
                ("model.gpt.h.0.attn.c_proj", &gpt2, Some(true)),
                ("model.gpt.h.0.mlp.c_fc", &gpt2, Some(true)),
                ("model.head.c_proj", &gpt2, None),
                ("model.score", &gpt2, Some(false)),
                ("qwen.h.0.attn.c_proj", &qwen, Some(false)),
                ("decoder.mlp.c_fc", &[], None),
                ("model.layers.0.q_proj", &[], (!flag).then_some(false)),
            ];
            for (name, c_attn, want) in cases {
                let (rule, adapter) = rule(flag, &[name], c_attn);
                let got = module_shape(f, &adapter.modules[0], &[64, 64], &rule);
                match (want, got) {
                    (Some(t), Ok(l)) => assert_eq!(l.transposed, t, "flag {flag}, {name}"),
                    (None, Err(e)) => {
                        assert!(e.to_string().contains("its shape cannot tell"), "{e}")
                    }
                    (want, got) => panic!("flag {flag}, {name}: want {want:?}, got {got:?}"),
                }
            }
        }
    }

    /// DoRA: the exact reference merge is within one rounding, a magnitude 1 % off is not.
    #[test]
    fn dora_values_match_the_reference_merge() {
        let (n, k, r) = (5, 7, 3);
        let val = |i: usize, m: f64| bf16::from_f64(((i * 37 % 11) as f64 - 5.0) * m);
        let w: Vec<bf16> = (0..n * k).map(|i| val(i, 0.37)).collect();
        let a: Vec<bf16> = (0..r * k).map(|i| val(i + 3, 0.011)).collect();
        let b: Vec<bf16> = (0..n * r).map(|i| val(i + 7, 0.013)).collect();
        let m: Vec<f32> = (0..n).map(|i| 1.0 + 0.3 * i as f32).collect();
        let f = |v: &[bf16]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };
        let m64: Vec<f64> = m.iter().map(|&x| x as f64).collect();
        // the merge with magnitude `merged_with`, checked against `m`
        let run = |merged_with: &[f32], scale: f64| {
            let (got, _) = crate::reference::dora_merge(&w, &a, &b, merged_with, n, k, r, scale);
            verify_weight::<bf16>(
                "w",
                bytemuck::cast_slice(&w),
                bytemuck::cast_slice(&got),
                &f(&a),
                &f(&b),
                (n, k, r),
                scale,
                Merge::Dora(&m64),
            )
        };
        let bigger: Vec<f32> = m.iter().map(|x| x * 1.01).collect();
        for scale in [2.0, -0.7] {
            let s = run(&m, scale);
            assert_eq!((s.elements, s.correctly_rounded, s.off), (35, 35, 0));
            let s = run(&bigger, scale);
            assert!(s.off > 0, "{s:?}");
        }
    }
}
