"""The pieces the three training scripts put together, so that each script shows its recipe and its
method's loop in order and nothing else.

Arguments (each recipe option shows the paper's value and the demo's), the trainable parts
(`train_projector`, `train_decoder`), the cosine schedule, the deterministic data order, DDP,
metrics.jsonl, checkpoints that can be resumed exactly, and the final save.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .arguments import at_least, non_negative, number, positive, share
from .checkpoint import (FolderLock, crash_point, fsync_path, latest_checkpoint, load_checkpoint, published, remove_leftovers,
                         save_checkpoint, set_latest, tensors_not_finite, writing)
from .lora import apply_lora, merge_lora, save_adapter

# ---------------------------------------------------------------------------------------------
# Arguments. A recipe option left out means the paper's value for a real run, or the demo's value
# when --model is not given (`parse_recipe`).
# ---------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where there is none (an option that is simply off)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def common_arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--model", help="checkpoint folder (llava-hf or original LLaVA layout); omit to run the built-in demo")
    a("--vision-tower", help="CLIP folder, for original LLaVA checkpoints")
    a("--data", help="training data file (JSON or JSONL)")
    a("--eval-data", help="held-out data file; default: hold out --eval-fraction of --data")
    a("--eval-fraction", type=share, help="share of --data held out when there is no --eval-data")
    a("--image-folder", help="folder that relative image paths in the data are relative to")
    a("--out", help="output folder (metrics.jsonl, checkpoint/, model/)")
    a("--epochs", type=positive)
    a("--batch-size", type=at_least(1), help="examples (pairs for DPO) per micro-batch")
    a("--grad-accum", type=at_least(1), help="micro-batches per optimizer step")
    a("--lr", type=non_negative, help="learning rate of the decoder (LoRA or full)")
    a("--projector-lr", type=non_negative, help="learning rate of the projector")
    a("--weight-decay", type=non_negative, default=0.0)
    a("--warmup-ratio", type=number(0, 1), default=0.03)
    a("--max-grad-norm", type=positive, default=1.0, help="clip the gradients' norm to this (inf: no clipping)")
    a("--lora-r", type=at_least(0), help="LoRA rank on the decoder; 0 trains the decoder fully")
    a("--lora-alpha", type=non_negative)
    a("--lora-dropout", type=share, default=0.05)
    a("--max-length", type=at_least(1), help="longer sequences are dropped (and counted), never cut")
    a("--max-steps", type=at_least(1), help="train for this many optimizer steps in all (default: all epochs)")
    a("--stop-after", type=at_least(1), help="end this session after N steps, the schedule still that of the whole run "
                                      "(continue with --resume)")
    a("--eval-every", type=at_least(0), help="held-out evaluation every N steps (and always at the end; 0: only there)")
    a("--save-every", type=at_least(0), help="resumable checkpoint every N steps (and always at the end; 0: only there)")
    a("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; only "
      "--stop-after, --eval-every, --save-every, --device, --compile, --gradient-checkpointing, --fsdp and --cache-dir "
      "may "
      "differ from the run's own arguments (anything else is refused, naming what differs)")
    a("--overwrite", action="store_true", help="start over in an --out that holds a run, deleting its checkpoints, "
      "metrics and model (a demo run always starts over)")
    a("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    a("--fsdp", action="store_true", help="with torchrun: shard the weights, gradients and optimizer state over the "
      "processes (FSDP2, one shard group per decoder block) instead of a whole copy in each (DDP); for a model whose "
      "training does not fit one GPU. Checkpoints are written whole, as one process writes them")
    a("--packing", action=argparse.BooleanOptionalAction, help="packed batches: DPO pairs as [prompt | chosen | "
      "rejected] (the prompt and image computed once), no compute on padding (tinyalign/packing.py)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each decoder block (default: on for "
      "CUDA)")
    a("--pack-tokens", type=at_least(1), help="with --packing: several examples per row, up to this many tokens, kept "
      "apart by the attention mask (default: one per row)")
    a("--save-adapter", action="store_true", help="also save the LoRA adapter alone (PEFT layout)")
    a("--skip-bad", action="store_true", help="skip (and count) records with a missing or unreadable image")
    a("--template", default="vicuna_v1", choices=["vicuna_v1", "llava_v1"], help="chat template (LLaVA-1.5: vicuna_v1)")
    a("--image-mode", default="pad", choices=["pad", "crop"], help="pad to a square (LLaVA-1.5) or centre-crop")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    a("--seed", type=int, default=0, help="seed of the initialisation, data order and sampling")
    return p


def parse_recipe(parser: argparse.ArgumentParser, argv, paper: dict, demo: dict):
    """Parse the command line; every recipe option not given takes the paper's value (a run with
    --model) or the demo's (no --model). --help shows both next to each option, so it tells the
    truth about what a run will use. Sets args.demo."""
    for action in parser._actions:
        if action.dest in paper:
            shown = f"paper: {paper[action.dest]}"
            if action.dest in demo and demo[action.dest] != paper[action.dest]:
                shown += f"; demo: {demo[action.dest]}"
            action.help = f"{action.help} ({shown})" if action.help else f"({shown})"
            action.default = argparse.SUPPRESS  # "not given" (and no "default: None" in --help)
    args = parser.parse_args(argv)
    args.demo = args.model is None
    if args.demo and not args.resume:
        args.overwrite = True  # the demos' folders are theirs: running a demo again starts it over
    if args.compile is None:  # compiled blocks pay off on a GPU; on a CPU the compile time dominates
        args.compile = torch.device(args.device).type == "cuda"
    for key, value in ({**paper, **demo} if args.demo else paper).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# The model's trainable parts and the number of optimizer steps
# ---------------------------------------------------------------------------------------------


def train_projector(model) -> list[nn.Parameter]:
    """The projector trains fully. Its weights are kept in float32 even when the rest is bf16: AdamW's
    small updates would vanish in bf16 (the compute still runs in bf16 under autocast)."""
    model.multi_modal_projector.float().requires_grad_(True)
    return list(model.multi_modal_projector.parameters())


def train_decoder(model, lora_r: int, lora_alpha: float, lora_dropout: float) -> list[nn.Parameter]:
    """lora_r > 0: LoRA adapters on every decoder projection (tinyalign/lora.py), in float32, the
    decoder's own weights frozen; lora_r 0: the whole decoder and the LM head train."""
    if lora_r > 0:
        apply_lora(model.language_model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
        for name, p in model.language_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    else:
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return [p for m in (model.language_model, model.lm_head) for p in m.parameters() if p.requires_grad]


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    """The parameters of these modules that train, in module order (what the optimizer steps)."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def describe_trainable(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"


def optimizer_steps(n_micro_batches: int, grad_accum: int, max_steps: int | None) -> int:
    """Optimizer steps in the whole run: one per grad_accum micro-batches, at most max_steps."""
    total = math.ceil(n_micro_batches / grad_accum)
    return min(total, max_steps) if max_steps else total


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to zero."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: str):
    """bf16 autocast on CUDA (the paper's precision); plain float32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------
# Data order: a function of (seed, epoch) alone, so a resumed run sees exactly the same batches
# ---------------------------------------------------------------------------------------------


def micro_batches(n_examples: int, batch_size: int, epochs: float, seed: int, drop_last: bool = False) -> list[list[int]]:
    """Every micro-batch of the run, in order: each epoch is a fresh seeded permutation.
    drop_last: leave out a short last batch of each epoch (so that several processes split evenly)."""
    batches = []
    for epoch in range(math.ceil(epochs)):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        if epoch + 1 > epochs:  # a fractional last epoch
            order = order[: int(round((epochs - epoch) * n_examples))]
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)
                    if not drop_last or i + batch_size <= len(order)]
    return batches


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded fraction held out, at least one item each when there are two."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun --nproc_per_node N): DDP. Each micro-batch of the global batch is cut
# into N equal contiguous shares; DDP averages the gradients, so a step equals the one-process step
# on the whole micro-batch. Only rank 0 evaluates, logs and writes files.
# ---------------------------------------------------------------------------------------------


def init_distributed(args) -> tuple[int, int]:
    """(rank, world size). Under torchrun: join the process group (NCCL on CUDA, gloo on CPU) and
    pick this process's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if torch.device(args.device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(model, world: int, device: str):
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp(model, world: int, device: str):
    """FSDP2 (`fully_shard`, Zhao et al. 2023, arXiv 2304.11277): each process keeps 1/world of every
    weight, gradient and AdamW moment. A decoder block's weights are gathered whole just before its
    forward (and again for its backward) and freed after; its gradients are reduce-scattered (summed
    and averaged over processes, as DDP averages them, then each process keeps its share). One shard
    group per block, so one block's weights at a time are whole; the rest of the model (tower,
    projector, embeddings, LM head) is the root group. The model is changed in place and returned:
    its parameters are now DTensors (`p.full_tensor()` gathers one whole)."""
    if world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # One all-gather per group needs one dtype: bf16 weights with float32 LoRA adapters are gathered
    # and computed in bf16 (as autocast computes them anyway); gradients are reduced in float32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.device(device).type == "cuda" else MixedPrecisionPolicy()
    for block in model.language_model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t):
    """A DTensor gathered whole (a collective: every process must call it), else t itself."""
    return t.full_tensor() if is_sharded(t) else t


def like(param, full: torch.Tensor):
    """full, placed as `param` is: this process's shard of it when param is a DTensor."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def my_share(micro: list[int], rank: int, world: int) -> list[int]:
    per = len(micro) // world
    return micro[rank * per:(rank + 1) * per]


def sum_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


def mean_over_ranks(metrics: dict, world: int) -> dict:
    if world == 1:
        return metrics
    values = sum_over_ranks(torch.tensor(list(metrics.values()), dtype=torch.float64), world) / world
    return dict(zip(metrics, values.tolist()))


def finish_distributed(world: int):
    """Every rank waits for the others before the process group goes: a rank that tears it down
    while rank 0 is still saving can abort in gloo ("terminate called without an active exception",
    seen once in CI on 2 CPU cores)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The run folder: metrics.jsonl, resumable checkpoints, the final model
# ---------------------------------------------------------------------------------------------


class Run:
    """The run folder: out/metrics.jsonl, out/checkpoints/ (resumable training state, see
    tinyalign/checkpoint.py), out/model/ (the final checkpoint).

    While a run is live its folder is locked; a fresh run refuses a folder that holds a run unless
    --overwrite; --resume refuses changed arguments (all but SAFE_TO_CHANGE) and a changed --data,
    then cuts metrics.jsonl back to what it held at the checkpoint, so each step appears once."""

    def __init__(self, out, args, total_steps: int, rank: int = 0):
        self.out = Path(out)
        self.writes = rank == 0  # with several processes, rank 0 alone logs and writes
        # --fsdp: every process holds a share of the weights, so every process takes part in each
        # evaluation and save (their forward passes and gathers are collectives); rank 0 still writes.
        self.sharded = bool(getattr(args, "fsdp", False)) and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.args = args
        self.total_steps = total_steps
        self.metrics_path = self.out / "metrics.jsonl"
        self.last_good = None  # (step, folder) of the newest checkpoint published
        self._t0, self._tokens = time.time(), 0
        self.bar = None
        self.lock = None
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(self.out).acquire()
            for what in remove_leftovers(self.out):
                print(f"{self.out}: cleaned up after an interrupted run: {what}")
            if not args.resume:
                self.start_fresh()

    def start_fresh(self):
        """A fresh run in a folder that holds a run: refused, unless --overwrite (then that run goes)."""
        earlier = [p.name for p in (self.out / "checkpoints", self.metrics_path, self.out / "model") if p.exists()]
        if earlier and not getattr(self.args, "overwrite", False):
            raise SystemExit(f"{self.out} holds a run ({', '.join(earlier)}): continue it with --resume, start over "
                             "with --overwrite (which deletes it), or choose another --out")
        for name in ("checkpoints", "model", "adapter"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "curves.png"):
            (self.out / name).unlink(missing_ok=True)

    # -- logging -----------------------------------------------------------------------------
    def start_progress(self, first_step: int):
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
        (tinyalign/checkpoint.py). Never a checkpoint with non-finite weights or optimizer state."""
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
        state["args"] = {k: v for k, v in vars(self.args).items() if k not in ("resume", "overwrite")}
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
        from .weights import save_model

        if self.sharded:
            model = gathered_model(model, self.args, keep=self.writes)
        if not self.writes:
            return None
        if self.args.save_adapter and self.args.lora_r > 0:
            save_adapter(model.language_model, self.out / "adapter", self.args.lora_r, self.args.lora_alpha,
                         self.args.lora_dropout)
        merge_lora(model)
        return save_model(model, self.out / "model", processor=processor)

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
        stop = self.should_stop(step)
        if stop or (self.args.save_every and step % self.args.save_every == 0 and not last):
            self.save_state(step, model, optimizer, scheduler)
        if stop:
            self.finish()
            print(f"stopped after step {step} of {self.total_steps}; continue with --resume")
        return stop

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
        """Unlock the folder (the process ending does too, however it ends)."""
        if self.lock is not None:
            self.lock.release()


# What --resume lets differ from the run's own arguments: how often to log and save, where to stop
# this session, and how to compute (not what). Everything else would change the run: refused.
SAFE_TO_CHANGE = ("stop_after", "eval_every", "save_every", "device", "compile", "gradient_checkpointing", "fsdp",
                  "cache_dir", "resume", "overwrite")


def data_digests(args) -> dict:
    from .data import file_digest

    return {key: file_digest(getattr(args, key)) for key in ("data", "eval_data")
            if getattr(args, key, None) and Path(getattr(args, key)).is_file()}


def gathered_model(model, args, keep: bool):
    """With --fsdp: every weight gathered whole (each process takes part), into a plain model of the
    same structure (LoRA adapters included) on rank 0's CPU; None on the other processes."""
    from .lora import apply_lora
    from .weights import build_empty

    state = {name: whole(t).detach().cpu() for name, t in model.state_dict().items()}
    if not keep:
        return None
    plain = build_empty(model.cfg)
    if args.lora_r:
        apply_lora(plain.language_model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    plain.load_state_dict(state, assign=True)
    plain.attn_backend = model.attn_backend
    return plain


def refuse_changed_arguments(state: dict, args, folder: Path) -> None:
    saved = state["args"]
    now = json.loads(json.dumps({k: v for k, v in vars(args).items()}, default=str))
    changed = [f"--{key.replace('_', '-')}: {saved.get(key)!r} in the run, {now.get(key)!r} now"
               for key in sorted(set(saved) | set(now)) if key not in SAFE_TO_CHANGE and saved.get(key) != now.get(key)]
    digests = data_digests(args)
    changed += [f"--{key.replace('_', '-')} {getattr(args, key)}: the file changed since the checkpoint"
                for key, digest in state["data_digests"].items() if digests.get(key) != digest]
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
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(kept)
        os.replace(tmp, path)


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
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = keys or [k for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
                    if any(k in r for r in records)]
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


def optimizer_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float):
    """Clip the global gradient norm, step, advance the schedule, clear the gradients."""
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
