"""Text and images in, model inputs out: the tokenizer, LLaVA-1.5's chat templates, label masks.

Rendering follows LLaVA-1.5 (its `conv_vicuna_v1` template and `preprocess_v1` + `tokenizer_image_token`):

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

with a BOS in front, SentencePiece's leading "▁" on every text chunk (so the image sits between a
"▁" token and "▁\\n"), and `image_seq_length` image ids in place of `<image>`. Labels supervise each
answer and its `</s>`, nothing else.

LLaVA tokenises the whole string and then *re-derives* where the answers are by tokenising pieces
again; when the two disagree it masks the entire sample and prints a warning ("tokenization
mismatch"). Here each piece is tokenised once, its ids and labels produced together, so the
labels cannot drift from the ids.

Text is only ever text. The control ids (BOS, EOS, UNK, the image id) are placed by this file alone:
a literal "</s>", "<s>", "<unk>" or "<image>" written in a question or an answer is tokenised as the
characters it is (LLaVA's tokenizer would turn "</s>" in an answer into a real EOS, teaching the
model to stop mid-answer; and user text must never be able to inject control tokens). The one
place `<image>` means an image is a human turn, where it is LLaVA's data format's image marker.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from .config import VisionConfig
from .config_json import config_from_hf_dict, is_original_llava, read_json, vision_config_from_dict
from .hub import missing_file, model_folder, snapshot_of
from .images import CLIP_MEAN, CLIP_STD, ImageProcessor

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
ROLES = {"human": "USER", "user": "USER", "gpt": "ASSISTANT", "assistant": "ASSISTANT"}
SYSTEM_PROMPTS = {
    # LLaVA-1.5's training and official evaluation template.
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    # What LLaVA's quick-inference script picks; differs by "human" for "user".
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}


class SequenceTooLong(ValueError):
    """A sample that cannot be cut to the length limit without cutting an image or every answer."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Processor:
    tokenizer: Tokenizer
    image_token_index: int = 32000
    image_seq_length: int = 576
    images: ImageProcessor = field(default_factory=ImageProcessor)
    template: str = "vicuna_v1"
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.template not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown chat template {self.template!r}; choose one of {sorted(SYSTEM_PROMPTS)}")
        # A copy that reads special-token strings ("</s>", "<image>", ...) as plain text: every text
        # chunk is tokenised with it (the flag is not saved with the tokenizer, nor set on the caller's).
        self._text_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.token_to_id("<pad>")
        return pad if pad is not None else 0  # LLaVA pads with <unk> (id 0) when there is no <pad>

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, tokenizer_file=None, template: str = "vicuna_v1", image_mode: str = "pad",
                        image_token_index: int | None = None, vision_tower=None,
                        revision: str | None = None) -> "Processor":
        """Tokenizer from `tokenizer_file`, else the folder's tokenizer.json, else its SentencePiece
        tokenizer.model (converted on the fly); image settings from its config.json. `path`: a folder,
        or a Hugging Face repo id in the local Hub cache at `revision` (tinyalign/hub.py)."""
        folder = model_folder(path, revision)
        tokenizer = load_tokenizer(folder, tokenizer_file)
        vision, image_index, seq_len = VisionConfig(), 32000, None  # LLaVA-1.5 when there is no config
        if (folder / "config.json").exists():
            raw = read_json(folder / "config.json")
            if is_original_llava(raw):
                clip = clip_folder(vision_tower or raw.get("mm_vision_tower"))
                if clip is not None and (clip / "config.json").exists():
                    vision = vision_config_from_dict(read_json(clip / "config.json"), str(clip / "config.json"))
                full = raw.get("mm_vision_select_feature", "patch") == "cls_patch"
                seq_len = vision.num_patches + full
                image_index = raw.get("vocab_size", 32000)  # just past the vocabulary, as in load_model
            else:
                cfg = config_from_hf_dict(raw, str(folder / "config.json"))
                vision, image_index, seq_len = cfg.vision, cfg.image_token_index, cfg.image_seq_length
        mean, std = CLIP_MEAN, CLIP_STD
        if (folder / "preprocessor_config.json").exists():
            pre = read_json(folder / "preprocessor_config.json")
            mean, std = normalisation(pre.get("image_mean", mean), pre.get("image_std", std),
                                      folder / "preprocessor_config.json")
        return cls(
            tokenizer=tokenizer,
            image_token_index=image_token_index if image_token_index is not None else image_index,
            image_seq_length=seq_len or vision.num_patches,
            images=ImageProcessor(size=vision.image_size, mode=image_mode, mean=mean, std=std),
            template=template,
        )

    def save_pretrained(self, folder, vocab_size: int | None = None):
        """Write tokenizer.json (+ `<image>` and `<pad>` if the tokenizer lacks them and the id is inside
        the vocabulary), tokenizer_config.json and preprocessor_config.json in the llava-hf style."""
        folder = Path(folder)
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        if tokenizer.token_to_id(IMAGE_TAG) is None and (vocab_size is None or self.image_token_index < vocab_size):
            tokenizer.add_special_tokens([AddedToken(IMAGE_TAG, special=True, normalized=False),
                                          AddedToken("<pad>", special=True, normalized=False)])
            if tokenizer.token_to_id(IMAGE_TAG) != self.image_token_index:
                raise ValueError(f"the tokenizer would put {IMAGE_TAG} at id {tokenizer.token_to_id(IMAGE_TAG)}, "
                                 f"but the model's image_token_index is {self.image_token_index}")
        tokenizer.save(str(folder / "tokenizer.json"))
        has_pad = tokenizer.token_to_id("<pad>") is not None
        tokenizer_config = {
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<pad>" if has_pad else "<unk>", "add_bos_token": True, "add_eos_token": False,
            "legacy": True, "padding_side": "left", "model_max_length": 4096,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        size = self.images.size
        preprocessor = {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(self.images.mean), "image_std": list(self.images.std), "do_convert_rgb": True,
            "do_pad": self.images.mode == "pad",
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids of plain text (no BOS). Every character is text: "</s>" or "<image>" written in it become
        ordinary pieces, never the EOS or image ids."""
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_chunks(self, chunks: list[str]) -> list[int]:
        """Text chunks with an image between each two: `image_seq_length` image ids per image. Each
        chunk is tokenised on its own, as LLaVA's `tokenizer_image_token` does."""
        ids = []
        for i, chunk in enumerate(chunks):
            if i:
                ids += [self.image_token_index] * self.image_seq_length
            ids += self.tokenize(chunk)
        return ids

    def decode(self, ids) -> str:
        ids = [i for i in (ids.tolist() if torch.is_tensor(ids) else ids) if i != self.image_token_index]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def segments(self, turns: list[dict], where: str = "conversation",
                 num_images: int | None = None) -> list[tuple[list[str], bool]]:
        """Turns [{"from": "human"|"gpt", "value": str}, ...] -> [(chunks, is_answer)] in template order,
        where an image sits between each two chunks of a segment.

        In a human turn `<image>` marks an image: every tag (LLaVA's data format), or, when `num_images`
        is given, only the first `num_images` tags of the conversation; the rest, and any in an answer,
        are text. A single image is moved to the front of its turn and the turn stripped, exactly as
        LLaVA's `preprocess_multimodal` does (so a turn that is only `<image>` is just the image).
        Several images stay where they are written. A final human turn with no answer yet makes a
        generation prompt (ending in "ASSISTANT:").
        """
        if not turns:
            raise ValueError(f"{where}: no turns")
        tags = sum(str(t.get("value", "")).count(IMAGE_TAG) for i, t in enumerate(turns) if i % 2 == 0)
        markers_left = tags if num_images is None else min(num_images, tags)
        single_image = markers_left == 1
        out = []
        for i, turn in enumerate(turns):
            role = ROLES.get(turn.get("from"))
            expected = "USER" if i % 2 == 0 else "ASSISTANT"
            if role != expected:
                raise ValueError(f"{where}: turn {i} is from {turn.get('from')!r}; turns must alternate "
                                 "human, gpt, human, ... starting with human")
            value = turn.get("value")
            if not isinstance(value, str):
                raise ValueError(f"{where}: turn {i} has no text 'value'")
            if role == "ASSISTANT":
                out.append(([value], True))
                continue
            prefix = (SYSTEM_PROMPTS[self.template] + " " if i == 0 else "") + "USER: "
            pieces = value.split(IMAGE_TAG)
            n_markers = min(markers_left, len(pieces) - 1)
            markers_left -= n_markers
            if single_image and n_markers:  # LLaVA: take the tag out, strip, put it first, strip again
                rest = (IMAGE_TAG.join(pieces[:1]) + IMAGE_TAG.join(pieces[1:])).strip()
                chunks = [prefix, ("\n" + rest if rest else "") + " ASSISTANT:"]
            else:  # markers split the turn into chunks; literal tags left over stay in the text
                chunks = [prefix + pieces[0]]
                for k, piece in enumerate(pieces[1:]):
                    if k < n_markers:
                        chunks.append(piece)
                    else:
                        chunks[-1] += IMAGE_TAG + piece
                chunks[-1] += " ASSISTANT:"
            out.append((chunks, False))
        return out

    def render(self, turns: list[dict], num_images: int | None = None) -> str:
        """The conversation as one string, exactly as LLaVA-1.5 writes it (for reading and debugging)."""
        text = ""
        for chunks, is_answer in self.segments(turns, num_images=num_images):
            text += f" {chunks[0]}</s>" if is_answer else IMAGE_TAG.join(chunks)
        return text

    def encode(self, turns: list[dict], max_length: int | None = None, where: str = "conversation",
               num_images: int | None = None) -> Encoded:
        """Conversation -> ids and labels (answers and their </s> supervised, everything else -100).
        num_images: how many `<image>` tags are images (see `segments`); default: every tag in a human turn."""
        ids, labels = [self.bos_token_id], [IGNORE_INDEX]
        for chunks, is_answer in self.segments(turns, where, num_images):
            piece = self.tokenize_chunks(chunks)
            if is_answer:
                piece = piece + [self.eos_token_id]
                ids += piece
                labels += piece
            else:
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
        encoded = Encoded(ids, labels, num_images=ids.count(self.image_token_index) // self.image_seq_length)
        if max_length is not None and len(ids) > max_length:
            encoded = self.truncate(encoded, max_length, where)
        return encoded

    def prompt(self, question: str, num_images: int = 1) -> Encoded:
        """A single-turn generation prompt. The question is plain text (an `<image>` or `</s>` written in
        it is text); the images go first, as LLaVA's evaluation scripts put them."""
        return self.encode([{"from": "human", "value": (IMAGE_TAG + "\n") * num_images + question}],
                           num_images=num_images)

    def truncate(self, encoded: Encoded, max_length: int, where: str) -> Encoded:
        """Cut to max_length, but refuse (SequenceTooLong) rather than cut into or drop an image, or
        drop every supervised token of a sample that had some (its loss would silently be zero)."""
        ids, labels = encoded.input_ids, encoded.labels
        if self.image_token_index in ids[max_length:]:
            raise SequenceTooLong(f"{where}: {len(ids)} tokens; cutting to {max_length} would cut into an image "
                                  f"(image tokens reach position {len(ids) - ids[::-1].index(self.image_token_index)})")
        kept = Encoded(ids[:max_length], labels[:max_length], encoded.num_images)
        if encoded.num_supervised and not kept.num_supervised:
            raise SequenceTooLong(f"{where}: {len(ids)} tokens; cutting to {max_length} would leave no answer token")
        return kept

    # -- batches -------------------------------------------------------------------------------
    def collate(self, encodings: list[Encoded], padding_side: str = "right") -> dict:
        """Pad to the longest: input_ids, attention_mask, labels [B, T]. Training pads right,
        generation pads left (so every prompt ends where generation starts)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(e.input_ids) for e in encodings)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in encodings:
            n = longest - len(e.input_ids)
            rows = (e.input_ids, [1] * len(e.input_ids), e.labels)
            pads = ([self.pad_token_id] * n, [0] * n, [IGNORE_INDEX] * n)
            for key, row, pad in zip(batch, rows, pads):
                batch[key].append(row + pad if padding_side == "right" else pad + row)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def load_tokenizer(folder: Path, tokenizer_file=None) -> Tokenizer:
    from .spm import tokenizer_json_from_sentencepiece

    if tokenizer_file is not None:
        if not Path(tokenizer_file).exists():
            raise FileNotFoundError(f"{tokenizer_file}: tokenizer file not found")
        return Tokenizer.from_file(str(tokenizer_file))
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "tokenizer.model").exists():
        return Tokenizer.from_str(tokenizer_json_from_sentencepiece(folder / "tokenizer.model"))
    if snapshot_of(folder) is not None:  # a partial download: say which repo, and how to complete it
        raise missing_file(folder, "tokenizer.json", "the tokenizer; no tokenizer.model either")
    raise FileNotFoundError(
        f"{folder}: no tokenizer.json or tokenizer.model. Pass tokenizer_file=<path to a tokenizer.json>, "
        "for example the one in llava-hf/llava-1.5-7b-hf (the LLaMA tokenizer)."
    )


def clip_folder(name) -> Path | None:
    """The CLIP tower an original LLaVA config names (a folder or a cached repo id), if it is here; its
    absence leaves LLaVA-1.5's image settings, and load_model names it when the weights are needed."""
    try:
        return model_folder(name) if name else None
    except FileNotFoundError:
        return None


def normalisation(mean, std, source) -> tuple[tuple, tuple]:
    """image_mean and image_std of a preprocessor_config.json: three numbers each, in the range of a
    pixel scaled to 0-1, the standard deviations above 0 (a pixel is divided by them)."""
    for name, values in (("image_mean", mean), ("image_std", std)):
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{source}: {name} must be three finite numbers (R, G, B), got {values!r}")
    if min(std) <= 0 or max(std) > 1:  # pixels are scaled to 0-1, then divided by the standard deviations
        raise ValueError(f"{source}: image_std must be above 0 (pixels are divided by it) and at most 1, got {list(std)}")
    if min(mean) < 0 or max(mean) > 1:
        raise ValueError(f"{source}: image_mean must lie in 0-1 (pixels are scaled to 0-1 first), got {list(mean)}")
    return tuple(mean), tuple(std)
