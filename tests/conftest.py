"""Shared test fixtures: tiny LLaVA checkpoints written to disk by transformers (the reference)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real assets the tests need, shipped in the repository (provenance and licences: tests/assets/README.md).
ASSETS = ROOT / "tests" / "assets"
LLAMA_TOKENIZER = ASSETS / "llama-tokenizer" / "tokenizer.json"
IMAGES = ASSETS / "images"


def png_claiming(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a header and one tiny compressed block, no pixels to speak
    of): what Pillow's size checks see, as a decompression bomb or a 177-byte 1 x 25000 strip shows it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))

# Two threads by default (CI's two cores). TINYALIGN_TEST_THREADS=1 runs the suite single-threaded: a
# different thread count changes float rounding the way another CPU does, and the suite must pass both.
# Under pytest-xdist (`-n 2`, the README's command) each worker takes one thread, and so do the
# processes the tests start (OMP_NUM_THREADS), so that two workers share two cores without fighting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TINYALIGN_TEST_THREADS", "1")
    os.environ["OMP_NUM_THREADS"] = os.environ["TINYALIGN_TEST_THREADS"]
torch.set_num_threads(int(os.environ.get("TINYALIGN_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def no_hub_cache_of_this_machine(tmp_path_factory, monkeypatch):
    """No test reads the Hugging Face cache of the machine it runs on (a developer's real models would
    change what a repo id finds): each test sees an empty one, unless it lays out its own."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hub-cache"))


def pytest_collection_modifyitems(items):
    """The end-to-end demo test (about 4 minutes) first: with two workers it then runs beside all the
    others instead of after them."""
    items.sort(key=lambda item: 0 if item.path.name == "test_demo.py" else 1)  # a stable sort keeps the rest

# Tiny shapes with the real structure. Image 28 px / patch 14 -> 4 patches per image.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, projection_dim=16)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384, max_position_embeddings=512, rms_norm_eps=1e-5)
IMAGE_ID = 320  # original layout: vocabulary 320, the image id just past it


def make_hf_model(seed=0, text=None, vision=None, **llava_kwargs):
    """A transformers LlavaForConditionalGeneration with random weights, scaled up a little so that
    a wrong detail moves the logits by far more than the tolerance."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**{**VISION, **(vision or {})}),
        text_config=LlamaConfig(**{**TEXT, **(text or {})}),
        image_token_index=IMAGE_ID, image_seq_length=4, **llava_kwargs,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))  # norms away from 1 so a missing scale is caught
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(path, transformers model) of the default tiny checkpoint (GQA, strategy 'default', layer -2)."""
    model = make_hf_model()
    return save_hf(model, tmp_path_factory.mktemp("hf") / "tiny"), model


def image_tokens(n_images: int, per_image: int = 4) -> list[int]:
    return [IMAGE_ID] * (n_images * per_image)


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2))


def make_tiny_world(root: Path) -> dict:
    """A small shapes world on disk and a randomly initialised tiny checkpoint (with its tokenizer)
    that the training scripts can be pointed at like any real checkpoint."""
    import tinyalign
    from tinyalign.demo.world import demo_config, demo_processor, make_world

    files = make_world(root / "data", seed=1, n_sft=96, n_prompts=48, n_heldout=16, n_heldout_prompts=0)
    model = tinyalign.random_model(demo_config(), seed=1)
    checkpoint = tinyalign.save_model(model, root / "start", processor=demo_processor())
    return {"root": root, "checkpoint": checkpoint, **files}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("world"))


class ChatStub:
    """Base of the stub judges the tests serve on 127.0.0.1: reply() sends one chat-completions answer."""

    def reply(self, content: str):
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def serve(handler):
    """Serve `handler` on a free local port in a thread; yields the base URL (a fixture's body)."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
