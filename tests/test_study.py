"""The study in miniature, end to end at toy scale: every method trained by its own script from the
same start, and the side-by-side table written."""

import json
import subprocess
import sys

from conftest import ROOT
from tinyalign.demo import rated_styles, read_heldout


def test_study_runs_every_method_and_writes_the_table(tiny_world, tmp_path):
    world = tiny_world["root"] / "data"
    out = tmp_path / "study"
    out.mkdir()
    # The annotate step resumes from what is on disk: a random start model would give answers that
    # all rate alike (no pairs), so the ratings are provided, every answer style for every prompt.
    prompts = read_heldout(world / "prompts.jsonl")
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rated_styles(prompts)))
    done = subprocess.run([sys.executable, "-m", "tinyalign.study", "--start", str(tiny_world["checkpoint"]),
                           "--world", str(world), "--out", str(out), "--epochs-scale", "0.2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "already rated: 48" in done.stdout  # nothing sampled again
    for method in ("sft", "steerlm", "rejection-sampling", "dpo"):
        assert (out / method / "model" / "config.json").exists(), method
        assert f"--out {out / method}" in done.stdout  # the command a user would type was printed
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["start", "SFT", "SteerLM", "Rejection sampling", "DPO"]
    for r in results.values():
        assert r["n"] == 16 and 0.0 <= r["exact"] <= 1.0 and 0.0 <= r["helpfulness"] <= 4.0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | exact answer |") and len([t for t in table if t.startswith("| ")]) == 6
    assert f"| DPO | {results['DPO']['exact']:.3f} |" in (out / "results.md").read_text()
