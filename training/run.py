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


class StageLocked(RuntimeError):
    """Another live process holds the stage directory's lock."""


class StageConfigMismatch(ValueError):
    """The stage directory holds a run made with a different configuration fingerprint."""


class StageLock:
    """Exclusive lock on a stage directory: `<dir>/.lock`, held with `fcntl.flock` for the stage's lifetime.

    The kernel drops a flock when its process dies (crash, kill -9), so a lock can never
    outlive its holder on the local machine: a `.lock` file that still names a holder but
    is not flocked is stale (that run died) and is taken over with a warning. The file
    holds the holder's PID, host, start time and command, which a second run reports
    when it stops. Release empties the file and unlocks it (it is not deleted: deleting a
    flocked file lets two processes lock two different inodes).
    """

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None
        self.stale_holder: dict | None = None  # the dead holder this lock was taken over from, if any

    @staticmethod
    def _read(fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"pid": "?", "host": "?", "note": f"unreadable lock file ({raw[:80]!r})"}

    def acquire(self) -> "StageLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd) or {}
            os.close(fd)
            raise StageLocked(
                f"{self.path.parent} is in use by PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}: {holder.get('command', '?')}). Two runs of one stage would "
                "overwrite each other's checkpoints and logs; wait for that run to finish, or stop it."
            ) from None
        self.stale_holder = self._read(fd)
        if self.stale_holder is not None:
            log.warning("%s: stale lock of PID %s on host %s (that run died without releasing it); taking it over",
                        self.path, self.stale_holder.get("pid"), self.stale_holder.get("host"))
        import socket
        import sys
        import time

        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    @classmethod
    def holder(cls, directory: str | os.PathLike) -> dict | None:
        """The live holder of `directory`'s lock ({pid, host, ...}), or None if nobody holds it."""
        import fcntl

        path = Path(directory) / cls.NAME
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return cls._read(fd) or {"pid": "?", "host": "?"}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def flatten_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": leaf}; lists stay values (compared whole)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def fingerprint_digest(values: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(dict(values), sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 20) -> list[str]:
    """Human-readable differences "key: old -> new" (keys only one side has show <absent>)."""
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if json.dumps(a, default=str) != json.dumps(b, default=str):
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: {show(a)} -> {show(b)}")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def stage_status(directory: str | os.PathLike) -> dict:
    """status.json of a stage directory, with a "running" stage that no live process holds reported as
    "interrupted" (its process was killed without a chance to write that itself)."""
    path = Path(directory) / "status.json"
    if not path.is_file():
        return {}
    status = json.loads(path.read_text())
    if status.get("status") == "running" and StageLock.holder(directory) is None:
        status = {**status, "status": "interrupted", "error": "the process died while the stage was running (killed?)"}
    return status


class _TermAsInterrupt:
    """While a stage runs in the main thread, SIGTERM (kill, a scheduler's time limit) raises
    KeyboardInterrupt, so the stage records "interrupted" and releases its lock on the way out."""

    def __enter__(self):
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

            self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


# Files a finished or crashed attempt leaves that a fresh attempt (force=true) must not resume from or append to.
ATTEMPT_OUTPUTS = ("checkpoints", "log.csv", "log.jsonl", "metrics.json", "status.json", "fingerprint.json")


class Stage:
    """One stage of a run: `<run_dir>/<name>/` with config.yaml, fingerprint.json, status.json and metrics.json.

        stage = Stage(cfg, "finetune", fingerprint=values)
        done = stage.finished(force=cfg.force)   # metrics of a finished run with the same fingerprint, or None
        with stage:                              # lock, fingerprint check, status running
            ...
            stage.metrics.update(wer=0.05)

    * fingerprint: the (flat) configuration values that change what the stage computes.
      A stage directory belongs to one fingerprint: a finished stage is reused only when
      it matches, and a different one (a finished run or a checkpoint to resume) is
      refused with the differing keys (`StageConfigMismatch`); `force=True` starts the
      stage from scratch instead (its checkpoints and logs are deleted). Stages written
      before fingerprints existed are compared through their saved config.yaml
      (`fingerprint_of_saved`, a function of the loaded config, says how).
    * lock: the writer holds `StageLock` while the stage runs; a second run stops at once
      (`StageLocked`, with the holder's PID and host).
    * status.json says running / done / failed (with the error) / interrupted (Ctrl-C,
      SIGTERM); a run killed outright stays "running" on disk, and `stage_status`
      reports it as "interrupted" because no live process holds its lock.
    """

    def __init__(self, cfg: Any, name: str, directory: str | os.PathLike | None = None,
                 fingerprint: Mapping[str, Any] | None = None, fingerprint_of_saved: Callable[[Any], Mapping[str, Any]] | None = None,
                 force: bool | None = None, attempt_outputs: tuple[str, ...] = ()):
        from training import ddp

        self.cfg = cfg
        self.name = name
        self.writer = ddp.is_main()  # under torchrun only rank 0 writes the stage files
        if directory is None:
            self.dir = stage_dir(cfg, name)
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.fingerprint_of_saved = fingerprint_of_saved
        self.force = bool(cfg.get("force", False)) if force is None else force
        self.attempt_outputs = ATTEMPT_OUTPUTS + tuple(attempt_outputs)  # what force=true deletes
        self.metrics: dict[str, Any] = {}
        self._lock = StageLock(self.dir)
        self._signals = _TermAsInterrupt()

    def _status(self, status: str, **extra: Any) -> None:
        atomic_write_text(self.dir / "status.json", json.dumps({"status": status, **extra}) + "\n")

    # ------------------------------------------------------------------ fingerprint
    def saved_fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint of the attempt already in the directory (None if there is none)."""
        path = self.dir / "fingerprint.json"
        if path.is_file():
            return json.loads(path.read_text())["values"]
        saved = self.dir / "config.yaml"
        if saved.is_file() and (self.dir / "status.json").is_file() and self.fingerprint_of_saved is not None:
            from omegaconf import OmegaConf

            return dict(self.fingerprint_of_saved(OmegaConf.load(saved)))
        return None

    def check_fingerprint(self) -> None:
        """Raise StageConfigMismatch if the directory holds an attempt with another fingerprint."""
        if self.fingerprint is None or not (self.dir / "status.json").is_file():
            return
        saved = self.saved_fingerprint()
        if saved is None:
            return
        diff = fingerprint_diff(saved, self.fingerprint)
        if diff:
            status = stage_status(self.dir).get("status", "?")
            raise StageConfigMismatch(
                f"{self.dir} holds a {status} {self.name} run with a different configuration:\n  " + "\n  ".join(diff)
                + "\nIts results and checkpoints belong to that configuration, so they are neither reported nor resumed. "
                "Pass force=true to discard them and run this stage from scratch, or give this configuration its own "
                "directory (run_name=<new name>, or paths.run_dir=...)."
            )

    @property
    def done(self) -> bool:
        status = stage_status(self.dir)
        return status.get("status") == "done" and (self.dir / "metrics.json").is_file()

    def finished(self, force: bool | None = None) -> dict | None:
        """Metrics of a finished attempt with this fingerprint (the stage can be skipped), else None.
        A finished or partial attempt with another fingerprint raises StageConfigMismatch unless forced."""
        force = self.force if force is None else force
        if force:
            return None
        self.check_fingerprint()
        if not self.done:
            return None
        log.info("%s is already done (status.json, same configuration fingerprint); skipping. Pass force=true to run it again.",
                 self.dir)
        return json.loads((self.dir / "metrics.json").read_text())

    def _clear_previous_attempt(self) -> None:
        import shutil

        removed = []
        for name in self.attempt_outputs:
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(name)
            elif path.exists():
                path.unlink()
                removed.append(name)
        if removed:
            log.warning("force=true: %s starts from scratch (deleted %s of the previous attempt)", self.dir, ", ".join(removed))

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "Stage":
        if not self.writer:
            return self
        self._lock.acquire()
        try:
            if self.force:
                self._clear_previous_attempt()
            else:
                self.check_fingerprint()
            if self.fingerprint is not None:
                atomic_write_text(self.dir / "fingerprint.json", json.dumps(
                    {"sha256": fingerprint_digest(self.fingerprint), "values": self.fingerprint}, indent=1, sort_keys=True, default=str) + "\n")
            save_config(self.dir, self.cfg)
            self._status("running", pid=os.getpid())
        except BaseException:
            self._lock.release()
            raise
        self._signals.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.writer:
            return False
        try:
            self._signals.__exit__(exc_type, exc, tb)
            if exc is None:
                write_metrics(self.dir, self.metrics)
                self._status("done")
            else:
                if self.metrics:
                    write_metrics(self.dir, self.metrics)
                status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
                self._status(status, error=f"{exc_type.__name__}: {exc}"[:2000])
        finally:
            self._lock.release()
        return False
