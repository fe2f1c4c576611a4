"""The losses, against values worked out independently (plain Python floats, loops), and what every
entry of the loss table must satisfy, whichever loss it is."""

import inspect
import math
import re

import pytest
import torch

import torch.nn.functional as F

import train_dpo
from tinyalign.losses import PREFERENCE_LOSSES, answer_logps, dpo_loss, orpo_loss, simpo_loss, sft_loss


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


PAIRS = [(-10.0, -12.0, -11.0, -11.0), (-5.0, -4.0, -6.0, -3.0), (-20.0, -20.5, -19.0, -21.0)]


CASES = [(t, beta, 0.0) for t in ("sigmoid", "ipo", "hinge") for beta in (0.1, 0.5)] + [("sigmoid", 0.1, 0.2)]


@pytest.mark.parametrize("loss_type,beta,smoothing", CASES)  # label smoothing is a sigmoid-loss option
def test_dpo_loss_family(loss_type, beta, smoothing):
    pc, pr, rc, rr = (torch.tensor(col) for col in zip(*PAIRS))
    options = {"beta": beta, **({"label_smoothing": smoothing} if loss_type == "sigmoid" else {})}
    losses, chosen, rejected = PREFERENCE_LOSSES[loss_type].compute(pc, pr, rc, rr, **options)
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


def test_an_unknown_loss_type_is_refused_naming_the_choices(capsys):
    """One dispatch for losses: the table. A name it lacks stops at the command line."""
    with pytest.raises(SystemExit) as stopped:
        train_dpo.parse(["--model", "m", "--out", "o", "--loss-type", "kto"])
    assert stopped.value.code == 2
    assert re.search(r"--loss-type: invalid choice: 'kto' \(choose from '?sigmoid'?, '?ipo'?, '?hinge'?",
                     capsys.readouterr().err)


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


def start_point(loss, n: int = 5, seed: int = 0):
    """The arguments a loss receives at the start of training: the policy is the reference, so each
    reference log-prob equals the policy's (and so for the corrupted image's, mDPO). Per-token means
    (SimPO, ORPO) or sums, each < 0."""
    g = torch.Generator().manual_seed(seed)
    scale = 3.0 if loss.average else 30.0
    chosen, rejected = (-(torch.rand(n, generator=g) * scale + 0.05) for _ in range(2))
    corrupted = -(torch.rand(n, generator=g) * scale + 0.05)
    policy = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    reference = [chosen, rejected] if loss.reference else []
    images = [corrupted.clone().requires_grad_(), corrupted] if loss.image_conditional else []
    return policy, reference, images


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_every_loss_keeps_the_tables_contract(name):
    """What the DPO step relies on, for every entry (a new loss gets these checks by being in the table):
    per-pair losses and rewards [B]; rewards detached; descent raises log p(chosen) and lowers
    log p(rejected) at the start; its declared hyperparameters are keyword arguments of its function,
    with their defaults inside their declared range. For a loss against a reference, at the start
    (policy = reference) both rewards are 0 and the loss is one value for every pair: DPO's is
    ln 2, IPO's 1 / (4 beta^2), the hinge's 1 (so ln 2 is DPO's value, not every loss's)."""
    loss = PREFERENCE_LOSSES[name]
    hyperparameters = {key: h.default for key, h in loss.hyperparameters.items()}
    accepted = inspect.signature(loss.compute).parameters
    for key, h in loss.hyperparameters.items():
        assert key in accepted and accepted[key].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, key
        assert h.low is None or (h.default > h.low if h.low_open else h.default >= h.low), key
        assert h.high is None or h.default <= h.high, key
    policy, reference, images = start_point(loss)
    losses, chosen_rewards, rejected_rewards = loss.compute(*policy, *reference, *images, **hyperparameters)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (5,)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert (policy[0].grad < 0).all() and (policy[1].grad > 0).all()
    if loss.reference:
        assert torch.equal(chosen_rewards, torch.zeros(5)) and torch.equal(rejected_rewards, torch.zeros(5))
        assert torch.allclose(losses, losses[0].expand(5), rtol=0, atol=1e-6)
    if name == "sigmoid":
        assert losses[0].item() == pytest.approx(math.log(2), rel=1e-6)


def test_the_loss_table_is_the_command_lines(capsys, tmp_path):
    """Every entry is a --loss-type choice, and each hyperparameter an option in --help, with its
    default: a loss needs nothing but its function and its entry."""
    with pytest.raises(SystemExit):
        train_dpo.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, loss in PREFERENCE_LOSSES.items():
        assert f"{name}: {loss.paper}" in text
        for key, h in loss.hyperparameters.items():
            assert (h.option or "--" + key.replace("_", "-")) in text
    args = train_dpo.parse(["--model", str(tmp_path), "--out", "o", "--loss-type", "simpo", "--simpo-gamma", "0.25"])
    assert args.simpo_gamma == 0.25 and args.beta == 0.1 and args.average_logps  # SimPO compares means


def test_mdpo_by_hand():
    """Wang et al. 2024 (mDPO), eqs. 3-6, worked in floats: DPO's term, the chosen answer with its image
    against the same answer with a corrupted image, and the chosen reward anchored at 0."""
    beta = 0.1
    cases = [(-10.0, -12.0, -11.0, -11.0, -14.0, -13.0), (-5.0, -4.0, -6.0, -3.0, -5.5, -7.0)]
    pc, pr, rc, rr, pcc, rcc = (torch.tensor(col) for col in zip(*cases))
    losses, chosen, rejected = PREFERENCE_LOSSES["mdpo"].compute(pc, pr, rc, rr, pcc, rcc, beta=beta)
    assert PREFERENCE_LOSSES["mdpo"].image_conditional and PREFERENCE_LOSSES["mdpo"].reference
    for i, (a, b, c, d, e, f) in enumerate(cases):
        dpo = -log_sigmoid(beta * ((a - c) - (b - d)))
        conditional = -log_sigmoid(beta * ((a - c) - (e - f)))
        anchored = -log_sigmoid(beta * (a - c))
        assert losses[i].item() == pytest.approx(dpo + conditional + anchored, rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (a - c)) and rejected[i].item() == pytest.approx(beta * (b - d))
