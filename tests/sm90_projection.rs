//! `LK_FUSED_GEMM=sm90-projection` (set for this whole test binary): the sm_90a path with T and U always
//! from their own launches, at the ranks (8..=32) where `LK_FUSED_GEMM=sm90` takes the one-launch kernels
//! instead (tests/sm90_forward.rs), so fused_gemm_sm90.cu's forward and "nn" kernels run there with a
//! low-rank part of one stage of 1 to 4 k16 steps, after the projection (forward) or the pass over dY that
//! computes U (backward). Property tests (forward over ragged n, so both epilogues; the backward with dX),
//! each case against the f64 reference with outputs poisoned, under two thread orders with identical bits,
//! on 1, 3 or 132 emulated SMs (both tile widths), a scale of either sign; the launch record must show
//! this structure. On an sm_90 GPU the cases run there too. Cases per run: `PROPTEST_CASES` (default 32
//! per test).

mod common;

use half::{bf16, f16};
use proptest::prelude::*;

/// This binary's mode: the projection structure at every rank.
const MODE: common::sm90::Mode = common::sm90::Mode {
    fused_gemm: "sm90-projection",
    structure: took_the_projection_structure,
};

/// The launches of one case took the projection structure: the forward's fused_gemm_sm90 kernel after T's
/// own launch, no one-launch kernel; with the backward, fused_gemm_sm90's "nn" kernel for dX after the
/// pass over dY (dB and U) and the one over X (dA).
fn took_the_projection_structure(launches: &[&str], r: usize, backward: bool, what: &str) {
    let count = |prefix: &str| launches.iter().filter(|k| k.starts_with(prefix)).count();
    let forward = launches
        .iter()
        .filter(|k| k.starts_with("fused_gemm_sm90_") && !k.starts_with("fused_gemm_sm90_nn"))
        .count();
    assert_eq!(
        forward, 1,
        "{what} (r {r}): the forward's GEMM in {launches:?}"
    );
    assert_eq!(
        count("fused_gemm_t") + count("fused_gemm_u"),
        0,
        "{what}: a one-launch kernel in {launches:?}"
    );
    if backward {
        assert_eq!(
            (
                count("fused_gemm_sm90_nn"),
                count("lowrank_grad_u"),
                count("lowrank_grad_r")
            ),
            (1, 1, 1),
            "{what}: dX and the passes over dY and X in {launches:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::proptest_cases(32),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The forward at ranks 8..=32: ragged m > 16 (the small-M kernel stays out), n (a multiple of 8 in
    /// half the cases: the TMA-store epilogue; the register one otherwise), k a multiple of 8 up to 320.
    #[test]
    fn sm90_projection_forward_matches_reference(
        (m, n, n8, k8, r8) in (17usize..=300, 1usize..=300, any::<bool>(), 1usize..=40, 1usize..=4),
        f16_layer in any::<bool>(),
        bias in any::<bool>(),
        stream in any::<u64>(),
    ) {
        let dims = (m, if n8 { 8 * n.div_ceil(8) } else { n }, 8 * k8, 8 * r8);
        if f16_layer { MODE.case::<f16>(dims, bias, stream, false) } else { MODE.case::<bf16>(dims, bias, stream, false) }
    }

    /// The backward at ranks 8..=32 with dX on fused_gemm_sm90's "nn" kernel: n and k multiples of 8.
    #[test]
    fn sm90_projection_dx_matches_reference(
        (m, n8, k8, r8) in (17usize..=300, 1usize..=40, 1usize..=40, 1usize..=4),
        f16_layer in any::<bool>(),
        stream in any::<u64>(),
    ) {
        let dims = (m, 8 * n8, 8 * k8, 8 * r8);
        if f16_layer { MODE.case::<f16>(dims, false, stream, true) } else { MODE.case::<bf16>(dims, false, stream, true) }
    }
}

/// Each rank whose one low-rank stage is partial (8, 16, 24: 1 to 3 k16 steps) and a whole one (32), on
/// both tile widths (checked), forward and backward, bf16 and f16.
#[test]
fn sm90_projection_low_rank_stages() {
    for (i, r) in [8, 16, 24, 32].into_iter().enumerate() {
        for (sms, bn) in [(3, 256), (132, 128)] {
            // the forward's 129 × 256 and dX's 129 × 256 take the width named
            let dims = (129, 256, 256, r);
            assert_eq!(lora_kernels::ops::sm90_tile(129, 256, sms), (128, bn));
            let stream = 0x9e0 + 16 * i as u64 + sms as u64;
            MODE.case_on::<bf16>(dims, i % 2 == 0, stream, true, sms);
            MODE.case_on::<f16>(dims, i % 2 == 1, stream ^ 1, true, sms);
        }
    }
}
