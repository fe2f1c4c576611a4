"""CLIP ViT-L/14-336, the vision tower of LLaVA-1.5 (Radford et al. 2021, arXiv 2103.00020).

Module and parameter names mirror the checkpoint (`embeddings.patch_embedding`, `pre_layrnorm`,
`encoder.layers.{i}.self_attn.q_proj`, ...) so loading is a short key map, not a translation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AttentionMask, attend, prepare
from .config import VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        # A conv with stride = kernel = patch size cuts the image into patches and projects each one.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)  # +1: the CLS token

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, 1 + P, D]
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, D, H/p, W/p]
        patches = patches.flatten(2).transpose(1, 2)  # [N, P, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, mask):  # [N, T, D]
        N, T, D = x.shape
        split = lambda t: t.view(N, T, self.num_heads, -1).transpose(1, 2)  # [N, H, T, D/H]
        out = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
        return self.out_proj(out.transpose(1, 2).reshape(N, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # "quick GELU", what OpenAI's CLIP was trained with


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic) the checkpoint's name
        self.encoder = VisionEncoder(cfg)
        # Present in the checkpoint, unused by LLaVA (it reads an inner layer). Kept so that a saved
        # model is complete.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, feature_layers: list[int], attn_backend: str = "auto") -> list[torch.Tensor]:
        """pixels [N, C, H, W] -> the hidden states at `feature_layers`, each [N, 1 + P, D].

        Layer indices count like transformers' `hidden_states`: 0 is the embedding output (after
        pre_layrnorm), i is the output of block i, -1 the last block. Blocks past the deepest layer
        asked for are never run (LLaVA's layer -2 skips the last block).
        """
        total = len(self.encoder.layers) + 1
        wanted = [layer % total for layer in feature_layers]
        x = self.pre_layrnorm(self.embeddings(pixels))  # [N, 1 + P, D]
        mask = prepare(AttentionMask(causal=False), x.shape[0], x.shape[1], x.shape[1], x.device, attn_backend)
        states = [x]
        for block in self.encoder.layers[: max(wanted)]:
            x = block(x, mask)
            states.append(x)
        return [states[i] for i in wanted]
