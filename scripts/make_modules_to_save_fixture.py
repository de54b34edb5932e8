#!/usr/bin/env python3
"""Makes tests/fixtures/peft/modules_to_save: a sequence-classification LoRA adapter (PEFT's SEQ_CLS
task, which saves the `score` head whole) with more modules saved whole (`modules_to_save`), its base
checkpoint, and PEFT's merge of the adapter loaded onto that base.

Not run by the tests or CI (it needs PyTorch, transformers and PEFT, which the crate does not): the
files it wrote are committed, with the versions that made them in tests/fixtures/peft/PROVENANCE.md.
Rerun:

    python3 -m venv /tmp/peft-env && /tmp/peft-env/bin/pip install torch==2.15.0 peft==0.21.2 safetensors
    /tmp/peft-env/bin/python scripts/make_modules_to_save_fixture.py tests/fixtures/peft/modules_to_save

The base: transformers' `LlamaForSequenceClassification` of a local config (2 layers, hidden 64,
intermediate 96, 4 heads, vocabulary 40, 3 labels), random weights, bf16. The adapter: task_type
SEQ_CLS (PEFT adds `classifier` and `score` to `modules_to_save` itself), r = 8, lora_alpha = 16,
target q_proj and v_proj, `modules_to_save` ["embed_tokens", "norm"]: "norm" is a plain suffix in
PEFT's test, so it saves `model.norm` and every layer's `input_layernorm` and
`post_attention_layernorm` too. lora_B is random (PEFT initialises it to 0) and the saved copies are
changed, so the merge moves every tensor it touches; the `score` copy is made float32 with values that
bf16 cannot hold, so loading it onto the bf16 base rounds (PyTorch's copy into the base's parameter:
to nearest even), while the others stay bf16 (copied exactly).

Written:
- base.safetensors: the base checkpoint (bf16).
- adapter/: `PeftModel.save_pretrained` (adapter_config.json, adapter_model.safetensors: lora_A and
  lora_B f32, score.weight f32, the embeddings and norms bf16).
- merged.safetensors: a fresh bf16 base model, `PeftModel.from_pretrained(base, adapter)`, then
  `merge_and_unload()`: what a user of PEFT gets from these files; bf16, every tensor of the base.
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForSequenceClassification


def model(base):
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    m = LlamaForSequenceClassification(config).to(torch.bfloat16)
    if base is not None:
        m.load_state_dict(base, strict=True)
    return m


def state(m):
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(11)
    base = state(model(None))
    with torch.no_grad():
        # norms initialise to 1: random, so that a norm not replaced would show
        for k, v in base.items():
            if k.endswith("norm.weight"):
                v.copy_((1.0 + 0.1 * torch.randn_like(v.float())).to(torch.bfloat16))
    out.mkdir(parents=True, exist_ok=True)
    save_file(base, str(out / "base.safetensors"))

    config = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "norm"],
        lora_dropout=0.0,
    )
    pm = get_peft_model(model(base), config)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
            if hasattr(mod, "modules_to_save") and "default" in mod.modules_to_save:
                copy = mod.modules_to_save["default"]
                if name.endswith("score"):
                    copy.float()
                for p in copy.parameters():
                    p.add_((0.05 * torch.randn_like(p.float())).to(p.dtype))
    pm.save_pretrained(str(out / "adapter"))
    readme = out / "adapter" / "README.md"
    if readme.exists():
        readme.unlink()

    loaded = PeftModel.from_pretrained(model(base), str(out / "adapter"))
    merged = state(loaded.merge_and_unload())
    assert sorted(merged) == sorted(base), "the merge keeps the base's tensors"
    assert all(v.dtype == torch.bfloat16 for v in merged.values()), "PEFT's load keeps the base dtype"
    save_file(merged, str(out / "merged.safetensors"))
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "seed": 11,
    }
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
