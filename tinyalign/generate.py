"""Generation with a static KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

`generate` runs a static batch. Prompts are left-padded, so every row's last prompt token sits at the
same index and each step appends one column. RoPE positions count real tokens only (padding does not
shift them), the same rule transformers' `generate` uses, so a padded prompt yields the same tokens as
an unpadded one. `num_samples=n` prefills each prompt once and copies its cache rows to its n samples
(shared-prefix sampling): rejection sampling and DPO's data collection sample several answers per prompt.

With `seed=`, a row's sample is a function of (seed, its row number, its step) alone (keyed
sampling), so every path gives the same answers for the same seed, including the fast ones of
tinyalign/speed/ (continuous batching, the compiled decode step, fused projections), which are
applied where they are used and give these same answers.
"""

from __future__ import annotations

import torch

from .attention import PreparedMask
from .llama import KVCache

CHECK_EVERY = 8  # decoding steps between checks whether every row has finished


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None, top_k: int = 0,
                keys: torch.Tensor | None = None, steps=None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy (argmax); top_k > 0 keeps the k most
    likely tokens (transformers samples with top_k=50 unless told otherwise), then top_p.

    Two sources of randomness. `generator`: torch.multinomial draws for the whole batch from one
    stream, so a row's sample depends on which rows share its batch. `keys` [B] and `steps` ([B] or
    one int): each row draws with a uniform number that is a function of (its key, its step) alone
    (`keyed_uniform`), so a row gets the same answer whatever batch it runs in, alone, in a static
    batch, sharing a prefix or in a continuous batch. The sampled distribution is the same."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(~nucleus(probs, top_p), 0.0)
    if keys is not None:
        # Inverse transform sampling: the first token whose cumulative probability reaches u, for one
        # uniform u per row. Tokens top-k/top-p removed have width zero and are never reached.
        cumulative = probs.double().cumsum(dim=-1)  # [B, V]
        u = keyed_uniform(keys, steps)[:, None] * cumulative[:, -1:]  # [B, 1]
        return torch.searchsorted(cumulative, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2019): [B, V] bool."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, mass_before < top_p)


_LOW32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the xorshift-multiply one credited to Thomas Mueller), on int64 tensors
    holding values below 2**32. It is a bijection, so distinct inputs give distinct outputs. The
    multiplier is below 2**27, so no product leaves int64 and every device computes the same bits."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _LOW32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _LOW32
    return (x >> 16) ^ x


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """The sampling key of each output row [B] under `seed`: row r of a call is answer r, whichever
    path generates it."""
    return mix32(mix32(rows.long() & _LOW32) ^ (seed & _LOW32))


def keyed_uniform(keys: torch.Tensor, steps) -> torch.Tensor:
    """One uniform number in (0, 1) per row [B] float64, a hash of (the row's key, its step):
    counter-based randomness, no state carried between steps or calls."""
    steps = torch.as_tensor(steps, device=keys.device).long().expand(keys.shape[0])  # [B]
    bits = mix32(keys ^ mix32(steps & _LOW32))  # [B], 32 random bits each
    return (bits.double() + 0.5) / 2.0 ** 32


def check_decoding(max_new_tokens, num_samples: int, temperature: float, top_p: float, top_k: int):
    """Refuse settings no decoding can honour, naming the argument (rather than failing mid-loop)."""
    budgets = [max_new_tokens] if isinstance(max_new_tokens, int) else list(max_new_tokens)
    problems = [f"max_new_tokens must be at least 1, got {b}" for b in budgets if b < 1][:1]
    problems += [f"num_samples must be at least 1, got {num_samples}"] if num_samples < 1 else []
    problems += [f"temperature must be at least 0 (0: greedy), got {temperature}"] if not temperature >= 0 else []
    problems += [f"top_p must be in (0, 1], got {top_p}"] if not 0 < top_p <= 1 else []
    problems += [f"top_k must be at least 0 (0: off), got {top_k}"] if top_k < 0 else []
    if problems:
        raise ValueError("; ".join(problems))


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


def plain_decoder(model, rows: int, max_len: int):
    """-> (KVCache, step): a fresh static cache of `rows` rows and `max_len` slots, and the eager
    decode step over it. `tinyalign.speed.decoding.compiled_decoder` has the same signature and gives
    a compiled step instead (a CUDA graph on a GPU), kept with the model for the next call."""
    cache = KVCache(model.cfg.text, rows, max_len, model.dtype, model.device)
    return cache, decode_step(model, cache)


def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    """Cache slots for these lengths, rounded up to a multiple of 128 so that the cache's shape (and
    so a compiled decode step) repeats across calls."""
    return -(-(longest_prompt + max_new_tokens) // 128) * 128


def prefill(model, input_ids, pixel_values, positions, cache) -> torch.Tensor:
    """The prompts [B, T] through the model into the cache's slots 0..T-1 -> the next token's logits
    [B, 1, V] (the LM head runs on the last position only)."""
    hidden = model.hidden_states(input_ids, pixel_values, position_ids=positions, cache=cache)  # [B, T, D]
    return model.lm_head(hidden[:, -1:])


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id: int = 2,
             pad_token_id: int = 0, generator: torch.Generator | None = None, seed: int | None = None,
             num_samples: int = 1, decoder=plain_decoder) -> torch.Tensor:
    """input_ids [B, T] (left-padded) -> new tokens [B * num_samples, <= max_new_tokens]. A row stops
    at its first </s> (kept in the output) and is padded with pad_token_id after it.

    num_samples: n answers per prompt, output rows b*n .. b*n+n-1 for prompt b. Shared-prefix
    sampling: each prompt (its image through the tower, its 600 tokens through the decoder) is
    prefilled once, into the cache row of its first sample, and that row's slots are copied to the
    other n-1 rows; then all B*n rows decode together.
    seed: sample with per-row keyed noise (`sample_next`): output row r is the same answer as row r
    of a call that repeats each prompt n times (`input_ids.repeat_interleave(n, 0)`), or of
    `speed.decoding.generate_stream`. generator: torch's sampler instead (a row then depends on its batch).
    decoder: (model, rows, cache length) -> (cache, step); `plain_decoder` by default,
    `speed.decoding.compiled_decoder` for a compiled step (worth it for long answers on a GPU; the
    first call compiles)."""
    check_decoding(max_new_tokens, num_samples, temperature, top_p, top_k)
    n = num_samples
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last prompt position of every row must be a real token")
    B, T = input_ids.shape
    device = input_ids.device
    cache, step_fn = decoder(model, B * n, cache_length(T, max_new_tokens))
    cache.key_valid.fill_(True)
    first_samples = cache.rows(slice(0, None, n))  # row b*n of each prompt b: a view into the cache
    first_samples.key_valid[:, :T] = attention_mask.bool()

    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]: padding does not shift them
    logits = prefill(model, input_ids, pixel_values, positions, first_samples)  # [B, 1, V]
    if n > 1:
        others = torch.arange(B * n, device=device).view(B, n)[:, 1:].reshape(-1)  # every row but each b*n
        cache.copy_prefix(others - others % n, others, T)
        logits, positions = logits.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
    keys = row_keys(seed, torch.arange(B * n, device=device)) if seed is not None else None
    next_pos = positions[:, -1:] + 1  # [B*n, 1]
    out = torch.full((B * n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    length = torch.full((), max_new_tokens, dtype=torch.long, device=device)  # tokens until every row is done
    slot = torch.tensor([T], device=device)  # the cache slot of the token being fed
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_p, generator, top_k, keys, step)
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


if __name__ == "__main__":  # the one-question command lived here before the layout change
    raise SystemExit("python -m tinyalign.generate moved: python -m tinyalign.evaluation.ask --model DIR --prompt ...")
