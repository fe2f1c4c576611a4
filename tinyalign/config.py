"""Model configuration: three small dataclasses and named presets. Reading and writing the
`config.json` of a checkpoint, both flavours, checked: config_json.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    """CLIP ViT. Defaults: ViT-L/14 at 336 px, the tower of LLaVA-1.5."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """LLaMA-family decoder. Defaults: Vicuna-7B-v1.5 with llava-hf's 32064-token vocabulary."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads means grouped-query attention (GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def __post_init__(self):  # (a count of 0 is left for check_values to name)
        if self.head_dim is None and self.num_heads:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # id written `image_seq_length` times per image into input_ids. In an original LLaVA checkpoint
    # (vocabulary 32000) it lies just past the vocabulary: the model never looks it up.
    image_token_index: int = 32000
    vision_feature_layer: int | list[int] = -2  # index into [embeddings, block 1, ..., block L]
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    projector_bias: bool = True

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        for layer in self.feature_layers:
            if not -(self.vision.num_layers + 1) <= layer <= self.vision.num_layers:
                raise ValueError(f"vision_feature_layer {layer} is outside a {self.vision.num_layers}-layer tower")

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: one per patch, plus CLS under the "full" strategy."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")


PRESETS = {
    "llava-1.5-7b": LlavaConfig(),
    "llava-1.5-13b": LlavaConfig(
        text=TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
    ),
    # Small enough to train on a laptop CPU in minutes; same code paths as the real thing (GQA on).
    "tiny": LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=56),
        text=TextConfig(vocab_size=32064, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=2048),
    ),
    # A CPU benchmark size (~110M decoder weights): big enough that the matrix products, not Python,
    # set the pace, so the CPU ratios of the generation paths mean something.
    "small": LlavaConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=112),
        text=TextConfig(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                        num_kv_heads=12, max_position_embeddings=2048),
    ),
}


def preset(name: str) -> LlavaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])  # a copy: callers may edit it
