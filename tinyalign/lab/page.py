"""The study's page: a static `index.html` to look at answers, not only at averages.

`python -m tinyalign.lab.study` writes it beside its table. For a sample of held-out questions it shows
the image, the truth and every method's answer side by side with its rating; then a few of the pairs
DPO trained on, chosen and rejected with their ratings. No server, no script library: open the file.

The pictures are copied next to the page (`page-images/`) and linked relatively, so the study's
folder can be moved or zipped whole. A few lines of script mark each picture loaded or not after the
page loads and say at the top when one is missing (tests/test_study.py reads those marks back from
a real headless browser).
"""

from __future__ import annotations

import html
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..data import ATTRIBUTES, build_pairs, read_scored
from ..infra.files import write_atomic

PICTURES = "page-images"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
img.figure { max-width: 100%; }
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


def sample_questions(heldout: list[dict], hard: list[bool], n: int, seed: int) -> list[int]:
    """Indices of n held-out questions: half among those the SFT data systematically mislabels (where
    the methods differ most), half among the rest, drawn with `seed`; in file order."""
    rng = random.Random(seed)
    hard_ones = [i for i, h in enumerate(hard) if h]
    easy_ones = [i for i, h in enumerate(hard) if not h]
    picked = rng.sample(hard_ones, min(n // 2, len(hard_ones)))
    picked += rng.sample(easy_ones, min(n - len(picked), len(easy_ones)))
    return sorted(picked)


def answers_section(heldout, answers: dict, hard: list[bool], world: Path, out: Path, n: int, seed: int) -> str:
    methods = list(answers)
    head = "".join(f"<th>{text(m)}</th>" for m in methods)
    rows = []
    for i in sample_questions(heldout, hard, n, seed):
        record = heldout[i]
        cells = "".join(
            f'<td class="{"right" if answers[m][i]["exact"] else "wrong"}">{text(answers[m][i]["answer"])}'
            f'<div class="rating">{rating(answers[m][i]["ratings"])}</div></td>' for m in methods)
        mark = " (SFT data's mistake)" if hard[i] else ""
        rows.append(f"<tr><td>{picture(record['image'], world, out)}</td><td>{question_text(record['prompt'])}"
                    f"</td><td>{text(record['answer'])}{mark}</td>{cells}</tr>")
    return (f"<h2>Held-out questions: every model's greedy answer</h2><p>Green: exactly the correct answer; "
            f"red: not. Under each answer, the rule-based rater's five ratings (0-4).</p>"
            f"<table><tr><th>image</th><th>question</th><th>truth</th>{head}</tr>{''.join(rows)}</table>")


def pairs_section(samples: Path, world: Path, out: Path, n: int, seed: int) -> str:
    """A few DPO pairs exactly as train_dpo.py builds them from the rated samples (pair seed 0)."""
    scored, _ = read_scored(samples)
    ratings = {(s.id, answer): scores for s in scored for answer, scores in s.responses}
    pairs, _ = build_pairs(scored, seed=0)
    rows = []
    for pair in sorted(random.Random(seed).sample(pairs, min(n, len(pairs))), key=lambda p: p.id):
        image = picture(pair.images[0], world, out) if pair.images else ""
        rows.append(f"<tr><td>{image}</td><td>{question_text(pair.prompt)}</td>"
                    f'<td class="right">{text(pair.chosen)}<div class="rating">{rating(ratings[pair.id, pair.chosen])}'
                    f'</div></td><td class="wrong">{text(pair.rejected)}<div class="rating">'
                    f"{rating(ratings[pair.id, pair.rejected])}</div></td></tr>")
    return (f"<h2>Pairs DPO trained on ({len(pairs)} in all; {len(rows)} shown)</h2><p>Chosen: the best-rated of "
            f"the 4 sampled answers; rejected: one rated at least 2 points lower (helpfulness + correctness + "
            f"coherence).</p><table><tr><th>image</th><th>question</th><th>chosen</th><th>rejected</th></tr>"
            f"{''.join(rows)}</table>")


def write_page(out: Path, results: dict, columns: list[tuple[str, str]], answers: dict, heldout: list[dict],
               hard: list[bool], world: Path, samples: Path, n_questions: int = 16, n_pairs: int = 8,
               seed: int = 0) -> Path:
    """index.html in `out`: the results table (and results.png when drawn), a sample of held-out
    questions with every method's answer (`answers`: {method: [{answer, exact, ratings}, ...]} in the
    order of `heldout`), and a few of the DPO pairs."""
    out = Path(out)
    shutil.rmtree(out / PICTURES, ignore_errors=True)  # only the pictures this page shows
    figure = '<p><img class="figure" src="results.png" alt="the table as bar charts"></p>' if (out / "results.png").exists() else ""
    body = (f'<h1>tinyalign study: {len(results)} models on {len(heldout)} held-out questions</h1>'
            f'<p id="image-check"></p>{results_table(results, columns)}{figure}'
            f"{answers_section(heldout, answers, hard, world, out, n_questions, seed)}"
            f"{pairs_section(samples, world, out, n_pairs, seed)}")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>tinyalign study</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{CHECK_IMAGES}</script>\n</body></html>\n")
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


def in_browser(page: Path, *flags: str) -> str:
    """Open `page` in headless Chromium with a fresh profile; -> what it printed (stdout)."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no headless browser on the PATH: install Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *flags,
                               Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=120)
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
