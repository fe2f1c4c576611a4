"""The study in miniature, end to end at toy scale: every method trained by its own script from the
same start, and the side-by-side table written."""

import json
import re
import subprocess
import sys

import pytest

from browser import rendered_dom
from conftest import ROOT
from tinyalign.data import read_jsonl
from tinyalign.demo.world import rated_styles
from tinyalign.lab.study import is_hard


@pytest.fixture(scope="module")
def study(tiny_world, tmp_path_factory):
    """The study run once at toy scale: (its output folder, what it printed)."""
    world = tiny_world["root"] / "data"
    out = tmp_path_factory.mktemp("study")
    # The annotate step resumes from what is on disk: a random start model would give answers that
    # all rate alike (no pairs), so the ratings are provided, every answer style for every prompt.
    prompts = read_jsonl(world / "prompts.jsonl")
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rated_styles(prompts)))
    done = subprocess.run([sys.executable, "-m", "tinyalign.lab.study", "--start", str(tiny_world["checkpoint"]),
                           "--world", str(world), "--out", str(out), "--epochs-scale", "0.2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_study_runs_every_method_and_writes_the_table(study):
    out, printed = study
    assert "already rated: 48" in printed  # nothing sampled again
    for method in ("sft", "steerlm", "rejection-sampling", "dpo"):
        assert (out / method / "model" / "config.json").exists(), method
        assert f"--out {out / method}" in printed  # the command a user would type was printed
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["start", "SFT", "SteerLM", "Rejection sampling", "DPO"]
    for r in results.values():
        assert r["n"] == 16 and 0.0 <= r["exact"] <= 1.0 and 0.0 <= r["helpfulness"] <= 4.0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | exact answer |") and len([t for t in table if t.startswith("| ")]) == 6
    assert f"| DPO | {results['DPO']['exact']:.3f} |" in (out / "results.md").read_text()


def test_the_study_page_shows_answers_and_pairs_and_every_picture_loads_in_a_browser(study, tiny_world):
    out, printed = study
    page = out / "index.html"
    assert f"{page} (open it in a browser)" in printed
    answers = json.loads((out / "answers.json").read_text())
    dom = rendered_dom(page)
    images = re.findall(r"<img [^>]*>", dom)
    # 16 questions and 8 pairs shown (the toy world has 16 held-out questions and one pair per prompt)
    assert len(re.findall(r'<img class="shape"', dom)) == 16 + 8
    assert images and all('data-loaded="yes"' in tag for tag in images), [t for t in images if "yes" not in t]
    assert '<p id="image-check"></p>' in dom  # no warning shown
    # every method's answer to a shown question is on the page, as the study scored it
    for method, rows in answers.items():
        assert f"<th>{method}</th>" in dom
        assert sum(row["answer"].replace("<", "&lt;") in dom for row in rows) >= 1, method

    # each method's training curves, drawn from its metrics.jsonl: loss for all four, DPO's rewards,
    # margin and held-out accuracy besides (the images' loading is checked above with the others)
    assert len(re.findall(r'<img class="curve" alt="loss"', dom)) == 4
    for title in ("rewards (train)", "rewards/margin", "held-out reward accuracy"):
        assert len(re.findall(rf'<img class="curve" alt="{re.escape(title)}"', dom)) == 1, title
    for method in ("sft", "steerlm", "rejection-sampling", "dpo"):
        assert f'href="{method}/metrics.jsonl"' in dom
    # the pairs: how many DPO trained on and held out, as train_dpo.py split them, and every sampled answer
    held = read_jsonl(out / "dpo-heldout-pairs.jsonl")
    assert f"DPO held {len(held)} of them out" in dom and len(held) >= 1
    assert dom.count("sampled answers</summary>") == 8
    # the per-token view of DPO's reward on those held-out pairs, linked and drawn
    assert 'href="tokens/index.html"' in dom
    tokens_dom = rendered_dom(out / "tokens" / "index.html")
    assert tokens_dom.count('<tr id="pair-') == len(held) and 'data-loaded="no"' not in tokens_dom

    # The filters, set from the address: only the SFT data's mistakes, or only where the models disagree
    heldout = read_jsonl(tiny_world["root"] / "data" / "heldout.jsonl")
    for fragment, expected in (("hard=1", sum(is_hard(r) for r in heldout)),
                               ("disagree=1", sum(len({rows[i]["answer"] for rows in answers.values()}) > 1
                                                  for i in range(len(heldout))))):
        filtered = rendered_dom(page.resolve().as_uri() + "#" + fragment)
        shown = [row for row in re.findall(r'<tr class="question"[^>]*>', filtered) if "hidden" not in row]
        assert len(shown) == expected and f'<span id="filter-count">{expected}</span>' in filtered, fragment

    # The check can fail: one picture gone, the browser marks it and the page says so.
    missing = sorted((out / "page-images").iterdir())[0]
    missing.rename(out / "elsewhere.png")
    try:
        dom = rendered_dom(page)
    finally:
        (out / "elsewhere.png").rename(missing)
    assert re.search(rf'<img [^>]*src="page-images/{missing.name}"[^>]*data-loaded="no"', dom)
    assert f"1 of {len(images)} pictures did not load" in dom

    # and the README's picture of it (python -m tinyalign.lab.figures) is the browser's drawing of the page
    from PIL import Image

    from tinyalign.lab.page import screenshot

    with Image.open(screenshot(page, out / "page.png", width=800, height=600)) as shot:
        assert shot.size == (800, 600) and len(set(shot.getdata())) > 10  # drawn, not blank


def test_without_a_browser_the_error_says_what_to_install_and_the_figures_skip_the_page(monkeypatch, tmp_path):
    from tinyalign.lab import figures, page

    monkeypatch.setattr(page, "find_browser", lambda: None)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "index.html").write_text("<html></html>")
    with pytest.raises(RuntimeError, match="apt-get install chromium"):
        page.rendered_dom(tmp_path / "study" / "index.html")
    done = figures.draw_all(tmp_path, tmp_path / "figures")
    assert done["study-page"] == "skipped: no headless browser (apt-get install chromium)"
