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

from tinyalign import Processor, load_model
from tinyalign.data import file_digest, load_pairs, pair_examples
from tinyalign.demo import demo_processor, exact_answer_accuracy, read_heldout, sample_and_rate
from tinyalign.losses import PREFERENCE_LOSSES
from tinyalign.packing import batch_maker, pair_logps, real_tokens, supervised_counts
from tinyalign.training import (autocast, common_arguments, finish_distributed, init_distributed, mean_over_ranks,
                                my_share, optimizer_step, parse_recipe, prepare_training, seed_everything,
                                split_held_out)

PAPER = dict(epochs=3, batch_size=8, grad_accum=4, lr=5e-5, projector_lr=2e-5, lora_r=128, lora_alpha=256,
             max_length=3000, eval_every=100, save_every=200, eval_fraction=0.02, sft_weight=0.0,
             chosen_nll_weight=0.0, packing=True)
# The demo's model is tiny and very sure of its own samples (a whole answer at log p ~ -1). Plain DPO
# then lowers chosen and rejected alike until generation breaks; an NLL term on the chosen answer
# (per token, like the authors' SFT_weight option but not summed over the answer) holds them up.
# Larger steps, LoRA of rank 32. The held-out pairs come from prompts of their own
# (ensure_demo_start), so nothing of --data is held out.
DEMO = dict(epochs=6, batch_size=16, grad_accum=1, lr=1e-3, projector_lr=3e-3, lora_r=32, lora_alpha=64,
            max_length=256, eval_every=50, save_every=50, sft_weight=0.0, chosen_nll_weight=1.0, out="runs/demo-dpo",
            packing=False)
DEMO_SFT = Path("runs/demo-sft")
DEMO_DATA = Path("runs/demo-data")


def parse(argv=None):
    parser = common_arguments(__doc__.split("\n\n")[0])
    a = parser.add_argument
    a("--beta", type=float, default=0.1, help="DPO: strength of the KL constraint to the reference; SimPO: the "
      "reward scale (its paper uses 2-2.5); ORPO: the weight of the odds-ratio term (its lambda)")
    a("--loss-type", default="sigmoid", choices=list(PREFERENCE_LOSSES),
      help="; ".join(f"{name}: {loss.paper}" + ("" if loss.reference else ", no reference model")
                     for name, loss in PREFERENCE_LOSSES.items()))
    a("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin gamma")
    a("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed rate of flipped labels")
    a("--sft-weight", type=float, help="the authors' SFT_weight: adds -w * mean log p(chosen), summed or averaged "
      "as the DPO term's log-probs are")
    a("--chosen-nll-weight", type=float, help="adds w * the chosen answer's NLL per token (the demo's stabiliser)")
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


@torch.no_grad()
def reference_logps(model, examples, processor, args) -> None:
    """Fill ref_chosen / ref_rejected of every example with the starting model's log-probs."""
    model.eval()
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        with autocast(args.device):
            chosen, rejected = pair_logps(model, batch_maker(args, processor, "pairs")(chunk), args.device,
                                          args.average_logps)
        for e, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            e.ref_chosen, e.ref_rejected = c, r


def cache_key(args, model_fingerprint: str) -> str:
    parts = [model_fingerprint, file_digest(args.data), args.eval_data and file_digest(args.eval_data),
             args.max_length, args.template, args.image_mode, args.average_logps, args.pair_seed, args.image_folder]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def model_fingerprint(path) -> str:
    """Names, sizes and modification times of a checkpoint folder's files: cheap, and changes when they do."""
    files = sorted(Path(path).iterdir())
    return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])


def fill_reference(model, examples, processor, args, cache_path: Path):
    """Reference log-probs: from the data file, else the disk cache, else one pass now (then cached)."""
    missing = [e for e in examples if e.ref_chosen is None or e.ref_rejected is None]
    if not missing:
        return "from the data file"
    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if all(e.id in cached for e in missing):
        for e in missing:
            e.ref_chosen, e.ref_rejected = cached[e.id]
        return f"from the cache {cache_path}"
    reference_logps(model, missing, processor, args)
    cached.update({e.id: [e.ref_chosen, e.ref_rejected] for e in missing})
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp-{os.getpid()}")  # written whole, then renamed: never half a file
    tmp.write_text(json.dumps(cached))
    os.replace(tmp, cache_path)
    return f"computed now, cached in {cache_path}"


@torch.no_grad()
def evaluate(model, examples, processor, args, ref_model=None) -> dict:
    """Held-out DPO metrics: loss, reward accuracy and margin against the reference."""
    model.eval()
    totals, n = {}, 0
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        batch = batch_maker(args, processor, "pairs")(chunk)
        with autocast(args.device):
            metrics = step_metrics(model, batch, args, ref_model)[1]
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    model.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


def step_metrics(model, batch, args, ref_model=None):
    """The preference loss of one micro-batch (--loss-type, from losses.PREFERENCE_LOSSES) and the
    numbers worth logging."""
    preference = PREFERENCE_LOSSES[args.loss_type]
    policy_chosen, policy_rejected = pair_logps(model, batch, args.device, args.average_logps)
    ref_chosen = ref_rejected = None
    if preference.reference and ref_model is not None:
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logps(ref_model, batch, args.device, args.average_logps)
    elif preference.reference:
        ref_chosen, ref_rejected = batch["ref_chosen"].to(args.device), batch["ref_rejected"].to(args.device)
    losses, chosen_rewards, rejected_rewards = preference.compute(policy_chosen, policy_rejected, ref_chosen,
                                                                  ref_rejected, args)
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
    return loss, metrics


def ensure_demo_start(device, seed: int) -> tuple[Path, Path, Path]:
    """The demo starts from the SFT demo's checkpoint (made now if missing, about two minutes) and
    from that model's own rated samples (made now if missing): the paper's pipeline in miniature.
    Two sample files: the training prompts', and the held-out prompts' (about 500 held-out pairs,
    so the held-out reward accuracy is measured to about +-0.03)."""
    if not (DEMO_SFT / "model" / "config.json").exists():
        import train_sft

        print(f"No {DEMO_SFT / 'model'} yet: running the SFT demo first.")
        train_sft.main(["--seed", str(seed)])
    samples = {"train": DEMO_SFT / "samples.jsonl", "held-out": DEMO_SFT / "samples_heldout.jsonl"}
    prompts = {"train": DEMO_DATA / "prompts.jsonl", "held-out": DEMO_DATA / "heldout_prompts.jsonl"}
    model = None
    for i, split in enumerate(samples):
        if not samples[split].exists():
            print(f"Sampling 4 answers per {split} prompt from the SFT model and rating them (the rule-based "
                  "annotator)...")
            model = model or load_model(DEMO_SFT / "model", device=device)
            sample_and_rate(model, demo_processor(), read_heldout(prompts[split]), DEMO_DATA, samples[split],
                            seed=seed * 2 + i)  # a sampling stream of its own per split and seed
    return DEMO_SFT / "model", samples["train"], samples["held-out"]


def main(argv=None):
    args = parse(argv)
    rank, world = init_distributed(args)
    if args.demo:
        print("No --model: running the built-in demo (DPO on the shapes world, from the SFT demo's model).")
        start, samples, heldout_samples = ensure_demo_start(args.device, args.seed)
        args.model, args.data = str(start), args.data or str(samples)
        args.eval_data = args.eval_data or str(heldout_samples)
        args.image_folder = args.image_folder or str(DEMO_DATA)
    # Seeded after the demo's setup, which may train the SFT demo in this process first: the run is
    # then the same draw whether or not the SFT model was already there.
    seed_everything(args.seed)
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
    processor = (demo_processor(args.image_mode) if args.demo else
                 Processor.from_pretrained(args.model, template=args.template, image_mode=args.image_mode,
                                           vision_tower=args.vision_tower))

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

    # The reference: the starting model's log-probs, then (unless --ref live) no reference model at all.
    ref_model = None
    if not PREFERENCE_LOSSES[args.loss_type].reference:
        print(f"reference log-probs: not needed by --loss-type {args.loss_type}")
    elif args.ref == "live":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        cache = Path(args.cache_dir) / "ref_logps" / f"{cache_key(args, model_fingerprint(args.model))}.json"
        print("reference log-probs:", fill_reference(model, train + held, processor, args, cache))
    start_metrics = evaluate(model, held, processor, args, ref_model) if held else {}

    trainer, optimizer, scheduler, run, batches, step = prepare_training(args, model, len(train), rank, world)
    if held and not args.resume:
        run.log(0, start_metrics, split="eval")
    make_batch = batch_maker(args, processor, "pairs")  # plain, or packed with --packing
    run.start_progress(step)
    model.train()

    # ---- the DPO loop --------------------------------------------------------------------------
    while step < run.total_steps:
        group = batches[step * args.grad_accum:(step + 1) * args.grad_accum]
        logged = {}
        for micro in group:
            batch = make_batch([train[i] for i in my_share(micro, rank, world)])
            with autocast(args.device):
                loss, metrics = step_metrics(trainer, batch, args, ref_model)
            run.check_finite(loss, step + 1)
            (loss / len(group)).backward()
            for k, v in metrics.items():
                logged[k] = logged.get(k, 0.0) + v / len(group)
            run.count_tokens(real_tokens(batch))
        optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        step += 1
        logged = {**mean_over_ranks(logged, world), "lr": scheduler.get_last_lr()[0]}
        if run.after_step(step, logged, model, optimizer, scheduler,
                          (lambda: evaluate(model, held, processor, args, ref_model)) if held else None):
            finish_distributed(world)
            return {}
    # ---------------------------------------------------------------------------------------------

    run.save_state(step, model, optimizer, scheduler)
    final = {}
    if rank == 0:
        final = evaluate(model, held, processor, args, ref_model) if held else {}
        if args.demo:
            final.update(demo_summary(model, processor, args, start_metrics, final, len(held)))
        run.log(step, final, split="eval")
        saved = run.save_final(model, processor)
        print(f"model saved to {saved}; metrics in {run.metrics_path}")
    run.finish()
    finish_distributed(world)
    return final


def demo_summary(model, processor, args, start: dict, final: dict, n_pairs: int) -> dict:
    """The starting model and the trained one side by side on held-out data."""
    heldout = read_heldout(DEMO_DATA / "heldout.jsonl")
    start_acc = exact_answer_accuracy(load_model(args.model, device=args.device), processor, heldout, args.image_folder)
    dpo_acc = exact_answer_accuracy(model, processor, heldout, args.image_folder)
    method = PREFERENCE_LOSSES[args.loss_type].paper.split(",")[0]  # "DPO", "SimPO", "ORPO", ...
    rows = [(f"held-out reward accuracy ({method}'s implicit reward), {n_pairs} pairs", "-",
             f"{final['rewards/accuracy']:.3f}"),
            ("held-out pair accuracy (log p chosen > log p rejected)", f"{start['logps/accuracy']:.3f}",
             f"{final['logps/accuracy']:.3f}"),
            (f"exact-answer accuracy, greedy, {len(heldout)} held-out questions", f"{start_acc:.3f}", f"{dpo_acc:.3f}")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'start (SFT)':>11}  {method:>7}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>11}  {b:>7}")
    return {"exact_answer_accuracy": dpo_acc, "start_exact_answer_accuracy": start_acc,
            "start_logps/accuracy": start["logps/accuracy"], "pairs": n_pairs, "questions": len(heldout)}


if __name__ == "__main__":
    main()
