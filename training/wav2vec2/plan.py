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


def _eval_utterances(cfg: DictConfig) -> int:
    from privacy.federated.synthgrid_task import DEFAULT_TASK_CONFIG
    from training.wav2vec2.run_config import LORA_CLIENT_EVAL_UTTERANCES, uses_lora

    return LORA_CLIENT_EVAL_UTTERANCES if uses_lora(cfg) else int(DEFAULT_TASK_CONFIG["task-client-eval-utterances"])


def train_speaker_count(cfg: DictConfig) -> int:
    """Speakers of the train split: from the manifest if the corpus is prepared, else (SynthGRID) from the
    data config's split sizes, so that a plan that cannot work fails before any audio is generated."""
    from pathlib import Path

    if (Path(cfg.data.dir) / "manifests" / "train.tsv").is_file():
        from privacy.federated.synthgrid_task import split_speakers

        return len(set(split_speakers(cfg.data.dir, "train")))
    if cfg.data.name != "synthgrid":
        return -1  # unknown until the corpus is prepared (check_plan checks it then)
    from data.synthgrid.speakers import split_sizes

    extra = int(cfg.data.get("extra_train_speakers", 0)) + int(cfg.data.get("extra_train_speakers_after_test", 0))
    sizes, _ = split_sizes(int(cfg.data.num_speakers) - extra - int(cfg.data.get("extra_test_speakers", 0)), {k: int(v) for k, v in dict(cfg.data.splits).items()})
    return int(sizes["train"]) + extra


def check_population(cfg: DictConfig) -> None:
    """Clients vs speakers, cohort vs population, sigma vs its cap: from the configuration alone."""
    from privacy.dp import DPPlanError

    fed, dp = cfg.federated, cfg.dp
    if fed.name == "none":
        return
    n_clients = int(fed.num_clients)
    n_speakers = train_speaker_count(cfg)
    if n_speakers >= 0 and n_clients > n_speakers:
        raise DPPlanError(
            f"federated.num_clients={n_clients} but the train split of data={cfg.data.name} ({cfg.data.dir}) has only "
            f"{n_speakers} speakers; every client needs at least one whole speaker, so use federated.num_clients <= {n_speakers}"
        )
    if fed.cohort_sampling == "poisson":
        q = float(fed.cohort_rate)
        if not 0 < q <= 1:
            raise DPPlanError(
                f"federated.cohort_rate={q:g}: the expected cohort q x N = {q * n_clients:g} clients "
                f"{'is larger than' if q > 1 else 'is not a part of'} the population of N = {n_clients} clients; "
                f"q must be in (0, 1]"
            )
        if fed.name not in ("fedavg", "fedadam"):
            raise DPPlanError(f"federated.cohort_sampling=poisson with federated={fed.name}: Poisson cohorts are implemented for "
                              f"fedavg and fedadam")
    elif int(n_clients * float(fed.fraction_train)) > n_clients:
        raise DPPlanError(f"federated.fraction_train={fed.fraction_train}: a cohort of {int(n_clients * float(fed.fraction_train))} "
                          f"clients is larger than the population of {n_clients}")
    if dp.name == "central" and dp.noise_multiplier is not None and float(dp.noise_multiplier) > float(dp.max_noise_multiplier):
        raise DPPlanError(f"dp.noise_multiplier={float(dp.noise_multiplier):g} is beyond dp.max_noise_multiplier="
                          f"{float(dp.max_noise_multiplier):g}")


def client_plan(cfg: DictConfig) -> list[dict[str, int]]:
    """Per client: training utterances, steps per round, sampling rate; from the manifest only."""
    from privacy.federated.synthgrid_task import client_partitions, split_speakers

    speakers = split_speakers(cfg.data.dir, "train")
    num_clients = int(cfg.federated.num_clients)
    n_speakers = len(set(speakers))
    if num_clients > n_speakers:
        raise ValueError(
            f"federated.num_clients={num_clients} but the train split of {cfg.data.dir} has only {n_speakers} speakers; "
            f"every client needs at least one whole speaker, so use federated.num_clients <= {n_speakers}"
        )
    plan = []
    for train_idx, _ in client_partitions(speakers, num_clients, int(cfg.seed), _eval_utterances(cfg)):
        n = len(train_idx)
        plan.append({"n_train": n, "steps_per_round": _steps_per_round(cfg, n),
                     "batches": math.ceil(n / int(cfg.trainer.batch_size))})
    return plan


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """The start-up checks that need only the configuration (a dry run without a prepared corpus runs these).
    Returns the flat Flower run config the options translate to."""
    from privacy.dp import DPPlanError

    if cfg.model.family != "wav2vec2":
        raise ValueError(
            f"model={cfg.model.name} (family {cfg.model.family!r}) with federated={cfg.federated.name}, dp={cfg.dp.name}: "
            f"the federated / DP variant trains Wav2Vec2 only; use model=wav2vec2_tiny (AV-HuBERT runs use federated=none dp=none)"
        )
    if cfg.model.name not in SUPPORTED_MODELS:
        raise ValueError(f"model={cfg.model.name}: the SynthGRID federated task builds {SUPPORTED_MODELS} only")
    if cfg.task not in ("pretrain", "finetune", "build_checkpoint"):
        raise ValueError(f"task={cfg.task!r} with model={cfg.model.name}: the Wav2Vec2 variant has task=pretrain | finetune "
                         f"(finetune also evaluates) | build_checkpoint (the public start, training/wav2vec2/public_start.py)")
    if cfg.task == "build_checkpoint":
        if cfg.federated.name != "none" or cfg.dp.name != "none":
            raise ValueError(f"task=build_checkpoint builds the PUBLIC start: use federated=none dp=none (got federated="
                             f"{cfg.federated.name}, dp={cfg.dp.name})")
        return {}
    if cfg.data.on_error != "raise":
        raise ValueError(
            f"data.on_error={cfg.data.on_error}: the Wav2Vec2 variant reads every audio file strictly (the first broken one "
            "stops it, named); skipping, with skip counts in metrics.json, exists for the AV-HuBERT stages only. "
            "Use data.on_error=raise, or fix or remove the files it names"
        )
    fed, dp = cfg.federated, cfg.dp
    if fed.backend not in ("ray", "sequential"):
        raise ValueError(f"federated.backend={fed.backend!r}: expected ray | sequential")
    no_training = fed.name == "none" and dp.name == "none" and int(fed.num_rounds) == 0  # the "no private training" row
    if (int(fed.num_rounds) < 1 and not no_training) or int(fed.num_clients) < 1:
        raise ValueError(f"federated.num_rounds={fed.num_rounds} and federated.num_clients={fed.num_clients} must be >= 1 "
                         f"(num_rounds=0 only with federated=none dp=none: the start evaluated without private training)")
    if dp.name not in ("none", "local", "central"):
        raise ValueError(f"dp={dp.name!r}: expected none | local | central")
    from privacy.federated.settings import LOCAL_OPTIMIZERS

    if fed.local_optimizer not in LOCAL_OPTIMIZERS:
        raise ValueError(f"federated.local_optimizer={fed.local_optimizer!r}: expected one of {' | '.join(LOCAL_OPTIMIZERS)}")
    reset = fed.centralised_optimizer_reset_every
    if isinstance(reset, bool) or not isinstance(reset, int) or reset < 0:
        raise ValueError(f"federated.centralised_optimizer_reset_every={reset!r}: expected an int >= 0 (0: one optimiser)")
    if reset and (fed.name != "none" or dp.name != "none"):
        raise ValueError(f"federated.centralised_optimizer_reset_every={reset}: only for the non-private centralised baseline "
                         f"(federated=none dp=none), got federated={fed.name} dp={dp.name}")
    # the Poisson-cohort strategy (PoissonCohortFedAvg) implements the server lr schedule and the public subspace
    poisson_cohorts = fed.name in ("fedavg", "fedadam") and fed.cohort_sampling == "poisson"
    if fed.lr_decay != "none" and not ((fed.name == "none" and dp.name == "none") or poisson_cohorts):
        raise ValueError(f"federated.lr_decay={fed.lr_decay}: decays the centralised baseline's optimiser (federated=none dp=none) "
                         f"or the server step of Poisson cohorts (federated=fedavg|fedadam federated.cohort_sampling=poisson); "
                         f"got federated={fed.name} federated.cohort_sampling={fed.cohort_sampling} dp={dp.name}")
    if float(fed.ema) != 0 and fed.name not in ("fedavg", "fedadam", "none"):
        raise ValueError(f"federated.ema={fed.ema}: averages the global models of a fedavg|fedadam server (per round) or "
                         f"the centralised baseline's parameters (federated=none, per step); got federated={fed.name}")
    if not 0 <= float(fed.ema) < 1:
        raise ValueError(f"federated.ema={fed.ema}: expected a decay in [0, 1) (0: off)")
    if not 0 <= float(fed.server_shrink) <= 10:
        raise ValueError(f"federated.server_shrink={fed.server_shrink}: expected a number in [0, 10] (0: off, 1: the Wiener / "
                         f"positive-part James-Stein factor)")
    if float(fed.server_shrink) and not (poisson_cohorts and dp.name == "central" and int(fed.public_subspace_dim) == 0):
        raise ValueError(f"federated.server_shrink={fed.server_shrink}: shrinks the DP noise in the server step of Poisson cohorts "
                         f"(federated=fedavg|fedadam federated.cohort_sampling=poisson dp=central, without the public subspace, "
                         f"whose noise is not per coordinate); got federated={fed.name} federated.cohort_sampling="
                         f"{fed.cohort_sampling} dp={dp.name} federated.public_subspace_dim={fed.public_subspace_dim}")
    if not 0 <= float(fed.server_adam_bc) <= 1:
        raise ValueError(f"federated.server_adam_bc={fed.server_adam_bc}: expected a floor in [0, 1] (0: off; the fraction of the "
                         f"DP noise std below which a coordinate's scale is not trusted)")
    if float(fed.server_adam_bc) and not (poisson_cohorts and fed.name == "fedadam" and dp.name == "central"
                                          and int(fed.public_subspace_dim) == 0):
        raise ValueError(f"federated.server_adam_bc={fed.server_adam_bc}: debiases the server Adam's second moment for the DP "
                         f"noise of Poisson cohorts (federated=fedadam federated.cohort_sampling=poisson dp=central, without the "
                         f"public subspace); got federated={fed.name} federated.cohort_sampling={fed.cohort_sampling} dp={dp.name} "
                         f"federated.public_subspace_dim={fed.public_subspace_dim}")
    if int(fed.public_subspace_dim) > 0 and not poisson_cohorts:
        raise ValueError(f"federated.public_subspace_dim={fed.public_subspace_dim}: projects the client updates of Poisson cohorts "
                         f"(federated=fedavg|fedadam federated.cohort_sampling=poisson); got federated={fed.name} "
                         f"federated.cohort_sampling={fed.cohort_sampling}")
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
        poisson_fedadam = fed.name == "fedadam" and fed.cohort_sampling == "poisson"  # server Adam on the noised mean
        if fed.name not in ("fedavg", "fedprox") and not poisson_fedadam:
            raise DPPlanError(f"dp=central needs federated=fedavg | fedprox (a mean aggregator), or fedadam with "
                              f"federated.cohort_sampling=poisson (server Adam on the noised mean), got {fed.name}")

    check_population(cfg)
    from training.wav2vec2.run_config import wav2vec2_run_config

    try:  # every DP / federated option is checked here, before any audio is read (settings.resolve_run_config)
        flat = wav2vec2_run_config(cfg, "", strategy="fedavg" if fed.name == "none" else None)
    except (KeyError, ValueError) as error:
        raise DPPlanError(f"federated / dp configuration: {error}") from None
    if fed.name != "none":  # robust aggregators (trimmed mean trims >= 1 per side, krum's f explicit) fail here, not in round 1
        from privacy.federated.strategy import build_strategy

        build_strategy(flat, int(fed.num_clients))
    return flat


def check_plan(cfg: DictConfig) -> dict[str, Any]:
    """Start-up checks (no audio is read): `check_config`, then clients vs speakers and the DP
    budget (from the manifest).

    Returns what the run will do (client plan, noise multipliers) for logging/metrics.
    """
    from privacy.dp import DPPlanError, validate_dp_plan

    flat = check_config(cfg)
    if cfg.task == "build_checkpoint":
        return {}
    fed, dp = cfg.federated, cfg.dp
    plan = client_plan(cfg)
    out: dict[str, Any] = {"clients": plan, "dp_unit": flat["dp-unit"] if dp.name != "none" else None}
    if flat["dp-unit"] == "speaker":
        from privacy.federated.synthgrid_task import split_speakers

        n_speakers = len(set(split_speakers(cfg.data.dir, "train")))
        if fed.name == "none" or int(fed.num_clients) != n_speakers:
            raise DPPlanError(
                f"dp.unit=speaker needs one client per speaker: federated.num_clients={fed.num_clients} but the train split "
                f"of {cfg.data.dir} has {n_speakers} speakers (set federated.num_clients={n_speakers}; "
                f"experiment=fl_dp_speaker does)"
            )
    if int(fed.public_subspace_dim) > 0:  # k directions need k public gradients (one per client-sized public batch)
        from privacy.federated.synthgrid_task import split_speakers

        utterances = len(split_speakers(cfg.data.dir, str(fed.public_subspace_split)))
        batches = math.ceil(utterances / int(cfg.trainer.batch_size))
        if int(fed.public_subspace_dim) > batches:
            raise DPPlanError(f"federated.public_subspace_dim={fed.public_subspace_dim}: the {fed.public_subspace_split!r} split of "
                              f"{cfg.data.dir} has {utterances} utterances = {batches} public gradients of trainer.batch_size="
                              f"{cfg.trainer.batch_size}; k must be <= {batches}")
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
    if dp.name == "central" and fed.cohort_sampling == "poisson":
        from privacy.dp import noise_multiplier_for_budget

        if dp.noise_multiplier is None:  # the strategy derives the same sigma (strategy._poisson_strategy)
            out["noise_multiplier"] = noise_multiplier_for_budget(float(dp.target_epsilon), float(dp.target_delta),
                                                                  float(fed.cohort_rate), rounds, str(dp.accountant), float(dp.max_noise_multiplier))
    elif dp.name == "central":
        from privacy.dp import central_noise_multiplier_for_budget

        if dp.noise_multiplier is None:
            try:
                out["noise_multipliers"] = [central_noise_multiplier_for_budget(
                    float(dp.target_epsilon), float(dp.target_delta), rounds, float(dp.max_noise_multiplier))]
            except ValueError as error:
                raise DPPlanError(f"dp=central: {error}") from None
    return out


def centralised_steps(cfg: DictConfig, plan: list[dict[str, int]]) -> int:
    """The federation's total optimisation steps (see the module docstring); with Poisson cohorts the
    expected number (every client takes part in a fraction cohort_rate of the rounds)."""
    rate = float(cfg.federated.cohort_rate) if cfg.federated.cohort_sampling == "poisson" else 1.0
    return int(round(int(cfg.federated.num_rounds) * rate * sum(c["steps_per_round"] for c in plan)))
