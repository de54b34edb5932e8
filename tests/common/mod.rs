//! Shared test helpers: the devices every kernel test runs on, fresh random data, fixture loading.
#![allow(dead_code)]

pub mod graph;
pub mod lora;
pub mod multi;
pub mod peft;
pub mod probes;
pub mod sm90;

use std::path::PathBuf;

use lora_kernels::{Device, Element, EmuConfig, ThreadOrder};

/// The emulator under four thread orders: ascending (blocks in order), a seeded shuffle of threads and
/// blocks, and the two warp-greedy orders (blocks shuffled by other seeds). Every launch runs the race
/// detector and memcheck; a kernel whose bits differ between orders has a race the detector missed.
pub fn emulators() -> Vec<Device> {
    emulators_for(0)
}

/// [`emulators`] whose seeded orders also depend on a case's `stream`, so the cases of one run do not
/// all share one shuffle (the ascending order is the same for all).
pub fn emulators_for(stream: u64) -> Vec<Device> {
    let cfg = |order, seed| {
        Device::emulator_with(EmuConfig {
            order,
            seed,
            ..EmuConfig::default()
        })
    };
    let s = seed() ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93);
    vec![
        cfg(ThreadOrder::Ascending, 0),
        cfg(ThreadOrder::Shuffled, s),
        cfg(ThreadOrder::WarpGreedyAscending, s ^ 0x9e37),
        cfg(ThreadOrder::WarpGreedyDescending, s ^ 0x79b9),
    ]
}

/// Two emulators (shuffled thread order) for the mma.sync fused GEMMs' two tile widths (`ops::mma_tile`):
/// of 1 SM, where every GEMM of more than 64 columns takes the 128-column tiles, and of 65536, where every
/// GEMM takes the 64-column ones. None under `LK_TEST_DEVICES=gpu`, or when `LK_MMA_TILE` forces one width
/// (said on stderr).
pub fn tile_width_emulators() -> Option<(Device, Device)> {
    if gpu_only() {
        return None;
    }
    if std::env::var_os("LK_MMA_TILE").is_some() {
        eprintln!("skipped: LK_MMA_TILE forces one tile width");
        return None;
    }
    let emulator = |sms| {
        Device::emulator_with(EmuConfig {
            order: ThreadOrder::Shuffled,
            seed: seed(),
            sms,
            ..EmuConfig::default()
        })
    };
    Some((emulator(1), emulator(1 << 16)))
}

/// The five thread orders as emulator configurations, each with another seed (so the shared-memory
/// alignment, the block order and the spurious try_wait failures vary too): for test-only kernels.
pub fn all_orders() -> Vec<EmuConfig> {
    [
        (ThreadOrder::Ascending, 0),
        (ThreadOrder::Descending, 5),
        (ThreadOrder::Shuffled, seed()),
        (ThreadOrder::WarpGreedyAscending, 3),
        (ThreadOrder::WarpGreedyDescending, 6),
    ]
    .into_iter()
    .map(|(order, seed)| EmuConfig {
        order,
        seed,
        ..EmuConfig::default()
    })
    .collect()
}

/// `LK_TEST_DEVICES=gpu`: the property tests run on the GPU alone, without their emulator halves (on a
/// GPU host whose build CI has already tested on the emulator: minutes less). It needs a GPU: `gpu()`
/// panics without one, so such a run cannot pass having checked nothing.
pub fn gpu_only() -> bool {
    std::env::var("LK_TEST_DEVICES").as_deref() == Ok("gpu")
}

/// The GPU when one can be used; otherwise prints why the GPU run is skipped, or panics when
/// `LK_REQUIRE_GPU=1` or `LK_TEST_DEVICES=gpu`.
pub fn gpu() -> Option<Device> {
    // One CUDA device (context, stream, loaded modules) for the whole test process: a Device::cuda per
    // case released the GPU's primary context and made it again, modules reloaded, every time.
    static GPU: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    match GPU.get_or_init(|| Device::cuda(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            if std::env::var("LK_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("LK_REQUIRE_GPU=1 but the CUDA backend is unavailable: {e}");
            }
            if gpu_only() {
                panic!("LK_TEST_DEVICES=gpu but the CUDA backend is unavailable: {e}");
            }
            eprintln!("GPU run skipped: {e}");
            None
        }
    }
}

/// Emulators (not under `LK_TEST_DEVICES=gpu`), plus the GPU when present.
pub fn all_devices() -> Vec<Device> {
    let mut d = if gpu_only() { Vec::new() } else { emulators() };
    d.extend(gpu());
    d
}

/// Property-test cases per test: `PROPTEST_CASES`, else `default`.
/// Under compute-sanitizer (`LK_SANITIZE=1`, which `gpu-check.sh` sets there) every launch is ~100×
/// slower: 6 cases, whatever the default.
pub fn proptest_cases(default: u32) -> u32 {
    let default = if std::env::var("LK_SANITIZE").as_deref() == Ok("1") {
        default.min(6)
    } else {
        default
    };
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seed for this test process: `LK_TEST_SEED` to reproduce, else fresh from the clock (printed).
/// Bit patterns, so NaNs compare equal to themselves and -0 differs from +0.
pub fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits_u32()).collect()
}

pub fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let s = std::env::var("LK_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("LK_TEST_SEED={s}");
        s
    })
}

/// The gap from |x| to the next larger magnitude of its 16-bit dtype (bf16 or f16), in f64.
pub fn ulp<T: Element>(x: T) -> f64 {
    let bits = (x.to_bits_u32() & 0x7fff) as u16 + 1;
    let next = match T::DTYPE {
        lora_kernels::DType::BF16 => half::bf16::from_bits(bits).to_f64(),
        _ => half::f16::from_bits(bits).to_f64(),
    };
    next - x.to_f64().abs()
}

/// splitmix64: small, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(stream: u64) -> Self {
        Rng(seed() ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    pub fn vec<T: Element>(&mut self, n: usize, amplitude: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(self.uniform() * amplitude))
            .collect()
    }
}

/// A fixture file under tests/fixtures/peft. The fixtures directory is `LK_FIXTURES` when set (a
/// packed folder's runner sets it: scripts/pack.sh), else the build-time one, else `tests/fixtures`
/// under the current directory (a test binary copied away from its build tree).
pub fn fixture(name: &str) -> PathBuf {
    let fixtures = match std::env::var_os("LK_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
            if built.is_dir() {
                built
            } else {
                PathBuf::from("tests/fixtures")
            }
        }
    };
    fixtures.join("peft").join(name)
}

/// A safetensors file, read whole.
pub struct Fixture(Vec<u8>);

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = fixture(name);
        Fixture(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }
    pub fn tensors(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.0).expect("valid safetensors fixture")
    }
    /// Tensor `name` as f32 (from F32 or BF16 storage) with its shape.
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        let data = match t.dtype() {
            safetensors::Dtype::F32 => bytemuck_f32(t.data()),
            safetensors::Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => panic!("fixture tensor {name} has unexpected dtype {other:?}"),
        };
        (data, t.shape().to_vec())
    }
    /// Tensor `name`, which must be stored as F64.
    pub fn f64(&self, name: &str) -> (Vec<f64>, Vec<usize>) {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
        let data = t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (data, t.shape().to_vec())
    }
    /// Tensor `name`, which must be stored as BF16.
    pub fn bf16(&self, name: &str) -> (Vec<half::bf16>, Vec<usize>) {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
        let data = t
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
            .collect();
        (data, t.shape().to_vec())
    }
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        n.sort();
        n
    }
}

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// One layer case of cases.json.
pub struct LayerCase {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    pub scale: f64,
}

pub fn layer_cases() -> Vec<LayerCase> {
    let text = std::fs::read_to_string(fixture("cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| LayerCase {
            name: c["name"].as_str().unwrap().to_string(),
            m: c["m"].as_u64().unwrap() as usize,
            n: c["n"].as_u64().unwrap() as usize,
            k: c["k"].as_u64().unwrap() as usize,
            r: c["rank"].as_u64().unwrap() as usize,
            scale: c["scale"].as_f64().unwrap(),
        })
        .collect()
}

/// How far the DoRA norm pass's row norms ‖W0 + s·B·A‖ may be from the exact ones, per row: 1e-5 of the
/// norm (the f32 sums of squares per 128 columns) plus the norm of the merged values' own f32 errors,
/// which matter where W0 and s·B·A cancel: per element 2⁻²⁴·(|w| + |s·B·A|) for the two roundings and
/// (r + 1)·2⁻²⁴·|s|·Σ_q |b_q·a_q| for the f32 rank product (its worst case).
#[allow(clippy::too_many_arguments)]
pub fn dora_norm_slack<T: Element, U: Element>(
    w0: &[T],
    a: &[U],
    b: &[U],
    n: usize,
    k: usize,
    r: usize,
    scale: f64,
    exact_norm: &[f64],
) -> Vec<f64> {
    let abs = |v: &[U]| -> Vec<U> { v.iter().map(|x| U::from_f64(x.to_f64().abs())).collect() };
    let d = lora_kernels::reference::delta(a, b, n, k, r, scale);
    let size = lora_kernels::reference::delta(&abs(a), &abs(b), n, k, r, scale.abs());
    let ulp = 2f64.powi(-24);
    (0..n)
        .map(|i| {
            let e2: f64 = (i * k..(i + 1) * k)
                .map(|e| {
                    let err =
                        ulp * (w0[e].to_f64().abs() + d[e].abs()) + (r + 1) as f64 * ulp * size[e];
                    err * err
                })
                .sum();
            1e-5 * exact_norm[i] + e2.sqrt()
        })
        .collect()
}
