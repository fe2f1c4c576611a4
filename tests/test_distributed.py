"""Two processes (torchrun, gloo on CPU) train exactly like one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_training import dpo_args, metrics, sft_args, write_pairs

import train_dpo
import train_sft


def torchrun(script, args, tmp_path, **env_vars):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_vars}
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


def test_fsdp_two_processes_match_one_and_resume_from_a_sharded_checkpoint(tiny_world, tmp_path):
    """FSDP2 (--fsdp, gloo on CPU): two processes, each holding half of every weight, gradient and AdamW
    moment, train like one process with the same global batch; the run is stopped after step 1 and
    resumed from its checkpoint (written whole by the sharded run, read back into shards); the
    final checkpoint and model equal the one-process run's."""
    from safetensors.torch import load_file

    from tinyalign.infra.checkpoints import latest_checkpoint

    pairs = write_pairs(tiny_world, tmp_path / "pairs.jsonl")
    make = lambda out, *more: dpo_args(tiny_world, pairs, out, "--max-steps", "2", "--lora-dropout", "0",  # noqa: E731
                                       "--grad-accum", "2", *more)
    train_dpo.main(with_batch(make(tmp_path / "one"), 8))
    torchrun("train_dpo.py", with_batch(make(tmp_path / "two", "--fsdp", "--stop-after", "1"), 4), tmp_path)
    assert len(metrics(tmp_path / "two")) == 1 and not (tmp_path / "two" / "model").exists()
    torchrun("train_dpo.py", with_batch(make(tmp_path / "two", "--fsdp", "--resume"), 4), tmp_path)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    ckpt_one = load_file(latest_checkpoint(tmp_path / "one") / "tensors.safetensors")
    ckpt_two = load_file(latest_checkpoint(tmp_path / "two") / "tensors.safetensors")
    assert sorted(ckpt_one) == sorted(ckpt_two) and any(k.startswith("optimizer/") for k in ckpt_one)
    for name, t in ckpt_one.items():
        if not name.startswith("rng/"):  # each process draws its own dropout stream
            torch.testing.assert_close(ckpt_two[name], t, rtol=1e-4, atol=1e-6, msg=name)
    model_one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    model_two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert sorted(model_one) == sorted(model_two)
    for name, t in model_one.items():
        torch.testing.assert_close(model_two[name], t, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_full_fine_tuning_with_compiled_blocks_matches_one_process(tiny_world, tmp_path):
    """--fsdp with --lora-r 0: every decoder weight trains, sharded over two processes; the losses
    and the saved model equal one process's. The sharded run also compiles its blocks (--compile,
    what a GPU run does by default: each block compiled, then sharded), against an eager one-process
    run, so sharding and compiling together are checked against the plain path."""
    from safetensors.torch import load_file

    make = lambda out, *more: sft_args(tiny_world, out, "--max-steps", "2", "--lora-r", "0", "--grad-accum", "2",  # noqa: E731
                                       *more)
    train_sft.main(with_batch(make(tmp_path / "one"), 8))
    kernels = tmp_path / "inductor"  # where the sharded run's compiled kernels go: proof that it compiled
    torchrun("train_sft.py", with_batch(make(tmp_path / "two", "--fsdp", "--compile"), 4), tmp_path,
             TORCHINDUCTOR_CACHE_DIR=str(kernels))
    assert any(kernels.rglob("*.py")), "the --compile run compiled nothing"
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 2 and one[1]["loss"] != one[0]["loss"]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    model_one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    model_two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    # Adam moves every weight by up to lr (1e-3) per step, whatever its gradient's size; where a
    # gradient is near zero, summing it in another order (two halves, then reduced) changes that move
    # in its last digits: up to 2e-6 measured. 1e-5 is 1% of one step's largest move.
    for name, t in model_one.items():
        torch.testing.assert_close(model_two[name], t, rtol=1e-4, atol=1e-5, msg=name)


def test_what_several_processes_cannot_do_is_refused_by_name(tiny_world, tmp_path):
    """mDPO's step has two forwards (DDP allows one per backward), and a sharded model cannot be run by
    rank 0 alone (--ref live): each is refused with its reason, before any work."""
    pairs = write_pairs(tiny_world, tmp_path / "pairs.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for extra, reason in ((["--loss-type", "mdpo"], "--loss-type mdpo runs in one process"),
                          (["--fsdp", "--ref", "live"], "--fsdp: the demo's report and --ref live")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_dpo.py"), *dpo_args(tiny_world, pairs, tmp_path / "out", *extra)]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and reason in done.stdout + done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


SIGNAL_ONE_RANK = """
import os, runpy, signal, sys
from tinyalign.infra.run import Run
logged = Run.log
def log(self, step, metrics, split="train"):  # rank 1 alone is told to stop, during step 1
    if step == 1 and split == "train" and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    logged(self, step, metrics, split)
Run.log = log
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_signal_to_one_process_stops_every_process_at_the_same_step_with_a_checkpoint(tiny_world, tmp_path):
    """A scheduler may signal one process first: the others learn it at the step's end (one all-reduce
    of a flag per step), all stop after the same step, rank 0 writes its checkpoint, and each exits 143."""
    (tmp_path / "signal_one_rank.py").write_text(SIGNAL_ONE_RANK)
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = sft_args(tiny_world, out, "--max-steps", "3", "--save-every", "0", "--lora-dropout", "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "signal_one_rank.py"), str(ROOT / "train_sft.py"), *with_batch(args, 4)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "exitcode  : 143" in said, said[-3000:]
    from tinyalign.infra.checkpoints import latest_checkpoint

    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["step"] == 1
    assert [m["step"] for m in metrics(out)] == [1] and not (out / "model").exists()
