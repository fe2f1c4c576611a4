"""The set-up check for a room of laptops: is this machine ready for the workshop, and how long will
each exercise take on it? About a minute, nothing to prepare.

    python -m tinyalign.lab.check             # the install, a tiny DPO step, each exercise's time here
    python -m tinyalign.lab.check --measure   # (maintainers) run every exercise and record its time

What it does:
1. the install: Python and every package tinyalign needs, at versions it supports (one missing
   altogether stops Python at `import tinyalign`, naming it: install it as docs/workshop.md says); the
   scripts of the clone (the exercises run them); `runs/` writable, with room for the runs;
2. a tiny DPO step: the demo's model size, LoRA as the demo trains it, 16 pairs forward and backward,
   an optimizer step, then greedy answers to 16 questions; the loss (DPO's alone, no NLL term) must
   start at ln 2 and go down, or the install computes wrongly;
3. the calibration: the same work timed with one thread and with all of them. A busy laptop (another
   program, or cores shared with a virtual machine) can run 4-6x slower with several threads than with
   one; when one thread is faster here, it says so and tells you to run everything with
   OMP_NUM_THREADS=1;
4. each exercise's expected time on this machine: the time measured for it on the reference machine
   (exercise_times.json, written by --measure, with the calibration measured just before each run),
   scaled by how long the calibration takes here against there. Measured, not guessed; rough to 1.5x.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from ..infra.arguments import at_least

REPO = Path(__file__).resolve().parents[2]
TIMES = Path(__file__).with_name("exercise_times.json")
CPU_TORCH = ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu  (on Linux; without the "
             "index, pip fetches the CUDA build, gigabytes; macOS and Windows: pip install torch==2.13.0)")
NEEDED = {"torch": "2.6", "safetensors": "0.4", "tokenizers": "0.19", "pillow": "10", "numpy": "1.24", "tqdm": "4.60"}

# What the workshop runs, in docs/workshop.md's order: (name, command from the clone's root, what it needs first).
EXERCISES = [
    ("set-up: SFT demo", "python train_sft.py", None),
    ("set-up: DPO demo", "python train_dpo.py", "set-up: SFT demo"),
    ("1. does DPO look at the image?", "python -m tinyalign.lab.ablations unconditional", "set-up: DPO demo"),
    ("2. beta and the NLL term", "python -m tinyalign.lab.ablations beta-nll", "set-up: DPO demo"),
    ("3. DPOP, a short run (the solution's command)", "python -m tinyalign.lab.workshop dpop --dpop-lambda 50 --max-steps 20 "
                             "--chosen-nll-weight 0 --out runs/dpop", "set-up: DPO demo"),
    ("4. the packed pair's mask (tests)", "python -m pytest tests/test_packing.py -x -q -p no:cacheprovider", None),
    ("5. SteerLM demo", "python train_steerlm.py", "set-up: SFT demo"),
    ("6. the mistakes DPO fixes", "python -c \"from tinyalign.lab.workshop import mistakes_by_confusion as m; "
                                  "[print(x, m(x, 'runs/demo-data')) for x in ('runs/demo-sft/model', "
                                  "'runs/demo-dpo/model')]\"", "set-up: DPO demo"),
    ("7. label noise (one seed)", "python -m tinyalign.lab.ablations label-noise", "set-up: DPO demo"),
    ("8. data scaling (one seed)", "python -m tinyalign.lab.ablations data-scaling", "set-up: DPO demo"),
    ("9. the per-token view", "python -m tinyalign.lab.tokens", "set-up: DPO demo"),
    ("9. where the margin sits (one seed)", "python -m tinyalign.lab.ablations margin-tokens", "set-up: DPO demo"),
    ("10. iterative DPO, 3 rounds", "python train_dpo.py --rounds 3 --out runs/iterative", "set-up: SFT demo"),
    ("the study", "python -m tinyalign.lab.study", "set-up: SFT demo"),
    ("ablation: transfer", "python -m tinyalign.lab.ablations transfer", "set-up: DPO demo"),
    ("ablation: mDPO", "python -m tinyalign.lab.ablations mdpo", "set-up: DPO demo"),
    ("ablation: irrelevant image", "python -m tinyalign.lab.ablations irrelevant-image", "set-up: DPO demo"),
]


# ---------------------------------------------------------------------------------------------
# 1. The install
# ---------------------------------------------------------------------------------------------


def version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def install_problems(root: Path) -> tuple[list[str], list[str]]:
    """-> (what is there, what is wrong)."""
    found, problems = [f"Python {platform.python_version()}"], []
    if sys.version_info < (3, 10):
        problems.append(f"Python {platform.python_version()}: tinyalign needs 3.10 or newer")
    for name, least in NEEDED.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed: " + (CPU_TORCH if name == "torch" else
                                                            'pip install -e ".[test]"  (in the clone)'))
            continue
        found.append(f"{name} {have}")
        if version_tuple(have) < version_tuple(least):
            problems.append(f"{name} {have} is too old: tinyalign needs {least} or newer")
    for script in ("train_sft.py", "train_dpo.py", "train_steerlm.py"):
        if not (root / script).exists():
            problems.append(f"{root / script} is missing: run this from the root of a clone of tinyalign (the "
                            "exercises run its scripts)")
            break
    runs = root / "runs"
    try:
        runs.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=runs):
            pass
        free = shutil.disk_usage(runs).free / 2**30
        found.append(f"runs/ writable, {free:.1f} GiB free")
        if free < 1:
            problems.append(f"{runs}: {free:.1f} GiB free; the exercises write about 0.5 GiB, keep 1 GiB free")
    except OSError as e:
        problems.append(f"{runs} is not writable: {e}")
    return found, problems


# ---------------------------------------------------------------------------------------------
# 2-3. A tiny DPO step, timed: the calibration
# ---------------------------------------------------------------------------------------------


def tiny_work(folder: Path, steps: int, questions: int) -> dict:
    """The demo's model, LoRA r32 as the demo trains it, `steps` DPO steps on 16 pairs of the shapes
    world (true answer over a wrong one), then greedy answers to `questions` questions. -> the losses and
    the seconds each part took."""
    from ..batches import collate_pairs, pair_logps
    from ..data import Pair, pair_examples, read_jsonl
    from ..demo.runs import greedy_answers
    from ..demo.world import demo_config, demo_processor, make_world, say, wrong_values
    from ..losses import dpo_loss
    from ..model import random_model
    from ..training import train_decoder, train_projector

    files = make_world(folder, seed=0, n_sft=0, n_prompts=16, n_heldout=max(questions, 1), n_heldout_prompts=0)
    processor = demo_processor()
    pairs = [Pair(r["id"], [r["image"]], r["prompt"], say(r["kind"], r["truth"]),
                  say(r["kind"], wrong_values(r["kind"], r["truth"])[0])) for r in read_jsonl(files["prompts"])]
    examples, _ = pair_examples(pairs, processor, folder)
    model = random_model(demo_config(), seed=0)
    model.requires_grad_(False)
    trainable = train_projector(model) + train_decoder(model, 32, 64, 0.0)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batch = collate_pairs(examples, processor)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logps(model, batch)
    losses, started = [], time.perf_counter()
    for _ in range(steps):
        chosen, rejected = pair_logps(model, batch)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    trained = time.perf_counter() - started
    heldout = read_jsonl(files["heldout"])[:questions]
    started = time.perf_counter()
    answers = greedy_answers(model.eval(), processor, [q["prompt"] for q in heldout],
                             [folder / q["image"] for q in heldout]) if heldout else []
    return {"losses": losses, "train_s": trained, "generate_s": time.perf_counter() - started, "answers": len(answers)}


def timed(steps: int, questions: int, threads: int) -> dict:
    """tiny_work with `threads` threads, once to warm up (first calls allocate and pick kernels), then timed."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as folder:
            tiny_work(Path(folder) / "warm", 1, min(questions, 2))
            result = tiny_work(Path(folder) / "timed", steps, questions)
    finally:
        torch.set_num_threads(before)
    result["seconds"] = result["train_s"] + result["generate_s"]
    result["threads"] = threads
    return result


def calibrate(steps: int = 10, questions: int = 16) -> dict:
    """The calibration with one thread and with torch's default (all cores): -> {threads: result}, and
    which one to use."""
    default = torch.get_num_threads()
    runs = {1: timed(steps, questions, 1)}
    if default > 1:
        runs[default] = timed(steps, questions, default)
    best = min(runs, key=lambda t: runs[t]["seconds"])
    return {"runs": runs, "best_threads": best, "default_threads": default}


# ---------------------------------------------------------------------------------------------
# 4. Each exercise's expected time here
# ---------------------------------------------------------------------------------------------


def expected_times(calibration_s: float, reference: dict) -> list[tuple[str, str, float]]:
    """(exercise, command, expected seconds here) from the reference machine's measurements: each
    scaled by the calibration here over the calibration measured there just before it ran."""
    rows = []
    for name, command, _ in EXERCISES:
        measured = reference["exercises"].get(name)
        if measured:
            rows.append((name, command, measured["seconds"] * calibration_s / measured["calibration_s"]))
    return rows


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def measure_exercises(root: Path, steps: int, questions: int, only: list[str] | None, times: Path = TIMES) -> dict:
    """--measure: run every exercise's command (the set-up's first, from a clean runs/), each right
    after a calibration, and record both in exercise_times.json (or `times`). Start from an empty runs/
    (the set-up's measurement trains from nothing; the others reuse what it made, as a room does)."""
    record = json.loads(times.read_text()) if times.exists() else {"exercises": {}}
    record.update({"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                   "torch": torch.__version__, "date": str(date.today()), "threads": torch.get_num_threads()})
    for name, command, _ in EXERCISES:
        if only and name not in only:
            continue
        calibration = timed(steps, questions, torch.get_num_threads())["seconds"]
        print(f"\n[{name}] calibration {calibration:.1f} s\n$ {command}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, shell=True, cwd=root, check=True)
        seconds = time.perf_counter() - started
        record["exercises"][name] = {"command": command, "seconds": round(seconds, 1),
                                     "calibration_s": round(calibration, 2)}
        print(f"[{name}] {seconds:.0f} s", flush=True)
        times.write_text(json.dumps(record, indent=1) + "\n")  # after each: a long measurement keeps what it has
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=at_least(2), default=10, help="DPO steps of the calibration")
    p.add_argument("--questions", type=at_least(1), default=16, help="greedy answers of the calibration")
    p.add_argument("--measure", action="store_true", help="run every exercise and record its time (maintainers)")
    p.add_argument("--only", action="append", help="--measure: only this exercise (repeatable)")
    p.add_argument("--times", default=str(TIMES), help="--measure: the file to record in")
    args = p.parse_args(argv)
    root = Path.cwd()
    if args.measure:
        return measure_exercises(root, args.steps, args.questions, args.only, Path(args.times))

    found, problems = install_problems(root)
    print("1. The install: " + "; ".join(found))
    for problem in problems:
        print(f"   PROBLEM: {problem}")
    if any("not installed" in p or "too old" in p for p in problems):
        print("Fix the install first, then run the check again.")
        return {"problems": problems, "calibration": None}
    print("   CUDA: " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (the CPU runs "
                                                                                     "everything here)"))

    calibration = calibrate(args.steps, args.questions)
    runs, best = calibration["runs"], calibration["best_threads"]
    losses = runs[best]["losses"]
    print(f"2. A tiny DPO step: loss {losses[0]:.4f} at the start (ln 2 = {math.log(2):.4f}), {losses[-1]:.4f} after "
          f"{len(losses)} steps; {runs[best]['answers']} greedy answers")
    if abs(losses[0] - math.log(2)) > 1e-3 or not losses[-1] < losses[0]:
        problems.append("the tiny DPO step did not start at ln 2 and go down: the install computes wrongly "
                        "(reinstall torch; tell the workshop's organiser)")
        print(f"   PROBLEM: {problems[-1]}")
    print("3. Calibration: " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {r['seconds']:.1f} s" for t, r in runs.items()))
    default = calibration["default_threads"]
    if default == 1:
        print("   torch uses one thread here (OMP_NUM_THREADS=1, or one core): nothing to compare")
    elif best != default:
        slower = runs[default]["seconds"] / runs[best]["seconds"]
        print(f"   One thread is {slower:.1f}x faster than {default} here (a busy machine, or cores shared with "
              "others): run every command with OMP_NUM_THREADS=1, e.g.\n     export OMP_NUM_THREADS=1   "
              "(Windows: set OMP_NUM_THREADS=1)")
    else:
        print(f"   torch's default of {default} threads is the faster here: nothing to set")

    # the reference machine timed the default calibration (10 steps, 16 questions): a shorter one is
    # scaled up to it, step by step and answer by answer (rougher)
    here = runs[best]["train_s"] * 10 / args.steps + runs[best]["generate_s"] * 16 / args.questions
    if not TIMES.exists():
        problems.append(f"{TIMES} is missing, so no expected times: reinstall tinyalign")
        print(f"   PROBLEM: {problems[-1]}")
    else:
        reference = json.loads(TIMES.read_text())
        shortened = "" if (args.steps, args.questions) == (10, 16) else "; from a shortened calibration, rougher"
        print(f"4. Expected time of each exercise here (measured on {reference['machine']}, torch {reference['torch']}, "
              f"{reference['date']}, scaled by this machine's calibration{shortened}):")
        for name, command, seconds in expected_times(here, reference):
            print(f"   {minutes(seconds):>9}  {name}: {command}")
    print("Ready." if not problems else f"{len(problems)} problem(s) above: fix them before the workshop.")
    return {"problems": problems, "calibration": calibration}


if __name__ == "__main__":
    main()
