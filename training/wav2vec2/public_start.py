"""The public Wav2Vec2 start of the private (federated / DP) runs: `task=build_checkpoint` with model=wav2vec2_tiny.

`make checkpoints` runs (``experiment=wav2vec2_public_start``), on the ``public`` speakers of
``data=synthgrid_population`` (disjoint from every client and test speaker):

    1. self-supervised wav2vec 2.0 pretraining (training/wav2vec2/pretrain.py, written to
       ``model.checkpoint``, a Hugging Face directory);
    2. CTC fine-tuning of the whole model except the convolutional feature encoder (word units: the
       closed GRID vocabulary), ``starting_checkpoint.finetune.max_steps`` Adam steps with the clients'
       local-training code (privacy.federated.task.train_local);
    3. greedy-decoding WER on the ``test`` speakers (the private runs' test set): the
       "no private training" reference;
    4. the model at ``starting_checkpoint.path`` (``checkpoints/wav2vec2_tiny_synthgrid.pt``,
       :func:`models.wav2vec2_lora.save_wav2vec2_ctc`) with its model card (``.card.json`` + ``.md``:
       command, seed, data checksum, steps, wall time, WER, sha256), the same machinery as the
       AV-HuBERT starting checkpoint (training/starting_checkpoint.py).

The private runs (``adapter=lora``) check the file against its card's sha256 at start-up
(:func:`verify_public_start`) before anything else is read.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

REGENERATE = ("make checkpoints   (= python -m scripts.prepare_data data=synthgrid_population && "
              "python train_avhubert.py experiment=wav2vec2_public_start task=build_checkpoint)")


def verify_public_start(path: str | Path) -> dict:
    """The card of the shipped public start after checking the file's sha256 against it; a missing card is an error."""
    from training.starting_checkpoint import StartingCheckpointError, card_paths, verify_starting_checkpoint

    card = verify_starting_checkpoint(path, regenerate=REGENERATE)
    if card is None:
        raise StartingCheckpointError(f"{path}: no model card {card_paths(path)[0]} next to it; the private runs start only "
                                      f"from a public start with a card. Regenerate both with `{REGENERATE}`")
    return card


def build_public_start(cfg: DictConfig) -> dict:
    from data.synthgrid.grammar import GRID_WORDS
    from data.tokenizer import WordTokenizer
    from models.wav2vec2_lora import save_wav2vec2_ctc
    from privacy.federated.synthgrid_task import (
        CTCPairsDataset,
        build_wav2vec2_for_task,
        collate_waveforms,
        ctc_loss,
        evaluate_transcripts,
        load_split,
    )
    from privacy.federated.task import train_local
    from common.seeding import seed_everything
    from training.stage import open_stage, skip_if_done
    from training.starting_checkpoint import card_paths, corpus_checksum, sha256_file
    from training.wav2vec2.pretrain import checkpoint_ready, pretrain

    sc = cfg.starting_checkpoint
    out_path = Path(sc.path)
    t_start = time.time()
    pretrained = Path(cfg.model.checkpoint)
    done = skip_if_done(cfg, "pretrain", pretrained) if checkpoint_ready(pretrained) else None
    pre = done if done is not None else pretrain(cfg)

    tokenizer = WordTokenizer(GRID_WORDS)  # the whole closed vocabulary, whatever a split happens to contain
    with open_stage(cfg, "finetune_public") as stage:  # the fine-tuning stage of a starting checkpoint (fingerprint rule)
        generator = seed_everything(int(cfg.seed))
        _, _, waves, targets = load_split(cfg.data.dir, "public", tokenizer)
        loader = torch.utils.data.DataLoader(CTCPairsDataset(waves, targets), batch_size=int(sc.finetune.batch_size), shuffle=True,
                                             generator=generator, collate_fn=collate_waveforms)
        model = build_wav2vec2_for_task(tokenizer.vocab_size, str(pretrained), int(cfg.seed))
        t0 = time.time()
        stats = train_local(model, loader, ctc_loss, steps=int(sc.finetune.max_steps), lr=float(sc.finetune.lr), optimizer="adam")
        seconds = time.time() - t0
        _, _, test_waves, test_targets = load_split(cfg.data.dir, str(cfg.eval.split), tokenizer)
        test = evaluate_transcripts(model, torch.utils.data.DataLoader(CTCPairsDataset(test_waves, test_targets), batch_size=16,
                                                                       collate_fn=collate_waveforms), tokenizer)
        data_sum = corpus_checksum(cfg.data.dir, ("public",))
        save_wav2vec2_ctc(out_path, model, tokenizer.symbols, extra={"corpus": cfg.data.name, "split": "public", "data_sha256": data_sum})
        card = {
            "checkpoint": out_path.name,
            "sha256": sha256_file(out_path),
            "bytes": out_path.stat().st_size,
            "command": REGENERATE,
            "seed": int(cfg.seed),
            "model": cfg.model.name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocabulary": list(tokenizer.symbols),
            "data": {"corpus": cfg.data.name, "dir_name": Path(cfg.data.dir).name, "corpus_seed": int(cfg.data.seed),
                     "sha256": data_sum, "public_utterances": len(waves), "test_split": str(cfg.eval.split),
                     "test_utterances": test["utterances"]},
            "pretraining": {"steps": int(cfg.pretrain.max_steps), "batch_size": int(cfg.pretrain.batch_size),
                            "lr": float(cfg.pretrain.lr), "loss_first": pre.get("pretrain/loss_first"),
                            "loss_last": pre.get("pretrain/loss"), "seconds": pre.get("pretrain/seconds")},
            "finetuning": {"steps": int(stats["steps"]), "batch_size": int(sc.finetune.batch_size), "lr": float(sc.finetune.lr),
                           "optimizer": "adam", "mean_train_ctc": float(stats["train_loss"]), "seconds": round(seconds, 1),
                           "frozen": "convolutional feature encoder"},
            "test_wer": round(100 * test["wer"], 2),
            "test_cer": round(100 * test["cer"], 2),
            "wall_seconds": round(time.time() - t_start, 1),
            "machine": f"{platform.machine()}, torch {torch.__version__}",
        }
        write_public_start_card(out_path, card)
        stage.metrics.update({"public_start/test_wer": test["wer"], "public_start/test_cer": test["cer"],
                              "public_start/finetune_steps": int(stats["steps"]), "public_start/finetune_seconds": seconds})
    log.info("public Wav2Vec2 start -> %s (sha256 %s); WER on the %s speakers %.1f %%", out_path, card["sha256"],
             cfg.eval.split, card["test_wer"])
    _ = card_paths  # the card sits next to the checkpoint (card_paths)
    return stage.metrics


def write_public_start_card(checkpoint: Path, card: dict) -> None:
    import json

    from common.files import atomic_write_text
    from training.starting_checkpoint import card_paths

    def _r(value, digits):
        return "-" if value is None else round(float(value), digits)

    card_json, card_md = card_paths(checkpoint)
    atomic_write_text(card_json, json.dumps(card, indent=1) + "\n")
    p, f = card["pretraining"], card["finetuning"]
    md = f"""# Model card: `{card['checkpoint']}`

<!-- written by `python train_avhubert.py experiment=wav2vec2_public_start task=build_checkpoint`; do not edit by hand -->

The **public start** of the private Wav2Vec2 runs (issue 19): a tiny Wav2Vec2 ({card['model']},
{card['parameters']:,} parameters) pretrained self-supervised (wav2vec 2.0 contrastive loss) and then
CTC-fine-tuned (word units) on the **public** speakers of SynthGRID's population corpus, disjoint from
every client and test speaker. Load with `models.wav2vec2_lora.load_wav2vec2_ctc` (`weights_only=True`).

| field | value |
|---|---|
| command | `{card['command']}` |
| seed | {card['seed']} |
| sha256 | `{card['sha256']}` ({card['bytes']:,} bytes) |
| data | {card['data']['corpus']} `{card['data']['dir_name']}` (corpus seed {card['data']['corpus_seed']}), public split, {card['data']['public_utterances']} utterances; sha256 of manifest + media checksums `{card['data']['sha256']}` |
| pretraining | {p['steps']} steps, batch {p['batch_size']}, lr {p['lr']}; loss {_r(p['loss_first'], 3)} (first step) -> {_r(p['loss_last'], 3)} (last steps); {_r(p['seconds'], 1)} s (its own invocation when it was done before) |
| CTC fine-tuning | {f['steps']} steps, batch {f['batch_size']}, Adam lr {f['lr']}, mean train CTC over the steps {_r(f['mean_train_ctc'], 3)}, {f['seconds']} s; frozen: {f['frozen']} |
| WER on the `{card['data']['test_split']}` speakers (greedy, {card['data']['test_utterances']} utterances) | **{card['test_wer']} %** (CER {card['test_cer']} %): the "no private training" row |
| wall time | {card['wall_seconds']} s for this invocation; {card['machine']} |
"""
    atomic_write_text(card_md, md)
