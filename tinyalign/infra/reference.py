"""The reference log-probs DPO computes once before training, kept on disk so that a rerun or a
resume does not compute them again.

One file per key under --cache-dir/ref_logps/: the key is a digest of the start model's files, the
data files and every argument that changes the values (template, image mode, sums or means, the
pairing seed, ...). Change any of these and the key changes, so the pass runs again. Inside, each
pair's values are filed under a digest of the pair itself (its token ids and its images' bytes), never
under its id: two pairs that share an id, or the held-out pairs beside training pairs without ids,
each keep their own.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ..data import file_digest
from .files import remove_stale_temporaries, write_atomic
from .weights import model_digest


class ReferenceCache:
    """{pair digest: [log p(chosen), log p(rejected)(, log p(chosen | corrupted image))]} for one key."""

    def __init__(self, args):
        self.path = Path(args.cache_dir) / "ref_logps" / f"{cache_key(args, model_digest(args.model))}.json"
        remove_stale_temporaries(self.path.parent)  # a save killed before its rename
        self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}

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


def pair_digest(example) -> str:
    """A pair by what it is: the token ids of both answers (the prompt in each) and its images' bytes
    (and, for mDPO's corrupted crop, which is drawn from it, its id)."""
    parts = [example.id, example.chosen.input_ids, example.rejected.input_ids, [image_digest(str(p)) for p in example.images]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def image_digest(path: str) -> str:  # an image shared by many pairs is read once
    return file_digest(path)


def cache_key(args, model: str) -> str:
    parts = [model, file_digest(args.data), args.eval_data and file_digest(args.eval_data),
             args.max_length, args.template, args.image_mode, args.average_logps, args.pair_seed, args.image_folder]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


