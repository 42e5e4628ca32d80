"""AV-HuBERT pretraining: one HuBERT iteration of masked prediction of k-means units
(conf/pretrain/iter1.yaml: MFCC targets; iter2/iter5: k-means on the previous iteration's features).

Writes to `<paths.pretrained_dir>/<model.name>/iter<N>/` instead of the run directory,
since many fine-tuning runs share one pretrained model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.progress import Progress
from common.seeding import seed_everything
from data.dataset import AVSRDataset, build_dataloader
from models.adapters import count_parameters
from models.avhubert import AVHubertConfig, AVHubertModel
from models.avhubert_checkpoint import load_avhubert_checkpoint, save_avhubert_checkpoint
from models.heads import AVHubertForCTC
from common.device import pin_memory_for
from training.avhubert.finetune import make_dataset, make_logger, task_device
from training.loop import loop_kwargs_from_config, train
from training.optim import optimizer_and_scheduler_from_config
from training.stage import open_stage

log = logging.getLogger(__name__)


def pretrained_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.pretrained_dir) / cfg.model.name


PRETRAIN_RECIPE = ("masking_type", "mask_prob_audio", "mask_length_audio", "mask_prob_image", "mask_length_image",
                   "modality_dropout", "audio_dropout", "feature_grad_mult", "dropout", "attention_dropout",
                   "activation_dropout", "dropout_input", "dropout_features", "encoder_layerdrop")


def pretrain_model_config(cfg: DictConfig) -> AVHubertConfig:
    """The model group's architecture with the pretraining recipe's fields (conf/pretrain/iter*.yaml)."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    values.update({k: cfg.pretrain[k] for k in PRETRAIN_RECIPE})
    values["num_classes"] = int(cfg.pretrain.kmeans_clusters) + 4  # + fairseq's bos/pad/eos/unk rows
    return AVHubertConfig.from_dict(values)


def pretrain_out_dir(cfg: DictConfig) -> Path:
    return pretrained_dir(cfg) / f"iter{int(cfg.pretrain.iteration)}"


def _mfcc_targets(cfg: DictConfig, dataset: AVSRDataset, k: int) -> list[np.ndarray]:
    """Iteration 1: k-means on 39-d MFCCs of the pretraining split; labels at 100 Hz, as the original's
    label files (every 4th is used at the model's 25 Hz, `_cluster_targets`)."""
    from data.media import read_wav
    from data.targets import assign_labels, fit_kmeans, mfcc_39

    n = len(dataset.utterances)
    log.info("pretrain: k-means (k=%d) on MFCCs of %d utterances", k, n)
    feats = []
    with Progress(total=n, desc="pretrain: MFCCs for k-means", unit="utt", every=max(1, n // 4)) as progress:
        for u in dataset.utterances:
            feats.append(mfcc_39(read_wav(u.audio, cfg.data.sample_rate), cfg.data.sample_rate))
            progress.update()
    frames = sum(len(f) for f in feats)
    km = fit_kmeans(feats, k, seed=cfg.seed, desc=f"pretrain: k-means fit (k={k}, {frames} MFCC frames)")
    return [assign_labels(km, f) for f in feats]


@torch.no_grad()
def _feature_targets(cfg: DictConfig, dataset: AVSRDataset, k: int) -> list[np.ndarray]:
    """Iteration >= 2 (HuBERT's recipe): k-means on the output of encoder layer `target_layer` of the
    previous iteration's model, audio-visual, unmasked, eval mode; one label per 25 Hz frame."""
    from data.targets import assign_labels, fit_kmeans

    path = cfg.pretrain.target_checkpoint
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"pretrain.target_checkpoint={path}: iteration {cfg.pretrain.iteration} clusters the features of the previous "
            "iteration's model; create it with `python train_avhubert.py task=pretrain pretrain=iter1` "
            "(or point pretrain.target_checkpoint at a pretrained checkpoint)")
    loaded, _ = load_avhubert_checkpoint(path, strict=True, expected_format=cfg.model.checkpoint_format)
    teacher = loaded.avhubert if isinstance(loaded, AVHubertForCTC) else loaded
    layer = int(cfg.pretrain.target_layer)
    if not 1 <= layer <= teacher.cfg.encoder_layers:
        raise ValueError(f"pretrain.target_layer={layer}: expected 1..{teacher.cfg.encoder_layers} (encoder layers of {path})")
    teacher.eval()
    feats: dict[str, np.ndarray] = {}
    eval_ds = make_dataset(cfg, dataset.split, None, anonymize="none")
    with Progress(total=len(eval_ds), desc=f"pretrain: layer-{layer} features for k-means", unit="utt",
                  every=max(1, len(eval_ds) // 4)) as progress:
        for batch in build_dataloader(eval_ds, "bucket", batch_size=8, seed=0, num_workers=0, train=False):
            out = teacher(batch["audio"], batch["video"], batch["padding_mask"], output_hidden_states=True)
            hidden = out.hidden_states[layer]  # index 0 is the encoder input
            for i, uid in enumerate(batch["ids"]):
                feats[uid] = hidden[i, : int(batch["lengths"][i])].numpy()
            progress.update(len(batch["ids"]))
    ordered = [feats[u.id] for u in dataset.utterances]
    log.info("pretrain: k-means (k=%d) on layer-%d features of %s (%d utterances)", k, layer, path, len(ordered))
    km = fit_kmeans(ordered, k, seed=cfg.seed, desc=f"pretrain: k-means fit (k={k}, {sum(len(f) for f in ordered)} layer-{layer} frames)")
    return [assign_labels(km, f) for f in ordered]


def _cluster_targets(cfg: DictConfig, dataset: AVSRDataset, out_dir: Path, k: int) -> dict[str, np.ndarray]:
    """Cluster ids per utterance at 25 Hz, cached as <split>.km in the iteration's directory
    (iteration 1: 100 Hz MFCC labels, subsampled here; later iterations: 25 Hz feature labels)."""
    from data.targets import labels_at_feature_rate, read_km, write_km

    km_path = out_dir / f"{dataset.split}.km"
    ids = [u.id for u in dataset.utterances]
    if km_path.is_file():
        labels = read_km(km_path, expected=len(ids))
    else:
        labels = _mfcc_targets(cfg, dataset, k) if int(cfg.pretrain.iteration) == 1 else _feature_targets(cfg, dataset, k)
        write_km(km_path, labels)
    return {uid: lab if len(lab) == u.n_frames else labels_at_feature_rate(lab, u.n_frames)
            for uid, lab, u in zip(ids, labels, dataset.utterances)}


def pretrain(cfg: DictConfig) -> dict:
    """Masked prediction of cluster ids on the pretraining split: one HuBERT iteration (conf/pretrain/)."""
    if cfg.model.family != "avhubert":
        raise ValueError(f"task=pretrain with model={cfg.model.name}: use train_avhubert.py experiment=fl_dp (wav2vec2) instead")
    out_dir = pretrain_out_dir(cfg)
    with open_stage(cfg, "pretrain", directory=out_dir, attempt_outputs=(f"{cfg.pretrain.split}.km", "checkpoint_last.pt")) as stage:
        gen = seed_everything(cfg.seed)
        tc = cfg.pretrain
        # the pretraining data is never anonymised: every run (McAdams baseline included) starts
        # from the same pretrained checkpoint, which is not in the run directory
        dataset = make_dataset(cfg, tc.split, train=True, anonymize="none")
        model_cfg = pretrain_model_config(cfg)
        t_targets = time.time()
        targets = _cluster_targets(cfg, dataset, out_dir, k=model_cfg.num_classes - 4)
        targets_seconds = time.time() - t_targets  # k-means (or reading the cached <split>.km)
        device = task_device(cfg, "pretrain")
        model = AVHubertModel(model_cfg).to(device)
        loader = build_dataloader(dataset, "bucket", batch_size=tc.batch_size, seed=cfg.seed, num_workers=tc.num_workers, train=True,
                                  pin_memory=pin_memory_for(device))
        mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
        pen_weight = float(tc.features_pen_weight)

        def step_fn(m, batch):
            frames = batch["audio"].shape[-1]
            tgt = torch.zeros(len(batch["ids"]), frames, dtype=torch.long)
            for i, uid in enumerate(batch["ids"]):
                lab = torch.from_numpy(targets[uid][:frames])
                tgt[i, : lab.shape[0]] = lab + 4  # rows 0..3 are fairseq's dictionary specials
            tgt = tgt.to(batch["audio"].device, non_blocking=True)
            return m.forward_pretrain(batch["audio"], batch["video"], batch["padding_mask"], tgt, generator=mask_gen,
                                      features_pen_weight=pen_weight)

        optimizer, scheduler = optimizer_and_scheduler_from_config(model.named_parameters(), tc)
        logger = make_logger(cfg, out_dir)
        t0 = time.time()
        result = train(model, step_fn, loader, optimizer, scheduler, ckpt_dir=out_dir / "checkpoints", logger=logger,
                       generators={"mask": mask_gen}, desc="pretrain", device=device, **loop_kwargs_from_config(tc))
        logger.close()
        label_rate = 100 if int(tc.iteration) == 1 else cfg.data.fps
        ckpt = save_avhubert_checkpoint(
            out_dir / "checkpoint_last.pt", model,
            extra={"task": {"labels": ["mfcc" if label_rate == 100 else "km"], "label_rate": label_rate, "sample_rate": cfg.data.fps,
                            "stack_order_audio": cfg.data.stack_order_audio,
                            "image_crop_size": cfg.data.crop_size, "image_mean": cfg.data.image_mean, "image_std": cfg.data.image_std,
                            "fine_tuning": False, "corpus": cfg.data.name, "split": tc.split, "iteration": int(tc.iteration)}},
        )
        stage.metrics.update({f"pretrain/{k}": v for k, v in result.last_logs.items()})
        stage.metrics.update(steps=result.step, bad_steps=result.bad_steps_total, seconds=time.time() - t0,
                             utterances=len(dataset), iteration=int(tc.iteration), targets_seconds=targets_seconds,
                             **count_parameters(model),
                             **dataset.skips.report())
        log.info("pretrained %s (iteration %d) -> %s", cfg.model.name, int(tc.iteration), ckpt)
        return stage.metrics
