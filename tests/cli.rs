//! The `lora-kernels` binary: merging the PEFT fixture adapter into its base reproduces PEFT's merged
//! checkpoint, `--unmerge` matches the f64 unmerge, sharded checkpoints, adapter save/load round trip,
//! `inspect`, `plan` (the paper's GPT-3 figures), and every error path: clear message, non-zero exit,
//! no output left behind, base untouched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Fixture;
use common::peft::{Agreement, compare};
use lora_kernels::peft::PeftAdapter;

/// The CLI under test: `LK_CLI_BIN` if set, else the binary cargo built next to this test, else (when
/// the test binary was copied away from its build tree, as scripts/pack.sh does) `bin/lora-kernels`
/// under the current directory (a packed folder's root).
fn bin_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LK_CLI_BIN") {
        return PathBuf::from(p);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_lora-kernels"));
    let packed = PathBuf::from("bin/lora-kernels");
    if !built.exists() && packed.exists() {
        return packed;
    }
    built
}

fn bin() -> Command {
    Command::new(bin_path())
}

/// A fresh empty directory under the target dir's tmp, or the system temp dir where the build tree
/// is absent (a test binary copied to another machine).
fn scratch(name: &str) -> PathBuf {
    let leaf = format!("lk-cli-{name}-{}", std::process::id());
    let built = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = if built.is_dir() {
        built.join(&leaf)
    } else {
        std::env::temp_dir().join(&leaf)
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fx(p: &str) -> String {
    common::fixture(p).to_str().unwrap().to_string()
}

fn agreement(got: &Path, want: &str) -> (Agreement, usize) {
    let got = std::fs::read(got).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = Fixture::open(want);
    let mut acc = Agreement::default();
    let mut identical = 0;
    for name in want.names() {
        let g: Vec<half::bf16> = bytemuck::pod_collect_to_vec(got.tensor(&name).unwrap().data());
        let w = want.bf16(&name).0;
        if g == w {
            identical += 1;
        }
        compare(&g, &w, &mut acc);
    }
    (acc, identical)
}

#[test]
fn merge_reproduces_peft_and_unmerge_matches_f64() {
    let dir = scratch("merge");
    let merged = dir.join("merged.safetensors");
    let (ok, stdout, stderr) = run(&[
        "merge",
        "--base",
        &fx("base.safetensors"),
        "--adapter",
        &fx("adapter"),
        "--out",
        merged.to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("merged 8 modules") && stdout.contains("6 tensors copied"),
        "{stdout}"
    );
    let (acc, identical) = agreement(&merged, "merged.safetensors");
    let frac = acc.exact as f64 / acc.total as f64;
    eprintln!(
        "CLI merge vs PEFT: {}/{} bit-exact, max {} ulp",
        acc.exact, acc.total, acc.max_ulp
    );
    assert!(frac >= 0.9999 && acc.max_ulp <= 1);
    assert!(identical >= 6, "every untargeted tensor identical");
    // Untargeted tensors: byte-identical to the base.
    let base = Fixture::open("base.safetensors");
    let out_bytes = std::fs::read(&merged).unwrap();
    let out = safetensors::SafeTensors::deserialize(&out_bytes).unwrap();
    for name in [
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
    ] {
        assert_eq!(
            out.tensor(name).unwrap().data(),
            base.tensors().tensor(name).unwrap().data()
        );
    }

    let back = dir.join("unmerged.safetensors");
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        &fx("merged.safetensors"),
        "--adapter",
        &fx("adapter"),
        "--out",
        back.to_str().unwrap(),
        "--unmerge",
        "--device",
        "emu",
    ]);
    assert!(ok, "{stderr}");
    let (acc, _) = agreement(&back, "expected_unmerged.safetensors");
    assert!(acc.exact as f64 / acc.total as f64 >= 0.9999 && acc.max_ulp <= 1);
}

/// A DoRA adapter saved by PEFT (tests/fixtures/peft/dora): the CLI's merge reproduces PEFT's
/// `merge_and_unload` (≥ 99.99 % bit-exact, ≤ 1 ulp), `--verify` finds no element off, `inspect` says
/// DoRA, the adapter saves and loads back identical (magnitude vectors 1-D), and the refusals: an
/// unmerge (the merged checkpoint does not keep the rows' factors), a module without its magnitude
/// vector, a magnitude vector of the wrong length, one in an adapter whose config does not set
/// `use_dora`, and the adapter-set loader without the base weight (a DoRA module's factors need it); the
/// layer loads it, and the set with the base weight (`add_peft_module_with_base`).
#[test]
fn dora_adapters_merge_as_peft_does() {
    let dir = scratch("dora");
    let merged = dir.join("merged.safetensors");
    let (ok, stdout, stderr) = run(&[
        "merge",
        "--base",
        &fx("base.safetensors"),
        "--adapter",
        &fx("dora/adapter"),
        "--out",
        merged.to_str().unwrap(),
        "--device",
        "emu",
        "--verify",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("merged 8 modules"), "{stdout}");
    assert!(
        stderr.contains("verify: 0 of 40960 merged elements off")
            || stdout.contains("verify: 0 of 40960 merged elements off"),
        "{stdout}{stderr}"
    );
    let (acc, identical) = agreement(&merged, "dora/merged.safetensors");
    eprintln!(
        "CLI DoRA merge vs PEFT: {}/{} bit-exact, max {} ulp",
        acc.exact, acc.total, acc.max_ulp
    );
    assert!(acc.exact as f64 / acc.total as f64 >= 0.9999 && acc.max_ulp <= 1);
    assert!(identical >= 6, "every untargeted tensor identical");

    // plain LoRA with the same A, B (the magnitudes ignored) is not PEFT's DoRA merge
    let plain = adapter_copy_of(&dir.join("plain"), "dora/adapter", |c| {
        c["use_dora"] = false.into()
    });
    let stripped = dir.join("plain/adapter/adapter_model.safetensors");
    strip_tensors(&stripped, |n| n.ends_with("lora_magnitude_vector"));
    let plain_out = dir.join("plain.safetensors");
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        &fx("base.safetensors"),
        "--adapter",
        plain.to_str().unwrap(),
        "--out",
        plain_out.to_str().unwrap(),
        "--device",
        "emu",
        "--quiet",
    ]);
    assert!(ok, "{stderr}");
    let (acc, _) = agreement(&plain_out, "dora/merged.safetensors");
    assert!(
        acc.exact * 2 < acc.total,
        "a plain merge must not pass for DoRA's"
    );

    let (ok, stdout, stderr) = run(&["inspect", "--adapter", &fx("dora/adapter")]);
    assert!(ok && stdout.contains("DoRA = true"), "{stdout}{stderr}");
    assert!(
        stdout.contains("| 5 | 16 | 3.2 |") && stdout.contains("| 8 | 4 | 0.5 |"),
        "{stdout}"
    );

    let a = PeftAdapter::load(&common::fixture("dora/adapter")).unwrap();
    assert!(a.config.use_dora && a.modules.iter().all(|m| m.magnitude.is_some()));
    a.save(&dir.join("saved")).unwrap();
    assert_eq!(PeftAdapter::load(&dir.join("saved")).unwrap(), a);
    let saved = std::fs::read(dir.join("saved/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&saved).unwrap();
    let v = st
        .tensor("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector")
        .unwrap();
    assert_eq!(v.shape(), &[96], "saved 1-D, as PEFT");

    let out = dir.join("refused.safetensors");
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        &fx("dora/merged.safetensors"),
        "--adapter",
        &fx("dora/adapter"),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "emu",
        "--unmerge",
    ]);
    assert!(
        !ok && stderr.contains("an unmerge of a DoRA adapter"),
        "{stderr}"
    );
    assert!(!out.exists());

    let missing = adapter_copy_of(&dir.join("missing"), "dora/adapter", |_| {});
    strip_tensors(&missing.join("adapter_model.safetensors"), |n| {
        n == "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    });
    merge_fails(
        &common::fixture("base.safetensors"),
        &missing,
        &out,
        "model.layers.1.self_attn.q_proj.lora_magnitude_vector` (the config sets `use_dora`)",
    );
    let short = adapter_copy_of(&dir.join("short"), "dora/adapter", |_| {});
    edit_tensors(&short.join("adapter_model.safetensors"), |t| {
        for (n, (_, shape, bytes)) in t.iter_mut() {
            if n.ends_with("layers.0.mlp.up_proj.lora_magnitude_vector") {
                shape[0] -= 1;
                bytes.truncate(bytes.len() - 4);
            }
        }
    });
    merge_fails(
        &common::fixture("base.safetensors"),
        &short,
        &out,
        "the DoRA magnitude vector has 95 elements, lora_B 96 rows",
    );
    let undeclared = adapter_copy_of(&dir.join("undeclared"), "dora/adapter", |c| {
        c["use_dora"] = false.into()
    });
    merge_fails(
        &common::fixture("base.safetensors"),
        &undeclared,
        &out,
        "is a DoRA magnitude vector, but the config does not set `use_dora`",
    );

    // adapters built or edited through the API: the modules and the config must agree, and a
    // magnitude of the wrong length is refused before any work (never a panic), merging and verifying
    use lora_kernels::checkpoint::{merge_checkpoint, verify_merge};
    let dev = lora_kernels::Device::emulator();
    let base = common::fixture("base.safetensors");
    let mut undeclared = a.clone();
    undeclared.config.use_dora = false;
    let mut bare = a.clone();
    bare.modules[3].magnitude = None;
    let mut short = a.clone();
    let v = short.modules[2].magnitude.as_mut().unwrap();
    v.cols -= 1;
    v.bytes.truncate(v.bytes.len() - 4);
    for (adapter, want, want_unmerge) in [
        (
            &undeclared,
            "has a DoRA magnitude vector but the config's use_dora is false",
            "has a DoRA magnitude vector but the config's use_dora is false",
        ),
        (
            &bare,
            "has no DoRA magnitude vector but the config's use_dora is true",
            "has no DoRA magnitude vector but the config's use_dora is true",
        ),
        (
            &short,
            "DoRA magnitude 63 elements",
            "an unmerge of a DoRA adapter",
        ),
    ] {
        for (unmerge, want) in [(false, want), (true, want_unmerge)] {
            let e = merge_checkpoint(&base, adapter, &out, &dev, unmerge, &mut ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "unmerge {unmerge}: {e}");
            assert!(!out.exists());
        }
        let e = verify_merge(&base, adapter, &merged, false, &mut ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "verify: {e}");
    }
    let module = "model.layers.0.self_attn.q_proj";
    let mut set = lora_kernels::AdapterSet::<f32>::new(&dev, 64, 64).unwrap();
    let e = set.add_peft_module(&a, module).unwrap_err().to_string();
    assert!(
        e.contains("DoRA") && e.contains("add_peft_module_with_base"),
        "{e}"
    );
    let base = lora_kernels::Tensor::<half::bf16>::from_slice(
        &dev,
        &vec![half::bf16::ONE; 64 * 64],
        &[64, 64],
    )
    .unwrap();
    let slot = set.add_peft_module_with_base(&a, module, &base).unwrap();
    assert!(set.is_dora(slot));
    let w0 = lora_kernels::Tensor::<half::bf16>::zeros(&dev, &[64, 64]).unwrap();
    let mut layer = lora_kernels::LoraLinear::with_f32_adapters(w0, None).unwrap();
    // a layer runs DoRA's layer unmerged (tests/dora_linear.rs)
    layer.insert_peft_module("d", &a, module).unwrap();
    assert!(layer.adapter("d").unwrap().is_dora());
    // an API-built adapter whose module and config disagree is refused by the layer too
    let e = layer
        .insert_peft_module("u", &undeclared, module)
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_dora is false"), "{e}");
}

/// A copy of fixture adapter `from` (e.g. `dora/adapter`) under `dir/adapter`, its config edited.
fn adapter_copy_of(dir: &Path, from: &str, config: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let a = dir.join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    let src = common::fixture(from);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut cfg);
    std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        a.join("adapter_model.safetensors"),
    )
    .unwrap();
    a
}

type OwnedTensors = Vec<(String, (safetensors::Dtype, Vec<usize>, Vec<u8>))>;

/// Rewrites safetensors file `path` after `edit` changed its tensors.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut OwnedTensors)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: OwnedTensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut owned);
    let views: Vec<_> = owned
        .iter()
        .map(|(n, (d, s, b))| {
            let v = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Removes the tensors whose name `drop` selects from safetensors file `path`.
fn strip_tensors(path: &Path, drop: impl Fn(&str) -> bool) {
    edit_tensors(path, |t| t.retain(|(n, _)| !drop(n)));
}

#[test]
fn sharded_checkpoint_is_merged_shard_by_shard() {
    let dir = scratch("sharded");
    // the fixture base split into two shards with an index, as transformers writes them
    let base_dir = sharded_base(&dir);
    let out = dir.join("out");
    let (ok, stdout, stderr) = run(&[
        "merge",
        "--base",
        base_dir.to_str().unwrap(),
        "--adapter",
        &fx("adapter"),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("3 files"), "{stdout}");
    assert!(out.join("model.safetensors.index.json").is_file());
    let merged = Fixture::open("merged.safetensors");
    let mut acc = Agreement::default();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let bytes = std::fs::read(out.join(shard)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            let g: Vec<half::bf16> = bytemuck::pod_collect_to_vec(t.data());
            compare(&g, &merged.bf16(&name).0, &mut acc);
        }
    }
    assert_eq!(
        acc.total,
        merged
            .names()
            .iter()
            .map(|n| merged.bf16(n).0.len())
            .sum::<usize>()
    );
    assert!(acc.exact as f64 / acc.total as f64 >= 0.9999 && acc.max_ulp <= 1);
    // An existing output directory is refused.
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        base_dir.to_str().unwrap(),
        "--adapter",
        &fx("adapter"),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
}

#[test]
fn saved_adapter_loads_back_identical() {
    let a = PeftAdapter::load(&common::fixture("adapter")).unwrap();
    let dir = scratch("save");
    a.save(&dir).unwrap();
    let b = PeftAdapter::load(&dir).unwrap();
    assert_eq!(a, b);
}

#[test]
fn inspect_lists_modules() {
    let (ok, stdout, stderr) = run(&["inspect", "--adapter", &fx("adapter")]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("model.layers.0.self_attn.q_proj") && stdout.contains("8 modules"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| 8 | 16 | 2 |"),
        "rank 8, alpha 16, scale 2: {stdout}"
    );
}

#[test]
fn plan_reproduces_the_papers_figures() {
    let (ok, stdout, stderr) = run(&[
        "plan",
        "--preset",
        "gpt3-175b",
        "--rank",
        "1",
        "--rank",
        "4",
        "--rank",
        "8",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| LoRA r = 1 | 4.7M |"), "{stdout}");
    assert!(stdout.contains("| LoRA r = 8 | 37.7M |"), "{stdout}");
    assert!(
        stdout.contains("| LoRA r = 4 | 18.9M | 37.7M B |"),
        "{stdout}"
    );
    assert!(stdout.contains("350.0G B in fp16"), "{stdout}");
    let (ok, _, stderr) = run(&["plan", "--preset", "gpt9"]);
    assert!(!ok && stderr.contains("unknown preset `gpt9`"), "{stderr}");
    // counts that would overflow 64-bit bytes: refused, not wrapped (or a panic)
    let cases: [&[&str]; 4] = [
        &["--layers", "96", "--d-model", "1e19", "--params", "7e9"],
        &["--layers", "96", "--d-model", "4096", "--params", "3e18"],
        &["--layers", "1e19", "--d-model", "1e19", "--params", "1"],
        &[
            "--layers",
            "1",
            "--d-model",
            "1e19",
            "--params",
            "1",
            "--rank",
            "18446744073709551615",
        ],
    ];
    for args in cases {
        let (ok, stdout, stderr) = run(&[&["plan"][..], args].concat());
        assert!(!ok && stdout.is_empty(), "{args:?}: {stdout}");
        assert!(stderr.contains("too large to plan"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Copies the fixture adapter into `dir`, letting `edit` change its config or tensors.
fn adapter_copy(dir: &Path, config: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    adapter_copy_of(dir, "adapter", config)
}

/// Runs a merge that must fail: non-zero exit, message containing `want`, no output file, base intact.
fn merge_fails(base: &Path, adapter: &Path, out: &Path, want: &str) {
    let before = std::fs::read(base).ok();
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(!ok, "merge should fail with `{want}`");
    assert!(stderr.contains(want), "expected `{want}` in: {stderr}");
    assert!(
        !out.exists(),
        "no partial output may be left at {}",
        out.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    assert_eq!(std::fs::read(base).ok(), before, "the base must not change");
}

#[test]
fn error_paths_are_clear_and_leave_nothing() {
    let dir = scratch("errors");
    let base = common::fixture("base.safetensors");
    let out = dir.join("out.safetensors");

    // a pattern's value that is not what PEFT writes there: refused, naming the entry (8.5 was read as 8)
    for (key, value, want) in [
        (
            "rank_pattern",
            serde_json::json!(8.5),
            "an integer rank from 1 to 2^32 - 1",
        ),
        (
            "rank_pattern",
            serde_json::json!(-3),
            "an integer rank from 1 to 2^32 - 1",
        ),
        (
            "rank_pattern",
            serde_json::json!(0),
            "an integer rank from 1 to 2^32 - 1",
        ),
        ("alpha_pattern", serde_json::json!("16"), "a number"),
    ] {
        let a = adapter_copy(&dir.join(format!("pattern-{key}-{value}")), |c| {
            c[key] = serde_json::json!({ "up_proj": value });
        });
        merge_fails(
            &base,
            &a,
            &out,
            &format!("`{key}` entry `up_proj` is {value}: expected {want}"),
        );
    }
    // an integral rank written as a float (8.0) is that rank
    let a = adapter_copy(&dir.join("pattern-float-rank"), |c| {
        c["rank_pattern"] = serde_json::json!({ "up_proj": 8.0 });
    });
    let loaded = PeftAdapter::load(&a).unwrap();
    assert_eq!(loaded.config.rank_pattern.get("up_proj"), Some(&8));
    // and so is `r` itself
    let a = adapter_copy(&dir.join("float-r"), |c| c["r"] = serde_json::json!(8.0));
    assert_eq!(PeftAdapter::load(&a).unwrap().config.r, 8);
    // and `r` is refused as the patterns' ranks are: not rounded, not wrapped, not over 2^32 - 1
    for value in [
        serde_json::json!(8.5),
        serde_json::json!(-1),
        serde_json::json!(1u64 << 32),
        serde_json::json!("8"),
    ] {
        let a = adapter_copy(&dir.join(format!("bad-r-{value}")), |c| {
            c["r"] = value.clone()
        });
        merge_fails(
            &base,
            &a,
            &out,
            "missing `r`, or not an integer from 0 to 2^32 - 1",
        );
    }
    // nor is a pattern's rank of 2^32
    let a = adapter_copy(&dir.join("pattern-huge-rank"), |c| {
        c["rank_pattern"] = serde_json::json!({ "up_proj": 1u64 << 32 });
    });
    merge_fails(
        &base,
        &a,
        &out,
        "`rank_pattern` entry `up_proj` is 4294967296: expected an integer rank from 1 to 2^32 - 1",
    );

    // rank of the config disagrees with the tensors
    let a = adapter_copy(&dir.join("r"), |c| c["r"] = 4.into());
    merge_fails(&base, &a, &out, "rank for it is 4");

    // adapter/base shape mismatch: the fixture adapter against a base whose down_proj [64, 96] is
    // [32, 192] (stored [96, 64], it would be a Conv1D's: see fan_in_fan_out_adapters_merge_as_peft_does)
    let st_bytes = std::fs::read(&base).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let mut views = st.tensors();
    for (name, v) in views.iter_mut() {
        if name == "model.layers.0.mlp.down_proj.weight" {
            *v = safetensors::tensor::TensorView::new(v.dtype(), vec![32, 192], v.data()).unwrap();
        }
    }
    let bad_base = dir.join("bad_shape.safetensors");
    std::fs::write(&bad_base, safetensors::serialize(views, None).unwrap()).unwrap();
    merge_fails(
        &bad_base,
        &common::fixture("adapter"),
        &out,
        "shape mismatch",
    );

    // a target module missing from the base
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("layers.1.self_attn.v_proj"))
        .collect();
    let missing = dir.join("missing.safetensors");
    std::fs::write(&missing, safetensors::serialize(views, None).unwrap()).unwrap();
    merge_fails(
        &missing,
        &common::fixture("adapter"),
        &out,
        "is missing from the base",
    );

    // corrupt and truncated files
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &st_bytes[..st_bytes.len() / 2]).unwrap();
    merge_fails(
        &truncated,
        &common::fixture("adapter"),
        &out,
        "corrupt or truncated",
    );
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    merge_fails(
        &garbage,
        &common::fixture("adapter"),
        &out,
        "corrupt or truncated",
    );

    // unknown dtype of a targeted weight
    let mut views = st.tensors();
    for (name, v) in views.iter_mut() {
        if name == "model.layers.0.self_attn.q_proj.weight" {
            *v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::I16,
                vec![64, 64],
                v.data(),
            )
            .unwrap();
        }
    }
    let int_base = dir.join("int.safetensors");
    std::fs::write(&int_base, safetensors::serialize(views, None).unwrap()).unwrap();
    merge_fails(&int_base, &common::fixture("adapter"), &out, "dtype I16");

    // unsupported adapters
    // use_dora on a plain adapter: its modules have no magnitude vector
    for (edit, want) in [
        (
            "use_dora",
            "lora_magnitude_vector` (the config sets `use_dora`)",
        ),
        // the fixture's weights are nn.Linear's (its up_proj [96, 64] is stored out × in), so the
        // flag says the adapter mixes both kinds: its square weights' layout is unknown
        (
            "fan_in_fan_out",
            "has a square weight, whose layout (a Conv1D's in × out or an nn.Linear's out × in) its shape cannot tell: the adapter mixes both kinds",
        ),
    ] {
        let a = adapter_copy(&dir.join(edit), |c| c[edit] = true.into());
        merge_fails(&base, &a, &out, want);
    }
    let bin_dir = dir.join("bin");
    let a = adapter_copy(&bin_dir, |_| {});
    std::fs::rename(
        a.join("adapter_model.safetensors"),
        a.join("adapter_model.bin"),
    )
    .unwrap();
    merge_fails(&base, &a, &out, "adapter_model.bin");

    // unwritable output: a path inside a regular file
    let blocker = dir.join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        &fx("adapter"),
        "--out",
        blocker.join("out.safetensors").to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(!ok && stderr.contains("out.safetensors"), "{stderr}");

    // usage errors: see `usage_errors_are_one_line`
    let (ok, _, stderr) = run(&["merge", "--base", "x"]);
    assert!(!ok && stderr.contains("missing --adapter"), "{stderr}");
    let (ok, _, stderr) = run(&["frobnicate"]);
    assert!(!ok && stderr.contains("unknown command"), "{stderr}");
}

/// Runs `args`, which must fail as a usage error: exit status 2, one line on stderr naming `want`,
/// nothing on stdout.
fn usage_error(args: &[&str], want: &str) {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: output on stdout");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
    assert!(
        stderr.starts_with("lora-kernels: error: ") && stderr.contains(want),
        "{args:?}: expected `{want}` in: {stderr}"
    );
}

#[test]
fn usage_errors_are_one_line() {
    let base = fx("base.safetensors");
    let adapter = fx("adapter");
    let merge = ["merge", "--base", &base, "--adapter", &adapter];
    // a required option missing, or its value missing
    usage_error(
        &["merge", "--base", "x"],
        "missing --adapter <DIR>, --out <PATH>",
    );
    usage_error(&merge, "missing --out <PATH>");
    usage_error(
        &[&merge[..], &["--out"]].concat(),
        "a value is required for '--out <PATH>'",
    );
    usage_error(&["inspect"], "missing --adapter <DIR>");
    // unknown options, commands and values
    let out = ["--out", "/nonexistent/x.safetensors"];
    usage_error(
        &[&merge[..], &out, &["--frobnicate"]].concat(),
        "unknown option --frobnicate (see `lora-kernels merge --help`)",
    );
    usage_error(
        &[&merge[..], &out, &["--verfy"]].concat(),
        "unknown option --verfy (did you mean --verify?)",
    );
    usage_error(
        &[&merge[..], &out, &["stray"]].concat(),
        "unexpected argument `stray`",
    );
    usage_error(
        &["frobnicate"],
        "unknown command `frobnicate`: the commands are merge, inspect, plan and help (see `lora-kernels --help`)",
    );
    usage_error(
        &[&merge[..], &out, &["--device", "tpu"]].concat(),
        "invalid value 'tpu' for '--device <DEVICE>' [possible values: auto, cuda, emu]",
    );
    usage_error(&["plan", "--preset", "gpt9"], "unknown preset `gpt9`");
    usage_error(
        &["plan", "--preset", "gpt3-175b", "--rank", "0"],
        "invalid value '0' for '--rank <R>': must be a positive integer",
    );
    usage_error(
        &[
            "plan",
            "--layers",
            "abc",
            "--d-model",
            "8",
            "--params",
            "1e6",
        ],
        "invalid value 'abc' for '--layers <L>': must be a positive number",
    );
    usage_error(
        &["plan", "--layers", "2"],
        "missing --d-model <D>, --params <P>",
    );
    usage_error(
        &["plan", "--preset", "gpt3-175b", "--layers", "2"],
        "cannot be used with",
    );
    // no arguments at all: the help, on stderr, and a failure
    let out = bin().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("Usage: lora-kernels <COMMAND>"), "{stderr}");
}

#[test]
fn help_and_version() {
    let (ok, stdout, stderr) = run(&["--help"]);
    assert!(ok, "{stderr}");
    for want in [
        "Usage: lora-kernels <COMMAND>",
        "merge",
        "inspect",
        "plan",
        "--version",
    ] {
        assert!(stdout.contains(want), "`{want}` in: {stdout}");
    }
    let (ok, stdout, _) = run(&["--version"]);
    assert!(ok);
    assert!(
        stdout.starts_with(&format!("lora-kernels {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(stdout.contains("CUDA kernels: "), "{stdout}");
    let (ok, stdout, _) = run(&["-V"]);
    assert!(ok && stdout.trim() == format!("lora-kernels {}", env!("CARGO_PKG_VERSION")));
    // `help merge` and `merge --help`: every option, its default, the --verify definition
    let (ok, help, stderr) = run(&["help", "merge"]);
    assert!(ok, "{stderr}");
    let (ok, same, _) = run(&["merge", "--help"]);
    assert!(ok);
    assert_eq!(help, same);
    for want in [
        "Usage: lora-kernels merge [OPTIONS] --base <FILE|DIR> --adapter <DIR> --out <PATH>",
        "--unmerge",
        "--device <DEVICE>",
        "[default: auto]",
        "emu:",
        "--verify",
        "[round(x − e), round(x + e)]",
        "--allow-nonfinite",
        "as PEFT's safe_merge",
        "--quiet",
    ] {
        assert!(help.contains(want), "`{want}` in: {help}");
    }
    let (ok, help, _) = run(&["help", "plan"]);
    assert!(ok && help.contains("[default: 1,4,8]"), "{help}");
    assert!(help.contains("gpt3-175b"), "{help}");
    let (ok, help, _) = run(&["help", "inspect"]);
    assert!(ok && help.contains("--adapter <DIR>"), "{help}");
}

fn fixture_merge(dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = dir.join(format!("m{}.safetensors", extra.join("")));
    let _ = std::fs::remove_file(&out);
    let (base, adapter) = (fx("base.safetensors"), fx("adapter"));
    let args = [
        &[
            "merge",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "emu",
        ][..],
        extra,
    ]
    .concat();
    run(&args)
}

#[test]
fn progress_is_plain_lines_off_a_terminal_and_nothing_with_quiet() {
    let dir = scratch("progress");
    // stderr is a pipe here: plain lines, no bar (no carriage returns or escape sequences)
    let (ok, stdout, stderr) = fixture_merge(&dir, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("merged 8 modules"), "{stdout}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("  [8/8] model.layers.1.self_attn.v_proj: 80.00 KiB of 80.00 KiB, "),
        "{stderr}"
    );
    assert!(stderr.lines().all(|l| l.starts_with("  [")), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
    // the verify pass reports the same way
    let (ok, _, stderr) = fixture_merge(&dir, &["--verify"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("\n  verify [8/8] model.layers.1.self_attn.v_proj: 80.00 KiB of 80.00 KiB"),
        "{stderr}"
    );
    // --quiet: nothing on stderr, the summary still on stdout
    for quiet in ["--quiet", "-q"] {
        let (ok, stdout, stderr) = fixture_merge(&dir, &[quiet, "--verify"]);
        assert!(ok && stderr.is_empty(), "{stderr}");
        assert!(stdout.starts_with("merged 8 modules"), "{stdout}");
        assert!(stdout.contains("verify: 0 of 40960"), "{stdout}");
    }
}

#[test]
fn verify_finds_no_element_off_on_the_peft_fixtures() {
    let dir = scratch("verify");
    let merged = dir.join("merged.safetensors");
    let (ok, stdout, stderr) = run(&[
        "merge",
        "--base",
        &fx("base.safetensors"),
        "--adapter",
        &fx("adapter"),
        "--out",
        merged.to_str().unwrap(),
        "--device",
        "emu",
        "--verify",
    ]);
    assert!(ok, "{stderr}");
    eprintln!("{stdout}");
    assert!(
        stdout.contains(
            "verify: 0 of 40960 merged elements off by more than one rounding from the exact (f64) merge"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("worst"), "{stdout}");
    // unmerging PEFT's merged checkpoint: exact value W − s·B·A
    let back = dir.join("unmerged.safetensors");
    let (ok, stdout, stderr) = run(&[
        "merge",
        "--base",
        &fx("merged.safetensors"),
        "--adapter",
        &fx("adapter"),
        "--out",
        back.to_str().unwrap(),
        "--unmerge",
        "--device",
        "emu",
        "--verify",
        "--quiet",
    ]);
    assert!(ok, "{stderr}");
    eprintln!("{stdout}");
    assert!(
        stdout.contains(
            "verify: 0 of 40960 unmerged elements off by more than one rounding from the exact (f64) unmerge"
        ),
        "{stdout}"
    );
}

#[test]
fn verify_counts_a_planted_error() {
    use lora_kernels::checkpoint::{merge_checkpoint, verify_merge};
    let dir = scratch("verify-planted");
    let out = dir.join("m.safetensors");
    let adapter = PeftAdapter::load(&common::fixture("adapter")).unwrap();
    let base = common::fixture("base.safetensors");
    let dev = lora_kernels::Device::emulator();
    merge_checkpoint(&base, &adapter, &out, &dev, false, &mut ()).unwrap();
    let clean = verify_merge(&base, &adapter, &out, false, &mut ()).unwrap();
    assert_eq!((clean.elements, clean.off, clean.max_ulp), (40960, 0, 0));
    // Two ulps added to one merged element (bf16 bits + 2 for a positive value): off by two roundings.
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let mut views = st.tensors();
    let mut data: Vec<half::bf16> = Vec::new();
    let mut at = 0;
    for (n, v) in views.iter_mut() {
        if n == name {
            data = bytemuck::pod_collect_to_vec(v.data());
            at = data.iter().position(|x| x.to_f32() > 0.0).unwrap();
            data[at] = half::bf16::from_bits(data[at].to_bits() + 2);
        }
    }
    let views: Vec<_> = views
        .into_iter()
        .map(|(n, v)| {
            if n == name {
                let t = safetensors::tensor::TensorView::new(
                    v.dtype(),
                    v.shape().to_vec(),
                    bytemuck::cast_slice(&data),
                )
                .unwrap();
                (n, t)
            } else {
                (n, v)
            }
        })
        .collect();
    std::fs::write(&out, safetensors::serialize(views, None).unwrap()).unwrap();
    let v = verify_merge(&base, &adapter, &out, false, &mut ()).unwrap();
    assert_eq!((v.elements, v.off, v.max_ulp), (40960, 1, 2));
    assert_eq!(v.correctly_rounded, 40959);
    let worst = v.worst.unwrap();
    assert_eq!(
        (worst.tensor.as_str(), worst.index, worst.ulp),
        (name, at, 2)
    );
}

/// Merges `adapter` into `base` with the CLI (`--verify`, plus `extra`) into `out` and checks it against
/// PEFT's merged checkpoint fixture `want`: `modules` merged, `--verify` finds none of the `targeted`
/// elements off, at most `max_off` of them not bit-exact with PEFT's and those within 1 ulp, and
/// every other tensor identical.
fn merges_as_peft(
    base: &str,
    adapter: &str,
    out: &Path,
    extra: &[&str],
    want: &str,
    (modules, targeted, max_off): (usize, usize, usize),
) {
    let _ = std::fs::remove_file(out);
    let mut args = vec![
        "merge",
        "--base",
        base,
        "--adapter",
        adapter,
        "--out",
        out.to_str().unwrap(),
        "--device",
        "emu",
        "--quiet",
        "--verify",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{adapter}: {stderr}");
    let what = if extra.contains(&"--unmerge") {
        "unmerged"
    } else {
        "merged"
    };
    assert!(
        stdout.contains(&format!("{what} {modules} modules"))
            && stdout.contains(&format!("verify: 0 of {targeted} {what} elements off")),
        "{adapter}: {stdout}"
    );
    let (acc, identical) = agreement(out, want);
    eprintln!(
        "{adapter} vs PEFT: {}/{} bit-exact, max {} ulp",
        acc.exact, acc.total, acc.max_ulp
    );
    // every element of the checkpoint is compared: the ones off are targeted ones
    let off = acc.total - acc.exact;
    assert!(
        off <= max_off && acc.max_ulp <= 1,
        "{adapter}: {off} of {targeted} off, max {} ulp",
        acc.max_ulp
    );
    let tensors = Fixture::open(want).names().len();
    assert!(
        identical >= tensors - modules,
        "{adapter}: every untargeted tensor identical"
    );
}

/// `fan_in_fan_out` (tests/fixtures/peft/fan_in_fan_out: a GPT-2-shaped model, whose Conv1D weights are
/// stored in × out, with LoRA and DoRA adapters PEFT 0.21.2 made and merged): the merge reproduces
/// PEFT's (≥ 99.99 % of the targeted elements bit-exact, ≤ 1 ulp; every other tensor identical),
/// `--verify` finds nothing off, `--unmerge --verify` of the plain adapter from PEFT's merge matches the
/// f64 unmerge, and the same adapter read as `nn.Linear` weights (the flag off) is refused by shape.
/// Square (attn.c_proj) and both non-square orientations (c_attn, c_fc: in < out; mlp.c_proj: in > out).
#[test]
fn fan_in_fan_out_adapters_merge_as_peft_does() {
    let dir = scratch("fan-in-fan-out");
    let base = fx("fan_in_fan_out/base.safetensors");
    // 2 layers of c_attn 64×192, c_proj 64×64, c_fc 64×256, mlp.c_proj 256×64
    let targeted = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64);
    // PEFT's fixture DoRA merge has one element 1 ulp off this one
    for (adapter, want, max_off) in [
        (
            "fan_in_fan_out/adapter",
            "fan_in_fan_out/merged.safetensors",
            0,
        ),
        (
            "fan_in_fan_out/dora_adapter",
            "fan_in_fan_out/dora_merged.safetensors",
            1,
        ),
    ] {
        let out = dir.join(want.replace('/', "-"));
        merges_as_peft(&base, &fx(adapter), &out, &[], want, (8, targeted, max_off));
    }
    let back = dir.join("unmerged.safetensors");
    let (ok, stdout, stderr) = run(&[
        "merge",
        "--base",
        &fx("fan_in_fan_out/merged.safetensors"),
        "--adapter",
        &fx("fan_in_fan_out/adapter"),
        "--out",
        back.to_str().unwrap(),
        "--device",
        "emu",
        "--unmerge",
        "--verify",
        "--quiet",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("verify: 0 of {targeted} unmerged elements off")),
        "{stdout}"
    );
    // verify names an element off by its index in the stored (in × out) tensor
    let planted = dir.join("fan_in_fan_out-merged.safetensors");
    let name = "h.1.attn.c_attn.weight";
    let at = 64 * 192 - 200; // row 62 of 64 (in), column 184 of 192 (out)
    edit_tensors(&planted, |t| {
        let (_, (_, _, b)) = t.iter_mut().find(|(n, _)| n == name).unwrap();
        let v = u16::from_le_bytes([b[2 * at], b[2 * at + 1]]) ^ 0x0004;
        b[2 * at..2 * at + 2].copy_from_slice(&v.to_le_bytes());
    });
    let adapter = PeftAdapter::load(&common::fixture("fan_in_fan_out/adapter")).unwrap();
    let v = lora_kernels::checkpoint::verify_merge(
        Path::new(&base),
        &adapter,
        &planted,
        false,
        &mut (),
    )
    .unwrap();
    assert_eq!(v.off, 1);
    let worst = v.worst.unwrap();
    assert_eq!((worst.tensor.as_str(), worst.index), (name, at));

    // the flag as PEFT saves it for an adapter of both kinds: the last layer it wrapped's. Non-square
    // weights go by their shape, square ones are GPT-2's Conv1D by name in a GPT-2 checkpoint (its
    // c_attn stored [in, 3·in]): the merge is PEFT's, which decides per layer from its type
    let off_flag = adapter_copy_of(&dir.join("flag-off"), "fan_in_fan_out/adapter", |c| {
        c["fan_in_fan_out"] = false.into()
    });
    let mixed = fx("fan_in_fan_out/mixed/adapter");
    let out = dir.join("per-layer.safetensors");
    let want = "fan_in_fan_out/merged.safetensors";
    merges_as_peft(
        &base,
        off_flag.to_str().unwrap(),
        &out,
        &[],
        want,
        (8, targeted, 0),
    );
    // 2 layers of attn.c_proj 64×64 and c_fc 64×256, and score 3×64
    let mixed_targeted = 2 * (64 * 64 + 64 * 256) + 3 * 64;
    let mixed_base = fx("fan_in_fan_out/mixed/base.safetensors");
    let want = "fan_in_fan_out/mixed/merged.safetensors";
    merges_as_peft(&mixed_base, &mixed, &out, &[], want, (5, mixed_targeted, 0));
    // the flag on where the checkpoint shows no Conv1D (square nn.Linear q_proj, v_proj beside an
    // embedding): PEFT decides from the layer's type; here refused, not transposed
    let llama = adapter_copy_of(&dir.join("flag-on"), "embedding/adapter", |c| {
        c["fan_in_fan_out"] = true.into()
    });
    merge_fails(
        &common::fixture("embedding/base.safetensors"),
        &llama,
        &dir.join("flag-on.safetensors"),
        "its shape cannot tell: the config's fan_in_fan_out is set, but the checkpoint does not show this layer is a Conv1D",
    );
    let mixed = PeftAdapter::load(Path::new(&mixed)).unwrap();
    assert!(
        !mixed.config.fan_in_fan_out,
        "PEFT saved the Linear head's flag"
    );
}

/// LoRA on an embedding layer (tests/fixtures/peft/embedding: PEFT 0.21.2's LoRA and DoRA adapters of a
/// Llama model targeting embed_tokens, q_proj and v_proj, with another rank and alpha for the
/// embeddings): `lora_embedding_A` [r, vocabulary] and `lora_embedding_B` [dim, r] merge as PEFT's
/// `transpose(B·A)` (the DoRA norms over each dim's column), PEFT's merges reproduced (≥ 99.99 % of
/// the targeted elements bit-exact, ≤ 1 ulp, every other tensor identical), `--verify` and `--unmerge
/// --verify` find nothing off; the base weight PEFT saves beside an embedding's LoRA is the one merged
/// into (a checkpoint whose embeddings differ still gives PEFT's merge, as PEFT's load replaces them),
/// and one of another shape is refused; save and load keep the names; the linear layers refuse it.
#[test]
fn embedding_adapters_merge_as_peft_does() {
    let dir = scratch("embedding");
    let base = fx("embedding/base.safetensors");
    // embed_tokens 72×64 and 2 layers of q_proj, v_proj 64×64
    let targeted = 72 * 64 + 4 * 64 * 64;
    let merge = |base: &str, adapter: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--base",
            base,
            "--adapter",
            adapter,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "emu",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    for (adapter, want) in [
        ("embedding/adapter", "embedding/merged.safetensors"),
        (
            "embedding/dora_adapter",
            "embedding/dora_merged.safetensors",
        ),
    ] {
        let out = dir.join(want.replace('/', "-"));
        merges_as_peft(&base, &fx(adapter), &out, &[], want, (5, targeted, 0));
    }
    let back = dir.join("unmerged.safetensors");
    let (ok, stdout, stderr) = merge(
        &fx("embedding/merged.safetensors"),
        &fx("embedding/adapter"),
        &back,
        &["--unmerge", "--verify"],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("verify: 0 of {targeted} unmerged elements off")),
        "{stdout}"
    );
    // the adapter's copy of the base embeddings is merged into, not the checkpoint's
    let other = dir.join("other-embeddings.safetensors");
    std::fs::copy(&base, &other).unwrap();
    edit_tensors(&other, |t| {
        let (_, (_, _, b)) = t
            .iter_mut()
            .find(|(n, _)| n == "embed_tokens.weight")
            .unwrap();
        b.iter_mut().for_each(|x| *x = 0);
    });
    let out = dir.join("from-other.safetensors");
    let (ok, _, stderr) = merge(other.to_str().unwrap(), &fx("embedding/adapter"), &out, &[]);
    assert!(ok, "{stderr}");
    let (acc, _) = agreement(&out, "embedding/merged.safetensors");
    assert!((acc.total - acc.exact) as f64 <= 1e-4 * targeted as f64 && acc.max_ulp <= 1);
    // ... and must have the checkpoint's shape
    let resized = adapter_copy_of(&dir.join("resized"), "embedding/adapter", |_| {});
    edit_tensors(&resized.join("adapter_model.safetensors"), |t| {
        let (_, (_, shape, b)) = t
            .iter_mut()
            .find(|(n, _)| n.ends_with("embed_tokens.base_layer.weight"))
            .unwrap();
        *shape = vec![73, 64];
        b.extend(vec![0u8; 64 * 2]);
    });
    merge_fails(
        Path::new(&base),
        &resized,
        &dir.join("resized.safetensors"),
        "the adapter saved the layer's base weight as [73, 64], the checkpoint has [72, 64]",
    );
    // tied embeddings stored twice (lm_head.weight bit for bit embed_tokens.weight): refused
    let tied = dir.join("tied.safetensors");
    std::fs::copy(&base, &tied).unwrap();
    edit_tensors(&tied, |t| {
        let (_, v) = t
            .iter()
            .find(|(n, _)| n == "embed_tokens.weight")
            .unwrap()
            .clone();
        t.push(("lm_head.weight".into(), v));
    });
    merge_fails(
        &tied,
        &common::fixture("embedding/adapter"),
        &dir.join("tied-out.safetensors"),
        "`embed_tokens.weight` is `lm_head.weight` bit for bit: a tied pair",
    );
    // ... in another shard too; and merged where a config.json beside it says they are not tied
    let bytes = std::fs::read(&tied).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shards = write_shards(&dir.join("tied-shards"), &st, |n| n == "lm_head.weight");
    let adapter_dir = common::fixture("embedding/adapter");
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        shards.to_str().unwrap(),
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--out",
        dir.join("tied-shards-out").to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(
        !ok && stderr.contains("is `lm_head.weight` bit for bit: a tied pair"),
        "{stderr}"
    );
    std::fs::write(
        shards.join("config.json"),
        r#"{"tie_word_embeddings": false}"#,
    )
    .unwrap();
    let (ok, _, stderr) = run(&[
        "merge",
        "--base",
        shards.to_str().unwrap(),
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--out",
        dir.join("untied-out").to_str().unwrap(),
        "--device",
        "emu",
    ]);
    assert!(ok, "not tied, as config.json says: {stderr}");
    // LoRA on an lm_head the checkpoint stores under the embeddings' name
    let head = adapter_copy_of(&dir.join("head"), "embedding/adapter", |_| {});
    edit_tensors(&head.join("adapter_model.safetensors"), |t| {
        for (n, _) in t.iter_mut() {
            *n = n.replace("layers.0.self_attn.q_proj", "lm_head");
        }
    });
    merge_fails(
        Path::new(&base),
        &head,
        &dir.join("head-out.safetensors"),
        "target module `lm_head` is missing from the base checkpoint (no tensor `lm_head.weight`): an lm_head tied to the embeddings",
    );
    // save and load keep PEFT's names
    let adapter = PeftAdapter::load(&common::fixture("embedding/dora_adapter")).unwrap();
    let embed = adapter.modules.iter().find(|m| m.embedding).unwrap();
    assert_eq!(
        (embed.name.as_str(), embed.a.rows, embed.a.cols),
        ("embed_tokens", 5, 72)
    );
    assert!(embed.base_weight.is_some() && embed.magnitude.is_some());
    let saved = dir.join("saved");
    adapter.save(&saved).unwrap();
    assert_eq!(PeftAdapter::load(&saved).unwrap(), adapter);
    let bytes = std::fs::read(saved.join("adapter_model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .len();
    let fixture = std::fs::read(common::fixture(
        "embedding/dora_adapter/adapter_model.safetensors",
    ))
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&fixture).unwrap();
    assert_eq!(names, st.names().len());
    for name in st.names() {
        let again = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            again.tensor(name).unwrap().data(),
            st.tensor(name).unwrap().data(),
            "{name}"
        );
    }
    // the linear layers refuse an embedding's LoRA
    let dev = lora_kernels::Device::emulator();
    let w0 = lora_kernels::Tensor::<half::bf16>::zeros(&dev, &[64, 72]).unwrap();
    let mut layer =
        lora_kernels::LoraLinear::<half::bf16, f32>::with_f32_adapters(w0, None).unwrap();
    let e = layer
        .insert_peft_module("e", &adapter, "embed_tokens")
        .unwrap_err()
        .to_string();
    assert!(e.contains("the LoRA of an embedding layer"), "{e}");
}

/// `modules_to_save` (tests/fixtures/peft/modules_to_save: PEFT 0.21.2's SEQ_CLS adapter of a Llama
/// sequence classifier, saving `score`, `embed_tokens` and, by PEFT's plain suffix test, every `*norm`):
/// merging writes the modules saved whole in place of the base's, as PEFT's `from_pretrained` +
/// `merge_and_unload` on that base does: every tensor but the four LoRA weights bit for bit PEFT's
/// (`score` saved as f32 and rounded to the bf16 base, to nearest even: truncating differs on 96 of
/// its 192 elements), the LoRA weights as the plain merge; a sharded base gives the same tensors;
/// `inspect` lists them; `--verify` checks them (and counts a planted error in one); save and load keep
/// them. Refused, nothing written: `--unmerge` (the base's tensors are not in the adapter), a saved
/// tensor whose shape is not the base's, one missing from the base, one outside the listed modules, a
/// module the adapter holds only part of, a LoRA module inside a module saved whole, and a saved value
/// that is NaN or ±Inf in the base's dtype where the base's is finite (written with --allow-nonfinite,
/// with a warning).
#[test]
fn modules_to_save_replace_the_bases_tensors() {
    use lora_kernels::checkpoint::{merge_checkpoint, verify_merge};
    let dir = scratch("modules-to-save");
    let base = common::fixture("modules_to_save/base.safetensors");
    let adapter_dir = common::fixture("modules_to_save/adapter");
    let merge = |base: &Path, adapter: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "emu",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let merged = dir.join("merged.safetensors");
    let (ok, stdout, stderr) = merge(&base, &adapter_dir, &merged, &["--verify"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("merged 4 modules")
            && stdout.contains("7 tensors of modules saved whole replaced, 10 tensors copied"),
        "{stdout}"
    );
    // 4 weights of 64×64, embed_tokens 40×64, score 3×64, five norms of 64
    let checked = 4 * 64 * 64 + 40 * 64 + 3 * 64 + 5 * 64;
    assert!(
        stdout.contains(&format!("verify: 0 of {checked} merged elements off")),
        "{stdout}"
    );
    let got = std::fs::read(&merged).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = Fixture::open("modules_to_save/merged.safetensors");
    let adapter = PeftAdapter::load(&adapter_dir).unwrap();
    assert_eq!(
        adapter.config.modules_to_save,
        ["embed_tokens", "norm", "classifier", "score"]
    );
    assert_eq!(adapter.modules_to_save.len(), 7);
    let lora: Vec<String> = adapter
        .modules
        .iter()
        .map(|m| format!("{}.weight", m.name))
        .collect();
    let mut acc = Agreement::default();
    let names = want.names();
    assert_eq!(names.len(), 21);
    let base_fx = Fixture::open("modules_to_save/base.safetensors");
    for name in &names {
        let g: Vec<half::bf16> = bytemuck::pod_collect_to_vec(got.tensor(name).unwrap().data());
        let w = want.bf16(name).0;
        if lora.contains(name) {
            compare(&g, &w, &mut acc);
        } else {
            assert_eq!(common::bits(&g), common::bits(&w), "`{name}` is PEFT's");
        }
        // (the fixture: every tensor saved whole differs from the base's, so a tensor left as the
        // base's cannot pass the comparison above)
        if adapter.modules_to_save.iter().any(|t| &t.name == name) {
            assert_ne!(base_fx.bf16(name).0, w, "`{name}` in the fixture");
        }
    }
    assert_eq!(acc.total, 4 * 64 * 64);
    assert!(acc.exact as f64 / acc.total as f64 >= 0.9999 && acc.max_ulp <= 1);

    // a sharded base: score and the embeddings in another shard than layer 0's LoRA weights
    let shards = write_shards(&dir.join("sharded"), &base_fx.tensors(), |n| {
        !n.contains("layers.0.")
    });
    let sharded_out = dir.join("sharded-out");
    let (ok, stdout, stderr) = merge(&shards, &adapter_dir, &sharded_out, &["--verify"]);
    assert!(
        ok && stdout.contains("7 tensors of modules saved whole replaced"),
        "{stderr}"
    );
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let bytes = std::fs::read(sharded_out.join(shard)).unwrap();
        let part = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for name in part.names() {
            assert_eq!(
                part.tensor(name).unwrap().data(),
                got.tensor(name).unwrap().data(),
                "sharded `{name}`"
            );
        }
    }

    // inspect
    let (ok, stdout, stderr) = run(&["inspect", "--adapter", adapter_dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(r#"modules_to_save = ["embed_tokens", "norm", "classifier", "score"]"#)
            && stdout.contains("| score.weight | [3, 64] | f32 |")
            && stdout.contains("| model.embed_tokens.weight | [40, 64] | bf16 |")
            && stdout.contains("| model.layers.1.post_attention_layernorm.weight | [64] | bf16 |"),
        "{stdout}"
    );
    // PEFT's count: LoRA's 4·8·(64 + 64) plus the saved modules' elements
    let trainable = 4 * 8 * 128 + 40 * 64 + 3 * 64 + 5 * 64;
    assert_eq!(adapter.parameters(), trainable as u64);
    assert!(
        stdout.contains(&format!("{trainable} trainable parameters")),
        "{stdout}"
    );

    // save and load keep them, with the config's list; save refuses what PEFT would not load back
    let saved = dir.join("saved");
    adapter.save(&saved).unwrap();
    assert_eq!(PeftAdapter::load(&saved).unwrap(), adapter);
    let mut stray = adapter.clone();
    stray.modules_to_save[0].name = "model.layers.0.mlp.up_proj.weight".into();
    let e = stray.save(&dir.join("stray")).unwrap_err().to_string();
    assert!(
        e.contains("not in a module of the config's modules_to_save"),
        "{e}"
    );
    let mut twice = adapter.clone();
    twice.modules_to_save.push(twice.modules_to_save[0].clone());
    let e = twice.save(&dir.join("twice")).unwrap_err().to_string();
    assert!(e.contains("appears twice"), "{e}");

    // verify counts a wrong value in a replaced tensor (one bf16 ulp on model.norm.weight[1])
    let dev = lora_kernels::Device::emulator();
    let out = dir.join("planted.safetensors");
    merge_checkpoint(&base, &adapter, &out, &dev, false, &mut ()).unwrap();
    let clean = verify_merge(&base, &adapter, &out, false, &mut ()).unwrap();
    assert_eq!((clean.elements, clean.off), (checked as u64, 0));
    edit_tensors(&out, |t| {
        let (_, (_, _, b)) = t
            .iter_mut()
            .find(|(n, _)| n == "model.norm.weight")
            .unwrap();
        let v = u16::from_le_bytes([b[2], b[3]]) + 1;
        b[2..4].copy_from_slice(&v.to_le_bytes());
    });
    let v = verify_merge(&base, &adapter, &out, false, &mut ()).unwrap();
    assert_eq!((v.off, v.max_ulp), (1, 1));
    let worst = v.worst.unwrap();
    assert_eq!(
        (worst.tensor.as_str(), worst.index),
        ("model.norm.weight", 1)
    );
    let e = verify_merge(&base, &adapter, &out, true, &mut ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("modules saved whole"), "{e}");

    // refusals
    let out = dir.join("refused.safetensors");
    let (ok, _, stderr) = merge(
        &common::fixture("modules_to_save/merged.safetensors"),
        &adapter_dir,
        &out,
        &["--unmerge"],
    );
    assert!(!ok && stderr.contains("modules saved whole"), "{stderr}");
    assert!(!out.exists());
    let edited =
        |name: &str, config: &dyn Fn(&mut serde_json::Value), edit: &dyn Fn(&mut OwnedTensors)| {
            let a = adapter_copy_of(&dir.join(name), "modules_to_save/adapter", config);
            edit_tensors(&a.join("adapter_model.safetensors"), edit);
            a
        };
    let score = "base_model.model.score.weight";
    let wider = edited("wider", &|_| {}, &|t| {
        let (_, (_, shape, b)) = t.iter_mut().find(|(n, _)| n == score).unwrap();
        *shape = vec![4, 64];
        b.extend(vec![0u8; 64 * 4]);
    });
    merge_fails(
        &base,
        &wider,
        &out,
        "adapter/base shape mismatch for `score.weight` (of a module saved whole, `modules_to_save`): base [3, 64], adapter [4, 64]",
    );
    let head = edited(
        "lm-head",
        &|c| c["modules_to_save"] = serde_json::json!(["embed_tokens", "norm", "score", "lm_head"]),
        &|t| {
            let (_, v) = t.iter().find(|(n, _)| n == score).unwrap().clone();
            t.push(("base_model.model.lm_head.weight".into(), v));
        },
    );
    merge_fails(
        &base,
        &head,
        &out,
        "tensor `lm_head.weight` of a module saved whole (`modules_to_save`) is missing from the base checkpoint: a head new to the model",
    );
    let unlisted = edited(
        "unlisted",
        &|c| c["modules_to_save"] = serde_json::json!(["score"]),
        &|_| {},
    );
    merge_fails(
        &base,
        &unlisted,
        &out,
        r#"adapter tensor `base_model.model.model.embed_tokens.weight` (neither a lora_A nor a lora_B weight, nor in a module of `modules_to_save`: ["score"])"#,
    );
    let partial = edited("partial", &|_| {}, &|t| {
        t.retain(|(n, _)| !n.ends_with("layers.1.input_layernorm.weight"))
    });
    merge_fails(
        &base,
        &partial,
        &out,
        "tensor `model.layers.1.input_layernorm.weight` is in a module the adapter saves whole",
    );
    let around = edited(
        "around-lora",
        &|c| {
            c["modules_to_save"] = serde_json::json!(["embed_tokens", "norm", "score", "layers.0"])
        },
        &|_| {},
    );
    merge_fails(
        &base,
        &around,
        &out,
        "LoRA module `model.layers.0.self_attn.q_proj` inside a module saved whole",
    );
    // f32::MAX rounds to +Inf in bf16, and a NaN: where the base's score is finite
    let nonfinite = edited("nonfinite", &|_| {}, &|t| {
        let (_, (_, _, b)) = t.iter_mut().find(|(n, _)| n == score).unwrap();
        b[0..4].copy_from_slice(&f32::MAX.to_le_bytes());
        b[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    merge_fails(
        &base,
        &nonfinite,
        &out,
        "tensor `score.weight` of a module saved whole",
    );
    let (ok, _, stderr) = merge(&base, &nonfinite, &out, &["--allow-nonfinite", "--quiet"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("tensor `score.weight` of a module saved whole: 2 elements finite in the base are NaN or ±Inf in the adapter's (1 NaN, 1 ±Inf)"),
        "{stderr}"
    );
    let written = std::fs::read(&out).unwrap();
    let written = safetensors::SafeTensors::deserialize(&written).unwrap();
    let s: Vec<half::bf16> =
        bytemuck::pod_collect_to_vec(written.tensor("score.weight").unwrap().data());
    assert!(s[0].is_infinite() && s[0] > half::bf16::ZERO && s[2].is_nan());
}

/// The base checkpoint is never replaced, however `out` spells its path (`dir/./base`, through a
/// symlinked directory, `sub/..`, a hard link, the file a symlinked base points to, a link in a chain of
/// symlinks the base goes through, and a bare relative name given to the CLI run in that directory): the
/// library refuses before writing (the CLI's own check compares the paths as given), and the base keeps
/// its bytes. An `out` that is a symlink to the base is allowed (the rename replaces the link, not the
/// base). A shape mismatch between the adapter and the base is an error of `verify_merge` too, not a
/// panic (a wrong adapter passed to it alone).
#[test]
fn the_base_is_never_replaced_and_verify_checks_shapes() {
    use lora_kernels::checkpoint::{merge_checkpoint, verify_merge};
    use lora_kernels::peft::HostMatrix;
    use std::os::unix::fs::symlink;
    let dir = scratch("base-kept");
    let base = dir.join("base.safetensors");
    std::fs::copy(common::fixture("base.safetensors"), &base).unwrap();
    let before = std::fs::read(&base).unwrap();
    let adapter = PeftAdapter::load(&common::fixture("adapter")).unwrap();
    let dev = lora_kernels::Device::emulator();
    symlink(&dir, dir.join("again")).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::hard_link(&base, dir.join("hard.safetensors")).unwrap();
    // link1 -> link2 -> base.safetensors
    symlink("base.safetensors", dir.join("link2.safetensors")).unwrap();
    symlink("link2.safetensors", dir.join("link1.safetensors")).unwrap();
    let refused = |base: &Path, out: &Path| {
        let e = merge_checkpoint(base, &adapter, out, &dev, false, &mut ()).unwrap_err();
        assert!(
            e.to_string().contains("is the base checkpoint"),
            "{} over {}: {e}",
            out.display(),
            base.display()
        );
    };
    for out in [
        dir.join(".").join("base.safetensors"),
        dir.join("again").join("base.safetensors"),
        dir.join("sub").join("..").join("base.safetensors"),
        dir.join("hard.safetensors"),
    ] {
        refused(&base, &out);
    }
    refused(&dir.join("link1.safetensors"), &base);
    refused(
        &dir.join("link1.safetensors"),
        &dir.join("link2.safetensors"),
    );
    // the CLI in the base's directory, with a bare relative --out (no parent) and ./ on the base
    let program = std::fs::canonicalize(bin_path()).unwrap();
    let run_in = |args: &[&str]| {
        Command::new(&program)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap()
    };
    let adapter_dir = common::fixture("adapter");
    let o = run_in(&[
        "merge",
        "--base",
        "./base.safetensors",
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--out",
        "base.safetensors",
        "--device",
        "emu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("is the base checkpoint"),
        "{stderr}"
    );
    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
    // an out that is a symlink to the base: the merge replaces the link, the base keeps its bytes
    symlink("base.safetensors", dir.join("out-link.safetensors")).unwrap();
    merge_checkpoint(
        &base,
        &adapter,
        &dir.join("out-link.safetensors"),
        &dev,
        false,
        &mut (),
    )
    .unwrap();
    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
    assert!(
        !std::fs::symlink_metadata(dir.join("out-link.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // a merge next to it
    let out = dir.join("merged.safetensors");
    merge_checkpoint(&base, &adapter, &out, &dev, false, &mut ()).unwrap();
    // verify_merge with an adapter whose module does not fit the base: an error naming the module
    let mut wrong = adapter.clone();
    let m = wrong.modules.iter_mut().find(|m| m.name == UP).unwrap();
    m.a = HostMatrix::from_f32(m.a.rows, 32, &vec![0.0; m.a.rows * 32]);
    let e = verify_merge(&base, &wrong, &out, false, &mut ()).unwrap_err();
    assert!(
        e.to_string().contains("shape mismatch") && e.to_string().contains(UP),
        "{e}"
    );
}

// ---- Non-finite merges (PEFT's safe_merge): refused with the module and the count, nothing written ----

/// The fixture adapter with `edit` applied to module `module`'s (A, B) as f32 values; `bf16`: every
/// tensor stored as bf16 instead of f32.
fn edited_adapter(
    module: &str,
    bf16: bool,
    edit: impl FnOnce(&mut [f32], &mut [f32]),
) -> PeftAdapter {
    use lora_kernels::peft::HostMatrix;
    let mut a = PeftAdapter::load(&common::fixture("adapter")).unwrap();
    let m = a.modules.iter_mut().find(|m| m.name == module).unwrap();
    let (mut av, mut bv) = (m.a.to_f32(), m.b.to_f32());
    edit(&mut av, &mut bv);
    m.a = HostMatrix::from_f32(m.a.rows, m.a.cols, &av);
    m.b = HostMatrix::from_f32(m.b.rows, m.b.cols, &bv);
    if bf16 {
        for m in &mut a.modules {
            for t in [&mut m.a, &mut m.b] {
                let v: Vec<half::bf16> = t
                    .to_f32()
                    .iter()
                    .map(|&x| half::bf16::from_f32(x))
                    .collect();
                t.dtype = lora_kernels::DType::BF16;
                t.bytes = bytemuck::cast_slice(&v).to_vec();
            }
        }
    }
    a
}

const UP: &str = "model.layers.0.mlp.up_proj"; // W 96×64, A 8×64, B 96×8
const Q1: &str = "model.layers.1.self_attn.q_proj"; // W 64×64, A 8×64, B 64×8 (second shard)
const V0: &str = "model.layers.0.self_attn.v_proj"; // W 64×64

/// (name, adapter, expected message part, merge counts (nan, inf)): a NaN in lora_A (f32), an Inf in
/// lora_B (bf16 adapter), and finite factors whose product overflows.
fn nonfinite_adapters() -> Vec<(&'static str, PeftAdapter, String, (u64, u64))> {
    vec![
        (
            "NaN in lora_A (f32)",
            // A[2][5]: column 5 of every row
            edited_adapter(UP, false, |a, _| a[2 * 64 + 5] = f32::NAN),
            format!(
                "module `{UP}`: 96 of 6144 elements finite in the base would become NaN or ±Inf (96 NaN, 0 ±Inf"
            ),
            (96, 0),
        ),
        (
            "Inf in lora_B (bf16)",
            // B[10][j] = Inf for every j, A made positive: row 10 is +Inf
            edited_adapter(Q1, true, |a, b| {
                a.iter_mut().for_each(|v| *v = v.abs().max(1e-3));
                b[10 * 8..11 * 8].fill(f32::INFINITY);
            }),
            format!(
                "module `{Q1}`: 64 of 4096 elements finite in the base would become NaN or ±Inf (0 NaN, 64 ±Inf"
            ),
            (0, 64),
        ),
        (
            "overflow from finite factors",
            // A = 1e10 everywhere, B[7][j] = 1e30: row 7's products are 1e40, past f32 and bf16
            edited_adapter(V0, false, |a, b| {
                a.fill(1e10);
                b[7 * 8..8 * 8].fill(1e30);
            }),
            format!(
                "module `{V0}`: 64 of 4096 elements finite in the base would become NaN or ±Inf (0 NaN, 64 ±Inf"
            ),
            (0, 64),
        ),
    ]
}

/// The fixture base split into two shards (layer 0, layer 1) with an index, in `dir`.
fn sharded_base(dir: &Path) -> PathBuf {
    let base = Fixture::open("base.safetensors");
    // layer 0 in the first shard, layer 1 in the second
    write_shards(&dir.join("base"), &base.tensors(), |n| {
        n.contains("layers.1.")
    })
}

/// Writes `st`'s tensors as a sharded checkpoint into the new directory `dir` (two shards and
/// model.safetensors.index.json): the tensors `second` selects in the second shard, the others in the
/// first. Returns `dir`.
fn write_shards(
    dir: &Path,
    st: &safetensors::SafeTensors<'_>,
    second: impl Fn(&str) -> bool,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut map = serde_json::Map::new();
    for (i, shard) in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    .iter()
    .enumerate()
    {
        let views: Vec<_> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| second(n) == (i == 1))
            .collect();
        for (n, _) in &views {
            map.insert(n.clone(), serde_json::Value::String(shard.to_string()));
        }
        std::fs::write(
            dir.join(shard),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}

/// The command line: each non-finite adapter fails `merge` and `merge --unmerge` (file and sharded
/// bases) naming the module and the count, exit status 1, no output, no temporary left, the base as
/// it was; `--allow-nonfinite` writes the merge with a warning.
#[test]
fn nonfinite_merges_are_refused_and_leave_nothing() {
    let dir = scratch("nonfinite");
    let base = common::fixture("base.safetensors");
    let sharded = sharded_base(&dir);
    for (i, (what, adapter, want, _)) in nonfinite_adapters().into_iter().enumerate() {
        let adir = dir.join(format!("adapter{i}"));
        adapter.save(&adir).unwrap();
        let out = dir.join("out.safetensors");
        merge_fails(
            &base,
            &adir,
            &out,
            &format!("lora-kernels: error: merge: {want}"),
        );
        merge_fails(&base, &adir, &out, "(--allow-nonfinite writes it anyway)");
        merge_fails(&sharded, &adir, &dir.join("out_dir"), &want);
        let (ok, _, stderr) = run(&[
            "merge",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "emu",
            "--unmerge",
        ]);
        assert!(
            !ok && stderr.contains(&format!("lora-kernels: error: unmerge: {want}")),
            "{what}: {stderr}"
        );
        assert!(!out.exists(), "{what}");
        // --allow-nonfinite: written, with a warning naming the module
        let (ok, stdout, stderr) = run(&[
            "merge",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "emu",
            "--allow-nonfinite",
            "--quiet",
        ]);
        assert!(ok, "{what}: {stderr}");
        assert!(stdout.starts_with("merged 8 modules"), "{stdout}");
        assert!(
            stderr.contains("lora-kernels: warning: module `")
                && stderr.contains("written because of --allow-nonfinite"),
            "{what}: {stderr}"
        );
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let nonfinite: usize = st
            .tensors()
            .iter()
            .map(|(_, t)| {
                let v: Vec<half::bf16> = bytemuck::pod_collect_to_vec(t.data());
                v.iter().filter(|x| !x.is_finite()).count()
            })
            .sum();
        assert!(
            nonfinite >= 64,
            "{what}: {nonfinite} non-finite elements written"
        );
        std::fs::remove_file(&out).unwrap();
    }
}

/// A base with a NaN and an Inf already in a targeted weight: merged, the NaN and the Inf written
/// back, a warning naming the module and the count; every other element as in the clean merge.
#[test]
fn nonfinite_in_the_base_is_a_warning() {
    let dir = scratch("nonfinite-base");
    let base = Fixture::open("base.safetensors");
    let name = format!("{V0}.weight");
    let st = base.tensors();
    let mut w: Vec<half::bf16> = base.bf16(&name).0;
    w[3] = half::bf16::NAN;
    w[100] = half::bf16::NEG_INFINITY;
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let data: &[u8] = if n == name {
                bytemuck::cast_slice(&w)
            } else {
                v.data()
            };
            let t =
                safetensors::tensor::TensorView::new(v.dtype(), v.shape().to_vec(), data).unwrap();
            (n, t)
        })
        .collect();
    let bad_base = dir.join("nan_base.safetensors");
    std::fs::write(&bad_base, safetensors::serialize(views, None).unwrap()).unwrap();
    let (clean, out) = (dir.join("clean.safetensors"), dir.join("out.safetensors"));
    for (b, o) in [
        (common::fixture("base.safetensors"), &clean),
        (bad_base.clone(), &out),
    ] {
        let (ok, _, stderr) = run(&[
            "merge",
            "--base",
            b.to_str().unwrap(),
            "--adapter",
            &fx("adapter"),
            "--out",
            o.to_str().unwrap(),
            "--device",
            "emu",
            "--quiet",
            "--verify",
        ]);
        assert!(ok, "{stderr}");
        if *o == out {
            assert_eq!(
                stderr.trim_end(),
                format!(
                    "lora-kernels: warning: module `{V0}`: 2 elements of the base are NaN or ±Inf already; written as the merge leaves them"
                )
            );
        } else {
            assert!(stderr.is_empty(), "{stderr}");
        }
    }
    let (cb, ob) = (std::fs::read(&clean).unwrap(), std::fs::read(&out).unwrap());
    let (cs, os) = (
        safetensors::SafeTensors::deserialize(&cb).unwrap(),
        safetensors::SafeTensors::deserialize(&ob).unwrap(),
    );
    for (n, t) in cs.tensors() {
        let want: Vec<half::bf16> = bytemuck::pod_collect_to_vec(t.data());
        let got: Vec<half::bf16> = bytemuck::pod_collect_to_vec(os.tensor(&n).unwrap().data());
        for (i, (g, c)) in got.iter().zip(&want).enumerate() {
            match (n == name, i) {
                (true, 3) => assert!(g.is_nan()),
                (true, 100) => assert_eq!(*g, half::bf16::NEG_INFINITY),
                _ => assert_eq!(g.to_bits(), c.to_bits(), "{n}[{i}]"),
            }
        }
    }
}

/// The library's checkpoint merge on every emulator thread order (access checks on): the same
/// refusal with the same counts, no output and no temporary left (file and sharded bases); the same
/// warning counts for a base with a NaN; `allow_nonfinite` lists the counts instead.
#[test]
fn checkpoint_merge_refusal_is_the_same_on_every_thread_order() {
    use lora_kernels::checkpoint::{MergeOptions, merge_checkpoint, merge_checkpoint_with};
    use lora_kernels::ops::NonFiniteCounts;
    let dir = scratch("nonfinite-orders");
    let base = common::fixture("base.safetensors");
    let sharded = sharded_base(&dir);
    let clean_dir = |d: &Path| {
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "base")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    for dev in common::emulators() {
        for (what, adapter, want, (nan, inf)) in nonfinite_adapters() {
            for (b, out) in [
                (&base, dir.join("o.safetensors")),
                (&sharded, dir.join("o")),
            ] {
                for unmerge in [false, true] {
                    let e =
                        merge_checkpoint(b, &adapter, &out, &dev, unmerge, &mut ()).unwrap_err();
                    let what = format!("{what} ({dev:?}, {}, unmerge {unmerge})", b.display());
                    match &e {
                        lora_kernels::Error::NonFiniteMerge { nan: n, inf: i, .. } => {
                            assert_eq!((*n, *i), (nan, inf), "{what}")
                        }
                        other => panic!("{what}: {other}"),
                    }
                    assert!(e.to_string().contains(&want), "{what}: {e}");
                    assert!(
                        e.to_string().ends_with("nothing was written"),
                        "{what}: {e}"
                    );
                    clean_dir(&dir);
                }
            }
            let out = dir.join("allowed.safetensors");
            let options = MergeOptions {
                unmerge: false,
                allow_nonfinite: true,
            };
            let s = merge_checkpoint_with(&base, &adapter, &out, &dev, &options, &mut ()).unwrap();
            assert_eq!(s.nonfinite.len(), 1, "{what}");
            assert_eq!(
                s.nonfinite[0].1,
                NonFiniteCounts {
                    nan,
                    inf,
                    in_base: 0
                },
                "{what}"
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
}

/// Writes `dir`'s adapter_model.safetensors from the fixture adapter's tensors as `edit` changes them.
fn edit_adapter_tensors(dir: &Path, edit: impl FnOnce(&mut OwnedTensors)) -> PathBuf {
    let a = adapter_copy(dir, |_| {});
    edit_tensors(&a.join("adapter_model.safetensors"), edit);
    a
}

fn object(entries: &[(&str, serde_json::Value)]) -> serde_json::Value {
    serde_json::Value::Object(
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

/// PEFT's rules, not look-alikes. rank_pattern / alpha_pattern keys are regular expressions tried in the
/// file's order against the module name or its end after a dot, the first match winning
/// (`peft.utils.other.get_pattern_key`: `re.match(rf"(.*\.)?({key})$", name)`); an invalid key is an
/// error naming it. LoRA variants and extras whose merge is not W + s·B·A are refused by name, as are a
/// config key this crate does not know when it is set, a flag that is not a boolean, a tensor other
/// than lora_A/lora_B, a lora_B without its lora_A and a module given twice (with and without the
/// prefix); a regex `target_modules` is saved back as a regex. A sharded index whose shard is not a
/// file name beside it, and a module of rank above 128, are refused before anything is written.
#[test]
fn peft_configs_and_tensors_follow_peft() {
    use lora_kernels::peft::TargetModules;
    use serde_json::json;
    let dir = scratch("peft-rules");
    let base = common::fixture("base.safetensors");
    let out = dir.join("out.safetensors");
    let modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ];
    let alphas = |name: &str, pattern: serde_json::Value| -> Vec<f64> {
        let a = adapter_copy(&dir.join(name), |c| c["alpha_pattern"] = pattern);
        let c = PeftAdapter::load(&a).unwrap().config;
        modules.iter().map(|m| c.alpha_for(m)).collect()
    };
    // the fixture's lora_alpha is 16
    let anchored = object(&[("^model.layers.0.self_attn.q_proj", json!(64))]);
    assert_eq!(alphas("anchored", anchored), [64.0, 16.0, 16.0]);
    let alternation = object(&[("q_proj|v_proj", json!(32))]);
    assert_eq!(alphas("alternation", alternation), [32.0, 32.0, 32.0]);
    let escaped = object(&[(r"layers\.1\.self_attn\.q_proj", json!(8))]);
    assert_eq!(alphas("escaped", escaped), [16.0, 8.0, 16.0]);
    let first = object(&[
        ("q_proj", json!(32)),
        ("layers.0.self_attn.q_proj", json!(64)),
    ]);
    assert_eq!(
        alphas("first", first),
        [32.0, 32.0, 16.0],
        "not the longest key"
    );
    let first = object(&[
        ("layers.0.self_attn.q_proj", json!(64)),
        ("q_proj", json!(32)),
    ]);
    assert_eq!(alphas("first-reversed", first), [64.0, 32.0, 16.0]);
    let component = object(&[("proj", json!(99))]);
    assert_eq!(
        alphas("component", component),
        [16.0; 3],
        "whole names only"
    );
    // a key that closes the group splits the pattern as Python's text does: `(.*\.)?(q_proj)|(v_proj)$`
    // under re.match is q_proj at the end of a dotted prefix, or v_proj from the start (no module)
    let split = object(&[("q_proj)|(v_proj", json!(48))]);
    assert_eq!(alphas("split", split), [48.0, 48.0, 16.0]);
    // ranks follow the same rule: a pattern giving layer 0's q_proj another rank than its tensors'
    let a = adapter_copy(&dir.join("rank"), |c| {
        c["rank_pattern"] = object(&[("^model.layers.0.self_attn.q_proj", json!(4))])
    });
    merge_fails(
        &base,
        &a,
        &out,
        "module `model.layers.0.self_attn.q_proj`: lora_A is 8×64",
    );
    for (name, key) in [
        ("bad-regex", "q_proj(("),
        ("lookahead", "q_proj(?!x)"),
        ("class-op", "[q&&v]_proj"),
    ] {
        let a = adapter_copy(&dir.join(name), |c| {
            c["alpha_pattern"] = object(&[(key, json!(2))])
        });
        merge_fails(
            &base,
            &a,
            &out,
            &format!("key `{key}` is not a regular expression"),
        );
    }

    // variants and extras: refused by name when set, accepted when off (the fixture has them off)
    for (key, value) in [
        ("alora_invocation_tokens", json!([1, 2])),
        ("kasa_config", json!({"svd": 4})),
        ("use_qalora", json!(true)),
        ("layer_replication", json!([[0, 1]])),
        ("trainable_token_indices", json!([5])),
        ("target_parameters", json!(["experts.w1"])),
    ] {
        let a = adapter_copy(&dir.join(key), |c| c[key] = value.clone());
        merge_fails(&base, &a, &out, &format!("`{key}` = {value}"));
    }
    let a = adapter_copy(&dir.join("unknown"), |c| {
        c["frobnicate_config"] = json!({"a": 1})
    });
    merge_fails(
        &base,
        &a,
        &out,
        "key `frobnicate_config` = {\"a\":1}, which this crate does not know",
    );
    let a = adapter_copy(&dir.join("unknown-off"), |c| {
        c["frobnicate_config"] = json!(null)
    });
    PeftAdapter::load(&a).unwrap();
    // initialisations that changed the base too: the adapter belongs to the residual base
    for init in ["pissa", "pissa_niter_4", "olora", "corda", "loftq"] {
        let a = adapter_copy(&dir.join(format!("init-{init}")), |c| {
            c["init_lora_weights"] = json!(init)
        });
        merge_fails(
            &base,
            &a,
            &out,
            &format!("`init_lora_weights` = \"{init}\""),
        );
    }
    for init in [json!("gaussian"), json!("eva"), json!(false)] {
        let a = adapter_copy(&dir.join(format!("init-ok-{init}")), |c| {
            c["init_lora_weights"] = init.clone()
        });
        PeftAdapter::load(&a).unwrap();
    }
    // PEFT takes any truthy value as true: only booleans are read
    let a = adapter_copy(&dir.join("string-flag"), |c| {
        c["use_rslora"] = json!("true")
    });
    merge_fails(
        &base,
        &a,
        &out,
        "`use_rslora` is \"true\": expected true or false",
    );

    // a regex target_modules stays one through save and load
    let a = adapter_copy(&dir.join("regex-targets"), |c| {
        c["target_modules"] = json!(r".*\.(q|v)_proj")
    });
    let loaded = PeftAdapter::load(&a).unwrap();
    let want = TargetModules::Regex(r".*\.(q|v)_proj".into());
    assert_eq!(loaded.config.target_modules, want);
    let saved = dir.join("regex-targets-saved");
    loaded.save(&saved).unwrap();
    let text = std::fs::read_to_string(saved.join("adapter_config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["target_modules"], json!(r".*\.(q|v)_proj"));
    assert_eq!(PeftAdapter::load(&saved).unwrap(), loaded);

    // tensors: an extra one, a lora_B alone, a module twice
    let a = edit_adapter_tensors(&dir.join("extra-tensor"), |t| {
        let (_, (d, shape, b)) = t[0].clone();
        t.push(("base_model.model.score.weight".into(), (d, shape, b)));
    });
    merge_fails(
        &base,
        &a,
        &out,
        "adapter tensor `base_model.model.score.weight`",
    );
    let q0 = "base_model.model.model.layers.0.self_attn.q_proj";
    let a = edit_adapter_tensors(&dir.join("lone-b"), |t| {
        t.retain(|(n, _)| n != &format!("{q0}.lora_A.weight"))
    });
    merge_fails(&base, &a, &out, &format!("has no `{q0}.lora_A.weight`"));
    let a = edit_adapter_tensors(&dir.join("twice"), |t| {
        let copies: Vec<_> = t
            .iter()
            .filter(|(n, _)| n.starts_with(q0))
            .map(|(n, v)| {
                (
                    n.trim_start_matches("base_model.model.").to_string(),
                    v.clone(),
                )
            })
            .collect();
        t.extend(copies);
    });
    merge_fails(
        &base,
        &a,
        &out,
        "module `model.layers.0.self_attn.q_proj` appears twice",
    );

    // a sharded index must name shards beside it
    for (name, shard) in [
        ("subdir", "a/model-00001-of-00002.safetensors"),
        ("up", "../x.safetensors"),
    ] {
        let sharded = sharded_base(&dir.join(format!("index-{name}")));
        let index_path = sharded.join("model.safetensors.index.json");
        let mut index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
        index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = json!(shard);
        std::fs::write(&index_path, index.to_string()).unwrap();
        merge_fails(
            &sharded,
            &common::fixture("adapter"),
            &dir.join(format!("out-{name}")),
            &format!("is \"{shard}\": expected the file name of a shard"),
        );
    }

    // rank 129 (above the kernels' 128): named, before any shard is written
    let r = 129;
    let a = edit_adapter_tensors(&dir.join("rank-129"), |t| {
        for (n, (d, shape, b)) in t.iter_mut() {
            if n.starts_with(q0) {
                *shape = if n.ends_with("lora_A.weight") {
                    vec![r, 64]
                } else {
                    vec![64, r]
                };
                *b = vec![0; r * 64 * d.bitsize() / 8];
            }
        }
    });
    let cfg = a.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["rank_pattern"] = object(&[("layers.0.self_attn.q_proj", json!(r))]);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let sharded = sharded_base(&dir.join("rank-129-base"));
    merge_fails(
        &sharded,
        &a,
        &dir.join("out-rank"),
        "module `model.layers.0.self_attn.q_proj` of rank 129 is not supported",
    );
}
