//! Measurements for the speed bound (docs/perf/bound.md), not LoRA ops.
//!
//! [`l2_read`] reads a buffer that fits in L2 many times from every SM (kernels/l2_probe.cu): timed, the
//! bytes it reads over its time is the rate L2 feeds the SMs, which the sm_90a GEMM's TMA loads depend
//! on and which decides whether two-CTA clusters with multicast are worth building. The perf table
//! (examples/perf_table.rs) prints that rate on a GPU. Its result is checked like every kernel's:
//! [`l2_read_reference`] gives each thread's sum on the CPU.

use crate::device::{Arg, RawBuffer};
use crate::error::{Error, Result};
use crate::kernel::kernels;
use crate::ops::validate;
use crate::params::{LK_SIMT_THREADS, LkL2ReadParams};
use crate::plan::LaunchPlan;
use crate::tensor::Tensor;

const OP: &str = "l2_read";
/// The largest buffer in 16-byte words (16 GiB), the most threads and passes: together they keep the
/// kernel's 32-bit indices from wrapping (n16 + 4·threads and threads + 256·passes < 2^32).
const MAX_WORDS16: usize = 1 << 30;
const MAX_THREADS: usize = 1 << 24;
const MAX_PASSES: u32 = 1 << 20;

/// Reads `src` (`numel` a multiple of 4: 16-byte words; 16-byte aligned) `passes` times with a grid of
/// `sums.numel()` threads (a multiple of 256: blocks of 256), 16-byte loads cached in L2 only. On pass `p`
/// thread `g` of `G` reads the words `v, v + G, ...`, `v = (g + 256·p) mod G` (another block's share each
/// pass), and writes the wrapping sum of all the `u32`s it read to `sums[g]` ([`l2_read_reference`]). For a measurement: a buffer well inside L2, a few blocks per SM
/// ([`crate::Device::sm_count`]), enough passes that the first one (from device memory) is a small share,
/// and bytes read = `passes · 4 · src.numel()`.
pub fn l2_read(src: &Tensor<u32>, passes: u32, sums: &mut Tensor<u32>) -> Result<()> {
    validate::non_empty(OP, "src", src)?;
    validate::non_empty(OP, "sums", sums)?;
    if src.numel() % 4 != 0 {
        return Err(Error::Shape {
            op: OP,
            arg: "src",
            expected: "a multiple of 4 elements (16-byte words)".into(),
            got: src.shape().to_vec(),
        });
    }
    if src.byte_range().0 % 16 != 0 {
        return Err(Error::Alignment {
            op: OP,
            arg: "src",
            requirement: "must be 16-byte aligned (it is read in 16-byte words)".into(),
        });
    }
    let words = src.numel() / 4;
    validate::at_most(OP, "src", words, MAX_WORDS16)?;
    let threads = sums.numel();
    if threads % LK_SIMT_THREADS as usize != 0 {
        return Err(Error::Shape {
            op: OP,
            arg: "sums",
            expected: format!(
                "a multiple of {LK_SIMT_THREADS} elements (one per thread, blocks of {LK_SIMT_THREADS})"
            ),
            got: sums.shape().to_vec(),
        });
    }
    validate::at_most(OP, "sums", threads, MAX_THREADS)?;
    if !(1..=MAX_PASSES).contains(&passes) {
        return Err(Error::OutOfRange {
            op: OP,
            arg: "passes",
            value: passes as f64,
            expected: "1 ..= 2^20",
        });
    }
    let plan = LaunchPlan {
        grid: [(threads / LK_SIMT_THREADS as usize) as u32, 1, 1],
        block: [LK_SIMT_THREADS, 1, 1],
        smem_bytes: 0,
    };
    let device = src.device().clone();
    device.launch(
        OP,
        &kernels::L2_READ_U32,
        &plan,
        &mut [Arg::In("src", src), Arg::Out("sums", sums)],
        |ptrs| LkL2ReadParams {
            src: ptrs[0] as *const _,
            sums: ptrs[1] as *mut _,
            n16: words as u32,
            passes,
        },
    )
}

/// What [`l2_read`] writes, on the CPU: for thread `g` of `threads`, the wrapping sum over the passes `p`
/// of the `u32`s of the 16-byte words `v, v + threads, ...` of `src`, `v = (g + 256·p) mod threads`.
pub fn l2_read_reference(src: &[u32], passes: u32, threads: usize) -> Vec<u32> {
    let words = src.len() / 4;
    let threads = threads.max(1);
    // one pass's sum per thread, then each thread's rotation through them
    let once: Vec<u32> = (0..threads)
        .map(|v| {
            (v..words).step_by(threads).fold(0u32, |s, w| {
                src[4 * w..4 * w + 4]
                    .iter()
                    .fold(s, |s, &x| s.wrapping_add(x))
            })
        })
        .collect();
    let block = LK_SIMT_THREADS as usize;
    (0..threads)
        .map(|g| {
            (0..passes as usize).fold(0u32, |s, p| s.wrapping_add(once[(g + block * p) % threads]))
        })
        .collect()
}
