"""Datasets: the file formats the paper uses, read and validated up front, and tokenised examples.

Formats (JSON list or JSONL, one object per line):

* conversations (LLaVA; the paper's `standard_sft.json`, `rejection_sampling.json`):
  `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`
* the paper's DPO file: `{"image", "question": {"from": "human", "value"}, "chosen": {"from": "gpt", "value"},
  "rejected": {...}, "ref_win_logp"?, "ref_rej_logp"?, ...score columns}`
* plain pairs: `{"image"?, "prompt", "chosen", "rejected"}` (strings)
* scored samples: `{"image"?, "prompt", "responses": [{"text", "scores": {"helpfulness": 0-4, ...}}]}`

A record that cannot be used (no prompt, an empty answer, chosen == rejected, a missing image with
`skip_bad`) is dropped with a reason; `DataReport` counts every drop and says so, nothing is silent.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .processor import IMAGE_TAG, Encoded, Processor

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
QUALITY = ("helpfulness", "correctness", "coherence")  # the paper's pair score, 0-12


class DataError(ValueError):
    """A data file or record that cannot be read; the message names the file and the record."""


@dataclass
class DataReport:
    """What was kept and what was dropped, and why."""

    source: str
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, record: str):
        self.dropped[reason] += 1
        self.examples.setdefault(reason, record)

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} kept"
        for reason, n in self.dropped.most_common():
            text += f"; {n} dropped ({reason}, e.g. {self.examples[reason]})"
        return text


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    id: str
    images: list[str]
    turns: list[dict]


@dataclass
class Pair:
    id: str
    images: list[str]
    prompt: str  # the human turn, "<image>" tag included where there is an image
    chosen: str
    rejected: str
    ref_chosen: float | None = None  # log p under the starting model (sum, or mean per token), if the file has it
    ref_rejected: float | None = None


@dataclass
class Scored:
    id: str
    images: list[str]
    prompt: str
    responses: list[tuple[str, dict]]  # (text, {attribute: 0-4})


def read_text(path, error=None) -> str:
    """A file's text; errors name the file (and, for bytes that are not UTF-8, the line)."""
    error = error or DataError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save the "
                        "file as UTF-8") from None


def read_jsonl(path, text: str | None = None, error=None) -> list[dict]:
    """JSON lines, one object per line (blank lines skipped): the one JSON-lines reader of tinyalign
    (data files, benchmark files, metrics.jsonl). Errors name the file and the line; `error`: their
    class (DataError, or a subclass such as a benchmark file's BenchmarkError)."""
    return [record for _, record in numbered_jsonl(path, text, error)]


def numbered_jsonl(path, text: str | None = None, error=None) -> list[tuple[int, dict]]:
    """read_jsonl's records with their line numbers, for messages that name a line."""
    error = error or DataError
    records = []
    for n, line in enumerate((read_text(path, error) if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path} line {n}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise error(f"{path} line {n}: JSON nested too deep to be a record") from None
        if not isinstance(record, dict):
            raise error(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
        records.append((n, record))
    return records


def read_records(path) -> list[dict]:
    """A JSON list, or JSONL with one object per line. Errors name the file and line."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deep to be a data file") from None
    else:
        records = read_jsonl(path, text)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, not an object")
    return records


def _name(path, i: int, record: dict) -> str:
    return f"{Path(path).name} record {i}" + (f" (id {record['id']})" if "id" in record else "")


def _images(record: dict, name: str) -> list[str]:
    """The record's image path(s): a string, a list of strings, or nothing."""
    image = record.get("image")
    if image is None or image == "":
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(i, str) and i for i in image):
        return list(image)
    raise DataError(f"{name}: image must be a path or a list of paths, got {image!r}")


def _text(value, name: str, field_name: str) -> str | None:
    """A turn given as a string or as {"from", "value"}; None when absent. Any other type is an error
    naming the record and the field (a number where an answer should be is a broken file, not an
    empty answer)."""
    if isinstance(value, dict):
        value = value.get("value")
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{name}: {field_name} must be text (or {{\"from\", \"value\"}}), got {value!r}")


def _with_image_tag(prompt: str, n_images: int) -> str:
    if n_images and IMAGE_TAG not in prompt:
        return (IMAGE_TAG + "\n") * n_images + prompt
    return prompt


def read_conversations(path) -> tuple[list[Conversation], DataReport]:
    report, out = DataReport(str(path)), []
    for i, r in enumerate(read_records(path)):
        name = _name(path, i, r)
        turns = r.get("conversations")
        if not isinstance(turns, list) or not turns:
            report.drop("no conversations", name)
            continue
        if any(not isinstance(t, dict) or not isinstance(t.get("value"), str) for t in turns):
            report.drop("a turn without a text value", name)
            continue
        if any(not isinstance(t.get("from"), str) for t in turns):
            report.drop("a turn whose speaker ('from') is not text", name)
            continue
        if any(t.get("from") == "gpt" and not t["value"].strip() for t in turns):
            report.drop("empty answer", name)
            continue
        images = _images(r, name)
        asks = [t["value"].replace(IMAGE_TAG, "").strip() for t in turns if t.get("from") in ("human", "user")]
        if not images and not any(asks):
            report.drop("no question (no text and no image)", name)
            continue
        out.append(Conversation(str(r.get("id", i)), images, turns))
    report.kept = len(out)
    return out, report


# Reference log-prob fields of a pairs file: (chosen, rejected), the paper's names first. The paper's
# file has both the sum over the answer's tokens and its mean (what `--average-logps` compares with).
REFERENCE_FIELDS = {False: [("ref_win_logp", "ref_rej_logp"), ("ref_chosen_logp", "ref_rejected_logp")],
                    True: [("ref_win_avg_logp", "ref_rej_avg_logp"), ("ref_chosen_avg_logp", "ref_rejected_avg_logp")]}


def reference_logps(record: dict, average: bool, name: str = "record") -> tuple[float | None, float | None]:
    """The file's reference log-probs of the kind the loss uses: summed, or averaged (the authors'
    trainer swaps in `ref_*_avg_logp` when it averages, mllm-dpo llava/train/llava_trainer.py:393-395).
    A file with only the other kind gives None: they are computed, never mixed with the wrong kind.
    Each must be a finite number <= 0 (a log-probability)."""
    for chosen, rejected in REFERENCE_FIELDS[average]:
        if record.get(chosen) is not None and record.get(rejected) is not None:
            return _log_prob(record, chosen, name), _log_prob(record, rejected, name)
    return None, None


# The lowest log-probability a model can give an answer: a few thousand tokens of -100 each at the very
# worst (log p of a token below -100 is under 1e-43, float32's smallest). A value below this is not a
# model's (-1e30 would saturate the loss; -1e308 overflows it).
LOWEST_LOGP = -1e6


def _log_prob(record: dict, key: str, name: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0:
        raise DataError(f"{name}: {key} must be a log-probability (a finite number <= 0), got {value!r}")
    if value < LOWEST_LOGP:
        raise DataError(f"{name}: {key} is {value!r}, below any log-probability a model gives an answer "
                        f"({LOWEST_LOGP:g})")
    return float(value)


def read_pairs(path, average: bool = False) -> tuple[list[Pair], DataReport]:
    """The paper's DPO file or plain pairs; reference log-probs (summed, or averaged with
    `average`) kept when the file has them."""
    report, out = DataReport(str(path)), []
    for i, r in enumerate(read_records(path)):
        name = _name(path, i, r)
        prompt = _text(r.get("question", r.get("prompt")), name, "question" if "question" in r else "prompt")
        chosen, rejected = _text(r.get("chosen"), name, "chosen"), _text(r.get("rejected"), name, "rejected")
        if not prompt or not prompt.replace(IMAGE_TAG, "").strip():
            report.drop("no prompt", name)
        elif not chosen or not chosen.strip() or not rejected or not rejected.strip():
            report.drop("empty answer", name)
        elif chosen.strip() == rejected.strip():
            report.drop("chosen == rejected", name)
        else:
            images = _images(r, name)
            out.append(Pair(str(r.get("id", i)), images, _with_image_tag(prompt, len(images)), chosen, rejected,
                            *reference_logps(r, average, name)))
    report.kept = len(out)
    return out, report


def read_scored(path) -> tuple[list[Scored], DataReport]:
    report, out = DataReport(str(path)), []
    for i, r in enumerate(read_records(path)):
        name = _name(path, i, r)
        prompt = _text(r.get("prompt"), name, "prompt")
        responses = r.get("responses")
        if not prompt or not prompt.replace(IMAGE_TAG, "").strip():
            report.drop("no prompt", name)
            continue
        if not isinstance(responses, list) or not responses:
            report.drop("no responses", name)
            continue
        parsed = []
        for j, resp in enumerate(responses):
            scores = resp.get("scores") if isinstance(resp, dict) else None
            if not isinstance(scores, dict):
                raise DataError(f"{name}: response {j} has no 'scores' object")
            for attribute in ATTRIBUTES:  # the quality three always; the other two wherever given
                value = scores.get(attribute)
                if value is None and attribute not in QUALITY:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 4:
                    raise DataError(f"{name}: response {j}: {attribute} must be a number 0-4, got {value!r}")
            parsed.append((_text(resp.get("text"), name, f"response {j} text") or "", scores))
        images = _images(r, name)
        out.append(Scored(str(r.get("id", i)), images, _with_image_tag(prompt, len(images)), parsed))
    report.kept = len(out)
    return out, report


# ---------------------------------------------------------------------------------------------
# The paper's rules: pairs for DPO, the best answer for rejection sampling
# ---------------------------------------------------------------------------------------------


def quality(scores: dict) -> float:
    """helpfulness + correctness + coherence, 0-12 (section 3.2 of the paper)."""
    return sum(scores[a] for a in QUALITY)


def build_pairs(scored: list[Scored], seed: int = 0, min_gap: float = 2) -> tuple[list[Pair], DataReport]:
    """chosen = the best-scored answer (the first of equals); rejected = one drawn at random among the
    answers scoring at least `min_gap` lower. A prompt whose answers spread by less than min_gap
    gives no pair."""
    rng = random.Random(seed)
    report, pairs = DataReport("build_pairs"), []
    for s in scored:
        answers = [(text, quality(scores)) for text, scores in s.responses if text.strip()]
        if len(answers) < len(s.responses):
            report.drop("empty answer", s.id)
        if len(answers) < 2:
            report.drop("fewer than two answers", s.id)
            continue
        best_text, best = max(answers, key=lambda a: a[1])  # max keeps the first of equals
        worse = [text for text, q in answers if q <= best - min_gap and text.strip() != best_text.strip()]
        if not worse:
            report.drop(f"answers spread by less than {min_gap}", s.id)
            continue
        pairs.append(Pair(s.id, s.images, s.prompt, best_text, rng.choice(worse)))
    report.kept = len(pairs)
    return pairs, report


def load_pairs(path, seed: int = 0, average: bool = False) -> tuple[list[Pair], DataReport]:
    """Preference pairs from any of the formats: the paper's DPO file or plain pairs (reference
    log-probs kept, summed or with `average` the averaged ones), or scored samples turned into pairs
    by the paper's rule (`build_pairs`, drawing with `seed`)."""
    records = read_records(path)
    # The format is the file's, not its first record's: scored samples ("responses", or annotate's
    # "error" line for a prompt the judge failed on) or pairs ("chosen"/"rejected"), never both.
    scored_at = [i for i, r in enumerate(records) if "responses" in r or "error" in r]
    paired_at = [i for i, r in enumerate(records) if "chosen" in r or "rejected" in r]
    if scored_at and paired_at:
        raise DataError(f"{path}: record {scored_at[0]} holds scored samples (\"responses\") but record "
                        f"{paired_at[0]} a pair (\"chosen\", \"rejected\"): one file, one format")
    if scored_at:
        scored, report = read_scored(path)
        print(report.summary())
        return build_pairs(scored, seed=seed)
    return read_pairs(path, average)


def select_best(scored: list[Scored]) -> tuple[list[Conversation], DataReport]:
    """Rejection sampling: the top-rated answer of each prompt as an SFT conversation. Ties go to
    the higher total over all five attributes, then to the earlier answer. A prompt whose answers
    are all empty gives nothing (counted)."""
    report, out = DataReport("select_best"), []
    for s in scored:
        ranked = [(quality(sc), sum(sc.get(a, 0) for a in ATTRIBUTES), -j, text)
                  for j, (text, sc) in enumerate(s.responses) if text.strip()]
        if not ranked:
            report.drop("every answer empty", s.id)
            continue
        best = max(ranked)[3]
        out.append(Conversation(s.id, s.images, [{"from": "human", "value": s.prompt},
                                                 {"from": "gpt", "value": best}]))
    report.kept = len(out)
    return out, report


# ---------------------------------------------------------------------------------------------
# Tokenised examples (their batches: tinyalign/batches.py)
# ---------------------------------------------------------------------------------------------


def resolve_images(images: list[str], image_folder, name: str, anywhere: bool = False) -> list[Path]:
    """Each image's path: under `image_folder` when one is given (an absolute path stays itself), as
    written otherwise. A data file may not reach out of the image folder, by "../", an absolute path
    or a symlink: a crafted file could otherwise read, and with a remote judge upload, any image on
    the machine. `anywhere` (--images-outside-folder) lets it."""
    paths = []
    for image in images:
        path = Path(image)
        if image_folder is not None:
            path = Path(image_folder) / path
            if not anywhere:
                check_inside(path, image_folder, name)
        paths.append(path)
    return paths


def check_inside(path: Path, folder, name: str):
    """`path`, with every symlink followed, lies inside `folder`."""
    real, root = path.resolve(), Path(folder).resolve()
    if not real.is_relative_to(root):
        raise DataError(f"{name}: image {path} leads outside the image folder {folder} (to {real}); "
                        "pass --images-outside-folder if that is meant")


# LLaVA pads an image to a square of its longest side before resizing it (tinyalign/images.py, as LLaVA does):
# the padded square, not the file, is what memory pays for. A 1 x 25000 PNG is 177 bytes on disk and
# 625 million pixels once padded. And a strip thinner than 1/50 of its length is under 7 of 336 pixels
# after the resize: nothing a model can see.
MAX_ASPECT_RATIO = 50


def check_image_size(size: tuple[int, int], label: str, name: str, error=None):
    """Refuse, by its header alone, an image too large once padded or too thin to show anything."""
    error = error or DataError
    width, height = size
    side = max(width, height)
    if side * side > Image.MAX_IMAGE_PIXELS:
        raise error(f"{name}: {label} is too large to decode safely: {width} x {height} pads to "
                    f"{side} x {side}, over {Image.MAX_IMAGE_PIXELS:,} pixels; resize it")
    if min(width, height) == 0 or side / min(width, height) > MAX_ASPECT_RATIO:
        raise error(f"{name}: {label} is {width} x {height}, longer than {MAX_ASPECT_RATIO}:1; "
                    f"padded to a square it would show nothing; crop it")


def check_image(path, name: str, error=None, label: str | None = None):
    """Decode the whole image now, so that a missing, truncated or absurdly large one fails before
    training, not hours into it. Larger than Pillow's limit for a sane image (about 89 million pixels,
    Image.MAX_IMAGE_PIXELS) counts as unreadable: a "decompression bomb" would take gigabytes.
    `path`: a file, or bytes in a file object (then `label` says what it is in messages); `error`:
    the class raised (DataError, or a benchmark file's BenchmarkError)."""
    error, label = error or DataError, label or f"image {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_image_size(im.size, label, name, error)
                im.load()  # decodes every pixel: a truncated file fails here, not only its header
    except DataError:
        raise  # already names the record and the image (a DataError is a ValueError, caught below)
    except FileNotFoundError:
        raise error(f"{name}: {label} not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise error(f"{name}: {label} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise error(f"{name}: {label} is not readable ({e})") from None


@dataclass
class SFTExample:
    encoded: Encoded
    images: list[Path]


@dataclass
class PairExample:
    id: str
    chosen: Encoded
    rejected: Encoded
    images: list[Path]
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    ref_corrupted: float | None = None  # the chosen answer under a corrupted image (mDPO only)


def _prepare_images(images, image_folder, name, report, skip_bad, anywhere):
    paths = resolve_images(images, image_folder, name, anywhere)  # outside the folder: an error even with --skip-bad
    try:
        for p in paths:
            check_image(p, name)
    except DataError as e:
        if not skip_bad:
            raise DataError(f"{e} (pass --skip-bad to skip such records)") from None
        report.drop("missing or unreadable image", str(e))
        return None
    return paths


def sft_examples(records: list[Conversation], processor: Processor, image_folder=None, max_length=None,
                 skip_bad=False, source="data", images_anywhere=False) -> tuple[list[SFTExample], DataReport]:
    report, out = DataReport(source), []
    for r in records:
        name = f"{source} record {r.id}"
        paths = _prepare_images(r.images, image_folder, name, report, skip_bad, images_anywhere)
        if paths is None:
            continue
        turns = r.turns
        if paths and not any(IMAGE_TAG in t["value"] for t in turns):
            turns = [{**turns[0], "value": _with_image_tag(turns[0]["value"], len(paths))}] + turns[1:]
        encoded = processor.encode(turns, where=name)
        if max_length is not None and len(encoded.input_ids) > max_length:
            report.drop(f"longer than --max-length {max_length}", name)  # dropped, never cut
            continue
        if encoded.num_images != len(paths):
            raise DataError(f"{name}: {encoded.num_images} <image> tags for {len(paths)} image file(s)")
        if not encoded.num_supervised:
            report.drop("no answer to learn from", name)
            continue
        out.append(SFTExample(encoded, paths))
    report.kept = len(out)
    return out, report


def pair_examples(pairs: list[Pair], processor: Processor, image_folder=None, max_length=None, skip_bad=False,
                  source="data", images_anywhere=False) -> tuple[list[PairExample], DataReport]:
    report, out = DataReport(source), []
    for p in pairs:
        name = f"{source} record {p.id}"
        paths = _prepare_images(p.images, image_folder, name, report, skip_bad, images_anywhere)
        if paths is None:
            continue
        chosen, rejected = (processor.encode([{"from": "human", "value": p.prompt}, {"from": "gpt", "value": a}],
                                             where=name) for a in (p.chosen, p.rejected))
        if max_length is not None and max(len(chosen.input_ids), len(rejected.input_ids)) > max_length:
            report.drop(f"longer than --max-length {max_length}", name)  # dropped, never cut
            continue
        if chosen.num_images != len(paths):
            raise DataError(f"{name}: {chosen.num_images} <image> tags for {len(paths)} image file(s)")
        out.append(PairExample(p.id, chosen, rejected, paths, p.ref_chosen, p.ref_rejected))
    report.kept = len(out)
    return out, report


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
