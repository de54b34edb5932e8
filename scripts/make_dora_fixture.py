#!/usr/bin/env python3
"""Makes tests/fixtures/peft/dora: a DoRA adapter saved by PEFT and PEFT's own merge of it.

Not run by the tests or CI (it needs PyTorch and PEFT, which the crate does not): the files it wrote
are committed, with the versions that made them in tests/fixtures/peft/PROVENANCE.md. Rerun:

    python3 -m venv /tmp/peft-env && /tmp/peft-env/bin/pip install torch==2.15.0 peft==0.21.2 safetensors
    /tmp/peft-env/bin/python scripts/make_dora_fixture.py tests/fixtures/peft/base.safetensors tests/fixtures/peft/dora

The base is the plain-LoRA fixture's tiny llama-shaped bf16 checkpoint. The adapter: r = 8,
lora_alpha = 16, use_dora, target q_proj, v_proj, up_proj, down_proj, with alpha_pattern down_proj = 4
(a second scale) and rank_pattern v_proj = 5 (a rank that is not a multiple of 8). PEFT initialises
lora_B to 0 and the magnitude vector to the row norms of W0, so both are changed here (B random, the
magnitude scaled by 1 + 0.25·N(0, 1)) so that the merge moves every weight.

Written:
- adapter/: `PeftModel.save_pretrained` (adapter_config.json, adapter_model.safetensors, f32 tensors:
  lora_A.weight, lora_B.weight and the 1-D lora_magnitude_vector per module).
- merged.safetensors: `merge_and_unload()` of it, bf16, every tensor of the base.
- dora_factor.safetensors: per module, PEFT's `magnitude / weight_norm` (f32, [out]), the row factor
  that its merge multiplies W0 + s·B·A by (variants.DoraLinearVariant.merge_safe), computed with PEFT's
  own `get_weight_norm`.
"""
import json
import sys
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn


class Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, n, nn.Linear(h, h, bias=False))


class Mlp(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)


class Layer(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.self_attn = Attn(h)
        self.mlp = Mlp(h, i)


class Inner(nn.Module):
    def __init__(self, h, i, layers):
        super().__init__()
        self.layers = nn.ModuleList([Layer(h, i) for _ in range(layers)])


class Model(nn.Module):
    def __init__(self, h, i, layers):
        super().__init__()
        self.model = Inner(h, i, layers)

    def forward(self, x):
        return x


def main():
    base_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(7)
    base = load_file(str(base_path))
    h = base["model.layers.0.self_attn.q_proj.weight"].shape[0]
    i = base["model.layers.0.mlp.up_proj.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in base)
    model = Model(h, i, layers).to(torch.bfloat16)
    model.load_state_dict(base, strict=True)

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_dora=True,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        alpha_pattern={"down_proj": 4},
        rank_pattern={"v_proj": 5},
        lora_dropout=0.0,
    )
    pm = get_peft_model(model, config)
    factors = {}
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if not hasattr(mod, "lora_magnitude_vector") or "default" not in mod.lora_magnitude_vector:
                continue
            mod.lora_B["default"].weight.normal_(0.0, 0.05)
            mag = mod.lora_magnitude_vector["default"].weight
            mag.mul_(1.0 + 0.25 * torch.randn_like(mag))
            # PEFT's own factor, as its merge computes it
            delta = mod.get_delta_weight("default")
            norm = mod.lora_magnitude_vector["default"].get_weight_norm(
                mod.get_base_layer().weight, delta, scaling=1
            )
            key = name.removeprefix("base_model.model.")
            factors[key] = (mag / norm).float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(out / "adapter"))
    merged = pm.merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(out / "merged.safetensors"))
    save_file(factors, str(out / "dora_factor.safetensors"))
    meta = {"torch": torch.__version__, "peft": peft.__version__, "seed": 7}
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
