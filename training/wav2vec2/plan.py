"""Start-up checks and the step / privacy budget of a Wav2Vec2 run, from the config and the manifest only (no audio is read)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

SUPPORTED_MODELS = ("wav2vec2_tiny",)


def _local_steps(cfg: DictConfig) -> int:
    return int(cfg.federated.local_steps or 0)


def _steps_per_round(cfg: DictConfig, n_train: int) -> int:
    """Optimiser steps one client with `n_train` utterances makes per round."""
    return _local_steps(cfg) or int(cfg.federated.local_epochs) * math.ceil(n_train / int(cfg.trainer.batch_size))


def _eval_utterances() -> int:
    from privacy.federated.synthgrid_task import DEFAULT_TASK_CONFIG

    return int(DEFAULT_TASK_CONFIG["task-client-eval-utterances"])


def client_plan(cfg: DictConfig) -> list[dict[str, int]]:
    """Per client: training utterances, steps per round, sampling rate; from the manifest only."""
    from privacy.federated.synthgrid_task import client_indices, split_speakers

    speakers = split_speakers(cfg.data.dir, "train")
    num_clients = int(cfg.federated.num_clients)
    n_speakers = len(set(speakers))
    if num_clients > n_speakers:
        raise ValueError(
            f"federated.num_clients={num_clients} but the train split of {cfg.data.dir} has only {n_speakers} speakers; "
            f"every client needs at least one whole speaker, so use federated.num_clients <= {n_speakers}"
        )
    plan = []
    for pid in range(num_clients):
        train_idx, _ = client_indices(speakers, pid, num_clients, int(cfg.seed), _eval_utterances())
        n = len(train_idx)
        plan.append({"n_train": n, "steps_per_round": _steps_per_round(cfg, n),
                     "batches": math.ceil(n / int(cfg.trainer.batch_size))})
    return plan


def check_config(cfg: DictConfig) -> None:
    """The start-up checks that need only the configuration (a dry run without a prepared corpus runs these)."""
    from privacy.dp import DPPlanError

    if cfg.model.family != "wav2vec2":
        raise ValueError(
            f"model={cfg.model.name} (family {cfg.model.family!r}) with federated={cfg.federated.name}, dp={cfg.dp.name}: "
            f"the federated / DP variant trains Wav2Vec2 only; use model=wav2vec2_tiny (AV-HuBERT runs use federated=none dp=none)"
        )
    if cfg.model.name not in SUPPORTED_MODELS:
        raise ValueError(f"model={cfg.model.name}: the SynthGRID federated task builds {SUPPORTED_MODELS} only")
    if cfg.task not in ("pretrain", "finetune"):
        raise ValueError(f"task={cfg.task!r} with model={cfg.model.name}: the Wav2Vec2 variant has task=pretrain | finetune (finetune also evaluates)")
    if cfg.data.on_error != "raise":
        raise ValueError(
            f"data.on_error={cfg.data.on_error}: the Wav2Vec2 variant reads every audio file strictly (the first broken one "
            "stops it, named); skipping, with skip counts in metrics.json, exists for the AV-HuBERT stages only. "
            "Use data.on_error=raise, or fix or remove the files it names"
        )
    fed, dp = cfg.federated, cfg.dp
    if fed.backend not in ("ray", "sequential"):
        raise ValueError(f"federated.backend={fed.backend!r}: expected ray | sequential")
    if int(fed.num_rounds) < 1 or int(fed.num_clients) < 1:
        raise ValueError(f"federated.num_rounds={fed.num_rounds} and federated.num_clients={fed.num_clients} must be >= 1")
    if dp.name not in ("none", "local", "central"):
        raise ValueError(f"dp={dp.name!r}: expected none | local | central")
    from privacy.federated.settings import LOCAL_OPTIMIZERS

    if fed.local_optimizer not in LOCAL_OPTIMIZERS:
        raise ValueError(f"federated.local_optimizer={fed.local_optimizer!r}: expected one of {' | '.join(LOCAL_OPTIMIZERS)}")
    if dp.name == "central" and fed.name == "none":
        raise DPPlanError("dp=central is user-level DP of a federation (server-side clipping + noise); with federated=none use dp=local (DP-SGD)")
    if dp.name == "local" and dp.grad_sample_mode != "hooks":
        raise DPPlanError(
            f"dp.grad_sample_mode={dp.grad_sample_mode!r}: the federated client trains with Opacus' hooks mode and "
            f"Hugging Face's CTC loss; use dp=local (ghost clipping is measured in benchmarks/bench_fl_dp.py)"
        )
    if dp.name == "central":
        n_clients = int(fed.num_clients)
        if not 0 < float(dp.target_delta) < 1.0 / n_clients:
            raise DPPlanError(
                f"dp.target_delta={float(dp.target_delta):g} must be < 1/N = 1/{n_clients} (N = number of clients: "
                f"central DP protects a whole client)"
            )
        if fed.name not in ("fedavg", "fedprox"):
            raise DPPlanError(f"dp=central needs federated=fedavg | fedprox (a mean aggregator), got {fed.name}")


def check_plan(cfg: DictConfig) -> dict[str, Any]:
    """Start-up checks (no audio is read): `check_config`, then clients vs speakers and the DP
    budget (from the manifest).

    Returns what the run will do (client plan, noise multipliers) for logging/metrics.
    """
    from privacy.dp import DPPlanError, validate_dp_plan

    check_config(cfg)
    fed, dp = cfg.federated, cfg.dp
    plan = client_plan(cfg)
    out: dict[str, Any] = {"clients": plan}
    rounds = int(fed.num_rounds)
    if dp.name == "local":
        if fed.name == "none":  # DP-only: one data holder with the union of the clients' data
            n = sum(c["n_train"] for c in plan)
            batches = math.ceil(n / int(cfg.trainer.batch_size))
            holders = [{"n_train": n, "batches": batches, "total_steps": centralised_steps(cfg, plan)}]
        else:
            holders = [dict(c, total_steps=c["steps_per_round"] * rounds) for c in plan]
        sigmas = []
        for i, h in enumerate(holders):
            try:
                sigmas.append(validate_dp_plan(
                    float(dp.target_epsilon), float(dp.target_delta), h["n_train"], h["total_steps"], 1.0 / h["batches"],
                    accountant=str(dp.accountant), max_noise_multiplier=float(dp.max_noise_multiplier),
                ))
            except DPPlanError as error:
                who = "the centralised DP-SGD run" if fed.name == "none" else f"client {i}"
                raise DPPlanError(f"dp=local, {who} ({h['n_train']} training utterances, {h['total_steps']} steps): {error}") from None
        out["noise_multipliers"] = sigmas
    if dp.name == "central":
        from privacy.dp import central_noise_multiplier_for_budget

        if dp.noise_multiplier is None:
            try:
                out["noise_multipliers"] = [central_noise_multiplier_for_budget(float(dp.target_epsilon), float(dp.target_delta), rounds)]
            except ValueError as error:
                raise DPPlanError(f"dp=central: {error}") from None
    return out


def centralised_steps(cfg: DictConfig, plan: list[dict[str, int]]) -> int:
    """The federation's total optimisation steps (see the module docstring)."""
    return int(cfg.federated.num_rounds) * sum(c["steps_per_round"] for c in plan)
