//! The LoRA forward for a batch whose rows use different adapters of one [`AdapterSet`]
//! (kernels/fused_gemm_multi.cu): `Y_i = X_i·W0ᵀ + bias + s_a·(X_i·A_aᵀ)·B_aᵀ` with a = the row's adapter,
//! or no low-rank term for a row without one. Three launches whatever the batch: the shrink T = X·A_aᵀ
//! for all rows (f32 partials per fixed K chunk), its finalize (one rounding), and the fused GEMM with
//! every adapter's low-rank term. Mixed ranks 1..=128, any shapes, rows in any order.
//!
//! For a decoding batch (M ≤ 16) the fused GEMM is kernels/multi_decode.cu, and so is the shrink up to
//! M = 128: the same sums in the same order from blocks of 32 columns for 16 rows, so that W0 is streamed
//! by enough blocks to reach bandwidth and the shrink multiplies groups of 16 rows per adapter, not a
//! 128-row tile.
//!
//! Batch invariance: a row's Y and T bits depend on its own X row, adapter, W0 and bias only, at every
//! M; they are the bits of [`lora_forward`](super::lora_forward) with that adapter alone on its general
//! path (M > 16, with `LK_FUSED_GEMM` unset or `mma`; see kernels/fused_gemm_multi.cu for why). This holds for any X (infinities and NaN
//! included) as long as the set's adapters are finite: a NaN or infinity in one adapter's A or B reaches
//! the other rows of its tiles as 0·inf = NaN.

use super::launch::{self, aligned_flags, pick_pair, u32_of};
use super::lora::{ForwardOutput, base_dims, base_sizes_fit};
use super::validate::{self, rows_of};
use super::workspace::Workspace;
use crate::adapter_set::{AdapterIndex, AdapterSet};
use crate::device::Arg;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::kernel::{Kernel, kernels};
use crate::params::*;
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

const OP: &str = "lora_forward_multi";
/// The shrink's target block count: two per SM of a 132-SM GPU (any value gives the same bits).
const SHRINK_BLOCKS: usize = 264;

/// `Y = X·W0ᵀ + bias + s_a·(X·A_aᵀ)·B_aᵀ` row by row, with each row's adapter a from `index` (a slot
/// of `set`, or none). X [..., K] (any leading dimensions, M rows), W0 [N, K], bias \[N\]; the set's
/// adapters in X's dtype or f32, for N×K. Returns Y [..., N] and T [M, r_max] (r_max = the set's
/// largest rank; row i's T in its first r_a columns, zeros after them, X_i·0 = NaN where X_i holds an
/// infinity, and zeros for rows without an adapter).
pub fn lora_forward_multi<T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    set: &AdapterSet<A>,
    index: &AdapterIndex,
) -> Result<ForwardOutput<T>> {
    let (lead, m, _) = validate::rows(OP, "x", x)?;
    let n = w0.shape().first().copied().unwrap_or(0);
    let mut y = Tensor::for_output(x.device(), &rows_of(&lead, n))?;
    let mut t = Tensor::for_output(x.device(), &[m, set.max_rank()])?;
    lora_forward_multi_into(
        x,
        w0,
        bias,
        set,
        index,
        &mut y,
        &mut t,
        &mut Workspace::new(),
    )?;
    Ok(ForwardOutput { y, t })
}

/// [`lora_forward_multi`] into existing `y` [..., N] and `t` [M, r_max], with scratch memory from `ws`.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_multi_into<T: Element, A: Element>(
    x: &Tensor<T>,
    w0: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    set: &AdapterSet<A>,
    index: &AdapterIndex,
    y: &mut Tensor<T>,
    t: &mut Tensor<T>,
    ws: &mut Workspace<T>,
) -> Result<()> {
    let (lead, m, n, k) = base_dims::<T, A>(OP, x, w0)?;
    if set.dims() != (n, k) {
        let (sn, sk) = set.dims();
        return Err(Error::Shape {
            op: OP,
            arg: "adapters",
            expected: format!("an AdapterSet for N×K = {n}×{k} (w0's)"),
            got: vec![sn, sk],
        });
    }
    if let Some(bias) = bias {
        validate::shape(OP, "bias", bias, &[n], "[N]")?;
    }
    if index.len() != m {
        return Err(Error::Shape {
            op: OP,
            arg: "adapter_index",
            expected: format!("[M] = [{m}] (one adapter slot per row of x)"),
            got: vec![index.len()],
        });
    }
    index.check(OP, set)?;
    validate::rows_shape(OP, "y", y, &lead, n, "[..., N] (x's leading dimensions)")?;
    let ldt = set.max_rank();
    validate::shape(OP, "t", t, &[m, ldt], "[M, r_max] (the set's largest rank)")?;
    base_sizes_fit(OP, (m, n, k), ldt)?;
    launch::check_pair(OP, T::DTYPE, A::DTYPE)?;
    // every operand on x's device before the shrink writes T (a launch checks only its own arguments)
    let mut devices = vec![
        ("w0", w0.device()),
        ("adapters", set.arena().device()),
        ("adapter_index", index.tensor().device()),
        ("y", y.device()),
        ("t", t.device()),
    ];
    if let Some(bias) = bias {
        devices.push(("bias", bias.device()));
    }
    validate::same_device(OP, ("x", x.device()), &devices)?;
    let device = x.device().clone();
    let sms = device.sm_count()?;
    // the fused mode's tiles (ops::mma_tile: 128×64 where 128×128 leaves SMs idle; the same bits)
    let (bm, bn) = (
        LK_FUSED_GEMM_BM as usize,
        launch::mma_tile_columns(OP, m, n, 1, sms)?,
    );
    let tiles_m = m.div_ceil(bm);
    let tiles = tiles_m * n.div_ceil(bn);
    validate::at_most(
        OP,
        "output tiles (128×128 or 128×64)",
        tiles,
        i32::MAX as usize,
    )?;
    let n_adapters = u32_of(set.slots());
    let (m32, n32, k32, ldt32) = (u32_of(m), u32_of(n), u32_of(k), u32_of(ldt));
    let (splits, per_split) = launch::projection_splits(k);
    // Captured into a graph, the launches must serve any row map of this set (AdapterIndex::update
    // between replays): the shrink's blocks per row tile sized by the set's slots rather than by the
    // index's (extra blocks find no adapter of theirs and return; the same sums, the same bits).
    let any_map = device.is_capturing();
    // DoRA rows in this batch (the set's "_dora" kernels and its factor table), or, captured, in any map
    let dora = set
        .factor_table()
        .filter(|_| any_map || index.slots().iter().any(|&slot| set.is_dora(slot)));

    // 1. the shrink: f32 partials of X_i·A_aᵀ per K chunk, then T = their in-order sum, rounded once.
    let (shrink_kernel, shrink_plan) = if m <= bm {
        // one row tile: blocks of 32 of T's columns for 16 rows, one per adapter of those rows and K
        // chunk (kernels/multi_decode.cu), not a 128-row tile per adapter
        let passes = if any_map {
            set.slots().min(LK_SMALL_M_MAX as usize)
        } else {
            index.group_passes()
        };
        launch::small_shrink::<T, A>(OP, m, ldt, passes, splits)?
    } else {
        // A tile's adapters (passes) are spread over grid y, up to about two blocks per SM of a large
        // GPU (SHRINK_BLOCKS): at small M the tiles alone are too few.
        let used = if any_map {
            set.slots()
        } else {
            index.slots().len()
        };
        let pass_blocks = (used.min(m).min(bm))
            .min(SHRINK_BLOCKS.div_ceil(tiles_m * splits))
            .max(1);
        // Its one column tile holds T's r_max columns: the 64-column kernel where r_max ≤ 64 (the
        // same blocks, half the padded columns; unless LK_MMA_TILE=128), else the 128-column one.
        let shrink_bn = if ldt <= LK_FUSED_GEMM_NARROW_BN as usize {
            launch::mma_tile_columns(OP, m, ldt, splits * pass_blocks, sms)?
        } else {
            LK_FUSED_GEMM_BN as usize
        };
        let (kernel, smem_bytes) = multi_gemm::<T, A>(shrink_bn, false)?;
        let plan = LaunchPlan {
            grid: [u32_of(tiles_m), u32_of(pass_blocks), u32_of(splits)],
            block: [LK_FUSED_GEMM_THREADS, 1, 1],
            smem_bytes,
        };
        (kernel, plan)
    };
    ws.with_partial(&device, &[splits, m, ldt], |partial, _| {
        let mut args = [
            Arg::In("x", x),
            Arg::In("adapters", set.arena()),
            Arg::In("adapter table", set.table()),
            Arg::In("adapter_index", index.tensor()),
            Arg::Out("partial", &mut *partial),
        ];
        device.launch(OP, shrink_kernel, &shrink_plan, &mut args, |ptr| {
            LkFusedGemmMultiParams {
                x: ptr[0] as *const _,
                // the shrink reads no W0, T, bias or Y
                w0: ptr[0] as *const _,
                t: std::ptr::null(),
                bias: std::ptr::null(),
                y: std::ptr::null_mut(),
                partial: ptr[4] as *mut f32,
                arena: ptr[1] as *const _,
                adapters: ptr[2] as *const LkAdapterDesc,
                index: ptr[3] as *const u32,
                factors: std::ptr::null(), // the shrink's T is the plain one for DoRA adapters too
                n_adapters,
                m: m32,
                n: n32,
                k: k32,
                ldt: ldt32,
                k_per_split: u32_of(per_split),
                flags: LK_MULTI_SHRINK | aligned_flags(&[(ptr[0], k32, LK_ALIGNED_A)]),
            }
        })?;
        launch::finalize(OP, partial, t, splits, 1.0, false)
    })?;

    // 2. the fused GEMM: every adapter's low-rank k-tiles (other rows masked), per-row scale, X·W0ᵀ;
    // for a decoding batch the same sums in the same order from narrow column blocks (W0 at bandwidth)
    let (kernel, plan) = if m <= LK_SMALL_M_MAX as usize {
        let decode = pick_pair(
            OP,
            (T::DTYPE, A::DTYPE),
            [&kernels::MULTI_DECODE_BF16, &kernels::MULTI_DECODE_F16],
            [
                &kernels::MULTI_DECODE_BF16_F32AD,
                &kernels::MULTI_DECODE_F16_F32AD,
            ],
        )?;
        let plan = LaunchPlan {
            grid: [u32_of(n.div_ceil(LK_MULTI_DECODE_COLS as usize)), 1, 1],
            block: [LK_MULTI_DECODE_THREADS, 1, 1],
            smem_bytes: LK_MULTI_DECODE_SMEM_BYTES,
        };
        (decode, plan)
    } else {
        let (kernel, smem_bytes) = multi_gemm::<T, A>(bn, dora.is_some())?;
        let plan = LaunchPlan {
            grid: [u32_of(tiles), 1, 1],
            block: [LK_FUSED_GEMM_THREADS, 1, 1],
            smem_bytes,
        };
        (kernel, plan)
    };
    let mut args = vec![
        Arg::In("x", x),
        Arg::In("w0", w0),
        Arg::In("t", &*t),
        Arg::In("adapters", set.arena()),
        Arg::In("adapter table", set.table()),
        Arg::In("adapter_index", index.tensor()),
    ];
    if let Some(bias) = bias {
        args.push(Arg::In("bias", bias));
    }
    // the DoRA adapters' factors (a table the set made when they were added), where this batch has DoRA rows
    let factors_index = dora.map(|f| {
        args.push(Arg::In("DoRA factors", f));
        args.len() - 1
    });
    let y_index = args.len();
    args.push(Arg::Out("y", y));
    let has_bias = bias.is_some();
    device.launch(OP, kernel, &plan, &mut args, |ptr| LkFusedGemmMultiParams {
        x: ptr[0] as *const _,
        w0: ptr[1] as *const _,
        t: ptr[2] as *const _,
        bias: if has_bias {
            ptr[6] as *const _
        } else {
            std::ptr::null()
        },
        y: ptr[y_index] as *mut _,
        partial: std::ptr::null_mut(),
        arena: ptr[3] as *const _,
        adapters: ptr[4] as *const LkAdapterDesc,
        index: ptr[5] as *const u32,
        factors: factors_index.map_or(std::ptr::null(), |i| ptr[i] as *const f32),
        n_adapters,
        m: m32,
        n: n32,
        k: k32,
        ldt: ldt32,
        k_per_split: 0,
        flags: aligned_flags(&[
            (ptr[0], k32, LK_ALIGNED_A),
            (ptr[1], k32, LK_ALIGNED_B),
            (ptr[2], ldt32, LK_ALIGNED_L),
        ]),
    })
}

/// The many-adapter GEMM (kernels/fused_gemm_multi.cu) for this dtype pair at a tile width of `bn`
/// columns (128, or 64: the "_narrow" kernels), the "_dora" ones (the fused mode's epilogue for DoRA
/// rows) when `dora`, with its dynamic shared memory.
fn multi_gemm<T: Element, A: Element>(
    bn: usize,
    dora: bool,
) -> Result<(&'static Kernel<LkFusedGemmMultiParams>, u32)> {
    use kernels::*;
    let narrow = bn == LK_FUSED_GEMM_NARROW_BN as usize;
    let (same, f32ad) = match (narrow, dora) {
        (true, false) => (
            [&FUSED_GEMM_MULTI_NARROW_BF16, &FUSED_GEMM_MULTI_NARROW_F16],
            [
                &FUSED_GEMM_MULTI_NARROW_BF16_F32AD,
                &FUSED_GEMM_MULTI_NARROW_F16_F32AD,
            ],
        ),
        (false, false) => (
            [&FUSED_GEMM_MULTI_BF16, &FUSED_GEMM_MULTI_F16],
            [&FUSED_GEMM_MULTI_BF16_F32AD, &FUSED_GEMM_MULTI_F16_F32AD],
        ),
        (true, true) => (
            [
                &FUSED_GEMM_MULTI_DORA_NARROW_BF16,
                &FUSED_GEMM_MULTI_DORA_NARROW_F16,
            ],
            [
                &FUSED_GEMM_MULTI_DORA_NARROW_BF16_F32AD,
                &FUSED_GEMM_MULTI_DORA_NARROW_F16_F32AD,
            ],
        ),
        (false, true) => (
            [&FUSED_GEMM_MULTI_DORA_BF16, &FUSED_GEMM_MULTI_DORA_F16],
            [
                &FUSED_GEMM_MULTI_DORA_BF16_F32AD,
                &FUSED_GEMM_MULTI_DORA_F16_F32AD,
            ],
        ),
    };
    let kernel = pick_pair(OP, (T::DTYPE, A::DTYPE), same, f32ad)?;
    Ok((kernel, launch::mma_tile_smem(bn)))
}
