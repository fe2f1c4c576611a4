"""Repo ids as people type them (`--model llava-hf/llava-1.5-7b-hf`), found in a Hugging Face cache that
each test lays out itself exactly as the Hub's client does: blobs/ holding the bytes once, snapshots/<commit>/
holding links into it, refs/<branch or tag> holding a commit. The Hub's own client (huggingface_hub, a
dependency of transformers: tests only) is the oracle for where the cache is and which folder a repo id
and revision mean; transformers loading the same repo id is the oracle for the weights."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, save_hf
from test_checkpoints import assert_same_logits, hf_logits, our_logits, train_sentencepiece, write_original_checkpoint
from test_parity import make_batch
from test_training import checkpoint_step, dpo_args, write_pairs

import tinyalign
import train_dpo
import train_sft
import train_steerlm
from tinyalign import hub
from tinyalign.evaluation import annotate, ask
from tinyalign.lab import tokens

REPO = "tiny-org/llava-tiny"
COMMIT_A, COMMIT_B = "a" * 39 + "1", "b" * 39 + "2"


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",), copies=False) -> Path:
    """Lay `folder`'s files into a Hub cache as `hf download` does: each file's bytes once in blobs/
    (named by their hash), the snapshot's files relative links to them, refs/<name> holding the commit
    (huggingface_hub/file_download.py: _create_symlink, _cache_commit_hash_for_specific_revision).
    copies: the snapshot's files are copies instead, as the client leaves them where links cannot be made
    (Windows without developer mode)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():  # a file two commits share is stored once
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if copies:
            shutil.copyfile(blob, link)
        else:
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # as the client writes it: no newline
    return snapshot


def with_tokenizer(folder: Path) -> Path:
    """A SentencePiece tokenizer.model of the tiny models' 320 ids (<image> goes at 320 when saved)."""
    train_sentencepiece(folder)
    return folder


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two llava-hf checkpoints as transformers writes them (seeds 0 and 1), each with a tokenizer."""
    root = tmp_path_factory.mktemp("hub-models")
    models = {}
    for name, seed in (("A", 0), ("B", 1)):
        hf = make_hf_model(seed=seed)
        models[name] = (with_tokenizer(save_hf(hf, root / name)), hf)
    return models


@pytest.fixture
def cache(tmp_path, monkeypatch, two_models):
    """A cache holding REPO at two commits: main -> B, the tag v1.0 -> A."""
    folder = tmp_path / "hub"
    cache_repo(folder, REPO, two_models["A"][0], COMMIT_A, refs=("v1.0",))
    cache_repo(folder, REPO, two_models["B"][0], COMMIT_B, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# Where the cache is, and which folder a repo id means: as the Hub's client decides
# ---------------------------------------------------------------------------------------------

ENVIRONMENTS = {  # the variables the Hub's client reads (huggingface_hub/constants.py, HF_HOME .. HF_HUB_CACHE)
    "HF_HUB_CACHE": {"HF_HUB_CACHE": "{tmp}/hub-cache"},
    "HF_HUB_CACHE over HF_HOME": {"HF_HUB_CACHE": "{tmp}/hub-cache", "HF_HOME": "{tmp}/hf-home"},
    "HF_HOME": {"HF_HOME": "{tmp}/hf-home"},
    "HF_HOME over XDG_CACHE_HOME": {"HF_HOME": "{tmp}/hf-home", "XDG_CACHE_HOME": "{tmp}/xdg"},
    "XDG_CACHE_HOME": {"XDG_CACHE_HOME": "{tmp}/xdg"},
    "the older HUGGINGFACE_HUB_CACHE": {"HUGGINGFACE_HUB_CACHE": "{tmp}/old-name"},
    "~ in HF_HOME": {"HF_HOME": "~/elsewhere"},
    "none set": {},
}
CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def test_the_cache_folder_is_the_one_the_hub_client_uses(tmp_path, monkeypatch):
    """Every environment above: our folder equals huggingface_hub.constants.HF_HUB_CACHE, read by the
    client itself in a fresh process with the same environment (its constants are read at import)."""
    home = tmp_path / "home"
    cases = {name: {k: v.format(tmp=tmp_path) for k, v in env.items()} for name, env in ENVIRONMENTS.items()}
    script = ("import importlib, json, os, sys\nfrom huggingface_hub import constants\nout = {}\n"
              "for name, env in json.loads(sys.argv[1]).items():\n"
              f"    for k in {CACHE_VARIABLES!r}: os.environ.pop(k, None)\n"
              "    os.environ.update(env)\n    out[name] = importlib.reload(constants).HF_HUB_CACHE\n"
              "print(json.dumps(out))")
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES} | {"HOME": str(home)}
    theirs = json.loads(subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    monkeypatch.setenv("HOME", str(home))
    for name, case in cases.items():
        for k in CACHE_VARIABLES:
            monkeypatch.delenv(k, raising=False)
        for k, v in case.items():
            monkeypatch.setenv(k, v)
        assert hub.hub_cache()[0] == Path(theirs[name]), name
    assert theirs["none set"] == str(home / ".cache" / "huggingface" / "hub")


def test_a_repo_id_and_revision_name_the_folder_the_hub_client_names(cache):
    from huggingface_hub import try_to_load_from_cache

    for revision, commit in ((None, COMMIT_B), ("main", COMMIT_B), ("v1.0", COMMIT_A), (COMMIT_A, COMMIT_A)):
        folder = hub.model_folder(REPO, revision)
        theirs = try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision=revision)
        assert folder == Path(theirs).parent == cache / "models--tiny-org--llava-tiny" / "snapshots" / commit
        assert (folder / "config.json").is_symlink() and (folder / "config.json").resolve().parent.name == "blobs"
    # A file the two commits share (the config) is one blob; their weights are two.
    a, b = (cache / "models--tiny-org--llava-tiny" / "snapshots" / commit for commit in (COMMIT_A, COMMIT_B))
    assert os.readlink(a / "config.json") == os.readlink(b / "config.json")
    assert os.readlink(a / "model.safetensors") != os.readlink(b / "model.safetensors")


def test_load_model_by_repo_id_gives_transformers_logits(cache, two_models):
    """load_model("tiny-org/llava-tiny") reads the snapshot transformers reads for the same name: the same
    logits as transformers' from_pretrained(repo id, local_files_only) on this cache, at main and at v1.0."""
    from transformers import LlavaForConditionalGeneration

    ids, pixels, mask = make_batch(4, "right")
    for revision, expected in ((None, "B"), ("v1.0", "A")):
        ours = tinyalign.load_model(REPO, revision=revision)
        theirs = LlavaForConditionalGeneration.from_pretrained(REPO, revision=revision or "main", cache_dir=cache,
                                                               local_files_only=True, dtype=torch.float32).eval()
        assert_same_logits(our_logits(ours, ids, pixels, mask), hf_logits(theirs, ids, pixels, mask), mask)
        assert_same_logits(our_logits(ours, ids, pixels, mask), hf_logits(two_models[expected][1], ids, pixels, mask),
                           mask)
    assert not same_weights(tinyalign.load_model(REPO), tinyalign.load_model(REPO, revision=COMMIT_A))
    assert same_weights(tinyalign.load_model(REPO, revision="v1.0"), tinyalign.load_model(two_models["A"][0]))
    processor = tinyalign.Processor.from_pretrained(REPO, revision="v1.0")
    assert processor.image_token_index == 320 and processor.image_seq_length == 4


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME", "none"])
def test_the_environment_chooses_the_cache(tmp_path, monkeypatch, two_models, variable):
    """The same repo found through HF_HUB_CACHE, through HF_HOME (its hub/), or, with neither set, in
    ~/.cache/huggingface/hub; and not found where the variables point elsewhere."""
    for k in CACHE_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = {"HF_HUB_CACHE": tmp_path / "cache", "HF_HOME": tmp_path / "hf-home" / "hub",
             "none": tmp_path / "home" / ".cache" / "huggingface" / "hub"}[variable]
    snapshot = cache_repo(cache, REPO, two_models["A"][0], COMMIT_A)
    if variable == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    elif variable == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(cache.parent))
    assert hub.model_folder(REPO) == snapshot
    assert same_weights(tinyalign.load_model(REPO), tinyalign.load_model(two_models["A"][0]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "another"))  # the variable wins, so it is not found there
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'another'}"):
        hub.model_folder(REPO)


def test_relative_and_home_paths_and_copied_snapshots(two_models, tmp_path, monkeypatch):
    """A relative HF_HUB_CACHE gives an absolute folder (a run records it, and may resume elsewhere); ~ is
    the home folder, in a name and in the variable; a snapshot of copies (no links) loads as one of links;
    a folder that is a link to a snapshot still says which repo and commit it is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    snapshot = cache_repo(tmp_path / "home" / "hub", REPO, two_models["A"][0], COMMIT_A, copies=True)
    assert not (snapshot / "config.json").is_symlink()
    for variable in ("home/hub", "~/hub"):
        monkeypatch.setenv("HF_HUB_CACHE", variable)
        assert hub.model_folder(REPO) == snapshot and hub.model_folder(REPO).is_absolute()
    assert same_weights(tinyalign.load_model(REPO), tinyalign.load_model(two_models["A"][0]))
    assert hub.model_folder("~/hub") == tmp_path / "home" / "hub"
    (tmp_path / "my-llava").symlink_to(snapshot)
    assert hub.snapshot_of("my-llava") == hub.Snapshot(REPO, COMMIT_A, ("main",))
    assert hub.display_name("my-llava") == "llava-tiny" and hub.display_name(two_models["A"][0]) == "A"


def test_a_local_folder_of_the_same_name_wins(cache, two_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(two_models["A"][0], tmp_path / REPO)  # ./tiny-org/llava-tiny, while the cache's main is B
    assert hub.model_folder(REPO) == Path(REPO)
    assert same_weights(tinyalign.load_model(REPO), tinyalign.load_model(two_models["A"][0]))
    with pytest.warns(UserWarning, match="local folder, which wins .* revision 'v1.0' is not used"):
        hub.model_folder(REPO, "v1.0")


# ---------------------------------------------------------------------------------------------
# What is not there: named, with the command that downloads it
# ---------------------------------------------------------------------------------------------


def test_a_repo_not_in_the_cache_names_where_it_looked_and_the_download_command(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        tinyalign.load_model("llava-hf/llava-1.5-7b-hf")
    message = str(e.value)
    for part in ("llava-hf/llava-1.5-7b-hf: no such folder, and not in the local Hugging Face cache",
                 str(tmp_path / "llava-hf" / "llava-1.5-7b-hf"), str(cache / "models--llava-hf--llava-1.5-7b-hf"),
                 "$HF_HUB_CACHE", "download it with: hf download llava-hf/llava-1.5-7b-hf"):
        assert part in message, (part, message)
    with pytest.raises(FileNotFoundError) as e:
        tinyalign.Processor.from_pretrained(REPO, revision="v9")
    message = str(e.value)
    for part in ("holds this repo but not its revision 'v9'", f"refs: main -> {COMMIT_B}, v1.0 -> {COMMIT_A}",
                 f"snapshots: {COMMIT_A}, {COMMIT_B}", f"hf download {REPO} --revision v9"):
        assert part in message, (part, message)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):  # not a repo id: a folder, or nothing
        tinyalign.load_model(tmp_path / "no" / "such" / "folder")
    for revision in ("../../elsewhere", "/etc", "a\\b"):  # never a path out of the repo's folder
        with pytest.raises(FileNotFoundError, match="is not a branch, tag or commit"):
            hub.model_folder(REPO, revision)


def test_a_ref_whose_snapshot_is_gone_or_that_holds_no_commit_is_named(cache):
    shutil.rmtree(cache / "models--tiny-org--llava-tiny" / "snapshots" / COMMIT_A)
    with pytest.raises(FileNotFoundError, match=f"refs/v1.0 points to {COMMIT_A}, whose snapshot folder is missing"):
        hub.model_folder(REPO, "v1.0")
    main = cache / "models--tiny-org--llava-tiny" / "refs" / "main"
    for damaged in (b"../../../elsewhere", b"\xff\xfe" + COMMIT_B[2:].encode(), b""):
        main.write_bytes(damaged)
        with pytest.raises(FileNotFoundError, match=r"refs/main: holds '.*', not a commit hash .*: a damaged cache"):
            tinyalign.load_model(REPO)


@pytest.fixture
def sharded_cache(tmp_path, monkeypatch, two_models):
    """REPO at main: the model written in four shards by save_model, so that one can go missing."""
    folder = tinyalign.save_model(tinyalign.load_model(two_models["A"][0]), tmp_path / "sharded", max_shard_bytes=60_000)
    assert len(shards(folder)) > 2
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return cache_repo(tmp_path / "hub", REPO, folder, COMMIT_A)


def shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_a_shard_missing_from_a_snapshot_is_named(sharded_cache, two_models):
    assert same_weights(tinyalign.load_model(REPO), tinyalign.load_model(two_models["A"][0]))
    second = shards(sharded_cache)[1]
    (sharded_cache / second).unlink()  # never downloaded
    with pytest.raises(FileNotFoundError) as e:
        tinyalign.load_model(REPO)
    message = str(e.value)
    for part in (f"{second}: missing (a shard that model.safetensors.index.json names)",
                 f"this folder is {REPO} at commit {COMMIT_A}", f"complete it with: hf download {REPO} --revision "
                 f"{COMMIT_A}"):
        assert part in message, (part, message)


def test_a_link_whose_blob_is_gone_is_named(sharded_cache):
    link = sharded_cache / shards(sharded_cache)[2]
    (link.parent / os.readlink(link)).unlink()  # the blob deleted (a cleaned cache), the link left dangling
    with pytest.raises(FileNotFoundError, match=rf"{link.name}: a link to \.\./\.\./blobs/[0-9a-f]{{64}}, "
                                                r"which is not there .*\n.*hf download"):
        tinyalign.load_model(REPO)


@pytest.mark.parametrize("file_name", ["model.safetensors", "config.json"])
def test_a_single_file_whose_blob_is_gone_is_named(cache, file_name):
    link = cache / "models--tiny-org--llava-tiny" / "snapshots" / COMMIT_B / file_name
    (link.parent / os.readlink(link)).unlink()
    with pytest.raises(FileNotFoundError, match=rf"(?s){file_name}: a link to \.\./\.\./blobs/[0-9a-f]{{64}}, which "
                                                rf"is not there.*hf download {REPO} --revision {COMMIT_B}"):
        tinyalign.load_model(REPO)


@pytest.mark.parametrize("removed, call, named", [
    (("tokenizer.json", "tokenizer.model"), "processor",
     "tokenizer.json: missing (the tokenizer; no tokenizer.model either)"),
    (("config.json",), "model", "config.json: missing (the model's shapes"),
    (("shards", "model.safetensors.index.json"), "model", "model.safetensors: missing (the weights;"),
])
def test_a_snapshot_missing_what_the_model_needs_is_named(sharded_cache, removed, call, named):
    """An `hf download --include` that left out the tokenizer, the config or every weight file."""
    for name in removed:
        for file in shards(sharded_cache) if name == "shards" else [name]:
            (sharded_cache / file).unlink(missing_ok=file == "tokenizer.model")
    load = tinyalign.Processor.from_pretrained if call == "processor" else tinyalign.load_model
    with pytest.raises(FileNotFoundError) as e:
        load(REPO)
    assert named in str(e.value) and f"hf download {REPO} --revision {COMMIT_A}" in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# The original layout's CLIP tower, and where a saved checkpoint came from
# ---------------------------------------------------------------------------------------------


def test_the_original_layouts_clip_tower_comes_from_the_cache(hf_checkpoint, tmp_path, monkeypatch):
    """liuhaotian/llava-v1.5-* name their tower "openai/clip-vit-large-patch14-336": with it in the cache,
    the checkpoint loads with no --vision-tower (and the checkpoint itself by its repo id too)."""
    folder, clip = write_original_checkpoint(hf_checkpoint[0], tmp_path / "orig", clip_in_config=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="(?s)Pass vision_tower=.*hf download openai/clip-vit-large-patch14-336"):
        tinyalign.load_model(folder)
    cache_repo(tmp_path / "hub", "openai/clip-vit-large-patch14-336", clip, COMMIT_A)
    cache_repo(tmp_path / "hub", "liuhaotian/llava-v1.5-tiny", folder, COMMIT_B)
    ids, pixels, mask = make_batch(4, "left")
    for model in (tinyalign.load_model(folder), tinyalign.load_model("liuhaotian/llava-v1.5-tiny")):
        assert_same_logits(our_logits(model, ids, pixels, mask), hf_logits(hf_checkpoint[1], ids, pixels, mask), mask)
    assert tinyalign.Processor.from_pretrained("liuhaotian/llava-v1.5-tiny").image_seq_length == 4


def test_a_saved_checkpoint_records_the_weights_it_came_from(cache, tmp_path):
    """The config names the repo id and commit (and the branches naming it); a model trained from that
    one names its folder and, inside, the same commit. transformers reads the config as before."""
    from transformers import LlavaConfig

    first = tinyalign.save_model(tinyalign.load_model(REPO), tmp_path / "first")
    source = json.loads((first / "config.json").read_text())[hub.SOURCE_KEY]
    assert source == {"repo_id": REPO, "revision": COMMIT_B, "refs": ["main"]}
    second = tinyalign.save_model(tinyalign.load_model(first), tmp_path / "second")
    assert json.loads((second / "config.json").read_text())[hub.SOURCE_KEY] == {"folder": str(first.absolute()),
                                                                               "from": source}
    assert LlavaConfig.from_pretrained(second).image_token_index == 320
    tagged = tinyalign.save_model(tinyalign.load_model(REPO, revision="v1.0"), tmp_path / "tagged")
    assert json.loads((tagged / "config.json").read_text())[hub.SOURCE_KEY]["refs"] == ["v1.0"]


# ---------------------------------------------------------------------------------------------
# The commands: every option that takes a checkpoint folder takes a repo id
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def world_cache(tiny_world, tmp_path, monkeypatch):
    """The tiny world's start model cached as REPO at two commits: main -> B, v1.0 -> A (the same files:
    which folder a command reads is what the tests look at)."""
    snapshots = {name: cache_repo(tmp_path / "hub", REPO, tiny_world["checkpoint"], commit, refs=(ref,))
                 for name, commit, ref in (("A", COMMIT_A, "v1.0"), ("B", COMMIT_B, "main"))}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshots


def test_every_command_resolves_a_repo_id_and_refuses_an_unknown_one(world_cache, tiny_world, tmp_path, capsys):
    import eval as evaluate

    out = str(tmp_path / "out")
    parsers = {"train_sft.py": lambda m: train_sft.parse(["--model", *m, "--out", out]),
               "train_dpo.py": lambda m: train_dpo.parse(["--model", *m, "--out", out]),
               "train_steerlm.py": lambda m: train_steerlm.parse(["--model", *m, "--out", out]),
               "eval.py": lambda m: evaluate.parse(["alpaca-eval", "--model", *m, "--out", out, "--data", "x"])}
    for command, parse in parsers.items():
        assert parse([REPO]).model == str(world_cache["B"]), command
        assert parse([REPO, "--revision", "v1.0"]).model == str(world_cache["A"]), command
        assert parse([REPO, "--revision", COMMIT_A]).model == str(world_cache["A"]), command
        if command == "eval.py":  # grading --answers needs no model: a name not found is left to load_model
            assert parse(["nobody/nothing"]).model == "nobody/nothing"
            continue
        with pytest.raises(SystemExit):
            parse(["nobody/nothing"])
        assert "--model nobody/nothing: no such folder" in capsys.readouterr().err, command
    preference = evaluate.parse(["preference", "--model", REPO, "--reference", REPO, "--revision", "v1.0", "--out",
                                 out, "--data", "x", "--vision-tower", REPO])
    assert (preference.model, preference.reference, preference.vision_tower) == tuple(
        str(world_cache[name]) for name in "ABB")  # --revision is --model's only
    assert evaluate.model_name(preference) == "llava-tiny"  # the repo's name, not its commit
    with pytest.raises(SystemExit):
        ask.main(["--model", REPO, "--revision", "v9", "--prompt", "hi"])
    assert f"--model {REPO}: the Hugging Face cache holds this repo but not its revision 'v9'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^nobody/nothing: no model there: no such folder, and not in the local"):
        tokens.main(["--policy", "nobody/nothing", "--reference", REPO])
    answer = ask.main(["--model", REPO, "--prompt", "What is in the image?", "--max-new-tokens", "3", "--device", "cpu"])
    assert isinstance(answer, str)


def test_an_eval_run_by_repo_id_names_the_model_and_its_commit(world_cache, tmp_path):
    """eval.py pope --model tiny-org/llava-tiny: the answers are the cache's model's (greedy, so equal to the
    same model's answers read from the snapshot folder), and results.json records the repo and commit."""
    import eval as evaluate
    from tinyalign.demo.world import make_benchmarks

    bench = make_benchmarks(tmp_path / "bench", n=4)
    results = {}
    for name, model in (("by-id", REPO), ("by-folder", world_cache["B"])):
        results[name] = evaluate.main(["pope", "--model", str(model), "--pope-dir", str(bench["pope_dir"]),
                                       "--image-folder", str(bench["image_folder"]), "--out", str(tmp_path / name),
                                       "--max-new-tokens", "3", "--device", "cpu"])
    assert results["by-id"]["model_source"] == {"repo_id": REPO, "revision": COMMIT_B, "refs": ["main"]}
    assert results["by-id"]["splits"] == results["by-folder"]["splits"]
    with pytest.raises(SystemExit, match="holds this repo but not its revision 'v9'"):  # never main in its place
        evaluate.main(["pope", "--model", REPO, "--revision", "v9", "--pope-dir", str(bench["pope_dir"]),
                       "--image-folder", str(bench["image_folder"]), "--out", str(tmp_path / "v9"), "--device", "cpu"])


def test_annotate_and_the_token_view_read_a_repo_id(world_cache, tiny_world, tmp_path):
    summary = annotate.main(["--model", REPO, "--revision", "v1.0", "--prompts", str(tiny_world["prompts"]),
                             "--image-folder", str(tiny_world["images"]), "--out", str(tmp_path / "scored.jsonl"),
                             "--judge", "rules", "--n", "2", "--max-new-tokens", "4", "--max-prompts", "2",
                             "--device", "cpu"])
    assert summary and (tmp_path / "scored.jsonl").read_text().count("\n") == 2
    with pytest.raises(FileNotFoundError, match=f"{REPO}: the Hugging Face cache holds this repo but not its revision"):
        annotate.main(["--model", REPO, "--revision", "v9", "--prompts", str(tiny_world["prompts"]), "--image-folder",
                       str(tiny_world["images"]), "--out", str(tmp_path / "other.jsonl"), "--judge", "rules"])
    result = tokens.main(["--policy", REPO, "--reference", REPO, "--pairs", str(write_pairs(tiny_world, tmp_path / "p")),
                          "--image-folder", str(tiny_world["images"]), "--out", str(tmp_path / "tokens"), "--limit",
                          "2", "--device", "cpu"])
    assert list(result["views"]) == [REPO] and len(result["pairs"]) == 2


def test_train_dpo_by_repo_id_records_the_commit_and_resumes_on_it(world_cache, tiny_world, tmp_path):
    """A DPO run from `--model tiny-org/llava-tiny`: resumes by the same name; once the cache's main has
    moved, --resume refuses and says which --revision resumes on the weights the run began with; its
    model's config names that commit, and so does its LoRA adapter's (as PEFT names a base model)."""
    pairs = write_pairs(tiny_world, tmp_path / "pairs.jsonl")
    argv = dpo_args(tiny_world, pairs, tmp_path / "run", "--max-steps", "3", "--save-adapter")
    argv[argv.index("--model") + 1] = REPO
    train_dpo.main(argv + ["--stop-after", "1"])
    train_dpo.main(argv + ["--stop-after", "1", "--resume"])  # the same repo id, the same snapshot
    assert checkpoint_step(tmp_path / "run") == 2
    (world_cache["B"].parent.parent / "refs" / "main").write_text(COMMIT_A)  # main moves (the same files here)
    with pytest.raises(SystemExit, match=rf"(?s)--model.*--model {REPO} --revision {COMMIT_B} resumes it"):
        train_dpo.main(argv + ["--resume"])
    train_dpo.main(argv + ["--resume", "--revision", COMMIT_B])
    assert checkpoint_step(tmp_path / "run") == 3
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config[hub.SOURCE_KEY] == {"repo_id": REPO, "revision": COMMIT_B, "refs": []}  # main is A's now
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (REPO, COMMIT_B)  # PEFT's names for its base


def test_the_readme_and_recipes_name_real_models_by_repo_id():
    """A real model in the README's and the recipes' commands is the repo id a reader has in their cache
    (`llava-hf/llava-1.5-13b-hf`), not a folder name they would have to make; runs/ folders are the runs'."""
    root = Path(__file__).resolve().parent.parent
    for page in ("README.md", "docs/recipes.md", "docs/evaluation.md"):
        text = (root / page).read_text()
        found = re.findall(r'--(?:model|reference|vision-tower) (\S+)|(?:load_model|from_pretrained)\("([^"]+)"|\bM=(\S+)',
                           text)
        found = [(a or c, b) for a, b, c in found]
        names = [a or b for a, b in found if (a or b) != "..." and not (a or b).startswith(("runs/", "$"))]
        assert names, page
        for name in names:
            assert hub.is_repo_id(name) and name.count("/") == 1, f"{page}: --model {name} is no repo id"
