"""Files written so that a crash, a full disk or a second process never costs what was there.

One rule everywhere: write under a temporary name (with our pid, so a later run can tell whether its
writer still lives), flush it to disk, then rename it into place. A reader sees the old file or the
new one, never half of one. `write_atomic` does it for a file, `replace_folder` for a folder;
`recover_folder` undoes what an interrupted folder replacement left behind.

`crash_point(name)` marks the moments between the writes and renames. A test sets
TINYALIGN_CRASH_AT=name and the process dies right there, as under kill -9 (tests/test_crash.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

CRASH_ENV = "TINYALIGN_CRASH_AT"
CRASH_EXIT_CODE = 137  # what a shell reports for kill -9

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


# ---------------------------------------------------------------------------------------------
# Writing whole or not at all
# ---------------------------------------------------------------------------------------------


def write_atomic(path, data: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary name beside it, flushed, then renamed. The
    folder is made if needed. Every file tinyalign writes in one piece goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path), open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"{path.name}: written, not yet renamed")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def sha256_file(path, chunk_bytes: int = 8 << 20) -> str:
    """The SHA-256 of a file, read in 8 MB pieces (a checkpoint can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def usual_permissions(folder: Path) -> None:
    """Give a folder about to be published, and everything in it, the user's usual modes (0777 for
    folders, 0666 for files, less the umask), so that another account or a model server can read
    it: a temporary folder is made private (0700), and safetensors writes its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def replace_folder(tmp: Path, out_dir: Path, what: str = "model"):
    """Rename tmp -> out_dir; an existing out_dir is moved aside first and removed only after. Between
    the two renames there is no out_dir: `recover_folder` puts the set-aside one back if a crash
    falls there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        crash_point(f"{what}: previous folder set aside")
    os.replace(tmp, out_dir)
    fsync_path(out_dir.parent)
    crash_point(f"{what}: renamed into place")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_folder(out_dir) -> list[str]:
    """Undo what an interrupted `replace_folder` left next to out_dir: if out_dir is missing but its
    set-aside previous version (.NAME.old-PID) is there, put it back; remove the temporary folders
    (.NAME.tmp-PID-*) of processes that no longer run. Returns what was done."""
    out_dir = Path(out_dir)
    done = []
    if not out_dir.parent.exists():
        return done
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"))
    if olds and not out_dir.exists():
        os.replace(olds.pop(), out_dir)
        done.append(f"restored {out_dir} (a save of it was interrupted)")
    for path in olds + sorted(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        pid = path.name.rsplit(".tmp-", 1)[-1].split("-")[0] if ".tmp-" in path.name else ""
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live process is writing it
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path}")
    return done


def remove_stale_temporaries(folder) -> list[str]:
    """Remove the `.NAME.tmp-PID` files that `write_atomic` left in `folder` when its process was killed
    between writing and renaming (a live process's are left alone). -> what was removed."""
    done = []
    folder = Path(folder)
    for path in sorted(folder.glob(".*.tmp-*")) if folder.is_dir() else []:
        pid = path.name.rsplit(".tmp-", 1)[-1]
        if path.is_file() and pid.isdigit() and not pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            done.append(f"removed {path}")
    return done


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def standalone(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU in memory of its own. A weight that is a view into a fused one
    (speed/fused.py) shares its storage with its neighbours; some safetensors versions refuse to
    write such tensors."""
    t = t.detach().contiguous().cpu()
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


# ---------------------------------------------------------------------------------------------
# One writer at a time, and files appended to line by line
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


def complete_lines(path: Path, start: int = 0, skip_bad: bool = False) -> tuple[list[str], int]:
    """The lines of a file appended to line by line, from byte `start`, without a torn last one (a
    crash mid-write leaves a line with no newline): -> (lines, the offset just past the last whole one).
    A line that is not UTF-8 is an error naming the file and line, or with `skip_bad` (a cache, whose
    lost lines are simply made again) left out."""
    if not path.exists():
        return [], start
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = []
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            if not skip_bad:
                raise ValueError(f"{path} line {n}: not UTF-8 text; save the file as UTF-8") from None
    return lines, start + end
