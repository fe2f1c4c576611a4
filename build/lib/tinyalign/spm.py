"""Read a SentencePiece `tokenizer.model` and turn it into a `tokenizers` JSON tokenizer.

Original LLaVA checkpoints ship only SentencePiece's model file. It is a protocol-buffer message
(`ModelProto` in sentencepiece_model.proto); we need four things from it: the pieces with their
scores and types, the model type (must be BPE, as LLaMA's is), whether byte fallback is on, and the
normaliser flags. A few dozen lines of wire-format decoding get those without the sentencepiece
package at run time.

SentencePiece BPE encodes by repeatedly merging the adjacent pair whose union is the
highest-scoring piece. The `tokenizers` BPE model instead takes an ordered list of merges; listing,
for every piece, the splits of it into two pieces, ordered by the piece's score, gives the same
result.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# SentencePiece.Type and TrainerSpec.ModelType enum values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, value) of one protobuf message. Length-delimited values are bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, value


def read_sentencepiece(path) -> dict:
    """-> {"pieces": [(piece, score, type)], "model_type", "byte_fallback", "add_dummy_prefix",
    "remove_extra_whitespaces", "precompiled_charsmap"}"""
    path = Path(path)
    try:
        buf = path.read_bytes()
        model = {"pieces": [], "model_type": 1, "byte_fallback": False, "add_dummy_prefix": True,
                 "remove_extra_whitespaces": True, "precompiled_charsmap": b""}
        for number, value in _fields(buf):
            if number == 1:  # repeated SentencePiece
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model["pieces"].append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        model["model_type"] = v
                    elif n == 35:
                        model["byte_fallback"] = bool(v)
            elif number == 3:  # NormalizerSpec
                for n, v in _fields(value):
                    if n == 2:
                        model["precompiled_charsmap"] = v
                    elif n == 3:
                        model["add_dummy_prefix"] = bool(v)
                    elif n == 4:
                        model["remove_extra_whitespaces"] = bool(v)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
    if not model["pieces"]:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces found)")
    return model


def _merges(pieces) -> list[list[str]]:
    """Every way to build a normal piece from two pieces, most important (highest score) first."""
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    candidates = []
    for piece, score, kind in pieces:
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                candidates.append((-score, ids[left], ids[right], left, right))
    candidates.sort()
    return [[left, right] for *_, left, right in candidates]


def tokenizer_json_from_sentencepiece(path) -> str:
    """The `tokenizers` JSON (as a string) equivalent to a SentencePiece BPE model file."""
    model = read_sentencepiece(path)
    if model["model_type"] != BPE:
        raise ValueError(f"{path}: SentencePiece model type {model['model_type']} is not BPE (LLaMA's tokenizer is BPE)")
    pieces = model["pieces"]
    unk = next((p for p, _, kind in pieces if kind == UNKNOWN), None)
    added = [
        {"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": kind == USER_DEFINED, "special": kind in (UNKNOWN, CONTROL)}
        for i, (p, _, kind) in enumerate(pieces) if kind in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    normalizers = []
    if model["precompiled_charsmap"]:
        import base64

        charsmap = base64.b64encode(model["precompiled_charsmap"]).decode()
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if model["remove_extra_whitespaces"]:
        normalizers += [{"type": "Strip", "strip_left": True, "strip_right": True},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if model["add_dummy_prefix"]:
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})  # SentencePiece's "dummy prefix"
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if model["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": model["byte_fallback"],
                  "ignore_merges": False,
                  "vocab": {p: i for i, (p, _, _) in enumerate(pieces)}, "merges": _merges(pieces)},
    }
    return json.dumps(tokenizer, ensure_ascii=False)
