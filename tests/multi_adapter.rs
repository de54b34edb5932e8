//! Many adapters in one batch (ops::lora_forward_multi, AdapterSet, AdapterIndex) against the f64
//! reference: property tests over random per-row adapter maps (rows without an adapter included),
//! mixed ranks 1..=128, ragged shapes, bf16/f16 layers with adapters in the layer dtype or f32, bias or
//! not; outputs poisoned before every launch; identical bits under two emulator thread orders (ascending
//! and, by case, one of the three others); the launch record (the decode shrink up to M = 128, the decode
//! GEMM up to M = 16); for M > 16 every row bit-identical to `lora_forward` with its adapter alone, for
//! M ≤ 16 (the decode kernels) to the same row in a batch of more than 128 rows. Then
//! batch invariance (rows permuted, other rows and adapters changed, batch sizes 1 to 300: the unchanged
//! rows keep their bits), the shrink with fewer blocks than adapters per tile, the set's add/remove/grow,
//! and the errors for bad indices, mismatched adapters and index tensors.
//!
//! Cases per run: `PROPTEST_CASES` (default 72).

mod common;

use common::Rng;
use common::bits;
use common::multi::{Batch, HostAdapter, random_adapter, run, set_of};
use half::{bf16, f16};
use lora_kernels::ops::{Workspace, lora_forward, lora_forward_multi, lora_forward_multi_into};
use lora_kernels::reference::{self, MultiAdapter};
use lora_kernels::{AdapterIndex, AdapterSet, DType, Device, Element, Error, Tensor};
use proptest::prelude::*;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 1e-3 }
}

/// Every row of adapter `a` equals lora_forward on the whole X with adapter `a` alone (M > 16: the
/// general path), bit for bit, in Y and in T's first r_a columns.
fn check_single_adapter_bits<T: Element, A: Element>(
    dev: &Device,
    b: &Batch<T, A>,
    y: &[T],
    t: &[T],
    r_max: usize,
) {
    let (x, w0, bias) = b.layer_on(dev);
    for (ai, (a, bb, r, s)) in b.adapters.iter().enumerate() {
        if !b.rows.contains(&Some(ai)) {
            continue;
        }
        let at = Tensor::from_slice(dev, a, &[*r, b.k]).unwrap();
        let bt = Tensor::from_slice(dev, bb, &[b.n, *r]).unwrap();
        let single = lora_forward(&x, &w0, &at, &bt, bias.as_ref(), *s).unwrap();
        let (ys, ts) = (single.y.to_vec().unwrap(), single.t.to_vec().unwrap());
        for i in (0..b.m).filter(|&i| b.rows[i] == Some(ai)) {
            assert_eq!(
                bits(&y[i * b.n..(i + 1) * b.n]),
                bits(&ys[i * b.n..(i + 1) * b.n]),
                "row {i} (adapter {ai}, rank {r}): Y differs from lora_forward with its adapter alone"
            );
            assert_eq!(
                bits(&t[i * r_max..i * r_max + r]),
                bits(&ts[i * r..(i + 1) * r]),
                "row {i} (adapter {ai}, rank {r}): T differs from lora_forward with its adapter alone"
            );
        }
    }
}

/// M ≤ 16 (the decode kernels): every row bit-identical to the same row in a batch of more than 128
/// rows (fused_gemm_multi's shrink and fused GEMM, themselves bit-identical to lora_forward with the
/// row's adapter alone).
fn check_decode_bits<T: Element, A: Element>(
    dev: &Device,
    b: &Batch<T, A>,
    set: &AdapterSet<A>,
    y: &[T],
    t: &[T],
    stream: u64,
) {
    let mut rng = Rng::new(stream ^ 0xdec0de);
    let keep: Vec<usize> = (0..b.m).collect();
    let size = lora_kernels::params::LK_FUSED_GEMM_BM as usize + 1 + (rng.next_u64() % 40) as usize;
    let (big, at) = embed(&mut rng, b, &keep, size);
    let (yb, tb) = run(dev, &big, set);
    let (n, r_max) = (b.n, set.max_rank());
    for (&src, &dst) in keep.iter().zip(&at) {
        assert_eq!(
            bits(&y[src * n..(src + 1) * n]),
            bits(&yb[dst * n..(dst + 1) * n]),
            "row {src} (adapter {:?}) of a batch of {}: Y differs from the same row in a batch of {size}",
            b.rows[src],
            b.m
        );
        assert_eq!(
            bits(&t[src * r_max..(src + 1) * r_max]),
            bits(&tb[dst * r_max..(dst + 1) * r_max]),
            "row {src} of a batch of {}: T differs from the same row in a batch of {size}",
            b.m
        );
    }
}

/// The launches of one lora_forward_multi on an emulator (none recorded on a GPU): the shrink (the decode
/// shrink up to M = 128), its finalize and the fused GEMM (the decode kernel at M ≤ 16).
fn check_launches<T: Element, A: Element>(dev: &Device, m: usize) {
    if dev.is_cuda() {
        return;
    }
    let ran = dev.take_launches();
    let (dt, ad) = (
        T::DTYPE.to_string(),
        if A::DTYPE == DType::F32 { "_f32ad" } else { "" },
    );
    // the widths of fused_gemm_multi follow ops::mma_tile (tests/mma_tile_widths.rs)
    let multi = |k: &str| k.starts_with("fused_gemm_multi_") && k.ends_with(&format!("{dt}{ad}"));
    let shrink_ok = if m <= lora_kernels::params::LK_FUSED_GEMM_BM as usize {
        ran.first().copied() == Some(format!("multi_decode_shrink_{dt}{ad}").as_str())
    } else {
        ran.first().is_some_and(|k| multi(k))
    };
    let fused_ok = if m <= lora_kernels::params::LK_SMALL_M_MAX as usize {
        ran.last().copied() == Some(format!("multi_decode_{dt}{ad}").as_str())
    } else {
        ran.last().is_some_and(|k| multi(k))
    };
    assert!(
        ran.len() == 3 && shrink_ok && fused_ok && ran[1] == format!("lowrank_finalize_{dt}"),
        "M = {m}: the launches {ran:?}"
    );
}

fn property_case<T: Element, A: Element>(
    dims: (usize, usize, usize),
    adapters: usize,
    bias: bool,
    stream: u64,
) {
    let mut rng = Rng::new(stream);
    let b = Batch::<T, A>::random(&mut rng, dims, adapters, bias);
    // ascending order, then one of the other three thread orders (by case): every order over the run
    // (the GPU alone under LK_TEST_DEVICES=gpu)
    let mut devices = Vec::new();
    if !common::gpu_only() {
        let emus = common::emulators_for(stream);
        devices = vec![emus[0].clone(), emus[1 + (stream % 3) as usize].clone()];
    }
    devices.extend(common::gpu());
    let mut first_bits = None;
    for (di, dev) in devices.iter().enumerate() {
        let set = set_of(dev, &b);
        let r_max = set.max_rank();
        dev.take_launches();
        let (y, t) = run(dev, &b, &set);
        check_launches::<T, A>(dev, b.m);
        let (ey, et) = row_errors(&b, r_max, (&y, &t), 0..b.m);
        let what = format!(
            "{}/{} {dims:?} ranks {:?} rows {:?} on {} (data: LK_TEST_SEED={})",
            T::DTYPE,
            A::DTYPE,
            b.adapters.iter().map(|a| a.2).collect::<Vec<_>>(),
            &b.rows[..b.rows.len().min(24)],
            dev.describe(),
            common::seed()
        );
        assert!(ey <= tol(T::DTYPE), "{what}: y relative error {ey:e}");
        assert!(et <= tol(T::DTYPE), "{what}: t relative error {et:e}");
        if b.m > lora_kernels::params::LK_SMALL_M_MAX as usize {
            check_single_adapter_bits(dev, &b, &y, &t, r_max);
        } else {
            check_decode_bits(dev, &b, &set, &y, &t, stream);
        }
        if !dev.is_cuda() && di < 2 {
            let now = (bits(&y), bits(&t));
            match &first_bits {
                None => first_bits = Some(now),
                Some(f) => assert!(
                    *f == now,
                    "{what}: bits differ between thread orders (a race)"
                ),
            }
        }
    }
}

fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    // a third of the cases decode (M ≤ 16: the decode kernel), the rest M 1..=200
    (
        1usize..=200,
        1usize..=160,
        1usize..=300,
        any::<bool>(),
        0u8..3,
    )
        .prop_map(|(m, n, k, round, decode)| {
            let m = if decode == 0 { (m - 1) % 16 + 1 } else { m };
            if round {
                (m, n.div_ceil(8) * 8, k.div_ceil(8) * 8)
            } else {
                (m, n, k)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::proptest_cases(72),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn multi_forward_matches_reference(
        dims in shape(),
        adapters in 1usize..=5,
        layer in 0u8..4,
        bias in any::<bool>(),
        stream in any::<u64>(),
    ) {
        match layer {
            0 => property_case::<bf16, bf16>(dims, adapters, bias, stream),
            1 => property_case::<f16, f16>(dims, adapters, bias, stream),
            2 => property_case::<bf16, f32>(dims, adapters, bias, stream),
            _ => property_case::<f16, f32>(dims, adapters, bias, stream),
        }
    }
}

/// K longer than one of the shrink's 1024-column chunks (the property cases' K ≤ 300 is one): 3 chunks
/// with a ragged last one, and exactly 2, in a decoding batch, a batch of 16-row groups below one row
/// tile (both on multi_decode_shrink) and one of two row tiles (fused_gemm_multi's shrink); each against
/// the reference and bit for bit as in the property cases (lora_forward alone, or a batch of > 128 rows).
#[test]
fn long_k_chunks_keep_their_bits() {
    for (i, &dims) in [(7, 40, 2100), (100, 24, 2048), (150, 16, 1100)]
        .iter()
        .enumerate()
    {
        let stream = common::seed() ^ (0x10c0 + i as u64);
        property_case::<bf16, bf16>(dims, 3, i % 2 == 0, stream);
        property_case::<f16, f32>(dims, 2, i % 2 == 1, stream ^ 1);
    }
}

/// The rows of `base` at `keep` (their X, adapter) placed at random positions of a batch of `size`
/// rows whose other rows are new (fresh X, random adapters or none). Returns the batch and where each
/// kept row went.
fn embed<T: Element, A: Element>(
    rng: &mut Rng,
    base: &Batch<T, A>,
    keep: &[usize],
    size: usize,
) -> (Batch<T, A>, Vec<usize>) {
    assert!(keep.len() <= size);
    let mut slots: Vec<usize> = (0..size).collect();
    for i in (1..size).rev() {
        slots.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let at = slots[..keep.len()].to_vec();
    let mut x = rng.vec::<T>(size * base.k, 1.0);
    let mut rows: Vec<Option<usize>> = (0..size)
        .map(|_| {
            let a = (rng.next_u64() % (base.adapters.len() as u64 + 1)) as usize;
            (a < base.adapters.len()).then_some(a)
        })
        .collect();
    for (&src, &dst) in keep.iter().zip(&at) {
        x[dst * base.k..(dst + 1) * base.k]
            .copy_from_slice(&base.x[src * base.k..(src + 1) * base.k]);
        rows[dst] = base.rows[src];
    }
    let b = Batch {
        m: size,
        n: base.n,
        k: base.k,
        x,
        w0: base.w0.clone(),
        bias: base.bias.clone(),
        adapters: base.adapters.clone(),
        rows,
    };
    (b, at)
}

/// The relative errors of rows `rows` of a run's Y and T (T rounded to the layer's dtype, as the kernels
/// keep it) against the f64 reference.
fn row_errors<T: Element, A: Element>(
    b: &Batch<T, A>,
    r_max: usize,
    (y, t): (&[T], &[T]),
    rows: std::ops::Range<usize>,
) -> (f64, f64) {
    let want = b.reference(r_max);
    let (ys, ts) = (
        rows.start * b.n..rows.end * b.n,
        rows.start * r_max..rows.end * r_max,
    );
    let wt = reference::rounded::<T>(&want.t[ts.clone()]);
    (
        reference::relative_error(&y[ys.clone()], &want.y[ys]),
        reference::relative_error(&t[ts], &wt),
    )
}

/// Rows `rows` of a run's Y and T within the layer dtype's tolerance of the reference (`row_errors`).
fn reference_rows<T: Element, A: Element>(
    b: &Batch<T, A>,
    r_max: usize,
    y: &[T],
    t: &[T],
    rows: std::ops::Range<usize>,
) {
    let (ey, et) = row_errors(b, r_max, (y, t), rows.clone());
    assert!(
        ey <= tol(T::DTYPE) && et <= tol(T::DTYPE),
        "rows {rows:?}: relative errors y {ey:e}, t {et:e}"
    );
}

/// A row's bits do not depend on the batch: permuted, with other rows and adapters around it, in
/// batches of 1 to 300 rows (small-M and several row tiles), they stay the same.
#[test]
fn rows_are_batch_invariant() {
    let dev = common::emulators()[0].clone();
    let mut rng = Rng::new(0xba7c);
    let (n, k) = (136, 200);
    let mut base = Batch::<bf16, bf16>::random(&mut rng, (150, n, k), 1, true);
    base.adapters = [1, 8, 16, 33, 64, 128]
        .iter()
        .map(|&r| random_adapter::<bf16>(&mut rng, n, k, r))
        .collect();
    for (i, r) in base.rows.iter_mut().enumerate() {
        *r = (i % 7 != 3).then_some((i * 5 + i / 11) % 6);
    }
    let set = set_of(&dev, &base);
    let r_max = set.max_rank();
    let (y0, t0) = run(&dev, &base, &set);
    // against the reference too: equal bits alone would pass two runs that both left a row unwritten
    reference_rows(&base, r_max, &y0, &t0, 0..base.m);
    let keep: Vec<usize> = (0..base.m).filter(|i| i % 3 == 0).take(40).collect();
    for size in [1usize, 5, 16, 40, 129, 300] {
        let keep = &keep[..keep.len().min(size)];
        let (b, at) = embed(&mut rng, &base, keep, size);
        let (y, t) = run(&dev, &b, &set);
        for (&src, &dst) in keep.iter().zip(&at) {
            assert_eq!(
                bits(&y[dst * n..(dst + 1) * n]),
                bits(&y0[src * n..(src + 1) * n]),
                "Y of row {src} (adapter {:?}) changed in a batch of {size} (at row {dst})",
                base.rows[src]
            );
            assert_eq!(
                bits(&t[dst * r_max..(dst + 1) * r_max]),
                bits(&t0[src * r_max..(src + 1) * r_max]),
                "T of row {src} changed in a batch of {size}"
            );
        }
    }
}

/// Decoding rows whose X holds ±inf keep the bits they have in a large batch (the general path). The
/// shrink gives such a row NaN in T's columns past its adapter's rank (inf·0); the fused GEMM never
/// reads those columns (zero-filled past the rank), so the decode kernel must not either.
#[test]
fn decode_rows_with_infinities_keep_their_bits() {
    let dev = common::emulators()[0].clone();
    let mut rng = Rng::new(0x1ef);
    let (n, k) = (72, 200);
    let mut b = Batch::<bf16, bf16>::random(&mut rng, (7, n, k), 1, true);
    b.adapters = [1, 3, 40]
        .iter()
        .map(|&r| random_adapter::<bf16>(&mut rng, n, k, r))
        .collect();
    b.rows = vec![Some(0), Some(1), None, Some(2), Some(0), Some(1), Some(0)];
    for (row, col, v) in [
        (0, 5, f64::INFINITY),
        (1, 77, f64::NEG_INFINITY),
        (4, 199, f64::INFINITY),
    ] {
        b.x[row * k + col] = bf16::from_f64(v);
    }
    let set = set_of(&dev, &b);
    let (y, t) = run(&dev, &b, &set);
    check_decode_bits(&dev, &b, &set, &y, &t, 0x1ef);
    // the rows without an infinity against the reference
    for row in [2, 3, 5, 6] {
        reference_rows(&b, set.max_rank(), &y, &t, row..row + 1);
    }
    assert!(
        y[..n].iter().any(|v| v.to_f64().is_infinite()),
        "the test needs infinite outputs in row 0"
    );
}

/// A batch with more row tiles × K chunks than the shrink's block target: each tile's passes are then
/// shared by fewer blocks than there are passes (block y takes passes y, y + Y, ...). The rows keep the
/// bits they have in a small batch, where every pass has its own block, and match the reference.
#[test]
fn shrink_passes_spread_over_blocks() {
    let dev = common::emulators()[0].clone();
    let mut rng = Rng::new(0x5b10c);
    let (m, n, k) = (128 * 133, 8, 40);
    let mut big = Batch::<bf16, bf16>::random(&mut rng, (m, n, k), 1, false);
    big.adapters = [1, 17, 33, 128]
        .iter()
        .map(|&r| random_adapter::<bf16>(&mut rng, n, k, r))
        .collect();
    for (i, r) in big.rows.iter_mut().enumerate() {
        *r = (i % 5 != 4).then_some(i % 5); // every tile: 4 passes and rows without an adapter
    }
    let set = set_of(&dev, &big);
    let r_max = set.max_rank();
    let (y, t) = run(&dev, &big, &set);
    reference_rows(&big, r_max, &y, &t, 0..m);
    let keep: Vec<usize> = (0..40).map(|i| i * 419 % m).collect();
    let (small, at) = embed(&mut rng, &big, &keep, 40);
    let (ys, ts) = run(&dev, &small, &set);
    for (&src, &dst) in keep.iter().zip(&at) {
        assert_eq!(
            bits(&y[src * n..(src + 1) * n]),
            bits(&ys[dst * n..(dst + 1) * n]),
            "Y of row {src}"
        );
        assert_eq!(
            bits(&t[src * r_max..(src + 1) * r_max]),
            bits(&ts[dst * r_max..(dst + 1) * r_max]),
            "T of row {src}"
        );
    }
}

/// Adding and removing adapters keeps the others' values and slots; space is reused, the arena grows
/// when full; a forward after the churn still matches the reference.
#[test]
fn set_add_remove_grow() {
    let dev = common::emulators()[0].clone();
    let mut rng = Rng::new(0x5e7);
    let (n, k) = (24, 40);
    let mut set = AdapterSet::<f16>::with_capacity(&dev, n, k, 100).unwrap();
    let mut host: Vec<Option<HostAdapter<f16>>> = Vec::new();
    let add = |set: &mut AdapterSet<f16>, host: &mut Vec<Option<_>>, rng: &mut Rng, r: usize| {
        let ad = random_adapter::<f16>(rng, n, k, r);
        let at = Tensor::from_slice(&dev, &ad.0, &[r, k]).unwrap();
        let bt = Tensor::from_slice(&dev, &ad.1, &[n, r]).unwrap();
        let slot = set.add(&at, &bt, ad.3).unwrap() as usize;
        if host.len() <= slot {
            host.resize(slot + 1, None);
        }
        assert!(host[slot].is_none(), "slot {slot} handed out twice");
        host[slot] = Some(ad);
        slot
    };
    for r in [3, 16, 1, 40, 7] {
        add(&mut set, &mut host, &mut rng, r);
    }
    assert!(set.capacity() > 100, "the arena grew");
    for slot in [1u32, 3] {
        set.remove(slot).unwrap();
        host[slot as usize] = None;
    }
    assert!(set.remove(3).is_err(), "a slot removed twice");
    assert_eq!(
        add(&mut set, &mut host, &mut rng, 9),
        1,
        "the lowest free slot is reused"
    );
    add(&mut set, &mut host, &mut rng, 128);
    add(&mut set, &mut host, &mut rng, 2);
    assert_eq!(set.len(), host.iter().flatten().count());
    for (slot, h) in host.iter().enumerate() {
        let got = set.to_host(slot as u32).unwrap();
        match (h, got) {
            (Some((a, b, _, s)), Some((ga, gb, gs))) => {
                assert_eq!(bits(a), bits(&ga), "slot {slot}: A changed");
                assert_eq!(bits(b), bits(&gb), "slot {slot}: B changed");
                assert_eq!(*s, gs);
            }
            (None, None) => {}
            _ => panic!("slot {slot}: occupied state differs"),
        }
    }
    // a forward over the churned set
    let occupied = set.occupied();
    let m = 37;
    let x = rng.vec::<f16>(m * k, 1.0);
    let w0 = rng.vec::<f16>(n * k, 0.2);
    let rows: Vec<Option<u32>> = (0..m)
        .map(|i| (i % 5 != 0).then(|| occupied[i % occupied.len()]))
        .collect();
    let index = AdapterIndex::new(&set, &rows).unwrap();
    let out = lora_forward_multi(
        &Tensor::from_slice(&dev, &x, &[m, k]).unwrap(),
        &Tensor::from_slice(&dev, &w0, &[n, k]).unwrap(),
        None,
        &set,
        &index,
    )
    .unwrap();
    let ad: Vec<MultiAdapter<'_, f16>> = host
        .iter()
        .map(|h| match h {
            Some((a, b, r, s)) => (a.as_slice(), b.as_slice(), *r, *s as f64),
            None => (&[][..], &[][..], 0, 0.0),
        })
        .collect();
    let ref_rows: Vec<Option<usize>> = rows.iter().map(|r| r.map(|s| s as usize)).collect();
    let want = reference::forward_multi_as_kernels(
        &x,
        &w0,
        None,
        &ad,
        &ref_rows,
        (m, n, k),
        set.max_rank(),
    );
    let e = reference::relative_error(&out.y.to_vec().unwrap(), &want.y);
    assert!(
        e <= tol(DType::F16),
        "y relative error {e:e} after add/remove/grow"
    );
}

/// Bad indices, mismatched adapters and index tensors are Errors naming the argument.
#[test]
fn bad_multi_inputs() {
    let dev = common::emulators()[0].clone();
    let mut rng = Rng::new(0xbad);
    let (m, n, k) = (20, 16, 24);
    let b = Batch::<bf16, bf16>::random(&mut rng, (m, n, k), 3, false);
    let mut set = set_of(&dev, &b);
    let x = Tensor::from_slice(&dev, &b.x, &[m, k]).unwrap();
    let w0 = Tensor::from_slice(&dev, &b.w0, &[n, k]).unwrap();
    let msg = |e: Error| e.to_string();

    // an index naming no adapter: out of range, then a removed slot
    let e = AdapterIndex::new(&set, &[Some(0), Some(7)]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::AdapterIndex {
                row: 1,
                value: 7,
                ..
            }
        ),
        "{e}"
    );
    assert!(msg(e).contains("adapter_index"));
    let stale = AdapterIndex::new(&set, &vec![Some(2); m]).unwrap();
    set.remove(2).unwrap();
    let e = AdapterIndex::new(&set, &[Some(2)]).unwrap_err();
    assert!(matches!(e, Error::AdapterIndex { value: 2, .. }), "{e}");
    let e = lora_forward_multi(&x, &w0, None, &set, &stale).unwrap_err();
    assert!(msg(e).contains("was removed (or removed and added again)"));

    // an index of the wrong length, dtype or rank
    let short = AdapterIndex::new(&set, &vec![Some(0); m - 1]).unwrap();
    let e = lora_forward_multi(&x, &w0, None, &set, &short).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "adapter_index",
                ..
            }
        ),
        "{e}"
    );
    let f = Tensor::from_slice(&dev, &vec![0.0f32; m], &[m]).unwrap();
    let e = AdapterIndex::from_tensor(&set, &f).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                arg: "adapter_index",
                ..
            }
        ),
        "{e}"
    );
    let two_d = Tensor::from_slice(&dev, &vec![0u32; m], &[m / 2, 2]).unwrap();
    let e = AdapterIndex::from_tensor(&set, &two_d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "adapter_index",
                ..
            }
        ),
        "{e}"
    );
    let bad = Tensor::from_slice(&dev, &[0u32, 9, u32::MAX], &[3]).unwrap();
    let e = AdapterIndex::from_tensor(&set, &bad).unwrap_err();
    assert!(
        matches!(
            e,
            Error::AdapterIndex {
                row: 1,
                value: 9,
                ..
            }
        ),
        "{e}"
    );
    let good = Tensor::from_slice(&dev, &vec![1u32; m], &[m]).unwrap();
    assert_eq!(
        AdapterIndex::from_tensor(&set, &good).unwrap().slots(),
        vec![1]
    );

    // an index built for another set
    let other = set_of(&dev, &b);
    let foreign = AdapterIndex::new(&other, &vec![Some(0); m]).unwrap();
    let e = lora_forward_multi(&x, &w0, None, &set, &foreign).unwrap_err();
    assert!(msg(e).contains("another AdapterSet"));

    // adapters whose K or N do not match: at add, and a set for another layer
    let a_bad = Tensor::from_slice(&dev, &vec![bf16::ZERO; 4 * (k + 1)], &[4, k + 1]).unwrap();
    let b_ok = Tensor::from_slice(&dev, &vec![bf16::ZERO; n * 4], &[n, 4]).unwrap();
    let e = set.add(&a_bad, &b_ok, 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "a", .. }), "{e}");
    let a_ok = Tensor::from_slice(&dev, &vec![bf16::ZERO; 4 * k], &[4, k]).unwrap();
    let b_bad = Tensor::from_slice(&dev, &vec![bf16::ZERO; (n + 1) * 4], &[n + 1, 4]).unwrap();
    let e = set.add(&a_ok, &b_bad, 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "b", .. }), "{e}");
    let e = set.add(&a_ok, &b_ok, f32::NAN).unwrap_err();
    assert!(matches!(e, Error::NonFinite { arg: "scale", .. }), "{e}");
    let wide = AdapterSet::<bf16>::new(&dev, n + 8, k).unwrap();
    let idx_none = AdapterIndex::new(&wide, &vec![None; m]).unwrap();
    let e = lora_forward_multi(&x, &w0, None, &wide, &idx_none).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "adapters",
                ..
            }
        ),
        "{e}"
    );
    // f32 layer, f16 adapters over a bf16 layer
    let xf = Tensor::from_slice(&dev, &vec![0.0f32; m * k], &[m, k]).unwrap();
    let w0f = Tensor::from_slice(&dev, &vec![0.0f32; n * k], &[n, k]).unwrap();
    let fset = AdapterSet::<f32>::new(&dev, n, k).unwrap();
    let fidx = AdapterIndex::new(&fset, &vec![None; m]).unwrap();
    let e = lora_forward_multi(&xf, &w0f, None, &fset, &fidx).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { arg: "x", .. }), "{e}");
    let hset = AdapterSet::<f16>::new(&dev, n, k).unwrap();
    let hidx = AdapterIndex::new(&hset, &vec![None; m]).unwrap();
    let e = lora_forward_multi(&x, &w0, None, &hset, &hidx).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
    // a wrong T buffer
    let idx = AdapterIndex::new(&set, &vec![Some(0); m]).unwrap();
    let mut y = Tensor::<bf16>::zeros(&dev, &[m, n]).unwrap();
    let mut t = Tensor::<bf16>::zeros(&dev, &[m, set.max_rank() + 1]).unwrap();
    let e = lora_forward_multi_into(
        &x,
        &w0,
        None,
        &set,
        &idx,
        &mut y,
        &mut t,
        &mut Workspace::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "t", .. }), "{e}");
    // an operand on another device: refused before the shrink writes T (which it used to, the fused
    // GEMM's launch then finding y elsewhere)
    let elsewhere = Device::emulator();
    let mut t = Tensor::<bf16>::from_slice(
        &dev,
        &vec![bf16::ONE; m * set.max_rank()],
        &[m, set.max_rank()],
    )
    .unwrap();
    let mut y_other = Tensor::<bf16>::zeros(&elsewhere, &[m, n]).unwrap();
    dev.take_launches();
    let e = lora_forward_multi_into(
        &x,
        &w0,
        None,
        &set,
        &idx,
        &mut y_other,
        &mut t,
        &mut Workspace::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch { arg: "y", .. }), "{e}");
    assert!(
        dev.take_launches().is_empty(),
        "launched before the refusal"
    );
    assert!(
        t.to_vec().unwrap().iter().all(|v| *v == bf16::ONE),
        "t written"
    );
}

/// The fused mode's two tile widths (`ops::mma_tile`) give the same bits, the narrow kernel running
/// where the 128-column tiles leave SMs idle: each batch on an emulator of 1 SM (N > 64: the 128-column
/// tiles) and one of 65536 (the 64-column ones), against the reference, with
/// the launch records saying which kernel ran. (The shrink's width follows the set's largest rank, not
/// the SM count: tests/mma_tile_widths.rs forces both.)
#[test]
fn tile_widths_give_the_same_bits() {
    let Some((wide, narrow)) = common::tile_width_emulators() else {
        return;
    };
    let mut rng = Rng::new(common::seed() ^ 0x6d75_6c74);
    for (i, &dims) in [(17, 100, 72), (150, 256, 40), (40, 200, 129)]
        .iter()
        .enumerate()
    {
        let b = Batch::<bf16, f32>::random(&mut rng, dims, 2 + i, i % 2 == 0);
        let mut outs = Vec::new();
        for (dev, is_narrow) in [(&wide, false), (&narrow, true)] {
            let set = set_of(dev, &b);
            dev.take_launches();
            let (y, t) = run(dev, &b, &set);
            let ran = dev.take_launches();
            let want = b.reference(set.max_rank());
            let ey = reference::relative_error(&y, &want.y);
            assert!(
                ey <= tol(DType::BF16),
                "case {i} {dims:?} narrow {is_narrow}: y relative error {ey:e}"
            );
            let fused = if is_narrow {
                "fused_gemm_multi_narrow_bf16_f32ad"
            } else {
                "fused_gemm_multi_bf16_f32ad"
            };
            // the fused GEMM is the last launch (the shrink and its finalize come first)
            assert_eq!(ran.last(), Some(&fused), "case {i}: {ran:?}");
            outs.push((bits(&y), bits(&t)));
        }
        assert!(
            outs[0] == outs[1],
            "case {i} {dims:?}: the tile widths give different bits"
        );
    }
}

/// DoRA adapters in a set (`AdapterSet::add_dora`): their rows of the many-adapter forward are DoRA's
/// layer `f ⊙ Z + bias`, with f the set's factors (checked against the exact ones, within the norm pass's
/// f32 slack) and Z the row's plain contract, within the dtype's tolerance relative to |f·Z| + |bias|;
/// T and every other row (plain adapter or none) bit for bit what the same set gives with the DoRA
/// adapters added as plain ones (a DoRA row never changes another row's bits); every DoRA row bit for bit
/// round(fma(f, Z, bias)) with Z that row of the all-plain set without a bias (DoRA's scale pass), and
/// above M = 16 (the general path) `ops::dora_forward` with its adapter alone. On the fused path (the
/// "_dora" kernels at both tile widths: the launch record says so) and the decode path (M ≤ 16, every
/// case with rows of both DoRA adapters), bf16/f16 with adapters in the layer dtype and f32; on the GPU
/// too where there is one.
#[test]
fn dora_rows_are_doras_layer() {
    let mut rng = Rng::new(common::seed() ^ 0x646f_7261);
    let mut checked = 0;
    let mut kernels = std::collections::BTreeSet::new();
    for (i, dims) in [
        (40, 72, 48),
        (7, 40, 33),
        (200, 300, 24),
        (1, 9, 17),
        (150, 130, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let mut devices = Vec::new();
        if !common::gpu_only() {
            devices.push(common::emulators()[i % 4].clone());
        }
        devices.extend(common::gpu());
        for dev in &devices {
            for (rows, launched) in [
                dora_rows_case::<bf16, bf16>(dev, &mut rng, dims, i % 2 == 0),
                dora_rows_case::<bf16, f32>(dev, &mut rng, dims, i % 2 == 1),
                dora_rows_case::<f16, f32>(dev, &mut rng, dims, true),
            ] {
                checked += rows;
                kernels.extend(launched);
            }
        }
    }
    assert!(checked > 20, "only {checked} DoRA rows checked");
    if !common::gpu_only() {
        for width in [
            "fused_gemm_multi_dora_bf16",
            "fused_gemm_multi_dora_narrow_bf16",
        ] {
            assert!(kernels.contains(width), "{width} never ran: {kernels:?}");
        }
    }
}

fn dora_rows_case<T: Element, A: Element>(
    dev: &Device,
    rng: &mut Rng,
    dims: (usize, usize, usize),
    bias: bool,
) -> (usize, Vec<&'static str>) {
    let mut b = Batch::<T, A>::random(rng, dims, 3, bias);
    let (n, k) = (b.n, b.k);
    let is_dora = |a: usize| a != 1; // adapters 0 and 2 are DoRA, 1 plain
    // rows of both DoRA adapters in every batch (the last row's wins at M = 1)
    b.rows[0] = Some(2);
    let last = b.m - 1;
    b.rows[last] = Some(0);
    let magnitude: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            (0..n)
                .map(|j| {
                    let norm: f64 = (0..k).map(|q| b.w0[j * k + q].to_f64().powi(2)).sum();
                    (norm.sqrt() * (1.0 + 0.3 * rng.uniform())) as f32
                })
                .collect()
        })
        .collect();
    let w0 = Tensor::from_slice(dev, &b.w0, &[n, k]).unwrap();
    let mut set = AdapterSet::<A>::new(dev, n, k).unwrap();
    for (i, (a, bb, r, s)) in b.adapters.iter().enumerate() {
        let at = Tensor::from_slice(dev, a, &[*r, k]).unwrap();
        let bt = Tensor::from_slice(dev, bb, &[n, *r]).unwrap();
        let slot = if is_dora(i) {
            let m = Tensor::from_slice(dev, &magnitude[i], &[n]).unwrap();
            set.add_dora(&at, &bt, &m, *s, &w0).unwrap()
        } else {
            set.add(&at, &bt, *s).unwrap()
        };
        assert_eq!(slot, i as u32);
        assert_eq!(set.is_dora(slot), is_dora(i));
    }
    let plain = set_of(dev, &b);
    dev.take_launches();
    let (y, t) = run(dev, &b, &set);
    let launched = dev.take_launches();
    // a batch of this set without DoRA rows runs the plain kernels (and gives the plain set's bits)
    let rows = b.rows.clone();
    b.rows = rows
        .iter()
        .map(|r| r.map(|a| if is_dora(a) { 1 } else { a }))
        .collect();
    dev.take_launches();
    let (y_none, _) = run(dev, &b, &set);
    let plain_kernels = dev.take_launches();
    assert!(
        !plain_kernels.iter().any(|k| k.contains("_dora")),
        "{dims:?}: no DoRA row, yet {plain_kernels:?}"
    );
    assert_eq!(
        bits(&y_none),
        bits(&run(dev, &b, &plain).0),
        "{dims:?}: no DoRA row"
    );
    b.rows = rows;
    // Z of every row: the all-plain set without a bias
    let bias = b.bias.take();
    let (z, _) = run(dev, &b, &plain);
    b.bias = bias;
    // each DoRA adapter alone over the whole batch (the general path's bits above M = 16)
    let (x, _, bias_t) = b.layer_on(dev);
    let alone: Vec<Option<Vec<T>>> = (0..3)
        .map(|i| {
            let (a, bb, r, s) = &b.adapters[i];
            is_dora(i).then(|| {
                let at = Tensor::from_slice(dev, a, &[*r, k]).unwrap();
                let bt = Tensor::from_slice(dev, bb, &[n, *r]).unwrap();
                let m = Tensor::from_slice(dev, &magnitude[i], &[n]).unwrap();
                let f = lora_kernels::ops::dora_forward(&x, &w0, &at, &bt, &m, bias_t.as_ref(), *s);
                f.unwrap().y.to_vec().unwrap()
            })
        })
        .collect();
    let (y_plain, t_plain) = run(dev, &b, &plain);
    assert_eq!(bits(&t), bits(&t_plain), "{dims:?}: T");
    let tol = if T::DTYPE == DType::BF16 { 1e-2 } else { 1e-3 };
    let want = b.reference(set.max_rank());
    let bias_of = |j: usize| b.bias.as_ref().map_or(0.0, |v| v[j].to_f64());
    let (mut diff, mut size) = (0.0f64, 0.0f64);
    let mut dora_rows = 0;
    for (i, row) in b.rows.iter().enumerate() {
        let got = &y[i * n..(i + 1) * n];
        match row {
            Some(a) if is_dora(*a) => {
                dora_rows += 1;
                let (aa, bb, r, s) = &b.adapters[*a];
                let f = set.dora_factors(*a as u32).unwrap().unwrap();
                let scaled: Vec<T> = (0..n)
                    .map(|j| {
                        let zv = z[i * n + j].to_f64() as f32;
                        T::from_f64(f[j].mul_add(zv, bias_of(j) as f32) as f64)
                    })
                    .collect();
                assert_eq!(
                    bits(got),
                    bits(&scaled),
                    "{dims:?}: row {i} of DoRA adapter {a} is not round(fma(f, Z, bias))"
                );
                if b.m > 16 {
                    let want = &alone[*a].as_ref().unwrap()[i * n..(i + 1) * n];
                    assert_eq!(
                        bits(got),
                        bits(want),
                        "{dims:?}: row {i} of DoRA adapter {a} is not ops::dora_forward's"
                    );
                }
                let exact =
                    reference::dora_factor(&b.w0, aa, bb, &magnitude[*a], n, k, *r, *s as f64);
                let norms: Vec<f64> = exact
                    .iter()
                    .zip(&magnitude[*a])
                    .map(|(f, m)| *m as f64 / f)
                    .collect();
                let slack = common::dora_norm_slack(&b.w0, aa, bb, n, k, *r, *s as f64, &norms);
                for j in 0..n {
                    let rel = slack[j] / norms[j] + 2f64.powi(-23);
                    assert!(
                        (f[j] as f64 - exact[j]).abs() <= rel * exact[j].abs(),
                        "{dims:?}: adapter {a} factor [{j}] = {}, exact {}",
                        f[j],
                        exact[j]
                    );
                }
                for j in 0..n {
                    let z = want.y[i * n + j] - bias_of(j);
                    let fz = f[j] as f64 * z;
                    diff += (got[j].to_f64() - (fz + bias_of(j))).powi(2);
                    size += (fz.abs() + bias_of(j).abs()).powi(2);
                }
            }
            _ => assert_eq!(
                bits(got),
                bits(&y_plain[i * n..(i + 1) * n]),
                "{dims:?}: row {i} ({row:?}) is not a DoRA row: its bits are the plain set's"
            ),
        }
    }
    if dora_rows > 0 {
        let err = (diff / size).sqrt();
        assert!(
            err <= tol,
            "{dims:?} {}: DoRA rows relative error {err:e}",
            T::DTYPE
        );
    }
    (dora_rows, launched)
}
