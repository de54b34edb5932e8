//! The sm_90a fused GEMMs (kernels/sm90/fused_gemm_sm90.cu: TMA, mbarriers, wgmma, warp-specialised,
//! persistent; the forward at ranks up to 32 on fused_gemm_t_sm90.cu, T computed inside, in one launch)
//! run by the emulator as a compute-capability-9.0 device, through `lora_forward`: property tests (64
//! cases for each structure: ranks 8..=32 on the one-launch kernel, 40..=128 on the projection and
//! fused_gemm_sm90.cu) over ragged m and n (not multiples of the 128×256 tiles; m > 16 so the small-M kernel stays out), k and r
//! multiples of 8 (TMA's row strides) from 8 to 320 and 8 to 128, bf16/f16, bias or not, each against the f64
//! reference with the outputs poisoned, under the ascending thread order and one of the other four (rotating
//! over the cases) with identical bits (the race detector in its happens-before mode watching every access,
//! the seeds varying the shared-memory alignment), on 1, 3 or 132 emulated SMs (by case: the persistent
//! grid's size, so blocks loop over several tiles or over none, and the tile width that `ops::sm90_tile`
//! picks for it, 128×256 or the narrow 128×128, both among the cases). Then dX (`lora_backward`, the "nn"
//! kernel: W0 and A read MN-major from 64×64 boxes; at ranks up to 32 the one-launch "nn" kernel of
//! fused_gemm_t_sm90.cu, U = dY·B computed inside, and up to rank 32 dB's and dA's partial sums too) with the
//! whole backward, as many property cases per
//! structure and two
//! edge shapes (each with both widths), under two orders too; edges of the one-launch kernels' schedule
//! (runs of tiles that start inside a row block, cross one, one CTA over all, one tile per CTA) for the
//! forward and for dX, and their bits the same on any number of SMs and, for a row of Y, T or dX, in
//! batches of either tile width (at ranks over 32 too); and batches of 1 to 16 rows through the backward
//! (their forward on the small-M kernel, dX on the one-launch kernel). Each case goes through `common::lora` (forward,
//! backward, every output against the f64 reference). `LK_FUSED_GEMM=sm90` is set for this whole test binary,
//! so a forward the Hopper kernel cannot take fails instead of falling back. On an sm_90 GPU every case runs
//! there too (same reference, repeated bits), and one test takes the 128×256 tiles there; under
//! `LK_TEST_DEVICES=gpu` the cases run on the GPU alone.
//!
//! Cases per run: `PROPTEST_CASES` (default 64).

mod common;

use common::Rng;
use common::lora::{Layer, check, run};
use common::sm90::{Mode, hopper, hopper_gpu, tol};
use half::{bf16, f16};
use lora_kernels::reference::Dims;
use lora_kernels::{DType, Tensor, ThreadOrder};
use proptest::prelude::*;

/// This binary's mode: `LK_FUSED_GEMM=sm90`, each rank's own structure required of every case
/// (common::sm90::Mode: `case` on 1, 3 or 132 emulated SMs by case, `case_on` on the count given).
const MODE: Mode = Mode {
    fused_gemm: "sm90",
    structure: took_the_structure_of_its_rank,
};

/// The launches of one layer case (`run`) took the sm_90a structure its rank chooses (the emulator's
/// launch record), so a case cannot pass on a fallback: at ranks up to 32 the one-launch kernels (the
/// forward's fused_gemm_t*, dX's fused_gemm_u*) and neither GEMM of fused_gemm_sm90.cu; above, those GEMMs
/// and no one-launch kernel; and the backward's passes of its rank (dB and dA inside dX's kernel up to rank 32).
fn took_the_structure_of_its_rank(launches: &[&str], r: usize, backward: bool, what: &str) {
    let one_launch = r <= 32;
    let ran = |prefix: &str| launches.iter().any(|k| k.starts_with(prefix));
    let expected: &[(&str, bool)] = &[
        ("fused_gemm_t", one_launch),
        ("fused_gemm_u", one_launch && backward),
        ("fused_gemm_sm90_nn", !one_launch && backward),
    ];
    for &(prefix, want) in expected {
        assert_eq!(ran(prefix), want, "{what}: {prefix}* in {launches:?}");
    }
    let plain_forward = launches
        .iter()
        .any(|k| k.starts_with("fused_gemm_sm90_") && !k.starts_with("fused_gemm_sm90_nn"));
    assert_eq!(plain_forward, !one_launch, "{what}: {launches:?}");
    if backward {
        took_the_backward_passes_of_its_rank(launches, r, what);
    }
}

/// The backward's passes besides dX (the launch record of a backward), by rank.
fn took_the_backward_passes_of_its_rank(launches: &[&str], r: usize, what: &str) {
    // the passes: over dY for dB and U and over X for dA (above rank 32), none (up to 32: dB and dA in dX's
    // kernel, then their two finalizes; from 17 on the narrow tiles)
    let count = |prefix: &str| launches.iter().filter(|k| k.starts_with(prefix)).count();
    let u_pass = count("lowrank_grad_u") > 0;
    let plain = count("lowrank_grad_r");
    let want = if r <= 32 { (false, 0) } else { (true, 1) };
    assert_eq!((u_pass, plain), want, "{what}: the passes in {launches:?}");
    if r <= 32 {
        assert_eq!(count("lowrank_finalize"), 2, "{what}: {launches:?}");
        let narrow = count("fused_gemm_u32_sm90_nn_narrow");
        assert_eq!(
            narrow > 0,
            r > 16,
            "{what}: dX on the narrow U32 kernel: {launches:?}"
        );
    }
}

/// On an sm_90 GPU (skipped without one): the 128×256 kernels, which the small shapes above do not reach
/// with a GPU's SM count, on GEMMs that take them there: m = 128·⌊SMs/16⌋ rows by 4096 columns (16 wide
/// tiles per row block, at most one per SM, where the narrow ones would put two on some; under 16 SMs,
/// a partition of a GPU: 128 rows by 256·SMs columns, one wide tile per SM against two narrow ones): the
/// forward (k = 256), and dX through the backward (n = 256, k = the columns), at ranks 16 and 32 (dX at
/// rank 32 on the narrow tiles, the U32 kernels' only width, all the same).
#[test]
fn sm90_wide_tiles_on_the_gpu() {
    MODE.force();
    let Some(gpu) = hopper_gpu() else { return };
    let sms = gpu.sm_count().unwrap();
    let (m, cols) = if sms >= 16 {
        (128 * (sms as usize / 16), 4096)
    } else {
        (128, 256 * sms as usize)
    };
    // ranks 16 and 32 (dX with dB's and dA's partials inside, at 32 on the narrow tiles)
    let cases = [16, 32]
        .into_iter()
        .flat_map(|r| [((m, cols, 256, r), false), ((m, 256, cols, r), true)]);
    for (i, (dims, backward)) in cases.enumerate() {
        let (m, n, k, r) = dims;
        assert_eq!(
            lora_kernels::ops::sm90_tile(m, cols, sms),
            (128, 256),
            "{dims:?} on {sms} SMs"
        );
        let mut rng = Rng::new(0x71de + i as u64);
        let l = Layer::<bf16>::random(&mut rng, Dims { m, n, k, r }, 1.25, !backward);
        let o = run(&gpu, &l, backward);
        let what = format!(
            "sm_90a {m}×{n}×{k} r {r} (128×256 tiles) on {}",
            gpu.describe()
        );
        check(&what, &l, &o, tol(DType::BF16));
        assert!(
            run(&gpu, &l, backward).bits() == o.bits(),
            "{what}: GPU run not repeatable"
        );
    }
}

/// The ranks of the one-launch kernels (fused_gemm_t_sm90.cu: T or U computed inside, up to 32) and those
/// of the projection structure (fused_gemm_sm90.cu after T's or U's own launch), in eighths: each
/// structure gets its own property test of 64 cases.
const ONE_LAUNCH_R8: std::ops::RangeInclusive<usize> = 1..=4;
const PROJECTION_R8: std::ops::RangeInclusive<usize> = 5..=16;
const _: () =
    assert!(8 * *ONE_LAUNCH_R8.end() == lora_kernels::params::LK_SM90_T_MAX_RANK as usize);

/// n is a multiple of 8 in half the cases: those take the epilogue through shared memory and TMA stores,
/// the others the stores from the registers. Ranks 8·`r8`.
fn shape(
    r8: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (usize, usize, usize, usize)> {
    (17usize..=300, 1usize..=300, any::<bool>(), 1usize..=40, r8)
        .prop_map(|(m, n, n8, k8, r8)| (m, if n8 { 8 * n.div_ceil(8) } else { n }, 8 * k8, 8 * r8))
}

/// dX's shapes: ragged m, the layer's n and k multiples of 8 (W0's rows in both orientations; k, dX's
/// columns, past one 256-column tile in some), ranks 8·`r8`.
fn dx_shape(
    r8: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (usize, usize, usize, usize)> {
    (17usize..=300, 1usize..=40, 1usize..=40, r8)
        .prop_map(|(m, n8, k8, r8)| (m, 8 * n8, 8 * k8, 8 * r8))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::proptest_cases(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The forward at ranks 40..=128: the projection, then fused_gemm_sm90 (either width).
    #[test]
    fn sm90_forward_matches_reference(dims in shape(PROJECTION_R8), f16_layer in any::<bool>(), bias in any::<bool>(), stream in any::<u64>()) {
        if f16_layer { MODE.case::<f16>(dims, bias, stream, false) } else { MODE.case::<bf16>(dims, bias, stream, false) }
    }

    /// The forward at ranks 8..=32: one launch, T inside (fused_gemm_t_sm90's fused_gemm_t*, either width).
    #[test]
    fn sm90_forward_t_matches_reference(dims in shape(ONE_LAUNCH_R8), f16_layer in any::<bool>(), bias in any::<bool>(), stream in any::<u64>()) {
        if f16_layer { MODE.case::<f16>(dims, bias, stream, false) } else { MODE.case::<bf16>(dims, bias, stream, false) }
    }

    /// dX at ranks 40..=128 on fused_gemm_sm90's "nn" kernel after the pass over dY that computes U,
    /// through the whole backward.
    #[test]
    fn sm90_dx_matches_reference(dims in dx_shape(PROJECTION_R8), f16_layer in any::<bool>(), stream in any::<u64>()) {
        if f16_layer { MODE.case::<f16>(dims, false, stream, true) } else { MODE.case::<bf16>(dims, false, stream, true) }
    }

    /// dX at ranks 8..=32: one launch, U inside (fused_gemm_t_sm90's fused_gemm_u*_nn*), through the
    /// whole backward.
    #[test]
    fn sm90_dx_u_matches_reference(dims in dx_shape(ONE_LAUNCH_R8), f16_layer in any::<bool>(), stream in any::<u64>()) {
        if f16_layer { MODE.case::<f16>(dims, false, stream, true) } else { MODE.case::<bf16>(dims, false, stream, true) }
    }
}

/// Edges, each on a number of SMs that gives it the tile width named (checked): one row past a tile, one
/// column past one, one full tile, rank 128 (two low-rank stages), k = 8 (one partial stage), ragged tile
/// grids of 3×3 wide or 3×5 narrow tiles, one block looping over 6 wide or 15 narrow tiles, each with the
/// TMA-store epilogue (n a multiple of 8: 256, 512, 520, 264 (boxes wholly past C in its last tile)) and
/// the register one (257, 1, 516); ranks 8, 16 and 24 (the one-launch kernel here: fused_gemm_sm90's last
/// low-rank stage of 1 to 3 k16 steps runs at those ranks in tests/sm90_projection.rs), 64 (a stage of 4),
/// a partial stage after a whole one (80, 104), two whole ones (128).
/// A forward and backward captured on the sm_90a kernels (their TMA maps inside the recorded launch
/// parameters) replay with the eager ops' bits, with new inputs too (common::graph::check_replay).
#[test]
fn sm90_graph_replays_give_the_eager_bits() {
    MODE.force();
    let shapes = [
        Dims {
            m: 40,
            n: 72,
            k: 64,
            r: 16,
        },
        Dims {
            m: 130,
            n: 136,
            k: 72,
            r: 32,
        },
    ];
    for (i, d) in shapes.into_iter().enumerate() {
        let dev = hopper(ThreadOrder::Shuffled, common::seed() ^ i as u64, 3);
        common::graph::check_replay(&dev, d, 50 + i as u64);
        let launches = {
            let mut s = common::graph::Step::<bf16>::new(
                &dev,
                &Layer::random(&mut Rng::new(9), d, 1.0, false),
            );
            s.ops(false, lora_kernels::ops::GradMode::Overwrite)
                .unwrap();
            dev.take_launches()
        };
        assert!(
            launches.iter().any(|k| k.starts_with("fused_gemm_t")),
            "{d:?}: the sm_90a one-launch forward ran: {launches:?}"
        );
    }
}

#[test]
fn sm90_forward_edges() {
    for (i, &(dims, sms, bn)) in [
        ((129, 256, 64, 8), 3, 256),
        ((129, 256, 64, 8), 132, 128),
        ((128, 257, 8, 128), 2, 256),
        ((128, 257, 8, 128), 3, 128),
        ((17, 1, 72, 16), 3, 128),
        ((300, 516, 136, 64), 9, 256),
        ((300, 516, 136, 64), 3, 128),
        ((300, 520, 136, 72), 9, 256),
        ((300, 520, 136, 72), 1, 128),
        ((300, 512, 136, 8), 1, 256),
        ((40, 264, 16, 24), 2, 256),
        ((40, 264, 16, 24), 1, 128),
        ((129, 256, 64, 80), 3, 256),
        ((129, 256, 64, 104), 132, 128),
    ]
    .iter()
    .enumerate()
    {
        edge(i, dims, sms, bn, 0x5e90, (false, false));
    }
}

/// Edge case `i` of a list: the tile width `sms` SMs give the GEMM under test (the forward's m × n, or
/// with `backward` dX's m × k) is `bn` (checked), then the layer (with `backward` the backward too) in
/// bf16, and in f16 with `both_dtypes`, bias on alternate cases.
fn edge(
    i: usize,
    dims: (usize, usize, usize, usize),
    sms: u32,
    bn: usize,
    seed: u64,
    (both_dtypes, backward): (bool, bool),
) {
    let (m, n, k, _) = dims;
    let cols = if backward { k } else { n };
    assert_eq!(
        lora_kernels::ops::sm90_tile(m, cols, sms),
        (128, bn),
        "{dims:?} on {sms} (backward {backward})"
    );
    MODE.case_on::<bf16>(dims, i % 2 == 0, seed + i as u64, backward, sms);
    if both_dtypes {
        MODE.case_on::<f16>(dims, i % 2 == 1, seed + 0x100 + i as u64, backward, sms);
    }
}

/// The forward with T computed in the kernel (fused_gemm_t_sm90.cu: rank ≤ 32), where its schedule
/// matters: runs of tiles that start inside a row block (T computed again there), that cross into the next
/// row block (T computed anew mid-run), one CTA over every tile, one tile per CTA; ranks 8, 16 (T 16 wide),
/// 24, 32 (T 32 wide); both tile widths (checked), each with the TMA-store epilogue and the register one
/// (n = 1000, 516).
#[test]
fn sm90_forward_t_edges() {
    for (i, &(dims, sms, bn)) in [
        ((300, 768, 72, 32), 5, 256), // runs of 2 of 3×3 tiles: starts at column tiles 2, 1, 0, 2, 1
        ((300, 512, 136, 16), 2, 256), // runs of 3 of 3×2: the second starts at column tile 1
        ((300, 512, 136, 24), 1, 256), // one run over 3×2 tiles
        ((129, 1000, 64, 8), 3, 256), // runs of 3 of 2×4: registers epilogue, ragged n and m
        ((129, 512, 64, 32), 4, 256), // one tile per CTA: every tile computes T, column 0 writes it
        ((300, 516, 136, 16), 2, 128), // runs of 8 of 3×5 narrow tiles: the second starts at column 3
        ((129, 264, 64, 32), 1, 128),  // one run over 2×3 narrow tiles
        ((40, 264, 16, 24), 4, 128),   // one narrow tile per CTA, m under one tile
    ]
    .iter()
    .enumerate()
    {
        edge(i, dims, sms, bn, 0x7e90, (true, false));
    }
}

/// dX with U = dY·B computed in the kernel (fused_gemm_t_sm90.cu's "nn" kernels: rank ≤ 32), through the
/// whole backward, on the schedule edges of [`sm90_forward_t_edges`] with dX's columns (k) as the forward's
/// n and its reduction (n) as the forward's k: runs that start inside a row block or cross one, one CTA
/// over all, one tile per CTA; ranks 8, 16, 24, 32; both tile widths (checked) at ranks up to 16, while
/// from 17 on dX takes the narrow tiles whatever `sm90_tile` says (the U32 kernels' only width), so the
/// cases listed wide run narrow there, with the runs that gives. dX's columns are multiples of 8 (W0's
/// rows), so its epilogue is always the TMA store.
#[test]
fn sm90_dx_u_edges() {
    for (i, &(dims, sms, bn)) in [
        ((300, 72, 768, 32), 5, 256), // runs of 2 of 3×3 tiles: starts at column tiles 2, 1, 0, 2, 1
        ((300, 136, 512, 16), 2, 256), // runs of 3 of 3×2: the second starts at column tile 1
        ((300, 136, 512, 24), 1, 256), // one run over 3×2 tiles
        ((129, 64, 1000, 8), 3, 256), // runs of 3 of 2×4: ragged k and m, U 16 wide for rank 8
        ((129, 64, 512, 32), 4, 256), // one tile per CTA: every tile computes U, column 0 writes it
        ((300, 136, 520, 16), 2, 128), // runs of 8 of 3×5 narrow tiles: the second starts at column 3
        ((129, 64, 264, 32), 1, 128),  // one run over 2×3 narrow tiles
        ((40, 16, 264, 24), 4, 128), // one narrow tile per CTA, m under one tile, one reduction stage
    ]
    .iter()
    .enumerate()
    {
        edge(i, dims, sms, bn, 0xd790, (true, true));
    }
}

/// Batches of 1 to 16 rows (their forward on the small-M kernel) through the backward on the one-launch dX
/// kernel: one row block, mostly past m (TMA's zero rows in dY, X and T), at ranks 8 and 16 (dB's and dA's
/// partials inside) and 24 and 32 (their passes), dX's columns ragged against both tile widths, under a
/// shuffled thread order, against the reference, with the launches of the rank.
#[test]
fn sm90_backward_of_tiny_batches() {
    MODE.force();
    for (i, &(m, r)) in [(1, 8), (2, 16), (5, 16), (16, 24), (9, 32)]
        .iter()
        .enumerate()
    {
        let (n, k) = (64, 264);
        let dev = hopper(ThreadOrder::Shuffled, 0x71 + i as u64, 2);
        let mut rng = Rng::new(0x7e1 + i as u64);
        let l = Layer::<bf16>::random(&mut rng, Dims { m, n, k, r }, 0.75, false);
        dev.take_launches();
        let o = run(&dev, &l, true);
        let what = format!("sm_90a backward {m}×{n}×{k} r {r}");
        check(&what, &l, &o, tol(DType::BF16));
        let launches = dev.take_launches();
        assert!(
            launches.iter().any(|k| k.starts_with("fused_gemm_u")),
            "{what}: dX in one launch: {launches:?}"
        );
        took_the_backward_passes_of_its_rank(&launches, r, &what);
    }
}

/// The backward's gradients added onto an earlier micro-batch's (`GradMode::Accumulate`) on each sm_90a
/// structure: dB's partials from dX's kernel finalized onto dB (rank 16), dB from the pass over dY with U
/// from dX's kernel (24), both from the pass (40); both tile widths (3 and 9 SMs).
#[test]
fn sm90_backward_accumulates_on_every_structure() {
    MODE.force();
    for (i, r) in [16, 24, 40].into_iter().enumerate() {
        for sms in [3, 9] {
            let mut rng = Rng::new(0xacc0 + i as u64);
            let l = Layer::<bf16>::random(
                &mut rng,
                Dims {
                    m: 300,
                    n: 136,
                    k: 520,
                    r,
                },
                1.25,
                false,
            )
            .with_accumulation(&mut rng);
            let dev = hopper(ThreadOrder::Ascending, sms as u64, sms);
            let o = run(&dev, &l, true);
            let what = format!("r {r} on {sms} SMs, accumulating");
            check(&what, &l, &o, tol(DType::BF16));
            took_the_structure_of_its_rank(&dev.take_launches(), r, true, &what);
        }
    }
}

/// The one-launch kernels' bits do not depend on the number of SMs: on 1, 3, 5 and 9 emulated SMs (one run
/// over all 9 tiles, runs of 3 that are row blocks, runs of 2 that start inside them, one tile per CTA; the
/// 128×256 tiles on each, for the forward and for dX, checked, but dX at rank 32, whose kernels are narrow:
/// 18 tiles) Y, T, dX, dA and dB are the same bits, and within the tolerance of the reference; at ranks 16
/// and 32 (dB's and dA's partials in dX's kernel, U's tile rewritten where a run crosses a row block).
#[test]
fn sm90_one_launch_bits_do_not_depend_on_the_sm_count() {
    MODE.force();
    for r in [16, 32] {
        one_launch_bits_on_every_sm_count((300, 768, 768, r));
    }
}

fn one_launch_bits_on_every_sm_count(dims: (usize, usize, usize, usize)) {
    let mut rng = Rng::new(0x5eed);
    let (m, n, k, r) = dims;
    let l = Layer::<bf16>::random(&mut rng, Dims { m, n, k, r }, 0.75, true);
    let mut first: Option<Vec<Vec<u32>>> = None;
    for sms in [1, 3, 5, 9] {
        for cols in [n, k] {
            assert_eq!(
                lora_kernels::ops::sm90_tile(m, cols, sms),
                (128, 256),
                "{sms} SMs"
            );
        }
        let o = run(&hopper(ThreadOrder::Ascending, sms as u64, sms), &l, true);
        check(&format!("{dims:?} on {sms} SMs"), &l, &o, tol(DType::BF16));
        let bits = o.bits();
        match &first {
            None => first = Some(bits),
            Some(f) => assert!(
                *f == bits,
                "{dims:?}: bits on {sms} SMs differ from those on 1"
            ),
        }
    }
}

/// Batch invariance on the sm_90a path: a row's Y, T and dX have the same bits whether its batch takes the
/// 128×128 tiles (`small` rows) or the 128×256 ones (`big` rows, the first `small` of them the same), at
/// ranks 16 and 32 (the one-launch forward at both widths, and dX, at rank 32 on the narrow tiles alone)
/// and 40 (the projection, then
/// fused_gemm_sm90, and the backward's passes, then its dX, at both widths); n = k, so dX takes the same
/// widths; on the emulator with 3 SMs, and on an sm_90 GPU where it is one (its SM count picks other batch
/// sizes).
#[test]
fn sm90_forward_rows_keep_their_bits_across_batch_sizes() {
    MODE.force();
    let mut cases = vec![(hopper(ThreadOrder::Ascending, 0, 3), (256, 384, 512, 512))];
    cases.extend(hopper_gpu().map(|g| (g, (256, 2048, 4096, 4096))));
    for (dev, (small, big, n, k)) in cases {
        let sms = dev.sm_count().unwrap();
        assert_eq!(
            lora_kernels::ops::sm90_tile(small, n, sms),
            (128, 128),
            "{small} rows on {sms} SMs"
        );
        assert_eq!(
            lora_kernels::ops::sm90_tile(big, n, sms),
            (128, 256),
            "{big} rows on {sms} SMs"
        );
        for r in [16, 32, 40] {
            let mut rng = Rng::new(0xba7c + r as u64);
            let l = Layer::<bf16>::random(&mut rng, Dims { m: big, n, k, r }, 1.5, true);
            let head = l.first_rows(small);
            let what = format!(
                "{small} and {big} rows, n {n}, k {k}, r {r} on {}",
                dev.describe()
            );
            let (o_big, o_small) = (run(&dev, &l, true), run(&dev, &head, true));
            check(&what, &head, &o_small, tol(DType::BF16));
            let bits = |v: &[bf16]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&o_big.y[..small * n]) == bits(&o_small.y),
                "{what}: Y's rows differ"
            );
            assert!(
                bits(&o_big.t[..small * r]) == bits(&o_small.t),
                "{what}: T's rows differ"
            );
            assert!(
                bits(&o_big.dx[..small * k]) == bits(&o_small.dx),
                "{what}: dX's rows differ"
            );
        }
    }
}

/// A forward the Hopper kernel cannot take (k not a multiple of 8) is an error under LK_FUSED_GEMM=sm90.
#[test]
fn sm90_forced_refuses_what_it_cannot_run() {
    MODE.force();
    let dev = hopper(ThreadOrder::Ascending, 0, 3);
    let (m, n, k, r) = (20, 8, 12, 8);
    let z = |len: usize, shape: &[usize]| {
        Tensor::from_slice(&dev, &vec![bf16::ZERO; len], shape).unwrap()
    };
    let (x, w0, a, b) = (
        z(m * k, &[m, k]),
        z(n * k, &[n, k]),
        z(r * k, &[r, k]),
        z(n * r, &[n, r]),
    );
    let e = lora_kernels::ops::lora_forward(&x, &w0, &a, &b, None, 1.0).unwrap_err();
    assert!(e.to_string().contains("multiples of 8"), "{e}");
}

/// dX edges, each with both tile widths (checked): rank 128 (two low-rank stages) with dX two wide or three
/// narrow column tiles across (k = 264); f16 with a one-stage reduction (n = 8) over three wide or five
/// narrow column tiles (k = 520).
#[test]
fn sm90_dx_edges() {
    for (dims, sms, bn) in [
        ((129, 136, 264, 128), 4, 256),
        ((129, 136, 264, 128), 3, 128),
        ((300, 8, 520, 8), 9, 256),
        ((300, 8, 520, 8), 3, 128),
    ] {
        let (m, _, k, _) = dims;
        assert_eq!(
            lora_kernels::ops::sm90_tile(m, k, sms),
            (128, bn),
            "dX of {dims:?} on {sms}"
        );
        if dims.1 == 8 {
            MODE.case_on::<f16>(dims, false, 8, true, sms);
        } else {
            MODE.case_on::<bf16>(dims, false, 7, true, sms);
        }
    }
}
