"""Every benchmark file and --answers file, mutated one way at a time: eval.py stops before a model
is loaded or a judge asked, naming the file and the line (or item), and leaves results.json as it
was. The unmutated files pass every check (the control case reaches the model, or the judge)."""

import base64
import importlib
import io
import json
import re
import shutil

import pytest
from conftest import png_claiming
from PIL import Image

from tinyalign.evaluation import benchmark_files

eval_cli = importlib.import_module("eval")  # the top-level eval.py

NO_MODEL = "no-such-model"  # a run that gets past every file check stops here, naming it
RESULTS = '{"score": 42.0, "note": "a result from before; a refused run must leave it as it is"}'


def png(width=32, height=32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(out, format="PNG")
    return out.getvalue()


def lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


POPE = [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"},
        {"question_id": 2, "image": "b.png", "text": "Is there a dog?", "label": "no"}]
MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
MMVET = {"v1_0": {"imagename": "a.png", "question": "What color?", "answer": "red", "capability": ["rec"]},
         "v1_1": {"imagename": "b.png", "question": "How many?", "answer": "2", "capability": ["rec", "ocr"]}}
LLAVA_QUESTIONS = [{"question_id": 0, "image": "a.png", "text": "Describe it.", "category": "detail"},
                   {"question_id": 1, "image": "b.png", "text": "What is it?", "category": "conv"}]
MTBENCH = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
           {"question_id": 82, "category": "roleplay", "turns": ["Be a pirate.", "Again."]}]
ALPACA = [{"instruction": "Say hi.", "output": "Hi!", "generator": "gpt4", "dataset": "x"},
          {"instruction": "Count to 3.", "output": "1 2 3", "generator": "gpt4", "dataset": "x"}]


def mmbench_rows(*rows) -> str:
    encoded = base64.b64encode(png()).decode()
    return "\t".join(MMBENCH_HEADER) + "\n" + "".join("\t".join([*r, encoded] if len(r) == 9 else r) + "\n"
                                                      for r in rows)


MMBENCH = [("0", "What is it?", "", "cat", "dog", "", "", "A", "animals"),
           ("1", "Which colour?", "", "red", "green", "", "", "B", "colour")]


@pytest.fixture
def bench(tmp_path):
    """Each benchmark's files in their official layout, and an answers file for each."""
    d = tmp_path
    (d / "images").mkdir()
    for name in ("a.png", "b.png"):
        (d / "images" / name).write_bytes(png())
    (d / "pope").mkdir()
    (d / "pope" / "coco_pope_random.json").write_text(lines(*POPE))
    (d / "mmbench.tsv").write_text(mmbench_rows(*MMBENCH))
    (d / "mm-vet.json").write_text(json.dumps(MMVET))
    (d / "llava-bench").mkdir()
    shutil.copytree(d / "images", d / "llava-bench" / "images")
    (d / "llava-bench" / "questions.jsonl").write_text(lines(*LLAVA_QUESTIONS))
    (d / "llava-bench" / "context.jsonl").write_text(lines({"image": "a.png", "caption": "A red square."},
                                                           {"image": "b.png", "caption": "Another."}))
    (d / "llava-bench" / "answers_gpt4.jsonl").write_text(lines({"question_id": 0, "text": "A red square."},
                                                                {"question_id": 1, "text": "A square."}))
    (d / "question.jsonl").write_text(lines(*MTBENCH))
    (d / "alpaca_eval.json").write_text(json.dumps(ALPACA))
    (d / "pope_answers.jsonl").write_text(lines({"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "No"}))
    (d / "mmbench_answers.jsonl").write_text(lines({"question_id": 0, "text": "A"}, {"question_id": 1, "text": "B"}))
    (d / "mmvet_answers.json").write_text(json.dumps({"v1_0": "red", "v1_1": "two"}))
    (d / "llava_answers.jsonl").write_text(lines({"question_id": 0, "text": "Red."}, {"question_id": 1, "text": "A."}))
    (d / "mtbench_answers.jsonl").write_text(lines(*[{"question_id": q["question_id"], "model_id": "m",
                                                      "choices": [{"index": 0, "turns": ["a", "b"]}]} for q in MTBENCH]))
    (d / "alpaca_answers.json").write_text(json.dumps([{"instruction": r["instruction"], "output": "ok"} for r in ALPACA]))
    return d


def command(d, benchmark: str, answers: bool) -> list[str]:
    """eval.py's command line for `benchmark` over the files in `d`, generating or grading --answers."""
    judge = ["--judge-url", "http://127.0.0.1:9/v1", "--retries", "0", "--judge-cache", str(d / "judgments.jsonl"),
             "--judge-timeout", "0.5"]
    argv = {"pope": ["pope", "--pope-dir", d / "pope", "--image-folder", d / "images"],
            "mmbench": ["mmbench", "--tsv", d / "mmbench.tsv"],
            "mmvet": ["mmvet", "--questions", d / "mm-vet.json", "--image-folder", d / "images", *judge],
            "llava-bench": ["llava-bench", "--folder", d / "llava-bench", *judge],
            "mtbench": ["mtbench", "--questions", d / "question.jsonl", *judge],
            "alpaca-eval": ["alpaca-eval", "--data", d / "alpaca_eval.json", *judge]}[benchmark]
    answer_file = {"pope": "pope_answers.jsonl", "mmbench": "mmbench_answers.jsonl", "mmvet": "mmvet_answers.json",
                   "llava-bench": "llava_answers.jsonl", "mtbench": "mtbench_answers.jsonl",
                   "alpaca-eval": "alpaca_answers.json"}[benchmark]
    extra = ["--answers", d / answer_file] if answers else []
    return [str(a) for a in argv + ["--model", d / NO_MODEL, "--out", d / "run"] + extra]


def run_refused(d, benchmark, answers) -> str:
    """Run eval.py over a results.json left from before; -> the message it stopped with."""
    results = d / "run" / benchmark.replace("-", "_") / "results.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(RESULTS)
    with pytest.raises(SystemExit) as stop:
        eval_cli.main(command(d, benchmark, answers))
    assert results.read_text() == RESULTS  # neither written nor changed
    return str(stop.value.code)


def edit_lines(path, change):
    """Rewrite JSON lines: change(records) -> records."""
    path.write_text(lines(*change([json.loads(x) for x in path.read_text().splitlines() if x.strip()])))


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def at(i, **fields):
    """change(): record i with `fields` set (a value "DELETE" deletes the field)."""
    def change(records):
        records[i] = {k: v for k, v in {**records[i], **fields}.items() if v != "DELETE"}
        return records
    return change


# (id, benchmark, with --answers, mutation of the files in d, what the message must say)
CASES = [
    # ---- POPE ------------------------------------------------------------------------------------
    ("pope-empty-split", "pope", False, lambda d: (d / "pope/coco_pope_random.json").write_text(""),
     r"coco_pope_random.json: no questions"),
    ("pope-text-number", "pope", False, lambda d: edit_lines(d / "pope/coco_pope_random.json", at(1, text=7)),
     r"coco_pope_random.json line 2 \(question 2\): text must be non-empty text, got 7"),
    ("pope-text-null", "pope", False, lambda d: edit_lines(d / "pope/coco_pope_random.json", at(0, text=None)),
     r"coco_pope_random.json line 1 \(question 1\): text must be non-empty text, got None"),
    ("pope-id-float", "pope", False, lambda d: edit_lines(d / "pope/coco_pope_random.json", at(0, question_id=1.5)),
     r"coco_pope_random.json line 1: question_id must be text or a whole number, got 1.5"),
    ("pope-label-missing", "pope", False,
     lambda d: edit_lines(d / "pope/coco_pope_random.json", at(1, label="DELETE")),
     r"coco_pope_random.json line 2: missing field\(s\) \['label'\]"),
    ("pope-duplicate-id", "pope", False,
     lambda d: edit_lines(d / "pope/coco_pope_random.json", lambda r: r + [{**r[0], "label": "no"}]),
     r"coco_pope_random.json line 3: question_id '1' is also line 1's, with other content"),
    ("pope-image-bomb", "pope", False, lambda d: (d / "images/b.png").write_bytes(png_claiming(50000, 50000)),
     r"POPE random question 2 \(.*coco_pope_random.json\): image .*b.png is too large to decode safely"),
    ("pope-image-strip", "pope", False, lambda d: (d / "images/b.png").write_bytes(png(1, 60)),
     r"POPE random question 2 \(.*coco_pope_random.json\): image .*b.png is 1 x 60, longer than 50:1"),
    ("pope-image-missing", "pope", False, lambda d: (d / "images/a.png").unlink(),
     r"POPE random question 1 \(.*coco_pope_random.json\): image .*a.png not found"),
    ("pope-image-outside", "pope", False,
     lambda d: edit_lines(d / "pope/coco_pope_random.json", at(0, image="../mm-vet.json")),
     r"POPE random question 1 \(.*coco_pope_random.json\): image .*mm-vet.json leads outside the image folder"),
    ("pope-image-not-text", "pope", False,
     lambda d: edit_lines(d / "pope/coco_pope_random.json", at(0, image=["a.png"])),
     r"coco_pope_random.json line 1 \(question 1\): image must be non-empty text"),
    ("pope-answer-number", "pope", True, lambda d: edit_lines(d / "pope_answers.jsonl", at(0, text=3)),
     r"pope_answers.jsonl line 1: text must be text, got 3"),
    ("pope-answer-null", "pope", True, lambda d: edit_lines(d / "pope_answers.jsonl", at(1, text=None)),
     r"pope_answers.jsonl line 2: text must be text, got None"),
    ("pope-answer-twice", "pope", True,
     lambda d: edit_lines(d / "pope_answers.jsonl", lambda r: r + [{"question_id": 1, "text": "No"}]),
     r"pope_answers.jsonl line 3: a second, different answer to question 'random-1' \(the first is line 1\)"),
    ("pope-answer-missing", "pope", True, lambda d: edit_lines(d / "pope_answers.jsonl", lambda r: r[:1]),
     r"pope_answers.jsonl: no answer for POPE question random-2"),
    # ---- MMBench ---------------------------------------------------------------------------------
    ("mmbench-header-only", "mmbench", False, lambda d: (d / "mmbench.tsv").write_text(mmbench_rows()),
     r"mmbench.tsv: no rows"),
    ("mmbench-empty-file", "mmbench", False, lambda d: (d / "mmbench.tsv").write_text(""),
     r"mmbench.tsv: empty file"),
    ("mmbench-duplicate-index", "mmbench", False,
     lambda d: (d / "mmbench.tsv").write_text(mmbench_rows(*MMBENCH, ("0", "Other?", "", "x", "y", "", "", "A", "z"))),
     r"mmbench.tsv line 4: index 0 is also line 2's, with other content"),
    ("mmbench-image-not-an-image", "mmbench", False, lambda d: (d / "mmbench.tsv").write_text(mmbench_rows(
        MMBENCH[0], (*MMBENCH[1], base64.b64encode(b"not an image at all").decode()))),
     r"mmbench.tsv line 3 \(index 1\): the image column is not readable"),
    ("mmbench-image-bomb", "mmbench", False, lambda d: (d / "mmbench.tsv").write_text(mmbench_rows(
        MMBENCH[0], (*MMBENCH[1], base64.b64encode(png_claiming(50000, 50000)).decode()))),
     r"mmbench.tsv line 3 \(index 1\): the image column is too large to decode safely"),
    ("mmbench-no-option-b", "mmbench", False, lambda d: (d / "mmbench.tsv").write_text(mmbench_rows(
        ("0", "What is it?", "", "cat", "", "", "", "A", "animals"))),
     r"mmbench.tsv line 2 \(index 0\): options A and B must both be given"),
    ("mmbench-empty-question", "mmbench", False, lambda d: (d / "mmbench.tsv").write_text(mmbench_rows(
        ("0", " ", "", "cat", "dog", "", "", "A", "animals"))),
     r"mmbench.tsv line 2 \(index 0\): the question is empty"),
    ("mmbench-answer-null", "mmbench", True, lambda d: edit_lines(d / "mmbench_answers.jsonl", at(0, text=None)),
     r"mmbench_answers.jsonl line 1: text must be text, got None"),
    ("mmbench-answer-list", "mmbench", True, lambda d: edit_lines(d / "mmbench_answers.jsonl", at(1, text=["B"])),
     r"mmbench_answers.jsonl line 2: text must be text, got \['B'\]"),
    ("mmbench-answer-unknown", "mmbench", True,
     lambda d: edit_lines(d / "mmbench_answers.jsonl", lambda r: r + [{"question_id": 9, "text": "A"}]),
     r"mmbench_answers.jsonl: answer id '9' is not a question of"),
    # ---- MM-Vet ----------------------------------------------------------------------------------
    ("mmvet-capability-string", "mmvet", False,
     lambda d: edit_json(d / "mm-vet.json", lambda q: {**q, "v1_1": {**q["v1_1"], "capability": "rec"}}),
     r"mm-vet.json question v1_1: capability must be a non-empty list of text, got 'rec'"),
    ("mmvet-question-null", "mmvet", False,
     lambda d: edit_json(d / "mm-vet.json", lambda q: {**q, "v1_0": {**q["v1_0"], "question": None}}),
     r"mm-vet.json question v1_0: question must be non-empty text, got None"),
    ("mmvet-empty", "mmvet", False, lambda d: (d / "mm-vet.json").write_text("{}"), r"mm-vet.json: no questions"),
    ("mmvet-list", "mmvet", False, lambda d: (d / "mm-vet.json").write_text("[]"),
     r"mm-vet.json: expected an object keyed by question id, got list"),
    ("mmvet-key-twice", "mmvet", False, lambda d: (d / "mm-vet.json").write_text(
        '{"v1_0": ' + json.dumps(MMVET["v1_0"]) + ', "v1_0": ' + json.dumps(MMVET["v1_1"]) + "}"),
     r"mm-vet.json: key 'v1_0' appears twice with different values"),
    ("mmvet-nested-deep", "mmvet", False, lambda d: (d / "mm-vet.json").write_text("[" * 100_000 + "]" * 100_000),
     r"mm-vet.json: JSON nested too deep"),
    ("mmvet-image-outside", "mmvet", False,
     lambda d: edit_json(d / "mm-vet.json", lambda q: {**q, "v1_0": {**q["v1_0"], "imagename": "/etc/hostname"}}),
     r"MM-Vet question v1_0 \(.*mm-vet.json\): image /etc/hostname leads outside the image folder"),
    ("mmvet-answer-null", "mmvet", True, lambda d: (d / "mmvet_answers.json").write_text('{"v1_0": null, "v1_1": "2"}'),
     r"mmvet_answers.json answer 'v1_0': the answer must be text, got None"),
    ("mmvet-answer-list", "mmvet", True, lambda d: (d / "mmvet_answers.json").write_text('{"v1_0": "a", "v1_1": [2]}'),
     r"mmvet_answers.json answer 'v1_1': the answer must be text, got \[2\]"),
    # ---- LLaVA-Bench -----------------------------------------------------------------------------
    ("llava-bench-no-reference", "llava-bench", False,
     lambda d: edit_lines(d / "llava-bench/answers_gpt4.jsonl", lambda r: r[:1]),
     r"questions.jsonl line 2: question 1 has no reference answer in answers_gpt4.jsonl"),
    ("llava-bench-duplicate-question", "llava-bench", False,
     lambda d: edit_lines(d / "llava-bench/questions.jsonl", lambda r: r + [{**r[0], "text": "Another?"}]),
     r"questions.jsonl line 3: question_id '0' is also line 1's, with other content"),
    ("llava-bench-caption-twice", "llava-bench", False,
     lambda d: edit_lines(d / "llava-bench/context.jsonl", lambda r: r + [{"image": "a.png", "caption": "Blue."}]),
     r"context.jsonl line 3: image 'a.png' is also line 1's, with other content"),
    ("llava-bench-category-number", "llava-bench", False,
     lambda d: edit_lines(d / "llava-bench/questions.jsonl", at(0, category=3)),
     r"questions.jsonl line 1 \(question 0\): category must be non-empty text, got 3"),
    ("llava-bench-reference-null", "llava-bench", False,
     lambda d: edit_lines(d / "llava-bench/answers_gpt4.jsonl", at(1, text=None)),
     r"answers_gpt4.jsonl line 2: text must be non-empty text, got None"),
    ("llava-bench-image-truncated", "llava-bench", False,
     lambda d: (d / "llava-bench/images/b.png").write_bytes(png()[:60]),
     r"LLaVA-Bench question 1 \(.*llava-bench\): image .*b.png is not readable"),
    ("llava-bench-answer-number", "llava-bench", True, lambda d: edit_lines(d / "llava_answers.jsonl", at(0, text=5)),
     r"llava_answers.jsonl line 1: text must be text, got 5"),
    # ---- MT-Bench --------------------------------------------------------------------------------
    ("mtbench-three-turns", "mtbench", False,
     lambda d: edit_lines(d / "question.jsonl", at(0, turns=["a", "b", "c"])),
     r"question.jsonl line 1 \(question 81\): 3 turns; MT-Bench's judges grade 2 at most"),
    ("mtbench-turn-number", "mtbench", False, lambda d: edit_lines(d / "question.jsonl", at(1, turns=["a", 2])),
     r"question.jsonl line 2 \(question 82\): turns\[1\] must be non-empty text, got 2"),
    ("mtbench-no-turns", "mtbench", False, lambda d: edit_lines(d / "question.jsonl", at(1, turns=[])),
     r"question.jsonl line 2 \(question 82\): turns must be a non-empty list of text"),
    ("mtbench-duplicate-id", "mtbench", False,
     lambda d: edit_lines(d / "question.jsonl", lambda r: r + [{**r[0], "turns": ["x", "y"]}]),
     r"question.jsonl line 3: question_id '81' is also line 1's, with other content"),
    ("mtbench-reference-number", "mtbench", False, lambda d: edit_lines(d / "question.jsonl", at(0, reference=[4])),
     r"question.jsonl line 1 \(question 81\): reference\[0\] must be text, got 4"),
    ("mtbench-answer-one-turn", "mtbench", True, lambda d: edit_lines(d / "mtbench_answers.jsonl", at(
        0, choices=[{"index": 0, "turns": ["only one"]}])),
     r"mtbench_answers.jsonl line 1: choices\[0\].turns has 1 item\(s\), the question 2"),
    ("mtbench-answer-no-choices", "mtbench", True,
     lambda d: edit_lines(d / "mtbench_answers.jsonl", at(1, choices="DELETE", text="hi")),
     r"mtbench_answers.jsonl line 2: expected an answer line FastChat's \{question_id, choices: \[\{turns\}\]\}"),
    ("mtbench-answer-choices-null", "mtbench", True,
     lambda d: edit_lines(d / "mtbench_answers.jsonl", at(1, choices=None)),
     r"mtbench_answers.jsonl line 2: choices must be a list whose first item holds 'turns', got None"),
    ("mtbench-answer-turn-null", "mtbench", True, lambda d: edit_lines(d / "mtbench_answers.jsonl", at(
        0, choices=[{"index": 0, "turns": ["a", None]}])),
     r"mtbench_answers.jsonl line 1: choices\[0\].turns\[1\] must be text, got None"),
    # ---- AlpacaEval ------------------------------------------------------------------------------
    ("alpaca-not-a-list", "alpaca-eval", False, lambda d: (d / "alpaca_eval.json").write_text('{"a": 1}'),
     r"alpaca_eval.json: expected a JSON list of \{instruction, output\}"),
    ("alpaca-empty", "alpaca-eval", False, lambda d: (d / "alpaca_eval.json").write_text("[]"),
     r"alpaca_eval.json: no instructions"),
    ("alpaca-instruction-null", "alpaca-eval", False,
     lambda d: edit_json(d / "alpaca_eval.json", at(1, instruction=None)),
     r"alpaca_eval.json item 1: instruction must be non-empty text, got None"),
    ("alpaca-duplicate-instruction", "alpaca-eval", False,
     lambda d: edit_json(d / "alpaca_eval.json", lambda r: r + [{**r[0], "output": "Hello!"}]),
     r"alpaca_eval.json item 2: instruction 'Say hi.' is also item 0's, with other content"),
    ("alpaca-answer-null", "alpaca-eval", True, lambda d: edit_json(d / "alpaca_answers.json", at(0, output=None)),
     r"alpaca_answers.json item 0: output must be text, got None"),
    ("alpaca-answer-list", "alpaca-eval", True, lambda d: edit_json(d / "alpaca_answers.json", at(1, output=["ok"])),
     r"alpaca_answers.json item 1: output must be text, got \['ok'\]"),
    ("alpaca-answer-twice", "alpaca-eval", True, lambda d: edit_json(
        d / "alpaca_answers.json", lambda r: r + [{"instruction": "Say hi.", "output": "other"}]),
     r"alpaca_answers.json item 2: a second, different answer to question 'Say hi.' \(the first is item 0\)"),
]


@pytest.mark.parametrize("benchmark,answers,mutate,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_benchmark_file_is_named_before_any_work_and_no_result_is_written(bench, benchmark, answers, mutate,
                                                                                 message):
    mutate(bench)
    said = run_refused(bench, benchmark, answers)
    assert re.search(message, said), said
    assert NO_MODEL not in said and "judge failed" not in said  # stopped at the files, not later


@pytest.mark.parametrize("benchmark", ["pope", "mmbench", "mmvet", "llava-bench", "mtbench", "alpaca-eval"])
@pytest.mark.parametrize("answers", [False, True])
def test_the_unmutated_files_pass_every_check(bench, benchmark, answers):
    """The control: with good files a run gets past them to the model (generating), or grades the
    answers (POPE, MMBench) or reaches the judge (judged benchmarks, whose judge here is unreachable)."""
    if answers and benchmark in ("pope", "mmbench"):
        result = eval_cli.main(command(bench, benchmark, answers))
        assert result["score"] == pytest.approx(100.0 if benchmark == "mmbench" else 1.0)
        return
    said = run_refused(bench, benchmark, answers)
    assert (f"{NO_MODEL}: not a checkpoint folder" in said) if not answers else ("the judge failed" in said), said


def test_a_record_repeated_with_the_same_content_is_dropped_and_counted(bench, capsys):
    edit_lines(bench / "pope/coco_pope_random.json", lambda r: r + [r[0], r[1]])
    questions = benchmark_files.read_pope(bench / "pope/coco_pope_random.json")
    assert [q["question_id"] for q in questions] == [1, 2]
    assert "coco_pope_random.json: 2 repeated line(s) dropped (the same record twice)" in capsys.readouterr().err
    edit_lines(bench / "pope_answers.jsonl", lambda r: r + [r[0]])  # the same answer twice: one answer
    assert benchmark_files.read_pope_answers(bench / "pope_answers.jsonl", {"random-1": ("random", 1),
                                                                            "random-2": ("random", 2)}) == {
        "random-1": "Yes", "random-2": "No"}


def test_an_image_outside_the_folder_is_taken_when_asked(bench):
    edit_lines(bench / "pope/coco_pope_random.json", at(0, image="../images/../llava-bench/images/a.png"))
    with pytest.raises(SystemExit, match="leads outside the image folder"):
        eval_cli.main(command(bench, "pope", False))
    with pytest.raises(SystemExit, match=f"{NO_MODEL}: not a checkpoint folder"):
        eval_cli.main(command(bench, "pope", False) + ["--images-outside-folder"])
