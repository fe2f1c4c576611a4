"""KV-cache generation: the same tokens as argmax decoding without a cache, and as transformers."""

import pytest
import torch
from conftest import IMAGE_ID

import tinyalign
from tinyalign import generate

EOS = 2


def prompts():
    """Left-padded batch: an image prompt, a text prompt, a shorter image prompt."""
    img = [IMAGE_ID] * 4
    rows = [[1, 5, 6] + img + [7, 8, 9], [1, 40, 41, 42, 43, 44], [1] + img + [50]]
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(3)
    return ids, torch.randn(2, 3, 28, 28), mask


def greedy_without_cache(model, ids, pixels, mask, steps):
    """Recompute the whole sequence at every step and take the argmax: slow and obviously right."""
    out = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, pixels, mask, position_ids=positions)[:, -1]
        token = logits.argmax(-1).masked_fill(done, 0)
        out.append(token)
        done |= token == EOS
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return tinyalign.load_model(hf_checkpoint[0])


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_kv_cache_greedy_equals_argmax_without_cache(model, backend):
    model.attn_backend = backend
    ids, pixels, mask = prompts()
    expected = greedy_without_cache(model, ids, pixels, mask, steps=12)
    got = generate(model, ids, pixels, mask, max_new_tokens=12)
    assert got.tolist() == expected.tolist()


def test_padding_does_not_change_what_a_prompt_generates(model):
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    batched = generate(model, ids, pixels, mask, max_new_tokens=10)
    alone = generate(model, ids[1:2, mask[1] == 1], max_new_tokens=10)
    assert batched[1, : alone.shape[1]].tolist() == alone[0].tolist()


def test_same_tokens_as_transformers_generate(hf_checkpoint, model):
    hf = hf_checkpoint[1]
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=10,
                          do_sample=False, eos_token_id=EOS, pad_token_id=0)[:, ids.shape[1]:]
    got = generate(model, ids, pixels, mask, max_new_tokens=10, pad_token_id=0)
    assert got.tolist() == ref[:, : got.shape[1]].tolist()


def test_stops_at_eos_and_pads_after_it(model):
    """Make </s> the argmax after the first token by boosting its row of the LM head."""
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    first = generate(model, ids, pixels, mask, max_new_tokens=1)
    with torch.no_grad():
        saved = model.lm_head.weight[EOS].clone()
        model.lm_head.weight[EOS] = 50 * model.language_model.embed_tokens.weight[first[0, 0]]
        try:
            out = generate(model, ids, pixels, mask, max_new_tokens=20, pad_token_id=0)
        finally:
            model.lm_head.weight[EOS] = saved
    assert out.shape[1] < 20  # stopped early: every row reached </s>
    for row in out.tolist():
        end = row.index(EOS)
        assert all(t == 0 for t in row[end + 1:])


def test_sampling(model):
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    greedy = generate(model, ids, pixels, mask, max_new_tokens=8)
    nucleus_of_one = generate(model, ids, pixels, mask, max_new_tokens=8, temperature=1.0, top_p=1e-6)
    assert nucleus_of_one.tolist() == greedy.tolist()  # top-p this small keeps only the most likely token
    runs = [generate(model, ids, pixels, mask, max_new_tokens=8, temperature=5.0,
                     generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert runs[0].tolist() == runs[1].tolist()  # seeded: reproducible
    assert runs[0].tolist() != runs[2].tolist()  # hot sampling: a different seed differs
    assert runs[0].max() < model.cfg.text.vocab_size


def test_right_padding_is_refused(model):
    ids, pixels, mask = prompts()
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, pixels, mask.flip(-1))


def test_compiled_decode_step_emits_the_eager_tokens(model):
    """The decode step compiled (a CUDA graph on a GPU; inductor on this CPU) gives the same tokens,
    and the second call reuses the compiled step and its cache."""
    model.attn_backend = "flex"
    ids, pixels, mask = prompts()
    eager = generate(model, ids, pixels, mask, max_new_tokens=12)
    assert generate(model, ids, pixels, mask, max_new_tokens=12, compile_step=True).tolist() == eager.tolist()
    assert generate(model, ids, pixels, mask, max_new_tokens=12, compile_step=True).tolist() == eager.tolist()
    assert len(model._compiled_decoders) == 1


def test_compiled_blocks_give_the_same_logits(hf_checkpoint):
    m = tinyalign.load_model(hf_checkpoint[0])
    ids, pixels, mask = prompts()
    with torch.no_grad():
        before = m(ids, pixels, mask)
        m.language_model.compile_blocks()
        after = m(ids, pixels, mask)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
