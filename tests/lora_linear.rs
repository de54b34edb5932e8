//! `LoraLinear`: PEFT-style initialisation, scaling (plain and rsLoRA), forward/backward against the
//! reference, the merged flag (never adds an adapter twice), unmerge, task switching, and state errors.

mod common;

use common::{Rng, ulp};
use half::bf16;
use lora_kernels::reference::{self, Dims};
use lora_kernels::{Device, Error, LoraConfig, LoraLinear, Tensor};

const TOL: f64 = 1e-2;

fn layer(
    dev: &Device,
    rng: &mut Rng,
    n: usize,
    k: usize,
) -> (Vec<bf16>, Vec<bf16>, LoraLinear<bf16>) {
    let w0: Vec<bf16> = rng.vec(n * k, 1.0 / (k as f64).sqrt());
    let bias: Vec<bf16> = rng.vec(n, 0.5);
    let l = LoraLinear::new(
        Tensor::from_slice(dev, &w0, &[n, k]).unwrap(),
        Some(Tensor::from_slice(dev, &bias, &[n]).unwrap()),
    )
    .unwrap();
    (w0, bias, l)
}

#[test]
fn scaling_plain_and_rslora() {
    assert_eq!(LoraConfig::new(16, 32.0).scale(), 2.0);
    let rs = LoraConfig {
        rank: 16,
        alpha: 32.0,
        use_rslora: true,
        dropout: 0.0,
    };
    assert_eq!(rs.scale(), 8.0);
    // PEFT computes lora_alpha / math.sqrt(r) in Python floats (f64) and rounds once where it scales
    // an f32 tensor; √24 rounded to f32 first makes 16/√24 one ulp low (0x1.a20bd6p+1, not ...d8p+1)
    let rs = LoraConfig {
        rank: 24,
        alpha: 16.0,
        ..rs
    };
    assert_eq!(rs.scale().to_bits(), 0x4051_05ec, "{:e}", rs.scale());
    // and alpha is PEFT's float itself (f64): 0.1 / √3 rounded once, not 0.1 rounded to f32 first
    let tenth = LoraConfig {
        rank: 3,
        alpha: 0.1,
        ..rs
    };
    assert_eq!(tenth.scale(), (0.1f64 / 3f64.sqrt()) as f32);
    assert_ne!(tenth.scale(), (0.1f32 as f64 / 3f64.sqrt()) as f32);
}

#[test]
fn fresh_adapter_is_peft_init_and_leaves_output_unchanged() {
    let dev = Device::emulator();
    let mut rng = Rng::new(1);
    let (m, n, k) = (20, 24, 40);
    let (w0, bias, mut l) = layer(&dev, &mut rng, n, k);
    l.add_adapter("default", LoraConfig::new(8, 16.0), 42)
        .unwrap();
    let ad = l.adapter("default").unwrap();
    let a = ad.a.to_vec().unwrap();
    let bound = 1.0 / (k as f64).sqrt();
    assert!(
        a.iter().all(|v| v.to_f64().abs() <= bound * 1.01),
        "A within ±1/√K"
    );
    let spread = a
        .iter()
        .map(|v| v.to_f64())
        .fold(0.0f64, |acc, v| acc.max(v.abs()));
    assert!(spread > 0.5 * bound, "A is not degenerate");
    assert!(
        ad.b.to_vec().unwrap().iter().all(|v| v.to_f64() == 0.0),
        "B starts at zero"
    );
    let x: Vec<bf16> = rng.vec(m * k, 1.0);
    let xt = Tensor::from_slice(&dev, &x, &[m, k]).unwrap();
    let y = l.forward(&xt).unwrap().y.to_vec().unwrap();
    let zero_b = vec![bf16::ZERO; n * 8];
    let want = reference::forward(
        &x,
        &w0,
        &a,
        &zero_b,
        Some(&bias),
        Dims { m, n, k, r: 8 },
        2.0,
    );
    assert!(reference::relative_error(&y, &want.y) < TOL);
}

/// A trained-looking adapter: forward and backward of the layer match the reference; merging gives
/// the same outputs; merging twice adds nothing; unmerging restores W0 within the rounding contract.
#[test]
fn forward_backward_merge_unmerge() {
    let dev = Device::emulator();
    let mut rng = Rng::new(2);
    let (m, n, k, r) = (33, 40, 72, 4);
    let (w0, bias, mut l) = layer(&dev, &mut rng, n, k);
    let cfg = LoraConfig {
        rank: r,
        alpha: 8.0,
        use_rslora: true,
        dropout: 0.0,
    };
    let a: Vec<bf16> = rng.vec(r * k, 0.2);
    let b: Vec<bf16> = rng.vec(n * r, 0.2);
    l.insert_adapter(
        "task",
        cfg,
        Tensor::from_slice(&dev, &a, &[r, k]).unwrap(),
        Tensor::from_slice(&dev, &b, &[n, r]).unwrap(),
    )
    .unwrap();
    let d = Dims { m, n, k, r };
    let s = cfg.scale() as f64;
    let x: Vec<bf16> = rng.vec(m * k, 1.0);
    let dy: Vec<bf16> = rng.vec(m * n, 1.0);
    let xt = Tensor::from_slice(&dev, &x, &[m, k]).unwrap();
    let dyt = Tensor::from_slice(&dev, &dy, &[m, n]).unwrap();
    let f = l.forward(&xt).unwrap();
    let want = reference::forward(&x, &w0, &a, &b, Some(&bias), d, s);
    let y_unmerged = f.y.to_vec().unwrap();
    assert!(reference::relative_error(&y_unmerged, &want.y) < TOL);
    let g = l.backward(&xt, &f.t, &dyt, true).unwrap();
    let gw = reference::backward(&x, &w0, &a, &b, &dy, d, s);
    assert!(reference::relative_error(&g.dx.as_ref().unwrap().to_vec().unwrap(), &gw.dx) < TOL);
    assert!(reference::relative_error(&g.da.to_vec().unwrap(), &gw.da) < TOL);
    assert!(reference::relative_error(&g.db.to_vec().unwrap(), &gw.db) < TOL);

    // batched activations [3, 11, ...]: the same rows, the same bits, X's leading dimensions kept
    let x3 = Tensor::from_slice(&dev, &x, &[3, 11, k]).unwrap();
    let dy3 = Tensor::from_slice(&dev, &dy, &[3, 11, n]).unwrap();
    let f3 = l.forward(&x3).unwrap();
    assert_eq!(f3.y.shape(), &[3, 11, n]);
    assert_eq!(f3.y.to_vec().unwrap(), y_unmerged);
    let g3 = l.backward(&x3, &f3.t, &dy3, true).unwrap();
    let dx3 = g3.dx.unwrap();
    assert_eq!(dx3.shape(), &[3, 11, k]);
    assert_eq!(
        dx3.to_vec().unwrap(),
        g.dx.as_ref().unwrap().to_vec().unwrap()
    );
    assert_eq!(g3.da.to_vec().unwrap(), g.da.to_vec().unwrap());
    assert_eq!(g3.db.to_vec().unwrap(), g.db.to_vec().unwrap());

    l.merge().unwrap();
    assert!(l.is_merged());
    let merged_w = l.w0().to_vec().unwrap();
    let worst = merged_w
        .iter()
        .zip(reference::merge(&w0, &a, &b, n, k, r, s))
        .map(|(g, e)| reference::ulp_distance(*g, e))
        .max()
        .unwrap();
    assert!(worst <= 1, "merged W0 within 1 ulp of the exact merge");
    l.merge().unwrap();
    assert_eq!(
        l.w0().to_vec().unwrap(),
        merged_w,
        "a second merge must not add the adapter again"
    );
    let y_merged = l.forward(&xt).unwrap().y.to_vec().unwrap();
    assert!(reference::relative_error(&y_merged, &want.y) < TOL);
    assert!(matches!(
        l.backward(&xt, &f.t, &dyt, false),
        Err(Error::InvalidState { .. })
    ));
    assert!(matches!(
        l.adapter_mut("task"),
        Err(Error::InvalidState { .. })
    ));

    l.unmerge().unwrap();
    assert!(!l.is_merged());
    let back = l.w0().to_vec().unwrap();
    // Rounding the merged value can drop bits of W0: each element comes back within
    // ½ ulp(merged) + ½ ulp(W0) (ulp of the result at a binade edge).
    for i in 0..n * k {
        let diff = (back[i].to_f64() - w0[i].to_f64()).abs();
        let bound = 0.5 * ulp(merged_w[i]) + 0.5 * ulp(w0[i]).max(ulp(back[i]));
        assert!(
            diff <= bound,
            "element {i}: unmerged {} vs W0 {}",
            back[i],
            w0[i]
        );
    }
    l.unmerge().unwrap();
    assert_eq!(
        l.w0().to_vec().unwrap(),
        back,
        "a second unmerge is a no-op"
    );
}

/// Task switching on a merged layer swaps B·A in place: W0 then holds base + s₂·B₂·A₂.
#[test]
fn task_switching_swaps_adapters_in_place() {
    let dev = Device::emulator();
    let mut rng = Rng::new(3);
    let (n, k) = (24, 48);
    let (w0, _, mut l) = layer(&dev, &mut rng, n, k);
    let mut adapters = Vec::new();
    for (name, r) in [("one", 2usize), ("two", 6)] {
        let a: Vec<bf16> = rng.vec(r * k, 0.3);
        let b: Vec<bf16> = rng.vec(n * r, 0.3);
        l.insert_adapter(
            name,
            LoraConfig::new(r, 2.0 * r as f64),
            Tensor::from_slice(&dev, &a, &[r, k]).unwrap(),
            Tensor::from_slice(&dev, &b, &[n, r]).unwrap(),
        )
        .unwrap();
        adapters.push((a, b, r));
    }
    assert_eq!(l.active(), Some("one"));
    l.merge().unwrap();
    l.set_active("two").unwrap();
    assert!(l.is_merged() && l.active() == Some("two"));
    let (a, b, r) = &adapters[1];
    let want = reference::merge(&w0, a, b, n, k, *r, 2.0);
    let got = l.w0().to_vec().unwrap();
    // A merge and an unmerge of adapter one, then the merge of two: three roundings, each at most
    // ½ ulp of the value rounded (adapter one's merged value, W0-sized values, the result).
    let (a1, b1, r1) = &adapters[0];
    let first = reference::merge(&w0, a1, b1, n, k, *r1, 2.0);
    let exact_two = reference::delta(a, b, n, k, *r, 2.0);
    for i in 0..n * k {
        let diff = (got[i].to_f64() - (w0[i].to_f64() + exact_two[i])).abs();
        let bound = 0.5 * ulp(first[i]) + 0.5 * ulp(w0[i]) + ulp(got[i]).max(ulp(want[i]));
        assert!(
            diff <= bound,
            "element {i}: {} after switching, want {}",
            got[i],
            want[i]
        );
    }
    assert!(matches!(
        l.set_active("three"),
        Err(Error::UnknownAdapter { .. })
    ));
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::emulator();
    let w0 = Tensor::<bf16>::zeros(&dev, &[4, 8]).unwrap();
    let mut l = LoraLinear::new(w0, None).unwrap();
    let x = Tensor::<bf16>::zeros(&dev, &[2, 8]).unwrap();
    assert!(
        matches!(l.forward(&x), Err(Error::InvalidState { .. })),
        "no adapter yet"
    );
    assert!(matches!(
        l.add_adapter("a", LoraConfig::new(0, 1.0), 1),
        Err(Error::Rank { .. })
    ));
    assert!(matches!(
        l.add_adapter("a", LoraConfig::new(129, 1.0), 1),
        Err(Error::Rank { .. })
    ));
    let a = Tensor::<bf16>::zeros(&dev, &[2, 9]).unwrap();
    let b = Tensor::<bf16>::zeros(&dev, &[4, 2]).unwrap();
    let e = l
        .insert_adapter("a", LoraConfig::new(2, 1.0), a, b)
        .unwrap_err();
    assert!(
        e.to_string().contains("`a`") && e.to_string().contains("[2, 8]"),
        "{e}"
    );
    let bias = Tensor::<bf16>::zeros(&dev, &[5]).unwrap();
    let w0 = Tensor::<bf16>::zeros(&dev, &[4, 8]).unwrap();
    assert!(matches!(
        LoraLinear::new(w0, Some(bias)),
        Err(Error::Shape { arg: "bias", .. })
    ));
}

/// `safe_merge` (PEFT's `merge(safe_merge=True)`): an adapter with a NaN is refused on every thread
/// order, W0 and the merged flag as they were; a clean adapter merges to the bits of `merge`, and
/// `safe_unmerge` takes it back out.
#[test]
fn safe_merge_refuses_a_nan_adapter_and_leaves_the_layer_as_it_was() {
    use lora_kernels::ops::{self, NonFiniteCounts};
    for dev in common::emulators() {
        let mut rng = Rng::new(7);
        let (n, k, r) = (24, 40, 4);
        let (w0, _, mut l) = layer(&dev, &mut rng, n, k);
        let a: Vec<bf16> = rng.vec(r * k, 0.5);
        let b: Vec<bf16> = rng.vec(n * r, 0.5);
        let mut bad = a.clone();
        bad[3] = bf16::NAN; // A[0][3]: column 3 of every row
        let cfg = LoraConfig::new(r, 8.0);
        let t = |v: &[bf16], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
        l.insert_adapter("bad", cfg, t(&bad, &[r, k]), t(&b, &[n, r]))
            .unwrap();
        l.insert_adapter("good", cfg, t(&a, &[r, k]), t(&b, &[n, r]))
            .unwrap();
        assert_eq!(l.active(), Some("bad"));
        let e = l.safe_merge().unwrap_err();
        assert!(
            matches!(e, Error::NonFiniteMerge { nan, inf: 0, .. } if nan == n as u64),
            "{dev:?}: {e}"
        );
        assert!(
            e.to_string()
                .starts_with("safe_merge: w0: 24 of 960 elements"),
            "{e}"
        );
        assert!(!l.is_merged(), "{dev:?}");
        assert_eq!(l.w0().to_vec().unwrap(), w0, "{dev:?}: W0 changed");

        l.set_active("good").unwrap();
        assert_eq!(l.safe_merge().unwrap(), NonFiniteCounts::default());
        assert!(l.is_merged());
        let mut want = t(&w0, &[n, k]);
        ops::merge(&mut want, &t(&a, &[r, k]), &t(&b, &[n, r]), cfg.scale()).unwrap();
        assert_eq!(l.w0().to_vec().unwrap(), want.to_vec().unwrap(), "{dev:?}");
        assert_eq!(l.safe_merge().unwrap(), NonFiniteCounts::default(), "no-op");
        assert_eq!(l.safe_unmerge().unwrap(), NonFiniteCounts::default());
        assert!(!l.is_merged());
    }
}

/// The training API on f32 adapters with dropout and batched activations: train_forward and
/// train_backward give the ops' bits for the same mask (offset = the forward's index), a second
/// forward draws another mask, micro-batches accumulate, and optimizer_step is the AdamW reference's
/// update of the f32 master adapters, bit for bit.
#[test]
fn training_api_f32_adapters_dropout_accumulation_adamw() {
    use lora_kernels::ops::{self, AdamW, GradMode, Workspace};
    use lora_kernels::{Dropout, Element};
    let dev = Device::emulator();
    let mut rng = Rng::new(31);
    let (n, k, r, p) = (24, 40, 8, 0.25f32);
    let lead = [2usize, 3];
    let m: usize = lead.iter().product();
    let w0: Vec<bf16> = rng.vec(n * k, 0.3);
    let (a, b): (Vec<f32>, Vec<f32>) = (rng.vec(r * k, 0.3), rng.vec(n * r, 0.3));
    let up = |v: &[bf16], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
    let up32 = |v: &[f32], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
    let mut layer = LoraLinear::with_f32_adapters(up(&w0, &[n, k]), None).unwrap();
    let cfg = LoraConfig::new(r, 16.0).with_dropout(p);
    layer
        .insert_adapter("t", cfg, up32(&a, &[r, k]), up32(&b, &[n, r]))
        .unwrap();
    layer.set_dropout_seed(99);
    let xs: Vec<Vec<bf16>> = (0..2).map(|_| rng.vec(m * k, 1.0)).collect();
    let dys: Vec<Vec<bf16>> = (0..2).map(|_| rng.vec(m * n, 1.0)).collect();
    let x0 = up(&xs[0], &[2, 3, k]);
    let dy0 = up(&dys[0], &[2, 3, n]);

    // the ops with the same dropout (seed 99, offset 0: the first training forward)
    let drop0 = Dropout::new(p, 99, 0).unwrap();
    let (aw, bw) = (up32(&a, &[r, k]), up32(&b, &[n, r]));
    let mut ws = Workspace::new();
    let mut y = Tensor::<bf16>::zeros(&dev, &[2, 3, n]).unwrap();
    let mut t = Tensor::<bf16>::zeros(&dev, &[2, 3, r]).unwrap();
    ops::lora_forward_into(
        &x0,
        layer.w0(),
        &aw,
        &bw,
        None,
        cfg.scale(),
        drop0,
        &mut y,
        &mut t,
        &mut ws,
    )
    .unwrap();
    let y_layer = layer.train_forward(&x0).unwrap().to_vec().unwrap();
    assert!(
        y_layer == y.to_vec().unwrap(),
        "train_forward differs from the op with the same mask"
    );
    let f = reference::forward_as_kernels(
        &xs[0],
        &w0,
        &a,
        &b,
        None,
        Dims { m, n, k, r },
        cfg.scale() as f64,
        &drop0,
    );
    assert!(reference::relative_error(&y_layer, &f.y) < TOL);

    let dx_layer = layer
        .train_backward(&x0, &dy0, GradMode::Overwrite, true)
        .unwrap()
        .unwrap()
        .to_vec()
        .unwrap();
    let mut dx = Tensor::<bf16>::zeros(&dev, &[2, 3, k]).unwrap();
    let mut da = Tensor::<f32>::zeros(&dev, &[r, k]).unwrap();
    let mut db = Tensor::<f32>::zeros(&dev, &[n, r]).unwrap();
    dx.poison().unwrap();
    da.poison().unwrap();
    db.poison().unwrap();
    ops::lora_backward_into(
        &x0,
        layer.w0(),
        &aw,
        &bw,
        &t,
        &dy0,
        cfg.scale(),
        drop0,
        Some(&mut dx),
        &mut da,
        &mut db,
        GradMode::Overwrite,
        &mut ws,
    )
    .unwrap();
    assert!(dx_layer == dx.to_vec().unwrap(), "dX differs");
    let (gda, gdb) = layer.grads().unwrap();
    let (gda, gdb) = (gda.to_vec().unwrap(), gdb.to_vec().unwrap());
    assert!(
        gda == da.to_vec().unwrap() && gdb == db.to_vec().unwrap(),
        "dA/dB differ"
    );
    // and against the reference (with the forward's T): equal values alone would pass two calls that
    // both got the gradients wrong the same way
    let g = reference::backward_as_kernels(
        &xs[0],
        &w0,
        &a,
        &b,
        &t.to_vec().unwrap(),
        &dys[0],
        Dims { m, n, k, r },
        cfg.scale() as f64,
        &drop0,
    );
    for (name, err) in [
        ("dx", reference::relative_error(&dx_layer, &g.dx)),
        ("da", reference::relative_error(&gda, &g.da)),
        ("db", reference::relative_error(&gdb, &g.db)),
    ] {
        assert!(err < TOL, "{name}: relative error {err:e}");
    }

    // the second micro-batch: a fresh mask (offset 1), gradients added to the first's
    let x1 = up(&xs[1], &[2, 3, k]);
    let dy1 = up(&dys[1], &[2, 3, n]);
    let y1 = layer.train_forward(&x1).unwrap().to_vec().unwrap();
    let drop1 = drop0.with_offset(1);
    let f1 = reference::forward_as_kernels(
        &xs[1],
        &w0,
        &a,
        &b,
        None,
        Dims { m, n, k, r },
        cfg.scale() as f64,
        &drop1,
    );
    assert!(
        reference::relative_error(&y1, &f1.y) < TOL,
        "the second forward is not offset 1's mask"
    );
    let f1_wrong = reference::forward_as_kernels(
        &xs[1],
        &w0,
        &a,
        &b,
        None,
        Dims { m, n, k, r },
        cfg.scale() as f64,
        &drop0,
    );
    assert!(
        reference::relative_error(&y1, &f1_wrong.y) > TOL,
        "the mask did not change between forwards"
    );
    layer
        .train_backward(&x1, &dy1, GradMode::Accumulate, false)
        .unwrap();
    let mut t1 = Tensor::<bf16>::zeros(&dev, &[2, 3, r]).unwrap();
    ops::lora_forward_into(
        &x1,
        layer.w0(),
        &aw,
        &bw,
        None,
        cfg.scale(),
        drop1,
        &mut y,
        &mut t1,
        &mut ws,
    )
    .unwrap();
    ops::lora_backward_into(
        &x1,
        layer.w0(),
        &aw,
        &bw,
        &t1,
        &dy1,
        cfg.scale(),
        drop1,
        None,
        &mut da,
        &mut db,
        GradMode::Accumulate,
        &mut ws,
    )
    .unwrap();
    let (ga, gb) = (da.to_vec().unwrap(), db.to_vec().unwrap());
    let (gda, gdb) = layer.grads().unwrap();
    assert!(
        gda.to_vec().unwrap() == ga && gdb.to_vec().unwrap() == gb,
        "accumulated dA/dB differ"
    );

    // AdamW on the f32 master adapters: the reference's update, bit for bit
    let hp = AdamW {
        lr: 1e-2,
        ..AdamW::default()
    };
    layer.optimizer_step(&hp).unwrap();
    let c = hp.constants(1);
    let (mut ra, mut rb) = (a.clone(), b.clone());
    ops::adamw_reference_step(
        &mut ra,
        &mut vec![0.0; r * k],
        &mut vec![0.0; r * k],
        &ga,
        &c,
    );
    ops::adamw_reference_step(
        &mut rb,
        &mut vec![0.0; n * r],
        &mut vec![0.0; n * r],
        &gb,
        &c,
    );
    let ad = layer.adapter("t").unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits_u32()).collect::<Vec<_>>();
    assert!(
        bits(&ad.a.to_vec().unwrap()) == bits(&ra) && bits(&ad.b.to_vec().unwrap()) == bits(&rb),
        "AdamW step differs from the reference"
    );
}

/// The training API's errors: a 16-bit adapter has no master weights to step, a dropout outside
/// [0, 1) is refused when the adapter is added, a backward needs a forward first.
#[test]
fn training_api_errors() {
    let dev = Device::emulator();
    let mut rng = Rng::new(32);
    let (_, _, mut l) = layer(&dev, &mut rng, 8, 16);
    let e = l
        .add_adapter("bad", LoraConfig::new(4, 8.0).with_dropout(1.0), 1)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                arg: "config.dropout",
                ..
            }
        ),
        "{e}"
    );
    l.add_adapter("ok", LoraConfig::new(4, 8.0), 1).unwrap();
    let x = Tensor::<bf16>::zeros(&dev, &[3, 16]).unwrap();
    let dy = Tensor::<bf16>::zeros(&dev, &[3, 8]).unwrap();
    let e = l
        .train_backward(&x, &dy, lora_kernels::ops::GradMode::Overwrite, false)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    l.train_forward(&x).unwrap();
    l.train_backward(&x, &dy, lora_kernels::ops::GradMode::Overwrite, false)
        .unwrap();
    let e = l
        .optimizer_step(&lora_kernels::ops::AdamW::default())
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedDType { arg: "adapter", .. }),
        "{e}"
    );
}

/// A PEFT adapter saved in f32 (PEFT's default) loads into f32 adapters exactly, with its rank,
/// alpha and dropout, and runs forward as the reference says; 16-bit adapters refuse the f32 file
/// rather than round it.
#[test]
fn peft_f32_adapter_loads_as_f32_adapters() {
    use lora_kernels::Dropout;
    use lora_kernels::peft::PeftAdapter;
    let dir = common::fixture("adapter");
    let adapter = PeftAdapter::load(&dir).unwrap();
    let module = adapter.modules[0].name.clone();
    let (a_file, b_file) = (adapter.modules[0].a.to_f32(), adapter.modules[0].b.to_f32());
    let (r, k) = (adapter.modules[0].a.rows, adapter.modules[0].a.cols);
    let n = adapter.modules[0].b.rows;
    assert_eq!(
        adapter.modules[0].a.dtype,
        lora_kernels::DType::F32,
        "the fixture holds f32"
    );
    let dev = Device::emulator();
    let mut rng = Rng::new(41);
    let w0: Vec<bf16> = rng.vec(n * k, 0.2);
    let mut l =
        LoraLinear::with_f32_adapters(Tensor::from_slice(&dev, &w0, &[n, k]).unwrap(), None)
            .unwrap();
    l.insert_peft_module("peft", &adapter, &module).unwrap();
    let ad = l.adapter("peft").unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&ad.a.to_vec().unwrap()) == bits(&a_file)
            && bits(&ad.b.to_vec().unwrap()) == bits(&b_file)
    );
    assert_eq!(
        (ad.config.rank, ad.config.alpha),
        (
            adapter.config.rank_for(&module),
            adapter.config.alpha_for(&module)
        )
    );
    let m = 19;
    let x: Vec<bf16> = rng.vec(m * k, 1.0);
    let y = l
        .forward(&Tensor::from_slice(&dev, &x, &[m, k]).unwrap())
        .unwrap()
        .y
        .to_vec()
        .unwrap();
    let f = reference::forward_as_kernels(
        &x,
        &w0,
        &a_file,
        &b_file,
        None,
        Dims { m, n, k, r },
        ad.config.scale() as f64,
        &Dropout::NONE,
    );
    let err = reference::relative_error(&y, &f.y);
    assert!(err < TOL, "forward through the loaded f32 adapter: {err:e}");
    // 16-bit adapters would round the file's f32 values: refused, naming the tensor
    let (_, _, mut l16) = layer(&dev, &mut rng, n, k);
    let e = l16
        .insert_peft_module("peft", &adapter, &module)
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedDType { arg: "lora_A", .. })
            && e.to_string().contains("with_f32_adapters"),
        "{e}"
    );
    let e = l
        .insert_peft_module("x", &adapter, "no.such.module")
        .unwrap_err();
    assert!(e.to_string().contains("no module"), "{e}");
}

/// The dropout masks of a layer's training forwards are numbered per layer: switching the active
/// adapter does not restart them (the third forward uses offset 2 whichever adapter it runs).
#[test]
fn dropout_offsets_count_per_layer() {
    use lora_kernels::Dropout;
    use lora_kernels::ops::{self, Workspace};
    let dev = Device::emulator();
    let mut rng = Rng::new(33);
    let (m, n, k, r, p) = (9, 16, 24, 4, 0.5f32);
    let w0: Vec<bf16> = rng.vec(n * k, 0.3);
    let x: Vec<bf16> = rng.vec(m * k, 1.0);
    let mut l =
        LoraLinear::with_f32_adapters(Tensor::from_slice(&dev, &w0, &[n, k]).unwrap(), None)
            .unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) = (rng.vec(r * k, 0.3), rng.vec(n * r, 0.3));
    let up32 = |v: &[f32], shape: &[usize]| Tensor::from_slice(&dev, v, shape).unwrap();
    let cfg = LoraConfig::new(r, 8.0).with_dropout(p);
    l.insert_adapter("one", cfg, up32(&a, &[r, k]), up32(&b, &[n, r]))
        .unwrap();
    l.insert_adapter("two", cfg, up32(&a, &[r, k]), up32(&b, &[n, r]))
        .unwrap();
    l.set_dropout_seed(5);
    let xt = Tensor::from_slice(&dev, &x, &[m, k]).unwrap();
    l.train_forward(&xt).unwrap();
    l.set_active("two").unwrap();
    l.train_forward(&xt).unwrap();
    l.set_active("one").unwrap();
    let got = l.train_forward(&xt).unwrap().to_vec().unwrap();
    let mut y = Tensor::<bf16>::zeros(&dev, &[m, n]).unwrap();
    let mut t = Tensor::<bf16>::zeros(&dev, &[m, r]).unwrap();
    let drop2 = Dropout::new(p, 5, 2).unwrap();
    let (at, bt) = (up32(&a, &[r, k]), up32(&b, &[n, r]));
    ops::lora_forward_into(
        &xt,
        l.w0(),
        &at,
        &bt,
        None,
        cfg.scale(),
        drop2,
        &mut y,
        &mut t,
        &mut Workspace::new(),
    )
    .unwrap();
    assert!(
        got == y.to_vec().unwrap(),
        "the third training forward did not use offset 2"
    );
}

/// Several PEFT adapter directories in one batch: the fixture's adapter and a second directory (the
/// same module saved again with other values and alpha) go into one layer (`insert_peft_module`) and
/// into one `AdapterSet` (`add_peft_module`); `forward_multi` gives each row the bits of the layer's
/// single-adapter forward with that adapter active, and rows without an adapter the base alone.
#[test]
fn forward_multi_over_peft_directories() {
    use lora_kernels::peft::{HostMatrix, PeftAdapter};
    use lora_kernels::{AdapterIndex, AdapterSet, ops};
    let first = PeftAdapter::load(&common::fixture("adapter")).unwrap();
    let module = first.modules[0].name.clone();
    let (r, k) = (first.modules[0].a.rows, first.modules[0].a.cols);
    let n = first.modules[0].b.rows;
    let mut rng = Rng::new(0x3a17);
    let mut second = first.clone();
    second.config.lora_alpha *= 3.0;
    second.modules[0].a = HostMatrix::from_f32(r, k, &rng.vec::<f32>(r * k, 0.3));
    second.modules[0].b = HostMatrix::from_f32(n, r, &rng.vec::<f32>(n * r, 0.3));
    let dir = std::env::temp_dir().join(format!("lk-multi-peft-{}", std::process::id()));
    second.save(&dir).unwrap();
    let second = PeftAdapter::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();

    let dev = Device::emulator();
    let w0: Vec<bf16> = rng.vec(n * k, 0.2);
    let mut l =
        LoraLinear::with_f32_adapters(Tensor::from_slice(&dev, &w0, &[n, k]).unwrap(), None)
            .unwrap();
    l.insert_peft_module("first", &first, &module).unwrap();
    l.insert_peft_module("second", &second, &module).unwrap();
    let m = 23;
    let x = Tensor::from_slice(&dev, &rng.vec::<bf16>(m * k, 1.0), &[m, k]).unwrap();
    let names = [Some("second"), None, Some("first")];
    let rows: Vec<Option<&str>> = (0..m).map(|i| names[(i * 7 / 3) % 3]).collect();
    let y = l.forward_multi(&x, &rows).unwrap().y.to_vec().unwrap();
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for name in ["first", "second"] {
        l.set_active(name).unwrap();
        let single = l.forward(&x).unwrap().y.to_vec().unwrap();
        for i in (0..m).filter(|&i| rows[i] == Some(name)) {
            assert_eq!(
                bits(&y[i * n..(i + 1) * n]),
                bits(&single[i * n..(i + 1) * n]),
                "row {i}: forward_multi differs from the forward through `{name}` alone"
            );
        }
    }
    let base = ops::lora_forward_multi(
        &x,
        l.w0(),
        None,
        &AdapterSet::<f32>::new(&dev, n, k).unwrap(),
        &AdapterIndex::new(&AdapterSet::<f32>::new(&dev, n, k).unwrap(), &vec![None; m]).unwrap(),
    );
    assert!(base.is_err(), "an index of another set is refused");
    // the same two directories straight into a set
    let mut set = AdapterSet::<f32>::new(&dev, n, k).unwrap();
    let s1 = set.add_peft_module(&first, &module).unwrap();
    let s2 = set.add_peft_module(&second, &module).unwrap();
    assert_eq!(set.scale(s2).unwrap(), 3.0 * set.scale(s1).unwrap());
    let slots: Vec<Option<u32>> = rows
        .iter()
        .map(|r| r.map(|name| if name == "first" { s1 } else { s2 }))
        .collect();
    let index = AdapterIndex::new(&set, &slots).unwrap();
    let y2 = ops::lora_forward_multi(&x, l.w0(), None, &set, &index)
        .unwrap()
        .y
        .to_vec()
        .unwrap();
    assert_eq!(
        bits(&y),
        bits(&y2),
        "the layer's set and a set built from the directories agree"
    );
    let e = l.forward_multi(&x, &vec![Some("third"); m]).unwrap_err();
    assert!(matches!(e, Error::UnknownAdapter { .. }), "{e}");
    let mut l16 = layer(&dev, &mut rng, n, k).2;
    let mut set16 = AdapterSet::<bf16>::new(&dev, n, k).unwrap();
    let e = set16.add_peft_module(&first, &module).unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedDType { arg: "lora_A", .. }),
        "{e}"
    );
    l16.add_adapter("a", LoraConfig::new(4, 8.0), 1).unwrap();
    l16.merge().unwrap();
    let e = l16.forward_multi(&x, &vec![None; m]).unwrap_err();
    assert!(e.to_string().contains("merged"), "{e}");
}

/// A training adapter replaced through `adapter_mut` by tensors of another rank trains on: its buffers
/// (gradients, Adam's moments) are made anew for the new shapes, the backward needs a forward of the new
/// rank first and the optimizer step a backward, and the gradients match the reference; a config rank
/// that disagrees with A is an error naming both (for the forward and the merge too: their scale reads
/// it), not a shape error about a buffer the caller never passed.
#[test]
fn an_adapter_replaced_with_another_rank_trains_on() {
    use lora_kernels::ops::{AdamW, GradMode};
    let dev = Device::emulator();
    let mut rng = Rng::new(0x7a);
    let (n, k, m) = (24, 40, 6);
    let w0: Vec<bf16> = rng.vec(n * k, 0.3);
    let mut layer =
        LoraLinear::with_f32_adapters(Tensor::from_slice(&dev, &w0, &[n, k]).unwrap(), None)
            .unwrap();
    layer.add_adapter("t", LoraConfig::new(8, 16.0), 1).unwrap();
    let xs: Vec<bf16> = rng.vec(m * k, 1.0);
    let dys: Vec<bf16> = rng.vec(m * n, 1.0);
    let x = Tensor::from_slice(&dev, &xs, &[m, k]).unwrap();
    let dy = Tensor::from_slice(&dev, &dys, &[m, n]).unwrap();
    layer.train_forward(&x).unwrap();
    layer
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();
    layer.optimizer_step(&AdamW::default()).unwrap();

    // rank 8 -> 4, new values
    let r = 4;
    let (a, b): (Vec<f32>, Vec<f32>) = (rng.vec(r * k, 0.3), rng.vec(n * r, 0.3));
    {
        let ad = layer.adapter_mut("t").unwrap();
        ad.a = Tensor::from_slice(&dev, &a, &[r, k]).unwrap();
        ad.b = Tensor::from_slice(&dev, &b, &[n, r]).unwrap();
    }
    for e in [
        layer.train_forward(&x).unwrap_err(),
        layer.forward(&x).unwrap_err(),
        layer.merge().unwrap_err(),
    ] {
        assert!(
            matches!(e, Error::InvalidState { .. }) && e.to_string().contains("config.rank is 8"),
            "{e}"
        );
    }
    assert!(!layer.is_merged());
    layer.adapter_mut("t").unwrap().config.rank = r;
    // the old gradients do not fit the new shapes: no step before a backward of the new rank
    let e = layer.optimizer_step(&AdamW::default()).unwrap_err();
    assert!(e.to_string().contains("no train_backward"), "{e}");
    let e = layer
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap_err();
    assert!(e.to_string().contains("no train_forward"), "{e}");
    layer.train_forward(&x).unwrap();
    layer
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();
    let (da, db) = layer.grads().unwrap();
    assert_eq!((da.shape(), db.shape()), (&[r, k][..], &[n, r][..]));
    let scale = layer.adapter("t").unwrap().config.scale() as f64;
    let f = reference::forward_as_kernels(
        &xs,
        &w0,
        &a,
        &b,
        None,
        Dims { m, n, k, r },
        scale,
        &Default::default(),
    );
    let t: Vec<bf16> = f.t.iter().map(|&v| bf16::from_f64(v)).collect();
    let g = reference::backward_as_kernels(
        &xs,
        &w0,
        &a,
        &b,
        &t,
        &dys,
        Dims { m, n, k, r },
        scale,
        &Default::default(),
    );
    let (da, db) = (da.to_vec().unwrap(), db.to_vec().unwrap());
    assert!(
        reference::relative_error(&da, &g.da) < TOL && reference::relative_error(&db, &g.db) < TOL
    );
    layer.optimizer_step(&AdamW::default()).unwrap();
}
