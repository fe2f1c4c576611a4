"""The paper's study in miniature (its Table 4), on the shapes world, in one command.

    python -m tinyalign.lab.study                 # about 6 minutes on a 2-core CPU; results in runs/study/

Each step is the command a user would type, printed and then run, so the study is also a worked
example of the whole pipeline:

1. the starting model: the SFT demo (`python train_sft.py`), our stand-in for LLaVA-1.5. Its training
   data repeats a few systematic mistakes (yellow called green, triangles called squares, three
   counted as two), as visual instruction data carries the habits of its sources;
2. the data collection: 4 answers sampled per prompt from that model, each rated on the five
   attributes (`python -m tinyalign.evaluation.annotate --judge rules`, the rule-based stand-in for Gemini);
3. four methods from the same start, each with its script:
   SFT on the dataset's own answers, rejection sampling (`--select best`), SteerLM and DPO;
4. all five models greedy-decoded on the same held-out questions; a side-by-side table in
   runs/study/results.md (and results.png when matplotlib is installed), every answer in answers.json,
   and a page to look at, runs/study/index.html (lab/page.py): each method's training curves, every
   held-out question with each model's answer and rating side by side (filtered in the browser), some
   of the pairs DPO trained on, and DPO's reward token by token on the pairs it held out (lab/tokens.py).

Steps whose output is already there are skipped (delete runs/study, or pass --fresh, to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..data import load_pairs, read_jsonl
from ..demo.runs import DEMO_DATA, DEMO_SFT, greedy_answers
from ..demo.world import CONFUSIONS, SFT_ANSWER_NOISE, rate_answer, say, sft_answer_value, value_of
from ..infra.arguments import positive
from ..infra.files import write_atomic, write_json
from ..infra.weights import load_model
from ..processor import Processor
from ..steer import steer_prompt
from ..training import split_held_out
from . import tokens
from .page import write_page

REPO = Path(__file__).resolve().parents[2]
START = DEMO_SFT / "model"
# What SteerLM is asked for at evaluation: the ratings a correct, concise answer gets in this world.
STEER_ASK = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2}
# The same small budget for every method: LoRA r32 on the decoder, projector trained, from the start.
COMMON = ["--lora-r", "32", "--lora-alpha", "64", "--batch-size", "16", "--grad-accum", "1", "--max-length", "256",
          "--eval-fraction", "0.05", "--eval-every", "100", "--save-every", "200"]
METHODS = {
    # name: (script, data file in the study folder, extra arguments)
    "SFT": ("train_sft.py", "sft.json", ["--epochs", "3", "--lr", "1e-3", "--projector-lr", "1e-3"]),
    "SteerLM": ("train_steerlm.py", "samples.jsonl", ["--epochs", "2", "--lr", "1e-3", "--projector-lr", "1e-3"]),
    "Rejection sampling": ("train_sft.py", "samples.jsonl",
                           ["--select", "best", "--epochs", "3", "--lr", "1e-3", "--projector-lr", "1e-3"]),
    # Plain DPO overfits this tiny, over-confident model (see train_dpo.py's DEMO): + the NLL term.
    "DPO": ("train_dpo.py", "samples.jsonl",
            ["--epochs", "6", "--lr", "1e-3", "--projector-lr", "3e-3", "--chosen-nll-weight", "1",
             "--eval-every", "25"]),
}


def run(command: list[str]) -> None:
    """Print a command, then run it from the repository root; stop the study if it fails."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable if c == "python" else c for c in command], cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the study stopped: `{shlex.join(command)}` failed (exit code {done.returncode})")


def write_sft_data(prompts: list[dict], path: Path, seed: int = 0) -> None:
    """'Standard SFT': the study's prompts with answers written the way the SFT data was (the
    dataset's own answers, mistakes and all), in LLaVA's conversation format."""
    rng = random.Random(seed)
    records = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": r["prompt"]},
        {"from": "gpt", "value": say(r["kind"], sft_answer_value(r["kind"], r["truth"], rng, SFT_ANSWER_NOISE))}]}
        for r in prompts]
    write_json(path, records)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation: the same questions for every model
# ---------------------------------------------------------------------------------------------


def evaluate(model_dir: Path, heldout: list[dict], image_folder: Path, steer: dict | None = None) -> tuple[dict, list]:
    """Greedy answers to the held-out questions, scored against the truth and by the annotator.
    -> (the scores, [{answer, exact, ratings} per question])."""
    model = load_model(model_dir)
    processor = Processor.from_pretrained(model_dir)
    questions = [steer_prompt(r["prompt"], steer) if steer else r["prompt"] for r in heldout]
    answers = [processor.decode(ids) for ids in
               greedy_answers(model, processor, questions, [image_folder / r["image"] for r in heldout])]
    truths = [value_of(r["kind"], r["answer"]) for r in heldout]
    ratings = [rate_answer(r["kind"], t, a) for r, t, a in zip(heldout, truths, answers)]
    exact = [a == r["answer"] for a, r in zip(answers, heldout)]
    hard = [e for e, r in zip(exact, heldout) if is_hard(r)]
    scores = {
        "exact": sum(exact) / len(exact),
        "hard": sum(hard) / max(len(hard), 1),  # questions the SFT data systematically got wrong
        "helpfulness": sum(x["helpfulness"] for x in ratings) / len(ratings),
        "words": sum(len(a.split()) for a in answers) / len(answers),
        "n": len(exact), "n_hard": len(hard),
    }
    return scores, [{"answer": a, "exact": e, "ratings": r} for a, e, r in zip(answers, exact, ratings)]


def is_hard(record: dict) -> bool:
    """A question whose truth the SFT data systematically mislabels (yellow, triangles, three)."""
    return (record["kind"], value_of(record["kind"], record["answer"])) in CONFUSIONS


COLUMNS = [("exact", "exact answer"), ("hard", "SFT data's mistakes"), ("helpfulness", "helpfulness 0-4"),
           ("words", "words / answer")]


def markdown_table(results: dict) -> str:
    n, n_hard = next(iter(results.values()))["n"], next(iter(results.values()))["n_hard"]
    lines = [f"| model | {' | '.join(title for _, title in COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[key]:.3f}" if key != "words" else f"{r[key]:.1f}"
                                                 for key, _ in COLUMNS) + " |")
    lines += ["", (f"{n} held-out questions, greedy decoding. *exact answer*: the answer is exactly the correct "
              f"one; *SFT data's mistakes*: the same, on the {n_hard} questions whose truth the SFT data "
              "systematically mislabels (yellow, triangles, three); helpfulness: the rule-based annotator's "
              "mean rating of the answers (0-4).")]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (key, title) in zip(axes, COLUMNS[:3]):
        ax.bar(range(len(results)), [r[key] for r in results.values()], color="tab:blue")
        ax.set_xticks(range(len(results)), list(results), rotation=30, ha="right")  # long names stay apart
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def token_view(dpo: Path, start: Path, out: Path, world: Path, seed: int) -> Path | None:
    """The per-token view of DPO's reward (lab/tokens.py) on the pairs DPO held out: the same pairs
    and the same split as train_dpo.py made (--pair-seed 0, --eval-fraction, --seed)."""
    pairs, _ = load_pairs(out / "samples.jsonl", seed=0)
    _, held = split_held_out(pairs, float(COMMON[COMMON.index("--eval-fraction") + 1]), seed)
    if not held:
        return None
    held_file = out / "dpo-heldout-pairs.jsonl"
    write_atomic(held_file, "".join(json.dumps({"id": p.id, "image": p.images[0] if p.images else None,
                                                "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                                    for p in held))
    print(f"\n$ python -m tinyalign.lab.tokens --policy {shown(dpo)} --reference {shown(start)} --pairs "
          f"{shown(held_file)} --image-folder {shown(world)} --out {shown(out / 'tokens')}", flush=True)
    result = tokens.token_views([dpo], start, held_file, world)
    return tokens.write_token_page(result, out / "tokens", world, beta=0.1, title="DPO's reward, token by token: "
                                   "the study's DPO model on the pairs it held out")


def shown(path: Path) -> str:
    """A path as the printed commands show it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study", help="where the study's data, models and table go")
    p.add_argument("--fresh", action="store_true", help="redo every step, the starting model included")
    p.add_argument("--start", help="starting checkpoint (default: the SFT demo's, trained now if missing)")
    p.add_argument("--world", help="shapes-world folder with prompts.jsonl, heldout.jsonl and images (default: "
                                   "the SFT demo's)")
    p.add_argument("--epochs-scale", type=positive, default=1.0, help="multiply every method's epochs (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and of every method's training (the "
                                                       "starting model, when made here, uses it too)")
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    started = time.time()
    if args.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The starting model.
    start, world = Path(args.start or REPO / START).resolve(), Path(args.world or REPO / DEMO_DATA).resolve()
    if args.start is None and (args.fresh or not (start / "config.json").exists()):
        run(["python", "train_sft.py", "--seed", str(args.seed)])
    prompts = read_jsonl(world / "prompts.jsonl")

    # 2. Sample and rate (the annotate command resumes by itself if interrupted).
    run(["python", "-m", "tinyalign.evaluation.annotate", "--model", shown(start), "--prompts", shown(world / "prompts.jsonl"),
         "--image-folder", shown(world), "--judge", "rules", "--n", "4", "--max-new-tokens", "24",
         "--out", shown(out / "samples.jsonl"), "--seed", str(args.seed)])
    write_sft_data(prompts, out / "sft.json", seed=args.seed)

    # 3. Four methods from the same start.
    models = {"start (SFT demo)" if args.start is None else "start": start}
    for name, (script, data, extra) in METHODS.items():
        folder = out / name.lower().replace(" ", "-")
        if args.epochs_scale != 1.0:
            i = extra.index("--epochs")
            extra = extra[:i + 1] + [f"{float(extra[i + 1]) * args.epochs_scale:g}"] + extra[i + 2:]
        if not (folder / "model" / "config.json").exists():  # a folder without a model holds a run cut short
            run(["python", script, "--model", shown(start), "--data", shown(out / data), "--image-folder", shown(world),
                 "--out", shown(folder), "--overwrite", *COMMON, *extra, "--seed", str(args.seed)])
        models[name] = folder / "model"

    # 4. Side by side on the held-out questions.
    heldout = read_jsonl(world / "heldout.jsonl")
    results, answers = {}, {}
    for name, folder in models.items():
        print(f"evaluating {name} ...", flush=True)
        results[name], answers[name] = evaluate(folder, heldout, world, STEER_ASK if name == "SteerLM" else None)
    table = markdown_table(results)
    write_json(out / "results.json", results)
    write_json(out / "answers.json", answers)
    write_atomic(out / "results.md", table)
    drew = plot(results, out / "results.png")
    tokens_page = token_view(models["DPO"], start, out, world, args.seed)
    runs = {name: out / name.lower().replace(" ", "-") for name in METHODS}
    page = write_page(out, results, COLUMNS, answers, heldout, [is_hard(r) for r in heldout], world,
                      out / "samples.jsonl", runs=runs, tokens_page=tokens_page, seed=args.seed,
                      eval_fraction=float(COMMON[COMMON.index("--eval-fraction") + 1]))
    print("\n" + table)
    print(f"written: {out / 'results.md'}" + (f", {out / 'results.png'}" if drew else "") +
          f", {page} (open it in a browser); the study took {(time.time() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
