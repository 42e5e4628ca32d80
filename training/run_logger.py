"""Run logs: `log.csv` and `log.jsonl` always, Weights & Biases optionally (offline by default).

`log.csv` is long format (`step,key,value`), so a key that appears late (an eval
metric) needs no header rewrite; `log.jsonl` holds one `{"step": ..., key: value}`
object per `log` call. Non-finite values are written as empty CSV cells / JSON
null. The logger's state is the byte length of both files: a run resumed from a
checkpoint truncates them to that length, so entries written after the
checkpoint by the crashed run disappear and the resumed log equals an
uninterrupted one.

wandb never needs the network here: the mode defaults to "offline" and the wandb
directory is inside the run directory (`wandb sync` uploads it later).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from common.files import read_jsonl

log = logging.getLogger(__name__)


def _as_float(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class RunLogger:
    """Append-only metric log of one training stage; `enabled=False` (non-zero ranks) makes it a no-op."""

    def __init__(
        self,
        directory: str | os.PathLike,
        config_dict: Mapping[str, Any] | None = None,
        use_wandb: bool = False,
        wandb_project: str = "privacy-avsr",
        wandb_mode: str = "offline",
        run_name: str | None = None,
        enabled: bool = True,
    ):
        self.directory = Path(directory)
        self.enabled = enabled
        self.csv_path = self.directory / "log.csv"
        self.jsonl_path = self.directory / "log.jsonl"
        self.config_dict = dict(config_dict or {})
        self.use_wandb = use_wandb and enabled
        self.wandb_project = wandb_project
        self.wandb_mode = wandb_mode
        self.run_name = run_name
        self.wandb_id: str | None = None
        self._wandb_run = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
            self.csv_path.write_text("step,key,value\n")
        self.jsonl_path.touch()

    # ------------------------------------------------------------------ writing
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled or not metrics:
            return
        values = {k: _as_float(v) for k, v in metrics.items()}
        finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for key, value in finite.items():
            writer.writerow([int(step), key, "" if value is None else repr(value)])
        with open(self.csv_path, "a", encoding="utf-8") as f:
            f.write(buf.getvalue())
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **finite}) + "\n")
        if self.use_wandb:
            self._wandb().log(values, step=int(step))

    def _wandb(self):
        if self._wandb_run is None:
            # Set before import so that no wandb code path tries the network in offline mode.
            os.environ.setdefault("WANDB_MODE", self.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            wandb_dir = self.directory / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(
                project=self.wandb_project,
                name=self.run_name,
                config=self.config_dict,
                dir=str(self.directory),
                mode=self.wandb_mode,
                id=self.wandb_id,
                resume="allow" if self.wandb_id else None,
            )
            self.wandb_id = self._wandb_run.id
        return self._wandb_run

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    # ------------------------------------------------------------------ resume
    def reset(self) -> None:
        """Empty both logs (a stage that starts from step 0 must not append to a crashed attempt's log)."""
        if not self.enabled:
            return
        self.csv_path.write_text("step,key,value\n")
        self.jsonl_path.write_text("")

    def state_dict(self) -> dict[str, Any]:
        """The byte lengths a resumed run truncates the logs to. Called when a checkpoint is written, so the lines
        it counts are fsynced first: after a crash of the machine the logs are at least as long as the checkpoint
        says (appends are not fsynced one by one: a step's line would cost a disk flush)."""
        if not self.enabled:
            return {}
        for path in (self.csv_path, self.jsonl_path):
            with open(path, "ab") as f:  # fsync flushes the file's pages, whichever descriptor wrote them
                os.fsync(f.fileno())
        return {
            "csv_bytes": self.csv_path.stat().st_size,
            "jsonl_bytes": self.jsonl_path.stat().st_size,
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.enabled or not state:
            return
        for path, key in ((self.csv_path, "csv_bytes"), (self.jsonl_path, "jsonl_bytes")):
            size = path.stat().st_size
            if size > state[key]:
                with open(path, "r+b") as f:
                    f.truncate(state[key])
            elif size < state[key]:
                log.warning("%s is shorter (%d bytes) than when the checkpoint was written (%d); earlier entries are missing", path, size, state[key])
        self.wandb_id = state.get("wandb_id")

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def logger_from_config(logger_cfg: Any, directory: str | os.PathLike, config_dict: Mapping[str, Any] | None = None,
                       run_name: str | None = None, enabled: bool = True) -> RunLogger:
    """A RunLogger from a `LoggerConfig` (`name: csv | wandb`, `project`, `mode`)."""
    if logger_cfg.name not in ("csv", "wandb"):
        raise ValueError(f"logger.name={logger_cfg.name!r}; expected csv or wandb")
    return RunLogger(
        directory,
        config_dict=config_dict,
        use_wandb=logger_cfg.name == "wandb" and logger_cfg.mode != "disabled",
        wandb_project=logger_cfg.project,
        wandb_mode=logger_cfg.mode,
        run_name=run_name,
        enabled=enabled,
    )


def plot_curves(log_jsonl: str | os.PathLike, out_png: str | os.PathLike, keys: Iterable[str] | None = None) -> Path:
    """One panel per metric key (default: every key in the log) against step, written to `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_jsonl(log_jsonl)
    if keys is None:
        keys = sorted({k for e in entries for k in e if k != "step"})
    keys = list(keys)
    if not keys:
        raise ValueError(f"plot_curves: {log_jsonl} has no metrics to plot")
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(e["step"], e[key]) for e in entries if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
