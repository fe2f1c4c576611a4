"""Answers to a benchmark's questions, generated in batches and kept as they come.

Each answer is appended to `<run>/<benchmark>/generations.jsonl` as soon as it is done (flushed and
fsynced), so an interrupted run loses at most the answers in flight and a rerun generates only what
is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from ..infra.files import complete_lines
from ..speed.decoding import generate_stream
from ..steer import steer_prompt


def read_generations(path) -> dict:
    """id -> answer text, from a generations file (a line cut short by a crash is ignored: regenerated)."""
    done = {}
    for line in complete_lines(Path(path))[0]:
        try:
            record = json.loads(line)
            done[record["id"]] = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return done


@torch.no_grad()
def generate_answers(model, processor, items: list[dict], path, max_new_tokens: int, batch_size: int = 8,
                     steer: dict | None = None, steer_template: str = "tinyalign", desc: str = "generating",
                     seed: int = 0) -> dict:
    """Answers for items {"id", "turns": [{"from", "value"}...] ending with a human turn, "images":
    [path or PIL image, one per <image> tag], "temperature"?}; -> {id: text} for all items. Greedy,
    unless an item asks for a temperature (then sampled as transformers' `generate` samples by
    default: top_k 50; each item's randomness keyed to `seed` and its place in `items`).

    Continuous batching (`generate_stream`): `batch_size` rows decode at once and a finished answer
    frees its row for the next question, so a batch never waits for its longest answer. Each answer
    is appended to `path` as it finishes; items already there are not generated again. With `steer`
    (SteerLM checkpoints) the ratings are written into the last question, the same way
    train_steerlm.py wrote them."""
    done = read_generations(path)
    number = {item["id"]: i for i, item in enumerate(items)}
    todo = [item for item in items if item["id"] not in done]
    if not todo:
        return done
    model.eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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
                f.write(json.dumps({"id": group[i]["id"], "text": text}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
    return done
