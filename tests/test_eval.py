"""eval.py end to end on a tiny checkpoint: benchmark files in their exact formats, a stub judge
served on 127.0.0.1 by the test, resumable generation, bad input named, results never half-written."""

import importlib
import json
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import ChatStub, serve

from tinyalign.demo.world import make_benchmarks
from tinyalign.evaluation import benchmark_files, benchmarks, report
from tinyalign.evaluation.answers import generate_answers, read_generations
from tinyalign.infra.files import RunInUse, write_json

eval_cli = importlib.import_module("eval")  # the top-level eval.py


class StubJudge(ChatStub, BaseHTTPRequestHandler):
    """Answers like a judge for each benchmark's prompt. A question naming q-500, q-timeout or
    q-malformed misbehaves once; one naming q-bad never gives a usable reply."""

    calls = Counter()
    bodies = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        assert body["temperature"] == 0
        marker = next((m for m in ("q-500", "q-timeout", "q-malformed", "q-bad") if m in prompt), None)
        StubJudge.calls[marker or prompt[:200]] += 1
        first = StubJudge.calls[marker] == 1 if marker else True
        if marker == "q-500" and first:
            self.send_response(500)
            self.end_headers()
            return
        if marker == "q-timeout" and first:
            time.sleep(1.0)  # longer than the client's time-out
        if (marker == "q-malformed" and first) or marker == "q-bad":
            reply = "I like this answer a lot."
        elif "Correct answer:" in prompt:  # MM-Vet
            reply = "Partly right.\n0.5" if "q-half" in prompt else "Right.\n1.0"
        elif "[Assistant 1]" in prompt or "[Assistant 2]" in prompt:  # LLaVA-Bench, ours and LLaVA's layout
            reply = "8 6\nThe first answer is more detailed."
        elif "Rating: [[" in prompt or "[[rating]]" in str(body["messages"]):  # MT-Bench
            reply = "Reasonable. Rating: [[4]]" if "reference answer" in prompt.lower() else "Fine. Rating: [[6]]"
        else:  # AlpacaEval: always prefers output (a)
            reply = "Output (a) follows the instruction.\na"
        self.reply(reply)


@pytest.fixture
def judge_url():
    StubJudge.calls, StubJudge.bodies = Counter(), []
    yield from serve(StubJudge)


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    return make_benchmarks(tmp_path_factory.mktemp("bench"), n=12)


def run(*argv):
    return eval_cli.main([str(a) for a in argv])


def judge_args(url, tmp_path):
    return ["--judge-url", url, "--judge-model", "stub-judge", "--judge-cache", tmp_path / "cache.jsonl",
            "--judge-timeout", 0.5, "--backoff", 0.01, "--retries", 2, "--max-new-tokens", 4]


# ---- no judge -----------------------------------------------------------------------------------

def test_pope_writes_llava_answers_and_scores_them(tiny_world, bench_files, tmp_path):
    result = run("pope", "--model", tiny_world["checkpoint"], "--pope-dir", bench_files["pope_dir"],
                 "--image-folder", bench_files["image_folder"], "--out", tmp_path, "--max-new-tokens", 4)
    lines = [json.loads(x) for x in (tmp_path / "pope" / "answers.jsonl").read_text().splitlines()]
    questions = benchmark_files.read_pope(bench_files["pope_dir"] / "coco_pope_random.json")
    assert [x["question_id"] for x in lines] == [q["question_id"] for q in questions]
    assert {x["category"] for x in lines} == {"random"}
    # The score is recomputed here from the answer file alone.
    expected = benchmarks.pope_metrics([benchmarks.yes_or_no(x["text"]) for x in lines], [q["label"] for q in questions])
    saved = json.loads((tmp_path / "pope" / "results.json").read_text())
    assert saved["splits"]["random"] == pytest.approx(expected) and saved["score"] == pytest.approx(expected["f1"])
    assert result["score"] == saved["score"] and saved["model"] == str(tiny_world["checkpoint"])


def test_pope_grades_an_answers_file_with_llavas_question_file(bench_files, tmp_path):
    """LLaVA's llava_pope_test.jsonl (ids + category, its texts already ending in the short-answer
    instruction) and an answer file made elsewhere: graded, no model loaded (the --model does not exist)."""
    questions = benchmark_files.read_pope(bench_files["pope_dir"] / "coco_pope_random.json")
    llava = tmp_path / "llava_pope_test.jsonl"
    llava.write_text("".join(json.dumps({"question_id": 500 + i, "image": q["image"], "category": "random",
                                         "text": q["text"] + benchmarks.POPE_SUFFIX}) + "\n" for i, q in enumerate(questions)))
    texts = ["No!" if i % 3 == 0 else ("No, there is none." if i % 3 == 1 else "Yes") for i in range(len(questions))]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": 500 + i, "text": t}) + "\n" for i, t in enumerate(texts)))
    result = run("pope", "--model", tmp_path / "no-such-model", "--pope-dir", bench_files["pope_dir"],
                 "--questions", llava, "--answers", answers, "--out", tmp_path / "run")
    expected = benchmarks.pope_metrics(["yes" if i % 3 != 1 else "no" for i in range(len(questions))],
                                  [q["label"] for q in questions])
    assert result["splits"]["random"] == pytest.approx(expected)
    answers.write_text(json.dumps({"question_id": 999, "text": "Yes"}) + "\n")
    with pytest.raises(SystemExit, match=r"answers.jsonl line 1: answer id '999' is not a POPE question"):
        run("pope", "--model", tmp_path / "no-such-model", "--pope-dir", bench_files["pope_dir"],
            "--questions", llava, "--answers", answers, "--out", tmp_path / "run")


def test_mmbench_answers_each_row_once_scores_groups_and_submits_raw_text(tiny_world, bench_files, tmp_path):
    run("mmbench", "--model", tiny_world["checkpoint"], "--tsv", bench_files["mmbench"], "--out", tmp_path,
        "--max-new-tokens", 4)
    generations = read_generations(tmp_path / "mmbench" / "generations.jsonl")
    rows = benchmark_files.read_mmbench(bench_files["mmbench"])
    assert len(rows) == 4 * 4 + 8 * 3  # colour questions: 4 rotations; shape and count: 3
    assert sorted(generations) == sorted(str(r["index"]) for r in rows)  # each row asked once
    predictions = {r["index"]: benchmarks.extract_option(generations[str(r["index"])], r["options"]) for r in rows}
    saved = json.loads((tmp_path / "mmbench" / "results.json").read_text())
    assert saved["score"] == pytest.approx(100 * benchmarks.mmbench_scores(rows, predictions)["accuracy"])
    assert saved["questions"] == 12 and saved["rows"] == 40
    submission = (tmp_path / "mmbench" / "submission.tsv").read_text().splitlines()
    header = submission[0].split("\t")
    # LLaVA's scripts/convert_mmbench_for_submission.py lines 21-25: hint, category, image, l2-category
    # dropped; "prediction", the raw answer, the 7th column.
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer"]
    assert len(submission) == len(rows) + 1
    assert [line.split("\t")[6] for line in submission[1:]] == [generations[str(r["index"])] for r in rows]
    # The Excel copy holds the same cells (read back from its sheet XML).
    import re
    import zipfile
    from xml.sax.saxutils import unescape

    with zipfile.ZipFile(tmp_path / "mmbench" / "submission.xlsx") as z:
        assert {"[Content_Types].xml", "xl/workbook.xml", "xl/worksheets/sheet1.xml"} <= set(z.namelist())
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
    cells = [[unescape(c) for c in re.findall(r"<t[^>]*>(.*?)</t>", row)]
             for row in re.findall(r"<row [^>]*>(.*?)</row>", sheet)]
    assert cells == [line.split("\t") for line in submission]


def test_mmbench_grades_an_answers_file(bench_files, tmp_path):
    """LLaVA's answer lines {question_id, text} for every row: graded as they are, no model loaded."""
    rows = benchmark_files.read_mmbench(bench_files["mmbench"])
    letters = {r["index"]: r["answer"] for r in rows}
    wrong = rows[3]["index"]  # a rotation of question 0 wrong: question 0 fails, the other 11 pass
    lines = [{"question_id": i, "text": f"I think {letter if i != wrong else 'Z'}"} for i, letter in letters.items()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run("mmbench", "--model", tmp_path / "no-such-model", "--tsv", bench_files["mmbench"],
                 "--answers", answers, "--out", tmp_path / "run")
    assert rows[3]["index"] % 1_000_000 == 0
    assert result["score"] == pytest.approx(100 * 11 / 12) and result["row_accuracy"] == pytest.approx(100 * 39 / 40)


def test_interrupted_generation_resumes_where_it_stopped(tiny_world, bench_files, tmp_path, monkeypatch):
    import sys

    from tinyalign import Processor, load_model

    decoding = sys.modules["tinyalign.speed.decoding"]

    model, processor = load_model(tiny_world["checkpoint"]), Processor.from_pretrained(tiny_world["checkpoint"])
    questions = benchmark_files.read_pope(bench_files["pope_dir"] / "coco_pope_random.json")
    items = [{"id": str(q["question_id"]), "images": [bench_files["image_folder"] / q["image"]],
              "turns": [{"from": "human", "value": "<image>\n" + q["text"]}]} for q in questions]
    full = generate_answers(model, processor, items, tmp_path / "full.jsonl", 4, batch_size=4)

    real, calls = decoding.ContinuousBatch.start, Counter()  # one call per question given a row

    def crashes_on_fifth_question(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run: 4 rows, 4 answers finished
        return real(*args, **kwargs)

    monkeypatch.setattr(decoding.ContinuousBatch, "start", crashes_on_fifth_question)
    with pytest.raises(KeyboardInterrupt):
        generate_answers(model, processor, items, tmp_path / "part.jsonl", 4, batch_size=4)
    assert len(read_generations(tmp_path / "part.jsonl")) == 4  # the finished answers were kept
    calls.clear()
    monkeypatch.setattr(decoding.ContinuousBatch, "start", lambda *a, **k: (calls.update(["n"]), real(*a, **k))[1])
    resumed = generate_answers(model, processor, items, tmp_path / "part.jsonl", 4, batch_size=4)
    assert calls["n"] == 8  # only the 8 missing answers were generated
    assert resumed == full
    assert len((tmp_path / "part.jsonl").read_text().splitlines()) == len(items)  # nothing duplicated


def test_preference_of_the_reference_itself_has_zero_margin(tiny_world, bench_files, tmp_path):
    result = run("preference", "--model", tiny_world["checkpoint"], "--reference", tiny_world["checkpoint"],
                 "--data", bench_files["pairs"], "--image-folder", bench_files["image_folder"], "--out", tmp_path)
    assert result["margin"] == 0.0 and result["score"] == 0.0 and len(result["samples"]) == 12


# ---- judged -------------------------------------------------------------------------------------

def mmvet_fixture(tmp_path, bench_files, questions):
    data = {f"v1_{i}": {"imagename": f"bench-{i:04d}.png", "question": q, "answer": "red", "capability": caps}
            for i, (q, caps) in enumerate(questions)}
    path = tmp_path / "mm-vet.json"
    path.write_text(json.dumps(data))
    return path


def test_mmvet_judged_with_retries_then_cached(tiny_world, bench_files, tmp_path, judge_url):
    questions = mmvet_fixture(tmp_path, bench_files, [
        ("What color ? q-half", ["rec"]), ("What color ? q-500", ["rec", "ocr"]),
        ("What color ? q-timeout", ["ocr"]), ("What color ? q-malformed", ["math"])])
    argv = ["mmvet", "--model", tiny_world["checkpoint"], "--questions", questions,
            "--image-folder", bench_files["image_folder"] / "images", "--out", tmp_path / "run",
            *judge_args(judge_url, tmp_path)]
    result = run(*argv)
    # q-half 0.5, the others 1.0 once their failed first try was retried.
    assert result["score"] == pytest.approx(100 * 3.5 / 4)
    assert result["by_capability"] == pytest.approx({"math": 100.0, "ocr": 100.0, "rec": 75.0})
    assert result["judge"]["judge_model"] == "stub-judge" and result["judge"]["prompts"]["mmvet"].startswith("mmvet-")
    answers = json.loads((tmp_path / "run" / "mmvet" / "answers.json").read_text())
    assert sorted(answers) == ["v1_0", "v1_1", "v1_2", "v1_3"]  # the official grader's input
    before = sum(StubJudge.calls.values())
    assert run(*argv)["score"] == result["score"]  # the rerun: same score ...
    assert sum(StubJudge.calls.values()) == before  # ... and not one request


def test_a_judge_that_never_answers_fails_loudly_and_keeps_the_last_result(tiny_world, bench_files, tmp_path,
                                                                           judge_url):
    good = mmvet_fixture(tmp_path, bench_files, [("What color ?", ["rec"]), ("How many ?", ["rec"])])
    out = tmp_path / "run"
    base = ["--model", tiny_world["checkpoint"], "--image-folder", bench_files["image_folder"] / "images",
            "--out", out, *judge_args(judge_url, tmp_path)]
    run("mmvet", "--questions", good, *base)
    kept = (out / "mmvet" / "results.json").read_text()
    bad = mmvet_fixture(tmp_path, bench_files, [("What color ?", ["rec"]), ("How many ? q-bad", ["rec"])])
    (out / "mmvet" / "generations.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"judge failed on 1 of 2 items \(first: v1_1"):
        run("mmvet", "--questions", bad, *base)
    assert (out / "mmvet" / "results.json").read_text() == kept
    assert "v1_1" in (out / "mmvet" / "judge_failures.json").read_text()


def test_llava_bench_relative_score(tiny_world, bench_files, tmp_path, judge_url):
    folder = tmp_path / "llava-bench"
    (folder / "images").mkdir(parents=True)
    for i in range(3):
        (folder / "images" / f"{i:03d}.png").write_bytes((bench_files["image_folder"] / f"images/bench-{i:04d}.png").read_bytes())
    cats = ["conv", "detail", "complex"]
    (folder / "questions.jsonl").write_text("".join(json.dumps(
        {"question_id": i, "image": f"{i:03d}.png", "text": "What color ?", "category": cats[i]}) + "\n" for i in range(3)))
    (folder / "context.jsonl").write_text("".join(json.dumps(
        {"id": f"{i:03d}", "image": f"{i:03d}.png", "caption": "Red shapes."}) + "\n" for i in range(3)))
    (folder / "answers_gpt4.jsonl").write_text("".join(json.dumps(
        {"question_id": i, "text": "The shapes are red."}) + "\n" for i in range(3)))
    result = run("llava-bench", "--model", tiny_world["checkpoint"], "--folder", folder, "--out", tmp_path / "run",
                 *judge_args(judge_url, tmp_path))
    assert result["score"] == pytest.approx(75.0)  # 6 / 8 on every question
    assert result["by_category"] == pytest.approx({"complex": 75.0, "conv": 75.0, "detail": 75.0})
    lines = (tmp_path / "run" / "llava_bench" / "answers.jsonl").read_text().splitlines()
    assert [json.loads(x)["question_id"] for x in lines] == [0, 1, 2]
    # LLaVA's rule.json: its system message, its review layout, one prompt per category
    # (llava/eval/eval_gpt_review_bench.py lines 17-20 and 91-102).
    rules = tmp_path / "rule.json"
    rules.write_text(json.dumps(LLAVA_RULES))
    StubJudge.bodies.clear()
    again = run("llava-bench", "--model", tiny_world["checkpoint"], "--folder", folder, "--out", tmp_path / "run",
                "--judge-prompt", rules, *judge_args(judge_url, tmp_path))
    assert again["score"] == pytest.approx(75.0)
    systems = {b["messages"][0]["content"] for b in StubJudge.bodies}
    assert systems == {"You are a helpful and precise assistant for checking the quality of the answer."}
    detail = next(b["messages"][1]["content"] for b in StubJudge.bodies if "(detail)" in b["messages"][1]["content"])
    assert detail.startswith("[Context]\nRed shapes.\n\n[Question]\nWhat color ?\n\n[Assistant 1]\nThe shapes are red.\n\n"
                             "[End of Assistant 1]\n\n[Assistant 2]\n")
    assert detail.endswith("[End of Assistant 2]\n\n[System]\nRate the two assistants (detail). Output two scores.\n\n")


def mtbench_questions(tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem .", "Make it shorter ."]},
        {"question_id": 111, "category": "math", "turns": ["What is 2 + 2 ?", "And 3 + 3 ?"],
         "reference": ["4", "6"]}]))
    return questions


def test_mtbench_fastchat_answers_reference_guided_and_distractor(tiny_world, bench_files, tmp_path, judge_url):
    result = run("mtbench", "--model", tiny_world["checkpoint"], "--questions", mtbench_questions(tmp_path),
                 "--out", tmp_path / "run", "--distractor-image", bench_files["image_folder"] / "images/bench-0000.png",
                 "--model-id", "llava-dpo", *judge_args(judge_url, tmp_path))
    # writing: 6 and 6; math (reference-guided): 4 and 4.
    assert result["turn_1"] == pytest.approx(5.0) and result["turn_2"] == pytest.approx(5.0)
    assert result["by_category"] == pytest.approx({"math": 4.0, "writing": 6.0})
    assert set(result["judge"]["prompts"]) == {"mtbench_single", "mtbench_single_ref", "mtbench_multi",
                                               "mtbench_multi_ref"}
    # FastChat's layout, so its show_result.py finds the model by its id.
    path = tmp_path / "run" / "mtbench" / "model_answer" / "llava-dpo.jsonl"
    answers = [json.loads(x) for x in path.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 111]
    assert all(len(a["choices"][0]["turns"]) == 2 and a["model_id"] == "llava-dpo" for a in answers)


FASTCHAT_JUDGE_PROMPTS = [  # the layout of FastChat's fastchat/llm_judge/data/judge_prompts.jsonl
    {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\nRate it: \"[[rating]]\".\n\n[Question]\n{question}\n\n[The Start of "
                        "Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "Prompt for general questions", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\nCompare with the reference, \"[[rating]]\".\n\n[Question]\n{question}\n\n"
                        "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
                        "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "Prompt for math", "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge the second answer, \"[[rating]]\".",
     "prompt_template": "### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n"
                        "### Assistant A:\n{answer_2}",
     "description": "multi-turn", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Judge the second answer against the "
     "reference answer, \"[[rating]]\".",
     "prompt_template": "### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n### User:\n{question_2}"
                        "\n\n### Reference answer:\n{ref_answer_2}\n\n### Assistant A:\n{answer_1}\n\n"
                        "### Assistant A:\n{answer_2}",
     "description": "multi-turn math", "category": "math", "output_format": "[[rating]]"},
]


def fastchat_answers(tmp_path, first_answer="A poem {ref_answer_1} here."):
    path = tmp_path / "model_answer.jsonl"
    path.write_text("".join(json.dumps({"question_id": q, "model_id": "m", "choices": [{"index": 0, "turns": t}]}) + "\n"
                            for q, t in [(81, [first_answer, "Shorter."]), (111, ["4", "6"])]))
    return path


def test_mtbench_with_fastchats_judge_prompts_and_an_answers_file(tmp_path, judge_url):
    """FastChat's judge_prompts.jsonl as it is: each judge's own system prompt and placeholders
    (fastchat/llm_judge/common.py `run_judge_single`, lines 135-167), filled in one pass: an answer that
    itself contains "{ref_answer_1}" is sent as written. --answers: graded, no model loaded."""
    prompts = tmp_path / "judge_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in FASTCHAT_JUDGE_PROMPTS))
    result = run("mtbench", "--model", tmp_path / "no-such-model", "--questions", mtbench_questions(tmp_path),
                 "--answers", fastchat_answers(tmp_path), "--judge-prompt", prompts, "--out", tmp_path / "run",
                 *judge_args(judge_url, tmp_path))
    assert result["by_category"] == pytest.approx({"math": 4.0, "writing": 6.0})
    sent = {(b["messages"][0]["content"], b["messages"][1]["content"]) for b in StubJudge.bodies}
    assert len(sent) == 4 and {system for system, _ in sent} == {r["system_prompt"] for r in FASTCHAT_JUDGE_PROMPTS}
    first = next(user for system, user in sent if user.startswith("[Instruction]\nRate it"))
    assert "[Question]\nWrite a poem .\n\n" in first and "A poem {ref_answer_1} here." in first
    math_second = next(user for _, user in sent if "### Reference answer:\n6" in user)
    assert "### Reference answer:\n4" in math_second and "### Assistant A:\n6" in math_second
    assert set(result["judge"]["prompts"]) == {f"judge_prompts.jsonl:{r['name']}" for r in FASTCHAT_JUDGE_PROMPTS}


def test_an_unfilled_placeholder_stops_before_any_request(tmp_path, judge_url):
    broken = [dict(r) for r in FASTCHAT_JUDGE_PROMPTS]
    broken[2]["prompt_template"] += "\n{judge_notes}"
    prompts = tmp_path / "judge_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in broken))
    with pytest.raises(ValueError, match=r"single-v1-multi-turn: no value for placeholder\(s\) \['judge_notes'\]"):
        run("mtbench", "--model", tmp_path / "no-such-model", "--questions", mtbench_questions(tmp_path),
            "--answers", fastchat_answers(tmp_path), "--judge-prompt", prompts, "--out", tmp_path / "run",
            *judge_args(judge_url, tmp_path))
    assert StubJudge.bodies == []


def test_mtbench_samples_with_fastchats_temperatures(tiny_world, tmp_path, monkeypatch):
    """fastchat/llm_judge/common.py temperature_config (lines 40-50): writing 0.7, math greedy; --greedy: all greedy."""
    import sys

    answers = sys.modules["tinyalign.evaluation.answers"]
    real, seen = answers.generate_stream, []

    def stream(model, prompts, **k):
        seen.extend([(k["temperature"], k["top_k"])] * len(prompts))  # one entry per question
        return real(model, prompts, **k)

    monkeypatch.setattr(answers, "generate_stream", stream)
    args = eval_cli.parse(["mtbench", "--model", str(tiny_world["checkpoint"]), "--questions",
                           str(mtbench_questions(tmp_path)), "--out", str(tmp_path / "run"), "--max-new-tokens", "3",
                           "--batch-size", "1"])
    eval_cli.mtbench_answers(args, benchmark_files.read_mtbench(args.questions))
    assert sorted(set(seen)) == [(0.0, 50), (0.7, 50)] and len(seen) == 4
    seen.clear()
    args.greedy, args.out = True, str(tmp_path / "greedy")
    eval_cli.mtbench_answers(args, benchmark_files.read_mtbench(args.questions))
    assert set(seen) == {(0.0, 50)}


LLAVA_RULES = {  # the layout of LLaVA's llava/eval/table/rule.json
    f"llava_bench_{c}": {"role": "Assistant", "prompt": f"Rate the two assistants ({c}). Output two scores."}
    for c in ("conv", "detail", "complex")}


def test_alpaca_eval_outputs_and_win_rate(tiny_world, tmp_path, judge_url):
    data = tmp_path / "alpaca_eval.json"
    instructions = [f"Say something about shape {i} ." for i in range(8)]
    data.write_text(json.dumps([{"instruction": s, "output": "Reference.", "generator": "ref", "dataset": "x"}
                                for s in instructions]))
    result = run("alpaca-eval", "--model", tiny_world["checkpoint"], "--data", data, "--out", tmp_path / "run",
                 *judge_args(judge_url, tmp_path))
    # The stub always picks (a): we win exactly where our output was shown first.
    import hashlib
    import random
    first = [random.Random(hashlib.sha256(s.encode()).digest()).random() < 0.5 for s in instructions]
    assert result["score"] == pytest.approx(100 * sum(first) / 8)
    assert 0 < sum(first) < 8  # the order really varies
    outputs = json.loads((tmp_path / "run" / "alpaca_eval" / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == instructions and outputs[0]["generator"] == "start"


# ---- bad input ------------------------------------------------------------------------------------

def test_missing_image_is_named_before_any_generation(tiny_world, bench_files, tmp_path):
    pope = tmp_path / "pope"
    pope.mkdir()
    (pope / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 5, "image": "images/nope.png", "text": "Is there a cat?", "label": "no"}) + "\n")
    with pytest.raises(SystemExit, match=r"POPE random question 5 \(.*coco_pope_random.json\): image .*nope.png not found"):
        run("pope", "--model", tiny_world["checkpoint"], "--pope-dir", pope, "--image-folder",
            bench_files["image_folder"], "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_malformed_line_is_named(tiny_world, tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text('{"question_id": 1, "category": "writing", "turns": ["Hi ."]}\n{"question_id": 2,\n')
    with pytest.raises(SystemExit, match=r"question.jsonl line 2: not valid JSON"):
        run("mtbench", "--model", tiny_world["checkpoint"], "--questions", questions, "--out", tmp_path / "run")


def test_answer_for_an_unknown_question_is_named(tiny_world, bench_files, tmp_path, judge_url):
    questions = mmvet_fixture(tmp_path, bench_files, [("What color ?", ["rec"])])
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"v1_0": "red", "v1_99": "blue"}))
    with pytest.raises(SystemExit, match=r"answers.json: answer id 'v1_99' is not a question"):
        run("mmvet", "--model", tiny_world["checkpoint"], "--questions", questions, "--answers", answers,
            "--out", tmp_path / "run", *judge_args(judge_url, tmp_path))


# ---- report -------------------------------------------------------------------------------------

def test_report_table_with_intervals(tmp_path):
    for name, correct in [("llava", [1, 0, 1, 0, 1, 1, 0, 1]), ("dpo", [1, 1, 1, 0, 1, 1, 1, 1])]:
        write_json(tmp_path / name / "mmbench" / "results.json", report.headline(
            "mmbench", 100 * sum(correct) / 8, "mean_percent", correct))
        write_json(tmp_path / name / "mtbench" / "results.json", report.headline(
            "mtbench", 6.0, "mean", [5, 7, 6, 6]))
    table = run("report", tmp_path / "llava", tmp_path / "dpo", "--resamples", 200) or (tmp_path / "report.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| model | MM-Vet | LLaVA-Bench | POPE (F1) | MMBench | MT-Bench |")
    assert rows[1].startswith("| llava | - | - | - | 62.5 [") and rows[2].startswith("| dpo | - | - | - | 87.5 [")
    assert "| 6.00 [" in rows[1]


def test_xlsx_cells_and_columns_past_z(tmp_path):
    import zipfile

    header = [f"h{i}" for i in range(30)]
    report.write_xlsx(tmp_path / "x.xlsx", header, [["a & <b>"] + [""] * 29])
    sheet = zipfile.ZipFile(tmp_path / "x.xlsx").read("xl/worksheets/sheet1.xml").decode()
    assert 'r="Z1"' in sheet and 'r="AA1"' in sheet and 'r="AD2"' in sheet and "a &amp; &lt;b&gt;" in sheet


def test_a_question_that_writes_control_tokens_is_text_to_the_model(tiny_world, bench_files, monkeypatch, tmp_path):
    """A benchmark question containing "<image>" and "</s>": the model sees exactly the item's one
    image and no end-of-sequence id in its prompt (generation, through eval's generate_answers)."""
    import sys

    from tinyalign import Processor, load_model

    decoding = sys.modules["tinyalign.speed.decoding"]
    real, prompts = decoding.ContinuousBatch.start, []  # start(self, input_ids, pixel_values, ...)
    monkeypatch.setattr(decoding.ContinuousBatch, "start", lambda *a, **k: (prompts.append(a[1]), real(*a, **k))[1])
    model, processor = load_model(tiny_world["checkpoint"]), Processor.from_pretrained(tiny_world["checkpoint"])
    item = {"id": "q1", "images": [bench_files["image_folder"] / "images/bench-0000.png"],
            "turns": [{"from": "human", "value": "<image>\nWhat does <image> or </s> mean ?"}]}
    generate_answers(model, processor, [item], tmp_path / "g.jsonl", 3)
    (ids,) = prompts[0].tolist()
    assert ids.count(processor.image_token_index) == processor.image_seq_length  # one image, not two
    assert processor.eos_token_id not in ids and ids.count(processor.bos_token_id) == 1


# ---- saved answers belong to what made them -------------------------------------------------------

def test_saved_answers_are_used_only_by_the_model_and_settings_that_made_them(tiny_world, bench_files, tmp_path,
                                                                              monkeypatch):
    """generations.jsonl files each answer under a key of its model's files and its generation settings:
    another model, or another --max-new-tokens, into the same --out generates its own answers (and
    scores them, under its own name); the same again generates nothing."""
    import sys

    import tinyalign
    from tinyalign.demo.world import demo_config, demo_processor

    other = tinyalign.save_model(tinyalign.random_model(demo_config(), seed=7), tmp_path / "other",
                                 processor=demo_processor())
    decoding = sys.modules["tinyalign.speed.decoding"]
    real, started = decoding.ContinuousBatch.start, []
    monkeypatch.setattr(decoding.ContinuousBatch, "start", lambda *a, **k: (started.append(1), real(*a, **k))[1])

    def pope(model, out, tokens=4):
        started.clear()
        result = run("pope", "--model", model, "--pope-dir", bench_files["pope_dir"], "--image-folder",
                     bench_files["image_folder"], "--out", out, "--max-new-tokens", tokens, "--prompt-suffix", "")
        return result, len(started), (out / "pope" / "answers.jsonl").read_text()

    shared = tmp_path / "shared"
    _, made, _ = pope(tiny_world["checkpoint"], shared)
    assert made == 12
    assert pope(tiny_world["checkpoint"], shared)[1] == 0  # the same model and settings: nothing generated
    result, made, answers = pope(other, shared)  # another model into the same folder
    alone, _, answers_alone = pope(other, tmp_path / "alone")
    assert made == 12 and answers == answers_alone and result["score"] == alone["score"]
    assert all(json.loads(x)["model_id"] == "other" for x in answers.splitlines())
    assert pope(other, shared, tokens=6)[1] == 12  # another answer length: answered again


def test_two_evals_on_one_generations_file_are_refused_naming_the_first(tiny_world, bench_files, tmp_path):
    """A live eval writing OUT/pope/generations.jsonl (here a process holding its lock) keeps a second
    one out, named, instead of both appending answers for the same questions."""
    import subprocess
    import sys

    (tmp_path / "pope").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tinyalign.infra.files import FolderLock; "
        f"FolderLock({str(tmp_path / 'pope')!r}, '.generations.jsonl.lock').acquire(); "
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=rf"generations.jsonl is in use by another run \(.*\"pid\": {holder.pid}"):
            run("pope", "--model", tiny_world["checkpoint"], "--pope-dir", bench_files["pope_dir"],
                "--image-folder", bench_files["image_folder"], "--out", tmp_path, "--max-new-tokens", 4)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "pope" / "generations.jsonl").exists()
