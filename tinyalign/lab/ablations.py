"""The paper's ablations in miniature, on the shapes world, each by name.

    python -m tinyalign.lab.ablations label-noise       # Table 5: 0 / 25 / 50 / 75% of the pairs flipped
    python -m tinyalign.lab.ablations data-scaling      # the data-scaling plot: 25 / 50 / 75 / 100% of the pairs
    python -m tinyalign.lab.ablations beta-nll          # beta 0.1 and 0.5, with and without the NLL term
    python -m tinyalign.lab.ablations transfer          # Table 6: pairs sampled from another SFT model
    python -m tinyalign.lab.ablations unconditional     # does DPO look at the image? (mDPO's test)
    python -m tinyalign.lab.ablations mdpo              # DPO, DPO + NLL, mDPO: the same test on each
    python -m tinyalign.lab.ablations irrelevant-image  # Table 7: a text-only task asked with an unrelated picture
    python -m tinyalign.lab.ablations label-noise --seeds 3     # mean and range over training seeds 0-2

Every arm starts from the SFT demo's model and its own rated samples (made first when missing, as
`python train_dpo.py` does: about 3 minutes once), trains DPO on the arm's pairs with the same short
recipe, and is measured on the same held-out pairs and questions. Each arm's run is the command that
is printed (run here in-process, so no second start-up). Results: OUT/NAME/results.md, results.json,
and results.png with matplotlib (the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..batches import collate_pairs, pair_logps
from ..data import Pair, load_pairs, pair_examples, read_jsonl
from ..demo.runs import dpo_start, exact_answer_accuracy, greedy_answers, sample_and_rate
from ..demo import world as shapes
from ..infra.arguments import at_least
from ..infra.files import write_atomic, write_json
from ..infra.weights import load_model, save_model
from ..losses import implicit_rewards, reward_comparison
from ..model import random_model
from ..processor import Processor
from . import tokens

REPO = Path(__file__).resolve().parents[2]
# One short recipe for every arm: the DPO demo's, with 3 epochs instead of 6 (each arm in about a minute).
RECIPE = ["--epochs", "3", "--batch-size", "16", "--grad-accum", "1", "--lr", "1e-3", "--projector-lr", "3e-3",
          "--lora-r", "32", "--lora-alpha", "64", "--max-length", "256", "--no-packing", "--eval-every", "0",
          "--save-every", "0"]
NLL = ["--chosen-nll-weight", "1"]  # the demo's stabiliser (train_dpo.py, DEMO)
SNAPSHOT_EVERY = 10  # margin-tokens: the model every 10 steps (of 126), "early" being the first of them

# name -> (what it asks, its arms: (label, transform of the training pairs, extra arguments))
ABLATIONS = {
    "label-noise": ("Table 5: a share of the pairs has chosen and rejected swapped", [
        (f"{p}% flipped", ("flip", p / 100), NLL) for p in (0, 25, 50, 75)]),
    "data-scaling": ("the data-scaling plot: DPO on a share of the pairs", [
        (f"{p}% of pairs", ("subset", p / 100), NLL) for p in (25, 50, 75, 100)]),
    "beta-nll": ("beta, and the NLL term on the chosen answer: where do the rewards go?", [
        (f"beta {b}{', NLL' if nll else ''}", ("subset", 1.0), ["--beta", str(b)] + (NLL if nll else []))
        for b in (0.1, 0.5) for nll in (False, True)]),
    "transfer": ("Table 6: pairs sampled from another start model", [
        ("pairs from the model itself", ("subset", 1.0), NLL), ("pairs from another SFT model", ("other-model", 1.0), NLL)]),
    "mdpo": ("mDPO (arXiv 2406.11839) against DPO: does the preference depend on the image?", [
        (name, ("subset", 1.0), extra) for name, extra in (("DPO", []), ("DPO + NLL", NLL),
                                                           ("mDPO", ["--loss-type", "mdpo"]),
                                                           ("mDPO + NLL", ["--loss-type", "mdpo", *NLL]))]),
    "margin-tokens": ("where the margin sits: tokens that differ or tokens shared, early and at the end, with and "
                      "without the NLL term", [
        (f"beta 0.1{', NLL' if nll else ''}", ("subset", 1.0), ["--beta", "0.1", "--snapshot-every", str(SNAPSHOT_EVERY)]
         + (NLL if nll else [])) for nll in (False, True)]),
}


TITLES = {name: what for name, (what, _) in ABLATIONS.items()}
TITLES["irrelevant-image"] = "Table 7: a text-only task asked with an irrelevant picture, before and after DPO"
TITLES["on-policy"] = ("offline, iterative and online DPO, the same 6,000 judged answers; reward accuracy: the "
                       "held-out pairs, against the SFT start")
# The columns of each ablation's table, and (the first two or three) of its bar chart.
KEYS = {name: ["reward accuracy", "exact answer", "rewards/chosen", "rewards/rejected"] for name in ABLATIONS}
KEYS["mdpo"] += ["reward accuracy, swapped image"]
KEYS["margin-tokens"] = ["reward accuracy", "exact answer", "share on differing, early", "share on differing, end",
                         "chosen: shared tokens, end", "chosen: differing tokens, end",
                         "rejected: shared tokens, end", "rejected: differing tokens, end"]
KEYS["irrelevant-image"] = ["sums, no image", "sums, irrelevant image", "answers the picture instead", "exact answer",
                            "reward accuracy"]
KEYS["on-policy"] = ["judged answers", "exact answer", "SFT data's mistakes", "reward accuracy", "minutes"]
BARS = {name: KEYS[name][:2] for name in KEYS}
BARS["irrelevant-image"] = KEYS["irrelevant-image"][:3]
FIGURES = [*TITLES, "unconditional"]  # every name that draws a figure (python -m tinyalign.figures)


# ---------------------------------------------------------------------------------------------
# The arms' data
# ---------------------------------------------------------------------------------------------


def transformed(pairs: list, transform: tuple, seed: int) -> list:
    """("flip", share): that share of the pairs, drawn at random, with chosen and rejected swapped;
    ("subset", share): that share of the pairs, drawn at random (the first share of one shuffle, so a
    larger share holds every pair of a smaller one)."""
    kind, share = transform
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    picked = set(order[:round(share * len(pairs))])
    if kind == "flip":
        return [SimpleNamespace(**{**vars(p), "chosen": p.rejected, "rejected": p.chosen}) if i in picked else p
                for i, p in enumerate(pairs)]
    return [p for i, p in enumerate(pairs) if i in picked]


def write_pairs(pairs: list, path: Path) -> Path:
    """Plain pairs JSONL (the format train_dpo.py reads)."""
    records = [{"id": p.id, "image": p.images[0] if p.images else None, "prompt": p.prompt, "chosen": p.chosen,
                "rejected": p.rejected} for p in pairs]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------
# One arm: train, then measure
# ---------------------------------------------------------------------------------------------


def train_arm(start: Path, data: Path, heldout: Path, world: Path, out: Path, seed: int, extra: list[str],
              recipe: list[str]) -> dict:
    """DPO with train_dpo.py on one arm's pairs; -> its last held-out metrics line."""
    argv = ["--model", str(start), "--data", str(data), "--eval-data", str(heldout), "--image-folder", str(world),
            "--out", str(out), "--seed", str(seed), "--cache-dir", str(out.parent / "cache"), "--overwrite",
            *recipe, *extra]
    print(f"\n$ python train_dpo.py {shlex.join(argv)}", flush=True)
    return script("train_dpo").main(argv)


def measure(model_dir: Path, world: Path, questions: list[dict]) -> float:
    """Exact answers, greedy, on the held-out questions."""
    return exact_answer_accuracy(load_model(model_dir), Processor.from_pretrained(model_dir), questions, world)


def run_ablation(name: str, seeds: list[int], out: Path, start: Path, samples: Path, heldout_samples: Path,
                 world: Path) -> dict:
    """Every arm of an ablation for every seed -> {arm: [{seed, metrics...}, ...]}."""
    pairs, report = load_pairs(samples)
    print(report.summary())
    if any(transform[0] == "other-model" for _, transform, _ in ABLATIONS[name][1]):
        other_pairs, report = load_pairs(other_model_samples(out / name, world))
        print(f"the other model's {report.summary()}")
    questions = read_jsonl(world / "heldout.jsonl")
    start_exact = measure(start, world, questions)  # the line every arm is compared with
    results = {}
    for label, transform, extra in ABLATIONS[name][1]:
        for seed in seeds:
            folder = out / name / f"{slug(label)}-seed{seed}"
            arm_pairs = other_pairs if transform[0] == "other-model" else transformed(pairs, transform, seed)
            data = write_pairs(arm_pairs, out / name / f"{slug(label)}-seed{seed}.jsonl")
            final = train_arm(start, data, heldout_samples, world, folder, seed, extra, RECIPE)
            curve = read_jsonl(folder / "metrics.jsonl")
            row = {"seed": seed, "pairs": sum(1 for _ in data.open()), "reward accuracy": final["rewards/accuracy"],
                   "rewards/chosen": final["rewards/chosen"], "rewards/rejected": final["rewards/rejected"],
                   "exact answer": measure(folder / "model", world, questions), "start exact answer": start_exact,
                   "curve": [(r["step"], r["rewards/chosen"], r["rewards/rejected"]) for r in curve
                             if r.get("split") == "train"]}
            if name == "mdpo":  # and the held-out pairs' reward accuracy when shown another pair's image
                row["reward accuracy, swapped image"] = unconditional(folder / "model", start, heldout_samples,
                                                                      world)["reward accuracy, swapped image"]
            if name == "margin-tokens":
                row.update(margin_by_tokens(folder, start, heldout_samples, world))
            results.setdefault(label, []).append(row)
    return results


def margin_by_tokens(folder: Path, start: Path, heldout_samples: Path, world: Path) -> dict:
    """Where the held-out margin sits in a run's snapshots and its final model (lab/tokens.py): the
    share on the tokens that differ between chosen and rejected, and each answer's reward (beta 0.1)
    split into its shared and its differing tokens, per snapshot and early / at the end."""
    kept = folder / "snapshots"  # none when the run is shorter than --snapshot-every: "early" is then the end
    snapshots = sorted(kept.iterdir(), key=lambda p: int(p.name.split("-")[1])) if kept.exists() else []
    views = tokens.token_views([*snapshots, folder / "model"], start, heldout_samples, world, batch_size=32,
                               swapped=False)["views"]
    curve = []
    for path, view in zip([*snapshots, folder / "model"], views.values()):
        pairs = view["true image"]
        split = tokens.margin_split(pairs, 0.1)
        curve.append({"step": int(path.name.split("-")[1]) if path in snapshots else "end",
                      "share on differing": split["share of the margin on differing tokens"],
                      **{f"{side}: {kind} tokens": statistics.fmean(getattr(p, side).reward(0.1, kind == "shared")
                                                                    for p in pairs)
                         for side in ("chosen", "rejected") for kind in ("shared", "differing")}})
    early, end = curve[0], curve[-1]
    return {"share on differing, early": early["share on differing"], "early step": early["step"],
            **{f"{key}, end": value for key, value in end.items() if key != "step"}, "token curve": curve}


def other_model_samples(folder: Path, world: Path, seed: int = 1) -> Path:
    """Table 6's other model: the SFT demo's recipe from another initialisation and data order (seed 1)
    on the same world, and its own rated samples of the same prompts. Made once, then reused."""
    return sft_and_samples(folder, world, "other", world / "sft.json", seed)[1]


def sft_and_samples(folder: Path, world: Path, name: str, sft_data: Path, seed: int,
                    extra_texts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A start model of an ablation's own: the SFT demo's recipe (train_sft.py's DEMO) from a random
    initialisation (`seed`) on `sft_data`, with `extra_texts`' words in its vocabulary, and 4 rated
    samples of each training prompt from it. Made once (about 3 minutes), then reused from `folder`:
    -> (its model folder, its samples file)."""
    model_dir = folder / f"{name}-sft" / "model"
    processor = shapes.demo_processor(extra_texts=extra_texts)
    if not (model_dir / "config.json").exists():
        init = save_model(random_model(shapes.demo_config(extra_texts), seed=seed), folder / f"{name}-init",
                          processor=processor)
        train_sft = script("train_sft")
        recipe = {k: v for k, v in train_sft.DEMO.items() if k != "out"}
        argv = ["--model", str(init), "--data", str(sft_data), "--image-folder", str(world),
                "--out", str(folder / f"{name}-sft"), "--seed", str(seed), "--overwrite", *recipe_argv(recipe)]
        print(f"\n$ python train_sft.py {shlex.join(argv)}", flush=True)
        train_sft.main(argv)
    samples = folder / f"{name}-samples.jsonl"
    if not samples.exists():
        print(f"Sampling 4 answers per prompt from {model_dir} and rating them...", flush=True)
        sample_and_rate(load_model(model_dir), processor, read_jsonl(world / "prompts.jsonl"), world,
                             samples, seed=0)
    return model_dir, samples


def recipe_argv(recipe: dict) -> list[str]:
    """{"lora_r": 0, "packing": False, ...} -> ["--lora-r", "0", "--no-packing", ...]; None: not given."""
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        argv += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return argv


def script(name: str):
    """A training script of the repository, imported (its main runs in this process)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return __import__(name)


def slug(label: str) -> str:
    """"25% flipped" -> "25pct-flipped": a folder name."""
    text = "".join(c if c.isalnum() else "-" for c in label.replace("%", "pct")).lower()
    return "-".join(part for part in text.split("-") if part)


# ---------------------------------------------------------------------------------------------
# Does DPO look at the image? (Wang et al. 2024, mDPO, arXiv 2406.11839, section 3)
# ---------------------------------------------------------------------------------------------


def unconditional(policy: Path, reference: Path, heldout_samples: Path, world: Path, batch_size: int = 32) -> dict:
    """The DPO reward margin of held-out pairs with the true image and with another pair's image.
    A policy that prefers the chosen answer just as much whatever image it sees has learned a
    preference that does not depend on the image (mDPO's "unconditional preference")."""
    processor = Processor.from_pretrained(policy)
    pairs, _ = load_pairs(heldout_samples)
    examples, _ = pair_examples(pairs, processor, world)
    swapped = [SimpleNamespace(**{**vars(e), "images": examples[(i + 1) % len(examples)].images})
               for i, e in enumerate(examples)]  # each pair shown the next pair's image
    logps = {}  # (model, images) -> (log p chosen [N], log p rejected [N]), float64
    for name, model_dir in (("policy", policy), ("reference", reference)):
        model = load_model(model_dir).eval()
        for images, chunked in (("true", examples), ("swapped", swapped)):
            parts = []
            with torch.no_grad():
                for start in range(0, len(chunked), batch_size):
                    parts.append(pair_logps(model, collate_pairs(chunked[start:start + batch_size], processor)))
            logps[name, images] = [torch.cat(side).double() for side in zip(*parts)]
    result = {"pairs": len(examples)}
    margins = {}
    for images in ("true", "swapped"):
        (pc, pr), (rc, rr) = logps["policy", images], logps["reference", images]
        # DPO's implicit reward (beta 1) of each answer, then which of the two wins and by how much
        wins, margin = reward_comparison(implicit_rewards(pc, rc, 1.0), implicit_rewards(pr, rr, 1.0))
        margins[images] = margin.tolist()
        result[f"reward accuracy, {images} image"] = wins.double().mean().item()
        result[f"mean margin, {images} image"] = statistics.fmean(margins[images])
    result["told apart without the image"] = sum(s > 0 for s in margins["swapped"]) / len(examples)
    result["margins"] = {"true image": margins["true"], "swapped image": margins["swapped"]}  # for the figure
    return result


# ---------------------------------------------------------------------------------------------
# An irrelevant image (the paper's Table 7: MT-Bench answered with an unrelated image in context)
# ---------------------------------------------------------------------------------------------

# The text-only task, our stand-in for the language ability LLaVA inherits from Vicuna: sums of two
# numbers. Its start model learns the sums beside the image questions, as LLaVA-1.5's SFT mix holds
# ShareGPT's text-only conversations (about 6% of it; here 400 of 4,400 conversations, 9%). The
# preference data stays image questions only, as the paper's VQA pairs are.
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
SUMS = [(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} ?", f"It is {NUMBER_WORDS[a + b + 1]} .")
        for a in range(4) for b in range(4)]  # 16 (question, answer): one + one .. four + four
SUM_TEXTS = tuple(f"{q} {a}" for q, a in SUMS)  # their words join the start model's vocabulary
TEXT_CONVERSATIONS = 400
DISTRACTORS = 10  # irrelevant pictures shown with each sum: 160 questions
TEXT_START = "start (SFT with the sums)"


def sft_with_sums(world: Path, path: Path, seed: int = 0) -> Path:
    """The world's SFT conversations and TEXT_CONVERSATIONS text-only ones (no image): a sum and its answer."""
    rng = random.Random(seed)
    records = json.loads((world / "sft.json").read_text())
    for i in range(TEXT_CONVERSATIONS):
        question, answer = rng.choice(SUMS)
        records.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": question},
                                                             {"from": "gpt", "value": answer}]})
    write_json(path, records)
    return path


def answers_the_picture(answer: str) -> bool:
    """Is this the answer to an image question (a colour, a shape, a count, a cell)?"""
    return any(answer == shapes.say(kind, value) for kind in shapes.KINDS for value in shapes.wrong_values(kind, ""))


def sums_scores(model_dir: Path, world: Path, heldout: list[dict]) -> dict:
    """Exact answers to the 16 sums asked alone, and asked after an irrelevant picture (each sum with
    each of DISTRACTORS held-out pictures); and how often the answer with a picture describes the
    picture instead of giving the sum."""
    model, processor = load_model(model_dir), Processor.from_pretrained(model_dir)

    def greedy(questions, images):
        return [processor.decode(ids) for ids in greedy_answers(model, processor, questions, images)]

    alone = greedy([q for q, _ in SUMS], [None] * len(SUMS))
    cases = [(q, a, world / r["image"]) for q, a in SUMS for r in heldout[:DISTRACTORS]]
    with_picture = greedy(["<image>\n" + q for q, _, _ in cases], [picture for _, _, picture in cases])
    return {"sums, no image": statistics.fmean(got == a for got, (_, a) in zip(alone, SUMS)),
            "sums, irrelevant image": statistics.fmean(got == a for got, (_, a, _) in zip(with_picture, cases)),
            "answers the picture instead": statistics.fmean(map(answers_the_picture, with_picture))}


WITH_SUMS = "DPO + NLL, 10% more pairs: a sum asked with a picture"


def sum_picture_pairs(world: Path, n: int, seed: int = 0) -> list[Pair]:
    """n pairs that do cover the case: a sum asked after one of the training prompts' pictures, the
    sum chosen, the picture's own answer (what the start model says) rejected."""
    rng = random.Random(seed)
    prompts = read_jsonl(world / "prompts.jsonl")
    pairs = []
    for i in range(n):
        record, (question, answer) = rng.choice(prompts), rng.choice(SUMS)
        pairs.append(Pair(f"sum-picture-{i}", [record["image"]], "<image>\n" + question, answer,
                          shapes.say(record["kind"], record["truth"])))
    return pairs


# ---------------------------------------------------------------------------------------------
# On-policy DPO (not in the paper): the same number of judged answers, sampled once from the start
# (offline) or from the model being trained, in rounds (train_dpo.py --rounds)
# ---------------------------------------------------------------------------------------------

ON_POLICY_ROUNDS = 3
# label -> train_dpo.py's arguments: the DPO demo's recipe, its sampling done by the run itself
ON_POLICY_ARMS = {"offline (1 round)": ["--rounds", "1"],
                  f"iterative ({ON_POLICY_ROUNDS} rounds)": ["--rounds", str(ON_POLICY_ROUNDS)],
                  "online (1 epoch)": ["--online", "--epochs", "1"]}


def run_on_policy(seeds: list[int], out: Path, start: Path, world: Path, heldout_samples: Path) -> dict:
    """Three ways to spend the same 6,000 judged answers (1,500 prompts x 4), each from the SFT demo's
    model with the DPO demo's recipe: offline, 1 round sampled from the start; iterative, 3 rounds of a
    third of the prompts each, sampled from the round before's model; online, every step sampling its
    16 prompts from the policy as it is (one pass). Measured along the way (rounds, snapshots) against
    the same start: exact answers, the SFT data's mistakes, held-out reward accuracy. An arm whose run
    has finished is measured again, not trained again (its minutes kept from when it trained)."""
    questions = read_jsonl(world / "heldout.jsonl")
    hard = [(q["kind"], shapes.value_of(q["kind"], q["answer"])) in shapes.CONFUSIONS for q in questions]
    results = {}
    for label, extra in ON_POLICY_ARMS.items():
        for seed in seeds:
            folder = out / "on-policy" / f"{slug(label)}-seed{seed}"
            points = on_policy_points(folder, extra)
            timing = folder / "minutes.json"
            if not (points[-1][1] / "config.json").exists() or not timing.exists():
                argv = [*extra, "--out", str(folder), "--seed", str(seed), "--cache-dir", str(out / "on-policy" / "cache")]
                print(f"\n$ python train_dpo.py {shlex.join(argv)}", flush=True)
                started = time.time()
                script("train_dpo").main(argv)
                write_json(timing, {"minutes": (time.time() - started) / 60})
                points = on_policy_points(folder, extra)
            curve = [{"judged answers": 0, **answer_scores(start, world, questions, hard)}]  # the start
            for judged, model in points:
                curve.append({"judged answers": judged, **answer_scores(model, world, questions, hard),
                              "reward accuracy": unconditional(model, start, heldout_samples, world)[
                                  "reward accuracy, true image"]})
            results.setdefault(label, []).append({"seed": seed, "pairs": "-", **curve[-1], "curve": curve,
                                                  "minutes": json.loads(timing.read_text())["minutes"]})
    return results


def on_policy_points(folder: Path, extra: list[str]) -> list[tuple[int, Path]]:
    """(judged answers so far, model) along an arm's run, counted from what the run wrote: after each
    round (its rated samples), or at each snapshot and the end (metrics.jsonl's judged_answers)."""
    if "--online" in extra:
        lines = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
        judged = [(r["step"], r["judged_answers"]) for r in lines if r.get("split") == "train"]

        def upto(step):
            return sum(n for s, n in judged if s <= step)
        snapshots = sorted((folder / "snapshots").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        return [(upto(int(p.name.split("-")[1])), p) for p in snapshots] + [(upto(10**9), folder / "model")]
    rounds = int(extra[extra.index("--rounds") + 1])
    points, judged = [], 0
    for k in range(1, rounds + 1):
        samples = folder / f"round-{k}" / "samples.jsonl"
        judged += sum(len(r["responses"]) for r in read_jsonl(samples)) if samples.exists() else 0
        points.append((judged, folder / f"round-{k}" / "dpo" / "model"))
    return points


def answer_scores(model_dir: Path, world: Path, questions: list[dict], hard: list[bool]) -> dict:
    """Exact answers on the held-out questions, and on those whose truth the SFT data mislabels."""
    model, processor = load_model(model_dir), Processor.from_pretrained(model_dir)
    answers = greedy_answers(model, processor, [q["prompt"] for q in questions], [world / q["image"] for q in questions])
    right = [a == processor.tokenize(q["answer"]) + [processor.eos_token_id] for a, q in zip(answers, questions)]
    return {"exact answer": sum(right) / len(right),
            "SFT data's mistakes": sum(r for r, h in zip(right, hard) if h) / max(sum(hard), 1)}


def run_irrelevant_image(seeds: list[int], out: Path, world: Path, heldout_samples: Path) -> dict:
    """The start model that knows the sums, then DPO on its own image pairs (with and without the NLL
    term, and with pairs added that cover a sum asked with a picture): the sums asked with and without
    an irrelevant picture, before and after."""
    folder = out / "irrelevant-image"
    start, samples = sft_and_samples(folder, world, "text", sft_with_sums(world, folder / "sft-with-sums.json"),
                                     seed=0, extra_texts=SUM_TEXTS)
    questions = read_jsonl(world / "heldout.jsonl")
    pairs, report = load_pairs(samples)
    print(report.summary())
    results = {TEXT_START: [{"seed": 0, "pairs": 0, **sums_scores(start, world, questions),
                             "exact answer": measure(start, world, questions)}]}
    added = sum_picture_pairs(world, len(pairs) // 10)
    with_sums = write_pairs(pairs + added, folder / "pairs-with-sums.jsonl")
    for label, data, extra in (("DPO + NLL", samples, NLL), ("DPO", samples, []), (WITH_SUMS, with_sums, NLL)):
        for seed in seeds:
            arm = folder / f"{slug(label)}-seed{seed}"
            final = train_arm(start, data, heldout_samples, world, arm, seed, extra, RECIPE)
            results.setdefault(label, []).append({
                "seed": seed, "pairs": len(pairs) + (len(added) if data == with_sums else 0),
                "reward accuracy": final["rewards/accuracy"],
                **sums_scores(arm / "model", world, questions), "exact answer": measure(arm / "model", world, questions)})
    return results


# ---------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    if all(isinstance(v, int) for v in values) and len(set(values)) == 1:
        return str(values[0])  # a count, the same in every run
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def markdown(name: str, results: dict) -> str:
    keys = KEYS[name]
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    over = f"seeds {', '.join(map(str, seeds))}: mean [min, max]" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [f"{TITLES[name]} ({over})", "",
             f"| arm | pairs | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
    for label, runs in results.items():
        cells = [spread([r[k] for r in runs]) if k in runs[0] else "-" for k in keys]
        lines.append(f"| {label} | {runs[0]['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(name: str, results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if name == "unconditional":  # each held-out pair's reward margin, with its own image and another's
        fig, ax = plt.subplots(figsize=(6, 3))
        for label, margins in results["margins"].items():
            ax.hist(margins, bins=40, alpha=0.6, label=label)
        ax.axvline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("DPO reward margin, chosen - rejected (beta 1)")
        ax.set_ylabel("held-out pairs")
        ax.legend()
    elif name == "beta-nll":  # the reward curves: does the chosen reward go down?
        fig, axes = plt.subplots(1, len(results), figsize=(3.5 * len(results), 3), sharey=True, squeeze=False)
        for ax, (label, runs) in zip(axes[0], results.items()):
            steps, chosen, rejected = zip(*runs[0]["curve"])
            ax.plot(steps, chosen, label="rewards/chosen")
            ax.plot(steps, rejected, label="rewards/rejected")
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set_title(label)
            ax.set_xlabel("step")
        axes[0][0].legend()
    elif name == "on-policy":  # exact answers against the judge's work, each round a point
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for (label, runs), colour in zip(results.items(), ("tab:blue", "tab:red", "tab:green")):
            for i, run in enumerate(runs):
                ax.plot([p["judged answers"] for p in run["curve"]], [p["exact answer"] for p in run["curve"]], "o-",
                        color=colour, alpha=0.7, label=label if i == 0 else None)
        ax.set_xlabel("judged answers (the judge's work)")
        ax.set_ylabel("exact answers, 600 held-out questions")
        ax.legend(fontsize=8)
    elif name == "margin-tokens":  # each answer's reward, split into its shared and differing tokens, over training
        fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), sharey=True, squeeze=False)
        for ax, (label, runs) in zip(axes[0], results.items()):
            curve = runs[0]["token curve"]
            steps = [c["step"] for c in curve[:-1]] + [runs[0]["curve"][-1][0]]  # "end": the last step
            for key, style in (("chosen: differing tokens", "-"), ("rejected: differing tokens", "-"),
                               ("chosen: shared tokens", "--"), ("rejected: shared tokens", "--")):
                ax.plot(steps, [c[key] for c in curve], style, label=key)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set_title(f"{label} (seed {runs[0]['seed']})")
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("reward per answer (beta 0.1)")
        axes[0][0].legend(fontsize=7)
    else:
        fig, axes = plt.subplots(1, len(BARS[name]), figsize=(4 * len(BARS[name]), 3.5))
        for ax, key in zip(axes, BARS[name]):
            means = [statistics.fmean(r[key] for r in runs) for runs in results.values()]
            lows = [m - min(r[key] for r in runs) for m, runs in zip(means, results.values())]
            highs = [max(r[key] for r in runs) - m for m, runs in zip(means, results.values())]
            ax.bar(range(len(results)), means, yerr=[lows, highs], capsize=3, color="tab:blue")
            start = next(iter(results.values()))[0].get("start " + key)
            if start is not None:  # where the arms began: the SFT model's own exact answers
                ax.axhline(start, color="tab:red", linestyle="--", linewidth=1, label=f"start (SFT) {start:.3f}")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_xticks(range(len(results)), [textwrap.fill(label, 22) for label in results], rotation=20,
                          ha="right", fontsize=8)  # long arm names wrapped, not run into each other
            ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ablation", choices=[*ABLATIONS, "irrelevant-image", "on-policy", "unconditional"])
    p.add_argument("--seeds", type=at_least(1), default=1, help="repeat each arm with training seeds 0..N-1")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--dpo", default="runs/demo-dpo/model", help="unconditional: the DPO model to test (the DPO "
                                                                 "demo's, trained now if missing)")
    args = p.parse_args(argv)
    started = time.time()
    setup = SimpleNamespace(seed=0, device="cpu", data=None, eval_data=None, image_folder=None)
    dpo_start(setup)  # the SFT demo's model and its rated samples, made now if missing
    start, world = Path(setup.model), Path(setup.image_folder)
    out = Path(args.out) / args.ablation
    out.mkdir(parents=True, exist_ok=True)
    if args.ablation == "unconditional":
        if not (Path(args.dpo) / "config.json").exists():
            import subprocess

            print("\n$ python train_dpo.py", flush=True)
            subprocess.run([sys.executable, str(REPO / "train_dpo.py")], check=True)
        result = unconditional(Path(args.dpo), start, Path(setup.eval_data), world)
        table = "\n".join(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
                          for k, v in result.items() if k != "margins")
        text = f"Does DPO look at the image? {args.dpo} against its start\n\n| measure | value |\n|---|---|\n{table}\n"
        write_json(out / "results.json", result)
        if plot("unconditional", result, out / "results.png"):
            print(f"figure: {out / 'results.png'}")
    else:
        seeds = list(range(args.seeds))
        if args.ablation == "irrelevant-image":
            results = run_irrelevant_image(seeds, Path(args.out), world, Path(setup.eval_data))
        elif args.ablation == "on-policy":
            results = run_on_policy(seeds, Path(args.out), start, world, Path(setup.eval_data))
        else:
            results = run_ablation(args.ablation, seeds, Path(args.out), start, Path(setup.data), Path(setup.eval_data),
                                   world)
        text = markdown(args.ablation, results)
        write_json(out / "results.json", results)
        if plot(args.ablation, results, out / "results.png"):
            print(f"figure: {out / 'results.png'}")
    write_atomic(out / "results.md", text)
    print("\n" + text + f"\n({time.time() - started:.0f} s; {out / 'results.md'})")
    return text


if __name__ == "__main__":
    main()
