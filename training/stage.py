"""A stage of a run and its directory: what every stage of every entry point shares.

A stage (prepare, pretrain, finetune, evaluate, export, attack/<scenario>, ...)
writes into `<paths.run_dir>/<stage>/`: `metrics.json` (flat keys, numbers),
`config.yaml` (the resolved config) and whatever else it produces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.files import atomic_write_text, save_config, write_metrics


def stage_dir(cfg: Any, stage: str) -> Path:
    d = Path(cfg.paths.run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


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
