"""The ablations (`python -m tinyalign.lab.ablations NAME`) end to end at toy scale: the tiny world stands
in for the demo's, a two-step recipe for the demo's three epochs."""

import json
import shutil

import pytest

import train_dpo
from tinyalign.data import Pair, file_digest, load_pairs, read_jsonl
from tinyalign.demo import world
from tinyalign.demo.runs import DEMO_DATA, DEMO_SFT
from tinyalign.lab import ablations

TINY_RECIPE = ["--max-steps", "2", "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3", "--projector-lr", "1e-3",
               "--lora-r", "4", "--lora-alpha", "8", "--max-length", "256", "--no-packing", "--eval-every", "0",
               "--save-every", "0"]


@pytest.fixture
def demo_folders(tiny_world, tmp_path, monkeypatch):
    """The tiny world where the demo keeps its files: runs/demo-data and runs/demo-sft/model."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_world["root"] / "data", DEMO_DATA)
    shutil.copytree(tiny_world["checkpoint"], DEMO_SFT / "model")
    # Rated samples with a spread (a random model's own samples all rate alike: no pairs), marked as
    # this model's, so the demo's setup takes them as they are.
    prompts = read_jsonl(DEMO_DATA / "prompts.jsonl")
    rated = "".join(json.dumps(r) + "\n" for r in world.rated_styles(prompts))
    digest = file_digest(DEMO_SFT / "model" / "model.safetensors")
    for name in ("samples.jsonl", "samples_heldout.jsonl"):
        (DEMO_SFT / name).write_text(rated)
        (DEMO_SFT / f"{name}.model").write_text(digest + "\n")
    for other in ("transfer/other-samples.jsonl", "irrelevant-image/text-samples.jsonl"):  # their start models'
        (tmp_path / "runs/ablations" / other).parent.mkdir(parents=True)
        (tmp_path / "runs/ablations" / other).write_text(rated)
    monkeypatch.setattr(ablations, "RECIPE", TINY_RECIPE)
    label, (what, arms) = "margin-tokens", ablations.ABLATIONS["margin-tokens"]  # a snapshot at step 1 of the 2
    monkeypatch.setitem(ablations.ABLATIONS, label, (what, [
        (arm, transform, [("1" if i and extra[i - 1] == "--snapshot-every" else x) for i, x in enumerate(extra)])
        for arm, transform, extra in arms]))
    return tmp_path


def test_transforms_flip_and_subset_exact_shares():
    pairs = [Pair(f"p{i}", [], "q", f"good {i}", f"bad {i}") for i in range(20)]
    flipped = ablations.transformed(pairs, ("flip", 0.25), seed=3)
    swapped = [p for p in flipped if p.chosen.startswith("bad")]
    assert len(swapped) == 5 and all(p.rejected.startswith("good") for p in swapped)
    half, whole = ablations.transformed(pairs, ("subset", 0.5), 3), ablations.transformed(pairs, ("subset", 1.0), 3)
    quarter = ablations.transformed(pairs, ("subset", 0.25), 3)
    assert (len(quarter), len(half), len(whole)) == (5, 10, 20)
    assert {p.id for p in quarter} <= {p.id for p in half}  # a larger share holds every pair of a smaller one


@pytest.mark.parametrize("name", list(ablations.ABLATIONS))
def test_each_ablation_runs_end_to_end(demo_folders, name):
    text = ablations.main([name, "--out", "runs/ablations"])
    results = json.loads((demo_folders / "runs/ablations" / name / "results.json").read_text())
    arms = [label for label, _, _ in ablations.ABLATIONS[name][1]]
    assert list(results) == arms and all(f"| {label} |" in text for label in arms)
    total = len(load_pairs(DEMO_SFT / "samples.jsonl")[0])
    for label, runs in results.items():
        assert 0 <= runs[0]["reward accuracy"] <= 1 and 0 <= runs[0]["exact answer"] <= 1
        assert len(runs[0]["curve"]) == 2  # one point per training step
        if name == "data-scaling":
            assert runs[0]["pairs"] == round(int(label.split("%")[0]) / 100 * total)
        else:
            assert runs[0]["pairs"] == total
    if name == "margin-tokens":  # the token parts add up to what training logged for the same held-out pairs
        for runs in results.values():
            row = runs[0]
            assert [point["step"] for point in row["token curve"]] == [1, "end"]
            for side in ("chosen", "rejected"):
                parts = row[f"{side}: shared tokens, end"] + row[f"{side}: differing tokens, end"]
                assert parts == pytest.approx(row[f"rewards/{side}"], abs=1e-5)
    # The figure command draws from these files, and names what is missing instead of drawing it.
    from tinyalign.lab import figures

    done = figures.draw_all(demo_folders / "runs", demo_folders / "figures")
    assert done[name] == demo_folders / "figures" / f"ablation-{name}.png"
    assert done[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done["study"].startswith("skipped: no ") and "python -m tinyalign.lab.study" in done["study"]


def test_unconditional_preference_on_a_trained_policy(demo_folders):
    samples, start = DEMO_SFT / "samples.jsonl", DEMO_SFT / "model"
    # The start against itself: every margin is exactly 0, with any image.
    same = ablations.unconditional(start, start, samples, DEMO_DATA)
    assert same["mean margin, true image"] == 0 and same["told apart without the image"] == 0
    final = train_dpo.main(["--model", str(start), "--data", str(samples), "--eval-data", str(samples),
                            "--image-folder", str(DEMO_DATA), "--out", "runs/dpo", "--cache-dir", "cache",
                            *TINY_RECIPE])
    result = ablations.unconditional(demo_folders / "runs/dpo/model", start, samples, DEMO_DATA)
    # With the true image the measure is DPO's own held-out reward accuracy (the margin's sign does
    # not depend on beta); batches padded differently may move a margin that sits at 0 by rounding.
    assert result["reward accuracy, true image"] == pytest.approx(final["rewards/accuracy"], abs=2 / result["pairs"])
    assert 0 <= result["told apart without the image"] <= 1
    assert result["told apart without the image"] == sum(m > 0 for m in result["margins"]["swapped image"]) / result["pairs"]
    # The command: its table, its JSON and the figure of the margins (python -m tinyalign.lab.figures draws it too)
    text = ablations.main(["unconditional", "--dpo", "runs/dpo/model", "--out", "runs/ablations"])
    assert f"| told apart without the image | {result['told apart without the image']:.3f} |" in text
    assert "margins" not in text
    from tinyalign.lab import figures

    done = figures.draw_all(demo_folders / "runs", demo_folders / "figures")
    assert done["unconditional"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_irrelevant_image_teaches_the_sums_then_asks_them_with_and_without_a_picture(demo_folders, monkeypatch):
    import train_sft

    monkeypatch.setattr(ablations, "TEXT_CONVERSATIONS", 24)
    monkeypatch.setitem(train_sft.DEMO, "epochs", 1)  # the start model's SFT, shortened
    text = ablations.main(["irrelevant-image", "--out", "runs/ablations"])
    folder = demo_folders / "runs/ablations/irrelevant-image"
    # The start model's SFT data: the world's conversations and text-only sums, without an image.
    sft = json.loads((folder / "sft-with-sums.json").read_text())
    sums = [r for r in sft if r["id"].startswith("text-")]
    assert len(sums) == 24 and all("image" not in r and "<image>" not in r["conversations"][0]["value"] for r in sums)
    assert len(sft) - 24 == len(json.loads((DEMO_DATA / "sft.json").read_text()))
    # Its vocabulary has the sums' words (no <unk> in them), the demo's does not.
    processor = world.demo_processor(extra_texts=ablations.SUM_TEXTS)
    question, answer = ablations.SUMS[-1]
    assert (question, answer) == ("What is four plus four ?", "It is eight .")
    assert processor.decode(processor.tokenize(answer)) == answer and "plus" not in world.demo_vocabulary()
    results = json.loads((folder / "results.json").read_text())
    assert list(results) == [ablations.TEXT_START, "DPO + NLL", "DPO", ablations.WITH_SUMS]
    # the added pairs: a sum asked with a picture, the sum chosen, the picture's answer rejected
    added = [json.loads(line) for line in (folder / "pairs-with-sums.jsonl").read_text().splitlines()]
    added = [r for r in added if r["id"].startswith("sum-picture-")]
    n_pairs = results["DPO"][0]["pairs"]
    assert len(added) == n_pairs // 10 == results[ablations.WITH_SUMS][0]["pairs"] - n_pairs
    for r in added:
        assert r["prompt"].startswith("<image>\nWhat is ") and r["chosen"].startswith("It is ") and r["image"]
        assert ablations.answers_the_picture(r["rejected"])
    for label, runs in results.items():
        row = runs[0]
        assert f"| {label} |" in text
        assert row["sums, no image"] * 16 == round(row["sums, no image"] * 16)  # of 16 sums
        assert row["sums, irrelevant image"] * 160 == pytest.approx(round(row["sums, irrelevant image"] * 160))
        assert 0 <= row["answers the picture instead"] <= 1 and 0 <= row["exact answer"] <= 1
    assert "reward accuracy" not in results[ablations.TEXT_START][0] and "| - |" in text
    from tinyalign.lab import figures

    done = figures.draw_all(demo_folders / "runs", demo_folders / "figures")
    assert done["irrelevant-image"] == demo_folders / "figures" / "ablation-irrelevant-image.png"


def test_an_answer_about_the_picture_is_told_from_a_sum():
    assert ablations.answers_the_picture("There are two shapes .") and ablations.answers_the_picture("The color is red .")
    assert not ablations.answers_the_picture("It is two .") and not ablations.answers_the_picture("There are")
