"""The losses of the paper's four methods, each a few lines next to the equation it implements, and
the table train_dpo.py chooses a preference loss from.

Conventions: a forward scores the tokens its `Targets` name; logits at position t score the token at
t + 1. Preference losses take per-answer log-probs [B] (log pi(y|x), summed over the answer's tokens,
or their mean where a loss says so) and return (per-pair losses [B], chosen rewards [B], rejected
rewards [B]), the rewards detached: they are what gets logged, never what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------
# log pi(answer | prompt): the tokens to score, and their log-probs without the [B, T, V] logits
# ---------------------------------------------------------------------------------------------


@dataclass
class Targets:
    """The tokens a forward scores, each named by the hidden state that predicts it.

    rows, cols [N]: where that state is; tokens [N]: the token; sequence [N]: which answer (0..S-1) it
    counts toward; n_sequences: S. Plain rows (`from_labels`): the state at t predicts the label at
    t + 1 and each row is one answer. Packed rows (tinyalign/packing.py) list their tokens explicitly,
    because there the first rejected token is predicted by the last prompt token, not its neighbour."""

    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    sequence: torch.Tensor
    n_sequences: int

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> "Targets":
        """labels [B, T], IGNORE_INDEX where nothing is supervised (system prompt, question, image,
        padding) -> every supervised token, predicted from the position before it."""
        shifted = labels[:, 1:]  # shifted[:, t] is predicted by the state at t
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major order
        return cls(rows, cols, shifted[rows, cols], rows, labels.shape[0])

    def counts(self) -> torch.Tensor:
        """Scored tokens per answer [S]."""
        return torch.bincount(self.sequence, minlength=self.n_sequences)

    def to(self, device) -> "Targets":
        return Targets(*(getattr(self, f.name).to(device) for f in fields(self)[:4]), self.n_sequences)


def token_logps(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor, chunk: int = 1024):
    """hidden [N, D] (each row the state that predicts one token), targets [N] -> log p(target) [N].
    The LM head and log-softmax run `chunk` rows at a time, in float32: the full [B, T, V] logits of
    the batch never exist, only [chunk, V] at once."""
    out = []
    for start in range(0, len(targets), chunk):
        logits = lm_head(hidden[start:start + chunk]).float()  # [n, V]
        out.append(logits.gather(1, targets[start:start + chunk, None]).squeeze(1) - logits.logsumexp(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def scored_logps(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: Targets, chunk: int = 1024) -> torch.Tensor:
    """log pi(answer | prompt) per answer: the sum of log p(token) over its scored tokens, with the LM
    head and the log-softmax run only on the positions that predict one (token_logps).
    hidden [R, L, D] (the decoder output) -> [S]."""
    logps = token_logps(hidden[targets.rows, targets.cols], lm_head, targets.tokens, chunk)  # [N]
    total = torch.zeros(targets.n_sequences, dtype=torch.float32, device=hidden.device)
    return total.index_add(0, targets.sequence, logps)


def answer_logps(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor, average: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """The same for plain rows given their labels [B, T]: hidden [B, T, D] -> [B], summed or (average)
    the mean per answer token. The first answer token is scored by the hidden state of the last
    prompt token; prompt and padding (-100) contribute nothing."""
    targets = Targets.from_labels(labels.to(hidden.device))
    total = scored_logps(hidden, lm_head, targets, chunk)
    return total / targets.counts().clamp(min=1) if average else total


def sft_loss(answer_logps: torch.Tensor, n_tokens) -> torch.Tensor:
    """What SFT, rejection sampling and SteerLM minimise: token cross-entropy on the answers,
        loss = -(1 / N) * sum over the N supervised tokens of log p(token | everything before it).
    answer_logps [B]: each answer's summed token log-probs (Llava.forward with targets); n_tokens: N,
    counted over the whole micro-batch (all processes, with DDP), so that every token weighs the same
    whichever row and process it sits in."""
    return -answer_logps.sum() / n_tokens


# ---------------------------------------------------------------------------------------------
# DPO and its relatives: losses on the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x))
# (Rafailov et al. 2023, arXiv 2305.18290, eq. 5). Below, h is the difference of log-ratios,
#     h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)),
# y_w the chosen ("winning") answer, y_l the rejected one.
# ---------------------------------------------------------------------------------------------


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (log pi(y|x) - log pi_ref(y|x)) per answer [B], detached (eq. 5)."""
    return beta * (policy_logps - ref_logps).detach()


def log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h [B]: how much more the policy raised the chosen answer than the rejected one, relative to the
    reference."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h). With label_smoothing eps
    ("conservative DPO", Mitchell 2023), for labels flipped with probability eps:
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    When the policy is the reference, h = 0 and the loss is ln 2 = 0.693 for every pair."""
    h = log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, implicit_rewards(policy_chosen, ref_chosen, beta),
            implicit_rewards(policy_rejected, ref_rejected, beta))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h - 1 / (2 beta))^2, a squared loss that
    stops pushing once the margin reaches 1 / (2 beta)."""
    h = log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, implicit_rewards(policy_chosen, ref_chosen, beta),
            implicit_rewards(policy_rejected, ref_rejected, beta))


def hinge_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float = 0.1):
    """SLiC's hinge (Zhao et al. 2023, arXiv 2305.10425): max(0, 1 - beta h)."""
    h = log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * h)
    return (losses, implicit_rewards(policy_chosen, ref_chosen, beta),
            implicit_rewards(policy_rejected, ref_rejected, beta))


# ---------------------------------------------------------------------------------------------
# Preference losses without a reference model. Both work on length-normalised log-probs: the mean
# log p per answer token, written avg log pi(y|x) below.
# ---------------------------------------------------------------------------------------------


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): the implicit reward is beta * avg log pi(y|x)
    (eq. 4; no reference model), and the chosen answer must win by a margin gamma:
        loss = -log sigmoid(beta * avg log pi(y_w|x) - beta * avg log pi(y_l|x) - gamma)."""
    chosen_rewards, rejected_rewards = beta * policy_chosen, beta * policy_rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float = 0.1):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 4-7): the chosen answer's NLL plus beta (the
    paper's lambda) times an odds-ratio term, no reference model. With P = exp(avg log pi(y|x)) and
    odds(y) = P / (1 - P) (eq. 4):
        loss = -avg log pi(y_w|x) - beta * log sigmoid(log odds(y_w) - log odds(y_l)).
    log odds = avg log p - log(1 - exp(avg log p)), computed with log1p(-exp) for stability.
    Inputs are each < 0. Rewards, as TRL reports them: beta * avg log p."""
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
    image and m' a corrupted one (a small random crop of it, `batches.corrupt_image`):
        conditional preference:  -log sigmoid(beta * (r(y_w | m) - r(y_w | m')))
            the same chosen answer must be likelier with the real image than with the corrupted one;
        anchored preference:     -log sigmoid(beta * r(y_w | m) - anchor)
            the chosen reward stays above the anchor (0), so it cannot fall along with the rejected one.
    loss = DPO + conditional + anchored. *_corrupted [B]: the chosen answer's log-probs under the
    corrupted image."""
    dpo, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    chosen_ratio = policy_chosen - ref_chosen
    conditional = -F.logsigmoid(beta * (chosen_ratio - (policy_corrupted - ref_corrupted)))
    anchored = -F.logsigmoid(beta * chosen_ratio - anchor)
    return dpo + conditional + anchored, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------
# The numbers every preference trainer logs, computed here only (train_dpo.py, eval.py preference
# and the ablations all call these)
# ---------------------------------------------------------------------------------------------


def reward_comparison(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor):
    """Per pair: does the chosen answer get the larger implicit reward (what reward accuracy
    averages), and by how much (the margin)? -> (wins [B] bool, margins [B])."""
    return chosen_rewards > rejected_rewards, chosen_rewards - rejected_rewards


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """rewards/chosen and rewards/rejected (their means), rewards/accuracy (the share of pairs the
    chosen answer wins) and rewards/margin (the mean margin)."""
    wins, margins = reward_comparison(chosen_rewards, rejected_rewards)
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracy": wins.float().mean().item(), "rewards/margin": margins.mean().item()}


# ---------------------------------------------------------------------------------------------
# The table train_dpo.py reads (--loss-type NAME). A new loss is one function, one entry here and its
# test: the entry declares what the step must give it and its hyperparameters, each of which becomes
# a command-line option of train_dpo.py by itself (one option per name: a name several losses share,
# such as beta, is one option).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyperparameter:
    """A loss's keyword argument as train_dpo.py's command line offers it: --NAME (or `option`), its
    default, what it means, and the range a value must lie in (`low` < value with low_open)."""

    default: float
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    option: str | None = None


@dataclass(frozen=True)
class PreferenceLoss:
    """compute(policy_chosen, policy_rejected[, ref_chosen, ref_rejected][, policy_corrupted,
    ref_corrupted], **hyperparameters) -> (losses [B], chosen rewards [B], rejected rewards [B]).

    reference: it compares with the starting model's log-probs (computed once before training, or
    read from the data file); average: it needs mean log-probs per answer token rather than sums;
    image_conditional: it also needs the chosen answer's log-probs under a corrupted image."""

    compute: Callable
    paper: str
    hyperparameters: dict[str, Hyperparameter] = field(default_factory=dict)
    reference: bool = True
    average: bool = False
    image_conditional: bool = False


def kl_strength(meaning: str = "the strength of the KL constraint to the reference") -> Hyperparameter:
    return Hyperparameter(0.1, meaning, low=0, low_open=True)


PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLoss(dpo_loss, "DPO, arXiv 2305.18290", {
        "beta": kl_strength(),
        "label_smoothing": Hyperparameter(0.0, "conservative DPO: assumed rate of flipped labels (0.5: no "
                                               "preference left)", low=0, high=0.5)}),
    "ipo": PreferenceLoss(ipo_loss, "IPO, arXiv 2310.12036", {"beta": kl_strength()}),
    "hinge": PreferenceLoss(hinge_loss, "SLiC, arXiv 2305.10425", {"beta": kl_strength()}),
    "simpo": PreferenceLoss(simpo_loss, "SimPO, arXiv 2405.14734", {
        "beta": kl_strength("the reward scale (its paper uses 2-2.5)"),
        "gamma": Hyperparameter(0.5, "SimPO's target reward margin gamma", option="--simpo-gamma")},
        reference=False, average=True),
    "orpo": PreferenceLoss(orpo_loss, "ORPO, arXiv 2403.07691", {
        "beta": kl_strength("the weight of the odds-ratio term (its lambda)")}, reference=False, average=True),
    "mdpo": PreferenceLoss(mdpo_loss, "mDPO, arXiv 2406.11839", {
        "beta": kl_strength(),
        "anchor": Hyperparameter(0.0, "mDPO: the value the chosen reward is kept above", option="--mdpo-anchor")},
        image_conditional=True),
}
