"""The Wav2Vec2 variant of `train_avhubert.py` (model.family=wav2vec2 or federated != none), Hydra side:
centralised baseline, DP-only, FL, FL + local / central DP, and Wav2Vec2 pretraining, selected by config.
The Flower app it drives (privacy/federated/) runs without Hydra.

    python train_avhubert.py experiment=fl_dp_wav2vec2                 # FL + local DP (Flower, Ray)
    python train_avhubert.py experiment=fl_dp task=pretrain             # wav2vec2 tiny on the public split
    python train_avhubert.py experiment=fl_dp federated=none dp=none    # centralised baseline
    python train_avhubert.py experiment=fl_dp federated=none            # DP-only (DP-SGD, one data holder)
    python train_avhubert.py experiment=fl_dp dp=central                # FL + user-level DP

Stages (training.stage.Stage), one module each:

* ``task=pretrain`` (pretrain.py): :func:`models.wav2vec2.pretrain_wav2vec2_tiny` on the
  ``public`` split (audio only), written to ``model.checkpoint``
  (``${paths.pretrained_dir}/wav2vec2_tiny``) with its own status/metrics.
  ``task=finetune`` runs it first when that checkpoint is missing.
* ``task=finetune`` (finetune.py): ``<run_dir>/federated/metrics.json``, and ``log.csv`` /
  ``log.jsonl`` (wandb too under ``logger=wandb``), written as the run goes: one entry per round
  when it ends (the centralised baseline: one every ``trainer.log_every`` steps), then the test
  result. Pretraining writes the same logs next to its checkpoint, one entry every
  ``pretrain.log_every`` steps.

Start-up checks and budgets: plan.py.

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
any client), WER and CER (common.metrics). All checks that can fail on bad
configuration run before any audio is read (:func:`training.wav2vec2.plan.check_plan`;
:func:`~training.wav2vec2.plan.check_config` is the part a dry run without a prepared corpus runs).
"""
