//! The L2 read probe (kernels/l2_probe.cu, src/probe.rs): every thread's wrapping sum against the CPU
//! reference, on the emulators and the GPU if present, for buffers around the grid's size (fewer words
//! than threads, one each, the four-load loop's remainder), several passes; its argument checks.

mod common;

use common::Rng;
use lora_kernels::probe::{l2_read, l2_read_reference};
use lora_kernels::{Device, Error, Tensor};

fn words(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.next_u64() as u32).collect()
}

fn check(device: &Device, rng: &mut Rng, words16: usize, threads: usize, passes: u32) {
    let src = words(rng, 4 * words16);
    let t = Tensor::from_slice(device, &src, &[4 * words16]).unwrap();
    let mut sums = Tensor::<u32>::zeros(device, &[threads]).unwrap();
    sums.poison().unwrap();
    l2_read(&t, passes, &mut sums).unwrap();
    let got = sums.to_vec().unwrap();
    let want = l2_read_reference(&src, passes, threads);
    if let Some(g) = (0..threads).find(|&g| got[g] != want[g]) {
        panic!(
            "{device:?}: {words16} words, {threads} threads, {passes} passes: thread {g} wrote {:#x}, \
             expected {:#x}",
            got[g], want[g]
        );
    }
}

#[test]
fn l2_read_sums_match_the_reference() {
    let mut rng = Rng::new(common::seed() ^ 0x12);
    for device in common::all_devices() {
        // threads 256 or 512: fewer words than threads, exactly one each, 4·threads ± 1 (the
        // four-load loop and its remainder), several laps
        for (words16, threads, passes) in [
            (1, 256, 1),
            (100, 256, 3),
            (256, 256, 2),
            (1023, 256, 1),
            (1025, 256, 5),
            (2047, 512, 2),
            (2049, 512, 1),
            (9001, 512, 4),
        ] {
            check(&device, &mut rng, words16, threads, passes);
        }
        if let Ok(sms) = device.sm_count() {
            // the perf table's shape: a few blocks per SM, a buffer of many laps
            check(&device, &mut rng, 64 * 1024 + 3, 1024 * sms as usize, 2);
        }
    }
}

#[test]
fn l2_read_refuses_bad_arguments() {
    let device = Device::emulator();
    let src = Tensor::<u32>::zeros(&device, &[64]).unwrap();
    let mut sums = Tensor::<u32>::zeros(&device, &[256]).unwrap();
    let odd = Tensor::<u32>::zeros(&device, &[63]).unwrap();
    assert!(matches!(
        l2_read(&odd, 1, &mut sums),
        Err(Error::Shape { arg: "src", .. })
    ));
    let mut few = Tensor::<u32>::zeros(&device, &[100]).unwrap();
    assert!(matches!(
        l2_read(&src, 1, &mut few),
        Err(Error::Shape { arg: "sums", .. })
    ));
    for passes in [0, (1 << 20) + 1] {
        let e = l2_read(&src, passes, &mut sums).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { arg: "passes", .. }), "{e}");
    }
    let mut big = Tensor::<u32>::zeros(&device, &[(1 << 24) + 256]).unwrap();
    assert!(matches!(
        l2_read(&src, 1, &mut big),
        Err(Error::TooLarge { arg: "sums", .. })
    ));
}
