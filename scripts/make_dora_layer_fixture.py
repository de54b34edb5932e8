#!/usr/bin/env python3
"""Makes tests/fixtures/peft/dora_layer: PEFT's own unmerged DoRA layer, forward and gradients.

Not run by the tests or CI (it needs PyTorch and PEFT, which the crate does not): the files it wrote
are committed, with the versions that made them in tests/fixtures/peft/PROVENANCE.md. Rerun:

    python3 -m venv /tmp/peft-env && /tmp/peft-env/bin/pip install torch==2.15.0 peft==0.21.2 safetensors
    /tmp/peft-env/bin/python scripts/make_dora_layer_fixture.py tests/fixtures/peft/dora_layer

Two cases, each one nn.Linear wrapped by PEFT with `use_dora` (no dropout), in train mode, in float64
so that PEFT's numbers are the exact ones up to f64 rounding:
- case0: in 24, out 40, bias, r = 8, lora_alpha = 16 (scale 2);
- case1: in 33, out 17, no bias, r = 3, lora_alpha = 6 with use_rslora (scale 6/sqrt(3)).
X is [3, 7, in] (leading dimensions, M = 21). The inputs are rounded first to what the crate's layer
takes: X, W0, bias and dY to bf16 values, lora_A, lora_B and the magnitude to f32 values. PEFT
initialises lora_B to 0 and the magnitude to W0's row norms, so both are changed (B random, the
magnitude scaled by 1 + 0.25·N(0, 1)).

Written, per case (prefix `caseN.`): inputs x, w0, bias (case0), dy as BF16, lora_A, lora_B, magnitude
as F32; PEFT's outputs y (the layer's forward), and after `y.backward(dy)` the gradients
grad_lora_A, grad_lora_B, grad_magnitude and grad_x, as F64; and scale (F64, one value).
"""
import json
import sys
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn


class One(nn.Module):
    def __init__(self, k, n, bias):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.lin(x)


def as_bf16(t):
    return t.to(torch.bfloat16).to(torch.float64)


def as_f32(t):
    return t.to(torch.float32).to(torch.float64)


def case(k, n, bias, r, alpha, rslora):
    model = One(k, n, bias).double()
    with torch.no_grad():
        model.lin.weight.copy_(as_bf16(model.lin.weight * 4))
        if bias:
            model.lin.bias.copy_(as_bf16(torch.randn(n, dtype=torch.float64)))
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=rslora, lora_dropout=0.0,
                     target_modules=["lin"])
    pm = get_peft_model(model, cfg).double()
    lin = pm.base_model.model.lin
    mag = lin.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(as_f32(lin.lora_A["default"].weight))
        lin.lora_B["default"].weight.copy_(as_f32(torch.randn(n, r, dtype=torch.float64) * 0.3))
        mag.copy_(as_f32(mag * (1 + 0.25 * torch.randn(n, dtype=torch.float64))))
    pm.train()
    x = as_bf16(torch.randn(3, 7, k, dtype=torch.float64)).requires_grad_(True)
    y = pm(x)
    dy = as_bf16(torch.randn_like(y))
    y.backward(dy)
    out = {
        "x": x.detach().to(torch.bfloat16),
        "w0": lin.base_layer.weight.detach().to(torch.bfloat16),
        "dy": dy.to(torch.bfloat16),
        "lora_A": lin.lora_A["default"].weight.detach().float(),
        "lora_B": lin.lora_B["default"].weight.detach().float(),
        "magnitude": mag.detach().float(),
        "y": y.detach(),
        "grad_lora_A": lin.lora_A["default"].weight.grad,
        "grad_lora_B": lin.lora_B["default"].weight.grad,
        "grad_magnitude": mag.grad,
        "grad_x": x.grad,
        "scale": torch.tensor([lin.scaling["default"]], dtype=torch.float64),
    }
    if bias:
        out["bias"] = lin.base_layer.bias.detach().to(torch.bfloat16)
    assert lin.base_layer.weight.grad is None, "W0 is frozen"
    return out


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    tensors = {}
    for i, args in enumerate([(24, 40, True, 8, 16, False), (33, 17, False, 3, 6, True)]):
        for name, t in case(*args).items():
            tensors[f"case{i}.{name}"] = t.contiguous()
    save_file(tensors, str(out / "layer.safetensors"))
    (out / "versions.json").write_text(json.dumps(
        {"torch": torch.__version__, "peft": peft.__version__, "seed": 7}) + "\n")


if __name__ == "__main__":
    main()
