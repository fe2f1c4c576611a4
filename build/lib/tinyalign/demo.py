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
`sample_and_rate` then does what the paper did with Gemini: the SFT model answers each prompt four
times (temperature 0.7), the annotator rates every answer, and the result is a scored-samples file
that `build_pairs` turns into DPO pairs.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers

from .config import LlavaConfig, TextConfig, VisionConfig
from .images import ImageProcessor
from .data import ATTRIBUTES
from .processor import SYSTEM_PROMPTS, Processor

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
        {"text": text, "scores": annotate(r["kind"], r["truth"], text)}
        for text in answer_styles(r["kind"], r["truth"], rng)]} for r in prompts]


def annotate(kind: str, right: str, text: str) -> dict:
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
    files["sft"].write_text(json.dumps(sft, indent=1))
    for key, records in [("prompts", prompts), ("heldout", heldout), ("heldout_prompts", heldout_prompts)]:
        files[key].write_text("".join(json.dumps(r) + "\n" for r in records))
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
    (folder / "pope" / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in pope))
    (folder / "mmbench_dev_shapes.tsv").write_text("\n".join(mmbench) + "\n")
    (folder / "preference_heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
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
    from .steer import STEER_TEMPLATES, steer_prompt  # SteerLM's conditioning words, digits 0-4 included

    for style in STEER_TEMPLATES:
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


def same_size_chunks(items: list, size: int):
    """-> (chunk, number of real items in it). When there is more than one chunk, the short last one is
    filled up with copies of its last item: every chunk then has one shape, and the compiled attention
    (specialised on the batch size) is built once instead of once more for the last chunk, which on a
    CPU costs more than generating the extra rows."""
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        real = len(chunk)
        if len(items) > size:
            chunk = chunk + [chunk[-1]] * (size - real)
        yield chunk, real


@torch.no_grad()
def sample_and_rate(model, processor: Processor, prompts: list[dict], image_folder, out_path, n: int = 4,
                    temperature: float = 0.7, batch_size: int = 64, seed: int = 0) -> Path:
    """The paper's data collection in miniature: n sampled answers per prompt, each rated by the
    rule-based annotator, written as a scored-samples JSONL file (`build_pairs` reads it)."""
    from .generate import generate

    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    records = []
    for chunk, real in same_size_chunks(prompts, batch_size):
        encoded = [processor.encode([{"from": "human", "value": r["prompt"]}]) for r in chunk]
        batch = processor.collate(encoded * n, padding_side="left")  # n copies of the chunk, one after another
        pixels = processor.images.batch([Path(image_folder) / r["image"] for r in chunk] * n)
        out = generate(model, batch["input_ids"].to(model.device), pixels.to(model.device),
                       batch["attention_mask"].to(model.device), max_new_tokens=24, temperature=temperature,
                       pad_token_id=processor.pad_token_id, generator=generator)
        texts = [processor.decode(row) for row in out]
        for j, r in enumerate(chunk[:real]):
            answers = [texts[k * len(chunk) + j] for k in range(n)]
            records.append({"id": r["id"], "image": r["image"], "prompt": r["prompt"], "responses": [
                {"text": a, "scores": annotate(r["kind"], r["truth"], a)} for a in answers]})
    out_path = Path(out_path)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out_path)
    return out_path


def read_heldout(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def greedy_answers(model, processor: Processor, questions: list[str], images: list, max_new_tokens: int = 24,
                   batch_size: int = 50) -> list[list[int]]:
    """Greedy answer ids (up to and including </s>) for each (question, image path or None for a
    text-only question)."""
    from .generate import generate

    model.eval()
    answers = []
    for chunk, real in same_size_chunks(list(zip(questions, images)), batch_size):
        prompts = [processor.encode([{"from": "human", "value": q}]) for q, _ in chunk]
        batch = processor.collate(prompts, padding_side="left")
        pictures = [image for _, image in chunk if image is not None]
        pixels = processor.images.batch(pictures).to(model.device) if pictures else None
        out = generate(model, batch["input_ids"].to(model.device), pixels,
                       batch["attention_mask"].to(model.device), max_new_tokens=max_new_tokens,
                       pad_token_id=processor.pad_token_id)
        for row in out[:real].tolist():
            answers.append(row[: row.index(processor.eos_token_id) + 1] if processor.eos_token_id in row else row)
    return answers


def exact_answer_accuracy(model, processor: Processor, heldout: list[dict], image_folder, prompt_key="prompt") -> float:
    """Fraction of held-out questions whose greedy answer is exactly the expected one (then </s>)."""
    answers = greedy_answers(model, processor, [r[prompt_key] for r in heldout],
                             [Path(image_folder) / r["image"] for r in heldout])
    targets = [processor.tokenize(r["answer"]) + [processor.eos_token_id] for r in heldout]
    return sum(a == t for a, t in zip(answers, targets)) / len(heldout)


# ---------------------------------------------------------------------------------------------
# What the training scripts call when run without --model: one line to set the demo up, one to
# report on it, so each script shows its method and nothing of the shapes world.
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent  # where train_sft.py lives
DEMO_DATA = Path("runs/demo-data")  # relative to the working directory, as the scripts' --out is
DEMO_SFT = Path("runs/demo-sft")
# What the SteerLM demo asks for, and what a rater would give each kind of answer (`annotate`).
STEER_CONDITIONS = {
    "concise and correct": dict(helpfulness=4, correctness=4, coherence=4, complexity=1, verbosity=2),
    "verbose and correct": dict(helpfulness=3, correctness=4, coherence=4, complexity=2, verbosity=4),
    "concise and wrong": dict(helpfulness=0, correctness=0, coherence=4, complexity=1, verbosity=2),
}


def sft_start(args):
    """train_sft.py without --model: write the shapes world, point --data and --image-folder at it,
    and return a tiny LLaVA with random weights and the demo's processor."""
    from .weights import random_model

    print("No --model: running the built-in demo (a tiny LLaVA on the synthetic shapes world).")
    files = make_world(DEMO_DATA, seed=args.seed)
    args.data, args.image_folder = args.data or str(files["sft"]), args.image_folder or str(files["images"])
    return random_model(demo_config(), seed=args.seed, device=args.device), demo_processor(args.image_mode)


def sft_report(model, processor, args) -> dict:
    """Exact answers of the SFT demo's model on the held-out questions, printed and logged."""
    from .training import append_metrics

    heldout = read_heldout(DEMO_DATA / "heldout.jsonl")
    accuracy = exact_answer_accuracy(model, processor, heldout, args.image_folder)
    print(f"exact-answer accuracy on {len(heldout)} held-out questions: {accuracy:.3f}")
    append_metrics(args.out, {"exact_answer_accuracy": accuracy, "questions": len(heldout)})
    return {"exact_answer_accuracy": accuracy}


def sft_model(seed: int, device: str) -> Path:
    """The SFT demo's model, the start of DPO and SteerLM; trained now (`python train_sft.py`, about
    two minutes) if it is not there yet."""
    if not (DEMO_SFT / "model" / "config.json").exists():
        print(f"No {DEMO_SFT / 'model'} yet: running the SFT demo first.")
        subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--seed", str(seed), "--device", device],
                       check=True)
    return DEMO_SFT / "model"


def dpo_start(args) -> None:
    """train_dpo.py without --model: start from the SFT demo's model and from that model's own rated
    samples (made now if missing): the paper's pipeline in miniature. Two sample files: the training
    prompts', and the held-out prompts' (about 500 held-out pairs, so the held-out reward accuracy is
    measured to about +-0.03). Fills --model, --data, --eval-data and --image-folder."""
    print("No --model: running the built-in demo (DPO on the shapes world, from the SFT demo's model).")
    start = sft_model(args.seed, args.device)
    samples = {"train": DEMO_SFT / "samples.jsonl", "held-out": DEMO_SFT / "samples_heldout.jsonl"}
    prompts = {"train": DEMO_DATA / "prompts.jsonl", "held-out": DEMO_DATA / "heldout_prompts.jsonl"}
    # Samples belong to the model that made them: a sidecar file names its weights' digest, and
    # samples made by another SFT model (an earlier demo run) are made anew.
    from .data import file_digest

    made_by = file_digest(start / "model.safetensors")
    model = None
    for i, split in enumerate(samples):
        sidecar = samples[split].with_name(samples[split].name + ".model")
        if not samples[split].exists() or not sidecar.exists() or sidecar.read_text().strip() != made_by:
            print(f"Sampling 4 answers per {split} prompt from the SFT model and rating them (the rule-based "
                  "annotator)...")
            from .weights import load_model

            model = model or load_model(start, device=args.device)
            sample_and_rate(model, demo_processor(), read_heldout(prompts[split]), DEMO_DATA, samples[split],
                            seed=args.seed * 2 + i)  # a sampling stream of its own per split and seed
            sidecar.write_text(made_by + "\n")
    args.model, args.image_folder = str(start), args.image_folder or str(DEMO_DATA)
    args.data, args.eval_data = args.data or str(samples["train"]), args.eval_data or str(samples["held-out"])


def dpo_report(model, processor, args, start: dict, final: dict, n_pairs: int) -> dict:
    """The starting model and the trained one side by side on held-out data, printed as a table."""
    from .losses import PREFERENCE_LOSSES
    from .weights import load_model

    heldout = read_heldout(DEMO_DATA / "heldout.jsonl")
    start_acc = exact_answer_accuracy(load_model(args.model, device=args.device), processor, heldout, args.image_folder)
    dpo_acc = exact_answer_accuracy(model, processor, heldout, args.image_folder)
    method = PREFERENCE_LOSSES[args.loss_type].paper.split(",")[0]  # "DPO", "SimPO", "ORPO", ...
    rows = [(f"held-out reward accuracy ({method}'s implicit reward), {n_pairs} pairs", "-",
             f"{final['rewards/accuracy']:.3f}"),
            ("held-out pair accuracy (log p chosen > log p rejected)", f"{start['logps/accuracy']:.3f}",
             f"{final['logps/accuracy']:.3f}"),
            (f"exact-answer accuracy, greedy, {len(heldout)} held-out questions", f"{start_acc:.3f}", f"{dpo_acc:.3f}")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'start (SFT)':>11}  {method:>7}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>11}  {b:>7}")
    return {"exact_answer_accuracy": dpo_acc, "start_exact_answer_accuracy": start_acc,
            "start_logps/accuracy": start["logps/accuracy"], "pairs": n_pairs, "questions": len(heldout)}


def steerlm_start(args) -> None:
    """train_steerlm.py without --model: start from the SFT demo's model, train on every answer style
    of each demo prompt rated by the annotator (a scored-samples file). Fills --model, --data and
    --image-folder."""
    print("No --model: running the built-in demo (SteerLM on the shapes world, from the SFT demo's model).")
    args.model = str(sft_model(args.seed, args.device))
    if not args.data:
        path = DEMO_DATA / "steer.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rated_styles(read_heldout(DEMO_DATA / "prompts.jsonl"))))
        args.data = str(path)
    args.image_folder = args.image_folder or str(DEMO_DATA)


def steerlm_report(model, processor, args) -> dict:
    """Ask for each STEER_CONDITION on held-out questions: does the answer follow what was asked?"""
    from .steer import steer_prompt
    from .training import append_metrics

    heldout = read_heldout(DEMO_DATA / "heldout.jsonl")
    images = [Path(args.image_folder) / r["image"] for r in heldout]
    results = {}
    print(f"\n{'asked for':<22} {'words per answer':>16} {'correct':>8}")
    for name, ratings in STEER_CONDITIONS.items():
        questions = [steer_prompt(r["prompt"], ratings, args.steer_template) for r in heldout]
        answers = [processor.decode(a) for a in greedy_answers(model, processor, questions, images)]
        words = sum(len(a.split()) for a in answers) / len(answers)
        correct = sum(a.startswith(r["answer"]) for a, r in zip(answers, heldout)) / len(answers)
        results[name] = {"words": words, "correct": correct}
        print(f"{name:<22} {words:>16.1f} {correct:>8.3f}")
    append_metrics(args.out, {"steering": results})
    return results


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/demo-bench"
    written = make_benchmarks(out)
    print("written:", ", ".join(str(p) for p in written.values()))
