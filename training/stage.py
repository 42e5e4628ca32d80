"""A stage of a run and its directory: what every stage of every entry point shares.

A stage (pretrain, finetune, evaluate, export, attack/<scenario>, federated, ...)
writes into `<paths.run_dir>/<stage>/`: `metrics.json` (flat keys, numbers),
`config.yaml` (the resolved config), `fingerprint.json` (the configuration values
that define what it computes, training/fingerprint.py), `status.json` and whatever
else it produces, and holds `.lock` while it runs.

`open_stage(cfg, name)` is the one way a stage is opened, and `skip_if_done(cfg, name)`
(its `finished()`) the one stage-done check every entry uses: status done, metrics
written, same fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from common.config_diff import config_diff
from common.files import atomic_write_text, save_config, write_metrics
from training.fingerprint import fingerprint_digest, stage_fingerprint

log = logging.getLogger(__name__)


def stage_dir(cfg: Any, stage: str) -> Path:
    d = Path(cfg.paths.run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


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
        diff = config_diff(saved, self.fingerprint)
        if diff:
            status = stage_status(self.dir).get("status", "?")
            raise StageConfigMismatch(
                f"{self.dir} holds an earlier {self.name} run ({status}) made with a different configuration:\n  " + "\n  ".join(diff)
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


def open_stage(cfg: Any, name: str, directory: str | os.PathLike | None = None, **kwargs: Any) -> Stage:
    """The Stage `name` of this run (`<run_dir>/<name>`, or `directory`), with its configuration fingerprint."""
    return Stage(cfg, name, directory=directory, fingerprint=stage_fingerprint(cfg, name),
                 fingerprint_of_saved=lambda saved: stage_fingerprint(saved, name), **kwargs)


def skip_if_done(cfg: Any, name: str, directory: str | os.PathLike | None = None) -> dict | None:
    """The one stage-done check: the metrics of stage `name` if it finished with this configuration's
    fingerprint (skip it), else None; a finished or partial attempt with another fingerprint raises
    StageConfigMismatch, and `force=true` always answers None (run it again, from scratch)."""
    return open_stage(cfg, name, directory=directory).finished()
