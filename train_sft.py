"""SFT and rejection sampling for LLaVA-1.5 (Li, Lin & Pei 2024, section 3.3).

    python train_sft.py                                  # the built-in demo: a tiny LLaVA learns the shapes world
    python train_sft.py --model llava-1.5-13b --data standard_sft.json --image-folder images/ --out runs/sft
    python train_sft.py --model ... --data scored.jsonl --select best --out runs/rs   # rejection sampling

SFT minimises token cross-entropy on the assistant answers only. Rejection sampling is the same
loss on a filtered set: of the several answers sampled for each prompt, only the top-rated one
(helpfulness + correctness + coherence). Paper defaults: LoRA r128/alpha256 at lr 4e-4, projector at
2e-5, 3 epochs, 16 x 2 accumulation per device.
"""

from __future__ import annotations

import torch

from tinyalign import Processor, demo, load_model
from tinyalign.data import read_conversations, read_scored, select_best, sft_examples
from tinyalign.losses import sft_loss
from tinyalign.packing import batch_maker, model_inputs, real_tokens, supervised_counts
from tinyalign.training import (Run, autocast, common_arguments, cosine_schedule, describe_trainable,
                                finish_distributed, init_distributed, mean_over_ranks, micro_batches, my_share,
                                optimizer_step, optimizer_steps, parse_recipe, seed_everything, split_held_out,
                                sum_over_ranks, shard_fsdp, train_decoder, train_projector, trainable, wrap_ddp)

PAPER = dict(epochs=3, batch_size=16, grad_accum=2, lr=4e-4, projector_lr=2e-5, lora_r=128, lora_alpha=256,
             max_length=2048, eval_every=200, save_every=500, eval_fraction=0.02, packing=True)
# The demo trains a tiny model from scratch (decoder fully, the projector with a large step).
DEMO = dict(epochs=4, batch_size=16, grad_accum=1, lr=1e-3, projector_lr=1e-2, lora_r=0, lora_alpha=0,
            max_length=256, eval_every=100, save_every=200, eval_fraction=0.02, out="runs/demo-sft",
            packing=False)


def parse(argv=None):
    parser = common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--select", choices=["all", "best"], default="all",
                        help="'best': rejection sampling; --data is a scored-samples file, the top answer per prompt is kept")
    args = parse_recipe(parser, argv, PAPER, DEMO)
    if args.out is None:
        parser.error("--out is required with --model")
    return args


def load_records(args):
    if args.select == "best":
        scored, report = read_scored(args.data)
        return select_best(scored), report
    return read_conversations(args.data)


def main(argv=None):
    args = parse(argv)
    rank, world = init_distributed(args)
    if world > 1 and args.fsdp and args.demo:
        raise SystemExit("--fsdp: the demo's report runs the model on rank 0 alone, which a sharded model cannot "
                         "do; give a --model")
    seed_everything(args.seed)
    if args.demo:  # no --model: the shapes world and a tiny LLaVA with random weights (tinyalign/demo.py)
        model, processor = demo.sft_start(args)
    else:
        model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
        processor = Processor.from_pretrained(args.model, template=args.template, image_mode=args.image_mode,
                                              vision_tower=args.vision_tower)

    # Data: read and validated up front; too-long or unusable records are counted, not hidden.
    records, report = load_records(args)
    print(report.summary())
    if args.eval_data:
        train_records, (held_records, _) = records, read_conversations(args.eval_data)
    else:
        train_records, held_records = split_held_out(records, args.eval_fraction, args.seed)
    final = train(args, model, processor, train_records, held_records, rank, world)
    if args.demo and rank == 0:
        final.update(demo.sft_report(model, processor, args))
    finish_distributed(world)
    return final


def train(args, model, processor, train_records, held_records, rank=0, world=1) -> dict:
    """Token cross-entropy on the answers of `train_records` (SFT, rejection sampling and SteerLM all
    come here); held-out loss every --eval-every steps and at the end; the merged model to out/model."""
    examples, report = sft_examples(train_records, processor, args.image_folder, args.max_length, args.skip_bad,
                                    args.data)
    print(report.summary())
    held, _ = sft_examples(held_records, processor, args.image_folder, args.max_length, args.skip_bad, "held-out")
    if not examples:
        raise SystemExit(f"{args.data}: no usable training examples")

    # ---- the recipe (paper section 3.3): what trains, at which rate, on which schedule ---------------
    model.requires_grad_(False)  # everything frozen to begin with; the CLIP tower stays so
    train_projector(model)  # the projector trains fully...
    train_decoder(model, args.lora_r, args.lora_alpha, args.lora_dropout)  # ...the decoder via LoRA
    print(describe_trainable(model))
    model.language_model.gradient_checkpointing = args.gradient_checkpointing
    if args.compile:
        model.language_model.compile_blocks()  # after LoRA is in place: the adapters compile with each block
    # The model itself; with several processes its DDP wrapper, or (--fsdp) the model sharded in place,
    # its parameters replaced by sharded ones: so the optimizer is made after this, from what trains now.
    trainer = shard_fsdp(model, world, args.device) if args.fsdp else wrap_ddp(model, world, args.device)
    optimizer = torch.optim.AdamW([{"params": trainable(model.language_model, model.lm_head), "lr": args.lr,
                                    "name": "decoder"},
                                   {"params": trainable(model.multi_modal_projector), "lr": args.projector_lr,
                                    "name": "projector"}], weight_decay=args.weight_decay)
    # --batch-size is per process: a micro-batch of the whole run holds batch_size x world examples.
    batches = micro_batches(len(examples), args.batch_size * world, args.epochs, args.seed, drop_last=world > 1)
    total_steps = optimizer_steps(len(batches), args.grad_accum, args.max_steps)
    scheduler = cosine_schedule(optimizer, total_steps, args.warmup_ratio)  # linear warmup, then cosine to 0
    run = Run(args.out, args, total_steps, rank)  # metrics.jsonl, resumable checkpoints, the progress bar
    step = run.load_state(model, optimizer, scheduler) if args.resume else 0
    pixel_cache = {}  # the demo's images are tiny: decode each once
    make_batch = batch_maker(args, processor, "sft")  # plain rows, or packed ones with --packing
    run.start_progress(step)
    model.train()

    # ---- the SFT loop ------------------------------------------------------------------------------
    while step < run.total_steps:
        group = batches[step * args.grad_accum:(step + 1) * args.grad_accum]
        step_loss = 0.0
        for micro in group:
            batch = make_batch([examples[i] for i in my_share(micro, rank, world)], pixel_cache if args.demo else None)
            # Token-mean over the whole micro-batch (all processes), whatever each process holds.
            n_tokens = sum_over_ranks(supervised_counts(batch).sum().to(args.device), world).clamp(min=1)
            with autocast(args.device):
                answer_logps = trainer(**model_inputs(batch, args.device))  # [B]: log p(answer | image, question)
                loss = sft_loss(answer_logps, n_tokens) * world / len(group)  # x world: DDP averages over processes
            run.check_finite(loss, step + 1)
            loss.backward()
            step_loss += loss.item()
            run.count_tokens(real_tokens(batch))
        optimizer_step(model, optimizer, scheduler, args.max_grad_norm)  # clip, step, schedule, zero grads
        step += 1
        logged = {**mean_over_ranks({"loss": step_loss}, world), "lr": scheduler.get_last_lr()[0]}
        if run.after_step(step, logged, model, optimizer, scheduler,
                          (lambda: evaluate(model, held, processor, args)) if held else None):
            return {}
    # -------------------------------------------------------------------------------------------------

    run.save_state(step, model, optimizer, scheduler)
    final = {}
    if rank == 0 or run.sharded:  # --fsdp: every process holds a share of the weights, so all take part
        final = evaluate(model, held, processor, args) if held else {}
        run.log(step, final, split="eval")
        saved = run.save_final(model, processor)
        if rank == 0:
            print(f"\nheld-out: {', '.join(f'{k} {v:.4f}' for k, v in final.items())}")
            print(f"model saved to {saved}; metrics in {run.metrics_path}")
    run.finish()
    return final


@torch.no_grad()
def evaluate(model, examples, processor, args) -> dict:
    """Held-out token cross-entropy on the answers."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), args.batch_size):
        batch = batch_maker(args, processor, "sft")(examples[start:start + args.batch_size])
        with autocast(args.device):
            total -= model(**model_inputs(batch, args.device)).sum().item()  # the answers' summed log-probs
        tokens += int(supervised_counts(batch).sum())
    model.train()
    return {"loss": total / max(tokens, 1)}


if __name__ == "__main__":
    main()
