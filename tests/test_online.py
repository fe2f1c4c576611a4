"""Online DPO, `train_dpo.py --online`: every step samples from the policy as it is, the judge rates,
one DPO step trains on the pairs kept. The reference is the policy with its adapters off and its
starting projector, which must be exactly the start model; a stopped run resumes to the uninterrupted
one; prompts whose answers give no pair are counted."""

import hashlib
import json

import pytest
import torch
from test_training import dpo_args

import train_dpo
from tinyalign.batches import collate_pairs, pair_logps
from tinyalign.data import Pair, pair_examples, read_jsonl
from tinyalign.demo.world import say, wrong_values
from tinyalign.evaluation.annotate import RuleJudge
from tinyalign.infra.weights import load_model
from tinyalign.processor import Processor
from tinyalign.training import paper_recipe

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def online_args(world, out, *extra):
    return dpo_args(world, world["prompts"], out, "--online", "--prompts", str(world["prompts"]), "--judge", "rules",
                    "--samples-per-prompt", "3", "--sample-tokens", "8", "--max-steps", "3", "--eval-fraction", "0",
                    "--grad-accum", "1",
                    *extra)


@pytest.fixture
def hashing_judge(monkeypatch):
    """A random tiny model's answers all rate alike under the world's rules (no pairs): this judge rates
    each answer by a hash of its text instead, so answers that differ get ratings that differ."""
    def rate(self, record, answer):
        score = int(hashlib.sha256(answer.encode()).hexdigest(), 16) % 5
        return {a: score for a in ATTRIBUTES}

    monkeypatch.setattr(RuleJudge, "rate_record", rate)


def test_the_reference_is_the_start_model_with_adapters_off_and_its_projector(tiny_world):
    """After training has moved every trainable weight, `as_start_model` scores pairs as the start
    model loaded fresh from disk, a second copy, does (to float rounding), and leaves the policy itself
    again and training. The projector's copy is taken as `online` takes it, before paper_recipe."""
    start = tiny_world["checkpoint"]
    processor = Processor.from_pretrained(start)
    prompts = read_jsonl(tiny_world["prompts"])[:6]
    pairs = [Pair(r["id"], [r["image"]], r["prompt"], say(r["kind"], r["truth"]),
                  say(r["kind"], wrong_values(r["kind"], r["truth"])[0])) for r in prompts]
    examples, _ = pair_examples(pairs, processor, tiny_world["images"])
    batch = collate_pairs(examples, processor)
    model = load_model(start)
    start_projector = train_dpo.copy.deepcopy(model.multi_modal_projector)
    paper_recipe(model, argparse_like(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # what training moves: the adapters and the projector
                p.add_(0.05 * torch.randn_like(p))
    frozen = load_model(start).eval()
    with torch.no_grad():
        expected = pair_logps(frozen, batch)
        moved = pair_logps(model.eval(), batch)
        with train_dpo.as_start_model(model, start_projector) as reference:
            seen = pair_logps(reference, batch)
        assert model.training  # back in training mode
        after = pair_logps(model.eval(), batch)
    for a, b in zip(seen, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(moved[0], expected[0], atol=1e-3)  # the trained policy does differ
    for a, b in zip(after, moved):  # and is itself again after the block
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def argparse_like(**values):
    import argparse

    return argparse.Namespace(**values)


def test_online_run_samples_rates_and_trains_every_step(tiny_world, tmp_path, hashing_judge):
    out = tmp_path / "run"
    train_dpo.main(online_args(tiny_world, out))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["judged_answers"] == 8 * 3  # --batch-size 8 prompts, 3 answers each
        assert 0 < r["prompts/paired"] <= 1 and "loss" in r and "rewards/margin" in r
    assert (out / "model" / "config.json").exists()
    start, trained = load_model(tiny_world["checkpoint"]).state_dict(), load_model(out / "model").state_dict()
    assert any(not torch.equal(start[n], trained[n]) for n in start)


def test_online_run_stopped_and_resumed_equals_the_uninterrupted_one(tiny_world, tmp_path, hashing_judge):
    train_dpo.main(online_args(tiny_world, tmp_path / "whole"))
    train_dpo.main(online_args(tiny_world, tmp_path / "cut", "--stop-after", "1"))
    train_dpo.main(online_args(tiny_world, tmp_path / "cut", "--resume"))
    whole, cut = (load_model(tmp_path / name / "model").state_dict() for name in ("whole", "cut"))
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name

    def losses(name):
        return [json.loads(line).get("loss") for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("whole") == losses("cut")


def test_prompts_without_a_pair_are_counted_and_the_run_goes_on(tiny_world, tmp_path):
    """The world's own rules on a random model's answers: every answer rates alike, no prompt gives a
    pair. Each step says so (prompts/paired 0) and no weight moves."""
    out = tmp_path / "run"
    train_dpo.main(online_args(tiny_world, out, "--max-steps", "2"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [(r["step"], r["prompts/paired"], r["judged_answers"]) for r in train] == [(1, 0.0, 24), (2, 0.0, 24)]
    assert not any("loss" in r for r in lines)  # no step had a pair to train on
    start, trained = load_model(tiny_world["checkpoint"]).state_dict(), load_model(out / "model").state_dict()
    for name in start:
        assert torch.equal(start[name], trained[name]), name


def test_online_with_accumulation_and_held_out_pairs(tiny_world, tmp_path, hashing_judge):
    """Two micro-batches a step (16 prompts), and held-out pairs evaluated at the start and the end."""
    from test_training import write_pairs

    held = write_pairs(tiny_world, tmp_path / "held.jsonl")
    out = tmp_path / "run"
    train_dpo.main(online_args(tiny_world, out, "--grad-accum", "2", "--max-steps", "2", "--eval-data", str(held)))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["judged_answers"] for r in lines if r["split"] == "train"] == [16 * 3, 16 * 3]
    evals = [r for r in lines if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["rewards/chosen"] == 0  # the start is the reference
    assert evals[1]["rewards/chosen"] != 0


@pytest.mark.parametrize("extra, message", [
    (["--loss-type", "mdpo"], "--online: --loss-type mdpo is not supported"),
    (["--loss-type", "simpo"], "--online: --loss-type simpo is not supported"),
])
def test_online_refuses_what_it_cannot_do(tiny_world, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train_dpo.main(online_args(tiny_world, tmp_path / "run", *extra))


def test_online_needs_prompts(tiny_world, tmp_path):
    argv = online_args(tiny_world, tmp_path / "run")
    i = argv.index("--prompts")
    with pytest.raises(SystemExit, match="--online needs --prompts"):
        train_dpo.main(argv[:i] + argv[i + 2:])
