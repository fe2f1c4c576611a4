"""Fused projections while generating: each decoder layer's q, k and v products run as one matrix
product, and so do its gate and up products.

A decode step feeds one token per row, so each matrix product is a thin one that reads a whole weight
for a few rows of output: five separate products read the layer's input five times and launch five
kernels; fused, two. Applied where generation runs (`with fused_projections(model): ...`), not
written into the network: `llama.Attention.qkv` and `llama.MLP.gate_and_up` are replaced on the
instances for the duration and restored after. The weights stay where they are, as views of the
fused ones (no second copy), so the checkpoint's names, training and saving see them as before.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_FUSED = weakref.WeakKeyDictionary()  # layer -> its fused weight, kept for the next call


def fuse_weights(linears: list[nn.Module], fused: torch.Tensor | None) -> torch.Tensor | None:
    """One weight [sum of outs, in] whose row blocks ARE these layers' weights: x @ fused.T computes
    all of their products in one matrix product. Each layer's weight becomes a view of `fused`. A
    `fused` from an earlier call is kept while the weights still live in it (after `.to(dtype)` they
    do not; then it is made again). None where a layer is not a plain nn.Linear (LoRA-wrapped: its
    product is not W x)."""
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return None
    starts = [0]
    for m in linears:
        starts.append(starts[-1] + m.out_features)

    def lives_in(t):
        return (t is not None and t.dtype == linears[0].weight.dtype and t.device == linears[0].weight.device
                and all(m.weight.data_ptr() == t[a].data_ptr() for m, a in zip(linears, starts)))

    if not lives_in(fused):
        fused = torch.cat([m.weight.data for m in linears])  # [sum of outs, in]
        for m, a, b in zip(linears, starts, starts[1:]):
            m.weight.data = fused[a:b]
        # A compiled decode step replayed as a CUDA graph reads it in place, like the weights
        # themselves (an input not marked static would be copied into the graph at every step).
        torch._dynamo.mark_static_address(fused)
    return fused


def one_product(weight: torch.Tensor, sizes: list[int]):
    """x -> the products of the fused layers, split back into one output per layer."""
    return lambda x: F.linear(x, weight).split(sizes, dim=-1)


@contextmanager
def fused_projections(model):
    """Inside this block (generation only: no gradients), every decoder layer's q/k/v and gate/up
    products run as one product each. Layers with LoRA adapters keep their separate products. Safe
    to nest: an inner block leaves what the outer one set."""
    if torch.is_grad_enabled():
        raise RuntimeError("fused_projections is for generation: the fused weights carry no gradient")
    replaced = []
    for block in model.language_model.layers:
        for module, linears, method in ((block.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv"),
                                        (block.mlp, ("gate_proj", "up_proj"), "gate_and_up")):
            if method in module.__dict__:  # an enclosing fused_projections already did it
                continue
            layers = [getattr(module, name) for name in linears]
            fused = fuse_weights(layers, _FUSED.get(module))
            if fused is None:
                continue
            _FUSED[module] = fused
            setattr(module, method, one_product(fused, [m.out_features for m in layers]))  # shadows the method
            replaced.append((module, method))
    try:
        yield model
    finally:
        for module, method in replaced:
            delattr(module, method)
