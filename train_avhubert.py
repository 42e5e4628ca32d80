"""ASR entry point: AV-HuBERT (task=pretrain | finetune | evaluate | export) and also the Wav2Vec2
federated + differentially private variant (task=pretrain | finetune).

    python train_avhubert.py task=pretrain
    python train_avhubert.py task=finetune masks=both loss=ctc_contrastive
    python train_avhubert.py experiment=fl_dp_wav2vec2      # Wav2Vec2: Flower FL + local DP-SGD
    python train_avhubert.py experiment=fl_dp federated=none dp=none   # Wav2Vec2: centralised baseline

The Wav2Vec2 variant (centralised, DP-only, FL, FL + local / central DP) is
selected by config: model.family=wav2vec2 or federated != none; it runs in
training/wav2vec2/. AV-HuBERT runs in training/avhubert/. Corpus preparation is
`python -m scripts.prepare_data`. Composition only: the dispatch is training/tasks.py.
"""

import sys

import hydra
from omegaconf import DictConfig

import training.config  # noqa: F401  (registers schemas and resolvers)
from training.cli import hydra_argv, report_startup_errors
from training.tasks import run_asr_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with report_startup_errors():
        return run_asr_task(cfg)


if __name__ == "__main__":
    sys.argv = hydra_argv(sys.argv)
    main()
