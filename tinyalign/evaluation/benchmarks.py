"""The paper's benchmarks: turning free-text answers into what each scores, and the scores
themselves, each as the benchmark's official script computes it. No model, no network and no files
here: eval.py generates the answers and asks the judge, benchmark_files.py reads and checks the
benchmarks' files; these functions are small enough to check by hand (tests/test_benchmarks.py does).
"""

from __future__ import annotations

import re


# ---------------------------------------------------------------------------------------------
# POPE: yes/no questions about object presence. Positive class = "yes".
# ---------------------------------------------------------------------------------------------

POPE_SPLITS = ("adversarial", "popular", "random")
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt


def yes_or_no(answer: str) -> str:
    """POPE's yes/no rule, as LLaVA's llava/eval/eval_pope.py (lines 11-20) and POPE's own evaluate.py
    both write it: keep the text before the first "." (all of it if there is none), remove commas,
    split on single spaces; "no" if one of the words is exactly "No", "not" or "no", else "yes".
    Case and other punctuation count: "NO", "No!", "(no)", "Not at all" are all "yes"."""
    first = answer.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and the share of "yes" answers (1.0 on an empty set is avoided:
    a metric whose denominator is zero is reported as 0)."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(pairs), 1)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": len(pairs)}


# ---------------------------------------------------------------------------------------------
# MMBench: multiple choice, circular evaluation. The released TSVs already hold every circular
# pass as a row of its own: rows index, index + 1e6, index + 2e6, ... are one question with its
# options rotated. Each row is answered once (as LLaVA does); a question counts as right only if
# every row of its group is (OpenCompass / VLMEvalKit `mcq_circular_eval`).
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCD"
MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."
CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: g_index = int(index % 1e6)


def mmbench_prompt(row: dict, suffix: str | None = None) -> str:
    """LLaVA's llava/eval/model_vqa_mmbench.py (lines 86-98): hint, question, "A. ..." per option, the
    image first, then the single-prediction instruction."""
    lines = ([row["hint"]] if row["hint"] else []) + [row["question"]]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, row["options"])]
    suffix = "\n" + MMBENCH_SUFFIX if suffix is None else suffix
    return "<image>\n" + "\n".join(lines) + suffix


# VLMEvalKit vlmeval/utils/matching_util.py (`can_infer_option`, `can_infer_text`, `can_infer`), restated.
REFUSALS = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer"]
STATED_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def option_from_letters(answer: str, letters: str) -> str | None:
    """The option letter an answer names, or "Z" (refused / names none but "Z"), or None (no verdict).
    Punctuation .()[],:;!*#{} becomes spaces and the text is split into words; exactly one word that
    is an option letter, among the last four words, is the answer; else "the answer is X"."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    stated = STATED_ANSWER.search(answer)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    return None


def option_from_text(answer: str, options: list[str]) -> str | None:
    """The one option whose text the answer contains (lower-cased), unless the answer is longer than
    twice all the options together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(o) for o in options):
        return None
    found = [letter for letter, option in zip(LETTERS, options) if option.lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_option(answer: str, options: list[str]) -> str | None:
    """The option a free-text answer picks (VLMEvalKit's exact-matching `can_infer`): by its letter,
    else by its text; "Z" for a refusal; None when it cannot tell (scored wrong, as the official
    exact-matching mode scores it)."""
    return option_from_letters(answer, LETTERS[:len(options)]) or option_from_text(answer, options)


def mmbench_scores(rows: list[dict], predictions: dict) -> dict:
    """predictions: {row index: letter or None}. Rows are grouped by index % 1e6; a group is right
    only if every one of its rows is (circular evaluation; a file without circular rows has groups
    of one). Overall, per l2-category and per category: the share of right groups, each group under
    its main row's (index < 1e6) categories, as VLMEvalKit's `report_acc`."""
    groups = {}
    for row in rows:
        groups.setdefault(row["index"] % CIRCULAR_STRIDE, []).append(row)
    per_question, by_category, by_l2 = [], {}, {}
    for g_index, members in groups.items():
        main = next((r for r in members if r["index"] == g_index), None)
        if main is None:
            continue  # VLMEvalKit keeps only groups whose main row is in the file
        right = all(predictions[r["index"]] == r["answer"] for r in members)
        per_question.append({"index": g_index, "category": main["category"], "rows": len(members), "right": right})
        by_category.setdefault(main["category"], []).append(right)
        if main["l2_category"]:
            by_l2.setdefault(main["l2_category"], []).append(right)
    n = max(len(per_question), 1)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"accuracy": sum(p["right"] for p in per_question) / n,
            "row_accuracy": sum(predictions[r["index"]] == r["answer"] for r in rows) / max(len(rows), 1),
            "by_category": {c: mean(v) for c, v in sorted(by_category.items())},
            "by_l2_category": {c: mean(v) for c, v in sorted(by_l2.items())},
            "per_question": per_question}


# ---------------------------------------------------------------------------------------------
# MM-Vet, LLaVA-Bench, MT-Bench, AlpacaEval: judged benchmarks (the judge's reply parsers here)
# ---------------------------------------------------------------------------------------------


def parse_unit_score(reply: str) -> float:
    """MM-Vet grading: the last line's number, a correctness score from 0.0 to 1.0."""
    numbers = re.findall(r"\d+(?:\.\d+)?", reply.strip().splitlines()[-1] if reply.strip() else "")
    if not numbers:
        raise ValueError(f"no score on the reply's last line: {reply[-120:]!r}")
    score = float(numbers[-1])
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"score {score} is outside 0-1")
    return score


def mmvet_scores(questions: dict, grades: dict) -> dict:
    """grades {id: 0-1}. Total and per capability, in percent (a question counts toward each of its
    capabilities)."""
    by_capability = {}
    for qid, q in questions.items():
        for capability in q["capability"]:
            by_capability.setdefault(capability, []).append(grades[qid])
    values = [grades[qid] for qid in questions]
    return {"total": 100 * sum(values) / max(len(values), 1),
            "by_capability": {c: 100 * sum(v) / len(v) for c, v in sorted(by_capability.items())}}


def parse_pair_scores(reply: str) -> tuple[float, float]:
    """LLaVA-Bench review, LLaVA's llava/eval/eval_gpt_review_bench.py `parse_score` (lines 36-47): the
    reply's first line, commas made spaces, split on single spaces, must be exactly two numbers (the
    reference's score, then the model's). Where LLaVA then records [-1, -1] and averages it in, an
    unparsable reply here is a failed try (retried, and reported if it never parses)."""
    parts = reply.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        raise ValueError(f"expected two scores on the first line, got {reply.split(chr(10))[0]!r}")
    return float(parts[0]), float(parts[1])


JUDGE_SCALE = (1, 10)  # MT-Bench's and LLaVA-Bench's judge prompts both ask for a score from 1 to 10


def on_scale(score: float, what: str) -> float:
    """A judge's score checked against the scale its prompt asks for: outside it, the reply is a
    failed try (retried, then listed in judge_failures.json), never a score. The official scripts take
    any number they can parse (a 15 counts as 15); eval.py's --accept-any-rating does the same."""
    low, high = JUDGE_SCALE
    if not low <= score <= high:
        raise ValueError(f"{what} {score:g} is outside the judge's scale {low}-{high}")
    return score


def checked_pair_scores(reply: str) -> tuple[float, float]:
    """parse_pair_scores, each of the two scores on the 1-10 scale."""
    reference, model = parse_pair_scores(reply)
    return on_scale(reference, "the reference's score"), on_scale(model, "the model's score")


def relative_scores(reviews: list[dict]) -> dict:
    """reviews [{category, reference, model}]: the model's mean score as a percentage of the
    reference's, per category and over all (LLaVA-Bench's "relative score")."""
    groups = {}
    for r in reviews:
        groups.setdefault(r["category"], []).append(r)
    def relative(rows):
        return 100 * sum(r["model"] for r in rows) / max(sum(r["reference"] for r in rows), 1e-9)
    return {"overall": relative(reviews), "by_category": {c: relative(rows) for c, rows in sorted(groups.items())}}


# FastChat fastchat/llm_judge/common.py: the categories judged with a reference answer (NEED_REF_CATS,
# line 31) and the sampling temperature of each category's answers (temperature_config, lines 40-50;
# below 1e-4 means greedy; a category not listed: 0.7, as fastchat/llm_judge/gen_model_answer.py does).
MTBENCH_REFERENCE_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
MTBENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
MTBENCH_DEFAULT_TEMPERATURE = 0.7


def parse_rating(reply: str) -> float:
    """MT-Bench single-answer grading, as FastChat's fastchat/llm_judge/common.py does it (patterns at
    lines 36-37, used at 175-183): the first "[[n]]", else the first "[n]", n digits with an optional
    "." and decimals ("[[7.]]" is 7, "[[0]]" is 0). No rating: -1, which FastChat's show_result.py
    (line 20) leaves out of every mean, as `mtbench_scores` does."""
    for pattern in (r"\[\[(\d+\.?\d*)\]\]", r"\[(\d+\.?\d*)\]"):
        found = re.search(pattern, reply)
        if found:
            return float(found.group(1))
    return -1.0


def checked_rating(reply: str) -> float:
    """parse_rating, then the 1-10 scale: a rating outside it is a failed try; no rating at all stays
    -1, as FastChat has it (left out of the means)."""
    rating = parse_rating(reply)
    return rating if rating == -1 else on_scale(rating, "rating")


def mtbench_scores(ratings: list[dict]) -> dict:
    """ratings [{question_id, turn (1|2), category, rating}] -> per-turn and overall means over the
    rated judgments (rating -1, no rating found, left out as FastChat's show_result.py does; the
    overall is the mean over every rated turn, lines 20-35 there)."""
    rated = [r for r in ratings if r["rating"] != -1]

    def mean(rows):
        return sum(r["rating"] for r in rows) / len(rows) if rows else float("nan")
    by_category = {}
    for r in rated:
        by_category.setdefault(r["category"], []).append(r)
    return {"overall": mean(rated), "turn_1": mean([r for r in rated if r["turn"] == 1]),
            "turn_2": mean([r for r in rated if r["turn"] == 2]), "unrated": len(ratings) - len(rated),
            "by_category": {c: mean(rows) for c, rows in sorted(by_category.items())}}


def parse_preference(reply: str) -> str:
    """Pairwise judge: the reply's last line names the better output, "a" or "b"."""
    last = reply.strip().splitlines()[-1].strip().lower() if reply.strip() else ""
    found = re.findall(r"\b(?:output\s*)?\(?([ab])\)?\b", last)
    if len(set(found)) != 1:
        raise ValueError(f"the last line should name output a or b, got {last!r}")
    return found[0]


def win_rate(wins: list[float]) -> float:
    """wins: 1 model better, 0 reference better (0.5 a tie) -> percent of comparisons won."""
    return 100 * sum(wins) / max(len(wins), 1)
