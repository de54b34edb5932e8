//! build.rs: compiles every `kernels/*.cu` twice.
//!
//! 1. With the host C++ compiler (cc crate) under the emulator prelude (`kernels/emu/`), into a static
//!    library linked into the crate: the CPU emulator runs the kernels' own source. Always built.
//! 2. With nvcc, when one is found, into one fatbin per file (SASS for every requested architecture +
//!    PTX for the lowest), embedded with `include_bytes!` and loaded once per CUDA context. Without nvcc
//!    the crate still builds (cfg `lk_cuda` off, a `cargo:warning` says why); `LK_REQUIRE_NVCC=1` makes
//!    a missing nvcc an error. The `-Xptxas=-v` report is kept in `$OUT_DIR/ptxas/`, spills are warned.
//!
//! It also scans the `LK_KERNEL_EXPORT(name, Params)` lines to generate the Rust kernel table (so a
//! kernel's name and params type are written once, in its .cu file), and runs bindgen over
//! `kernels/include/lora_params.h` when libclang is available (see `src/params.rs`).
//!
//! Test-only kernels in `tests/kernels/*.cu` go through the same two compilers into a separate static
//! library and fatbins that only the integration tests link.
//!
//! The Hopper kernels (`kernels/sm90/`, `tests/kernels/sm90/`: wgmma, setmaxnreg) are built by nvcc for
//! `sm_90a` alone, and only when 90 is among the requested architectures; the emulator builds them always.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS for these, PTX for the lowest (documented in the README; override with `LK_CUDA_ARCHS`).
const DEFAULT_ARCHS: &str = "80,86,89,90";

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "LK_CUDA_ARCHS",
    "LK_REQUIRE_NVCC",
    "LIBCLANG_PATH",
    "CXX",
    "CXXFLAGS",
];

struct Export {
    kernel: String,
    params: String,
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo::rustc-check-cfg=cfg(lk_cuda)");
    println!("cargo::rustc-check-cfg=cfg(lk_bindgen_fresh)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in ENV_VARS {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let kernels_dir = root.join("kernels");
    let test_kernels_dir = root.join("tests").join("kernels");
    rerun_for_tree(&kernels_dir);
    rerun_for_tree(&test_kernels_dir);

    // kernels/sm90/ and tests/kernels/sm90/: the Hopper kernels (wgmma, setmaxnreg), built by nvcc for
    // sm_90a only and only when 90 is requested; the emulator builds them with the rest
    let hopper = list_cu(&kernels_dir.join("sm90"));
    let test_hopper = list_cu(&test_kernels_dir.join("sm90"));
    let kernels = [list_cu(&kernels_dir), hopper.clone()].concat();
    let test_kernels = [list_cu(&test_kernels_dir), test_hopper.clone()].concat();

    let exports = scan_exports(&kernels);
    write_kernel_table(&out.join("kernel_table.rs"), &exports);
    let test_exports = scan_exports(&test_kernels);
    write_emu_decls(&out.join("test_kernel_decls.rs"), &test_exports);

    build_emulator(&root, &out, &kernels, &test_kernels);
    generate_bindings(&root, &out);

    let fatbins = match find_nvcc() {
        Some(nvcc) => {
            let archs = requested_archs(&nvcc);
            println!("cargo::rustc-cfg=lk_cuda");
            // what a GPU and its driver need to run these kernels (src/device/compat.rs checks them)
            println!("cargo::rustc-env=LK_BUILT_ARCHS={}", archs.join(","));
            println!(
                "cargo::rustc-env=LK_NVCC_CUDA_VERSION={}",
                nvcc_cuda_version(&nvcc).unwrap_or_default()
            );
            // SASS for every requested architecture + PTX for the lowest; the Hopper files: sm_90a SASS
            // (`-arch=sm_90a` would also run a plain sm_90 pass, which rejects wgmma and setmaxnreg)
            let lowest = archs
                .iter()
                .min_by_key(|a| a.parse::<u32>().unwrap_or(u32::MAX))
                .unwrap();
            let mut generic: Vec<String> = archs
                .iter()
                .map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}"))
                .collect();
            generic.push(format!(
                "-gencode=arch=compute_{lowest},code=compute_{lowest}"
            ));
            let sm90a = vec!["-gencode=arch=compute_90a,code=sm_90a".to_string()];
            let with_hopper = archs.iter().any(|a| a == "90");
            let build = |files: &[PathBuf], hopper: &[PathBuf], dir: &str| {
                let plain: Vec<PathBuf> = files
                    .iter()
                    .filter(|f| !hopper.contains(f))
                    .cloned()
                    .collect();
                let mut built = compile_fatbins(&root, &nvcc, &generic, &plain, &out.join(dir));
                if with_hopper {
                    built.extend(compile_fatbins(
                        &root,
                        &nvcc,
                        &sm90a,
                        hopper,
                        &out.join(dir),
                    ));
                }
                built
            };
            (
                build(&kernels, &hopper, "cuda"),
                build(&test_kernels, &test_hopper, "cuda_tests"),
            )
        }
        None => {
            if env::var("LK_REQUIRE_NVCC").as_deref() == Ok("1") {
                panic!(
                    "LK_REQUIRE_NVCC=1 but no nvcc was found (looked at $NVCC, $CUDA_HOME/bin, \
                     $CUDA_PATH/bin, $PATH). Install one with scripts/install-cuda-toolchain.sh and \
                     set NVCC to the path it prints."
                );
            }
            println!(
                "cargo::warning=lora-kernels: no nvcc found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH): \
                 the CUDA backend is off, the emulator backend is built (set LK_REQUIRE_NVCC=1 to make this an error)"
            );
            println!("cargo::rustc-env=LK_BUILT_ARCHS=");
            println!("cargo::rustc-env=LK_NVCC_CUDA_VERSION=");
            (Vec::new(), Vec::new())
        }
    };
    write_module_table(&out.join("cuda_modules.rs"), &fatbins.0);
    write_module_table(&out.join("cuda_test_modules.rs"), &fatbins.1);
}

fn rerun_for_tree(dir: &Path) {
    println!("cargo::rerun-if-changed={}", dir.display());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rerun_for_tree(&path);
        } else {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
}

fn list_cu(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Every `LK_KERNEL_EXPORT(name, Params)` line, in file order.
fn scan_exports(files: &[PathBuf]) -> Vec<(String, Export)> {
    let mut exports = Vec::new();
    for file in files {
        let src =
            fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for line in src.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("LK_KERNEL_EXPORT(") else {
                continue;
            };
            let inner = rest.trim_end_matches(';').trim_end_matches(')');
            let mut parts = inner.split(',').map(str::trim);
            let (Some(kernel), Some(params)) = (parts.next(), parts.next()) else {
                panic!("{}: malformed export line `{line}`", file.display());
            };
            exports.push((
                stem(file),
                Export {
                    kernel: kernel.to_string(),
                    params: params.to_string(),
                },
            ));
        }
    }
    exports
}

fn write_emu_decls(path: &Path, exports: &[(String, Export)]) {
    let mut s = String::from(
        "// generated by build.rs from the LK_KERNEL_EXPORT lines of tests/kernels/*.cu\n",
    );
    s.push_str(
        "#[link(name = \"lk_emu_test_kernels\", kind = \"static\")]\nunsafe extern \"C\" {\n",
    );
    for (_, e) in exports {
        s.push_str(&format!(
            "    pub fn lk_emu_body_{}(params: *const ::core::ffi::c_void);\n",
            e.kernel
        ));
    }
    s.push_str("}\n");
    write_if_changed(path, &s);
}

fn write_kernel_table(path: &Path, exports: &[(String, Export)]) {
    let mut s =
        String::from("// generated by build.rs from the LK_KERNEL_EXPORT lines of kernels/*.cu\n");
    s.push_str("unsafe extern \"C\" {\n");
    for (_, e) in exports {
        s.push_str(&format!(
            "    fn lk_emu_body_{}(params: *const ::core::ffi::c_void);\n",
            e.kernel
        ));
    }
    s.push_str("}\n");
    for (module, e) in exports {
        s.push_str(&format!(
            "/// `{k}` from `kernels/{m}.cu`, taking `{p}`.\npub static {K}: Kernel<crate::params::{p}> = Kernel::new(\"{m}\", \"{k}\", lk_emu_body_{k});\n",
            k = e.kernel,
            K = e.kernel.to_uppercase(),
            m = module,
            p = e.params
        ));
    }
    write_if_changed(path, &s);
}

fn write_module_table(path: &Path, fatbins: &[(String, PathBuf)]) {
    let mut s = String::from(
        "// generated by build.rs: (module, fatbin image) for every nvcc-built kernels file\n",
    );
    s.push_str("pub static MODULES: &[(&str, &[u8])] = &[\n");
    for (name, file) in fatbins {
        s.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            file.display().to_string()
        ));
    }
    s.push_str("];\n");
    write_if_changed(path, &s);
}

fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(contents) {
        fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// The emulator: runtime + every kernel file compiled by the host C++ compiler with the prelude
/// force-included. Kernels and runtime are separate archives (the kernels need `-x c++ -include`).
fn build_emulator(root: &Path, out: &Path, kernels: &[PathBuf], test_kernels: &[PathBuf]) {
    let emu = root.join("kernels").join("emu");
    let include = root.join("kernels").join("include");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            .include(&include)
            .include(&emu)
            .define("LK_EMU", "1")
            .warnings(true)
            .extra_warnings(true)
            .flag_if_supported("-fno-strict-aliasing")
            .flag_if_supported("-Wno-unknown-pragmas")
            // parameter structs holding a 64-byte aligned tensor map: GCC notes an ABI change of 2011
            .flag_if_supported("-Wno-psabi");
        b
    };
    let kernel_build = |files: &[PathBuf]| {
        let mut b = base();
        // -fsanitize=thread only for its access hooks: GCC calls __tsan_read*/__tsan_write* before every
        // memory access of kernel code; the emulator runtime defines them (memcheck and the race
        // detector, kernels/emu/lk_emu_check.cpp) and libtsan is never linked.
        b.flag("-x")
            .flag("c++")
            .flag("-fsanitize=thread")
            .flag("-include")
            .flag(emu.join("lk_emu_prelude.h").to_str().expect("utf-8 path"));
        for f in files {
            b.file(f);
        }
        b
    };
    if !kernels.is_empty() {
        kernel_build(kernels).compile("lk_emu_kernels");
    }
    let mut runtime = base();
    for part in [
        "sched", "warp", "async", "mbarrier", "tma", "wgmma", "check",
    ] {
        runtime.file(emu.join(format!("lk_emu_{part}.cpp")));
    }
    runtime.compile("lk_emu_runtime");
    if !test_kernels.is_empty() {
        // Test-only kernels: not linked into the library; tests/ link `lk_emu_test_kernels` by name.
        kernel_build(test_kernels)
            .cargo_metadata(false)
            .compile("lk_emu_test_kernels");
        println!("cargo::rustc-link-search=native={}", out.display());
    }
}

/// bindgen over the params header when libclang can be loaded: the output goes to OUT_DIR and a test
/// (cfg `lk_bindgen_fresh`) checks the committed `src/params_bindings.rs` equals it. Without libclang the
/// committed file is used as is, so a fresh machine builds.
fn generate_bindings(root: &Path, out: &Path) {
    let headers = [
        root.join("kernels/include/lora_params.h"),
        root.join("kernels/emu/lk_emu.h"),
    ];
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| {
        let mut b = bindgen::Builder::default()
            .allowlist_type("Lk.*")
            .allowlist_var("LK_.*")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(true)
            .use_core()
            .formatter(bindgen::Formatter::Prettyplease);
        for h in &headers {
            b = b.header(h.to_str().expect("utf-8 path"));
        }
        b.generate()
    });
    std::panic::set_hook(prev_hook);
    match result {
        Ok(Ok(bindings)) => {
            // Headers are named by absolute path in bindgen's output only in comments we do not emit;
            // the text is machine-independent, so it can be compared with the committed file.
            write_if_changed(&out.join("params_bindgen.rs"), &bindings.to_string());
            println!("cargo::rustc-cfg=lk_bindgen_fresh");
        }
        Ok(Err(e)) => panic!("bindgen failed on {:?}: {e}", headers),
        Err(_) => println!(
            "cargo::warning=lora-kernels: libclang not found, using the committed src/params_bindings.rs \
             (install libclang to regenerate and check it)"
        ),
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!(
            "cargo::warning=lora-kernels: NVCC={} is not a file, looking elsewhere",
            p.display()
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

/// The CUDA version of `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88": "13.0").
fn nvcc_cuda_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = &text[text.find("release ")? + "release ".len()..];
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

/// `LK_CUDA_ARCHS` (e.g. "80,90"; default DEFAULT_ARCHS), each checked against `nvcc --list-gpu-code`.
fn requested_archs(nvcc: &Path) -> Vec<String> {
    let spec = env::var("LK_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<String> = spec
        .split(',')
        .map(|a| a.trim().trim_start_matches("sm_").to_string())
        .filter(|a| !a.is_empty())
        .collect();
    assert!(
        !archs.is_empty(),
        "LK_CUDA_ARCHS={spec:?} names no architecture"
    );
    let listed = Command::new(nvcc)
        .arg("--list-gpu-code")
        .output()
        .unwrap_or_else(|e| panic!("running {} --list-gpu-code: {e}", nvcc.display()));
    let listed = String::from_utf8_lossy(&listed.stdout);
    for a in &archs {
        let code = format!("sm_{a}");
        assert!(
            listed.lines().any(|l| l.trim() == code),
            "LK_CUDA_ARCHS asks for {code}, which {} does not support (it lists: {})",
            nvcc.display(),
            listed.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    archs
}

/// The cache shared by every build profile of this target directory (check/clippy, test, release each
/// have their own OUT_DIR, so without it every kernel is compiled once per profile): the directory
/// above the profiles, found from OUT_DIR = <target>/<profile>/build/<pkg>/out.
fn nvcc_cache_dir(out_dir: &Path) -> Option<PathBuf> {
    let build = out_dir
        .ancestors()
        .find(|p| p.file_name() == Some("build".as_ref()))?;
    Some(build.parent()?.parent()?.join("lk-nvcc-cache"))
}

/// The cache key of one nvcc job: the compiler (its path and `--version`), the arguments other than
/// the output path, the kernel file and every shared header. Anything else that changes the fatbin
/// changes one of these.
fn nvcc_cache_key(root: &Path, nvcc_id: &str, args: &[String], file: &Path) -> String {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    let mut h = DefaultHasher::new();
    nvcc_id.hash(&mut h);
    args.hash(&mut h);
    fs::read(file).unwrap_or_default().hash(&mut h);
    let mut headers: Vec<PathBuf> = fs::read_dir(root.join("kernels").join("include"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    headers.sort();
    for f in headers {
        f.file_name().hash(&mut h);
        fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    format!("{}-{:016x}", stem(file), h.finish())
}

/// One nvcc per file, all files in parallel (and `--threads 0`: nvcc compiles the architectures of one
/// file in parallel too), each looked up first in the cache shared by the build profiles
/// ([`nvcc_cache_dir`]): a hit copies the fatbin and the ptxas report. Returns (module name, fatbin path).
fn compile_fatbins(
    root: &Path,
    nvcc: &Path,
    gencodes: &[String],
    files: &[PathBuf],
    dir: &Path,
) -> Vec<(String, PathBuf)> {
    fs::create_dir_all(dir.join("ptxas")).expect("create OUT_DIR/cuda");
    let nvcc_id = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| format!("{} {}", nvcc.display(), String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    let cache = nvcc_cache_dir(dir).filter(|c| fs::create_dir_all(c).is_ok());
    let jobs: Vec<_> = files
        .iter()
        .map(|file| {
            let name = stem(file);
            let target = dir.join(format!("{name}.fatbin"));
            let mut args: Vec<String> = [
                "-fatbin",
                "-O3",
                "-std=c++17",
                "--threads",
                "0",
                "-Xptxas=-v",
                "-lineinfo",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.push("-I".into());
            args.push(root.join("kernels").join("include").display().to_string());
            args.extend(gencodes.iter().cloned());
            let cached = cache.as_ref().map(|c| {
                let key = nvcc_cache_key(root, &nvcc_id, &args, file);
                (
                    c.join(format!("{key}.fatbin")),
                    c.join(format!("{key}.ptxas.txt")),
                )
            });
            let mut cmd = Command::new(nvcc);
            cmd.args(&args).arg("-o").arg(&target).arg(file);
            let shown = format!("{cmd:?}");
            let hit = cached
                .as_ref()
                .is_some_and(|(fb, rep)| fb.exists() && rep.exists());
            let child = std::thread::spawn(move || if hit { None } else { Some(cmd.output()) });
            (name, file.clone(), target, shown, cached, child)
        })
        .collect();
    let mut done = Vec::new();
    for (name, file, target, shown, cached, child) in jobs {
        let report = dir.join("ptxas").join(format!("{name}.txt"));
        let stderr = match child.join().expect("nvcc thread") {
            None => {
                let (fb, rep) = cached.as_ref().expect("a hit has a cache entry");
                fs::copy(fb, &target).expect("copy the cached fatbin");
                fs::read_to_string(rep).expect("read the cached ptxas report")
            }
            Some(output) => {
                let output = output.unwrap_or_else(|e| panic!("could not run nvcc ({shown}): {e}"));
                let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
                if !output.status.success() {
                    panic!(
                        "nvcc failed on {}\ncommand: {shown}\n--- nvcc stderr ---\n{stderr}\n--- stdout ---\n{}",
                        file.display(),
                        String::from_utf8_lossy(&output.stdout)
                    );
                }
                if let Some((fb, rep)) = &cached {
                    // written under temporary names and renamed: a concurrent build never reads half a file
                    let (tmp_fb, tmp_rep) = (fb.with_extension("tmp"), rep.with_extension("tmp"));
                    if fs::copy(&target, &tmp_fb).is_ok() && fs::write(&tmp_rep, &stderr).is_ok() {
                        let _ = fs::rename(&tmp_rep, rep);
                        let _ = fs::rename(&tmp_fb, fb);
                    }
                }
                stderr
            }
        };
        write_if_changed(&report, &stderr);
        for warning in spill_warnings(&stderr) {
            println!("cargo::warning=lora-kernels: {}: {warning}", file.display());
        }
        done.push((name, target));
    }
    done
}

/// "function X (sm_Y): N bytes spill stores, M bytes spill loads" for every spilling function.
fn spill_warnings(report: &str) -> Vec<String> {
    let mut current = String::new();
    let mut warnings = Vec::new();
    for line in report.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            current = line[pos + "Compiling entry function '".len()..]
                .replace("' for '", " (")
                .trim_end_matches('\'')
                .to_string()
                + ")";
        }
        if let Some(pos) = line.find("bytes spill stores") {
            let stores: u64 = line[..pos]
                .rsplit(',')
                .next()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            let loads: u64 = line
                .split(',')
                .find(|s| s.contains("spill loads"))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if stores > 0 || loads > 0 {
                warnings.push(format!(
                    "ptxas: {current} spills: {stores} bytes stores, {loads} bytes loads"
                ));
            }
        }
    }
    warnings
}
