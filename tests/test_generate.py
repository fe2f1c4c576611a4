"""KV-cache generation: the same tokens as argmax decoding without a cache, and as transformers."""

import pytest
import torch
from conftest import IMAGE_ID

import tinyalign
from tinyalign import generate
from tinyalign.speed.decoding import compiled_decoder, generate_stream
from tinyalign.speed.fused import fused_projections

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
            logits = model.lm_head(model.hidden_states(ids, pixels, mask, position_ids=positions))[:, -1]
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
    assert generate(model, ids, pixels, mask, max_new_tokens=12, decoder=compiled_decoder).tolist() == eager.tolist()
    assert generate(model, ids, pixels, mask, max_new_tokens=12, decoder=compiled_decoder).tolist() == eager.tolist()
    assert len(model._compiled_decoders) == 1


def test_compiled_blocks_give_the_same_logits(hf_checkpoint):
    from tinyalign.training import compile_blocks

    m = tinyalign.load_model(hf_checkpoint[0])
    ids, pixels, mask = prompts()
    with torch.no_grad():
        before = m(ids, pixels, mask)
        compile_blocks(m)
        after = m(ids, pixels, mask)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# -- shared-prefix sampling, keyed sampling, continuous batching (issue 15) ------------------------


def unpadded(ids, mask):
    """The prompts of a left-padded batch as (input_ids [T], pixel_values) pairs, one image each or none."""
    ids_, pixels, mask_ = ids, *prompts()[1:]
    del ids_, mask_
    images = iter(pixels)
    return [(row[m == 1], next(images)[None] if (row == IMAGE_ID).any() else None) for row, m in zip(ids, mask)]


def answers_of(out, eos=EOS):
    """Rows of generate's output cut after their </s> (as generate_stream returns them)."""
    rows = out.tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def test_num_samples_prefills_once_and_gives_the_repeated_prompts_answers(model):
    """generate(num_samples=n) = generate on each prompt repeated n times: greedy, and sampled with
    a seed (keyed noise: each row draws from its own key, so sharing the prefix changes nothing)."""
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    repeated = (ids.repeat_interleave(3, 0), pixels.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))
    calls = []
    hook = model.language_model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    try:
        shared = generate(model, ids, pixels, mask, max_new_tokens=10, temperature=3.0, seed=7, num_samples=3)
    finally:
        hook.remove()
    plain = generate(model, *repeated, max_new_tokens=10, temperature=3.0, seed=7)
    assert answers_of(shared) == answers_of(plain)
    assert calls[0] == (3, ids.shape[1], model.cfg.text.hidden_size)  # the prefill ran on 3 rows, not 9
    assert all(shape[:2] == (9, 1) for shape in calls[1:])  # then 9 rows decode one token at a time
    assert len({tuple(a) for a in answers_of(shared)[:3]}) > 1  # hot sampling: the 3 samples differ
    greedy = generate(model, ids, pixels, mask, max_new_tokens=10, num_samples=2)
    assert answers_of(greedy) == answers_of(generate(model, *[t.repeat_interleave(2, 0) for t in (ids, pixels, mask)],
                                                     max_new_tokens=10))


def test_a_keyed_sample_does_not_depend_on_the_rest_of_the_batch(model):
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    batch = generate(model, ids, pixels, mask, max_new_tokens=10, temperature=3.0, seed=11)
    alone = generate(model, ids[1:2, mask[1] == 1], max_new_tokens=10, temperature=3.0, seed=11)
    assert answers_of(batch)[1] != answers_of(alone)[0]  # alone it is row 0: another key, another draw
    rows = torch.tensor([1])  # the same key as row 1 of the batch
    from tinyalign.generate import row_keys, sample_next

    logits = torch.randn(1, 50)
    assert sample_next(logits, 1.0, 1.0, keys=row_keys(11, rows), steps=3) == \
        sample_next(torch.cat([torch.randn(4, 50), logits]), 1.0, 1.0, keys=row_keys(11, torch.tensor([0, 2, 3, 4, 1])),
                    steps=3)[-1]


def test_keyed_sampling_draws_from_softmax_with_top_k_and_top_p():
    """20,000 keyed draws (one per row key) against the exact probabilities after top-k and top-p:
    every kept token within 1% (absolute) of its probability, every dropped token never drawn."""
    from tinyalign.generate import row_keys, sample_next

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).expand(20000, -1)
    keys = row_keys(5, torch.arange(20000))
    for top_k, top_p in ((0, 1.0), (4, 1.0), (0, 0.8)):
        draws = sample_next(logits, 0.7, top_p, top_k=top_k, keys=keys, steps=0)
        probs = torch.softmax(logits[0] / 0.7, -1)
        keep = torch.ones(6, dtype=torch.bool)
        if top_k:
            keep[top_k:] = False
        if top_p < 1:
            keep = (probs.cumsum(0) - probs) < top_p
        expected = torch.where(keep, probs, 0.0) / probs[keep].sum()
        freq = torch.bincount(draws, minlength=6).double() / len(draws)
        assert (freq - expected).abs().max() < 0.01, (top_k, top_p, freq, expected)
        assert freq[~keep].sum() == 0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_continuous_batching_gives_the_plain_answers(model, backend):
    """Three prompts, two samples each, through 4 rows with different budgets: rows are refilled as
    answers finish, yet each answer is generate()'s (greedy) or generate(seed=...)'s row (sampled)."""
    model.attn_backend = backend
    ids, pixels, mask = prompts()
    items = unpadded(ids, mask)
    budgets = [12, 3, 7]
    for temperature in (0.0, 3.0):
        streamed = dict(generate_stream(model, items, num_samples=2, slots=4, max_new_tokens=budgets,
                                        temperature=temperature, seed=5))
        assert sorted(streamed) == [0, 1, 2]
        plain = answers_of(generate(model, ids, pixels, mask, max_new_tokens=12, temperature=temperature, seed=5,
                                    num_samples=2))
        for p in range(3):
            assert streamed[p] == [a[: budgets[p]] for a in plain[2 * p: 2 * p + 2]], (temperature, p)


def test_continuous_batching_refills_rows_as_answers_finish(model, monkeypatch):
    """One long answer (6 checks' worth of tokens) and five short ones (one check each) in 2 rows:
    the long answer keeps its row while the other row serves the five short ones in turn, so the run
    takes as many decode steps as the long answer alone. A static batch of 2 decodes 6C, then C, C."""
    import importlib

    from tinyalign.generate import CHECK_EVERY as C
    module = importlib.import_module("tinyalign.generate")
    model.attn_backend = "sdpa"
    ids, _, mask = prompts()
    text = unpadded(ids, mask)[1]
    steps = []
    real_step = module.decode_step
    monkeypatch.setattr(module, "decode_step", lambda m, cache: (lambda *a: steps.append(1) or real_step(m, cache)(*a)))
    finished = list(generate_stream(model, [text] * 6, slots=2, max_new_tokens=[6 * C] + [C] * 5, eos_token_id=-1))
    assert [p for p, _ in finished] == [1, 2, 3, 4, 5, 0]  # the short ones leave early, the long one last
    assert [len(a[0]) for _, a in finished] == [C] * 5 + [6 * C]
    assert len(steps) == 6 * C  # static batches of 2: 6C + C + C


def test_continuous_batching_with_the_compiled_step(model):
    model.attn_backend = "flex"
    ids, pixels, mask = prompts()
    items = unpadded(ids, mask)
    eager = dict(generate_stream(model, items, slots=2, max_new_tokens=9))
    assert dict(generate_stream(model, items, slots=2, max_new_tokens=9, compile_step=True)) == eager


def test_fused_projections_compute_the_same_and_keep_the_weights_in_place(hf_checkpoint, tmp_path):
    """Inside fused_projections, q/k/v (and gate/up) are one product over one weight whose row blocks
    are the layers' own weights (views: no second copy). Same logits; the checkpoint's names and a
    saved model are unchanged; after .to(dtype) the weights are fused again; LoRA layers stay apart."""
    from tinyalign.infra.weights import save_model
    from tinyalign.lora import apply_lora
    from tinyalign.speed.fused import _FUSED

    model = tinyalign.load_model(hf_checkpoint[0])
    model.attn_backend = "eager"
    ids, pixels, mask = prompts()
    names = sorted(model.state_dict())
    with torch.no_grad():
        separate = model(ids, pixels, mask)
        with fused_projections(model):
            fused = model(ids, pixels, mask)
            attn, mlp = model.language_model.layers[1].self_attn, model.language_model.layers[1].mlp
            fused_qkv, fused_gate_up = _FUSED[attn], _FUSED[mlp]
            assert "qkv" in vars(attn) and "gate_and_up" in vars(mlp)  # one product each, on these instances
            assert fused_qkv.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, 64)
            assert attn.q_proj.weight.data_ptr() == fused_qkv.data_ptr()
            assert attn.v_proj.weight.data_ptr() == fused_qkv[attn.q_proj.out_features + attn.k_proj.out_features].data_ptr()
            assert mlp.up_proj.weight.data_ptr() == fused_gate_up[mlp.gate_proj.out_features].data_ptr()
            assert fused_qkv.untyped_storage().nbytes() == fused_qkv.numel() * 4  # views, no copy
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    assert "qkv" not in vars(attn) and "gate_and_up" not in vars(mlp)  # only inside the block
    assert sorted(model.state_dict()) == names
    save_model(model, tmp_path / "m")
    again = tinyalign.load_model(tmp_path / "m")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    model.to(torch.float64)
    with torch.no_grad(), fused_projections(model):
        assert _FUSED[attn].dtype == torch.float64 and attn.q_proj.weight.data_ptr() == _FUSED[attn].data_ptr()
    with pytest.raises(RuntimeError, match="no gradient"):
        with fused_projections(model):
            pass
    apply_lora(model.language_model, r=2, alpha=4, dropout=0.0)
    with torch.no_grad(), fused_projections(model):
        assert "qkv" not in vars(attn) and "gate_and_up" not in vars(mlp)


def test_continuous_batching_refuses_what_it_cannot_do(model):
    ids, _, mask = prompts()
    items = unpadded(ids, mask)
    with pytest.raises(ValueError, match=r"max_new_tokens: 2 budgets for 3 prompts"):
        list(generate_stream(model, items, max_new_tokens=[4, 4]))
    with pytest.raises(ValueError, match=r"slots \(2\) must hold the 4 samples of one prompt"):
        list(generate_stream(model, items, num_samples=4, slots=2))
    assert list(generate_stream(model, [])) == []


def test_impossible_decoding_settings_are_refused_by_name(model):
    """Both paths refuse what no decoding can honour before touching the model (a budget of 0 tokens
    used to fail with an IndexError in the middle of annotate)."""
    ids, _, mask = prompts()
    items = unpadded(ids, mask)
    bad = [({"max_new_tokens": 0}, r"max_new_tokens must be at least 1, got 0"),
           ({"num_samples": 0}, r"num_samples must be at least 1, got 0"),
           ({"temperature": -0.5}, r"temperature must be at least 0 \(0: greedy\), got -0.5"),
           ({"temperature": float("nan")}, r"temperature must be at least 0 \(0: greedy\), got nan"),
           ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
           ({"top_k": -1}, r"top_k must be at least 0 \(0: off\), got -1")]
    for setting, message in bad:
        with pytest.raises(ValueError, match=message):
            generate(model, ids, attention_mask=mask, **setting)
        with pytest.raises(ValueError, match=message):
            list(generate_stream(model, items, **setting))
    with pytest.raises(ValueError, match=r"max_new_tokens must be at least 1, got 0"):  # one bad budget of three
        list(generate_stream(model, items, max_new_tokens=[4, 0, 4]))
