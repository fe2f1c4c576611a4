"""The per-token view of DPO's implicit reward (tinyalign/lab/tokens.py): the token parts add up to
exactly what training computes per answer, on plain and packed batches; the split of the margin into
differing and shared tokens adds up; the page shows every picture and every token in a real browser;
and --snapshot-every writes the model as it was at that step."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from browser import rendered_dom
from conftest import LLAMA_TOKENIZER
from test_training import dpo_args, trainable_state, write_pairs

import train_dpo
from tinyalign import random_model
from tinyalign.data import Pair, pair_examples, read_jsonl
from tinyalign.demo.world import demo_config, demo_processor, make_world
from tinyalign.infra.weights import load_model, save_model
from tinyalign.lab import tokens
from tinyalign.lab.tokens import AnswerTokens, PairTokens, answer_token_logps, margin_split, shared_tokens
from tinyalign.lora import apply_lora, merge_lora
from tinyalign.losses import implicit_rewards
from tinyalign.packing import pair_batch
from tinyalign.processor import Processor

ANSWERS = ["The color is red .", "There are two shapes . It is easy to see in the picture .", "No , there is not .",
           "They are circles .", "I am not sure .", "Yes , there is ."]


def perturbed(seed):
    """A random demo-sized model with norms away from 1, so that every term is non-trivial."""
    model = random_model(demo_config(), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.5 * torch.rand_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    files = make_world(folder, seed=3, n_sft=0, n_prompts=6, n_heldout=0, n_heldout_prompts=0)
    prompts = read_jsonl(files["prompts"])
    pairs = [Pair(r["id"], [r["image"]], r["prompt"], ANSWERS[i], ANSWERS[(i + 2) % 6]) for i, r in enumerate(prompts)]
    processor = demo_processor()
    examples, _ = pair_examples(pairs, processor, folder)
    return perturbed(5), perturbed(6), processor, examples, pairs, folder


@pytest.mark.parametrize("packing", [False, True])
def test_token_parts_sum_to_each_answers_log_prob_and_reward(setup, packing):
    policy, reference, processor, examples, _, _ = setup
    batch = pair_batch(examples, processor, packing=packing)
    beta = 0.1
    with torch.no_grad():
        per_answer = {"policy": policy(**batch.inputs).double(), "reference": reference(**batch.inputs).double()}
    parts = {"policy": answer_token_logps(policy, batch), "reference": answer_token_logps(reference, batch)}
    expected_rewards = implicit_rewards(per_answer["policy"], per_answer["reference"], beta)
    for s in range(len(per_answer["policy"])):
        (ids, pi), (ref_ids, ref) = parts["policy"][s], parts["reference"][s]
        assert torch.equal(ids, ref_ids)
        assert len(ids) == int(batch.answer_tokens[s])  # every scored token, none twice
        assert pi.sum().item() == pytest.approx(per_answer["policy"][s].item(), abs=1e-4)
        answer = AnswerTokens(["?"] * len(ids), pi.tolist(), ref.tolist(), [True] * len(ids))
        assert answer.reward(beta) == pytest.approx(expected_rewards[s].item(), abs=1e-5)
    # the tokens come in reading order: they are the answer's own ids, then </s>
    B = len(examples)
    for k, e in enumerate(examples):
        for answer, s in ((e.chosen, k), (e.rejected, B + k)):
            labels = [t for t in answer.labels if t != -100]
            assert parts["policy"][s][0].tolist() == labels


def test_plain_and_packed_give_the_same_token_parts(setup):
    policy, _, processor, examples, _, _ = setup
    plain = answer_token_logps(policy, pair_batch(examples, processor, packing=False))
    packed = answer_token_logps(policy, pair_batch(examples, processor, packing=True))
    for (ids_a, a), (ids_b, b) in zip(plain, packed):
        assert torch.equal(ids_a, ids_b)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_shared_tokens_are_the_matching_runs():
    chosen, rejected = shared_tokens([1, 2, 3, 7, 5, 9], [1, 2, 3, 8, 5, 9])
    assert chosen == [True, True, True, False, True, True] and rejected == chosen
    chosen, rejected = shared_tokens([4, 1, 2], [1, 2, 6, 6])
    assert chosen == [False, True, True] and rejected == [True, True, False, False]


def test_margin_split_adds_up():
    beta = 0.5
    pairs = [PairTokens("a", "q", AnswerTokens(list("xyz"), [-1.0, -0.5, -0.1], [-1.0, -2.0, -0.3],
                                                     [True, False, True]),
                        AnswerTokens(list("xwz"), [-1.2, -3.0, -0.2], [-1.0, -1.0, -0.3], [True, False, True])),
             PairTokens("b", "q", AnswerTokens(list("ab"), [-0.4, -0.2], [-0.5, -0.1], [False, True]),
                        AnswerTokens(list("cb"), [-0.9, -0.3], [-0.2, -0.1], [False, True]))]
    split = margin_split(pairs, beta)
    # by hand: pair a differs in the middle token (+0.75 - -1.0) and shares the rest (0.1 - -0.1 + ... )
    margin_a = beta * ((0 + 1.5 + 0.2) - (-0.2 - 2.0 + 0.1))
    margin_b = beta * ((0.1 - 0.1) - (-0.7 - 0.2))
    differing = beta * (1.5 - -2.0) + beta * (0.1 - -0.7)
    assert split["mean margin"] == pytest.approx((margin_a + margin_b) / 2)
    assert split["mean margin, differing tokens"] == pytest.approx(differing / 2)
    assert split["mean margin, shared tokens"] == pytest.approx((margin_a + margin_b - differing) / 2)
    assert split["share of the margin on differing tokens"] == pytest.approx(differing / (margin_a + margin_b))
    assert split["reward per token, chosen, differing"] == pytest.approx(beta * (1.5 + 0.1) / 2)
    assert split["reward accuracy"] == 1.0


@pytest.mark.parametrize("which", ["demo", "llama"])
def test_token_pieces_join_to_the_decoded_answer(which):
    """The page's token texts, put together, are the answer: spaces, byte tokens and all."""
    if which == "demo":  # a word-level tokenizer: spaces come from the decoder
        processor = demo_processor()
        text = "There are three shapes ."
    else:  # the real LLaMA tokenizer: word-start marks and byte fallback
        processor = SimpleNamespace(tokenizer=Tokenizer.from_file(str(LLAMA_TOKENIZER)))
        text = "A café, 42 naïve\nlines: ünïcödé 😀 done."
    ids = processor.tokenizer.encode(text, add_special_tokens=False).ids
    pieces = tokens.pieces(processor, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(pieces).strip() == text


def test_the_page_shows_every_picture_and_token(setup, tmp_path):
    policy, reference, processor, examples, pairs, folder = setup
    save_model(policy, tmp_path / "policy", processor=processor)
    save_model(reference, tmp_path / "reference", processor=processor)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"id": p.id, "image": p.images[0], "prompt": p.prompt, "chosen": p.chosen,
                                              "rejected": p.rejected}) + "\n" for p in pairs))
    out = tmp_path / "page"
    result = tokens.main(["--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
                          "--pairs", str(pairs_file), "--image-folder", str(folder), "--out", str(out),
                          "--shown", "4", "--beta", "0.2"])
    view = result["views"][str(tmp_path / "policy")]
    assert [p.id for p in view["true image"]] == [p.id for p in pairs]
    split = json.loads((out / "margin_split.json").read_text())[str(tmp_path / "policy")]
    assert split["true image"]["mean margin"] == pytest.approx(margin_split(view["true image"], 0.2)["mean margin"])
    assert not math.isclose(split["true image"]["mean margin"], split["swapped image"]["mean margin"])

    dom = rendered_dom(out / "index.html")
    # each pair shown with its picture, and its swapped column with the picture it was shown instead
    assert dom.count('data-loaded="yes"') == 8 and 'data-loaded="no"' not in dom
    shown = [p for p in view["true image"][:4]] + [p for p in view["swapped image"][:4]]
    assert dom.count('class="token') == sum(len(p.chosen.pieces) + len(p.rejected.pieces) for p in shown)


def test_snapshot_is_the_model_at_that_step(tiny_world, tmp_path):
    """--snapshot-every 2 writes OUT/snapshots/step-2: the start model with the adapters and projector
    of step 2 merged in, exactly what a run stopped at step 2 holds in its checkpoint."""
    pairs_path = write_pairs(tiny_world, tmp_path / "pairs.jsonl")
    train_dpo.main(dpo_args(tiny_world, pairs_path, tmp_path / "snap", "--max-steps", "3", "--snapshot-every", "2"))
    train_dpo.main(dpo_args(tiny_world, pairs_path, tmp_path / "stop", "--max-steps", "3", "--stop-after", "2"))
    assert sorted(p.name for p in (tmp_path / "snap" / "snapshots").iterdir()) == ["step-2"]  # not the last step
    snapshot = load_model(tmp_path / "snap" / "snapshots" / "step-2")
    assert Processor.from_pretrained(tmp_path / "snap" / "snapshots" / "step-2")  # its tokenizer came along

    at_step_2 = load_model(tiny_world["checkpoint"])
    apply_lora(at_step_2.language_model, r=4, alpha=8, dropout=0.0)
    state = dict(at_step_2.named_parameters())
    with torch.no_grad():
        for key, value in trainable_state(tmp_path / "stop").items():
            state[key[len("param/"):]].copy_(value)
    merge_lora(at_step_2)
    start = load_model(tiny_world["checkpoint"]).state_dict()
    final = load_model(tmp_path / "snap" / "model").state_dict()
    for name, value in snapshot.state_dict().items():
        torch.testing.assert_close(value, at_step_2.state_dict()[name], atol=1e-6, rtol=0)
    moved = [n for n, v in snapshot.state_dict().items() if not torch.equal(v, start[n])]
    assert moved and any(not torch.equal(snapshot.state_dict()[n], final[n]) for n in moved)


def test_the_command_names_a_missing_model_and_an_unknown_pair(setup, tmp_path):
    policy, reference, processor, _, pairs, folder = setup
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nowhere'}: no model there"):
        tokens.main(["--policy", str(tmp_path / "nowhere"), "--reference", str(tmp_path / "nowhere")])
    save_model(policy, tmp_path / "policy", processor=processor)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"id": p.id, "image": p.images[0], "prompt": p.prompt, "chosen": p.chosen,
                                              "rejected": p.rejected}) + "\n" for p in pairs))
    with pytest.raises(SystemExit, match="--pair: no pair with id 'no-such-pair' among the 6 pairs"):
        tokens.main(["--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "policy"), "--pairs",
                     str(pairs_file), "--image-folder", str(folder), "--out", str(tmp_path / "page"),
                     "--pair", "no-such-pair"])
