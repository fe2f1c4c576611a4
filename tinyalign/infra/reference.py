"""The reference log-probs DPO computes once before training, kept on disk so that a rerun or a
resume does not compute them again.

One file per key under --cache-dir/ref_logps/: the key is a digest of the start model's files, the
data files and every argument that changes the values (template, image mode, sums or means, the
pairing seed, ...). Change any of these and the key changes, so the pass runs again. Inside, each
pair's values are filed under a digest of the pair itself (its token ids and its images' bytes), never
under its id: two pairs that share an id, or the held-out pairs beside training pairs without ids,
each keep their own. The cache is derived data: a file that does not read, or an entry that is not
a log-probability (finite, <= 0, not below data.LOWEST_LOGP), is set aside and computed again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

from ..data import LOWEST_LOGP, file_digest
from .files import remove_stale_temporaries, write_atomic
from .weights import model_digest


class ReferenceCache:
    """{pair digest: [log p(chosen), log p(rejected)(, log p(chosen | corrupted image))]} for one key."""

    def __init__(self, args):
        reference = getattr(args, "reference_model", None) or args.model  # the model whose log-probs these are
        self.path = Path(args.cache_dir) / "ref_logps" / f"{cache_key(args, model_digest(reference))}.json"
        remove_stale_temporaries(self.path.parent)  # a save killed before its rename
        self.entries = self.read() if self.path.exists() else {}

    def read(self) -> dict:
        """The entries that hold log-probabilities; the others are left out (and computed again)."""
        try:
            raw = json.loads(self.path.read_text())
        except (ValueError, RecursionError):
            print(f"warning: {self.path} does not read as JSON: the reference log-probs are computed again")
            return {}
        if not isinstance(raw, dict):
            raw = {}
        entries = {k: v for k, v in raw.items() if isinstance(v, list) and 2 <= len(v) <= 3 and all(map(is_logp, v))}
        if len(entries) < len(raw):
            print(f"warning: {self.path}: {len(raw) - len(entries)} of {len(raw)} entries are not log-probabilities "
                  f"(damaged or edited): those pairs are computed again")
        return entries

    def fill(self, examples, with_corrupted: bool) -> bool:
        """Set the examples' reference log-probs from the cache; False (nothing set) unless it holds all."""
        width = 3 if with_corrupted else 2
        keys = [pair_digest(e) for e in examples]
        if not all(len(self.entries.get(k, [])) >= width for k in keys):
            return False
        for e, k in zip(examples, keys):
            e.ref_chosen, e.ref_rejected, e.ref_corrupted = (self.entries[k] + [None])[:3]
        return True

    def save(self, examples, with_corrupted: bool) -> None:
        self.entries.update({pair_digest(e): [e.ref_chosen, e.ref_rejected] + ([e.ref_corrupted] if with_corrupted else [])
                             for e in examples})
        write_atomic(self.path, json.dumps(self.entries))  # written whole, then renamed: never half a file


def is_logp(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and LOWEST_LOGP <= value <= 0)


def pair_digest(example) -> str:
    """A pair by what it is: the token ids of both answers (the prompt in each) and its images' bytes
    (and, for mDPO's corrupted crop, which is drawn from it, its id)."""
    parts = [example.id, example.chosen.input_ids, example.rejected.input_ids, [image_digest(str(p)) for p in example.images]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def image_digest(path: str) -> str:  # an image shared by many pairs is read once
    return file_digest(path)


def cache_key(args, model: str) -> str:
    parts = [model, args.data and file_digest(args.data), args.eval_data and file_digest(args.eval_data),
             args.max_length, args.template, args.image_mode, args.average_logps, args.pair_seed, args.image_folder]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


