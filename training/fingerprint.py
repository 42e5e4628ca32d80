"""Which configuration values define each stage: its fingerprint.

`training.stage.open_stage(cfg, name)` opens a stage with `stage_fingerprint(cfg, name)`:
every value of the composed config that changes what the stage computes.
Whether a stage can be skipped (`stage.finished()`), resumed or must be refused is
decided by that fingerprint, never by the run directory's name alone: the run name
leaves out trainer and data settings (it names what a table compares), so
`trainer.lr=0.05` lands in the directory of the `lr=5e-3` run and must not reuse it.

Excluded everywhere: values that only say where or how verbosely a stage runs
(`OPERATIONAL_KEYS`, `OPERATIONAL_FIELDS`). Attacker options stay outside the ASR stages' fingerprints, as they
stay outside the run name (one ASR run, many attacks), except the lazy-informed
seed offset, which the export stage uses.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf


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


# Top-level keys that never change a stage's result.
OPERATIONAL_KEYS = ("task", "force", "dry_run", "run_name", "paths", "logger", "hydra", "eval_after_finetune", "defaults")
# Fields that never change a stage's result (progress display, logging/checkpoint cadence,
# worker processes, the device a run is moved to; evaluation runs with the RNG saved and restored,
# so eval_every neither).
OPERATIONAL_FIELDS = {
    "trainer": ("progress_bar", "log_every", "ckpt_every", "keep_checkpoints", "resume", "num_workers", "eval_every", "device"),
    "pretrain": ("progress_bar", "log_every", "ckpt_every", "keep_checkpoints", "resume", "num_workers", "eval_every", "device"),
    "starting_checkpoint": ("path", "command_overrides"),
    "data": ("num_workers", "max_skip_fraction"),
    # the per-round learning curve's cadence (the final WER is scored after the federation); the server checkpoints' cadence
    "federated": ("server_eval_every", "checkpoint_every"),
}
# Which top-level groups each stage depends on (None: every non-operational group).
STAGE_GROUPS: dict[str, tuple[str, ...] | None] = {
    "pretrain": ("seed", "data", "model", "pretrain"),
    "finetune_public": ("seed", "data", "model", "pretrain", "starting_checkpoint"),  # task=build_checkpoint
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
# Single fields left out although their group is in (pretraining predicts k-means units: no tokenizer).
STAGE_EXCLUDED_FIELDS: dict[str, tuple[str, ...]] = {"pretrain": ("data.tokenizer", "data.sentencepiece_vocab")}


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
    dropped = set(STAGE_EXCLUDED_FIELDS.get(kind, ()))
    # Paths under the project's root (data.dir, model.checkpoint, ...) are kept relative to it, so a
    # project moved or cloned elsewhere with its runs still matches; a path elsewhere is compared whole.
    root = str((values.get("paths") or {}).get("root_dir") or "").rstrip("/")
    out = {}
    for key, value in flat.items():
        group, _, field = key.partition(".")
        if field.split(".", 1)[0] in OPERATIONAL_FIELDS.get(group, ()) or key in dropped:
            continue
        wanted = (group in groups) if groups is not None else (group not in excluded)
        if wanted or key in extra:
            if root and isinstance(value, str) and value.startswith(root + "/"):
                value = "${paths.root_dir}" + value[len(root):]
            out[key] = value
    return out
