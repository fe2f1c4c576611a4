"""The losses of the paper's four methods, each a few lines next to the equation it implements.

Conventions: `labels` hold -100 wherever a token is not supervised (system prompt, question, image,
padding); logits at position t score the label at t + 1, so every function shifts by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift(logits: torch.Tensor, labels: torch.Tensor):
    """Align predictions with targets: logits[:, t] predicts labels[:, t + 1]."""
    return logits[:, :-1], labels[:, 1:]


def token_logps(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor, chunk: int = 1024):
    """hidden [N, D] (each row the state that predicts one token), targets [N] -> log p(target) [N].
    The LM head and log-softmax run `chunk` rows at a time, in float32: the full [B, T, V] logits of
    the batch never exist, only [chunk, V] at once."""
    out = []
    for start in range(0, len(targets), chunk):
        logits = lm_head(hidden[start:start + chunk]).float()  # [n, V]
        out.append(logits.gather(1, targets[start:start + chunk, None]).squeeze(1) - logits.logsumexp(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def answer_logps(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor, average: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """log p(answer | prompt) per sequence: the sum (or mean) of log p(label) over supervised tokens,
    without the [B, T, V] logits: the LM head and the log-softmax run only on the positions that
    predict a supervised token (token_logps).

    hidden [B, T, D] (the decoder output), labels [B, T] -> [B]. The first answer token is scored by
    the hidden state of the last prompt token, which the shift takes care of; prompt and padding
    (-100) contribute nothing.
    """
    hidden, labels = shift(hidden, labels)
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # the N scored positions
    logps = token_logps(hidden[rows, cols], lm_head, labels[rows, cols], chunk)  # [N]
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, logps)
    return total / (labels != IGNORE_INDEX).sum(-1).clamp(min=1) if average else total


def scored_logps(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: dict, average: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """Packed batches (tinyalign/packing.py): each scored token named explicitly by the (row, col) of
    the hidden state that predicts it and the output sequence it counts toward.

    hidden [R, L, D]; targets {"rows", "cols", "tokens", "sequence": [N], "n_sequences": S} -> [S]."""
    logps = token_logps(hidden[targets["rows"], targets["cols"]], lm_head, targets["tokens"], chunk)
    S, seq = targets["n_sequences"], targets["sequence"]
    total = torch.zeros(S, dtype=torch.float32, device=hidden.device).index_add(0, seq, logps)
    if average:
        total = total / torch.bincount(seq, minlength=S).clamp(min=1)
    return total


def sft_loss(answer_logps: torch.Tensor, n_tokens) -> torch.Tensor:
    """What SFT, rejection sampling and SteerLM minimise: token cross-entropy on the answers,
        loss = -(1 / N) * sum over the N supervised tokens of log p(token | everything before it).
    answer_logps [B]: each answer's summed token log-probs (Llava.forward with labels, which calls
    answer_logps); n_tokens: N, counted over the whole micro-batch (all processes, with DDP), so
    that every token weighs the same whichever row and process it sits in."""
    return -answer_logps.sum() / n_tokens


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) and two relatives.

    Inputs are per-pair sequence log-probs [B]. With the implicit reward r(x, y) = beta * log(pi(y|x) /
    pi_ref(y|x)) (eq. 5) and h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

    * "sigmoid" (DPO, eq. 7): -log sigmoid(beta * h). With label_smoothing eps ("conservative DPO",
      Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), for labels flipped
      with probability eps.
    * "ipo" (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h - 1 / (2 beta))^2.
    * "hinge" (SLiC, Zhao et al. 2023, arXiv 2305.10425): max(0, 1 - beta h).

    Returns (per-pair losses [B], chosen rewards [B], rejected rewards [B]); rewards are detached.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------
# Preference losses without a reference model. Both work on length-normalised log-probs: the mean
# log p per answer token, written avg log pi(y|x) below.
# ---------------------------------------------------------------------------------------------


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): the implicit reward is beta * avg log pi(y|x)
    (eq. 4; no reference model), and the chosen answer must win by a margin gamma:
        loss = -log sigmoid(beta * avg log pi(y_w|x) - beta * avg log pi(y_l|x) - gamma).
    Inputs: mean log-probs per answer [B]. Returns (losses [B], chosen rewards [B], rejected rewards [B])."""
    chosen_rewards, rejected_rewards = beta * policy_chosen, beta * policy_rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float = 0.1):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 4-7): the chosen answer's NLL plus beta (the
    paper's lambda) times an odds-ratio term, no reference model. With P = exp(avg log pi(y|x)) and
    odds(y) = P / (1 - P) (eq. 4):
        loss = -avg log pi(y_w|x) - beta * log sigmoid(log odds(y_w) - log odds(y_l)).
    log odds = avg log p - log(1 - exp(avg log p)), computed with log1p(-exp) for stability.
    Inputs: mean log-probs per answer [B] (each < 0). Rewards, as TRL reports them: beta * avg log p."""
    def log_odds(avg_logp):
        return avg_logp - torch.log1p(-torch.exp(avg_logp))

    losses = -policy_chosen - beta * F.logsigmoid(log_odds(policy_chosen) - log_odds(policy_rejected))
    return losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach()


# ---------------------------------------------------------------------------------------------
# A loss that also compares images: the chosen answer under the true image and under a corrupted one
# ---------------------------------------------------------------------------------------------


def mdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, policy_corrupted: torch.Tensor, ref_corrupted: torch.Tensor,
              beta: float = 0.1, anchor: float = 0.0):
    """mDPO (Wang et al. 2024, arXiv 2406.11839, eqs. 3-6): DPO's term, plus two that make the
    preference depend on the image. With r(y | m) = log pi(y | m, x) - log pi_ref(y | m, x), m the true
    image and m' a corrupted one (a small random crop of it, `data.corrupt_image`):
        conditional preference:  -log sigmoid(beta * (r(y_w | m) - r(y_w | m')))
            the same chosen answer must be likelier with the real image than with the corrupted one;
        anchored preference:     -log sigmoid(beta * r(y_w | m) - anchor)
            the chosen reward stays above the anchor (0), so it cannot fall along with the rejected one.
    loss = DPO + conditional + anchored. Inputs: summed log-probs [B]; *_corrupted: the chosen answer's
    under the corrupted image. Returns (losses [B], chosen rewards [B], rejected rewards [B])."""
    dpo, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    chosen_ratio = policy_chosen - ref_chosen
    conditional = -F.logsigmoid(beta * (chosen_ratio - (policy_corrupted - ref_corrupted)))
    anchored = -F.logsigmoid(beta * chosen_ratio - anchor)
    return dpo + conditional + anchored, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------
# The table train_dpo.py reads: a loss is one function and one entry. `reference`: it compares with
# the starting model's log-probs (computed once before training, or read from the data file);
# `average`: it needs mean log-probs per answer token rather than sums (--average-logps asks for
# means with any loss); `image_conditional`: it also needs the chosen answer's log-probs under a
# corrupted image (passed as policy_corrupted= and ref_corrupted=).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLoss:
    compute: Callable  # (policy_chosen, policy_rejected, ref_chosen, ref_rejected, options) -> (losses, rewards, rewards)
    reference: bool
    average: bool
    paper: str
    image_conditional: bool = False


PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLoss(lambda pc, pr, rc, rr, o: dpo_loss(pc, pr, rc, rr, o.beta, "sigmoid", o.label_smoothing),
                              reference=True, average=False, paper="DPO, arXiv 2305.18290"),
    "ipo": PreferenceLoss(lambda pc, pr, rc, rr, o: dpo_loss(pc, pr, rc, rr, o.beta, "ipo"),
                          reference=True, average=False, paper="IPO, arXiv 2310.12036"),
    "hinge": PreferenceLoss(lambda pc, pr, rc, rr, o: dpo_loss(pc, pr, rc, rr, o.beta, "hinge"),
                            reference=True, average=False, paper="SLiC, arXiv 2305.10425"),
    "simpo": PreferenceLoss(lambda pc, pr, rc, rr, o: simpo_loss(pc, pr, o.beta, o.simpo_gamma),
                            reference=False, average=True, paper="SimPO, arXiv 2405.14734"),
    "orpo": PreferenceLoss(lambda pc, pr, rc, rr, o: orpo_loss(pc, pr, o.beta),
                           reference=False, average=True, paper="ORPO, arXiv 2403.07691"),
    "mdpo": PreferenceLoss(lambda pc, pr, rc, rr, o, policy_corrupted, ref_corrupted:
                           mdpo_loss(pc, pr, rc, rr, policy_corrupted, ref_corrupted, o.beta),
                           reference=True, average=False, paper="mDPO, arXiv 2406.11839", image_conditional=True),
}
