"""SteerLM's attribute conditioning (Dong et al. 2023, arXiv 2310.05344): train on every rated answer
with its own ratings written into the prompt; at inference, write in the ratings you want.

The ratings are the paper's five HelpSteer attributes, 0-4 each, written comma-joined as `name:value`
after the question. Two wordings: ours (NeMo-Aligner's lower-case names after a short label), and
the authors' (a sentence asking for those attributes on a 5-point Likert scale, capitalised names).
"""

from __future__ import annotations

from .data import ATTRIBUTES

# The one place the conditioning text is written. {ratings} is e.g. "helpfulness:4,correctness:4,...".
STEER_TEMPLATES = {
    "tinyalign": "{question}\nAttributes: {ratings}",
    "authors": "{question} Answer with these attributes on a 5-point Likert scale (0-4): {ratings}",
}
DEFAULT_STEER = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}


def check_ratings(ratings: dict, where: str = "ratings") -> dict:
    """All five attributes, each an integer 0-4; anything else is an error naming what is wrong."""
    unknown = sorted(set(ratings) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"{where}: unknown attribute(s) {unknown}; the attributes are {list(ATTRIBUTES)}")
    missing = [a for a in ATTRIBUTES if a not in ratings]
    if missing:
        raise ValueError(f"{where}: missing attribute(s) {missing}")
    for name in ATTRIBUTES:
        value = ratings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 0 <= value <= 4:
            raise ValueError(f"{where}: {name} must be an integer 0-4, got {value!r}")
    return {name: int(ratings[name]) for name in ATTRIBUTES}


def parse_steer(text: str) -> dict:
    """"helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2" -> dict (names in any case)."""
    ratings = {}
    for part in text.split(","):
        name, sep, value = part.partition(":")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--steer: {part.strip()!r} is not name:value (e.g. verbosity:2)")
        ratings[name.strip().lower()] = int(value)
    return check_ratings(ratings, "--steer")


def format_ratings(ratings: dict, style: str = "tinyalign") -> str:
    ratings = check_ratings(ratings)
    names = {a: (a.capitalize() if style == "authors" else a) for a in ATTRIBUTES}
    return ",".join(f"{names[a]}:{ratings[a]}" for a in ATTRIBUTES)


def steer_prompt(question: str, ratings: dict, style: str = "tinyalign") -> str:
    """The question with the ratings written in (the `<image>` tag, if any, stays where it is)."""
    if style not in STEER_TEMPLATES:
        raise ValueError(f"unknown steer template {style!r}; choose one of {sorted(STEER_TEMPLATES)}")
    return STEER_TEMPLATES[style].format(question=question, ratings=format_ratings(ratings, style))
