"""The command line: argparse types that refuse impossible values naming the option, and the
training scripts' common options with the paper's and the demo's defaults.

`--batch-size 0` would otherwise fail deep inside a loop ("range() arg 3 must not be zero"),
`--eval-fraction 1.5` would quietly train on one example, `--max-grad-norm 0` would clip every
gradient to nothing. With `type=at_least(1)` argparse stops at once with
"argument --batch-size: must be at least 1, got 0" and the usage line.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..hub import model_folder


def at_least(low: int):
    """An integer >= low."""

    def parse(text: str) -> int:
        value = int(text)  # not an integer: argparse says "invalid integer value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """A float within [low, high]; low_open / high_open leave out that end ("above 0" is low=0,
    low_open=True). Never NaN; inf only where no upper bound is set."""

    def parse(text: str) -> float:
        value = float(text)  # not a number: argparse says "invalid number value"
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if math.isnan(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {interval(low, high, low_open, high_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def interval(low, high, low_open, high_open) -> str:
    """Words for a range: "above 0", "at least 0", "in [0, 1)"."""
    if high is None:
        return f"above {low:g}" if low_open else f"at least {low:g}"
    if low is None:
        return f"below {high:g}" if high_open else f"at most {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


positive = number(0, low_open=True)  # > 0
non_negative = number(0)  # >= 0
share = number(0, 1, high_open=True)  # [0, 1): a part that leaves something (held-out data, dropout)


# ---------------------------------------------------------------------------------------------
# The training scripts' common options. A recipe option left out means the paper's value for a
# real run, or the demo's value when --model is not given (`parse_recipe`).
# ---------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where there is none (an option that is simply off)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def common_arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--model", help="checkpoint folder (llava-hf or original LLaVA layout) or Hugging Face repo id in the local "
      "cache (llava-hf/llava-1.5-7b-hf); omit to run the built-in demo")
    a("--revision", help="--model's branch, tag or commit in the Hugging Face cache (default: main; --model's only)")
    a("--vision-tower", help="CLIP folder or repo id, for original LLaVA checkpoints (default: the config's "
      "mm_vision_tower, openai/clip-vit-large-patch14-336)")
    a("--data", help="training data file (JSON or JSONL)")
    a("--eval-data", help="held-out data file; default: hold out --eval-fraction of --data")
    a("--eval-fraction", type=share, help="share of --data held out when there is no --eval-data")
    a("--image-folder", help="folder that relative image paths in the data are relative to; a path that leads "
      "out of it (../, absolute, a symlink) is refused")
    a("--images-outside-folder", action="store_true", help="follow image paths that lead out of --image-folder")
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
    a("--snapshot-every", type=at_least(0), default=0, help="also write the model every N steps as a plain checkpoint "
      "folder, OUT/snapshots/step-N, kept (to look at training midway: python -m tinyalign.lab.tokens, eval.py); 0: none")
    a("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; only "
      "--stop-after, --eval-every, --save-every, --snapshot-every, --device, --compile, --gradient-checkpointing, "
      "--fsdp, --cache-dir and --revision (--model is compared as the snapshot folder it names) may differ from the "
      "run's own arguments (anything else is refused, naming what differs)")
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
    truth about what a run will use. Sets args.demo, and args.defaults: what each option is when
    not given (a run resumed from before an option existed takes that option at its default)."""
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
    recipe = {**paper, **demo} if args.demo else paper
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.defaults = {a.dest: recipe.get(a.dest, a.default) for a in parser._actions if a.dest != "help"}
    resolve_models(parser, args)
    return args


def resolve_models(parser: argparse.ArgumentParser, args, options=("model", "vision_tower"), strict: bool = True):
    """Each of these options given as a Hugging Face repo id becomes its snapshot folder in the local
    cache (tinyalign/hub.py), --revision choosing --model's; a folder stays as typed. A name found
    nowhere stops the command here (strict), naming the option, where it looked and how to download
    it; or is left as typed (a command that may not need it: load_model names it if it is loaded).
    --vision-tower is always left so: a llava-hf model never reads it."""
    revision = getattr(args, "revision", None)
    if revision and getattr(args, "model", None) is None:
        parser.error("--revision picks a revision of --model (a Hugging Face repo id): give --model")
    for option in options:
        name = getattr(args, option, None)
        if name is None:
            continue
        try:
            folder = model_folder(name, revision if option == "model" else None)
        except FileNotFoundError as e:
            if strict and option != "vision_tower":
                parser.error(f"--{option.replace('_', '-')} {e}")
            continue
        if folder != Path(name):  # a repo id (or ~): the run records the folder it read, commit and all
            setattr(args, option, str(folder))


# ---------------------------------------------------------------------------------------------
# The preference losses' options: --loss-type, and each hyperparameter a loss of the table declares
# (tinyalign/losses.py::PREFERENCE_LOSSES), so that a new loss needs no edit here or in train_dpo.py
# ---------------------------------------------------------------------------------------------


def option_name(key: str, hyperparameter) -> str:
    return hyperparameter.option or "--" + key.replace("_", "-")


def add_loss_options(parser: argparse.ArgumentParser, losses: dict) -> None:
    """--loss-type NAME, and one option per hyperparameter name the losses declare (beta, which most
    of them take, is one option --beta), its help saying what it means to each loss."""
    parser.add_argument("--loss-type", default="sigmoid", choices=list(losses), help="; ".join(
        f"{name}: {loss.paper}" + ("" if loss.reference else ", no reference model") for name, loss in losses.items()))
    declared = {}  # option -> [(loss name, hyperparameter)]
    for name, loss in losses.items():
        for key, hyperparameter in loss.hyperparameters.items():
            declared.setdefault(option_name(key, hyperparameter), []).append((name, hyperparameter))
    for option, users in declared.items():
        first = users[0][1]
        for name, h in users:
            if h.default != first.default:
                raise ValueError(f"{option}: loss {name!r} declares the default {h.default}, loss {users[0][0]!r} "
                                 f"{first.default}; give one of them an option of its own (Hyperparameter(option=...))")
        meanings = {}
        for name, h in users:
            meanings.setdefault(h.help, []).append(name)
        kind = float if first.low is None and first.high is None else number(first.low, first.high,
                                                                              low_open=first.low_open)
        parser.add_argument(option, type=kind, default=first.default,
                            help="; ".join(f"{', '.join(names)}: {text}" for text, names in meanings.items()))


def loss_hyperparameters(loss, args) -> dict:
    """The chosen loss's keyword arguments, read from its options: {"beta": 0.1, ...}."""
    return {key: getattr(args, option_name(key, h).lstrip("-").replace("-", "_"))
            for key, h in loss.hyperparameters.items()}
