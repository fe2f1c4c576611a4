"""The paper's benchmarks for any checkpoint, and the side-by-side table (Li, Lin & Pei 2024, Table 4).

    python eval.py pope        --model M --pope-dir pope/ --image-folder val2014/ --out runs/eval/dpo
    python eval.py mmbench     --model M --tsv mmbench_dev_20230712.tsv --out runs/eval/dpo
    python eval.py mmvet       --model M --questions mm-vet/mm-vet.json --image-folder mm-vet/images --out runs/eval/dpo
    python eval.py llava-bench --model M --folder llava-bench-in-the-wild/ --out runs/eval/dpo
    python eval.py mtbench     --model M --questions mt_bench/question.jsonl --references mt_bench/gpt-4.jsonl --out ...
    python eval.py alpaca-eval --model M --data alpaca_eval.json --out runs/eval/dpo
    python eval.py preference  --model M --reference START --data pairs.json --image-folder images/ --out ...
    python eval.py report runs/eval/llava runs/eval/dpo ...        # the table, with 95% bootstrap intervals

Every benchmark writes into OUT/<benchmark>/: generations.jsonl (answers as they are made: a rerun
resumes), the benchmark's official answer file, and results.json (score, per-question samples, judge
model and prompt version, steer ratings). Answers are greedy (the paper's eval scripts use
temperature 0) with the vicuna_v1 template. Judged benchmarks call any OpenAI-compatible endpoint
(--judge-url, --judge-model, key from $OPENAI_API_KEY) and cache every judgment on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from tinyalign import Processor, load_model
from tinyalign.batches import collate_pairs, pair_logps
from tinyalign.data import DataError, load_pairs, pair_examples
from tinyalign.evaluation import benchmark_files, benchmarks
from tinyalign.evaluation.benchmark_files import BenchmarkError
from tinyalign.evaluation.answers import generate_answers
from tinyalign.evaluation.judge import ChatClient, Judge, JudgePrompt, read_prompt, request
from tinyalign.evaluation.report import headline, report, write_xlsx
from tinyalign.hub import display_name, source_of
from tinyalign.infra.arguments import at_least, non_negative, positive, resolve_models
from tinyalign.infra.files import write_atomic, write_json
from tinyalign.infra.weights import model_digest
from tinyalign.losses import implicit_rewards, reward_comparison
from tinyalign.steer import STEER_TEMPLATES, parse_steer
from tinyalign.training import autocast

DEFAULT_MAX_NEW_TOKENS = {"pope": 128, "mmbench": 128, "mmvet": 1024, "llava_bench": 1024, "mtbench": 1024,
                          "alpaca_eval": 1024}


# ---------------------------------------------------------------------------------------------
# Shared plumbing: the model, the judge, where results go
# ---------------------------------------------------------------------------------------------


def load(args):
    """The checkpoint and its processor (loaded only once the benchmark files have been checked)."""
    # --revision still counts for a repo id parse() did not find (its folder: already that revision's)
    revision = None if Path(args.model).is_dir() else args.revision
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower, revision=revision)
    processor = Processor.from_pretrained(args.model, template=args.template, image_mode=args.image_mode,
                                          vision_tower=args.vision_tower, revision=revision)
    return model, processor


def answers(args, items, benchmark, model_and_processor=None) -> dict:
    """Answers for every item, greedy unless an item names a temperature (resuming from
    OUT/<benchmark>/generations.jsonl)."""
    model, processor = model_and_processor or load(args)
    made_by = {"model": model_digest(args.model), "template": args.template, "image_mode": args.image_mode,
               "vision_tower": args.vision_tower and Path(args.vision_tower).is_dir() and model_digest(args.vision_tower)}
    return generate_answers(model, processor, items, folder(args, benchmark) / "generations.jsonl",
                            args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[benchmark], args.batch_size, args.steer,
                            args.steer_template, desc=benchmark, seed=getattr(args, "seed", 0), made_by=made_by)


def folder(args, benchmark) -> Path:
    return Path(args.out) / benchmark


def make_judge(args) -> Judge:
    client = ChatClient(args.judge_url, args.judge_model, os.environ.get(args.api_key_env), args.judge_timeout,
                        args.retries, args.backoff)
    return Judge(client, args.judge_cache, args.judge_workers)


def judge_prompt(args, ours: str, official: str | None = None) -> JudgePrompt:
    """Our prompt file `ours`, or, with --judge-prompt, the user's: a text file as it is, or the entry
    `official` of FastChat's judge_prompts.jsonl or of LLaVA's rule.json."""
    source = getattr(args, "judge_prompt", None)
    if source and Path(source).suffix in (".jsonl", ".json"):
        if official is None:
            raise BenchmarkError(f"--judge-prompt {source}: this benchmark has no prompt in that file; "
                                       "pass a text file with the prompt instead")
        return read_prompt(source, official)
    return read_prompt(source, ours) if source else read_prompt(None, ours)


def judged(judge: Judge, items: list[dict], parse, benchmark: str, args) -> list:
    """Judge every item; if any failed after its retries, stop without touching results.json (the
    judgments that worked are cached: a rerun asks only for the missing ones)."""
    outcomes = judge.judge_all(items, parse, desc=f"judging {benchmark}")
    failed = [(item["id"], o["error"]) for item, o in zip(items, outcomes) if "error" in o]
    if failed:
        write_json(folder(args, benchmark) / "judge_failures.json", [{"id": i, "error": e} for i, e in failed])
        raise SystemExit(f"{benchmark}: the judge failed on {len(failed)} of {len(items)} items (first: {failed[0][0]}: "
                         f"{failed[0][1][:300]}); see {folder(args, benchmark) / 'judge_failures.json'}. "
                         f"Nothing was overwritten; rerun to retry (judgments already made are cached).")
    print(f"judge: {judge.client.calls} calls, {judge.cache.hits} answered from the cache {args.judge_cache}")
    return [o["value"] for o in outcomes]


def finish(args, benchmark: str, result: dict, summary: str) -> dict:
    result.update(model=str(args.model), model_source=source_of(args.model), steer=args.steer, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(benchmark))
    write_json(folder(args, benchmark) / "results.json", result)
    print(f"{benchmark}: {summary}\nwritten: {folder(args, benchmark) / 'results.json'}")
    return result


def model_name(args) -> str:
    return args.model_name or display_name(args.model)  # a Hub snapshot: the repo's name, not its commit


def image_checker(args):
    """image(folder, name, where) -> the file of a question's image, inside its folder (unless
    --images-outside-folder), decoded and of a sane size: checked as the questions are read, before
    any generation; each file once."""
    seen = {}
    return lambda folder, name, where: benchmark_files.checked_image(folder, name, where, args.images_outside_folder,
                                                                     seen)


# ---------------------------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------------------------


def pope_splits(args) -> dict[str, list[dict]]:
    """{split: questions with labels}: LLaVA's combined question file (--questions), labels from the
    split files; or POPE's own coco_pope_<split>.json files."""
    if args.questions:
        splits = benchmark_files.read_llava_pope(args.questions, args.pope_dir)
    else:
        splits = {s: benchmark_files.read_pope(Path(args.pope_dir) / f"coco_pope_{s}.json") for s in benchmarks.POPE_SPLITS
                  if (Path(args.pope_dir) / f"coco_pope_{s}.json").exists()}
    if not splits:
        raise BenchmarkError(f"{args.pope_dir}: no coco_pope_{{adversarial,popular,random}}.json files")
    return {split: questions[:args.limit] for split, questions in splits.items()}


def run_pope(args) -> dict:
    """Yes/no object questions on COCO, three splits: accuracy, precision, recall, F1, yes-ratio."""
    splits = pope_splits(args)
    suffix = benchmarks.POPE_SUFFIX if args.prompt_suffix is None else args.prompt_suffix
    ids = {f"{split}-{q['question_id']}": (split, q["question_id"]) for split, qs in splits.items() for q in qs}
    if args.answers:
        texts = benchmark_files.read_pope_answers(args.answers, ids)
    else:
        items, image = [], image_checker(args)
        for split, questions in splits.items():
            source = args.questions or Path(args.pope_dir) / f"coco_pope_{split}.json"
            for q in questions:
                where = f"POPE {split} question {q['question_id']} ({source})"
                text = q["text"] if q["text"].endswith(benchmarks.POPE_SUFFIX) else q["text"] + suffix  # LLaVA's file has it
                items.append({"id": f"{split}-{q['question_id']}", "turns": [{"from": "human", "value": "<image>\n" + text}],
                              "images": [image(args.image_folder, q["image"], where)]})
        texts = answers(args, items, "pope")
    per_split, samples, lines = {}, [], []
    for split, questions in splits.items():
        predictions = [benchmarks.yes_or_no(texts[f"{split}-{q['question_id']}"]) for q in questions]
        per_split[split] = benchmarks.pope_metrics(predictions, [q["label"] for q in questions])
        samples += [[p, q["label"], split] for p, q in zip(predictions, questions)]
        lines += [json_line({"question_id": q["question_id"], "prompt": q["text"], "category": split,
                             "text": texts[f"{split}-{q['question_id']}"], "model_id": model_name(args)})
                  for q in questions]
    write_atomic(folder(args, "pope") / "answers.jsonl", "".join(lines))  # LLaVA's answer format (+ category)
    average = {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in next(iter(per_split.values()))}
    result = headline("pope", average["f1"], "f1", samples, splits=per_split, average=average)
    rows = "; ".join(f"{s} F1 {m['f1']:.3f} acc {m['accuracy']:.3f} yes {m['yes_ratio']:.2f}" for s, m in per_split.items())
    return finish(args, "pope", result, f"{rows}; mean F1 {average['f1']:.3f}")


def mmbench_rows(args) -> list[dict]:
    """The TSV's rows; --limit keeps the first N questions with all their circular rows."""
    rows = benchmark_files.read_mmbench(args.tsv, check_images=not args.answers)
    if args.limit:
        kept = list(dict.fromkeys(r["index"] % benchmarks.CIRCULAR_STRIDE for r in rows))[:args.limit]
        rows = [r for r in rows if r["index"] % benchmarks.CIRCULAR_STRIDE in set(kept)]
    return rows


def run_mmbench(args) -> dict:
    """Multiple choice: each row answered once (the file's circular rows are rows of their own),
    scored by circular groups; the submission file carries the raw answers."""
    from PIL import Image

    rows = mmbench_rows(args)
    ids = [str(r["index"]) for r in rows]
    if args.answers:
        texts = benchmark_files.read_answers(args.answers, dict.fromkeys(ids), args.tsv)
    else:
        items = [{"id": str(r["index"]), "images": [Image.open(io.BytesIO(r["image"]))],
                  "turns": [{"from": "human", "value": benchmarks.mmbench_prompt(r, args.prompt_suffix)}]} for r in rows]
        texts = answers(args, items, "mmbench")
    write_atomic(folder(args, "mmbench") / "answers.jsonl", "".join(json_line({  # LLaVA's answer format
        "question_id": r["index"], "round_id": 0, "prompt": benchmarks.mmbench_prompt(r, args.prompt_suffix),
        "text": texts[str(r["index"])], "options": r["options"], "option_char": list(benchmarks.LETTERS[:len(r["options"])]),
        "model_id": model_name(args)}) for r in rows))
    write_submission(args, rows, texts)
    if any(r["answer"] is None for r in rows):
        return finish(args, "mmbench", headline("mmbench", float("nan"), "none", [], submission="submission.xlsx"),
                      f"no answers in {args.tsv} (test split): submission written to {folder(args, 'mmbench')}")
    predictions = {r["index"]: benchmarks.extract_option(texts[str(r["index"])], r["options"]) for r in rows}
    scores = benchmarks.mmbench_scores(rows, predictions)
    right = [int(q["right"]) for q in scores["per_question"]]
    result = headline("mmbench", 100 * scores["accuracy"], "mean_percent", right,
                      row_accuracy=100 * scores["row_accuracy"], questions=len(scores["per_question"]), rows=len(rows),
                      by_category={c: 100 * v for c, v in scores["by_category"].items()},
                      by_l2_category={c: 100 * v for c, v in scores["by_l2_category"].items()},
                      matching="exact (VLMEvalKit can_infer; no LLM matcher)")
    return finish(args, "mmbench", result, f"circular accuracy {100 * scores['accuracy']:.1f} over "
                                           f"{len(scores['per_question'])} questions ({len(rows)} rows; "
                                           f"rows right: {100 * scores['row_accuracy']:.1f})")


# LLaVA's scripts/convert_mmbench_for_submission.py (lines 21-25): these columns dropped, "prediction"
# (the model's raw answer text) inserted as the 7th column; the server extracts the option itself.
SUBMISSION_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def write_submission(args, rows: list[dict], texts: dict) -> None:
    """submission.xlsx (what MMBench's server takes) and the same as submission.tsv (to read)."""
    columns = [c for c in rows[0]["row"] if c not in SUBMISSION_DROPPED] if rows else []
    at = min(6, len(columns))
    columns = columns[:at] + ["prediction"] + columns[at:]
    table = [[texts[str(r["index"])] if c == "prediction" else r["row"].get(c, "") for c in columns] for r in rows]
    write_xlsx(folder(args, "mmbench") / "submission.xlsx", columns, table)
    write_atomic(folder(args, "mmbench") / "submission.tsv", "\t".join(columns) + "\n" + "".join(
        "\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in r) + "\n" for r in table))


def run_mmvet(args) -> dict:
    """Open questions graded 0-1 by the judge against the ground truth; total and per capability."""
    questions = benchmark_files.read_mmvet(args.questions)
    questions = dict(list(questions.items())[:args.limit])
    if args.answers:
        texts = benchmark_files.read_answers(args.answers, dict.fromkeys(questions), args.questions)
    else:
        image = image_checker(args)
        items = [{"id": qid, "images": [image(args.image_folder, q["imagename"], f"MM-Vet question {qid} ({args.questions})")],
                  "turns": [{"from": "human", "value": "<image>\n" + q["question"]}]} for qid, q in questions.items()]
        texts = answers(args, items, "mmvet")
    write_json(folder(args, "mmvet") / "answers.json", {qid: texts[qid] for qid in questions})  # the official grader's input
    judge, prompt = make_judge(args), judge_prompt(args, "mmvet")
    items = [request(prompt, texts[qid], qid, question=q["question"], ground_truth=q["answer"], answer=texts[qid])
             for qid, q in questions.items()]
    grades = dict(zip(questions, judged(judge, items, benchmarks.parse_unit_score, "mmvet", args)))
    scores = benchmarks.mmvet_scores(questions, grades)
    result = headline("mmvet", scores["total"], "mean_percent", [grades[q] for q in questions],
                      by_capability=scores["by_capability"], judge=judge.info(prompt))
    return finish(args, "mmvet", result, f"total {scores['total']:.1f}")


def run_llava_bench(args) -> dict:
    """The judge scores the reference answer and ours 1-10; ours as a percentage of the reference."""
    questions = benchmark_files.read_llava_bench(args.folder)[:args.limit]
    image_folder = args.image_folder or Path(args.folder) / "images"
    if args.answers:
        texts = benchmark_files.read_answers(args.answers, dict.fromkeys(q["question_id"] for q in questions),
                                             args.folder)
    else:
        image = image_checker(args)
        items = [{"id": q["question_id"], "images": [image(image_folder, q["image"], f"LLaVA-Bench question {q['question_id']} ({args.folder})")],
                  "turns": [{"from": "human", "value": "<image>\n" + q["text"]}]} for q in questions]
        texts = {str(k): v for k, v in answers(args, items, "llava_bench").items()}
    write_atomic(folder(args, "llava_bench") / "answers.jsonl", "".join(
        json_line({"question_id": q["question_id"], "prompt": q["text"], "text": texts[str(q["question_id"])],
                   "model_id": model_name(args)}) for q in questions))
    judge = make_judge(args)
    # LLaVA's rule.json has one prompt per category ("llava_bench_conv", ...); ours is one for all.
    prompts = {c: judge_prompt(args, "llava_bench", f"llava_bench_{c}")
               for c in sorted({q["category"] for q in questions})}
    items = [request(prompts[q["category"]], texts[str(q["question_id"])], q["question_id"], context=q["caption"],
                     question=q["text"], answer_1=q["reference"], answer_2=texts[str(q["question_id"])])
             for q in questions]
    parse = benchmarks.parse_pair_scores if args.accept_any_rating else benchmarks.checked_pair_scores
    pairs = judged(judge, items, parse, "llava_bench", args)
    reviews = [{"category": q["category"], "reference": a, "model": b} for q, (a, b) in zip(questions, pairs)]
    scores = benchmarks.relative_scores(reviews)
    result = headline("llava_bench", scores["overall"], "relative", [list(p) for p in pairs],
                      by_category=scores["by_category"], judge=judge.info(*prompts.values()))
    cats = ", ".join(f"{c} {v:.1f}" for c, v in scores["by_category"].items())
    return finish(args, "llava_bench", result, f"relative score {scores['overall']:.1f} ({cats})")


# The four MT-Bench judges: (ours, FastChat's judge_prompts.jsonl name), by (turn, with a reference).
MTBENCH_JUDGES = {(1, False): ("mtbench_single", "single-v1"), (1, True): ("mtbench_single_ref", "single-math-v1"),
                  (2, False): ("mtbench_multi", "single-v1-multi-turn"),
                  (2, True): ("mtbench_multi_ref", "single-math-v1-multi-turn")}


def mtbench_answers(args, questions: list[dict]) -> dict:
    """{question_id: [answer per turn]}: from --answers (FastChat's model-answer lines), or generated
    turn by turn, each turn seeing the earlier ones. Sampled with FastChat's per-category temperature
    (writing and roleplay 0.7, stem and humanities 0.1, the others greedy), or all greedy with --greedy."""
    if args.answers:
        return benchmark_files.read_answers(args.answers, {q["question_id"]: len(q["turns"]) for q in questions},
                                            args.questions)
    # the user's own file, named on the command line: taken where it is (no folder to stay inside)
    images = [benchmark_files.checked_image(None, args.distractor_image, "--distractor-image")] if args.distractor_image else []
    model_and_processor = load(args)
    texts = {}
    for turn in range(max(len(q["turns"]) for q in questions)):
        items = []
        for q in questions:
            if turn < len(q["turns"]):
                asked = [("<image>\n" if images else "") + q["turns"][0]] + q["turns"][1:turn + 1]
                turns = []
                for i, text in enumerate(asked):
                    turns.append({"from": "human", "value": text})
                    if i < turn:
                        turns.append({"from": "gpt", "value": texts[f"{q['question_id']}-{i + 1}"]})
                temperature = 0.0 if args.greedy else benchmarks.MTBENCH_TEMPERATURES.get(q["category"],
                                                                                     benchmarks.MTBENCH_DEFAULT_TEMPERATURE)
                items.append({"id": f"{q['question_id']}-{turn + 1}", "images": images, "turns": turns,
                              "temperature": temperature})
        texts.update(answers(args, items, "mtbench", model_and_processor))
    return {str(q["question_id"]): [texts[f"{q['question_id']}-{t + 1}"] for t in range(len(q["turns"]))]
            for q in questions}


def run_mtbench(args) -> dict:
    """Two-turn text questions, each turn graded 1-10 by FastChat's single-answer judges (with the
    reference answer for math, reasoning and coding). --distractor-image puts an unrelated image in
    the first turn (the paper's robustness test)."""
    questions = benchmark_files.read_mtbench(args.questions)[:args.limit]
    references = {}
    if args.references:  # FastChat's reference answers (e.g. gpt-4.jsonl): model-answer format
        references = benchmark_files.read_mtbench_references(args.references)
    for q in questions:
        if "reference" in q:
            references.setdefault(str(q["question_id"]), q["reference"])
        if q["category"] in benchmarks.MTBENCH_REFERENCE_CATEGORIES and str(q["question_id"]) not in references:
            raise BenchmarkError(f"{args.questions}: question {q['question_id']} ({q['category']}) is judged "
                                       "against a reference answer, as FastChat does; pass --references "
                                       "(reference_answer/gpt-4.jsonl)")
    source = getattr(args, "judge_prompt", None)
    if source and Path(source).suffix != ".jsonl":
        raise BenchmarkError(f"--judge-prompt {source}: MT-Bench has four judge prompts; pass FastChat's "
                                   "judge_prompts.jsonl")
    prompts = {kind: judge_prompt(args, ours, official) for kind, (ours, official) in MTBENCH_JUDGES.items()}
    history = mtbench_answers(args, questions)
    # FastChat's layout: model_answer/<model id>.jsonl, so its show_result.py and gen_judgment.py find it.
    write_atomic(folder(args, "mtbench") / "model_answer" / f"{model_name(args)}.jsonl", "".join(json_line({
        "question_id": q["question_id"], "answer_id": hashlib.sha256(f"{model_name(args)}-{q['question_id']}".encode()).hexdigest()[:22],
        "model_id": model_name(args), "choices": [{"index": 0, "turns": history[str(q["question_id"])]}],
        "tstamp": time.time()}) for q in questions))

    items, meta = [], []  # every request is made (and its prompt filled) before any is sent
    for q in questions:
        qid, a = str(q["question_id"]), history[str(q["question_id"])]
        with_reference = q["category"] in benchmarks.MTBENCH_REFERENCE_CATEGORIES
        ref = references.get(qid, [])
        for turn in (1, 2)[:len(q["turns"])]:
            fields = ({"question": q["turns"][0], "answer": a[0]} if turn == 1 else
                      {"question_1": q["turns"][0], "answer_1": a[0], "question_2": q["turns"][1], "answer_2": a[1]})
            if with_reference:
                fields.update({f"ref_answer_{i + 1}": r for i, r in enumerate(ref[:turn])})
            items.append(request(prompts[(turn, with_reference)], a[turn - 1], f"{qid}-{turn}", **fields))
            meta.append({"question_id": q["question_id"], "turn": turn, "category": q["category"]})
    judge = make_judge(args)
    parse = benchmarks.parse_rating if args.accept_any_rating else benchmarks.checked_rating
    ratings = [{**m, "rating": r} for m, r in zip(meta, judged(judge, items, parse, "mtbench", args))]
    scores = benchmarks.mtbench_scores(ratings)
    if scores["unrated"] == len(ratings):  # FastChat leaves -1 out of its means: a mean over nothing is no score
        raise BenchmarkError(f"MT-Bench: none of the {len(ratings)} judgments holds a rating ([[n]]), so "
                                        f"there is no score; nothing was written. The judge's replies are in "
                                        f"{args.judge_cache}")
    result = headline("mtbench", scores["overall"], "mean", [r["rating"] for r in ratings if r["rating"] != -1],
                      turn_1=scores["turn_1"], turn_2=scores["turn_2"], unrated=scores["unrated"],
                      by_category=scores["by_category"], ratings=ratings, distractor_image=args.distractor_image,
                      sampling="greedy" if args.greedy else "FastChat's per-category temperatures",
                      judge=judge.info(*prompts.values()))
    return finish(args, "mtbench", result, f"overall {scores['overall']:.2f} (turn 1 {scores['turn_1']:.2f}, "
                                           f"turn 2 {scores['turn_2']:.2f}; {scores['unrated']} judgments without a rating)")


def run_alpaca_eval(args) -> dict:
    """Our output against the reference output, the judge picking the better; shown in an order
    drawn per instruction (seeded), so position bias cancels out over the set."""
    data = benchmark_files.read_alpaca_eval(args.data)[:args.limit]
    if args.answers:
        texts = benchmark_files.read_answers(args.answers, dict.fromkeys(r["instruction"] for r in data), args.data)
        texts = {str(i): texts[r["instruction"]] for i, r in enumerate(data)}
    else:
        items = [{"id": str(i), "turns": [{"from": "human", "value": r["instruction"]}]} for i, r in enumerate(data)]
        texts = answers(args, items, "alpaca_eval")
    outputs = [{"instruction": r["instruction"], "output": texts[str(i)], "generator": model_name(args),
                "dataset": r.get("dataset", "")} for i, r in enumerate(data)]
    write_json(folder(args, "alpaca_eval") / "model_outputs.json", outputs)  # alpaca_eval's own input format
    judge, prompt = make_judge(args), judge_prompt(args, "alpaca_eval")
    items, ours_first = [], []
    for i, r in enumerate(data):
        first = random.Random(hashlib.sha256(r["instruction"].encode()).digest()).random() < 0.5
        a, b = (texts[str(i)], r["output"]) if first else (r["output"], texts[str(i)])
        items.append(request(prompt, f"(a) {a}\n(b) {b}", str(i), instruction=r["instruction"], output_a=a, output_b=b))
        ours_first.append(first)
    picks = judged(judge, items, benchmarks.parse_preference, "alpaca_eval", args)
    wins = [float((p == "a") == first) for p, first in zip(picks, ours_first)]
    result = headline("alpaca_eval", benchmarks.win_rate(wins), "mean_percent", wins, judge=judge.info(prompt))
    return finish(args, "alpaca_eval", result, f"win rate {benchmarks.win_rate(wins):.1f}% over {len(wins)} instructions")


def run_preference(args) -> dict:
    """DPO's implicit reward on held-out pairs: beta * (log p_policy - log p_reference), chosen vs
    rejected. Reward accuracy = share of pairs whose chosen answer gets the larger reward."""
    pairs, report_ = load_pairs(args.data, 0)
    print(report_.summary())
    model, processor = load(args)
    examples, _ = pair_examples(pairs[:args.limit], processor, args.image_folder, 100_000, False, args.data,
                                images_anywhere=args.images_outside_folder)
    reference = load_model(args.reference, device=args.device, vision_tower=args.vision_tower)
    correct, margins = [], []
    with torch.no_grad():
        for start in range(0, len(examples), args.batch_size):
            batch = collate_pairs(examples[start:start + args.batch_size], processor).to(args.device)
            with autocast(args.device):
                policy = pair_logps(model.eval(), batch)
                ref = pair_logps(reference.eval(), batch)
            # DPO's implicit reward of each answer, then which of a pair's two wins and by how much
            wins, margin = reward_comparison(implicit_rewards(policy[0], ref[0], args.beta),
                                             implicit_rewards(policy[1], ref[1], args.beta))
            correct += wins.int().tolist()
            margins += margin.tolist()
    accuracy = sum(correct) / max(len(correct), 1)
    result = headline("preference", accuracy, "mean", correct, margin=sum(margins) / max(len(margins), 1),
                      margins=margins, reference=str(args.reference), beta=args.beta)
    return finish(args, "preference", result, f"reward accuracy {accuracy:.3f}, mean margin {result['margin']:.3f} "
                                              f"over {len(correct)} pairs")


def json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

BENCHMARKS = {"pope": run_pope, "mmbench": run_mmbench, "mmvet": run_mmvet, "llava-bench": run_llava_bench,
              "mtbench": run_mtbench, "alpaca-eval": run_alpaca_eval, "preference": run_preference}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="side-by-side table of run folders")
    rep.add_argument("runs", nargs="+", help="run folders (each the --out of eval.py runs on one model)")
    rep.add_argument("--out", help="where report.md (and report.png) go; default: the first run's parent folder")
    rep.add_argument("--resamples", type=at_least(1), default=1000, help="bootstrap resamples for the 95%% intervals")
    for name in BENCHMARKS:
        s = sub.add_parser(name)
        a = s.add_argument
        a("--model", required=True, help="checkpoint folder, or Hugging Face repo id in the local cache "
          "(llava-hf/llava-1.5-7b-hf)")
        a("--revision", help="--model's branch, tag or commit in the Hugging Face cache (default: main; --model's only)")
        a("--out", required=True, help="run folder for this model: results go to OUT/<benchmark>/")
        a("--model-id", "--model-name", dest="model_name", help="the model's name in answer files (MT-Bench: "
          "model_answer/<model id>.jsonl, as FastChat names it; default: the checkpoint folder's name, or the repo's for a "
          "repo id)")
        a("--vision-tower", help="CLIP folder or repo id, for original LLaVA checkpoints")
        a("--template", default="vicuna_v1", choices=["vicuna_v1", "llava_v1"])
        a("--image-mode", default="pad", choices=["pad", "crop"])
        a("--batch-size", type=at_least(1), default=8, help="answers generated at once")
        a("--max-new-tokens", type=at_least(1), help="default: the benchmark's own (POPE/MMBench 128, others 1024)")
        a("--limit", type=at_least(1), help="only the first N questions (a quick check; not a comparable score)")
        a("--steer", type=parse_steer, help="SteerLM ratings, e.g. helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2")
        a("--steer-template", default="tinyalign", choices=sorted(STEER_TEMPLATES))
        a("--device", default=None, help="default: cuda when available")
        a("--answers", help="grade these answers (the benchmark's answer format) instead of generating")
        a("--image-folder", help="folder the benchmark's image names are relative to; a name that leads out of "
          "it (../, absolute, a symlink) is refused")
        a("--images-outside-folder", action="store_true", help="follow image names that lead out of --image-folder")
        j = s.add_argument_group("judge (MM-Vet, LLaVA-Bench, MT-Bench, AlpacaEval)")
        j.add_argument("--judge-url", default="https://api.openai.com/v1")
        j.add_argument("--judge-model", default="gpt-4o")
        j.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
        j.add_argument("--judge-prompt", help="the official prompts instead of ours (tinyalign/judge_prompts/): "
                       "FastChat's judge_prompts.jsonl (MT-Bench), LLaVA's rule.json (LLaVA-Bench), or a text file")
        j.add_argument("--judge-cache", default=str(Path.home() / ".cache" / "tinyalign" / "judgments.jsonl"))
        j.add_argument("--judge-workers", type=at_least(1), default=4, help="requests in flight at once")
        j.add_argument("--judge-timeout", type=positive, default=120.0)
        j.add_argument("--retries", type=at_least(0), default=3)
        j.add_argument("--backoff", type=non_negative, default=2.0, help="seconds before the first retry (then doubled)")
        j.add_argument("--accept-any-rating", action="store_true", help="MT-Bench and LLaVA-Bench: take a judge's "
                       "score as the official scripts parse it, even outside the 1-10 its prompt asks for (default: "
                       "such a reply is a failed try, retried, then listed in judge_failures.json)")
        if name in ("pope", "mmbench"):
            a("--prompt-suffix", help="text after the question (default: LLaVA-1.5's short-answer instruction)")
        if name == "pope":
            a("--pope-dir", required=True, help="folder with coco_pope_{adversarial,popular,random}.json (the labels)")
            a("--questions", help="LLaVA's combined question file (llava_pope_test.jsonl: ids, images, text, "
                                  "category); default: the questions of the split files")
        if name == "mmbench":
            a("--tsv", required=True, help="mmbench_dev_*.tsv (scored) or mmbench_test_*.tsv (submission only)")
        if name in ("mmvet", "mtbench"):
            a("--questions", required=True)
        if name == "llava-bench":
            a("--folder", required=True, help="questions.jsonl, context.jsonl, answers_gpt4.jsonl, images/")
        if name == "mtbench":
            a("--references", help="FastChat reference answers (model-answer JSONL, e.g. gpt-4.jsonl)")
            a("--distractor-image", help="an unrelated image put in the first turn (the paper's robustness test)")
            a("--greedy", action="store_true", help="answer every category greedily (default: FastChat's "
                                                       "per-category sampling temperatures)")
            a("--seed", type=int, default=0, help="seed of the sampled answers")
        if name in ("alpaca-eval", "preference"):
            a("--data", required=True)
        if name == "preference":
            a("--reference", required=True, help="the starting (reference) checkpoint of the DPO run (folder or "
              "repo id)")
            a("--beta", type=positive, default=0.1)
    args = p.parse_args(argv)
    if args.command != "report":
        # repo ids -> the cache's folders; a name not found is left for load_model to name, as grading
        # --answers needs no model
        resolve_models(p, args, ("model", "vision_tower", "reference"), strict=False)
    if args.command != "report" and args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None):
    args = parse(argv)
    if args.command == "report":
        print(report(args.runs, args.out or Path(args.runs[0]).parent, args.resamples))
        return None
    try:
        return BENCHMARKS[args.command](args)
    except (DataError, FileNotFoundError) as e:  # a benchmark's files, named with what is wrong
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
