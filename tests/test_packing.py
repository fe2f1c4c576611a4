"""Packed batches compute exactly what the plain padded batches compute: the same per-answer log-probs,
the same DPO loss and the same gradients, with the shared prefix and with several pairs per row."""

import pytest
import torch

from tinyalign import random_model
from tinyalign.batches import collate_pairs, collate_sft
from tinyalign.data import Conversation, Pair, pair_examples, read_jsonl, sft_examples
from tinyalign.demo.world import demo_config, demo_processor, make_world
from tinyalign.losses import dpo_loss
from tinyalign.packing import pack_pairs, pack_sft, place, pair_document


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packing")
    files = make_world(folder, seed=3, n_sft=0, n_prompts=6, n_heldout=0, n_heldout_prompts=0)
    prompts = read_jsonl(files["prompts"])
    processor = demo_processor()
    answers = ["The color is red .", "There are two shapes . It is easy to see in the picture .", "No , there is not .",
               "They are circles .", "I am not sure .", "Yes , there is ."]
    pairs = [Pair(r["id"], [r["image"]], r["prompt"], answers[i], answers[(i + 2) % 6]) for i, r in enumerate(prompts)]
    examples, _ = pair_examples(pairs, processor, folder)
    model = random_model(demo_config(), seed=5)
    with torch.no_grad():  # norms away from 1 and a larger scale: differences would show
        for p in model.parameters():
            p.mul_(1 + 0.5 * torch.rand_like(p))
    return model, processor, examples, folder


def plain_logps(model, batch):
    assert "packed" not in batch.inputs and batch.inputs["repeat_images"] == 2  # 2B plain rows, each image once
    return model(**batch.inputs)


def packed_logps(model, batch):
    assert "packed" in batch.inputs
    return model(**batch.inputs)


def test_pair_document_layout(setup):
    _, _, examples, _ = setup
    e = examples[1]  # chosen: the long count answer
    doc = pair_document(e, 0, 1)
    p = next(i for i, label in enumerate(e.chosen.labels) if label != -100)
    c = len(e.chosen.input_ids) - p
    r = len(e.rejected.input_ids) - p
    assert len(doc.ids) == p + c + r  # the prompt once
    assert doc.branch == [0] * p + [1] * c + [2] * r
    assert doc.positions[p + c] == p  # the rejected answer starts where the chosen one did
    first_rejected = [s for s in doc.scored if s[2] == 1][0]
    assert first_rejected[0] == p - 1 and first_rejected[1] == e.rejected.input_ids[p]  # scored from the prompt


@pytest.mark.parametrize("backend", ["flex", "eager"])
@pytest.mark.parametrize("max_tokens", [None, 400])
def test_packed_pairs_equal_plain_forward(setup, backend, max_tokens):
    model, processor, examples, _ = setup
    model.attn_backend = backend
    with torch.no_grad():
        plain = plain_logps(model, collate_pairs(examples, processor))
        packed_batch = pack_pairs(examples, processor, max_tokens)
        packed = packed_logps(model, packed_batch)
    if max_tokens:
        assert packed_batch.inputs["input_ids"].shape[0] < len(examples)  # several pairs really share a row
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)
    model.attn_backend = "flex"


@pytest.mark.parametrize("max_tokens", [None, 400])
def test_packed_dpo_loss_and_gradients_equal_plain(setup, max_tokens):
    model, processor, examples, _ = setup
    ref = torch.randn(2 * len(examples)) * 3 - 20

    def grads(logps_fn, batch):
        model.zero_grad()
        logps = logps_fn(model, batch)
        B = len(examples)
        loss = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:])[0].mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    loss_a, grads_a = grads(plain_logps, collate_pairs(examples, processor))
    loss_b, grads_b = grads(packed_logps, pack_pairs(examples, processor, max_tokens))
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()
    model.requires_grad_(False)


def test_packed_sft_equals_plain(setup):
    model, processor, examples, folder = setup
    conversations = [Conversation(e.id, [str(p) for p in e.images],
                                  [{"from": "human", "value": "<image>\nWhat color are the shapes ?"},
                                   {"from": "gpt", "value": text}])
                     for e, text in zip(examples, ["The color is red .", "Yes , there is .", "I am not sure ."] * 2)]
    sft, _ = sft_examples(conversations, processor, folder)
    with torch.no_grad():
        batch = collate_sft(sft, processor)
        plain = model(**batch.inputs)
        packed_batch = pack_sft(sft, processor, max_tokens=200)
        packed = packed_logps(model, packed_batch)
    assert packed_batch.inputs["input_ids"].shape[0] < len(sft)
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)


def test_first_fit_placement():
    class Doc:
        def __init__(self, n):
            self.ids = [0] * n

    assert place([Doc(5), Doc(5), Doc(3), Doc(9)], None) == [[0], [1], [2], [3]]
    assert place([Doc(5), Doc(5), Doc(3), Doc(9)], 10) == [[0, 1], [2], [3]]
    assert place([Doc(5), Doc(12), Doc(4)], 10) == [[0, 2], [1]]  # too long: a row of its own


def test_pair_whose_answers_do_not_share_the_prompt_is_named(setup):
    from dataclasses import replace

    _, _, examples, _ = setup
    e = examples[0]
    other = replace(e.rejected, input_ids=[e.rejected.input_ids[0] + 1] + e.rejected.input_ids[1:])
    with pytest.raises(ValueError, match=f"pair {e.id}: chosen and rejected do not share their prompt tokens"):
        pair_document(replace(e, rejected=other), 0, 1)
