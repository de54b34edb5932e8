//! The main job: fine-tune a LoRA adapter on one linear layer with the fused kernels.
//!
//! Synthetic task whose answer is a low-rank change of W0: a teacher W* = W0 + ΔW with rank(ΔW) = 4;
//! the student is `LoraLinear` (frozen W0, trainable A and B at r = 8, PEFT init) trained with AdamW
//! on A and B only, loss ½·mean((Y − X·W*ᵀ)²). The loss must fall by orders of magnitude. Then the
//! adapter is merged into W0 and the merged layer's outputs are compared with the unmerged ones, and
//! a table shows trainable parameters, training memory vs full fine-tuning, and time per step.
//!
//! Runs on the GPU when one is usable, else on the CPU emulator with shapes it can run in under a
//! minute; it says which. `cargo run --release --example finetune`

use std::time::Instant;

use lora_kernels::memory::{self, full_finetune, lora_finetune, lora_saved_activations};
use lora_kernels::{Device, LoraConfig, LoraLinear, Result, Tensor, bf16};

/// splitmix64, uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn vec(&mut self, n: usize, amp: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * amp).collect()
    }
}

/// AdamW on an f32 master copy of one parameter tensor.
struct AdamW {
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}
impl AdamW {
    fn new(w: Vec<f32>) -> Self {
        let n = w.len();
        AdamW {
            w,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
    fn step(&mut self, grad: &[bf16], lr: f32, t: i32) {
        let (b1, b2, eps, wd) = (0.9f32, 0.999f32, 1e-8f32, 0.0f32);
        for (i, g) in grad.iter().enumerate() {
            let g = g.to_f32();
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let mh = self.m[i] / (1.0 - b1.powi(t));
            let vh = self.v[i] / (1.0 - b2.powi(t));
            self.w[i] -= lr * (mh / (vh.sqrt() + eps) + wd * self.w[i]);
        }
    }
    fn bf16(&self) -> Vec<bf16> {
        self.w.iter().map(|&v| bf16::from_f32(v)).collect()
    }
}

fn to_bf16(v: &[f64]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f64(x)).collect()
}

fn main() -> Result<()> {
    let (device, reason) = Device::auto_quiet();
    println!("device: {reason}");
    // (M tokens, N out, K in, steps): the emulator runs every CUDA thread as a CPU fiber, so it gets
    // a small layer; the GPU a realistic one.
    let (m, n, k, steps) = if device.is_cuda() {
        (4096, 2048, 2048, 300)
    } else {
        (128, 96, 128, 300)
    };
    let (r, r_true, alpha) = (8usize, 4usize, 16.0f32);
    println!(
        "layer: X {m}×{k}, W0 {n}×{k} (bf16, frozen); LoRA r = {r}, alpha = {alpha}; task: ΔW of rank {r_true}"
    );

    let mut rng = Rng(2026);
    let wk = 1.0 / (k as f64).sqrt();
    let w0 = rng.vec(n * k, wk);
    // Teacher: W* = W0 + U·V with U n×r_true, V r_true×k, |ΔW·x| comparable to |W0·x|.
    let (u, v) = (rng.vec(n * r_true, 1.0), rng.vec(r_true * k, wk));
    let mut w_star = w0.clone();
    for i in 0..n {
        for j in 0..k {
            w_star[i * k + j] += (0..r_true)
                .map(|q| u[i * r_true + q] * v[q * k + j])
                .sum::<f64>()
                * 0.5;
        }
    }
    let x = rng.vec(m * k, 1.0);
    let x16 = to_bf16(&x);
    // Targets Y* = X·W*ᵀ on the host in f64 (rounded inputs, as the device sees them).
    let xr: Vec<f64> = x16.iter().map(|v| v.to_f64()).collect();
    let target: Vec<f64> = (0..m * n)
        .map(|idx| {
            let (i, o) = (idx / n, idx % n);
            (0..k).map(|j| xr[i * k + j] * w_star[o * k + j]).sum()
        })
        .collect();

    let w0t = Tensor::from_slice(&device, &to_bf16(&w0), &[n, k])?;
    let mut layer = LoraLinear::new(w0t, None)?;
    let cfg = LoraConfig::new(r, alpha);
    layer.add_adapter("task", cfg, 7)?;
    let xt = Tensor::from_slice(&device, &x16, &[m, k])?;
    let a0: Vec<f32> = layer
        .adapter("task")
        .unwrap()
        .a
        .to_vec()?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let mut opt_a = AdamW::new(a0);
    let mut opt_b = AdamW::new(vec![0.0; n * r]);
    let mut dy_t = Tensor::<bf16>::zeros(&device, &[m, n])?;

    let mut losses = Vec::new();
    let start = Instant::now();
    for step in 1..=steps {
        let f = layer.forward(&xt)?;
        let y = f.y.to_vec()?;
        // loss = ½·mean((Y − Y*)²); dL/dY = (Y − Y*) / (M·N), scaled by M·N for bf16 range and
        // compensated in the learning rate (Adam is invariant to a constant gradient scale).
        let mut loss = 0.0;
        let mut dy = Vec::with_capacity(m * n);
        for (yv, tv) in y.iter().zip(&target) {
            let e = yv.to_f64() - tv;
            loss += 0.5 * e * e;
            dy.push(bf16::from_f64(e));
        }
        loss /= (m * n) as f64;
        losses.push(loss);
        dy_t.copy_from_slice(&dy)?;
        let g = layer.backward(&xt, &f.t, &dy_t, false)?;
        let lr = 1e-2 * (1.0 - 0.9 * step as f32 / steps as f32);
        opt_a.step(&g.da.to_vec()?, lr, step as i32);
        opt_b.step(&g.db.to_vec()?, lr, step as i32);
        let ad = layer.adapter_mut("task")?;
        ad.a.copy_from_slice(&opt_a.bf16())?;
        ad.b.copy_from_slice(&opt_b.bf16())?;
        if step == 1 || step % 25 == 0 {
            println!("step {step:4}  loss {loss:.3e}");
        }
    }
    device.synchronize()?;
    let per_step = start.elapsed().as_secs_f64() / steps as f64;
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("\nloss curve (log10, every {} steps):", steps / 12);
    for (i, l) in losses.iter().enumerate().step_by(steps / 12) {
        let bar = ((l.log10() - last.log10()) * 8.0).max(0.0) as usize;
        println!("  {i:4} {:>9.2e} {}", l, "#".repeat(bar.min(60)));
    }
    println!(
        "loss fell from {first:.3e} to {last:.3e} ({:.1} orders of magnitude)",
        (first / last).log10()
    );

    let before = layer.forward(&xt)?.y.to_vec()?;
    layer.merge()?;
    let after = layer.forward(&xt)?.y.to_vec()?;
    let (mut num, mut den) = (0.0, 0.0);
    for (a, b) in after.iter().zip(&before) {
        num += (a.to_f64() - b.to_f64()).powi(2);
        den += b.to_f64().powi(2);
    }
    println!(
        "merged layer vs unmerged: relative difference {:.2e} (bf16 rounding of the merged W0), merged = {}",
        (num / den).sqrt(),
        layer.is_merged()
    );

    let params = (n * k) as u64;
    let lora = (r * (n + k)) as u64;
    let (full_mem, lora_mem) = (full_finetune(params, 2), lora_finetune(params, lora, 2));
    let acts = lora_saved_activations(m, k, r, 2);
    println!("\n| this layer | full fine-tuning | LoRA r = {r} |");
    println!("| --- | --- | --- |");
    println!(
        "| trainable parameters | {} | {} |",
        memory::human(params),
        memory::human(lora)
    );
    println!(
        "| weights (bf16) | {} B | {} B |",
        memory::human(full_mem.weights),
        memory::human(lora_mem.weights)
    );
    println!(
        "| gradients (bf16) | {} B | {} B |",
        memory::human(full_mem.gradients),
        memory::human(lora_mem.gradients)
    );
    println!(
        "| Adam state (f32 m, v) | {} B | {} B |",
        memory::human(full_mem.adam_state),
        memory::human(lora_mem.adam_state)
    );
    println!(
        "| total | {} B | {} B |",
        memory::human(full_mem.total()),
        memory::human(lora_mem.total())
    );
    println!(
        "| saved activations (X, T) | {} B | {} B |",
        memory::human((m * k * 2) as u64),
        memory::human(acts)
    );
    println!(
        "| time per step, {} (forward + backward + host loss and AdamW) | n/a | {:.1} ms |",
        if device.is_cuda() { "GPU" } else { "emulator" },
        per_step * 1e3
    );
    if last > first * 1e-3 {
        eprintln!("the loss did not fall by three orders of magnitude");
        std::process::exit(1);
    }
    Ok(())
}
