"""A checkpoint's config.json in and out: the two flavours LLaVA-1.5 checkpoints ship with, read
and checked into the dataclasses of config.py, and written back in the llava-hf flavour.

* llava-hf (`LlavaForConditionalGeneration`): `{"text_config": {...}, "vision_config": {...},
  "image_token_index": 32000, "vision_feature_layer": -2, ...}`. The Hub files are sparse: a field
  that is absent means transformers' default for that class, so the defaults below mirror those.
* original LLaVA (`LlavaLlamaForCausalLM`, liuhaotian/llava-v1.5-*): the LLaMA fields at the top
  level plus `mm_vision_tower`, `mm_projector_type`, `mm_vision_select_layer`, ...; the CLIP tower's
  own shape comes from the CLIP folder's config.json.

A value no model has (a count of 0, NaN where an epsilon goes, a size given as text) is refused
naming the file and the field, before anything is computed from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import LlavaConfig, TextConfig, VisionConfig

# transformers' class defaults, used for the fields a sparse Hub config leaves out.
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048)
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5)
_LLAVA_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)


def check_values(cfg: LlavaConfig, source: str) -> LlavaConfig:
    """Refuse values no model has, naming the field: JSON lets a config say NaN, 0 or -3 where a
    size, a count or an epsilon goes, and the model would then compute garbage without a word."""
    sizes = {"hidden_size": cfg.text.hidden_size, "intermediate_size": cfg.text.intermediate_size,
             "num_hidden_layers": cfg.text.num_layers, "num_attention_heads": cfg.text.num_heads,
             "num_key_value_heads": cfg.text.num_kv_heads, "vocab_size": cfg.text.vocab_size,
             "max_position_embeddings": cfg.text.max_position_embeddings, "vision hidden_size": cfg.vision.hidden_size,
             "vision intermediate_size": cfg.vision.intermediate_size, "vision num_hidden_layers": cfg.vision.num_layers,
             "vision num_attention_heads": cfg.vision.num_heads, "vision image_size": cfg.vision.image_size,
             "vision patch_size": cfg.vision.patch_size, "vision num_channels": cfg.vision.num_channels,
             "head_dim": cfg.text.head_dim}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {name} must be a whole number of at least 1, got {value!r}")
    token_ids = {"image_token_index": cfg.image_token_index, "bos_token_id": cfg.text.bos_token_id,
                 "eos_token_id": cfg.text.eos_token_id, "pad_token_id": cfg.text.pad_token_id}
    for name, value in token_ids.items():
        if value is not None and (not _whole(value) or value < 0):
            raise ValueError(f"{source}: {name} must be a token id (a whole number, 0 or more), got {value!r}")
    epsilons = {"rms_norm_eps": cfg.text.rms_norm_eps, "vision layer_norm_eps": cfg.vision.layer_norm_eps}
    for name, value in epsilons.items():  # added to a variance before its square root: tiny and positive
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{source}: {name} must be a number between 0 and 1, got {value!r}")
    if not math.isfinite(cfg.text.rope_theta) or cfg.text.rope_theta <= 1:
        raise ValueError(f"{source}: rope_theta must be a finite number above 1, got {cfg.text.rope_theta!r}")
    if cfg.text.hidden_size % cfg.text.num_heads or cfg.vision.hidden_size % cfg.vision.num_heads:
        raise ValueError(f"{source}: hidden_size must be a multiple of num_attention_heads (text and vision)")
    if cfg.vision.image_size % cfg.vision.patch_size:
        raise ValueError(f"{source}: vision image_size {cfg.vision.image_size} is not a multiple of patch_size "
                         f"{cfg.vision.patch_size}")
    return cfg


def _refuse(source: str, what: str):
    raise ValueError(f"{source}: {what} is not supported by tinyalign (LLaVA-1.5: LLaMA decoder + CLIP ViT)")


def _typed(d, source: str, what: str, whole=(), numbers=(), objects=()) -> dict:
    """The JSON types of a config's fields, checked before anything is computed from them (a count
    given as text or a list would otherwise fail deep inside, in words that do not name the file)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: {what} must be an object, got {d!r:.80}")
    for name in whole:
        v = d.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{source}: {what}{name} must be a whole number, got {v!r:.80}")
    for name in numbers:
        v = d.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{source}: {what}{name} must be a number, got {v!r:.80}")
    for name in objects:
        if d.get(name) is not None and not isinstance(d[name], dict):
            raise ValueError(f"{source}: {what}{name} must be an object, got {d[name]!r:.80}")
    return d


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _built(make, source: str):
    """A config dataclass, its own checks' ValueError prefixed with the file it came from."""
    try:
        return make()
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def text_config_from_dict(d: dict, source: str) -> TextConfig:
    """A LLaMA config dict (transformers' LlamaConfig field names) -> TextConfig."""
    _typed(d, source, "text_config ", whole=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "head_dim",
                                             "max_position_embeddings", "bos_token_id", "pad_token_id"),
           numbers=("rms_norm_eps", "rope_theta"), objects=("rope_parameters", "rope_scaling"))
    for rope in (d.get("rope_parameters"), d.get("rope_scaling")):
        _typed(rope or {}, source, "text_config rope ", numbers=("rope_theta",))
    eos = d.get("eos_token_id", 2)
    if not (isinstance(eos, int) and not isinstance(eos, bool)) and not (
            isinstance(eos, list) and eos and all(isinstance(t, int) and not isinstance(t, bool) for t in eos)):
        raise ValueError(f"{source}: text_config eos_token_id must be a token id or a list of them, got {eos!r:.80}")
    d = {**_LLAMA_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if d.get("model_type", "llama") != "llama":
        _refuse(source, f"decoder model_type {d['model_type']!r}")
    if d.get("hidden_act", "silu") != "silu":
        _refuse(source, f"decoder hidden_act {d['hidden_act']!r}")
    if d.get("attention_bias") or d.get("mlp_bias"):
        _refuse(source, "a decoder with attention_bias/mlp_bias")
    if d.get("tie_word_embeddings"):
        _refuse(source, "tie_word_embeddings=true")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        _refuse(source, f"rope scaling {rope}")
    heads = d["num_attention_heads"]
    return _built(lambda: TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=heads if d.get("num_key_value_heads") is None else d["num_key_value_heads"],
        head_dim=d.get("head_dim"), rms_norm_eps=d["rms_norm_eps"],
        rope_theta=float(rope["rope_theta"] if rope.get("rope_theta") is not None else d.get("rope_theta", 10000.0)),
        max_position_embeddings=d["max_position_embeddings"],
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=_first(d.get("eos_token_id", 2)),
        pad_token_id=d.get("pad_token_id"),
    ), source)


def _first(x):
    return x[0] if isinstance(x, list) else x


def vision_config_from_dict(d: dict | None, source: str) -> VisionConfig:
    """A CLIP (vision) config dict -> VisionConfig. A full CLIPConfig nests it under vision_config."""
    if d is None:
        d = _LLAVA_VISION_DEFAULTS
    if "vision_config" in _typed(d, source, "vision_config "):
        d = d["vision_config"]
    _typed(d, source, "vision_config ", whole=("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "image_size", "patch_size", "num_channels"),
           numbers=("layer_norm_eps",))
    d = {**_CLIP_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if d.get("hidden_act", "quick_gelu") != "quick_gelu":
        _refuse(source, f"vision hidden_act {d['hidden_act']!r}")
    return VisionConfig(
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], image_size=d["image_size"], patch_size=d["patch_size"],
        num_channels=d["num_channels"], layer_norm_eps=d["layer_norm_eps"],
    )


def is_original_llava(d: dict) -> bool:
    return "mm_vision_tower" in d or "mm_projector_type" in d


def config_from_hf_dict(d: dict, source: str = "config.json") -> LlavaConfig:
    """llava-hf LlavaConfig dict -> LlavaConfig."""
    if d.get("projector_hidden_act", "gelu") != "gelu":
        _refuse(source, f"projector_hidden_act {d['projector_hidden_act']!r}")
    _typed(d, source, "", whole=("image_token_index", "image_token_id", "image_seq_length", "vocab_size"),
           objects=("text_config", "vision_config"))
    text_dict = dict(d.get("text_config") or {})
    if "vocab_size" not in text_dict and "vocab_size" in d:  # very old llava-hf configs
        text_dict["vocab_size"] = d["vocab_size"]
    layers = d.get("vision_feature_layer", -2)
    if not _whole(layers) and not (isinstance(layers, list) and layers and all(map(_whole, layers))):
        raise ValueError(f"{source}: vision_feature_layer must be a layer index or a list of them, got {layers!r:.80}")
    cfg = _built(lambda: LlavaConfig(
        vision=vision_config_from_dict(d.get("vision_config"), source),
        text=text_config_from_dict(text_dict, source),
        image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
        vision_feature_layer=layers,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        projector_bias=d.get("multimodal_projector_bias", True),
    ), source)
    if cfg.text.pad_token_id is None:
        cfg.text.pad_token_id = d.get("pad_token_id")
    check_values(cfg, source)
    _check_image_seq_length(cfg, d.get("image_seq_length"), source)
    return cfg


def _check_image_seq_length(cfg: LlavaConfig, stated: int | None, source: str):
    # transformers keeps 576 in the config under "full" and adds the CLS token in its processor;
    # any other disagreement means the config and the tower do not belong together.
    if stated is None or stated == cfg.image_seq_length:
        return
    if cfg.vision_feature_select_strategy == "full" and stated == cfg.vision.num_patches:
        return
    raise ValueError(
        f"{source}: image_seq_length={stated} but the vision tower ({cfg.vision.image_size} px, patch "
        f"{cfg.vision.patch_size}, strategy {cfg.vision_feature_select_strategy!r}) gives {cfg.image_seq_length} "
        "features per image"
    )


def config_from_original_dict(d: dict, vision: VisionConfig, source: str = "config.json") -> LlavaConfig:
    """Original LLaVA (LlavaLlamaForCausalLM) dict + the CLIP tower's VisionConfig -> LlavaConfig."""
    if d.get("mm_projector_type", "linear") != "mlp2x_gelu":
        _refuse(source, f"mm_projector_type {d.get('mm_projector_type', 'linear')!r} (LLaVA-1.5 uses 'mlp2x_gelu')")
    if d.get("mm_use_im_start_end"):
        _refuse(source, "mm_use_im_start_end=true")
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        _refuse(source, f"mm_vision_select_feature {select!r}")
    mm_hidden = d.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision.hidden_size:
        raise ValueError(f"{source}: mm_hidden_size={mm_hidden} but the CLIP tower has hidden_size {vision.hidden_size}")
    text = text_config_from_dict({k: v for k, v in d.items() if k != "model_type"}, source)
    _typed(d, source, "", whole=("mm_vision_select_layer",))
    return check_values(_built(lambda: LlavaConfig(
        vision=vision, text=text,
        image_token_index=text.vocab_size,  # just past the vocabulary (32000, as llava-hf): never embedded
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if select == "cls_patch" else "default",
    ), source), source)


def to_hf_dict(cfg: LlavaConfig) -> dict:
    """LlavaConfig -> a llava-hf config.json dict that transformers' LlavaConfig reads back."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": cfg.image_token_index,
        "image_seq_length": cfg.vision.num_patches,  # transformers' convention: the CLS is added on top under "full"
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": False,
        "pad_token_id": t.pad_token_id,
        "text_config": {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "quick_gelu", "projection_dim": 768,
        },
    }


def read_json(path: Path) -> dict:
    """A config file's JSON object; errors name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
