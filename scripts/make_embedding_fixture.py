#!/usr/bin/env python3
"""Makes tests/fixtures/peft/embedding: LoRA and DoRA adapters that target an embedding layer
(`lora_embedding_A` / `lora_embedding_B`) beside linear ones, and PEFT's merges of them.

Not run by the tests or CI (it needs PyTorch, transformers and PEFT, which the crate does not): the
files it wrote are committed, with the versions that made them in tests/fixtures/peft/PROVENANCE.md.
Rerun:

    python3 -m venv /tmp/peft-env && /tmp/peft-env/bin/pip install torch==2.15.0 peft==0.21.2 safetensors
    /tmp/peft-env/bin/python scripts/make_embedding_fixture.py tests/fixtures/peft/embedding

The base: transformers' `LlamaModel` of a local config (2 layers, hidden 64, intermediate 96, 4 heads,
vocabulary 72), random weights, bf16. The adapters: r = 8, lora_alpha = 16, target embed_tokens, q_proj
and v_proj, rank_pattern embed_tokens = 5, alpha_pattern embed_tokens = 4; A and B random (PEFT
initialises an embedding's lora_embedding_A to 0 and a linear lora_B to 0); the DoRA one (`use_dora`)
with its magnitudes scaled by 1 + 0.25·N(0, 1).

Written:
- base.safetensors: the base (bf16).
- adapter/, merged.safetensors: the LoRA adapter (`save_pretrained`) and `merge_and_unload()` of it.
- dora_adapter/, dora_merged.safetensors: the same for the DoRA adapter.
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaModel


def model(base):
    config = LlamaConfig(
        vocab_size=72,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    m = LlamaModel(config).to(torch.bfloat16)
    if base is not None:
        m.load_state_dict(base, strict=True)
    return m


def state(m):
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def adapter(base, out, name, use_dora):
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        rank_pattern={"embed_tokens": 5},
        alpha_pattern={"embed_tokens": 4},
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    pm = get_peft_model(model(base), config)
    with torch.no_grad():
        for _, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
            if hasattr(mod, "lora_embedding_A") and "default" in mod.lora_embedding_A:
                mod.lora_embedding_A["default"].normal_(0.0, 0.5)
                mod.lora_embedding_B["default"].normal_(0.0, 0.05)
            if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                mag = mod.lora_magnitude_vector["default"].weight
                mag.mul_(1.0 + 0.25 * torch.randn_like(mag))
    pm.save_pretrained(str(out / name))
    readme = out / name / "README.md"
    if readme.exists():
        readme.unlink()
    return state(pm.merge_and_unload())


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(17)
    base = state(model(None))
    out.mkdir(parents=True, exist_ok=True)
    save_file(base, str(out / "base.safetensors"))
    save_file(adapter(base, out, "adapter", False), str(out / "merged.safetensors"))
    save_file(adapter(base, out, "dora_adapter", True), str(out / "dora_merged.safetensors"))
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "seed": 17,
    }
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
