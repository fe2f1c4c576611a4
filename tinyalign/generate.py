"""Batched generation with a static KV cache: greedy, temperature and top-p (nucleus) sampling.

Prompts are left-padded, so every row's last prompt token sits at the same index and each step
appends one column. RoPE positions count real tokens only (padding does not shift them), the same
rule transformers' `generate` uses, so a padded prompt yields the same tokens as an unpadded one.
"""

from __future__ import annotations

import torch

from .attention import LENGTH_BUCKET
from .llama import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2019).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs[mass_before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int = 2, pad_token_id: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids [B, T] (left-padded) -> new tokens [B, <= max_new_tokens]. A row stops at its first
    </s> (kept in the output) and is padded with pad_token_id after it."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last prompt position of every row must be a real token")
    # Round the cache up so its shape (and so the compiled attention) repeats across calls.
    max_len = -(-(T + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
    cache = KVCache(model.cfg.text, B, max_len, model.dtype, device)
    cache.key_valid[:, :T] = attention_mask.bool()

    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    logits = model(input_ids, pixel_values, position_ids=positions, cache=cache, cache_offset=0, logits_to_keep=1)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_p, generator)
        token = token.masked_fill(done, pad_token_id)
        out[:, step] = token
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            return out[:, : step + 1]
        logits = model(token[:, None], position_ids=next_pos, cache=cache, cache_offset=T + step)
        next_pos = next_pos + 1
    return out
