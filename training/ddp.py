"""Data-parallel training with torchrun: the few helpers the loop and the tasks need.

Launched by `torchrun --nproc_per_node=N ...` (or `python -m torch.distributed.run`),
each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment; without
them everything here is a single-process no-op, so the same code runs both ways.
CPU-only machines use the gloo backend.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def setup_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_distributed():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel when distributed (rank 0's parameters are broadcast to all), else the model itself.

    Move the model to its device (`common.device.resolve_device`) first. Every trainable
    parameter must get a gradient in every step on every rank unless `find_unused_parameters`
    (slower: DDP then walks the autograd graph after each forward); AV-HuBERT's modality
    dropout keeps the dropped branch in the graph for this reason, and layer drop, which skips
    whole layers, needs the flag (training/avhubert/finetune.py sets it when model.encoder_layerdrop > 0).
    """
    if not is_distributed():
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("wrap_ddp: the model has no trainable parameters")
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what gets saved and evaluated)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(metrics: Mapping[str, float]) -> dict[str, float]:
    """Mean of each metric over ranks (every rank must call it with the same keys, in the same order)."""
    if not is_distributed() or not metrics:
        return {k: float(v) for k, v in metrics.items()}
    keys = list(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= world_size()
    return dict(zip(keys, values.tolist()))


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank; keeps decisions such as skipping a step identical everywhere."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one when not distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
