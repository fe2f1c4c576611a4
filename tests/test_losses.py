"""The losses, against values worked out independently (plain Python floats, loops)."""

import math
from types import SimpleNamespace

import pytest
import torch

import torch.nn.functional as F

from tinyalign.losses import PREFERENCE_LOSSES, answer_logps, dpo_loss, orpo_loss, simpo_loss, sft_loss


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


PAIRS = [(-10.0, -12.0, -11.0, -11.0), (-5.0, -4.0, -6.0, -3.0), (-20.0, -20.5, -19.0, -21.0)]


CASES = [(t, beta, 0.0) for t in ("sigmoid", "ipo", "hinge") for beta in (0.1, 0.5)] + [("sigmoid", 0.1, 0.2)]


@pytest.mark.parametrize("loss_type,beta,smoothing", CASES)  # label smoothing is a sigmoid-loss option
def test_dpo_loss_family(loss_type, beta, smoothing):
    pc, pr, rc, rr = (torch.tensor(col) for col in zip(*PAIRS))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    for i, (a, b, c, d) in enumerate(PAIRS):
        h = (a - c) - (b - d)  # log-ratio of chosen minus log-ratio of rejected
        expected = {
            "sigmoid": -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h),
            "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": max(0.0, 1 - beta * h),
        }[loss_type]
        assert losses[i].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (a - c))
        assert rejected[i].item() == pytest.approx(beta * (b - d))


def test_dpo_loss_rejects_unknown_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type must be"):
        dpo_loss(x, x, x, x, loss_type="kto")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]))
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log p(chosen), lowers log p(rejected)


def hidden_head_and_labels():
    """Decoder outputs [2, 6, 8], an LM head over 11 tokens, and labels: row 0 is a prompt (3 tokens)
    then a 3-token answer; row 1 a prompt (2), an answer (2), padding (2)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, -100, 4, 7, 2], [-100, -100, 5, 2, -100, -100]])
    return hidden, head, labels


def test_answer_logps_scores_exactly_the_answer_tokens():
    hidden, head, labels = hidden_head_and_labels()
    logp = head(hidden).log_softmax(-1)
    # Worked out by hand: the first answer token (position 3 in row 0) is scored by position 2's state.
    row0 = logp[0, 2, 4] + logp[0, 3, 7] + logp[0, 4, 2]
    row1 = logp[1, 1, 5] + logp[1, 2, 2]
    for chunk in (1, 2, 1024):  # the LM head runs `chunk` scored positions at a time: same numbers
        got = answer_logps(hidden, head, labels, chunk=chunk)
        assert got.tolist() == pytest.approx([row0.item(), row1.item()], rel=1e-6)
        assert answer_logps(hidden, head, labels, average=True, chunk=chunk).tolist() == pytest.approx(
            [row0.item() / 3, row1.item() / 2], rel=1e-6)
    # Nothing of the prompt or padding matters: change those states and the result stays.
    changed = hidden.clone()
    changed[0, :2] += 100.0
    changed[1, 3:] -= 50.0
    assert torch.equal(answer_logps(changed, head, labels), got)


def test_sft_loss_is_token_mean_cross_entropy():
    """sft_loss on the answers' summed log-probs equals torch's own cross-entropy over the shifted
    logits with -100 ignored (the formula SFT trainers use), and the hand-written token mean."""
    hidden, head, labels = hidden_head_and_labels()
    logits = head(hidden)
    n_tokens = int((labels[:, 1:] != -100).sum())
    got = sft_loss(answer_logps(hidden, head, labels), n_tokens)
    torch_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert got.item() == pytest.approx(torch_ce.item(), rel=1e-6)
    logp = logits.log_softmax(-1)
    terms = [logp[0, 2, 4], logp[0, 3, 7], logp[0, 4, 2], logp[1, 1, 5], logp[1, 2, 2]]
    assert n_tokens == 5 and got.item() == pytest.approx(-sum(t.item() for t in terms) / 5, rel=1e-6)


# Mean log-probs per answer token (SimPO and ORPO work on those): (chosen, rejected) per pair.
AVERAGED = [(-0.5, -1.25), (-2.0, -0.75), (-0.1, -3.0)]


def test_simpo_by_hand():
    """Meng et al. 2024, eq. 6: -log sigmoid(beta * avg_w - beta * avg_l - gamma), worked in floats."""
    pc, pr = (torch.tensor(col) for col in zip(*AVERAGED))
    losses, chosen, rejected = simpo_loss(pc, pr, beta=2.0, gamma=0.5)
    expected = [-log_sigmoid(2.0 * w - 2.0 * l - 0.5) for w, l in AVERAGED]  # 1: 2*0.75-0.5 = 1.0 ...
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)  # the first pair, by hand
    assert chosen.tolist() == pytest.approx([-1.0, -4.0, -0.2]) and rejected.tolist() == pytest.approx([-2.5, -1.5, -6.0])


def test_orpo_by_hand():
    """Hong et al. 2024, eqs. 4-7: -avg_w - lambda * log sigmoid(log odds_w - log odds_l), odds = p / (1 - p)
    with p = exp(avg log p), worked in floats."""
    pc, pr = (torch.tensor(col, dtype=torch.float64) for col in zip(*AVERAGED))
    losses, chosen, _ = orpo_loss(pc, pr, beta=0.1)
    for i, (w, l) in enumerate(AVERAGED):
        p_w, p_l = math.exp(w), math.exp(l)
        ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
        assert losses[i].item() == pytest.approx(-w - 0.1 * log_sigmoid(ratio), rel=1e-9)
    # The first pair by hand: p_w = e^-0.5 = 0.60653, p_l = e^-1.25 = 0.28650; odds 1.54149 and 0.40155;
    # log ratio 1.34517; -log sigmoid(1.34517) = log(1 + 0.26050) = 0.23150; loss = 0.5 + 0.1 * 0.23150.
    assert losses[0].item() == pytest.approx(0.52315, abs=1e-5)
    assert chosen.tolist() == pytest.approx([-0.05, -0.2, -0.01])


def test_the_loss_table_says_what_each_loss_needs():
    assert {n for n, loss in PREFERENCE_LOSSES.items() if loss.reference} == {"sigmoid", "ipo", "hinge", "mdpo"}
    assert {n for n, loss in PREFERENCE_LOSSES.items() if loss.average} == {"simpo", "orpo"}
    assert {n for n, loss in PREFERENCE_LOSSES.items() if loss.image_conditional} == {"mdpo"}

    class Options:
        beta, label_smoothing, simpo_gamma = 0.1, 0.0, 0.5

    pc, pr, rc, rr = (torch.tensor(col) for col in zip(*PAIRS))
    table = PREFERENCE_LOSSES["sigmoid"].compute(pc, pr, rc, rr, Options)[0]
    assert torch.equal(table, dpo_loss(pc, pr, rc, rr, beta=0.1)[0])  # the entry is DPO itself
    assert torch.equal(PREFERENCE_LOSSES["simpo"].compute(pc / 10, pr / 10, None, None, Options)[0],
                       simpo_loss(pc / 10, pr / 10, 0.1, 0.5)[0])  # no reference passed, none needed


def test_mdpo_by_hand():
    """Wang et al. 2024 (mDPO), eqs. 3-6, worked in floats: DPO's term, the chosen answer with its image
    against the same answer with a corrupted image, and the chosen reward anchored at 0."""
    beta = 0.1
    cases = [(-10.0, -12.0, -11.0, -11.0, -14.0, -13.0), (-5.0, -4.0, -6.0, -3.0, -5.5, -7.0)]
    pc, pr, rc, rr, pcc, rcc = (torch.tensor(col) for col in zip(*cases))
    losses, chosen, rejected = PREFERENCE_LOSSES["mdpo"].compute(pc, pr, rc, rr, SimpleNamespace(beta=beta),
                                                                 policy_corrupted=pcc, ref_corrupted=rcc)
    assert PREFERENCE_LOSSES["mdpo"].image_conditional and PREFERENCE_LOSSES["mdpo"].reference
    for i, (a, b, c, d, e, f) in enumerate(cases):
        dpo = -log_sigmoid(beta * ((a - c) - (b - d)))
        conditional = -log_sigmoid(beta * ((a - c) - (e - f)))
        anchored = -log_sigmoid(beta * (a - c))
        assert losses[i].item() == pytest.approx(dpo + conditional + anchored, rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (a - c)) and rejected[i].item() == pytest.approx(beta * (b - d))
