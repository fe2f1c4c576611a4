"""Bad checkpoints and inputs: each error names the file and the tensor or record."""

import json
import shutil

import pytest
from conftest import IMAGES
from safetensors.torch import load_file, save_file

import tinyalign
from tinyalign.weights import CheckpointError


@pytest.fixture
def sharded(hf_checkpoint, tmp_path):
    """A sharded copy of the tiny checkpoint that a test may damage."""
    out = tinyalign.save_model(tinyalign.load_model(hf_checkpoint[0]), tmp_path / "ckpt", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out, index["weight_map"]


def rewrite_shard(folder, weight_map, tensor_name, change):
    shard = folder / weight_map[tensor_name]
    state = load_file(shard)
    change(state)
    save_file(state, shard)
    return shard


def test_missing_shard(sharded):
    folder, weight_map = sharded
    shard = folder / weight_map["language_model.model.norm.weight"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: shard listed in .*model.safetensors.index.json is missing"):
        tinyalign.load_model(folder)


def test_tensor_with_wrong_shape(sharded):
    folder, weight_map = sharded
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = rewrite_shard(folder, weight_map, name, lambda s: s.update({name: s[name][:, :10].clone()}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor 'language_model.layers.1.mlp.up_proj.weight' "
                                              r"has shape \[128, 10\] but the config implies \[128, 64\]"):
        tinyalign.load_model(folder)


def test_unknown_tensor(sharded):
    folder, weight_map = sharded
    name = "language_model.model.norm.weight"
    shard = rewrite_shard(folder, weight_map, name, lambda s: s.update({"language_model.model.extra.bias": s[name].clone()}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor 'language_model.extra.bias' has no place"):
        tinyalign.load_model(folder)
    rewrite_shard(folder, weight_map, name, lambda s: s.update({"adapter.lora_A": s[name].clone()}))
    with pytest.raises(CheckpointError, match=r"unknown tensor 'adapter.lora_A'"):
        tinyalign.load_model(folder)


def test_missing_tensor(sharded):
    folder, weight_map = sharded
    name = "multi_modal_projector.linear_2.bias"
    rewrite_shard(folder, weight_map, name, lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=r"the checkpoint lacks these tensors: multi_modal_projector.linear_2.bias"):
        tinyalign.load_model(folder)


def test_truncated_safetensors(hf_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file \(truncated or corrupt"):
        tinyalign.load_model(folder)


def test_config_that_disagrees_with_the_weights(hf_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'language_model.layers.0.mlp.down_proj.weight'"
                                              r" has shape \[64, 128\] but the config implies \[64, 96\]: the config and"
                                              r" the weights disagree"):
        tinyalign.load_model(folder)


def test_config_problems(hf_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"],
                                                                                "model_type": "mistral"}}))
    with pytest.raises(ValueError, match=r"config.json: decoder model_type 'mistral' is not supported"):
        tinyalign.load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        tinyalign.load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json: not found"):
        tinyalign.load_model(folder)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        tinyalign.load_model(tmp_path / "nowhere")


def test_unreadable_bin_shard(tmp_path):
    from tinyalign.weights import iter_tensors

    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: could not read it with torch.load\(weights_only=True\)"):
        list(iter_tensors(bad))


def test_unreadable_and_missing_images(tmp_path):
    proc = tinyalign.images.ImageProcessor(size=28)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.png: not a readable image"):
        proc(bad)
    with pytest.raises(FileNotFoundError, match=r"missing.jpg: image file not found"):
        proc(tmp_path / "missing.jpg")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes((IMAGES / "rocket.jpg").read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cut.jpg: not a readable image"):
        proc(truncated)
