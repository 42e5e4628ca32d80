"""Files every stage writes: atomic writes, `metrics.json` (flat keys, numbers) and the resolved `config.yaml`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch


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
