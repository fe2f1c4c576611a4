"""Image preprocessing for the CLIP tower, with pillow and numpy.

LLaVA-1.5 trained and evaluated with `image_aspect_ratio = pad`: the image is pasted in the middle
of a square canvas filled with the CLIP mean colour, so nothing is cropped away, and then goes
through CLIP's usual resize -> centre crop -> normalise. llava-hf's processor skips the padding
(it centre-crops the long side away): `mode="crop"` reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(image) -> Image.Image:
    """A path or PIL image -> an upright RGB PIL image.

    EXIF orientation is applied (phones store pixels sideways and a tag saying how to turn them);
    grayscale, palette and CMYK images are converted; transparency is composited over white.
    """
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = ImageOps.exif_transpose(opened)  # a loaded copy, upright
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{image}: image file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{image}: not a readable image ({e})") from None
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    else:
        raise TypeError(f"expected an image path or a PIL image, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (a PNG or TIFF from a scanner, microscope or X-ray): Pillow's convert("RGB")
        # clips every value above 255 to white. Scale 0-65535 to 0-255 instead, keeping the contrast.
        # (LLaVA's own loader calls convert("RGB") and so sees such images as mostly white.)
        levels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill=tuple(int(255 * m) for m in CLIP_MEAN)) -> Image.Image:
    """Centre the image on a square canvas of side max(w, h) filled with (122, 116, 104)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncation, as CLIP's processor does
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:  # [H, W, C]
    h, w = array.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return array[top:top + size, left:left + size]


@dataclass
class ImageProcessor:
    size: int = 336
    mode: str = "pad"  # "pad" (LLaVA-1.5) or "crop" (llava-hf default)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        if self.mode not in ("pad", "crop"):
            raise ValueError(f"image mode must be 'pad' or 'crop', got {self.mode!r}")

    def __call__(self, image) -> torch.Tensor:
        """A path or PIL image -> normalised pixels [3, size, size] float32."""
        image = load_image(image)
        if self.mode == "pad":
            image = pad_to_square(image, tuple(int(255 * m) for m in self.mean))
        pixels = center_crop(np.asarray(resize_shortest_edge(image, self.size)), self.size)
        pixels = pixels.astype(np.float32) / 255.0
        pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # [H, W, C] -> [C, H, W]

    def batch(self, images) -> torch.Tensor:
        return torch.stack([self(image) for image in images])  # [N, 3, size, size]
