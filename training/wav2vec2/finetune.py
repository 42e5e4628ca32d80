"""Fine-tuning and evaluation of the Wav2Vec2 variant: centralised baseline, DP-only, FL, FL + local / central DP.

See the package docstring (training/wav2vec2/__init__.py) for what runs when.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from training.wav2vec2.plan import _eval_utterances, _task_keys, centralised_steps, check_plan
from training.wav2vec2.pretrain import checkpoint_ready, ensure_pretrained, pretrain

log = logging.getLogger(__name__)


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
    from common.seeding import seed_everything

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


def run_wav2vec2_task(cfg: DictConfig) -> dict:
    """Entry for model.family=wav2vec2 or federated != none (training/tasks.py dispatches here)."""
    from training.stage import Stage

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
