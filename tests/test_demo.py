"""The embedded demo, end to end, exactly as a newcomer runs it: `python train_sft.py`, then
`python train_dpo.py` (which samples the SFT model, rates the samples, builds pairs, runs DPO).
About three minutes on two CPU cores."""

import json

import train_dpo
import train_sft


def test_demo_sft_then_dpo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes runs/ under the working directory
    sft = train_sft.main([])
    assert sft["exact_answer_accuracy"] > 0.4  # it learned to answer (chance is about 0.3)
    final = train_dpo.main(["--cache-dir", str(tmp_path / "cache")])
    table = capsys.readouterr().out
    assert "start (SFT)" in table and "exact-answer accuracy" in table
    # About 68 held-out pairs, drawn from the SFT model's own samples: 0.93 and 0.87 were measured with
    # two sampling streams. 0.8 is far above what an untrained policy gets (ties: 0).
    assert final["rewards/accuracy"] >= 0.8
    assert final["exact_answer_accuracy"] > final["start_exact_answer_accuracy"] + 0.1  # a measurable gain
    evals = [json.loads(line) for line in (tmp_path / "runs/demo-dpo/metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[0]["rewards/accuracy"] == 0.0 and evals[-1]["rewards/accuracy"] >= 0.8  # it rises
    assert (tmp_path / "runs/demo-dpo/model/model.safetensors").exists()
