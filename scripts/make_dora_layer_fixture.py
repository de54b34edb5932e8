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

dropout.safetensors: the same two layer shapes with LoRA dropout (PEFT's DoRA then runs W0 on the
dropped input too): case0 with lora_dropout 0.25, case1 with 0.125. PEFT's nn.Dropout is replaced by
the crate's mask (src/dropout.rs: Philox4x32-10 of (seed, offset, element index), reimplemented below)
times 1/(1 − p), so the crate's kernels, given Dropout::new(p, seed, offset), see PEFT's mask. Written
besides the tensors above: `caseN.dropout` = [p, seed, offset] (F64).
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


M32 = 0xFFFFFFFF


def philox4x32_10(c, k):
    """Philox4x32-10 (Salmon et al., SC 2011), as src/dropout.rs and kernels/include/lk_philox.cuh."""
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k[1]) & M32, p0 & M32]
        k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
    return c


def crate_mask(count, p, seed, offset):
    """The crate's dropout mask of `count` elements (1.0 kept, 0.0 dropped): element e is kept iff word
    e % 4 of Philox with key seed and counter (e / 4, offset) is at least round(p * 2^32)."""
    threshold = round(p * 2**32)
    keep = []
    for q in range((count + 3) // 4):
        w = philox4x32_10([q & M32, q >> 32, offset & M32, offset >> 32], [seed & M32, seed >> 32])
        keep.extend(float(v >= threshold) for v in w)
    return torch.tensor(keep[:count], dtype=torch.float64)


class CrateDropout(nn.Module):
    """LoRA dropout with the crate's mask for an input of a fixed shape: x * mask / (1 - p)."""

    def __init__(self, shape, p, seed, offset):
        super().__init__()
        count = 1
        for s in shape:
            count *= s
        self.scale = crate_mask(count, p, seed, offset).reshape(shape) / (1.0 - p)

    def forward(self, x):
        assert x.shape == self.scale.shape
        return x * self.scale


def case(k, n, bias, r, alpha, rslora, dropout=None):
    model = One(k, n, bias).double()
    with torch.no_grad():
        model.lin.weight.copy_(as_bf16(model.lin.weight * 4))
        if bias:
            model.lin.bias.copy_(as_bf16(torch.randn(n, dtype=torch.float64)))
    p = dropout[0] if dropout else 0.0
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=rslora, lora_dropout=p,
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
    if dropout:
        assert isinstance(lin.lora_dropout["default"], nn.Dropout), "PEFT's dropout path"
        lin.lora_dropout["default"] = CrateDropout(x.shape, *dropout)
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
    if dropout:
        out["dropout"] = torch.tensor(dropout, dtype=torch.float64)
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
    tensors = {}
    for i, args in enumerate([(24, 40, True, 8, 16, False, (0.25, 1234567, 3)),
                              (33, 17, False, 3, 6, True, (0.125, 987654321, 41))]):
        for name, t in case(*args).items():
            tensors[f"case{i}.{name}"] = t.contiguous()
    save_file(tensors, str(out / "dropout.safetensors"))
    (out / "versions.json").write_text(json.dumps(
        {"torch": torch.__version__, "peft": peft.__version__, "seed": 7}) + "\n")


if __name__ == "__main__":
    main()
