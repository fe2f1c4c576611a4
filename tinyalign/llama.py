"""The LLaMA-2 decoder that Vicuna-v1.5 (and so LLaVA-1.5) is built on (Touvron et al. 2023,
arXiv 2307.09288): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP.

Names mirror the checkpoint: `embed_tokens`, `layers.{i}.self_attn.q_proj`, `layers.{i}.mlp.gate_proj`,
`layers.{i}.input_layernorm`, `norm`.
"""

from __future__ import annotations

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


class Attention(nn.Module):
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
        q, k, v = self.qkv(x)  # [B, T, H * D], [B, T, H_kv * D], [B, T, H_kv * D]
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, cache_slots, k, v)  # [B, H_kv, max_len, D]
        out = attend(q, k, v, mask)  # [B, H, T, D]; GQA: each K/V head serves H / H_kv query heads
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def qkv(self, x):
        """The three input projections. A method of its own so that generation can run them as one
        matrix product (tinyalign/speed/fused.py replaces it on the instance while it decodes)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_and_up(x)  # [B, T, intermediate] each
        return self.down_proj(F.silu(gate) * up)

    def gate_and_up(self, x):
        """The two input projections (one matrix product while generating: tinyalign/speed/fused.py)."""
        return self.gate_proj(x), self.up_proj(x)


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
