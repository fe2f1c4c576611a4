"""Iterative (on-policy) DPO, `train_dpo.py --rounds K`: each round samples from the current model, the
rules judge rates, DPO trains from and against that model; everything of a round is kept in its folder,
and a run stopped inside a round resumes to exactly the uninterrupted run.

A random tiny model's own samples all rate alike (no pairs), so the runs that train find each round's
ratings already written, every answer style for every prompt, and annotate resumes past them (as
test_study does; such a folder is continued with --resume): their rounds do not sample.
`test_a_round_samples_from_its_model...` shows the sampling itself."""

import json

import pytest
import torch
from test_training import dpo_args

import train_dpo
from tinyalign.data import read_jsonl
from tinyalign.demo.world import rated_styles
from tinyalign.infra.checkpoints import latest_checkpoint, load_checkpoint
from tinyalign.infra.weights import load_model


def iterative_args(world, out, *extra, prompts=True):
    """The tiny training recipe, two rounds over the world's 48 prompts (24 each), the rules judge."""
    chosen = ["--prompts", str(world["prompts"])] if prompts else []
    return dpo_args(world, world["prompts"], out, "--rounds", "2", *chosen, "--judge", "rules",
                    "--samples-per-prompt", "3", "--sample-tokens", "12", "--max-steps", "2", *extra)


def rated_rounds(world, out, rounds=2):
    """Each round's samples file, written before the run: every answer style of its prompts, rated."""
    prompts = read_jsonl(world["prompts"])
    for k in range(1, rounds + 1):
        (out / f"round-{k}").mkdir(parents=True)
        records = rated_styles(prompts[k - 1::rounds])
        (out / f"round-{k}" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("iterative") / "run"
    rated_rounds(tiny_world, out)
    train_dpo.main(iterative_args(tiny_world, out, "--resume"))  # the rounds' ratings are there already
    return out


def test_each_round_trains_on_its_prompts_from_the_last_rounds_model(tiny_world, uninterrupted):
    out = uninterrupted
    prompts = read_jsonl(tiny_world["prompts"])
    seen = []
    for k in (1, 2):
        folder = out / f"round-{k}"
        share = read_jsonl(folder / "prompts.jsonl")
        assert [p["id"] for p in share] == [p["id"] for p in prompts[k - 1::2]]  # its own half of the prompts
        seen += [p["id"] for p in share]
        samples = read_jsonl(folder / "samples.jsonl")
        assert [s["id"] for s in samples] == [p["id"] for p in share]  # every prompt rated, once
        lines = [json.loads(line) for line in (folder / "dpo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2]
        assert (folder / "dpo" / "model" / "config.json").exists()
    assert sorted(seen) == sorted(p["id"] for p in prompts)  # two rounds ask the judge once per prompt in all
    # round 2 starts from, and is anchored to, round 1's model: its run's --model, and its checkpoint
    _, state = load_checkpoint(latest_checkpoint(out / "round-2" / "dpo"))
    assert state["args"]["model"] == str(out / "round-1" / "dpo" / "model")
    _, state = load_checkpoint(latest_checkpoint(out / "round-1" / "dpo"))
    assert state["args"]["model"] == str(tiny_world["checkpoint"])
    # the two rounds' models differ: round 2 trained on
    one, two = (load_model(out / f"round-{k}" / "dpo" / "model").state_dict() for k in (1, 2))
    assert any(not torch.equal(one[n], two[n]) for n in one)


def test_a_run_stopped_inside_a_round_resumes_to_the_uninterrupted_one(tiny_world, uninterrupted, tmp_path):
    out = tmp_path / "run"
    rated_rounds(tiny_world, out)
    train_dpo.main(iterative_args(tiny_world, out, "--resume", "--stop-after", "1"))  # stops at step 1 of round 1
    assert not (out / "round-1" / "dpo" / "model").exists() and not (out / "round-2" / "dpo").exists()
    train_dpo.main(iterative_args(tiny_world, out, "--resume"))
    for k in (1, 2):
        assert (out / f"round-{k}" / "samples.jsonl").read_text() == \
            (uninterrupted / f"round-{k}" / "samples.jsonl").read_text()
    resumed, whole = (load_model(o / "round-2" / "dpo" / "model").state_dict() for o in (out, uninterrupted))
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def test_rounds_need_prompts(tiny_world, tmp_path):
    with pytest.raises(SystemExit, match="--rounds needs --prompts"):
        train_dpo.main(iterative_args(tiny_world, tmp_path / "run", prompts=False))


def test_a_round_samples_from_its_model_and_counts_the_prompts_without_a_pair(tiny_world, tmp_path, capsys):
    """Without ratings on disk, round 1 samples 3 answers per prompt from the start and the rules judge
    rates them; a random model's answers all rate alike, so no prompt gives a pair: each is counted,
    and the round stops naming its samples file."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="round-1/samples.jsonl: no usable pairs"):
        train_dpo.main(iterative_args(tiny_world, out))
    samples = read_jsonl(out / "round-1" / "samples.jsonl")
    assert len(samples) == 24 and all(len(s["responses"]) == 3 for s in samples)
    assert all(set(r["scores"]) >= {"helpfulness", "correctness"} for s in samples for r in s["responses"])
    assert "build_pairs: 0 kept; 24 dropped (answers spread by less than 2" in capsys.readouterr().out


def test_anchor_start_keeps_the_first_start_as_every_rounds_reference(tiny_world, uninterrupted, tmp_path):
    """Round 2's first held-out line (step 0, the policy still round 1's model): against its own start
    (--anchor round, the default) every reward is exactly 0; against the first start (--anchor start)
    it is round 1's change, not 0."""
    def step_zero(out):
        first = json.loads((out / "round-2" / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
        assert (first["step"], first["split"]) == (0, "eval")
        return first

    assert step_zero(uninterrupted)["rewards/chosen"] == 0 and step_zero(uninterrupted)["rewards/rejected"] == 0
    out = tmp_path / "run"
    rated_rounds(tiny_world, out)
    train_dpo.main(iterative_args(tiny_world, out, "--resume", "--anchor", "start"))
    anchored = step_zero(out)
    assert anchored["rewards/chosen"] != 0 and anchored["rewards/rejected"] != 0
    # round 1 is the same run either way (all but its speed)
    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "round-1" / "dpo" / "metrics.jsonl").read_text().splitlines()]

    assert losses(out) == losses(uninterrupted)


def test_a_folder_with_rounds_is_continued_or_started_over_only_when_asked(tiny_world, uninterrupted, tmp_path):
    with pytest.raises(SystemExit, match="holds the rounds of an iterative run: --resume continues it"):
        train_dpo.main(iterative_args(tiny_world, uninterrupted))
    # a finished run resumed: nothing is sampled or trained again, the rounds' files stay as they are
    before = {p: p.read_bytes() for p in uninterrupted.rglob("*.jsonl")}
    train_dpo.main(iterative_args(tiny_world, uninterrupted, "--resume"))
    assert {p: p.read_bytes() for p in uninterrupted.rglob("*.jsonl")} == before
    with pytest.raises(SystemExit, match="--rounds and --online"):
        train_dpo.main(iterative_args(tiny_world, tmp_path / "both", "--online"))
