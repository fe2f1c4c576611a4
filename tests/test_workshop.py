"""docs/workshop.md's exercises: every solution (tinyalign/lab/workshop.py) runs and gives what the answers
say, and every code reference of the reading order points at a real definition."""

import math
import re
from pathlib import Path

import pytest
import torch

import train_dpo
from test_training import dpo_args, metrics, write_pairs_with_reference
from tinyalign import Processor, load_model
from tinyalign.batches import collate_pairs, pair_logps
from tinyalign.data import pair_examples, read_pairs
from tinyalign.lab import workshop
from tinyalign.losses import PREFERENCE_LOSSES
from tinyalign.packing import pack_pairs
from tinyalign.training import micro_batches

REPO = Path(__file__).resolve().parent.parent


def test_every_code_reference_of_the_reading_order_exists():
    """`path::name` in docs/workshop.md: the file exists and defines the name."""
    text = (REPO / "docs/workshop.md").read_text()
    references = re.findall(r"`([\w/]+\.py)::(\w+)`", text)
    assert len(references) >= 15
    for path, name in references:
        source = (REPO / path).read_text()
        assert re.search(rf"^\s*(def|class) {name}\b|^{name} = ", source, re.M), f"{path} defines no {name}"


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_dpop_by_hand():
    """Exercise 3's loss, worked in plain floats: the penalty acts only when the chosen answer's
    log-prob is below the reference's."""
    cases = [(-10.0, -12.0, -11.0, -11.0), (-5.0, -4.0, -4.5, -3.0), (-20.0, -20.5, -19.0, -21.0)]
    pc, pr, rc, rr = (torch.tensor(col) for col in zip(*cases))
    losses, chosen, _ = workshop.dpop_loss(pc, pr, rc, rr, beta=0.1, lam=50.0)
    for i, (a, b, c, d) in enumerate(cases):
        h = (a - c) - (b - d)
        expected = -log_sigmoid(0.1 * (h - 50.0 * max(0.0, c - a)))
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen[i].item() == pytest.approx(0.1 * (a - c))


def test_dpop_trains_through_the_loss_table(tiny_world, tmp_path, monkeypatch):
    """Registered, `--loss-type dpop` trains; at learning rate 0 the first step's loss is dpop_loss of
    the start model's log-probs and the file's reference log-probs."""
    monkeypatch.setitem(PREFERENCE_LOSSES, "dpop", None)  # removed again after the test
    workshop.register_dpop()
    pairs_path = write_pairs_with_reference(tiny_world, tmp_path / "pairs.jsonl")
    out = tmp_path / "dpop"
    train_dpo.main(dpo_args(tiny_world, pairs_path, out, "--loss-type", "dpop", "--max-steps", "1", "--lr", "0",
                            "--projector-lr", "0", "--batch-size", "16", "--grad-accum", "1", "--eval-fraction", "0",
                            "--no-packing"))
    processor = Processor.from_pretrained(tiny_world["checkpoint"])
    examples, _ = pair_examples(read_pairs(pairs_path)[0], processor, tiny_world["images"])
    first = [examples[i] for i in micro_batches(len(examples), 16, 1, seed=0)[0]]
    with torch.no_grad():
        chosen, rejected = pair_logps(load_model(tiny_world["checkpoint"]), collate_pairs(first, processor))
    n = len(first)
    expected = workshop.dpop_loss(chosen, rejected, torch.full((n,), -1.0), torch.full((n,), -30.0))[0].mean()
    assert metrics(out)[0]["loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_without_the_branch_rule_the_rejected_answer_sees_the_chosen_one():
    """Exercise 4: delete the branch condition of the mask and the packed rejected log-probs no longer
    equal the plain batch's (what tests/test_packing.py checks), while the chosen ones, which come
    first, stay equal."""
    from test_packing import packed_logps, plain_logps

    model, processor, examples = packing_setup()
    with torch.no_grad():
        plain = plain_logps(model, collate_pairs(examples, processor))
        broken = packed_logps(model, workshop.without_branch_rule(pack_pairs(examples, processor)))
    B = len(examples)
    torch.testing.assert_close(broken[:B], plain[:B], rtol=0, atol=1e-4)
    assert (broken[B:] - plain[B:]).abs().max() > 1e-2


def packing_setup():
    """Six pairs of the shapes world and a random tiny model (as tests/test_packing.py makes them)."""
    import tempfile

    from tinyalign import random_model
    from tinyalign.data import Pair
    from tinyalign.data import read_jsonl
    from tinyalign.demo.world import demo_config, demo_processor, make_world

    folder = Path(tempfile.mkdtemp())
    files = make_world(folder, seed=3, n_sft=0, n_prompts=6, n_heldout=0, n_heldout_prompts=0)
    prompts = read_jsonl(files["prompts"])
    answers = ["The color is red .", "There are two shapes .", "No , there is not .", "They are circles .",
               "I am not sure .", "Yes , there is ."]
    pairs = [Pair(r["id"], [r["image"]], r["prompt"], answers[i], answers[(i + 2) % 6]) for i, r in enumerate(prompts)]
    processor = demo_processor()
    examples, _ = pair_examples(pairs, processor, folder)
    return random_model(demo_config(), seed=5), processor, examples


def test_mistakes_by_confusion_groups_every_question(tiny_world):
    from tinyalign.data import read_jsonl

    questions = read_jsonl(tiny_world["heldout"])
    groups = workshop.mistakes_by_confusion(tiny_world["checkpoint"], tiny_world["images"], questions)
    assert sum(n for _, n in groups.values()) == len(questions)
    assert all(0 <= accuracy <= 1 for accuracy, _ in groups.values())
    assert set(groups) <= {"yellow -> green", "triangle -> square", "three -> two", "everything else"}
