"""The demos: what train_sft.py, train_dpo.py and train_steerlm.py do without --model (one line to set
the demo up, one to report on it, so each script shows its method and nothing of the shapes world),
and the shapes world's own sampling, rating and exact-answer checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ..data import file_digest, read_jsonl
from ..generate import generate
from ..infra.files import write_atomic
from ..infra.run import append_metrics
from ..infra.weights import load_model
from ..losses import PREFERENCE_LOSSES
from ..model import random_model
from ..processor import Processor
from ..steer import steer_prompt
from .world import demo_config, demo_processor, make_world, rate_answer, rated_styles


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
                {"text": a, "scores": rate_answer(r["kind"], r["truth"], a)} for a in answers]})
    return write_atomic(out_path, "".join(json.dumps(r) + "\n" for r in records))


@torch.no_grad()
def greedy_answers(model, processor: Processor, questions: list[str], images: list, max_new_tokens: int = 24,
                   batch_size: int = 50) -> list[list[int]]:
    """Greedy answer ids (up to and including </s>) for each (question, image path or None for a
    text-only question)."""
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

REPO = Path(__file__).resolve().parents[2]  # where train_sft.py lives
DEMO_DATA = Path("runs/demo-data")  # relative to the working directory, as the scripts' --out is
DEMO_SFT = Path("runs/demo-sft")
# What the SteerLM demo asks for, and what a rater would give each kind of answer (`world.rate_answer`).
STEER_CONDITIONS = {
    "concise and correct": dict(helpfulness=4, correctness=4, coherence=4, complexity=1, verbosity=2),
    "verbose and correct": dict(helpfulness=3, correctness=4, coherence=4, complexity=2, verbosity=4),
    "concise and wrong": dict(helpfulness=0, correctness=0, coherence=4, complexity=1, verbosity=2),
}


def sft_start(args):
    """train_sft.py without --model: write the shapes world, point --data and --image-folder at it,
    and return a tiny LLaVA with random weights and the demo's processor."""
    print("No --model: running the built-in demo (a tiny LLaVA on the synthetic shapes world).")
    files = make_world(DEMO_DATA, seed=args.seed)
    args.data, args.image_folder = args.data or str(files["sft"]), args.image_folder or str(files["images"])
    return random_model(demo_config(), seed=args.seed, device=args.device), demo_processor(args.image_mode)


def sft_report(model, processor, args) -> dict:
    """Exact answers of the SFT demo's model on the held-out questions, printed and logged."""
    heldout = read_jsonl(DEMO_DATA / "heldout.jsonl")
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
    made_by = file_digest(start / "model.safetensors")
    model = None
    for i, split in enumerate(samples):
        sidecar = samples[split].with_name(samples[split].name + ".model")
        if not samples[split].exists() or not sidecar.exists() or sidecar.read_text().strip() != made_by:
            print(f"Sampling 4 answers per {split} prompt from the SFT model and rating them (the rule-based "
                  "annotator)...")
            model = model or load_model(start, device=args.device)
            sample_and_rate(model, demo_processor(), read_jsonl(prompts[split]), DEMO_DATA, samples[split],
                            seed=args.seed * 2 + i)  # a sampling stream of its own per split and seed
            write_atomic(sidecar, made_by + "\n")
    args.model, args.image_folder = str(start), args.image_folder or str(DEMO_DATA)
    args.data, args.eval_data = args.data or str(samples["train"]), args.eval_data or str(samples["held-out"])


def dpo_report(model, processor, args, start: dict, final: dict, n_pairs: int) -> dict:
    """The starting model and the trained one side by side on held-out data, printed as a table."""
    heldout = read_jsonl(DEMO_DATA / "heldout.jsonl")
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
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rated_styles(read_jsonl(DEMO_DATA / "prompts.jsonl"))))
        args.data = str(path)
    args.image_folder = args.image_folder or str(DEMO_DATA)


def steerlm_report(model, processor, args) -> dict:
    """Ask for each STEER_CONDITION on held-out questions: does the answer follow what was asked?"""
    heldout = read_jsonl(DEMO_DATA / "heldout.jsonl")
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
