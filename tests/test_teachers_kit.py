"""The teacher's kit (docs/workshop.md, "For the teacher"): the set-up check runs and reads a busy
machine right, a finished runs/ packs into one archive that unpacks into a working runs/, tinyalign
installs offline from a wheel folder, and the equation sheet names a function on every line."""

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tinyalign.lab import check, pack

REPO = Path(__file__).resolve().parent.parent


def test_setup_check_at_tiny_size_starts_at_ln2_and_prints_every_measured_exercise(tmp_path, capsys, monkeypatch):
    for script in ("train_sft.py", "train_dpo.py", "train_steerlm.py"):  # a clone, as far as the check looks
        (tmp_path / script).write_text("")
    monkeypatch.chdir(tmp_path)
    result = check.main(["--steps", "2", "--questions", "2"])
    printed = capsys.readouterr().out
    assert result["problems"] == [], printed
    assert "loss 0.6931 at the start" in printed
    reference = json.loads(check.TIMES.read_text())
    for name, command, _ in check.EXERCISES:  # every exercise was measured, and is printed with its command
        assert name in reference["exercises"], f"exercise_times.json lacks {name}: python -m tinyalign.lab.check --measure"
        assert f"{name}: {command}" in printed
    assert printed.rstrip().endswith("Ready.")


def test_setup_check_names_a_missing_clone_and_the_thread_advice(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no scripts here
    found, problems = check.install_problems(tmp_path)
    assert any("train_sft.py is missing" in p for p in problems)
    # one thread faster than the default: the advice is printed with the command to use
    fake = {1: {"seconds": 2.0, "train_s": 1.5, "generate_s": 0.5, "losses": [0.6931, 0.6], "answers": 2},
            2: {"seconds": 9.0, "train_s": 7.0, "generate_s": 2.0, "losses": [0.6931, 0.6], "answers": 2}}
    monkeypatch.setattr(check, "calibrate", lambda steps, questions: {"runs": fake, "best_threads": 1,
                                                                      "default_threads": 2})
    check.main([])
    printed = capsys.readouterr().out
    assert "One thread is 4.5x faster than 2 here" in printed and "export OMP_NUM_THREADS=1" in printed
    # and the expected times scale with this machine's calibration against the reference's
    reference = {"exercises": {check.EXERCISES[0][0]: {"seconds": 100.0, "calibration_s": 4.0}}}
    assert check.expected_times(2.0, reference) == [(check.EXERCISES[0][0], check.EXERCISES[0][1], 50.0)]


def test_pack_keeps_models_and_results_and_leaves_checkpoints_out(tmp_path):
    runs = tmp_path / "runs"
    for name in ("demo-data/images/0.png", "demo-sft/model/config.json", "demo-dpo/model/config.json",
                 "demo-dpo/metrics.jsonl", "demo-dpo/checkpoints/step-50/tensors.safetensors",
                 "demo-dpo/snapshots/step-50/config.json", "ablations/beta-nll/results.json",
                 "ablations/beta-nll/cache/ref_logps/x.json", "demo-dpo/.lock",
                 "ablations/margin-tokens/beta-0-1-seed0/snapshots/step-10/config.json"):
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_text(name)
    (runs / "old-kit.tar.gz").write_text("an archive packed before, inside runs/")
    n, _ = pack.pack(runs, runs / "old-kit.tar.gz")  # packing over it, into runs/ itself
    (runs / "old-kit.tar.gz").rename(tmp_path / "kit.tar.gz")
    with tarfile.open(tmp_path / "kit.tar.gz") as tar:
        names = sorted(tar.getnames())
        tar.extractall(tmp_path / "laptop", filter="data")
    assert names == ["runs/ablations/beta-nll/results.json", "runs/demo-data/images/0.png",
                     "runs/demo-dpo/metrics.jsonl", "runs/demo-dpo/model/config.json",
                     "runs/demo-dpo/snapshots/step-50/config.json", "runs/demo-sft/model/config.json"]
    assert n == 6 and (tmp_path / "laptop/runs/demo-dpo/model/config.json").read_text() == "demo-dpo/model/config.json"
    (runs / "demo-dpo/model/config.json").unlink()
    with pytest.raises(SystemExit, match="no demo-dpo/model/config.json"):
        pack.pack(runs, tmp_path / "again.tar.gz")
    assert not (tmp_path / "again.tar.gz").exists()


def test_offline_install_from_a_wheel_folder(tmp_path):
    """The classroom recipe's second half, without a network: pip installs tinyalign from a folder of
    wheels with --no-index, package data included, and the set-up check runs from the installed copy.
    (Its dependencies come from this environment: the test builds tinyalign's wheel only.)"""
    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # built from a copy of what the wheel holds, so that the build's own folders stay out of the clone
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "tinyalign", source / "tinyalign", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps", "-q",
                    "--target", str(site), "tinyalign"], check=True, timeout=300)
    for script in ("train_sft.py", "train_dpo.py", "train_steerlm.py"):
        (tmp_path / script).write_text("")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import tinyalign, tinyalign.lab.check as c; print(tinyalign.__file__); "
                           "c.main(['--steps', '2', '--questions', '2'])"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(str(site)), done.stdout[:300]  # the installed copy, not the clone
    assert "Ready." in done.stdout
    assert (site / "tinyalign" / "evaluation" / "judge_prompts").is_dir()  # package data came along
    assert (site / "tinyalign" / "lab" / "exercise_times.json").exists()
    # every requirement the wheel declares is met here (what pip would check with its dependencies in the folder)
    metadata = next(site.glob("tinyalign-*.dist-info")) / "METADATA"
    required = re.findall(r"^Requires-Dist: ([\w-]+)[^;\n]*$", metadata.read_text(), re.M)
    assert set(required) == {"torch", "safetensors", "tokenizers", "pillow", "numpy", "tqdm"}


def test_every_line_of_the_equation_sheet_names_the_function_that_computes_it():
    rows = [line for line in (REPO / "docs" / "equations.md").read_text().splitlines()
            if line.startswith("| ") and "computed by" not in line]
    assert len(rows) >= 18
    for row in rows:
        assert re.search(r"`[\w/]+\.py::\w+`", row.split("|")[-2]), row


def test_the_workshop_page_gives_each_exercise_its_measured_time():
    """docs/workshop.md writes next to each exercise the time exercise_times.json holds for it (the
    reference machine's, which `python -m tinyalign.lab.check` scales to a laptop)."""
    text = (REPO / "docs" / "workshop.md").read_text()
    assert "{T:" not in text and "_TIME" not in text
    measured = json.loads(check.TIMES.read_text())["exercises"]
    for name, command, _ in check.EXERCISES:
        time = check.minutes(measured[name]["seconds"])
        number = name.split(".")[0]
        if number.isdigit():
            heading = re.search(rf"^## Exercise {number}\..*$", text, re.M).group(0)
            assert time in heading, (name, time, heading)
        elif name.startswith("set-up"):
            assert re.search(rf"^{re.escape(command)} .*\({re.escape(time)}\)$", text, re.M), (name, time)


def test_every_workshop_command_starts_without_a_warning():
    """Each `python -m tinyalign...` of docs/workshop.md starts cleanly (no runpy RuntimeWarning about a
    module imported twice, which a room of participants would all ask about)."""
    modules = sorted(set(re.findall(r"python -m (tinyalign[\w.]*)", (REPO / "docs" / "workshop.md").read_text())))
    assert len(modules) >= 6
    for module in modules:
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert "Warning" not in done.stderr, (module, done.stderr[-1000:])
        assert done.returncode == 0 or module == "tinyalign.lab.workshop", (module, done.stderr[-1000:])
