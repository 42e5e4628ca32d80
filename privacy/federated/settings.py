"""The flat run config shared by ServerApp and ClientApp.

Flower passes a flat ``run_config`` (``[tool.flwr.app.config]`` in
privacy/federated/pyproject.toml, overridable with ``flwr run --run-config``;
or the dict given to :func:`privacy.federated.runner.run_federated`). Keys use
Flower's hyphen style. :data:`DEFAULT_RUN_CONFIG` is the Flower app's source of
truth (pyproject.toml repeats it; a test checks they agree). The Hydra side
derives a run config from the composed config in training/wav2vec2/run_config.py,
the only place that knows both.
"""

from __future__ import annotations

from typing import Any, Mapping

DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "task": "privacy.federated.task:tiny_synthetic_task",
    "seed": 0,
    "num-clients": 2,
    "num-rounds": 2,
    "strategy": "fedavg",  # fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg | krum
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-train-nodes": 2,
    "proximal-mu": 0.01,
    "trimmed-beta": 0.2,
    "krum-malicious": 0,
    "server-lr": 0.1,  # fedadam eta
    "local-epochs": 1,
    "local-steps": 0,  # > 0: exactly this many local steps instead of epochs
    "lr": 0.05,
    "local-optimizer": "sgd",  # sgd | adam (a fresh optimiser every round)
    "batch-size": 16,
    "device": "auto",  # trainer.device: where each client trains (common.device.resolve_device)
    "compression": "none",  # none | int8 | topk
    "topk-fraction": 0.05,
    "error-feedback": True,
    "int8-block-size": 0,  # 0: one scale per tensor
    "dp": "none",  # none | local | central
    "target-epsilon": 8.0,
    "target-delta": 1e-5,
    "max-grad-norm": 1.0,
    "clipping-norm": 1.0,
    "noise-multiplier": -1.0,  # < 0: derived from the budget
    "max-update-norm": 1.0e6,
    "round-timeout": 3600.0,
    "run-dir": "",
}

LOCAL_OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")


def resolve_run_config(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults, then each layer on top (later wins). Unknown keys are an error (typos must not become defaults)."""
    merged = dict(DEFAULT_RUN_CONFIG)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in DEFAULT_RUN_CONFIG and not key.startswith(("tiny-", "task-")):
                raise KeyError(f"unknown federated run_config key {key!r}; known keys: {sorted(DEFAULT_RUN_CONFIG)}")
            merged[key] = value
    if merged["strategy"] not in STRATEGIES:
        raise ValueError(f"run_config['strategy']={merged['strategy']!r}; expected one of {STRATEGIES}")
    if merged["local-optimizer"] not in LOCAL_OPTIMIZERS:
        raise ValueError(f"run_config['local-optimizer']={merged['local-optimizer']!r}; expected one of {LOCAL_OPTIMIZERS}")
    if merged["dp"] not in ("none", "local", "central"):
        raise ValueError(f"run_config['dp']={merged['dp']!r}; expected none | local | central")
    return merged

