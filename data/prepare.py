"""Prepare a corpus into `data.dir`: `prepare(cfg)` with the composed config.

The command is `python -m scripts.prepare_data data=<corpus> [overrides]` (the Hydra
entry lives in scripts/, above training/, since it needs the config schemas);
same primary config as the entry scripts (conf/config.yaml). Dispatch on `data.name`:
  synthgrid              -> data.synthgrid.generate_corpus (generated here, no download)
  lrs3 | voxceleb2 | grid -> data.corpora.<name>.prepare(cfg) (from data.raw_dir)

The stage record (metrics.json with sizes/timings/skips, resolved config.yaml)
goes to `<data.dir>/prepare/`, and unless `hydra.run.dir` is given on the command
line Hydra's own files go to `<data.dir>/prepare/.hydra`. Nothing under prepare/ is
part of the corpus bytes (it holds wall-clock timings).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)
REAL_CORPORA = ("lrs3", "voxceleb2", "grid")


def prepare(cfg: DictConfig) -> dict:
    """Prepare the corpus named by cfg.data.name; returns the stage metrics."""
    from common.files import save_config, write_metrics

    name = cfg.data.name
    out_dir = Path(cfg.data.dir)
    if name != "synthgrid" and name not in REAL_CORPORA:
        raise ValueError(f"data.name={name!r}: unknown corpus; expected one of synthgrid, {', '.join(REAL_CORPORA)}")
    if cfg.get("dry_run"):
        return _dry_run(cfg)
    if name == "synthgrid":
        from data.synthgrid import generate_corpus

        metrics = generate_corpus(cfg.data, out_dir, num_workers=int(cfg.data.num_workers), progress=True)
    elif name in REAL_CORPORA:
        try:
            module = importlib.import_module(f"data.corpora.{name}")
        except ModuleNotFoundError as e:
            if e.name not in (f"data.corpora.{name}", "data.corpora"):
                raise
            raise RuntimeError(f"data.name={name}: the preparation module data/corpora/{name}.py is missing") from e
        if not hasattr(module, "prepare"):
            raise RuntimeError(f"data/corpora/{name}.py has no prepare(cfg) function")
        metrics = module.prepare(cfg) or {}
    stage = out_dir / "prepare"
    stage.mkdir(parents=True, exist_ok=True)
    write_metrics(stage, metrics)
    save_config(stage, cfg)
    log.info("prepared %s in %s", name, out_dir)
    return metrics


def _dry_run(cfg: DictConfig) -> dict:
    """The start-up checks of a preparation (corpus name; SynthGRID's split sizes; a real corpus'
    data.raw_dir), then where it would write. No corpus file is written."""
    name = cfg.data.name
    if name == "synthgrid":
        from data.synthgrid.generate import SynthGridParams

        SynthGridParams.from_config(cfg.data).validate()
        print(f"dry run: prepare {name} would write {cfg.data.dir} (start-up checks passed)")
    else:
        from data.corpora.common import CorpusError, check_raw_dir

        print(f"dry run: prepare {name} would write {cfg.data.dir}")
        try:
            check_raw_dir(cfg.data, name)
        except CorpusError as error:
            print(f"  needs {error}")
    return {}
