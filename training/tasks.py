"""What each entry-point task does, given a composed config.

    train_avhubert.py task=pretrain | finetune | evaluate | export
        model.family=avhubert  -> training/avhubert/ (AV-HuBERT + AdaLoRA + masks; one module per stage)
        model.family=wav2vec2  -> training/wav2vec2/ (centralised, DP-only, FL, FL + DP; drives the Flower app in privacy/federated)
    train_speaker_verification.py -> training/attack.py (RJCA attacker)

Both run the start-up checks (training/startup.py: enum-like choices, option conflicts,
inputs) first; `dry_run=true` runs the same checks, then writes `<run_dir>/plan/<task>.yaml`
and runs nothing.

A sweep re-running a finished stage skips it (its status.json says done and its
configuration fingerprint matches, training/fingerprint.py), so an interrupted multirun
resumes where it stopped; a different configuration in the same directory is refused
with the differing keys; `force=true` runs the stage again from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from common.library_logs import quiet_third_party
from training import ddp, startup
from training.stage import skip_if_done

log = logging.getLogger(__name__)


def _objective(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None


def _dry_run(cfg: DictConfig, name: str, plan: startup.Plan) -> None:
    """Everything a real run checks at start-up has passed: write the plan, say where it would run."""
    from common.files import save_config

    plan_dir = Path(cfg.paths.run_dir) / "plan"
    plan_dir.mkdir(parents=True, exist_ok=True)
    path = save_config(plan_dir, cfg)
    path.replace(plan_dir / f"{name.replace('/', '_')}.yaml")
    print(f"dry run: {name} would run in {cfg.paths.run_dir} (start-up checks passed)")
    for item in plan.missing:
        print(f"  missing input: {item}")


def run_asr_task(cfg: DictConfig):
    quiet_third_party()
    if (cfg.model.family == "wav2vec2" or cfg.federated.name != "none") and cfg.data.get("anonymize", "none") != "none":
        raise ValueError(f"data.anonymize={cfg.data.anonymize} conflicts with model.family={cfg.model.family} / "
                         f"federated={cfg.federated.name}: the McAdams baseline is wired into the AV-HuBERT stages only")
    plan = startup.run_checks(startup.check_asr, cfg)
    if cfg.dry_run:
        return _dry_run(cfg, cfg.task, plan)
    startup.enforce(plan)
    if cfg.model.family == "wav2vec2" or cfg.federated.name != "none":
        from training.wav2vec2.finetune import run_wav2vec2_task

        return run_wav2vec2_task(cfg)
    from training.avhubert import export, finetune, pretrain

    if cfg.task == "build_checkpoint":
        from training.starting_checkpoint import build_starting_checkpoint

        return _objective(build_starting_checkpoint(cfg), "starting_checkpoint/wer/audio_video/clean")
    if cfg.task == "pretrain":
        done = skip_if_done(cfg, "pretrain", pretrain.pretrain_out_dir(cfg))
        # the pretraining loop logs its window means under pretrain/train/* (training.loop)
        return _objective(done or pretrain.pretrain(cfg), "pretrain/train/loss")
    run_stage = {"finetune": finetune.finetune, "evaluate": finetune.evaluate, "export": export.export}
    if cfg.task == "finetune":
        # finetune, then evaluate and export; each part is skipped when it is done already,
        # so a sweep interrupted during evaluation does not train again.
        stages = ("finetune", "evaluate", "export") if cfg.eval_after_finetune else ("finetune",)
        results: dict = {}
        for name in stages:
            if name != "finetune" and not ddp.is_main():
                break  # under torchrun, rank 0 evaluates and exports
            done = skip_if_done(cfg, name)
            results.update(done or run_stage[name](cfg))
        return _objective(results, "wer/audio_video/clean")
    done = skip_if_done(cfg, cfg.task)
    return _objective(done or run_stage[cfg.task](cfg), "wer/audio_video/clean")


def run_attack_task(cfg: DictConfig):
    from training.attack import attack_stage_name, run_attack

    quiet_third_party()
    plan = startup.run_checks(startup.check_attack, cfg)
    if cfg.dry_run:
        return _dry_run(cfg, attack_stage_name(cfg), plan)
    startup.enforce(plan)
    done = skip_if_done(cfg, attack_stage_name(cfg))
    return _objective(done or run_attack(cfg), "eer")
