"""The whole Hydra-to-Flower translation: the composed config -> the flat run config of privacy/federated.

Flower passes a flat ``run_config`` of str/int/float/bool values with hyphenated
keys. The Flower app's defaults live on the Flower side, which runs without
Hydra (``privacy.federated.settings.DEFAULT_RUN_CONFIG`` for the app,
``privacy.federated.synthgrid_task.DEFAULT_TASK_CONFIG`` for the Wav2Vec2 task;
``privacy/federated/pyproject.toml`` repeats the first for ``flwr run``). The
Hydra side's defaults are the schemas of training/config.py (the conf/ group files
set only what differs from them). :data:`FROM_HYDRA`
below is the one place that says which Hydra field feeds which run-config key;
tests/test_federated.py checks that it covers every Flower setting and that both
sides' defaults agree wherever they are meant to (:data:`DEFAULTS_DIFFER_ON_PURPOSE`).
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


def _optional_int(missing: int) -> Callable[[Any], int]:
    return lambda value: missing if value is None else int(value)


def _checkpoint(value: Any) -> str:
    return str(value) if value else ""


# run-config key -> (dotted Hydra path, conversion). Keys starting with "task-" configure the
# Wav2Vec2 SynthGRID task (privacy/federated/synthgrid_task.py); the others the Flower app.
FROM_HYDRA: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "seed": ("seed", int),
    "num-clients": ("federated.num_clients", int),
    "num-rounds": ("federated.num_rounds", int),
    "strategy": ("federated.name", str),
    "fraction-train": ("federated.fraction_train", float),
    "cohort-sampling": ("federated.cohort_sampling", str),
    "cohort-rate": ("federated.cohort_rate", float),
    "fraction-evaluate": ("federated.fraction_evaluate", float),
    "server-lr": ("federated.server_lr", float),
    "server-beta1": ("federated.server_beta1", float),
    "server-beta2": ("federated.server_beta2", float),
    "server-tau": ("federated.server_tau", float),
    "fedavg-server-lr": ("federated.fedavg_server_lr", float),
    "server-momentum": ("federated.server_momentum", float),
    "lr-decay": ("federated.lr_decay", str),
    "ema": ("federated.ema", float),
    "server-shrink": ("federated.server_shrink", float),
    "server-adam-bc": ("federated.server_adam_bc", float),
    "public-subspace-dim": ("federated.public_subspace_dim", int),
    "public-subspace-refresh": ("federated.public_subspace_refresh", int),
    "public-subspace-split": ("federated.public_subspace_split", str),
    "trimmed-beta": ("federated.trimmed_beta", float),
    "krum-malicious": ("federated.krum_malicious", _optional_int(-1)),  # -1: not given (krum refuses to start)
    "min-train-nodes": ("federated.min_train_nodes", int),
    "proximal-mu": ("federated.proximal_mu", float),
    "local-epochs": ("federated.local_epochs", int),
    "local-steps": ("federated.local_steps", _optional_int(0)),  # 0: local_epochs decide
    "lr": ("trainer.lr", float),
    "local-optimizer": ("federated.local_optimizer", str),
    "batch-size": ("trainer.batch_size", int),
    "device": ("trainer.device", str),
    "compression": ("compression.name", str),
    "topk-fraction": ("compression.topk_fraction", float),
    "topk-value-bits": ("compression.topk_value_bits", int),
    "topk-keep-biases": ("compression.topk_keep_biases", bool),
    "error-feedback": ("compression.error_feedback", bool),
    "int8-block-size": ("compression.int8_block_size", int),
    "dp": ("dp.name", str),
    "target-epsilon": ("dp.target_epsilon", float),
    "target-delta": ("dp.target_delta", float),
    "max-grad-norm": ("dp.max_grad_norm", float),
    "clipping-norm": ("dp.clipping_norm", float),
    "noise-multiplier": ("dp.noise_multiplier", lambda value: -1.0 if value is None else float(value)),  # < 0: from the budget
    "dp-accountant": ("dp.accountant", str),
    "dp-poisson-sampling": ("dp.poisson_sampling", bool),
    "dp-max-noise-multiplier": ("dp.max_noise_multiplier", float),
    "dp-unit": ("dp.unit", lambda value: "auto" if value is None else str(value)),  # auto: utterance (local) / client (central)
    "dp-reproducible-noise-NOT-PRIVATE": ("dp.reproducible_noise_NOT_PRIVATE", bool),
    "server-eval-every": ("federated.server_eval_every", int),
    "client-evaluation": ("federated.client_evaluation", lambda value: {None: "auto", True: "on", False: "off"}[value]),
    "max-num-examples": ("federated.max_num_examples", int),
    "max-update-norm": ("federated.max_update_norm", float),
    "round-timeout": ("federated.round_timeout", float),
    "checkpoint-every": ("federated.checkpoint_every", int),
    "resume": ("trainer.resume", bool),
    "task-data-dir": ("data.dir", str),
    "task-tokenizer": ("data.tokenizer", str),
    "task-checkpoint": ("model.checkpoint", _checkpoint),
    "task-trainable-layers": ("dp.trainable_layers", _optional_int(-1)),  # -1: all layers
    "task-train-positional-conv": ("dp.train_positional_conv", bool),
    "task-lora-rank": ("adapter.r", int),
    "task-lora-alpha": ("adapter.lora_alpha", float),
    "task-lora-targets": ("adapter.target_modules", lambda value: ",".join(str(v) for v in value)),
    "task-lora-dropout": ("adapter.lora_dropout", float),
}

# Flower settings the Hydra config does not expose: set here per run, or left at the Flower side's default.
SET_PER_RUN = ("task", "run-dir", "server-eval-split")
FLOWER_SIDE_ONLY = ("task-train-split", "task-client-eval-utterances", "task-eval-batch-size")
# adapter=lora (privacy/federated/lora_task.py): one speaker's few utterances all train (no held-out part),
# since federated evaluation on clients is off under DP and the test speakers score every run
LORA_CLIENT_EVAL_UTTERANCES = 0

# Where the two sides' defaults differ, and why: the Flower app's defaults describe its built-in
# two-client smoke task (privacy.federated.task:tiny_synthetic_task); the Hydra defaults the experiments.
DEFAULTS_DIFFER_ON_PURPOSE = {
    "seed": "the experiments' seed (conf/config.yaml) vs the smoke task's 0",
    "num-clients": "4 speaker-partitioned clients vs the smoke task's 2",
    "num-rounds": "5 rounds vs the smoke task's 2",
    "lr": "trainer.lr is the fine-tuning learning rate of every model family",
    "task-data-dir": "data.dir is always set by the data group; the task has no corpus of its own",
    "task-checkpoint": "model.checkpoint comes from the model group",
    "task-lora-rank": "adapter.r is shared with the AV-HuBERT LoRA runs (8); the Wav2Vec2 LoRA experiments set it",
    "task-lora-alpha": "adapter.lora_alpha is shared with the AV-HuBERT LoRA runs (16)",
    "task-lora-targets": "adapter.target_modules default names AV-HuBERT's modules (fc1, fc2); Wav2Vec2's differ",
    "task-lora-dropout": "adapter.lora_dropout is shared with the AV-HuBERT LoRA runs (0.05)",
}

OPTIONAL = ("federated.local_steps", "dp.noise_multiplier", "dp.trainable_layers", "model.checkpoint",
            "federated.krum_malicious", "dp.unit", "federated.client_evaluation")  # null is meaningful
SYNTHGRID_TASK = "privacy.federated.synthgrid_task:wav2vec2_synthgrid_task"
LORA_TASK = "privacy.federated.lora_task:wav2vec2_lora_task"


def _select(cfg: DictConfig, path: str) -> Any:
    value = OmegaConf.select(cfg, path, throw_on_missing=True)
    if value is None and path not in OPTIONAL:
        raise ValueError(f"{path} is null; the Wav2Vec2 variant needs a value")
    return value


def run_config_from_cfg(cfg: DictConfig, task: str, run_dir: str, strategy: str | None = None) -> dict[str, Any]:
    """The flat run config of one run (checked by privacy.federated.settings.resolve_run_config).

    Keys whose Hydra group is absent from `cfg` keep the Flower side's default. `strategy`
    replaces federated.name (the centralised baseline, federated=none, uses the FedAvg plumbing).
    """
    from privacy.federated.settings import resolve_run_config

    flat: dict[str, Any] = {"task": task, "run-dir": run_dir}
    for key, (path, convert) in FROM_HYDRA.items():
        if OmegaConf.select(cfg, path.split(".")[0]) is None:
            continue
        flat[key] = convert(_select(cfg, path))
    if strategy is not None:
        flat["strategy"] = strategy
    return resolve_run_config(flat)


from privacy.federated.settings import resolve_run_config  # noqa: E402


def uses_lora(cfg: DictConfig) -> bool:
    """adapter=lora: private fine-tuning of the public start with LoRA on cached features (lora_task.py)."""
    return OmegaConf.select(cfg, "adapter.name") == "lora"


def wav2vec2_run_config(cfg: DictConfig, run_dir: str, strategy: str | None = None) -> dict[str, Any]:
    """The run config of the Wav2Vec2 SynthGRID task for this composed config (the LoRA task under adapter=lora)."""
    if uses_lora(cfg):
        flat = run_config_from_cfg(cfg, LORA_TASK, str(run_dir), strategy)
        flat["task-client-eval-utterances"] = LORA_CLIENT_EVAL_UTTERANCES
        flat["server-eval-split"] = str(cfg.eval.split)  # a learning curve on the test speakers (cached: milliseconds)
        return resolve_run_config(flat)
    return run_config_from_cfg(cfg, SYNTHGRID_TASK, str(run_dir), strategy)

