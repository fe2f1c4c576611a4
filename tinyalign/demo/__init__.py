"""The shapes world (world.py) and the demos the training scripts run without --model (runs.py).
May import the core, infra/ and speed/; evaluation/ and lab/ build on it."""

from .runs import dpo_report, dpo_start, sft_report, sft_start, steerlm_report, steerlm_start

__all__ = ["sft_start", "sft_report", "dpo_start", "dpo_report", "steerlm_start", "steerlm_report"]
