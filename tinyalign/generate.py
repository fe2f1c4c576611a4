"""Generation with a static KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

Two ways to run a batch:

* `generate`: a static batch. Prompts are left-padded, so every row's last prompt token sits at the
  same index and each step appends one column. RoPE positions count real tokens only (padding does
  not shift them), the same rule transformers' `generate` uses, so a padded prompt yields the same
  tokens as an unpadded one. `num_samples=n` prefills each prompt once and copies its cache rows to
  its n samples (shared-prefix sampling).
* `generate_stream`: continuous batching. Each row sits at its own cache slot, and a row whose answer
  is done takes the next prompt at once, so the batch never waits for its longest answer.

With `seed=`, a row's sample is a function of (seed, its row number, its step) alone (keyed
sampling), so every path gives the same answers for the same seed.
"""

from __future__ import annotations

import torch

from .attention import LENGTH_BUCKET, PreparedMask
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
    """(KVCache, compiled step) for this batch size and at least this cache length, made once per
    model. A longer cache already made serves a shorter call (its extra slots stay masked), so calls
    of varying lengths compile once, at their longest."""
    store = model.__dict__.setdefault("_compiled_decoders", {})
    for (rows, length, dtype, device), made in sorted(store.items(), key=lambda kv: kv[0][1]):
        if (rows, dtype, device) == (batch, model.dtype, str(model.device)) and length >= max_len:
            return made
    cache = KVCache(model.cfg.text, batch, max_len, model.dtype, model.device)
    store[(batch, max_len, model.dtype, str(model.device))] = (cache, compiled_decode_step(model, cache))
    return store[(batch, max_len, model.dtype, str(model.device))]


def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    """Cache slots for these lengths, rounded up so the shape (and so the compiled step) repeats
    across calls."""
    return -(-(longest_prompt + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET


def decoder_for(model, rows: int, max_len: int, compile_step: bool):
    """(cache, step) for `rows` rows: compiled ones are kept with the model for the next call."""
    if compile_step:  # a compiled step is tied to its cache's buffers: keep both for the next call
        return compiled_decoder(model, rows, max_len)
    cache = KVCache(model.cfg.text, rows, max_len, model.dtype, model.device)
    return cache, decode_step(model, cache)


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id: int = 2,
             pad_token_id: int = 0, generator: torch.Generator | None = None, seed: int | None = None,
             num_samples: int = 1, compile_step: bool = False) -> torch.Tensor:
    """input_ids [B, T] (left-padded) -> new tokens [B * num_samples, <= max_new_tokens]. A row stops
    at its first </s> (kept in the output) and is padded with pad_token_id after it.

    num_samples: n answers per prompt, output rows b*n .. b*n+n-1 for prompt b. Shared-prefix
    sampling: each prompt (its image through the tower, its 600 tokens through the decoder) is
    prefilled once, into the cache row of its first sample, and that row's slots are copied to the
    other n-1 rows; then all B*n rows decode together.
    seed: sample with per-row keyed noise (`sample_next`): output row r is the same answer as row r
    of a call that repeats each prompt n times (`input_ids.repeat_interleave(n, 0)`), or of
    `generate_stream`. generator: torch's sampler instead (a row then depends on its batch).
    compile_step: decode through `compiled_decode_step` (worth it for long answers on a GPU; the
    first call compiles)."""
    check_decoding(max_new_tokens, num_samples, temperature, top_p, top_k)
    n = num_samples
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last prompt position of every row must be a real token")
    B, T = input_ids.shape
    device = input_ids.device
    with model.language_model.fused_projections():  # q/k/v and gate/up: one product each
        cache, step_fn = decoder_for(model, B * n, cache_length(T, max_new_tokens), compile_step)
        cache.key_valid.fill_(True)
        first_samples = cache.rows(slice(0, None, n))  # row b*n of each prompt b: a view into the cache
        first_samples.key_valid[:, :T] = attention_mask.bool()

        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        logits = model(input_ids, pixel_values, position_ids=positions, cache=first_samples, cache_offset=0,
                       logits_to_keep=1)  # [B, 1, V]
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


@torch.no_grad()
def generate_stream(model, prompts, *, num_samples: int = 1, slots: int = 32, max_new_tokens=128,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id: int = 2,
                    seed: int = 0, prompt_numbers: list[int] | None = None, compile_step: bool = False):
    """Continuous batching. prompts: [(input_ids [T] (list or tensor), pixel_values [N, C, H, W] or a
    function returning them when the prompt gets a row, or None)]; max_new_tokens: one int, or one
    per prompt. Yields (prompt index, [num_samples answers]) as each prompt's answers are complete,
    in the order they complete; an answer is a list of ids up to and including its </s>.

    `slots` rows decode together over one static cache, each row at its own point of its own answer
    (its own cache slot and position: `KVCache.update` with [B, 1] slots). Every CHECK_EVERY steps
    the finished rows are collected and their rows refilled with the next prompts: a prompt is
    prefilled once into a free row and copied into the rows of its other samples (shared prefix). So
    the batch never waits for its longest answer, and a short answer frees its row for the next one.
    Greedy answers are generate()'s; sampled answers (keyed sampling, `seed`) are generate(seed=...)'s
    rows: answer k of prompt p is output row p * num_samples + k, or prompt_numbers[p] * num_samples + k
    when given (annotate passes each prompt's line in its file, so a resumed run draws what an
    uninterrupted one would have)."""
    n = num_samples
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens: {len(budgets)} budgets for {len(prompts)} prompts")
    check_decoding(budgets, num_samples, temperature, top_p, top_k)
    if not prompts:
        return
    if slots < n:
        raise ValueError(f"slots ({slots}) must hold the {n} samples of one prompt")
    device = model.device
    ids = [torch.as_tensor(p[0], dtype=torch.long, device=device).view(1, -1) for p in prompts]  # [1, T] each
    batch = ContinuousBatch(model, slots, cache_length(max(x.shape[1] for x in ids), max(budgets)), max(budgets),
                            compile_step)
    numbers = list(range(len(prompts))) if prompt_numbers is None else list(prompt_numbers)
    waiting = [(p, k) for p in range(len(prompts)) for k in range(n)]  # answers not started, in order
    answers = {}  # prompt -> {sample: ids}
    while waiting or batch.busy():
        with model.language_model.fused_projections():  # entered per stretch, never held across a yield
            while waiting and batch.free():  # refill: one prompt's waiting samples at a time, prefilled once
                p = waiting[0][0]
                samples = [k for q, k in waiting[:len(batch.free())] if q == p]
                del waiting[:len(samples)]
                pixels = prompts[p][1]() if callable(prompts[p][1]) else prompts[p][1]
                keys = row_keys(seed, torch.tensor([numbers[p] * n + k for k in samples], device=device))
                batch.start(ids[p], pixels, [(p, k) for k in samples], budgets[p], keys)
            batch.decode(CHECK_EVERY, temperature, top_p, top_k, eos_token_id)
        for (p, k), answer in batch.collect_finished():  # waits for the device, once per stretch
            answers.setdefault(p, {})[k] = answer
            if len(answers[p]) == n:
                complete = answers.pop(p)
                yield p, [complete[j] for j in range(n)]


class ContinuousBatch:
    """`slots` rows decoding together over one static KV cache, each row writing one answer at its
    own cache slot and position. All per-row state lives on the device, so a stretch of steps runs
    without waiting for it; only `collect_finished` reads it back."""

    def __init__(self, model, slots: int, max_len: int, longest: int, compile_step: bool):
        device, vocab = model.device, model.cfg.text.vocab_size
        self.model = model
        self.cache, self.step_fn = decoder_for(model, slots, max_len, compile_step)
        self.cache.key_valid.fill_(True)  # every row starts at slot 0: no padding anywhere
        self.owner = [None] * slots  # (prompt, sample) of each row; None: free
        self.logits = torch.zeros(slots, vocab, device=device)  # [S, V] the next token's logits
        self.position = torch.zeros(slots, 1, dtype=torch.long, device=device)  # RoPE position to feed
        self.slot = torch.zeros(slots, 1, dtype=torch.long, device=device)  # cache slot to feed into
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)  # tokens written so far
        self.budget = torch.ones(slots, dtype=torch.long, device=device)
        self.keys = torch.zeros(slots, dtype=torch.long, device=device)  # each row's sampling key
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.out = torch.zeros(slots, longest + 1, dtype=torch.long, device=device)  # +1: finished rows write past

    def free(self) -> list[int]:
        return [r for r, o in enumerate(self.owner) if o is None]

    def busy(self) -> bool:
        return any(o is not None for o in self.owner)

    def start(self, input_ids, pixel_values, owners: list, budget: int, keys):
        """Prefill one prompt [1, T] into the first free row, copy its cache slots to as many more
        free rows as it has other samples (shared prefix), and start all of them."""
        T, device = input_ids.shape[1], input_ids.device
        rows = self.free()[:len(owners)]
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=self.model.dtype)
        positions = torch.arange(T, device=device)[None]  # [1, T]: no padding, slot = position
        logits = self.model(input_ids, pixel_values, position_ids=positions, cache=self.cache.rows(slice(rows[0], rows[0] + 1)),
                            cache_offset=0, logits_to_keep=1)[:, -1]  # [1, V]
        if len(rows) > 1:
            self.cache.copy_prefix(torch.tensor(rows[:1] * (len(rows) - 1), device=device),
                                   torch.tensor(rows[1:], device=device), T)
        index = torch.tensor(rows, device=device)
        self.logits[index] = logits.to(self.logits.dtype)
        self.position[index], self.slot[index], self.steps[index] = T, T, 0
        self.budget[index], self.keys[index], self.done[index] = budget, keys, False
        for r, o in zip(rows, owners):
            self.owner[r] = o

    def decode(self, steps: int, temperature: float, top_p: float, top_k: int, eos_token_id: int):
        for _ in range(steps):
            token = sample_next(self.logits, temperature, top_p, None, top_k, self.keys, self.steps)  # [S]
            self.out[torch.arange(len(self.owner), device=token.device), self.steps] = token
            ended = (token == eos_token_id) | (self.steps + 1 >= self.budget)  # at </s> or at its budget
            self.steps += ~self.done
            self.done |= ended
            # .clone(): a CUDA graph's output is overwritten by its next replay, and `start` writes into it
            self.logits = self.step_fn(token[:, None], self.position, self.slot).clone()
            # The fed token now sits in the cache: live rows move one slot on; finished rows stay put
            # (overwriting their last slot until collected, which no live row ever reads).
            live = (~self.done).long()[:, None]
            self.position += live
            self.slot += live

    def collect_finished(self):
        """[((prompt, sample), answer ids)] of the rows finished since the last call; frees their rows."""
        done, steps = self.done.tolist(), self.steps.tolist()
        finished = []
        for r, owner in enumerate(self.owner):
            if owner is not None and done[r]:
                finished.append((owner, self.out[r, :steps[r]].tolist()))
                self.owner[r] = None
        return finished


def main(argv=None):
    """python -m tinyalign.generate --model DIR --image photo.jpg --prompt "What is this?" [--steer ...]"""
    import argparse

    from . import Processor, load_model
    from .arguments import at_least, non_negative, number
    from .steer import STEER_TEMPLATES, parse_steer, steer_prompt

    p = argparse.ArgumentParser(description="Answer one question about an image with a LLaVA-1.5 checkpoint.")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", help="image file (omit for a text-only question)")
    p.add_argument("--vision-tower", help="CLIP folder, for original LLaVA checkpoints")
    p.add_argument("--steer", help="SteerLM ratings to ask for, e.g. helpfulness:4,correctness:4,coherence:4,"
                                   "complexity:2,verbosity:2")
    p.add_argument("--steer-template", choices=sorted(STEER_TEMPLATES), default="tinyalign")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0)
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
