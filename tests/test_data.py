"""Data formats (fixtures in the paper's exact field layout), the pair rule, rejection sampling, bad records."""

import json

import pytest
from conftest import IMAGES

from tinyalign import IGNORE_INDEX
from tinyalign.data import (DataError, Scored, build_pairs, pair_examples, read_conversations, read_pairs,
                            read_scored, select_best, sft_examples)
from tinyalign.demo.world import demo_processor


def write(path, records, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return path


# LLaVA's conversation JSON, as in the paper's standard_sft.json / rejection_sampling.json
CONVERSATIONS = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "text-only-7", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    {"id": "broken", "image": "x.jpg", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": " "}]},
]

# The paper's released DPO file (alexshengzhili/mllm-dpo), field names as the authors' loader reads them
PAPER_DPO = [
    {"image": "scigraphqa/2003.00001v1-Figure1-1.png",
     "question": {"from": "human", "value": "<image>\nWhat is the main trend shown in the graph?"},
     "chosen": {"from": "gpt", "value": "The graph shows accuracy rising with model size."},
     "rejected": {"from": "gpt", "value": "The graph shows a cat."},
     "ref_win_logp": -35.25, "ref_rej_logp": -20.5, "ref_win_avg_logp": -1.1, "ref_rej_avg_logp": -2.9,
     "ref_win_per_token_logp": [-1.0, -2.0], "ref_rej_per_token_logp": [-3.0],
     "Helpfulness_gpt4v": 4, "Correctness_gpt4v": 4, "Coherence_gpt4v": 4, "Complexity_gpt4v": 2,
     "Verbosity_gpt4v": 2, "Helpfulness_candidate": 1, "Correctness_candidate": 0, "unknown_extra_field": "ignored"},
    {"image": "lrv/2.jpg", "question": {"from": "human", "value": "<image>\nIs there a dog?"},
     "chosen": {"from": "gpt", "value": "No."}, "rejected": {"from": "gpt", "value": "No."}},
    {"image": "lrv/3.jpg", "question": {"from": "human", "value": "<image>\n"},
     "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}},
    {"image": "lrv/4.jpg", "question": {"from": "human", "value": "<image>\nWhat?"},
     "chosen": {"from": "gpt", "value": ""}, "rejected": {"from": "gpt", "value": "B"}},
]


def test_conversations_multi_turn_and_text_only(tmp_path):
    records, report = read_conversations(write(tmp_path / "sft.json", CONVERSATIONS))
    assert [r.id for r in records] == ["000000033471", "text-only-7"]
    assert records[0].images == ["coco/train2017/000000033471.jpg"] and records[1].images == []
    assert len(records[0].turns) == 4
    assert report.dropped == {"empty answer": 1} and "broken" in report.summary()


def test_paper_dpo_file(tmp_path):
    pairs, report = read_pairs(write(tmp_path / "dpo.json", PAPER_DPO))
    assert len(pairs) == 1
    p = pairs[0]
    assert p.prompt.startswith("<image>\nWhat is the main trend") and p.images == ["scigraphqa/2003.00001v1-Figure1-1.png"]
    assert (p.chosen, p.rejected) == ("The graph shows accuracy rising with model size.", "The graph shows a cat.")
    assert (p.ref_chosen, p.ref_rejected) == (-35.25, -20.5)
    assert report.dropped == {"chosen == rejected": 1, "no prompt": 1, "empty answer": 1}


def test_averaged_reference_logps_never_mix_with_sums(tmp_path):
    """--average-logps takes the file's ref_*_avg_logp, as the authors' trainer does when it averages
    (findalexli/mllm-dpo llava/train/llava_trainer.py:393-395); a file without them gives None (the
    reference is then computed), never the sums."""
    path = write(tmp_path / "dpo.json", PAPER_DPO[:1])
    (p,), _ = read_pairs(path, average=True)
    assert (p.ref_chosen, p.ref_rejected) == (-1.1, -2.9)
    sums_only = {k: v for k, v in PAPER_DPO[0].items() if "avg" not in k}
    (p,), _ = read_pairs(write(tmp_path / "sums.json", [sums_only]), average=True)
    assert (p.ref_chosen, p.ref_rejected) == (None, None)


def test_plain_pairs_jsonl(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [
        {"image": "a.png", "prompt": "What color?", "chosen": "Red.", "rejected": "Blue."},
        {"prompt": "Text only question", "chosen": "Yes.", "rejected": "No.", "ref_chosen_logp": -1.0,
         "ref_rejected_logp": -2.0}], jsonl=True)
    pairs, _ = read_pairs(path)
    assert pairs[0].prompt == "<image>\nWhat color?" and pairs[0].ref_chosen is None
    assert pairs[1].prompt == "Text only question" and pairs[1].images == [] and pairs[1].ref_rejected == -2.0


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        read_pairs(path)


def scores(h, c, coh, cx=1, v=1):
    return {"helpfulness": h, "correctness": c, "coherence": coh, "complexity": cx, "verbosity": v}


def test_build_pairs_follows_the_paper_rule():
    s = [
        Scored("spread", [], "q", [("best", scores(4, 4, 4)), ("close", scores(4, 3, 4)),
                                    ("low", scores(2, 2, 2)), ("lower", scores(0, 1, 1))]),
        Scored("flat", [], "q", [("a", scores(3, 3, 3)), ("b", scores(3, 3, 2)), ("c", scores(2, 3, 3))]),
        Scored("tie", [], "q", [("first", scores(4, 4, 4)), ("second", scores(4, 4, 4)), ("bad", scores(1, 1, 1))]),
    ]
    pairs, report = build_pairs(s, seed=0)
    assert [p.id for p in pairs] == ["spread", "tie"]
    assert report.dropped == {"answers spread by less than 2": 1}
    assert pairs[0].chosen == "best" and pairs[1].chosen == "first"
    rejected = {build_pairs(s[:1], seed=seed)[0][0].rejected for seed in range(40)}
    assert rejected == {"low", "lower"}  # drawn among those at least 2 below; "close" (11 vs 12) never


def test_select_best_breaks_ties_deterministically():
    s = [Scored("a", ["img.png"], "<image>\nq", [("short", scores(4, 4, 4, 1, 1)), ("rich", scores(4, 4, 4, 3, 2)),
                                                  ("bad", scores(0, 0, 0))]),
         Scored("b", [], "q", [("x", scores(2, 2, 2)), ("y", scores(2, 2, 2))])]
    best, report = select_best(s)
    assert report.kept == 2 and not report.dropped
    assert best[0].turns == [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "rich"}]
    assert best[0].images == ["img.png"] and best[1].turns[1]["value"] == "x"  # full tie: the earlier answer


def test_select_best_counts_a_prompt_whose_answers_are_all_empty():
    s = [Scored("a", [], "q", [(" ", scores(4, 4, 4)), ("", scores(1, 1, 1))]), Scored("b", [], "q", [("x", scores(2, 2, 2))])]
    best, report = select_best(s)
    assert [c.id for c in best] == ["b"] and report.dropped == {"every answer empty": 1}


def test_scored_file_with_bad_ratings_is_named(tmp_path):
    path = write(tmp_path / "scored.jsonl", [{"id": "p1", "prompt": "q", "responses": [
        {"text": "a", "scores": scores(4, 4, 4)}, {"text": "b", "scores": {**scores(4, 4, 4), "correctness": 7}}]}],
        jsonl=True)
    with pytest.raises(DataError, match=r"scored.jsonl record 0 \(id p1\): response 1: correctness must be a number 0-4"):
        read_scored(path)


def test_sft_examples_labels_only_answers(tmp_path):
    proc = demo_processor()
    records, _ = read_conversations(write(tmp_path / "c.json", [{"id": "t", "conversations": [
        {"from": "human", "value": "What color are the shapes ?"}, {"from": "gpt", "value": "The color is red ."},
        {"from": "human", "value": "How many shapes are there ?"}, {"from": "gpt", "value": "There are two shapes ."}]}]))
    (example,), _ = sft_examples(records, proc)
    supervised = [i for i, label in zip(example.encoded.input_ids, example.encoded.labels) if label != IGNORE_INDEX]
    answers = proc.tokenize("The color is red .") + [2] + proc.tokenize("There are two shapes .") + [2]
    assert supervised == answers


def test_missing_and_corrupt_images_name_the_record(tmp_path):
    proc = demo_processor()
    (tmp_path / "broken.png").write_text("not a png")
    (tmp_path / "ok.png").write_bytes((IMAGES / "chelsea.png").read_bytes())
    records = [{"id": "r1", "image": "missing.png", "prompt": "q", "chosen": "a", "rejected": "b"},
               {"id": "r2", "image": "broken.png", "prompt": "q", "chosen": "a", "rejected": "b"},
               {"id": "r3", "image": "ok.png", "prompt": "q", "chosen": "a", "rejected": "b"}]
    pairs, _ = read_pairs(write(tmp_path / "pairs.json", records))
    with pytest.raises(DataError, match=rf"record r1: image {tmp_path}/missing.png not found .*--skip-bad"):
        pair_examples(pairs, proc, image_folder=tmp_path)
    examples, report = pair_examples(pairs, proc, image_folder=tmp_path, skip_bad=True)
    assert [e.id for e in examples] == ["r3"]
    assert report.dropped == {"missing or unreadable image": 2}
    assert "broken.png is not readable" in report.summary() or "missing.png not found" in report.summary()


def test_too_long_sequences_are_dropped_and_counted(tmp_path):
    proc = demo_processor()
    records = [{"prompt": "q " * 5, "chosen": "yes", "rejected": "no"},
               {"prompt": "q " * 200, "chosen": "yes", "rejected": "no"}]
    pairs, _ = read_pairs(write(tmp_path / "p.json", records))
    examples, report = pair_examples(pairs, proc, max_length=100)
    assert len(examples) == 1 and report.dropped == {"longer than --max-length 100": 1}


def test_corrupt_image_is_a_small_crop_drawn_from_the_pair_id():
    """mDPO's corrupted image: at most 20% of the picture, the same crop for the same pair every time
    (the reference pass and every epoch see one image), another for another pair."""
    from tinyalign.batches import corrupt_image
    from tinyalign.images import load_image

    photo = IMAGES / "chelsea.png"
    whole = load_image(photo)
    for key in ("p1", "p2", "p3"):
        crop = corrupt_image(photo, key)
        assert crop.width * crop.height <= 0.2 * whole.width * whole.height
        assert list(crop.getdata()) == list(corrupt_image(photo, key).getdata())
    assert corrupt_image(photo, "p1").size != corrupt_image(photo, "p2").size or \
        list(corrupt_image(photo, "p1").getdata()) != list(corrupt_image(photo, "p2").getdata())
