"""SteerLM: the ratings are written exactly, bad ones are refused, and steering works."""

import json

import pytest
from test_training import sft_args

import train_steerlm
from tinyalign import load_model
from tinyalign.data import read_jsonl
from tinyalign.demo.runs import STEER_CONDITIONS, greedy_answers
from tinyalign.demo.world import demo_processor, rated_styles
from tinyalign.steer import check_ratings, format_ratings, parse_steer, steer_prompt

R = {"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 1}


def test_ratings_are_written_exactly():
    assert format_ratings(R) == "helpfulness:4,correctness:3,coherence:4,complexity:2,verbosity:1"
    assert steer_prompt("<image>\nWhat is it?", R) == (
        "<image>\nWhat is it?\nAttributes: helpfulness:4,correctness:3,coherence:4,complexity:2,verbosity:1")
    assert steer_prompt("Q?", R, "authors").endswith(
        "on a 5-point Likert scale (0-4): Helpfulness:4,Correctness:3,Coherence:4,Complexity:2,Verbosity:1")
    assert parse_steer("Verbosity:1, helpfulness:4,correctness:3,coherence:4,complexity:2") == R


@pytest.mark.parametrize("text,message", [
    ("helpfulness:5,correctness:3,coherence:4,complexity:2,verbosity:1", "helpfulness must be an integer 0-4, got 5"),
    ("helpfulness:4,correctness:-1,coherence:4,complexity:2,verbosity:1", "correctness must be an integer 0-4, got -1"),
    ("helpfulness:4,correctness:3,coherence:4,complexity:2,wit:1", r"unknown attribute\(s\) \['wit'\]"),
    ("helpfulness:4,correctness:3", r"missing attribute\(s\) \['coherence', 'complexity', 'verbosity'\]"),
    ("helpfulness=4", r"'helpfulness=4' is not name:value"),
    ("helpfulness:high,correctness:3", r"'helpfulness:high' is not name:value"),
])
def test_bad_ratings_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_steer(text)


def test_fractional_or_boolean_ratings_are_refused():
    with pytest.raises(ValueError, match="verbosity must be an integer 0-4, got 2.5"):
        check_ratings({**R, "verbosity": 2.5})
    with pytest.raises(ValueError, match="coherence must be an integer 0-4, got True"):
        check_ratings({**R, "coherence": True})


def test_training_data_names_a_record_with_bad_ratings(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps({"id": "p9", "prompt": "q", "responses": [
        {"text": "a", "scores": {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1}}]}) + "\n")
    with pytest.raises(ValueError, match=r"scored.jsonl record p9 response 0: missing attribute\(s\) \['verbosity'\]"):
        train_steerlm.steer_conversations(path, "tinyalign")


def verbosity_lengths(world, out, seed: int = 0) -> dict:
    """Train a tiny model briefly on rated answers (training seed `seed`), then ask for verbosity 2 and
    4: mean words per greedy answer for each."""
    data = out.parent / f"{out.name}-steer.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rated_styles(read_jsonl(world["prompts"]))))
    args = sft_args(world, out, "--epochs", "5", "--lora-r", "0", "--lr", "3e-3", "--grad-accum", "1",
                    "--batch-size", "16", "--eval-every", "0", "--seed", str(seed))
    args[args.index("--data") + 1] = str(data)
    train_steerlm.main(args)
    model, processor = load_model(out / "model"), demo_processor()
    heldout = read_jsonl(world["heldout"])
    images = [world["images"] / r["image"] for r in heldout]
    lengths = {}
    for name in ("concise and correct", "verbose and correct"):  # verbosity 2 and 4 (and what goes with them)
        questions = [steer_prompt(r["prompt"], STEER_CONDITIONS[name]) for r in heldout]
        answers = greedy_answers(model, processor, questions, images)
        lengths[name] = sum(len(processor.decode(a).split()) for a in answers) / len(answers)
    return lengths


def test_steering_follows_the_verbosity_asked_for(tiny_world, tmp_path):
    """A tiny model trained briefly on rated answers writes long answers when asked for verbosity 4
    and short ones when asked for 2. The bar (a gap of 5 words) sits below the smallest gap measured
    over training seeds 0-4 at 2 threads and at 1 (`python tests/threshold_margins.py`; README, Tests)."""
    lengths = verbosity_lengths(tiny_world, tmp_path / "steer")
    assert lengths["verbose and correct"] > lengths["concise and correct"] + 5, lengths


def test_generation_command_takes_steer_ratings(tiny_world, capsys):
    from importlib import import_module

    ask = import_module("tinyalign.evaluation.ask")  # `python -m tinyalign.evaluation.ask`
    image = next(tiny_world["images"].glob("images/*.png"))
    common = ["--model", str(tiny_world["checkpoint"]), "--image", str(image), "--prompt", "What color are the shapes ?",
              "--max-new-tokens", "4", "--device", "cpu"]
    answer = ask.main(common + ["--steer", "helpfulness:4,correctness:4,coherence:4,complexity:1,verbosity:2"])
    assert capsys.readouterr().out.strip() == answer.strip()
    with pytest.raises(ValueError, match="verbosity must be an integer 0-4, got 7"):
        ask.main(common + ["--steer", "helpfulness:4,correctness:4,coherence:4,complexity:1,verbosity:7"])
