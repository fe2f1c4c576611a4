"""Sample answers from a model and have a judge rate them: the paper's data collection (section 3.2).

    python -m tinyalign.evaluation.annotate --model runs/sft/model --prompts prompts.jsonl --image-folder images/ \\
        --out scored.jsonl --judge-url https://api.openai.com/v1 --judge-model gpt-4o   # key: $OPENAI_API_KEY
    python -m tinyalign.evaluation.annotate ... --judge rules       # the shapes world's rule-based annotator

Prompts: JSONL `{"id", "image"?, "prompt"}` (the rule-based judge also needs "kind" and "truth", as the
demo writes them). For each prompt, N answers are sampled (default 4, temperature 0.7) and each is
rated 0-4 on helpfulness, correctness, coherence, complexity and verbosity. The output is the
scored-samples JSONL that `build_pairs`, `--select best` and train_steerlm.py read, written one prompt
per line as soon as it is rated: a crash or Ctrl-C loses at most the prompt in flight, and a rerun
skips every prompt already rated. A judge that fails (HTTP error, time-out, a reply that does not
parse) is retried with backoff; after the last try the prompt is written with an "error" field, and a
rerun tries it again. Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from ..data import (DataError, DataReport, build_pairs, check_image, numbered_jsonl, read_records, read_scored,
                    resolve_images)
from ..demo.world import rate_answer
from ..infra.arguments import at_least, non_negative, positive
from ..infra.files import FolderLock, complete_lines, write_atomic, writing
from ..infra.weights import load_model
from ..processor import Processor
from ..speed.decoding import generate_stream
from ..steer import check_ratings
from .judge import ChatClient, JudgeError, image_part

# The judge's instructions: reasoning first (it rates better after thinking), then a strict last line.
RUBRIC = """You rate answers of a vision-language assistant. Look at the image and the question, then rate
the answer on five attributes, each an integer from 0 (worst) to 4 (best):
helpfulness (does it answer what was asked), correctness (is what it says true of the image),
coherence (is it clear and consistent), complexity (how much expertise it takes to write),
verbosity (how much detail it gives, relative to what was asked).
First explain your reasoning briefly. Then end with one line holding only a JSON object, exactly:
{"helpfulness": h, "correctness": c, "coherence": k, "complexity": x, "verbosity": v}"""
PROMPT_VERSION = "tinyalign-rubric-v1"


def parse_ratings(reply: str) -> dict:
    """The last JSON object in the reply, with exactly the five attributes as integers 0-4."""
    objects = re.findall(r"\{[^{}]*\}", reply)
    if not objects:
        raise JudgeError(f"no JSON object in the reply: {reply[-200:]!r}")
    try:
        ratings = json.loads(objects[-1])
    except json.JSONDecodeError as e:
        raise JudgeError(f"the last JSON object does not parse ({e}): {objects[-1]!r}") from None
    try:
        return check_ratings(ratings, "judge reply")
    except ValueError as e:
        raise JudgeError(str(e)) from None


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint (evaluation/judge.py); the image goes inline."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 2.0):
        self.client = ChatClient(base_url, model, api_key, timeout, retries, backoff)
        self.model = model

    @property
    def calls(self) -> int:
        return self.client.calls

    def rate(self, question: str, answer: str, image: Path | None) -> dict:
        content = [{"type": "text", "text": f"Question: {question}\n\nAnswer to rate: {answer}"}]
        if image is not None:
            content.append(image_part(image))
        messages = [{"role": "system", "content": RUBRIC}, {"role": "user", "content": content}]
        return self.client.ask(messages, parse_ratings)[0]


class RuleJudge:
    """The shapes world's annotator: it knows the truth of each prompt ("kind", "truth")."""

    def rate_record(self, record: dict, answer: str) -> dict:
        if "kind" not in record or "truth" not in record:
            raise JudgeError(f"prompt {record.get('id')}: the rule-based judge needs 'kind' and 'truth'")
        return rate_answer(record["kind"], record["truth"], answer)


def read_done(out: Path) -> tuple[list[dict], set]:
    """Rated prompts already in the output (kept), and their ids. Lines with an error are dropped
    here so that a rerun tries those prompts again, and so is a last line torn by a crash (that
    prompt is simply rated again)."""
    lines, _ = complete_lines(out)  # a last line torn by a crash is left out here
    numbered = numbered_jsonl(out, "\n".join(lines))  # any other line that is not a JSON object stops, named
    for n, r in numbered:  # the file is rewritten from these: a line that cannot be one is named, never lost
        if isinstance(r.get("id"), bool) or not isinstance(r.get("id"), (str, int)):
            raise DataError(f"{out} line {n}: 'id' must be text or a number, got {r.get('id')!r:.80}; fix or "
                            "remove the line")
    kept = [r for _, r in numbered if "responses" in r and "error" not in r]
    return kept, {r["id"] for r in kept}


def annotate_prompts(prompts: list[dict], out, sample, judge, image_folder=None, max_prompts=None) -> dict:
    """sample(records) -> (index in records, answers) for each record, in any order; judge: OpenAIJudge or RuleJudge. Appends to `out`,
    which one annotator at a time may write (a second is refused, naming the first)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out.parent, f".{out.name}.lock", what=str(out)).acquire()
    try:
        kept, done = read_done(out)
        # Rewritten without the failed lines and a torn tail (whole, then renamed), then appended to.
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in kept))
        rated, failed = rate_and_append(prompts, done, out, sample, judge, image_folder, max_prompts)
    finally:
        lock.release()
    scored, _ = read_scored(out) if out.stat().st_size else ([], None)
    pairs, _ = build_pairs(scored) if scored else ([], None)
    return {"rated now": rated, "failed now": failed, "already rated": len(done), "pairs": len(pairs)}


def rate_and_append(prompts, done, out, sample, judge, image_folder, max_prompts) -> tuple[int, int]:
    """Sample and rate each prompt not yet done; one line per prompt, flushed to disk as it comes
    (in the order the sampler finishes them: short answers first)."""
    todo = [p for p in prompts if p["id"] not in done][:max_prompts]
    rated = failed = 0
    bar = tqdm(total=len(todo), desc="sample and rate", unit="prompt")
    with out.open("a") as f, bar:
        for i, answers in sample(todo):
            record = todo[i]
            line = {k: record[k] for k in ("id", "image", "prompt") if k in record}
            try:
                line["responses"] = [{"text": a, "scores": rate(judge, record, a, image_folder)} for a in answers]
                line["judge"] = getattr(judge, "model", "rules")
                line["prompt_version"] = PROMPT_VERSION
                rated += 1
            except JudgeError as e:
                line["error"] = str(e)
                failed += 1
            with writing(out):
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(1)
    return rated, failed


def make_judge(args):
    """The judge that --judge names: the shapes world's rules, or an OpenAI-compatible endpoint."""
    if args.judge == "rules":
        return RuleJudge()
    return OpenAIJudge(args.judge_url, args.judge_model, os.environ.get(getattr(args, "api_key_env", "OPENAI_API_KEY")),
                       getattr(args, "timeout", 60.0), getattr(args, "retries", 3), getattr(args, "backoff", 2.0))


def rate(judge, record, answer, image_folder):
    """One answer to a prompt, rated by either kind of judge."""
    if isinstance(judge, RuleJudge):
        return judge.rate_record(record, answer)
    return judge.rate(record["prompt"].replace("<image>", "").strip(), answer, prompt_image(record, image_folder))


def prompt_image(record: dict, image_folder) -> Path | None:
    """The file of a prompt's image (checked up front by read_prompts), or None."""
    return Path(image_folder or ".") / record["image"] if record.get("image") else None


def read_prompts(path, image_folder=None, images_anywhere=False) -> tuple[list[dict], DataReport]:
    """The prompts file, checked whole before a model is loaded: each record has an id (text or a
    number) and a prompt (text); an image, if any, is a path inside --image-folder that decodes and
    has a sane size. An id twice with the same record is dropped and counted; with another record it
    is an error naming both."""
    report, prompts, first_at = DataReport(str(path)), [], {}
    for i, r in enumerate(read_records(path)):
        where = f"{path} record {i}"
        if isinstance(r.get("id"), bool) or not isinstance(r.get("id"), (str, int)):
            raise DataError(f"{where}: 'id' must be text or a number, got {r.get('id')!r}")
        if not isinstance(r.get("prompt"), str) or not r["prompt"].replace("<image>", "").strip():
            raise DataError(f"{where} (id {r['id']}): 'prompt' must be non-empty text, got {r.get('prompt')!r}")
        if r.get("image") is not None and not isinstance(r["image"], str):
            raise DataError(f"{where} (id {r['id']}): 'image' must be a path, got {r['image']!r}")
        if "<image>" in r["prompt"] and not r.get("image"):
            raise DataError(f"{where} (id {r['id']}): the prompt has an <image> tag but the record no image")
        if r["id"] in first_at:
            j = first_at[r["id"]]
            if prompts[j] != r:
                raise DataError(f"{where}: id {r['id']!r} is also record {j}'s, with another prompt or image")
            report.drop("the same record twice", where)
            continue
        if r.get("image"):
            for image in resolve_images([r["image"]], image_folder or ".", where, images_anywhere):
                check_image(image, f"{where} (id {r['id']})")
        first_at[r["id"]] = len(prompts)
        prompts.append(r)
    report.kept = len(prompts)
    return prompts, report


def with_image_tag(record: dict) -> str:
    """The prompt with its image's `<image>` tag (put first when the prompt has none)."""
    prompt = record["prompt"]
    return prompt if not record.get("image") or "<image>" in prompt else "<image>\n" + prompt


def model_sampler(model, processor, image_folder, n: int, temperature: float, max_new_tokens: int, seed: int,
                  slots: int = 32, numbering: dict | None = None):
    """sample(records) -> (index in records, n answers) for each record, as they finish: continuous
    batching over `slots` rows, each prompt prefilled once for its n samples (generate_stream).
    numbering: prompt id -> its line in the prompts file; a sample's randomness is keyed by that
    line, so a rerun that resumes draws exactly what one uninterrupted run would have."""
    def sample(records):
        def prompt(r):
            ids = processor.encode([{"from": "human", "value": with_image_tag(r)}], where=f"prompt {r['id']}",
                                   num_images=1 if r.get("image") else 0).input_ids
            # The image is decoded when its prompt gets a row, not all of them up front.
            image = (lambda: processor.images.batch([prompt_image(r, image_folder)])) if r.get("image") else None
            return ids, image

        numbers = [numbering[r["id"]] if numbering else i for i, r in enumerate(records)]
        for i, answers in generate_stream(model, [prompt(r) for r in records], num_samples=n, slots=max(slots, n),
                                          temperature=temperature, max_new_tokens=max_new_tokens,
                                          eos_token_id=processor.eos_token_id, seed=seed, prompt_numbers=numbers,
                                          compile_step=model.device.type == "cuda"):
            yield i, [processor.decode(a) for a in answers]

    return sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, or Hugging Face repo id in the local cache")
    p.add_argument("--revision", help="--model's branch, tag or commit in the Hugging Face cache (default: main)")
    p.add_argument("--prompts", required=True, help="JSONL of {id, image?, prompt}")
    p.add_argument("--out", required=True, help="scored-samples JSONL (appended to; a rerun resumes)")
    p.add_argument("--image-folder", help="folder the prompts' image paths are relative to (default: here); a path "
                   "that leads out of it is refused")
    p.add_argument("--images-outside-folder", action="store_true", help="follow image paths that lead out of "
                   "--image-folder (a remote judge is sent each image)")
    p.add_argument("--n", type=at_least(1), default=4, help="answers sampled per prompt")
    p.add_argument("--temperature", type=non_negative, default=0.7, help="0: greedy (then the n answers are one)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512)
    p.add_argument("--judge", choices=["openai", "rules"], default="openai")
    p.add_argument("--judge-url", default="https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--timeout", type=positive, default=60.0)
    p.add_argument("--retries", type=at_least(0), default=3)
    p.add_argument("--backoff", type=non_negative, default=2.0, help="seconds before the first retry (then doubled)")
    p.add_argument("--max-prompts", type=at_least(1), help="rate at most this many new prompts in this run")
    p.add_argument("--slots", type=at_least(1), default=32, help="rows decoding at once (continuous batching; "
                                                         "a prompt's n samples take n rows)")
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.temperature == 0 and args.n > 1:
        print(f"warning: --temperature 0 is greedy decoding, so the {args.n} answers of a prompt will be the same "
              "one and no pair can be built from them", file=sys.stderr)
    if Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; name the scored-samples file to write, e.g. "
                f"{Path(args.out) / 'scored.jsonl'}")
    prompts, report = read_prompts(args.prompts, args.image_folder, args.images_outside_folder)
    print(report.summary())
    model = load_model(args.model, device=args.device, revision=args.revision)  # a folder, or a cached repo id
    processor = Processor.from_pretrained(args.model, revision=args.revision)
    judge = make_judge(args)
    numbering = {r["id"]: i for i, r in enumerate(prompts)}  # keys each prompt's randomness to its line
    sample = model_sampler(model, processor, args.image_folder, args.n, args.temperature, args.max_new_tokens, args.seed,
                           args.slots, numbering)
    summary = annotate_prompts(prompts, args.out, sample, judge, args.image_folder, args.max_prompts)
    print(", ".join(f"{k}: {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
