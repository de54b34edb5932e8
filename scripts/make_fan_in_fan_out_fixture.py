#!/usr/bin/env python3
"""Makes tests/fixtures/peft/fan_in_fan_out: LoRA and DoRA adapters on a GPT-2-shaped model, whose
linear layers are transformers' `Conv1D` (weights stored in × out: PEFT's `fan_in_fan_out`), and PEFT's
merges of them.

Not run by the tests or CI (it needs PyTorch, transformers and PEFT, which the crate does not): the
files it wrote are committed, with the versions that made them in tests/fixtures/peft/PROVENANCE.md.
Rerun:

    python3 -m venv /tmp/peft-env && /tmp/peft-env/bin/pip install torch==2.15.0 peft==0.21.2 safetensors
    /tmp/peft-env/bin/python scripts/make_fan_in_fan_out_fixture.py tests/fixtures/peft/fan_in_fan_out

The base: `GPT2Model` of a local config (2 layers, n_embd 64, 4 heads, vocabulary 50, 32 positions),
random weights, bf16. Its Conv1D weights: attn.c_attn [64, 192], attn.c_proj [64, 64], mlp.c_fc
[64, 256], mlp.c_proj [256, 64] (in × out). The adapters: r = 8, lora_alpha = 16, `fan_in_fan_out`,
target c_attn, c_proj (both: attention's and the MLP's) and c_fc, with rank_pattern c_fc = 5; lora_B
random (PEFT initialises it to 0); the DoRA one (`use_dora`) with its magnitudes scaled by
1 + 0.25·N(0, 1).

Written:
- base.safetensors: the base (bf16).
- adapter/, merged.safetensors: the LoRA adapter (`save_pretrained`) and `merge_and_unload()` of it.
- dora_adapter/, dora_merged.safetensors: the same for the DoRA adapter.
- mixed/: an adapter of both kinds of layer, which PEFT saves with `fan_in_fan_out` false (the flag the
  last layer it wrapped, the Linear `score` head, needed): `GPT2ForSequenceClassification` of the same
  config with 3 labels (base.safetensors, bf16, seed 19), a LoRA with r = 4, lora_alpha = 8, target
  attn.c_proj (square Conv1D), c_fc (Conv1D) and score (nn.Linear), lora_B random (adapter/), and
  `merge_and_unload()` of it (merged.safetensors).
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model


def model(base):
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50, n_positions=32)
    m = GPT2Model(config).to(torch.bfloat16)
    if base is not None:
        m.load_state_dict(base, strict=True)
    return m


def state(m):
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def adapter(base, out, name, use_dora):
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj", "c_fc"],
        rank_pattern={"c_fc": 5},
        fan_in_fan_out=True,
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    pm = get_peft_model(model(base), config)
    with torch.no_grad():
        for _, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
            if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                mag = mod.lora_magnitude_vector["default"].weight
                mag.mul_(1.0 + 0.25 * torch.randn_like(mag))
    pm.save_pretrained(str(out / name))
    readme = out / name / "README.md"
    if readme.exists():
        readme.unlink()
    return state(pm.merge_and_unload())


def mixed(out):
    torch.manual_seed(19)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=50, n_positions=32, num_labels=3, pad_token_id=0
    )
    m = GPT2ForSequenceClassification(config).to(torch.bfloat16)
    base = state(m)
    out.mkdir(parents=True, exist_ok=True)
    save_file(base, str(out / "base.safetensors"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_proj", "c_fc", "score"], lora_dropout=0.0)
    pm = get_peft_model(m, lora)
    with torch.no_grad():
        for _, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
    pm.save_pretrained(str(out / "adapter"))
    readme = out / "adapter" / "README.md"
    if readme.exists():
        readme.unlink()
    save_file(state(pm.merge_and_unload()), str(out / "merged.safetensors"))


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(13)
    base = state(model(None))
    out.mkdir(parents=True, exist_ok=True)
    save_file(base, str(out / "base.safetensors"))
    save_file(adapter(base, out, "adapter", False), str(out / "merged.safetensors"))
    save_file(adapter(base, out, "dora_adapter", True), str(out / "dora_merged.safetensors"))
    mixed(out / "mixed")
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "seed": 13,
    }
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
