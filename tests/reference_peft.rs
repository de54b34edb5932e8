//! The CPU reference (src/reference.rs) against PyTorch + PEFT golden data (tests/fixtures/peft):
//! forward, the three gradients, and the whole-checkpoint merge and unmerge.

mod common;

use common::peft::{Agreement, adapter, compare};
use common::{Fixture, layer_cases};
use lora_kernels::reference::{self, Dims};

fn dims(c: &common::LayerCase) -> Dims {
    Dims {
        m: c.m,
        n: c.n,
        k: c.k,
        r: c.r,
    }
}

/// f32 fixtures were computed in float64 by PyTorch: the reference must agree to f32 precision.
#[test]
fn layer_cases_f32_match_peft() {
    let fx = Fixture::open("layer_cases.safetensors");
    for c in layer_cases() {
        let get = |t: &str| fx.f32(&format!("{}.{t}", c.name)).0;
        let (x, w0, a, b, dy) = (get("x"), get("w0"), get("a"), get("b"), get("dy"));
        let f = reference::forward(&x, &w0, &a, &b, None, dims(&c), c.scale);
        let g = reference::backward(&x, &w0, &a, &b, &dy, dims(&c), c.scale);
        for (what, ours, theirs) in [
            ("y", &f.y, get("y")),
            ("dx", &g.dx, get("dx")),
            ("da", &g.da, get("da")),
            ("db", &g.db, get("db")),
        ] {
            let err = reference::relative_error(&theirs, ours);
            assert!(
                err < 1e-6,
                "{} {what}: relative error {err:e} vs PEFT",
                c.name
            );
        }
    }
}

/// PyTorch's own bf16 CPU run: rounding of intermediates makes it differ by about bf16 precision.
#[test]
fn layer_cases_bf16_match_peft() {
    let fx = Fixture::open("layer_cases_bf16.safetensors");
    for c in layer_cases() {
        let get = |t: &str| fx.bf16(&format!("{}.{t}", c.name)).0;
        let (x, w0, a, b, dy) = (get("x"), get("w0"), get("a"), get("b"), get("dy"));
        let f = reference::forward(&x, &w0, &a, &b, None, dims(&c), c.scale);
        let g = reference::backward(&x, &w0, &a, &b, &dy, dims(&c), c.scale);
        for (what, ours, theirs) in [
            ("y", &f.y, get("y")),
            ("dx", &g.dx, get("dx")),
            ("da", &g.da, get("da")),
            ("db", &g.db, get("db")),
        ] {
            let err = reference::relative_error(&theirs, ours);
            assert!(
                err < 1e-2,
                "{} {what}: relative error {err:e} vs PEFT bf16",
                c.name
            );
        }
    }
}

#[test]
fn checkpoint_merge_and_unmerge_match_peft() {
    let (modules, scale) = adapter();
    let base = Fixture::open("base.safetensors");
    let merged = Fixture::open("merged.safetensors");
    let unmerged = Fixture::open("expected_unmerged.safetensors");
    assert_eq!(base.names(), merged.names());
    let targeted: Vec<String> = modules.iter().map(|m| format!("{}.weight", m.0)).collect();
    // untargeted tensors: PEFT leaves them bit-identical
    for name in base.names().iter().filter(|n| !targeted.contains(n)) {
        assert_eq!(
            base.bf16(name).0,
            merged.bf16(name).0,
            "{name} changed by PEFT's merge"
        );
    }
    let mut merge_acc = Agreement {
        exact: 0,
        total: 0,
        max_ulp: 0,
    };
    let mut unmerge_acc = Agreement {
        exact: 0,
        total: 0,
        max_ulp: 0,
    };
    for (module, a, b, r) in &modules {
        let key = format!("{module}.weight");
        let (w0, shape) = base.bf16(&key);
        let (n, k) = (shape[0], shape[1]);
        let ours = reference::merge(&w0, a, b, n, k, *r, scale);
        compare(&ours, &merged.bf16(&key).0, &mut merge_acc);
        let back = reference::unmerge(&merged.bf16(&key).0, a, b, n, k, *r, scale);
        compare(&back, &unmerged.bf16(&key).0, &mut unmerge_acc);
    }
    for (what, acc) in [("merge", &merge_acc), ("unmerge", &unmerge_acc)] {
        let frac = acc.exact as f64 / acc.total as f64;
        eprintln!(
            "{what}: {} of {} elements bit-exact ({:.5} %), max {} ulp",
            acc.exact,
            acc.total,
            100.0 * frac,
            acc.max_ulp
        );
        assert!(
            frac >= 0.9999,
            "{what}: only {:.5} % bit-exact",
            100.0 * frac
        );
        assert!(
            acc.max_ulp <= 1,
            "{what}: {} ulp apart somewhere",
            acc.max_ulp
        );
    }
}

/// The kernels through the public API on PEFT's bf16 layer cases: forward Y, dX, dA, dB within bf16
/// precision of PyTorch's own bf16 run.
#[test]
fn layer_cases_through_kernels_match_peft() {
    use lora_kernels::{Tensor, ops};
    let fx = Fixture::open("layer_cases_bf16.safetensors");
    for dev in common::all_devices() {
        for c in layer_cases() {
            let get = |t: &str| fx.bf16(&format!("{}.{t}", c.name)).0;
            let up = |t: &str, shape: &[usize]| Tensor::from_slice(&dev, &get(t), shape).unwrap();
            let (m, n, k, r) = (c.m, c.n, c.k, c.r);
            let (x, w0, a, b, dy) = (
                up("x", &[m, k]),
                up("w0", &[n, k]),
                up("a", &[r, k]),
                up("b", &[n, r]),
                up("dy", &[m, n]),
            );
            let s = c.scale as f32;
            let f = ops::lora_forward(&x, &w0, &a, &b, None, s).unwrap();
            let g = ops::lora_backward(&x, &w0, &a, &b, &f.t, &dy, s, true).unwrap();
            let dx = g.dx.unwrap();
            for (what, ours, theirs) in [
                ("y", &f.y, get("y")),
                ("dx", &dx, get("dx")),
                ("da", &g.da, get("da")),
                ("db", &g.db, get("db")),
            ] {
                let ours: Vec<f64> = ours.to_vec().unwrap().iter().map(|v| v.to_f64()).collect();
                let err = reference::relative_error(&theirs, &ours);
                assert!(
                    err < 1e-2,
                    "{dev:?} {} {what}: relative error {err:e} vs PEFT bf16",
                    c.name
                );
            }
        }
    }
}
