//! Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and
//! written in PEFT's own format (so PEFT loads what we save), and host-side f32/bf16/f16 matrices.
//!
//! Supported: `peft_type` LORA on linear layers (`lora_A.weight` r × in, `lora_B.weight` out × r),
//! `r`, `lora_alpha`, `use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern` (keys are
//! regular expressions tried in the file's order against the module name or its end after a dot, the
//! first match winning, as PEFT does), `use_dora` (DoRA: each module's 1-D `lora_magnitude_vector`
//! `[out]` too; merged by [`crate::ops::dora_merge`] and the checkpoint merge, served unmerged by the
//! layers and adapter sets), LoRA of embedding layers (`lora_embedding_A` / `lora_embedding_B`, and
//! the base weight PEFT saves beside them; merged by the checkpoint merge only), `modules_to_save` (modules trained whole, e.g. a sequence-classification
//! head or the embeddings: their tensors, [`PeftAdapter::modules_to_save`], replace the base's in a
//! checkpoint merge), `fan_in_fan_out` (GPT-2's `Conv1D` layers, weights stored in × out: the
//! checkpoint merge transposes them around the merge kernel), tensors in f32, bf16 or f16. Anything else
//! that changes the math is refused with an error naming it: `.bin` adapters, conv LoRA,
//! trained biases (`bias` other than "none", `lora_bias`), the LoRA variants and extras PEFT configures
//! with other keys (aLoRA, Arrow, KaSA, QALoRA, layer replication, trainable tokens,
//! `target_parameters`, ...: [`REFUSED_KEYS`]), any config key this crate does not know that is set, and
//! any tensor other than a module's `lora_A.weight` and `lora_B.weight` (and DoRA's magnitude) outside
//! the modules saved whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

use crate::dtype::DType;
use crate::error::{Error, Result};

const PREFIX: &str = "base_model.model.";

/// A row-major matrix on the host, in the dtype it was stored in.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMatrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    /// Little-endian element bytes, as in safetensors.
    pub bytes: Vec<u8>,
}

impl HostMatrix {
    pub fn from_f32(rows: usize, cols: usize, v: &[f32]) -> Self {
        HostMatrix {
            rows,
            cols,
            dtype: DType::F32,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Exact conversion to f32 (bf16 and f16 are subsets of f32).
    pub fn to_f32(&self) -> Vec<f32> {
        elements_to_f32(self.dtype, &self.bytes)
    }
}

/// A tensor of a module PEFT saved whole (`modules_to_save`: a classifier head, trained embeddings):
/// `name` as in the base checkpoint (without PEFT's `base_model.model.` prefix), any shape, in the
/// dtype it was stored in. A merge writes it in place of the base's tensor of that name, converted to
/// the base's dtype (rounded to nearest even, as PyTorch's copy into the base's parameter).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Little-endian element bytes, as in safetensors.
    pub bytes: Vec<u8>,
}

impl SavedTensor {
    /// Exact conversion to f32 (bf16 and f16 are subsets of f32).
    pub fn to_f32(&self) -> Vec<f32> {
        elements_to_f32(self.dtype, &self.bytes)
    }

    /// The elements in `dtype`'s bytes: as stored when that is the stored dtype (bit for bit, NaN
    /// payloads included), else through f32 rounded to nearest even (PyTorch's conversion).
    pub fn bytes_as(&self, dtype: DType) -> Vec<u8> {
        if dtype == self.dtype {
            return self.bytes.clone();
        }
        let v = self.to_f32();
        match dtype {
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            DType::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            // never asked: dtype_of refuses u32 tensors in checkpoints and adapters
            DType::U32 => v.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect(),
        }
    }
}

/// Little-endian elements of `dtype` as f32: exact for f32, bf16 and f16.
fn elements_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        // never read from a file (dtype_of refuses it); converted like the others for completeness
        DType::U32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
    }
}

/// safetensors dtype → ours, or an error naming the tensor and the dtype.
pub(crate) fn dtype_of(path: &Path, name: &str, d: Dtype) -> Result<DType> {
    match d {
        Dtype::F32 => Ok(DType::F32),
        Dtype::BF16 => Ok(DType::BF16),
        Dtype::F16 => Ok(DType::F16),
        other => Err(Error::format(
            path,
            format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
        )),
    }
}

pub(crate) fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::U32 => Dtype::U32,
    }
}

/// The settings of `adapter_config.json` that the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub rank_pattern: Patterns<usize>,
    pub alpha_pattern: Patterns<f64>,
    /// PEFT's `lora_dropout` (training only; merging and inference ignore it).
    pub lora_dropout: f64,
    /// DoRA (PEFT's `use_dora`): every module has a magnitude vector ([`AdapterModule::magnitude`]).
    pub use_dora: bool,
    /// PEFT's `fan_in_fan_out`: the targeted weights are stored in × out (`[K, N]`, GPT-2's `Conv1D`)
    /// rather than out × in (`nn.Linear`). lora_A and lora_B keep their `nn.Linear` shapes either way;
    /// a checkpoint merge transposes the weight around the merge, as PEFT's `transpose(B·A)` does.
    pub fan_in_fan_out: bool,
    /// PEFT's `modules_to_save`: modules trained whole (a classifier head, the embeddings), whose
    /// tensors the adapter file holds and which replace the base's ([`PeftAdapter::modules_to_save`]).
    /// PEFT's rule: a module is one when its name ends with an entry (plain string suffix).
    pub modules_to_save: Vec<String>,
}

/// PEFT's `target_modules`: a list of names (a module matches one exactly or ends with `.name`), or one
/// string, a regular expression the whole module name must match. Kept in the form it was read in, so
/// a saved config means what the loaded one did.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

/// `rank_pattern` or `alpha_pattern`: (key, value) in the file's order. A key is a regular expression;
/// PEFT's rule (`peft.utils.other.get_pattern_key`): the first key, in order, for which
/// `re.match(rf"(.*\.)?({key})$", module)` matches gives the module's value. Keys are compiled when the
/// patterns are made (an invalid one is an error naming it), so a lookup cannot fail. Rust's `regex`
/// syntax is Python's for what PEFT configs use (names, dots, `|`, classes, `^`); what it lacks
/// (look-around, back-references) is refused, not matched otherwise.
#[derive(Clone, Debug)]
pub struct Patterns<V> {
    entries: Vec<(String, V)>,
    compiled: Vec<regex::Regex>,
}

impl<V: PartialEq> PartialEq for Patterns<V> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<V> Default for Patterns<V> {
    fn default() -> Self {
        Patterns {
            entries: Vec::new(),
            compiled: Vec::new(),
        }
    }
}

impl<V> Patterns<V> {
    /// Patterns from (key, value) pairs in the order PEFT tries them; a key that is not a regular
    /// expression (in Rust's `regex` syntax) is an [`Error::InvalidState`] naming it.
    pub fn new(entries: Vec<(String, V)>) -> Result<Self> {
        let refuse = |key: &str, why: String| Error::InvalidState {
            op: "Patterns::new",
            message: format!("key `{key}` is not a regular expression this crate can match: {why}"),
        };
        let compiled = entries
            .iter()
            .map(|(key, _)| {
                // Rust's classes read `&&`, `--` and `~~` as set operations, Python's as characters
                if let Some(op) = ["&&", "--", "~~"].iter().find(|op| key.contains(*op)) {
                    return Err(refuse(
                        key,
                        format!("`{op}` means another thing in Python's `re`"),
                    ));
                }
                // Python's pattern text, then re.match: anchored at the start only, so a key that
                // closes the group (`a)|(b`) splits the pattern as it does there
                regex::Regex::new(&format!(r"^(?:(.*\.)?({key})$)"))
                    .map_err(|e| refuse(key, e.to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(Patterns { entries, compiled })
    }

    /// The value of the first key that matches `module` (PEFT's rule), if any.
    pub fn lookup(&self, module: &str) -> Option<&V> {
        self.compiled
            .iter()
            .position(|re| re.is_match(module))
            .map(|i| &self.entries[i].1)
    }

    /// The value stored under exactly `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// (key, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

impl<V: Clone + Into<Value>> Patterns<V> {
    /// A JSON object of the entries, in order.
    fn to_json(&self) -> Value {
        Value::Object(
            self.entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        )
    }
}

/// Keys of PEFT's LoraConfig that select a LoRA variant, or an extra trained part, whose merge is not
/// `W + s·B·A` of the module's lora_A and lora_B: refused when set (not null, false, or empty).
pub const REFUSED_KEYS: [(&str, &str); 11] = [
    (
        "alora_invocation_tokens",
        "aLoRA (PEFT does not merge it either)",
    ),
    ("arrow_config", "Arrow routing over several adapters"),
    (
        "kasa_config",
        "KaSA (B·diag(lora_diag)·A over an SVD-truncated base)",
    ),
    (
        "layer_replication",
        "layer replication (it changes the model's layers)",
    ),
    ("megatron_config", "Megatron tensor-parallel layers"),
    ("monteclora_config", "MonteCLoRA"),
    (
        "target_parameters",
        "LoRA on parameters rather than linear modules",
    ),
    ("trainable_token_indices", "trainable token embeddings"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("use_qalora", "QALoRA (pooled inputs)"),
    ("velora_config", "VeLoRA"),
];

/// Keys of PEFT's LoraConfig that this crate reads or that do not change what a saved adapter's merge
/// is (bookkeeping, and initialisation schemes that leave the base as it is: the saved A and B are what
/// they produced; `init_lora_weights` is checked on its own, see [`BASE_CHANGING_INITS`]).
const KNOWN_KEYS: [&str; 30] = [
    "r",
    "modules_to_save",
    "use_dora",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "peft_type",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "auto_mapping",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
];

/// `init_lora_weights` values whose initialisation also changed the base weights (W0 − B₀A₀, or a
/// quantized base): such an adapter, saved without PEFT's conversion
/// (`path_initial_model_for_weight_conversion`, which writes `init_lora_weights: true`), belongs to that
/// residual base, not to the checkpoint it would be merged into here. Prefixes of the values.
pub const BASE_CHANGING_INITS: [&str; 4] = ["pissa", "olora", "corda", "loftq"];

/// Whether a config value leaves its feature off: null, false, or an empty string, list or object.
fn unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) | Value::Number(_) => false,
    }
}

/// A rank as adapter configs write it: an integer, or an integral float (8.0) as some writers store it,
/// from 0 to 2^32 - 1 (a rank of 8.5 or -3 is refused, not read as 8 or 0).
fn integral(x: &Value) -> Option<u64> {
    let max = u64::from(u32::MAX);
    x.as_u64()
        .or_else(|| {
            x.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=max as f64).contains(f))
                .map(|f| f as u64)
        })
        .filter(|&n| n <= max)
}

/// The config's `key` object (absent or null: empty) with each value as `read` takes it, in the file's
/// order; a value it refuses, a key that is not a regular expression, or a `key` that is not an object
/// is an error naming it and what was expected (`want`), not silently dropped or truncated.
fn pattern<T>(
    config: &Value,
    path: &Path,
    key: &str,
    want: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> Result<Patterns<T>> {
    let o = match config.get(key) {
        None | Some(Value::Null) => return Ok(Patterns::default()),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(Error::format(
                path,
                format!("`{key}` is {other}: expected an object of module patterns"),
            ));
        }
    };
    let entries = o
        .iter()
        .map(|(k, x)| match read(x) {
            Some(t) => Ok((k.clone(), t)),
            None => Err(Error::format(
                path,
                format!("`{key}` entry `{k}` is {x}: expected {want}"),
            )),
        })
        .collect::<Result<_>>()?;
    Patterns::new(entries).map_err(|e| Error::format(path, format!("`{key}`: {e}")))
}

/// A boolean flag of the config: absent or null is false; anything but a JSON boolean is an error (PEFT
/// would take a truthy string or number as true).
fn flag(config: &Value, path: &Path, key: &str) -> Result<bool> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(Error::format(
            path,
            format!("`{key}` is {other}: expected true or false"),
        )),
    }
}

impl AdapterConfig {
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern.lookup(module).copied().unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .lookup(module)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// PEFT's `scaling`: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        let (alpha, r) = (self.alpha_for(module), self.rank_for(module) as f64);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Parses the JSON of `adapter_config.json`; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let unsupported = |what: &str, hint: &str| {
            Err(Error::Unsupported {
                what: what.to_string(),
                hint: hint.to_string(),
            })
        };
        match v.get("peft_type").and_then(Value::as_str) {
            Some("LORA") | None => {}
            Some(other) => return unsupported(&format!("peft_type {other}"), "only LORA adapters"),
        }
        let Some(keys) = v.as_object() else {
            return Err(Error::format(path, "expected a JSON object"));
        };
        for (key, what) in REFUSED_KEYS {
            if let Some(x) = keys.get(key).filter(|x| !unset(x)) {
                return unsupported(
                    &format!("{what} (`{key}` = {x})"),
                    "only plain LoRA on linear modules is merged and loaded",
                );
            }
        }
        if let Some((key, x)) = keys.iter().find(|(k, x)| {
            !KNOWN_KEYS.contains(&k.as_str())
                && !REFUSED_KEYS.iter().any(|(r, _)| r == k)
                && !unset(x)
        }) {
            return unsupported(
                &format!("adapter_config.json key `{key}` = {x}, which this crate does not know"),
                "if it does not change the adapter's math, remove it (or set it to null)",
            );
        }
        for key in [
            "use_rslora",
            "use_dora",
            "fan_in_fan_out",
            "lora_bias",
            "inference_mode",
        ] {
            flag(&v, path, key)?;
        }
        if let Some(init) = v.get("init_lora_weights").and_then(Value::as_str)
            && BASE_CHANGING_INITS.iter().any(|p| init.starts_with(p))
        {
            return unsupported(
                &format!(
                    "an adapter initialised with `init_lora_weights` = \"{init}\", which also changed the base weights"
                ),
                "save it with PEFT's path_initial_model_for_weight_conversion (an adapter for the original base), or merge it into the residual base PEFT saved and set init_lora_weights to true",
            );
        }
        match v.get("bias").and_then(Value::as_str) {
            Some("none") | None => {}
            Some(b) => return unsupported(&format!("bias = \"{b}\""), "only bias = \"none\""),
        }
        if flag(&v, path, "lora_bias")? {
            return unsupported("lora_bias = true", "only adapters without a trained bias");
        }
        let r = v.get("r").and_then(integral).ok_or_else(|| {
            Error::format(path, "missing `r`, or not an integer from 0 to 2^32 - 1")
        })? as usize;
        let lora_alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::format(path, "missing number `lora_alpha`"))?;
        let target_modules = match v.get("target_modules") {
            Some(Value::Array(a)) => TargetModules::Names(
                a.iter()
                    .map(|s| {
                        s.as_str().map(String::from).ok_or_else(|| {
                            Error::format(
                                path,
                                format!("`target_modules` entry {s}: expected a string"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            None | Some(Value::Null) => TargetModules::Names(Vec::new()),
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!(
                        "`target_modules` is {other}: expected a list of names or a regex string"
                    ),
                ));
            }
        };
        let rank = |x: &Value| integral(x).filter(|&r| r >= 1).map(|r| r as usize);
        let rank_pattern = pattern(
            &v,
            path,
            "rank_pattern",
            "an integer rank from 1 to 2^32 - 1",
            rank,
        )?;
        let alpha_pattern = pattern(&v, path, "alpha_pattern", "a number", Value::as_f64)?;
        let modules_to_save = match v.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| match s.as_str() {
                    Some(name) if !name.is_empty() => Ok(name.to_string()),
                    _ => Err(Error::format(
                        path,
                        format!("`modules_to_save` entry {s}: expected a module name"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!("`modules_to_save` is {other}: expected a list of module names"),
                ));
            }
        };
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: flag(&v, path, "use_rslora")?,
            target_modules,
            rank_pattern,
            alpha_pattern,
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            use_dora: flag(&v, path, "use_dora")?,
            fan_in_fan_out: flag(&v, path, "fan_in_fan_out")?,
            modules_to_save,
        })
    }

    /// Whether a tensor named `name` (as in the base checkpoint) belongs to a module saved whole: some
    /// module on its path (`a`, `a.b`, ... up to its parent) ends with an entry of `modules_to_save`,
    /// PEFT's test (`key.endswith(target_key)` over the model's module names).
    pub fn saved_whole(&self, name: &str) -> bool {
        name.match_indices('.').any(|(i, _)| {
            let module = &name[..i];
            self.modules_to_save
                .iter()
                .any(|m| module.ends_with(m.as_str()))
        })
    }

    /// PEFT's JSON for this config (the fields PEFT needs to load the adapter).
    pub fn to_json(&self) -> String {
        let v = json!({
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": match &self.target_modules {
                TargetModules::Names(names) => json!(names),
                TargetModules::Regex(re) => json!(re),
            },
            "rank_pattern": self.rank_pattern.to_json(),
            "alpha_pattern": self.alpha_pattern.to_json(),
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "use_dora": self.use_dora,
            "lora_dropout": self.lora_dropout,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": if self.modules_to_save.is_empty() {
                Value::Null
            } else {
                json!(self.modules_to_save)
            },
            "task_type": null,
        });
        serde_json::to_string_pretty(&v).expect("a JSON value serialises")
    }
}

/// One adapted module: `name` as in the base checkpoint (without PEFT's `base_model.model.` prefix),
/// A (r × in), B (out × r), and for DoRA the magnitude vector (1 × out; a 1-D `[out]` tensor in the file).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterModule {
    pub name: String,
    pub a: HostMatrix,
    pub b: HostMatrix,
    /// DoRA's `lora_magnitude_vector` (present exactly when the config's `use_dora` is set).
    pub magnitude: Option<HostMatrix>,
    /// LoRA of an embedding layer (`nn.Embedding`, weight `[vocabulary, dim]`; PEFT's
    /// `lora_embedding_A` `[r, vocabulary]` and `lora_embedding_B` `[dim, r]` as A and B): its weight
    /// is stored in × out, `[K, N]`, as a Conv1D's, and the merge adds `transpose(s·B·A)`. Merged by
    /// the checkpoint merge; the linear layers and adapter sets refuse it.
    pub embedding: bool,
    /// The layer's base weight as saved beside the adapter (`….base_layer.weight`: PEFT saves an
    /// embedding layer's whole state when it is targeted, `save_embedding_layers`), which PEFT's load
    /// puts in place of the base's: the checkpoint merge merges into it (converted to the checkpoint
    /// tensor's dtype; its shape must be the checkpoint's).
    pub base_weight: Option<SavedTensor>,
}

const MAGNITUDE: &str = ".lora_magnitude_vector";

/// A PEFT LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    pub modules: Vec<AdapterModule>,
    /// The tensors of the modules saved whole (`config.modules_to_save`), sorted by name; empty
    /// without them. A merge writes them in place of the base's; the layers and adapter sets, which
    /// take one LoRA module each, leave them to the caller (a server loads its classifier head itself).
    pub modules_to_save: Vec<SavedTensor>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(Error::io(path))
}

/// Reads a 2-D tensor of a safetensors file.
pub(crate) fn matrix(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<HostMatrix> {
    let t = st
        .tensor(name)
        .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
    let dtype = dtype_of(path, name, t.dtype())?;
    let &[rows, cols] = t.shape() else {
        return Err(Error::Unsupported {
            what: format!("tensor `{name}` of shape {:?}", t.shape()),
            hint: "LoRA on linear layers only (2-D lora_A / lora_B); conv LoRA is not supported"
                .into(),
        });
    };
    Ok(HostMatrix {
        rows,
        cols,
        dtype,
        bytes: t.data().to_vec(),
    })
}

/// Reads DoRA's 1-D magnitude vector `name` (`[out]`) as a 1 × out matrix; a missing one is an error
/// naming it.
fn vector(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<HostMatrix> {
    let t = st.tensor(name).map_err(|e| {
        Error::format(
            path,
            format!("tensor `{name}` (the config sets `use_dora`): {e}"),
        )
    })?;
    let dtype = dtype_of(path, name, t.dtype())?;
    let &[cols] = t.shape() else {
        return Err(Error::format(
            path,
            format!(
                "DoRA magnitude vector `{name}` of shape {:?}: expected 1-D `[out]`",
                t.shape()
            ),
        ));
    };
    Ok(HostMatrix {
        rows: 1,
        cols,
        dtype,
        bytes: t.data().to_vec(),
    })
}

/// A name PEFT gives a LoRA layer's own tensors (never part of a module saved whole).
fn is_lora_name(name: &str) -> bool {
    [
        ".lora_A.",
        ".lora_B.",
        ".lora_magnitude_vector",
        ".lora_embedding_",
    ]
    .iter()
    .any(|p| name.contains(p))
}

/// Reads tensor `name` of a module saved whole, as `bare` (its name in the base checkpoint).
fn saved_tensor(path: &Path, st: &SafeTensors<'_>, name: &str, bare: &str) -> Result<SavedTensor> {
    let t = st
        .tensor(name)
        .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
    Ok(SavedTensor {
        name: bare.to_string(),
        shape: t.shape().to_vec(),
        dtype: dtype_of(path, name, t.dtype())?,
        bytes: t.data().to_vec(),
    })
}

impl PeftAdapter {
    /// Module `module`'s lora_A and lora_B as device tensors of `A`, holding the file's values exactly:
    /// a file dtype other than `A` is accepted only into f32 (bf16/f16 are subsets of it), anything else
    /// would round and is `UnsupportedDType` naming the tensor, with `supported` as its hint. An unknown
    /// module is an error listing the adapter's modules.
    pub(crate) fn module_tensors<A: crate::dtype::Element>(
        &self,
        op: &'static str,
        module: &str,
        device: &crate::device::Device,
        supported: &'static str,
    ) -> Result<(crate::tensor::Tensor<A>, crate::tensor::Tensor<A>)> {
        if self.config.use_dora {
            return Err(Error::Unsupported {
                what: format!("{op} of a DoRA adapter (`use_dora`)"),
                hint: "a DoRA module's factors need the layer's base weight: AdapterSet::add_peft_module_with_base serves it unmerged (as do LoraLinear::insert_peft_module and ops::dora_forward); ops::dora_merge or `lora-kernels merge` merges it".into(),
            });
        }
        let (a, b, _) = self.module_adapter_tensors(op, module, device, supported)?;
        Ok((a, b))
    }

    /// [`PeftAdapter::module_tensors`] of a plain or a DoRA adapter: A, B and, for DoRA, the magnitude
    /// vector (`[out]` f32; its length checked against B's rows when the adapter was read).
    #[allow(clippy::type_complexity)]
    pub(crate) fn module_adapter_tensors<A: crate::dtype::Element>(
        &self,
        op: &'static str,
        module: &str,
        device: &crate::device::Device,
        supported: &'static str,
    ) -> Result<(
        crate::tensor::Tensor<A>,
        crate::tensor::Tensor<A>,
        Option<crate::tensor::Tensor<f32>>,
    )> {
        let m = self
            .modules
            .iter()
            .find(|m| m.name == module)
            .ok_or_else(|| Error::InvalidState {
                op,
                message: format!(
                    "the adapter has no module `{module}` (it has: {:?})",
                    self.modules.iter().map(|m| &m.name).collect::<Vec<_>>()
                ),
            })?;
        if m.embedding {
            return Err(Error::Unsupported {
                what: format!("{op} of module `{module}`, the LoRA of an embedding layer (lora_embedding_A/B)"),
                hint: "the layers and adapter sets are linear layers; `lora-kernels merge` (checkpoint::merge_checkpoint) merges an embedding's LoRA".into(),
            });
        }
        for (arg, hm) in [("lora_A", &m.a), ("lora_B", &m.b)] {
            if hm.dtype != A::DTYPE && A::DTYPE != DType::F32 {
                return Err(Error::UnsupportedDType {
                    op,
                    arg,
                    got: hm.dtype,
                    supported,
                });
            }
        }
        // an adapter built through the API may disagree with its config: neither silently plain nor
        // silently DoRA
        if m.magnitude.is_some() != self.config.use_dora {
            return Err(Error::InvalidState {
                op,
                message: format!(
                    "module `{module}`: the config's use_dora is {} but the module {} a DoRA magnitude vector",
                    self.config.use_dora,
                    if m.magnitude.is_some() {
                        "has"
                    } else {
                        "has no"
                    }
                ),
            });
        }
        let up = |hm: &HostMatrix| {
            let v: Vec<A> = hm.to_f32().into_iter().map(A::from_f32).collect();
            crate::tensor::Tensor::from_slice(device, &v, &[hm.rows, hm.cols])
        };
        let magnitude = match &m.magnitude {
            Some(hm) => Some(crate::tensor::Tensor::from_slice(
                device,
                &hm.to_f32(),
                &[hm.rows * hm.cols],
            )?),
            None => None,
        };
        Ok((up(&m.a)?, up(&m.b)?, magnitude))
    }

    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(Error::io(&cfg_path))?;
        let config = AdapterConfig::parse(&text, &cfg_path)?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Unsupported {
                what: "adapter_model.bin (a pickled PyTorch adapter)".into(),
                hint: "save the adapter with safe_serialization=True (adapter_model.safetensors)"
                    .into(),
            });
        }
        let bytes = read(&st_path)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&st_path, format!("not a valid safetensors file: {e}")))?;
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let mut modules = Vec::new();
        let mut saved: Vec<SavedTensor> = Vec::new();
        let has = |n: &str| st.names().contains(&n);
        for name in &names {
            let lora_b = name
                .strip_suffix(".lora_B.weight")
                .or_else(|| name.strip_suffix(".lora_embedding_B"));
            let magnitude = name.strip_suffix(MAGNITUDE);
            if let Some(stem) = lora_b.or(magnitude) {
                // read with its lora_A; one without is an error, not skipped
                let linear_a = format!("{stem}.lora_A.weight");
                let embedding_a = format!("{stem}.lora_embedding_A");
                let a_of_b = if name.ends_with(".lora_embedding_B") {
                    &embedding_a
                } else {
                    &linear_a
                };
                let found = match magnitude {
                    Some(_) => has(&linear_a) || has(&embedding_a),
                    None => has(a_of_b),
                };
                if !found {
                    return Err(Error::format(
                        &st_path,
                        format!("`{name}` has no `{a_of_b}`"),
                    ));
                }
                if magnitude.is_some() && !config.use_dora {
                    return Err(Error::format(
                        &st_path,
                        format!(
                            "`{name}` is a DoRA magnitude vector, but the config does not set `use_dora`"
                        ),
                    ));
                }
                continue;
            }
            if let Some(stem) = name.strip_suffix(".base_layer.weight")
                && (has(&format!("{stem}.lora_A.weight"))
                    || has(&format!("{stem}.lora_embedding_A")))
            {
                // read with its module
                continue;
            }
            if name.ends_with(".lora_magnitude_vector.weight") {
                // PEFT's in-memory name (the module's DoraLinearLayer.weight); saved adapters drop
                // the `.weight` (peft/tuners/lora/model.py), so this file was not written by PEFT's save
                return Err(Error::Unsupported {
                    what: format!("adapter tensor `{name}` (a DoRA magnitude vector under PEFT's in-memory name)"),
                    hint: "save the adapter with PEFT's save_pretrained, which names it `…lora_magnitude_vector`".into(),
                });
            }
            let linear = name.strip_suffix(".lora_A.weight");
            let embedding = name.strip_suffix(".lora_embedding_A");
            let Some(stem) = linear.or(embedding) else {
                let bare = name.strip_prefix(PREFIX).unwrap_or(name);
                if config.saved_whole(bare) && !is_lora_name(bare) {
                    saved.push(saved_tensor(&st_path, &st, name, bare)?);
                    continue;
                }
                // trainable tokens, a variant's extra tensor (KaSA's lora_diag, ...), a module saved
                // whole that the config does not list: the merge would leave it out, so the result
                // would not be the adapter's
                return Err(Error::Unsupported {
                    what: format!(
                        "adapter tensor `{name}` (neither a lora_A nor a lora_B weight, nor in a module of `modules_to_save`: {:?})",
                        config.modules_to_save
                    ),
                    hint: if config.modules_to_save.is_empty() {
                        "LoRA on linear and embedding modules (with an embedding's saved base weight), and modules saved whole, are merged and loaded".into()
                    } else {
                        "LoRA on linear and embedding modules (with an embedding's saved base weight), and the modules saved whole that the config lists, are merged and loaded (with `ensure_weight_tying`, PEFT also saves the tied copy of a listed module, e.g. an lm_head beside embed_tokens, under a name it does not list: not supported)".into()
                    },
                });
            };
            let module = stem.strip_prefix(PREFIX).unwrap_or(stem).to_string();
            if modules.iter().any(|m: &AdapterModule| m.name == module) {
                return Err(Error::format(
                    &st_path,
                    format!(
                        "module `{module}` appears twice (with and without the `{PREFIX}` prefix)"
                    ),
                ));
            }
            let b_name = match embedding {
                Some(_) => format!("{stem}.lora_embedding_B"),
                None => format!("{stem}.lora_B.weight"),
            };
            if !has(&b_name) {
                return Err(Error::format(
                    &st_path,
                    format!("`{name}` has no `{b_name}`"),
                ));
            }
            let a = matrix(&st_path, &st, name)?;
            let b = matrix(&st_path, &st, &b_name)?;
            let r = config.rank_for(&module);
            if a.rows != r || b.cols != r {
                return Err(Error::format(
                    &st_path,
                    format!(
                        "module `{module}`: lora_A is {}×{}, lora_B {}×{}, but the config's rank for it is {r}",
                        a.rows, a.cols, b.rows, b.cols
                    ),
                ));
            }
            let magnitude = if config.use_dora {
                let m = vector(&st_path, &st, &format!("{stem}{MAGNITUDE}"))?;
                if m.cols != b.rows {
                    return Err(Error::format(
                        &st_path,
                        format!(
                            "module `{module}`: the DoRA magnitude vector has {} elements, lora_B {} rows",
                            m.cols, b.rows
                        ),
                    ));
                }
                Some(m)
            } else {
                None
            };
            // named as the checkpoint's tensor it stands for
            let base_weight = match format!("{stem}.base_layer.weight") {
                n if has(&n) => Some(saved_tensor(
                    &st_path,
                    &st,
                    &n,
                    &format!("{module}.weight"),
                )?),
                _ => None,
            };
            modules.push(AdapterModule {
                name: module,
                a,
                b,
                magnitude,
                embedding: embedding.is_some(),
                base_weight,
            });
        }
        if modules.is_empty() {
            return Err(Error::format(
                &st_path,
                "no `*.lora_A.weight` (or `*.lora_embedding_A`) tensors",
            ));
        }
        saved.sort_by(|a, b| a.name.cmp(&b.name));
        let adapter = PeftAdapter {
            config,
            modules,
            modules_to_save: saved,
        };
        adapter.check_modules_to_save("PeftAdapter::load")?;
        Ok(adapter)
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (PEFT's names and
    /// layout), each through a temporary file renamed into place.
    pub fn save(&self, dir: &Path) -> Result<()> {
        // what PEFT would not load back as it was
        self.check_modules_to_save("PeftAdapter::save")?;
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let mut tensors = Vec::new();
        for m in &self.modules {
            let names = if m.embedding {
                ["lora_embedding_A", "lora_embedding_B"]
            } else {
                ["lora_A.weight", "lora_B.weight"]
            };
            for (suffix, t) in names.into_iter().zip([&m.a, &m.b]) {
                let shape = vec![t.rows, t.cols];
                tensors.push((
                    format!("{PREFIX}{}.{suffix}", m.name),
                    t.dtype,
                    shape,
                    &t.bytes,
                ));
            }
            if let Some(t) = &m.magnitude {
                // 1-D, as PEFT saves it
                tensors.push((
                    format!("{PREFIX}{}{MAGNITUDE}", m.name),
                    t.dtype,
                    vec![t.cols],
                    &t.bytes,
                ));
            }
        }
        for m in &self.modules {
            if let Some(t) = &m.base_weight {
                tensors.push((
                    format!("{PREFIX}{}.base_layer.weight", m.name),
                    t.dtype,
                    t.shape.clone(),
                    &t.bytes,
                ));
            }
        }
        for t in &self.modules_to_save {
            tensors.push((
                format!("{PREFIX}{}", t.name),
                t.dtype,
                t.shape.clone(),
                &t.bytes,
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                let view =
                    safetensors::tensor::TensorView::new(st_dtype(*dtype), shape.clone(), bytes)
                        .map_err(|e| Error::format(dir, format!("tensor `{name}`: {e}")))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::format(dir, format!("serialising: {e}")))?;
        write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        write_atomic(
            &dir.join("adapter_config.json"),
            self.config.to_json().as_bytes(),
        )
    }

    /// The tensors saved whole are ones PEFT would save and load back as they are: each in a module of
    /// the config's `modules_to_save`, none of them a LoRA tensor or given twice, its bytes those of its
    /// shape; and no LoRA module lies inside a module saved whole (its weight would be both merged and
    /// replaced). [`PeftAdapter::load`] gives such an adapter; one built through the public fields is
    /// checked by `save` and the checkpoint merge.
    pub fn check_modules_to_save(&self, op: &'static str) -> Result<()> {
        let c = &self.config;
        let mut names = std::collections::BTreeSet::new();
        for t in &self.modules_to_save {
            let elements = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let fault = if !c.saved_whole(&t.name) {
                Some(format!(
                    "is not in a module of the config's modules_to_save ({:?})",
                    c.modules_to_save
                ))
            } else if is_lora_name(&t.name) {
                Some("is named as a LoRA tensor".to_string())
            } else if elements.and_then(|n| n.checked_mul(t.dtype.size_of())) != Some(t.bytes.len())
            {
                Some(format!(
                    "has {} bytes for shape {:?} of {}",
                    t.bytes.len(),
                    t.shape,
                    t.dtype
                ))
            } else if !names.insert(t.name.as_str()) {
                Some(format!(
                    "appears twice (in the file: with and without the `{PREFIX}` prefix)"
                ))
            } else {
                None
            };
            if let Some(fault) = fault {
                return Err(Error::InvalidState {
                    op,
                    message: format!("tensor `{}` of a module saved whole {fault}", t.name),
                });
            }
        }
        if let Some(m) = self
            .modules
            .iter()
            .find(|m| c.saved_whole(&format!("{}.weight", m.name)))
        {
            return Err(Error::Unsupported {
                what: format!(
                    "LoRA module `{}` inside a module saved whole (`modules_to_save`: {:?})",
                    m.name, c.modules_to_save
                ),
                hint: "a module is either adapted by LoRA or saved whole, not both".into(),
            });
        }
        Ok(())
    }

    /// Trainable parameters: Σ r·(in + out), plus out per module for DoRA's magnitude vectors, plus
    /// the elements of the modules saved whole (as PEFT's `print_trainable_parameters` counts them).
    pub fn parameters(&self) -> u64 {
        let lora: u64 = self
            .modules
            .iter()
            .map(|m| {
                let magnitude = m.magnitude.as_ref().map_or(0, |v| v.cols);
                (m.a.rows * m.a.cols + m.b.rows * m.b.cols + magnitude) as u64
            })
            .sum();
        let whole: u64 = self
            .modules_to_save
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        lora + whole
    }
}

/// Temporary file in the same directory, then rename: readers never see a partial file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(Error::io(path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A fresh name beside `path`: the process id alone repeats (a container's process is often 1), and a
/// run killed midway would leave its temporary behind under the name the next run takes.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{nanos:x}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(modules_to_save: &str) -> AdapterConfig {
        let text = format!(
            r#"{{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "modules_to_save": {modules_to_save}}}"#
        );
        AdapterConfig::parse(&text, Path::new("adapter_config.json")).unwrap()
    }

    /// PEFT's `_set_trainable`: `key.endswith(target_key)` over every module name, parents included.
    #[test]
    fn saved_whole_is_peft_suffix_test_on_every_module_of_the_path() {
        let c = config(r#"["score", "embed_tokens", "layers.1"]"#);
        assert_eq!(c.modules_to_save, ["score", "embed_tokens", "layers.1"]);
        for name in [
            "score.weight",
            "score.bias",
            "model.embed_tokens.weight",
            // a plain suffix, not a whole component: PEFT matches these too
            "model.prescore.weight",
            // a parent module matched: every tensor under it
            "model.layers.1.mlp.up_proj.weight",
        ] {
            assert!(c.saved_whole(name), "{name}");
        }
        for name in [
            // the tensor's own name is not a module
            "score",
            "model.score_head.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ] {
            assert!(!c.saved_whole(name), "{name}");
        }
        assert!(config("null").modules_to_save.is_empty());
        assert!(!config("[]").saved_whole("score.weight"));
        let json: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(
            json["modules_to_save"],
            json!(["score", "embed_tokens", "layers.1"])
        );
        let json: Value = serde_json::from_str(&config("null").to_json()).unwrap();
        assert_eq!(json["modules_to_save"], Value::Null);
        for bad in [r#""score""#, "[1]", r#"[""]"#, "{}"] {
            let text = format!(r#"{{"r": 8, "lora_alpha": 16, "modules_to_save": {bad}}}"#);
            let e = AdapterConfig::parse(&text, Path::new("c.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("modules_to_save"), "{bad}: {e}");
        }
    }

    /// Saved tensors are written as stored in their own dtype, and rounded to nearest even into
    /// another (PyTorch's conversion), not truncated: known bit patterns.
    #[test]
    fn saved_tensor_bytes_round_to_nearest_even() {
        // x = 1 + 2^-8 + 2^-9: between two bf16 values, nearer the upper one (truncation gives 1);
        // exact in f16. y = 1 + 2^-11 + 2^-12: between two f16 values, nearer the upper one.
        let x = 1.0f32 + 2f32.powi(-8) + 2f32.powi(-9);
        let y = 1.0f32 + 2f32.powi(-11) + 2f32.powi(-12);
        let t = SavedTensor {
            name: "score.weight".into(),
            shape: vec![3],
            dtype: DType::F32,
            bytes: [x, y, -0.0f32]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        assert_eq!(t.bytes_as(DType::F32), t.bytes);
        let bits = |b: Vec<u8>| -> Vec<u16> {
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        // bf16: 1 + 2^-7, 1, -0
        assert_eq!(bits(t.bytes_as(DType::BF16)), [0x3F81, 0x3F80, 0x8000]);
        // f16: x itself, 1 + 2^-10, -0
        assert_eq!(bits(t.bytes_as(DType::F16)), [0x3C06, 0x3C01, 0x8000]);
    }
}
