#!/usr/bin/env python3
"""Makes tests/fixtures/peft/modules_to_save: a LoRA adapter with modules saved whole
(`modules_to_save`), its base checkpoint, and PEFT's merge of the adapter loaded onto that base.

Not run by the tests or CI (it needs PyTorch and PEFT, which the crate does not): the files it wrote
are committed, with the versions that made them in tests/fixtures/peft/PROVENANCE.md. Rerun:

    python3 -m venv /tmp/peft-env && /tmp/peft-env/bin/pip install torch==2.15.0 peft==0.21.2 safetensors
    /tmp/peft-env/bin/python scripts/make_modules_to_save_fixture.py tests/fixtures/peft/base.safetensors tests/fixtures/peft/modules_to_save

The base is the plain-LoRA fixture's tiny llama-shaped bf16 checkpoint plus what a sequence
classifier with trained embeddings has: `model.embed_tokens` (40 × 64) and a `score` head (3 × 64,
with a bias), bf16, random. The adapter: r = 8, lora_alpha = 16, target q_proj and v_proj,
`modules_to_save` ["score", "embed_tokens"] (what PEFT's SEQ_CLS task adds, and the usual way of
training new tokens' embeddings). lora_B is random (PEFT initialises it to 0) and the saved copies are
changed, so the merge moves every weight it touches; the `score` copy is made float32 with values that
bf16 cannot hold, so loading it onto the bf16 base rounds (as PyTorch's copy into the base's parameter
does), while `embed_tokens` stays bf16 (copied exactly).

Written:
- base.safetensors: the base checkpoint (bf16).
- adapter/: `PeftModel.save_pretrained` (adapter_config.json, adapter_model.safetensors: lora_A and
  lora_B f32, score.weight and score.bias f32, model.embed_tokens.weight bf16).
- merged.safetensors: a fresh bf16 base model, `PeftModel.from_pretrained(base, adapter)`, then
  `merge_and_unload()`: what a user of PEFT gets from these files; bf16, every tensor of the base.
"""
import json
import sys
from pathlib import Path

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
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
    def __init__(self, h, i, layers, vocab):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([Layer(h, i) for _ in range(layers)])


class Model(nn.Module):
    def __init__(self, h, i, layers, vocab, labels):
        super().__init__()
        self.model = Inner(h, i, layers, vocab)
        self.score = nn.Linear(h, labels, bias=True)

    def forward(self, x):
        return x


VOCAB, LABELS = 40, 3


def fresh(base, h, i, layers):
    model = Model(h, i, layers, VOCAB, LABELS).to(torch.bfloat16)
    model.load_state_dict(base, strict=True)
    return model


def main():
    base_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(11)
    base = load_file(str(base_path))
    h = base["model.layers.0.self_attn.q_proj.weight"].shape[0]
    i = base["model.layers.0.mlp.up_proj.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in base)
    base["model.embed_tokens.weight"] = torch.randn(VOCAB, h).to(torch.bfloat16)
    base["score.weight"] = (0.1 * torch.randn(LABELS, h)).to(torch.bfloat16)
    base["score.bias"] = (0.1 * torch.randn(LABELS)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(base.items())}, str(out / "base.safetensors"))

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score", "embed_tokens"],
        lora_dropout=0.0,
    )
    pm = get_peft_model(fresh(base, h, i, layers), config)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
        score = pm.base_model.model.score.modules_to_save["default"]
        score.float()
        score.weight.add_(0.01 * torch.randn_like(score.weight))
        score.bias.add_(0.01 * torch.randn_like(score.bias))
        embed = pm.base_model.model.model.embed_tokens.modules_to_save["default"]
        embed.weight.add_((0.1 * torch.randn_like(embed.weight.float())).to(torch.bfloat16))
    pm.save_pretrained(str(out / "adapter"))
    readme = out / "adapter" / "README.md"
    if readme.exists():
        readme.unlink()

    loaded = PeftModel.from_pretrained(fresh(base, h, i, layers), str(out / "adapter"))
    merged = loaded.merge_and_unload()
    state = {k: v.contiguous() for k, v in merged.state_dict().items()}
    assert all(v.dtype == torch.bfloat16 for v in state.values()), "PEFT's load keeps the base dtype"
    save_file(state, str(out / "merged.safetensors"))
    meta = {"torch": torch.__version__, "peft": peft.__version__, "seed": 11}
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
