"""The sample -> rate pipeline against a stub judge served on 127.0.0.1 by the test."""

import json
import os
import random
import shutil
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import IMAGES, ChatStub, serve

from tinyalign.evaluation import annotate
from tinyalign.evaluation.annotate import JudgeError, OpenAIJudge, annotate_prompts, parse_ratings

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
    """A sampler as annotate_prompts takes one: (index in records, answers), in any order (here backwards)."""
    return [(i, [f"{r['id']} answer A", f"{r['id']} answer B"]) for i, r in reversed(list(enumerate(records)))]


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
    assert sorted(r["id"] for r in lines(out)) == ["p0", "p1"]
    calls = StubJudge.calls["q-good"]
    summary = annotate_prompts(good, out, two_answers, judge)
    assert summary["already rated"] == 2 and summary["rated now"] == 3
    assert sorted(r["id"] for r in lines(out)) == ["p0", "p1", "p2", "p3", "p4"]
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


def test_an_interrupted_model_run_resumes_to_what_one_run_writes(tiny_world, tmp_path, monkeypatch):
    """The model's sampler (continuous batching over 6 rows, 3 samples per prompt prefilled once),
    stopped by Ctrl-C while rating its 4th finished prompt, then rerun: every prompt rated once, and
    the file holds exactly what one uninterrupted run writes (the same samples: each prompt's
    randomness is keyed to its line in the prompts file, not to its place in the run)."""
    args = ["--model", str(tiny_world["checkpoint"]), "--prompts", str(tiny_world["prompts"]), "--image-folder",
            str(tiny_world["images"]), "--judge", "rules", "--n", "3", "--max-new-tokens", "6", "--max-prompts", "8",
            "--slots", "6", "--device", "cpu"]
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    annotate.main(args + ["--out", str(whole)])
    ratings = []
    real = annotate.RuleJudge.rate_record

    def interrupted(self, record, answer):
        ratings.append(1)
        if len(ratings) == 3 * 3 + 1:
            raise KeyboardInterrupt
        return real(self, record, answer)

    monkeypatch.setattr(annotate.RuleJudge, "rate_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        annotate.main(args + ["--out", str(part)])
    assert len(lines(part)) == 3
    monkeypatch.undo()
    summary = annotate.main(args + ["--out", str(part), "--max-prompts", "5"])
    assert summary["already rated"] == 3 and summary["rated now"] == 5
    by_id = lambda path: sorted(lines(path), key=lambda r: r["id"])  # noqa: E731
    assert by_id(part) == by_id(whole)
    assert len({a["text"] for r in lines(whole) for a in r["responses"]}) > len(lines(whole))  # samples differ


@pytest.mark.parametrize("second,message", [
    ('{"id": "b", "question": "q"}', r"prompts.jsonl record 1 \(id b\): 'prompt' must be non-empty text, got None"),
    ('{"id": "b", "prompt": "<image>  "}', r"record 1 \(id b\): 'prompt' must be non-empty text"),
    ('{"prompt": "q"}', r"prompts.jsonl record 1: 'id' must be text or a number, got None"),
    ('{"id": "b", "prompt": "q", "image": ["x.png"]}', r"record 1 \(id b\): 'image' must be a path, got \['x.png'\]"),
    ('{"id": "a", "prompt": "another q"}', r"prompts.jsonl record 1: id 'a' is also record 0's, with another prompt"),
    ('{"id": "b", "prompt": "q", "image": "missing.png"}', r"record 1 \(id b\): image .*missing.png not found"),
    ('{"id": "b", "prompt": "q", "image": "../secret.png"}', r"record 1: image .*secret.png leads outside the image "
                                                            r"folder .*--images-outside-folder"),
])
def test_a_bad_prompt_is_named_before_any_model_is_loaded(tmp_path, second, message):
    from tinyalign.data import DataError

    (tmp_path / "images").mkdir()
    shutil.copy(IMAGES / "chelsea.png", tmp_path / "secret.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "q"}\n' + second + "\n")
    with pytest.raises(DataError, match=message):  # --model names no model: the check must come first
        annotate.main(["--model", str(tmp_path / "nothing"), "--prompts", str(prompts), "--out",
                       str(tmp_path / "o.jsonl"), "--image-folder", str(tmp_path / "images")])


def test_prompts_a_file_repeats_are_counted_and_an_image_outside_is_taken_only_when_asked(tmp_path):
    from tinyalign.data import DataError
    from tinyalign.evaluation.annotate import read_prompts

    shutil.copy(IMAGES / "chelsea.png", tmp_path / "cat.png")
    (tmp_path / "images").mkdir()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "prompt": "q", "image": "../cat.png"}\n' * 2)
    with pytest.raises(DataError, match=r"record 0: image .*cat.png leads outside the image folder"):
        read_prompts(prompts, tmp_path / "images")
    records, report = read_prompts(prompts, tmp_path / "images", images_anywhere=True)
    assert records == [{"id": 1, "prompt": "q", "image": "../cat.png"}]
    assert report.dropped == {"the same record twice": 1}


def test_an_out_that_is_a_folder_is_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "q"}\n')
    with pytest.raises(SystemExit) as stop:
        annotate.main(["--model", "m", "--prompts", str(prompts), "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert f"--out {tmp_path} is a folder; name the scored-samples file to write" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Crashes and a second process: nothing lost, nothing judged twice
# ---------------------------------------------------------------------------------------------


class FixedJudge:
    """Rates every answer the same, without a server."""

    model = "fixed"

    def rate(self, question, answer, image):
        return {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2}


def test_a_torn_last_line_is_dropped_and_its_prompt_rated_again(tmp_path):
    out = tmp_path / "scored.jsonl"
    prompts = [{"id": f"p{i}", "prompt": "q"} for i in range(3)]
    annotate_prompts(prompts[:1], out, two_answers, FixedJudge())
    whole = out.read_text()
    out.write_text(whole + whole.replace("p0", "p1")[:40])  # a crash in the middle of p1's line
    summary = annotate_prompts(prompts, out, two_answers, FixedJudge())
    assert summary["already rated"] == 1 and summary["rated now"] == 2
    assert sorted(r["id"] for r in lines(out)) == ["p0", "p1", "p2"]  # every line parses, each prompt once


def test_a_second_annotator_on_the_same_output_is_refused_and_nothing_is_lost(tmp_path):
    from tinyalign.infra.files import RunInUse

    out = tmp_path / "scored.jsonl"
    prompts = [{"id": f"p{i}", "prompt": "q"} for i in range(40)]
    go_on, ready = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the first annotator: rates 20 prompts, then waits inside its run, holding the output
        def sample(records):
            for i, answers in two_answers(records):
                if records[i]["id"] == "p3":  # 16 of its 20 prompts written (backwards: p19 .. p4)
                    os.write(ready[1], b"1")
                    os.read(go_on[0], 1)
                yield i, answers

        try:
            annotate_prompts(prompts[:20], out, sample, FixedJudge())
        finally:
            os._exit(0)
    os.read(ready[0], 1)
    try:
        with pytest.raises(RunInUse, match=rf"{out} is in use by another run \(.*\"pid\": {pid}"):
            annotate_prompts(prompts, out, two_answers, FixedJudge())
    finally:
        os.write(go_on[1], b"1")
        os.waitpid(pid, 0)
    summary = annotate_prompts(prompts, out, two_answers, FixedJudge())  # the first one is done: now it may
    assert summary["already rated"] == 20 and summary["rated now"] == 20
    assert sorted(r["id"] for r in lines(out)) == sorted(p["id"] for p in prompts)


class RandomVerdicts:
    """A judge client whose verdict differs from call to call (and from process to process)."""

    model = "random-judge"
    calls = 0

    def ask(self, messages, parse):
        time.sleep(0.002)
        verdict = f"{os.getpid()}-{random.random()}"
        return verdict, verdict


def test_two_processes_sharing_a_judge_cache_score_with_the_first_verdict(tmp_path):
    """Two eval processes judge the same 24 answers through one cache: each key is written once,
    both score with that first verdict, and a rerun reproduces it without asking the judge."""
    from tinyalign.evaluation.judge import Judge

    cache = tmp_path / "judgments.jsonl"
    items = [{"id": i, "system": "", "prompt": f"grade {i}", "version": "v1", "answer": f"answer {i}", "images": []}
             for i in range(24)]
    children = []
    for n in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                results = Judge(RandomVerdicts(), cache, workers=4).judge_all(items, parse=str)
                (tmp_path / f"results{n}.json").write_text(json.dumps([r["value"] for r in results]))
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    written = lines(cache)
    assert len({e["key"] for e in written}) == len(written) == 24  # each key once: the first verdict
    first = {e["key"]: e["value"] for e in written}

    class NeverAsked(RandomVerdicts):
        def ask(self, messages, parse):
            raise AssertionError("a rerun asked the judge")

    rerun = Judge(NeverAsked(), cache)
    again = [r["value"] for r in rerun.judge_all(items, parse=str)]
    assert sorted(again) == sorted(first.values())
    for n in range(2):
        assert json.loads((tmp_path / f"results{n}.json").read_text()) == again
