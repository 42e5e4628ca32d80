"""Multi-objective Optuna search over the privacy-utility trade-off (lambda, noise scale).

    python -m scripts.optuna_sweep --trials 12 experiment=privacy_utility
    python -m scripts.optuna_sweep --trials 12 --study runs/optuna.db experiment=privacy_utility trainer.max_steps=400

Each trial composes the primary config with the given overrides plus the sampled
`loss.lambda` and `masks.init_scale`, fine-tunes (train_avhubert.py's finetune task:
train, evaluate, export) and attacks it (train_speaker_verification.py's task), then
reports (WER AV clean, attacker EER) to Optuna: minimise WER, maximise EER. The
Pareto-optimal trials are printed and every run lands in runs/ like any other, so
`python -m scripts.make_tables` shows them too.

Why not hydra-optuna-sweeper: it pins optuna < 3, which would drag the whole stack
back years; this driver uses the current Optuna and the same task functions the
entry scripts call. The study is stored in SQLite, so a search resumes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hydra import compose, initialize_config_dir

import training.config  # noqa: F401  (schemas, resolvers)
from training.config import PROJECT_ROOT

log = logging.getLogger(__name__)


def evaluate_trial(overrides: list[str]) -> tuple[float, float]:
    from training.tasks import run_asr_task, run_attack_task

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = compose("config", overrides=overrides)
    wer = run_asr_task(cfg)
    eer = run_attack_task(cfg)
    return float(wer), float(eer)


def main(argv: list[str] | None = None) -> None:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--study", type=Path, default=PROJECT_ROOT / "runs" / "optuna_privacy_utility.db")
    parser.add_argument("--lambda-range", type=float, nargs=2, default=(0.01, 3.0))
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.25, 4.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. experiment=privacy_utility")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    args.study.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name="privacy_utility",
        storage=f"sqlite:///{args.study}",
        load_if_exists=True,
        directions=["minimize", "maximize"],  # WER down, attacker EER up
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )

    def objective(trial: "optuna.Trial") -> tuple[float, float]:
        lam = trial.suggest_float("loss.lambda", *args.lambda_range, log=True)
        scale = trial.suggest_float("masks.init_scale", *args.scale_range, log=True)
        # Rounded so the run directory name stays readable and a repeated point reuses its run.
        overrides = [*args.overrides, "loss=ctc_contrastive", f"loss.lambda={lam:.3g}", f"masks.init_scale={scale:.3g}"]
        return evaluate_trial(overrides)

    study.optimize(objective, n_trials=args.trials)
    print("Pareto-optimal trials (WER AV clean, attacker EER):")
    for t in sorted(study.best_trials, key=lambda t: t.values[0]):
        print(f"  lambda={t.params['loss.lambda']:.3g} init_scale={t.params['masks.init_scale']:.3g}: "
              f"WER {100 * t.values[0]:.1f}%  EER {100 * t.values[1]:.1f}%")


if __name__ == "__main__":
    main()
