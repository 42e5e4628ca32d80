"""A stage of a run and its directory: what every stage of every entry point shares.

A stage (prepare, pretrain, finetune, evaluate, export, attack/<scenario>, ...)
writes into `<paths.run_dir>/<stage>/`: `metrics.json` (flat keys, numbers),
`config.yaml` (the resolved config) and whatever else it produces.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from common.files import atomic_write_text, save_config, write_metrics

log = logging.getLogger(__name__)


def stage_dir(cfg: Any, stage: str) -> Path:
    d = Path(cfg.paths.run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def finished_metrics(directory: str | os.PathLike) -> dict | None:
    """The metrics of a finished stage (status.json says done and metrics.json exists), else None.

    The one "is this stage done?" check: a sweep re-running a finished stage skips it.
    """
    directory = Path(directory)
    status, metrics = directory / "status.json", directory / "metrics.json"
    if status.is_file() and metrics.is_file() and json.loads(status.read_text()).get("status") == "done":
        return json.loads(metrics.read_text())
    return None


def skip_if_done(cfg: Any, directory: str | os.PathLike) -> dict | None:
    """`finished_metrics(directory)`, unless `force=true` asks to run the stage again."""
    if cfg.force:
        return None
    done = finished_metrics(directory)
    if done is not None:
        log.info("%s is already done (status.json); skipping. Pass force=true to run it again.", directory)
    return done


class Stage:
    """One stage of a run: `<run_dir>/<name>/` with config.yaml, status.json and metrics.json.

        with Stage(cfg, "finetune") as stage:
            ...
            stage.metrics.update(wer=0.05)

    status.json says running / done / failed (with the error), so an interrupted
    or crashed stage is visible to `scripts.make_tables` instead of vanishing;
    :func:`skip_if_done` reads it back.
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
