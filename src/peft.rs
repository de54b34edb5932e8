//! Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and
//! written in PEFT's own format (so PEFT loads what we save), and host-side f32/bf16/f16 matrices.
//!
//! Supported: `peft_type` LORA on linear layers (`lora_A.weight` r × in, `lora_B.weight` out × r),
//! `r`, `lora_alpha`, `use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern` (keys matched
//! against the end of the module name, as PEFT does), tensors in f32, bf16 or f16. Anything else that
//! changes the math is refused with an error naming it: DoRA, `.bin` adapters, embedding or conv LoRA,
//! `fan_in_fan_out` (GPT-2 Conv1D layout), trained biases (`bias` other than "none", `lora_bias`).

use std::collections::{BTreeMap, HashMap};
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
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            // never read from a file (dtype_of refuses it); converted like the others for completeness
            DType::U32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        }
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
    pub target_modules: Vec<String>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// PEFT's `lora_dropout` (training only; merging and inference ignore it).
    pub lora_dropout: f64,
}

fn pattern_match<'a, V>(patterns: &'a BTreeMap<String, V>, module: &str) -> Option<&'a V> {
    // PEFT: a key matches a module whose name is the key or ends with ".<key>"; the longest wins.
    patterns
        .iter()
        .filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v)
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

/// The config's `key` object (absent: empty) with each value as `read` takes it; a value it refuses is
/// an error naming the key and what was expected (`want`), not silently dropped or truncated.
fn pattern<T>(
    config: &Value,
    path: &Path,
    key: &str,
    want: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> Result<BTreeMap<String, T>> {
    let Some(o) = config.get(key).and_then(Value::as_object) else {
        return Ok(BTreeMap::new());
    };
    o.iter()
        .map(|(k, x)| match read(x) {
            Some(t) => Ok((k.clone(), t)),
            None => Err(Error::format(
                path,
                format!("`{key}` entry `{k}` is {x}: expected {want}"),
            )),
        })
        .collect()
}

impl AdapterConfig {
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_match(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_match(&self.alpha_pattern, module)
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
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return unsupported("DoRA (use_dora = true)", "only plain LoRA is merged");
        }
        if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            return unsupported(
                "fan_in_fan_out = true (Conv1D weights stored in × out)",
                "only nn.Linear layouts (out × in)",
            );
        }
        match v.get("bias").and_then(Value::as_str) {
            Some("none") | None => {}
            Some(b) => return unsupported(&format!("bias = \"{b}\""), "only bias = \"none\""),
        }
        if v.get("lora_bias").and_then(Value::as_bool) == Some(true) {
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
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
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
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            target_modules,
            rank_pattern,
            alpha_pattern,
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        })
    }

    /// PEFT's JSON for this config (the fields PEFT needs to load the adapter).
    pub fn to_json(&self) -> String {
        let v = json!({
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "fan_in_fan_out": false,
            "bias": "none",
            "use_dora": false,
            "lora_dropout": self.lora_dropout,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "task_type": null,
        });
        serde_json::to_string_pretty(&v).expect("a JSON value serialises")
    }
}

/// One adapted module: `name` as in the base checkpoint (without PEFT's `base_model.model.` prefix),
/// A (r × in), B (out × r).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterModule {
    pub name: String,
    pub a: HostMatrix,
    pub b: HostMatrix,
}

/// A PEFT LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    pub modules: Vec<AdapterModule>,
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
        let up = |hm: &HostMatrix| {
            let v: Vec<A> = hm.to_f32().into_iter().map(A::from_f32).collect();
            crate::tensor::Tensor::from_slice(device, &v, &[hm.rows, hm.cols])
        };
        Ok((up(&m.a)?, up(&m.b)?))
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
        for name in &names {
            if name.contains("lora_embedding_") {
                return Err(Error::Unsupported {
                    what: format!("embedding LoRA (`{name}`)"),
                    hint: "LoRA on linear layers only".into(),
                });
            }
            if name.contains("lora_magnitude_vector") {
                return Err(Error::Unsupported {
                    what: format!("DoRA magnitude vector (`{name}`)"),
                    hint: "only plain LoRA is merged".into(),
                });
            }
            let Some(module) = name.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let module = module.strip_prefix(PREFIX).unwrap_or(module).to_string();
            let a = matrix(&st_path, &st, name)?;
            let b_name = format!(
                "{}.lora_B.weight",
                name.strip_suffix(".lora_A.weight").unwrap()
            );
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
            modules.push(AdapterModule { name: module, a, b });
        }
        if modules.is_empty() {
            return Err(Error::format(&st_path, "no `*.lora_A.weight` tensors"));
        }
        Ok(PeftAdapter { config, modules })
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (PEFT's names and
    /// layout), each through a temporary file renamed into place.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let mut tensors = Vec::new();
        for m in &self.modules {
            for (suffix, t) in [("lora_A", &m.a), ("lora_B", &m.b)] {
                tensors.push((format!("{PREFIX}{}.{suffix}.weight", m.name), t));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, t)| {
                let view = safetensors::tensor::TensorView::new(
                    st_dtype(t.dtype),
                    vec![t.rows, t.cols],
                    &t.bytes,
                )
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

    /// Trainable parameters: Σ r·(in + out).
    pub fn parameters(&self) -> u64 {
        self.modules
            .iter()
            .map(|m| (m.a.rows * m.a.cols + m.b.rows * m.b.cols) as u64)
            .sum()
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

pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
