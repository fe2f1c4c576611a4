"""Scores as eval.py writes and reads them: a benchmark's headline with its per-question samples,
bootstrap intervals, the side-by-side report of several runs (the paper's Table 4 layout), and
MMBench's submission spreadsheet. Every file is written whole, under a temporary name, then renamed
(infra/files.py): a run that fails half-way never replaces the last good result.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from ..infra.files import write_atomic


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
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in parts.items():
            z.writestr(name, text)
    return write_atomic(path, packed.getvalue())


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
