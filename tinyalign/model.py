"""LLaVA-1.5 = CLIP vision tower + 2-layer MLP projector + LLaMA decoder (Liu et al. 2023,
"Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744).

Calling convention (transformers' `LlavaForConditionalGeneration`): `input_ids` holds
`image_seq_length` consecutive `image_token_index` ids per image; the projected image features
are written into exactly those positions, in order, and the decoder reads the mixed sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionMask, prepare
from .config import LlavaConfig
from .llama import KVCache, LlamaModel
from .losses import Targets, scored_logps
from .vision import VisionTower


class Projector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU (exact erf form) -> Linear."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)  # several layers are concatenated
        self.linear_1 = nn.Linear(d_in, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)  # untied
        self.vision_tower.requires_grad_(False)  # frozen in every method of the paper
        # "auto": FlexAttention on CUDA, SDPA on CPU (tinyalign/attention.py says why); "flex" forces
        # FlexAttention, "eager" is the reference path the tests compare against.
        self.attn_backend = "auto"

    # -- images -----------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, H, W] -> projected features [N, image_seq_length, D_text]."""
        tower_trains = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):  # frozen: no graph kept
            states = self.vision_tower(pixel_values, self.cfg.feature_layers, self.attn_backend)
        if self.cfg.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop CLS, keep the patches
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions. [B, T, D]

        image_features [N, S, D]: already projected features (from `image_features()`), so that a
        caller that uses one image in several sequences (DPO: chosen and rejected) runs the tower once.
        """
        is_image = input_ids == self.cfg.image_token_index  # [B, T]
        # The image id may lie past the vocabulary (original checkpoints): never look it up.
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_tokens = int(is_image.sum())
        if pixel_values is None and image_features is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.cfg.image_token_index}) "
                                 "but no pixel_values were given")
            return embeds
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [num_images, C, H, W], got shape {list(pixel_values.shape)}")
        per_image = self.cfg.image_seq_length
        n_images = (pixel_values if image_features is None else image_features).shape[0]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (id {self.cfg.image_token_index}) but {n_images} image(s) "
                f"x {per_image} features = {n_images * per_image} were given: each image needs exactly "
                f"{per_image} consecutive image tokens"
            )
        if image_features is None:
            image_features = self.image_features(pixel_values)
        features = image_features.to(embeds.dtype)  # [N, S, D]
        # Row-major order: the k-th image in pixel_values fills the k-th run of image tokens.
        return embeds.masked_scatter(is_image[..., None], features)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, input_ids, pixel_values=None, attention_mask=None, *, targets: Targets | None = None,
                packed=None, repeat_images: int = 1) -> torch.Tensor:
        """input_ids [B, T] (B rows) -> logits [B, T, vocab], transformers' convention; or, given
        targets, one summed log-probability per answer [S] (what training uses).

        targets (losses.Targets, what a batch of tinyalign/batches.py carries): which tokens to score,
        and which of the S answers each counts toward (S = B for plain rows; a pair batch has 2B rows
        and answers for its B pairs). Computed on those positions only and in chunks, so the
        [B, T, vocab] logits never exist. Training calls this through forward, so that a DDP or FSDP
        wrapper sees it.
        attention_mask [B, T]: 1 for real tokens, 0 for padding (None: no padding).
        packed (packing.PackedRows): the rows hold several sequences each (tinyalign/packing.py): their
            RoPE positions, document ids and branch ids, which the attention mask keeps apart.
        repeat_images: the rows are that many stacked copies of the same prompts (DPO: the chosen
            rows, then the rejected rows); the tower runs once on pixel_values and its features serve
            every copy.
        """
        image_features = None
        if repeat_images > 1 and pixel_values is not None:
            image_features = torch.cat([self.image_features(pixel_values)] * repeat_images)  # [N * copies, S, D]
            pixel_values = None
        hidden = self.hidden_states(input_ids, pixel_values, attention_mask, image_features=image_features,
                                    packed=packed)  # [B, T, D]
        if targets is None:
            return self.lm_head(hidden)
        return scored_logps(hidden, self.lm_head, targets)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *, image_features=None,
                      position_ids=None, packed=None, cache: KVCache | None = None, cache_offset: int = 0):
        """The decoder's output, before the LM head: [B, T, D].

        position_ids [B, T]: RoPE positions; default 0..T-1 (+ cache_offset), as transformers does.
        image_features [N, S, D]: projected features to use instead of running the tower on pixel_values.
        cache, cache_offset: decode with a static KV cache (tinyalign/generate.py); these T tokens go to
        slots offset..offset+T-1, and the cache says which slots hold real keys.
        """
        B, T = input_ids.shape
        device = input_ids.device
        embeds = self.embed(input_ids, pixel_values, image_features)
        if packed is not None:
            position_ids = packed.position_ids
        if position_ids is None:
            position_ids = torch.arange(cache_offset, cache_offset + T, device=device).expand(B, T)
        if cache is None:
            key_valid = attention_mask.bool() if attention_mask is not None else None
            if packed is not None:
                key_valid = packed.document_ids >= 0  # packed rows: -1 marks padding
            kv_len, slots = T, None
        else:
            key_valid, kv_len = cache.key_valid, cache.max_len
            slots = torch.arange(cache_offset, cache_offset + T, device=device)
        offset = torch.tensor(cache_offset, device=device)
        mask = AttentionMask(key_valid, causal=True, query_offset=offset,
                             document=packed.document_ids if packed is not None else None,
                             branch=packed.branch_ids if packed is not None else None)
        return self.language_model(embeds, position_ids, prepare(mask, B, T, kv_len, device, self.attn_backend), cache,
                                   slots)

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype


def random_model(cfg: LlavaConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> Llava:
    """A model with small random weights (for tests, the demo and benchmarks)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llava(cfg).to(dtype)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name:
            nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
        elif p.ndim >= 2 or name.endswith("class_embedding"):
            nn.init.normal_(p, std=0.02)
        else:
            nn.init.zeros_(p)
    return model
