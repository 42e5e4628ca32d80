"""AdamW with the usual no-decay split, and the learning-rate schedules the tasks use.

`lr_schedule` returns a *multiplier* of the peak learning rate, so it plugs into
`torch.optim.lr_scheduler.LambdaLR` (whose state then holds only numbers and is
saved with the checkpoint). Step `k` is the 0-based index of the optimizer update
about to be made: LambdaLR evaluates the lambda at 0 on construction and at k
after k calls to `scheduler.step()`.

Tri-stage is fairseq's schedule used by AV-HuBERT / wav2vec 2.0 fine-tuning:
linear warm-up from `init_lr_scale * lr` to `lr`, hold at `lr`, then exponential
decay to `final_lr_scale * lr` over the remaining steps, and flat after that.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

SCHEDULES = ("tri_stage", "cosine", "constant")


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    # Biases, norm gains and per-feature vectors (e.g. mask parameters) are not
    # weights that grow with capacity; decaying them only biases them to zero.
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def _split_decay(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    decay, no_decay, seen = [], [], set()
    for name, param in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if _is_no_decay(name, param) else decay).append(param)
    return decay, no_decay


def _named(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)
        elif isinstance(item, torch.Tensor):
            out.append((f"param{i}", item))
        else:
            raise TypeError(f"build_optimizer: expected parameters or (name, parameter) pairs, got {type(item).__name__}")
    return out


def build_optimizer(
    params_or_groups: nn.Module | Iterable[Any],
    lr: float,
    weight_decay: float = 0.01,
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and 1-d parameters.

    `params_or_groups` is a module, an iterable of parameters or of (name, parameter)
    pairs, or a list of param-group dicts (`{"params": ..., "lr": ...}`, params as
    tensors or (name, tensor) pairs); each group is split in a decay and a no-decay
    half that keep the group's other options. Frozen parameters are left out.
    """
    if len(tuple(betas)) != 2:
        raise ValueError(f"build_optimizer: betas must have 2 values, got {list(betas)}")
    if isinstance(params_or_groups, nn.Module):
        groups_in = [{"params": list(params_or_groups.named_parameters())}]
    else:
        items = list(params_or_groups)
        if items and all(isinstance(g, dict) for g in items):
            groups_in = [dict(g, params=list(g["params"])) for g in items]
        else:
            groups_in = [{"params": items}]

    groups = []
    for group in groups_in:
        options = {k: v for k, v in group.items() if k != "params"}
        decay, no_decay = _split_decay(_named(group["params"]))
        group_wd = options.pop("weight_decay", weight_decay)
        if decay:
            groups.append({"params": decay, "weight_decay": group_wd, **options})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **options})
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters (every parameter has requires_grad=False)")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def lr_schedule(
    step: int,
    max_steps: int,
    schedule: str = "tri_stage",
    warmup_frac: float = 0.1,
    hold_frac: float = 0.4,
    final_lr_scale: float = 0.05,
    init_lr_scale: float = 0.01,
) -> float:
    """Learning-rate multiplier at 0-based update `step` (see module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule: schedule={schedule!r}, expected one of {SCHEDULES}")
    if max_steps <= 0:
        raise ValueError(f"lr_schedule: max_steps must be > 0, got {max_steps}")
    if not (0 <= warmup_frac <= 1 and 0 <= hold_frac <= 1 and warmup_frac + hold_frac <= 1):
        raise ValueError(f"lr_schedule: need 0 <= warmup_frac, hold_frac and warmup_frac + hold_frac <= 1, got {warmup_frac}, {hold_frac}")
    if not 0 < final_lr_scale <= 1:
        raise ValueError(f"lr_schedule: final_lr_scale must be in (0, 1], got {final_lr_scale}")

    warmup = int(max_steps * warmup_frac)
    if step < warmup:
        return init_lr_scale + (1.0 - init_lr_scale) * step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return final_lr_scale + (1.0 - final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))
    hold = int(max_steps * hold_frac)
    decay = max_steps - warmup - hold
    if step < warmup + hold:
        return 1.0
    if decay <= 0 or step >= warmup + hold + decay:
        return final_lr_scale
    return math.exp(math.log(final_lr_scale) * (step - warmup - hold) / decay)


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, **schedule_kwargs: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_schedule`; `schedule_kwargs` are lr_schedule's keyword arguments."""
    lr_schedule(0, max_steps, **schedule_kwargs)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_schedule, max_steps=max_steps, **schedule_kwargs))


def optimizer_and_scheduler_from_config(params_or_groups: Any, trainer_cfg: Any):
    """(optimizer, scheduler) from a `TrainerConfig` (or anything with the same fields)."""
    optimizer = build_optimizer(params_or_groups, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay, betas=tuple(trainer_cfg.betas))
    scheduler = build_scheduler(
        optimizer,
        trainer_cfg.max_steps,
        schedule=trainer_cfg.schedule,
        warmup_frac=trainer_cfg.warmup_frac,
        hold_frac=trainer_cfg.hold_frac,
        final_lr_scale=trainer_cfg.final_lr_scale,
        init_lr_scale=trainer_cfg.init_lr_scale,
    )
    return optimizer, scheduler
