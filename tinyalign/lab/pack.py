"""Pack a finished `runs/` into one archive a teacher hands out, so that a room starts from the same
seed-0 models and data without training them (or a laptop that fell behind catches up).

    python -m tinyalign.lab.pack                          # runs/ -> workshop-runs.tar.gz
    tar xzf workshop-runs.tar.gz                          # on each laptop, in the clone's root: runs/ is there

Kept: every model folder, the DPO demo's snapshots (exercise 9 reads them), metrics.jsonl, the
shapes world, the rated samples, the study's and the ablations' results and pages, the per-token view.
Left out: resumable checkpoints (optimizer state; a finished run needs none), the ablations' snapshots,
caches and lock files, which a participant's runs make again if needed. Written under a temporary name and renamed, so a half-written archive never has the real name.
"""

from __future__ import annotations

import argparse
import os
import tarfile
from pathlib import Path

NEEDED = ["demo-data", "demo-sft/model/config.json", "demo-dpo/model/config.json"]  # what exercises 1-9 read
LEFT_OUT = {"checkpoints", "cache", "ref_logps"}
OPTIONAL = {"study": "the study's page", "ablations": "the ablations", "demo-steerlm": "the SteerLM demo"}


def left_out(path: Path) -> bool:
    """path: relative to runs/."""
    return (any(part in LEFT_OUT for part in path.parts) or path.name.endswith(".lock") or ".tmp-" in path.name
            or ("snapshots" in path.parts and path.parts[0] != "demo-dpo"))


def pack(runs: Path, archive: Path) -> tuple[int, int]:
    """-> (files packed, bytes). The archive's members start with runs/, whatever the folder is called."""
    missing = [name for name in NEEDED if not (runs / name).exists()]
    if missing:
        raise SystemExit(f"{runs}: no {', '.join(missing)}: run python train_sft.py and python train_dpo.py first")
    files = sorted(p for p in runs.rglob("*") if p.is_file() and not left_out(p.relative_to(runs))
                   and p.resolve() != archive.resolve())
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in files:
                tar.add(path, arcname=str(Path("runs") / path.relative_to(runs)))
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)
    return len(files), archive.stat().st_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="the finished runs folder")
    p.add_argument("--out", default="workshop-runs.tar.gz")
    args = p.parse_args(argv)
    n, size = pack(Path(args.runs), Path(args.out))
    for folder, what in OPTIONAL.items():
        print(f"{what}: {'included' if (Path(args.runs) / folder).exists() else 'not there, so not included'}")
    print(f"{args.out}: {n} files, {size / 2**20:.1f} MiB. On each laptop, in the clone's root: tar xzf {args.out}")
    return n


if __name__ == "__main__":
    main()
