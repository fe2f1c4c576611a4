"""Speed and memory of the DPO step and of decoding, ours next to transformers', measured in one run.

    python tests/reference_bench.py --preset llava-1.5-7b  # one GPU, ours and transformers side by side
    python -m tinyalign.speed.throughput --preset llava-1.5-7b        # ours alone (no transformers needed)
    python -m tinyalign.speed.throughput --preset tiny                # the same code on a CPU in about a minute

Workload (the paper's DPO data): pairs of one 336 px image (576 image tokens), a ~64-token question
and two answers of ~200 tokens; reference log-probs precomputed (constants here), as train_dpo.py
does by default. Rows of the table:

- DPO step, paper setting: LoRA r128/alpha256 on every decoder projection, projector trained, tower
  frozen, AdamW; ours = packed `[prompt | chosen | rejected]` (tinyalign/packing.py), FlexAttention,
  answer-only chunked log-probs; transformers = LlavaForConditionalGeneration (SDPA) + peft LoRA, the
  chosen and rejected rows padded and concatenated, full logits, as TRL's DPOTrainer does. That path
  lives in tests/reference_bench.py (tinyalign itself never imports transformers or peft):
  `python tests/reference_bench.py --preset ...` runs ours and it in one process; this module alone
  measures ours.
- DPO step, full fine-tuning: every decoder weight trained (bf16 weights and AdamW moments, the
  update applied inside backward, see `optimizer_in_backward`), one pair per step.
- Decode: batch 1, greedy, after a 600-token multimodal prefill: ours (static KV cache, the decode
  step compiled into a CUDA graph) vs transformers' generate (dynamic cache; static cache + compile).

FLOPs counted are the ones the method needs (`dpo_step_flops`): every token of the packed pair once,
2 FLOPs per multiply-add; forward 2N per token for the N decoder weights, backward 2N more for the
activation gradients, and 2N more only for weights that are trained (full fine-tuning); attention
4*d per visible (query, key) pair forward and twice that backward; the LM head only on scored tokens;
the frozen tower forward once per image. MFU = achieved / the card's peak dense bf16 rate.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch

from ..config import PRESETS, LlavaConfig, preset
from ..data import PairExample
from ..generate import cache_length, generate, plain_decoder
from ..infra.arguments import at_least, non_negative
from ..infra.files import write_atomic
from ..losses import dpo_loss
from ..model import random_model
from ..packing import pack_pairs
from ..processor import IGNORE_INDEX, Encoded
from ..training import autocast, compile_blocks, train_decoder, train_projector
from .decoding import compiled_decoder, generate_stream
from .fused import fused_projections

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, from the datasheets


# ---------------------------------------------------------------------------------------------
# The synthetic workload
# ---------------------------------------------------------------------------------------------


class SyntheticProcessor:
    """Just what pack_pairs and the transformers path need: ids are random, lengths are the paper's."""

    def __init__(self, cfg: LlavaConfig):
        self.pad_token_id, self.image_token_index = 0, cfg.image_token_index
        self.images = None


def synthetic_pairs(cfg: LlavaConfig, n: int, prompt_tokens: int, answer_tokens: int, seed: int = 0):
    """n PairExamples: [bos, image tokens, question | answer + eos], answer lengths varying +-25%."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text.vocab_size, cfg.image_token_index) - 1
    pairs = []
    for i in range(n):
        prompt = [1] + [cfg.image_token_index] * cfg.image_seq_length + torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist()

        def answer():
            length = int(answer_tokens * (0.75 + 0.5 * torch.rand(1, generator=g).item()))
            return torch.randint(3, vocab, (length,), generator=g).tolist() + [2]

        encs = []
        for a in (answer(), answer()):
            encs.append(Encoded(prompt + a, [IGNORE_INDEX] * len(prompt) + a, 1))
        pairs.append(PairExample(str(i), encs[0], encs[1], [], -300.0, -310.0))
    return pairs


def pixel_batch(cfg: LlavaConfig, n: int, device, dtype):
    size = cfg.vision.image_size
    return torch.randn(n, 3, size, size, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def decoder_linear_params(cfg: LlavaConfig) -> int:
    t = cfg.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    return t.num_layers * (attn + 3 * t.hidden_size * t.intermediate_size)


def vision_params(cfg: LlavaConfig) -> int:
    v = cfg.vision
    return v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)


def lora_params(cfg: LlavaConfig, r: int) -> int:
    t = cfg.text
    shapes = [(t.hidden_size, t.num_heads * t.head_dim)] * 2 + [(t.hidden_size, t.num_kv_heads * t.head_dim)] * 2 + \
        [(t.hidden_size, t.intermediate_size)] * 3
    return t.num_layers * sum(r * (a + b) for a, b in shapes)


def visible_pairs(prompt: int, chosen: int, rejected: int) -> int:
    """(query, key) pairs a packed [prompt | chosen | rejected] attends over (causal, branches apart)."""
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    return tri(prompt) + chosen * prompt + tri(chosen) + rejected * prompt + tri(rejected)


def dpo_step_flops(cfg: LlavaConfig, pairs: list[PairExample], full: bool, lora_r: int) -> float:
    """FLOPs one DPO step needs on these pairs (see the module doc)."""
    n_linear, d = decoder_linear_params(cfg), cfg.text.hidden_size
    proj = cfg.vision.hidden_size * d + d * d
    total = 0.0
    for e in pairs:
        p = next(i for i, x in enumerate(e.chosen.labels) if x != IGNORE_INDEX)
        c, r = len(e.chosen.input_ids) - p, len(e.rejected.input_ids) - p
        tokens, scored = p + c + r, c + r
        linear = 2 * n_linear * tokens
        total += linear * (3 if full else 2)  # forward + activation grads (+ weight grads when trained)
        if lora_r:
            total += 6 * 2 * lora_params(cfg, lora_r) / 2 * tokens  # the adapters: all three passes
        total += 3 * 4 * d * visible_pairs(p, c, r) * cfg.text.num_layers  # attention fwd + 2x bwd
        total += 3 * 2 * d * cfg.text.vocab_size * scored  # LM head on scored tokens (fwd + bwd)
        total += 2 * vision_params(cfg) * (cfg.vision.num_patches + 1)  # frozen tower, forward only
        total += 6 * proj * cfg.image_seq_length  # projector, trained
    return total


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(device).type == "cuda" else None


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy, bytes read + written per second (the decode roofline's denominator)."""
    if torch.device(device).type != "cuda":
        return None
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=device)  # 1 GiB
    y = torch.empty_like(x)
    t = statistics.median(timed(lambda: y.copy_(x), device, 3, 10))
    return 2 * x.numel() / t


# ---------------------------------------------------------------------------------------------
# The two DPO steps
# ---------------------------------------------------------------------------------------------


def our_model(cfg, device, dtype, seed=0):
    return random_model(cfg, seed=seed, dtype=dtype, device=device)


def optimizer_in_backward(model, lr: float):
    """Full fine-tuning in the memory of one copy of the gradients' largest tensor: each weight's AdamW
    update runs in backward as soon as its gradient is complete, and the gradient is freed at once.
    Weights and the two AdamW moments are bf16 (2 + 4 bytes per weight: 7B -> 42 GB), so 7B full DPO
    fits one 80 GB card. The price: bf16 weights round away updates below ~1/256 of a weight, so
    full fine-tuning this way wants a larger lr than fp32 master weights would (see README)."""
    optimizers = {}
    for p in model.parameters():
        if p.requires_grad:
            optimizers[p] = torch.optim.AdamW([p], lr=lr, weight_decay=0.0, fused=p.is_cuda, foreach=False)

            def hook(param):
                optimizers[param].step()
                optimizers[param].zero_grad(set_to_none=True)

            p.register_post_accumulate_grad_hook(hook)
    return optimizers


def our_dpo_step(model, pairs, processor, device, optimizer, beta=0.1):
    batch = pack_pairs(pairs, processor)
    batch.inputs["pixel_values"] = pixel_batch(model.cfg, len(pairs), device, model.dtype)

    def step():
        on_device = batch.to(device)  # each step moves its batch, as train_dpo.py's do
        with autocast(device):  # what train_dpo.py runs under: bf16 on CUDA, float32 on a CPU
            chosen, rejected = on_device.chosen_and_rejected(model(**on_device.inputs))
            loss = dpo_loss(chosen, rejected, on_device.ref_chosen, on_device.ref_rejected, beta)[0].mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step, batch.real_tokens


def paper_lora(model, adapter_dtype=None):
    """The paper's DPO recipe on a model: tower frozen, projector trained, LoRA r128/alpha256 on the
    decoder. adapter_dtype: keep the adapters in this dtype instead of train_decoder's float32 (bf16:
    no casts of A and B at every use, at the price of bf16 updates; a benchmark variant only)."""
    model.requires_grad_(False)
    train_projector(model)
    train_decoder(model, lora_r=128, lora_alpha=256, lora_dropout=0.05)
    if adapter_dtype is not None:
        for name, p in model.language_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    return model


def trainable_optimizer(model, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=params[0].is_cuda)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def decode_rate(run, new_tokens: int, device, repeat: int = 3) -> float:
    """Tokens/s of decoding alone: (time for N tokens - time for 1 token) / (N - 1)."""
    one = statistics.median(timed(lambda: run(1), device, 1, repeat))
    many = statistics.median(timed(lambda: run(new_tokens), device, 1, repeat))
    return (new_tokens - 1) / max(many - one, 1e-9)


def fast_generate(model, *args, compiled: bool, fused: bool = True, **kwargs):
    """generate() as every generation row runs it: q/k/v and gate/up fused (speed/fused.py; fused=False
    for the A/B of tests/profile_bench.py), and with compiled the compiled decode step."""
    with torch.no_grad(), (fused_projections(model) if fused else contextlib.nullcontext()):
        return generate(model, *args, decoder=compiled_decoder if compiled else plain_decoder, **kwargs)


def our_decode(model, cfg, device, prompt_len, compile_step):
    ids = torch.randint(3, 1000, (1, prompt_len), device=device)
    ids[0, 1:1 + cfg.image_seq_length] = cfg.image_token_index
    pixels = pixel_batch(cfg, 1, device, model.dtype)
    return lambda n: fast_generate(model, ids, pixels, max_new_tokens=n, eos_token_id=-1, compiled=compile_step)


# ---------------------------------------------------------------------------------------------
# Generation: annotate-style sampling and eval-style greedy batches
# ---------------------------------------------------------------------------------------------


def generation_prompts(cfg: LlavaConfig, count: int, device, seed: int = 1):
    """count multimodal prompts [count, T] (bos, the image's tokens, 24 text tokens) and their pixels."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text.vocab_size, cfg.image_token_index) - 1
    ids = torch.randint(3, vocab, (count, cfg.image_seq_length + 25), generator=g)
    ids[:, 0], ids[:, 1:1 + cfg.image_seq_length] = 1, cfg.image_token_index
    return ids.to(device), pixel_batch(cfg, count, device, torch.float32)


def answer_budgets(count: int, shortest: int, longest: int, seed: int = 2) -> list[int]:
    """Answer lengths drawn uniformly from [shortest, longest]: random weights never say </s>, so
    each answer is cut at its length instead (end-of-text is off, -1, in every path)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(shortest, longest + 1, (count,), generator=g).tolist()


def static_generation(model, ids, pixels, budgets, n: int, rows: int, temperature: float, compiled: bool,
                      shared: bool = False):
    """Today's path: batches of rows // n prompts, each decoding until its longest answer is done.
    shared: generate(num_samples=n) (each prompt prefilled once); else each prompt repeated n times."""
    per_batch = max(1, rows // n)
    pixels = pixels.to(model.dtype)
    if compiled:  # one cache (and one compiled step) sized for the longest answer serves every batch
        compiled_decoder(model, per_batch * n, cache_length(ids.shape[1], max(budgets)))

    def run():
        for start in range(0, len(ids), per_batch):
            part, longest = slice(start, start + per_batch), max(budgets[start:start + per_batch])
            prompt, image, copies = (ids[part], pixels[part], n) if shared else \
                (ids[part].repeat_interleave(n, 0), pixels[part].repeat_interleave(n, 0), 1)
            fast_generate(model, prompt, image, max_new_tokens=longest, temperature=temperature, eos_token_id=-1,
                          seed=0, num_samples=copies, compiled=compiled)

    return run


def continuous_generation(model, ids, pixels, budgets, n: int, rows: int, temperature: float, compiled: bool):
    """generate_stream: rows refilled as answers finish, each prompt prefilled once for its n samples."""
    prompts = [(ids[i], pixels[i:i + 1].to(model.dtype)) for i in range(len(ids))]
    return lambda: list(generate_stream(model, prompts, num_samples=n, slots=rows, max_new_tokens=budgets,
                                        temperature=temperature, eos_token_id=-1, seed=0, compile_step=compiled))


def generation_floor(cfg: LlavaConfig, dtype, prompt_len: int, budgets, n: int, rows: int, bandwidth, peak_tflops):
    """The least time any implementation with `rows` rows decoding at once could take for this work
    (seconds; None without the card's rates): every answer token needs a decode step, a step of `rows`
    rows reads every weight once and each row's filled cache (at the mean answer's midpoint), or does
    its FLOPs, whichever takes longer; each prompt is prefilled once at the peak rate."""
    if not bandwidth or not peak_tflops:
        return None
    t, size = cfg.text, torch.empty(0, dtype=dtype).element_size()
    params = decoder_linear_params(cfg) + t.hidden_size * t.vocab_size
    mean_len = prompt_len + statistics.mean(budgets) / 2
    kv_per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * size
    step_bytes = decode_weight_bytes(cfg, dtype) + rows * mean_len * kv_per_token
    step_flops = rows * (2 * params + 4 * t.num_layers * t.hidden_size * mean_len)
    step = max(step_bytes / bandwidth, step_flops / (peak_tflops * 1e12))
    steps = math.ceil(sum(budgets) * n / rows)
    prefill = len(budgets) * (2 * params + 4 * t.num_layers * t.hidden_size * prompt_len / 2) * prompt_len
    return steps * step + prefill / (peak_tflops * 1e12)


def generation_row(run, device, samples: int, tokens: int, floor, repeat: int, warmup: int = 1) -> dict:
    t = statistics.median(timed(run, device, warmup, repeat))
    return {"s": t, "samples_per_s": samples / t, "tokens_per_s": tokens / t, "samples": samples, "tokens": tokens,
            "fraction_of_floor": floor / t if floor else None}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def card_peak(device) -> tuple[str, float | None]:
    if torch.device(device).type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(results: dict, name: str, fn):
    """Run one measurement; a failure is recorded in the table (with its error) instead of ending the run."""
    print(f"-- {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark row that fails must not hide the others
        results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(f"   {results[name]}", flush=True)


def main(argv=None, extra_rows=None, command: str = "python -m tinyalign.speed.throughput"):
    """extra_rows(ctx) -> [(after_row, name, fn, needs)]: more rows, each run right after the named
    row of ours (the transformers reference path: tests/reference_bench.py)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=at_least(1), default=4, help="pairs per DPO step (paper setting)")
    p.add_argument("--prompt-tokens", type=at_least(1), default=64)
    p.add_argument("--answer-tokens", type=at_least(1), default=200)
    p.add_argument("--steps", type=at_least(1), default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--decode-tokens", type=at_least(1), default=128)
    p.add_argument("--samples", type=at_least(1), default=4, help="annotate-style: answers sampled per prompt")
    p.add_argument("--gen-prompts", type=at_least(1), default=16, help="annotate-style: prompts (each sampled --samples times)")
    p.add_argument("--gen-rows", type=at_least(1), default=32, help="annotate-style: rows decoding at once")
    p.add_argument("--eval-prompts", type=at_least(1), default=32, help="eval-style: greedy answers")
    p.add_argument("--eval-rows", type=at_least(1), default=16, help="eval-style: rows decoding at once")
    p.add_argument("--answers", default="50,400", help="answer lengths: shortest,longest (uniform)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: train, hf, full, decode, compile, "
                                              "generation, variants")
    p.add_argument("--rows", default="", help="comma-separated row names: run only these (default: every row not skipped)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="LoRA rows: recompute each block in backward")
    p.add_argument("--deadline", type=non_negative, default=0, help="seconds: start no new row after this (0: none)")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    cfg, device = preset(args.preset), args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    card, peak = card_peak(device)
    processor = SyntheticProcessor(cfg)
    pairs = synthetic_pairs(cfg, args.pairs, args.prompt_tokens, args.answer_tokens)
    one = pairs[:1]
    flops_lora, flops_full = dpo_step_flops(cfg, pairs, False, 128), dpo_step_flops(cfg, one, True, 0)
    results = {"preset": args.preset, "card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "gradient_checkpointing": args.gradient_checkpointing,
               "peak_bf16_tflops": peak, "pairs_per_step": args.pairs, "flops_per_step_lora": flops_lora,
               "flops_per_step_full": flops_full,
               "command": command + " " + " ".join(argv if argv is not None else sys.argv[1:])}
    started = time.time()

    def dpo_row(step_and_tokens, n_pairs, flops):
        step, tokens = step_and_tokens
        t = statistics.median(timed(step, device, 2, args.steps))
        tflops = flops / t / 1e12
        return {"s_per_step": t, "pairs_per_s": n_pairs / t, "tokens_per_s": tokens / t, "tokens_per_step": tokens,
                "tflops": tflops, "mfu": tflops / peak if peak else None, "peak_gib": peak_gib(device)}

    # ---- the rows, most important first (a --deadline cuts the tail, never the head) ---------
    def ours_lora(compiled=False, adapter_dtype=None):
        model = paper_lora(our_model(cfg, device, dtype), adapter_dtype)
        model.language_model.gradient_checkpointing = args.gradient_checkpointing
        if compiled:
            compile_blocks(model)
        model.train()
        return dpo_row(our_dpo_step(model, pairs, processor, device, trainable_optimizer(model, 5e-5)), args.pairs,
                       flops_lora)

    def ours_full():
        m = our_model(cfg, device, dtype).requires_grad_(False)
        train_projector(m)
        train_decoder(m, lora_r=0, lora_alpha=0, lora_dropout=0.0)  # every decoder weight
        m.to(dtype).train()  # pure bf16: no fp32 master copy (see optimizer_in_backward)
        optimizer_in_backward(m, 1e-5)
        return dpo_row(our_dpo_step(m, one, processor, device, None), 1, flops_full)

    prompt_len = cfg.image_seq_length + 24
    bandwidth = copy_bandwidth(device)
    weight_bytes = decode_weight_bytes(cfg, dtype)
    limit = bandwidth / weight_bytes if bandwidth else None
    results.update(decode_weight_bytes=weight_bytes, copy_bandwidth=bandwidth, decode_limit_tokens_per_s=limit)
    held = {}

    def decoder(kind, make=lambda: our_model(cfg, device, dtype).eval()):
        """One model kept across the decode rows of its kind (made by make())."""
        if kind not in held:
            held.clear()
            reset_memory(device)
            held[kind] = make()
        return held[kind]

    def decode_row(make_run, new_tokens, repeat=3):
        rate = decode_rate(make_run(), new_tokens, device, repeat)
        return {"tokens_per_s": rate, "fraction_of_limit": rate / limit if limit else None, "new_tokens": new_tokens}

    shortest, longest = map(int, args.answers.split(","))
    gen_ids, gen_pixels = generation_prompts(cfg, max(args.gen_prompts, args.eval_prompts), device)
    gen_len, compiled = gen_ids.shape[1], torch.device(device).type == "cuda"
    annotate_budgets = answer_budgets(args.gen_prompts, shortest, longest)
    eval_budgets = answer_budgets(args.eval_prompts, shortest, longest, seed=3)
    work = {"annotate": (gen_ids[:args.gen_prompts], gen_pixels[:args.gen_prompts], annotate_budgets, args.samples,
                         args.gen_rows, 0.7),
            "eval": (gen_ids[:args.eval_prompts], gen_pixels[:args.eval_prompts], eval_budgets, 1, args.eval_rows, 0.0)}
    results.update(generation_prompt_tokens=gen_len, annotate_budgets=annotate_budgets, eval_budgets=eval_budgets)

    def generation(kind, make_run, repeat=2):
        """One row of the generation table: make_run(model, ids, pixels, budgets, n, rows, temperature)."""
        ids, pixels, budgets, samples, width, _ = work[kind]
        floor = generation_floor(cfg, dtype, gen_len, budgets, samples, width, bandwidth, peak)
        run = make_run(decoder("ours"), *work[kind], compiled)
        return generation_row(run, device, len(budgets) * samples, sum(budgets) * samples, floor, repeat)

    def batched_decode_step():
        """The decode step of a batch of --eval-rows rows against its own floor (bytes or FLOPs)."""
        rows_, new = args.eval_rows, args.decode_tokens
        ids, pixels = gen_ids[:rows_], gen_pixels[:rows_].to(dtype)
        rate = decode_rate(lambda k: fast_generate(decoder("ours"), ids, pixels, max_new_tokens=k, eos_token_id=-1,
                                                   compiled=compiled), new, device)
        floor = generation_floor(cfg, dtype, gen_len, [new], 1, rows_, bandwidth, peak)
        step = 1 / rate
        return {"rows": rows_, "s_per_step": step, "tokens_per_s": rows_ * rate,
                "fraction_of_floor": floor / new / step if floor else None}

    n = args.decode_tokens
    rows = [
        ("ours_lora", ours_lora, {"train"}),
        ("ours_decode_compiled", lambda: decode_row(
            lambda: our_decode(decoder("ours"), cfg, device, prompt_len, True), n), {"decode"}),
        ("ours_decode_eager", lambda: decode_row(
            lambda: our_decode(decoder("ours"), cfg, device, prompt_len, False), n), {"decode"}),
        ("gen_annotate_continuous", lambda: generation("annotate", continuous_generation), {"generation"}),
        ("gen_annotate_shared", lambda: generation("annotate", partial(static_generation, shared=True)),
         {"generation"}),
        ("gen_annotate_static", lambda: generation("annotate", partial(static_generation, shared=False)),
         {"generation"}),
        ("gen_eval_continuous", lambda: generation("eval", continuous_generation), {"generation"}),
        ("gen_eval_static", lambda: generation("eval", partial(static_generation, shared=False)), {"generation"}),
        ("gen_decode_step", batched_decode_step, {"generation"}),
        ("ours_lora_compiled", lambda: ours_lora(compiled=True), {"compile", "train"}),
        ("ours_full", ours_full, {"full"}),
        ("ours_lora_compiled_bf16_adapters", lambda: ours_lora(compiled=True, adapter_dtype=dtype),
         {"compile", "train", "variants"}),
    ]
    if extra_rows is not None:
        ctx = SimpleNamespace(cfg=cfg, device=device, dtype=dtype, pairs=pairs, one=one, args=args, n=n,
                              prompt_len=prompt_len, flops_lora=flops_lora, flops_full=flops_full, dpo_row=dpo_row,
                              decode_row=decode_row, decoder=decoder, work=work, gen_len=gen_len, bandwidth=bandwidth,
                              peak=peak)
        for after, name, fn, needs in extra_rows(ctx):
            position = next(i for i, row in enumerate(rows) if row[0] == after) + 1
            rows.insert(position, (name, fn, needs))
    if torch.device(device).type != "cuda":
        skip.add("cuda")  # rows that only make sense on a GPU (transformers' static-cache compile)
    only = set(filter(None, args.rows.split(",")))
    for name, fn, needs in rows:
        if needs & skip or (only and name not in only):
            continue
        if args.deadline and time.time() - started > args.deadline:
            results[name] = {"error": f"not run: the --deadline of {args.deadline:.0f} s had passed"}
            continue
        if not name.startswith(("ours_decode", "hf_decode", "gen_", "hf_gen_")):
            held.clear()
        reset_memory(device)
        measure(results, name, fn)
        results["elapsed_s"] = time.time() - started
        write_atomic(args.out, json.dumps(results, indent=1))  # after every row: a cut-off run keeps what it has
    held.clear()

    # ---- the paper's run, projected ---------------------------------------------------------
    rate = max(results.get(k, {}).get("pairs_per_s") or 0 for k in ("ours_lora", "ours_lora_compiled"))
    if rate:
        results["paper_run_hours"] = 5034 * 3 / rate / 3600  # ~5k pairs x 3 epochs
    write_atomic(args.out, json.dumps(results, indent=1))
    print(table(results))
    return results


def decode_weight_bytes(cfg: LlavaConfig, dtype) -> int:
    """Bytes one decoding step must read: every decoder weight and the LM head (the embedding table
    is only indexed, the tower is not used)."""
    t = cfg.text
    per_element = torch.empty(0, dtype=dtype).element_size()
    return per_element * (decoder_linear_params(cfg) + t.hidden_size * t.vocab_size + (2 * t.num_layers + 1) * t.hidden_size)


def table(r: dict) -> str:
    def fmt(x, spec):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [f"{r['preset']} on {r['card']}, torch {r['torch']}, {r['date']}; {r['pairs_per_step']} pairs per step "
             f"(paper setting); step FLOPs counted {r['flops_per_step_lora']:.3g}",
             f"{'row':<28}{'pairs/s':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}"]
    for name in ("ours_lora", "ours_lora_compiled", "ours_lora_compiled_bf16_adapters", "hf_lora", "ours_full",
                 "hf_full"):
        row = r.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{name:<28}failed: {row['error'][:80]}")
            continue
        lines.append(f"{name:<28}{row['pairs_per_s']:>9.2f}{row['tokens_per_s']:>11.0f}{row['tflops']:>9.1f}"
                     f"{fmt(row['mfu'], '.1%'):>7}{fmt(row['peak_gib'], '.1f'):>10}")
    ours = max((r.get(k, {}).get("pairs_per_s") or 0) for k in ("ours_lora", "ours_lora_compiled"))
    if ours and r.get("hf_lora", {}).get("pairs_per_s"):
        lines.append(f"ours / transformers (paper setting): {ours / r['hf_lora']['pairs_per_s']:.2f}x")
    for name in ("ours_decode_eager", "ours_decode_compiled", "hf_decode_dynamic", "hf_decode_static_compiled"):
        row = r.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{name:<28}failed: {row['error'][:80]}")
        else:
            lines.append(f"{name:<28}{row['tokens_per_s']:>9.1f} tokens/s  {fmt(row['fraction_of_limit'], '.0%')} of the "
                         "bandwidth limit")
    gen_rows = [k for k in r if k.startswith(("gen_", "hf_gen_")) and k != "gen_decode_step"]
    if gen_rows:
        spans = {kind: f"{min(r[kind + '_budgets'])}-{max(r[kind + '_budgets'])}" for kind in ("annotate", "eval")}
        lines.append(f"generation: {r['generation_prompt_tokens']}-token multimodal prompts, answers of "
                     f"{spans['annotate']} tokens (annotate-style), {spans['eval']} (eval-style)")
    for name in sorted(gen_rows, key=lambda k: ("eval" in k, k)):
        row = r[name]
        if "error" in row:
            lines.append(f"{name:<28}failed: {row['error'][:80]}")
        else:
            lines.append(f"{name:<28}{row['samples_per_s']:>9.2f} samples/s {row['tokens_per_s']:>9.0f} tokens/s  "
                         f"{fmt(row['fraction_of_floor'], '.0%')} of its floor")
    for ours, theirs in (("gen_annotate_continuous", "hf_gen_annotate"), ("gen_eval_continuous", "hf_gen_eval"),
                         ("gen_annotate_continuous", "gen_annotate_static"), ("gen_eval_continuous", "gen_eval_static")):
        if r.get(ours, {}).get("samples_per_s") and r.get(theirs, {}).get("samples_per_s"):
            lines.append(f"{ours} / {theirs}: {r[ours]['samples_per_s'] / r[theirs]['samples_per_s']:.2f}x")
    row = r.get("gen_decode_step")
    if row and "error" not in row:
        lines.append(f"decode step, {row['rows']} rows: {row['s_per_step'] * 1e3:.2f} ms, "
                     f"{fmt(row['fraction_of_floor'], '.0%')} of its floor")
    if r.get("decode_limit_tokens_per_s"):
        lines.append(f"bandwidth limit: {r['copy_bandwidth'] / 1e12:.2f} TB/s / {r['decode_weight_bytes'] / 1e9:.1f} GB "
                     f"per token = {r['decode_limit_tokens_per_s']:.0f} tokens/s")
    if r.get("paper_run_hours"):
        lines.append(f"paper's DPO run (5,034 pairs x 3 epochs) projected: {r['paper_run_hours']:.2f} h")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
