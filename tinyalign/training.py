"""The training pieces the three scripts call by name, so that each script shows its recipe and its
method's loop in order: what trains (`paper_recipe`), the optimizer, the data order and the schedule
(`optimizer_and_schedule`), the precision (`autocast`), one optimizer step (`optimizer_step`).

The run folder, checkpoints and several processes are infrastructure (tinyalign/infra/).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn as nn

from .lora import apply_lora

# ---------------------------------------------------------------------------------------------
# What trains (the paper's section 3.3)
# ---------------------------------------------------------------------------------------------


def paper_recipe(model, args) -> None:
    """What trains, as the paper's section 3.3 has it: everything frozen to begin with (the CLIP tower
    stays so), then the projector fully and the decoder through LoRA adapters (r --lora-r, alpha
    --lora-alpha, on every projection), or fully with --lora-r 0."""
    model.requires_grad_(False)
    train_projector(model)
    train_decoder(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    print(describe_trainable(model))


def train_projector(model) -> list[nn.Parameter]:
    """The projector trains fully. Its weights are kept in float32 even when the rest is bf16: AdamW's
    small updates would vanish in bf16 (the compute still runs in bf16 under autocast)."""
    model.multi_modal_projector.float().requires_grad_(True)
    return list(model.multi_modal_projector.parameters())


def train_decoder(model, lora_r: int, lora_alpha: float, lora_dropout: float) -> list[nn.Parameter]:
    """lora_r > 0: LoRA adapters on every decoder projection (tinyalign/lora.py), in float32, the
    decoder's own weights frozen; lora_r 0: the whole decoder and the LM head train."""
    if lora_r > 0:
        apply_lora(model.language_model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
        for name, p in model.language_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    else:
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return [p for m in (model.language_model, model.lm_head) for p in m.parameters() if p.requires_grad]


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    """The parameters of these modules that train, in module order (what the optimizer steps)."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def describe_trainable(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"


def compile_blocks(model) -> None:
    """torch.compile each decoder block (the same code, so the 32 or 40 blocks share one compiled
    graph): norms, RoPE, the SwiGLU and the residual adds fuse into few kernels around the matmuls
    and the (already compiled) attention. Done at the call site, after LoRA is in place, so the
    adapters compile with each block; the model's own code stays plain."""
    for block in model.language_model.layers:
        block.compile(dynamic=False)


# ---------------------------------------------------------------------------------------------
# The optimizer, the data order and the schedule
# ---------------------------------------------------------------------------------------------


def optimizer_and_schedule(model, args, n_examples: int, world: int = 1):
    """AdamW with one group per learning rate (the decoder at --lr, the projector at --projector-lr),
    the run's optimizer steps (each a list of --grad-accum micro-batches of example indices, every
    epoch a fresh seeded permutation) and the schedule over them: linear warmup, then cosine to 0.
    --batch-size is per process: a micro-batch of the whole run holds batch_size x world examples.
    Made from what trains now, so after `distribute` (with --fsdp the parameters are shards).
    -> (optimizer, scheduler, steps)."""
    optimizer = torch.optim.AdamW([{"params": trainable(model.language_model, model.lm_head), "lr": args.lr,
                                    "name": "decoder"},
                                   {"params": trainable(model.multi_modal_projector), "lr": args.projector_lr,
                                    "name": "projector"}], weight_decay=args.weight_decay)
    batches = micro_batches(n_examples, args.batch_size * world, args.epochs, args.seed, drop_last=world > 1)
    steps = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)][:args.max_steps]
    return optimizer, cosine_schedule(optimizer, len(steps), args.warmup_ratio), steps


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to zero."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Data order: a function of (seed, epoch) alone, so a resumed run sees exactly the same batches.
def micro_batches(n_examples: int, batch_size: int, epochs: float, seed: int, drop_last: bool = False) -> list[list[int]]:
    """Every micro-batch of the run, in order: each epoch is a fresh seeded permutation.
    drop_last: leave out a short last batch of each epoch (so that several processes split evenly)."""
    batches = []
    for epoch in range(math.ceil(epochs)):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        if epoch + 1 > epochs:  # a fractional last epoch
            order = order[: int(round((epochs - epoch) * n_examples))]
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)
                    if not drop_last or i + batch_size <= len(order)]
    return batches


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded fraction held out, at least one item each when there are two."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------


def autocast(device: str):
    """bf16 autocast on CUDA (the paper's precision); plain float32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def optimizer_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float):
    """Clip the global gradient norm, step, advance the schedule, clear the gradients."""
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
