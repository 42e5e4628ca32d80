"""The AV-HuBERT stages of `train_avhubert.py` (model.family=avhubert), one module per stage.

    pretrain.py   task=pretrain: masked prediction of MFCC k-means units (the embedded tiny model)
    finetune.py   task=finetune / evaluate: AdaLoRA + masks + contrastive loss; WER per modality and noise
    export.py     task=export: protected features of the attacker splits, and `read_export` for the attacker
"""
