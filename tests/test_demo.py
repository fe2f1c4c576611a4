"""The embedded demo, end to end, exactly as a newcomer runs it: `python train_sft.py`, then
`python train_dpo.py` (which samples the SFT model, rates the samples, builds pairs, runs DPO).
About four minutes on two CPU cores.

The bars below sit under the smallest value measured over 10 runs of this same demo: seeds 0-4,
each with the CPU's vector instructions on and off (`python -m tinyalign.lab.seeds --simd native off`:
another float rounding, as another CPU has, which changes every sampled answer and so every pair;
1 thread and 2 threads gave bit-identical runs). The table is in the README ("How the demo's
figures were measured"). The margins leave room for a draw worse than the worst of those 10."""

import json

import pytest

import train_dpo
import train_sft
from tinyalign.lab.seeds import figures

# Measured minimum over the 10 runs -> the bar, and why the gap.
SFT_EXACT_BAR = 0.4          # measured 0.580-0.712; chance is about 0.3
PAIRS_BAR = 450              # measured 522-655; 450 pairs keep the 95% interval of an accuracy near 0.9 at +-0.03
REWARD_ACCURACY_BAR = 0.75   # measured 0.827-0.987; an untrained policy scores 0 (every margin is a tie)
EXACT_GAIN_BAR = 0.10        # measured gain 0.157-0.353 (exact answers on 600 questions, DPO minus its start);
#                              0.10 is over 4 standard errors of that difference


def test_demo_sft_then_dpo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes runs/ under the working directory
    sft = train_sft.main([])
    assert sft["exact_answer_accuracy"] > SFT_EXACT_BAR  # it learned to answer
    final = train_dpo.main(["--cache-dir", str(tmp_path / "cache")])
    table = capsys.readouterr().out
    assert "start (SFT)" in table and "exact-answer accuracy" in table
    assert final["pairs"] >= PAIRS_BAR
    assert final["rewards/accuracy"] >= REWARD_ACCURACY_BAR
    assert final["exact_answer_accuracy"] >= final["start_exact_answer_accuracy"] + EXACT_GAIN_BAR
    evals = [json.loads(line) for line in (tmp_path / "runs/demo-dpo/metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[0]["rewards/accuracy"] == 0.0 and evals[-1]["rewards/accuracy"] >= REWARD_ACCURACY_BAR  # it rises
    assert (tmp_path / "runs/demo-dpo/model/model.safetensors").exists()
    # The seed table reads the same figures back from the run's files as the demo printed
    # (metrics.jsonl keeps 6 decimals).
    read_back = figures("dpo", tmp_path)
    assert read_back["held-out pairs"] == final["pairs"]
    for key, printed in (("reward accuracy", "rewards/accuracy"), ("exact answer", "exact_answer_accuracy"),
                         ("exact answer, start", "start_exact_answer_accuracy")):
        assert read_back[key] == pytest.approx(final[printed], abs=1e-6), key
