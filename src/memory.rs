//! Training-memory accounting, LoRA vs full fine-tuning: trainable parameters, their gradients, Adam
//! state, frozen weights and saved activations, per layer and for a whole model. Pure arithmetic on
//! the shapes (used by the CLI's `plan`, the finetune example and the benchmark table); the GPU check
//! compares it with the device's free memory around a training step.

/// A model given by the dimensions that matter for LoRA on its attention projections (the LoRA paper's
/// setting) plus its total parameter count.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub layers: usize,
    pub d_model: usize,
    /// Every parameter of the model (embeddings, MLPs, ...), for its full size.
    pub total_params: u64,
    /// Adapted projections per layer, each (out, in). W_q and W_v: two d_model × d_model.
    pub targets: Vec<(usize, usize)>,
}

impl ModelConfig {
    /// GPT-3 175B as in the LoRA paper: 96 layers, d_model 12288, adapting W_q and W_v.
    pub fn gpt3_175b() -> Self {
        ModelConfig {
            name: "gpt3-175b".into(),
            layers: 96,
            d_model: 12288,
            total_params: 175_000_000_000,
            targets: vec![(12288, 12288), (12288, 12288)],
        }
    }

    /// A model given by its dimensions, adapting W_q and W_v (d_model × d_model each).
    pub fn custom(layers: usize, d_model: usize, total_params: u64) -> Self {
        ModelConfig {
            name: format!("custom ({layers} layers, d_model {d_model})"),
            layers,
            d_model,
            total_params,
            targets: vec![(d_model, d_model), (d_model, d_model)],
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "gpt3-175b" | "gpt3" => Some(Self::gpt3_175b()),
            _ => None,
        }
    }

    /// Trainable LoRA parameters at rank r: r·(out + in) per adapted matrix, over every layer; `None`
    /// when that count does not fit in 64 bits.
    pub fn lora_params(&self, r: usize) -> Option<u64> {
        let per_layer = self.targets.iter().try_fold(0u64, |acc, &(n, k)| {
            let per = (n as u64).checked_add(k as u64)?.checked_mul(r as u64)?;
            acc.checked_add(per)
        })?;
        per_layer.checked_mul(self.layers as u64)
    }
}

/// Bytes of one training configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainingMemory {
    pub trainable_params: u64,
    /// All weights as stored (frozen + trainable), in the weight dtype.
    pub weights: u64,
    /// Gradients of the trainable parameters, in the weight dtype.
    pub gradients: u64,
    /// Adam's two moments, f32, per trainable parameter.
    pub adam_state: u64,
}

impl TrainingMemory {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.adam_state
    }
}

/// Full fine-tuning of `params` weights stored with `dtype_bytes` per element.
pub fn full_finetune(params: u64, dtype_bytes: u64) -> TrainingMemory {
    TrainingMemory {
        trainable_params: params,
        weights: params * dtype_bytes,
        gradients: params * dtype_bytes,
        adam_state: params * 8,
    }
}

/// LoRA: `params` frozen weights plus `lora` trainable ones, same dtype.
pub fn lora_finetune(params: u64, lora: u64, dtype_bytes: u64) -> TrainingMemory {
    TrainingMemory {
        trainable_params: lora,
        weights: (params + lora) * dtype_bytes,
        gradients: lora * dtype_bytes,
        adam_state: lora * 8,
    }
}

/// Activations one LoRA layer saves for its backward: X (M×K) and T (M×r), in the layer dtype.
/// Full fine-tuning of the same layer saves X only.
pub fn lora_saved_activations(m: usize, k: usize, r: usize, dtype_bytes: u64) -> u64 {
    (m * (k + r)) as u64 * dtype_bytes
}

/// Device bytes one training step of one layer (M tokens, an N×K weight, rank r) adds to what is
/// already resident (the input X, the frozen W0, the incoming gradient dY): the trainable parameters,
/// their gradients, Adam's two f32 moments, the activation the backward keeps beyond X (LoRA: T),
/// and the step's outputs Y and dX. The benchmark table measures the same step on the GPU (device free
/// memory before and after) and prints both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerStep {
    pub params: u64,
    pub gradients: u64,
    pub adam_state: u64,
    pub saved: u64,
    pub outputs: u64,
}

impl LayerStep {
    pub fn total(&self) -> u64 {
        self.params + self.gradients + self.adam_state + self.saved + self.outputs
    }

    /// LoRA: A (r×K) and B (N×r) are the new parameters.
    pub fn lora(m: usize, n: usize, k: usize, r: usize, dtype_bytes: u64) -> Self {
        let frozen = (n * k) as u64;
        let mem = lora_finetune(frozen, (r * (n + k)) as u64, dtype_bytes);
        LayerStep {
            params: mem.weights - frozen * dtype_bytes,
            gradients: mem.gradients,
            adam_state: mem.adam_state,
            saved: lora_saved_activations(m, k, r, dtype_bytes) - (m * k) as u64 * dtype_bytes,
            outputs: (m * (n + k)) as u64 * dtype_bytes,
        }
    }

    /// Full fine-tuning: W0 itself is trained (already resident), so dW and its Adam state are new.
    pub fn full(m: usize, n: usize, k: usize, dtype_bytes: u64) -> Self {
        let mem = full_finetune((n * k) as u64, dtype_bytes);
        LayerStep {
            params: 0,
            gradients: mem.gradients,
            adam_state: mem.adam_state,
            saved: 0,
            outputs: (m * (n + k)) as u64 * dtype_bytes,
        }
    }
}

/// "37.7M", "4.7M", "350.0G": the paper's way of writing counts and sizes (powers of 1000).
pub fn human(v: u64) -> String {
    let v = v as f64;
    for (unit, scale) in [("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)] {
        if v >= scale {
            return format!("{:.1}{unit}", v / scale);
        }
    }
    format!("{v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LoRA paper's figures for GPT-3 175B with W_q and W_v adapted (Section 4.2 / 7).
    #[test]
    fn reproduces_the_papers_gpt3_figures() {
        let g = ModelConfig::gpt3_175b();
        assert_eq!(g.lora_params(1), Some(4_718_592)); // "4.7M"
        assert_eq!(human(g.lora_params(1).unwrap()), "4.7M");
        assert_eq!(human(g.lora_params(8).unwrap()), "37.7M");
        // r = 4: the fp16 adapter is 37.7 MB (the paper rounds it to 35 MB) vs a 350 GB fp16 model.
        assert_eq!(human(g.lora_params(4).unwrap() * 2), "37.7M");
        assert_eq!(human(g.total_params * 2), "350.0G");
    }

    #[test]
    fn lora_needs_no_optimizer_state_for_w0() {
        let full = full_finetune(1_000_000, 2);
        let lora = lora_finetune(1_000_000, 10_000, 2);
        assert_eq!(full.total(), 2_000_000 + 2_000_000 + 8_000_000);
        assert_eq!(lora.total(), 2_020_000 + 20_000 + 80_000);
        assert!(lora.total() * 5 < full.total());
    }

    /// The headline layer (M 8192, N = K = 4096, r 16, bf16), by hand: LoRA adds 131 072 trainable
    /// parameters; full fine-tuning's dW and Adam state are 16.8M elements × (2 + 8) bytes.
    #[test]
    fn layer_step_by_hand() {
        let lora = LayerStep::lora(8192, 4096, 4096, 16, 2);
        assert_eq!(lora.params, 2 * 16 * 8192);
        assert_eq!(lora.gradients, 2 * 16 * 8192);
        assert_eq!(lora.adam_state, 8 * 16 * 8192);
        assert_eq!(lora.saved, 2 * 8192 * 16);
        assert_eq!(lora.outputs, 2 * 2 * 8192 * 4096);
        let full = LayerStep::full(8192, 4096, 4096, 2);
        assert_eq!(full.gradients, 2 * 4096 * 4096);
        assert_eq!(full.adam_state, 8 * 4096 * 4096);
        assert_eq!(full.total(), 10 * 4096 * 4096 + 4 * 8192 * 4096);
        assert!(lora.total() < full.total());
    }
}
