"""Model names as people type them: `llava-hf/llava-1.5-7b-hf`, found in the local Hugging Face cache.

`hf download llava-hf/llava-1.5-7b-hf` (or any transformers run) leaves a model in the Hub's cache as

    <cache>/models--llava-hf--llava-1.5-7b-hf/
        refs/main               the commit `main` named when it was downloaded (40 hex digits)
        snapshots/<commit>/     the model's files at that commit, each a link into blobs/
        blobs/<hash>            the bytes, kept once however many commits share them

`model_folder` turns a repo id into its snapshot folder, which every loader then reads as it reads
any checkpoint folder. Nothing is downloaded and nothing of the Hub's client is imported: the layout
on disk is the contract (huggingface_hub's file_download.py::try_to_load_from_cache reads it so).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

COMMIT = re.compile(r"[0-9a-f]{40}")
# The Hub's rule for a repo id (huggingface_hub/utils/_validators.py::validate_repo_id): `name` or
# `namespace/name`, each part letters, digits, - _ . starting and ending with a letter or digit.
PART = r"[A-Za-z0-9_](?:[\w\-.]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{PART}/)?{PART}", re.ASCII)
SOURCE_KEY = "tinyalign_source"  # where a saved config says which weights it was trained from


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".git")


def hub_cache() -> tuple[Path, str]:
    """The folder the Hub's client keeps models in, chosen as it chooses (huggingface_hub/constants.py:
    HF_HUB_CACHE, else the older HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub), and the words saying why.
    Read at each call, so that a changed environment counts."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return expand(env[name]), f"${name}"
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub", "$HF_HOME/hub"
    if env.get("XDG_CACHE_HOME"):
        return expand(env["XDG_CACHE_HOME"]) / "huggingface" / "hub", "$XDG_CACHE_HOME/huggingface/hub"
    return Path.home() / ".cache" / "huggingface" / "hub", "the default: HF_HUB_CACHE and HF_HOME are not set"


def expand(text: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(text)))


def download_command(repo_id: str, revision: str = "main") -> str:
    return f"hf download {repo_id}" + ("" if revision == "main" else f" --revision {revision}")


def model_folder(name, revision: str | None = None) -> Path:
    """The checkpoint folder `name` means: itself when it is a folder (a local folder wins over a repo
    of the same name, as in transformers), else the snapshot of the repo id `name` at `revision`
    (default: main) in the local Hub cache. Not found: FileNotFoundError naming where it looked and
    the command that downloads it."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision:
            warnings.warn(f"{name} is a local folder, which wins over a repo of that name: revision {revision!r} "
                          "is not used")
        return path
    if path.exists():
        raise FileNotFoundError(f"{name}: a file, not a checkpoint folder")
    if not is_repo_id(str(name)):
        raise FileNotFoundError(f"{name}: not a checkpoint folder (there is no such folder)")
    return snapshot_folder(str(name), revision or "main")


def snapshot_folder(repo_id: str, revision: str) -> Path:
    """`repo_id`'s snapshot folder at `revision` in the Hub cache, or an error saying what is there instead."""
    if Path(revision).is_absolute() or ".." in revision.split("/") or "\\" in revision:
        raise FileNotFoundError(f"{repo_id}: revision {revision!r} is not a branch, tag or commit")
    cache, why = hub_cache()
    repo = cache.absolute() / f"models--{repo_id.replace('/', '--')}"  # absolute: a run records this path
    looked = (f"  looked in: {Path(repo_id).absolute()} (a folder of that name: none)\n"
              f"             {repo} (the Hugging Face cache, {cache}: {why})")
    if not repo.is_dir():
        raise FileNotFoundError(f"{repo_id}: no such folder, and not in the local Hugging Face cache\n{looked}\n"
                                f"  download it with: {download_command(repo_id, revision)}  (the hf command comes "
                                "with pip install -U huggingface_hub)\n  or pass the folder it is in (hf download "
                                "--local-dir DIR puts it in DIR, not in the cache)")
    # A commit hash names its snapshot directly; a branch or tag is read from refs/ (as the client does).
    ref = repo / "refs" / revision
    commit = revision if COMMIT.fullmatch(revision) else read_ref(ref) if ref.is_file() else None
    if commit is not None and not COMMIT.fullmatch(commit):
        raise FileNotFoundError(f"{ref}: holds {commit[:80]!r}, not a commit hash (40 hex digits): a damaged cache; "
                                f"download it again with: {download_command(repo_id, revision)}")
    if commit is not None and (repo / "snapshots" / commit).is_dir():
        return repo / "snapshots" / commit
    missing = (f"refs/{revision} points to {commit}, whose snapshot folder is missing" if commit and commit != revision
               else f"no refs/{revision} and no snapshot of that name")
    raise FileNotFoundError(f"{repo_id}: the Hugging Face cache holds this repo but not its revision {revision!r} "
                            f"({missing})\n  in {repo}, {holdings(repo)}\n"
                            f"  download it with: {download_command(repo_id, revision)}")


def ref_files(repo: Path) -> list[Path]:
    """A repo's refs (main, tags, refs/pr/N), without the client's half-written `*.tmp` files."""
    return sorted(p for p in (repo / "refs").rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def read_ref(path: Path) -> str:
    """A ref file's commit (a damaged one's bytes come out as text that is no commit, and are named so)."""
    return path.read_text(encoding="ascii", errors="replace").strip()


def holdings(repo: Path) -> str:
    """What a repo's cache folder holds, in words: its refs and its snapshots (whole commit hashes:
    what --revision takes)."""
    refs = [f"{p.relative_to(repo / 'refs')} -> {read_ref(p)}" for p in ref_files(repo)]
    snapshots = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    return f"refs: {', '.join(refs) or 'none'}; snapshots: {', '.join(snapshots) or 'none'}"


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    commit: str
    refs: tuple[str, ...]  # the branches and tags that name this commit in this cache


def snapshot_of(folder) -> Snapshot | None:
    """The repo and commit of a snapshot folder of a Hub cache (its path, or the path a link to it
    leads to, says which), else None."""
    for path in (Path(folder).absolute(), Path(folder).resolve()):
        repo = path.parent.parent
        if path.parent.name == "snapshots" and repo.name.startswith("models--"):
            refs = tuple(str(p.relative_to(repo / "refs")) for p in ref_files(repo) if read_ref(p) == path.name)
            return Snapshot(repo.name[len("models--"):].replace("--", "/"), path.name, refs)
    return None


def source_of(folder, config: dict | None = None) -> dict:
    """Where the weights of `folder` came from, for the config of a model trained from them: a Hub
    snapshot's repo id and commit, else the folder and what its own config (given, or read from it)
    says it came from: a DPO model names the SFT folder it started from, and that the Hub commit."""
    snapshot = snapshot_of(folder)
    if snapshot is not None:
        return {"repo_id": snapshot.repo_id, "revision": snapshot.commit, "refs": list(snapshot.refs)}
    if config is None:
        try:
            config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    source = {"folder": str(Path(folder).absolute())}
    if isinstance(config, dict) and isinstance(config.get(SOURCE_KEY), dict):
        source["from"] = config[SOURCE_KEY]
    return source


def display_name(folder) -> str:
    """A model's short name: the repo's name for a Hub snapshot (not its commit), else the folder's."""
    snapshot = snapshot_of(folder)
    return snapshot.repo_id.rsplit("/", 1)[-1] if snapshot else Path(folder).name


def missing_file(folder, file_name: str, needed_for: str) -> FileNotFoundError:
    """The error for a file `folder` lacks. In a Hub snapshot that is a partial download (an interrupted
    `hf download`, or one with --include): the message names the repo, its commit and the command that
    completes it."""
    path = Path(folder) / file_name
    if path.is_symlink():
        message = f"{path}: a link to {os.readlink(path)}, which is not there ({needed_for})"
    else:
        message = f"{path}: missing ({needed_for})"
    snapshot = snapshot_of(folder)
    if snapshot is not None:
        message += (f"\n  this folder is {snapshot.repo_id} at commit {snapshot.commit} in the Hugging Face cache, "
                    f"downloaded in part; complete it with: {download_command(snapshot.repo_id, snapshot.commit)}")
    return FileNotFoundError(message)
