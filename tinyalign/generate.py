"""Batched generation with a static KV cache: greedy, temperature and top-p (nucleus) sampling.

Prompts are left-padded, so every row's last prompt token sits at the same index and each step
appends one column. RoPE positions count real tokens only (padding does not shift them), the same
rule transformers' `generate` uses, so a padded prompt yields the same tokens as an unpadded one.
"""

from __future__ import annotations

import torch

from .attention import LENGTH_BUCKET, PreparedMask
from .llama import KVCache

CHECK_EVERY = 8  # decoding steps between checks whether every row has finished


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None, top_k: int = 0) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy (argmax); top_k > 0 keeps the k most
    likely tokens (transformers samples with top_k=50 unless told otherwise), then top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2019).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs[mass_before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_step(model, cache: KVCache):
    """One token per row through the decoder with the KV cache: (token [B, 1], position [B, 1],
    slot [1]) -> logits [B, V]. Every shape and every buffer address is the same at every step (the
    step's slot is a tensor, the cache is preallocated, the mask is a dense [B, 1, 1, max_len] row
    through SDPA), so the whole step can be compiled once and replayed as a CUDA graph."""
    all_slots = torch.arange(cache.max_len, device=cache.key_valid.device)

    def step(token, position, slot):
        embeds = model.language_model.embed_tokens(token)  # [B, 1, D]
        visible = cache.key_valid & (all_slots <= slot)  # [B, max_len]: the prompt and what came since
        backend = "eager" if model.attn_backend == "eager" else "sdpa"  # eager: the tests' reference
        mask = PreparedMask(backend, 1, cache.max_len, dense=visible[:, None, None, :])
        hidden = model.language_model(embeds, position, mask, cache, slot)  # [B, 1, D]
        return model.lm_head(hidden[:, -1])

    return step


def compiled_decode_step(model, cache: KVCache):
    """decode_step through torch.compile; on CUDA it is captured as a CUDA graph:
    about 700 kernel launches of a 7B step become one replay. The cache buffers are marked static
    (their addresses never change) so the graph may write into them."""
    for t in cache.keys + cache.values + [cache.key_valid]:
        torch._dynamo.mark_static_address(t)
    step = decode_step(model, cache)
    if not cache.key_valid.is_cuda:
        return torch.compile(step, fullgraph=True)
    # CUDA: replay as a CUDA graph ("reduce-overhead"), and let inductor tune the one-row matrix
    # products, which it writes as its own kernels (gpt-fast's setting).
    return torch.compile(step, fullgraph=True, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})


def compiled_decoder(model, batch: int, max_len: int):
    """(KVCache, compiled step) for this batch size and cache length, made once per model."""
    store = model.__dict__.setdefault("_compiled_decoders", {})
    key = (batch, max_len, model.dtype, str(model.device))
    if key not in store:
        cache = KVCache(model.cfg.text, batch, max_len, model.dtype, model.device)
        store[key] = (cache, compiled_decode_step(model, cache))
    return store[key]


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id: int = 2,
             pad_token_id: int = 0, generator: torch.Generator | None = None,
             compile_step: bool = False) -> torch.Tensor:
    """input_ids [B, T] (left-padded) -> new tokens [B, <= max_new_tokens]. A row stops at its first
    </s> (kept in the output) and is padded with pad_token_id after it. compile_step: decode through
    `compiled_decode_step` (worth it for long answers on a GPU; the first call compiles)."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last prompt position of every row must be a real token")
    # Round the cache up so its shape (and so the compiled attention) repeats across calls.
    max_len = -(-(T + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
    if compile_step:  # a compiled step is tied to its cache's buffers: keep both for the next call
        cache, step_fn = compiled_decoder(model, B, max_len)
    else:
        cache = KVCache(model.cfg.text, B, max_len, model.dtype, device)
        step_fn = decode_step(model, cache)
    cache.key_valid.fill_(True)
    cache.key_valid[:, :T] = attention_mask.bool()

    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    logits = model(input_ids, pixel_values, position_ids=positions, cache=cache, cache_offset=0, logits_to_keep=1)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    length = torch.full((), max_new_tokens, dtype=torch.long, device=device)  # tokens until every row is done
    slot = torch.tensor([T], device=device)  # the cache slot of the token being fed
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_p, generator, top_k)
        token = token.masked_fill(done, pad_token_id)
        out[:, step] = token
        done |= token == eos_token_id
        length = torch.where(done.all() & (length == max_new_tokens), step + 1, length)
        # Asking the GPU "all done?" waits for it; asking every CHECK_EVERY steps lets the CPU queue
        # the next steps while the GPU works (the answer is the same: finished rows only add padding).
        if step == max_new_tokens - 1 or ((step + 1) % CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = step_fn(token[:, None], next_pos, slot)[:, None]
        next_pos, slot = next_pos + 1, slot + 1
    return out[:, : int(length)]


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
