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

from .batches import Batch, PairBatch, collate_corrupted, collate_pairs, collate_sft, load_pixels, reference_tensors
from .data import PairExample, SFTExample
from .losses import Targets
from .processor import IGNORE_INDEX, Encoded


@dataclass
class PackedRows:
    """Where the sequences of packed rows lie, each [R, L]: RoPE positions (restarting in every
    document, and for a rejected answer where its chosen answer started), document ids (-1: padding)
    and branch ids (0: shared prompt, 1: chosen answer, 2: rejected answer). Llava.forward turns them
    into the attention mask (`packed=`)."""

    position_ids: torch.Tensor
    document_ids: torch.Tensor
    branch_ids: torch.Tensor

    def to(self, device) -> "PackedRows":
        return PackedRows(self.position_ids.to(device), self.document_ids.to(device), self.branch_ids.to(device))


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
    """Documents -> Llava.forward's inputs for packed rows: input_ids [R, L], the rows' layout
    (PackedRows) and the scored tokens (Targets) of `n_sequences` answers."""
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
    targets = Targets(torch.tensor(predict_rows, dtype=torch.long), torch.tensor(predict_cols, dtype=torch.long),
                      torch.tensor(targets, dtype=torch.long), torch.tensor(sequence, dtype=torch.long), n_sequences)
    return {"input_ids": input_ids, "pixel_values": load_pixels(processor, images, pixel_cache),
            "packed": PackedRows(position_ids, document_ids, branch_ids), "targets": targets}


def pack_pairs(examples: list[PairExample], processor, max_tokens: int | None = None, pixel_cache=None) -> PairBatch:
    """A DPO batch with shared prefixes (and, with max_tokens, several pairs per row). Answers 0..B-1
    are the chosen ones, B..2B-1 the rejected ones: the order of batches.PairBatch."""
    B = len(examples)
    documents = [pair_document(e, *PairBatch.places(k, B)) for k, e in enumerate(examples)]
    inputs = collate_documents(documents, 2 * B, processor, max_tokens, pixel_cache)
    return PairBatch(inputs, *reference_tensors(examples))


def pack_sft(examples: list[SFTExample], processor, max_tokens: int | None = None, pixel_cache=None) -> Batch:
    """An SFT batch with several conversations per row (document masking)."""
    documents = [sft_document(e, k) for k, e in enumerate(examples)]
    return Batch(collate_documents(documents, len(examples), processor, max_tokens, pixel_cache))


# ---------------------------------------------------------------------------------------------
# What the training scripts call: plain or packed batches alike
# ---------------------------------------------------------------------------------------------


def pair_batch(examples: list[PairExample], processor, packing: bool = False, pack_tokens: int | None = None,
               corrupted: bool = False, pixel_cache=None) -> PairBatch:
    """B pairs as plain rows (batches.collate_pairs) or, with packing, as packed ones (`pack_pairs`).
    corrupted: also the chosen answers under corrupted images, for a loss that compares images (mDPO)."""
    batch = (pack_pairs(examples, processor, pack_tokens, pixel_cache) if packing
             else collate_pairs(examples, processor, pixel_cache))
    if corrupted:
        batch.corrupted = collate_corrupted(examples, processor)
    return batch


def sft_batch(examples: list[SFTExample], processor, packing: bool = False, pack_tokens: int | None = None,
              pixel_cache=None) -> Batch:
    """Conversations as plain rows (batches.collate_sft) or packed ones (`pack_sft`)."""
    return pack_sft(examples, processor, pack_tokens, pixel_cache) if packing else collate_sft(examples, processor,
                                                                                               pixel_cache)
