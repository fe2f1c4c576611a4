"""`python -m tinyalign.lab.seeds`: the table behind the README's demo figures (mean and range over runs).
The runs themselves take hours; here, the table's arithmetic and the reading of a run's files."""

import json

import pytest

from tinyalign.lab.seeds import figures, markdown, summary_rows


def test_each_figure_gets_its_mean_min_and_max():
    runs = {"seed 0, 2 threads": {"dpo": {"reward accuracy": 0.9, "held-out pairs": 500}},
            "seed 1, 2 threads": {"dpo": {"reward accuracy": 0.8, "held-out pairs": 520}},
            "seed 0, 1 thread": {"dpo": {"reward accuracy": 0.85, "held-out pairs": 510}}}
    header, rows = summary_rows(runs, "dpo")
    assert header == ["run", "reward accuracy", "held-out pairs"]
    assert rows[:3] == [["seed 0, 2 threads", "0.900", "500"], ["seed 1, 2 threads", "0.800", "520"],
                        ["seed 0, 1 thread", "0.850", "510"]]
    assert rows[3:] == [["**mean**", "0.850", "510.0"], ["**min**", "0.800", "500"], ["**max**", "0.900", "520"]]
    table = markdown(runs, ["dpo"]).splitlines()
    assert table[0] == "### dpo" and table[2] == "| run | reward accuracy | held-out pairs |"
    assert len([line for line in table if line.startswith("| ")]) == 1 + 3 + 3


def test_figures_are_read_back_from_what_the_scripts_wrote(tmp_path):
    steer = tmp_path / "runs" / "demo-steerlm"
    steer.mkdir(parents=True)
    lines = [{"step": 10, "split": "eval", "loss": 0.3},
             {"split": "eval", "steering": {"concise and correct": {"words": 4.9, "correct": 0.8}}}]
    (steer / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert figures("steerlm", tmp_path) == {"concise and correct: words": 4.9, "concise and correct: correct": 0.8}
    (steer / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")  # a run that did not finish
    with pytest.raises(ValueError, match="no held-out line with 'steering'"):
        figures("steerlm", tmp_path)


def test_simd_off_really_changes_the_kernels_torch_runs():
    """--simd off must reach torch in the child process: ATen then runs its scalar kernels."""
    import os
    import subprocess
    import sys

    from tinyalign.lab.seeds import NO_SIMD

    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    off = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, **NO_SIMD}).stdout.strip()
    assert off == "DEFAULT"
