"""Every file eval.py reads, read and checked whole before a model is loaded or an answer made: the
benchmarks' official files and the `--answers` files. One reader per format; each message names the
file and the line (JSON lines, the TSV) or the item (a JSON file).

The checks, the same for every format:
- each field is there and of its type (an id is text or a whole number; a question non-empty text;
  an answer text, never null, a number or a list; turns a list of text, as many as the question has);
- a benchmark with no questions is an error, not a score over nothing;
- an id twice with the same record is dropped and counted; with another record, an error naming
  both lines (two answers for one question: which one would be scored?);
- images lie inside their folder (data.resolve_images), decode in full and are of a sane size
  (data.check_image), before any generation.

The files (users fetch them; see docs/evaluation.md):
- POPE: `coco_pope_{adversarial,popular,random}.json`, JSON lines {question_id, image, text, label yes|no},
  or LLaVA's `llava_pope_test.jsonl` {question_id, image, text, category} with the labels from those
- MMBench: a TSV with base64 images (index, question, hint, A-D, answer (dev only), category, image)
- MM-Vet: `mm-vet.json` {id: {imagename, question, answer, capability: [...]}} and an images folder
- LLaVA-Bench in-the-wild: questions.jsonl, context.jsonl, answers_gpt4.jsonl and images/
- MT-Bench: FastChat's question.jsonl {question_id, category, turns: [1 or 2], reference?: [...]} and
  its reference answers (model-answer lines {question_id, choices: [{turns}]})
- AlpacaEval: a JSON list {instruction, output (the reference model's), generator?, dataset?}
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import sys
from pathlib import Path

from ..data import DataError, check_image, numbered_jsonl, read_text, resolve_images
from .benchmarks import LETTERS

MTBENCH_MAX_TURNS = 2  # FastChat's judges grade turn 1 and turns 1-2 (single-v1, single-v1-multi-turn)


class BenchmarkError(DataError):
    """A benchmark file or answer file that cannot be used; the message names the file and record."""


# ---------------------------------------------------------------------------------------------
# Fields: present and of their type
# ---------------------------------------------------------------------------------------------


def require(record: dict, fields: list[str], where: str) -> dict:
    missing = [f for f in fields if f not in record]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing}")
    return record


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def an_id(value, where: str, name: str = "question_id"):
    """An id: text or a whole number (JSON's true, 1.5 or null are not ids)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise BenchmarkError(f"{where}: {name} must be text or a whole number, got {_shown(value)}")
    return value


def a_text(value, where: str, name: str, empty_ok: bool = False) -> str:
    """Text; a question or prompt must also be non-empty (`empty_ok` for a model's answer: an empty
    answer is a wrong one, not a broken file)."""
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        kind = "text" if empty_ok else "non-empty text"
        raise BenchmarkError(f"{where}: {name} must be {kind}, got {_shown(value)}")
    return value


def texts(value, where: str, name: str, count: int | None = None, empty_ok: bool = False) -> list[str]:
    """A non-empty list of text (`count` of them when given)."""
    if not isinstance(value, list) or not value:
        raise BenchmarkError(f"{where}: {name} must be a non-empty list of text, got {_shown(value)}")
    for i, item in enumerate(value):
        a_text(item, where, f"{name}[{i}]", empty_ok)
    if count is not None and len(value) != count:
        raise BenchmarkError(f"{where}: {name} has {len(value)} item(s), the question {count}")
    return value


# ---------------------------------------------------------------------------------------------
# Whole files: parsed, not empty, no conflicting repeats
# ---------------------------------------------------------------------------------------------


class _RepeatedKey(Exception):
    pass


def _no_conflicting_keys(pairs: list) -> dict:
    """json.loads keeps the last of two equal keys without a word; here the same value twice is one,
    and two values under one key are an error."""
    out = {}
    for key, value in pairs:
        if key in out and out[key] != value:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def read_json(path):
    """A JSON file; errors name the file and the line."""
    text = read_text(path, BenchmarkError)
    try:
        return json.loads(text, object_pairs_hook=_no_conflicting_keys)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise BenchmarkError(f"{path}: JSON nested too deep to be a benchmark file") from None
    except _RepeatedKey as e:
        raise BenchmarkError(f"{path}: key {str(e)!r} appears twice with different values") from None


def read_lines(path) -> list[tuple[int, dict]]:
    """JSON lines with their line numbers (data.numbered_jsonl), errors as BenchmarkError."""
    return numbered_jsonl(path, error=BenchmarkError)


def not_empty(records, path, what: str = "questions"):
    if not records:
        raise BenchmarkError(f"{path}: no {what} (an empty file scores nothing)")
    return records


def without_repeats(records: list[tuple[int, dict]], key, path, what: str = "question_id",
                    unit: str = "line") -> list[tuple[int, dict]]:
    """(line, record) pairs with one record per key(record): a repeat with the same content is
    dropped (and counted on stderr); one with other content is an error naming both lines (`unit`:
    "item" for the records of a JSON list)."""
    first, kept, dropped = {}, [], 0
    for n, record in records:
        k = key(record)
        if k in first:
            m, earlier = first[k]
            if earlier != record:
                raise BenchmarkError(f"{path} {unit} {n}: {what} {k!r} is also {unit} {m}'s, with other content")
            dropped += 1
            continue
        first[k] = (n, record)
        kept.append((n, record))
    if dropped:
        print(f"{path}: {dropped} repeated {unit}(s) dropped (the same record twice)", file=sys.stderr)
    return kept


# ---------------------------------------------------------------------------------------------
# Images: inside their folder, decoded and bounded, before any generation
# ---------------------------------------------------------------------------------------------


def checked_image(folder, name, where: str, anywhere: bool = False, seen: dict | None = None) -> Path:
    """A benchmark question's image file: a path (text) inside `folder` (--image-folder; without
    one, as written), decoded in full and of a sane size. `seen` caches the check per file (POPE
    asks about each image many times)."""
    if not isinstance(name, str) or not name:
        raise BenchmarkError(f"{where}: image must be a file name, got {_shown(name)}")
    (path,) = resolve_images([name], folder, where, anywhere)
    if seen is None or path not in seen:
        check_image(path, where, BenchmarkError)
        if seen is not None:
            seen[path] = True
    return path


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


def read_pope(path) -> list[dict]:
    """One split's file: every line a question with its yes/no label; ids unique."""
    lines = not_empty(read_lines(path), path)
    for n, r in lines:
        where = f"{path} line {n}"
        require(r, ["question_id", "image", "text", "label"], where)
        an_id(r["question_id"], where)
        where = f"{where} (question {r['question_id']})"
        a_text(r["image"], where, "image")
        a_text(r["text"], where, "text")
        if r["label"] not in ("yes", "no"):
            raise BenchmarkError(f"{where}: label must be yes or no, got {_shown(r['label'])}")
    return [r for _, r in without_repeats(lines, lambda r: str(r["question_id"]), path)]


def check_llava_questions(lines, path) -> None:
    """LLaVA's question lines (POPE's combined file, LLaVA-Bench's questions.jsonl): question_id, and
    image, text and category as text."""
    for n, q in lines:
        where = f"{path} line {n}"
        require(q, ["question_id", "image", "text", "category"], where)
        an_id(q["question_id"], where)
        for field in ("image", "text", "category"):
            a_text(q[field], f"{where} (question {q['question_id']})", field)


def read_llava_pope(question_file, pope_dir) -> dict[str, list[dict]]:
    """LLaVA's combined question file (`llava_pope_test.jsonl`: question_id, image, text, category) with
    each question's label from POPE's file of its category, {split: [question...]}. The labels pair up
    by position within a category, as LLaVA's llava/eval/eval_pope.py (lines 75-79) pairs them: the
    k-th question of category c takes the label of the k-th line of coco_pope_c.json."""
    lines = not_empty(read_lines(question_file), question_file)
    check_llava_questions(lines, question_file)
    by_split = {}
    for n, q in without_repeats(lines, lambda q: f"{q['category']}-{q['question_id']}", question_file,
                                "category-question_id"):
        if not (Path(pope_dir) / f"coco_pope_{q['category']}.json").is_file():
            raise BenchmarkError(f"{question_file} line {n}: category {q['category']!r} has no label file "
                                 f"coco_pope_{q['category']}.json in {pope_dir}")
        by_split.setdefault(q["category"], []).append(dict(q))
    for split, rows in by_split.items():
        label_file = Path(pope_dir) / f"coco_pope_{split}.json"
        labels = read_pope(label_file)
        if len(labels) != len(rows):
            raise BenchmarkError(f"{question_file}: {len(rows)} questions of category {split!r} but {len(labels)} "
                                 f"labels in {label_file}; LLaVA pairs them by position, so the counts must agree")
        for row, label in zip(rows, labels):
            row["label"] = label["label"]
    return by_split


def read_pope_answers(path, ids: dict) -> dict:
    """--answers for POPE: LLaVA's answer lines {question_id, text, category?}. ids: {key: (split,
    question_id)} of the questions loaded. With LLaVA's question file the ids are unique; with POPE's
    split files they repeat across splits, so a line names its split ("category") unless only one
    split is loaded or the ids happen to be unique."""
    by_qid = {}
    for key, (split, qid) in ids.items():
        by_qid.setdefault(str(qid), []).append(key)
    out, line_of = {}, {}
    for n, r in read_lines(path):
        where = f"{path} line {n}"
        require(r, ["question_id", "text"], where)
        qid = str(an_id(r["question_id"], where))
        text = a_text(r["text"], where, "text", empty_ok=True)
        keys = [f"{r['category']}-{qid}"] if "category" in r else by_qid.get(qid, [])
        if len(keys) > 1:
            raise BenchmarkError(f"{where}: question {qid} is in several splits ({', '.join(keys)}); give the "
                                 "line a 'category' or use --questions")
        if not keys or keys[0] not in ids:
            raise BenchmarkError(f"{where}: answer id {qid!r} is not a POPE question loaded")
        out[keys[0]] = _one_answer(out, line_of, keys[0], text, n, path)
    missing = sorted(set(ids) - set(out))
    if missing:
        raise BenchmarkError(f"{path}: no answer for POPE question {missing[0]}")
    return out


def _one_answer(answers: dict, line_of: dict, key: str, answer, n: int, path, unit: str = "line"):
    """An answer line for `key`: the first, or a repeat of it (dropped); another answer is an error."""
    if key in answers and answers[key] != answer:
        raise BenchmarkError(f"{path} {unit} {n}: a second, different answer to question {key!r} (the first is "
                             f"{unit} {line_of[key]})")
    line_of.setdefault(key, n)
    return answer


# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------


def _missing(value) -> bool:
    """An empty cell, as pandas reads it (NaN) from the official TSVs."""
    return value is None or value.strip() in ("", "nan", "NaN")


def read_mmbench(path, check_images: bool = True) -> list[dict]:
    """-> one dict per row: {index (int), question, hint, options: [text...], answer (letter or None),
    category, l2_category, image (bytes), row (the TSV's other columns)}. Every image is decoded
    here (`check_images`; not needed to grade an answers file)."""
    text = read_text(path, BenchmarkError)
    csv.field_size_limit(sys.maxsize)  # one field holds a whole base64 image
    table = csv.DictReader(io.StringIO(text), delimiter="\t")
    lines = [(n, row) for n, row in enumerate(table, 2)]  # line 1 is the header
    if table.fieldnames is None:
        raise BenchmarkError(f"{path}: empty file (no header, no rows)")
    rows = [(n, _mmbench_row(row, f"{path} line {n}", check_images)) for n, row in not_empty(lines, path, "rows")]
    answered = [n for n, row in rows if row["answer"] is not None]
    if answered and len(answered) < len(rows):  # a dev file (answers: scored) or a test file (none: submitted)
        n = next(n for n, row in rows if row["answer"] is None)
        raise BenchmarkError(f"{path} line {n}: no answer, although line {answered[0]} has one: a dev file answers "
                             "every row, a test file none")
    return [row for _, row in without_repeats(rows, lambda row: row["index"], path, "index")]


def _mmbench_row(row: dict, where: str, check_image_bytes: bool) -> dict:
    require(row, ["index", "question", "A", "B", "image"], where)
    if None in row:
        raise BenchmarkError(f"{where}: more cells than the header has columns")
    try:
        index = float(row["index"])  # pandas may write 7 as 7.0
    except (TypeError, ValueError):
        index = None
    if index is None or not index.is_integer():
        raise BenchmarkError(f"{where}: index {row['index']!r} is not a whole number")
    index = int(index)
    where = f"{where} (index {index})"
    if _missing(row["question"]):
        raise BenchmarkError(f"{where}: the question is empty")
    options = []
    for letter in LETTERS:  # LLaVA's get_options: up to the first empty option
        if _missing(row.get(letter)):
            break
        options.append(row[letter])
    if len(options) < 2:
        raise BenchmarkError(f"{where}: options A and B must both be given")
    answer = None if _missing(row.get("answer")) else row["answer"].strip()
    if answer is not None and answer not in LETTERS[:len(options)]:
        raise BenchmarkError(f"{where}: answer {answer!r} is not one of the options {list(LETTERS[:len(options)])}")
    try:
        image = base64.b64decode(row["image"] or "", validate=True)
    except (ValueError, binascii.Error):
        raise BenchmarkError(f"{where}: the image column is not base64") from None
    if check_image_bytes:
        check_image(io.BytesIO(image), where, BenchmarkError, label="the image column")
    return {"index": index, "question": row["question"], "options": options, "answer": answer,
            "hint": "" if _missing(row.get("hint")) else row["hint"],
            "category": row.get("category") or "all", "l2_category": row.get("l2-category") or None,
            "image": image, "row": {k: v for k, v in row.items() if k != "image"}}


# ---------------------------------------------------------------------------------------------
# MM-Vet
# ---------------------------------------------------------------------------------------------


def read_mmvet(path) -> dict:
    """{id: {imagename, question, answer, capability: [text...]}}, at least one question."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected an object keyed by question id, got {type(data).__name__}")
    for qid, q in not_empty(data, path).items():
        where = f"{path} question {qid}"
        if not isinstance(q, dict):
            raise BenchmarkError(f"{where}: expected an object, got {_shown(q)}")
        require(q, ["imagename", "question", "answer", "capability"], where)
        a_text(q["imagename"], where, "imagename")
        a_text(q["question"], where, "question")
        a_text(q["answer"], where, "answer")
        texts(q["capability"], where, "capability")
    return data


# ---------------------------------------------------------------------------------------------
# LLaVA-Bench in-the-wild
# ---------------------------------------------------------------------------------------------


def read_llava_bench(folder) -> list[dict]:
    """questions.jsonl + context.jsonl (captions, by image) + answers_gpt4.jsonl (reference answers)."""
    folder = Path(folder)
    questions_file, context_file, answers_file = (folder / f for f in
                                                   ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"))
    questions = not_empty(read_lines(questions_file), questions_file)
    check_llava_questions(questions, questions_file)
    contexts = read_lines(context_file)
    for n, c in contexts:
        require(c, ["image", "caption"], f"{context_file} line {n}")
        a_text(c["image"], f"{context_file} line {n}", "image")
        a_text(c["caption"], f"{context_file} line {n}", "caption")
    references = read_lines(answers_file)
    for n, r in references:
        require(r, ["question_id", "text"], f"{answers_file} line {n}")
        an_id(r["question_id"], f"{answers_file} line {n}")
        a_text(r["text"], f"{answers_file} line {n}", "text")
    captions = {c["image"]: c["caption"]
                for _, c in without_repeats(contexts, lambda c: c["image"], context_file, "image")}
    reference = {str(r["question_id"]): r["text"] for _, r in without_repeats(
        references, lambda r: str(r["question_id"]), answers_file)}
    out = []
    for n, q in without_repeats(questions, lambda q: str(q["question_id"]), questions_file):
        if str(q["question_id"]) not in reference:
            raise BenchmarkError(f"{questions_file} line {n}: question {q['question_id']} has no reference answer "
                                 f"in {answers_file.name}")
        if q["image"] not in captions:  # the judge reads the caption; LLaVA's script stops without one too
            raise BenchmarkError(f"{questions_file} line {n}: image {q['image']!r} has no caption in "
                                 f"{context_file.name}")
        out.append({**q, "caption": captions[q["image"]], "reference": reference[str(q["question_id"])]})
    return out


# ---------------------------------------------------------------------------------------------
# MT-Bench
# ---------------------------------------------------------------------------------------------


def read_mtbench(path) -> list[dict]:
    """FastChat's question.jsonl: 1 or 2 turns of text each (its judges grade no more), a reference
    (when given) a list of text."""
    lines = not_empty(read_lines(path), path)
    for n, q in lines:
        where = f"{path} line {n}"
        require(q, ["question_id", "category", "turns"], where)
        an_id(q["question_id"], where)
        where = f"{where} (question {q['question_id']})"
        a_text(q["category"], where, "category")
        texts(q["turns"], where, "turns")
        if len(q["turns"]) > MTBENCH_MAX_TURNS:
            raise BenchmarkError(f"{where}: {len(q['turns'])} turns; MT-Bench's judges grade {MTBENCH_MAX_TURNS} "
                                 "at most")
        if "reference" in q:
            texts(q["reference"], where, "reference", empty_ok=True)
    return [q for _, q in without_repeats(lines, lambda q: str(q["question_id"]), path)]


def read_mtbench_references(path) -> dict[str, list[str]]:
    """FastChat's reference answers (reference_answer/gpt-4.jsonl, model-answer lines): {id: turns}."""
    lines = read_lines(path)
    for n, r in lines:
        _fastchat_turns(r, f"{path} line {n}")
    return {str(r["question_id"]): r["choices"][0]["turns"]
            for _, r in without_repeats(lines, lambda r: str(r["question_id"]), path)}


def _fastchat_turns(record: dict, where: str, count: int | None = None) -> list[str]:
    """A FastChat model-answer line's turns: choices[0].turns, a list of text."""
    require(record, ["question_id", "choices"], where)
    an_id(record["question_id"], where)
    choices = record["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) or "turns" not in choices[0]:
        raise BenchmarkError(f"{where}: choices must be a list whose first item holds 'turns', got {_shown(choices)}")
    return texts(choices[0]["turns"], where, "choices[0].turns", count, empty_ok=True)


# ---------------------------------------------------------------------------------------------
# AlpacaEval
# ---------------------------------------------------------------------------------------------


def read_alpaca_eval(path) -> list[dict]:
    """A JSON list of {instruction, output}; an instruction once (answers are keyed by it)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON list of {{instruction, output}}")
    for n, r in enumerate(not_empty(data, path, "instructions")):
        where = f"{path} item {n}"
        if not isinstance(r, dict):
            raise BenchmarkError(f"{where}: expected an object, got {_shown(r)}")
        require(r, ["instruction", "output"], where)
        a_text(r["instruction"], where, "instruction")
        a_text(r["output"], where, "output", empty_ok=True)
    items = without_repeats(list(enumerate(data)), lambda r: r["instruction"], path, "instruction", "item")
    return [r for _, r in items]


# ---------------------------------------------------------------------------------------------
# --answers: answers made elsewhere, in each benchmark's own answer format
# ---------------------------------------------------------------------------------------------


def read_answers(path, questions: dict, where: str) -> dict:
    """Answers made elsewhere (--answers), {str(id): answer}, in the benchmark's own answer format:
    a JSON object {id: text} (MM-Vet), a JSON list of {instruction, output} (AlpacaEval), or JSON lines
    {question_id, text} (LLaVA's answer files) or {question_id, choices: [{turns}]} (FastChat's model
    answers; the answer is the list of turns, as many as the question has). questions: {id: its
    number of turns (MT-Bench) or None}. An answer that is not text, an id that is not a question, a
    question with no answer or with two different ones: an error naming the file and line."""
    turns = {str(k): v for k, v in questions.items()}
    if str(path).endswith(".json"):
        data = read_json(path)
        answers = _alpaca_answers(data, path) if isinstance(data, list) else _keyed_answers(data, path)
    else:
        answers, line_of = {}, {}
        for n, r in read_lines(path):
            at = f"{path} line {n}"
            key = str(an_id(require(r, ["question_id"], at)["question_id"], at))
            multi_turn = turns.get(key) is not None  # MT-Bench: FastChat's lines, one answer per turn
            if multi_turn != ("choices" in r):
                wanted = "FastChat's {question_id, choices: [{turns}]}" if multi_turn else "{question_id, text}"
                raise BenchmarkError(f"{at}: expected an answer line {wanted} for {where}")
            if multi_turn:
                answer = _fastchat_turns(r, at, turns[key])
            else:
                answer = a_text(require(r, ["text"], at)["text"], at, "text", empty_ok=True)
            answers[key] = _one_answer(answers, line_of, key, answer, n, path)
    unknown = [k for k in answers if k not in turns]
    if unknown:
        raise BenchmarkError(f"{path}: answer id {unknown[0]!r} is not a question of {where}")
    missing = sorted(set(turns) - set(answers))
    if missing:
        raise BenchmarkError(f"{path}: no answer for question {missing[0]!r} of {where}")
    return answers


def _keyed_answers(data, path) -> dict:
    """MM-Vet's answer file: {id: text}."""
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected an object {{question id: answer}} or a list, got "
                             f"{type(data).__name__}")
    for key, answer in data.items():
        a_text(answer, f"{path} answer {key!r}", "the answer", empty_ok=True)
    return {str(k): v for k, v in data.items()}


def _alpaca_answers(data: list, path) -> dict:
    """AlpacaEval's model outputs: [{instruction, output}], keyed by instruction."""
    answers, line_of = {}, {}
    for n, r in enumerate(data):
        at = f"{path} item {n}"
        if not isinstance(r, dict):
            raise BenchmarkError(f"{at}: expected an object, got {_shown(r)}")
        require(r, ["instruction", "output"], at)
        key = a_text(r["instruction"], at, "instruction")
        output = a_text(r["output"], at, "output", empty_ok=True)
        answers[key] = _one_answer(answers, line_of, key, output, n, path, "item")
    return answers
