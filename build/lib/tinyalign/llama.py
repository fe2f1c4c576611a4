"""The LLaMA-2 decoder that Vicuna-v1.5 (and so LLaVA-1.5) is built on (Touvron et al. 2023,
arXiv 2307.09288): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP.

Names mirror the checkpoint: `embed_tokens`, `layers.{i}.self_attn.q_proj`, `layers.{i}.mlp.gate_proj`,
`layers.{i}.input_layernorm`, `norm`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import PreparedMask, attend
from .config import TextConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in float32 as LLaMA does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (RoFormer, Su et al. 2021, eq. 34).

    LLaMA as ported to transformers uses the "rotate half" layout: the pair rotated together is
    (x[i], x[i + head_dim/2]), so the frequencies are laid out twice, [f_0..f_{d/2-1}, f_0..f_{d/2-1}].
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):  # x [B, H, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Static key/value cache: one preallocated [B, H_kv, max_len, D] buffer pair per layer, so a
    decoding step has the same shapes every time (what makes a compiled decode step possible).

    key_valid [B, max_len]: False for the slots of left padding; the caller fills it in.
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)

    def update(self, layer: int, positions: torch.Tensor, k, v):
        """Write k, v [B, H_kv, T, D] at cache slots `positions` and return the whole cache.

        positions [T]: the same slots in every row (prefill, and `generate`'s decoding, where the
        rows are left-padded to end together). positions [B, T]: each row its own slots (continuous
        batching, where each row is at its own point of its own answer)."""
        if positions.ndim == 1:
            self.keys[layer].index_copy_(2, positions, k)
            self.values[layer].index_copy_(2, positions, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1], broadcast against [B, T]
            # Indexing [rows, :, positions] addresses [B, T, H_kv, D]: the two indexed dims come first.
            self.keys[layer][rows, :, positions] = k.transpose(1, 2)
            self.values[layer][rows, :, positions] = v.transpose(1, 2)
        return self.keys[layer], self.values[layer]

    def rows(self, index: slice) -> "KVCache":
        """A cache over some rows of this one (`slice(3, 4)`: row 3; `slice(0, None, 4)`: every 4th),
        sharing its memory: what a forward pass writes through the view lands in these rows. Used to
        prefill one prompt into the row it will decode in."""
        view = object.__new__(KVCache)
        view.keys = [t[index] for t in self.keys]
        view.values = [t[index] for t in self.values]
        view.max_len = self.max_len
        view.key_valid = self.key_valid[index]
        return view

    def copy_prefix(self, sources: torch.Tensor, targets: torch.Tensor, length: int):
        """Copy the first `length` slots of rows `sources` [N] into rows `targets` [N], every layer:
        the n samples of one prompt share its prefill instead of each computing it again."""
        for t in self.keys + self.values:
            t[targets, :, :length] = t[sources, :, :length]
        self.key_valid[targets, :length] = self.key_valid[sources, :length]


def fuse_weights(linears: list[nn.Module], fused: torch.Tensor | None) -> torch.Tensor | None:
    """One weight [sum of outs, in] whose row blocks ARE these layers' weights: x @ fused.T computes
    all of their products in one matrix product (one pass over x, one kernel: what a one-row decode
    step wants). Each layer's weight becomes a view of `fused` (no second copy of the weights), so
    the checkpoint's names, training and saving see the separate weights as before. `fused` from an
    earlier call is kept while the weights still live in it (after `.to(dtype)` they do not; then it
    is made again). None where a layer is not a plain nn.Linear (LoRA-wrapped: its product is not W x)."""
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


class Attention(nn.Module):
    fused_qkv: torch.Tensor | None = None  # set while decoding (LlamaModel.fused_projections)

    def __init__(self, cfg: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask: PreparedMask, cache: KVCache | None = None, cache_slots=None):
        B, T, _ = x.shape
        if self.fused_qkv is not None:  # one product for q, k and v
            sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
            q, k, v = F.linear(x, self.fused_qkv).split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, cache_slots, k, v)  # [B, H_kv, max_len, D]
        out = attend(q, k, v, mask)  # [B, H, T, D]; GQA: each K/V head serves H / H_kv query heads
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    fused_gate_up: torch.Tensor | None = None  # set while decoding (LlamaModel.fused_projections)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        if self.fused_gate_up is not None:  # one product for gate and up
            gate, up = F.linear(x, self.fused_gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TextConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Token embeddings -> blocks -> final norm. The LM head lives on the LLaVA model (untied)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def compile_blocks(self):
        """torch.compile each block (the same code, so the 32 or 40 blocks share one compiled graph):
        norms, RoPE, the SwiGLU and the residual adds fuse into few kernels around the matmuls and
        the (already compiled) attention."""
        for block in self.layers:
            block.compile(dynamic=False)

    @contextmanager
    def fused_projections(self):
        """Inside this block (generation only: no gradients), each layer's q/k/v products run as one
        matrix product and so do gate/up: a decode step reads each layer's input once and launches
        two kernels instead of five. The weights stay where they are, as views of the fused ones
        (`fuse_weights`); layers with LoRA adapters keep their separate products."""
        if torch.is_grad_enabled():
            raise RuntimeError("fused_projections is for generation: the fused weights carry no gradient")
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.fused_qkv = fuse_weights([attn.q_proj, attn.k_proj, attn.v_proj], attn.__dict__.get("_qkv"))
            mlp.fused_gate_up = fuse_weights([mlp.gate_proj, mlp.up_proj], mlp.__dict__.get("_gate_up"))
            attn._qkv, mlp._gate_up = attn.fused_qkv, mlp.fused_gate_up  # kept for the next call
        try:
            yield self
        finally:
            for block in self.layers:
                block.self_attn.fused_qkv = block.mlp.fused_gate_up = None

    def forward(self, embeds, positions, mask: PreparedMask, cache: KVCache | None = None, cache_slots=None):
        """embeds [B, T, D], positions [B, T] (RoPE positions) -> hidden states [B, T, D]."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x = embeds
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations during backward.
                x = checkpoint(block, x, cos, sin, mask, cache, cache_slots, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, cache_slots)
        return self.norm(x)
