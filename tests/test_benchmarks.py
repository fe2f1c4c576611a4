"""Benchmark scoring against values worked out by hand, and answer extraction on tricky answers."""

import base64
import io
import json
import math

import pytest
from PIL import Image

from tinyalign.evaluation import benchmark_files, benchmarks
from tinyalign.evaluation.report import bootstrap_ci, f1_of, relative_of


# ---- POPE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("No", "no"), ("no", "no"),
    ("No, there is not a dog in the image.", "no"),  # comma removed: "No" is a word
    ("There is not a dog.", "no"),
    ("Yes, there is a dog. No other animals are visible.", "yes"),  # only the first sentence counts
    ("Yes, but not clearly.", "no"),  # "not" in the first sentence
    # Exact words only, case and punctuation included: all of these are "yes" to the official rule.
    ("No!", "yes"), ("NO", "yes"), ("Not at all.", "yes"), ("(no)", "yes"), ("No;", "yes"),
    ("NO.", "yes"), ("no\nthere is none", "yes"), ("A dog is there", "yes"),
    ("There's no dog", "no"), ("no. Not sure.", "no"),
])
def test_pope_yes_no_is_the_official_rule(answer, expected):
    """LLaVA's llava/eval/eval_pope.py lines 11-20 (c121f04) and POPE's evaluate.py lines 12-21
    (AoiDragon/POPE f3ec604): text before the first ".", commas removed, split on " ", "no" iff a word
    is exactly "No", "not" or "no"."""
    assert benchmarks.yes_or_no(answer) == expected


def test_pope_accuracy_on_answers_the_old_rule_got_wrong():
    """26 answers, 13 of them truly "no" but written so the official rule reads them as "yes".
    Worked by hand with the rule: 12 of 26 right."""
    answers = ["No!", "NO", "Not at all.", "(no)", "No;", "NO.", "Nope", "No:", "No?", "NOT", "Not really",
               "no!", "(No)"] + ["Yes"] * 8 + ["No"] * 4 + ["Yes."]
    labels = ["no"] * 13 + ["yes"] * 8 + ["no"] * 4 + ["no"]
    predictions = [benchmarks.yes_or_no(a) for a in answers]
    assert predictions[:13] == ["yes"] * 13 and predictions[-5:] == ["no"] * 4 + ["yes"]
    assert benchmarks.pope_metrics(predictions, labels)["accuracy"] == pytest.approx(12 / 26)


def test_pope_metrics_by_hand():
    predictions = ["yes", "yes", "no", "no", "yes", "no", "yes", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no", "yes", "yes"]
    # TP 3 (0,4,6), FP 1 (1), FN 2 (2,7), TN 2 (3,5)
    m = benchmarks.pope_metrics(predictions, labels)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(4 / 8)
    assert benchmarks.pope_metrics(["no", "no"], ["yes", "no"])["f1"] == 0.0  # no positive prediction: 0, no crash


def test_pope_reader_names_a_bad_label(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}) + "\n"
                    + json.dumps({"question_id": 2, "image": "b.jpg", "text": "Is there a dog?", "label": "maybe"}) + "\n")
    with pytest.raises(benchmark_files.BenchmarkError, match=r"coco_pope_random.json line 2 \(question 2\).*maybe"):
        benchmark_files.read_pope(path)
    path.write_text('{"question_id": 1, "image": "a.jpg"\n')
    with pytest.raises(benchmark_files.BenchmarkError, match="line 1: not valid JSON"):
        benchmark_files.read_pope(path)


def test_llava_pope_question_file_takes_labels_by_position(tmp_path):
    """LLaVA's llava/eval/eval_pope.py lines 74-80: the answers of category c, in file order, are
    scored against coco_pope_c.json's labels in file order."""
    for split, labels in [("random", ["yes", "no"]), ("popular", ["no"])]:
        (tmp_path / f"coco_pope_{split}.json").write_text("".join(json.dumps(
            {"question_id": i + 1, "image": "x.jpg", "text": "?", "label": lab}) + "\n" for i, lab in enumerate(labels)))
    suffix = benchmarks.POPE_SUFFIX
    questions = [{"question_id": 10, "image": "a.jpg", "text": "Is there a cat?" + suffix, "category": "random"},
                 {"question_id": 11, "image": "b.jpg", "text": "Is there a dog?" + suffix, "category": "popular"},
                 {"question_id": 12, "image": "c.jpg", "text": "Is there a cow?" + suffix, "category": "random"}]
    path = tmp_path / "llava_pope_test.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    splits = benchmark_files.read_llava_pope(path, tmp_path)
    assert [(q["question_id"], q["label"]) for q in splits["random"]] == [(10, "yes"), (12, "no")]
    assert [(q["question_id"], q["label"]) for q in splits["popular"]] == [(11, "no")]
    path.write_text("".join(json.dumps(q) + "\n" for q in questions[:2]))
    with pytest.raises(benchmark_files.BenchmarkError, match=r"1 questions of category 'random' but 2 labels"):
        benchmark_files.read_llava_pope(path, tmp_path)


# ---- MMBench ------------------------------------------------------------------------------------

OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("C", "C"), ("I think B", "B"), ("B is correct", "B"),
    ("The answer is (B).", "B"), ("Answer: D", "D"), ("B. a dog", "B"),
    ("It is a bird.", "C"),  # no letter: the one option whose text is in the answer
    ("A dog is in the picture.", "B"),  # "A" too far from the end to be the letter; the text names a dog
    ("It could be a cat or a dog.", None),  # two options' texts: no verdict
    ("The answer is A or option B.", "A"),  # two letters, but "answer is A" states one
    ("I cannot tell.", None),
    ("Cannot determine the answer", "Z"),  # a refusal: an answer, and a wrong one
    ("B is the right choice because the animal has four legs, fur and a loud bark.", None),  # letter too early, too long
    ("the correct answer is **c**", "C"),
])
def test_mmbench_option_extraction_is_vlmevalkits_exact_matching(answer, expected):
    """VLMEvalKit vlmeval/utils/matching_util.py at e8e78f0: `can_infer_option` (lines 18-61: the one
    option letter among the last four words of the answer with .()[],:;!*#{} made spaces; "Z" for a
    refusal; else "answer is X"), then `can_infer_text` (lines 107-121: the one option whose text the
    answer contains, if the answer is at most twice as long as all options)."""
    assert benchmarks.extract_option(answer, OPTIONS) == expected


def test_mmbench_letter_beyond_the_options_is_not_an_answer():
    assert benchmarks.extract_option("D", ["yes", "no", "maybe"]) is None
    assert benchmarks.extract_option("C", ["yes", "no", "maybe"]) == "C"


def circular_rows(question_answers):
    """Rows of an MMBench file in the released layout: question g's rotations are rows g, g + 1e6, ..."""
    rows = []
    for g, (category, answers) in enumerate(question_answers):
        for k, answer in enumerate(answers):
            rows.append({"index": g + k * 1_000_000, "options": OPTIONS, "answer": answer, "category": category,
                         "l2_category": "perception"})
    return rows


def test_circular_groups_by_index_modulo_a_million():
    """VLMEvalKit vlmeval/dataset/utils/multiple_choice.py `mcq_circular_eval` (lines 511-536): rows
    grouped by index % 1e6; in exact matching a group is right only if every row's extracted option
    is its answer. 5 questions in 15 rows, 13 rows right, one question with a wrong row: 80.00% (a
    row-by-row score would say 86.67%)."""
    rows = circular_rows([("x", "BADC"), ("x", "CD"), ("y", "ABC"), ("y", "DCBA"), ("y", "AB")])
    predictions = {r["index"]: r["answer"] for r in rows}
    predictions[2_000_003] = "C"  # question 3, third rotation: wrong
    predictions[1_000_003] = None  # ... and its second rotation had no readable option: still one group
    s = benchmarks.mmbench_scores(rows, predictions)
    assert len(rows) == 15 and s["accuracy"] == pytest.approx(0.8) and s["row_accuracy"] == pytest.approx(13 / 15)
    assert s["by_category"] == pytest.approx({"x": 1.0, "y": 2 / 3})
    assert s["by_l2_category"] == pytest.approx({"perception": 0.8})
    assert [q["rows"] for q in s["per_question"]] == [4, 2, 3, 4, 2]


def test_a_group_without_its_main_row_is_left_out():
    rows = circular_rows([("x", "BA")])
    rows.append({"index": 1_000_007, "options": OPTIONS, "answer": "A", "category": "x", "l2_category": None})
    s = benchmarks.mmbench_scores(rows, {r["index"]: r["answer"] for r in rows})
    assert [q["index"] for q in s["per_question"]] == [0]


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
                       ("1", "Which colour?", "Look closely.", "red", "green", "blue", "yellow", "A", "colour"),
                       ("1000001", "Which colour?", "Look closely.", "green", "blue", "yellow", "red", "D", "colour")])
    q = benchmark_files.read_mmbench(path)
    assert q[0]["options"] == ["cat", "dog"] and q[0]["hint"] == "" and q[0]["answer"] == "B" and q[0]["index"] == 0
    assert q[1]["options"] == ["red", "green", "blue", "yellow"] and q[1]["hint"] == "Look closely."
    assert q[2]["index"] == 1_000_001 and q[2]["answer"] == "D"
    assert Image.open(io.BytesIO(q[1]["image"])).size == (8, 8)
    # LLaVA's llava/eval/model_vqa_mmbench.py lines 86-99: hint, question, "A. ..." lines, the instruction.
    assert benchmarks.mmbench_prompt(q[1]) == (
        "<image>\nLook closely.\nWhich colour?\nA. red\nB. green\nC. blue\nD. yellow\n" + benchmarks.MMBENCH_SUFFIX)
    mmbench_tsv(path, [("7", "What is it?", "", "cat", "dog", "", "", "C", "animals")])
    with pytest.raises(benchmark_files.BenchmarkError, match=r"line 2 \(index 7\): answer 'C'"):
        benchmark_files.read_mmbench(path)
    mmbench_tsv(path, [("seven", "What is it?", "", "cat", "dog", "", "", "A", "animals")])
    with pytest.raises(benchmark_files.BenchmarkError, match=r"line 2: index 'seven' is not a whole number"):
        benchmark_files.read_mmbench(path)


# ---- judged benchmarks --------------------------------------------------------------------------

def test_judge_reply_parsers():
    assert benchmarks.parse_unit_score("The unit is missing.\n0.5") == 0.5
    assert benchmarks.parse_unit_score("Correct.\nScore: 1.0") == 1.0
    with pytest.raises(ValueError):
        benchmarks.parse_unit_score("I think 0.5 fits.\nThis answer is good")
    with pytest.raises(ValueError):
        benchmarks.parse_unit_score("7")
    assert benchmarks.parse_preference("Output (b) is clearer.\nb") == "b"
    assert benchmarks.parse_preference("Reasoning...\nOutput (a)") == "a"
    with pytest.raises(ValueError):
        benchmarks.parse_preference("Both are fine: a and b")


@pytest.mark.parametrize("reply, rating", [
    ("Solid answer. Rating: [[7]]", 7.0), ("Rating: [[7.]]", 7.0), ("Rating: [[0]]", 0.0),
    ("Rating: [8.5]", 8.5), ("Rating: [[3]]. Had it been shorter: [[9]]", 3.0),  # the first one
    ("[4] is a citation; Rating: [[6]]", 6.0),  # "[[n]]" first, "[n]" only as the fallback
    ("Rating: [[11]]", 11.0),  # FastChat does not check the range
    ("Rating: 7/10", -1.0), ("Rating: [[seven]]", -1.0),
])
def test_mtbench_rating_is_fastchats(reply, rating):
    """FastChat fastchat/llm_judge/common.py at 0e6d3e4: one_score_pattern "\\[\\[(\\d+\\.?\\d*)\\]\\]", then
    one_score_pattern_backup "\\[(\\d+\\.?\\d*)\\]" (lines 36-37), re.search (the first match), -1 when
    neither matches (lines 175-183)."""
    assert benchmarks.parse_rating(reply) == rating


@pytest.mark.parametrize("reply, scores", [
    ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)), ("8,6\nbecause", (8.0, 6.0)), ("7.5 9", (7.5, 9.0)),
    ("8, 6\nbecause", None), ("Assistant 1 gets 8.\n6", None), ("8 6 5", None),
])
def test_llava_bench_scores_are_llavas_parse(reply, scores):
    """LLaVA's llava/eval/eval_gpt_review_bench.py `parse_score` (lines 36-47): first line, "," -> " ",
    split(" "), exactly two numbers ("8, 6" splits into three parts: not parsed, as there)."""
    if scores is None:
        with pytest.raises(ValueError):
            benchmarks.parse_pair_scores(reply)
    else:
        assert benchmarks.parse_pair_scores(reply) == scores


def test_mmvet_scores_by_hand():
    questions = {"v1_0": {"capability": ["ocr", "math"]}, "v1_1": {"capability": ["ocr"]},
                 "v1_2": {"capability": ["rec"]}}
    s = benchmarks.mmvet_scores(questions, {"v1_0": 1.0, "v1_1": 0.5, "v1_2": 0.0})
    assert s["total"] == pytest.approx(50.0)
    assert s["by_capability"] == pytest.approx({"math": 100.0, "ocr": 75.0, "rec": 0.0})


def test_relative_scores_by_hand():
    reviews = [{"category": "conv", "reference": 8, "model": 6}, {"category": "conv", "reference": 8, "model": 8},
               {"category": "detail", "reference": 5, "model": 6}]
    s = benchmarks.relative_scores(reviews)
    assert s["by_category"] == pytest.approx({"conv": 87.5, "detail": 120.0})
    assert s["overall"] == pytest.approx(100 * 20 / 21)


def test_mtbench_averages_by_hand():
    ratings = [{"question_id": 81, "turn": 1, "category": "writing", "rating": 8},
               {"question_id": 81, "turn": 2, "category": "writing", "rating": 6},
               {"question_id": 111, "turn": 1, "category": "math", "rating": 3},
               {"question_id": 111, "turn": 2, "category": "math", "rating": 2},
               {"question_id": 112, "turn": 1, "category": "math", "rating": 10}]
    s = benchmarks.mtbench_scores(ratings + [{"question_id": 112, "turn": 2, "category": "math", "rating": -1}])
    assert s["turn_1"] == pytest.approx(7.0) and s["turn_2"] == pytest.approx(4.0)
    assert s["overall"] == pytest.approx(29 / 5)  # the unrated judgment (-1) left out, as show_result.py does
    assert s["by_category"] == pytest.approx({"math": 5.0, "writing": 7.0}) and s["unrated"] == 1


def test_win_rate_by_hand():
    assert benchmarks.win_rate([1, 0, 1, 0.5]) == pytest.approx(62.5)


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
