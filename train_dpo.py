"""DPO for LLaVA-1.5, the paper's main method (Li, Lin & Pei 2024, section 3.3; Rafailov et al. 2023).

    python train_dpo.py                                     # the built-in demo (makes its SFT start first if needed)
    python train_dpo.py --model llava-v1.5-13b --data dpo_pairs.json --image-folder images/ --out runs/dpo
    python train_dpo.py --model ... --data scored.jsonl --out runs/dpo   # pairs built from ratings (build_pairs)

Each step: log-probs of the chosen and the rejected answer under the policy, minus those under the
frozen starting model (the reference), go into the DPO loss. Reference log-probs come from the data
file when it has them (the paper's file does), else from one no-grad pass before training, cached on
disk; the reference model is then freed (`--ref live` keeps a frozen copy instead). Paper defaults:
beta 0.1, sigmoid loss, summed log-probs, LoRA r128/alpha256 at lr 5e-5, projector at 2e-5, 3 epochs,
batch 8 x 4 accumulation per device.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from tinyalign import Processor, demo, load_model
from tinyalign.arguments import non_negative, number, positive
from tinyalign.data import file_digest, load_pairs, pair_examples
from tinyalign.losses import PREFERENCE_LOSSES
from tinyalign.packing import batch_maker, model_inputs, pair_logps, real_tokens, supervised_counts
from tinyalign.training import (Run, autocast, common_arguments, cosine_schedule, describe_trainable,
                                finish_distributed, init_distributed, mean_over_ranks, micro_batches, my_share,
                                optimizer_step, optimizer_steps, parse_recipe, seed_everything, split_held_out,
                                shard_fsdp, train_decoder, train_projector, trainable, wrap_ddp)

PAPER = dict(epochs=3, batch_size=8, grad_accum=4, lr=5e-5, projector_lr=2e-5, lora_r=128, lora_alpha=256,
             max_length=3000, eval_every=100, save_every=200, eval_fraction=0.02, sft_weight=0.0,
             chosen_nll_weight=0.0, packing=True)
# The demo's model is tiny and very sure of its own samples (a whole answer at log p ~ -1). Plain DPO
# then lowers chosen and rejected alike until generation breaks; an NLL term on the chosen answer
# (per token, like the authors' SFT_weight option but not summed over the answer) holds them up.
# Larger steps, LoRA of rank 32. The held-out pairs come from prompts of their own
# (demo.dpo_start), so nothing of --data is held out.
DEMO = dict(epochs=6, batch_size=16, grad_accum=1, lr=1e-3, projector_lr=3e-3, lora_r=32, lora_alpha=64,
            max_length=256, eval_every=50, save_every=50, sft_weight=0.0, chosen_nll_weight=1.0, out="runs/demo-dpo",
            packing=False)


def parse(argv=None):
    parser = common_arguments(__doc__.split("\n\n")[0])
    a = parser.add_argument
    a("--beta", type=positive, default=0.1, help="DPO: strength of the KL constraint to the reference; SimPO: the "
      "reward scale (its paper uses 2-2.5); ORPO: the weight of the odds-ratio term (its lambda)")
    a("--loss-type", default="sigmoid", choices=list(PREFERENCE_LOSSES),
      help="; ".join(f"{name}: {loss.paper}" + ("" if loss.reference else ", no reference model")
                     for name, loss in PREFERENCE_LOSSES.items()))
    a("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin gamma")
    a("--label-smoothing", type=number(0, 0.5), default=0.0, help="conservative DPO: assumed rate of flipped "
      "labels (0.5: no preference left)")
    a("--sft-weight", type=non_negative, help="the authors' SFT_weight: adds -w * mean log p(chosen), summed or averaged "
      "as the DPO term's log-probs are")
    a("--chosen-nll-weight", type=non_negative, help="adds w * the chosen answer's NLL per token (the demo's stabiliser)")
    a("--average-logps", action="store_true", help="mean instead of sum of token log-probs per answer (SimPO "
      "and ORPO always use means)")
    a("--ref", choices=["precomputed", "live"], default="precomputed",
      help="precomputed: one pass before training, cached; live: keep a frozen copy of the start model")
    a("--cache-dir", default=str(Path.home() / ".cache" / "tinyalign"), help="where precomputed reference log-probs go")
    a("--pair-seed", type=int, default=0, help="seed of build_pairs (rejected answer drawn among the worse ones)")
    args = parse_recipe(parser, argv, PAPER, DEMO)
    args.average_logps = args.average_logps or PREFERENCE_LOSSES[args.loss_type].average
    if args.out is None:
        parser.error("--out is required with --model")
    return args


def main(argv=None):
    args = parse(argv)
    rank, world = init_distributed(args)
    if world > 1 and args.fsdp and (args.demo or args.ref == "live"):
        raise SystemExit("--fsdp: the demo's report and --ref live run the model on rank 0 alone, which a sharded "
                         "model cannot do; use --ref precomputed and a --model")
    if world > 1 and PREFERENCE_LOSSES[args.loss_type].image_conditional:
        raise SystemExit(f"--loss-type {args.loss_type} runs in one process for now: its step has two forwards "
                         "(the corrupted image's too), and DDP allows one per backward")
    if args.demo:
        demo.dpo_start(args)  # no --model: the SFT demo's model and its own rated samples (tinyalign/demo.py)
    # Seeded after the demo's setup, which may have made the SFT demo's model first: the run is the
    # same draw whether or not that model was already there.
    seed_everything(args.seed)
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
    processor = Processor.from_pretrained(args.model, template=args.template, image_mode=args.image_mode,
                                          vision_tower=args.vision_tower)

    # ---- the data: preference pairs, checked up front (what is dropped is counted and printed) ------
    pairs, report = load_pairs(args.data, args.pair_seed, args.average_logps)
    print(report.summary())
    if args.eval_data:
        train_pairs = pairs
        held_pairs, held_report = load_pairs(args.eval_data, args.pair_seed, args.average_logps)
        print(f"held-out {held_report.summary()}")
    else:
        train_pairs, held_pairs = split_held_out(pairs, args.eval_fraction, args.seed)
    train, report = pair_examples(train_pairs, processor, args.image_folder, args.max_length, args.skip_bad, args.data)
    print(report.summary())
    held, report = pair_examples(held_pairs, processor, args.image_folder, args.max_length, args.skip_bad, "held-out")
    print(report.summary())
    if not train:
        raise SystemExit(f"{args.data}: no usable pairs")

    # ---- the reference: the starting model's log-probs, then (unless --ref live) no reference model --
    ref_model = None
    if not PREFERENCE_LOSSES[args.loss_type].reference:
        print(f"reference log-probs: not needed by --loss-type {args.loss_type}")
    elif args.ref == "live":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        cache = Path(args.cache_dir) / "ref_logps" / f"{cache_key(args, model_fingerprint(args.model))}.json"
        print("reference log-probs:", fill_reference(model, train + held, processor, args, cache))
    start_metrics = evaluate(model, held, processor, args, ref_model) if held else {}

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
    # --batch-size is per process: a micro-batch of the whole run holds batch_size x world pairs.
    batches = micro_batches(len(train), args.batch_size * world, args.epochs, args.seed, drop_last=world > 1)
    total_steps = optimizer_steps(len(batches), args.grad_accum, args.max_steps)
    scheduler = cosine_schedule(optimizer, total_steps, args.warmup_ratio)  # linear warmup, then cosine to 0
    run = Run(args.out, args, total_steps, rank)  # metrics.jsonl, resumable checkpoints, the progress bar
    step = run.load_state(model, optimizer, scheduler) if args.resume else 0
    if held and not args.resume:
        run.log(0, start_metrics, split="eval")
    make_batch = batch_maker(args, processor, "pairs")  # plain rows, or packed ones with --packing
    run.start_progress(step)
    model.train()

    # ---- the DPO loop ------------------------------------------------------------------------------
    while step < run.total_steps:
        group = batches[step * args.grad_accum:(step + 1) * args.grad_accum]
        logged = {}
        for micro in group:
            # B pairs -> 2B answers: plain rows (the B chosen, then the B rejected) or, with --packing,
            # B rows [prompt | chosen | rejected] whose prompt and image are computed once.
            batch = make_batch([train[i] for i in my_share(micro, rank, world)])
            with autocast(args.device):
                # One forward over both answers of every pair -> log p(answer | image, question) [2B].
                logps = trainer(**model_inputs(batch, args.device), average_logps=args.average_logps)
                policy_chosen, policy_rejected = logps.chunk(2)  # [B], [B]
                policy_corrupted = corrupted_logps(trainer, batch, args)  # mDPO only: chosen, image corrupted [B]
                reference = reference_of(batch, ref_model, args)  # the same three under the start model
                loss, metrics = preference_loss(policy_chosen, policy_rejected, policy_corrupted, *reference, batch,
                                                args)
            run.check_finite(loss, step + 1)
            (loss / len(group)).backward()
            for k, v in metrics.items():
                logged[k] = logged.get(k, 0.0) + v / len(group)
            run.count_tokens(real_tokens(batch))
        optimizer_step(model, optimizer, scheduler, args.max_grad_norm)  # clip, step, schedule, zero grads
        step += 1
        logged = {**mean_over_ranks(logged, world), "lr": scheduler.get_last_lr()[0]}
        if run.after_step(step, logged, model, optimizer, scheduler,
                          (lambda: evaluate(model, held, processor, args, ref_model)) if held else None):
            finish_distributed(world)
            return {}
    # -------------------------------------------------------------------------------------------------

    run.save_state(step, model, optimizer, scheduler)
    final = {}
    if rank == 0 or run.sharded:  # --fsdp: every process holds a share of the weights, so all take part
        final = evaluate(model, held, processor, args, ref_model) if held else {}
        if args.demo:
            final.update(demo.dpo_report(model, processor, args, start_metrics, final, len(held)))
        run.log(step, final, split="eval")
        saved = run.save_final(model, processor)
        if rank == 0:
            print(f"model saved to {saved}; metrics in {run.metrics_path}")
    run.finish()
    finish_distributed(world)
    return final


def corrupted_logps(model, batch, args):
    """log p(chosen answer | corrupted image) [B], for a loss that compares images (mDPO); else None."""
    if "corrupted" not in batch:
        return None
    return model(**model_inputs(batch["corrupted"], args.device), average_logps=args.average_logps)


def reference_of(batch, ref_model, args):
    """The reference log-probs of a micro-batch: (chosen, rejected, chosen under a corrupted image or
    None), [B] each. From the frozen copy with --ref live, else the precomputed ones the batch
    carries; all None when the loss needs no reference (losses.PREFERENCE_LOSSES)."""
    if not PREFERENCE_LOSSES[args.loss_type].reference:
        return None, None, None
    if ref_model is not None:
        with torch.no_grad():
            return (*pair_logps(ref_model, batch, args.device, args.average_logps),
                    corrupted_logps(ref_model, batch, args))
    corrupted = batch["ref_corrupted"].to(args.device) if "corrupted" in batch else None
    return batch["ref_chosen"].to(args.device), batch["ref_rejected"].to(args.device), corrupted


def preference_loss(policy_chosen, policy_rejected, policy_corrupted, ref_chosen, ref_rejected, ref_corrupted, batch,
                    args):
    """The loss of one micro-batch (--loss-type, an entry of losses.PREFERENCE_LOSSES; DPO is
    Rafailov et al. 2023, eq. 7) plus the optional NLL terms, and the numbers worth logging."""
    preference = PREFERENCE_LOSSES[args.loss_type]
    images = dict(policy_corrupted=policy_corrupted, ref_corrupted=ref_corrupted) if preference.image_conditional else {}
    losses, chosen_rewards, rejected_rewards = preference.compute(policy_chosen, policy_rejected, ref_chosen,
                                                                  ref_rejected, args, **images)
    loss = losses.mean()
    if args.sft_weight:  # the authors' term as written (mllm-dpo llava/train/llava_trainer.py:453-455)
        loss = loss - args.sft_weight * policy_chosen.mean()
    if args.chosen_nll_weight:  # the same, per token of the chosen answer
        per_token = policy_chosen if args.average_logps else \
            policy_chosen / supervised_counts(batch)[: len(losses)].clamp(min=1).to(args.device)
        loss = loss - args.chosen_nll_weight * per_token.mean()
    metrics = {"loss": loss.item(), "rewards/chosen": chosen_rewards.mean().item(),
               "rewards/rejected": rejected_rewards.mean().item(),
               "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
               "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
               "logps/chosen": policy_chosen.mean().item(), "logps/rejected": policy_rejected.mean().item(),
               "logps/accuracy": (policy_chosen > policy_rejected).float().mean().item()}
    if images:  # how much likelier the chosen answer is with its own image than with the corrupted one
        corrupted_rewards = args.beta * (policy_corrupted - ref_corrupted)
        metrics["rewards/corrupted_image"] = corrupted_rewards.mean().item()
        metrics["rewards/image_accuracy"] = (chosen_rewards > corrupted_rewards).float().mean().item()
    return loss, metrics


@torch.no_grad()
def evaluate(model, examples, processor, args, ref_model=None) -> dict:
    """Held-out metrics, the training step's own numbers: loss, reward accuracy and margin."""
    model.eval()
    totals, n = {}, 0
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        batch = batch_maker(args, processor, "pairs")(chunk)
        with autocast(args.device):
            policy_chosen, policy_rejected = pair_logps(model, batch, args.device, args.average_logps)
            metrics = preference_loss(policy_chosen, policy_rejected, corrupted_logps(model, batch, args),
                                      *reference_of(batch, ref_model, args), batch, args)[1]
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    model.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# Reference log-probs computed before training (the default, --ref precomputed)
# ---------------------------------------------------------------------------------------------


def fill_reference(model, examples, processor, args, cache_path: Path):
    """Reference log-probs: from the data file, else the disk cache, else one pass now (then cached)."""
    images = PREFERENCE_LOSSES[args.loss_type].image_conditional  # mDPO: the corrupted image's too
    missing = [e for e in examples if e.ref_chosen is None or e.ref_rejected is None
               or (images and e.ref_corrupted is None)]
    if not missing:
        return "from the data file"
    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if all(len(cached.get(e.id, [])) >= 2 + images for e in missing):  # [chosen, rejected(, corrupted)]
        for e in missing:
            e.ref_chosen, e.ref_rejected, e.ref_corrupted = (cached[e.id] + [None])[:3]
        return f"from the cache {cache_path}"
    reference_logps(model, missing, processor, args)
    cached.update({e.id: [e.ref_chosen, e.ref_rejected] + ([e.ref_corrupted] if images else []) for e in missing})
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp-{os.getpid()}")  # written whole, then renamed: never half a file
    tmp.write_text(json.dumps(cached))
    os.replace(tmp, cache_path)
    return f"computed now, cached in {cache_path}"


@torch.no_grad()
def reference_logps(model, examples, processor, args) -> None:
    """Fill ref_chosen / ref_rejected (and, for mDPO, ref_corrupted) of every example with the starting
    model's log-probs."""
    model.eval()
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        batch = batch_maker(args, processor, "pairs")(chunk)
        with autocast(args.device):
            chosen, rejected = pair_logps(model, batch, args.device, args.average_logps)
            corrupted = corrupted_logps(model, batch, args)
        corrupted = corrupted.tolist() if corrupted is not None else [None] * len(chunk)
        for e, c, r, cc in zip(chunk, chosen.tolist(), rejected.tolist(), corrupted):
            if e.ref_chosen is None or e.ref_rejected is None:  # a data file's own values stay
                e.ref_chosen, e.ref_rejected = c, r
            e.ref_corrupted = cc


def cache_key(args, model_fingerprint: str) -> str:
    parts = [model_fingerprint, file_digest(args.data), args.eval_data and file_digest(args.eval_data),
             args.max_length, args.template, args.image_mode, args.average_logps, args.pair_seed, args.image_folder]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def model_fingerprint(path) -> str:
    """Names, sizes and modification times of a checkpoint folder's files: cheap, and changes when they do."""
    files = sorted(Path(path).iterdir())
    return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])


if __name__ == "__main__":
    main()
