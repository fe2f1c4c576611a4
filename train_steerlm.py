"""SteerLM for LLaVA-1.5 (Li, Lin & Pei 2024, section 3.3; Dong et al. 2023, arXiv 2310.05344).

    python train_steerlm.py                                   # the built-in demo, from the SFT demo's model
    python train_steerlm.py --model llava-1.5-13b-hf --data scored.jsonl --image-folder images/ --out runs/steerlm

Attribute-conditioned SFT: every rated answer is a training example, with its own five ratings
written into the prompt (`helpfulness:4,correctness:3,...`, see tinyalign/steer.py for the exact
text). The model learns what each rating means; at inference the ratings you want are written in
(`--steer` in eval.py and in generation). Same loss and loop as SFT (train_sft.train); paper defaults:
LoRA r128/alpha256 at lr 4e-4, projector at 2e-5, 3 epochs.
"""

from __future__ import annotations

from tinyalign import Processor, demo, load_model
from tinyalign.data import Conversation, read_scored
from tinyalign.steer import STEER_TEMPLATES, check_ratings, steer_prompt
from tinyalign.infra.arguments import common_arguments, parse_recipe
from tinyalign.infra.processes import finish_distributed, init_distributed
from tinyalign.training import seed_everything, split_held_out

import train_sft  # SteerLM is SFT on rated answers: the same loss and loop (train_sft.train)

PAPER = dict(train_sft.PAPER)
DEMO = dict(epochs=2, batch_size=16, grad_accum=1, lr=1e-3, projector_lr=1e-3, lora_r=32, lora_alpha=64,
            max_length=256, eval_every=100, save_every=200, eval_fraction=0.05, out="runs/demo-steerlm",
            packing=False)


def parse(argv=None):
    parser = common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--steer-template", choices=sorted(STEER_TEMPLATES), default="tinyalign",
                        help="how the ratings are written into the prompt (tinyalign, or the authors' wording)")
    args = parse_recipe(parser, argv, PAPER, DEMO)
    args.select = "all"
    if args.out is None:
        parser.error("--out is required with --model")
    return args


def steer_conversations(path, style: str) -> list[Conversation]:
    """Scored samples -> one conversation per rated answer, its ratings written into the question."""
    scored, report = read_scored(path)
    print(report.summary())
    out = []
    for s in scored:
        for j, (text, scores) in enumerate(s.responses):
            if not text.strip():
                continue
            ratings = check_ratings(scores, f"{path} record {s.id} response {j}")
            question = steer_prompt(s.prompt, ratings, style)
            out.append(Conversation(f"{s.id}-{j}", s.images, [{"from": "human", "value": question},
                                                              {"from": "gpt", "value": text}]))
    return out


def main(argv=None):
    args = parse(argv)
    rank, world = init_distributed(args)
    if args.demo:
        demo.steerlm_start(args)  # no --model: the SFT demo's model, every answer style rated (tinyalign/demo/)
    seed_everything(args.seed)  # after the demo's setup (which may train the SFT demo first): the same draw either way
    model = load_model(args.model, device=args.device, vision_tower=args.vision_tower)
    processor = Processor.from_pretrained(args.model, template=args.template, image_mode=args.image_mode,
                                          vision_tower=args.vision_tower)
    records = steer_conversations(args.data, args.steer_template)
    if args.eval_data:
        train_records, held_records = records, steer_conversations(args.eval_data, args.steer_template)
    else:
        train_records, held_records = split_held_out(records, args.eval_fraction, args.seed)
    final = train_sft.train(args, model, processor, train_records, held_records, rank, world)
    if args.demo and rank == 0:
        final["steering"] = demo.steerlm_report(model, processor, args)
    finish_distributed(world)
    return final


if __name__ == "__main__":
    main()
