//! Global-norm gradient clipping (`ops::GradClip`, kernels/grad_clip.cu) against the f64 reference:
//! the norm over several f32 gradients (sizes 1, 2^14 ± 1 around the kernel's chunk, several chunks,
//! empty tensors among them) within the f32 tolerance, the coefficient exactly
//! `min(1, max_norm / (norm + 1e-6))` of the device's norm, every gradient exactly `g · coef` after
//! (unchanged bits where the norm is within the bound); the same bits under the emulator's four thread
//! orders and on the GPU when present (fresh random data, the scratch filled by an earlier clip of other
//! data); NaN in a gradient makes the norm and every gradient NaN, as PyTorch's default does; bad input
//! refused with nothing changed; a clip captured into a graph replays on new gradients as it runs
//! eagerly.

mod common;

use common::Rng;
use lora_kernels::ops::{GradClip, clip_coefficient, grad_clip_reference};
use lora_kernels::{Device, Error, Tensor};

const TOL_F32: f64 = 1e-5;

fn upload(dev: &Device, grads: &[Vec<f32>]) -> Vec<Tensor<f32>> {
    grads
        .iter()
        .map(|g| Tensor::from_slice(dev, g, &[g.len()]).unwrap())
        .collect()
}

fn bits(ts: &[Tensor<f32>]) -> Vec<Vec<u32>> {
    ts.iter()
        .map(|t| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// Clips `grads` on `dev` with `clip` and checks it against the reference; returns (norm bits, grads'
/// bits after).
fn check(
    dev: &Device,
    clip: &mut GradClip,
    grads: &[Vec<f32>],
    what: &str,
) -> (u32, Vec<Vec<u32>>) {
    let mut ts = upload(dev, grads);
    clip.clip(&mut ts.iter_mut().collect::<Vec<_>>()).unwrap();
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let (want, _) = grad_clip_reference(&refs, clip.max_norm());
    let norm = clip.norm().unwrap();
    assert!(
        (norm as f64 - want).abs() <= TOL_F32 * want,
        "{what} on {dev:?}: norm {norm}, f64 reference {want}"
    );
    let coef = clip.coefficient().unwrap();
    assert_eq!(
        coef.to_bits(),
        clip_coefficient(norm, clip.max_norm()).to_bits(),
        "{what}: coefficient of norm {norm}"
    );
    if want > clip.max_norm() as f64 * 1.01 {
        assert!(coef < 1.0, "{what}: clipped");
    } else if want < clip.max_norm() as f64 * 0.99 {
        assert_eq!(coef, 1.0, "{what}: within the bound");
    }
    let got = bits(&ts);
    for (i, (g, b)) in grads.iter().zip(&got).enumerate() {
        let want: Vec<u32> = g.iter().map(|&v| (v * coef).to_bits()).collect();
        assert_eq!(b, &want, "{what}: gradient {i} after the clip");
    }
    (norm.to_bits(), got)
}

#[test]
fn clip_matches_reference_and_is_deterministic() {
    let sizes: [&[usize]; 4] = [
        &[1],
        &[3, 16385, 16383],
        &[70_001, 0, 5],
        &[32_768, 1, 40_000],
    ];
    let mut devices = common::emulators();
    devices.extend(common::gpu());
    for (j, s) in sizes.iter().enumerate() {
        for (k, &amplitude) in [1e-3, 0.05, 3.0].iter().enumerate() {
            let mut rng = Rng::new(0x6c1 + (j * 4 + k) as u64);
            let grads: Vec<Vec<f32>> = s.iter().map(|&n| rng.vec(n, amplitude)).collect();
            let mut first = None;
            for dev in &devices {
                // scratch sized by a larger clip first, so stale partial sums would show
                let mut clip = GradClip::new(dev, 1.0).unwrap();
                let mut other = upload(dev, &[rng.vec(100_000, 9.0)]);
                clip.clip(&mut other.iter_mut().collect::<Vec<_>>())
                    .unwrap();
                let got = check(
                    dev,
                    &mut clip,
                    &grads,
                    &format!("sizes {s:?} amplitude {amplitude}"),
                );
                match &first {
                    None => first = Some(got),
                    Some(f) => {
                        assert_eq!(&got, f, "{dev:?}: the same bits on every device and order")
                    }
                }
            }
        }
    }
}

#[test]
fn nonfinite_gradients_and_bad_input() {
    let dev = Device::emulator();
    let mut clip = GradClip::new(&dev, 1.0).unwrap();
    let mut g = vec![0.5f32; 40];
    g[17] = f32::NAN;
    let mut ts = upload(&dev, &[g, vec![0.25; 3]]);
    clip.clip(&mut ts.iter_mut().collect::<Vec<_>>()).unwrap();
    assert!(clip.norm().unwrap().is_nan() && clip.coefficient().unwrap().is_nan());
    for t in &ts {
        assert!(
            t.to_vec().unwrap().iter().all(|v| v.is_nan()),
            "NaN everywhere, as PyTorch"
        );
    }
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = GradClip::new(&dev, bad).unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutOfRange {
                    arg: "max_norm",
                    ..
                }
            ),
            "{bad}: {e}"
        );
        assert!(clip.set_max_norm(bad).is_err());
    }
    let e = clip.clip(&mut []).unwrap_err();
    assert!(e.to_string().contains("no gradients"), "{e}");
    let other = Device::emulator();
    let mut here = Tensor::from_slice(&dev, &[4.0f32; 8], &[8]).unwrap();
    let mut there = Tensor::from_slice(&other, &[4.0f32; 8], &[8]).unwrap();
    let e = clip.clip(&mut [&mut here, &mut there]).unwrap_err();
    assert!(
        matches!(e, Error::DeviceMismatch { arg: "grads", .. }),
        "{e}"
    );
    assert_eq!(here.to_vec().unwrap(), vec![4.0; 8], "nothing scaled");
}

#[test]
fn a_captured_clip_replays_on_new_gradients() {
    for dev in common::emulators().iter().take(2) {
        let mut rng = Rng::new(0x6c2);
        let first: Vec<Vec<f32>> = [300, 20_000].iter().map(|&n| rng.vec(n, 0.1)).collect();
        let second: Vec<Vec<f32>> = [300, 20_000].iter().map(|&n| rng.vec(n, 0.1)).collect();
        let mut clip = GradClip::new(dev, 1.0).unwrap();
        let mut ts = upload(dev, &first);
        clip.clip(&mut ts.iter_mut().collect::<Vec<_>>()).unwrap(); // warm-up: kernels, scratch
        let graph = dev
            .capture(|| clip.clip(&mut ts.iter_mut().collect::<Vec<_>>()))
            .unwrap();
        for (t, g) in ts.iter_mut().zip(&second) {
            t.copy_from_slice(g).unwrap();
        }
        graph.replay().unwrap();
        let mut eager = GradClip::new(dev, 1.0).unwrap();
        let (norm, want) = check(dev, &mut eager, &second, "eager");
        assert_eq!(clip.norm().unwrap().to_bits(), norm);
        assert_eq!(bits(&ts), want, "{dev:?}: the replay's clip");
    }
}

/// The trainer's use: two layers' gradients (`LoraLinear::grads_mut`) clipped together before their
/// optimizer steps, each scaled by the one coefficient of their global norm.
#[test]
fn two_layers_gradients_clipped_together() {
    use half::bf16;
    use lora_kernels::ops::{AdamW, GradMode};
    use lora_kernels::{LoraConfig, LoraLinear};
    let dev = Device::emulator();
    let (m, n, k, r) = (8, 24, 16, 4);
    let mut rng = Rng::new(0x6c3);
    let x = Tensor::from_slice(&dev, &rng.vec::<bf16>(m * k, 1.0), &[m, k]).unwrap();
    let dy = Tensor::from_slice(&dev, &rng.vec::<bf16>(m * n, 1.0), &[m, n]).unwrap();
    let mut layers: Vec<LoraLinear<bf16, f32>> = (0..2u64)
        .map(|i| {
            let w0 = Tensor::from_slice(&dev, &rng.vec::<bf16>(n * k, 0.5), &[n, k]).unwrap();
            let mut l = LoraLinear::with_f32_adapters(w0, None).unwrap();
            l.add_adapter("task", LoraConfig::new(r, 16.0), i).unwrap();
            l.train_forward(&x).unwrap();
            l.train_backward(&x, &dy, GradMode::Overwrite, false)
                .unwrap();
            l
        })
        .collect();
    // every layer's dA and dB, downloaded
    let all_grads = |layers: &[LoraLinear<bf16, f32>]| -> Vec<Vec<f32>> {
        layers
            .iter()
            .flat_map(|l| {
                let (a, b) = l.grads().unwrap();
                [a.to_vec().unwrap(), b.to_vec().unwrap()]
            })
            .collect()
    };
    let before = all_grads(&layers);
    let mut clip = GradClip::new(&dev, 1e-3).unwrap();
    {
        let (l0, l1) = layers.split_at_mut(1);
        let (a0, b0) = l0[0].grads_mut().unwrap();
        let (a1, b1) = l1[0].grads_mut().unwrap();
        clip.clip(&mut [a0, b0, a1, b1]).unwrap();
    }
    let refs: Vec<&[f32]> = before.iter().map(|g| g.as_slice()).collect();
    let (want, _) = grad_clip_reference(&refs, 1e-3);
    let (norm, coef) = (clip.norm().unwrap(), clip.coefficient().unwrap());
    assert!(
        (norm as f64 - want).abs() <= TOL_F32 * want && coef < 1.0,
        "{norm} {want} {coef}"
    );
    let after = all_grads(&layers);
    for (b, a) in before.iter().zip(&after) {
        let scaled: Vec<f32> = b.iter().map(|v| v * coef).collect();
        assert_eq!(a, &scaled);
    }
    for l in &mut layers {
        l.optimizer_step(&AdamW::default()).unwrap();
    }
}

/// More partial sums than the coefficient kernel's 32 threads (each then adds several, strided), and
/// every tensor empty (norm 0, coefficient 1, eagerly and in a graph).
#[test]
fn many_partials_and_all_empty_gradients() {
    let dev = Device::emulator();
    let mut rng = Rng::new(0x6c4);
    // 40 tensors of 2^14 + 1 elements: 80 partial sums, each thread of the coefficient kernel adds 2 or 3
    let grads: Vec<Vec<f32>> = (0..40).map(|_| rng.vec(16_385, 0.02)).collect();
    let mut clip = GradClip::new(&dev, 2.0).unwrap();
    check(&dev, &mut clip, &grads, "80 partial sums");
    let mut empty = upload(&dev, &[vec![], vec![]]);
    clip.clip(&mut empty.iter_mut().collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        (clip.norm().unwrap(), clip.coefficient().unwrap()),
        (0.0, 1.0)
    );
    let graph = dev
        .capture(|| clip.clip(&mut empty.iter_mut().collect::<Vec<_>>()))
        .unwrap();
    graph.replay().unwrap();
    assert_eq!(
        (clip.norm().unwrap(), clip.coefficient().unwrap()),
        (0.0, 1.0)
    );
}
