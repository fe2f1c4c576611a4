"""Writing what a run makes so that a crash, a full disk or a second process never costs what was there.

Training checkpoints live in step-numbered folders under out/checkpoints/, and one small file,
out/checkpoints/latest, names the newest complete one. A save writes a new folder under a temporary
name, flushes it to disk (fsync), renames it into place, and only then replaces the pointer file
(itself written under a temporary name, flushed, renamed). So at every instant the pointer names a
complete checkpoint, or there is none yet; whatever a crash leaves half-done has a name no reader
looks at, and the next run removes it (`remove_leftovers`).

The files are safetensors (tensors) and JSON (everything else): loading a checkpoint never runs code,
unlike a pickle.

`crash_point(name)` marks the moments between the writes and renames. A test sets
TINYALIGN_CRASH_AT=name and the process dies right there, as under kill -9 (tests/test_crash.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CRASH_ENV = "TINYALIGN_CRASH_AT"
CRASH_EXIT_CODE = 137  # what a shell reports for kill -9
KEEP = 2  # checkpoints kept: the newest and the one before (see `Run.check_finite`)


_passed: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here at once, with no cleanup of any kind, when TINYALIGN_CRASH_AT names this point
    ("NAME", or "NAME#K" for the K-th time the point is reached)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or not wanted.startswith(name):
        return
    _passed[name] = _passed.get(name, 0) + 1
    if wanted in (name, f"{name}#{_passed[name]}"):
        sys.stdout.flush()
        os._exit(CRASH_EXIT_CODE)


# ---------------------------------------------------------------------------------------------
# Flushing to disk, and the one message a full disk gets
# ---------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's list of names') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder; the files themselves were flushed
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        fsync_path(path)
    fsync_path(folder)


def is_disk_full(error: BaseException) -> bool:
    """A full disk reaches us as OSError(ENOSPC), or wrapped in the message of a library's own error
    (safetensors: "No space left on device (os error 28)"; torch: "basic_ios::clear")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text or "basic_ios::clear" in text


@contextmanager
def writing(path):
    """Around a write: a full disk becomes "no space left on device while writing PATH"."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}") from e
        raise


def write_text_atomic(path, text: str) -> None:
    """Write a small file whole or not at all: a temporary name, flushed, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path), open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"{path.name}: written, not yet renamed")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def usual_permissions(folder: Path) -> None:
    """A temporary folder is made private (mode 0700); give the published one the user's usual mode
    (0777 less the umask), so that another account or a model server can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


# ---------------------------------------------------------------------------------------------
# One live run per folder
# ---------------------------------------------------------------------------------------------


class RunInUse(RuntimeError):
    pass


class FolderLock:
    """An advisory lock (flock) on a small file, out/.lock by default, held while a run is live. The
    operating system drops it when the process ends, however it ends, so a killed run never leaves
    a stale lock. The file itself stays: removing it would let two processes lock two different
    files of one name. Within one process, a new run in the same folder takes over the lock of an
    earlier one that ended in an exception (a script's main called again, as the tests do)."""

    held: dict[Path, int] = {}  # this process's locks: lock file -> descriptor

    def __init__(self, folder, name: str = ".lock", what: str | None = None):
        self.path = Path(folder) / name
        self.what = what or str(Path(folder))  # what the refusal names
        self.fd = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, said once
            print(f"note: no file locking on this system; do not start two runs on {self.what}")
            return self
        earlier = FolderLock.held.pop(self.path.resolve(), None)
        if earlier is not None:
            os.close(earlier)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "a process that has not written its name yet"
            os.close(fd)
            raise RunInUse(f"{self.what} is in use by another run ({holder}); wait for it to end, or choose "
                           "another output") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}).encode())
        self.fd = FolderLock.held[self.path.resolve()] = fd
        return self

    def release(self) -> None:
        if self.fd is not None and FolderLock.held.get(self.path.resolve()) == self.fd:
            del FolderLock.held[self.path.resolve()]
            os.close(self.fd)  # closing the descriptor drops the lock
        self.fd = None


@contextmanager
def locked(path):
    """A short exclusive section shared by processes (flock on `path`, waiting for it if needed)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def complete_lines(path: Path, start: int = 0) -> tuple[list[str], int]:
    """The lines of a file appended to line by line, from byte `start`, without a torn last one (a
    crash mid-write leaves a line with no newline): -> (lines, the offset just past the last whole one)."""
    if not path.exists():
        return [], start
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(), start + end


# ---------------------------------------------------------------------------------------------
# Training checkpoints: step folders and a pointer
# ---------------------------------------------------------------------------------------------


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


def standalone(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU in memory of its own. A weight that is a view into a fused one (llama.fuse_weights)
    shares its storage with its neighbours; some safetensors versions refuse to write such tensors."""
    t = t.detach().contiguous().cpu()
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


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
        fsync_tree(tmp)
        os.replace(tmp, root / name)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point("checkpoint: folder renamed, pointer not yet moved")
    write_text_atomic(root / "latest", name)
    crash_point("checkpoint: pointer moved")
    for old in published(out)[:-KEEP]:
        shutil.rmtree(old)
    crash_point("checkpoint: older ones removed")
    return root / name


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """-> (tensors, state) of a checkpoint folder."""
    return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())


def set_latest(out, folder: Path | None) -> None:
    """Point `latest` at an older checkpoint (or at none)."""
    pointer = checkpoints_folder(out) / "latest"
    if folder is None:
        pointer.unlink(missing_ok=True)
    else:
        write_text_atomic(pointer, folder.name)


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
        if latest is not None and latest not in names:
            keep = set(names)  # a pointer to nothing complete: changed by hand; delete nothing, resume says so
        else:
            newest = names.index(latest) if latest in names else -1  # no pointer: nothing was ever published
            keep = set(names[max(0, newest - KEEP + 1):newest + 1])  # the pointer's and the one before it
        for path in root.iterdir():
            if path.name.startswith(".tmp-") or path.name.startswith(".latest.tmp-") or \
                    (path.name.startswith("step-") and path.name not in keep):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                done.append(str(path))
    from .weights import recover_folder  # the final model's folder: an interrupted save_model

    done += recover_folder(out / "model")
    return done


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def tensors_not_finite(tensors: dict) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
