"""LoRA (Hu et al. 2021, arXiv 2106.09685): W x + (alpha / r) * B A x, with W frozen and only the
low-rank A [r, in] and B [out, r] trained. B starts at zero, so training starts from the base model.

The paper's recipe: r = 128, alpha = 256, dropout 0.05 on every linear layer of the decoder
(q, k, v, o, gate, up, down). After training, `merge_lora` folds B A into W, giving back plain
nn.Linear layers: the saved checkpoint is an ordinary one. (Saving the adapter alone, in PEFT's
layout: infra/weights.py::save_adapter.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base projection alone (`adapters_off`)

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear whose weight is W + (alpha / r) B A."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        self.base.weight.data = (self.base.weight.float() + delta).to(self.base.weight.dtype)
        return self.base


def apply_lora(module: nn.Module, r: int = 128, alpha: float = 256, dropout: float = 0.05,
               targets=TARGETS) -> list[str]:
    """Wrap every nn.Linear of `module` whose name ends in one of `targets`. Returns the wrapped names."""
    names = [name for name, m in module.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no linear layer named {targets} to put LoRA on")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout))
    return names


@contextmanager
def adapters_off(module: nn.Module):
    """Inside the block every LoRA layer of `module` computes its frozen base projection alone: the
    weights as they were before training, without a second copy of the model in memory."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield module
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear by its merged nn.Linear, in place. Returns how many were merged."""
    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in wrapped:
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name), leaf, lora.merged())
    return len(wrapped)
