"""The Wav2Vec2 variant: centralised baseline, DP-only, FL, FL + local / central DP, selected by config.

    python train_avhubert.py experiment=fl_dp_wav2vec2                 # FL + local DP (Flower, Ray)
    python train_avhubert.py experiment=fl_dp task=pretrain             # wav2vec2 tiny on the public split
    python train_avhubert.py experiment=fl_dp federated=none dp=none    # centralised baseline
    python train_avhubert.py experiment=fl_dp federated=none            # DP-only (DP-SGD, one data holder)
    python train_avhubert.py experiment=fl_dp dp=central                # FL + user-level DP

Stages (training.run.Stage):

* ``task=pretrain``: :func:`models.wav2vec2.pretrain_wav2vec2_tiny` on the
  ``public`` split (audio only), written to ``model.checkpoint``
  (``${paths.pretrained_dir}/wav2vec2_tiny``) with its own status/metrics.
  ``task=finetune`` runs it first when that checkpoint is missing.
* ``task=finetune``: ``<run_dir>/federated/metrics.json``.

Budget of the centralised baseline (``federated=none``): the same model, data,
optimiser, learning rate and batch size as the FL run, and the same TOTAL number
of optimisation steps the federation makes: ``num_rounds x local_steps x
num_clients`` (or, with ``local_steps`` unset, ``num_rounds x local_epochs``
epochs over the union of the clients' training data, which is the same
number of steps). It trains on exactly the union of the clients' training
utterances (the clients' held-out utterances excluded), so FL vs centralised
differs only in where the steps happen and in the averaging.
``trainer.max_steps`` is not used by this variant: the federated plan defines
the budget, so a sweep cannot accidentally compare unequal budgets.

Evaluation: greedy CTC decoding on the ``test`` split (speakers never seen by
any client), WER and CER (training.metrics). All checks that can fail on bad
configuration run before any audio is read (:func:`check_plan`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("wav2vec2_tiny",)


# --------------------------------------------------------------------------- configuration -> plan
def _local_steps(cfg: DictConfig) -> int:
    return int(cfg.federated.local_steps or 0)


def _steps_per_round(cfg: DictConfig, n_train: int) -> int:
    """Optimiser steps one client with `n_train` utterances makes per round."""
    return _local_steps(cfg) or int(cfg.federated.local_epochs) * math.ceil(n_train / int(cfg.trainer.batch_size))


def _task_keys(cfg: DictConfig) -> dict[str, Any]:
    checkpoint = cfg.model.get("checkpoint")
    layers = cfg.dp.get("trainable_layers")
    return {
        "task-data-dir": str(cfg.data.dir),
        "task-tokenizer": str(cfg.data.tokenizer),
        "task-checkpoint": str(checkpoint) if checkpoint else "",
        "task-trainable-layers": -1 if layers is None else int(layers),
        "task-train-positional-conv": bool(cfg.dp.get("train_positional_conv", True)),
    }


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


def check_plan(cfg: DictConfig) -> dict[str, Any]:
    """Start-up checks (no audio is read): model, clients vs speakers, DP budget and delta.

    Returns what the run will do (client plan, noise multipliers) for logging/metrics.
    """
    from privacy.dp import DPPlanError, validate_dp_plan

    if cfg.model.family != "wav2vec2":
        raise ValueError(
            f"model={cfg.model.name} (family {cfg.model.family!r}) with federated={cfg.federated.name}, dp={cfg.dp.name}: "
            f"the federated / DP variant trains Wav2Vec2 only; use model=wav2vec2_tiny (AV-HuBERT runs use federated=none dp=none)"
        )
    if cfg.model.name not in SUPPORTED_MODELS:
        raise ValueError(f"model={cfg.model.name}: the SynthGRID federated task builds {SUPPORTED_MODELS} only")
    if cfg.task not in ("pretrain", "finetune"):
        raise ValueError(f"task={cfg.task!r} with model={cfg.model.name}: the Wav2Vec2 variant has task=pretrain | finetune (finetune also evaluates)")
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
    from privacy.federated.settings import run_config_from_cfg
    from privacy.federated.synthgrid_task import TASK_REFERENCE

    try:  # every DP / federated option is checked here, before any audio is read (settings.resolve_run_config)
        flat = run_config_from_cfg(_with_strategy(cfg, "fedavg") if fed.name == "none" else cfg, TASK_REFERENCE, "")
    except (KeyError, ValueError) as error:
        raise DPPlanError(f"federated / dp configuration: {error}") from None
    if fed.name != "none":  # robust aggregators (trimmed mean trims >= 1 per side, krum's f explicit) fail here, not in round 1
        from privacy.federated.strategy import build_strategy

        build_strategy(flat, int(fed.num_clients))
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
        from privacy.federated.strategy import noise_multiplier_for_budget

        n_clients = int(fed.num_clients)
        if not 0 < float(dp.target_delta) < 1.0 / n_clients:
            raise DPPlanError(
                f"dp.target_delta={float(dp.target_delta):g} must be < 1/N = 1/{n_clients} (N = number of clients: "
                f"central DP protects a whole client)"
            )
        if fed.name not in ("fedavg", "fedprox"):
            raise DPPlanError(f"dp=central needs federated=fedavg | fedprox (a mean aggregator), got {fed.name}")
        if dp.noise_multiplier is None:
            try:
                out["noise_multipliers"] = [noise_multiplier_for_budget(float(dp.target_epsilon), float(dp.target_delta), rounds)]
            except ValueError as error:
                raise DPPlanError(f"dp=central: {error}") from None
    return out


def centralised_steps(cfg: DictConfig, plan: list[dict[str, int]]) -> int:
    """The federation's total optimisation steps (see the module docstring)."""
    return int(cfg.federated.num_rounds) * sum(c["steps_per_round"] for c in plan)


# --------------------------------------------------------------------------- pre-training
def checkpoint_ready(path: str | Path | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / "config.json").is_file() and any((p / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def pretrain(cfg: DictConfig) -> dict:
    """Self-supervised wav2vec 2.0 pre-training of the tiny model on the public split (audio only)."""
    from models.wav2vec2 import pretrain_wav2vec2_tiny
    from privacy.federated.synthgrid_task import load_split
    from training.run import Stage, seed_everything

    if not cfg.model.get("checkpoint"):
        raise ValueError(f"task=pretrain with model={cfg.model.name}: model.checkpoint is empty; where should the model go?")
    out_dir = Path(cfg.model.checkpoint)
    with Stage(cfg, "pretrain", directory=out_dir) as stage:
        generator = seed_everything(int(cfg.seed))
        _, _, waves, _ = load_split(cfg.data.dir, "public")
        loader = DataLoader(waves, batch_size=int(cfg.pretrain.batch_size), shuffle=True, generator=generator,
                            collate_fn=_pad_waveforms, drop_last=len(waves) > int(cfg.pretrain.batch_size))
        t0 = time.time()
        steps = int(cfg.pretrain.max_steps)
        _, losses = pretrain_wav2vec2_tiny(loader, steps=steps, out_dir=out_dir, lr=float(cfg.pretrain.lr), seed=int(cfg.seed),
                                           log_every=int(cfg.pretrain.log_every))
        tail = losses[-max(1, min(20, len(losses) // 5)):]
        stage.metrics.update({
            "pretrain/loss": float(np.mean(tail)),
            "pretrain/loss_first": float(losses[0]),
            "pretrain/steps": steps,
            "pretrain/utterances": len(waves),
            "pretrain/seconds": time.time() - t0,
        })
        log.info("wav2vec2 tiny pre-trained: loss %.3f -> %.3f in %d steps, saved to %s",
                 losses[0], stage.metrics["pretrain/loss"], steps, out_dir)
    return stage.metrics


def _pad_waveforms(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(w) for w in waves)
    x = torch.zeros(len(waves), n)
    mask = torch.zeros(len(waves), n, dtype=torch.long)
    for i, w in enumerate(waves):
        x[i, : len(w)], mask[i, : len(w)] = w, 1
    return x, mask


def ensure_pretrained(cfg: DictConfig) -> None:
    checkpoint = cfg.model.get("checkpoint")
    if not checkpoint:
        log.warning("model.checkpoint is empty: %s starts from a random initialisation (no pre-training)", cfg.model.name)
        return
    if not checkpoint_ready(checkpoint):
        log.info("no pre-trained %s at %s: pre-training it first on the public split (task=pretrain)", cfg.model.name, checkpoint)
        pretrain(cfg)


# --------------------------------------------------------------------------- runs
def _tokenizer(cfg: DictConfig):
    from privacy.federated.synthgrid_task import make_tokenizer

    return make_tokenizer(str(cfg.data.tokenizer), cfg.data.dir)


def _test_loader(cfg: DictConfig, tokenizer):
    from privacy.federated.synthgrid_task import WaveformCTCDataset, collate_waveforms, load_split

    _, _, waves, targets = load_split(cfg.data.dir, str(cfg.eval.split), tokenizer)
    return DataLoader(WaveformCTCDataset(waves, targets), batch_size=16, collate_fn=collate_waveforms)


def _run_config(cfg: DictConfig, run_dir: Path, strategy: str | None = None) -> dict[str, Any]:
    from privacy.federated.settings import resolve_run_config, run_config_from_cfg
    from privacy.federated.synthgrid_task import TASK_REFERENCE

    if strategy is not None:  # the centralised run reuses the flat config with a placeholder strategy
        base = dict(run_config_from_cfg(_with_strategy(cfg, strategy), TASK_REFERENCE, str(run_dir)))
    else:
        base = run_config_from_cfg(cfg, TASK_REFERENCE, str(run_dir))
    return resolve_run_config(base, _task_keys(cfg))


def _with_strategy(cfg: DictConfig, name: str) -> DictConfig:
    from omegaconf import OmegaConf

    copy = OmegaConf.to_container(cfg, resolve=True)
    copy["federated"]["name"] = name
    return OmegaConf.create(copy)


def run_centralised(cfg: DictConfig, out_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """One data holder with the union of the clients' training data; DP-SGD when dp=local."""
    from privacy.federated.local_dp import LocalDPSession
    from privacy.federated.synthgrid_task import (
        WaveformCTCDataset, centralised_indices, collate_waveforms, evaluate_transcripts, load_split,
        wav2vec2_synthgrid_task,
    )
    from privacy.federated.task import train_local
    from training.run import seed_everything

    steps = centralised_steps(cfg, plan["clients"])
    run_config = _run_config(cfg, out_dir, strategy="fedavg")
    task = wav2vec2_synthgrid_task(run_config)
    generator = seed_everything(int(cfg.seed))
    tokenizer = _tokenizer(cfg)
    speakers, _, waves, targets = load_split(cfg.data.dir, "train", tokenizer)
    idx = centralised_indices(speakers, int(cfg.federated.num_clients), int(cfg.seed), _eval_utterances())
    loader = DataLoader(WaveformCTCDataset([waves[i] for i in idx], [targets[i] for i in idx]), batch_size=int(cfg.trainer.batch_size),
                        shuffle=True, generator=generator, collate_fn=collate_waveforms)
    model = task.build_model()
    session = None
    if cfg.dp.name == "local":
        session = LocalDPSession.from_run_config(dict(run_config, **{"local-steps": steps, "num-rounds": 1}), len(idx), None, partition_id=0)
    optimizer = str(cfg.federated.local_optimizer)
    log.info("centralised %s%s: %d steps of batch %d over %d utterances", "DP-" if session else "", optimizer.upper(), steps,
             cfg.trainer.batch_size, len(idx))
    t0 = time.time()
    stats = train_local(model, loader, task.loss_fn, steps=steps, lr=float(cfg.trainer.lr),
                        optimizer=optimizer, dp=session)
    seconds = time.time() - t0
    metrics = {"steps": int(stats["steps"]), "train_loss": float(stats["train_loss"]), "train_seconds": seconds,
               "clients": 1, "rounds": 0, "train_utterances": len(idx)}
    metrics.update(_privacy_labels(cfg, run_config))
    if session is not None:
        delta = float(cfg.dp.target_delta)
        eps = session.epsilon(delta)
        metrics.update({"epsilon/max": eps, "epsilon/client_0": eps, "noise_multiplier": session.noise_multiplier})
        metrics.update(_cross_check(cfg, session.noise_multiplier, 1.0 / len(loader), session.accountant.steps, eps))
    result = evaluate_transcripts(model, _test_loader(cfg, tokenizer), tokenizer)
    metrics.update(wer=result["wer"], cer=result["cer"], test_loss=result["loss"], test_utterances=result["utterances"])
    return metrics


def _privacy_labels(cfg: DictConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """Numbers a results row needs to say what it is (metrics.json holds numbers only; the privacy unit is in config.yaml):
    bytes measured on the wire, DP noise from the OS CSPRNG, or reproducible and NOT private."""
    from privacy.federated.settings import not_private

    labels: dict[str, Any] = {"bytes_on_wire": 1}
    if cfg.dp.name != "none":
        labels["not_private"] = int(not_private(run_config))
        labels["dp/noise_from_os_csprng"] = 1 - labels["not_private"]
    return labels


def _cross_check(cfg: DictConfig, sigma: float | None, sample_rate: float, steps: int, epsilon: float) -> dict[str, float]:
    if not cfg.dp.get("cross_check", True) or not sigma or steps < 1:
        return {}
    from privacy.dp import independent_epsilon

    independent = independent_epsilon(float(sigma), float(sample_rate), int(steps), float(cfg.dp.target_delta), "rdp")
    return {"epsilon/independent_rdp": independent, "epsilon/independent_rel_diff": abs(independent - epsilon) / max(epsilon, 1e-12)}


def run_fl(cfg: DictConfig, out_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    from privacy.federated.runner import run_federated
    from privacy.federated.synthgrid_task import evaluate_transcripts, wav2vec2_synthgrid_task
    from privacy.federated.task import load_federated_state

    run_config = _run_config(cfg, out_dir)
    num_clients = int(cfg.federated.num_clients)
    t0 = time.time()
    summary = run_federated(run_config, num_clients, backend=str(cfg.federated.backend))
    seconds = time.time() - t0
    summary.pop("grid", None)

    model = wav2vec2_synthgrid_task(run_config).build_model()
    load_federated_state(model, summary["final_state"])
    tokenizer = _tokenizer(cfg)
    result = evaluate_transcripts(model, _test_loader(cfg, tokenizer), tokenizer)

    entries = [c for r in summary["rounds"] for c in r["clients"]]
    per_client_eps: dict[int, float] = {}
    for c in entries:  # a client's epsilon is cumulative: its largest report is its spend so far
        per_client_eps[c["partition_id"]] = max(per_client_eps.get(c["partition_id"], 0.0), float(c["epsilon"]))
    sent = [c["bytes_sent"] for c in entries]
    dense = [c["dense_bytes"] for c in entries]
    metrics: dict[str, Any] = {
        "wer": result["wer"],
        "cer": result["cer"],
        "test_loss": result["loss"],
        "test_utterances": result["utterances"],
        "rounds": int(summary["rounds_completed"]),
        "rounds_planned": int(cfg.federated.num_rounds),
        "clients": num_clients,
        "client_updates": len(entries),
        "bytes_per_client_round": float(np.mean(sent)) if sent else 0.0,
        "dense_bytes_per_client_round": float(np.mean(dense)) if dense else 0.0,
        "compression_ratio": float(np.sum(dense) / max(np.sum(sent), 1)) if sent else 0.0,
        "train_seconds": seconds,
        "rejected": int(summary.get("total_rejected", 0)),
        "failed": int(summary.get("total_failed", 0)),
        "stopped_early": int(summary["rounds_completed"] < int(cfg.federated.num_rounds)),
        "rounds_not_aggregated": len(summary.get("rounds_not_aggregated", [])),
        "client_evaluation": int(bool(summary.get("client_evaluation", False))),
    }
    metrics.update(_privacy_labels(cfg, run_config))
    last = summary["rounds"][-1] if summary["rounds"] else {}
    if last.get("eval"):
        metrics["federated_eval_wer"] = float(last["eval"]["eval_wer"])
    if last.get("train_loss") is not None:
        metrics["train_loss"] = float(last["train_loss"])
    if cfg.dp.name == "local":
        metrics["epsilon/max"] = max(per_client_eps.values(), default=0.0)
        for pid, eps in sorted(per_client_eps.items()):
            metrics[f"epsilon/client_{pid}"] = eps
        sigmas = plan.get("noise_multipliers", [])
        if sigmas:
            worst = int(np.argmax([per_client_eps.get(i, 0.0) for i in range(num_clients)]))
            c = plan["clients"][worst]
            steps_done = sum(1 for e in entries if e["partition_id"] == worst) * c["steps_per_round"]
            metrics["noise_multiplier"] = float(sigmas[worst])
            metrics.update(_cross_check(cfg, sigmas[worst], 1.0 / c["batches"], steps_done, metrics["epsilon/max"]))
    elif cfg.dp.name == "central":
        eps = float(summary.get("central_epsilon", 0.0))
        metrics["epsilon/max"] = eps
        metrics["epsilon/server"] = eps
        if summary.get("noise_multiplier") is not None:
            metrics["noise_multiplier"] = float(summary["noise_multiplier"])
    return metrics


def run_federated_task(cfg: DictConfig) -> dict:
    """Entry for model.family=wav2vec2 or federated != none (training/tasks.py dispatches here)."""
    from training.run import Stage

    plan = check_plan(cfg)
    if cfg.task == "pretrain":
        if not cfg.force and checkpoint_ready(cfg.model.checkpoint) and Stage(cfg, "pretrain", directory=cfg.model.checkpoint).done:
            log.info("%s is already pre-trained (status.json says done); force=true runs it again", cfg.model.checkpoint)
            import json

            return json.loads((Path(cfg.model.checkpoint) / "metrics.json").read_text())
        return pretrain(cfg)
    stage = Stage(cfg, "federated")
    if not cfg.force and stage.done:
        import json

        log.info("%s is done (status.json); skipping. Pass force=true to run it again.", stage.dir)
        return json.loads((stage.dir / "metrics.json").read_text())
    ensure_pretrained(cfg)
    if cfg.dp.name == "local":
        log.info("dp=local: noise multiplier(s) %s for target epsilon %g, delta %g", plan.get("noise_multipliers"),
                 cfg.dp.target_epsilon, cfg.dp.target_delta)
    with stage:
        if cfg.federated.name == "none":
            metrics = run_centralised(cfg, stage.dir, plan)
        else:
            metrics = run_fl(cfg, stage.dir, plan)
        metrics.setdefault("epsilon/max", 0.0)
        stage.metrics.update(metrics)
    log.info("wav2vec2 %s / dp=%s / compression=%s: WER %.3f CER %.3f", cfg.federated.name, cfg.dp.name, cfg.compression.name,
             metrics["wer"], metrics["cer"])
    return stage.metrics
