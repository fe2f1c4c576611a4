"""The reference log-probs DPO computes once before training, kept on disk so that a rerun or a
resume does not compute them again.

One file per key under --cache-dir/ref_logps/: the key is a digest of the model folder's files, the
data files and every argument that changes the values (template, image mode, sums or means, the
pairing seed, ...). Change any of these and the key changes, so the pass runs again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..data import file_digest
from .files import write_atomic


class ReferenceCache:
    """{pair id: [log p(chosen), log p(rejected)(, log p(chosen | corrupted image))]} for one key."""

    def __init__(self, args):
        self.path = Path(args.cache_dir) / "ref_logps" / f"{cache_key(args, model_fingerprint(args.model))}.json"
        self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}

    def fill(self, examples, with_corrupted: bool) -> bool:
        """Set the examples' reference log-probs from the cache; False (nothing set) unless it holds all."""
        width = 3 if with_corrupted else 2
        if not all(len(self.entries.get(e.id, [])) >= width for e in examples):
            return False
        for e in examples:
            e.ref_chosen, e.ref_rejected, e.ref_corrupted = (self.entries[e.id] + [None])[:3]
        return True

    def save(self, examples, with_corrupted: bool) -> None:
        self.entries.update({e.id: [e.ref_chosen, e.ref_rejected] + ([e.ref_corrupted] if with_corrupted else [])
                             for e in examples})
        write_atomic(self.path, json.dumps(self.entries))  # written whole, then renamed: never half a file


def cache_key(args, model_fingerprint: str) -> str:
    parts = [model_fingerprint, file_digest(args.data), args.eval_data and file_digest(args.eval_data),
             args.max_length, args.template, args.image_mode, args.average_logps, args.pair_seed, args.image_folder]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def model_fingerprint(path) -> str:
    """Names, sizes and modification times of a checkpoint folder's files: cheap, and changes when they do."""
    files = sorted(Path(path).iterdir())
    return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])
