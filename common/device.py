"""Where a model and its batches run: `trainer.device` resolved to a torch.device, and batches moved there.

    auto      cuda:<local rank> when CUDA is available, else cpu
    cpu       the CPU
    cuda      cuda:<local rank> (under torchrun each process takes the GPU of its local rank)
    cuda:N    that GPU

Every task (pretrain, finetune, evaluate, export, attack, the federated clients and the
centralised baseline) resolves its device here, moves its model once and each batch with
`move_to_device` (non_blocking: with pinned loader memory the copy overlaps compute).
Plain PyTorch, no configuration objects: models, privacy and training code all use it.
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(spec: str = "auto", local_rank: int = 0, field: str = "trainer.device") -> torch.device:
    """The torch.device for a `trainer.device` value; an unusable value is an error naming `field`."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ValueError(f"{field}={spec!r}: expected {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ValueError(f"{field}={spec!r}: this machine has no usable CUDA device (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); use {field}=cpu or {field}=auto. "
                         "README.md 'Set-up' says how to install the CUDA build of torch.")
    index = int(match.group(1)) if match.group(1) is not None else local_rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"{field}={spec!r}: GPU index {index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(f"cuda:{index}")


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Tensors inside dicts / lists / tuples / dataclasses moved to `device`; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return type(obj)((k, move_to_device(v, device, non_blocking)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, non_blocking) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: move_to_device(getattr(obj, f.name), device, non_blocking) for f in fields(obj) if f.init})
    return obj


def pin_memory_for(device: torch.device) -> bool:
    """DataLoader pin_memory: only worth it (and only possible) when batches go to a GPU."""
    return device.type == "cuda"


__all__ = ["DEVICE_CHOICES", "move_to_device", "pin_memory_for", "resolve_device"]
