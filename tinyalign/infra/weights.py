"""Checkpoints in and out: llava-hf and original-LLaVA layouts, safetensors and `.bin` shards.

Every spelling of a tensor name is mapped onto this project's own parameter names (which mirror
the checkpoints), then each tensor is copied straight into the target dtype and device on a model
that was built on the meta device. At no point do two copies of the weights sit in host memory:
safetensors files are memory-mapped and `.bin` shards are opened with `mmap=True`, one tensor in
flight at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import LlavaConfig
from ..config_json import (config_from_hf_dict, config_from_original_dict, is_original_llava, read_json, to_hf_dict,
                           vision_config_from_dict)
from ..hub import SOURCE_KEY, missing_file, model_folder, source_of
from ..lora import LoRALinear, TARGETS
from ..model import Llava
from .files import crash_point, fsync_tree, recover_folder, replace_folder, standalone, usual_permissions, writing

# ---------------------------------------------------------------------------------------------
# Key maps: checkpoint name -> our parameter name. Each is (pattern, replacement), first match wins.
# ---------------------------------------------------------------------------------------------

HF_KEY_MAP = [  # every spelling transformers has used for LlavaForConditionalGeneration
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower."),  # 4.x Hub, 4.5x, 5.x
    (r"^(?:model\.)?multi_modal_projector\.", "multi_modal_projector."),
    (r"^language_model\.model\.", "language_model."),  # Hub files
    (r"^model\.language_model\.", "language_model."),  # transformers >= 4.52 in memory
    (r"^(?:language_model\.)?lm_head\.", "lm_head."),
]
ORIGINAL_KEY_MAP = [  # liuhaotian/llava-v1.5-*: LlavaLlamaForCausalLM
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),  # only if the tower was saved
    (r"^model\.(embed_tokens|layers|norm)\b", r"language_model.\1"),
    (r"^lm_head\.", "lm_head."),
]
CLIP_KEY_MAP = [(r"^vision_model\.", "vision_tower.")]  # a CLIP folder; its text half is not ours
# Buffers older transformers versions saved and that this code recomputes: safe to pass over.
IGNORED_KEYS = re.compile(r"(\.position_ids|\.rotary_emb\.inv_freq)$")
CLIP_FOREIGN_KEYS = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale)")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: unknown, missing or duplicated tensors, wrong shapes."""


def map_key(name: str, key_map) -> str | None:
    for pattern, replacement in key_map:
        new, n = re.subn(pattern, replacement, name, count=1)
        if n:
            return new
    return None


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a folder, from its index when there is one. A file the index names
    but the folder lacks is an error naming both."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            names = list(dict.fromkeys(weight_map.values()))
            for name in names:
                if not (folder / name).exists():  # (a link into a Hub cache's blobs/ whose blob is gone: too)
                    raise missing_file(folder, name, f"a shard that {index_name} names")
            return [folder / name for name in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
        if (folder / single).is_symlink():  # a link into a Hub cache's blobs/ whose blob is gone
            raise missing_file(folder, single, "the weights")
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for path in found:
        if not path.exists():
            raise missing_file(folder, path.name, "the weights")
    if not found:
        raise missing_file(folder, "model.safetensors", "the weights; no model.safetensors.index.json or "
                           "pytorch_model.bin(.index.json) either")
    return found


def iter_tensors(path: Path):
    """Yield (name, tensor) from one shard, lazily: safetensors is memory-mapped, .bin is mmapped."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    else:
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # files from before torch 1.6 (not zip) cannot be mmapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds here; name the file
            raise ValueError(f"{path}: could not read it with torch.load(weights_only=True): {e}") from None
        yield from state.items()
        del state


# ---------------------------------------------------------------------------------------------
# Building and filling the model
# ---------------------------------------------------------------------------------------------


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, source: str, dtype, device):
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    current = module._parameters.get(leaf) if module is not None else None
    if current is None:
        raise CheckpointError(f"{source}: tensor {name!r} has no place in the model")
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {list(tensor.shape)} but the config implies "
            f"{list(current.shape)}: the config and the weights disagree"
        )
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if value.is_floating_point() and not torch.isfinite(value).all():  # a model never trains into NaN and back
        raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values: the checkpoint is damaged")
    module._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)


def fill_from_files(model: nn.Module, files: list[Path], key_map, dtype, device, filled: dict,
                    skip=lambda name: False):
    """Copy every tensor of `files` into `model`; record where each came from in `filled`."""
    for path in files:
        for raw_name, tensor in iter_tensors(path):
            if IGNORED_KEYS.search(raw_name) or skip(raw_name):
                continue
            name = map_key(raw_name, key_map)
            if name is None:
                raise CheckpointError(f"{path}: unknown tensor {raw_name!r} (not part of a LLaVA-1.5 checkpoint)")
            if name in filled:
                raise CheckpointError(f"{path}: tensor {raw_name!r} is also in {filled[name]}")
            _set_tensor(model, name, tensor, f"{path}", dtype, device)
            filled[name] = path


def check_complete(model: nn.Module, filled: dict, where: str):
    missing = [name for name, p in model.named_parameters() if name not in filled]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: the checkpoint lacks these tensors: {shown}")


def build_empty(cfg: LlavaConfig) -> Llava:
    """The model's structure with no storage behind it (meta device): costs no memory."""
    with torch.device("meta"):
        return Llava(cfg)


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(path, dtype: torch.dtype | None = None, device="cpu", vision_tower=None,
               revision: str | None = None) -> Llava:
    """Load a LLaVA-1.5 checkpoint (llava-hf or original LLaVA layout): a folder, or a Hugging Face repo
    id such as "llava-hf/llava-1.5-7b-hf" found in the local Hub cache at `revision` (default: main;
    tinyalign/hub.py).

    dtype: defaults to bfloat16 on CUDA, float32 elsewhere. vision_tower: the CLIP folder or repo id,
    for original checkpoints (which hold no CLIP weights); defaults to the config's `mm_vision_tower`
    (openai/clip-vit-large-patch14-336: a folder of that name, or the cache's copy).
    """
    folder = model_folder(path, revision)
    dtype = dtype or default_dtype(device)
    if not (folder / "config.json").exists():
        raise missing_file(folder, "config.json", "the model's shapes: is this a checkpoint folder?")
    raw = read_json(folder / "config.json")
    filled: dict = {}
    if is_original_llava(raw):
        clip = _find_clip_folder(folder, raw, vision_tower)
        vision_cfg = vision_config_from_dict(read_json(clip / "config.json"), str(clip / "config.json"))
        cfg = config_from_original_dict(raw, vision_cfg, str(folder / "config.json"))
        model = build_empty(cfg)
        fill_from_files(model, weight_files(folder), ORIGINAL_KEY_MAP, dtype, device, filled)
        if not any(name.startswith("vision_tower.") for name in filled):
            fill_from_files(model, weight_files(clip), CLIP_KEY_MAP, dtype, device, filled,
                            skip=CLIP_FOREIGN_KEYS.match)
        where = f"{folder} (+ CLIP tower {clip})"
    else:
        cfg = config_from_hf_dict(raw, str(folder / "config.json"))
        model = build_empty(cfg)
        fill_from_files(model, weight_files(folder), HF_KEY_MAP, dtype, device, filled)
        where = str(folder)
    check_complete(model, filled, where)
    model.vision_tower.requires_grad_(False)
    model.source_dir = folder  # lets save_model carry the tokenizer along
    model.source = source_of(folder, raw)  # and say in the saved config which weights it started from
    return model.eval()


def model_digest(folder) -> str:
    """A digest of a checkpoint folder's files that changes when any of them does: their names, sizes
    and bytes. Files up to 8 MB are read whole; a larger one is sampled (32 slices of 64 KiB spread
    over it, its header the first), so a 26 GB model is read 2 MB deep: a run can check its model
    cheaply every time it saves or resumes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= 8 << 20:
                digest.update(f.read())
                continue
            for k in range(32):
                f.seek(k * (size - (64 << 10)) // 31)
                digest.update(f.read(64 << 10))
    return digest.hexdigest()[:20]


def _find_clip_folder(folder: Path, raw: dict, vision_tower) -> Path:
    candidate, why = vision_tower or raw.get("mm_vision_tower"), "none named"
    if candidate:
        try:
            return model_folder(candidate)  # a folder, or a repo id in the local Hub cache
        except FileNotFoundError as e:
            why = str(e)
    raise FileNotFoundError(
        f"{folder}: an original LLaVA checkpoint holds no CLIP weights; its config names the tower "
        f"{raw.get('mm_vision_tower')!r}. Pass vision_tower=<folder or repo id of "
        f"openai/clip-vit-large-patch14-336 (config.json + weights)>. The tower looked for: {why}"
    )


# ---------------------------------------------------------------------------------------------
# Saving: the llava-hf Hub layout, atomically
# ---------------------------------------------------------------------------------------------

HUB_PREFIXES = [  # our name prefix -> the Hub spelling that every transformers version reads
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]
MAX_SHARD_BYTES = 5 * 1000**3


def hub_key(name: str) -> str:
    for ours, hub in HUB_PREFIXES:
        if name.startswith(ours):
            return hub + name[len(ours):]
    raise KeyError(name)


def _hf_ready_state(model: Llava) -> tuple[dict, LlavaConfig]:
    """State dict under Hub names. An original-layout model (vocabulary 32000, image id past it) gets
    rows for `<image>` and `<pad>` and is padded to a multiple of 64, as llava-hf did: embeddings
    take the mean row (never read: image positions are overwritten, padding is masked) and the LM
    head takes the mean row too, whose logit is the mean logit and so never the argmax."""
    import dataclasses

    cfg = model.cfg
    state = {name: p.detach() for name, p in model.named_parameters()}
    if cfg.image_token_index >= cfg.text.vocab_size:
        new_vocab = -(-(cfg.image_token_index + 2) // 64) * 64
        extra = new_vocab - cfg.text.vocab_size
        for name in ("language_model.embed_tokens.weight", "lm_head.weight"):
            w = state[name]
            state[name] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(extra, -1)])
        text = dataclasses.replace(cfg.text, vocab_size=new_vocab, pad_token_id=cfg.image_token_index + 1)
        cfg = dataclasses.replace(cfg, text=text)
    return {hub_key(k): v for k, v in state.items()}, cfg


def save_model(model: Llava, out_dir, processor=None, max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write `model` as a llava-hf checkpoint folder (config.json, safetensors shards + index,
    tokenizer files) that transformers' LlavaForConditionalGeneration and load_model both read.

    Written into a temporary folder beside `out_dir` and renamed into place at the end: a crash
    mid-save leaves the previous folder (or none), never a half-written one.
    processor: a tinyalign.Processor whose tokenizer/image settings to save; by default the one of
    the folder the model was loaded from, if any.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state, cfg = _hf_ready_state(model)
    if processor is None and getattr(model, "source_dir", None) is not None:
        from ..processor import Processor

        try:
            processor = Processor.from_pretrained(model.source_dir, image_token_index=model.cfg.image_token_index)
        except FileNotFoundError as e:
            warnings.warn(f"saving {out_dir} without tokenizer files: {e}")
    recover_folder(out_dir)  # what an interrupted earlier save left behind
    # Written under a temporary name (with our pid, so that a later run knows whether it is still
    # being written), flushed to disk, then renamed into place.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        with writing(tmp):
            config = to_hf_dict(cfg)
            if getattr(model, "source", None):  # the weights it was trained from: a Hub commit, a folder
                config[SOURCE_KEY] = model.source
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _write_shards(state, tmp, max_shard_bytes)
            if processor is not None:
                processor.save_pretrained(tmp, vocab_size=cfg.text.vocab_size)
        crash_point("model: files written, not yet renamed")
        fsync_tree(tmp)
        usual_permissions(tmp)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_shards(state: dict, folder: Path, max_shard_bytes: int):
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = standalone(t)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = file_name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The LoRA adapter alone (--save-adapter), as PEFT lays it out
# ---------------------------------------------------------------------------------------------


def adapter_state(module: nn.Module, prefix: str = "") -> dict:
    """The LoRA tensors alone, named as PEFT names them (`...q_proj.lora_A.weight`)."""
    state = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{prefix}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
            state[f"{prefix}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    return state


def save_adapter(module: nn.Module, folder, r: int, alpha: float, dropout: float, targets=TARGETS,
                 source: dict | None = None):
    """adapter_model.safetensors + adapter_config.json, in PEFT's layout and names; written into a
    temporary folder beside `folder` and renamed into place, as save_model writes a model. source: the
    weights the adapter goes on (a model's `source`), named as PEFT names its base model."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        with writing(tmp):
            save_file(adapter_state(module, prefix="base_model.model.model.language_model."),
                      str(tmp / "adapter_model.safetensors"))
            config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                      "lora_dropout": dropout, "target_modules": list(targets), "bias": "none"}
            if source:  # a Hub repo id and its commit, or the folder it was trained from
                config["base_model_name_or_path"] = source.get("repo_id") or source.get("folder")
                config["revision"] = source.get("revision")
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        fsync_tree(tmp)
        usual_permissions(tmp)
        replace_folder(tmp, folder, what="adapter")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
