"""argparse types that refuse impossible values at the command line, naming the option.

`--batch-size 0` would otherwise fail deep inside a loop ("range() arg 3 must not be zero"),
`--eval-fraction 1.5` would quietly train on one example, `--max-grad-norm 0` would clip every
gradient to nothing. With `type=at_least(1)` argparse stops at once with
"argument --batch-size: must be at least 1, got 0" and the usage line.
"""

from __future__ import annotations

import argparse
import math


def at_least(low: int):
    """An integer >= low."""

    def parse(text: str) -> int:
        value = int(text)  # not an integer: argparse says "invalid integer value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """A float within [low, high]; low_open / high_open leave out that end ("above 0" is low=0,
    low_open=True). Never NaN; inf only where no upper bound is set."""

    def parse(text: str) -> float:
        value = float(text)  # not a number: argparse says "invalid number value"
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if math.isnan(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {interval(low, high, low_open, high_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def interval(low, high, low_open, high_open) -> str:
    """Words for a range: "above 0", "at least 0", "in [0, 1)"."""
    if high is None:
        return f"above {low:g}" if low_open else f"at least {low:g}"
    if low is None:
        return f"below {high:g}" if high_open else f"at most {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


positive = number(0, low_open=True)  # > 0
non_negative = number(0)  # >= 0
share = number(0, 1, high_open=True)  # [0, 1): a part that leaves something (held-out data, dropout)
