"""Solutions to the exercises of docs/workshop.md, kept in the package so that tests/test_workshop.py
runs them and they cannot rot. Try each exercise before reading its solution here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .losses import PREFERENCE_LOSSES, PreferenceLoss

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


def register_dpop(lam: float = 50.0) -> None:
    """The entry: `--loss-type dpop` in train_dpo.py once this has run (before its arguments are parsed)."""
    PREFERENCE_LOSSES["dpop"] = PreferenceLoss(lambda pc, pr, rc, rr, o: dpop_loss(pc, pr, rc, rr, o.beta, lam),
                                               reference=True, average=False, paper="DPOP, arXiv 2402.13228")


# ---------------------------------------------------------------------------------------------
# Exercise 4: what the branch rule of a packed pair's mask is for
# ---------------------------------------------------------------------------------------------


def without_branch_rule(batch: dict) -> dict:
    """A packed batch whose tokens all claim the shared branch: exactly what deleting the branch
    condition from `AttentionMask.mask_mod` does. The rejected answer then attends to the chosen one."""
    return {**batch, "branch_ids": torch.zeros_like(batch["branch_ids"])}


# ---------------------------------------------------------------------------------------------
# Exercise 6: the systematic mistakes DPO fixes
# ---------------------------------------------------------------------------------------------


def mistakes_by_confusion(model_dir, world, questions: list[dict] | None = None) -> dict:
    """Exact answers on the held-out questions whose truth the SFT data systematically mislabels
    (yellow called green, triangles squares, three two: demo.CONFUSIONS), per confusion, and on
    all other questions. -> {"yellow -> green": (accuracy, n), ..., "everything else": (accuracy, n)}."""
    from . import Processor, load_model
    from .demo import CONFUSIONS, greedy_answers, read_heldout, value_of

    world = Path(world)
    questions = questions if questions is not None else read_heldout(world / "heldout.jsonl")
    model, processor = load_model(model_dir), Processor.from_pretrained(model_dir)
    answers = [processor.decode(ids) for ids in greedy_answers(model, processor, [q["prompt"] for q in questions],
                                                               [world / q["image"] for q in questions])]
    groups: dict[str, list[bool]] = {}
    for q, answer in zip(questions, answers):
        truth = value_of(q["kind"], q["answer"])
        wrong = CONFUSIONS.get((q["kind"], truth))
        groups.setdefault(f"{truth} -> {wrong}" if wrong else "everything else", []).append(answer == q["answer"])
    return {name: (sum(hits) / len(hits), len(hits)) for name, hits in sorted(groups.items())}
