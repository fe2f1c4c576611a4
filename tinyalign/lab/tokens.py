"""DPO's implicit reward, token by token: where the preference lives.

    python -m tinyalign.lab.tokens                  # after the demo: runs/demo-dpo/model against runs/demo-sft/model
    python -m tinyalign.lab.tokens --policy runs/demo-dpo/snapshots/step-50 --policy runs/demo-dpo/model
    python -m tinyalign.lab.tokens --policy P --reference R --pairs PAIRS --image-folder IMAGES --out FOLDER

DPO's implicit reward of an answer (Rafailov et al. 2023, arXiv 2305.18290, eq. 5) is a sum over its
tokens,

    r(x, y) = beta * log pi(y|x) / pi_ref(y|x) = sum_t beta * [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)],

so every token carries its own part of it, and the margin r(x, y_w) - r(x, y_l) that the loss pushes
up is a sum of token parts too. Training logs only the sums (train_dpo.py, `reward_metrics`); this
command writes a static page (FOLDER/index.html, no server) that shows the parts: each token of the
chosen and the rejected answer of held-out pairs coloured by its reward (green up, red down; on
request by log pi or log pi_ref), with the totals and the margin, and the same pair shown the next
pair's image beside it (mDPO's "unconditional" test: a preference that ignores the image keeps its
margin there). Above the pairs, `margin_split` says how much of the margin sits on the tokens where
the two answers differ and how much on the tokens they share.

Several --policy give one column each (a run's snapshots, `--snapshot-every`, then its final model).
The same code runs a full-size model on a GPU (--device cuda, batched like training, --packing).
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from ..data import load_pairs, pair_examples
from ..hub import model_folder
from ..infra.arguments import at_least
from ..infra.files import write_atomic
from ..infra.weights import load_model
from ..losses import token_logps
from ..batches import PairBatch
from ..packing import pair_batch
from ..processor import Processor
from .page import CHECK_IMAGES, picture, question_text

PICTURES = "token-images"

# ---------------------------------------------------------------------------------------------
# Per-token log-probs: the terms whose sums training uses
# ---------------------------------------------------------------------------------------------


def decoder_output(model, inputs: dict) -> torch.Tensor:
    """The decoder's states [R, L, D] for a batch's inputs, images handled as Llava.forward does
    (the tower once per image, its features repeated for the chosen and the rejected rows)."""
    pixels, copies = inputs.get("pixel_values"), inputs.get("repeat_images", 1)
    features = None
    if pixels is not None and copies > 1:
        features, pixels = torch.cat([model.image_features(pixels)] * copies), None
    return model.hidden_states(inputs["input_ids"], pixels, inputs.get("attention_mask"), image_features=features,
                               packed=inputs.get("packed"))


@torch.no_grad()
def answer_token_logps(model, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each answer of a batch, in the order the forward returns them (PairBatch: the chosen ones
    first): (token ids [n], log p(token | everything before it) [n]), the answer's tokens in order.
    Summed, each gives what `model(**batch.inputs)` returns for that answer (to float rounding)."""
    inputs = batch.inputs
    targets = inputs["targets"]
    hidden = decoder_output(model, inputs)
    logps = token_logps(hidden[targets.rows, targets.cols], model.lm_head, targets.tokens)  # [N], float32
    position = targets.rows * hidden.shape[1] + targets.cols  # reading order: row by row, left to right
    out = []
    for s in range(targets.n_sequences):
        mine = (targets.sequence == s).nonzero(as_tuple=True)[0]
        mine = mine[position[mine].argsort()]
        out.append((targets.tokens[mine].cpu(), logps[mine].double().cpu()))
    return out


# ---------------------------------------------------------------------------------------------
# One pair's tokens, and where its margin sits
# ---------------------------------------------------------------------------------------------


@dataclass
class AnswerTokens:
    """One answer: its tokens as text, log pi and log pi_ref of each, and whether the other answer
    of the pair has the same token at a matching place (`shared_tokens`)."""

    pieces: list[str]
    policy: list[float]
    reference: list[float]
    shared: list[bool]

    def rewards(self, beta: float) -> list[float]:
        """Each token's part of the implicit reward: beta * (log pi - log pi_ref)."""
        return [beta * (p - r) for p, r in zip(self.policy, self.reference)]

    def reward(self, beta: float, shared: bool | None = None) -> float:
        """The answer's implicit reward (eq. 5), or only its shared (True) or differing (False) tokens' part."""
        return sum(r for r, s in zip(self.rewards(beta), self.shared) if shared is None or s == shared)


@dataclass
class PairTokens:
    id: str
    prompt: str
    chosen: AnswerTokens
    rejected: AnswerTokens

    def margin(self, beta: float, shared: bool | None = None) -> float:
        """r(chosen) - r(rejected): what DPO's loss, -log sigmoid(margin), pushes up."""
        return self.chosen.reward(beta, shared) - self.rejected.reward(beta, shared)


def shared_tokens(chosen: list[int], rejected: list[int]) -> tuple[list[bool], list[bool]]:
    """Which tokens of each answer the other answer has too, aligned by the longest matching runs
    (difflib): "The shapes are yellow ." against "The shapes are green ." shares all but the colour."""
    in_chosen, in_rejected = [False] * len(chosen), [False] * len(rejected)
    for block in difflib.SequenceMatcher(None, chosen, rejected, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            in_chosen[block.a + k] = in_rejected[block.b + k] = True
    return in_chosen, in_rejected


def pieces(processor: Processor, ids: list[int]) -> list[str]:
    """Each token as the text it adds to the answer: what decoding the first t + 1 tokens adds to the
    first t (so spaces and byte tokens come out as the tokenizer joins them, whatever its kind)."""
    out, before = [], ""
    for t in range(len(ids)):
        now = processor.tokenizer.decode(ids[:t + 1], skip_special_tokens=False)
        if now.endswith("\ufffd") and t + 1 < len(ids):  # a character split over byte tokens: it shows
            out.append("")                                # with its last byte (the page marks the empty ones)
            continue
        out.append(now[len(before):] if now.startswith(before) else processor.tokenizer.id_to_token(ids[t]))
        before = now
    return out


def margin_split(pairs: list[PairTokens], beta: float) -> dict:
    """Over all pairs: the mean margin, how much of it the tokens that differ between chosen and rejected
    carry and how much the shared ones, and the mean reward per token of each kind. Shared tokens can
    carry margin too: after the first difference they are read after different words."""
    n = len(pairs)
    margin = sum(p.margin(beta) for p in pairs)
    differing = sum(p.margin(beta, shared=False) for p in pairs)

    def per_token(answers, shared):
        values = [r for a in answers for r, s in zip(a.rewards(beta), a.shared) if s == shared]
        return sum(values) / len(values) if values else 0.0

    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
    return {"pairs": n, "beta": beta, "mean margin": margin / n, "mean margin, differing tokens": differing / n,
            "mean margin, shared tokens": (margin - differing) / n,
            "share of the margin on differing tokens": differing / margin if margin else float("nan"),
            "reward per token, chosen, differing": per_token(chosen, False),
            "reward per token, chosen, shared": per_token(chosen, True),
            "reward per token, rejected, differing": per_token(rejected, False),
            "reward per token, rejected, shared": per_token(rejected, True),
            "reward accuracy": sum(p.margin(beta) > 0 for p in pairs) / n}


# ---------------------------------------------------------------------------------------------
# Scoring held-out pairs with a policy and its reference
# ---------------------------------------------------------------------------------------------


def load_examples(pairs_file, processor: Processor, image_folder, limit: int | None = None):
    """Pairs from any file train_dpo.py reads (scored samples become pairs by the paper's rule, seed 0)
    -> (pairs, their examples); and the same examples each shown the next pair's image."""
    pairs, _ = load_pairs(pairs_file)
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise SystemExit(f"{pairs_file}: no preference pairs in it")
    examples, report = pair_examples(pairs, processor, image_folder, source=str(pairs_file))
    kept = {e.id for e in examples}
    pairs = [p for p in pairs if p.id in kept]
    swapped = [SimpleNamespace(**{**vars(e), "images": examples[(i + 1) % len(examples)].images})
               for i, e in enumerate(examples)]
    return pairs, examples, swapped


def score(model, examples, processor: Processor, batch_size: int, packing: bool, device) -> list:
    """(chosen ids, chosen log-probs, rejected ids, rejected log-probs) per example."""
    out = []
    for start in tqdm(range(0, len(examples), batch_size), desc="scoring tokens", leave=False):
        chunk = examples[start:start + batch_size]
        answers = answer_token_logps(model, pair_batch(chunk, processor, packing=packing).to(device))
        for k in range(len(chunk)):
            chosen, rejected = PairBatch.places(k, len(chunk))  # where pair k's two answers sit
            out.append((*answers[chosen], *answers[rejected]))
    return out


def pair_tokens(pairs, policy_scores, reference_scores, processor: Processor) -> list[PairTokens]:
    result = []
    for pair, (c_ids, c_pi, r_ids, r_pi), (c_ids_ref, c_ref, r_ids_ref, r_ref) in zip(pairs, policy_scores,
                                                                                     reference_scores):
        assert torch.equal(c_ids, c_ids_ref) and torch.equal(r_ids, r_ids_ref), "policy and reference tokenised apart"
        c_shared, r_shared = shared_tokens(c_ids.tolist(), r_ids.tolist())
        result.append(PairTokens(pair.id, pair.prompt,
                                 AnswerTokens(pieces(processor, c_ids.tolist()), c_pi.tolist(), c_ref.tolist(), c_shared),
                                 AnswerTokens(pieces(processor, r_ids.tolist()), r_pi.tolist(), r_ref.tolist(), r_shared)))
    return result


def token_views(policies: list, reference, pairs_file, image_folder, batch_size: int = 16, packing: bool = False,
                device="cpu", limit: int | None = None, swapped: bool = True) -> dict:
    """-> {"pairs": [...], "views": {policy: {"true image": [PairTokens], "swapped image": [PairTokens]}}}
    (swapped=False: the true image only). Reference log-probs are computed once; each policy is loaded,
    scored and freed in turn."""
    processor = Processor.from_pretrained(reference)
    pairs, examples, other_image = load_examples(pairs_file, processor, image_folder, limit)
    shown = [("true image", examples)] + ([("swapped image", other_image)] if swapped else [])
    reference_model = load_model(reference, device=device).eval()
    ref = {images: score(reference_model, these, processor, batch_size, packing, device) for images, these in shown}
    del reference_model
    views = {}
    for policy in policies:
        model = load_model(policy, device=device).eval()
        views[str(policy)] = {images: pair_tokens(pairs, score(model, these, processor, batch_size, packing, device),
                                                  ref[images], processor) for images, these in shown}
        del model
    return {"pairs": pairs, "views": views}


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
img.shape { width: 112px; height: 112px; image-rendering: pixelated; }
img.small { width: 56px; height: 56px; image-rendering: pixelated; display: block; }
.answer { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }
.token { padding: 1px 0; border-bottom: 2px solid transparent; }
.token.differs { border-bottom-color: #333; }
.token:empty::before { content: "\\25AB"; color: #999; }  /* one byte of a character shown by the next token */
.total { color: #555; font-size: 0.85em; }
.mode label { margin-right: 1em; }
"""

# The colour of every token is written into the page for the reward; these lines only re-colour it
# when the reader asks for log pi or log pi_ref (the page reads without any script).
RECOLOUR = """
function recolour(key) {
  document.querySelectorAll(".token").forEach(span => {
    span.style.background = span.dataset["colour" + key];
  });
}
document.querySelectorAll("input[name=colour]").forEach(radio =>
  radio.addEventListener("change", () => recolour(radio.value)));
"""


def colour(value: float, scale: float) -> str:
    """Green for a token that raises the answer's reward (or log-prob), red for one that lowers it, as
    strong as |value| / scale."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    if value == 0:
        return "rgba(128,128,128,0.08)"  # no change at all: neither up nor down
    rgb = "40,160,60" if value > 0 else "210,50,50"
    return f"rgba({rgb},{0.08 + 0.8 * strength:.2f})"


def answer_html(answer: AnswerTokens, beta: float, scales: dict) -> str:
    spans = []
    rewards = answer.rewards(beta)
    total = sum(rewards)
    for text, p, r, reward, shared in zip(answer.pieces, answer.policy, answer.reference, rewards, answer.shared):
        share = f" ({reward / total:.0%} of the answer's)" if abs(total) > 1e-12 else ""
        title = (f"reward {reward:+.4f}{share} | log pi {p:.3f} | log pi_ref {r:.3f}"
                 + ("" if shared else " | differs from the other answer"))
        # log pi and log pi_ref are never positive: coloured red by how improbable the token is
        data = {"reward": colour(reward, scales["reward"]), "policy": colour(p, scales["logp"]),
                "reference": colour(r, scales["logp"])}
        attributes = " ".join(f'data-colour{k}="{v}"' for k, v in data.items())
        spans.append(f'<span class="token{"" if shared else " differs"}" style="background:{data["reward"]}" '
                     f'title="{html.escape(title)}" data-reward="{reward:.6g}" {attributes}>{html.escape(text)}</span>')
    return (f'<div class="answer">{"".join(spans)}</div><div class="total">reward {total:+.3f} = beta * '
            f"({sum(answer.policy):.2f} - {sum(answer.reference):.2f})</div>")


def pair_cells(pair: PairTokens, beta: float, scales: dict, image: str = "") -> str:
    return (f"<td>{image}<b>chosen</b>{answer_html(pair.chosen, beta, scales)}<b>rejected</b>"
            f"{answer_html(pair.rejected, beta, scales)}<div>margin <b>{pair.margin(beta):+.3f}</b> "
            f"(differing tokens {pair.margin(beta, shared=False):+.3f}, shared {pair.margin(beta, shared=True):+.3f})"
            f"</div></td>")


SPLIT_COLUMNS = [  # margin_split's key, the column's title, its format
    ("reward accuracy", "reward accuracy", "{:.3f}"), ("mean margin", "mean margin", "{:+.4f}"),
    ("mean margin, differing tokens", "of it on differing tokens", "{:+.4f}"),
    ("mean margin, shared tokens", "on shared tokens", "{:+.4f}"),
    ("share of the margin on differing tokens", "share on differing", "{:.1%}"),
    ("reward per token, chosen, differing", "chosen: per differing token", "{:+.4f}"),
    ("reward per token, chosen, shared", "chosen: per shared token", "{:+.4f}"),
    ("reward per token, rejected, differing", "rejected: per differing token", "{:+.4f}"),
    ("reward per token, rejected, shared", "rejected: per shared token", "{:+.4f}")]


def split_table(views: dict, beta: float) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in SPLIT_COLUMNS)
    rows = []
    for name, view in views.items():
        for images, pairs in view.items():
            split = margin_split(pairs, beta)
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{images}</td>"
                        + "".join(f"<td>{fmt.format(split[key])}</td>" for key, _, fmt in SPLIT_COLUMNS) + "</tr>")
    return f"<table><tr><th>policy</th><th>images</th>{head}</tr>{''.join(rows)}</table>"


def write_token_page(result: dict, out: Path, image_folder, beta: float, shown: int = 40,
                     pick: list[str] | None = None, title: str = "DPO's reward, token by token",
                     summary: bool = True) -> Path:
    """out/index.html: the margin's split over all pairs (summary=False: left out, for a figure of the
    pairs alone), then `shown` pairs (or those whose ids are in `pick`), a column per policy with the
    true image and one with the swapped image."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    views = result["views"]
    every = [t for view in views.values() for pairs in view.values() for p in pairs for t in (p.chosen, p.rejected)]
    scales = {"reward": max((abs(r) for a in every for r in a.rewards(beta)), default=1.0),
              "logp": max((abs(v) for a in every for v in a.policy + a.reference), default=1.0)}
    chosen_ids = pick if pick else [p.id for p in result["pairs"][:shown]]
    by_id = {p.id: i for i, p in enumerate(result["pairs"])}
    missing = [i for i in chosen_ids if i not in by_id]
    if missing:
        raise SystemExit(f"--pair: no pair with id {missing[0]!r} among the {len(by_id)} pairs")
    head = "".join(f"<th>{html.escape(name)}<br>{images}</th>" for name, view in views.items() for images in view)
    rows = []
    for pair_id in chosen_ids:
        i = by_id[pair_id]
        pair = result["pairs"][i]
        image = picture(pair.images[0], Path(image_folder), out, PICTURES) if pair.images else ""
        other = result["pairs"][(i + 1) % len(result["pairs"])]  # the image the swapped column was shown
        swapped_image = (picture(other.images[0], Path(image_folder), out, PICTURES).replace('class="shape"',
                                                                                             'class="small"')
                         if other.images else "")
        cells = "".join(pair_cells(view[images][i], beta, scales, swapped_image if images == "swapped image" else "")
                        for view in views.values() for images in view)
        rows.append(f'<tr id="pair-{html.escape(str(pair.id))}"><td>{image}<div>{question_text(pair.prompt)}</div>'
                    f"<div class=\"total\">{html.escape(str(pair.id))}</div></td>{cells}</tr>")
    body = (f"<h1>{html.escape(title)}</h1><p id=\"image-check\"></p>"
            f"<p>Each token of the answer coloured by its part of DPO's implicit reward, beta * (log pi - log pi_ref) "
            f"with beta = {beta} (green raises the answer's reward, red lowers it; hover for the numbers). "
            f"Underlined: the tokens where the chosen and the rejected answer differ. The swapped-image column "
            f"shows the same pair with the next pair's image.</p>"
            + (f"<h2>Where the margin sits ({len(result['pairs'])} pairs)</h2>{split_table(views, beta)}" if summary
               else "")
            + f'<p class="mode">Colour by: <label><input type="radio" name="colour" value="reward" checked> reward</label>'
            f'<label><input type="radio" name="colour" value="policy"> log pi</label>'
            f'<label><input type="radio" name="colour" value="reference"> log pi_ref</label></p>'
            f"<table><tr><th>pair</th>{head}</tr>{''.join(rows)}</table>")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{CHECK_IMAGES}{RECOLOUR}</script>\n</body></html>\n")
    write_atomic(out / "index.html", page)
    splits = {name: {images: margin_split(pairs, beta) for images, pairs in view.items()} for name, view in views.items()}
    write_atomic(out / "margin_split.json", json.dumps(splits, indent=1) + "\n")
    return out / "index.html"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", action="append", help="a trained model folder (or repo id); repeat for one column each "
                                                     "(default: runs/demo-dpo/model)")
    p.add_argument("--reference", default="runs/demo-sft/model", help="the model DPO started from")
    p.add_argument("--pairs", default="runs/demo-sft/samples_heldout.jsonl",
                   help="held-out pairs, in any format train_dpo.py reads (scored samples become pairs by the paper's rule)")
    p.add_argument("--image-folder", default="runs/demo-data")
    p.add_argument("--out", default="runs/tokens", help="the folder the page (index.html) and margin_split.json go to")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta, the reward's unit (the run's --beta)")
    p.add_argument("--shown", type=at_least(1), default=40, help="pairs shown on the page (all are in the table)")
    p.add_argument("--pair", action="append", help="show this pair id (repeat for several) instead of the first --shown")
    p.add_argument("--limit", type=at_least(1), help="score only the first N pairs of the file")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--packing", action="store_true", help="score packed pairs [prompt | chosen | rejected], as training does")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    policies = args.policy or ["runs/demo-dpo/model"]
    for name in [*policies, args.reference]:  # each a folder, or a repo id in the Hugging Face cache
        hint = " (run python train_sft.py and python train_dpo.py first)" if name.startswith("runs/demo-") else ""
        try:
            folder = model_folder(name)
        except FileNotFoundError as e:
            raise SystemExit(f"{name}: no model there{hint or ': ' + str(e).removeprefix(f'{name}: ')}") from None
        if not (folder / "config.json").exists():
            raise SystemExit(f"{name}: no model there (no config.json){hint}")
    result = token_views(policies, args.reference, args.pairs, args.image_folder, args.batch_size, args.packing,
                         args.device, args.limit)
    path = write_token_page(result, Path(args.out), args.image_folder, args.beta, args.shown, args.pair)
    for name, view in result["views"].items():
        split = margin_split(view["true image"], args.beta)
        print(f"{name}: mean margin {split['mean margin']:+.4f}, {split['share of the margin on differing tokens']:.0%} "
              f"of it on the tokens that differ; swapped image: mean margin "
              f"{margin_split(view['swapped image'], args.beta)['mean margin']:+.4f}")
    print(f"written: {path} (open it in a browser), {path.parent / 'margin_split.json'}")
    return result


if __name__ == "__main__":
    main()
