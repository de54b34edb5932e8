//! One call of each kernel on the headline layer (M 8192, N = K = 4096, r 16, bf16), then the small-M
//! forward (M 16) and the cuBLAS GEMMs they are compared with (on sm_90 also the forward and backward with
//! the sm_90a GEMM, LK_FUSED_GEMM=sm90): a short program for ncu, so that one
//! profile shows every kernel of a training step next to its baseline
//! (`scripts/gpu-profile.sh`). Needs a GPU; without one it says so and exits 0.

#[path = "../benches/common/mod.rs"]
mod common;

use common::Case;
use lora_kernels::Device;

const SCALE: f32 = 2.0;

fn main() {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("profile_step skipped: no usable GPU ({e})");
            return;
        }
    };
    let blas = common::blas(&dev).unwrap_or_else(|e| {
        eprintln!("profile_step: no cuBLAS baseline ({e})");
        std::process::exit(2);
    });
    let headline = Case {
        m: 8192,
        n: 4096,
        k: 4096,
        r: 16,
    };
    let small = Case { m: 16, ..headline };
    for c in [headline, small] {
        let s = &mut common::set(&dev, c, 0).expect("allocating the inputs");
        common::ours_forward(s, SCALE);
        common::cublas_forward(&blas, s, c);
        // on sm_90: the forward and dX once more on the sm_90a GEMM (its L2 throughput says whether
        // larger tiles or clusters are worth building)
        if c.m > 16 {
            // sm90_runs is that forward and backward under LK_FUSED_GEMM=sm90, once each
            if let Err(why) = common::sm90_runs(s, SCALE) {
                println!("no sm_90a kernels profiled ({why})");
            }
        }
        if c.m > 16 {
            common::ours_backward(s, SCALE);
            common::cublas_full_backward(&blas, s, c);
            common::ours_merge(s, SCALE);
        }
        dev.synchronize().expect("the profiled kernels ran");
        println!("profiled {c:?} on {}", dev.describe());
    }
}
