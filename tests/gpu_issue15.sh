#!/bin/bash
# Issue 15's GPU measurements in one call (about 8 minutes on one H200 or H100, random weights of the
# real shapes). Each command writes its JSON as it goes, so a run cut short keeps its finished rows;
# everything printed goes to $OUT/run.log.
#   OUT=somewhere bash tests/gpu_issue15.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log="$OUT/run.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$log"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$log"
# 1. The DPO step at the paper's setting (4 pairs), compiled blocks, float32 and bf16 LoRA adapters: MFU.
timeout 150 python -m tinyalign.speed.throughput --preset llava-1.5-7b --rows ours_lora_compiled,ours_lora_compiled_bf16_adapters \
    --out "$OUT/dpo_7b.json" >> "$log" 2>&1
# 2. The paper's 13B DPO setting (4 pairs per step): peak memory compiled, and with gradient checkpointing.
timeout 90 python -m tinyalign.speed.throughput --preset llava-1.5-13b --rows ours_lora_compiled --steps 3 \
    --out "$OUT/dpo_13b.json" >> "$log" 2>&1
timeout 60 python -m tinyalign.speed.throughput --preset llava-1.5-13b --rows ours_lora --steps 3 --gradient-checkpointing \
    --out "$OUT/dpo_13b_gc.json" >> "$log" 2>&1
# 3. Generation (annotate-style and eval-style) and decoding, ours next to transformers in one run.
timeout 290 python tests/reference_bench.py --preset llava-1.5-7b --skip train,full,compile,variants,cuda \
    --gen-prompts 8 --gen-rows 16 --eval-prompts 16 --eval-rows 8 --deadline 240 \
    --out "$OUT/generation_7b.json" >> "$log" 2>&1
grep -v "^   {" "$log" | tail -n 45
