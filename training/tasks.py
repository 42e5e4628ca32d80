"""What each entry-point task does, given a composed config.

    train_avhubert.py task=pretrain | finetune | evaluate | export
        model.family=avhubert  -> training/asr.py (AV-HuBERT + AdaLoRA + masks)
        model.family=wav2vec2  -> privacy/federated (centralised, FL, FL + DP)
    train_speaker_verification.py -> training/attack.py (RJCA attacker)

A sweep re-running a finished stage skips it (its status.json says done and its
configuration fingerprint matches, training/stages.py), so an interrupted multirun
resumes where it stopped; a different configuration in the same directory is refused
with the differing keys; `force=true` runs the stage again from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from training import ddp
from training.config import check_choices

log = logging.getLogger(__name__)

ASR_TASKS = ("pretrain", "finetune", "evaluate", "export")


def _skip_if_done(cfg: DictConfig, name: str, directory: Path | None = None) -> dict | None:
    """Metrics of stage `name` if it finished with this configuration's fingerprint (skip it), else None.
    A finished or partial attempt with another fingerprint stops here (training.run.StageConfigMismatch)."""
    from training.stages import open_stage

    return open_stage(cfg, name, directory=directory).finished()


def _objective(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None


def _dry_run(cfg: DictConfig, name: str) -> None:
    from training.run import save_config

    plan = Path(cfg.paths.run_dir) / "plan"
    plan.mkdir(parents=True, exist_ok=True)
    path = save_config(plan, cfg)
    path.replace(plan / f"{name.replace('/', '_')}.yaml")
    print(f"dry run: {name} would run in {cfg.paths.run_dir}")


def run_asr_task(cfg: DictConfig):
    check_choices(cfg)  # enum-like options, before anything else runs
    if cfg.dry_run:
        return _dry_run(cfg, cfg.task)
    if cfg.model.family == "wav2vec2" or cfg.federated.name != "none":
        from training.federated import run_federated_task

        return run_federated_task(cfg)
    if cfg.task not in ASR_TASKS:
        raise ValueError(f"task={cfg.task!r}: expected one of {', '.join(ASR_TASKS)} (data preparation is `python -m data.prepare`)")
    from training import asr

    if cfg.task == "pretrain":
        done = _skip_if_done(cfg, "pretrain", asr.pretrained_dir(cfg))
        return _objective(done or asr.pretrain(cfg), "pretrain/loss")
    if cfg.task == "finetune":
        # finetune, then evaluate and export; each part is skipped when it is done already,
        # so a sweep interrupted during evaluation does not train again.
        stages = ("finetune", "evaluate", "export") if cfg.eval_after_finetune else ("finetune",)
        results: dict = {}
        for name in stages:
            if name != "finetune" and not ddp.is_main():
                break  # under torchrun, rank 0 evaluates and exports
            done = _skip_if_done(cfg, name)
            results.update(done or getattr(asr, name)(cfg))
        return _objective(results, "wer/audio_video/clean")
    done = _skip_if_done(cfg, cfg.task)
    return _objective(done or getattr(asr, cfg.task)(cfg), "wer/audio_video/clean")


def run_attack_task(cfg: DictConfig):
    from training.attack import attack_stage_name, run_attack

    check_choices(cfg)
    if cfg.dry_run:
        return _dry_run(cfg, attack_stage_name(cfg))

    done = _skip_if_done(cfg, attack_stage_name(cfg))
    return _objective(done or run_attack(cfg), "eer")
