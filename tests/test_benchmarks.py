"""Benchmark scoring against values worked out by hand, and answer extraction on tricky answers."""

import base64
import io
import json
import math

import pytest
from PIL import Image

from tinyalign import benchmarks as bench
from tinyalign.evaluation import bootstrap_ci, f1_of, relative_of


# ---- POPE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("No", "no"), ("no", "no"),
    ("No, there is not a dog in the image.", "no"),
    ("There is not a dog.", "no"),
    ("Yes, there is a dog. No other animals are visible.", "yes"),  # only the first sentence counts
    ("Yes, but not clearly.", "no"),  # "not" in the first sentence: the scripts' rule says no
    ("NO.", "no"), ("A dog is there", "yes"),
])
def test_pope_yes_no_extraction(answer, expected):
    assert bench.yes_or_no(answer) == expected


def test_pope_metrics_by_hand():
    predictions = ["yes", "yes", "no", "no", "yes", "no", "yes", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no", "yes", "yes"]
    # TP 3 (0,4,6), FP 1 (1), FN 2 (2,7), TN 2 (3,5)
    m = bench.pope_metrics(predictions, labels)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(4 / 8)
    assert bench.pope_metrics(["no", "no"], ["yes", "no"])["f1"] == 0.0  # no positive prediction: 0, no crash


def test_pope_reader_names_a_bad_label(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}) + "\n"
                    + json.dumps({"question_id": 2, "image": "b.jpg", "text": "Is there a dog?", "label": "maybe"}) + "\n")
    with pytest.raises(bench.BenchmarkError, match=r"coco_pope_random.json record 2 \(question 2\).*maybe"):
        bench.read_pope(path)
    path.write_text('{"question_id": 1, "image": "a.jpg"\n')
    with pytest.raises(bench.BenchmarkError, match="line 1: not valid JSON"):
        bench.read_pope(path)


# ---- MMBench ------------------------------------------------------------------------------------

OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), (" c ", "C") if False else ("C", "C"),
    ("The answer is (B).", "B"), ("The answer is B, a dog.", "B"), ("Answer: D", "D"),
    ("B. a dog", "B"), ("It is a bird.", "C"),
    ("It could be a cat or a dog.", None),  # two options named: no answer
    ("The answer is A or option B.", None),  # two letters stated: no answer
    ("I cannot tell.", None),
    ("A dog is in the picture.", "B"),  # the article "A" is not the letter A
])
def test_mmbench_option_extraction(answer, expected):
    assert bench.extract_option(answer, OPTIONS) == expected


def test_mmbench_letter_beyond_the_options_is_not_an_answer():
    assert bench.extract_option("D", ["yes", "no", "maybe"]) is None
    assert bench.extract_option("C", ["yes", "no", "maybe"]) == "C"


def test_rotation_moves_the_right_answer():
    assert bench.rotate(OPTIONS, "B", 0) == (OPTIONS, "B")
    assert bench.rotate(OPTIONS, "B", 1) == (["a dog", "a bird", "a fish", "a cat"], "A")
    assert bench.rotate(OPTIONS, "B", 2) == (["a bird", "a fish", "a cat", "a dog"], "D")
    assert bench.rotate(OPTIONS, None, 3)[1] is None


def test_circular_scoring_by_hand():
    questions = [{"index": "1", "options": OPTIONS, "answer": "B", "category": "x"},
                 {"index": "2", "options": ["yes", "no"], "answer": "A", "category": "y"}]
    # Question 1: right in every rotation (B, A, D, C). Question 2: right unrotated (A), wrong rotated.
    predictions = {("1", 0): "B", ("1", 1): "A", ("1", 2): "D", ("1", 3): "C", ("2", 0): "A", ("2", 1): "A"}
    s = bench.mmbench_scores(questions, predictions)
    assert s["circular_accuracy"] == 0.5 and s["single_accuracy"] == 1.0
    assert s["by_category"] == {"x": 1.0, "y": 0.0}
    predictions[("1", 2)] = None  # one unanswered rotation fails the whole question
    assert bench.mmbench_scores(questions, predictions)["circular_accuracy"] == 0.0


def mmbench_tsv(path, rows):
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    encoded = base64.b64encode(image.getvalue()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = ["\t".join(header)] + ["\t".join(list(r) + [encoded]) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_mmbench_reader(tmp_path):
    path = tmp_path / "mmbench_dev.tsv"
    mmbench_tsv(path, [("0", "What is it?", "nan", "cat", "dog", "", "", "B", "animals"),
                       ("1", "Which colour?", "Look closely.", "red", "green", "blue", "yellow", "A", "colour")])
    q = bench.read_mmbench(path)
    assert q[0]["options"] == ["cat", "dog"] and q[0]["hint"] == "" and q[0]["answer"] == "B"
    assert q[1]["options"] == ["red", "green", "blue", "yellow"] and q[1]["hint"] == "Look closely."
    assert Image.open(io.BytesIO(q[1]["image"])).size == (8, 8)
    assert bench.mmbench_prompt(q[1], q[1]["options"]) == (
        "<image>\nLook closely.\nWhich colour?\nA. red\nB. green\nC. blue\nD. yellow\n" + bench.MMBENCH_SUFFIX)
    mmbench_tsv(path, [("7", "What is it?", "", "cat", "dog", "", "", "C", "animals")])
    with pytest.raises(bench.BenchmarkError, match=r"line 2 \(index 7\): answer 'C'"):
        bench.read_mmbench(path)


# ---- judged benchmarks --------------------------------------------------------------------------

def test_judge_reply_parsers():
    assert bench.parse_unit_score("The unit is missing.\n0.5") == 0.5
    assert bench.parse_unit_score("Correct.\nScore: 1.0") == 1.0
    with pytest.raises(ValueError):
        bench.parse_unit_score("I think 0.5 fits.\nThis answer is good")
    with pytest.raises(ValueError):
        bench.parse_unit_score("7")
    assert bench.parse_pair_scores("8 6\nAssistant 1 is more detailed.") == (8.0, 6.0)
    with pytest.raises(ValueError):
        bench.parse_pair_scores("Assistant 1 gets 8.\n6")
    assert bench.parse_rating("Solid answer. Rating: [[7]]") == 7.0
    assert bench.parse_rating("Rating: [8.5]") == 8.5
    with pytest.raises(ValueError):
        bench.parse_rating("Rating: 7/10")
    with pytest.raises(ValueError):
        bench.parse_rating("Rating: [[11]]")
    assert bench.parse_preference("Output (b) is clearer.\nb") == "b"
    assert bench.parse_preference("Reasoning...\nOutput (a)") == "a"
    with pytest.raises(ValueError):
        bench.parse_preference("Both are fine: a and b")


def test_mmvet_scores_by_hand():
    questions = {"v1_0": {"capability": ["ocr", "math"]}, "v1_1": {"capability": ["ocr"]},
                 "v1_2": {"capability": ["rec"]}}
    s = bench.mmvet_scores(questions, {"v1_0": 1.0, "v1_1": 0.5, "v1_2": 0.0})
    assert s["total"] == pytest.approx(50.0)
    assert s["by_capability"] == pytest.approx({"math": 100.0, "ocr": 75.0, "rec": 0.0})


def test_relative_scores_by_hand():
    reviews = [{"category": "conv", "reference": 8, "model": 6}, {"category": "conv", "reference": 8, "model": 8},
               {"category": "detail", "reference": 5, "model": 6}]
    s = bench.relative_scores(reviews)
    assert s["by_category"] == pytest.approx({"conv": 87.5, "detail": 120.0})
    assert s["overall"] == pytest.approx(100 * 20 / 21)


def test_mtbench_averages_by_hand():
    ratings = [{"question_id": 81, "turn": 1, "category": "writing", "rating": 8},
               {"question_id": 81, "turn": 2, "category": "writing", "rating": 6},
               {"question_id": 111, "turn": 1, "category": "math", "rating": 3},
               {"question_id": 111, "turn": 2, "category": "math", "rating": 2},
               {"question_id": 112, "turn": 1, "category": "math", "rating": 10}]
    s = bench.mtbench_scores(ratings)
    assert s["turn_1"] == pytest.approx(7.0) and s["turn_2"] == pytest.approx(4.0)
    assert s["overall"] == pytest.approx(29 / 5)
    assert s["by_category"] == pytest.approx({"math": 5.0, "writing": 7.0})


def test_win_rate_by_hand():
    assert bench.win_rate([1, 0, 1, 0.5]) == pytest.approx(62.5)


def test_bootstrap_intervals_contain_the_estimate_and_are_reproducible():
    samples = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 5
    low, high = bootstrap_ci(samples, lambda v: sum(v) / len(v), 500)
    assert low < 0.7 < high and 0.5 < low and high < 0.9
    assert (low, high) == bootstrap_ci(samples, lambda v: sum(v) / len(v), 500)
    pairs = [("yes", "yes"), ("no", "no"), ("yes", "no"), ("no", "yes")] * 10
    low, high = bootstrap_ci(pairs, f1_of, 300)
    assert low < f1_of(pairs) < high
    assert math.isnan(bootstrap_ci([1], sum)[0])
    assert relative_of([(8, 6), (8, 8), (5, 6)]) == pytest.approx(100 * 20 / 21)
