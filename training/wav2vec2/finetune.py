"""Fine-tuning and evaluation of the Wav2Vec2 variant: centralised baseline, DP-only, FL, FL + local / central DP.

See the package docstring (training/wav2vec2/__init__.py) for what runs when.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig

from training.wav2vec2.plan import centralised_steps, check_plan
from training.wav2vec2.pretrain import checkpoint_ready, ensure_pretrained, pretrain
from training.wav2vec2.run_config import wav2vec2_run_config

CENTRALISED_CHECKPOINT = "centralised_checkpoint.npz"  # the centralised baseline's training state (trainer.ckpt_every)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- runs
def run_centralised(cfg: DictConfig, run_config: dict[str, Any], task, plan: dict[str, Any]) -> dict[str, Any]:
    """One data holder with the union of the clients' training data; DP-SGD when dp=local."""
    from privacy.federated.runner import run_centralised as train_centralised
    from privacy.federated.server_app import GLOBAL_MODEL
    from privacy.federated.server_checkpoint import write_checkpoint
    from privacy.federated.task import federated_state, write_state_npz

    steps = centralised_steps(cfg, plan["clients"])
    path = Path(run_config["run-dir"]) / CENTRALISED_CHECKPOINT
    checkpointing = int(cfg.trainer.ckpt_every) > 0  # under DP-SGD (dp=local) with the privacy ledger
    logger = open_run_log(cfg, Path(run_config["run-dir"]), reset=not (checkpointing and path.exists()))
    every = max(1, int(cfg.trainer.log_every))
    checkpoint_every, on_checkpoint, resume_from = 0, None, None
    if checkpointing:
        # the training state every trainer.ckpt_every steps, rounded up to whole log windows (a window's partial
        # sums are not saved), with the run log's length, so an interrupted run continues where it stopped
        checkpoint_every = -(-int(cfg.trainer.ckpt_every) // every) * every
        resume_from = _centralised_resume_state(cfg, path, logger, steps)
        on_checkpoint = lambda state: write_checkpoint(path, {**state, "logger": logger.state_dict(), "steps": steps})  # noqa: E731
    result = train_centralised(run_config, steps, task,
                               on_step=_step_log(logger, steps, every, initial=int(resume_from["done"]) if resume_from else 0),
                               optimizer_reset_every=int(cfg.federated.centralised_optimizer_reset_every),
                               checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint, resume_from=resume_from)
    stats, session = result["stats"], result["dp"]
    metrics = {"steps": int(stats["steps"]), "train_loss": float(stats["train_loss"]), "train_seconds": result["train_seconds"],
               "clients": 1, "rounds": 0, "train_utterances": result["utterances"]}
    metrics.update(_privacy_labels(cfg, run_config))
    if session is not None:
        delta = float(cfg.dp.target_delta)
        eps = session.epsilon(delta)
        metrics.update({"epsilon/max": eps, "epsilon/client_0": eps, "noise_multiplier": session.noise_multiplier})
        metrics.update(_cross_check(cfg, session.noise_multiplier, 1.0 / result["batches"], session.accountant.steps, eps))
    # the trained parameters, in the file a federation writes its final global model to (scripts/rescore.py reads both)
    write_state_npz(Path(run_config["run-dir"]) / GLOBAL_MODEL, federated_state(result["model"]))
    score = task.evaluate_split(result["model"], str(cfg.eval.split))
    metrics.update(wer=score["wer"], cer=score["cer"], test_loss=score["loss"], test_utterances=score["utterances"])
    log_test_result(logger, metrics["steps"], metrics)
    logger.close()
    return metrics


def _centralised_resume_state(cfg: DictConfig, path: Path, logger, steps: int):
    """The training state in `path` to continue from (its log truncated to the checkpoint's length), or None."""
    from privacy.federated.server_checkpoint import CheckpointMismatch, read_checkpoint

    if not path.exists():
        return None
    saved = read_checkpoint(path)
    if not bool(cfg.trainer.resume):
        raise CheckpointMismatch(f"{path} holds an earlier attempt of this centralised run, stopped after step {saved['done']}, "
                                 f"but trainer.resume is off; resume it (trainer.resume=true) or start over (force=true)")
    if int(saved["steps"]) != steps:  # the stage fingerprint already refuses another configuration; this is its step plan
        raise CheckpointMismatch(f"{path} is of a {saved['steps']}-step run; this one plans {steps} steps")
    if (saved.get("dp_ledger") is not None) != (cfg.dp.name != "none"):  # the fingerprint refuses this too; say it here
        raise CheckpointMismatch(f"{path} is of a run {'with' if saved.get('dp_ledger') is not None else 'without'} DP; "
                                 f"this one has dp={cfg.dp.name}")
    logger.load_state_dict(saved["logger"])
    log.info("resuming the centralised run in %s after step %d of %d%s", path.parent, int(saved["done"]), steps,
             " (DP-SGD: the privacy ledger continues; new noise and batches from the OS CSPRNG)" if saved.get("dp_ledger") else "")
    return saved


def _step_log(logger, total: int, every: int, initial: int = 0):
    """train_local's on_step for the centralised baseline: every `every` steps a log row (the loss
    averaged over the window's examples, as train_loss is over all) and a progress line with ETA.
    `initial`: the steps a resumed run made before (the progress line counts on from there)."""
    from common.progress import Progress

    every = max(1, every)
    progress = Progress(total=total, desc="centralised step", unit="step", every=every, terminal=False, initial=initial)
    window = [0.0, 0]  # loss x examples, examples

    def on_step(done: int, loss: float | None, examples: int) -> None:
        if loss is not None:
            window[0] += loss * examples
            window[1] += examples
        if done % every == 0 or done == total:
            mean = window[0] / window[1] if window[1] else None
            if mean is not None:
                logger.log(done, {"train/loss": mean})
            window[:] = [0.0, 0]
            extra = f"loss {mean:.4g}" if mean is not None else ""
            progress.update(done - progress.done, extra=extra, quiet=done == total)
            if done == total:  # the last line: the whole phase's time per step
                progress.close(extra=extra)

    return on_step


def open_run_log(cfg: DictConfig, out_dir: Path, reset: bool = True):
    """The stage's log.csv / log.jsonl (and wandb under logger=wandb), as every other stage writes,
    emptied of a crashed attempt's entries. A federation writes one entry per round as the round
    ends (step = round: clients' weighted train loss, federated evaluation, epsilon so far, bytes
    sent; `log_round`), the centralised baseline one every trainer.log_every steps; then
    `log_test_result` adds the test-set result at the last step. reset=False keeps the files (a resumed
    centralised run truncates them to its checkpoint's length instead)."""
    from omegaconf import OmegaConf

    from training.run_logger import logger_from_config

    logger = logger_from_config(cfg.logger, out_dir, OmegaConf.to_container(cfg, resolve=True), run_name=cfg.run_name)
    if reset:
        logger.reset()
    return logger


def log_round(logger, entry: Mapping[str, Any]) -> None:
    """One federated round's entry of the server's summary (server_app.run_server) as a log row."""
    values = {"train/loss": entry.get("train_loss"), "epsilon/max_client": entry.get("max_client_epsilon"),
              "epsilon/central": entry.get("central_epsilon"), "bytes_sent_total": entry.get("bytes_sent_total")}
    # sorted: an entry read back from federated_rounds.json (a resumed run's replayed rounds) has its keys sorted
    values.update({f"eval/{k.removeprefix('eval_')}": v for k, v in sorted((entry.get("eval") or {}).items()) if isinstance(v, (int, float))})
    logger.log(int(entry["server_round"]), {k: v for k, v in values.items() if v is not None})


def log_test_result(logger, step: int, final: Mapping[str, Any]) -> None:
    logger.log(step, {f"test/{k}": final[k] for k in ("wer", "cer", "test_loss") if final.get(k) is not None})


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

    # the same kind of accountant from another library: RDP for Opacus' RDP; PLD (numerical, like PRV) for its PRV
    method = "pld" if str(cfg.dp.get("accountant", "rdp")) == "prv" else "rdp"
    independent = independent_epsilon(float(sigma), float(sample_rate), int(steps), float(cfg.dp.target_delta), method)
    return {f"epsilon/independent_{method}": independent, "epsilon/independent_rel_diff": abs(independent - epsilon) / max(epsilon, 1e-12)}


def run_fl(cfg: DictConfig, run_config: dict[str, Any], task, plan: dict[str, Any]) -> dict[str, Any]:
    from privacy.federated.runner import run_federated
    from privacy.federated.task import load_federated_state

    num_clients = int(cfg.federated.num_clients)
    t0 = time.time()
    logger = open_run_log(cfg, Path(run_config["run-dir"]))  # a row per round as it ends (on_round)
    summary = run_federated(run_config, num_clients, backend=str(cfg.federated.backend), on_round=lambda entry: log_round(logger, entry))
    seconds = time.time() - t0
    summary.pop("grid", None)

    model = task.build_model()
    load_federated_state(model, summary["final_state"])
    result = task.evaluate_split(model, str(cfg.eval.split))

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
    log_test_result(logger, int(summary["rounds"][-1]["server_round"]) if summary["rounds"] else 0, metrics)
    logger.close()
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
    if summary.get("cohort_sampling") == "poisson":
        metrics.update({"cohort_rate": float(summary["cohort_rate"]), "population": int(summary["population"]),
                        "mean_cohort_size": float(summary["mean_cohort_size"])})
        if summary.get("noise_to_signal_mean") is not None:
            metrics.update({"dp/noise_to_signal_mean": float(summary["noise_to_signal_mean"]),
                            "dp/clipped_fraction_mean": float(summary["clipped_fraction_mean"])})
            metrics.update(_cross_check(cfg, metrics.get("noise_multiplier"), float(summary["cohort_rate"]),
                                        int(summary["central_releases"]), metrics["epsilon/max"]))
    return metrics


def run_wav2vec2_task(cfg: DictConfig) -> dict:
    """Entry for model.family=wav2vec2 or federated != none (training/tasks.py dispatches here)."""
    from common.library_logs import dedupe_flower_logs
    from training.stage import open_stage, skip_if_done

    dedupe_flower_logs()
    if cfg.task == "build_checkpoint":  # the public start of the private runs
        from training.wav2vec2.plan import check_config
        from training.wav2vec2.public_start import build_public_start

        check_config(cfg)
        return build_public_start(cfg)
    from training.wav2vec2.run_config import uses_lora

    if uses_lora(cfg):  # before anything is read: the public start must match its model card
        from training.wav2vec2.public_start import verify_public_start

        verify_public_start(cfg.model.checkpoint)
    plan = check_plan(cfg)
    if cfg.task == "pretrain":
        done = skip_if_done(cfg, "pretrain", cfg.model.checkpoint) if checkpoint_ready(cfg.model.checkpoint) else None
        return done if done is not None else pretrain(cfg)
    done = skip_if_done(cfg, "federated")
    if done is not None:
        return done
    from privacy.federated.server_app import GLOBAL_MODEL, ROUNDS_CSV, ROUNDS_JSON, ROUNDS_LOG
    from privacy.federated.server_checkpoint import SERVER_CHECKPOINT

    # force=true deletes these too: a fresh attempt must not resume the old one's federation
    stage = open_stage(cfg, "federated", attempt_outputs=(SERVER_CHECKPOINT, CENTRALISED_CHECKPOINT, ROUNDS_JSON, ROUNDS_LOG, ROUNDS_CSV,
                                                          GLOBAL_MODEL))
    if not uses_lora(cfg):
        ensure_pretrained(cfg)
    if cfg.dp.name == "local":
        log.info("dp=local: noise multiplier(s) %s for target epsilon %g, delta %g", plan.get("noise_multipliers"),
                 cfg.dp.target_epsilon, cfg.dp.target_delta)
    with stage:
        from privacy.federated.task import load_task

        if cfg.federated.name == "none":  # the same flat config; FedAvg is a placeholder no federation uses
            run_config = wav2vec2_run_config(cfg, stage.dir, strategy="fedavg")
            metrics = run_centralised(cfg, run_config, load_task(run_config), plan)
        else:
            run_config = wav2vec2_run_config(cfg, stage.dir)
            metrics = run_fl(cfg, run_config, load_task(run_config), plan)
        metrics.setdefault("epsilon/max", 0.0)
        stage.metrics.update(metrics)
    log.info("wav2vec2 %s / dp=%s / compression=%s: WER %.3f CER %.3f", cfg.federated.name, cfg.dp.name, cfg.compression.name,
             metrics["wer"], metrics["cer"])
    return stage.metrics
