"""The run folder: out/metrics.jsonl, out/checkpoints/ (resumable training state,
infra/checkpoints.py), out/model/ (the final checkpoint), and the progress bar.

While a run is live its folder is locked; a fresh run refuses a folder that holds a run unless
--overwrite; --resume refuses changed arguments (all but SAFE_TO_CHANGE) and a changed --data, then
cuts metrics.jsonl back to what it held at the checkpoint, so each step appears once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import file_digest, read_jsonl
from ..hub import snapshot_of
from ..lora import apply_lora, merge_lora
from .checkpoints import (latest_checkpoint, load_checkpoint, published, remove_leftovers, save_checkpoint, set_latest,
                          tensors_not_finite)
from .files import FolderLock, crash_point, fsync_path, write_atomic, writing
from .processes import finish_distributed, like, sum_over_ranks, whole
from .weights import build_empty, model_digest, save_adapter, save_model


class Run:
    """The run folder: out/metrics.jsonl, out/checkpoints/ (resumable training state, see
    infra/checkpoints.py), out/model/ (the final checkpoint).

    While a run is live its folder is locked; a fresh run refuses a folder that holds a run unless
    --overwrite; --resume refuses changed arguments (all but SAFE_TO_CHANGE) and a changed --data,
    then cuts metrics.jsonl back to what it held at the checkpoint, so each step appears once.
    `resuming`: False for --resume of a run stopped before its first checkpoint (it starts again)."""

    def __init__(self, out, args, total_steps: int, rank: int = 0):
        self.out = Path(out)
        self.writes = rank == 0  # with several processes, rank 0 alone logs and writes
        # --fsdp: every process holds a share of the weights, so every process takes part in each
        # evaluation and save (their forward passes and gathers are collectives); rank 0 still writes.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.sharded = bool(getattr(args, "fsdp", False)) and self.world > 1
        self.args = args
        self.total_steps = total_steps
        self.metrics_path = self.out / "metrics.jsonl"
        self.last_good = None  # (step, folder) of the newest checkpoint published
        self._t0, self._tokens = time.time(), 0
        self.bar = None
        self.lock = None
        self.signalled, self._default_handlers = 0, {}
        # A run stopped before its first checkpoint has nothing to resume but its start: --resume
        # begins it again (decided from the folders alone, so that every process decides the same).
        self.resuming = bool(args.resume) and any([
            published(self.out), list(self.out.glob("checkpoints/diverged-*")),  # diverged: resume names it
            (self.out / "model").exists(), (self.out / "checkpoint").exists()])  # the older layout
        if args.resume and not self.resuming:
            print(f"--resume: {self.out} holds no checkpoint yet (the run stopped before its first save): "
                  "starting it from step 0")
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(self.out).acquire()
            for what in remove_leftovers(self.out):
                print(f"{self.out}: cleaned up after an interrupted run: {what}")
            if not self.resuming:
                self.start_fresh(overwrite=bool(args.resume))

    def start_fresh(self, overwrite: bool = False):
        """A fresh run in a folder that holds a run: refused, unless --overwrite (then that run goes)."""
        earlier = [p.name for p in (self.out / "checkpoints", self.metrics_path, self.out / "model") if p.exists()]
        if earlier and not (overwrite or getattr(self.args, "overwrite", False)):
            raise SystemExit(f"{self.out} holds a run ({', '.join(earlier)}): continue it with --resume, start over "
                             "with --overwrite (which deletes it), or choose another --out")
        for name in ("checkpoints", "model", "adapter"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "curves.png"):
            (self.out / name).unlink(missing_ok=True)

    # -- logging -----------------------------------------------------------------------------
    def start_progress(self, first_step: int):
        self.catch_signals()  # from here to the end, SIGTERM and Ctrl-C stop at a step boundary
        self.bar = tqdm(total=self.total_steps, initial=first_step, desc=f"{self.out.name}", dynamic_ncols=True,
                        disable=not self.writes)

    def count_tokens(self, n: int):
        self._tokens += n

    def log(self, step: int, metrics: dict, split: str = "train"):
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        if split == "train":
            elapsed = time.time() - self._t0
            record["tokens_per_s"] = round(self._tokens / max(elapsed, 1e-9), 1)
            self._t0, self._tokens = time.time(), 0
            if self.bar is not None:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "rewards/accuracy")})
        if self.writes:
            with writing(self.metrics_path), self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def check_finite(self, loss: torch.Tensor, step: int):
        """A non-finite loss stops the run. The loss of step N is computed with the weights after step
        N - 1, so a checkpoint of step N - 1 is not a good one: it is set aside (diverged-...) and
        `latest` goes back to the one before, if any."""
        if torch.isfinite(loss):
            return
        if self.writes and self.last_good is not None and self.last_good[0] == step - 1:
            bad = self.last_good[1]
            older = [p for p in published(self.out) if p != bad]
            set_latest(self.out, older[-1] if older else None)
            os.replace(bad, bad.with_name("diverged-" + bad.name))
            self.last_good = (state_step(older[-1]), older[-1]) if older else None
        where = f"{self.last_good[1]} (step {self.last_good[0]})" if self.last_good else "none"
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: stopping. Last good checkpoint: {where}")

    # -- checkpoints -------------------------------------------------------------------------
    def save_state(self, step: int, model, optimizer, scheduler):
        """Everything a resumed run needs to continue as if never stopped, published atomically
        (infra/checkpoints.py). Never a checkpoint with non-finite weights or optimizer state."""
        if not (self.writes or self.sharded):
            return
        tensors, state = training_state(step, model, optimizer, scheduler)  # with --fsdp: gathered whole
        if not self.writes:
            return
        bad = tensors_not_finite(tensors)
        if bad:
            where = f"{self.last_good[1]} (step {self.last_good[0]})" if self.last_good else "none"
            raise FloatingPointError(f"step {step}: {', '.join(bad[:3])} hold non-finite values, so no checkpoint "
                                     f"was written. Last good checkpoint: {where}")
        if self.metrics_path.exists():
            fsync_path(self.metrics_path)
        state["metrics_bytes"] = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        state["args"] = {k: v for k, v in vars(self.args).items() if k not in NOT_SAVED}
        state["data_digests"] = data_digests(self.args)
        self.last_good = (step, save_checkpoint(self.out, step, tensors, state))

    def load_state(self, model, optimizer, scheduler) -> int:
        """--resume: the newest checkpoint's state, after checking that the arguments still describe
        the same run; metrics.jsonl is cut back to the lines it held then."""
        folder = latest_checkpoint(self.out)
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}"
                                    + (" (this folder holds the older training_state.pt layout: resume it with the "
                                       "tinyalign that wrote it)" if (self.out / "checkpoint").exists() else ""))
        tensors, state = load_checkpoint(folder)
        refuse_changed_arguments(state, self.args, folder)
        restore_training_state(tensors, state, model, optimizer, scheduler, folder)
        if self.writes:
            cut_metrics(self.metrics_path, state["metrics_bytes"])
        self.last_good = (state["step"], folder)
        return state["step"]

    def save_final(self, model, processor):
        """Merge LoRA into the weights and write a plain llava-hf checkpoint to out/model. With --fsdp,
        every process calls this: the weights are gathered whole into a plain model on rank 0."""
        if self.sharded:
            model = gathered_model(model, self.args, keep=self.writes)
        if not self.writes:
            return None
        if self.args.save_adapter and self.args.lora_r > 0:
            save_adapter(model.language_model, self.out / "adapter", self.args.lora_r, self.args.lora_alpha,
                         self.args.lora_dropout, source=getattr(model, "source", None))
        merge_lora(model)
        return save_model(model, self.out / "model", processor=processor)

    def save_snapshot(self, step: int, model):
        """--snapshot-every: the model as it is at this step, LoRA merged into a copy (training goes on
        with its adapters), as a plain checkpoint folder OUT/snapshots/step-N that load_model, eval.py and
        the per-token view read. Snapshots are kept; written whole or not at all, as every model folder."""
        plain = gathered_model(model, self.args, keep=self.writes)  # a copy on the CPU (with --fsdp: gathered)
        if not self.writes:
            return
        merge_lora(plain)
        save_model(plain, self.out / "snapshots" / f"step-{step}")

    def after_step(self, step: int, metrics: dict, model, optimizer, scheduler, evaluate=None) -> bool:
        """Log the step; evaluate every --eval-every steps (evaluate() -> metrics, rank 0 only) and save a
        resumable checkpoint every --save-every. Returns True when this session ends here (--stop-after)."""
        self.bar.update(1)
        self.log(step, metrics)
        crash_point("run: step logged")
        last = step >= self.total_steps
        if (evaluate is not None and (self.writes or self.sharded) and self.args.eval_every
                and step % self.args.eval_every == 0 and not last):
            self.log(step, evaluate(), split="eval")  # logs on rank 0 only
        if self.args.snapshot_every and step % self.args.snapshot_every == 0 and not last:
            self.save_snapshot(step, model)
        stop = self.should_stop(step)
        signalled = self.signal_received() if not last else 0  # the last step saves and ends anyway
        if stop or signalled or (self.args.save_every and step % self.args.save_every == 0 and not last):
            self.save_state(step, model, optimizer, scheduler)
        if stop or signalled:
            self.finish()
            print(f"stopped after step {step} of {self.total_steps}; continue with --resume")
        if signalled:  # exit as a process ended by that signal reports it (143 for SIGTERM, 130 for Ctrl-C)
            finish_distributed(self.world)
            raise SystemExit(128 + signalled)
        return stop

    # -- SIGTERM and Ctrl-C: a checkpoint at the next step boundary ----------------------------
    def catch_signals(self):
        """SIGTERM (a scheduler preempting the job, `kill`) and SIGINT (Ctrl-C) no longer end the
        process mid-step, losing up to --save-every steps: the signal is noted, and at the end of
        the step the run saves a checkpoint and stops. A second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._default_handlers[signum] = signal.signal(signum, self._note_signal)

    def _note_signal(self, signum, frame):
        if self.signalled:
            self.restore_signals()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} twice: stopping at once")
        self.signalled = signum
        print(f"\n{signal.Signals(signum).name}: a checkpoint at the end of this step, then the run stops "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def signal_received(self) -> int:
        """The signal noted by any process (every rank stops at the same step), or 0."""
        if self.world == 1:
            return self.signalled
        anyone = sum_over_ranks(torch.tensor([float(self.signalled > 0)]), self.world).item() > 0
        return (self.signalled or signal.SIGTERM) if anyone else 0

    def restore_signals(self):
        for signum, handler in self._default_handlers.items():
            signal.signal(signum, handler)
        self._default_handlers = {}

    def should_stop(self, step: int) -> bool:
        """True when this session's --stop-after is reached (a checkpoint is saved, the run resumable)."""
        return self.args.stop_after is not None and step >= self.args.stop_after and step < self.total_steps

    def finish(self):
        if self.bar is not None:
            self.bar.close()
        if self.writes:
            plot_metrics(self.metrics_path, self.out / "curves.png")
        self.release()

    def release(self):
        """Unlock the folder (the process ending does too, however it ends); signals act as before."""
        self.restore_signals()
        if self.lock is not None:
            self.lock.release()


# What --resume lets differ from the run's own arguments: how often to log and save, where to stop
# this session, and how to compute (not what). Everything else would change the run: refused.
SAFE_TO_CHANGE = ("stop_after", "eval_every", "save_every", "snapshot_every", "device", "compile", "gradient_checkpointing", "fsdp",
                  "cache_dir", "revision", "out", "resume", "overwrite")  # out: the run folder is the run, wherever it
# now lies; revision: --model is recorded as the snapshot folder it chose (its commit in the path), which is compared
NOT_SAVED = ("resume", "overwrite", "defaults")  # how this session started, not what the run is


def data_digests(args) -> dict:
    """What the run trains from, by content: the data files' digests and the start model's
    (`--resume` names whichever changed since the checkpoint, even at the same path)."""
    digests = {key: file_digest(getattr(args, key)) for key in ("data", "eval_data", "prompts")
               if getattr(args, key, None) and Path(getattr(args, key)).is_file()}
    if getattr(args, "model", None) and Path(args.model).is_dir():
        digests["model"] = model_digest(args.model)
    return digests


def gathered_model(model, args, keep: bool):
    """Every weight gathered whole (with --fsdp each process takes part), into a plain model of the
    same structure (LoRA adapters included) on rank 0's CPU; None on the other processes."""
    state = {name: whole(t).detach().cpu() for name, t in model.state_dict().items()}
    if not keep:
        return None
    plain = build_empty(model.cfg)
    if args.lora_r:
        apply_lora(plain.language_model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    plain.load_state_dict(state, assign=True)
    plain.attn_backend = model.attn_backend
    plain.source_dir = getattr(model, "source_dir", None)  # its tokenizer files go along when saved
    plain.source = getattr(model, "source", None)  # and the config names the weights it started from
    return plain


def refuse_changed_arguments(state: dict, args, folder: Path) -> None:
    """--resume: every argument that would change the run, named, stops it. An option the run was made
    without (it came in a later version of tinyalign) is taken at its default: the run behaved so."""
    saved = state["args"]
    now = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SAVED}, default=str))
    defaults = json.loads(json.dumps(getattr(args, "defaults", {}), default=str))
    for key in set(now) - set(saved):
        if key in defaults and now[key] == defaults[key]:
            saved = {**saved, key: now[key]}
    changed = [f"--{key.replace('_', '-')}: {saved.get(key)!r} in the run, {now.get(key)!r} now"
               for key in sorted(set(saved) | set(now)) if key not in SAFE_TO_CHANGE and saved.get(key) != now.get(key)]
    digests = data_digests(args)
    changed += [f"--{key.replace('_', '-')} {getattr(args, key)}: "
                + ("its files changed" if key == "model" else "the file changed") + " since the checkpoint"
                for key, digest in state["data_digests"].items() if digests.get(key) != digest]
    snapshot = snapshot_of(saved["model"]) if saved.get("model") and saved.get("model") != now.get("model") else None
    if snapshot is not None:  # a repo id whose branch has moved in the cache since the run began
        changed.append(f"(the run read {snapshot.repo_id} at commit {snapshot.commit}: --model {snapshot.repo_id} "
                       f"--revision {snapshot.commit} resumes it on those weights)")
    if changed:
        raise SystemExit(f"--resume: {folder} was written by a run with other arguments:\n  " + "\n  ".join(changed)
                         + "\nOnly --" + ", --".join(k.replace("_", "-") for k in SAFE_TO_CHANGE[:-2])
                         + " may change on resume; start over with --overwrite to change the rest.")


def cut_metrics(path: Path, size: int) -> None:
    """Keep the first `size` bytes of metrics.jsonl (what it held at the checkpoint): the steps logged
    after it, and a line torn by a crash, go; the resumed run logs them again."""
    if path.exists() and path.stat().st_size > size:
        with path.open("rb") as f:
            kept = f.read(size)
        write_atomic(path, kept)


def training_state(step: int, model, optimizer, scheduler) -> tuple[dict, dict]:
    """The trainable weights, the optimizer's moments and every random generator's state, as
    (tensors, JSON-able state)."""
    tensors = {f"param/{n}": whole(p) for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    extra = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = whole(value)
            else:
                extra[f"{index}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(cuda)})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    state = {"step": step, "param_groups": opt["param_groups"], "optimizer_extra": extra,
             "scheduler": scheduler.state_dict(), "n_cuda_rng": len(cuda),
             "rng": {"python": random.getstate(), "numpy": [kind, pos, has_gauss, gauss]}}
    return tensors, state


def restore_training_state(tensors: dict, state: dict, model, optimizer, scheduler, folder: Path) -> None:
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    saved = {k[len("param/"):] for k in tensors if k.startswith("param/")}
    if wanted != saved:
        raise SystemExit(f"--resume: {folder} does not fit this model: it lacks {sorted(wanted - saved)[:3]} and has "
                         f"{sorted(saved - wanted)[:3]} extra")
    with torch.no_grad():
        for name in [n for n in params if n in wanted]:  # model order: with --fsdp each copy is a collective
            if params[name].shape != tensors[f"param/{name}"].shape:
                raise SystemExit(f"--resume: {folder}: {name} has shape {list(tensors[f'param/{name}'].shape)}, "
                                 f"the model's is {list(params[name].shape)}")
            params[name].copy_(like(params[name], tensors[f"param/{name}"]))
    in_order = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    opt_state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            param = in_order[int(index)]
            opt_state.setdefault(int(index), {})[name] = like(param, value) if value.shape == param.shape else value
    for key, value in state["optimizer_extra"].items():
        index, name = key.split("/", 1)
        opt_state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["n_cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(state["n_cuda_rng"])])


def state_step(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


def append_metrics(out, record: dict) -> None:
    """One more line in out/metrics.jsonl after training (a demo's own held-out figures)."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "eval", **record}) + "\n")


def _plain(v):
    if torch.is_tensor(v):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v


def plot_metrics(metrics_path: Path, png: Path, keys=None):
    """A PNG of the training curves, when matplotlib is installed (the optional `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_jsonl(metrics_path)
    keys = keys or [k for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
                    if any(k in r for r in records)]
    if not keys:  # nothing trained yet (an online run whose prompts gave no pair): no curve to draw
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split in ("train", "eval"):
            points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if split == "eval" else None, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
