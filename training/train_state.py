"""Training checkpoints that survive a crash at any moment.

`save_checkpoint` writes `checkpoint_<step>.pt` through a temp file in the same
directory (write, fsync, os.replace), then points `checkpoint_last.pt` at it by
the same rename trick (a hard link, so it costs no space), then deletes all but
the newest `keep` numbered checkpoints. A reader therefore sees either a whole
checkpoint or none; temp files (`.checkpoint_*.tmp`) are never candidates.

Checkpoints are loaded with `torch.load(weights_only=True)`: no pickled code runs
on load, so a checkpoint may hold only tensors, Python primitives and
dicts/lists/tuples of them. `save_checkpoint` checks this before writing, so a
state that could not be loaded back fails at save time, naming the key.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from common.files import atomic_write, zip_integrity_error

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
LAST_NAME = "checkpoint_last.pt"
_PRIMITIVES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds more than tensors and primitives."""


def _check_weights_only(value: Any, where: str) -> None:
    if isinstance(value, (torch.Tensor, *_PRIMITIVES)):
        return
    if isinstance(value, (dict, OrderedDict)):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint state {where}: key {k!r} is a {type(k).__name__}; weights_only checkpoints need str/int keys")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint state {where} is a {type(value).__module__}.{type(value).__name__}; "
        "store only tensors, Python primitives and dicts/lists/tuples of them (e.g. numpy arrays as torch tensors)"
    )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _point_last_at(path: Path) -> Path:
    last = path.parent / LAST_NAME
    tmp = path.parent / f".{LAST_NAME}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: a copy is still complete before the rename
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)
    return last


def checkpoint_paths(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints in `directory`, newest first (no validity check)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(directory: str | os.PathLike, step: int, state: Mapping[str, Any], keep: int = 2) -> Path:
    """Write `<directory>/checkpoint_<step>.pt` atomically, repoint `checkpoint_last.pt`, keep the newest `keep`."""
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}")
    _check_weights_only(dict(state), "state")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint_{int(step)}.pt"
    _atomic_torch_save(dict(state), path)
    _point_last_at(path)
    _fsync_dir(directory)
    for _, old in checkpoint_paths(directory)[keep:]:
        old.unlink(missing_ok=True)
    # A crash mid-write leaves a temp file; only one process writes here, so it is garbage.
    for stale in directory.glob(".checkpoint_*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap structural check: a torch zip archive whose central directory (written last) is intact."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("data.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """Newest complete numbered checkpoint in `directory`, or None. Broken newer ones are warned about and skipped."""
    for step, path in checkpoint_paths(directory):
        if is_complete_checkpoint(path):
            return path
        log.warning("checkpoint %s is incomplete or corrupt; falling back to an older one", path)
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with `torch.load(weights_only=True)` after checking every member of its zip
    archive against the stored CRC-32; CheckpointError names the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damage = zip_integrity_error(path)
    if damage is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {damage}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and Python primitives, which weights_only=True "
            f"refuses to unpickle (not written by training.train_state.save_checkpoint, or untrusted): {e}"
        ) from e
    except Exception as e:  # a damaged file fails in many ways (RuntimeError, EOFError, KeyError, ...)
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a torch checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict of training state")
    return state


def load_latest_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint that fully loads; unloadable newer ones are warned about and skipped."""
    for _, path in checkpoint_paths(directory):
        if not is_complete_checkpoint(path):
            log.warning("checkpoint %s is incomplete or corrupt; falling back to an older one", path)
            continue
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            log.warning("%s; falling back to an older one", e)
    return None
