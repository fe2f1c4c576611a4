"""Checkpoints in and out: save_model -> transformers, the original LLaVA layout, sharding, atomicity."""

import json
import random
import re

import pytest
import torch
from conftest import IMAGE_ID, write_json
from safetensors.torch import load_file, save_file
from test_parity import make_batch

import tinyalign
from tinyalign.infra import weights

TOL = 1e-4
ORIGINAL_VOCAB = IMAGE_ID  # the original layout's vocabulary ends where the image id starts


def hf_logits(hf, ids, pixels, mask):
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits


def our_logits(model, ids, pixels, mask):
    model.attn_backend = "eager"
    with torch.no_grad():
        return model(ids, pixels, mask)


def assert_same_logits(a, b, mask, vocab=None):
    vocab = vocab or min(a.shape[-1], b.shape[-1])
    diff = (a[..., :vocab] - b[..., :vocab])[mask.bool()].abs().max().item()
    assert diff <= TOL, diff


# ---------------------------------------------------------------------------------------------
# save_model -> transformers
# ---------------------------------------------------------------------------------------------


def test_save_model_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path):
    from transformers import LlavaForConditionalGeneration

    path, hf = hf_checkpoint
    ours = tinyalign.load_model(path)
    out = tinyalign.save_model(ours, tmp_path / "saved")
    reloaded_hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, pixels, mask = make_batch(4, "right")
    assert_same_logits(hf_logits(reloaded_hf, ids, pixels, mask), hf_logits(hf, ids, pixels, mask), mask)
    assert_same_logits(our_logits(tinyalign.load_model(out), ids, pixels, mask), hf_logits(hf, ids, pixels, mask), mask)
    # The Hub spelling of the names, which every transformers version reads.
    keys = load_file(out / "model.safetensors").keys()
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.pre_layrnorm.weight" in keys


def test_sharded_save_and_load(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint
    ours = tinyalign.load_model(path)
    out = tinyalign.save_model(ours, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    for shard in shards:  # each shard within the limit (a single tensor larger than it would stand alone)
        assert sum(t.numel() * 4 for t in load_file(out / shard).values()) <= 100_000
    ids, pixels, mask = make_batch(4, "left")
    assert_same_logits(our_logits(tinyalign.load_model(out), ids, pixels, mask), hf_logits(hf, ids, pixels, mask), mask)


def test_every_key_spelling_loads(hf_checkpoint, tmp_path):
    """transformers 4.5x in-memory names (model.language_model.*, lm_head.*) and 5.x's tower without
    vision_model. read the same."""
    path, hf = hf_checkpoint
    state = load_file(path / "model.safetensors")
    renamed = {}
    for k, v in state.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
        renamed[k] = v
    folder = tmp_path / "newer"
    folder.mkdir()
    (folder / "config.json").write_text((path / "config.json").read_text())
    save_file(renamed, folder / "model.safetensors")
    ids, pixels, mask = make_batch(4, "right")
    assert_same_logits(our_logits(tinyalign.load_model(folder), ids, pixels, mask), hf_logits(hf, ids, pixels, mask), mask)


def test_interrupted_save_leaves_previous_folder_intact(hf_checkpoint, tmp_path, monkeypatch):
    path, _ = hf_checkpoint
    model = tinyalign.load_model(path)
    out = tinyalign.save_model(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(state, folder, max_bytes):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "_write_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        tinyalign.save_model(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    with pytest.raises(KeyboardInterrupt):
        tinyalign.save_model(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------------------------------------
# The original LLaVA layout (liuhaotian/llava-v1.5-*): .bin shards, mm_projector, separate CLIP folder
# ---------------------------------------------------------------------------------------------


def train_sentencepiece(folder, vocab_size=ORIGINAL_VOCAB):
    """A LLaMA-style SentencePiece BPE model (byte fallback, no normalisation): the oracle tokenizer."""
    import sentencepiece as spm

    random.seed(0)
    words = "a chat between curious user and assistant the image shows red square blue circle on it".split()
    corpus = [" ".join(random.choices(words, k=random.randint(3, 12))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def write_original_checkpoint(hf_path, folder, clip_in_config=True):
    """Turn a llava-hf checkpoint into the original LLaVA layout, as liuhaotian/llava-v1.5-* ships it."""
    folder.mkdir()
    clip = folder.parent / (folder.name + "-clip")
    clip.mkdir()
    hf_config = json.loads((hf_path / "config.json").read_text())
    text, vision = hf_config["text_config"], hf_config["vision_config"]
    state = load_file(hf_path / "model.safetensors")
    decoder, tower = {}, {"logit_scale": torch.tensor(4.6), "text_model.embeddings.token_embedding.weight":
                          torch.zeros(10, 8), "vision_model.embeddings.position_ids": torch.arange(5)[None]}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            tower["vision_model." + k[len("vision_tower."):]] = v
        elif k.startswith("multi_modal_projector."):
            decoder[k.replace("multi_modal_projector.linear_1.", "model.mm_projector.0.")
                     .replace("multi_modal_projector.linear_2.", "model.mm_projector.2.")] = v
        elif k == "language_model.lm_head.weight":
            decoder["lm_head.weight"] = v[:ORIGINAL_VOCAB].clone()
        else:
            name = k.replace("language_model.model.", "model.")
            decoder[name] = v[:ORIGINAL_VOCAB].clone() if name == "model.embed_tokens.weight" else v
    decoder["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old transformers saved this
    names = sorted(decoder)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file_name, keys in halves.items():
        torch.save({k: decoder[k] for k in keys}, folder / file_name)
    write_json(folder / "pytorch_model.bin.index.json",
               {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}})
    write_json(folder / "config.json", {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": text["hidden_size"], "intermediate_size": text["intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"], "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"], "rms_norm_eps": text["rms_norm_eps"],
        "max_position_embeddings": text["max_position_embeddings"], "vocab_size": ORIGINAL_VOCAB,
        "hidden_act": "silu", "mm_vision_tower": str(clip) if clip_in_config else "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_hidden_size": vision["hidden_size"], "mm_use_im_start_end": False, "image_aspect_ratio": "pad",
    })
    save_file(tower, clip / "model.safetensors")
    write_json(clip / "config.json", {"model_type": "clip", "vision_config": vision, "text_config": {}})
    train_sentencepiece(folder)
    return folder, clip


@pytest.fixture(scope="module")
def original(hf_checkpoint, tmp_path_factory):
    return write_original_checkpoint(hf_checkpoint[0], tmp_path_factory.mktemp("orig") / "llava-v1.5-tiny")


def test_original_layout_loads_with_same_logits(hf_checkpoint, original):
    model = tinyalign.load_model(original[0])
    assert model.cfg.text.vocab_size == ORIGINAL_VOCAB and model.cfg.image_token_index == IMAGE_ID
    ids, pixels, mask = make_batch(4, "right")
    assert_same_logits(our_logits(model, ids, pixels, mask), hf_logits(hf_checkpoint[1], ids, pixels, mask), mask)


def test_original_layout_with_vision_tower_argument(hf_checkpoint, tmp_path):
    folder, clip = write_original_checkpoint(hf_checkpoint[0], tmp_path / "orig", clip_in_config=False)
    with pytest.raises(FileNotFoundError, match="Pass vision_tower="):
        tinyalign.load_model(folder)
    model = tinyalign.load_model(folder, vision_tower=clip)
    ids, pixels, mask = make_batch(4, "left")
    assert_same_logits(our_logits(model, ids, pixels, mask), hf_logits(hf_checkpoint[1], ids, pixels, mask), mask)


def test_original_layout_saves_as_llava_hf(hf_checkpoint, original, tmp_path):
    """vocab 320 -> 384 with <image>=320 and <pad>=321, as llava-hf's conversion did; same logits."""
    from transformers import LlavaForConditionalGeneration

    out = tinyalign.save_model(tinyalign.load_model(original[0]), tmp_path / "as-hf")
    reloaded = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.text_config.vocab_size == 384 and reloaded.config.image_token_index == IMAGE_ID
    ids, pixels, mask = make_batch(4, "right")
    expected = hf_logits(hf_checkpoint[1], ids, pixels, mask)
    got = hf_logits(reloaded, ids, pixels, mask)
    assert_same_logits(got, expected, mask, vocab=ORIGINAL_VOCAB)
    # The added rows never win: their logit is the mean of the others.
    assert (got[..., ORIGINAL_VOCAB:].max(-1).values < got[..., :ORIGINAL_VOCAB].max(-1).values).all()
    proc = tinyalign.Processor.from_pretrained(out)
    assert proc.tokenizer.token_to_id("<image>") == IMAGE_ID and proc.tokenizer.token_to_id("<pad>") == IMAGE_ID + 1
    assert proc.image_token_index == IMAGE_ID and proc.image_seq_length == 4


def test_sentencepiece_model_converts_exactly(original):
    """tokenizer.model read without sentencepiece gives sentencepiece's own ids, and decodes back."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(original[0] / "tokenizer.model"))
    proc = tinyalign.Processor.from_pretrained(original[0])
    samples = ["a chat between curious user", " the image shows  a red square\n\nblue", "ÄÖ 🦙 你好 zebra!",
               "   leading spaces", "trailing ", "", "\t tab", "circle on it</s>"]
    for text in samples:
        want = sp.encode(text.replace("</s>", ""))
        got = proc.tokenizer.encode(text.replace("</s>", ""), add_special_tokens=False).ids
        assert got == want, text
        assert proc.tokenizer.decode(got) == sp.decode(want)


def test_folder_without_tokenizer_is_a_clear_error(hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model. Pass tokenizer_file="):
        tinyalign.Processor.from_pretrained(hf_checkpoint[0])


def test_load_is_meta_initialised_and_lands_in_dtype(hf_checkpoint):
    model = tinyalign.load_model(hf_checkpoint[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert model.lm_head.weight.requires_grad
