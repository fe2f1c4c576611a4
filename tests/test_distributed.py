"""Two processes (torchrun, gloo on CPU) train exactly like one process with the same global batch."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_training import dpo_args, metrics, sft_args, write_pairs

import train_dpo
import train_sft


def torchrun(script, args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / script), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def with_batch(args, size):
    args = list(args)
    args[args.index("--batch-size") + 1] = str(size)
    return args


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_two_processes_match_one(script, tiny_world, tmp_path):
    if script == "train_sft.py":
        make = lambda out: sft_args(tiny_world, out, "--max-steps", "2", "--lora-dropout", "0", "--grad-accum", "2")
        main = train_sft.main
    else:
        pairs = write_pairs(tiny_world, tmp_path / "pairs.jsonl")
        make = lambda out: dpo_args(tiny_world, pairs, out, "--max-steps", "2", "--lora-dropout", "0", "--grad-accum", "2")
        main = train_dpo.main
    main(with_batch(make(tmp_path / "one"), 8))
    torchrun(script, with_batch(make(tmp_path / "two"), 4), tmp_path)  # 2 processes x 4 = the same 8
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # Two steps of two micro-batches: the same four micro-batches in both runs (a short last batch
    # of an epoch is dropped with several processes, so later steps could differ in data, not in math).
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()
