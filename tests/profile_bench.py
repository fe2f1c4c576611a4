"""Where the GPU time goes, measured before changing code (issue 15: "take a profile first").

Four sections, most important first, each written to its own JSON as soon as it is done (a run cut
off by --deadline keeps what it has):

1. ``linear``: one-row (decode) matrix products of every decoder weight shape, through cuBLAS
   (``F.linear``) and through inductor (``torch.compile``, coordinate-descent tuning, what the
   compiled decode step uses), unfused and with q/k/v and gate/up fused, against the copy bandwidth:
   how many decode tokens/s the matmuls alone would allow, and whether fusing or cuBLAS helps.
2. ``dpo``: the paper-setting DPO step (LoRA r128 on every projection, 4 pairs, compiled blocks):
   step time, a ``torch.profiler`` table of the kernels that take the time, grouped (matrix
   products, attention, fused elementwise, other), the forward alone, and the variants
   ``--dpo-variants`` names, each applied on top of the last: LoRA dropout 0, the vision tower
   compiled, the decoder blocks compiled with max-autotune (LoRA weights in bf16 is a row of
   ``python -m tinyalign.speed.throughput``).
3. ``decode``: the compiled decode step at batch 1, fused q/k/v and gate/up against the separate
   products in alternating rounds of one process, and a kernel profile of the fused step.
4. ``generation``: annotate-style sampling (one 600-token multimodal prompt, 4 samples, T=0.7,
   fixed answer length) and eval-style greedy batches with a static batch, next to transformers'
   ``generate`` with ``num_return_sequences=4``, samples/s and tokens/s (the measurements taken
   before issue 15's generation paths: ``tests/reference_bench.py`` has the rows of today's).

    python tests/profile_bench.py --preset llava-1.5-7b --out profile   # on a GPU, ~6 min
    python tests/profile_bench.py --preset tiny --out /tmp/profile        # the same code on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tinyalign.speed import throughput  # noqa: E402
from tinyalign.config import preset  # noqa: E402


def median_time(fn, device, warmup=3, repeat=20) -> float:
    return statistics.median(throughput.timed(fn, device, warmup, repeat))


# ---------------------------------------------------------------------------------------------
# 1. One-row matrix products
# ---------------------------------------------------------------------------------------------


def linear_section(cfg, device, dtype, rows: int) -> dict:
    """Per decode step the decoder reads every weight once; at one row each product is a
    matrix-vector product, so its floor is its weight bytes over the copy bandwidth."""
    t = cfg.text
    shapes = {"q/k/v/o": (t.hidden_size, t.hidden_size), "gate/up": (t.intermediate_size, t.hidden_size),
              "down": (t.hidden_size, t.intermediate_size), "qkv fused": (3 * t.hidden_size, t.hidden_size),
              "gate_up fused": (2 * t.intermediate_size, t.hidden_size), "lm_head": (t.vocab_size, t.hidden_size)}
    bandwidth = throughput.copy_bandwidth(device)
    out = {"rows": rows, "copy_bandwidth": bandwidth, "shapes": {}}
    for name, (n_out, n_in) in shapes.items():
        # Several weight copies in rotation, so the timing reads memory, not the L2 cache.
        weights = [torch.randn(n_out, n_in, device=device, dtype=dtype) * 0.02 for _ in range(4)]
        x = torch.randn(rows, n_in, device=device, dtype=dtype)
        compiled_fn = torch.compile(lambda x, w: F.linear(x, w), dynamic=False,
                                    options={"coordinate_descent_tuning": True} if device != "cpu" else {})

        def burst(fn, n=20):  # n products back to back over 4 weights in turn (not one weight held in L2)
            for i in range(n):
                fn(x, weights[i % 4])

        def replay(fn):  # on a GPU the burst is captured as a CUDA graph: no Python between kernels
            burst(fn)
            if device == "cpu":
                return lambda: burst(fn)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                burst(fn)
            return graph.replay

        cublas = median_time(replay(F.linear), device) / 20
        inductor = median_time(replay(compiled_fn), device) / 20
        nbytes = n_out * n_in * weights[0].element_size()
        out["shapes"][name] = {"out": n_out, "in": n_in, "bytes": nbytes, "cublas_s": cublas, "inductor_s": inductor,
                               "floor_s": nbytes / bandwidth if bandwidth else None}
        print(f"   {name:14s} cuBLAS {cublas * 1e6:8.1f} us  inductor {inductor * 1e6:8.1f} us"
              + (f"  floor {nbytes / bandwidth * 1e6:8.1f} us" if bandwidth else ""), flush=True)
    s = out["shapes"]
    for kind in ("cublas_s", "inductor_s", "floor_s"):
        if s["q/k/v/o"][kind] is None:
            continue
        unfused = t.num_layers * (4 * s["q/k/v/o"][kind] + 2 * s["gate/up"][kind] + s["down"][kind])
        fused = t.num_layers * (s["qkv fused"][kind] + s["q/k/v/o"][kind] + s["gate_up fused"][kind]
                                       + s["down"][kind])
        out[f"step_{kind}"] = {"unfused": unfused + s["lm_head"][kind], "fused": fused + s["lm_head"][kind]}
        out[f"tokens_per_s_{kind}"] = {k: rows / v for k, v in out[f"step_{kind}"].items()}
    return out


# ---------------------------------------------------------------------------------------------
# 2. The DPO step and its profile
# ---------------------------------------------------------------------------------------------

GROUPS = [("matrix products", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk", "matmul", "addmm", " mm")),
          ("attention", ("flex", "flash", "attention", "fmha", "sdpa", "triton_tem")),  # flex kernels: triton_tem_*
          ("fused elementwise (triton)", ("triton_",)),
          ("optimizer", ("adam", "multi_tensor", "foreach")),
          ("copies and casts", ("copy", "cast", "memcpy", "memset", "fill"))]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def profile_rows(step, device, steps=2, top=30) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        throughput.sync(device)
    # Device kernels only. CPU-side records also carry device time (an aten op, a "## Call
    # CompiledFxGraph ##" span, and inductor's launch record named like its triton kernel), so
    # counting them too counts the same kernel twice (the 2026-11-27 H200 run did, see docs).
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0
              and e.device_type == DeviceType.CUDA] if device != "cpu" else []
    if not events:  # CPU, or no device counters (CUPTI unavailable): CPU self time instead
        events, attr = list(prof.key_averages()), "self_cpu_time_total"
    else:
        attr = "self_device_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + getattr(e, attr)
    return {"measure": attr, "total_us_per_step": total / steps,
            "groups": {g: {"us_per_step": v / steps, "share": v / total} for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [{"name": e.key[:120], "calls_per_step": e.count / steps, "us_per_step": getattr(e, attr) / steps,
                     "share": getattr(e, attr) / total} for e in events[:top]]}


def no_lora_dropout(model):
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.dropout.p = 0.0


def compile_tower(model):
    """The frozen vision tower runs eagerly in the DPO step: 4 images x 24 blocks of small kernels,
    each launched from Python. Compiled per block like the decoder's, it launches a few fused ones."""
    for block in model.vision_tower.encoder.layers:
        block.compile(dynamic=False)


def autotune_blocks(model):
    """Recompile the decoder blocks with max-autotune: inductor times several kernel configurations
    for each matrix product and for FlexAttention's forward and backward (which the default
    compile takes from a fixed table) and keeps the fastest. Costs minutes of compile."""
    for block in model.language_model.layers:
        block.compile(dynamic=False, mode="max-autotune-no-cudagraphs")


# The variants --dpo-variants may name, applied in the order given, each on top of the last.
DPO_VARIANTS = {"dropout 0": no_lora_dropout, "+ vision tower compiled": compile_tower,
                "+ blocks max-autotune": autotune_blocks}


def dpo_section(cfg, device, dtype, n_pairs: int, deadline, out: dict, variants=("dropout 0",),
                save=lambda: None) -> dict:
    from tinyalign.packing import pack_pairs
    from tinyalign.training import autocast, compile_blocks

    processor = throughput.SyntheticProcessor(cfg)
    pairs = throughput.synthetic_pairs(cfg, n_pairs, 64, 200)
    flops = throughput.dpo_step_flops(cfg, pairs, False, 128)
    peak = throughput.card_peak(device)[1]
    out.update(pairs=n_pairs, flops_per_step=flops)
    model = throughput.paper_lora(throughput.our_model(cfg, device, dtype))
    if device != "cpu":
        compile_blocks(model)
    model.train()

    def rate(name, step_and_tokens):
        step, tokens = step_and_tokens
        t = median_time(step, device, 2, 5)
        out[name] = {"s_per_step": t, "pairs_per_s": n_pairs / t, "tokens_per_step": tokens,
                     "mfu": flops / t / 1e12 / peak if peak else None, "peak_gib": throughput.peak_gib(device)}
        print(f"   {name}: {out[name]}", flush=True)
        save()  # a run killed by its time limit keeps every row measured so far
        return step

    step = rate("step", throughput.our_dpo_step(model, pairs, processor, device, throughput.trainable_optimizer(model, 5e-5)))
    out["profile"] = profile_rows(step, device)
    save()
    for g, v in out["profile"]["groups"].items():
        print(f"   {g:28s} {v['share'] * 100:5.1f}%  {v['us_per_step'] / 1e3:8.2f} ms/step", flush=True)

    # The forward alone (reference log-probs are precomputed, so this is the policy's forward).
    batch = pack_pairs(pairs, processor)
    batch.inputs["pixel_values"] = throughput.pixel_batch(cfg, n_pairs, device, model.dtype)

    def forward_only():
        with torch.no_grad(), autocast(device):
            return model(**batch.to(device).inputs)

    out["forward_no_grad_s"] = median_time(forward_only, device, 2, 5)
    print(f"   forward alone (no grad): {out['forward_no_grad_s'] * 1e3:.1f} ms", flush=True)

    # (Casting the LoRA weights to bf16 in place under the compiled blocks crashed cuBLAS on the
    # H200, 2026-11-27: that variant needs its own model built in bf16, left to the change itself.)
    # Each variant is applied on top of the ones before it, so each row compares with the row above.
    for name in variants:
        if time.time() > deadline:
            out[name] = {"error": "not run: deadline"}
            continue
        DPO_VARIANTS[name](model)
        rate(name, throughput.our_dpo_step(model, pairs, processor, device, throughput.trainable_optimizer(model, 5e-5)))
    model = None  # free the GPU memory before the next model
    return out


def decode_section(cfg, device, dtype, new_tokens: int = 64, rounds: int = 3, out: dict | None = None,
                   save=lambda: None) -> dict:
    """The compiled decode step (batch 1, CUDA graph) profiled kernel by kernel: what besides the
    matrix products takes the step's time. And an A/B in one process: the step with q/k/v and
    gate/up fused (what generate does) against the five separate products, measured in alternation
    (fused, separate, fused, ...) so that drift over the run falls on both (issue 15's round saw no
    gain from fusing, 200 tokens/s against 208 and 217 in other runs, within their spread)."""
    model = throughput.our_model(cfg, device, dtype).eval()
    prompt_len = cfg.image_seq_length + 24
    ids = prompt_ids(cfg, 1, prompt_len, device)
    pixels = throughput.pixel_batch(cfg, 1, device, dtype)
    compiled = device != "cpu"
    arm = {"fused": True}

    def run(n):  # the compiled step is traced once per arm (its guards see the fused products or none)
        return throughput.fast_generate(model, ids, pixels, max_new_tokens=n, eos_token_id=-1, compiled=compiled,
                                       fused=arm["fused"])

    def rate(fused: bool) -> float:
        arm["fused"] = fused
        try:
            return throughput.decode_rate(run, new_tokens, device)
        finally:
            arm["fused"] = True

    out = {} if out is None else out
    rates = out["rounds"] = {"fused": [], "separate": []}
    for _ in range(rounds):
        for name in rates:
            rates[name].append(rate(name == "fused"))
            save()  # a run killed by its time limit keeps every round measured so far
    out.update(tokens_per_s=statistics.median(rates["fused"]), separate_tokens_per_s=statistics.median(rates["separate"]))
    print(f"   decode tokens/s, fused: {rates['fused']}  separate products: {rates['separate']}", flush=True)
    out["profile"] = profile_rows(lambda: run(new_tokens), device, steps=1)
    out["profile"]["per_token_us"] = out["profile"]["total_us_per_step"] / new_tokens
    for g, v in out["profile"]["groups"].items():
        print(f"   {g:28s} {v['share'] * 100:5.1f}%  {v['us_per_step'] / new_tokens:8.1f} us/token", flush=True)
    for row in out["profile"]["top"][:12]:
        print(f"   {row['share'] * 100:5.1f}%  {row['name'][:90]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 3. Generation throughput
# ---------------------------------------------------------------------------------------------


def prompt_ids(cfg, rows: int, prompt_len: int, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (rows, prompt_len), generator=g)
    ids[:, 1:1 + cfg.image_seq_length] = cfg.image_token_index
    return ids.to(device)


def generation_section(cfg, device, dtype, new_tokens: int, eval_batch: int, deadline, with_hf: bool) -> dict:
    prompt_len = cfg.image_seq_length + 24
    model = throughput.our_model(cfg, device, dtype).eval()
    compiled = device != "cpu"
    out = {"prompt_len": prompt_len, "new_tokens": new_tokens, "samples": 4, "eval_batch": eval_batch}

    def ours_annotate():  # today's annotate: the prompt repeated n times in one static batch
        ids = prompt_ids(cfg, 1, prompt_len, device).repeat(4, 1)
        pixels = throughput.pixel_batch(cfg, 1, device, dtype).repeat(4, 1, 1, 1)
        g = torch.Generator(device=device).manual_seed(0)
        return throughput.fast_generate(model, ids, pixels, max_new_tokens=new_tokens, temperature=0.7,
                                       eos_token_id=-1, generator=g, compiled=compiled)

    def ours_eval():
        ids = prompt_ids(cfg, eval_batch, prompt_len, device)
        pixels = throughput.pixel_batch(cfg, eval_batch, device, dtype)
        return throughput.fast_generate(model, ids, pixels, max_new_tokens=new_tokens, eos_token_id=-1, compiled=compiled)

    def record(name, fn, samples, repeat=3):
        t = median_time(fn, device, 1, repeat)
        out[name] = {"s": t, "samples_per_s": samples / t, "tokens_per_s": samples * new_tokens / t}
        print(f"   {name}: {out[name]}", flush=True)

    record("ours_annotate_static_batch", ours_annotate, 4)
    record("ours_eval_greedy", ours_eval, eval_batch)
    model = None  # free the GPU memory before the next model
    if not with_hf or time.time() > deadline:
        return out
    from reference_bench import hf_model  # tests/: the transformers reference

    hf = hf_model(cfg, device, dtype)

    def hf_annotate():
        ids = prompt_ids(cfg, 1, prompt_len, device)
        pixels = throughput.pixel_batch(cfg, 1, device, dtype)
        torch.manual_seed(0)
        return hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=0.7, top_k=0, num_return_sequences=4, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=0)

    def hf_eval():
        ids = prompt_ids(cfg, eval_batch, prompt_len, device)
        pixels = throughput.pixel_batch(cfg, eval_batch, device, dtype)
        return hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    record("hf_annotate_num_return_sequences", hf_annotate, 4, repeat=2)
    if time.time() < deadline:
        record("hf_eval_greedy", hf_eval, eval_batch, repeat=2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="linear,dpo,generation")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--dpo-variants", default="dropout 0",
                   help=f"comma-separated, applied in order, each on top of the last: {', '.join(DPO_VARIANTS)}")
    p.add_argument("--decode-rounds", type=int, default=3, help="decode A/B: rounds of (fused, separate products)")
    p.add_argument("--deadline", type=float, default=0, help="seconds: start no new section after this (0: none)")
    p.add_argument("--out", default="profile")
    args = p.parse_args(argv)
    cfg, device = preset(args.preset), args.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    deadline = time.time() + (args.deadline or 10**9)
    variants = [v.strip() for v in args.dpo_variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in DPO_VARIANTS]
    if unknown:
        p.error(f"--dpo-variants: unknown {unknown}; known: {list(DPO_VARIANTS)}")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "card": throughput.card_peak(device)[0], "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "python tests/profile_bench.py " + " ".join(argv or sys.argv[1:])}
    sections = {"linear": lambda: linear_section(cfg, device, dtype, 1),
                "decode": lambda: decode_section(cfg, device, dtype, rounds=args.decode_rounds, out=partial, save=save),
                "dpo": lambda: dpo_section(cfg, device, dtype, args.pairs, deadline, partial, variants, save),
                "generation": lambda: generation_section(cfg, device, dtype, args.new_tokens, args.eval_batch,
                                                         deadline, not args.no_hf)}
    for name in args.sections.split(","):
        if time.time() > deadline:
            print(f"-- {name}: not run (deadline)")
            continue
        print(f"-- {name}", flush=True)
        started = time.time()
        partial = {}  # a section that fails part-way keeps what it measured before the failure

        def save():  # what the section has so far, on disk (the finished section overwrites it)
            (folder / f"{name}.json").write_text(json.dumps(dict(partial, **meta, unfinished=True), indent=1))
        try:
            result = sections[name]()
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
            result = dict(partial, error=f"{type(e).__name__}: {str(e)[:500]}")
            print(f"   {result['error']}", flush=True)
        result.update(meta, seconds=time.time() - started)
        (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
        throughput.reset_memory(device)


if __name__ == "__main__":
    main()
