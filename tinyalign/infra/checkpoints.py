"""Training checkpoints: step-numbered folders under out/checkpoints/ and one pointer to the newest.

One small file, out/checkpoints/latest, names the newest complete checkpoint. A save writes a new
folder under a temporary name, flushes it to disk (fsync), renames it into place, and only then
replaces the pointer file (itself written whole, infra/files.py). So at every instant the pointer
names a complete checkpoint, or there is none yet; whatever a crash leaves half-done has a name no
reader looks at, and the next run removes it (`remove_leftovers`).

The files are safetensors (tensors) and JSON (everything else): loading a checkpoint never runs code,
unlike a pickle. checksums.json, written last, holds the SHA-256 of both; a resume checks them, so a
file damaged on disk or edited by hand is named instead of trained from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .files import (crash_point, fsync_path, fsync_tree, recover_folder, remove_stale_temporaries, sha256_file,
                    standalone, usual_permissions, write_atomic, writing)

KEEP = 2  # checkpoints kept: the newest and the one before (see `Run.check_finite`)
CHECKED = ("tensors.safetensors", "state.json")  # a checkpoint's files, each with its SHA-256 in CHECKSUMS
CHECKSUMS = "checksums.json"


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not read, or no longer match the checksums written with them."""


def checkpoints_folder(out) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out) -> Path | None:
    """The folder out/checkpoints/latest names, or None when no checkpoint was ever published."""
    pointer = checkpoints_folder(out) / "latest"
    if not pointer.exists():
        return None
    folder = checkpoints_folder(out) / pointer.read_text().strip()
    if not (folder / "state.json").exists() or not (folder / "tensors.safetensors").exists():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is incomplete or missing: the checkpoint "
                                "folder was changed by hand")
    return folder


def published(out) -> list[Path]:
    """Every complete checkpoint still on disk, oldest first."""
    root = checkpoints_folder(out)
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []


def save_checkpoint(out, step: int, tensors: dict, state: dict) -> Path:
    """Write a checkpoint (tensors -> safetensors, state -> JSON) and make it the latest one."""
    root = checkpoints_folder(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}-{time.time_ns()}"  # unique: a rerun of the same step never touches the published one
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    try:
        crash_point("checkpoint: folder made, nothing written")
        with writing(tmp / "tensors.safetensors"):
            save_file({k: standalone(v) for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        crash_point("checkpoint: tensors written")
        with writing(tmp / "state.json"):
            (tmp / "state.json").write_text(json.dumps(state, default=str))
        crash_point("checkpoint: state written")
        with writing(tmp / CHECKSUMS):
            (tmp / CHECKSUMS).write_text(json.dumps({name: sha256_file(tmp / name) for name in CHECKED}, indent=1))
        usual_permissions(tmp)
        fsync_tree(tmp)
        os.replace(tmp, root / name)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point("checkpoint: folder renamed, pointer not yet moved")
    write_atomic(root / "latest", name)
    crash_point("checkpoint: pointer moved")
    for old in published(out)[:-KEEP]:
        shutil.rmtree(old)
    crash_point("checkpoint: older ones removed")
    return root / name


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """-> (tensors, state) of a checkpoint folder, its files checked against their checksums."""
    verify_checkpoint(folder)
    try:
        return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as e:  # checkpoints of before the checksums, damaged
        raise CheckpointDamaged(f"{folder}: the checkpoint does not read ({e}); {OLDER}") from None


OLDER = "resume from an older step folder beside it (write its name into checkpoints/latest) or start over"


def verify_checkpoint(folder: Path) -> None:
    """Each file's SHA-256 against checksums.json (checkpoints written before there were checksums
    have none: they are taken as they are)."""
    if not (folder / CHECKSUMS).exists():
        return
    try:
        expected = json.loads((folder / CHECKSUMS).read_text())
    except ValueError:
        raise CheckpointDamaged(f"{folder / CHECKSUMS}: not valid JSON; {OLDER}") from None
    for name in CHECKED:
        actual = sha256_file(folder / name)
        if actual != expected.get(name):
            raise CheckpointDamaged(f"{folder / name} has changed since it was saved (SHA-256 {actual[:12]}..., "
                                    f"written as {str(expected.get(name))[:12]}...): damaged on disk or edited by "
                                    f"hand; {OLDER}")


def set_latest(out, folder: Path | None) -> None:
    """Point `latest` at an older checkpoint (or at none)."""
    pointer = checkpoints_folder(out) / "latest"
    if folder is None:
        pointer.unlink(missing_ok=True)
    else:
        write_atomic(pointer, folder.name)


def remove_leftovers(out) -> list[str]:
    """What crashed saves left behind: temporary checkpoint folders and pointer files, checkpoints
    never published (or no longer named), and the temporary or set-aside copies of out/model/.
    Returns what was removed (or restored)."""
    out = Path(out)
    done = []
    root = checkpoints_folder(out)
    if root.exists():
        latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
        names = [p.name for p in published(out)]
        if latest is None:
            # No pointer, yet complete step folders: a crash between a step folder's rename and the
            # pointer's, or a pointer lost by hand or with a copy. A step folder is renamed into place
            # only once complete, so nothing here is half-written: point at the newest one that reads.
            readable = [name for name in names if readable_checkpoint(root / name)]
            if readable:
                write_atomic(root / "latest", readable[-1])
                done.append(f"{root / 'latest'} was missing: it now names {readable[-1]}, the newest complete "
                            "checkpoint")
                latest = readable[-1]
        if latest is not None and latest not in names:
            keep = set(names)  # a pointer to nothing complete: changed by hand; delete nothing, resume says so
        else:
            newest = names.index(latest) if latest in names else -1  # no pointer and no checkpoint
            keep = set(names[max(0, newest - KEEP + 1):newest + 1])  # the pointer's and the one before it
        for path in root.iterdir():
            if path.name.startswith(".tmp-") or path.name.startswith(".latest.tmp-") or \
                    (path.name.startswith("step-") and path.name not in keep):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                done.append(str(path))
    done += recover_folder(out / "model")  # the final model's folder: an interrupted save_model
    done += recover_folder(out / "adapter")
    done += remove_stale_temporaries(out)  # metrics.jsonl cut back by a resume that was killed
    return done


def readable_checkpoint(folder: Path) -> bool:
    """Its files match their checksums, its state parses and its tensors file's header reads (what
    resuming from it first needs)."""
    try:
        verify_checkpoint(folder)
        json.loads((folder / "state.json").read_text())["step"]
        with safe_open(str(folder / "tensors.safetensors"), framework="pt") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - any failure to read makes it no checkpoint to resume from
        return False
    return True


def tensors_not_finite(tensors: dict) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
