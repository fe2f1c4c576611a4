"""A judge's reply becomes a score only when it parses by the benchmark's rule AND lies on the scale
its prompt asks for; anything else is a failed try (retried, then listed in judge_failures.json), and
no results.json is written or changed. Answers come from --answers files, so no model runs."""

import json
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import serve
from test_eval import fastchat_answers, mtbench_questions, run

from tinyalign.evaluation import benchmarks


class ScriptedJudge(BaseHTTPRequestHandler):
    """Replies with `content` for every request: a string, or None (a reply without text)."""

    content = ""
    calls = 0

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        ScriptedJudge.calls += 1
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": ScriptedJudge.content}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge(tmp_path):
    ScriptedJudge.calls = 0
    for url in serve(ScriptedJudge):
        yield ["--judge-url", url, "--judge-model", "stub", "--judge-cache", tmp_path / "cache.jsonl",
               "--retries", 1, "--backoff", 0.01, "--judge-timeout", 2]


def mtbench(tmp_path, judge, *extra):
    return run("mtbench", "--model", tmp_path / "no-model", "--questions", mtbench_questions(tmp_path), "--answers",
               fastchat_answers(tmp_path), "--out", tmp_path / "run", *judge, *extra)


def llava_bench(tmp_path, judge, *extra):
    folder = tmp_path / "llava-bench"
    folder.mkdir(exist_ok=True)
    (folder / "questions.jsonl").write_text("".join(json.dumps(
        {"question_id": i, "image": f"{i}.png", "text": "What is it ?", "category": "conv"}) + "\n" for i in range(2)))
    (folder / "context.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": "A cat."}) + "\n"
                                                  for i in range(2)))
    (folder / "answers_gpt4.jsonl").write_text("".join(json.dumps({"question_id": i, "text": "A cat."}) + "\n"
                                                       for i in range(2)))
    answers = tmp_path / "llava_answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": "A dog."}) + "\n" for i in range(2)))
    return run("llava-bench", "--model", tmp_path / "no-model", "--folder", folder, "--answers", answers,
               "--out", tmp_path / "run", *judge, *extra)


def mmvet(tmp_path, judge):
    questions = tmp_path / "mm-vet.json"
    questions.write_text(json.dumps({"v1_0": {"imagename": "x.png", "question": "What ?", "answer": "a cat",
                                              "capability": ["rec"]}}))
    answers = tmp_path / "mmvet_answers.json"
    answers.write_text(json.dumps({"v1_0": "a dog"}))
    return run("mmvet", "--model", tmp_path / "no-model", "--questions", questions, "--answers", answers,
               "--out", tmp_path / "run", *judge)


def alpaca_eval(tmp_path, judge):
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps([{"instruction": "Say hi .", "output": "Hi !", "generator": "ref", "dataset": "x"}]))
    answers = tmp_path / "outputs.json"
    answers.write_text(json.dumps([{"instruction": "Say hi .", "output": "Hello ."}]))
    return run("alpaca-eval", "--model", tmp_path / "no-model", "--data", data, "--answers", answers,
               "--out", tmp_path / "run", *judge)


BENCHMARKS = {"mtbench": mtbench, "llava_bench": llava_bench, "mmvet": mmvet, "alpaca_eval": alpaca_eval}
# (benchmark, the judge's reply, what the failure names)
REFUSED = [("mtbench", "Great. Rating: [[15]]", "rating 15 is outside the judge's scale 1-10"),
           ("mtbench", "Rating: [[0]]", "rating 0 is outside the judge's scale 1-10"),
           ("llava_bench", "12 15\nBoth good.", "the reference's score 12 is outside"),
           ("llava_bench", "8 -3\nBad.", "the model's score -3 is outside"),
           ("llava_bench", "nan 5\nHm.", "the reference's score nan is outside"),
           ("mmvet", "Right.\n1.5", "score 1.5 is outside 0-1"),
           ("alpaca_eval", "Both are fine.\nc", "the last line should name output a or b"),
           *[(name, None, "the reply holds no text (content: None)") for name in BENCHMARKS]]


@pytest.mark.parametrize("name,reply,named", REFUSED)
def test_a_reply_off_the_scale_or_without_text_is_a_failed_try_never_a_score(tmp_path, judge, name, reply, named):
    ScriptedJudge.content = reply
    with pytest.raises(SystemExit, match=r"the judge failed on \d+ of \d+ items"):
        BENCHMARKS[name](tmp_path, judge)
    failures = json.loads((tmp_path / "run" / name / "judge_failures.json").read_text())
    assert failures and all(named in f["error"] for f in failures), failures[0]
    assert all(f["error"].count("try ") == 2 for f in failures)  # retried once (--retries 1), then given up
    assert not (tmp_path / "run" / name / "results.json").exists()


def test_the_official_parse_stays_one_flag_away(tmp_path, judge):
    """FastChat and LLaVA's scripts take a 15 as 15: --accept-any-rating reproduces their number."""
    ScriptedJudge.content = "Great. Rating: [[15]]"
    assert mtbench(tmp_path, judge, "--accept-any-rating")["score"] == 15.0
    ScriptedJudge.content = "12 15\nBoth good."
    assert llava_bench(tmp_path, judge, "--accept-any-rating")["score"] == pytest.approx(125.0)


def test_mtbench_with_no_rated_judgment_writes_no_score(tmp_path, judge):
    """FastChat leaves a -1 (no rating found) out of its means; when every judgment is -1 there is no
    mean: the run stops naming why, and an earlier results.json stays as it was."""
    ScriptedJudge.content = "Rating: [[7]]"
    kept = json.dumps(mtbench(tmp_path, judge)["score"])
    results = tmp_path / "run" / "mtbench" / "results.json"
    before = results.read_text()
    ScriptedJudge.content = "I would rather not rate this."
    (tmp_path / "cache.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"none of the 4 judgments holds a rating"):
        mtbench(tmp_path, judge)
    assert results.read_text() == before and kept == "7.0"


def test_a_cached_reply_an_older_rule_accepted_is_asked_again(tmp_path, judge):
    """The cache keeps the judge's raw reply; read back, it is parsed by today's rule. A cached 15 (from
    --accept-any-rating, or an older tinyalign) is not a score without the flag: the judge is asked
    again, and its usable verdict is written after the old line and used from then on."""
    ScriptedJudge.content = "Rating: [[15]]"
    mtbench(tmp_path, judge, "--accept-any-rating")
    asked = ScriptedJudge.calls
    ScriptedJudge.content = "Rating: [[6]]"
    assert mtbench(tmp_path, judge)["score"] == 6.0 and ScriptedJudge.calls == asked + 4
    assert mtbench(tmp_path, judge)["score"] == 6.0 and ScriptedJudge.calls == asked + 4  # from the cache
    assert mtbench(tmp_path, judge, "--accept-any-rating")["score"] == 15.0  # the first usable verdict stands


def test_the_checked_parsers_keep_the_official_rules_inside_the_scale():
    assert benchmarks.checked_rating("Rating: [[7.5]]") == benchmarks.parse_rating("Rating: [[7.5]]") == 7.5
    assert benchmarks.checked_rating("no rating here") == -1  # FastChat's -1, left out of the means
    assert benchmarks.checked_pair_scores("8 6\nok") == benchmarks.parse_pair_scores("8 6\nok") == (8.0, 6.0)
    for reply in ("Rating: [[10.5]]", "[[11]]"):
        with pytest.raises(ValueError, match="outside the judge's scale"):
            benchmarks.checked_rating(reply)
