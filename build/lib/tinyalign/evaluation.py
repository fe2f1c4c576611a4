"""What eval.py's benchmarks share: resumable batched generation, result files, bootstrap intervals,
and the side-by-side report.

Generation writes each answer to `<run>/<benchmark>/generations.jsonl` as soon as its batch is done
(flushed and fsynced), so an interrupted run loses at most one batch and a rerun generates only what
is missing. Result files are written whole, under a temporary name, then renamed: a run that fails
half-way never replaces the last good result.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .steer import steer_prompt


def write_atomic(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_generations(path) -> dict:
    """id -> answer text, from a generations file (a line cut short by a crash is ignored: regenerated)."""
    done = {}
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return done


@torch.no_grad()
def generate_answers(model, processor, items: list[dict], path, max_new_tokens: int, batch_size: int = 8,
                     steer: dict | None = None, steer_template: str = "tinyalign", desc: str = "generating",
                     seed: int = 0) -> dict:
    """Answers for items {"id", "turns": [{"from", "value"}...] ending with a human turn, "images":
    [path or PIL image, one per <image> tag], "temperature"?}; -> {id: text} for all items. Greedy,
    unless an item asks for a temperature (then sampled as transformers' `generate` samples by
    default: top_k 50; each item's randomness keyed to `seed` and its place in `items`).

    Continuous batching (`generate_stream`): `batch_size` rows decode at once and a finished answer
    frees its row for the next question, so a batch never waits for its longest answer. Each answer
    is appended to `path` as it finishes; items already there are not generated again. With `steer`
    (SteerLM checkpoints) the ratings are written into the last question, the same way
    train_steerlm.py wrote them."""
    from .generate import generate_stream

    done = read_generations(path)
    number = {item["id"]: i for i, item in enumerate(items)}
    todo = [item for item in items if item["id"] not in done]
    if not todo:
        return done
    model.eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for item in todo:
        turns = [dict(t) for t in item["turns"]]
        if steer:
            turns[-1]["value"] = steer_prompt(turns[-1]["value"], steer, steer_template)
        # Only the item's own images are images: an "<image>" inside a benchmark's question is text.
        encoded[item["id"]] = processor.encode(turns, where=f"question {item['id']}",
                                               num_images=len(item.get("images", []))).input_ids

    def prompt(item):
        images = item.get("images", [])
        return encoded[item["id"]], (lambda: processor.images.batch(images)) if images else None

    temperature = {item["id"]: item.get("temperature", 0.0) for item in todo}
    with open(path, "a") as f, tqdm(total=len(todo), desc=desc, unit="answer") as bar:
        for t in sorted(set(temperature.values())):  # one temperature per stream
            group = [item for item in todo if temperature[item["id"]] == t]
            stream = generate_stream(model, [prompt(item) for item in group], slots=batch_size,
                                     max_new_tokens=max_new_tokens, temperature=t if t >= 1e-4 else 0.0, top_k=50,
                                     eos_token_id=processor.eos_token_id, seed=seed,
                                     prompt_numbers=[number[item["id"]] for item in group],
                                     compile_step=model.device.type == "cuda")
            for i, (answer,) in stream:
                if answer and answer[-1] == processor.eos_token_id:
                    answer = answer[:-1]
                text = processor.decode(answer).strip()
                done[group[i]["id"]] = text
                f.write(json.dumps({"id": group[i]["id"], "text": text}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
    return done


def write_xlsx(path, header: list[str], rows: list[list]) -> Path:
    """A one-sheet Excel file (what MMBench's evaluation server takes), written with zipfile: an .xlsx
    is a zip of XML parts. Every cell is an inline string; written whole, then renamed."""
    import zipfile
    from xml.sax.saxutils import escape

    def column(i: int) -> str:  # 0 -> A, 25 -> Z, 26 -> AA
        name = ""
        i += 1
        while i:
            i, rest = divmod(i - 1, 26)
            name = chr(65 + rest) + name
        return name

    def row_xml(r: int, values) -> str:
        cells = "".join(f'<c r="{column(c)}{r}" t="inlineStr"><is><t xml:space="preserve">{escape(str(v))}</t></is></c>'
                        for c, v in enumerate(values))
        return f'<row r="{r}">{cells}</row>'

    sheet = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
             '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
             + "".join(row_xml(r, values) for r, values in enumerate([header] + rows, 1)) + "</sheetData></worksheet>")
    main_ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel_ns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    package_rels = "http://schemas.openxmlformats.org/package/2006/relationships"
    parts = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>'),
        "_rels/.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{package_rels}">'
            f'<Relationship Id="rId1" Type="{rel_ns}/officeDocument" Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="{main_ns}" xmlns:r="{rel_ns}">'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{package_rels}">'
            f'<Relationship Id="rId1" Type="{rel_ns}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'),
        "xl/worksheets/sheet1.xml": sheet,
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in parts.items():
            z.writestr(name, text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals and the report
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(samples: list, statistic, n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of statistic(resampled samples): the benchmark's questions drawn
    again with replacement, n_resamples times. `samples` is one entry per question."""
    if len(samples) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = [statistic([samples[i] for i in rng.integers(0, len(samples), len(samples))])
              for _ in range(n_resamples)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def f1_of(samples) -> float:
    """POPE's headline: the F1 of each split ("yes" the positive class), averaged over the splits.
    samples: [(prediction, label, split)] (or (prediction, label) for a single split)."""
    from .benchmarks import pope_metrics

    splits = {}
    for s in samples:
        splits.setdefault(s[2] if len(s) > 2 else "", []).append(s)
    return mean([pope_metrics([s[0] for s in rows], [s[1] for s in rows])["f1"] for rows in splits.values()])


def relative_of(pairs) -> float:
    """LLaVA-Bench relative score of [(reference score, model score)] pairs."""
    return 100 * sum(m for _, m in pairs) / max(sum(r for r, _ in pairs), 1e-9)


# How each benchmark's headline is recomputed from its per-question samples (for the intervals).
STATISTICS = {"mean": mean, "mean_percent": lambda v: 100 * mean(v), "f1": f1_of, "relative": relative_of}
# The paper's Table 4 columns, in its order, then the preference held-out metric.
REPORT_COLUMNS = [("mmvet", "MM-Vet"), ("llava_bench", "LLaVA-Bench"), ("pope", "POPE (F1)"), ("mmbench", "MMBench"),
                  ("mtbench", "MT-Bench"), ("alpaca_eval", "AlpacaEval"), ("preference", "pref. reward acc.")]


def headline(benchmark: str, score: float, statistic: str, samples: list, **extra) -> dict:
    """The record every benchmark writes in results.json: the score and how to recompute it."""
    return {"benchmark": benchmark, "score": score, "statistic": statistic, "samples": samples, **extra}


def load_results(run_dir) -> dict:
    """benchmark -> results.json of one run folder (each benchmark in its own subfolder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    results = {}
    for path in sorted(run_dir.glob("*/results.json")):
        data = json.loads(path.read_text())
        results[data["benchmark"]] = data
    return results


def format_cell(result: dict | None, n_resamples: int = 1000) -> tuple[str, float | None]:
    if result is None:
        return "-", None
    score = result["score"]
    digits = 3 if result["statistic"] == "f1" or abs(score) < 2 else (2 if abs(score) < 20 else 1)
    cell = f"{score:.{digits}f}"
    samples = result.get("samples") or []
    if samples and result["statistic"] in STATISTICS:
        samples = [tuple(s) if isinstance(s, list) else s for s in samples]
        low, high = bootstrap_ci(samples, STATISTICS[result["statistic"]], n_resamples)
        if not math.isnan(low):
            cell += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return cell, score


def report(run_dirs: list, out_dir, n_resamples: int = 1000) -> str:
    """Markdown table: one row per run folder, one column per benchmark, with 95% bootstrap
    intervals; written to out_dir/report.md (and report.png when matplotlib is installed)."""
    rows, scores = [], {}
    for run_dir in run_dirs:
        results = load_results(run_dir)
        name = Path(run_dir).name
        cells = []
        for key, _ in REPORT_COLUMNS:
            cell, score = format_cell(results.get(key), n_resamples)
            cells.append(cell)
            if score is not None:
                scores.setdefault(key, {})[name] = score
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    header = "| model | " + " | ".join(title for _, title in REPORT_COLUMNS) + " |"
    table = "\n".join([header, "|---" * (len(REPORT_COLUMNS) + 1) + "|"] + rows)
    table += (f"\n\nBrackets: 95% bootstrap interval over the benchmark's questions ({n_resamples} resamples). "
              "POPE: F1 averaged over its splits; MMBench: circular accuracy (%); MT-Bench: mean "
              "rating 1-10 over both turns; AlpacaEval: win rate (%) against the reference outputs.\n")
    out_dir = Path(out_dir)
    write_atomic(out_dir / "report.md", table)
    plot_report(scores, out_dir / "report.png")
    return table


def plot_report(scores: dict, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not scores:
        return False
    titles = dict(REPORT_COLUMNS)
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3.2), squeeze=False)
    for ax, (key, by_model) in zip(axes[0], scores.items()):
        ax.bar(list(by_model), list(by_model.values()), color="tab:blue")
        ax.set_title(titles.get(key, key))
        ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
