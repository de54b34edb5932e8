//! The fixture adapter (tests/fixtures/peft/adapter) and bit-agreement counting, shared by the
//! reference and the kernel tests against PEFT.

use half::bf16;
use lora_kernels::reference;

use super::Fixture;

/// One adapted module: (name, A f32 r×K, B f32 N×r, r).
pub type AdaptedModule = (String, Vec<f32>, Vec<f32>, usize);

/// Every adapted module of the fixture adapter, and scale = alpha / r.
pub fn adapter() -> (Vec<AdaptedModule>, f64) {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(super::fixture("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let r = cfg["r"].as_u64().unwrap() as usize;
    let scale = cfg["lora_alpha"].as_f64().unwrap() / r as f64;
    let fx = Fixture::open("adapter/adapter_model.safetensors");
    let mut modules = Vec::new();
    for name in fx.names() {
        let Some(module) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let (a, a_shape) = fx.f32(&name);
        let (b, b_shape) = fx.f32(&name.replace("lora_A", "lora_B"));
        assert_eq!((a_shape[0], b_shape[1]), (r, r));
        modules.push((module.to_string(), a, b, r));
    }
    assert_eq!(modules.len(), 8, "2 layers x q, v, up, down");
    (modules, scale)
}

#[derive(Default)]
pub struct Agreement {
    pub exact: usize,
    pub total: usize,
    pub max_ulp: u64,
}

pub fn compare(got: &[bf16], want: &[bf16], acc: &mut Agreement) {
    for (g, w) in got.iter().zip(want) {
        let d = reference::ulp_distance(*g, *w);
        acc.exact += (d == 0) as usize;
        acc.max_ulp = acc.max_ulp.max(d);
        acc.total += 1;
    }
}
