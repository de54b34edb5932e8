//! Merging a PEFT adapter into a safetensors checkpoint (single file, or a directory with
//! `model.safetensors.index.json` and its shards) with the merge kernel: every targeted weight becomes
//! `round(W0 ± s·B·A)`, every other tensor is copied byte for byte, dtypes, names and metadata are
//! kept. Everything is validated before anything is written; output goes to temporary names renamed
//! into place at the end, so a failure never leaves a partial output, and the base is only read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops;
use crate::peft::{self, AdapterModule, PeftAdapter, temp_sibling, write_atomic};
use crate::tensor::Tensor;

const INDEX: &str = "model.safetensors.index.json";

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeSummary {
    pub modules_merged: usize,
    pub tensors_copied: usize,
    pub files_written: usize,
    pub bytes_written: u64,
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
        let files: BTreeSet<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
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

/// Merged (or unmerged) bytes of one weight, through the merge kernel on `device`.
fn merge_weight<T: Element>(
    device: &Device,
    w: &[u8],
    shape: (usize, usize),
    m: &AdapterModule,
    scale: f32,
    unmerge: bool,
) -> Result<Vec<u8>> {
    let (n, k) = shape;
    let w: Vec<T> = bytemuck::pod_collect_to_vec(w);
    let mut wt = Tensor::from_slice(device, &w, &[n, k])?;
    let r = m.a.rows;
    // Adapters in W's dtype are used as stored; any other dtype goes through f32 (exact for bf16/f16).
    if m.a.dtype == T::DTYPE && m.b.dtype == T::DTYPE && T::DTYPE != DType::F32 {
        let a: Vec<T> = bytemuck::pod_collect_to_vec(&m.a.bytes);
        let b: Vec<T> = bytemuck::pod_collect_to_vec(&m.b.bytes);
        let (at, bt) = (
            Tensor::from_slice(device, &a, &[r, k])?,
            Tensor::from_slice(device, &b, &[n, r])?,
        );
        if unmerge {
            ops::unmerge(&mut wt, &at, &bt, scale)?;
        } else {
            ops::merge(&mut wt, &at, &bt, scale)?;
        }
    } else {
        let at = Tensor::from_slice(device, &m.a.to_f32(), &[r, k])?;
        let bt = Tensor::from_slice(device, &m.b.to_f32(), &[n, r])?;
        if unmerge {
            ops::unmerge(&mut wt, &at, &bt, scale)?;
        } else {
            ops::merge(&mut wt, &at, &bt, scale)?;
        }
    }
    Ok(bytemuck::cast_slice(&wt.to_vec()?).to_vec())
}

/// Merges `adapter` into the checkpoint `base` (file or directory) and writes `out` (a file for a
/// file base, a new directory for a directory base). `progress(done, total, module)` is called after
/// each merged module.
pub fn merge_checkpoint(
    base: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    device: &Device,
    unmerge: bool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<MergeSummary> {
    let (files, index) = shards(base)?;
    let out_is_dir = index.is_some() || base.is_dir();
    if out_is_dir && out.exists() {
        return Err(Error::format(
            out,
            "already exists; the merged checkpoint is written to a new directory",
        ));
    }
    let by_weight: BTreeMap<String, &AdapterModule> = adapter
        .modules
        .iter()
        .map(|m| (format!("{}.weight", m.name), m))
        .collect();

    // Pass 1: read and validate everything (every module found once, shapes agree) before writing.
    let mut contents = Vec::new();
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(Error::io(f))?;
        {
            let st = parse(f, &bytes)?;
            for (name, t) in st.tensors() {
                let Some(m) = by_weight.get(&name) else {
                    continue;
                };
                peft::dtype_of(f, &name, t.dtype())?;
                let ok = matches!(t.shape(), &[n, k] if k == m.a.cols && n == m.b.rows);
                if !ok || m.a.rows != m.b.cols {
                    return Err(Error::format(
                        f,
                        format!(
                            "adapter/base shape mismatch for `{}`: base weight {:?}, lora_A {}×{}, lora_B {}×{} (expected W [N, K], A [r, K], B [N, r])",
                            m.name,
                            t.shape(),
                            m.a.rows,
                            m.a.cols,
                            m.b.rows,
                            m.b.cols
                        ),
                    ));
                }
                found.insert(name.clone(), f.clone());
            }
        }
        contents.push((f.clone(), bytes));
    }
    if let Some(missing) = by_weight.keys().find(|w| !found.contains_key(*w)) {
        return Err(Error::format(
            base,
            format!(
                "target module `{}` is missing from the base checkpoint (no tensor `{missing}`)",
                by_weight[missing].name
            ),
        ));
    }

    // Pass 2: merge and write to temporary names.
    let work_dir = if out_is_dir {
        let tmp = temp_sibling(out);
        std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
        Some(tmp)
    } else {
        None
    };
    let result = (|| -> Result<MergeSummary> {
        let mut summary = MergeSummary::default();
        let total = by_weight.len();
        for (f, bytes) in &contents {
            let st = parse(f, bytes)?;
            let meta = metadata(f, bytes)?;
            let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
            names.sort();
            let mut merged: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for name in &names {
                let Some(m) = by_weight.get(name) else {
                    continue;
                };
                let t = st
                    .tensor(name)
                    .map_err(|e| Error::format(f, e.to_string()))?;
                let shape = (t.shape()[0], t.shape()[1]);
                let scale = adapter.config.scale_for(&m.name) as f32;
                let data = match peft::dtype_of(f, name, t.dtype())? {
                    DType::BF16 => {
                        merge_weight::<half::bf16>(device, t.data(), shape, m, scale, unmerge)?
                    }
                    DType::F16 => {
                        merge_weight::<half::f16>(device, t.data(), shape, m, scale, unmerge)?
                    }
                    DType::F32 => merge_weight::<f32>(device, t.data(), shape, m, scale, unmerge)?,
                };
                merged.insert(name.clone(), data);
                summary.modules_merged += 1;
                progress(summary.modules_merged, total, &m.name);
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
        (Ok(_), Some(dir)) => std::fs::rename(dir, out).map_err(Error::io(out))?,
        (Err(_), Some(dir)) => {
            let _ = std::fs::remove_dir_all(dir);
        }
        _ => {}
    }
    result
}
