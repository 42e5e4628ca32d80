"""The training loop of the AV-HuBERT stages (pretrain, finetune) and the attacker.

Two loops live below training/ on purpose: the Flower client's local training
(privacy.federated.task.train_local: a fixed number of DP-SGD steps on a fresh
optimiser every round, runnable without Hydra on a SuperNode) and wav2vec 2.0
self-supervised pretraining (models.wav2vec2.pretrain_wav2vec2_tiny: Hugging
Face's pretraining loss on a plain step count). Neither checkpoints, evaluates
or logs as this loop does.

A task supplies the model and a `step_fn(model, batch) -> (loss, logs)`; this file
does the rest, in this order for every batch:

    forward (step_fn) -> non-finite loss? skip
    backward -> clip grad norm -> non-finite grad? skip
    optimizer.step() -> after_optimizer_step(step) -> scheduler.step() -> zero_grad()
    every log_every updates: log means since the last log
    every eval_every updates (and at the end): eval_fn on rank 0
    every ckpt_every updates (and at the end): checkpoint on rank 0

`step` counts optimizer updates. `after_optimizer_step(step)` gets the 0-based
index of the update just applied, after the parameters changed and while the
gradients still exist: AdaLoRA's `update_and_allocate(global_step)` needs
exactly that (it reads the gradients to score and prune ranks).

A skipped ("bad") step consumes its batch but makes no update and does not
advance `step` or the schedule. `max_bad_steps` bad steps in a row stop
training with `TrainingDiverged`.

Exact resume: the checkpoint holds the model, optimizer, scheduler, step, data
position (epoch + batches consumed in it, handed to the sampler), the RNG
states of torch / numpy / python / every generator in `generators`, per rank,
the bad-step counters, the partial logging window and the logger's file
lengths. Resuming from it continues the very same sequence: on CPU an
interrupted run ends bit-identical to an uninterrupted one. Evaluation runs
with the RNG states saved and restored around it, so how often one evaluates
does not change training.

Resumable samplers: the loop looks for `state_dict` / `load_state_dict` on
`loader.batch_sampler`, else on `loader.sampler`. At a checkpoint it stores the
sampler's `state_dict()` with the keys "epoch" and "batches_consumed" set by the
loop (the loop knows how many batches it consumed; a sampler behind prefetching
DataLoader workers has handed out more). `load_state_dict` must make the next
`__iter__` produce epoch "epoch"'s order without its first "batches_consumed"
batches; `set_epoch(e)` starts epoch e from the beginning. A sampler without
state is fast-forwarded by drawing and discarding batches (exact, but slow).
Randomness inside DataLoader worker processes is reseeded per iterator, so it
is only resumed exactly with num_workers=0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from common.device import move_to_device
from common.progress import Progress, format_duration
from common.seeding import capture_rng_state, preserved_rng, restore_rng_state
from training import ddp
from training.train_state import checkpoint_paths, load_latest_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, Mapping[str, Any]]"]
EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    step: int  # optimizer updates done
    bad_steps_total: int
    last_logs: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[Path] = None  # the last checkpoint written (rank 0) or None
    resumed_from: Optional[Path] = None


# --------------------------------------------------------------------------- data position
def _resumable_sampler(loader: Any) -> Any:
    for candidate in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if candidate is not None and hasattr(candidate, "state_dict") and hasattr(candidate, "load_state_dict"):
            return candidate
    return None


def _set_epoch(loader: Any, epoch: int) -> None:
    for candidate in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if candidate is not None and hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return


def _new_iterator(loader: Any) -> Iterator[Any]:
    # Creating a DataLoader iterator draws a base seed from the global torch RNG;
    # forking keeps that draw out of the training sequence, so that a resumed run
    # (which creates its iterator mid-epoch) consumes the same random numbers.
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


# --------------------------------------------------------------------------- helpers
def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def _grad_norm(params: list[torch.Tensor], clip: float) -> float:
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _autocast(precision: str, model: nn.Module):
    """bf16 autocast on CUDA (precision bf16, or auto on a GPU that supports bf16); fp32 elsewhere."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}; expected auto, fp32 or bf16")
    device = next(model.parameters()).device
    if device.type == "cuda" and (precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        log.info("mixed precision bf16 is off on %s; training in fp32", device.type)
    return contextlib.nullcontext


def _keyed(name: str) -> str:
    return name if "/" in name else f"train/{name}"


# --------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    step_fn: StepFn,
    train_loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    max_steps: int,
    ckpt_dir: str | Path | None = None,
    logger: Any = None,
    eval_fn: EvalFn | None = None,
    after_optimizer_step: Callable[[int], None] | None = None,
    grad_clip: float = 1.0,
    log_every: int = 10,
    eval_every: int = 0,
    ckpt_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = True,
    max_bad_steps: int = 5,
    generators: Mapping[str, torch.Generator] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    progress_bar: bool = True,
    precision: str = "fp32",
    device: torch.device | None = None,
    progress_seconds: float = 60.0,
    desc: str = "train",
) -> TrainResult:
    """Train `model` for `max_steps` optimizer updates (see the module docstring for the order of things).

    model          the module to train, DDP-wrapped or not (`ddp.wrap_ddp`); only
                   parameters with requires_grad are clipped/checked (the optimizer
                   should hold only those: `optim.build_optimizer` does that).
    step_fn        (model, batch) -> (scalar loss tensor, {name: number}); the batch is
                   already on `device` (when given). Log names without "/" get "train/".
    device         where the batches go (`common.device.move_to_device`, non_blocking);
                   the model must already be there. None: batches are used as loaded.
    eval_fn        (unwrapped model, step) -> {name: number}; called on rank 0 only,
                   in eval mode under no_grad, logged as "eval/<name>".
    ckpt_dir       where checkpoints go (None: no checkpoints, no resume).
    logger         a `training.run_logger.RunLogger` (or None); used on rank 0 only.
    generators     extra torch.Generators whose state must be resumed (noise, data).
    extra_state    objects with state_dict()/load_state_dict() saved with the
                   checkpoint (e.g. AdaLoRA's rank allocator statistics).
    progress_bar   a tqdm bar when stderr is a terminal (rank 0); in a log file the
                   step lines every `log_every` steps carry time per step, throughput
                   and ETA, and a progress line is logged whenever `progress_seconds`
                   pass without one (common.progress).
    desc           names the phase in progress lines ("pretrain", "finetune", ...).
    """
    if max_steps < 0:
        raise ValueError(f"train: max_steps must be >= 0, got {max_steps}")
    if max_bad_steps < 1:
        raise ValueError(f"train: max_bad_steps must be >= 1, got {max_bad_steps}")
    if log_every < 1 or eval_every < 0 or ckpt_every < 0:
        raise ValueError(f"train: need log_every >= 1, eval_every >= 0, ckpt_every >= 0; got {log_every}, {eval_every}, {ckpt_every}")
    raw_model = ddp.unwrap(model)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("train: the model has no parameter with requires_grad=True")
    generators = dict(generators or {})
    extra_state = dict(extra_state or {})
    is_main = ddp.is_main()
    rank = ddp.rank()
    logger = logger if (logger is not None and is_main) else None
    sampler = _resumable_sampler(train_loader)
    autocast = _autocast(precision, raw_model)

    step = epoch = batches_in_epoch = 0
    bad_in_row = bad_total = 0
    window: dict[str, list[float]] = {}  # name -> [sum, count] since the last log
    resumed_from: Path | None = None
    last_logs: dict[str, float] = {}
    last_eval: dict[str, float] = {}

    if ckpt_dir is not None and resume:
        found = load_latest_checkpoint(ckpt_dir)
        if found is not None:
            resumed_from, state = found
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            step, epoch, batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
            bad_in_row, bad_total = state["bad_in_row"], state["bad_total"]
            window = {k: list(v) for k, v in state["window"].items()}
            last_logs, last_eval = dict(state["last_logs"]), dict(state["last_eval"])
            for name, obj in extra_state.items():
                obj.load_state_dict(state["extra"][name])
            if logger is not None:
                logger.load_state_dict(state["logger"])
            rng_per_rank = state["rng"]
            if len(rng_per_rank) != ddp.world_size():
                log.warning("checkpoint was written by %d processes, now %d: RNG streams are not resumed exactly", len(rng_per_rank), ddp.world_size())
            restore_rng_state(rng_per_rank[rank % len(rng_per_rank)], generators)
            if sampler is not None:
                sampler.load_state_dict({**state["sampler"], "epoch": epoch, "batches_consumed": batches_in_epoch})
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resumed_from, step, epoch, batches_in_epoch)
    if resumed_from is None and ckpt_dir is not None and checkpoint_paths(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} holds checkpoints of an earlier run but resume is off or none of them loads; "
            "resume it (trainer.resume=true) or use a fresh run directory"
        )
    if resumed_from is None:
        if logger is not None and hasattr(logger, "reset"):
            logger.reset()
        _set_epoch(train_loader, epoch)

    batches = _new_iterator(train_loader)
    if resumed_from is not None and sampler is None and batches_in_epoch:
        log.warning("the train sampler has no state_dict; skipping %d batches to reach the resume position", batches_in_epoch)
        with preserved_rng(generators):
            for _ in range(batches_in_epoch):
                next(batches)

    def save(at_step: int) -> Path | None:
        rng_all = ddp.all_gather_object(capture_rng_state(generators))
        path = None
        if is_main:
            state = {
                "step": at_step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "sampler": {**(sampler.state_dict() if sampler is not None else {}), "epoch": epoch, "batches_consumed": batches_in_epoch},
                "rng": rng_all,
                "bad_in_row": bad_in_row,
                "bad_total": bad_total,
                "window": window,
                "logger": logger.state_dict() if logger is not None else {},
                "extra": {name: obj.state_dict() for name, obj in extra_state.items()},
                "last_logs": last_logs,
                "last_eval": last_eval,
                "world_size": ddp.world_size(),
            }
            path = save_checkpoint(ckpt_dir, at_step, state, keep=keep_checkpoints)
        ddp.barrier()
        return path

    progress = Progress(total=max_steps, desc=desc, unit="step", initial=step, seconds=progress_seconds, enabled=is_main,
                        terminal=None if progress_bar else False)
    items_in_window = 0  # utterances (batch rows) since the last step line: throughput
    last_ckpt: Path | None = resumed_from
    empty_iterators = 0
    tick = time.perf_counter()
    model.train()
    try:
        while step < max_steps:
            try:
                batch = next(batches)
            except StopIteration:
                empty_iterators = empty_iterators + 1 if batches_in_epoch == 0 else 0
                if empty_iterators >= 2:
                    raise ValueError("train: the train loader yields no batches (empty dataset, or batch size > dataset with drop_last)")
                epoch, batches_in_epoch = epoch + 1, 0
                _set_epoch(train_loader, epoch)
                batches = _new_iterator(train_loader)
                continue
            batches_in_epoch += 1
            if device is not None:
                batch = move_to_device(batch, device)

            with autocast():
                loss, logs = step_fn(model, batch)
            grad_norm = float("nan")
            bad = ddp.any_rank(not bool(torch.isfinite(loss.detach()).all()))
            if not bad:
                loss.backward()
                grad_norm = _grad_norm(trainable, grad_clip)
                bad = ddp.any_rank(not math.isfinite(grad_norm))
            if bad:
                optimizer.zero_grad(set_to_none=True)
                bad_in_row += 1
                bad_total += 1
                log.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row)", step, _scalar(loss), grad_norm, bad_in_row)
                if bad_in_row >= max_bad_steps:
                    raise TrainingDiverged(
                        f"training stopped at step {step} (epoch {epoch}, batch {batches_in_epoch}): {bad_in_row} consecutive "
                        f"steps with a non-finite loss or gradient (last loss {_scalar(loss)}, grad norm {grad_norm}; "
                        f"max_bad_steps={max_bad_steps}, {bad_total} bad steps in total). Lower the learning rate, "
                        "check the input data, or raise trainer.max_bad_steps."
                    )
                continue
            bad_in_row = 0

            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if after_optimizer_step is not None:
                after_optimizer_step(step)
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            items_in_window += _batch_rows(batch)

            for name, value in {"train/loss": loss, **{_keyed(k): v for k, v in logs.items()}, "train/grad_norm": grad_norm}.items():
                acc = window.setdefault(name, [0.0, 0])
                acc[0] += _scalar(value)
                acc[1] += 1
            window.setdefault("lr", [0.0, 0])
            window["lr"][0] += lr
            window["lr"][1] += 1

            if step % log_every == 0 or step == max_steps:
                steps_in_window = window["train/loss"][1]
                means = ddp.all_reduce_mean({k: window[k][0] / window[k][1] for k in sorted(window)})
                window = {}
                means["train/bad_steps_total"] = bad_total
                now = time.perf_counter()
                means["perf/sec_per_step"] = (now - tick) / steps_in_window
                tick = now
                last_logs = means
                if logger is not None:
                    logger.log(step, means)
                if is_main:
                    sec = means["perf/sec_per_step"]
                    rate = f"  {items_in_window / (sec * steps_in_window):.3g} utt/s" if items_in_window else ""
                    log.info("%s step %d/%d (%.0f%%)  loss %.4f  lr %.3e  grad_norm %.3f  %.3g s/step%s  ETA %s", desc, step, max_steps,
                             100 * step / max(1, max_steps), means["train/loss"], means["lr"], means["train/grad_norm"], sec, rate,
                             format_duration((max_steps - step) * sec))
                    progress.update(1, loss=f"{means['train/loss']:.4g}", lr=f"{means['lr']:.2e}", quiet=True)
                items_in_window = 0
            else:
                progress.update(1)

            if eval_fn is not None and ((eval_every > 0 and step % eval_every == 0) or step == max_steps):
                if is_main:
                    raw_model.eval()
                    with preserved_rng(generators), torch.no_grad():
                        metrics = eval_fn(raw_model, step)
                    raw_model.train()
                    last_eval = {f"eval/{k}" if "/" not in k else k: _scalar(v) for k, v in metrics.items()}
                    if logger is not None:
                        logger.log(step, last_eval)
                    log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
                ddp.barrier()

            if ckpt_dir is not None and ((ckpt_every > 0 and step % ckpt_every == 0) or step == max_steps):
                last_ckpt = save(step) or last_ckpt
    finally:
        progress.close()
    return TrainResult(step=step, bad_steps_total=bad_total, last_logs=last_logs, last_eval=last_eval, checkpoint=last_ckpt, resumed_from=resumed_from)


def loop_kwargs_from_config(trainer_cfg: Any) -> dict[str, Any]:
    """`train` keyword arguments from a `TrainerConfig` (the schedule/optimizer fields go to `optim`)."""
    return {
        "max_steps": trainer_cfg.max_steps,
        "grad_clip": trainer_cfg.grad_clip,
        "log_every": trainer_cfg.log_every,
        "eval_every": trainer_cfg.eval_every,
        "ckpt_every": trainer_cfg.ckpt_every,
        "keep_checkpoints": trainer_cfg.keep_checkpoints,
        "resume": trainer_cfg.resume,
        "max_bad_steps": trainer_cfg.max_bad_steps,
        "progress_bar": trainer_cfg.progress_bar,
        "precision": trainer_cfg.precision,
    }


def _batch_rows(batch: Any) -> int:
    """Utterances in a batch (for throughput): len(ids), or the first tensor's batch dimension; 0 if unknown."""
    if isinstance(batch, Mapping):
        if "ids" in batch:
            return len(batch["ids"])
        batch = list(batch.values())
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.dim():
                return int(item.shape[0])
    return 0
