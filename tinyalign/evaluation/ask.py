"""Ask a checkpoint one question about an image (or none), from the command line.

    python -m tinyalign.evaluation.ask --model DIR --image photo.jpg --prompt "What is this?" [--steer ...]

With --steer (a SteerLM checkpoint), the ratings are written into the question the way
train_steerlm.py wrote them in training.
"""

from __future__ import annotations

import argparse

import torch

from ..generate import generate
from ..infra.arguments import at_least, non_negative, number, resolve_models
from ..infra.weights import load_model
from ..processor import Processor
from ..speed.fused import fused_projections
from ..steer import STEER_TEMPLATES, parse_steer, steer_prompt


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer one question about an image with a LLaVA-1.5 checkpoint.")
    p.add_argument("--model", required=True, help="checkpoint folder, or Hugging Face repo id in the local cache "
                   "(llava-hf/llava-1.5-7b-hf)")
    p.add_argument("--revision", help="--model's branch, tag or commit in the Hugging Face cache (default: main)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", help="image file (omit for a text-only question)")
    p.add_argument("--vision-tower", help="CLIP folder or repo id, for original LLaVA checkpoints")
    p.add_argument("--steer", help="SteerLM ratings to ask for, e.g. helpfulness:4,correctness:4,coherence:4,"
                                   "complexity:2,verbosity:2")
    p.add_argument("--steer-template", choices=sorted(STEER_TEMPLATES), default="tinyalign")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    resolve_models(p, args)  # repo ids -> their folders in the Hugging Face cache
    question = args.prompt
    if args.steer:
        question = steer_prompt(question, parse_steer(args.steer), args.steer_template)
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
    processor = Processor.from_pretrained(args.model, vision_tower=args.vision_tower)
    encoded = processor.prompt(question, num_images=1 if args.image else 0)
    pixels = processor.images.batch([args.image]).to(model.device) if args.image else None
    ids = torch.tensor([encoded.input_ids], device=model.device)
    with torch.no_grad(), fused_projections(model):  # q/k/v and gate/up: one product each while decoding
        out = generate(model, ids, pixels, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    answer = processor.decode(out[0])
    print(answer)
    return answer


if __name__ == "__main__":
    main()
