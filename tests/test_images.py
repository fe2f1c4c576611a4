"""Image preprocessing against transformers' CLIP image processor, on real photos."""

import numpy as np
import pytest
import torch
from conftest import IMAGES
from PIL import Image, ImageOps

from tinyalign.images import ImageProcessor, load_image

PHOTOS = ["chelsea.png", "coffee.png", "coffee_tall.png", "astronaut.png", "rocket.jpg", "camera.png",
          "rocket_exif6.jpg"]


def clip_reference():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def expand_to_square(image: Image.Image) -> Image.Image:
    """LLaVA's `expand2square` with the CLIP-mean background, restated for the oracle."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def reference_pixels(image: Image.Image, pad: bool) -> torch.Tensor:
    image = ImageOps.exif_transpose(image).convert("RGB")
    if pad:
        image = expand_to_square(image)
    return torch.from_numpy(np.asarray(clip_reference()(image)["pixel_values"][0]))


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_matches_clip_image_processor(name, mode):
    ours = ImageProcessor(size=336, mode=mode)(IMAGES / name)
    expected = reference_pixels(Image.open(IMAGES / name), pad=mode == "pad")
    assert ours.shape == expected.shape == (3, 336, 336)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_padding_keeps_the_whole_image_and_fills_with_the_mean():
    pixels = ImageProcessor(size=336, mode="pad")(IMAGES / "coffee.png")  # 600 x 400 -> bands top and bottom
    band = pixels[:, :20, :]  # the CLIP mean colour, truncated to integers, normalises to ~0 (|x| < 0.02)
    assert band.abs().max() < 0.02 and band.flatten(1).std(1).max() < 1e-6  # flat, per channel
    assert pixels[:, 168, :].abs().mean() > 0.1  # the photo is in the middle


def test_exif_orientation_is_applied():
    upright = load_image(IMAGES / "rocket.jpg")
    rotated = load_image(IMAGES / "rocket_exif6.jpg")
    assert rotated.size == upright.size == (640, 427)
    # Same scene, re-encoded JPEG: close, not identical.
    diff = np.abs(np.asarray(rotated, np.float32) - np.asarray(upright, np.float32)).mean()
    assert diff < 8.0
    turned_wrong = np.asarray(Image.open(IMAGES / "rocket_exif6.jpg").convert("RGB").resize((640, 427)), np.float32)
    assert np.abs(turned_wrong - np.asarray(upright, np.float32)).mean() > 4 * diff


def test_grayscale_rgba_and_palette_inputs(tmp_path):
    gray = load_image(IMAGES / "camera.png")
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 0], np.asarray(gray)[..., 2])
    rgba = Image.open(IMAGES / "chelsea.png").convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white
    assert np.asarray(load_image(rgba)).min() == 255
    rgba.save(tmp_path / "transparent.png")
    ref = clip_reference()(Image.open(tmp_path / "transparent.png"))["pixel_values"][0]
    ours = ImageProcessor(size=336, mode="crop")(tmp_path / "transparent.png")
    assert (ours - torch.from_numpy(np.asarray(ref))).abs().max() <= 1e-5
    palette = Image.open(IMAGES / "chelsea.png").convert("P")
    assert load_image(palette).mode == "RGB"
    assert ImageProcessor(size=336)(palette).shape == (3, 336, 336)
