"""The transformers reference path of the GPU benchmark, kept out of tinyalign (which never imports
transformers or peft): the same DPO step and decoding through `LlavaForConditionalGeneration`, run in
the same process as ours by tinyalign.speed.throughput.

    python tests/reference_bench.py --preset llava-1.5-7b      # ours and transformers, one table
    python tests/reference_bench.py --preset tiny              # on a CPU (tests/test_throughput.py runs it)

Rows added (each next to ours): hf_lora (peft LoRA, the TRL way: chosen and rejected rows padded and
concatenated, pixels repeated, full logits), hf_full (every weight, bf16 AdamW over all of them),
hf_decode_dynamic and hf_decode_static_compiled (`generate`, dynamic cache; static cache + compile),
hf_gen_annotate and hf_gen_eval (`generate` with num_return_sequences, dynamic cache, over the same
prompts and answer lengths as ours).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tinyalign.speed import throughput  # noqa: E402
from tinyalign.speed.throughput import pixel_batch, trainable_optimizer  # noqa: E402
from tinyalign.config_json import to_hf_dict  # noqa: E402
from tinyalign.losses import dpo_loss  # noqa: E402
from tinyalign.processor import IGNORE_INDEX  # noqa: E402
from tinyalign.training import autocast  # noqa: E402


def hf_model(cfg, device, dtype):
    from transformers import LlavaConfig as HFConfig
    from transformers import LlavaForConditionalGeneration

    hf_cfg = HFConfig(**to_hf_dict(cfg))
    hf_cfg.text_config._attn_implementation = "sdpa"
    hf_cfg.vision_config._attn_implementation = "sdpa"
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(hf_cfg).to(dtype)
    return model.eval()


def hf_dpo_step(model, pairs, cfg, device, optimizer, beta=0.1):
    """What TRL's DPOTrainer does: chosen and rejected rows padded and concatenated, the pixels
    repeated for both halves, full logits, log-softmax, gather the answer tokens."""
    rows = [e.chosen for e in pairs] + [e.rejected for e in pairs]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, :len(r.labels)] = torch.tensor(r.labels)
        mask[i, :len(r.input_ids)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    pixels = pixel_batch(cfg, len(pairs), device, next(model.parameters()).dtype)
    pixels = torch.cat([pixels, pixels])
    ref = torch.tensor([-300.0] * len(pairs) + [-310.0] * len(pairs), device=device)

    def step():
        with autocast(device):  # the same precision as our row: bf16 on CUDA, float32 on a CPU
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            logps = torch.gather(logits.float().log_softmax(-1), 2, target.clamp(min=0)[..., None]).squeeze(-1)
            logps = (logps * (target != IGNORE_INDEX)).sum(-1)
            chosen, rejected = logps.chunk(2)
            loss = dpo_loss(chosen, rejected, ref[:len(pairs)], ref[len(pairs):], beta)[0].mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step, int(mask.sum())


def hf_lora(model, r, alpha):
    """peft's LoRA on the same projections ours wraps; the projector trained; the tower frozen."""
    from peft import LoraConfig, get_peft_model

    targets = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=targets))
    for name, p in peft_model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    return peft_model


def hf_decode(model, cfg, device, prompt_len, static, max_new_tokens):
    """transformers' generate; max_new_tokens fixed (so a static cache keeps one size and compiles
    once) and a stopping criterion ending the run after n tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class After(StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids.shape[1] - prompt_len >= self.n
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    ids = torch.randint(3, 1000, (1, prompt_len), device=device)
    ids[0, 1:1 + cfg.image_seq_length] = cfg.image_token_index
    pixels = pixel_batch(cfg, 1, device, next(model.parameters()).dtype)
    extra = {"cache_implementation": "static"} if static else {}
    return lambda n: model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=max_new_tokens,
                                    min_new_tokens=n, do_sample=False, stopping_criteria=StoppingCriteriaList([After(n)]),
                                    **extra)


def hf_generation(model, ids, pixels, budgets, n, rows, temperature):
    """transformers' generate over the same work: batches of rows // n prompts, n samples each by
    num_return_sequences, each batch decoding until its longest answer (min = max new tokens)."""
    per_batch = max(1, rows // n)
    pixels = pixels.to(next(model.parameters()).dtype)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}

    def run(warm_up=False):
        for start in range(0, len(ids), per_batch):
            part, longest = slice(start, start + per_batch), max(budgets[start:start + per_batch])
            longest = 2 if warm_up else longest
            model.generate(input_ids=ids[part], pixel_values=pixels[part], attention_mask=torch.ones_like(ids[part]),
                           num_return_sequences=n, max_new_tokens=longest, min_new_tokens=longest, pad_token_id=0,
                           **sampling)
            if warm_up:
                return

    return run


def reference_rows(ctx):
    """The transformers rows, each placed after the row of ours it is compared with."""
    def lora():
        hf = hf_lora(hf_model(ctx.cfg, ctx.device, ctx.dtype), 128, 256).train()
        return ctx.dpo_row(hf_dpo_step(hf, ctx.pairs, ctx.cfg, ctx.device, trainable_optimizer(hf, 5e-5)),
                           ctx.args.pairs, ctx.flops_lora)

    def full():
        hf = hf_model(ctx.cfg, ctx.device, ctx.dtype)
        hf.requires_grad_(False)
        for part in (hf.model.language_model, hf.lm_head, hf.model.multi_modal_projector):
            part.requires_grad_(True)
        hf.train()  # pure bf16 AdamW as well, the usual way: every gradient kept until the step
        return ctx.dpo_row(hf_dpo_step(hf, ctx.one, ctx.cfg, ctx.device, trainable_optimizer(hf, 1e-5)), 1,
                           ctx.flops_full)

    def decoder():
        return ctx.decoder("hf", lambda: hf_model(ctx.cfg, ctx.device, ctx.dtype))

    def decode(static, new_tokens, repeat):
        return ctx.decode_row(lambda: hf_decode(decoder(), ctx.cfg, ctx.device, ctx.prompt_len, static, ctx.n),
                              new_tokens, repeat)

    def generation(kind):
        ids, pixels, budgets, samples, width, temperature = ctx.work[kind]
        floor = throughput.generation_floor(ctx.cfg, ctx.dtype, ctx.gen_len, budgets, samples, width, ctx.bandwidth, ctx.peak)
        run = hf_generation(decoder(), ids, pixels, budgets, samples, width, temperature)
        run(warm_up=True)  # a short call instead of a whole warm-up run: this path is slow
        return throughput.generation_row(run, ctx.device, len(budgets) * samples, sum(budgets) * samples, floor, 1,
                                    warmup=0)

    return [
        ("ours_lora", "hf_lora", lora, {"hf", "train"}),
        # After all of ours, so that each model is made (and its decode steps compiled) once.
        ("gen_decode_step", "hf_gen_annotate", lambda: generation("annotate"), {"generation", "hf"}),
        ("hf_gen_annotate", "hf_gen_eval", lambda: generation("eval"), {"generation", "hf"}),
        ("hf_gen_eval", "hf_decode_dynamic", lambda: decode(False, max(8, ctx.n // 4), 2),  # slow: fewer tokens
         {"decode", "hf"}),
        ("ours_full", "hf_decode_static_compiled", lambda: decode(True, ctx.n, 2), {"decode", "hf", "cuda"}),
        ("hf_decode_static_compiled", "hf_full", full, {"full", "hf"}),
    ]


def main(argv=None):
    return throughput.main(argv, extra_rows=reference_rows, command="python tests/reference_bench.py")


if __name__ == "__main__":
    main()
