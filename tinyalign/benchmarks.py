"""The paper's benchmarks: reading their official files, turning free-text answers into what each
scores, and the scores themselves. No model and no network here: eval.py generates the answers and
asks the judge; these functions are small enough to check by hand (tests/test_benchmarks.py does).

Benchmarks and their files (users fetch them; see the README):
- POPE: `coco_pope_{adversarial,popular,random}.json`, JSON lines {question_id, image, text, label yes|no}
- MMBench: a TSV with base64 images (index, question, hint, A-D, answer (dev only), category, image)
- MM-Vet: `mm-vet.json` {id: {imagename, question, answer, capability: [...]}} and an images folder
- LLaVA-Bench in-the-wild: questions.jsonl, context.jsonl, answers_gpt4.jsonl
- MT-Bench: FastChat's question.jsonl {question_id, category, turns: [2], reference?: [...]}
- AlpacaEval: a JSON list {instruction, output (the reference model's), generator, dataset}
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import sys
from pathlib import Path


class BenchmarkError(ValueError):
    """A benchmark file or answer file that cannot be used; the message names the file and record."""


# ---------------------------------------------------------------------------------------------
# Reading files, with errors that say where
# ---------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: file not found")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise BenchmarkError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None


def require(record: dict, fields: list[str], where: str) -> dict:
    missing = [f for f in fields if f not in record]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing}")
    return record


# ---------------------------------------------------------------------------------------------
# POPE: yes/no questions about object presence. Positive class = "yes".
# ---------------------------------------------------------------------------------------------

POPE_SPLITS = ("adversarial", "popular", "random")
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt


def read_pope(path) -> list[dict]:
    records = read_jsonl(path)
    for n, r in enumerate(records, 1):
        require(r, ["question_id", "image", "text", "label"], f"{path} record {n}")
        if r["label"] not in ("yes", "no"):
            raise BenchmarkError(f"{path} record {n} (question {r['question_id']}): label must be yes or no, "
                                 f"got {r['label']!r}")
    return records


def yes_or_no(answer: str) -> str:
    """The first sentence says no (a word "no" or "not") -> "no"; anything else -> "yes".
    The rule of the POPE scripts LLaVA-1.5 was scored with, restated."""
    first = answer.split(".")[0]
    words = {w.strip(",;:!?\"'()").lower() for w in first.split()}
    return "no" if words & {"no", "not"} else "yes"


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
# MMBench: multiple choice, scored with circular evaluation
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCD"
MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."


def read_mmbench(path) -> list[dict]:
    """-> [{index, question, hint, options: [text...], answer (letter or None), category, image (bytes)}]."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: file not found")
    csv.field_size_limit(sys.maxsize)  # one field holds a whole base64 image
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
    questions = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        where = f"{path} line {n}"
        require(row, ["index", "question", "A", "B", "image"], where)
        options = [row[k] for k in LETTERS if row.get(k) not in (None, "", "nan")]
        answer = (row.get("answer") or "").strip() or None
        if answer is not None and answer not in LETTERS[:len(options)]:
            raise BenchmarkError(f"{where} (index {row['index']}): answer {answer!r} is not one of the options "
                                 f"{list(LETTERS[:len(options)])}")
        try:
            image = base64.b64decode(row["image"], validate=True)
        except ValueError:
            raise BenchmarkError(f"{where} (index {row['index']}): the image column is not base64") from None
        hint = row.get("hint") or ""
        questions.append({"index": row["index"], "question": row["question"], "options": options, "answer": answer,
                          "hint": "" if hint == "nan" else hint, "category": row.get("category") or "all",
                          "image": image, "row": {k: v for k, v in row.items() if k != "image"}})
    return questions


def rotate(options: list[str], answer: str | None, shift: int) -> tuple[list[str], str | None]:
    """Circular evaluation: the options moved `shift` places, and where the right one went."""
    rotated = options[shift:] + options[:shift]
    if answer is None:
        return rotated, None
    right = options[LETTERS.index(answer)]
    return rotated, LETTERS[rotated.index(right)]


def mmbench_prompt(question: dict, options: list[str], suffix: str | None = None) -> str:
    """Hint, question, lettered options, then the instruction to answer with a letter."""
    lines = ([question["hint"]] if question["hint"] else []) + [question["question"]]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]
    suffix = "\n" + MMBENCH_SUFFIX if suffix is None else suffix
    return "<image>\n" + "\n".join(lines) + suffix


def extract_option(answer: str, options: list[str]) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none or several.

    In order: a bare letter ("B", "(B)", "B."); an explicit statement ("the answer is (B)",
    "option B"); a letter opening the answer ("B. a cat"); the one option whose text the answer
    contains. Naming two options is no answer (scored wrong)."""
    letters = LETTERS[:len(options)]
    text = answer.strip()
    bare = re.fullmatch(rf"\(?([{letters}])\)?[.:)]?", text)
    if bare:
        return bare.group(1)
    stated = set(re.findall(rf"(?:answer is|answer:|option|choice)\s*:?\s*\(?([{letters}])\b\)?", text, re.I))
    stated = {s.upper() for s in stated if s.upper() in letters}
    if len(stated) == 1:
        return stated.pop()
    if len(stated) > 1:
        return None
    opening = re.match(rf"\(?([{letters}])[.:)]\s", text + " ")
    if opening:
        return opening.group(1)
    named = [letter for letter, option in zip(letters, options) if option and option.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def mmbench_scores(questions: list[dict], predictions: dict) -> dict:
    """predictions: {(index, shift): letter or None}. A question counts as right only when every
    rotation of its options was answered right (circular evaluation); also the plain accuracy of
    the unrotated question and the accuracy per category."""
    per_question, by_category = [], {}
    for q in questions:
        shifts = range(len(q["options"]))
        right = [predictions[(q["index"], s)] == rotate(q["options"], q["answer"], s)[1] for s in shifts]
        per_question.append({"index": q["index"], "category": q["category"], "circular": all(right),
                             "single": right[0]})
        by_category.setdefault(q["category"], []).append(all(right))
    n = max(len(per_question), 1)
    return {"circular_accuracy": sum(p["circular"] for p in per_question) / n,
            "single_accuracy": sum(p["single"] for p in per_question) / n,
            "by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
            "per_question": per_question}


# ---------------------------------------------------------------------------------------------
# MM-Vet, LLaVA-Bench, MT-Bench, AlpacaEval: judged benchmarks (the judge's reply parsers here)
# ---------------------------------------------------------------------------------------------


def read_mmvet(path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected an object keyed by question id, got {type(data).__name__}")
    for qid, q in data.items():
        require(q, ["imagename", "question", "answer", "capability"], f"{path} question {qid}")
    return data


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


def read_llava_bench(folder) -> list[dict]:
    """questions.jsonl + context.jsonl (captions, by image) + answers_gpt4.jsonl (reference answers)."""
    folder = Path(folder)
    questions = read_jsonl(folder / "questions.jsonl")
    captions = {c["image"]: c.get("caption", "") for c in read_jsonl(folder / "context.jsonl")}
    references = {r["question_id"]: r["text"] for r in read_jsonl(folder / "answers_gpt4.jsonl")}
    for n, q in enumerate(questions, 1):
        where = f"{folder / 'questions.jsonl'} record {n}"
        require(q, ["question_id", "image", "text", "category"], where)
        if q["question_id"] not in references:
            raise BenchmarkError(f"{where}: question {q['question_id']} has no reference answer in answers_gpt4.jsonl")
        q["caption"], q["reference"] = captions.get(q["image"], ""), references[q["question_id"]]
    return questions


def parse_pair_scores(reply: str) -> tuple[float, float]:
    """LLaVA-Bench review: the first line holds two scores 1-10, the reference's then the model's."""
    first = reply.strip().splitlines()[0] if reply.strip() else ""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)[\s,]+(\d+(?:\.\d+)?)\s*", first)
    if not found:
        raise ValueError(f"expected only two scores on the first line, got {first!r}")
    a, b = float(found.group(1)), float(found.group(2))
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise ValueError(f"scores must be 1-10, got {a} and {b}")
    return a, b


def relative_scores(reviews: list[dict]) -> dict:
    """reviews [{category, reference, model}]: the model's mean score as a percentage of the
    reference's, per category and over all (LLaVA-Bench's "relative score")."""
    groups = {}
    for r in reviews:
        groups.setdefault(r["category"], []).append(r)
    def relative(rows):
        return 100 * sum(r["model"] for r in rows) / max(sum(r["reference"] for r in rows), 1e-9)
    return {"overall": relative(reviews), "by_category": {c: relative(rows) for c, rows in sorted(groups.items())}}


MTBENCH_REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def read_mtbench(path) -> list[dict]:
    questions = read_jsonl(path)
    for n, q in enumerate(questions, 1):
        require(q, ["question_id", "category", "turns"], f"{path} record {n}")
        if not isinstance(q["turns"], list) or not q["turns"]:
            raise BenchmarkError(f"{path} record {n} (question {q['question_id']}): 'turns' must be a non-empty list")
    return questions


def parse_rating(reply: str) -> float:
    """MT-Bench single-answer grading: "Rating: [[7]]" (1-10)."""
    found = re.findall(r"\[\[(\d+(?:\.\d+)?)\]\]", reply) or re.findall(r"\[(\d+(?:\.\d+)?)\]", reply)
    if not found:
        raise ValueError(f"no [[rating]] in the reply: {reply[-120:]!r}")
    rating = float(found[-1])
    if not 1 <= rating <= 10:
        raise ValueError(f"rating {rating} is outside 1-10")
    return rating


def mtbench_scores(ratings: list[dict]) -> dict:
    """ratings [{question_id, turn (1|2), category, rating}] -> per-turn and overall means (the
    overall is the mean over every judged turn, as FastChat's show_result reports)."""
    def mean(rows):
        return sum(r["rating"] for r in rows) / len(rows) if rows else float("nan")
    by_category = {}
    for r in ratings:
        by_category.setdefault(r["category"], []).append(r)
    return {"overall": mean(ratings), "turn_1": mean([r for r in ratings if r["turn"] == 1]),
            "turn_2": mean([r for r in ratings if r["turn"] == 2]),
            "by_category": {c: mean(rows) for c, rows in sorted(by_category.items())}}


def read_alpaca_eval(path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON list of {{instruction, output}}")
    for n, r in enumerate(data):
        require(r, ["instruction", "output"], f"{path} item {n}")
    return data


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
