"""Which configuration values define each stage, and the one way stages are opened.

`open_stage(cfg, name)` is the `training.run.Stage` of a stage with its configuration
fingerprint: every value of the composed config that changes what the stage computes.
Whether a stage can be skipped (`stage.finished()`), resumed or must be refused is
decided by that fingerprint, never by the run directory's name alone: the run name
leaves out trainer and data settings (it names what a table compares), so
`trainer.lr=0.05` lands in the directory of the `lr=5e-3` run and must not reuse it.

Excluded everywhere: values that only say where or how verbosely a stage runs
(`OPERATIONAL`). Attacker options stay outside the ASR stages' fingerprints, as they
stay outside the run name (one ASR run, many attacks), except the lazy-informed
seed offset, which the export stage uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from training.run import Stage, flatten_config

# Top-level keys that never change a stage's result.
OPERATIONAL_KEYS = ("task", "force", "dry_run", "run_name", "paths", "logger", "hydra", "eval_after_finetune", "defaults")
# Fields that never change a stage's result (progress display, logging/checkpoint cadence,
# worker processes; evaluation runs with the RNG saved and restored, so eval_every neither).
OPERATIONAL_FIELDS = {
    "trainer": ("progress_bar", "log_every", "ckpt_every", "keep_checkpoints", "resume", "num_workers", "eval_every"),
    "pretrain": ("progress_bar", "log_every", "ckpt_every", "keep_checkpoints", "resume", "num_workers", "eval_every"),
    "data": ("num_workers", "max_skip_fraction"),
}
# Which top-level groups each stage depends on (None: every non-operational group).
STAGE_GROUPS: dict[str, tuple[str, ...] | None] = {
    "pretrain": ("seed", "data", "model", "pretrain"),
    "finetune": None,
    "evaluate": None,
    "export": None,
    "federated": None,
    "attack": None,
}
# Groups left out of a stage's fingerprint (when STAGE_GROUPS says "every group").
STAGE_EXCLUDED: dict[str, tuple[str, ...]] = {
    "finetune": ("attacker", "eval"),
    "evaluate": ("attacker",),
    "export": ("attacker", "eval"),
    "federated": ("attacker",),
    "attack": ("eval",),
}
# Single fields kept although their group is excluded.
STAGE_EXTRA_FIELDS: dict[str, tuple[str, ...]] = {"export": ("attacker.lazy_seed_offset",)}


def _kind(name: str) -> str:
    return name.split("/", 1)[0]  # attack/semi_informed -> attack


def stage_fingerprint(cfg: Mapping[str, Any] | DictConfig, name: str) -> dict[str, Any]:
    """Flat {key: value} of everything in `cfg` that changes what stage `name` computes."""
    kind = _kind(name)
    if kind not in STAGE_GROUPS:
        raise KeyError(f"stage {name!r}: no fingerprint rule (known: {', '.join(STAGE_GROUPS)})")
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    flat = flatten_config({k: v for k, v in values.items() if k not in OPERATIONAL_KEYS})
    groups, excluded = STAGE_GROUPS[kind], STAGE_EXCLUDED.get(kind, ())
    extra = set(STAGE_EXTRA_FIELDS.get(kind, ()))
    out = {}
    for key, value in flat.items():
        group, _, field = key.partition(".")
        if field.split(".", 1)[0] in OPERATIONAL_FIELDS.get(group, ()):
            continue
        wanted = (group in groups) if groups is not None else (group not in excluded)
        if wanted or key in extra:
            out[key] = value
    return out


def open_stage(cfg: DictConfig, name: str, directory: str | Path | None = None, **kwargs: Any) -> Stage:
    """The Stage `name` of this run (`<run_dir>/<name>`, or `directory`), fingerprinted."""
    return Stage(cfg, name, directory=directory, fingerprint=stage_fingerprint(cfg, name),
                 fingerprint_of_saved=lambda saved: stage_fingerprint(saved, name), **kwargs)
