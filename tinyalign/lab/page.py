"""The study's page: a static `index.html` to look at answers, not only at averages.

`python -m tinyalign.lab.study` writes it beside its table: each method's training curves (SVG drawn
here from its metrics.jsonl), every held-out question with the image, the truth and every method's
answer and rating side by side (filtered in the browser: by kind, where the models disagree, the SFT
data's mistakes, wrong for one model), a few of the pairs DPO trained on with every sampled answer
they came from, and a link to the per-token view of DPO's reward (lab/tokens.py). No server, no
script library: open the file.

The pictures are copied next to the page (`page-images/`) and linked relatively, so the study's
folder can be moved or zipped whole. A few lines of script mark each picture loaded or not after the
page loads and say at the top when one is missing (tests/test_study.py reads those marks back from
a real headless browser).
"""

from __future__ import annotations

import base64
import html
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..data import ATTRIBUTES, build_pairs, read_scored
from ..infra.files import write_atomic
from ..training import split_held_out

PICTURES = "page-images"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
img.figure { max-width: 100%; }
img.curve { margin-right: 6px; }
.filters { position: sticky; top: 0; background: #fff; padding: 6px 0; }
img.shape { width: 112px; height: 112px; image-rendering: pixelated; }
.right { background: #e6f4e6; }
.wrong { background: #fbe3e3; }
.rating { color: #666; font-size: 0.8em; }
#image-check { color: #b00; font-weight: bold; }
"""

# After loading: mark every <img> data-loaded="yes" or "no", and warn at the top if any is missing.
CHECK_IMAGES = """
window.addEventListener("load", () => {
  const images = [...document.images];
  const missing = images.filter(img => !(img.complete && img.naturalWidth > 0));
  images.forEach(img => { img.dataset.loaded = missing.includes(img) ? "no" : "yes"; });
  if (missing.length) {
    document.getElementById("image-check").textContent =
      `${missing.length} of ${images.length} pictures did not load (was page-images/ moved?)`;
  }
});
"""


def text(value) -> str:
    return html.escape(str(value))


def rating(scores: dict) -> str:
    """{helpfulness: 4, ...} -> "help 4 · corr 4 · coh 4 · cplx 1 · verb 2"."""
    short = {"helpfulness": "help", "correctness": "corr", "coherence": "coh", "complexity": "cplx",
             "verbosity": "verb"}
    return " · ".join(f"{short[a]} {scores[a]}" for a in ATTRIBUTES if a in scores)


def picture(image: str, world: Path, out: Path, folder: str = PICTURES) -> str:
    """Copy one world image next to the page, into out/folder; -> its <img> tag, linked relatively."""
    source = world / image
    target = out / folder / Path(image).name
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, target)
    return f'<img class="shape" src="{folder}/{text(target.name)}" alt="{text(image)}">'


def question_text(prompt: str) -> str:
    return text(prompt.replace("<image>", "").strip())


def results_table(results: dict, columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{text(title)}</th>" for _, title in columns)
    rows = "".join(f"<tr><td>{text(name)}</td>" + "".join(
        f"<td>{r[key]:.3f}</td>" if key != "words" else f"<td>{r[key]:.1f}</td>" for key, _ in columns) + "</tr>"
        for name, r in results.items())
    return f"<table><tr><th>model</th>{head}</tr>{rows}</table>"


# ---------------------------------------------------------------------------------------------
# Training curves, drawn as SVG by hand (no plotting library), inline in the page
# ---------------------------------------------------------------------------------------------

CURVE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def curve_image(series: dict[str, list[tuple[float, float]]], title: str, width: int = 300, height: int = 190) -> str:
    """Lines of (step, value) points as an <img> whose source is the SVG itself (a data: URL), so that
    the page stays one file plus its pictures."""
    points = [pt for line in series.values() for pt in line]
    if not points:
        return ""
    left, right, top, bottom = 48, 8, 22, 42  # the bottom holds the step labels and the legend
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(min(y for _, y in points), 0.0) if title.startswith("rewards") else min(y for _, y in points), \
        max(y for _, y in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))
    parts = [f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#ccc"/>',
             f'<text x="{left}" y="14" font-size="12">{text(title)}</text>',
             f'<text x="{left - 4}" y="{top + 9}" font-size="9" text-anchor="end">{y1:.3g}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" font-size="9" text-anchor="end">{y0:.3g}</text>',
             f'<text x="{left}" y="{height - bottom + 11}" font-size="9">step {x0:g}</text>',
             f'<text x="{width - right}" y="{height - bottom + 11}" font-size="9" text-anchor="end">{x1:g}</text>']
    if y0 < 0 < y1:  # the zero line: a reward below it went down
        (_, zy), (_, _) = at(x0, 0), at(x1, 0)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{zy:.1f}" y2="{zy:.1f}" stroke="#999" '
                     'stroke-dasharray="3,3"/>')
    for k, (name, line) in enumerate(series.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(*pt) for pt in line))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts.append(f'<text x="{left + 130 * (k % 2)}" y="{height - 16 + 11 * (k // 2)}" font-size="9" '
                     f'fill="{colour}">{text(name)}</text>')  # the legend, under the chart
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif">{"".join(parts)}</svg>')
    return (f'<img class="curve" alt="{text(title)}" '
            f'src="data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()}">')


# What each method's curves show: (title, [(metric, split), ...]); the preference ones for DPO only.
CURVES = [("loss", [("loss", "train"), ("loss", "eval")])]
PREFERENCE_CURVES = [("rewards (train)", [("rewards/chosen", "train"), ("rewards/rejected", "train")]),
                     ("rewards/margin", [("rewards/margin", "train"), ("rewards/margin", "eval")]),
                     ("held-out reward accuracy", [("rewards/accuracy", "eval")])]


def training_section(runs: dict, out: Path) -> str:
    """Each method's training curves from its metrics.jsonl, with links to the run's own files."""
    rows = []
    for method, folder in runs.items():
        metrics_file = Path(folder) / "metrics.jsonl"
        if not metrics_file.exists():
            continue
        lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        charts = []
        preference = any("rewards/margin" in r for r in lines)
        for title, wanted in CURVES + (PREFERENCE_CURVES if preference else []):
            series = {f"{key} ({split})" if len(wanted) > 1 else key:
                      [(r["step"], r[key]) for r in lines if r.get("split") == split and key in r]
                      for key, split in wanted}
            charts.append(curve_image({k: v for k, v in series.items() if v}, title))
        link = os.path.relpath(metrics_file, out)
        rows.append(f"<tr><td>{text(method)}<div class=\"rating\"><a href=\"{text(link)}\">metrics.jsonl</a></div></td>"
                    f"<td>{''.join(charts)}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Training</h2><p>Each method's curves, drawn from its own metrics.jsonl (train: every step; "
            "eval: its held-out split). Rewards are DPO's implicit rewards, beta (0.1) times the log-ratio to the start "
            f"model.</p><table>{''.join(rows)}</table>")


# ---------------------------------------------------------------------------------------------
# Every held-out question, filtered in the browser
# ---------------------------------------------------------------------------------------------

# The filters: kind, only where the models disagree, only the SFT data's mistakes, wrong for one model.
# They read and write the address's #fragment too (#kind=color&disagree=1), so a filtered view can be
# shared as a link.
FILTER = """
const controls = ["kind", "disagree", "hard", "wrong"].map(id => document.getElementById("filter-" + id));
function applyFilter() {
  const [kind, disagree, hard, wrong] = controls;
  let shown = 0;
  document.querySelectorAll("tr.question").forEach(row => {
    const keep = (!kind.value || row.dataset.kind === kind.value) && (!disagree.checked || row.dataset.disagree === "1")
      && (!hard.checked || row.dataset.hard === "1") && (!wrong.value || row.dataset.wrong.split("|").includes(wrong.value));
    row.hidden = !keep;
    shown += keep;
  });
  document.getElementById("filter-count").textContent = shown;
  const state = new URLSearchParams();
  if (kind.value) state.set("kind", kind.value);
  if (disagree.checked) state.set("disagree", "1");
  if (hard.checked) state.set("hard", "1");
  if (wrong.value) state.set("wrong", wrong.value);
  history.replaceState(null, "", state.toString() ? "#" + state : location.pathname);
}
const asked = new URLSearchParams(location.hash.slice(1));
controls[0].value = asked.get("kind") || "";
controls[1].checked = asked.get("disagree") === "1";
controls[2].checked = asked.get("hard") === "1";
controls[3].value = asked.get("wrong") || "";
controls.forEach(c => c.addEventListener("change", applyFilter));
applyFilter();
"""


def answers_section(heldout, answers: dict, hard: list[bool], world: Path, out: Path) -> str:
    """Every held-out question with every model's greedy answer, and the filters above them."""
    methods = list(answers)
    head = "".join(f"<th>{text(m)}</th>" for m in methods)
    rows = []
    for i, record in enumerate(heldout):
        cells = "".join(
            f'<td class="{"right" if answers[m][i]["exact"] else "wrong"}">{text(answers[m][i]["answer"])}'
            f'<div class="rating">{rating(answers[m][i]["ratings"])}</div></td>' for m in methods)
        disagree = len({answers[m][i]["answer"] for m in methods}) > 1
        wrong = "|".join(m for m in methods if not answers[m][i]["exact"])
        mark = " (SFT data's mistake)" if hard[i] else ""
        rows.append(f'<tr class="question" data-kind="{text(record["kind"])}" data-disagree="{int(disagree)}" '
                    f'data-hard="{int(hard[i])}" data-wrong="{text(wrong)}"><td>{picture(record["image"], world, out)}'
                    f"</td><td>{question_text(record['prompt'])}</td><td>{text(record['answer'])}{mark}</td>{cells}</tr>")
    kinds = "".join(f'<option value="{text(k)}">{text(k)}</option>' for k in sorted({r["kind"] for r in heldout}))
    models = "".join(f'<option value="{text(m)}">{text(m)}</option>' for m in methods)
    controls = (f'<p class="filters">kind <select id="filter-kind"><option value="">all</option>{kinds}</select> '
                '<label><input type="checkbox" id="filter-disagree"> only where the models disagree</label> '
                "<label><input type=\"checkbox\" id=\"filter-hard\"> only the SFT data's mistakes</label> "
                f'wrong for <select id="filter-wrong"><option value="">any model or none</option>{models}</select> '
                f'(showing <span id="filter-count">{len(heldout)}</span> of {len(heldout)})</p>')
    return (f"<h2>Held-out questions: every model's greedy answer</h2><p>Green: exactly the correct answer; "
            f"red: not. Under each answer, the rule-based rater's five ratings (0-4).</p>{controls}"
            f"<table><tr><th>image</th><th>question</th><th>truth</th>{head}</tr>{''.join(rows)}</table>")


# ---------------------------------------------------------------------------------------------
# The pairs, with every sampled answer they were built from
# ---------------------------------------------------------------------------------------------


def pairs_section(samples: Path, world: Path, out: Path, n: int, seed: int, eval_fraction: float) -> str:
    """A few DPO pairs exactly as train_dpo.py builds them from the rated samples and splits them (seed
    `seed`), each with all the answers sampled for its prompt; and how many DPO trained on and held out."""
    scored, _ = read_scored(samples)
    by_id = {s.id: s for s in scored}
    pairs, _ = build_pairs(scored, seed=0)  # train_dpo.py's --pair-seed 0
    trained, held = split_held_out(pairs, eval_fraction, seed)  # exactly train_dpo.py's split (its --seed)
    ratings = {(s.id, answer): scores for s in scored for answer, scores in s.responses}
    rows = []
    for pair in sorted(random.Random(seed).sample(trained, min(n, len(trained))), key=lambda p: p.id):
        image = picture(pair.images[0], world, out) if pair.images else ""
        sampled = "".join(f"<li>{text(answer)} <span class=\"rating\">{rating(scores)}</span></li>"
                          for answer, scores in by_id[pair.id].responses)
        rows.append(f"<tr><td>{image}</td><td>{question_text(pair.prompt)}<details><summary>the "
                    f"{len(by_id[pair.id].responses)} sampled answers</summary><ul>{sampled}</ul></details></td>"
                    f'<td class="right">{text(pair.chosen)}<div class="rating">{rating(ratings[pair.id, pair.chosen])}'
                    f'</div></td><td class="wrong">{text(pair.rejected)}<div class="rating">'
                    f"{rating(ratings[pair.id, pair.rejected])}</div></td></tr>")
    link = os.path.relpath(samples, out)
    return (f"<h2>Pairs DPO trained on: {len(trained)} ({len(rows)} shown)</h2><p>{len(pairs)} pairs were built from "
            f'the rated samples (<a href="{text(link)}">{text(Path(link).name)}</a>: every sampled answer with its five '
            f"ratings); DPO held {len(held)} of them out (--eval-fraction {eval_fraction}) for its held-out metrics and "
            f"trained on the other {len(trained)}. Chosen: the best-rated of the sampled answers; rejected: one rated "
            f"at least 2 points lower (helpfulness + correctness + coherence).</p><table><tr><th>image</th>"
            f"<th>question</th><th>chosen</th><th>rejected</th></tr>{''.join(rows)}</table>")


def write_page(out: Path, results: dict, columns: list[tuple[str, str]], answers: dict, heldout: list[dict],
               hard: list[bool], world: Path, samples: Path, runs: dict | None = None, tokens_page: Path | None = None,
               n_pairs: int = 8, seed: int = 0, eval_fraction: float = 0.05) -> Path:
    """index.html in `out`: the results table (and results.png when drawn), each method's training curves
    (`runs`: {method: its run folder}), every held-out question with every method's answer (`answers`:
    {method: [{answer, exact, ratings}, ...]} in the order of `heldout`) and filters, a few of the DPO pairs,
    and a link to the per-token view of DPO's reward (`tokens_page`)."""
    out = Path(out)
    shutil.rmtree(out / PICTURES, ignore_errors=True)  # only the pictures this page shows
    figure = '<p><img class="figure" src="results.png" alt="the table as bar charts"></p>' if (out / "results.png").exists() else ""
    tokens_link = (f'<p>Where DPO\'s preference lives, token by token, on the pairs it held out: '
                   f'<a href="{text(os.path.relpath(tokens_page, out))}">the per-token view</a>.</p>'
                   if tokens_page else "")
    body = (f'<h1>tinyalign study: {len(results)} models on {len(heldout)} held-out questions</h1>'
            f'<p id="image-check"></p>{results_table(results, columns)}{figure}{tokens_link}'
            f"{training_section(runs or {}, out)}"
            f"{answers_section(heldout, answers, hard, world, out)}"
            f"{pairs_section(samples, world, out, n_pairs, seed, eval_fraction)}")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>tinyalign study</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{CHECK_IMAGES}{FILTER}</script>\n</body></html>\n")
    write_atomic(out / "index.html", page)
    return out / "index.html"


# ---------------------------------------------------------------------------------------------
# Looking at the page in a real browser: headless Chromium from the command line
# ---------------------------------------------------------------------------------------------

# Headless, runnable as root (no sandbox), none of the background connections a closed network refuses,
# and a virtual-time budget so the page's own script has run before the browser reports.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--virtual-time-budget=10000"]


def find_browser() -> str | None:
    """Chromium (Debian's `chromium`) or Chrome on the PATH, or None."""
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def in_browser(page: Path | str, *flags: str) -> str:
    """Open `page` (a file, or a file: URL with its #fragment) in headless Chromium with a fresh profile;
    -> what it printed (stdout)."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no headless browser on the PATH: install Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *flags,
                               page if str(page).startswith("file:") else Path(page).resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} failed on {page}: {done.stderr[-2000:]}")
    return done.stdout


def rendered_dom(page: Path) -> str:
    """The page's DOM as the browser holds it once loaded and its script has run."""
    return in_browser(page, "--dump-dom")


def screenshot(page: Path, png: Path, width: int = 1300, height: int = 1500) -> Path:
    """The top `width` x `height` pixels of the page, as the browser draws it."""
    in_browser(page, f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}")
    return Path(png)
