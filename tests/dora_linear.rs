//! DoRA adapters in `LoraLinear`: the layer's forward, training step (train_forward, train_backward,
//! optimizer_step) and merge/unmerge give the ops' results (ops::dora_forward, dora_backward,
//! adamw_step, dora_merge, dora_unmerge) bit for bit; PEFT's DoRA layer through the training API
//! (tests/fixtures/peft/dora_layer); PEFT's DoRA module loaded with insert_peft_module merges to PEFT's
//! merged weight; a fresh DoRA adapter is PEFT's init; the refusals.

mod common;

use common::{Fixture, Rng};
use half::bf16;
use lora_kernels::ops::{self, AdamState, AdamW, GradMode};
use lora_kernels::peft::PeftAdapter;
use lora_kernels::{Device, Dropout, Element, Error, LoraConfig, LoraLinear, Tensor, reference};

fn up<T: Element>(dev: &Device, v: &[T], shape: &[usize]) -> Tensor<T> {
    Tensor::from_slice(dev, v, shape).unwrap()
}

fn bits<T: Element>(t: &Tensor<T>) -> Vec<u32> {
    common::bits(&t.to_vec().unwrap())
}

struct Data {
    n: usize,
    k: usize,
    r: usize,
    m: usize,
    w0: Vec<bf16>,
    bias: Vec<bf16>,
    a: Vec<f32>,
    b: Vec<f32>,
    magnitude: Vec<f32>,
    x: Vec<bf16>,
    dy: Vec<bf16>,
}

fn data(stream: u64) -> Data {
    let (n, k, r, m) = (48, 40, 6, 70);
    let mut rng = Rng::new(stream);
    let w0: Vec<bf16> = rng.vec(n * k, 0.3);
    let magnitude = (0..n)
        .map(|i| {
            let norm: f64 = w0[i * k..(i + 1) * k]
                .iter()
                .map(|v| v.to_f64().powi(2))
                .sum();
            (norm.sqrt() * (1.0 + 0.3 * rng.uniform())) as f32
        })
        .collect();
    Data {
        n,
        k,
        r,
        m,
        w0,
        bias: rng.vec(n, 0.5),
        a: rng.vec(r * k, 0.3),
        b: rng.vec(n * r, 0.3),
        magnitude,
        x: rng.vec(m * k, 1.0),
        dy: rng.vec(m * n, 1.0),
    }
}

fn dora_layer(dev: &Device, d: &Data, config: LoraConfig) -> LoraLinear<bf16, f32> {
    let w0 = up(dev, &d.w0, &[d.n, d.k]);
    let bias = up(dev, &d.bias, &[d.n]);
    let mut l = LoraLinear::with_f32_adapters(w0, Some(bias)).unwrap();
    l.insert_dora_adapter(
        "dora",
        config,
        up(dev, &d.a, &[d.r, d.k]),
        up(dev, &d.b, &[d.n, d.r]),
        up(dev, &d.magnitude, &[d.n]),
    )
    .unwrap();
    l
}

/// The training API on a DoRA adapter gives the ops' bits: forward, train_forward, train_backward
/// (overwrite, then accumulate), and the AdamW step of A, B and the magnitude.
#[test]
fn dora_training_step_is_the_ops() {
    let dev = Device::emulator();
    let d = data(3);
    let config = LoraConfig::new(d.r, 12.0);
    let s = config.scale();
    let mut l = dora_layer(&dev, &d, config);
    let x = up(&dev, &d.x, &[d.m, d.k]);
    let dy = up(&dev, &d.dy, &[d.m, d.n]);
    let (w0, bias) = (up(&dev, &d.w0, &[d.n, d.k]), up(&dev, &d.bias, &[d.n]));
    let (a, b) = (up(&dev, &d.a, &[d.r, d.k]), up(&dev, &d.b, &[d.n, d.r]));
    let mut mag = up(&dev, &d.magnitude, &[d.n]);

    let want = ops::dora_forward(&x, &w0, &a, &b, &mag, Some(&bias), s).unwrap();
    assert_eq!(bits(&l.forward(&x).unwrap().y), bits(&want.y), "forward");
    assert_eq!(
        bits(l.train_forward(&x).unwrap()),
        bits(&want.y),
        "train_forward"
    );
    let g = ops::dora_backward(&x, &w0, &a, &b, &want.saved, &dy, s, true).unwrap();
    let dx = l
        .train_backward(&x, &dy, GradMode::Overwrite, true)
        .unwrap()
        .unwrap();
    assert_eq!(bits(dx), bits(g.dx.as_ref().unwrap()), "dx");
    let (da, db) = l.grads().unwrap();
    assert_eq!((bits(da), bits(db)), (bits(&g.da), bits(&g.db)), "da, db");
    assert_eq!(bits(l.magnitude_grad().unwrap()), bits(&g.dmagnitude), "dm");
    // a second micro-batch, accumulated: the ops' accumulate on the same gradients
    l.train_forward(&x).unwrap();
    l.train_backward(&x, &dy, GradMode::Accumulate, false)
        .unwrap();
    let (mut da2, mut db2, mut dm2) = (g.da, g.db, g.dmagnitude);
    ops::dora_backward_into(
        &x,
        &w0,
        &a,
        &b,
        &want.saved,
        &dy,
        s,
        Dropout::NONE,
        None,
        &mut da2,
        &mut db2,
        &mut dm2,
        GradMode::Accumulate,
        &mut ops::Workspace::new(),
    )
    .unwrap();
    let (da, db) = l.grads().unwrap();
    assert_eq!(
        (bits(da), bits(db)),
        (bits(&da2), bits(&db2)),
        "accumulated"
    );
    assert_eq!(
        bits(l.magnitude_grad().unwrap()),
        bits(&dm2),
        "dm accumulated"
    );
    let g1 = l.magnitude_grad().unwrap().to_vec().unwrap();
    assert!(
        g1.iter().any(|v| *v != 0.0),
        "a gradient of zeros passes for anything"
    );

    // AdamW on A, B and the magnitude
    let hp = AdamW {
        lr: 1e-2,
        ..AdamW::default()
    };
    l.optimizer_step(&hp).unwrap();
    let mut state = AdamState::new(&dev, &[d.n]).unwrap();
    ops::adamw_step(&mut mag, &dm2, &mut state, &hp).unwrap();
    let ad = l.adapter("dora").unwrap();
    assert_eq!(
        bits(ad.magnitude.as_ref().unwrap()),
        bits(&mag),
        "magnitude step"
    );
    assert_ne!(bits(&mag), common::bits(&d.magnitude), "the step moved it");
    let (mut a2, mut sa) = (a, AdamState::new(&dev, &[d.r, d.k]).unwrap());
    ops::adamw_step(&mut a2, &da2, &mut sa, &hp).unwrap();
    assert_eq!(bits(&ad.a), bits(&a2), "A step");
    let (mut b2, mut sb) = (b, AdamState::new(&dev, &[d.n, d.r]).unwrap());
    ops::adamw_step(&mut b2, &db2, &mut sb, &hp).unwrap();
    assert_eq!(bits(&ad.b), bits(&b2), "B step");

    // magnitude_grad_mut reaches the gradient the step uses: zeroed there, the magnitude's next step is
    // the ops' step of a zero gradient (AdamW's moments keep it moving)
    l.train_forward(&x).unwrap();
    l.train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();
    let dm = l.magnitude_grad_mut().unwrap();
    *dm = Tensor::zeros(&dev, &[d.n]).unwrap();
    l.optimizer_step(&hp).unwrap();
    let zero = Tensor::zeros(&dev, &[d.n]).unwrap();
    ops::adamw_step(&mut mag, &zero, &mut state, &hp).unwrap();
    let ad = l.adapter("dora").unwrap();
    assert_eq!(
        bits(ad.magnitude.as_ref().unwrap()),
        bits(&mag),
        "step of the edited gradient"
    );
}

/// With LoRA dropout the training API runs PEFT's DoRA layer with dropout: each train_forward takes the
/// next mask (offset = the number of training forwards, seed from set_dropout_seed) and gives
/// ops::dora_forward_into's bits under that Dropout, train_backward gives dora_backward_into's under the
/// same mask; two steps take two masks; the inference forward takes none.
#[test]
fn dora_training_with_dropout_is_the_ops() {
    let dev = Device::emulator();
    let d = data(8);
    let p = 0.2;
    let config = LoraConfig::new(d.r, 12.0).with_dropout(p);
    let s = config.scale();
    let mut l = dora_layer(&dev, &d, config);
    l.set_dropout_seed(77);
    let x = up(&dev, &d.x, &[d.m, d.k]);
    let dy = up(&dev, &d.dy, &[d.m, d.n]);
    let (w0, bias) = (up(&dev, &d.w0, &[d.n, d.k]), up(&dev, &d.bias, &[d.n]));
    let (a, b) = (up(&dev, &d.a, &[d.r, d.k]), up(&dev, &d.b, &[d.n, d.r]));
    let mag = up(&dev, &d.magnitude, &[d.n]);
    let plain = ops::dora_forward(&x, &w0, &a, &b, &mag, Some(&bias), s).unwrap();
    assert_eq!(
        bits(&l.forward(&x).unwrap().y),
        bits(&plain.y),
        "inference: no dropout"
    );
    let mut ys = Vec::new();
    for step in 0..2u64 {
        let dropout = Dropout::new(p, 77, step).unwrap();
        let mut y = Tensor::zeros(&dev, &[d.m, d.n]).unwrap();
        let mut saved = ops::DoraSaved::for_layer(&x, d.n, d.r).unwrap();
        let mut ws = ops::Workspace::new();
        ops::dora_forward_into(
            &x,
            &w0,
            &a,
            &b,
            &mag,
            Some(&bias),
            s,
            dropout,
            &mut y,
            &mut saved,
            &mut ws,
        )
        .unwrap();
        assert_eq!(
            bits(l.train_forward(&x).unwrap()),
            bits(&y),
            "step {step} y"
        );
        let mut dx = Tensor::zeros(&dev, &[d.m, d.k]).unwrap();
        let mut da = Tensor::zeros(&dev, &[d.r, d.k]).unwrap();
        let mut db = Tensor::zeros(&dev, &[d.n, d.r]).unwrap();
        let mut dm = Tensor::zeros(&dev, &[d.n]).unwrap();
        ops::dora_backward_into(
            &x,
            &w0,
            &a,
            &b,
            &saved,
            &dy,
            s,
            dropout,
            Some(&mut dx),
            &mut da,
            &mut db,
            &mut dm,
            GradMode::Overwrite,
            &mut ws,
        )
        .unwrap();
        let got_dx = l
            .train_backward(&x, &dy, GradMode::Overwrite, true)
            .unwrap()
            .unwrap();
        assert_eq!(bits(got_dx), bits(&dx), "step {step} dx");
        let (ga, gb) = l.grads().unwrap();
        assert_eq!(
            (bits(ga), bits(gb)),
            (bits(&da), bits(&db)),
            "step {step} da, db"
        );
        assert_eq!(
            bits(l.magnitude_grad().unwrap()),
            bits(&dm),
            "step {step} dm"
        );
        ys.push(bits(&y));
    }
    assert_ne!(ys[0], ys[1], "two steps, two masks");
    assert_ne!(ys[0], bits(&plain.y), "the mask changed Y");
}

/// Merge and unmerge of a DoRA adapter: W0 as ops::dora_merge leaves it, the merged forward within bf16
/// of the unmerged DoRA layer, unmerge back within bf16 of W0 (safe forms too), and task switching
/// between a DoRA and a plain adapter on a merged layer.
#[test]
fn dora_merge_unmerge_and_task_switching() {
    let dev = Device::emulator();
    let d = data(5);
    let config = LoraConfig::new(d.r, 8.0);
    let mut l = dora_layer(&dev, &d, config);
    let x = up(&dev, &d.x, &[d.m, d.k]);
    let unmerged = l.forward(&x).unwrap().y.to_vec().unwrap();
    let (a, b) = (up(&dev, &d.a, &[d.r, d.k]), up(&dev, &d.b, &[d.n, d.r]));
    let mag = up(&dev, &d.magnitude, &[d.n]);
    // ops::dora_merge of the layer's W0 as it is now (an unmerge leaves it within rounding of the base)
    let dora_merged = |l: &LoraLinear<bf16, f32>| {
        let mut w = up(&dev, &l.w0().to_vec().unwrap(), &[d.n, d.k]);
        ops::dora_merge(&mut w, &a, &b, &mag, config.scale()).unwrap();
        bits(&w)
    };
    for safe in [false, true] {
        let w_want = dora_merged(&l);
        if safe {
            let c = l.safe_merge().unwrap();
            assert_eq!(c.created(), 0);
        } else {
            l.merge().unwrap();
        }
        assert!(l.is_merged());
        assert!(bits(l.w0()) == w_want, "merged W0 (safe {safe})");
        let merged = l.forward(&x).unwrap().y.to_vec().unwrap();
        let want: Vec<f64> = unmerged.iter().map(|v| v.to_f64()).collect();
        let err = reference::relative_error(&merged, &want);
        assert!(err < 1e-2, "merged forward vs unmerged: {err}");
        if safe {
            l.safe_unmerge().unwrap();
        } else {
            l.unmerge().unwrap();
        }
        assert!(!l.is_merged());
        let w0: Vec<f64> = d.w0.iter().map(|v| v.to_f64()).collect();
        let err = reference::relative_error(&l.w0().to_vec().unwrap(), &w0);
        assert!(err < 1e-2, "unmerged W0: {err}");
    }
    // a plain adapter beside it; switch while merged, both ways
    l.add_adapter("plain", LoraConfig::new(4, 4.0), 9).unwrap();
    l.merge().unwrap();
    l.set_active("plain").unwrap();
    assert!(l.is_merged() && l.active() == Some("plain"));
    l.set_active("dora").unwrap();
    assert!(l.is_merged() && l.active() == Some("dora"));
    // W0 went through the plain adapter's merge and unmerge (within rounding of the base): the DoRA
    // merge of the base within bf16's tolerance
    let mut w_base = up(&dev, &d.w0, &[d.n, d.k]);
    ops::dora_merge(&mut w_base, &a, &b, &mag, config.scale()).unwrap();
    let want: Vec<f64> = w_base
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect();
    let err = reference::relative_error(&l.w0().to_vec().unwrap(), &want);
    assert!(err < 1e-2, "the DoRA merge again: {err}");
    l.unmerge().unwrap();
    let w0: Vec<f64> = d.w0.iter().map(|v| v.to_f64()).collect();
    assert!(reference::relative_error(&l.w0().to_vec().unwrap(), &w0) < 1e-2);
}

/// PEFT's DoRA layer (tests/fixtures/peft/dora_layer, case0: bias, r = 8, alpha 16) through the training
/// API: Y and the gradients of A, B, the magnitude and X within bf16's tolerance of PEFT's.
#[test]
fn dora_training_api_matches_peft() {
    let fx = Fixture::open("dora_layer/layer.safetensors");
    let (x, x_shape) = fx.bf16("case0.x");
    let (w0, w_shape) = fx.bf16("case0.w0");
    let (bias, _) = fx.bf16("case0.bias");
    let (dy, _) = fx.bf16("case0.dy");
    let (a, a_shape) = fx.f32("case0.lora_A");
    let (b, _) = fx.f32("case0.lora_B");
    let (magnitude, _) = fx.f32("case0.magnitude");
    let (n, k, r) = (w_shape[0], w_shape[1], a_shape[0]);
    let config = LoraConfig::new(r, 16.0);
    assert_eq!(config.scale() as f64, fx.f64("case0.scale").0[0]);
    for dev in common::all_devices() {
        let mut l =
            LoraLinear::with_f32_adapters(up(&dev, &w0, &[n, k]), Some(up(&dev, &bias, &[n])))
                .unwrap();
        l.insert_dora_adapter(
            "d",
            config,
            up(&dev, &a, &[r, k]),
            up(&dev, &b, &[n, r]),
            up(&dev, &magnitude, &[n]),
        )
        .unwrap();
        let xt = up(&dev, &x, &x_shape);
        let y = l.train_forward(&xt).unwrap().to_vec().unwrap();
        let mut dy_shape = x_shape.clone();
        *dy_shape.last_mut().unwrap() = n;
        let dx = l
            .train_backward(&xt, &up(&dev, &dy, &dy_shape), GradMode::Overwrite, true)
            .unwrap()
            .unwrap()
            .to_vec()
            .unwrap();
        let (da, db) = l.grads().unwrap();
        let dm = l.magnitude_grad().unwrap().to_vec().unwrap();
        let peft = |name: &str| fx.f64(&format!("case0.{name}")).0;
        let errs = [
            ("y", reference::relative_error(&y, &peft("y"))),
            ("grad_x", reference::relative_error(&dx, &peft("grad_x"))),
            (
                "grad_lora_A",
                reference::relative_error(&da.to_vec().unwrap(), &peft("grad_lora_A")),
            ),
            (
                "grad_lora_B",
                reference::relative_error(&db.to_vec().unwrap(), &peft("grad_lora_B")),
            ),
            (
                "grad_magnitude",
                reference::relative_error(&dm, &peft("grad_magnitude")),
            ),
        ];
        for (name, err) in errs {
            assert!(
                err <= 1e-2,
                "{}: {name} {err:e} against PEFT",
                dev.describe()
            );
        }
    }
}

/// PEFT's DoRA adapter module (tests/fixtures/peft/dora) loads into a layer over the base weight, and the
/// layer's merge gives PEFT's merged weight (`merge_and_unload`) bit for bit; its unmerged forward is within
/// bf16 of the merged one.
#[test]
fn peft_dora_module_loads_and_merges_as_peft() {
    let adapter = PeftAdapter::load(&common::fixture("dora/adapter")).unwrap();
    let base = Fixture::open("base.safetensors");
    let merged = Fixture::open("dora/merged.safetensors");
    let dev = Device::emulator();
    for module in &adapter.modules {
        let weight = format!("{}.weight", module.name);
        let (w0, shape) = base.bf16(&weight);
        let mut l = LoraLinear::with_f32_adapters(up(&dev, &w0, &shape), None).unwrap();
        l.insert_peft_module("d", &adapter, &module.name).unwrap();
        assert!(l.adapter("d").unwrap().is_dora());
        let m = 9;
        let x: Vec<bf16> = Rng::new(13).vec(m * shape[1], 1.0);
        let x = up(&dev, &x, &[m, shape[1]]);
        let unmerged = l.forward(&x).unwrap().y.to_vec().unwrap();
        l.merge().unwrap();
        let (want, _) = merged.bf16(&weight);
        assert_eq!(
            common::bits(&l.w0().to_vec().unwrap()),
            common::bits(&want),
            "{weight}: the layer's DoRA merge vs PEFT's"
        );
        let y = l.forward(&x).unwrap().y.to_vec().unwrap();
        let want: Vec<f64> = unmerged.iter().map(|v| v.to_f64()).collect();
        assert!(reference::relative_error(&y, &want) < 1e-2, "{weight}");
    }
}

/// GPT-2's Conv1D modules (tests/fixtures/peft/fan_in_fan_out, `fan_in_fan_out`, weights stored in ×
/// out): the plain and the DoRA adapters' modules load into a layer over the transpose of the stored
/// weight, and the layer's merge, transposed back, is PEFT's merged weight bit for bit (the DoRA one on
/// all elements but at most 1 of 10^4, within 1 ulp: PEFT's fixture merge differs on one element).
#[test]
fn peft_conv1d_modules_load_over_the_transposed_weight() {
    let base = Fixture::open("fan_in_fan_out/base.safetensors");
    let dev = Device::emulator();
    for (dir, merged) in [
        (
            "fan_in_fan_out/adapter",
            "fan_in_fan_out/merged.safetensors",
        ),
        (
            "fan_in_fan_out/dora_adapter",
            "fan_in_fan_out/dora_merged.safetensors",
        ),
    ] {
        let adapter = PeftAdapter::load(&common::fixture(dir)).unwrap();
        assert!(adapter.config.fan_in_fan_out);
        let merged = Fixture::open(merged);
        let (mut off, mut total, mut max_ulp) = (0usize, 0usize, 0u64);
        for module in &adapter.modules {
            let weight = format!("{}.weight", module.name);
            let (stored, shape) = base.bf16(&weight);
            let (k, n) = (shape[0], shape[1]);
            let transpose = |v: &[bf16], rows: usize, cols: usize| -> Vec<bf16> {
                (0..cols)
                    .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
                    .collect()
            };
            let w0 = transpose(&stored, k, n);
            let mut l = LoraLinear::with_f32_adapters(up(&dev, &w0, &[n, k]), None).unwrap();
            l.insert_peft_module("p", &adapter, &module.name).unwrap();
            l.merge().unwrap();
            let got = transpose(&l.w0().to_vec().unwrap(), n, k);
            for (g, w) in got.iter().zip(&merged.bf16(&weight).0) {
                let d = reference::ulp_distance(*g, *w);
                off += (d != 0) as usize;
                max_ulp = max_ulp.max(d);
                total += 1;
            }
        }
        assert_eq!(total, 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64));
        assert!(
            off as f64 <= 1e-4 * total as f64 && max_ulp <= 1,
            "{dir}: {off} of {total} off, max {max_ulp} ulp"
        );
        if !adapter.config.use_dora {
            assert_eq!(off, 0, "{dir}: the plain merge is PEFT's bit for bit");
        }
    }
}

/// add_dora_adapter: PEFT's init (A Kaiming-uniform, B = 0, the magnitude W0's row norms), so the fresh
/// adapter's DoRA layer is the base layer up to the factors' rounding.
#[test]
fn fresh_dora_adapter_is_peft_init() {
    let dev = Device::emulator();
    let d = data(17);
    let mut l = LoraLinear::with_f32_adapters(up(&dev, &d.w0, &[d.n, d.k]), None).unwrap();
    l.add_dora_adapter("d", LoraConfig::new(d.r, 2.0 * d.r as f64), 5)
        .unwrap();
    let ad = l.adapter("d").unwrap();
    assert!(ad.b.to_vec().unwrap().iter().all(|v| *v == 0.0));
    let m = ad.magnitude.as_ref().unwrap().to_vec().unwrap();
    for (i, got) in m.iter().enumerate() {
        let norm: f64 = d.w0[i * d.k..(i + 1) * d.k]
            .iter()
            .map(|v| v.to_f64().powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (*got as f64 - norm).abs() <= 1e-6 * norm,
            "row {i}: {got} vs {norm}"
        );
    }
    let x = up(&dev, &d.x, &[d.m, d.k]);
    let y = l.forward(&x).unwrap().y.to_vec().unwrap();
    let base = vec![0.0f32; d.n * d.r];
    let plain = reference::forward(
        &d.x,
        &d.w0,
        &ad.a.to_vec().unwrap(),
        &base,
        None,
        reference::Dims {
            m: d.m,
            n: d.n,
            k: d.k,
            r: d.r,
        },
        0.0,
    );
    assert!(reference::relative_error(&y, &plain.y) < 1e-2);
}

/// `forward_multi` with rows of a DoRA adapter: those rows bit for bit the layer's DoRA forward through
/// that adapter (M = 70: the general path; the factor applied to the rounded Z in both), the plain
/// adapter's rows and the rows without one bit for bit the layer's forward through the plain adapter and
/// the base; after an optimizer step (the set rebuilt) and a merge and unmerge of the DoRA adapter (W0
/// rounded: the factors recomputed) the same.
#[test]
fn forward_multi_serves_dora_rows() {
    let dev = Device::emulator();
    let d = data(31);
    let mut l = dora_layer(&dev, &d, LoraConfig::new(d.r, 8.0));
    l.add_adapter("plain", LoraConfig::new(3, 6.0), 2).unwrap();
    let x = up(&dev, &d.x, &[d.m, d.k]);
    let rows: Vec<Option<&str>> = (0..d.m)
        .map(|i| match i % 5 {
            0 => None,
            1 | 2 => Some("plain"),
            _ => Some("dora"),
        })
        .collect();
    let check = |l: &mut LoraLinear<bf16, f32>, what: &str| {
        let y = l.forward_multi(&x, &rows).unwrap().y.to_vec().unwrap();
        let mut alone = std::collections::BTreeMap::new();
        for name in ["dora", "plain"] {
            l.set_active(name).unwrap();
            alone.insert(name, l.forward(&x).unwrap().y.to_vec().unwrap());
        }
        let base = {
            let w0 = l.w0();
            let zero_a = Tensor::<f32>::zeros(&dev, &[1, d.k]).unwrap();
            let zero_b = Tensor::<f32>::zeros(&dev, &[d.n, 1]).unwrap();
            let bias = up(&dev, &d.bias, &[d.n]);
            ops::lora_forward(&x, w0, &zero_a, &zero_b, Some(&bias), 1.0)
                .unwrap()
                .y
                .to_vec()
                .unwrap()
        };
        for (i, row) in rows.iter().enumerate() {
            let got = &y[i * d.n..(i + 1) * d.n];
            match row {
                Some("dora") => {
                    let want = &alone["dora"][i * d.n..(i + 1) * d.n];
                    assert_eq!(
                        common::bits(got),
                        common::bits(want),
                        "{what}: DoRA row {i}"
                    );
                }
                Some(name) => assert_eq!(
                    common::bits(got),
                    common::bits(&alone[name][i * d.n..(i + 1) * d.n]),
                    "{what}: row {i}"
                ),
                None => assert_eq!(
                    common::bits(got),
                    common::bits(&base[i * d.n..(i + 1) * d.n]),
                    "{what}: row {i} (no adapter)"
                ),
            }
        }
    };
    check(&mut l, "fresh");
    // a training step changes the magnitude: the set is rebuilt with the new factors
    l.set_active("dora").unwrap();
    l.train_forward(&x).unwrap();
    let dy = up(&dev, &d.dy, &[d.m, d.n]);
    l.train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();
    l.optimizer_step(&AdamW {
        lr: 5e-2,
        ..AdamW::default()
    })
    .unwrap();
    check(&mut l, "after a step");
    // the DoRA adapter merged and unmerged: W0 comes back rounded, and the set's factors with it
    l.set_active("dora").unwrap();
    let before = common::bits(&l.w0().to_vec().unwrap());
    l.merge().unwrap();
    l.unmerge().unwrap();
    let after = common::bits(&l.w0().to_vec().unwrap());
    assert_ne!(
        after, before,
        "W0 unchanged: the check below could not fail"
    );
    check(&mut l, "after merge and unmerge");
}

/// What a DoRA adapter cannot do in a layer, each an `Error` naming why.
#[test]
fn dora_layer_refusals() {
    let dev = Device::emulator();
    let d = data(23);
    let mut l = dora_layer(&dev, &d, LoraConfig::new(d.r, 8.0));
    let x = up(&dev, &d.x, &[d.m, d.k]);
    let dy = up(&dev, &d.dy, &[d.m, d.n]);
    let t = l.forward(&x).unwrap().t;
    let unsupported = |e: Error| match e {
        Error::Unsupported { what, hint } => format!("{what}: {hint}"),
        other => panic!("{other:?}"),
    };
    let e = unsupported(l.backward(&x, &t, &dy, true).unwrap_err());
    assert!(e.contains("train_backward"), "{e}");
    // rows of a DoRA adapter, a plain one and none batch together (tests/dora_linear.rs
    // forward_multi_serves_dora_rows checks their values)
    l.add_adapter("plain", LoraConfig::new(2, 2.0), 1).unwrap();
    let mut rows = vec![Some("plain"); d.m];
    rows[0] = None;
    rows[1] = Some("dora");
    l.forward_multi(&x, &rows).unwrap();
    // a DoRA adapter added to a merged layer would take the merged rows' norms as its magnitude
    l.merge().unwrap();
    let e = l
        .add_dora_adapter("late", LoraConfig::new(2, 2.0), 1)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    l.unmerge().unwrap();
    let e = l
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    // a failed training forward leaves nothing a backward could take for its own
    l.train_forward(&x).unwrap();
    let x_bad = up(&dev, &d.x[..d.m * (d.k - 1)], &[d.m, d.k - 1]);
    assert!(l.train_forward(&x_bad).is_err());
    let e = l
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidState { .. }),
        "after a failed forward: {e:?}"
    );
    // removing the magnitude mid-training makes the training state anew (a plain adapter's: no dm)
    l.train_forward(&x).unwrap();
    l.train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();
    let kept = l.adapter_mut("dora").unwrap().magnitude.take();
    l.train_forward(&x).unwrap();
    assert!(
        l.magnitude_grad().is_none(),
        "a plain adapter's training state"
    );
    l.adapter_mut("dora").unwrap().magnitude = kept;
    l.train_forward(&x).unwrap();
    assert!(l.magnitude_grad().is_some(), "a DoRA adapter's again");
    // the same for a plain adapter (its T)
    l.set_active("plain").unwrap();
    l.train_forward(&x).unwrap();
    assert!(l.train_forward(&x_bad).is_err());
    let e = l
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "plain: {e:?}");
    l.set_active("dora").unwrap();
    let short = up(&dev, &d.magnitude[1..], &[d.n - 1]);
    let e = l
        .insert_dora_adapter(
            "bad",
            LoraConfig::new(d.r, 8.0),
            up(&dev, &d.a, &[d.r, d.k]),
            up(&dev, &d.b, &[d.n, d.r]),
            short,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "magnitude",
                ..
            }
        ),
        "{e:?}"
    );
    // a magnitude replaced through adapter_mut with a wrong length: refused, not read out of bounds
    l.adapter_mut("dora").unwrap().magnitude = Some(up(&dev, &d.magnitude[1..], &[d.n - 1]));
    let e = l.forward(&x).unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
}

/// A DoRA adapter learns through the training API: a teacher `W* = g ⊙ (W0 + ΔW)` (ΔW of rank 2, every
/// output feature rescaled by g in 0.7..1.3, what DoRA's magnitude models), student `LoraLinear` with a
/// DoRA adapter of rank 4 from PEFT's init, on-device steps (train_forward, mse_grad, train_backward,
/// optimizer_step on A, B and the magnitude). The loss must fall by two orders of magnitude or more, and
/// the magnitude must have moved toward g·‖W0 + ΔW‖ (a wrong sign or a skipped magnitude step fails it).
#[test]
fn dora_adapter_learns_a_rescaled_low_rank_change() {
    let dev = Device::emulator();
    let (m, n, k, r) = (64, 32, 48, 4);
    let mut rng = Rng::new(99);
    let w0: Vec<f64> = (0..n * k)
        .map(|_| rng.uniform() / (k as f64).sqrt())
        .collect();
    let u: Vec<f64> = (0..n * 2).map(|_| rng.uniform()).collect();
    let v: Vec<f64> = (0..2 * k)
        .map(|_| rng.uniform() / (k as f64).sqrt())
        .collect();
    let g: Vec<f64> = (0..n).map(|_| 1.0 + 0.3 * rng.uniform()).collect();
    let w_star: Vec<f64> = (0..n * k)
        .map(|e| {
            let (i, j) = (e / k, e % k);
            let dw = 0.5 * (u[i * 2] * v[j] + u[i * 2 + 1] * v[k + j]);
            g[i] * (w0[e] + dw)
        })
        .collect();
    let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f64(rng.uniform())).collect();
    let target: Vec<f64> = (0..m * n)
        .map(|e| {
            let (i, o) = (e / n, e % n);
            (0..k)
                .map(|j| x[i * k + j].to_f64() * w_star[o * k + j])
                .sum()
        })
        .collect();
    let w0_16: Vec<bf16> = w0.iter().map(|&v| bf16::from_f64(v)).collect();
    let mut l = LoraLinear::with_f32_adapters(up(&dev, &w0_16, &[n, k]), None).unwrap();
    l.add_dora_adapter("d", LoraConfig::new(r, 2.0 * r as f64), 3)
        .unwrap();
    let xt = up(&dev, &x, &[m, k]);
    let target16: Vec<bf16> = target.iter().map(|&v| bf16::from_f64(v)).collect();
    let target_t = up(&dev, &target16, &[m, n]);
    let mut dy = Tensor::<bf16>::zeros(&dev, &[m, n]).unwrap();
    let loss = |l: &LoraLinear<bf16, f32>| -> f64 {
        let y = l.forward(&xt).unwrap().y.to_vec().unwrap();
        y.iter()
            .zip(&target)
            .map(|(a, b)| (a.to_f64() - b).powi(2))
            .sum::<f64>()
            / (m * n) as f64
    };
    let m0 = l
        .adapter("d")
        .unwrap()
        .magnitude
        .as_ref()
        .unwrap()
        .to_vec()
        .unwrap();
    let first = loss(&l);
    let steps = 200;
    for step in 1..=steps {
        let y = l.train_forward(&xt).unwrap();
        ops::mse_grad(y, &target_t, 1.0, &mut dy).unwrap();
        l.train_backward(&xt, &dy, GradMode::Overwrite, false)
            .unwrap();
        let lr = 2e-2 * (1.0 - step as f32 / (steps + 1) as f32);
        l.optimizer_step(&AdamW {
            lr,
            weight_decay: 0.0,
            ..AdamW::default()
        })
        .unwrap();
    }
    let last = loss(&l);
    assert!(
        last < 1e-2 * first,
        "loss fell from {first:.3e} to {last:.3e} only"
    );
    // the magnitude moved toward the teacher's row norms: its error shrank
    let m1 = l
        .adapter("d")
        .unwrap()
        .magnitude
        .as_ref()
        .unwrap()
        .to_vec()
        .unwrap();
    let want: Vec<f64> = (0..n)
        .map(|i| {
            w_star[i * k..(i + 1) * k]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let err = |m: &[f32]| -> f64 {
        m.iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    assert!(
        err(&m1) < 0.5 * err(&m0),
        "magnitude error {:.3e} -> {:.3e}",
        err(&m0),
        err(&m1)
    );
    eprintln!(
        "DoRA training: loss {first:.3e} -> {last:.3e}, magnitude error {:.3e} -> {:.3e}",
        err(&m0),
        err(&m1)
    );
}
