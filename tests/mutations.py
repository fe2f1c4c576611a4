"""Every format tinyalign reads, mutated one thing at a time, and what its reader does with each.

    python tests/mutations.py                    # the table: cases and outcomes per format
    python tests/mutations.py --show accepted    # list the cases of one outcome (named, dropped, accepted, unnamed)

Each format has a good file (written here, in the format's official layout) and the reader the
project uses for it, taken as far as a run takes it before any model work (for training data: the
records and then the tokenised examples with their images checked). Each case changes one thing: the
file emptied, cut in half, given a byte that is not UTF-8 or JSON nested 100,000 deep; one field of
the first record deleted or replaced by a value of another type (null, a number, a fraction, true,
text, an empty text, a list, an object, NaN, 1e308); the first record repeated, as it is and changed.
The outcome of a case is one of

  named     refused with an error whose message names the file (or, for a folder's files, the folder)
  dropped   read, with fewer records coming out than from the good file (each dropped one is counted
            and its reason printed by the reader: an empty answer, a repeat, no conversations...)
  accepted  read with every record: a value the format allows (an id that is a number, a text "x")
  unnamed   any other exception: a traceback the user would have to decode, a bug

tests/test_mutations.py runs every case and requires no `unnamed` outcome. "accepted" is not judged
here (a text field that becomes "x" is still a valid file); the explicit checks of what must be
refused are the parametrized tests (test_bad_input.py, test_benchmark_files.py, test_crash.py).
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import math
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from PIL import Image  # noqa: E402

VALUES = {"null": None, "a number": 7, "a negative number": -1, "a fraction": 0.5, "true": True, "empty text": "",
          "text": "x", "an empty list": [], "a list": ["x"], "an object": {"x": 1}, "NaN": math.nan, "1e308": 1e308}
MAX_DEPTH = 4  # nested fields explored: record -> field -> item -> field


@dataclass
class Format:
    name: str
    write: Callable[[Path], Path]  # writes the good file (and what it needs) into a folder -> the file
    read: Callable[[Path], object]  # reads it as tinyalign does (what comes out: see `size`)
    kind: str = "json"  # json (one document), jsonl (one record per line) or tsv
    named_by: str = "file"  # "folder": a message naming the file's folder also names it


# ---------------------------------------------------------------------------------------------
# The formats: a good file each, and the project's reader
# ---------------------------------------------------------------------------------------------


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), "red").save(out, format="PNG")
    return out.getvalue()


def put(folder: Path, name: str, data, lines: bool | None = None) -> Path:
    """Write `data`: a list of records as JSON lines for .jsonl (or `lines`), else JSON (text as it is)."""
    path = folder / name
    if isinstance(data, str):
        path.write_text(data)
    elif name.endswith(".jsonl") if lines is None else lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        path.write_text(json.dumps(data, indent=1))
    (folder / "a.png").write_bytes(png_bytes())
    return path


def training_formats() -> list[Format]:
    from tinyalign.data import load_pairs, pair_examples, read_conversations, read_scored, select_best, sft_examples
    from tinyalign.demo.world import demo_processor
    from tinyalign.evaluation.annotate import read_done, read_prompts
    from train_steerlm import steer_conversations

    processor = demo_processor()
    rated = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2}
    low = {**rated, "correctness": 0, "helpfulness": 1}

    def sft(path):
        records, _ = read_conversations(path)
        return sft_examples(records, processor, path.parent, source=str(path))

    def pairs(path):
        return pair_examples(load_pairs(path)[0], processor, path.parent, source=str(path))

    def scored(path):  # pairs (DPO), the best answers (rejection sampling), rated conversations (SteerLM)
        return load_pairs(path)[0] + select_best(read_scored(path)[0])[0] + steer_conversations(path, "tinyalign")

    conversation = [{"from": "human", "value": "<image>\nWhat color is the square ?"},
                    {"from": "gpt", "value": "The square is red ."}]
    return [
        Format("SFT conversations (LLaVA)", lambda d: put(d, "sft.json", [
            {"id": "c1", "image": "a.png", "conversations": conversation},
            {"id": "c2", "conversations": [{"from": "human", "value": "Say hi ."}, {"from": "gpt", "value": "hi"}]}]),
            sft),
        Format("preference pairs (plain)", lambda d: put(d, "pairs.jsonl", [
            {"id": "p1", "image": "a.png", "prompt": "<image>\nWhat color ?", "chosen": "red", "rejected": "blue"},
            {"id": "p2", "prompt": "Say hi .", "chosen": "hi", "rejected": "bye"}]), pairs, "jsonl"),
        Format("preference pairs (the paper's file)", lambda d: put(d, "dpo.json", [
            {"id": "p1", "image": "a.png", "question": {"from": "human", "value": "<image>\nWhat color ?"},
             "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
             "ref_win_logp": -3.5, "ref_rej_logp": -9.25}]), pairs),
        Format("scored samples", lambda d: put(d, "scored.jsonl", [
            {"id": "s1", "image": "a.png", "prompt": "<image>\nWhat color ?", "responses": [
                {"text": "red", "scores": rated}, {"text": "blue", "scores": low}]},
            {"id": "s2", "prompt": "Say hi .", "responses": [{"text": "hi", "scores": rated},
                                                             {"text": "go", "scores": low}]}]), scored, "jsonl"),
        Format("annotate's output, read back to resume", lambda d: put(d, "scored_out.jsonl", [
            {"id": "s1", "prompt": "Say hi .", "responses": [{"text": "hi", "scores": rated}], "judge": "gpt-4o"},
            {"id": "s3", "prompt": "Go .", "responses": [{"text": "go", "scores": rated}], "judge": "gpt-4o"}]),
            lambda p: read_done(p)[0], "jsonl"),
        Format("annotate prompts", lambda d: put(d, "prompts.jsonl", [
            {"id": "q1", "image": "a.png", "prompt": "<image>\nWhat color ?"}, {"id": 2, "prompt": "Say hi ."}]),
            lambda p: read_prompts(p, p.parent), "jsonl"),
    ]


def benchmark_formats() -> list[Format]:
    from tinyalign.evaluation import benchmark_files as bf

    encoded = base64.b64encode(png_bytes()).decode()
    tsv = ("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
           f"0\tWhat is it?\tnan\tcat\tdog\t\t\tA\tanimals\t{encoded}\n"
           f"1000000\tWhat is it?\tnan\tdog\tcat\t\t\tB\tanimals\t{encoded}\n")
    pope = [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"},
            {"question_id": 2, "image": "a.png", "text": "Is there a dog?", "label": "no"}]
    mtbench = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
               {"question_id": 111, "category": "math", "turns": ["2 + 2?", "3 + 3?"], "reference": ["4", "6"]}]
    questions = {"81": 2, "111": 2}

    def pope_images(path):
        questions = bf.read_pope(path)
        for q in questions:
            bf.checked_image(path.parent, q["image"], f"{path} question {q['question_id']}")
        return questions

    def llava_pope(path):
        put(path.parent, "coco_pope_random.json", pope, lines=True)
        return bf.read_llava_pope(path, path.parent)

    def llava_bench(name):
        def write(d):
            (d / "images").mkdir(exist_ok=True)
            (d / "images" / "a.png").write_bytes(png_bytes())
            put(d, "questions.jsonl", [{"question_id": 0, "image": "a.png", "text": "Describe it.", "category": "detail"},
                                       {"question_id": 1, "image": "a.png", "text": "What?", "category": "conv"}])
            put(d, "context.jsonl", [{"id": "a", "image": "a.png", "caption": "A red square."}])
            put(d, "answers_gpt4.jsonl", [{"question_id": 0, "text": "A red square."}, {"question_id": 1, "text": "A."}])
            return d / name

        def read(path):
            questions = bf.read_llava_bench(path.parent)
            for q in questions:
                bf.checked_image(path.parent / "images", q["image"], f"{path.parent} question {q['question_id']}")
            return questions
        return Format(f"LLaVA-Bench {name}", write, read, "jsonl", named_by="folder")

    def mmvet(path):
        questions = bf.read_mmvet(path)
        for qid, q in questions.items():
            bf.checked_image(path.parent, q["imagename"], f"{path} question {qid}")
        return questions

    return [
        Format("POPE split (coco_pope_*.json)", lambda d: put(d, "coco_pope_random.json", pope, lines=True), pope_images,
               "jsonl"),
        Format("POPE, LLaVA's question file", lambda d: put(d, "llava_pope_test.jsonl", [
            {**{k: v for k, v in q.items() if k != "label"}, "category": "random"} for q in pope]), llava_pope, "jsonl"),
        Format("MMBench TSV", lambda d: put(d, "mmbench_dev.tsv", tsv), bf.read_mmbench, "tsv"),
        Format("MM-Vet (mm-vet.json)", lambda d: put(d, "mm-vet.json", {
            "v1_0": {"imagename": "a.png", "question": "What color?", "answer": "red", "capability": ["rec"]},
            "v1_1": {"imagename": "a.png", "question": "How many?", "answer": "1", "capability": ["rec", "ocr"]}}),
            mmvet),
        llava_bench("questions.jsonl"), llava_bench("context.jsonl"), llava_bench("answers_gpt4.jsonl"),
        Format("MT-Bench questions", lambda d: put(d, "question.jsonl", mtbench), bf.read_mtbench, "jsonl"),
        Format("MT-Bench reference answers", lambda d: put(d, "gpt-4.jsonl", [
            {"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["4", "6"]}]}]),
            bf.read_mtbench_references, "jsonl"),
        Format("AlpacaEval set", lambda d: put(d, "alpaca_eval.json", [
            {"instruction": "Say hi.", "output": "Hi!", "generator": "gpt4", "dataset": "x"},
            {"instruction": "Count.", "output": "1 2", "generator": "gpt4", "dataset": "x"}]), bf.read_alpaca_eval),
        Format("--answers: LLaVA answer lines", lambda d: put(d, "answers.jsonl", [
            {"question_id": 0, "text": "A"}, {"question_id": 1, "text": "B"}]),
            lambda p: bf.read_answers(p, {"0": None, "1": None}, "the benchmark"), "jsonl"),
        Format("--answers: POPE answer lines", lambda d: put(d, "pope_answers.jsonl", [
            {"question_id": 1, "text": "Yes", "category": "random"}, {"question_id": 2, "text": "No"}]),
            lambda p: bf.read_pope_answers(p, {"random-1": ("random", 1), "random-2": ("random", 2)}), "jsonl"),
        Format("--answers: FastChat model answers", lambda d: put(d, "model_answer.jsonl", [
            {"question_id": q, "model_id": "m", "choices": [{"index": 0, "turns": ["a", "b"]}]} for q in (81, 111)]),
            lambda p: bf.read_answers(p, questions, "MT-Bench"), "jsonl"),
        Format("--answers: MM-Vet answers", lambda d: put(d, "mmvet_answers.json", {"v1_0": "red", "v1_1": "1"}),
               lambda p: bf.read_answers(p, {"v1_0": None, "v1_1": None}, "MM-Vet")),
        Format("--answers: AlpacaEval outputs", lambda d: put(d, "outputs.json", [
            {"instruction": "Say hi.", "output": "hi"}, {"instruction": "Count.", "output": "1"}]),
            lambda p: bf.read_answers(p, {"Say hi.": None, "Count.": None}, "AlpacaEval")),
    ]


def run_formats() -> list[Format]:
    """What the judge, eval.py and a training run read back from their own files."""
    from tinyalign.evaluation.judge import read_prompt

    fastchat = [{"name": "single-v1", "type": "single", "system_prompt": "You judge.",
                 "prompt_template": "[Question]\n{question}\n[Answer]\n{answer}\nRate: [[rating]]",
                 "description": "general", "category": "general", "output_format": "[[rating]]"}]
    from tinyalign.evaluation.answers import read_generations
    from tinyalign.evaluation.benchmarks import checked_rating
    from tinyalign.evaluation.judge import JudgmentCache
    from tinyalign.infra.reference import ReferenceCache

    def judgments(path):
        cache = JudgmentCache(path)
        return [v for v in (cache.usable(k, checked_rating) for k in cache.entries) if v is not None]

    def reference_cache(path):
        cache = ReferenceCache.__new__(ReferenceCache)  # the file alone, without the run that keys it
        cache.path = path
        return cache.read()

    return [
        Format("eval answers made so far (generations.jsonl)", lambda d: put(d, "generations.jsonl", [
            {"id": "1", "key": "k1", "text": "Yes"}, {"id": "2", "key": "k2", "text": "No"}]),
            lambda p: read_generations(p, {"1": "k1", "2": "k2"}), "jsonl"),
        Format("judge cache (judgments.jsonl)", lambda d: put(d, "judgments.jsonl", [
            {"key": f"k{i}", "value": 6.0, "reply": "Fine. Rating: [[6]]", "judge": "gpt-4o", "prompt_version": "v"}
            for i in (1, 2)]), judgments, "jsonl"),
        Format("reference log-probs cache", lambda d: put(d, "ref.json", {"a1": [-3.5, -9.0], "b2": [-1.0, -2.0]}),
               reference_cache),
        Format("judge prompts (FastChat's judge_prompts.jsonl)", lambda d: put(d, "judge_prompts.jsonl", fastchat),
               lambda p: read_prompt(str(p), "single-v1").fill(question="q", answer="a"), "jsonl"),
        Format("judge prompts (LLaVA's rule.json)", lambda d: put(d, "rule.json", {
            "llava_bench_conv": {"role": "Assistant", "prompt": "Rate the two answers."}}),
               lambda p: read_prompt(str(p), "llava_bench_conv").fill(
                   context="c", question="q", answer_1="a", answer_2="b")),
    ] + checkpoint_formats()


def checkpoint_formats() -> list[Format]:
    """A model folder's config.json and preprocessor_config.json, read by load_model and the
    processor; a training checkpoint's state.json, read by --resume."""
    import tinyalign
    from tinyalign.demo.world import demo_config, demo_processor
    from tinyalign.infra.checkpoints import load_checkpoint, save_checkpoint

    model = tinyalign.random_model(demo_config(), seed=0)
    saved = {}

    def model_folder(d: Path, name: str) -> Path:
        if "model" not in saved:
            saved["model"] = tinyalign.save_model(model, Path(tempfile.mkdtemp()) / "model", processor=demo_processor())
        shutil.copytree(saved["model"], d / "model", dirs_exist_ok=True)
        (d / "a.png").write_bytes(png_bytes())
        return d / "model" / name

    def checkpoint(d: Path) -> Path:
        folder = save_checkpoint(d / "run", 3, {"param/w": model.lm_head.weight.detach()},
                                 {"step": 3, "args": {"lr": 1e-3}, "metrics_bytes": 0})
        return folder / "state.json"

    return [
        Format("model config.json", lambda d: model_folder(d, "config.json"), lambda p: tinyalign.load_model(p.parent),
               named_by="folder"),
        Format("preprocessor_config.json", lambda d: model_folder(d, "preprocessor_config.json"),
               lambda p: tinyalign.Processor.from_pretrained(p.parent).images(p.parent.parent / "a.png")),
        Format("checkpoint state.json", checkpoint, lambda p: load_checkpoint(p.parent), named_by="folder"),
    ]


def all_formats() -> list[Format]:
    return training_formats() + benchmark_formats() + run_formats()


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------


def leaf_paths(value, path=(), depth=0):
    """Paths to every field of the document, the first item of each list standing for all."""
    if depth >= MAX_DEPTH:
        return
    items = value.items() if isinstance(value, dict) else [(0, value[0])] if isinstance(value, list) and value else []
    for key, child in items:
        yield (*path, key)
        yield from leaf_paths(child, (*path, key), depth + 1)


def changed(document, path, value, delete=False):
    out = copy.deepcopy(document)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def dumps(document, kind: str) -> str:
    if kind == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in document)
    return json.dumps(document, indent=1)


def cases(fmt: Format, good: str) -> list[tuple[str, str | bytes]]:
    """(what changed, the mutated file's content)."""
    out = [("the file empty", ""), ("the file cut in half", good[:len(good) // 2]),
           ("a byte that is not UTF-8", good.encode()[:9] + b"\xff" + good.encode()[9:]),
           ("JSON nested 100,000 deep on a line of its own", good + "[" * 100_000 + "]" * 100_000 + "\n")]
    if fmt.kind == "tsv":
        return out + tsv_cases(good)
    document = [json.loads(line) for line in good.splitlines() if line.strip()] if fmt.kind == "jsonl" \
        else json.loads(good)
    paths = list(leaf_paths(document))
    if fmt.kind == "jsonl":  # the records' fields, not the line list itself
        paths = [p for p in paths if len(p) > 1]
    for path in paths:
        where = "/".join(map(str, path))
        out.append((f"{where} deleted", dumps(changed(document, path, None, delete=True), fmt.kind)))
        for label, value in VALUES.items():
            out.append((f"{where} = {label}", dumps(changed(document, path, value), fmt.kind)))
    if isinstance(document, list) and document:
        out.append(("the first record twice", dumps(document + [document[0]], fmt.kind)))
        out.append(("the first record twice, its last field changed in the second",
                    dumps(document + [changed(document[0], (list(document[0])[-1],), "changed")], fmt.kind)
                    if isinstance(document[0], dict) else ""))
    return out


def tsv_cases(good: str) -> list[tuple[str, str]]:
    header, *rows = good.splitlines()
    columns = header.split("\t")
    out = [("the header alone", header + "\n"), ("the first row twice", good + rows[0] + "\n"),
           ("the first row cut short", "\n".join([header, "\t".join(rows[0].split("\t")[:4])] + rows[1:]) + "\n"),
           ("the first row with an extra cell", "\n".join([header, rows[0] + "\textra"] + rows[1:]) + "\n")]
    for i, column in enumerate(columns):
        for label, value in {"empty": "", "nan": "nan", "text": "x", "-1": "-1", "1.5": "1.5",
                             "base64 of text": base64.b64encode(b"hello").decode()}.items():
            cells = rows[0].split("\t")
            cells[i] = value
            out.append((f"{column} = {label}", "\n".join([header, "\t".join(cells)] + rows[1:]) + "\n"))
    return out


# ---------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------


def size(result) -> int:
    """How many records a reader's result holds: the first of a (records, report) pair, a list's or a
    dict's length, 1 for anything else (a prompt, a model)."""
    if isinstance(result, tuple):
        return size(result[0])
    return len(result) if isinstance(result, (list, dict)) else 1


def outcome(fmt: Format, path: Path, good_size: int | None = None) -> tuple[str, str, int]:
    """(named | dropped | accepted | unnamed, the message, records out) of reading `path`."""
    try:
        n = size(fmt.read(path))
    except Exception as e:  # noqa: BLE001 - classifying every way a reader can fail is the point
        said = str(e)
        names = [path.name] + ([str(path.parent)] if fmt.named_by == "folder" else [])
        kind = "named" if any(n in said for n in names) else "unnamed"
        return kind, f"{type(e).__name__}: {said[:300]}", 0
    return ("dropped" if good_size is not None and n < good_size else "accepted"), "", n


def run(formats: list[Format] | None = None) -> list[dict]:
    """Every case of every format: [{format, case, outcome, message}]."""
    import contextlib
    import os
    import warnings

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats or all_formats():
            folder = Path(tmp) / f"f{len(results)}"
            folder.mkdir()
            path = fmt.write(folder)
            good = path.read_text()
            good_size = None
            for case, content in [("the good file", good)] + cases(fmt, good):
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
                        contextlib.redirect_stderr(quiet), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kind, said, n = outcome(fmt, path, good_size)
                if case == "the good file":
                    assert kind == "accepted", f"{fmt.name}: the good file is refused: {said}"
                    good_size = n
                    continue
                results.append({"format": fmt.name, "case": case, "outcome": kind, "message": said})
    return results


def table(results: list[dict]) -> str:
    counts = {}
    for r in results:
        counts.setdefault(r["format"], Counter())[r["outcome"]] += 1
    lines = ["| format | cases | named | dropped | accepted | unnamed |", "|---|---|---|---|---|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {sum(c.values())} | {c['named']} | {c['dropped']} | {c['accepted']} | "
                     f"{c['unnamed']} |")
    total = Counter(r["outcome"] for r in results)
    lines.append(f"| all {len(counts)} formats | {len(results)} | {total['named']} | {total['dropped']} | "
                 f"{total['accepted']} | {total['unnamed']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--show", choices=["named", "dropped", "accepted", "unnamed"], help="list the cases of this outcome")
    args = p.parse_args(argv)
    results = run()
    print(table(results))
    if args.show:
        for r in results:
            if r["outcome"] == args.show:
                print(f"- {r['format']}: {r['case']}" + (f"\n    {r['message']}" if r["message"] else ""))
    return results


if __name__ == "__main__":
    main()
