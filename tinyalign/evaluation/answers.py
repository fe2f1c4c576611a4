"""Answers to a benchmark's questions, generated in batches and kept as they come.

Each answer is appended to `<run>/<benchmark>/generations.jsonl` as soon as it is done (flushed and
fsynced), so an interrupted run loses at most the answers in flight and a rerun generates only what
is missing. An answer is filed under a key of everything that made it (the model's files, the
template, the image mode, the question's text and images, the answer length, the steer ratings, the
sampling): a rerun with another model or other settings into the same folder generates its own
answers instead of reporting someone else's. One process at a time writes a generations file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..data import file_digest
from ..infra.files import FolderLock, complete_lines, remove_stale_temporaries
from ..speed.decoding import generate_stream
from ..steer import steer_prompt


def read_generations(path, keys: dict | None = None) -> dict:
    """id -> answer text, from a generations file (a line cut short by a crash is ignored: regenerated).
    keys {id: key}: only the answers made exactly so (`answer_key`); others are left in the file, unused."""
    done = {}
    for line in complete_lines(Path(path), skip_bad=True)[0]:
        try:
            record = json.loads(line)
            if isinstance(record["text"], str) and (keys is None or keys.get(record["id"]) == record.get("key")):
                done[record["id"]] = record["text"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
            pass  # not an answer this code wrote: that question is answered again
    return done


def answer_key(item: dict, made_by: dict, number: int) -> str:
    """A digest of what makes an item's answer: the model and generation settings (`made_by`), the
    question's turns, its images' bytes, its temperature, and (sampled answers only) its place in the
    list, which keys its randomness."""
    temperature = item.get("temperature", 0.0)
    parts = [made_by, item["turns"], [image_digest(image) for image in item.get("images", [])], temperature,
             number if temperature >= 1e-4 else None]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def image_digest(image) -> str:
    """An image file's bytes, or a decoded image's pixels (MMBench's images come inside its file)."""
    if isinstance(image, Image.Image):
        return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()[:16]
    return file_digest(image)


@torch.no_grad()
def generate_answers(model, processor, items: list[dict], path, max_new_tokens: int, batch_size: int = 8,
                     steer: dict | None = None, steer_template: str = "tinyalign", desc: str = "generating",
                     seed: int = 0, made_by: dict | None = None) -> dict:
    """Answers for items {"id", "turns": [{"from", "value"}...] ending with a human turn, "images":
    [path or PIL image, one per <image> tag], "temperature"?}; -> {id: text} for all items. Greedy,
    unless an item asks for a temperature (then sampled as transformers' `generate` samples by
    default: top_k 50; each item's randomness keyed to `seed` and its place in `items`).

    Continuous batching (`generate_stream`): `batch_size` rows decode at once and a finished answer
    frees its row for the next question, so a batch never waits for its longest answer. Each answer
    is appended to `path` as it finishes; items already there are not generated again. With `steer`
    (SteerLM checkpoints) the ratings are written into the last question, the same way
    train_steerlm.py wrote them. made_by: what else makes the answers (the model, the template, ...),
    part of each answer's key with max_new_tokens, the steer ratings and the seed."""
    path = Path(path)
    number = {item["id"]: i for i, item in enumerate(items)}
    settings = {**(made_by or {}), "max_new_tokens": max_new_tokens, "steer": steer,
                "steer_template": steer_template if steer else None, "seed": seed}
    keys = {item["id"]: answer_key(item, settings, number[item["id"]]) for item in items}
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(path.parent, f".{path.name}.lock", what=str(path)).acquire()  # one writer at a time
    remove_stale_temporaries(path.parent)  # result files whose writer was killed before its rename
    try:
        return generate_missing(model, processor, items, path, keys, number, max_new_tokens, batch_size, steer,
                                steer_template, desc, seed)
    finally:
        lock.release()


def generate_missing(model, processor, items, path, keys, number, max_new_tokens, batch_size, steer, steer_template,
                     desc, seed) -> dict:
    """generate_answers' work, under its lock: the answers not yet in `path` under their key."""
    done = read_generations(path, keys)
    todo = [item for item in items if item["id"] not in done]
    if not todo:
        return done
    model.eval()
    encoded = {}
    for item in todo:
        turns = [dict(t) for t in item["turns"]]
        if steer:
            turns[-1]["value"] = steer_prompt(turns[-1]["value"], steer, steer_template)
        # Only the item's own images are images: an "<image>" inside a benchmark's question is text.
        encoded[item["id"]] = processor.encode(turns, where=f"question {item['id']}",
                                               num_images=len(item.get("images", []))).input_ids

    def prompt(item):
        images = item.get("images", [])
        return encoded[item["id"]], (lambda: processor.images.batch(images)) if images else None

    temperature = {item["id"]: item.get("temperature", 0.0) for item in todo}
    with open(path, "a") as f, tqdm(total=len(todo), desc=desc, unit="answer") as bar:
        for t in sorted(set(temperature.values())):  # one temperature per stream
            group = [item for item in todo if temperature[item["id"]] == t]
            stream = generate_stream(model, [prompt(item) for item in group], slots=batch_size,
                                     max_new_tokens=max_new_tokens, temperature=t if t >= 1e-4 else 0.0, top_k=50,
                                     eos_token_id=processor.eos_token_id, seed=seed,
                                     prompt_numbers=[number[item["id"]] for item in group],
                                     compile_step=model.device.type == "cuda")
            for i, (answer,) in stream:
                if answer and answer[-1] == processor.eos_token_id:
                    answer = answer[:-1]
                text = processor.decode(answer).strip()
                done[group[i]["id"]] = text
                f.write(json.dumps({"id": group[i]["id"], "key": keys[group[i]["id"]], "text": text},
                                   ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
    return done
