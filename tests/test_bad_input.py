"""Bad checkpoints and inputs: each error names the file and the tensor or record."""

import importlib
import json
import shutil

import pytest
from conftest import IMAGES, png_claiming
from safetensors.torch import load_file, save_file

import tinyalign
from tinyalign.infra.weights import CheckpointError


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
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}: missing \(a shard that model.safetensors.index.json names\)"):
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
    with pytest.raises(FileNotFoundError, match=r"config.json: missing \(the model's shapes: is this a checkpoint folder\?\)"):
        tinyalign.load_model(folder)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        tinyalign.load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("where,field,value,message", [
    ("text_config", "rms_norm_eps", float("nan"), r"rms_norm_eps must be a number between 0 and 1, got nan"),
    ("text_config", "rms_norm_eps", 0, r"rms_norm_eps must be a number between 0 and 1, got 0"),
    ("text_config", "num_hidden_layers", 0, r"num_hidden_layers must be a whole number of at least 1, got 0"),
    ("text_config", "num_key_value_heads", 0, r"num_key_value_heads must be a whole number of at least 1, got 0"),
    ("text_config", "hidden_size", -64, r"hidden_size must be a whole number of at least 1, got -64"),
    ("text_config", "vocab_size", 12.5, r"text_config vocab_size must be a whole number, got 12.5"),
    ("text_config", "rope_parameters", {"rope_type": "default", "rope_theta": float("inf")},
     r"rope_theta must be a finite number above 1, got inf"),
    ("vision_config", "layer_norm_eps", float("nan"), r"vision layer_norm_eps must be a number between 0 and 1"),
    ("vision_config", "patch_size", 5, r"vision image_size \d+ is not a multiple of patch_size 5"),
])
def test_a_config_value_no_model_has_is_named(hf_checkpoint, tmp_path, where, field, value, message):
    """Python's json reads NaN and Infinity; a config holding them, or a count of 0, once loaded
    without a word and computed garbage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config[where] = {**config[where], field: value}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: " + message):
        tinyalign.load_model(folder)


@pytest.mark.parametrize("field,value,message", [
    ("image_std", [0.27, 0, 0.28], r"image_std must be above 0 \(pixels are divided by it\) and at most 1, got \[0.27, 0, 0.28\]"),
    ("image_std", [0.27, float("nan"), 0.28], r"image_std must be three finite numbers"),
    ("image_mean", [0.5, 0.5], r"image_mean must be three finite numbers \(R, G, B\), got \[0.5, 0.5\]"),
    ("image_mean", 0.5, r"image_mean must be three finite numbers"),
])
def test_an_image_normalisation_no_model_has_is_named(tiny_world, tmp_path, field, value, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_world["checkpoint"], folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, field: value}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: " + message):
        tinyalign.Processor.from_pretrained(folder)


def test_a_tensor_holding_nan_is_named(sharded):
    folder, weight_map = sharded
    name = "language_model.model.layers.0.mlp.down_proj.weight"

    def poison(state):
        state[name] = state[name].clone()
        state[name].view(-1)[3] = float("nan")
    shard = rewrite_shard(folder, weight_map, name, poison)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor 'language_model.layers.0.mlp.down_proj.weight' "
                                              r"holds NaN or infinite values"):
        tinyalign.load_model(folder)


def test_unreadable_bin_shard(tmp_path):
    from tinyalign.infra.weights import iter_tensors

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


# ---------------------------------------------------------------------------------------------
# Data files: every field of the wrong type, or out of range, is named with its file and record
# ---------------------------------------------------------------------------------------------

PAIR = {"id": "p1", "prompt": "What color?", "chosen": "red", "rejected": "blue"}
RATED = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2}
SCORED = {"id": "s1", "prompt": "What color?", "responses": [{"text": "red", "scores": RATED},
                                                             {"text": "blue", "scores": {**RATED, "correctness": 0}}]}

BAD_RECORDS = [
    # (reader, record, what the error must say after "FILE record 0 (id ID): ")
    ("pairs", {**PAIR, "image": 5}, r"image must be a path or a list of paths, got 5"),
    ("pairs", {**PAIR, "image": ["a.png", 3]}, r"image must be a path or a list of paths"),
    ("pairs", {**PAIR, "chosen": 5}, r"chosen must be text .*got 5"),
    ("pairs", {**PAIR, "rejected": ["x"]}, r"rejected must be text"),
    ("pairs", {**PAIR, "prompt": 7}, r"prompt must be text"),
    ("pairs", {**PAIR, "ref_win_logp": "n/a", "ref_rej_logp": -3.0},
     r"ref_win_logp must be a log-probability \(a finite number <= 0\), got 'n/a'"),
    ("pairs", {**PAIR, "ref_win_logp": float("nan"), "ref_rej_logp": -3.0}, r"ref_win_logp must be .*got nan"),
    ("pairs", {**PAIR, "ref_win_logp": -2.0, "ref_rej_logp": 1.5}, r"ref_rej_logp must be .*got 1.5"),
    ("pairs", {**PAIR, "ref_win_logp": -2.0, "ref_rej_logp": True}, r"ref_rej_logp must be .*got True"),
    # below any log-probability a model gives: -1e30 saturates the loss, -1e308 overflows it
    ("pairs", {**PAIR, "ref_win_logp": -1e30, "ref_rej_logp": -3.0}, r"ref_win_logp is -1e\+30, below any log-prob"),
    ("pairs", {**PAIR, "ref_win_logp": -2.0, "ref_rej_logp": -1e308}, r"ref_rej_logp is -1e\+308, below any log-prob"),
    ("scored", {**SCORED, "responses": [{"text": 5, "scores": RATED}]}, r"response 0 text must be text"),
    ("scored", {**SCORED, "image": {"path": "a.png"}}, r"image must be a path"),
] + [("scored", {**SCORED, "responses": [{"text": "red", "scores": {**RATED, attribute: value}}]},
      rf"response 0: {attribute} must be a number 0-4, got {value}")
     for attribute in ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
     for value in (5, -1, True)] + [
    ("conversations", {"id": "c1", "image": 5, "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]},
     r"image must be a path or a list of paths"),
]


@pytest.mark.parametrize("reader,record,message", BAD_RECORDS)
def test_bad_record_is_named(tmp_path, reader, record, message):
    from tinyalign.data import DataError, read_conversations, read_pairs, read_scored

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    read = {"pairs": read_pairs, "scored": read_scored, "conversations": read_conversations}[reader]
    with pytest.raises(DataError, match=rf"data.jsonl record 0 \(id {record['id']}\): " + message):
        read(path)


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from tinyalign.data import DataError, read_pairs

    path = tmp_path / "latin1.jsonl"
    second = json.dumps({**PAIR, "chosen": "rouge é"}, ensure_ascii=False)
    path.write_bytes((json.dumps(PAIR) + "\n" + second + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl line 2: not UTF-8 text \(byte 0xe9"):
        read_pairs(path)


@pytest.fixture
def bad_images(tmp_path):
    """One record per kind of bad image, plus a good one."""
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (tmp_path / "strip.png").write_bytes(png_claiming(1, 25000))  # 625 million pixels once padded to a square
    (tmp_path / "thin.png").write_bytes(png_claiming(40, 4000))  # 100:1, under 4 of 336 pixels once padded and resized
    (tmp_path / "cut.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes()[:3000])  # a truncated JPEG
    (tmp_path / "text.png").write_text("not an image")
    shutil.copy(IMAGES / "chelsea.png", tmp_path / "ok.png")
    names = ["bomb.png", "strip.png", "thin.png", "cut.jpg", "text.png", "missing.png", "ok.png"]
    records = [{**PAIR, "id": f"r{i}", "image": name} for i, name in enumerate(names)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


@pytest.mark.parametrize("image,message", [("bomb.png", "is too large to decode safely"),
                                           ("strip.png", r"is too large to decode safely: 1 x 25000 pads to 25000 x "),
                                           ("thin.png", r"is 40 x 4000, longer than 50:1"),
                                           ("cut.jpg", "is not readable"), ("text.png", "is not readable"),
                                           ("missing.png", "not found")])
def test_each_bad_image_is_caught_up_front_and_named(bad_images, image, message):
    from tinyalign.data import DataError, pair_examples, read_pairs
    from tinyalign.demo.world import demo_processor

    pairs, _ = read_pairs(bad_images / "pairs.jsonl")
    one = [p for p in pairs if p.images == [image]]
    with pytest.raises(DataError, match=rf"record {one[0].id}: image .*{image} {message}.*--skip-bad"):
        pair_examples(one, demo_processor(), image_folder=bad_images)


def test_skip_bad_counts_every_bad_image_and_keeps_the_good_one(bad_images):
    from tinyalign.data import pair_examples, read_pairs
    from tinyalign.demo.world import demo_processor

    pairs, _ = read_pairs(bad_images / "pairs.jsonl")
    examples, report = pair_examples(pairs, demo_processor(), image_folder=bad_images, skip_bad=True)
    assert [e.id for e in examples] == ["r6"]
    assert report.dropped == {"missing or unreadable image": 6}


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_an_image_path_that_leads_out_of_the_image_folder_is_refused_unless_asked(tmp_path, how):
    """A crafted data file must not reach other files on the machine (annotate would upload them)."""
    from tinyalign.data import DataError, pair_examples, read_pairs
    from tinyalign.demo.world import demo_processor

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(IMAGES / "chelsea.png", tmp_path / "private.png")
    (folder / "link.png").symlink_to(tmp_path / "private.png")
    image = {"parent": "../private.png", "absolute": str(tmp_path / "private.png"), "symlink": "link.png"}[how]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({**PAIR, "image": image}) + "\n")
    pairs, _ = read_pairs(tmp_path / "pairs.jsonl")
    for skip_bad in (False, True):  # not a bad image to skip: a file reaching out is stopped
        with pytest.raises(DataError, match=r"record p1: image .* leads outside the image folder .*images \(to "
                                             r".*private.png\); pass --images-outside-folder"):
            pair_examples(pairs, demo_processor(), image_folder=folder, skip_bad=skip_bad)
    examples, _ = pair_examples(pairs, demo_processor(), image_folder=folder, images_anywhere=True)
    assert examples[0].images[0].resolve() == (tmp_path / "private.png").resolve()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_too_deep_is_named_not_a_recursion_traceback(tmp_path, suffix):
    from tinyalign.data import DataError, load_pairs

    path = tmp_path / f"deep{suffix}"
    nested = "[" * 100_000 + "]" * 100_000
    path.write_text(nested if suffix == ".json" else json.dumps(PAIR) + "\n" + nested + "\n")
    where = "deep.json: JSON nested too deep" if suffix == ".json" else "deep.jsonl line 2: JSON nested too deep"
    with pytest.raises(DataError, match=where):
        load_pairs(path)


def test_the_format_is_the_files_not_its_first_records(tmp_path):
    """Record 0 of a scored file without "responses" (a prompt annotate failed on) no longer makes
    the rest read as pairs and dropped; a file that mixes the two formats is refused, naming both."""
    from tinyalign.data import DataError, load_pairs

    failed = {"id": "s0", "prompt": "What color?", "error": "judge timed out"}
    scored = [failed] + [{**SCORED, "id": f"s{i}"} for i in range(1, 17)]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    pairs, _ = load_pairs(tmp_path / "scored.jsonl")
    assert [p.id for p in pairs] == [f"s{i}" for i in range(1, 17)]
    (tmp_path / "mixed.jsonl").write_text(json.dumps(SCORED) + "\n" + json.dumps(PAIR) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl: record 0 holds scored samples .* but record 1 a pair"):
        load_pairs(tmp_path / "mixed.jsonl")


def test_an_sft_record_with_no_question_and_no_image_is_dropped_and_counted(tmp_path):
    from tinyalign.data import read_conversations

    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "an answer"}]  # noqa: E731
    records = [{"id": "empty", "conversations": turns("  ")}, {"id": "tag", "conversations": turns("<image>")},
               {"id": "seen", "image": "a.png", "conversations": turns("<image>")},
               {"id": "asked", "conversations": turns("What is it?")}]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    kept, report = read_conversations(tmp_path / "sft.json")
    assert [c.id for c in kept] == ["seen", "asked"]  # an image alone is a question ("describe this")
    assert report.dropped == {"no question (no text and no image)": 2}


def test_16_bit_grayscale_keeps_its_contrast(tmp_path):
    """A 16-bit gradient: Pillow's convert("RGB") turns 99.6% of it white; ours scales 0-65535 to 0-255."""
    import numpy as np
    from PIL import Image

    levels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    assert (np.asarray(Image.open(tmp_path / "gray16.png").convert("RGB")) == 255).mean() > 0.99  # the bug
    rgb = np.asarray(tinyalign.images.load_image(tmp_path / "gray16.png"))
    assert rgb.shape == (64, 64, 3) and (rgb == 255).mean() < 0.01
    assert np.array_equal(rgb[..., 0], np.rint(levels / 257).astype(np.uint8))


# Impossible values at the command line stop argparse at once, naming the option and the rule
# (tinyalign/arguments.py), instead of a traceback from deep inside a loop or a silent odd run.
M = ["--model", "m", "--out", "o"]
A = ["--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl"]


@pytest.mark.parametrize("script, argv, message", [
    ("train_dpo", M + ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("train_dpo", M + ["--eval-fraction", "1.5"], "argument --eval-fraction: must be in [0, 1), got 1.5"),
    ("train_dpo", M + ["--label-smoothing", "0.7"], "argument --label-smoothing: must be in [0, 0.5], got 0.7"),
    ("train_dpo", M + ["--lr", "nan"], "argument --lr: must be at least 0, got nan"),
    ("train_dpo", M + ["--epochs", "many"], "argument --epochs: invalid number value: 'many'"),
    ("train_sft", M + ["--grad-accum", "0"], "argument --grad-accum: must be at least 1, got 0"),
    ("train_sft", M + ["--max-grad-norm", "0"], "argument --max-grad-norm: must be above 0, got 0"),
    ("train_steerlm", M + ["--lora-dropout", "1"], "argument --lora-dropout: must be in [0, 1), got 1"),
    ("train_steerlm", M + ["--lora-r", "-2"], "argument --lora-r: must be at least 0, got -2"),
    ("annotate", A + ["--slots", "0"], "argument --slots: must be at least 1, got 0"),
    ("annotate", A + ["--n", "0"], "argument --n: must be at least 1, got 0"),
    ("annotate", A + ["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    ("annotate", A + ["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    ("eval", ["pope"] + M + ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("eval", ["pope"] + M + ["--limit", "0"], "argument --limit: must be at least 1, got 0"),
    ("generate", ["--model", "m", "--prompt", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
])
def test_impossible_option_values_are_refused_by_name(script, argv, message, capsys):
    modules = {"eval": "eval", "annotate": "tinyalign.evaluation.annotate", "generate": "tinyalign.evaluation.ask"}
    main = importlib.import_module(modules.get(script, script)).main
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_annotate_warns_that_greedy_samples_are_all_one(tmp_path, capsys):
    from tinyalign.evaluation import annotate
    from tinyalign.data import DataError

    with pytest.raises((DataError, FileNotFoundError)):  # the warning comes first, then the missing file
        annotate.main(["--model", "m", "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                       "--temperature", "0", "--n", "4"])
    assert "--temperature 0 is greedy decoding, so the 4 answers of a prompt will be the same" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_sft", "train_dpo", "train_steerlm"])
def test_every_recipe_passes_its_own_command_line_checks(script, tmp_path):
    """The paper's and the demo's recipes, spelled as options (as the ablations pass them, e.g.
    --lora-r 0 --lora-alpha 0 for full fine-tuning), are all within what the options accept."""
    from tinyalign.lab.ablations import recipe_argv

    module = importlib.import_module(script)
    for recipe in (module.PAPER, module.DEMO):
        options = recipe_argv({k: v for k, v in recipe.items() if k != "out"})
        args = module.parse(["--model", str(tmp_path), "--out", "o", *options])
        assert all(getattr(args, k) == v for k, v in recipe.items() if k != "out")
