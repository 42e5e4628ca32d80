"""Run directories, stage outputs and seeding: what every stage of every entry point shares.

A stage (prepare, pretrain, finetune, evaluate, export, attack/<scenario>, ...)
writes into `<paths.run_dir>/<stage>/`: `metrics.json` (flat keys, numbers),
`config.yaml` (the resolved config) and whatever else it produces.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file)` on a temp file next to `path`, fsync, then rename it over `path`:
    readers see the old file or the whole new one, never a part (an interrupted write leaves
    only a `.<name>.*.tmp` file, which nothing picks up)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def stage_dir(cfg: Any, stage: str) -> Path:
    d = Path(cfg.paths.run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts -> flat `a/b` keys; only numbers survive (bools become 0/1)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (bool, np.bool_)):
            flat[name] = float(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            flat[name] = float(value) if not isinstance(value, (int, np.integer)) else int(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            flat[name] = float(value.item())
    return flat


def write_metrics(directory: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics.json` (flat, numbers only; NaN/inf written as null) atomically."""
    flat = flatten_metrics(metrics)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}
    path = Path(directory) / "metrics.json"
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


def save_config(directory: str | os.PathLike, cfg: Any) -> Path:
    """Write the resolved config next to a stage's outputs."""
    from omegaconf import OmegaConf

    path = Path(directory) / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch Generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class SkipCounter:
    """Counts skipped items per reason (`data.on_error=skip`) and reports them once."""

    def __init__(self, stage: str):
        self.stage = stage
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, detail: str) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, detail)
        log.warning("%s: skipped (%s): %s", self.stage, reason, detail)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def report(self) -> dict[str, int]:
        if self.total:
            lines = [f"  {n} x {r} (e.g. {self.examples[r]})" for r, n in self.reasons.most_common()]
            log.warning("%s: %d items skipped:\n%s", self.stage, self.total, "\n".join(lines))
        return {f"skipped/{r}": n for r, n in self.reasons.items()} | {"skipped/total": self.total}


class Stage:
    """One stage of a run: `<run_dir>/<name>/` with config.yaml, status.json and metrics.json.

        with Stage(cfg, "finetune") as stage:
            ...
            stage.metrics.update(wer=0.05)

    status.json says running / done / failed (with the error), so an interrupted
    or crashed stage is visible to `scripts.make_tables` instead of vanishing.
    """

    def __init__(self, cfg: Any, name: str, directory: str | os.PathLike | None = None):
        from training import ddp

        self.cfg = cfg
        self.name = name
        self.writer = ddp.is_main()  # under torchrun only rank 0 writes the stage files
        if directory is None:
            self.dir = stage_dir(cfg, name)
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {}

    def _status(self, status: str, **extra: Any) -> None:
        atomic_write_text(self.dir / "status.json", json.dumps({"status": status, **extra}) + "\n")

    @property
    def done(self) -> bool:
        path = self.dir / "status.json"
        return path.is_file() and json.loads(path.read_text()).get("status") == "done" and (self.dir / "metrics.json").is_file()

    def __enter__(self) -> "Stage":
        if self.writer:
            save_config(self.dir, self.cfg)
            self._status("running")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.writer:
            return False
        if exc is None:
            write_metrics(self.dir, self.metrics)
            self._status("done")
        else:
            if self.metrics:
                write_metrics(self.dir, self.metrics)
            self._status("failed", error=f"{exc_type.__name__}: {exc}"[:2000])
        return False
