"""The sample -> rate pipeline against a stub judge served on 127.0.0.1 by the test."""

import json
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import ChatStub, serve

from tinyalign import annotate
from tinyalign.annotate import JudgeError, OpenAIJudge, annotate_prompts, parse_ratings

GOOD = ('The answer names the right colour and is short.\n'
        '{"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 2}')


class StubJudge(ChatStub, BaseHTTPRequestHandler):
    """Behaves according to the question: good, malformed once, HTTP 500 once, slow once, always bad."""

    calls = Counter()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][1]["content"][0]["text"]
        question = text.split("\n")[0].removeprefix("Question: ")
        StubJudge.calls[question] += 1
        first = StubJudge.calls[question] == 1
        if question == "q-500" and first:
            self.send_response(500)
            self.end_headers()
            return
        if question == "q-timeout" and first:
            time.sleep(1.0)  # longer than the client's time-out
        content = GOOD
        if (question == "q-malformed" and first) or question == "q-bad":
            content = "Looks fine to me, I would give it a four."
        self.reply(content)


@pytest.fixture
def judge_url():
    StubJudge.calls = Counter()
    yield from serve(StubJudge)


def two_answers(records):
    return [[f"{r['id']} answer A", f"{r['id']} answer B"] for r in records]


PROMPTS = [{"id": q, "prompt": q} for q in ["q-good", "q-malformed", "q-500", "q-timeout", "q-bad"]]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parse_ratings_is_strict():
    assert parse_ratings(GOOD)["correctness"] == 3
    with pytest.raises(JudgeError, match="no JSON object"):
        parse_ratings("four out of four")
    with pytest.raises(JudgeError, match="verbosity must be an integer 0-4"):
        parse_ratings('{"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 9}')


def test_retries_then_records_the_failure_and_a_rerun_resumes(judge_url, tmp_path):
    out = tmp_path / "scored.jsonl"
    judge = OpenAIJudge(judge_url, "stub-judge", api_key="k", timeout=0.5, retries=2, backoff=0.01)
    summary = annotate_prompts(PROMPTS, out, two_answers, judge)
    assert summary == {"rated now": 4, "failed now": 1, "already rated": 0, "pairs": 0}
    records = {r["id"]: r for r in lines(out)}
    assert set(records) == {p["id"] for p in PROMPTS}
    for q in ("q-good", "q-malformed", "q-500", "q-timeout"):
        assert [x["text"] for x in records[q]["responses"]] == [f"{q} answer A", f"{q} answer B"]
        assert records[q]["responses"][0]["scores"]["helpfulness"] == 4 and records[q]["judge"] == "stub-judge"
    assert "try 3: JudgeError: no JSON object" in records["q-bad"]["error"]
    assert StubJudge.calls["q-500"] == 3 and StubJudge.calls["q-timeout"] == 3  # one failure, then A and B
    before = dict(StubJudge.calls)
    summary = annotate_prompts(PROMPTS, out, two_answers, judge)  # the rerun: only the failed prompt again
    assert summary["already rated"] == 4 and summary["failed now"] == 1
    assert {q: StubJudge.calls[q] - before[q] for q in before} == {q: 0 for q in before} | {"q-bad": 3}
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(p["id"] for p in PROMPTS)  # nothing lost, nothing duplicated


def test_interrupted_run_is_completed_without_duplicates(judge_url, tmp_path):
    out = tmp_path / "scored.jsonl"
    judge = OpenAIJudge(judge_url, "stub-judge", timeout=0.5, retries=1, backoff=0.01)
    good = [{"id": f"p{i}", "prompt": "q-good"} for i in range(5)]
    annotate_prompts(good, out, two_answers, judge, max_prompts=2)  # as if stopped after two prompts
    assert [r["id"] for r in lines(out)] == ["p0", "p1"]
    calls = StubJudge.calls["q-good"]
    summary = annotate_prompts(good, out, two_answers, judge)
    assert summary["already rated"] == 2 and summary["rated now"] == 3
    assert [r["id"] for r in lines(out)] == ["p0", "p1", "p2", "p3", "p4"]
    assert StubJudge.calls["q-good"] - calls == 3 * 2  # only the new prompts' answers were judged


def test_command_line_with_the_model_and_the_rule_judge(tiny_world, tmp_path):
    out = tmp_path / "scored.jsonl"
    summary = annotate.main(["--model", str(tiny_world["checkpoint"]), "--prompts", str(tiny_world["prompts"]),
                             "--image-folder", str(tiny_world["images"]), "--out", str(out), "--judge", "rules",
                             "--n", "3", "--max-new-tokens", "6", "--max-prompts", "5", "--device", "cpu"])
    assert summary["rated now"] == 5
    for r in lines(out):
        assert len(r["responses"]) == 3 and set(r["responses"][0]["scores"]) == {
            "helpfulness", "correctness", "coherence", "complexity", "verbosity"}


def test_prompts_file_without_a_prompt_is_named(tmp_path):
    from tinyalign.data import DataError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "q"}\n{"id": "b", "question": "q"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl record 1: needs 'id' and 'prompt'"):
        annotate.main(["--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
