//! The fused AdamW step (kernels/adamw.cu) against PyTorch's AdamW formula in f64 (an independent
//! reference), and against its CPU reference of the same f32 arithmetic: bit for bit,
//! over several steps, with and without the layer-dtype copy, on both emulator thread orders and the GPU
//! when present; and its bad inputs.

mod common;

use common::Rng;
use half::{bf16, f16};
use lora_kernels::ops::{self, AdamState, AdamW};
use lora_kernels::{Device, Element, Error, Tensor};
use proptest::prelude::*;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `steps` steps on `dev` from the same start as the reference; the weights, moments (and the copy)
/// must equal the reference's bits after every step. `scheduled`: the steps read their constants from
/// an `AdamwSchedule` on the device, advanced before each.
fn run_case<C: Element>(
    dev: &Device,
    hp: &AdamW,
    n: usize,
    steps: usize,
    (with_copy, scheduled): (bool, bool),
    stream: u64,
) {
    let mut rng = Rng::new(stream);
    let p0: Vec<f32> = rng.vec(n, 1.0);
    let mut param = Tensor::from_slice(dev, &p0, &[n]).unwrap();
    let mut state = AdamState::new(dev, &[n]).unwrap();
    let mut copy = Tensor::<C>::zeros(dev, &[n]).unwrap();
    let (mut rp, mut rm, mut rv) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let mut schedule = ops::AdamwSchedule::new(dev, *hp).unwrap();
    for step in 1..=steps {
        // gradients of varied magnitude, zeros included
        let g: Vec<f32> = rng
            .vec::<f32>(n, 1.0)
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if i % 17 == 3 {
                    0.0
                } else {
                    v * 10f32.powi((i % 7) as i32 - 3)
                }
            })
            .collect();
        let grad = Tensor::from_slice(dev, &g, &[n]).unwrap();
        copy.poison().unwrap();
        if scheduled {
            assert_eq!(schedule.advance().unwrap(), step as u64);
        }
        match (with_copy, scheduled) {
            (true, false) => {
                ops::adamw_step_with_copy(&mut param, &grad, &mut state, &mut copy, hp).unwrap()
            }
            (false, false) => ops::adamw_step(&mut param, &grad, &mut state, hp).unwrap(),
            (true, true) => ops::adamw_step_scheduled_with_copy(
                &mut param, &grad, &mut state, &mut copy, &schedule,
            )
            .unwrap(),
            (false, true) => {
                ops::adamw_step_scheduled(&mut param, &grad, &mut state, &schedule).unwrap()
            }
        }
        ops::adamw_reference_step(&mut rp, &mut rm, &mut rv, &g, &hp.constants(step as u64));
        // the schedule counts the scheduled steps; state.step the others
        assert_eq!(state.step, if scheduled { 0 } else { step as u64 });
        let got = param.to_vec().unwrap();
        assert!(
            bits(&got) == bits(&rp),
            "{dev:?} step {step} n {n} {hp:?}: weights differ from the reference"
        );
        assert!(
            bits(&state.m.to_vec().unwrap()) == bits(&rm),
            "{dev:?} step {step}: m differs"
        );
        assert!(
            bits(&state.v.to_vec().unwrap()) == bits(&rv),
            "{dev:?} step {step}: v differs"
        );
        if with_copy {
            let want: Vec<C> = rp.iter().map(|&w| C::from_f64(w as f64)).collect();
            assert!(
                copy.to_vec().unwrap() == want,
                "{dev:?} step {step}: the {} copy is not round(param)",
                C::DTYPE
            );
        }
        assert!(rp.iter().all(|w| w.is_finite()), "the reference diverged");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::proptest_cases(64),
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]

    /// Random sizes (1 to 3000: grid-stride tails), hyperparameters and 1 to 3 steps.
    #[test]
    fn adamw_matches_reference_bit_for_bit(
        n in 1..=3000usize,
        lr in 1e-5f32..1e-1,
        beta1 in 0.0f32..0.99,
        beta2 in 0.9f32..0.9999,
        eps in 1e-10f32..1e-4,
        weight_decay in 0.0f32..0.2,
        steps in 1..=3usize,
        copy in 0..3u8,
        scheduled in any::<bool>(),
        stream in any::<u64>(),
    ) {
        let hp = AdamW { lr, beta1, beta2, eps, weight_decay };
        for dev in common::all_devices() {
            match copy {
                0 => run_case::<bf16>(&dev, &hp, n, steps, (false, scheduled), stream),
                1 => run_case::<bf16>(&dev, &hp, n, steps, (true, scheduled), stream),
                _ => run_case::<f16>(&dev, &hp, n, steps, (true, scheduled), stream),
            }
        }
    }
}

/// Many steps in a row (bias correction far from its first values) stay bit-identical.
#[test]
fn many_steps_stay_bit_identical() {
    for scheduled in [false, true] {
        run_case::<bf16>(
            &common::emulators()[0],
            &AdamW::default(),
            1000,
            25,
            (true, scheduled),
            3,
        );
    }
}

/// A schedule must be advanced before its first step, and live on the parameter's device.
#[test]
fn a_schedule_at_step_0_or_on_another_device_is_an_error() {
    let dev = Device::emulator();
    let mut param = Tensor::<f32>::zeros(&dev, &[8]).unwrap();
    let grad = Tensor::<f32>::zeros(&dev, &[8]).unwrap();
    let mut state = AdamState::new(&dev, &[8]).unwrap();
    let mut schedule = ops::AdamwSchedule::new(&dev, AdamW::default()).unwrap();
    match ops::adamw_step_scheduled(&mut param, &grad, &mut state, &schedule) {
        Err(Error::InvalidState { message, .. }) => {
            assert!(message.contains("advance"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    schedule.advance().unwrap();
    ops::adamw_step_scheduled(&mut param, &grad, &mut state, &schedule).unwrap();
    let mut elsewhere = ops::AdamwSchedule::new(&Device::emulator(), AdamW::default()).unwrap();
    elsewhere.advance().unwrap();
    match ops::adamw_step_scheduled(&mut param, &grad, &mut state, &elsewhere) {
        Err(Error::DeviceMismatch {
            arg: "schedule", ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let bad = AdamW {
        lr: -1.0,
        ..AdamW::default()
    };
    assert!(matches!(
        schedule.set_hyperparameters(bad),
        Err(Error::OutOfRange { arg: "lr", .. })
    ));
}

/// One AdamW step in f64, written from PyTorch's documented algorithm (torch.optim.AdamW), not from the
/// kernel: θ ← θ − γλθ; m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²; m̂ = m/(1 − β1^t);
/// v̂ = v/(1 − β2^t); θ ← θ − γ·m̂/(√v̂ + ε).
fn pytorch_adamw_f64(
    hp: &AdamW,
    t: i32,
    theta: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f32],
) {
    let (lr, b1, b2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
    let (eps, wd) = (hp.eps as f64, hp.weight_decay as f64);
    for i in 0..theta.len() {
        let g = g[i] as f64;
        theta[i] -= lr * wd * theta[i];
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let (m_hat, v_hat) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
        theta[i] -= lr * m_hat / (v_hat.sqrt() + eps);
    }
}

/// The kernel against the f64 formula above (an independent reference: `adamw_reference_step` is the
/// kernel's own f32 arithmetic, which a formula mistake made in both would pass): each step starts the
/// f64 step from the kernel's f32 state, so rounding does not accumulate, and the kernel's m and v must be
/// within 1e-6 (relative norm) and its update θ_t − θ_{t−1} within 1e-3 (f32 rounding of θ against an
/// update of about lr) of the formula's, over 25 steps (bias corrections from their first values on);
/// an ε of the order of √v̂ and a large weight decay, where their placement matters.
#[test]
fn adamw_follows_the_pytorch_formula_in_f64() {
    use lora_kernels::reference::relative_error;
    let dev = &common::emulators()[0];
    let n = 777;
    for (i, hp) in [
        AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        AdamW {
            lr: 3e-2,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-2,
            weight_decay: 0.5,
        },
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::new(0xada + i as u64);
        let mut param = Tensor::from_slice(dev, &rng.vec::<f32>(n, 1.0), &[n]).unwrap();
        let mut state = AdamState::new(dev, &[n]).unwrap();
        for t in 1..=25 {
            let g: Vec<f32> = rng
                .vec::<f32>(n, 1.0)
                .iter()
                .enumerate()
                .map(|(j, &v)| v * 10f32.powi((j % 5) as i32 - 2))
                .collect();
            let f64s = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
            let before = f64s(param.to_vec().unwrap());
            let (mut theta, mut m, mut v) = (
                before.clone(),
                f64s(state.m.to_vec().unwrap()),
                f64s(state.v.to_vec().unwrap()),
            );
            pytorch_adamw_f64(hp, t, &mut theta, &mut m, &mut v, &g);
            let grad = Tensor::from_slice(dev, &g, &[n]).unwrap();
            ops::adamw_step(&mut param, &grad, &mut state, hp).unwrap();
            let got = param.to_vec().unwrap();
            let step_got: Vec<f32> = got
                .iter()
                .zip(&before)
                .map(|(&a, &b)| (a as f64 - b) as f32)
                .collect();
            let step_want: Vec<f64> = theta.iter().zip(&before).map(|(a, b)| a - b).collect();
            let what = format!("{hp:?} step {t}");
            let em = relative_error(&state.m.to_vec().unwrap(), &m);
            let ev = relative_error(&state.v.to_vec().unwrap(), &v);
            let eu = relative_error(&step_got, &step_want);
            assert!(
                em <= 1e-6 && ev <= 1e-6,
                "{what}: m error {em:e}, v error {ev:e}"
            );
            assert!(eu <= 1e-3, "{what}: update error {eu:e}");
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let d = Device::emulator();
    let mut param = Tensor::<f32>::zeros(&d, &[4, 3]).unwrap();
    let grad = Tensor::<f32>::zeros(&d, &[4, 3]).unwrap();
    let mut state = AdamState::new(&d, &[4, 3]).unwrap();
    let hp = AdamW::default();
    let e = ops::adamw_step(
        &mut param,
        &Tensor::<f32>::zeros(&d, &[3, 4]).unwrap(),
        &mut state,
        &hp,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "grad", .. }), "{e}");
    let mut small = AdamState::new(&d, &[12]).unwrap();
    let e = ops::adamw_step(&mut param, &grad, &mut small, &hp).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "state.m", .. }), "{e}");
    let mut copy = Tensor::<bf16>::zeros(&d, &[12]).unwrap();
    let e = ops::adamw_step_with_copy(&mut param, &grad, &mut state, &mut copy, &hp).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "copy", .. }), "{e}");
    let mut copy32 = Tensor::<f32>::zeros(&d, &[4, 3]).unwrap();
    let e = ops::adamw_step_with_copy(&mut param, &grad, &mut state, &mut copy32, &hp).unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedDType { arg: "copy", .. }),
        "{e}"
    );
    for (bad, arg) in [
        (AdamW { lr: f32::NAN, ..hp }, "lr"),
        (AdamW { lr: -1.0, ..hp }, "lr"),
        (AdamW { beta1: 1.0, ..hp }, "beta1"),
        (AdamW { beta2: -0.1, ..hp }, "beta2"),
        (AdamW { eps: 0.0, ..hp }, "eps"),
        (
            AdamW {
                weight_decay: f32::INFINITY,
                ..hp
            },
            "weight_decay",
        ),
    ] {
        let e = ops::adamw_step(&mut param, &grad, &mut state, &bad).unwrap_err();
        assert!(
            matches!(e, Error::OutOfRange { arg: a, .. } if a == arg),
            "{arg}: {e}"
        );
    }
    assert_eq!(state.step, 0, "a refused step counted");
}
