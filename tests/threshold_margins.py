"""The measurements behind the thresholds of the suite's stochastic tests (not a test itself).

    python tests/threshold_margins.py              # training seeds 0-4, at 2 threads and at 1: ~5 min on 2 cores

Two tests train a tiny model and assert that it learned something: test_steerlm's verbosity gap and
test_training's DPO reward accuracy and loss. Their result depends on the training seed and on the
CPU's float rounding (another machine, or another thread count, rounds differently), so each bar must
sit below the worst value over seeds and thread counts. This runs both test bodies over that grid and
prints every value and the worst. (The demo's own figures, behind test_demo's bars, come from
`python -m tinyalign.lab.seeds`.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_tiny_world  # noqa: E402
from test_steerlm import verbosity_lengths  # noqa: E402
from test_training import dpo_preference_run  # noqa: E402


def main(seeds=range(5), thread_counts=(2, 1)):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = make_tiny_world(Path(tmp) / "world")
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for seed in seeds:
                run = Path(tmp) / f"seed{seed}-threads{threads}"
                run.mkdir()
                lengths = verbosity_lengths(world, run / "steer", seed)
                _, final, train = dpo_preference_run(world, run, seed)
                rows.append({"seed": seed, "threads": threads,
                             "verbosity gap": lengths["verbose and correct"] - lengths["concise and correct"],
                             "DPO reward accuracy": final["rewards/accuracy"], "DPO loss": final["loss"],
                             "DPO loss fell": sum(r["loss"] for r in train[-3:]) / 3 < train[0]["loss"]})
    keys = [k for k in rows[0] if k not in ("seed", "threads")]
    print("\n| seed | threads | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 2) + "|")
    for r in rows:
        print(f"| {r['seed']} | {r['threads']} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                                             for k in keys) + " |")
    worst = {"verbosity gap": min(r["verbosity gap"] for r in rows),
             "DPO reward accuracy": min(r["DPO reward accuracy"] for r in rows),
             "DPO loss": max(r["DPO loss"] for r in rows), "DPO loss fell": all(r["DPO loss fell"] for r in rows)}
    print("\nworst:", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in worst.items()))
    print("the tests' bars: verbosity gap > 5, DPO reward accuracy >= 0.25, DPO loss < 0.65, loss fell")
    return rows


if __name__ == "__main__":
    main()
