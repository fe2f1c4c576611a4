"""Several processes (torchrun --nproc_per_node N): DDP, or FSDP2 with --fsdp, and the model as the
training loop calls it (`distribute`).

Each micro-batch of the global batch is cut into N equal contiguous shares; DDP averages the
gradients, so a step equals the one-process step on the whole micro-batch. Only rank 0 evaluates,
logs and writes files (with --fsdp every process takes part in evaluating and saving, since each
holds a share of the weights).
"""

from __future__ import annotations

import os

import torch

from ..training import compile_blocks


def distribute(model, args, world: int):
    """The model as the training loop calls it: decoder blocks checkpointed (--gradient-checkpointing)
    and compiled (--compile), then wrapped for several processes: DDP, or FSDP2 shards (--fsdp),
    which replace the parameters in place (so the optimizer is made after this, from what trains
    now). One process: the model itself."""
    model.language_model.gradient_checkpointing = args.gradient_checkpointing
    if args.compile:
        compile_blocks(model)  # after LoRA is in place: the adapters compile with each block
    return shard_fsdp(model, world, args.device) if args.fsdp else wrap_ddp(model, world, args.device)


def refuse_unsupported(args, world: int, image_conditional: bool) -> None:
    """What several processes cannot do yet, refused by name before any work."""
    if world > 1 and args.fsdp and (args.demo or getattr(args, "ref", None) == "live"):
        dpo = hasattr(args, "ref")  # train_dpo.py's --ref live needs the model on rank 0 too
        raise SystemExit("--fsdp: the demo's report " + ("and --ref live run" if dpo else "runs") + " the model on rank 0 "
                         "alone, which a sharded model cannot do; " + ("use --ref precomputed and a --model" if dpo else
                                                                       "give a --model"))
    if world > 1 and image_conditional:
        raise SystemExit(f"--loss-type {args.loss_type} runs in one process for now: its step has two forwards "
                         "(the corrupted image's too), and DDP allows one per backward")


def init_distributed(args) -> tuple[int, int]:
    """(rank, world size). Under torchrun: join the process group (NCCL on CUDA, gloo on CPU) and
    pick this process's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if torch.device(args.device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(model, world: int, device: str):
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp(model, world: int, device: str):
    """FSDP2 (`fully_shard`, Zhao et al. 2023, arXiv 2304.11277): each process keeps 1/world of every
    weight, gradient and AdamW moment. A decoder block's weights are gathered whole just before its
    forward (and again for its backward) and freed after; its gradients are reduce-scattered (summed
    and averaged over processes, as DDP averages them, then each process keeps its share). One shard
    group per block, so one block's weights at a time are whole; the rest of the model (tower,
    projector, embeddings, LM head) is the root group. The model is changed in place and returned:
    its parameters are now DTensors (`p.full_tensor()` gathers one whole)."""
    if world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # One all-gather per group needs one dtype: bf16 weights with float32 LoRA adapters are gathered
    # and computed in bf16 (as autocast computes them anyway); gradients are reduced in float32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.device(device).type == "cuda" else MixedPrecisionPolicy()
    for block in model.language_model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t):
    """A DTensor gathered whole (a collective: every process must call it), else t itself."""
    return t.full_tensor() if is_sharded(t) else t


def like(param, full: torch.Tensor):
    """full, placed as `param` is: this process's shard of it when param is a DTensor."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def my_share(micro: list[int], rank: int, world: int) -> list[int]:
    per = len(micro) // world
    return micro[rank * per:(rank + 1) * per]


def sum_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


def mean_over_ranks(metrics: dict, world: int) -> dict:
    if world == 1:
        return metrics
    values = sum_over_ranks(torch.tensor(list(metrics.values()), dtype=torch.float64), world) / world
    return dict(zip(metrics, values.tolist()))


def finish_distributed(world: int):
    """Every rank waits for the others before the process group goes: a rank that tears it down
    while rank 0 is still saving can abort in gloo ("terminate called without an active exception",
    seen once in CI on 2 CPU cores)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
