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

import hydra
from omegaconf import DictConfig

import training.config  # noqa: F401  (registers schemas and resolvers)
from training.tasks import run_asr_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_asr_task(cfg)


if __name__ == "__main__":
    main()
