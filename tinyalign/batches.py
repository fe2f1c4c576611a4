"""Batches: tokenised examples (tinyalign/data.py) turned into the tensors of one forward of Llava,
typed so that each field says what it is.

A batch's `inputs` are Llava.forward's keyword arguments, and with their `targets` (losses.Targets)
the forward returns one summed log-probability per answer. Plain rows are made here; packed rows, which
hold several sequences each, in tinyalign/packing.py. Either way the same types come out: `Batch`
(SFT) and `PairBatch` (preference pairs, chosen answers first).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .data import DataError, PairExample, SFTExample
from .images import load_image
from .losses import Targets
from .processor import Processor


def load_pixels(processor: Processor, paths: list[Path], cache: dict | None = None) -> torch.Tensor | None:
    """[N, 3, S, S] for the images of a batch (in order), or None; a small cache skips re-decoding."""
    if not paths:
        return None
    tensors = []
    for path in paths:
        if cache is not None and path in cache:
            tensors.append(cache[path])
            continue
        try:
            pixels = processor.images(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"while making a batch: {e}") from None
        if cache is not None:
            cache[path] = pixels
        tensors.append(pixels)
    return torch.stack(tensors)


@dataclass
class Batch:
    """Examples ready for one forward. `inputs` are Llava.forward's keyword arguments; with their
    `targets` (losses.Targets) the forward returns one summed log-prob per answer [S]."""

    inputs: dict

    @property
    def answer_tokens(self) -> torch.Tensor:
        """Scored tokens of each answer [S], in the order the forward returns the answers."""
        return self.inputs["targets"].counts()

    @property
    def real_tokens(self) -> int:
        """Tokens that are not padding (what tokens/s counts)."""
        packed = self.inputs.get("packed")
        if packed is not None:
            return int((packed.document_ids >= 0).sum())
        return int(self.inputs["attention_mask"].sum())

    def to(self, device):
        """The batch with every tensor on `device`."""
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class PairBatch(Batch):
    """B preference pairs. The forward returns 2B log-probs: the B chosen answers first, then the B
    rejected ones, pair k's at k and B + k. This order is written down here alone (`places`): the
    collating functions (`collate_pairs`, packing.pack_pairs) put the answers there,
    `chosen_and_rejected` reads them back.

    ref_*: the reference log-probs [B] that came with the pairs (the data file's, or the ones computed
    once before training), None unless every pair has them. corrupted: mDPO only, Llava.forward's
    inputs for the B chosen answers again, each under a corrupted image."""

    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    ref_corrupted: torch.Tensor | None = None
    corrupted: dict | None = None

    @staticmethod
    def places(k: int, pairs: int) -> tuple[int, int]:
        """Where pair k's chosen and rejected answers sit among the 2B answers of `pairs` pairs."""
        return k, pairs + k

    def chosen_and_rejected(self, per_answer: torch.Tensor):
        """[2B] -> ([B] of the chosen answers, [B] of the rejected ones)."""
        return per_answer.chunk(2)  # the first half, then the second: `places`


def mean_per_token(logps: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Summed log-probs per answer [S] -> their mean per scored token (SimPO, ORPO, --average-logps)."""
    return logps / inputs["targets"].counts().clamp(min=1)


def pair_logps(model, batch: PairBatch, average: bool = False):
    """One forward over every answer of a pair batch on the model's device -> (log pi(chosen) [B],
    log pi(rejected) [B]); average: the mean per answer token instead of the sum."""
    logps = model(**batch.inputs)  # [2B]
    return batch.chosen_and_rejected(mean_per_token(logps, batch.inputs) if average else logps)


def to_device(value, device):
    """A tensor, or anything with .to (Targets, PackedRows), or a dict of them, on `device`; other
    values (None, numbers) as they are."""
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value.to(device) if hasattr(value, "to") else value


def collate_sft(examples: list[SFTExample], processor: Processor, pixel_cache=None) -> Batch:
    """Plain rows, padded on the right: one conversation per row, its answers scored."""
    rows = processor.collate([e.encoded for e in examples])
    return Batch({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
                  "pixel_values": load_pixels(processor, [p for e in examples for p in e.images], pixel_cache),
                  "targets": Targets.from_labels(rows["labels"])})


def collate_pairs(examples: list[PairExample], processor: Processor, pixel_cache=None) -> PairBatch:
    """Plain rows: the B chosen sequences, then the B rejected ones (2B rows). pixel_values holds each
    pair's images once; the forward runs the tower on them once and uses the features for both
    halves (`repeat_images=2`)."""
    answers = [None] * (2 * len(examples))
    for k, e in enumerate(examples):
        chosen, rejected = PairBatch.places(k, len(examples))
        answers[chosen], answers[rejected] = e.chosen, e.rejected
    rows = processor.collate(answers)
    inputs = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
              "pixel_values": load_pixels(processor, [p for e in examples for p in e.images], pixel_cache),
              "repeat_images": 2, "targets": Targets.from_labels(rows["labels"])}
    return PairBatch(inputs, *reference_tensors(examples))


def reference_tensors(examples: list[PairExample]):
    """(ref_chosen, ref_rejected, ref_corrupted) [B] each, or None where some pair lacks the value."""
    def column(name):
        values = [getattr(e, name) for e in examples]
        return None if any(v is None for v in values) else torch.tensor(values, dtype=torch.float32)

    return column("ref_chosen"), column("ref_rejected"), column("ref_corrupted")


def corrupt_image(path, key: str, max_area: float = 0.2):
    """The corrupted image of mDPO (Wang et al. 2024, arXiv 2406.11839, section 3: "crop 0-20%"): a
    random square-ish crop keeping at most `max_area` of the picture, drawn from `key` (the pair's id),
    so that every pass, and the reference pass before training, sees the same crop. -> a PIL image."""
    image = load_image(path)
    rng = random.Random(zlib.crc32(f"{key}|{path}".encode()))
    side = math.sqrt(rng.uniform(0.02, max_area))  # the kept fraction of each side
    w, h = max(1, int(image.width * side)), max(1, int(image.height * side))
    left, top = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
    return image.crop((left, top, left + w, top + h))


def collate_corrupted(examples: list[PairExample], processor: Processor) -> dict:
    """mDPO's second forward: Llava.forward's inputs for B rows, each pair's chosen answer again, its
    image(s) replaced by a corrupted crop (always plain rows)."""
    rows = processor.collate([e.chosen for e in examples])
    crops = [processor.images(corrupt_image(p, e.id)) for e in examples for p in e.images]
    return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
            "pixel_values": torch.stack(crops) if crops else None, "targets": Targets.from_labels(rows["labels"])}
