"""Packing: several sequences in one row, kept apart by the attention mask, so no compute goes to padding
or to the same prompt twice.

Two ideas, one mechanism:

* Shared prefix (DPO). A pair is packed as one sequence `[prompt | chosen | rejected]`. Both answers
  attend to the prompt, neither to the other, and the rejected answer's positions restart where the
  chosen one's did, so each answer sees exactly what it would see alone. The image (576 tokens for
  LLaVA-1.5) and the question go through the decoder once per pair instead of twice.
* Documents (SFT and DPO). Several conversations, or several packed pairs, share a row; a token
  attends only within its own document, and positions restart at 0 in each.

Every token carries a document id (-1: padding) and a branch id (0: shared, 1: chosen, 2: rejected);
`attention.AttentionMask` turns those into the FlexAttention mask_mod
    same document  and  causal  and  (key is shared  or  key is on the query's branch).

Scoring changes in one place. Unpacked, the logits at t score the token at t + 1. Packed, the first
rejected token follows the last *chosen* token in the row but must be scored from the last *prompt*
token. So the batch lists each scored token explicitly: the (row, column) whose hidden state predicts
it, the token id, and which output sequence it counts toward (`losses.scored_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import PairExample, SFTExample, load_pixels
from .processor import IGNORE_INDEX, Encoded


@dataclass
class Document:
    """One packed unit before it is placed in a row: its ids, branches, positions and scored tokens
    (as offsets within the document)."""

    ids: list[int]
    branch: list[int]
    positions: list[int]
    scored: list[tuple[int, int, int]]  # (predicting offset, token id, output sequence)
    images: list = field(default_factory=list)


def split_prompt(encoded: Encoded) -> int:
    """Length of the unsupervised prefix: everything before the first supervised token."""
    for i, label in enumerate(encoded.labels):
        if label != IGNORE_INDEX:
            return i
    raise ValueError("sequence has no supervised token")


def pair_document(example: PairExample, chosen_seq: int, rejected_seq: int) -> Document:
    """[prompt | chosen | rejected] with the rejected answer's positions restarting after the prompt."""
    p = split_prompt(example.chosen)
    if example.rejected.input_ids[:p] != example.chosen.input_ids[:p] or split_prompt(example.rejected) != p:
        raise ValueError(f"pair {example.id}: chosen and rejected do not share their prompt tokens")
    chosen_ids, chosen_labels = example.chosen.input_ids[p:], example.chosen.labels[p:]
    rejected_ids, rejected_labels = example.rejected.input_ids[p:], example.rejected.labels[p:]
    c = len(chosen_ids)
    ids = example.chosen.input_ids[:p] + chosen_ids + rejected_ids
    branch = [0] * p + [1] * c + [2] * len(rejected_ids)
    positions = list(range(p + c)) + list(range(p, p + len(rejected_ids)))
    scored = []
    for i, label in enumerate(chosen_labels):  # token p+i, predicted from p+i-1 (the prompt's last for i=0)
        if label != IGNORE_INDEX:
            scored.append((p + i - 1, label, chosen_seq))
    for i, label in enumerate(rejected_labels):  # token p+c+i; its first token is predicted from the prompt
        if label != IGNORE_INDEX:
            scored.append((p - 1 if i == 0 else p + c + i - 1, label, rejected_seq))
    return Document(ids, branch, positions, scored, example.images)


def sft_document(example: SFTExample, seq: int) -> Document:
    e = example.encoded
    scored = [(t - 1, label, seq) for t, label in enumerate(e.labels) if label != IGNORE_INDEX and t > 0]
    return Document(list(e.input_ids), [0] * len(e.input_ids), list(range(len(e.input_ids))), scored, example.images)


def place(documents: list[Document], max_tokens: int | None) -> list[list[int]]:
    """Rows of document indices. max_tokens None: one document per row. Otherwise first fit, in the
    given order, into rows of at most max_tokens (a longer document gets a row of its own)."""
    if max_tokens is None:
        return [[i] for i in range(len(documents))]
    rows, room = [], []
    for i, doc in enumerate(documents):
        for r, left in enumerate(room):
            if len(doc.ids) <= left:
                rows[r].append(i)
                room[r] -= len(doc.ids)
                break
        else:
            rows.append([i])
            room.append(max_tokens - len(doc.ids))
    return rows


def collate_documents(documents: list[Document], n_sequences: int, processor, max_tokens: int | None,
                      pixel_cache=None) -> dict:
    """Documents -> a packed batch: input_ids, position_ids, document_ids, branch_ids [R, L] and the
    scored-token list (predict_rows, predict_cols, targets, sequence [N]) for `n_sequences` outputs."""
    rows = place(documents, max_tokens)
    width = max(sum(len(documents[i].ids) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), processor.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(R, width, dtype=torch.long)
    document_ids = torch.full((R, width), -1, dtype=torch.long)
    branch_ids = torch.zeros(R, width, dtype=torch.long)
    predict_rows, predict_cols, targets, sequence, images = [], [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for d, i in enumerate(row):
            doc, n = documents[i], len(documents[i].ids)
            input_ids[r, start:start + n] = torch.tensor(doc.ids)
            position_ids[r, start:start + n] = torch.tensor(doc.positions)
            document_ids[r, start:start + n] = d
            branch_ids[r, start:start + n] = torch.tensor(doc.branch)
            for offset, token, seq in doc.scored:
                predict_rows.append(r)
                predict_cols.append(start + offset)
                targets.append(token)
                sequence.append(seq)
            images += doc.images  # image tokens appear in row-major order, so the images must too
            start += n
    return {"input_ids": input_ids, "position_ids": position_ids, "document_ids": document_ids,
            "branch_ids": branch_ids, "pixel_values": load_pixels(processor, images, pixel_cache),
            "targets": {"rows": torch.tensor(predict_rows), "cols": torch.tensor(predict_cols),
                        "tokens": torch.tensor(targets), "sequence": torch.tensor(sequence),
                        "n_sequences": n_sequences}}


def pack_pairs(examples: list[PairExample], processor, max_tokens: int | None = None, pixel_cache=None) -> dict:
    """A DPO batch with shared prefixes (and, with max_tokens, several pairs per row). Output
    sequences 0..B-1 are the chosen answers, B..2B-1 the rejected ones: the order collate_pairs uses."""
    B = len(examples)
    documents = [pair_document(e, k, B + k) for k, e in enumerate(examples)]
    batch = collate_documents(documents, 2 * B, processor, max_tokens, pixel_cache)
    batch["ref_chosen"] = torch.tensor([e.ref_chosen if e.ref_chosen is not None else float("nan") for e in examples])
    batch["ref_rejected"] = torch.tensor([e.ref_rejected if e.ref_rejected is not None else float("nan")
                                          for e in examples])
    batch["ref_corrupted"] = torch.tensor([e.ref_corrupted if e.ref_corrupted is not None else float("nan")
                                           for e in examples])
    return batch


def pack_sft(examples: list[SFTExample], processor, max_tokens: int | None = None, pixel_cache=None) -> dict:
    """An SFT batch with several conversations per row (document masking)."""
    documents = [sft_document(e, k) for k, e in enumerate(examples)]
    return collate_documents(documents, len(examples), processor, max_tokens, pixel_cache)


# ---------------------------------------------------------------------------------------------
# What the training scripts call: one forward, plain or packed batch alike
# ---------------------------------------------------------------------------------------------

# Llava.forward's keyword arguments that a batch carries. Plain rows: input_ids, attention_mask,
# labels (and repeat_images=2 for DPO's chosen-then-rejected rows). Packed rows: position_ids,
# document_ids, branch_ids and the scored-token list `targets`. Either way, forward returns one
# log-prob per answer.
FORWARD_INPUTS = ("input_ids", "pixel_values", "attention_mask", "labels", "repeat_images", "position_ids",
                  "document_ids", "branch_ids", "targets")


def model_inputs(batch: dict, device) -> dict:
    """A batch (plain or packed) as the keyword arguments of Llava.forward, its tensors on `device`:
    `model(**model_inputs(batch, device))` -> log p(answer) for every answer of the batch [S]."""
    def moved(value):
        if isinstance(value, dict):  # the packed batch's targets
            return {k: moved(v) for k, v in value.items()}
        return value.to(device) if torch.is_tensor(value) else value

    return {key: moved(batch[key]) for key in FORWARD_INPUTS if key in batch}


def pair_logps(model, batch: dict, device, average: bool = False):
    """-> (log p(chosen) [B], log p(rejected) [B]) of a pair batch, in one forward (what eval.py and
    train_dpo.py's reference pass call; the training step writes the same call out)."""
    return model(**model_inputs(batch, device), average_logps=average).chunk(2)


def supervised_counts(batch: dict) -> torch.Tensor:
    """Number of scored tokens of each answer in a batch [S] (plain or packed)."""
    if "targets" in batch:
        t = batch["targets"]
        return torch.bincount(t["sequence"], minlength=t["n_sequences"])
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding (what tokens/s counts)."""
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def batch_maker(args, processor, kind: str):
    """-> make(examples, pixel_cache=None): plain batches, or packed ones with --packing. For a loss that
    compares images (mDPO), a pair batch also carries batch["corrupted"]: the chosen answers again,
    under corrupted images (always plain rows)."""
    from .data import collate_corrupted, collate_pairs, collate_sft
    from .losses import PREFERENCE_LOSSES

    def make(examples, pixel_cache=None):
        if getattr(args, "packing", False):
            return (pack_pairs if kind == "pairs" else pack_sft)(examples, processor, args.pack_tokens, pixel_cache)
        return (collate_pairs if kind == "pairs" else collate_sft)(examples, processor, pixel_cache)

    def make_with_corrupted(examples, pixel_cache=None):
        return {**make(examples, pixel_cache), "corrupted": collate_corrupted(examples, processor)}

    loss = PREFERENCE_LOSSES.get(getattr(args, "loss_type", None))
    return make_with_corrupted if kind == "pairs" and loss is not None and loss.image_conditional else make
