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

import argparse
import copy
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from tinyalign import Processor, demo, load_model
from tinyalign.batches import PairBatch, mean_per_token, pair_logps
from tinyalign.data import Scored, build_pairs, load_pairs, pair_examples, read_jsonl
from tinyalign.evaluation import annotate
from tinyalign.infra.arguments import (add_loss_options, at_least, common_arguments, loss_hyperparameters,
                                      non_negative, parse_recipe)
from tinyalign.infra.files import write_atomic
from tinyalign.infra.processes import (distribute, finish_distributed, init_distributed, mean_over_ranks, my_share,
                                       refuse_unsupported)
from tinyalign.infra.reference import ReferenceCache
from tinyalign.infra.run import Run
from tinyalign.lora import adapters_off
from tinyalign.losses import PREFERENCE_LOSSES, PreferenceLoss, reward_metrics
from tinyalign.packing import pair_batch
from tinyalign.training import (autocast, optimizer_and_schedule, optimizer_step, paper_recipe, seed_everything,
                                split_held_out)

PAPER = dict(epochs=3, batch_size=8, grad_accum=4, lr=5e-5, projector_lr=2e-5, lora_r=128, lora_alpha=256,
             max_length=3000, eval_every=100, save_every=200, eval_fraction=0.02, sft_weight=0.0,
             chosen_nll_weight=0.0, packing=True, snapshot_every=0, judge="openai", sample_tokens=512, prompts=None)
# The demo's model is tiny and very sure of its own samples (a whole answer at log p ~ -1). Plain DPO
# then lowers chosen and rejected alike until generation breaks; an NLL term on the chosen answer
# (per token, like the authors' SFT_weight option but not summed over the answer) holds them up.
# Larger steps, LoRA of rank 32. The held-out pairs come from prompts of their own
# (demo.dpo_start), so nothing of --data is held out.
DEMO = dict(epochs=6, batch_size=16, grad_accum=1, lr=1e-3, projector_lr=3e-3, lora_r=32, lora_alpha=64,
            max_length=256, eval_every=50, save_every=50, sft_weight=0.0, chosen_nll_weight=1.0, out="runs/demo-dpo",
            packing=False, snapshot_every=50,  # snapshots: the per-token view of training midway (lab/tokens.py)
            judge="rules", sample_tokens=24, prompts="runs/demo-data/prompts.jsonl")  # --rounds in the shapes world


def parse(argv=None):
    parser = common_arguments(__doc__.split("\n\n")[0])
    add_loss_options(parser, PREFERENCE_LOSSES)  # --loss-type, and each loss's hyperparameters (--beta, ...)
    a = parser.add_argument
    a("--sft-weight", type=non_negative, help="the authors' SFT_weight: adds -w * mean log p(chosen), summed or averaged "
      "as the DPO term's log-probs are")
    a("--chosen-nll-weight", type=non_negative, help="adds w * the chosen answer's NLL per token (the demo's stabiliser)")
    a("--average-logps", action="store_true", help="mean instead of sum of token log-probs per answer (SimPO "
      "and ORPO always use means)")
    a("--ref", choices=["precomputed", "live"], default="precomputed",
      help="precomputed: one pass before training, cached; live: keep a frozen copy of the start model")
    a("--cache-dir", default=str(Path.home() / ".cache" / "tinyalign"), help="where precomputed reference log-probs go")
    a("--pair-seed", type=int, default=0, help="seed of build_pairs (rejected answer drawn among the worse ones)")
    on_policy = parser.add_argument_group("iterative (on-policy) DPO: --rounds K")
    on_policy.add_argument("--rounds", type=at_least(0), default=0, help="0: DPO on the pairs of --data (the paper's "
                           "offline recipe). K: K rounds of: sample answers from the current model, rate them, build "
                           "pairs (the paper's rule), DPO from that model with it as the reference; each round takes "
                           "its own 1/K of --prompts, so K rounds ask the judge as often as one (1: offline DPO, its "
                           "sampling done here)")
    on_policy.add_argument("--prompts", help="--rounds, --online: JSONL {id, image?, prompt} to sample from")
    on_policy.add_argument("--anchor", choices=["round", "start"], default="round", help="--rounds: the reference of "
                           "each round: its own start model (round, the default: the KL anchor moves with the policy, "
                           "so every round can go further), or the first round's (start: every round held near it)")
    on_policy.add_argument("--judge", choices=["openai", "rules"], help="--rounds, --online: who rates the samples "
                           "(annotate's --judge: an endpoint, or the shapes world's rules)")
    on_policy.add_argument("--judge-url", default="https://api.openai.com/v1")
    on_policy.add_argument("--judge-model", default="gpt-4o")
    on_policy.add_argument("--online", action="store_true", help="online DPO: every step samples answers to "
                           "--batch-size x --grad-accum prompts from the policy as it is, the judge rates them and one "
                           "DPO step trains on the pairs the paper's rule keeps (one pass over --prompts per epoch)")
    on_policy.add_argument("--samples-per-prompt", type=at_least(1), default=4, help="--rounds, --online: answers "
                           "sampled per prompt")
    on_policy.add_argument("--sample-tokens", type=at_least(1), help="--rounds, --online: longest sampled answer")
    args = parse_recipe(parser, argv, PAPER, DEMO)
    args.reference_model = None  # the reference's folder when it is not --model's (--rounds --anchor start)
    args.average_logps = args.average_logps or PREFERENCE_LOSSES[args.loss_type].average
    if args.out is None:
        parser.error("--out is required with --model")
    return args


def main(argv=None, args=None):
    """One DPO run: --model trained on the pairs of --data, into --out. args: already parsed (a round of
    --rounds calls this with its own)."""
    if args is None:
        args = parse(argv)
        if args.demo:
            demo.dpo_start(args)  # no --model: the SFT demo's model and its own rated samples (tinyalign/demo/)
        if args.rounds and args.online:
            raise SystemExit("--rounds and --online are two ways to train on-policy: choose one")
        if args.rounds:
            return iterative(args)  # on-policy: sample, rate, pair and train, K times (below)
        if args.online:
            return online(args)  # on-policy at every step (below)
    preference = PREFERENCE_LOSSES[args.loss_type]  # the loss and what it needs (tinyalign/losses.py)
    hyperparameters = loss_hyperparameters(preference, args)  # its keyword arguments: {"beta": 0.1, ...}
    rank, world = init_distributed(args)
    refuse_unsupported(args, world, preference.image_conditional)
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
    train, report = pair_examples(train_pairs, processor, args.image_folder, args.max_length, args.skip_bad, args.data,
                                  images_anywhere=args.images_outside_folder)
    print(report.summary())
    held, report = pair_examples(held_pairs, processor, args.image_folder, args.max_length, args.skip_bad, "held-out",
                                 images_anywhere=args.images_outside_folder)
    print(report.summary())
    if not train:
        raise SystemExit(f"{args.data}: no usable pairs")

    def batch_of(examples) -> PairBatch:  # B pairs -> 2B answers: plain rows, or packed ones with --packing
        batch = pair_batch(examples, processor, args.packing, args.pack_tokens, preference.image_conditional)
        return batch.to(args.device)

    # ---- the reference: the starting model's log-probs, then (unless --ref live) no reference model --
    # (--rounds --anchor start: every round's reference is the first round's start, args.reference_model)
    anchor = load_model(args.reference_model, device=args.device) if args.reference_model else model
    reference = None
    if not preference.reference:
        print(f"reference log-probs: not needed by --loss-type {args.loss_type}")
    elif args.ref == "live":
        reference = copy.deepcopy(anchor).eval().requires_grad_(False)
    else:
        print("reference log-probs:", precompute_reference(anchor, train + held, batch_of, preference, args))
    del anchor
    step_of = dict(preference=preference, hyperparameters=hyperparameters, args=args, reference=reference)
    start_metrics = evaluate(model, held, batch_of, step_of, args) if held else {}

    # ---- the recipe (paper section 3.3): what trains, at which rate, on which schedule ---------------
    paper_recipe(model, args)  # the tower frozen, the projector fully, the decoder via LoRA (--lora-r 0: fully)
    trainer = distribute(model, args, world)  # compiled blocks; with several processes DDP, or FSDP2 shards
    optimizer, scheduler, steps = optimizer_and_schedule(model, args, len(train), world)  # AdamW, warmup + cosine
    run = Run(args.out, args, len(steps), rank)  # metrics.jsonl, resumable checkpoints, the progress bar
    step = run.load_state(model, optimizer, scheduler) if run.resuming else 0
    if held and not run.resuming:
        run.log(0, start_metrics, split="eval")
    run.start_progress(step)
    model.train()

    # ---- the DPO loop ------------------------------------------------------------------------------
    while step < run.total_steps:
        logged = {}
        for micro in steps[step]:  # --grad-accum micro-batches of B pairs each
            batch = batch_of([train[i] for i in my_share(micro, rank, world)])
            with autocast(args.device):
                loss, metrics = dpo_step(trainer, batch, **step_of)
            run.check_finite(loss, step + 1)
            (loss / len(steps[step])).backward()
            for k, v in metrics.items():
                logged[k] = logged.get(k, 0.0) + v / len(steps[step])
            run.count_tokens(batch.real_tokens)
        optimizer_step(model, optimizer, scheduler, args.max_grad_norm)  # clip, step, schedule, zero grads
        step += 1
        logged = {**mean_over_ranks(logged, world), "lr": scheduler.get_last_lr()[0]}
        if run.after_step(step, logged, model, optimizer, scheduler,
                          (lambda: evaluate(model, held, batch_of, step_of, args)) if held else None):
            finish_distributed(world)
            return {}
    # -------------------------------------------------------------------------------------------------

    run.save_state(step, model, optimizer, scheduler)
    final = {}
    if rank == 0 or run.sharded:  # --fsdp: every process holds a share of the weights, so all take part
        final = evaluate(model, held, batch_of, step_of, args) if held else {}
        if args.demo:
            final.update(demo.dpo_report(model, processor, args, start_metrics, final, len(held)))
        run.log(step, final, split="eval")
        saved = run.save_final(model, processor)
        if rank == 0:
            print(f"model saved to {saved}; metrics in {run.metrics_path}")
    run.finish()
    finish_distributed(world)
    return final


def iterative(args):
    """--rounds K, DPO on its own samples (on-policy, as RLAIF-V iterates it): round k samples
    --samples-per-prompt answers from the current model for its share of the prompts, the judge rates
    them (annotate, which resumes where a kill left it), and DPO trains from that model, with that model
    as the reference (--anchor round: the KL anchor moves with the policy, so each round can go further;
    --anchor start keeps the first round's start), on the pairs the paper's rule keeps. Everything of round k stays in OUT/round-k: its prompts, rated samples, run
    and model. --resume picks up in whichever round and step the run stopped."""
    if args.prompts is None:
        raise SystemExit("--rounds needs --prompts: the prompts each round samples answers to")
    out, prompts = Path(args.out), read_jsonl(args.prompts)
    if any(out.glob("round-*")) and not (args.resume or args.overwrite):
        raise SystemExit(f"{out} holds the rounds of an iterative run: --resume continues it, --overwrite starts over "
                         "(deleting them, rated samples included)")
    if args.overwrite and not args.resume:
        for old in out.glob("round-*"):
            shutil.rmtree(old)  # a new run: no round of an earlier one is taken as done
    model, final = args.model, {}
    for k in range(1, args.rounds + 1):
        folder, run = out / f"round-{k}", out / f"round-{k}" / "dpo"
        samples = folder / "samples.jsonl"
        if (run / "model" / "config.json").exists():  # a round that ended is done
            model = run / "model"
            continue
        if not run.exists():  # once its DPO run has started, a round's samples are what it trains on: kept as they are
            folder.mkdir(parents=True, exist_ok=True)
            share = folder / "prompts.jsonl"
            write_atomic(share, "".join(json.dumps(p) + "\n" for p in prompts[k - 1::args.rounds]))
            print(f"\n== round {k} of {args.rounds}: sampling and rating with {model}", flush=True)
            annotate.main(["--model", str(model), "--prompts", str(share), "--image-folder", args.image_folder,
                           "--out", str(samples), "--n", str(args.samples_per_prompt), "--judge", args.judge,
                           "--judge-url", args.judge_url, "--judge-model", args.judge_model, "--temperature", "0.7",
                           "--max-new-tokens", str(args.sample_tokens), "--seed", str(args.seed * 1000 + k),
                           "--device", args.device] + (["--images-outside-folder"] if args.images_outside_folder else []))
        print(f"== round {k}: DPO on its pairs, from {model}, against "
              f"{args.model if args.anchor == 'start' else model}", flush=True)
        anchor = str(args.model) if args.anchor == "start" and k > 1 else None
        final = main(args=argparse.Namespace(**{**vars(args), "model": str(model), "data": str(samples),
                                                 "out": str(run), "reference_model": anchor, "resume": run.exists(),
                                                 "overwrite": False}))
        if not (run / "model" / "config.json").exists():  # --stop-after ended this session inside the round
            print(f"stopped in round {k}; continue with --resume")
            return final
        model = run / "model"
    return final


def online(args):
    """--online, DPO from online AI feedback (Guo et al. 2024, arXiv 2402.04792): every step takes
    --batch-size x --grad-accum prompts, samples --samples-per-prompt answers to each from the policy as it is at that
    step, has the judge rate them, and takes one DPO step (the same `dpo_step`) on the pairs the paper's
    rule keeps; prompts whose answers give no pair are counted (prompts/paired). The reference is the
    start model: with LoRA the policy itself with its adapters off and its starting projector
    (`as_start_model`: no second copy in memory), with --lora-r 0 a frozen copy. One process."""
    preference = PREFERENCE_LOSSES[args.loss_type]
    if preference.image_conditional or not preference.reference:
        raise SystemExit(f"--online: --loss-type {args.loss_type} is not supported (a loss on a reference, "
                         "without a corrupted image)")
    if args.prompts is None:
        raise SystemExit("--online needs --prompts: the prompts each step samples answers to")
    hyperparameters = loss_hyperparameters(preference, args)
    rank, world = init_distributed(args)
    if world > 1:
        raise SystemExit("--online runs in one process (start it without torchrun)")
    seed_everything(args.seed)
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
    processor = Processor.from_pretrained(args.model, template=args.template, image_mode=args.image_mode,
                                          vision_tower=args.vision_tower)
    prompts, report = annotate.read_prompts(args.prompts, args.image_folder, args.images_outside_folder)
    print(report.summary())
    judge = annotate.make_judge(args)
    held = []  # held-out pairs (--eval-data), their reference log-probs the start model's, computed once
    if args.eval_data:
        held, report = pair_examples(load_pairs(args.eval_data, args.pair_seed, args.average_logps)[0], processor,
                                     args.image_folder, args.max_length, args.skip_bad, "held-out",
                                     images_anywhere=args.images_outside_folder)
        print(report.summary())

    def batch_of(examples) -> PairBatch:
        return pair_batch(examples, processor, args.packing, args.pack_tokens).to(args.device)

    # the reference log-probs come with each batch (computed just before the step), so no reference here
    step_of = dict(preference=preference, hyperparameters=hyperparameters, args=args, reference=None)
    if held:
        print("reference log-probs:", precompute_reference(model, held, batch_of, preference, args))
    start_metrics = evaluate(model, held, batch_of, step_of, args) if held else {}
    # the start model, to score the reference with: with LoRA, the policy itself with its adapters off and
    # this copy of its projector (taken before paper_recipe makes it float32); with --lora-r 0, a copy
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if not args.lora_r else None
    start_projector = copy.deepcopy(model.multi_modal_projector).requires_grad_(False) if args.lora_r else None
    paper_recipe(model, args)
    trainer = distribute(model, args, world)  # compiled blocks (--compile), --gradient-checkpointing
    optimizer, scheduler, steps = optimizer_and_schedule(model, args, len(prompts), world)  # a step: B prompts
    run = Run(args.out, args, len(steps), rank)
    step = run.load_state(model, optimizer, scheduler) if run.resuming else 0
    if held and not run.resuming:
        run.log(0, start_metrics, split="eval")
    run.start_progress(step)

    # ---- the online DPO loop: sample and rate with the policy as it is, then the same DPO step --------
    while step < run.total_steps:
        asked = sum(len(micro) for micro in steps[step])
        with_pairs = []  # this step's micro-batches that gave pairs, as examples
        for micro in steps[step]:
            chunk = [prompts[i] for i in micro]
            rated = sample_and_rate(model, processor, judge, chunk, micro, args, step)  # the policy's answers, rated
            pairs, _ = build_pairs(rated, seed=args.pair_seed + step)  # the paper's rule; the rest counted below
            examples, _ = pair_examples(pairs, processor, args.image_folder, args.max_length,
                                        images_anywhere=args.images_outside_folder)
            if examples:
                with_pairs.append(examples)
        logged = {}
        for examples in with_pairs:  # the same DPO step as offline, each micro-batch weighing the same
            batch = batch_of(examples)
            with torch.no_grad(), autocast(args.device), as_start_model(model, start_projector, frozen) as reference:
                batch.ref_chosen, batch.ref_rejected = pair_logps(reference, batch, args.average_logps)
            with autocast(args.device):
                loss, metrics = dpo_step(trainer, batch, **step_of)
            run.check_finite(loss, step + 1)
            (loss / len(with_pairs)).backward()
            for k, v in metrics.items():
                logged[k] = logged.get(k, 0.0) + v / len(with_pairs)
        optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        step += 1
        paired = sum(len(examples) for examples in with_pairs)
        logged.update({"prompts/paired": paired / asked,  # the share of this step's prompts that gave a pair
                       "judged_answers": asked * args.samples_per_prompt, "lr": scheduler.get_last_lr()[0]})
        if run.after_step(step, logged, model, optimizer, scheduler,
                          (lambda: evaluate(model, held, batch_of, step_of, args)) if held else None):
            return {}
    # -------------------------------------------------------------------------------------------------

    run.save_state(step, model, optimizer, scheduler)
    final = evaluate(model, held, batch_of, step_of, args) if held else {}
    if args.demo:
        final.update(demo.dpo_report(model, processor, args, start_metrics, final, len(held)))
    run.log(step, final, split="eval")
    print(f"model saved to {run.save_final(model, processor)}; metrics in {run.metrics_path}")
    run.finish()
    return final


def sample_and_rate(model, processor, judge, prompts: list[dict], numbers: list[int], args, step: int) -> list[Scored]:
    """--samples-per-prompt answers to each prompt from the model as it is now, each rated. Sampling
    is keyed by --seed, the step and the prompt's line (`numbers`), so a resumed step draws what the
    uninterrupted one did. A prompt the judge fails on (after annotate's retries) is left out, counted."""
    model.eval()
    sample = annotate.model_sampler(model, processor, args.image_folder, args.samples_per_prompt, 0.7,
                                    args.sample_tokens, seed=args.seed * 1_000_003 + step,
                                    numbering={prompts[i]["id"]: n for i, n in enumerate(numbers)})
    rated = []
    with autocast(args.device):
        answered = list(sample(prompts))
    for i, answers in answered:
        record = prompts[i]
        try:
            ratings = [(a, annotate.rate(judge, record, a, args.image_folder)) for a in answers]
        except annotate.JudgeError as e:
            print(f"step {step}: prompt {record['id']} left out, the judge failed: {e}")
            continue
        rated.append(Scored(str(record["id"]), [record["image"]] if record.get("image") else [],
                            annotate.with_image_tag(record), ratings))
    model.train()
    return rated


@contextmanager
def as_start_model(model, start_projector, frozen=None):
    """The reference inside the block: the start model. With LoRA, the policy with its adapters off and
    its projector as it started (the tower is frozen and the LM head untouched by LoRA training); else
    `frozen`, a copy. The policy is itself again after, in training mode."""
    if frozen is not None:
        yield frozen
        return
    trained, model.multi_modal_projector = model.multi_modal_projector, start_projector
    try:
        with adapters_off(model.language_model):
            yield model.eval()
    finally:
        model.multi_modal_projector = trained
        model.train()


def dpo_step(policy, batch: PairBatch, preference: PreferenceLoss, hyperparameters: dict, args, reference=None):
    """One micro-batch of DPO, the whole computation: a forward over the chosen and the rejected
    answers, their log-probs, the reference's, the loss (--loss-type; DPO is Rafailov et al. 2023,
    eq. 7) with the optional NLL terms, and the numbers to log. -> (loss, metrics).

    reference: a frozen copy of the start model (--ref live); None: the batch carries the reference
    log-probs, computed once before training (`precompute_reference`) or read from the data file."""
    # log pi(answer | image, question) for the 2B answers in one forward: the B chosen, then the B rejected
    logps = policy(**batch.inputs)  # [2B]
    if args.average_logps:  # SimPO and ORPO compare mean log-probs per token (or --average-logps)
        logps = mean_per_token(logps, batch.inputs)
    chosen, rejected = batch.chosen_and_rejected(logps)  # [B], [B]

    # log pi_ref of the same answers: the start model's (none for SimPO and ORPO)
    if not preference.reference:
        references = ()
    elif reference is not None:
        with torch.no_grad():
            references = pair_logps(reference, batch, args.average_logps)
    else:
        references = (batch.ref_chosen, batch.ref_rejected)

    if preference.image_conditional:  # mDPO: a second forward, the chosen answers under a corrupted image
        corrupted = corrupted_logps(policy, reference, batch, args.average_logps)
        losses, chosen_rewards, rejected_rewards = preference.compute(chosen, rejected, *references, *corrupted,
                                                                      **hyperparameters)
    else:
        losses, chosen_rewards, rejected_rewards = preference.compute(chosen, rejected, *references, **hyperparameters)
    loss = losses.mean()
    if args.sft_weight:  # the authors' term as written (mllm-dpo llava/train/llava_trainer.py:453-455)
        loss = loss - args.sft_weight * chosen.mean()
    if args.chosen_nll_weight:  # the same, per token of the chosen answer
        chosen_tokens, _ = batch.chosen_and_rejected(batch.answer_tokens)
        per_token = chosen if args.average_logps else chosen / chosen_tokens.clamp(min=1)
        loss = loss - args.chosen_nll_weight * per_token.mean()

    metrics = {"loss": loss.item(), **reward_metrics(chosen_rewards, rejected_rewards),
               "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item(),
               "logps/accuracy": (chosen > rejected).float().mean().item()}
    if preference.image_conditional:  # how much likelier the chosen answer is with its own image than a corrupted one
        corrupted_rewards = hyperparameters["beta"] * (corrupted[0] - corrupted[1])
        metrics["rewards/corrupted_image"] = corrupted_rewards.mean().item()
        metrics["rewards/image_accuracy"] = (chosen_rewards > corrupted_rewards).float().mean().item()
    return loss, metrics


def corrupted_logps(policy, reference, batch: PairBatch, average: bool):
    """mDPO: log pi and log pi_ref of the chosen answers, each under a corrupted image ([B], [B])."""
    def logps(model):
        per_answer = model(**batch.corrupted)
        return mean_per_token(per_answer, batch.corrupted) if average else per_answer

    if reference is None:  # precomputed before training, like the other reference log-probs
        return logps(policy), batch.ref_corrupted
    with torch.no_grad():
        ref = logps(reference)
    return logps(policy), ref


@torch.no_grad()
def evaluate(model, examples, batch_of, step_of: dict, args) -> dict:
    """Held-out metrics: the training step's own numbers (loss, reward accuracy and margin, ...)."""
    model.eval()
    totals, n = {}, 0
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        with autocast(args.device):
            metrics = dpo_step(model, batch_of(chunk), **step_of)[1]
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    model.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


@torch.no_grad()
def precompute_reference(model, examples, batch_of, preference: PreferenceLoss, args) -> str:
    """The reference log-probs of every pair (and, for mDPO, of its chosen answer under a corrupted
    image): from the data file, else the disk cache (infra/reference.py), else one no-grad pass of the
    start model now, then cached. The reference model is then not needed any more."""
    images = preference.image_conditional
    missing = [e for e in examples if e.ref_chosen is None or e.ref_rejected is None
               or (images and e.ref_corrupted is None)]
    if not missing:
        return "from the data file"
    cache = ReferenceCache(args)
    if cache.fill(missing, images):
        return f"from the cache {cache.path}"
    model.eval()
    for start in range(0, len(missing), args.batch_size):
        chunk = missing[start:start + args.batch_size]
        batch = batch_of(chunk)
        with autocast(args.device):
            chosen, rejected = pair_logps(model, batch, args.average_logps)
            corrupted = [None] * len(chunk)
            if images:  # mDPO: the chosen answers under a corrupted image too
                corrupted = corrupted_logps(model, None, batch, args.average_logps)[0].tolist()
        for e, c, r, cc in zip(chunk, chosen.tolist(), rejected.tolist(), corrupted):
            if e.ref_chosen is None or e.ref_rejected is None:  # a data file's own values stay
                e.ref_chosen, e.ref_rejected = c, r
            e.ref_corrupted = cc
    cache.save(missing, images)
    return f"computed now, cached in {cache.path}"


if __name__ == "__main__":
    main()
