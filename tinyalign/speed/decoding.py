"""Fast decoding: the decode step compiled once (a CUDA graph on a GPU), and continuous batching.

* `compiled_decoder`: the core's decode step (`generate.decode_step`) through torch.compile, with its
  cache; pass it as `generate(..., decoder=compiled_decoder)`.
* `generate_stream`: continuous batching. Each row sits at its own cache slot, and a row whose answer
  is done takes the next prompt at once, so the batch never waits for its longest answer. Its
  greedy answers are `generate`'s, and so are its sampled ones with the same `seed` (keyed sampling).
"""

from __future__ import annotations

import torch

from ..generate import (CHECK_EVERY, cache_length, check_decoding, decode_step, plain_decoder, prefill, row_keys,
                        sample_next)
from ..llama import KVCache
from .fused import fused_projections


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
        with fused_projections(model):  # entered per stretch, never held across a yield
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
        self.cache, self.step_fn = (compiled_decoder if compile_step else plain_decoder)(model, slots, max_len)
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
        logits = prefill(self.model, input_ids, pixel_values, positions,
                         self.cache.rows(slice(rows[0], rows[0] + 1)))[:, -1]  # [1, V]
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
