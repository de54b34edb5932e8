//! What the emulator's access checks catch (kernels/emu/lk_emu_check.cpp): the shared-memory race
//! detector, shared-memory bounds (static red zones, the canary after dynamic shared memory, the 48 KB and
//! per-architecture limits), memcheck (global accesses outside the launch's allocations, straddling one's
//! end, cp.async sources) and initcheck (reads of never-written memory); plus shuffle semantics against the
//! CUDA guide; global accesses before the programmatic-dependent-launch wait; the mbarrier + bulk-copy
//! protocol (tests/kernels/planted_pipeline.cu, nine planted bugs). Each planted bug of
//! tests/kernels/planted_checks.cu runs under every thread order; the bug-free version of the same kernel
//! must run clean and give the right answer, the planted one must fail with a message that names the
//! problem.

mod common;

use lora_kernels::device::{EmuRegion, emu_launch_raw};
use lora_kernels::kernel::EmuBody;
use lora_kernels::{EmuConfig, LaunchPlan, ThreadOrder};

include!(concat!(env!("OUT_DIR"), "/test_kernel_decls.rs"));

#[repr(C)]
#[derive(Clone, Copy)]
struct CheckParams {
    x: *const f32,
    y: *mut f32,
    n: i32,
    bug: i32,
}

fn orders() -> Vec<EmuConfig> {
    let cfg = |order, seed| EmuConfig {
        order,
        seed,
        ..EmuConfig::default()
    };
    vec![
        cfg(ThreadOrder::Ascending, 0),
        cfg(ThreadOrder::Descending, 0),
        cfg(ThreadOrder::Shuffled, common::seed()),
        cfg(ThreadOrder::WarpGreedyAscending, 3),
        cfg(ThreadOrder::WarpGreedyDescending, 0),
    ]
}

/// 16-byte aligned floats (cp.async and 16-byte vector loads need it).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct V4([f32; 4]);

struct Input {
    storage: Vec<V4>,
    n: usize,
}

impl Input {
    fn new(n: usize) -> Self {
        let mut storage = vec![V4([0.0; 4]); n.div_ceil(4) + 4];
        for i in 0..n {
            storage[i / 4].0[i % 4] = i as f32 + 1.0;
        }
        Input { storage, n }
    }
    /// Exactly the n floats: the region memcheck holds the kernel to (the storage behind may be longer).
    fn floats(&self) -> &[f32] {
        // SAFETY: storage holds at least n contiguous f32 (V4 is four f32, repr(C)).
        unsafe { std::slice::from_raw_parts(self.storage.as_ptr() as *const f32, self.n) }
    }
}

struct Launch {
    body: EmuBody,
    grid: u32,
    threads: u32,
    smem: u32,
    n: usize,
    y_len: usize,
}

/// Runs `l` with `bug` under `cfg`; y is poisoned and, with `tracked`, counts as never written.
fn run(l: &Launch, cfg: &EmuConfig, bug: i32, tracked: bool) -> Result<Vec<f32>, String> {
    let x = Input::new(l.n);
    let mut y = vec![f32::NAN; l.y_len];
    let mut shadow = vec![0u8; 4 * l.y_len];
    let p = CheckParams {
        x: x.floats().as_ptr(),
        y: y.as_mut_ptr(),
        n: l.n as i32,
        bug,
    };
    let out = if tracked {
        EmuRegion::tracked_output("y", &mut y, &mut shadow)
    } else {
        EmuRegion::output("y", &mut y)
    };
    let regions = [EmuRegion::input("x", x.floats()), out];
    let plan = LaunchPlan {
        grid: [l.grid, 1, 1],
        block: [l.threads, 1, 1],
        smem_bytes: l.smem,
    };
    // SAFETY: the params point into x and y, which `regions` describe and which outlive the call.
    unsafe { emu_launch_raw(cfg, l.body, &plan, &p, &regions) }?;
    Ok(y)
}

/// The bug-free run is clean and equals `want` under every order; the planted one fails under every
/// order with a message containing each of `expect`.
fn check(l: Launch, want: impl Fn(usize) -> f32, expect: &[&str]) {
    for cfg in orders() {
        let y = run(&l, &cfg, 0, false)
            .unwrap_or_else(|e| panic!("{cfg:?}: the bug-free kernel failed: {e}"));
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, want(i), "{cfg:?}: y[{i}]");
        }
        let e = run(&l, &cfg, 1, false).expect_err("the planted bug must fail the launch");
        for s in expect {
            assert!(e.contains(s), "{cfg:?}: expected `{s}` in: {e}");
        }
    }
}

/// Like `check`, for a kernel with several planted bugs: each `(bug, expect)` fails under every order
/// with a message containing each of `expect` ("a|b": a or b, where the order decides which check fires
/// first).
fn check_each(l: Launch, want: impl Fn(usize) -> f32, bugs: &[(i32, &[&str])]) {
    for cfg in orders() {
        let y = run(&l, &cfg, 0, false)
            .unwrap_or_else(|e| panic!("{cfg:?}: the bug-free kernel failed: {e}"));
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, want(i), "{cfg:?}: y[{i}]");
        }
        for (bug, expect) in bugs {
            let e = run(&l, &cfg, *bug, false)
                .expect_err(&format!("{cfg:?}: planted bug {bug} must fail the launch"));
            eprintln!("{:?} bug {bug}: {e}", cfg.order);
            for s in *expect {
                assert!(
                    s.split('|').any(|alt| e.contains(alt)),
                    "{cfg:?}, bug {bug}: expected `{s}` in: {e}"
                );
            }
        }
    }
}

fn x(i: usize) -> f32 {
    i as f32 + 1.0
}

#[test]
fn pipeline_refill_before_barrier_is_a_write_after_read_race() {
    let tiles = 3;
    let want = |i: usize| {
        let o = (i + 32) % 64;
        (0..tiles)
            .map(|t| (0..4).map(|j| x(t * 256 + 4 * o + j)).sum::<f32>())
            .sum()
    };
    check(
        Launch {
            body: lk_emu_body_planted_pipeline_war,
            grid: 1,
            threads: 64,
            smem: 2048,
            n: 256 * tiles,
            y_len: 64,
        },
        want,
        &["shared-memory race", "cp.async"],
    );
}

#[test]
fn missing_barrier_across_warps_is_a_race() {
    check(
        Launch {
            body: lk_emu_body_planted_cross_warp_raw,
            grid: 1,
            threads: 64,
            smem: 256,
            n: 64,
            y_len: 64,
        },
        |i| x((i + 32) % 64),
        &["shared-memory race", "in the same barrier interval"],
    );
}

#[test]
fn missing_cp_async_wait_is_reported() {
    // tests/kernels/planted_bugs.cu: each thread cp.asyncs 4 floats, the bug drops the wait.
    check(
        Launch {
            body: lk_emu_body_planted_missing_wait,
            grid: 1,
            threads: 32,
            smem: 512,
            n: 128,
            y_len: 128,
        },
        |i| x((i + 4) % 128),
        &["cp.async", "still in flight"],
    );
}

#[test]
fn static_shared_overflow_is_reported() {
    check(
        Launch {
            body: lk_emu_body_planted_static_overflow,
            grid: 2,
            threads: 64,
            smem: 0,
            n: 64,
            y_len: 64,
        },
        |i| x(i % 64),
        &[
            "out of bounds",
            "past the end of static __shared__ `buf` (256 bytes)",
        ],
    );
}

#[test]
fn static_shared_memory_over_48_kb_is_refused() {
    check(
        Launch {
            body: lk_emu_body_planted_static_too_large,
            grid: 1,
            threads: 64,
            smem: 0,
            n: 64,
            y_len: 64,
        },
        |i| x((i + 1) % 64),
        &["static __shared__ `huge`", "at most 49152 (48 KB)"],
    );
}

#[test]
fn write_into_the_dynamic_shared_memory_canary_is_reported() {
    check(
        Launch {
            body: lk_emu_body_planted_dynamic_canary,
            grid: 1,
            threads: 64,
            smem: 256,
            n: 64,
            y_len: 64,
        },
        |i| x((i + 1) % 64),
        &[
            "shared-memory write",
            "past the end of dynamic shared memory (256 bytes), in its canary",
        ],
    );
}

#[test]
fn shared_memory_limit_follows_the_architecture() {
    let l = Launch {
        body: lk_emu_body_planted_cross_warp_raw,
        grid: 1,
        threads: 64,
        smem: 120 * 1024,
        n: 64,
        y_len: 64,
    };
    for (arch, fits) in [(80, true), (86, false), (89, false), (90, true)] {
        let cfg = EmuConfig {
            arch,
            ..EmuConfig::default()
        };
        let r = run(&l, &cfg, 0, false);
        if fits {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert!(e.contains("allows at most 101376"), "sm_{arch}: {e}");
        }
    }
    let bad = EmuConfig {
        arch: 42,
        ..EmuConfig::default()
    };
    assert!(run(&l, &bad, 0, false).unwrap_err().contains("arch 42"));
}

#[test]
fn discarded_read_past_the_end_is_reported() {
    check(
        Launch {
            body: lk_emu_body_planted_oob_discarded,
            grid: 2,
            threads: 64,
            smem: 0,
            n: 100,
            y_len: 100,
        },
        |i| x(i) + if i + 1 < 100 { x(i + 1) } else { 0.0 },
        &[
            "out-of-bounds global read of 4 bytes",
            "offset 400 of argument `x`, which has 400 bytes",
        ],
    );
}

#[test]
fn straddling_vector_read_is_reported() {
    check(
        Launch {
            body: lk_emu_body_planted_straddling_vector,
            grid: 1,
            threads: 32,
            smem: 0,
            n: 30,
            y_len: 30,
        },
        x,
        &[
            "out-of-bounds global read of 16 bytes",
            "offset 112 of argument `x` straddles its end (120 bytes)",
        ],
    );
}

#[test]
fn cp_async_source_past_the_end_is_reported() {
    check(
        Launch {
            body: lk_emu_body_planted_cp_async_past_end,
            grid: 1,
            threads: 32,
            smem: 512,
            n: 30,
            y_len: 30,
        },
        x,
        &[
            "out-of-bounds global read by cp.async source of 16 bytes",
            "argument `x`",
        ],
    );
}

#[test]
fn read_of_never_written_memory_is_reported() {
    let l = Launch {
        body: lk_emu_body_planted_uninit_read,
        grid: 2,
        threads: 64,
        smem: 0,
        n: 100,
        y_len: 100,
    };
    for cfg in orders() {
        let y = run(&l, &cfg, 0, true).unwrap();
        assert!(y.iter().enumerate().all(|(i, v)| *v == 2.0 * x(i)));
        let e = run(&l, &cfg, 1, true).unwrap_err();
        assert!(
            e.contains("argument `y`") && e.contains("was never written"),
            "{e}"
        );
        // the same read of an initialised output is fine: memory counts as written once anything wrote it
        run(&l, &cfg, 1, false).unwrap();
    }
}

/// Every kernel begins with LK_KERNEL_ENTRY (griddepcontrol.wait) because on sm_90 GPUs every launch may
/// overlap the kernel before it: a global read, write or cp.async before the wait fails the launch.
#[test]
fn global_access_before_the_dependency_wait_is_reported() {
    check_each(
        Launch {
            body: lk_emu_body_planted_early_global_access,
            grid: 1,
            threads: 32,
            smem: 128,
            n: 32,
            y_len: 32,
        },
        |i| x(i) + 1.0,
        &[
            (
                1,
                &[
                    "global read of 4 bytes at offset",
                    "of argument `x` before this thread's griddepcontrol.wait",
                ],
            ),
            (
                2,
                &[
                    "global read of 4 bytes",
                    "begin the kernel with LK_KERNEL_ENTRY()",
                ],
            ),
            (
                3,
                &[
                    "global read by cp.async source of 16 bytes",
                    "griddepcontrol.wait",
                ],
            ),
        ],
    );
}

/// Writes through an output that a later launch reads: initcheck's shadow carries over between launches.
#[test]
fn memory_written_by_an_earlier_launch_counts_as_written() {
    let l = Launch {
        body: lk_emu_body_planted_uninit_read,
        grid: 1,
        threads: 64,
        smem: 0,
        n: 64,
        y_len: 64,
    };
    let input = Input::new(64);
    let mut y = vec![f32::NAN; 64];
    let mut shadow = vec![0u8; 256];
    for bug in [0, 1] {
        let p = CheckParams {
            x: input.floats().as_ptr(),
            y: y.as_mut_ptr(),
            n: 64,
            bug,
        };
        let regions = [
            EmuRegion::input("x", input.floats()),
            EmuRegion::tracked_output("y", &mut y, &mut shadow),
        ];
        let plan = LaunchPlan {
            grid: [l.grid, 1, 1],
            block: [l.threads, 1, 1],
            smem_bytes: 0,
        };
        // SAFETY: params point into x and y, described by `regions`, alive for the call.
        unsafe { emu_launch_raw(&EmuConfig::default(), l.body, &plan, &p, &regions) }.unwrap();
    }
    assert!(y.iter().enumerate().all(|(i, v)| *v == 4.0 * x(i)));
}

/// Shuffles as the CUDA C++ Programming Guide words them (warp shuffle functions).
#[test]
fn shuffles_follow_the_cuda_guide() {
    let lanes = Launch {
        body: lk_emu_body_shfl_semantics,
        grid: 1,
        threads: 32,
        smem: 0,
        n: 32,
        y_len: 32,
    };
    for cfg in orders() {
        // __shfl_xor_sync, width 16: "each group of width consecutive threads are able to access elements
        // from earlier groups of threads, however if they attempt to access elements from later groups of
        // threads their own value of var will be returned". Lane mask 16: lanes 16..31 read lanes 0..15 (an
        // earlier group), lanes 0..15 would read a later group and keep their own value.
        let y = run(&lanes, &cfg, 0, false).unwrap();
        for (l, v) in y.iter().enumerate() {
            let src = if l >= 16 { l - 16 } else { l };
            assert_eq!(*v, x(src), "{cfg:?} xor 16, lane {l}");
        }
        // lane mask 1 stays inside the group
        let y = run(&lanes, &cfg, 3, false).unwrap();
        assert!(y.iter().enumerate().all(|(l, v)| *v == x(l ^ 1)));
        // two shuffles with disjoint masks at once are legal: each half-warp reads its own lane 0
        let y = run(&lanes, &cfg, 1, false).unwrap();
        assert!(y.iter().enumerate().all(|(l, v)| *v == x(l / 16 * 16)));
        // a mask naming exited lanes: only the non-exited named lanes must participate
        let y = run(&lanes, &cfg, 2, false).unwrap();
        for (l, v) in y.iter().enumerate() {
            let want = if l < 15 {
                x(l + 1)
            } else if l == 15 {
                x(15)
            } else {
                f32::NAN
            };
            assert!(
                *v == want || (want.is_nan() && v.is_nan()),
                "{cfg:?} down, lane {l}: {v}"
            );
        }
    }
}

/// The unchecked emulator (what `Device::auto` falls back to) runs the same kernels to the same bits and
/// skips the checks: a planted out-of-bounds read passes it.
#[test]
fn unchecked_emulator_gives_the_same_bits_and_skips_the_checks() {
    use common::lora::{Layer, check, run};
    use lora_kernels::Device;
    use lora_kernels::reference::Dims;
    let mut rng = common::Rng::new(common::seed() ^ 0x51);
    let d = Dims {
        m: 70,
        n: 129,
        k: 65,
        r: 9,
    };
    let layer = Layer::<half::bf16>::random(&mut rng, d, 1.5, true);
    let checked = run(&Device::emulator(), &layer, true);
    let unchecked = run(&Device::emulator_unchecked(), &layer, true);
    check("unchecked emulator", &layer, &unchecked, 1e-2);
    assert_eq!(checked.bits(), unchecked.bits());
    assert!(
        Device::emulator_unchecked()
            .describe()
            .contains("access checks off")
    );

    let l = Launch {
        body: lk_emu_body_planted_oob_discarded,
        grid: 2,
        threads: 64,
        smem: 0,
        n: 100,
        y_len: 100,
    };
    let off = EmuConfig {
        checks: false,
        ..EmuConfig::default()
    };
    assert!(self::run(&l, &EmuConfig::default(), 1, false).is_err());
    self::run(&l, &off, 1, false).expect("with checks off the discarded read is not reported");
}

/// The mbarrier + bulk-copy ring of tests/kernels/planted_pipeline.cu (lk_mbarrier.cuh): clean and right
/// under every order (with spurious try_wait failures), and each planted protocol bug caught.
#[test]
fn mbarrier_pipeline_protocol_bugs_are_caught() {
    let tiles = 5;
    let want = |c: usize| {
        let o = (c + 32) % 64;
        (0..tiles)
            .map(|t| (0..4).map(|j| x(t * 256 + 4 * o + j)).sum::<f32>())
            .sum()
    };
    // consumers that do not wait may run ahead of the producer by whole phases of the empty barriers,
    // which then deadlocks the producer (its parity names a phase long gone)
    let race: &[&str] = &["shared-memory race|deadlock"];
    check_each(
        Launch {
            body: lk_emu_body_planted_pipeline_mbarrier,
            grid: 2,
            threads: 96,
            smem: 2 * 1024 + 48 + 16,
            n: 256 * tiles,
            y_len: 64,
        },
        want,
        &[
            (1, race),
            (
                2,
                &[
                    "deadlock",
                    "tx-count of 16 bytes",
                    "more bytes than the bulk copies delivered",
                ],
            ),
            (3, race),
            (
                4,
                &[
                    "write-after-read, by an async copy",
                    "no happens-before order",
                ],
            ),
            (5, &["mbarrier.init"]),
            (6, race),
            (7, &["hold an mbarrier"]),
            (8, &["the block ended with 1 bulk copies in flight"]),
            (9, race),
        ],
    );
}
