"""The embedded demo: a synthetic "shapes" world and a tiny LLaVA, so every script runs on a laptop.

Each image (56 x 56) holds one to three copies of one shape in one colour, placed in the cells of a
2 x 2 grid. Questions ask for the colour, the shape, the count, or whether a given cell is filled;
the world knows the truth, so a rule-based annotator can rate any answer on the paper's five
attributes (helpfulness, correctness, coherence, complexity, verbosity; 0-4 each).

The SFT data is noisy the way real instruction data is: some answers are plain wrong, and some
mistakes are systematic (its annotators often call yellow "green", triangles "squares", three
"two"). A model fine-tuned on it learns those mistakes; the ratings know the truth, so preference
pairs built from them can unlearn them. That is the demo's small version of the paper's story.

Files written (the formats of the real data, so the demo exercises the real readers):
  images/NNNNN.png, sft.json (LLaVA conversations), prompts.jsonl (questions for preference data,
  with the truth the annotator needs), heldout_prompts.jsonl (more such questions, never trained on:
  the DPO demo samples and rates them the same way to get its held-out pairs), heldout.jsonl
  (questions with the exact expected answer).
`demo.runs.sample_and_rate` then does what the paper did with Gemini: the SFT model answers each
prompt four times (temperature 0.7), the rule-based annotator (`rate_answer` below) rates every answer, and the
result is a scored-samples file that `build_pairs` turns into DPO pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers

from ..config import LlavaConfig, TextConfig, VisionConfig
from ..data import ATTRIBUTES
from ..images import ImageProcessor
from ..infra.files import write_atomic
from ..processor import SYSTEM_PROMPTS, Processor
from ..steer import STEER_TEMPLATES, steer_prompt

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = {"square": "squares", "circle": "circles", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
CELLS = ["top left", "top right", "bottom left", "bottom right"]
IMAGE_SIZE = 56
VERBOSE_TAIL = "It is easy to see in the picture , which has a plain white background ."
EVASIVE = "I am not sure ."


@dataclass
class Scene:
    color: str
    shape: str
    cells: list[int]  # which of the four cells hold a shape

    @property
    def count(self) -> int:
        return len(self.cells)


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLORS)), rng.choice(list(SHAPES)), sorted(rng.sample(range(4), rng.randint(1, 3))))


def draw(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for cell in scene.cells:
        x0, y0 = (cell % 2) * half + 2, (cell // 2) * half + 2
        box = (x0, y0, x0 + half - 4, y0 + half - 4)
        fill = COLORS[scene.color]
        if scene.shape == "square":
            pen.rectangle(box, fill=fill)
        elif scene.shape == "circle":
            pen.ellipse(box, fill=fill)
        else:
            pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image


# ---------------------------------------------------------------------------------------------
# Questions, answers and the rule-based annotator
# ---------------------------------------------------------------------------------------------

KINDS = ("color", "shape", "count", "where")
# The SFT data's systematic mistakes, and how often they happen.
CONFUSIONS = {("color", "yellow"): "green", ("shape", "triangle"): "square", ("count", "three"): "two"}
CONFUSION_RATE = 0.6
SFT_ANSWER_NOISE = 0.1  # and how often an SFT answer is simply, randomly wrong


def question(kind: str, cell: int = 0) -> str:
    return {"color": "What color are the shapes ?", "shape": "What shape do you see ?",
            "count": "How many shapes are there ?", "where": f"Is there a shape at the {CELLS[cell]} ?"}[kind]


def truth(scene: Scene, kind: str, cell: int = 0) -> str:
    return {"color": scene.color, "shape": scene.shape, "count": NUMBERS[scene.count],
            "where": "yes" if cell in scene.cells else "no"}[kind]


def say(kind: str, value: str) -> str:
    """The one correct, concise way to give `value` as an answer."""
    if kind == "color":
        return f"The color is {value} ."
    if kind == "shape":
        return f"They are {SHAPES[value]} ."
    if kind == "count":
        return "There is one shape ." if value == "one" else f"There are {value} shapes ."
    return "Yes , there is ." if value == "yes" else "No , there is not ."


def value_of(kind: str, answer: str) -> str:
    """The value a correct, concise answer gives (inverse of `say`)."""
    for value in wrong_values(kind, ""):
        if say(kind, value) == answer:
            return value
    raise ValueError(f"{answer!r} is not a {kind} answer of the shapes world")


def wrong_values(kind: str, right: str) -> list[str]:
    options = {"color": list(COLORS), "shape": list(SHAPES), "count": list(NUMBERS.values()), "where": ["yes", "no"]}
    return [v for v in options[kind] if v != right]


def sft_answer_value(kind: str, right: str, rng: random.Random, noise: float) -> str:
    """The value an SFT annotator writes: sometimes a random mistake, sometimes a systematic one."""
    if rng.random() < noise:
        return rng.choice(wrong_values(kind, right))
    if (kind, right) in CONFUSIONS and rng.random() < CONFUSION_RATE:
        return CONFUSIONS[(kind, right)]
    return right


def answer_styles(kind: str, right: str, rng: random.Random) -> list[str]:
    """Answers of every quality, for SteerLM to learn what each rating means: correct, correct and
    verbose, wrong, wrong and verbose, garbled, evasive."""
    wrong = CONFUSIONS.get((kind, right)) or rng.choice(wrong_values(kind, right))
    words = say(kind, right).split()
    rng.shuffle(words)
    return [say(kind, right), f"{say(kind, right)} {VERBOSE_TAIL}", say(kind, wrong), f"{say(kind, wrong)} {VERBOSE_TAIL}",
            " ".join(words), EVASIVE]


def rated_styles(prompts: list[dict], seed: int = 0) -> list[dict]:
    """Scored-samples records: each prompt with every answer style, rated by the annotator."""
    rng = random.Random(seed)
    return [{"id": r["id"], "image": r["image"], "prompt": r["prompt"], "responses": [
        {"text": text, "scores": rate_answer(r["kind"], r["truth"], text)}
        for text in answer_styles(r["kind"], r["truth"], rng)]} for r in prompts]


def rate_answer(kind: str, right: str, text: str) -> dict:
    """Rate an answer 0-4 on the five attributes, knowing the truth."""
    correct_start = text.startswith(say(kind, right))
    is_wrong = any(text.startswith(say(kind, w)) for w in wrong_values(kind, right))
    coherent = correct_start or is_wrong or text == EVASIVE
    n_words = len(text.split())
    verbose = VERBOSE_TAIL in text
    return {
        "helpfulness": (3 if verbose else 4) if correct_start else (1 if text == EVASIVE or not coherent else 0),
        "correctness": 4 if correct_start else (2 if text == EVASIVE or not coherent else 0),
        "coherence": 4 if coherent else 1,
        "complexity": 2 if verbose else 1,
        "verbosity": 1 if n_words <= 4 else 2 if n_words <= 8 else 3 if n_words <= 16 else 4,
    }


# ---------------------------------------------------------------------------------------------
# Writing the world to disk
# ---------------------------------------------------------------------------------------------


# Sizes chosen for the demos' headline figures to hold across seeds and machines (README, "The
# demo"): 1,200 held-out prompts give about 500 held-out DPO pairs (95% interval of a reward accuracy
# near 0.9: about +-0.03), and 600 held-out questions an exact-answer accuracy to about +-0.03.
def make_world(folder, seed: int = 0, n_sft: int = 4000, n_prompts: int = 1500, n_heldout: int = 600,
               n_heldout_prompts: int = 1200, sft_noise: float = SFT_ANSWER_NOISE) -> dict:
    """Write images and the data files; return their paths. SFT answers are randomly wrong with
    probability `sft_noise`, on top of the systematic CONFUSIONS."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {k: folder / name for k, name in [("sft", "sft.json"), ("prompts", "prompts.jsonl"),
                                              ("heldout", "heldout.jsonl"), ("heldout_prompts", "heldout_prompts.jsonl")]}
    sft, prompts, heldout, heldout_prompts = [], [], [], []
    first_heldout_prompt = n_sft + n_prompts + n_heldout
    for i in range(first_heldout_prompt + n_heldout_prompts):
        scene, kind, cell = random_scene(rng), rng.choice(KINDS), rng.randrange(4)
        image = f"images/{i:05d}.png"
        draw(scene).save(folder / image)
        right = truth(scene, kind, cell)
        prompt = "<image>\n" + question(kind, cell)
        if i < n_sft:
            answer = say(kind, sft_answer_value(kind, right, rng, sft_noise))
            sft.append({"id": f"sft-{i}", "image": image, "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
        elif i < n_sft + n_prompts:
            prompts.append({"id": f"prompt-{i}", "image": image, "prompt": prompt, "kind": kind, "truth": right})
        elif i < first_heldout_prompt:
            heldout.append({"id": f"heldout-{i}", "image": image, "prompt": prompt, "answer": say(kind, right),
                            "kind": kind})
        else:
            heldout_prompts.append({"id": f"heldout-prompt-{i}", "image": image, "prompt": prompt, "kind": kind,
                                    "truth": right})
    write_atomic(files["sft"], json.dumps(sft, indent=1))
    for key, records in [("prompts", prompts), ("heldout", heldout), ("heldout_prompts", heldout_prompts)]:
        write_atomic(files[key], "".join(json.dumps(r) + "\n" for r in records))
    files["images"] = folder
    return files


def make_benchmarks(folder, seed: int = 7, n: int = 100) -> dict:
    """Shapes-world questions in the exact file formats eval.py reads, so it runs on the demo models
    on a CPU: POPE (yes/no: "is there a shape at the ... ?"), MMBench (a TSV with base64 images;
    colour, shape and count as multiple choice, each question also in its circular rows index + k *
    1e6 with the options rotated, as the released files are) and held-out preference pairs (the right
    answer chosen, a wrong one, the SFT data's usual mistake where there is one, rejected)."""
    import base64
    import io

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "pope").mkdir(exist_ok=True)
    rng = random.Random(seed)
    pope, pairs = [], []
    mmbench = ["\t".join(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"])]
    options = {"color": list(COLORS), "shape": list(SHAPES), "count": list(NUMBERS.values())}
    for i in range(n):
        scene, cell = random_scene(rng), rng.randrange(4)
        image = draw(scene)
        name = f"images/bench-{i:04d}.png"
        image.save(folder / name)
        pope.append({"question_id": i, "image": name, "text": question("where", cell), "label": truth(scene, "where", cell)})
        kind = ("color", "shape", "count")[i % 3]
        right = truth(scene, kind)
        wrong = CONFUSIONS.get((kind, right)) or rng.choice(wrong_values(kind, right))
        pairs.append({"id": f"pair-{i}", "image": name, "prompt": "<image>\n" + question(kind),
                      "chosen": say(kind, right), "rejected": say(kind, wrong)})
        png = io.BytesIO()
        image.save(png, format="PNG")
        encoded = base64.b64encode(png.getvalue()).decode()
        for shift in range(len(options[kind])):  # circular rows: the options rotated by `shift`
            rotated = options[kind][shift:] + options[kind][:shift]
            answer = "ABCD"[rotated.index(truth(scene, kind))]
            mmbench.append("\t".join([str(i + shift * 1_000_000), question(kind), "",
                                      *(rotated + [""] * (4 - len(rotated))), answer, kind, encoded, "shapes"]))
    write_atomic(folder / "pope" / "coco_pope_random.json", "".join(json.dumps(r) + "\n" for r in pope))
    write_atomic(folder / "mmbench_dev_shapes.tsv", "\n".join(mmbench) + "\n")
    write_atomic(folder / "preference_heldout.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    return {"pope_dir": folder / "pope", "image_folder": folder, "mmbench": folder / "mmbench_dev_shapes.tsv",
            "pairs": folder / "preference_heldout.jsonl"}


# ---------------------------------------------------------------------------------------------
# The tiny model and its word-level tokenizer
# ---------------------------------------------------------------------------------------------


def demo_vocabulary(extra_texts: tuple[str, ...] = ()) -> list[str]:
    """Every word of the world's questions, answers and prompts (and of `extra_texts`, for a model
    taught more than the shapes world: the irrelevant-image ablation's text-only task)."""
    words = set()
    texts = list(SYSTEM_PROMPTS.values()) + ["USER : ASSISTANT :", VERBOSE_TAIL, EVASIVE, *extra_texts]
    for kind in KINDS:
        texts += [question(kind, c) for c in range(4)]
        for value in ["red", "green", "blue", "yellow", "square", "circle", "triangle", "one", "two", "three",
                      "yes", "no"]:
            try:
                texts.append(say(kind, value))
            except KeyError:
                pass
    for style in STEER_TEMPLATES:  # SteerLM's conditioning words, digits 0-4 included
        texts += [steer_prompt("", {a: v for a in ATTRIBUTES}, style) for v in range(5)]
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    return ["<unk>", "<s>", "</s>"] + sorted(words) + ["<image>", "<pad>"]


def demo_tokenizer(extra_texts: tuple[str, ...] = ()) -> Tokenizer:
    """Whole words and punctuation: enough for this world, and readable when decoded."""
    vocab = {w: i for i, w in enumerate(demo_vocabulary(extra_texts))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    return tokenizer


def demo_processor(image_mode: str = "pad", extra_texts: tuple[str, ...] = ()) -> Processor:
    tokenizer = demo_tokenizer(extra_texts)
    vision = demo_config().vision
    return Processor(tokenizer, image_token_index=tokenizer.token_to_id("<image>"),
                     image_seq_length=vision.num_patches, images=ImageProcessor(size=vision.image_size, mode=image_mode))


def demo_config(extra_texts: tuple[str, ...] = ()) -> LlavaConfig:
    vocab = len(demo_vocabulary(extra_texts))
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=IMAGE_SIZE,
                            patch_size=14),
        text=TextConfig(vocab_size=-(-vocab // 64) * 64, hidden_size=128, intermediate_size=384, num_layers=3,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512, pad_token_id=vocab - 1),
        image_token_index=vocab - 2,
    )
