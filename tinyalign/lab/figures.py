"""The README's figures, drawn from the runs' own files into docs/figures/ by one command.

    pip install -e ".[plot]"
    python -m tinyalign.lab.figures                      # from runs/ (the demos, the study, the ablations)
    python -m tinyalign.lab.figures --runs other/runs    # from another folder of runs
    python -m tinyalign.lab.figures --only study-page    # one figure (repeatable)

Each figure is drawn only from what a run wrote (metrics.jsonl, results.json), by the same function
that the run itself uses; a run that is missing is named and skipped, never faked. The study's page
(runs/study/index.html) is drawn by headless Chromium when one is installed.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from ..infra.run import plot_metrics
from . import ablations, page, study, tokens

REPO = Path(__file__).resolve().parents[2]


def demo_curves(runs: Path, out: Path):
    metrics = runs / "demo-dpo" / "metrics.jsonl"
    if not metrics.exists():
        return f"skipped: no {metrics} (run python train_dpo.py)"
    return plot_metrics(metrics, out / "demo-dpo-curves.png",
                        keys=["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"])


def study_table(runs: Path, out: Path):
    results = runs / "study" / "results.json"
    if not results.exists():
        return f"skipped: no {results} (run python -m tinyalign.lab.study)"
    return out / "study.png" if study.plot(json.loads(results.read_text()), out / "study.png") else None


def study_page(runs: Path, out: Path):
    index = runs / "study" / "index.html"
    if not index.exists():
        return f"skipped: no {index} (run python -m tinyalign.lab.study)"
    if page.find_browser() is None:
        return "skipped: no headless browser (apt-get install chromium)"
    return page.screenshot(index, out / "study-page.png")


def ablation_figure(name: str, runs: Path, out: Path):
    results = runs / "ablations" / name / "results.json"
    if not results.exists():
        return f"skipped: no {results} (run python -m tinyalign.lab.ablations {name})"
    path = out / f"ablation-{name}.png"
    return path if ablations.plot(name, json.loads(results.read_text()), path) else None


def draw_all(runs: Path, out: Path, only: list[str] | None = None) -> dict:
    """-> {figure: path written, or why it was skipped}; `only`: these figures alone."""
    figures = {"demo-dpo-curves": demo_curves, "study": study_table, "study-page": study_page,
               "tokens-training": token_figure,
               **{name: functools.partial(ablation_figure, name) for name in ablations.FIGURES}}
    unknown = sorted(set(only or []) - set(figures))
    if unknown:
        raise SystemExit(f"no figure {unknown[0]!r}; the figures: {', '.join(figures)}")
    out.mkdir(parents=True, exist_ok=True)
    done = {name: draw(runs, out) for name, draw in figures.items() if not only or name in only}
    if any(v is None for v in done.values()):
        raise SystemExit("matplotlib is needed: pip install -e \".[plot]\"")
    return done


def token_figure(runs: Path, out: Path):
    """One telling held-out pair (the largest margin at the end) at steps 50 and 150 of the DPO demo
    and at its end, token by token (lab/tokens.py), as the browser draws it."""
    dpo = runs / "demo-dpo"
    policies = [dpo / "snapshots" / "step-50", dpo / "snapshots" / "step-150", dpo / "model"]
    missing = [p for p in policies if not (p / "config.json").exists()]
    if missing:
        return f"skipped: no {missing[0]} (run python train_dpo.py, which keeps a snapshot every 50 steps)"
    if page.find_browser() is None:
        return "skipped: no headless browser (apt-get install chromium)"
    result = tokens.token_views(policies, runs / "demo-sft" / "model", runs / "demo-sft" / "samples_heldout.jsonl",
                                runs / "demo-data", swapped=False)
    end = result["views"][str(dpo / "model")]["true image"]
    telling = max(end, key=lambda pair: pair.margin(0.1)).id
    folder = runs / "tokens-figure"
    index = tokens.write_token_page(result, folder, runs / "demo-data", 0.1, pick=[telling],
                                    title="One held-out pair at steps 50 and 150 of the DPO demo, and at its end",
                                    summary=False)
    return page.screenshot(index, out / "tokens-training.png", width=1250, height=520)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="the folder the demos, the study and the ablations wrote into")
    p.add_argument("--out", default=str(REPO / "docs" / "figures"))
    p.add_argument("--only", action="append", help="draw this figure alone (repeatable), e.g. study-page")
    args = p.parse_args(argv)
    for name, result in draw_all(Path(args.runs), Path(args.out), args.only).items():
        print(f"{name}: {result}")


if __name__ == "__main__":
    main()
