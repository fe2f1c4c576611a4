"""Solutions to the exercises of docs/workshop.md, kept in the package so that tests/test_workshop.py
runs them and they cannot rot. Try each exercise before reading its solution here.

    python -m tinyalign.lab.workshop dpop [train_dpo.py options]   # exercise 3's solution, trained

(In your own solution the function and its entry go into tinyalign/losses.py; then
`python train_dpo.py --loss-type dpop` chooses it. The solution here registers itself first.)
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import read_jsonl
from ..demo.runs import greedy_answers
from ..demo.world import CONFUSIONS, value_of
from ..infra.weights import load_model
from ..losses import PREFERENCE_LOSSES, Hyperparameter, PreferenceLoss, kl_strength
from ..processor import Processor

# ---------------------------------------------------------------------------------------------
# Exercise 3: a new preference loss in one function and one entry
# ---------------------------------------------------------------------------------------------


def dpop_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float = 0.1, lam: float = 50.0):
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228, eq. 3): DPO's margin minus a penalty
    whenever the chosen answer's log-prob falls below the reference's, so that the chosen answer
    cannot lose likelihood while the margin grows:
        loss = -log sigmoid(beta * (h - lam * max(0, log pi_ref(y_w|x) - log pi(y_w|x)))),
    h the DPO log-ratio difference. Returns (losses [B], chosen rewards [B], rejected rewards [B])."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    penalty = torch.clamp(ref_chosen - policy_chosen, min=0)
    losses = -F.logsigmoid(beta * (h - lam * penalty))
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def register_dpop() -> None:
    """The entry: once this has run (before train_dpo.py parses its arguments), `--loss-type dpop`
    trains with dpop_loss, and --dpop-lambda sets its lambda."""
    PREFERENCE_LOSSES["dpop"] = PreferenceLoss(dpop_loss, "DPOP, arXiv 2402.13228", {
        "beta": kl_strength(),
        "lam": Hyperparameter(50.0, "DPOP: the weight of the penalty on a chosen answer that falls below the "
                                    "reference", low=0, option="--dpop-lambda")})


# ---------------------------------------------------------------------------------------------
# Exercise 4: what the branch rule of a packed pair's mask is for
# ---------------------------------------------------------------------------------------------


def without_branch_rule(batch):
    """A packed batch whose tokens all claim the shared branch: exactly what deleting the branch
    condition from `AttentionMask.mask_mod` does. The rejected answer then attends to the chosen one."""
    packed = batch.inputs["packed"]
    all_shared = replace(packed, branch_ids=torch.zeros_like(packed.branch_ids))
    return replace(batch, inputs={**batch.inputs, "packed": all_shared})


# ---------------------------------------------------------------------------------------------
# Exercise 6: the systematic mistakes DPO fixes
# ---------------------------------------------------------------------------------------------


def mistakes_by_confusion(model_dir, world, questions: list[dict] | None = None) -> dict:
    """Exact answers on the held-out questions whose truth the SFT data systematically mislabels
    (yellow called green, triangles squares, three two: demo.world.CONFUSIONS), per confusion, and on
    all other questions. -> {"yellow -> green": (accuracy, n), ..., "everything else": (accuracy, n)}."""
    world = Path(world)
    questions = questions if questions is not None else read_jsonl(world / "heldout.jsonl")
    model, processor = load_model(model_dir), Processor.from_pretrained(model_dir)
    answers = [processor.decode(ids) for ids in greedy_answers(model, processor, [q["prompt"] for q in questions],
                                                               [world / q["image"] for q in questions])]
    groups: dict[str, list[bool]] = {}
    for q, answer in zip(questions, answers):
        truth = value_of(q["kind"], q["answer"])
        wrong = CONFUSIONS.get((q["kind"], truth))
        groups.setdefault(f"{truth} -> {wrong}" if wrong else "everything else", []).append(answer == q["answer"])
    return {name: (sum(hits) / len(hits), len(hits)) for name, hits in sorted(groups.items())}


def main(argv=None):
    """`dpop [train_dpo.py options]`: exercise 3's solution registered, then train_dpo.py with --loss-type dpop."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "dpop":
        raise SystemExit("usage: python -m tinyalign.lab.workshop dpop [train_dpo.py options]")
    register_dpop()
    repo = str(Path(__file__).resolve().parents[2])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import train_dpo

    out = [] if "--out" in argv else ["--out", "runs/workshop-dpop"]  # the demo's own run stays as it is
    return train_dpo.main(["--loss-type", "dpop", *out, *argv[1:]])


if __name__ == "__main__":
    main()
