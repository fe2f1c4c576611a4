"""Crash-proof runs: a training run killed at every named point of its writes resumes to the same
result, with one metrics line per step and nothing left behind.

The crash is injected, not timed: TINYALIGN_CRASH_AT names a `crash_point` (tinyalign/infra/files.py,
weights.py, training.py) and the process dies there with os._exit, as under kill -9: no `finally`,
no cleanup. The run goes in a forked child (no second torch import; one thread, since OpenMP's
thread pool does not survive a fork), the resume in this process.
"""

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tinyalign
import train_dpo
import train_sft
from tinyalign.infra.checkpoints import KEEP, CheckpointDamaged, latest_checkpoint
from tinyalign.infra.files import CRASH_ENV, CRASH_EXIT_CODE, RunInUse
from test_training import dpo_args, sft_args, write_pairs

STEPS = ["--max-steps", "4", "--save-every", "1", "--eval-every", "2"]

# Each point, and the time it is reached that the crash takes: the second checkpoint save, so that
# a published checkpoint (step 1) exists; the final model's save; a step logged after the last checkpoint.
CHECKPOINT_POINTS = [f"checkpoint: {p}#2" for p in ("folder made, nothing written", "tensors written", "state written",
                                                     "folder renamed, pointer not yet moved", "pointer moved",
                                                     "older ones removed")] + ["latest: written, not yet renamed#2"]
FINAL_POINTS = ["model: files written, not yet renamed", "model: renamed into place", "run: step logged#3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Forked children run on one thread; the runs they are compared with do too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_until_crash(main, argv, point: str) -> None:
    """main(argv) in a forked child that dies at `point`; fails if it ends any other way."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.environ[CRASH_ENV] = point
            main(argv)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == CRASH_EXIT_CODE, f"the run did not reach the crash point {point!r}"


def model_weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def lines(out: Path) -> list[dict]:
    """metrics.jsonl without the timing column (tokens/s differs from run to run)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def assert_nothing_left_behind(out: Path) -> None:
    stray = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    stray += [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not stray, stray
    assert len(list((out / "checkpoints").glob("step-*"))) <= KEEP


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    """The reference: the same runs, never stopped."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("whole")
    train_sft.main(sft_args(tiny_world, root / "sft", *STEPS))
    pairs = write_pairs(tiny_world, root / "pairs.jsonl")
    train_dpo.main(dpo_args(tiny_world, pairs, root / "dpo", *STEPS))
    return {"sft": root / "sft", "dpo": root / "dpo", "pairs": pairs}


def same_as_uninterrupted(out: Path, whole: Path) -> None:
    a, b = model_weights(out), model_weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lines(out) == lines(whole)  # one line per step, in order, the same numbers
    assert_nothing_left_behind(out)


@pytest.mark.parametrize("point", CHECKPOINT_POINTS + FINAL_POINTS)
def test_sft_killed_at_each_point_resumes_to_the_same_run(tiny_world, uninterrupted, tmp_path, point):
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    run_until_crash(train_sft.main, argv, point)
    assert latest_checkpoint(out) is not None  # at every instant a complete checkpoint is findable
    train_sft.main(argv + ["--resume"])
    same_as_uninterrupted(out, uninterrupted["sft"])


def test_dpo_killed_after_logging_a_step_resumes_with_one_line_per_step(tiny_world, uninterrupted, tmp_path):
    out = tmp_path / "run"
    argv = dpo_args(tiny_world, uninterrupted["pairs"], out, *STEPS)
    run_until_crash(train_dpo.main, argv, "run: step logged#3")
    train_dpo.main(argv + ["--resume"])
    same_as_uninterrupted(out, uninterrupted["dpo"])


def test_killed_while_replacing_the_final_model_puts_the_previous_one_back(tiny_world, uninterrupted, tmp_path):
    """A finished run resumed again saves its model again; killed between setting the old model/
    aside and renaming the new one in, the next start puts the old one back, then saves anew."""
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv)
    run_until_crash(train_sft.main, argv + ["--resume"], "model: previous folder set aside")
    assert not (out / "model").exists() and list(out.glob(".model.old-*"))
    train_sft.main(argv + ["--resume"])
    a, b = model_weights(out), model_weights(uninterrupted["sft"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_nothing_left_behind(out)


# ---------------------------------------------------------------------------------------------
# One live run per folder; a fresh run never mixes with an old one
# ---------------------------------------------------------------------------------------------


def test_a_second_training_on_a_live_folder_is_refused_naming_the_live_one(tiny_world, uninterrupted, tmp_path):
    """A real training, paused after its second step (in a forked child), holds its folder: a second
    training there is refused and named; the first then finishes as if alone."""
    import tinyalign.infra.run

    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    go_on, ready = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the live run
        code = 1
        try:
            def pause_after_step_two(name):
                if name == "run: step logged" and lines(out)[-1]["step"] == 2:
                    os.write(ready[1], b"1")
                    os.read(go_on[0], 1)

            tinyalign.infra.run.crash_point = pause_after_step_two
            train_sft.main(argv)
            code = 0
        finally:
            os._exit(code)
    os.read(ready[0], 1)
    try:
        with pytest.raises(RunInUse, match=rf"{out} is in use by another run \(.*\"pid\": {pid}"):
            train_sft.main(argv + ["--overwrite"])  # not even --overwrite takes a live folder
    finally:
        os.write(go_on[1], b"1")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    same_as_uninterrupted(out, uninterrupted["sft"])  # the live run was not disturbed


def test_a_fresh_run_in_a_used_folder_needs_resume_or_overwrite(tiny_world, uninterrupted, tmp_path):
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "2"])
    with pytest.raises(SystemExit, match=r"holds a run \(checkpoints, metrics.jsonl\): continue it with --resume"):
        train_sft.main(argv)
    train_sft.main(argv + ["--overwrite"])  # starts over: nothing of the first run is left
    same_as_uninterrupted(out, uninterrupted["sft"])


# ---------------------------------------------------------------------------------------------
# --resume checks the arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,named", [
    (["--lr", "2e-3"], "--lr: 0.001 in the run, 0.002 now"),
    (["--batch-size", "4"], "--batch-size: 8 in the run, 4 now"),
    (["--seed", "1"], "--seed: 0 in the run, 1 now"),
    (["--lora-r", "8"], "--lora-r: 4 in the run, 8 now"),
    (["--max-steps", "5"], "--max-steps: 4 in the run, 5 now"),
])
def test_resume_refuses_changed_arguments_and_names_them(tiny_world, tmp_path, change, named):
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "2"])
    with pytest.raises(SystemExit, match=re.escape(named)):
        train_sft.main(argv + ["--resume"] + change)  # argparse keeps the last value given
    train_sft.main(argv + ["--resume"])  # the refusal changed nothing: the run continues


def test_resume_refuses_a_changed_data_file(tiny_world, tmp_path):
    data = tmp_path / "sft.json"
    data.write_text(Path(tiny_world["sft"]).read_text())
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    argv[argv.index("--data") + 1] = str(data)
    train_sft.main(argv + ["--stop-after", "2"])
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:-1]))
    with pytest.raises(SystemExit, match=rf"--data {re.escape(str(data))}: the file changed since the checkpoint"):
        train_sft.main(argv + ["--resume"])


def test_resume_refuses_a_model_replaced_in_place(tiny_world, tmp_path):
    """The start model is checked by its content, not its path: another checkpoint written into the same
    folder is named on --resume (resuming onto it would train a different run)."""
    import shutil

    start = tmp_path / "start"
    shutil.copytree(tiny_world["checkpoint"], start)
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    argv[argv.index("--model") + 1] = str(start)
    train_sft.main(argv + ["--stop-after", "2"])
    processor = tinyalign.Processor.from_pretrained(start)
    tinyalign.save_model(tinyalign.random_model(tinyalign.load_model(start).cfg, seed=9), start, processor=processor)
    with pytest.raises(SystemExit, match=rf"--model {re.escape(str(start))}: its files changed since the checkpoint"):
        train_sft.main(argv + ["--resume"])


def test_a_run_folder_resumes_wherever_it_now_lies(tiny_world, uninterrupted, tmp_path):
    """--out is the run: a folder moved (or spelled with a trailing slash) resumes as the run it holds."""
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "2"])
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    argv[argv.index("--out") + 1] = str(moved) + "/"
    train_sft.main(argv + ["--resume"])
    same_as_uninterrupted(moved, uninterrupted["sft"])


def test_resume_applies_what_is_safe_to_change(tiny_world, uninterrupted, tmp_path):
    """--eval-every may change on resume, and the new value is used from there on; the weights are
    those of the uninterrupted run."""
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "1"])
    train_sft.main(argv + ["--resume", "--eval-every", "1"])
    evals = [r["step"] for r in lines(out) if r["split"] == "eval"]
    assert evals == [2, 3, 4]  # every step after the resume (the first session's step 1 had no evaluation)
    a, b = model_weights(out), model_weights(uninterrupted["sft"])
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# A full disk, permissions, and checkpoints that load without running code
# ---------------------------------------------------------------------------------------------


def disk_full(*args, **kwargs):
    raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                       "\"No space left on device\" })")  # what safetensors raises


def test_a_full_disk_names_the_file_and_leaves_no_temporary_folders(tiny_world, tmp_path, monkeypatch):
    import tinyalign.infra.checkpoints
    import tinyalign.infra.weights

    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    with monkeypatch.context() as m:
        m.setattr(tinyalign.infra.checkpoints, "save_file", disk_full)
        with pytest.raises(OSError, match=r"no space left on device while writing .*/checkpoints/\.tmp-step-0+1-\d+/"
                                          r"tensors.safetensors"):
            train_sft.main(argv)
    assert not [p for p in (out / "checkpoints").iterdir()]  # nothing half-written, nothing published
    with monkeypatch.context() as m:
        m.setattr(tinyalign.infra.weights, "save_file", disk_full)
        with pytest.raises(OSError, match=rf"no space left on device while writing {re.escape(str(out))}/\.model\.tmp-"):
            train_sft.main(argv + ["--overwrite"])
    assert not list(out.glob(".model*")) and not (out / "model").exists()
    train_sft.main(argv + ["--resume"])  # space again: the run finishes from its last checkpoint
    assert (out / "model" / "model.safetensors").exists()


def test_saved_model_has_usual_permissions_and_checkpoints_hold_no_pickle(tiny_world, tmp_path):
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_world, out, *STEPS))
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    # every file the run publishes, safetensors included (which writes its own 0600), reads as the user's others do
    published = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert any(p.suffix == ".safetensors" for p in published) and len(published) > 5
    assert {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in published} == {
        p.relative_to(out).as_posix(): oct(0o666 & ~umask) for p in published}
    folder = latest_checkpoint(out)
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "state.json", "tensors.safetensors"]
    json.loads((folder / "state.json").read_text())  # plain JSON: loading it runs no code


def test_the_dpo_demo_never_reuses_samples_of_another_sft_model(tiny_world, tmp_path, monkeypatch):
    """The demo's rated samples carry the digest of the SFT model that made them; a new SFT model
    (another demo run) gets new samples, the same one reuses them."""
    import shutil
    from types import SimpleNamespace

    import tinyalign
    from tinyalign.demo import runs as demo
    from tinyalign.demo.world import demo_config, demo_processor

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_world["root"] / "data", demo.DEMO_DATA)
    shutil.copytree(tiny_world["checkpoint"], demo.DEMO_SFT / "model")
    args = SimpleNamespace(seed=0, device="cpu", data=None, eval_data=None, image_folder=None)
    demo.dpo_start(args)
    samples = demo.DEMO_SFT / "samples.jsonl"
    first = samples.read_text()
    modified = samples.stat().st_mtime_ns
    demo.dpo_start(args)  # the same model: the samples are reused
    assert samples.stat().st_mtime_ns == modified
    tinyalign.save_model(tinyalign.random_model(demo_config(), seed=5), demo.DEMO_SFT / "model",
                         processor=demo_processor())  # another SFT model in the same place
    demo.dpo_start(args)
    assert samples.read_text() != first  # sampled anew, from the new model


def test_a_pointer_to_a_missing_checkpoint_deletes_nothing_and_resume_says_so(tiny_world, tmp_path):
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "2"])
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    (out / "checkpoints" / "latest").write_text("step-99999999-0")  # edited by hand
    with pytest.raises(FileNotFoundError, match="names step-99999999-0, which is incomplete or missing"):
        train_sft.main(argv + ["--resume"])
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == kept


@pytest.mark.parametrize("how", ["deleted by hand", "killed before the first pointer"])
def test_a_missing_pointer_is_rebuilt_and_no_complete_checkpoint_is_deleted(tiny_world, uninterrupted, tmp_path,
                                                                            how):
    """checkpoints/latest missing beside complete step folders (deleted by hand or lost with a copy; or
    the first save killed between its folder's rename and the pointer's): the next start deletes
    nothing complete and rebuilds the pointer from the newest step folder that reads; a plain start
    is then refused as a run in use of its folder, and --resume finishes it as if never stopped."""
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    if how == "deleted by hand":
        train_sft.main(argv + ["--stop-after", "2"])
        (out / "checkpoints" / "latest").unlink()
    else:
        run_until_crash(train_sft.main, argv, "checkpoint: folder renamed, pointer not yet moved#1")
        assert not (out / "checkpoints" / "latest").exists()
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps
    with pytest.raises(SystemExit, match=r"holds a run \(checkpoints, metrics.jsonl\): continue it with --resume"):
        train_sft.main(argv)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == steps  # nothing complete deleted
    assert (out / "checkpoints" / "latest").read_text().strip() == steps[-1]
    train_sft.main(argv + ["--resume"])
    same_as_uninterrupted(out, uninterrupted["sft"])


def test_a_run_killed_before_its_first_checkpoint_resumes_from_its_start(tiny_world, uninterrupted, tmp_path):
    """The rerun's advice (--resume) works: with no checkpoint yet, --resume starts the run again
    (its partial metrics.jsonl replaced) and ends as one never stopped."""
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    run_until_crash(train_sft.main, argv, "run: step logged#1")  # step 1 logged, its checkpoint not yet saved
    assert (out / "metrics.jsonl").exists() and not list((out / "checkpoints").glob("step-*"))
    with pytest.raises(SystemExit, match=r"continue it with --resume"):
        train_sft.main(argv)
    train_sft.main(argv + ["--resume"])
    same_as_uninterrupted(out, uninterrupted["sft"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_at_the_step_boundary_and_the_run_resumes_the_same(tiny_world, uninterrupted,
                                                                                   tmp_path, monkeypatch, signum):
    """A preempted job (SIGTERM) or Ctrl-C (SIGINT) mid-step: the step finishes, a checkpoint of it is
    saved (--save-every 3 would otherwise have lost steps 1-2), the process exits with 128 + the
    signal, and --resume ends as a run never stopped."""
    from tinyalign.infra.run import Run

    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    argv[argv.index("--save-every") + 1] = "3"
    logged = Run.log

    def log_and_get_signalled(self, step, metrics, split="train"):
        if step == 2 and split == "train":
            os.kill(os.getpid(), signum)  # arrives during the step, before it is logged
        logged(self, step, metrics, split)
    monkeypatch.setattr(Run, "log", log_and_get_signalled)
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as stop:
        train_sft.main(argv)
    assert stop.value.code == 128 + signum
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["step"] == 2
    assert [r["step"] for r in lines(out) if r["split"] == "train"] == [1, 2] and not (out / "model").exists()
    assert signal.getsignal(signum) == before  # the process's own handling is back
    monkeypatch.setattr(Run, "log", logged)
    train_sft.main(argv + ["--resume"])
    same_as_uninterrupted(out, uninterrupted["sft"])


def damage(folder: Path, how: str) -> str:
    """Damage a checkpoint one way; -> what the refusal must say."""
    if how == "a flipped byte in the tensors":
        data = bytearray((folder / "tensors.safetensors").read_bytes())
        data[-100] ^= 0xFF  # inside the last tensor's bytes: the header still reads
        (folder / "tensors.safetensors").write_bytes(bytes(data))
        return r"tensors.safetensors has changed since it was saved"
    if how == "the step edited in state.json":
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps({**state, "step": state["step"] - 1}))
        return r"state.json has changed since it was saved"
    (folder / "checksums.json").unlink()  # a checkpoint of before the checksums, then cut short
    text = (folder / "state.json").read_text()
    (folder / "state.json").write_text(text[:len(text) // 2])
    return rf"{folder.name}: the checkpoint does not read \(.*\)"


@pytest.mark.parametrize("how", ["a flipped byte in the tensors", "the step edited in state.json",
                                 "a truncated state.json without checksums"])
def test_a_damaged_checkpoint_is_named_never_resumed_from(tiny_world, tmp_path, how):
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "2"])
    said = damage(latest_checkpoint(out), how)
    with pytest.raises(CheckpointDamaged, match=said + r".*; resume from an older step folder beside it"):
        train_sft.main(argv + ["--resume"])


def test_a_missing_pointer_is_rebuilt_from_the_newest_checkpoint_that_verifies(tiny_world, uninterrupted, tmp_path):
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    train_sft.main(argv + ["--stop-after", "2"])
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    (out / "checkpoints" / "latest").unlink()
    damage(out / "checkpoints" / steps[-1], "a flipped byte in the tensors")
    with pytest.raises(SystemExit, match=r"continue it with --resume"):
        train_sft.main(argv)
    assert (out / "checkpoints" / "latest").read_text().strip() == steps[-2]  # the damaged newest is passed over
    train_sft.main(argv + ["--resume"])  # from step 1: the same run still
    same_as_uninterrupted(out, uninterrupted["sft"])


def test_temporary_files_a_kill_leaves_are_cleaned_by_the_next_start(tiny_world, uninterrupted, tmp_path):
    """A resume killed while it cut metrics.jsonl back leaves .metrics.jsonl.tmp-PID; a reference-cache
    save killed before its rename leaves ref_logps/.KEY.json.tmp-PID: the next start removes both
    (a live process's are left alone) and the run ends as if never stopped."""
    out = tmp_path / "run"
    argv = sft_args(tiny_world, out, *STEPS)
    run_until_crash(train_sft.main, argv, "run: step logged#3")  # step 3 logged after the step-2 checkpoint
    run_until_crash(train_sft.main, argv + ["--resume"], "metrics.jsonl: written, not yet renamed")
    assert list(out.glob(".metrics.jsonl.tmp-*"))
    train_sft.main(argv + ["--resume"])
    same_as_uninterrupted(out, uninterrupted["sft"])
    assert not list(out.glob(".*.tmp-*"))

    cache = tmp_path / "cache" / "ref_logps"
    cache.mkdir(parents=True)
    dead = cache / ".0123.json.tmp-999999999"  # no process has this id
    live = cache / f".4567.json.tmp-{os.getpid()}"  # this one is being written by a live process
    dead.write_text("{")
    live.write_text("{")
    pairs = write_pairs(tiny_world, tmp_path / "pairs.jsonl")
    train_dpo.main(dpo_args(tiny_world, pairs, tmp_path / "dpo", "--max-steps", "1"))
    assert not dead.exists() and live.exists()
