"""Attacker entry point: RJCA speaker verification on an ASR run's representations.

Give it the same overrides as train_avhubert.py; it finds that run directory:

    python train_avhubert.py masks=both loss=ctc_contrastive
    python train_speaker_verification.py masks=both loss=ctc_contrastive attacker.scenario=semi_informed
"""

import sys

import hydra
from omegaconf import DictConfig

import training.config  # noqa: F401  (registers schemas and resolvers)
from training.cli import hydra_argv, report_startup_errors
from training.tasks import run_attack_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with report_startup_errors():
        return run_attack_task(cfg)


if __name__ == "__main__":
    sys.argv = hydra_argv(sys.argv)
    main()
