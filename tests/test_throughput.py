"""The GPU benchmark's code (tinyalign/throughput.py + the transformers rows of tests/reference_bench.py),
run end to end on a CPU with --preset tiny."""

import json
import re

import reference_bench
from conftest import ROOT

from tinyalign.speed import throughput
from tinyalign.config import preset


def test_bench_tiny_runs_every_row(tmp_path):
    out = tmp_path / "throughput.json"
    results = reference_bench.main(["--preset", "tiny", "--steps", "1", "--decode-tokens", "8", "--skip", "compile",
                                    "--prompt-tokens", "16", "--answer-tokens", "24", "--gen-prompts", "3",
                                    "--gen-rows", "8", "--eval-prompts", "5", "--eval-rows", "2", "--answers", "2,9",
                                    "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for row in ("ours_lora", "ours_full", "hf_full", "ours_decode_eager", "ours_decode_compiled", "hf_decode_dynamic",
                "gen_annotate_continuous", "gen_annotate_shared", "gen_annotate_static", "hf_gen_annotate",
                "gen_eval_continuous", "gen_eval_static", "hf_gen_eval", "gen_decode_step"):
        assert "error" not in results[row], (row, results[row])
    # Every generation row does the same work: the useful tokens are the answers' lengths (x 4 samples).
    assert results["gen_annotate_static"]["tokens"] == results["hf_gen_annotate"]["tokens"] == \
        4 * sum(results["annotate_budgets"]) and len(results["annotate_budgets"]) == 3
    assert results["gen_eval_continuous"]["samples"] == results["hf_gen_eval"]["samples"] == 5
    assert "hf_lora" in results  # measured where peft is installed, else recorded as failed with the reason
    # Packed pairs compute each pair's image and question once: exactly prompt + chosen + rejected.
    pairs = throughput.synthetic_pairs(preset("tiny"), 4, prompt_tokens=16, answer_tokens=24)
    prompt = [len(e.chosen.input_ids) - e.chosen.num_supervised for e in pairs]
    packed = sum(len(e.chosen.input_ids) + len(e.rejected.input_ids) - p for e, p in zip(pairs, prompt))
    assert results["ours_lora"]["tokens_per_step"] == packed
    both = len(pairs[0].chosen.input_ids) + len(pairs[0].rejected.input_ids)  # the one-pair full fine-tuning rows
    assert results["hf_full"]["tokens_per_step"] == both and results["ours_full"]["tokens_per_step"] == both - prompt[0]
    assert results["ours_lora"]["pairs_per_s"] > 0 and results["paper_run_hours"] > 0


def test_flop_count_by_hand():
    cfg = preset("tiny")
    pairs = throughput.synthetic_pairs(cfg, 1, prompt_tokens=10, answer_tokens=20)
    e = pairs[0]
    p = next(i for i, x in enumerate(e.chosen.labels) if x != -100)
    c, r = len(e.chosen.input_ids) - p, len(e.rejected.input_ids) - p
    assert throughput.visible_pairs(p, c, r) == p * (p + 1) // 2 + c * p + c * (c + 1) // 2 + r * p + r * (r + 1) // 2
    full, lora = throughput.dpo_step_flops(cfg, pairs, True, 0), throughput.dpo_step_flops(cfg, pairs, False, 0)
    # Full fine-tuning adds exactly the weight gradients of the decoder's linear layers: 2 N per token.
    assert full - lora == 2 * throughput.decoder_linear_params(cfg) * (p + c + r)


def test_tinyalign_never_imports_transformers_or_peft():
    """The reference path lives in tests/; the package itself needs neither."""
    paths = sorted((ROOT / "tinyalign").rglob("*.py"))
    assert len(paths) > 30  # every folder is read
    for path in paths:
        found = re.findall(r"^\s*(?:from|import)\s+(transformers|peft|trl|accelerate)\b", path.read_text(), re.M)
        assert not found, f"{path.name} imports {found}"


def test_eval_imports_nothing_from_the_training_scripts():
    """eval.py's helpers live in tinyalign/, so a reader of eval.py never has to open train_dpo.py."""
    found = re.findall(r"^\s*(?:from|import)\s+(train_\w+)", (ROOT / "eval.py").read_text(), re.M)
    assert not found, found


def test_profile_bench_decode_ab_runs_both_arms(tmp_path, monkeypatch):
    """tests/profile_bench.py's decode section (the fused-vs-separate A/B that issue 15's GPU run
    needs) end to end at the tiny preset: both arms measured in each round, one decoding with the
    fused weights and the other with none."""
    import profile_bench

    from tinyalign.llama import LlamaModel

    seen = []
    original = LlamaModel.forward

    def spy(self, *args, **kwargs):  # which products each decoder call runs
        seen.append("qkv" in vars(self.layers[0].self_attn))  # speed/fused.py's one product in place
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", spy)
    profile_bench.main(["--preset", "tiny", "--sections", "decode", "--decode-rounds", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode.json").read_text())
    assert "error" not in result, result.get("error")
    assert len(result["rounds"]["fused"]) == len(result["rounds"]["separate"]) == 1
    assert result["tokens_per_s"] > 0 and result["separate_tokens_per_s"] > 0
    assert True in seen and False in seen  # one arm decoded with fused weights, the other without
