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


def main(argv=None):
    """python -m tinyalign.generate --model DIR --image photo.jpg --prompt "What is this?" [--steer ...]"""
    import argparse

    from . import Processor, load_model
    from .steer import STEER_TEMPLATES, parse_steer, steer_prompt

    p = argparse.ArgumentParser(description="Answer one question about an image with a LLaVA-1.5 checkpoint.")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", help="image file (omit for a text-only question)")
    p.add_argument("--vision-tower", help="CLIP folder, for original LLaVA checkpoints")
    p.add_argument("--steer", help="SteerLM ratings to ask for, e.g. helpfulness:4,correctness:4,coherence:4,"
                                   "complexity:2,verbosity:2")
    p.add_argument("--steer-template", choices=sorted(STEER_TEMPLATES), default="tinyalign")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    question = args.prompt
    if args.steer:
        question = steer_prompt(question, parse_steer(args.steer), args.steer_template)
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
    processor = Processor.from_pretrained(args.model, vision_tower=args.vision_tower)
    encoded = processor.prompt(question, num_images=1 if args.image else 0)
    pixels = processor.images.batch([args.image]).to(model.device) if args.image else None
    ids = torch.tensor([encoded.input_ids], device=model.device)
    out = generate(model, ids, pixels, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    answer = processor.decode(out[0])
    print(answer)
    return answer


if __name__ == "__main__":
    main()
