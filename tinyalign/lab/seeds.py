"""The demos' figures over several seeds and float roundings: one row per run, then mean and range.

    python -m tinyalign.lab.seeds                                    # seeds 0-4, vector instructions on, then off: hours
    python -m tinyalign.lab.seeds --seeds 0 1 --simd native --parts dpo  # a quicker look at the DPO demo

One run of a demo is one draw. Its seed fixes the shapes world, the starting weights, the sampled
answers and the data order; the CPU's float rounding, which another machine changes, then moves
every sampled answer and so every pair. `--simd off` gives another rounding here: vector
instructions off, so sums are added in another order (the thread count does not: on the demos 1 and
2 threads gave bit-identical runs, 2026-11-27). A figure worth printing in the README holds across
both, so this runs the whole pipeline in a fresh folder per (seed, threads, simd), each step
the command a user types (`python train_sft.py --seed S`, then `train_dpo.py`, `train_steerlm.py`
and `python -m tinyalign.lab.study` on that SFT model), and tabulates what each printed. The README's
demo figures and the tests' thresholds come from this table.

Results: OUT/seeds.md (the tables) and OUT/seeds.json (every figure of every run); each run's folder
keeps its logs. A part already done in a run's folder is not run again (delete the folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..data import read_jsonl
from ..infra.arguments import at_least
from ..infra.files import write_atomic, write_json

REPO = Path(__file__).resolve().parents[2]
PARTS = ("sft", "dpo", "steerlm", "study")


def commands(part: str, seed: int, folder: Path) -> list[list[str]]:
    """The commands of one part, run inside a run's folder (the demos write runs/ there)."""
    py, s = sys.executable, str(seed)
    return {
        "sft": [[py, str(REPO / "train_sft.py"), "--seed", s]],
        "dpo": [[py, str(REPO / "train_dpo.py"), "--seed", s, "--cache-dir", str(folder / "cache")]],
        "steerlm": [[py, str(REPO / "train_steerlm.py"), "--seed", s]],
        "study": [[py, "-m", "tinyalign.lab.study", "--seed", s, "--start", str(folder / "runs/demo-sft/model"),
                   "--world", str(folder / "runs/demo-data"), "--out", str(folder / "runs/study")]],
    }[part]


def last_eval(metrics: Path, key: str) -> dict:
    """The last held-out line of a metrics.jsonl that has `key`."""
    lines = read_jsonl(metrics)
    found = [r for r in lines if r.get("split") == "eval" and key in r]
    if not found:
        raise ValueError(f"{metrics}: no held-out line with {key!r} (did the run finish?)")
    return found[-1]


def figures(part: str, folder: Path) -> dict:
    """The figures a part printed, read back from the files it wrote."""
    runs = folder / "runs"
    if part == "sft":
        return {"exact answer": last_eval(runs / "demo-sft/metrics.jsonl", "exact_answer_accuracy")["exact_answer_accuracy"]}
    if part == "dpo":
        r = last_eval(runs / "demo-dpo/metrics.jsonl", "exact_answer_accuracy")
        return {"held-out pairs": r["pairs"], "reward accuracy": r["rewards/accuracy"],
                "pair accuracy, start": r["start_logps/accuracy"], "pair accuracy": r["logps/accuracy"],
                "exact answer, start": r["start_exact_answer_accuracy"], "exact answer": r["exact_answer_accuracy"]}
    if part == "steerlm":
        steering = last_eval(runs / "demo-steerlm/metrics.jsonl", "steering")["steering"]
        return {f"{name}: {what}": value for name, row in steering.items() for what, value in row.items()}
    results = json.loads((runs / "study/results.json").read_text())
    names = ["start", *list(results)[1:]]  # the first row is the start, whatever its label
    return {f"{name}: {key}": row[key] for name, row in zip(names, results.values())
            for key in ("exact", "hard", "helpfulness")}


def done(part: str, folder: Path) -> bool:
    try:
        figures(part, folder)
        return True
    except (OSError, ValueError, KeyError):
        return False


# Vector instructions off: ATen's own kernels (softmax, norms, sums) fall back to scalar code and
# the BLAS libraries to SSE4, so reductions add in another order, as on an older or another CPU.
NO_SIMD = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def run_one(seed: int, threads: int, simd: str, parts: list[str], out: Path) -> dict:
    """Every part for one (seed, threads, simd), in its own folder; returns {part: figures}."""
    folder = out / (f"seed{seed}-threads{threads}" + ("-nosimd" if simd == "off" else ""))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(NO_SIMD if simd == "off" else {})}
    times = json.loads((folder / "times.json").read_text()) if (folder / "times.json").exists() else {}
    for part in ["sft", *[p for p in parts if p != "sft"]]:  # every other part starts from the SFT demo
        if done(part, folder):
            continue
        started = time.time()
        with open(folder / f"{part}.log", "w") as log:
            for command in commands(part, seed, folder):
                code = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    raise SystemExit(f"seed {seed}, {threads} threads: `{' '.join(command)}` failed (exit {code}); "
                                     f"see {folder / f'{part}.log'}")
        times[part] = round(time.time() - started, 1)
        write_json(folder / "times.json", times)
        print(f"seed {seed}, {threads} thread(s), SIMD {simd}: {part} done in {times[part] / 60:.1f} min", flush=True)
    return {part: figures(part, folder) for part in parts} | {"minutes": {k: round(v / 60, 2) for k, v in times.items()}}


def summary_rows(runs: dict, part: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one part's table: a row per run, then mean, min and max."""
    keys = list(next(iter(runs.values()))[part])
    rows = [[name, *[fmt(r[part][k]) for k in keys]] for name, r in runs.items()]
    for label, reduce in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        rows.append([f"**{label}**", *[fmt(reduce([r[part][k] for r in runs.values()])) for k in keys]])
    return ["run", *keys], rows


def fmt(v) -> str:
    """Counts as they are; rates (below 10) to 3 decimals; larger figures (words, means of counts) to 1."""
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def markdown(runs: dict, parts: list[str]) -> str:
    text = []
    for part in parts:
        header, rows = summary_rows(runs, part)
        text += [f"### {part}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        text += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=at_least(1), nargs="+", default=[2],
                   help="torch thread counts (on the demos, 1 and 2 threads gave bit-identical runs)")
    p.add_argument("--simd", nargs="+", choices=("native", "off"), default=["native", "off"],
                   help="off: vector instructions off (another float rounding: another CPU's, in effect)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--jobs", type=at_least(1), default=1, help="runs at once (with 1-thread runs, one per core)")
    p.add_argument("--out", default="runs/seeds")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    grid = [(seed, threads, simd) for simd in args.simd for threads in args.threads for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda run: run_one(*run, args.parts, out), grid))
    runs = {f"seed {s}, {t} thread{'s' * (t > 1)}" + (", no SIMD" if simd == "off" else ""): r
            for (s, t, simd), r in zip(grid, results)}
    table = markdown(runs, args.parts)
    write_json(out / "seeds.json", runs)
    write_atomic(out / "seeds.md", table)
    print("\n" + table + f"\nwritten: {out / 'seeds.md'}, {out / 'seeds.json'}")
    return runs


if __name__ == "__main__":
    main()
