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
from tinyalign.infra.arguments import common_arguments, parse_recipe
from tinyalign.infra.processes import (distribute, finish_distributed, init_distributed, mean_over_ranks, my_share,
                                       refuse_unsupported, sum_over_ranks)
from tinyalign.infra.run import Run
from tinyalign.losses import sft_loss
from tinyalign.packing import sft_batch
from tinyalign.training import (autocast, optimizer_and_schedule, optimizer_step, paper_recipe, seed_everything,
                                split_held_out)

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
        print(report.summary())
        return select_best(scored)
    return read_conversations(args.data)


def main(argv=None):
    args = parse(argv)
    rank, world = init_distributed(args)
    refuse_unsupported(args, world, image_conditional=False)
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
                                    args.data, images_anywhere=args.images_outside_folder)
    print(report.summary())
    held, _ = sft_examples(held_records, processor, args.image_folder, args.max_length, args.skip_bad, "held-out",
                           images_anywhere=args.images_outside_folder)
    if not examples:
        raise SystemExit(f"{args.data}: no usable training examples")

    def batch_of(examples):  # plain rows, or packed ones with --packing
        return sft_batch(examples, processor, args.packing, args.pack_tokens, pixel_cache if args.demo else None)

    # ---- the recipe (paper section 3.3): what trains, at which rate, on which schedule ---------------
    paper_recipe(model, args)  # the tower frozen, the projector fully, the decoder via LoRA (--lora-r 0: fully)
    trainer = distribute(model, args, world)  # compiled blocks; with several processes DDP, or FSDP2 shards
    optimizer, scheduler, steps = optimizer_and_schedule(model, args, len(examples), world)  # AdamW, warmup + cosine
    run = Run(args.out, args, len(steps), rank)  # metrics.jsonl, resumable checkpoints, the progress bar
    step = run.load_state(model, optimizer, scheduler) if run.resuming else 0
    pixel_cache = {}  # the demo's images are tiny: decode each once
    run.start_progress(step)
    model.train()

    # ---- the SFT loop ------------------------------------------------------------------------------
    while step < run.total_steps:
        step_loss = 0.0
        for micro in steps[step]:  # --grad-accum micro-batches
            batch = batch_of([examples[i] for i in my_share(micro, rank, world)]).to(args.device)
            # Token-mean over the whole micro-batch (all processes), whatever each process holds.
            n_tokens = sum_over_ranks(batch.answer_tokens.sum(), world).clamp(min=1)
            with autocast(args.device):
                answer_logps = trainer(**batch.inputs)  # [B]: log p(answer | image, question)
                # x world: DDP averages the gradients over processes; / accumulation: a step's mean
                loss = sft_loss(answer_logps, n_tokens) * world / len(steps[step])
            run.check_finite(loss, step + 1)
            loss.backward()
            step_loss += loss.item()
            run.count_tokens(batch.real_tokens)
        optimizer_step(model, optimizer, scheduler, args.max_grad_norm)  # clip, step, schedule, zero grads
        step += 1
        logged = {**mean_over_ranks({"loss": step_loss}, world), "lr": scheduler.get_last_lr()[0]}
        if run.after_step(step, logged, model, optimizer, scheduler,
                          (lambda: evaluate(model, held, batch_of, args)) if held else None):
            return {}
    # -------------------------------------------------------------------------------------------------

    run.save_state(step, model, optimizer, scheduler)
    final = {}
    if rank == 0 or run.sharded:  # --fsdp: every process holds a share of the weights, so all take part
        final = evaluate(model, held, batch_of, args) if held else {}
        run.log(step, final, split="eval")
        saved = run.save_final(model, processor)
        if rank == 0:
            print(f"\nheld-out: {', '.join(f'{k} {v:.4f}' for k, v in final.items())}")
            print(f"model saved to {saved}; metrics in {run.metrics_path}")
    run.finish()
    return final


@torch.no_grad()
def evaluate(model, examples, batch_of, args) -> dict:
    """Held-out token cross-entropy on the answers."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), args.batch_size):
        batch = batch_of(examples[start:start + args.batch_size]).to(args.device)
        with autocast(args.device):
            total -= model(**batch.inputs).sum().item()  # the answers' summed log-probs
        tokens += int(batch.answer_tokens.sum())
    model.train()
    return {"loss": total / max(tokens, 1)}


if __name__ == "__main__":
    main()
