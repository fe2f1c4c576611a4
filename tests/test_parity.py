"""Logits parity with transformers' LlavaForConditionalGeneration, loaded from the same checkpoint on disk."""

import pytest
import torch
from conftest import IMAGE_ID, make_hf_model, save_hf

import tinyalign

TOL = 1e-4
VARIANTS = {
    "gqa-default": dict(),
    "mha-full": dict(text=dict(num_key_value_heads=4), vision_feature_select_strategy="full"),
    "two-feature-layers": dict(vision_feature_layer=[-3, -1]),
}


def make_batch(per_image: int, padding_side: str):
    """Three rows: two images + text, text only, one image; padded to the longest row."""
    img = [IMAGE_ID] * per_image
    rows = [
        [1, 5, 6] + img + [7, 8] + img + [9, 10, 11, 12],
        [1, 13, 14, 15, 16, 17, 18, 19],
        [1, 20] + img + [21, 22, 23],
    ]
    longest = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        pad = longest - len(row)
        ids.append(row + [0] * pad if padding_side == "right" else [0] * pad + row)
        mask.append([1] * len(row) + [0] * pad if padding_side == "right" else [0] * pad + [1] * len(row))
    torch.manual_seed(1)
    return torch.tensor(ids), torch.randn(3, 3, 28, 28), torch.tensor(mask)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = make_hf_model(**VARIANTS[request.param])
    path = save_hf(hf, tmp_path_factory.mktemp(request.param) / "ckpt")
    return hf, tinyalign.load_model(path, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["eager", "flex"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_transformers(pair, backend, padding_side):
    hf, ours = pair
    ours.attn_backend = backend
    ids, pixels, mask = make_batch(ours.cfg.image_seq_length, padding_side)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = ours(ids, pixels, mask)
    assert got.shape == expected.shape
    valid = mask.bool()
    assert expected[valid].abs().max() > 0.1  # the comparison has signal
    assert (got - expected)[valid].abs().max().item() <= TOL


def test_text_only_batch_without_pixels(pair):
    hf, ours = pair
    ours.attn_backend = "eager"
    ids = torch.tensor([[1, 30, 31, 32, 33], [1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= TOL


def test_flex_and_eager_agree_on_every_position(hf_checkpoint):
    """Including padded positions: both paths return zeros from attention where nothing is visible."""
    model = tinyalign.load_model(hf_checkpoint[0])
    ids, pixels, mask = make_batch(model.cfg.image_seq_length, "left")
    with torch.no_grad():
        model.attn_backend = "eager"
        eager = model(ids, pixels, mask)
        model.attn_backend = "flex"
        flex = model(ids, pixels, mask)
    assert (eager - flex).abs().max().item() <= TOL


def test_gradients_reach_projector_and_decoder_not_tower(hf_checkpoint):
    model = tinyalign.load_model(hf_checkpoint[0])
    model.attn_backend = "eager"
    ids, pixels, mask = make_batch(model.cfg.image_seq_length, "right")
    model(ids, pixels, mask)[mask.bool()].logsumexp(-1).mean().backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())


def test_image_token_count_mismatch_is_a_clear_error(hf_checkpoint):
    model = tinyalign.load_model(hf_checkpoint[0])
    ids, pixels, mask = make_batch(model.cfg.image_seq_length, "right")
    with pytest.raises(ValueError, match=r"12 image tokens .* 2 image\(s\) x 4 features = 8"):
        model(ids, pixels[:2], mask)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)


def test_cpu_training_path_matches_transformers_in_value_and_gradient(hf_checkpoint):
    """With gradients on, a CPU forward goes through SDPA (FlexAttention has no CPU backward); the
    loss and the gradients of the trainable parts match transformers'."""
    path, hf = hf_checkpoint
    ours = tinyalign.load_model(path)
    ids, pixels, mask = make_batch(ours.cfg.image_seq_length, "left")
    labels = ids.masked_fill(mask == 0, -100)
    ours_loss = torch.nn.functional.cross_entropy(ours(ids, pixels, mask)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    hf_loss = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
    assert abs(ours_loss.item() - hf_loss.item()) <= TOL
    ours_loss.backward()
    hf_loss.backward()
    pairs = [(ours.multi_modal_projector.linear_1.weight, hf.model.multi_modal_projector.linear_1.weight),
             (ours.language_model.layers[0].self_attn.k_proj.weight, hf.model.language_model.layers[0].self_attn.k_proj.weight),
             (ours.lm_head.weight, hf.lm_head.weight)]
    for a, b in pairs:
        assert a.grad.abs().max() > 0 and (a.grad - b.grad).abs().max().item() <= 1e-5
    hf.zero_grad()
