"""The real LLaMA tokenizer, LLaVA-1.5's chat templates and label masks."""

import pytest
from conftest import LLAMA_TOKENIZER
from tokenizers import AddedToken, Tokenizer

from tinyalign import IGNORE_INDEX, Processor, SequenceTooLong

IMG = 32000  # llava-hf's <image> id; what Processor writes, 576 times per image


@pytest.fixture(scope="module")
def proc():
    return Processor(Tokenizer.from_file(str(LLAMA_TOKENIZER)), image_token_index=IMG, image_seq_length=576)


def test_reference_vectors(proc):
    """The 47 strings and the ids the original SentencePiece model gives for them."""
    folder = LLAMA_TOKENIZER.parent
    texts = (folder / "reference.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = (folder / "reference.out").read_text().split("\n")
    assert len(texts) == len(expected) == 47
    for text, line in zip(texts, expected):
        assert proc.tokenize(text) == [int(t) for t in line.split()], repr(text)


# ---------------------------------------------------------------------------------------------
# An independent oracle: LLaVA-1.5's own algorithm, restated. It renders the whole conversation
# string, tokenises it with `tokenizer_image_token` (chunks between <image> tags, each with the
# tokenizer's BOS, which is then dropped), and re-derives the masks round by round from the lengths
# of the tokenised pieces (`preprocess_v1`). Images are one sentinel there; the model later expands
# each into 576 features with ignored labels, which is what we compare against.
# ---------------------------------------------------------------------------------------------
SENTINEL = -200


def llava_tokenizer_image_token(text, tok):
    ids = [1]
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids.append(SENTINEL)
        ids += tok.encode(chunk).ids[1:]  # the post-processor adds BOS; LLaVA drops it after the first chunk
    return ids


def llava_preprocess_v1(conversation_text, tok):
    ids = llava_tokenizer_image_token(conversation_text, tok)
    labels = list(ids)
    cur = 1
    labels[0] = IGNORE_INDEX
    for rou in conversation_text.split("</s>"):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        assert len(parts) == 2
        round_len = len(llava_tokenizer_image_token(rou, tok))
        instruction_len = len(llava_tokenizer_image_token(parts[0] + " ASSISTANT: ", tok)) - 2
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids), "LLaVA would report a tokenization mismatch and mask the whole sample"
    out_ids, out_labels = [], []
    for i, label in zip(ids, labels):
        if i == SENTINEL:
            out_ids += [IMG] * 576
            out_labels += [IGNORE_INDEX] * 576
        else:
            out_ids.append(i)
            out_labels.append(label)
    return out_ids, out_labels


def llava_preprocess_multimodal(turns):
    """LLaVA's llava/train/train.py `preprocess_multimodal` (lines 318-321): in a turn with an image tag,
    every tag is taken out, the turn stripped, one tag put first followed by a newline, stripped again."""
    out = []
    for t in turns:
        value = t["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({**t, "value": value})
    return out


def llava_vicuna_v1_prompt(turns):
    """LLaVA's llava/conversation.py `get_prompt` for SeparatorStyle.TWO (lines 54-63) with
    `conv_vicuna_v1` (lines 242-252): system + " ", then "ROLE: message" + (" " or "</s>") per turn."""
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    text, seps = system + " ", [" ", "</s>"]
    for i, t in enumerate(llava_preprocess_multimodal(turns)):
        text += ("USER" if i % 2 == 0 else "ASSISTANT") + ": " + t["value"] + seps[i % 2]
    return text


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nIs there a cat in the picture?"}, {"from": "gpt", "value": "Yes."}],
    [  # multi-turn, the image tag written after the question (LLaVA moves it to the front)
        {"from": "human", "value": "What is on the table? <image>"},
        {"from": "gpt", "value": "A cup of coffee, with latte art shaped like a heart."},
        {"from": "human", "value": "Is it hot?\nAnswer in one word."},
        {"from": "gpt", "value": "Probably"},
        {"from": "human", "value": "Why do you think so?"},
        {"from": "gpt", "value": "There is steam 🌫️ above it, and the foam still looks fresh: 2 reasons."},
    ],
    [  # text only
        {"from": "human", "value": "Write a haiku about llamas."},
        {"from": "gpt", "value": "Soft wool on the hills,\n  quiet eyes watch the clouds pass,\nchewing on the wind."},
    ],
    [  # a human turn that is only the image: stripped by LLaVA, so no newline token after it
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A cat asleep on a sofa."},
    ],
]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["single", "multi-turn", "text-only", "image-only-turn"])
def test_conversation_ids_and_labels_match_llava_preprocessing(proc, turns):
    tok = Tokenizer.from_file(str(LLAMA_TOKENIZER))
    encoded = proc.encode(turns)
    assert proc.render(turns) == llava_vicuna_v1_prompt(turns)
    expected_ids, expected_labels = llava_preprocess_v1(llava_vicuna_v1_prompt(turns), tok)
    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels


def test_exact_positions_of_a_two_round_conversation(proc):
    turns = [{"from": "human", "value": "<image>\nIs there a cat?"}, {"from": "gpt", "value": "Yes"},
             {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Gray"}]
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert proc.render(turns) == f"{system} USER: <image>\nIs there a cat? ASSISTANT: Yes</s>USER: What color? ASSISTANT: Gray</s>"
    e = proc.encode(turns)
    n_sys = len(proc.tokenize(system + " USER: "))  # ends in a lone "▁" (29871), as LLaVA's chunk does
    ids, labels = e.input_ids, e.labels
    assert ids[0] == 1 and ids[n_sys - 3:n_sys + 1] == [3148, 1001, 29901, 29871]  # "▁US" "ER" ":" "▁"
    image_start = 1 + n_sys
    assert ids[image_start:image_start + 576] == [IMG] * 576 and ids[image_start + 576] != IMG
    after = image_start + 576
    # "\nIs there a cat? ASSISTANT:" -> "▁" "\n" "Is" "▁there" "▁a" "▁cat" "?" "▁A" "SS" "IST" "ANT" ":"
    assert ids[after:after + 12] == [29871, 13, 3624, 727, 263, 6635, 29973, 319, 1799, 9047, 13566, 29901]
    first_answer = after + 12
    assert ids[first_answer:first_answer + 2] == [3869, 2]  # "▁Yes" "</s>"
    second_prompt = first_answer + 2
    # "USER: What color? ASSISTANT:" after </s> gets its own "▁": "▁US" "ER" ":" "▁What" "▁color" "?" ...
    assert ids[second_prompt:second_prompt + 6] == [3148, 1001, 29901, 1724, 2927, 29973]
    second_answer = len(ids) - 2
    assert ids[second_answer - 1:] == [29901, 18956, 2]  # ":" "▁Gray" "</s>"
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert supervised == [first_answer, first_answer + 1, second_answer, second_answer + 1]
    assert all(labels[i] == ids[i] for i in supervised)


def test_templates_and_generation_prompt(proc):
    p = proc.prompt("Describe the image.")
    # Two spaces: the lone "▁" before the image and the "▁" SentencePiece puts before "\n" after it.
    assert proc.decode(p.input_ids).endswith("USER:  \nDescribe the image. ASSISTANT:")
    assert p.input_ids[-1] == 29901 and p.num_images == 1 and p.num_supervised == 0
    llava = Processor(proc.tokenizer, image_token_index=IMG, image_seq_length=576, template="llava_v1")
    assert llava.render([{"from": "human", "value": "Hi"}]).startswith("A chat between a curious human ")
    assert "the human's questions. USER: Hi ASSISTANT:" in llava.render([{"from": "human", "value": "Hi"}])
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        Processor(proc.tokenizer, template="chatml")


def test_two_images_stay_in_place(proc):
    turns = [{"from": "human", "value": "Compare <image> with <image> please."}, {"from": "gpt", "value": "Same."}]
    e = proc.encode(turns)
    assert e.num_images == 2 and e.input_ids.count(IMG) == 1152
    assert "USER: Compare <image> with <image> please. ASSISTANT:" in proc.render(turns)


def test_bad_conversations_are_named(proc):
    with pytest.raises(ValueError, match=r"sample 7: turn 1 is from 'human'; turns must alternate"):
        proc.encode([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], where="sample 7")
    with pytest.raises(ValueError, match=r"turn 0 is from 'gpt'"):
        proc.encode([{"from": "gpt", "value": "a"}])
    with pytest.raises(ValueError, match=r"turn 0 has no text 'value'"):
        proc.encode([{"from": "human"}])


def test_truncation_never_cuts_an_image(proc):
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A long answer " * 20}]
    full = proc.encode(turns)
    image_end = max(i for i, t in enumerate(full.input_ids) if t == IMG) + 1
    with pytest.raises(SequenceTooLong, match=r"record 3: .* would cut into an image"):
        proc.encode(turns, max_length=image_end - 1, where="record 3")
    with pytest.raises(SequenceTooLong, match="would leave no answer token"):
        proc.encode(turns, max_length=image_end + 5)
    cut = proc.encode(turns, max_length=len(full.input_ids) - 10)
    assert cut.input_ids == full.input_ids[:-10] and cut.labels == full.labels[:-10] and cut.num_supervised > 0


def test_collate_pads_right_for_training_and_left_for_generation(proc):
    a, b = proc.encode(CONVERSATIONS[2]), proc.prompt("Hi", num_images=0)
    right = proc.collate([a, b])
    n = len(a.input_ids) - len(b.input_ids)
    assert right["input_ids"][1, -n:].tolist() == [0] * n and right["labels"][1, -n:].tolist() == [IGNORE_INDEX] * n
    assert right["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    left = proc.collate([a, b], padding_side="left")
    assert left["input_ids"][1, n:].tolist() == b.input_ids and left["attention_mask"][1, :n].sum() == 0


def test_image_only_turn_has_no_newline_token(proc):
    """LLaVA strips the turn after moving the tag first: "<image>" alone is the image and then " ASSISTANT:"."""
    ids = proc.encode([{"from": "human", "value": "<image>"}]).input_ids
    after = max(i for i, t in enumerate(ids) if t == IMG) + 1
    assert 13 not in ids[after:]  # 13: "<0x0A>", the newline piece
    assert proc.decode(ids).endswith("USER:   ASSISTANT:")


CONTROL = {"</s>": 2, "<s>": 1, "<unk>": 0, "<image>": IMG}


@pytest.fixture(scope="module")
def llava_hf_proc():
    """The tokenizer as llava-hf checkpoints ship it: <image> = 32000 and <pad> = 32001 added as special
    tokens, so the plain tokenizer *would* turn the text "<image>" into the image id."""
    tok = Tokenizer.from_file(str(LLAMA_TOKENIZER))
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    assert tok.encode("<image>", add_special_tokens=False).ids[-1] == IMG
    return Processor(tok, image_token_index=IMG, image_seq_length=576)


@pytest.mark.parametrize("literal", list(CONTROL))
def test_text_never_becomes_a_control_token(llava_hf_proc, literal):
    """A literal "</s>", "<s>", "<unk>" or "<image>" in a question or an answer is tokenised as its
    characters: the control ids come only from the template (BOS first, EOS after each answer) and
    from the images actually given."""
    proc = llava_hf_proc
    assert CONTROL[literal] in proc.tokenizer.encode(literal, add_special_tokens=False).ids  # the trap
    as_text = proc.tokenize(f"Type {literal} here")
    assert CONTROL[literal] not in as_text and len(as_text) > 3
    answer = f"Write {literal} at the end."
    turns = [{"from": "human", "value": f"<image>\nWhat does {literal} mean?"}, {"from": "gpt", "value": answer}]
    e = proc.encode(turns, num_images=1)
    assert e.num_images == 1 and e.input_ids.count(IMG) == 576
    assert e.input_ids.count(1) == 1 and e.input_ids[0] == 1  # BOS only first
    assert e.input_ids.count(2) == 1 and e.input_ids[-1] == 2  # EOS only after the answer
    assert proc.tokenize(answer) == [i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX][:-1]
    assert proc.decode(e.input_ids[-len(as_text) - 8:]).count(literal) == 1  # decodes back to the text
    prompt = proc.prompt(f"Explain {literal}.")  # the question of a generation prompt is text too
    assert prompt.input_ids.count(IMG) == 576 and prompt.input_ids.count(1) == 1 and 2 not in prompt.input_ids


def test_training_records_keep_their_image_tags_as_markers(proc):
    """In LLaVA's data format a human turn's `<image>` is the image marker: with no count given every
    tag is one (a record with more tags than image files is refused by the data readers)."""
    turns = [{"from": "human", "value": "<image>\nCompare with <image>"}, {"from": "gpt", "value": "Same."}]
    assert proc.encode(turns).num_images == 2
    assert proc.encode(turns, num_images=1).num_images == 1  # the second tag is text
    assert "Compare with <image> ASSISTANT:" in proc.render(turns, num_images=1)
