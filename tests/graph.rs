//! Graph capture (`Device::capture`, `Graph::replay`): the LoRA forward and backward (the small-M and
//! the general paths), a gradient accumulation over replays and the many-adapter forward, captured once
//! and replayed with new inputs, give the bits of the same ops run eagerly on fresh tensors (which the
//! property tests check against the f64 reference), and nothing runs at the capture; every operation a
//! capture cannot record is refused with an error naming it (a launch from another thread too), a
//! replay after a captured tensor was dropped or an adapter set changed is refused (an adapter replaced
//! at its rank is replayed with its new values), and the device is usable after. On the
//! emulator under its four thread orders (the race detector and memcheck run at every replay), and on a
//! GPU when present, on a stream of its own (a CUDA graph), where the replay's host time per forward is
//! printed against the eager ops'.

mod common;

use std::io::Write;

use common::graph::{Step, check_replay, poisoned, up};
use common::lora::{Layer, run};
use common::multi::{Batch, set_of};
use common::{Rng, bits, emulators};
use half::bf16;
use lora_kernels::ops::{self, GradMode, Workspace};
use lora_kernels::ops::{AdamW, AdamwSchedule};
use lora_kernels::reference::Dims;
use lora_kernels::{
    AdapterIndex, Device, Dropout, DropoutSchedule, Element, Error, LoraConfig, LoraLinear, Tensor,
};

/// The small-M forward (M ≤ 16) and the general path with a ragged M, N, K.
const SHAPES: [Dims; 3] = [
    Dims {
        m: 16,
        n: 72,
        k: 64,
        r: 16,
    },
    Dims {
        m: 1,
        n: 40,
        k: 32,
        r: 8,
    },
    Dims {
        m: 37,
        n: 65,
        k: 96,
        r: 8,
    },
];

#[test]
fn replays_give_the_eager_bits_for_new_inputs() {
    for (i, dev) in emulators().iter().enumerate() {
        for (j, d) in SHAPES.into_iter().enumerate() {
            check_replay(dev, d, (i * 8 + j) as u64);
        }
    }
}

#[test]
fn replayed_accumulation_adds_each_replays_gradients() {
    let d = Dims {
        m: 24,
        n: 48,
        k: 40,
        r: 8,
    };
    for dev in emulators().iter().take(2) {
        let mut rng = Rng::new(11);
        let l = Layer::<bf16, bf16>::random(&mut rng, d, 1.5, false);
        let grads0 = (
            rng.vec::<bf16>(d.r * d.k, 0.5),
            rng.vec::<bf16>(d.n * d.r, 0.5),
        );
        // eager: two accumulating steps from grads0
        let mut eager = Step::new(dev, &l);
        eager.da.copy_from_slice(&grads0.0).unwrap();
        eager.db.copy_from_slice(&grads0.1).unwrap();
        eager.ops(true, GradMode::Accumulate).unwrap();
        eager.ops(true, GradMode::Accumulate).unwrap();
        // captured: the same two steps as two replays
        let mut s = Step::new(dev, &l);
        s.ops(true, GradMode::Overwrite).unwrap();
        let graph = dev.capture(|| s.ops(true, GradMode::Accumulate)).unwrap();
        s.da.copy_from_slice(&grads0.0).unwrap();
        s.db.copy_from_slice(&grads0.1).unwrap();
        graph.replay().unwrap();
        let once = s.outputs();
        graph.replay().unwrap();
        let twice = s.outputs();
        assert_ne!(bits(&once.da), bits(&twice.da), "{dev:?}: each replay adds");
        assert_eq!(twice.bits(), eager.outputs().bits(), "{dev:?}");
    }
}

/// `b`'s rows as adapter slots.
fn slots_of(b: &Batch<bf16, bf16>) -> Vec<Option<u32>> {
    b.rows.iter().map(|r| r.map(|a| a as u32)).collect()
}

/// A batch of `m` rows over `like`'s layer and adapters: new X, and a new row map unless `rows`.
fn batch_like(
    rng: &mut Rng,
    like: &Batch<bf16, bf16>,
    rows: Option<Vec<Option<usize>>>,
) -> Batch<bf16, bf16> {
    let mut b =
        Batch::<bf16, bf16>::random(rng, (like.m, like.n, like.k), like.adapters.len(), true);
    (b.w0, b.bias, b.adapters) = (like.w0.clone(), like.bias.clone(), like.adapters.clone());
    if let Some(rows) = rows {
        b.rows = rows;
    }
    b
}

#[test]
fn many_adapter_forward_replays_with_new_maps_and_a_changed_set_refuses() {
    // the decode kernels, one row tile, several row tiles
    for (m, stream) in [(16usize, 21u64), (40, 22), (200, 23)] {
        let dev = Device::emulator();
        let mut rng = Rng::new(stream);
        let mut b1 = Batch::<bf16, bf16>::random(&mut rng, (m, 56, 48), 3, true);
        // the captured map names one adapter at most, so the capture's grid cannot be sized by it
        b1.rows = b1.rows.iter().map(|r| r.map(|_| 1)).collect();
        let mut set = set_of(&dev, &b1);
        let b2 = batch_like(&mut rng, &b1, Some(b1.rows.clone())); // new X
        let b3 = batch_like(&mut rng, &b1, None); // new X, a new map over the three adapters
        let eager: Vec<(Vec<bf16>, Vec<bf16>)> = [&b1, &b2, &b3]
            .iter()
            .map(|b| common::multi::run(&dev, b, &set))
            .collect();
        let mut index = AdapterIndex::new(&set, &slots_of(&b1)).unwrap();
        let (mut x, w0, bias) = b1.layer_on(&dev);
        let mut y = poisoned::<bf16>(&dev, &[m, b1.n]);
        let mut t = poisoned::<bf16>(&dev, &[m, set.max_rank()]);
        let mut ws = Workspace::new();
        let forward = |x: &Tensor<bf16>,
                       index: &AdapterIndex,
                       y: &mut Tensor<bf16>,
                       t: &mut Tensor<bf16>,
                       ws: &mut Workspace<bf16>| {
            ops::lora_forward_multi_into(x, &w0, bias.as_ref(), &set, index, y, t, ws)
        };
        forward(&x, &index, &mut y, &mut t, &mut ws).unwrap();
        y.poison().unwrap();
        t.poison().unwrap();
        let graph = dev
            .capture(|| forward(&x, &index, &mut y, &mut t, &mut ws))
            .unwrap();
        let poison = bf16::poison().to_bits_u32();
        assert!(
            bits(&y.to_vec().unwrap()).iter().all(|&b| b == poison),
            "m = {m}: the capture ran nothing"
        );
        for (i, b) in [&b1, &b2, &b3].into_iter().enumerate() {
            x.copy_from_slice(&b.x).unwrap();
            index.update(&set, &slots_of(b)).unwrap();
            y.poison().unwrap();
            t.poison().unwrap();
            graph.replay().unwrap();
            assert_eq!(
                bits(&y.to_vec().unwrap()),
                bits(&eager[i].0),
                "m = {m}, batch {i}: Y"
            );
            assert_eq!(
                bits(&t.to_vec().unwrap()),
                bits(&eager[i].1),
                "m = {m}, batch {i}: T"
            );
        }
        // the set changed in place (a slot removed and refilled): the graph's launch parameters hold
        // the old ranks
        set.remove(0).unwrap();
        let (a, bb, r, s) = &b1.adapters[0];
        let at = Tensor::from_slice(&dev, a, &[*r, b1.k]).unwrap();
        let bt = Tensor::from_slice(&dev, bb, &[b1.n, *r]).unwrap();
        assert_eq!(set.add(&at, &bt, *s).unwrap(), 0);
        refused(
            "a changed adapter set",
            graph.replay(),
            &["`adapter table`", "AdapterSet changed"],
        );
        // changing the set, or the map, during a capture is refused before anything changes
        let slots_before = set.occupied();
        refused(
            "AdapterSet::remove in a capture",
            dev.capture(|| set.remove(1)),
            &["AdapterSet::remove"],
        );
        refused(
            "AdapterSet::add in a capture",
            dev.capture(|| set.add(&at, &bt, *s).map(drop)),
            &["AdapterSet::add"],
        );
        refused(
            "AdapterIndex::update in a capture",
            dev.capture(|| index.update(&set, &slots_of(&b1))),
            &["copy_from_slice"],
        );
        assert_eq!(set.occupied(), slots_before, "the set is unchanged");
        // an update names the index's own set, of its length
        let other = set_of(&dev, &b1);
        refused(
            "another set",
            index.update(&other, &slots_of(&b1)),
            &["not the AdapterSet"],
        );
        match index.update(&set, &[None]) {
            Err(Error::Shape { arg: "rows", .. }) if m > 1 => {}
            other => panic!("m = {m}: {other:?}"),
        }
    }
}

/// `AdapterSet::replace`: new values of an adapter at its rank, in its slot. An eager forward after it
/// gives the bits of a set built with the new values; an `AdapterIndex` made before it stays valid;
/// a graph captured before it replays with the new values (same bits), for plain → plain, DoRA → DoRA
/// and, on a set that held a DoRA adapter at the capture, plain → DoRA; a graph captured on a set
/// without DoRA refuses to replay after plain → DoRA, and any graph after DoRA → plain. Another rank
/// and an empty slot are refused before anything changes; replace cannot be captured.
/// At M = 16 (the decode kernels) and 40, K = 44 with odd ranks (B's offset in the arena rounded up
/// past A's r·K elements) and K = 48.
#[test]
fn a_replaced_adapter_serves_its_new_values_in_eager_calls_and_replays() {
    for (m, k, ranks, stream) in [
        (40, 48, [9, 16, 24], 61),
        (16, 44, [5, 17, 3], 62),
        (40, 44, [1, 33, 7], 63),
    ] {
        replace_case(m, k, &ranks, stream);
    }
}

fn replace_case(m: usize, k: usize, ranks: &[usize], stream: u64) {
    use common::multi::random_adapter;
    let n = 56;
    let dev = Device::emulator();
    let mut rng = Rng::new(stream);
    let mut b = Batch::<bf16, bf16>::with_ranks(&mut rng, (m, n, k), ranks, true);
    let (x, w0, bias) = b.layer_on(&dev);
    let magnitude = |rng: &mut Rng| {
        let v: Vec<f32> = (0..n).map(|_| 0.5 + rng.uniform().abs() as f32).collect();
        Tensor::from_slice(&dev, &v, &[n]).unwrap()
    };
    let upload = |ad: &common::multi::HostAdapter<bf16>| {
        let (a, bb, r, _) = ad;
        (
            Tensor::from_slice(&dev, a, &[*r, k]).unwrap(),
            Tensor::from_slice(&dev, bb, &[n, *r]).unwrap(),
        )
    };
    // the forward of `set` for b's rows into fresh poisoned outputs
    let forward = |set: &lora_kernels::AdapterSet<bf16>, index: &AdapterIndex| {
        let mut y = poisoned::<bf16>(&dev, &[m, n]);
        let mut t = poisoned::<bf16>(&dev, &[m, set.max_rank()]);
        ops::lora_forward_multi_into(
            &x,
            &w0,
            bias.as_ref(),
            set,
            index,
            &mut y,
            &mut t,
            &mut Workspace::new(),
        )
        .unwrap();
        bits(&y.to_vec().unwrap())
    };
    // (case, the slot of a DoRA adapter before, slot 1 a DoRA adapter after, the graph replays)
    for (case, dora_before, becomes_dora, replays) in [
        ("plain", None, false, true),
        ("dora", Some(1), true, true),
        ("plain to dora", Some(2), true, true),
        // the factor table made for slot 0 has slot 1's row too: no growth, no new table
        ("plain to dora, dora in slot 0", Some(0), true, true),
        ("plain to dora, no dora before", None, true, false),
        ("dora to plain", Some(1), false, false),
    ] {
        let mut set = set_of(&dev, &b);
        let m0 = magnitude(&mut rng);
        if let Some(slot) = dora_before {
            let (a, bb) = upload(&b.adapters[slot]);
            set.replace_dora(slot as u32, &a, &bb, &m0, b.adapters[slot].3, &w0)
                .unwrap();
        }
        b.rows = (0..m).map(|i| Some(i % 3)).collect();
        let index = AdapterIndex::new(&set, &slots_of(&b)).unwrap();
        let mut y = poisoned::<bf16>(&dev, &[m, n]);
        let mut t = poisoned::<bf16>(&dev, &[m, set.max_rank()]);
        let mut ws = Workspace::new();
        ops::lora_forward_multi_into(
            &x,
            &w0,
            bias.as_ref(),
            &set,
            &index,
            &mut y,
            &mut t,
            &mut ws,
        )
        .unwrap();
        let graph = dev
            .capture(|| {
                ops::lora_forward_multi_into(
                    &x,
                    &w0,
                    bias.as_ref(),
                    &set,
                    &index,
                    &mut y,
                    &mut t,
                    &mut ws,
                )
            })
            .unwrap();
        // new values for slot 1, at its rank
        let new = random_adapter::<bf16>(&mut rng, n, k, b.adapters[1].2);
        let (a, bb) = upload(&new);
        let m1 = magnitude(&mut rng);
        if becomes_dora {
            set.replace_dora(1, &a, &bb, &m1, new.3, &w0).unwrap();
        } else {
            set.replace(1, &a, &bb, new.3).unwrap();
        }
        // what a set built with the new values gives
        let mut built = set_of(&dev, &b);
        built.remove(1).unwrap();
        let slot = if becomes_dora {
            built.add_dora(&a, &bb, &m1, new.3, &w0).unwrap()
        } else {
            built.add(&a, &bb, new.3).unwrap()
        };
        assert_eq!(slot, 1);
        if let Some(slot) = dora_before.filter(|&s| s != 1) {
            let (a2, b2) = upload(&b.adapters[slot]);
            built
                .replace_dora(slot as u32, &a2, &b2, &m0, b.adapters[slot].3, &w0)
                .unwrap();
        }
        assert_eq!(
            set.dora_factors(1).unwrap(),
            built.dora_factors(1).unwrap(),
            "{case}"
        );
        let want = forward(&built, &AdapterIndex::new(&built, &slots_of(&b)).unwrap());
        assert_eq!(
            forward(&set, &index),
            want,
            "m {m} k {k} {case}: eager, with the index made before"
        );
        y.poison().unwrap();
        if replays {
            graph.replay().unwrap();
            assert_eq!(
                bits(&y.to_vec().unwrap()),
                want,
                "m {m} k {k} {case}: replayed"
            );
        } else {
            refused(case, graph.replay(), &["AdapterSet changed"]);
        }
    }
    // refusals, the set unchanged
    let mut set = set_of(&dev, &b);
    let before = common::multi::run(&dev, &b, &set);
    let other = random_adapter::<bf16>(&mut rng, n, k, b.adapters[0].2 % 128 + 1);
    let (a, bb) = upload(&other);
    match set.replace(0, &a, &bb, 1.0) {
        Err(Error::Shape {
            arg: "a", expected, ..
        }) => {
            assert!(expected.contains("remove it and add"), "{expected}")
        }
        other => panic!("another rank: {other:?}"),
    }
    set.remove(2).unwrap();
    let (a, bb) = upload(&b.adapters[2]);
    refused(
        "an empty slot",
        set.replace(2, &a, &bb, 1.0),
        &["slot 2 holds no adapter"],
    );
    refused(
        "replace in a capture",
        dev.capture(|| set.replace(0, &a, &bb, 1.0)),
        &["AdapterSet::replace"],
    );
    b.rows = b.rows.iter().map(|r| r.filter(|&a| a != 2)).collect();
    let after = common::multi::run(&dev, &b, &set);
    let rows0: Vec<usize> = (0..m).filter(|&i| b.rows[i] == Some(0)).collect();
    for i in rows0 {
        assert_eq!(
            bits(&after.0[i * n..(i + 1) * n]),
            bits(&before.0[i * n..(i + 1) * n])
        );
    }
}

#[test]
fn merge_replays_and_the_counting_merges_are_refused() {
    let dev = Device::emulator();
    let mut rng = Rng::new(41);
    let (n, k, r) = (33, 40, 8);
    let w: Vec<bf16> = rng.vec(n * k, 1.0);
    let a = up::<bf16>(&dev, &rng.vec(r * k, 0.3), &[r, k]);
    let b = up::<bf16>(&dev, &rng.vec(n * r, 0.3), &[n, r]);
    // eager: merge twice
    let mut eager = up(&dev, &w, &[n, k]);
    ops::merge(&mut eager, &a, &b, 0.5).unwrap();
    ops::merge(&mut eager, &a, &b, 0.5).unwrap();
    // replayed: the same two merges
    let mut w0 = up(&dev, &w, &[n, k]);
    let graph = dev.capture(|| ops::merge(&mut w0, &a, &b, 0.5)).unwrap();
    assert_eq!(
        bits(&w0.to_vec().unwrap()),
        bits(&w),
        "the capture ran nothing"
    );
    graph.replay().unwrap();
    graph.replay().unwrap();
    assert_eq!(bits(&w0.to_vec().unwrap()), bits(&eager.to_vec().unwrap()));
    refused(
        "safe_merge",
        dev.capture(|| ops::safe_merge(&mut w0, &a, &b, 0.5).map(drop)),
        &["count"],
    );
}

/// Dropout in a graph: the forward and backward captured with a `DropoutSchedule` (the mask's offset read
/// from device memory) and replayed after each `advance`, with new inputs on the second replay, give the
/// bits of the eager ops with a `Dropout` at that offset (which the dropout property tests check against
/// the reference), each replay a new mask; the small-M shape takes the general path with dropout.
#[test]
fn dropout_schedule_replays_take_a_fresh_mask_each() {
    for (i, dev) in emulators().iter().enumerate() {
        for (j, d) in SHAPES.into_iter().enumerate() {
            let mut rng = Rng::new(0xd7 + (i * 8 + j) as u64);
            let mut l1 = Layer::<bf16, bf16>::random(&mut rng, d, 0.75, j != 1);
            let mut l2 = common::graph::new_inputs(&mut rng, &l1);
            let drop = Dropout::new(0.25, 11 + j as u64, 40).unwrap();
            let mut schedule = DropoutSchedule::new(dev, drop).unwrap();
            let mut s = Step::new(dev, &l1);
            s.ops_with(true, GradMode::Overwrite, (&schedule).into())
                .unwrap(); // warm-up
            s.poison_outputs();
            let graph = dev
                .capture(|| s.ops_with(true, GradMode::Overwrite, (&schedule).into()))
                .unwrap();
            let mut seen = Vec::new();
            for (replay, offset) in [41u64, 42, 43].into_iter().enumerate() {
                assert_eq!(schedule.advance().unwrap(), offset);
                // new inputs for the second replay, the first ones again for the third
                let l = if replay == 1 { &mut l2 } else { &mut l1 };
                l.dropout = drop.with_offset(offset);
                s.x.copy_from_slice(&l.x).unwrap();
                s.dy.copy_from_slice(&l.dy).unwrap();
                let l = &*l;
                s.poison_outputs();
                graph.replay().unwrap();
                let got = s.outputs().bits();
                assert_eq!(
                    got,
                    run(dev, l, true).bits(),
                    "{dev:?} {d:?}: replay at offset {offset}"
                );
                assert!(
                    !seen.contains(&got),
                    "{dev:?} {d:?}: offset {offset} masks anew"
                );
                seen.push(got);
            }
        }
    }
}

/// A whole training step (LoraLinear's forward, the loss gradient, the backward, AdamW on f32 adapters
/// with a learning-rate schedule) captured once and replayed, the AdamW constants from an
/// `AdamwSchedule` advanced before each replay, gives the eager steps' bits (`optimizer_step` with the
/// constants from the host); without and with LoRA dropout (the layer's mask offset moved by
/// `advance_dropout` before each replay, so each replay takes the mask of the eager step it stands for);
/// a plain and a DoRA adapter (its magnitude trained too; with dropout, W0 also on the dropped input).
/// `forward_multi`, whose copy of the adapters was made before the replays, serves the trained values
/// (it copies the adapters stepped in graphs at each call), and refuses to be captured then.
#[test]
fn a_training_step_captured_whole_replays_as_the_eager_steps() {
    let (m, n, k, r) = (24, 40, 32, 8);
    let devices = emulators();
    for (dev, p, dora) in [
        (&devices[0], 0.0, false),
        (&devices[1], 0.0, false),
        (&devices[0], 0.2, false),
        (&devices[2], 0.2, false),
        (&devices[1], 0.0, true),
        (&devices[0], 0.2, true),
    ] {
        let mut rng = Rng::new(51);
        let w0: Vec<bf16> = rng.vec(n * k, 0.3);
        let xt = up::<bf16>(dev, &rng.vec(m * k, 1.0), &[m, k]);
        let target = up::<bf16>(dev, &rng.vec(m * n, 1.0), &[m, n]);
        let layer = || {
            let mut l =
                LoraLinear::<bf16, f32>::with_f32_adapters(up(dev, &w0, &[n, k]), None).unwrap();
            let config = LoraConfig::new(r, 16.0).with_dropout(p);
            if dora {
                l.add_dora_adapter("task", config, 7).unwrap();
            } else {
                l.add_adapter("task", config, 7).unwrap();
            }
            l.set_dropout_seed(5);
            l
        };
        let hp = |t: u64| AdamW {
            lr: 2e-2 / t as f32,
            ..AdamW::default()
        };
        let step = |l: &mut LoraLinear<bf16, f32>,
                    dy: &mut Tensor<bf16>,
                    optimizer: &dyn Fn(&mut LoraLinear<bf16, f32>) -> lora_kernels::Result<()>|
         -> lora_kernels::Result<()> {
            let y = l.train_forward(&xt)?;
            ops::mse_grad(y, &target, 1.0, dy)?;
            l.train_backward(&xt, dy, GradMode::Overwrite, false)?;
            optimizer(l)
        };
        const STEPS: u64 = 4;
        let mut eager = layer();
        let mut dy = poisoned::<bf16>(dev, &[m, n]);
        for t in 1..=STEPS {
            step(&mut eager, &mut dy, &|l| l.optimizer_step(&hp(t))).unwrap();
        }
        // the first step eagerly (it loads the kernels and makes the training buffers), the others replayed
        let mut trained = layer();
        let mut schedule = AdamwSchedule::new(dev, hp(1)).unwrap();
        schedule.advance().unwrap();
        let scheduled = |l: &mut LoraLinear<bf16, f32>| l.optimizer_step_scheduled(&schedule);
        step(&mut trained, &mut dy, &scheduled).unwrap();
        let graph = dev
            .capture(|| step(&mut trained, &mut dy, &scheduled))
            .unwrap();
        if p > 0.0 {
            refused(
                "advance_dropout",
                dev.capture(|| trained.advance_dropout()),
                &["DropoutSchedule::set_offset"],
            );
        }
        // forward_multi builds its copy of the adapters now; the replays change them after
        let rows: Vec<Option<&str>> = (0..m).map(|i| [Some("task"), None][i % 2]).collect();
        trained.forward_multi(&xt, &rows).unwrap();
        for t in 2..=STEPS {
            schedule.set_hyperparameters(hp(t)).unwrap();
            assert_eq!(schedule.advance().unwrap(), t);
            if p > 0.0 {
                trained.advance_dropout().unwrap();
            }
            graph.replay().unwrap();
        }
        let served = |l: &mut LoraLinear<bf16, f32>| {
            bits(&l.forward_multi(&xt, &rows).unwrap().y.to_vec().unwrap())
        };
        assert_eq!(
            served(&mut trained),
            served(&mut eager),
            "{dev:?} p {p} dora {dora}: forward_multi serves the replayed steps' adapter"
        );
        refused(
            "forward_multi in a capture after captured steps",
            dev.capture(|| trained.forward_multi(&xt, &rows).map(drop)),
            &["optimizer steps", "AdapterSet::replace"],
        );
        let (want, got) = (
            eager.adapter("task").unwrap(),
            trained.adapter("task").unwrap(),
        );
        let f32_bits = |t: &Tensor<f32>| -> Vec<u32> {
            t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        assert_ne!(
            f32_bits(&got.b),
            vec![0; n * r],
            "{dev:?}: B trained away from its zero init"
        );
        assert_eq!(
            f32_bits(&got.a),
            f32_bits(&want.a),
            "{dev:?} p {p} dora {dora}: A after {STEPS} steps"
        );
        assert_eq!(
            f32_bits(&got.b),
            f32_bits(&want.b),
            "{dev:?} p {p} dora {dora}: B after {STEPS} steps"
        );
        if dora {
            let (got_m, want_m) = (got.magnitude.as_ref(), want.magnitude.as_ref());
            assert_eq!(
                f32_bits(got_m.unwrap()),
                f32_bits(want_m.unwrap()),
                "{dev:?} p {p}: the magnitude after {STEPS} steps"
            );
        }
    }
}

/// A LoraLinear's adapter changed by a replay the layer does not see: a step captured through
/// `adapter_mut` (the caller's own optimizer op) is served by `forward_multi` with the replayed values;
/// and a captured training step cannot replay once the adapter is merged (it would train under the
/// merge, and unmerging would subtract another s·B·A): W0 comes back from merge and unmerge as it
/// would without the graph.
#[test]
fn a_merged_adapters_graphs_refuse_and_adapter_mut_steps_are_served() {
    let (m, n, k, r) = (24, 40, 32, 8);
    let dev = &emulators()[0];
    let mut rng = Rng::new(52);
    let w0: Vec<bf16> = rng.vec(n * k, 0.3);
    let x = up::<bf16>(dev, &rng.vec(m * k, 1.0), &[m, k]);
    let target = up::<bf16>(dev, &rng.vec(m * n, 1.0), &[m, n]);
    let layer = || {
        let mut l =
            LoraLinear::<bf16, f32>::with_f32_adapters(up(dev, &w0, &[n, k]), None).unwrap();
        l.add_adapter("task", LoraConfig::new(r, 16.0), 7).unwrap();
        l
    };
    let rows: Vec<Option<&str>> = (0..m).map(|i| [Some("task"), None][i % 2]).collect();
    let served = |l: &mut LoraLinear<bf16, f32>| {
        bits(&l.forward_multi(&x, &rows).unwrap().y.to_vec().unwrap())
    };

    // a step on A captured through adapter_mut
    let mut l = layer();
    let nonzero: Vec<f32> = rng.vec(n * r, 0.3);
    l.adapter_mut("task").unwrap().b = up(dev, &nonzero, &[n, r]);
    let grad = up::<f32>(dev, &rng.vec(r * k, 1.0), &[r, k]);
    let mut state = ops::AdamState::new(dev, &[r, k]).unwrap();
    let mut schedule = AdamwSchedule::new(dev, AdamW::default()).unwrap();
    schedule.advance().unwrap();
    let mut step_a = |l: &mut LoraLinear<bf16, f32>| {
        let a = &mut l.adapter_mut("task")?.a;
        ops::adamw_step_scheduled(a, &grad, &mut state, &schedule)
    };
    step_a(&mut l).unwrap();
    let graph = dev.capture(|| step_a(&mut l)).unwrap();
    let before = served(&mut l);
    graph.replay().unwrap();
    let after = served(&mut l);
    assert_ne!(after, before, "the replay changed A");
    l.adapter_mut("task").unwrap(); // drops the copy: a fresh one from the current values
    assert_eq!(
        after,
        served(&mut l),
        "forward_multi after a replay of a step through adapter_mut"
    );

    // a captured training step, then merge: the graph refuses
    let mut dy = poisoned::<bf16>(dev, &[m, n]);
    let mut train =
        |l: &mut LoraLinear<bf16, f32>, schedule: &AdamwSchedule| -> lora_kernels::Result<()> {
            let y = l.train_forward(&x)?;
            ops::mse_grad(y, &target, 1.0, &mut dy)?;
            l.train_backward(&x, &dy, GradMode::Overwrite, false)?;
            l.optimizer_step_scheduled(schedule)
        };
    let mut schedule = AdamwSchedule::new(dev, AdamW::default()).unwrap();
    schedule.advance().unwrap();
    let (mut l, mut same) = (layer(), layer());
    for l in [&mut l, &mut same] {
        train(l, &schedule).unwrap();
        train(l, &schedule).unwrap(); // B away from 0
    }
    let graph = dev.capture(|| train(&mut l, &schedule)).unwrap();
    graph.replay().unwrap();
    train(&mut same, &schedule).unwrap();
    l.merge().unwrap();
    refused("a replay after merge", graph.replay(), &["was dropped"]);
    l.unmerge().unwrap();
    same.merge().unwrap();
    same.unmerge().unwrap();
    assert_eq!(
        bits(&l.w0().to_vec().unwrap()),
        bits(&same.w0().to_vec().unwrap()),
        "W0 after merge and unmerge, the graph refused in between"
    );
}

fn refused(what: &str, r: lora_kernels::Result<impl std::fmt::Debug>, words: &[&str]) {
    match r {
        Err(e @ (Error::Unsupported { .. } | Error::InvalidState { .. })) => {
            let msg = e.to_string();
            for w in words {
                assert!(msg.contains(w), "{what}: `{msg}` does not say `{w}`");
            }
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn what_a_capture_cannot_record_is_refused_by_name() {
    let d = SHAPES[2];
    let mut rng = Rng::new(31);
    let l = Layer::<bf16, bf16>::random(&mut rng, d, 0.5, true);
    let dev = Device::emulator();
    let mut s = Step::new(&dev, &l);

    // a kernel's first launch on the device
    refused(
        "cold kernels",
        dev.capture(|| s.ops(false, GradMode::Overwrite)),
        &["for the first time", "lora_forward", "run each op once"],
    );
    assert!(!dev.is_capturing(), "a failed capture ends");
    s.ops(true, GradMode::Overwrite).unwrap();

    // allocations: the allocating form, a workspace without buffers, a tensor
    refused(
        "lora_forward",
        dev.capture(|| {
            ops::lora_forward(&s.x, &s.w0, &s.a, &s.b, None, 1.0)?;
            Ok(())
        }),
        &["allocating", "_into"],
    );
    let mut cold_ws = Workspace::new();
    refused(
        "a fresh workspace",
        dev.capture(|| {
            ops::lora_backward_into(
                &s.x,
                &s.w0,
                &s.a,
                &s.b,
                &s.t,
                &s.dy,
                1.0,
                Dropout::NONE,
                Some(&mut s.dx),
                &mut s.da,
                &mut s.db,
                GradMode::Overwrite,
                &mut cold_ws, // the backward keeps U there
            )
        }),
        &["workspace"],
    );
    refused(
        "Tensor::zeros",
        dev.capture(|| Tensor::<bf16>::zeros(&dev, &[4]).map(drop)),
        &["Tensor::zeros"],
    );
    // host transfers and synchronisation
    refused(
        "to_vec",
        dev.capture(|| s.y.to_vec().map(drop)),
        &["Tensor::to_vec"],
    );
    refused(
        "copy_from_slice",
        dev.capture(|| s.x.copy_from_slice(&l.x)),
        &["copy_from_slice"],
    );
    refused(
        "synchronize",
        dev.capture(|| dev.synchronize()),
        &["Device::synchronize"],
    );
    // launches whose parameters change per call
    let dropout = Dropout::new(0.1, 7, 0).unwrap();
    refused(
        "dropout",
        dev.capture(|| s.forward(None, dropout)),
        &["with a Dropout", "same mask", "DropoutSchedule"],
    );
    // a schedule's offset moves by an upload, between replays
    let mut schedule = DropoutSchedule::new(&dev, dropout).unwrap();
    refused(
        "DropoutSchedule::advance",
        dev.capture(|| schedule.advance().map(drop)),
        &["DropoutSchedule::set_offset", "capture"],
    );
    assert_eq!(
        schedule.dropout(),
        dropout,
        "the refused advance kept the offset"
    );
    let mut param = Tensor::<f32>::zeros(&dev, &[8]).unwrap();
    let grad = Tensor::<f32>::from_slice(&dev, &[0.5; 8], &[8]).unwrap();
    let mut state = ops::AdamState::new(&dev, &[8]).unwrap();
    let hp = ops::AdamW::default();
    ops::adamw_step(&mut param, &grad, &mut state, &hp).unwrap();
    refused(
        "adamw_step",
        dev.capture(|| ops::adamw_step(&mut param, &grad, &mut state, &hp)),
        &["adamw_step", "step count"],
    );
    // nesting, replay inside a capture
    refused(
        "nested",
        dev.capture(|| dev.capture(|| Ok(())).map(drop)),
        &["already capturing"],
    );
    let graph = dev.capture(|| s.ops(false, GradMode::Overwrite)).unwrap();
    refused(
        "replay in a capture",
        dev.capture(|| graph.replay()),
        &["Graph::replay"],
    );
    // a launch from another thread during the capture
    let small = up(&dev, &l.x, &[d.m, d.k]);
    let mut doubled = poisoned::<bf16>(&dev, &[d.m, d.k]);
    ops::scale(&small, 2.0, &mut doubled).unwrap();
    let mut from_other = None;
    let graph = dev
        .capture(|| {
            std::thread::scope(|scope| {
                from_other = Some(
                    scope
                        .spawn(|| ops::scale(&small, 2.0, &mut doubled))
                        .join()
                        .unwrap(),
                )
            });
            Ok(())
        })
        .unwrap();
    refused(
        "another thread",
        from_other.unwrap(),
        &["another thread", "capturing"],
    );
    assert_eq!(graph.launches(), 0);
    // a tensor the capture does not use may be dropped during it (freed when it ends)
    let unused = up(&dev, &l.x, &[d.m, d.k]);
    dev.capture(move || {
        drop(unused);
        Ok(())
    })
    .unwrap();
    // a panic inside ends the capture too
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dev.capture(|| panic!("inside the capture")).map(drop)
    }));
    assert!(panicked.is_err());
    assert!(!dev.is_capturing(), "a panic ends the capture");

    // a tensor freed during the capture, or after it
    let x2 = up(&dev, &l.x, &[d.m, d.k]);
    refused(
        "freed during",
        dev.capture(|| {
            s.forward(Some(&x2), Dropout::NONE)?;
            drop(x2);
            Ok(())
        }),
        &["freed before the capture ended"],
    );
    let x3 = up(&dev, &l.x, &[d.m, d.k]);
    let graph = dev.capture(|| s.forward(Some(&x3), Dropout::NONE)).unwrap();
    graph.replay().unwrap();
    drop(x3);
    refused(
        "replay after a drop",
        graph.replay(),
        &["in lora_forward", "dropped"],
    );

    // nothing captured: nothing to replay; and the device works as before
    let empty = dev.capture(|| Ok(())).unwrap();
    assert_eq!(empty.launches(), 0);
    empty.replay().unwrap();
    s.poison_outputs();
    s.ops(true, GradMode::Overwrite).unwrap();
    assert_eq!(s.outputs().bits(), run(&dev, &l, true).bits());
}

/// On a GPU: a device on a stream of its own, in a context with cudarc's event tracking off (what a
/// capture needs), replays with the eager bits; the legacy default stream and a tracked context are
/// refused. Prints the host time per forward, eager against replayed (M = 16, N = K = 4096, r = 16).
#[test]
fn gpu_capture_on_a_stream_of_its_own() {
    let Some(gpu) = common::gpu() else {
        return;
    };
    refused(
        "the legacy stream",
        gpu.capture(|| Ok(())),
        &["legacy default stream"],
    );
    // a CudaContext of its own (the primary context, its own flags), so the other tests' is untouched
    let ctx = lora_kernels::cudarc::driver::CudaContext::new(0).unwrap();
    let tracked = Device::from_cuda_stream(ctx.new_stream().unwrap()).unwrap();
    refused(
        "event tracking",
        tracked.capture(|| Ok(())),
        &["event tracking"],
    );
    let ctx = lora_kernels::cudarc::driver::CudaContext::new(0).unwrap();
    // SAFETY: every tensor of this device lives and is used on its one stream.
    unsafe { ctx.disable_event_tracking() };
    let dev = Device::from_cuda_stream(ctx.new_stream().unwrap()).unwrap();

    // a capture cudarc began on the device's stream: the ops ask the driver and refuse the same
    let l = Layer::<bf16, bf16>::random(&mut Rng::new(99), SHAPES[2], 1.0, false);
    let s = Step::new(&dev, &l);
    let stream = dev.as_cuda().unwrap().stream().clone();
    use lora_kernels::cudarc::driver::sys;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let capturing = dev.is_capturing();
    let allocating = ops::lora_forward(&s.x, &s.w0, &s.a, &s.b, None, 1.0).map(drop);
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    assert!(capturing, "the device sees cudarc's capture");
    refused("cudarc's capture", allocating, &["allocating"]);
    assert!(ended.is_ok(), "nothing was enqueued: {:?}", ended.err());
    assert!(!dev.is_capturing());
    drop(s);

    for (j, d) in SHAPES.into_iter().enumerate() {
        check_replay(&dev, d, 100 + j as u64);
    }
    let big = Dims {
        m: 256,
        n: 512,
        k: 384,
        r: 16,
    };
    check_replay(&dev, big, 110);

    let d = Dims {
        m: 16,
        n: 4096,
        k: 4096,
        r: 16,
    };
    let mut rng = Rng::new(120);
    let l = Layer::<bf16, bf16>::random(&mut rng, d, 1.0, false);
    let mut s = Step::new(&dev, &l);
    s.ops(false, GradMode::Overwrite).unwrap();
    let graph = dev.capture(|| s.ops(false, GradMode::Overwrite)).unwrap();
    const CALLS: u32 = 200;
    let time = |f: &mut dyn FnMut()| {
        f();
        dev.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..CALLS {
            f();
        }
        dev.synchronize().unwrap();
        start.elapsed().as_secs_f64() * 1e6 / CALLS as f64
    };
    let eager = time(&mut || s.ops(false, GradMode::Overwrite).unwrap());
    let replayed = time(&mut || graph.replay().unwrap());
    // a slice taken mutably could have been swapped: the graph refuses
    let _ = s.y.as_cuda_slice_mut();
    refused(
        "as_cuda_slice_mut",
        graph.replay(),
        &["CUDA slice taken mutably"],
    );
    // past libtest's capture, so the log of a GPU run keeps it
    let _ = writeln!(
        std::io::stderr(),
        "graph replay, M = 16 forward (N = K = 4096, r = 16, {} launches), {}: {replayed:.1} µs per \
         call replayed, {eager:.1} µs eager ({CALLS} back to back, wall clock)",
        graph.launches(),
        dev.describe()
    );
}

/// LoraLinear with dropout across captures and eager calls: a forward-only graph replayed after
/// `advance_dropout`, then an eager `train_backward`, gives the gradients of the eager forwards at the
/// same offsets (the backward takes the replayed forward's mask, not the last eager one's); a second
/// dropout forward of the layer in one capture is refused (it would repeat the mask); `advance_dropout`
/// without a captured forward is refused.
#[test]
fn layer_dropout_masks_follow_replays_and_eager_calls() {
    let (m, n, k, r) = (16, 24, 32, 4);
    let dev = Device::emulator();
    let mut rng = Rng::new(77);
    let w0: Vec<bf16> = rng.vec(n * k, 0.3);
    let x = up::<bf16>(&dev, &rng.vec(m * k, 1.0), &[m, k]);
    let dy = up::<bf16>(&dev, &rng.vec(m * n, 1.0), &[m, n]);
    let layer = || {
        let mut l =
            LoraLinear::<bf16, f32>::with_f32_adapters(up(&dev, &w0, &[n, k]), None).unwrap();
        l.add_adapter("task", LoraConfig::new(r, 16.0).with_dropout(0.3), 9)
            .unwrap();
        // B away from zero, so dA and dX see the mask
        let b: Vec<f32> = Rng::new(78).vec(n * r, 0.5);
        l.adapter_mut("task")
            .unwrap()
            .b
            .copy_from_slice(&b)
            .unwrap();
        l
    };
    let grads = |l: &LoraLinear<bf16, f32>| -> Vec<Vec<u32>> {
        let (a, b) = l.grads().unwrap();
        [a, b]
            .iter()
            .map(|t| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    let mut eager = layer();
    for _ in 0..3 {
        eager.train_forward(&x).unwrap(); // offsets 0, 1, 2
    }
    eager
        .train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();

    let mut l = layer();
    refused(
        "advance without a capture",
        l.advance_dropout(),
        &["no train_forward with dropout"],
    );
    l.train_forward(&x).unwrap(); // offset 0, eagerly
    refused(
        "two dropout forwards in one capture",
        dev.capture(|| {
            l.train_forward(&x)?;
            l.train_forward(&x).map(drop)
        }),
        &["in this capture already", "repeat its mask"],
    );
    let forward = dev.capture(|| l.train_forward(&x).map(drop)).unwrap();
    l.train_forward(&x).unwrap(); // offset 1, eagerly
    l.advance_dropout().unwrap(); // offset 2 for the replay
    forward.replay().unwrap();
    l.train_backward(&x, &dy, GradMode::Overwrite, false)
        .unwrap();
    assert_eq!(
        grads(&l),
        grads(&eager),
        "the backward takes the replayed forward's mask"
    );
    assert_ne!(grads(&l)[0], vec![0; r * k], "dA nonzero");
}
