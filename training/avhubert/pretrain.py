"""AV-HuBERT pretraining (iteration 1): masked prediction of MFCC k-means units on the public split.

Writes to `<paths.pretrained_dir>/<model.name>/` instead of the run directory,
since many fine-tuning runs share one pretrained model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.seeding import seed_everything
from data.dataset import AVSRDataset, build_dataloader
from models.adapters import count_parameters
from models.avhubert import AVHubertModel
from models.avhubert_checkpoint import save_avhubert_checkpoint
from common.device import pin_memory_for
from training.avhubert.finetune import avhubert_config, make_dataset, make_logger, task_device
from training.loop import loop_kwargs_from_config, train
from training.optim import optimizer_and_scheduler_from_config
from training.stage import open_stage

log = logging.getLogger(__name__)


def pretrained_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.pretrained_dir) / cfg.model.name


# --------------------------------------------------------------------------- pretrain
def _cluster_targets(cfg: DictConfig, dataset: AVSRDataset, out_dir: Path, k: int) -> dict[str, np.ndarray]:
    """Iteration-1 targets: k-means on MFCCs of the public split, cached as public.km."""
    from data.media import read_wav
    from data.targets import assign_labels, fit_kmeans, labels_at_feature_rate, mfcc_39, read_km, write_km

    km_path = out_dir / "public.km"
    ids = [u.id for u in dataset.utterances]
    if km_path.is_file():
        labels = read_km(km_path, expected=len(ids))
    else:
        log.info("pretrain: k-means (k=%d) on MFCCs of %d utterances", k, len(ids))
        feats = [mfcc_39(read_wav(u.audio, cfg.data.sample_rate), cfg.data.sample_rate) for u in dataset.utterances]
        km = fit_kmeans(feats, k, seed=cfg.seed)
        labels = [assign_labels(km, f) for f in feats]
        write_km(km_path, labels)
    return {uid: labels_at_feature_rate(lab, u.n_frames) for uid, lab, u in zip(ids, labels, dataset.utterances)}


def pretrain(cfg: DictConfig) -> dict:
    """Masked prediction of MFCC cluster ids on the public split (AV-HuBERT iteration 1)."""
    if cfg.model.family != "avhubert":
        raise ValueError(f"task=pretrain with model={cfg.model.name}: use train_avhubert.py experiment=fl_dp (wav2vec2) instead")
    out_dir = pretrained_dir(cfg)
    with open_stage(cfg, "pretrain", directory=out_dir, attempt_outputs=("public.km", "checkpoint_last.pt")) as stage:
        gen = seed_everything(cfg.seed)
        # the public pretraining data is never anonymised: every run (McAdams baseline included) starts
        # from the same pretrained checkpoint, which is not in the run directory
        dataset = make_dataset(cfg, "public", train=True, anonymize="none")
        model_cfg = avhubert_config(cfg)
        targets = _cluster_targets(cfg, dataset, out_dir, k=model_cfg.num_classes - 4)
        device = task_device(cfg, "pretrain")
        model = AVHubertModel(model_cfg).to(device)
        tc = cfg.pretrain
        loader = build_dataloader(dataset, "bucket", batch_size=tc.batch_size, seed=cfg.seed, num_workers=tc.num_workers, train=True,
                                  pin_memory=pin_memory_for(device))
        mask_gen = torch.Generator().manual_seed(cfg.seed + 1)

        def step_fn(m, batch):
            frames = batch["audio"].shape[-1]
            tgt = torch.zeros(len(batch["ids"]), frames, dtype=torch.long)
            for i, uid in enumerate(batch["ids"]):
                lab = torch.from_numpy(targets[uid][:frames])
                tgt[i, : lab.shape[0]] = lab + 4  # rows 0..3 are fairseq's dictionary specials
            tgt = tgt.to(batch["audio"].device, non_blocking=True)
            return m.forward_pretrain(batch["audio"], batch["video"], batch["padding_mask"], tgt, generator=mask_gen)

        optimizer, scheduler = optimizer_and_scheduler_from_config(model.named_parameters(), tc)
        logger = make_logger(cfg, out_dir)
        t0 = time.time()
        result = train(model, step_fn, loader, optimizer, scheduler, ckpt_dir=out_dir / "checkpoints", logger=logger,
                       generators={"mask": mask_gen}, device=device, **loop_kwargs_from_config(tc))
        logger.close()
        ckpt = save_avhubert_checkpoint(
            out_dir / "checkpoint_last.pt", model,
            extra={"task": {"labels": ["km"], "label_rate": 100, "sample_rate": cfg.data.fps, "stack_order_audio": cfg.data.stack_order_audio,
                            "image_crop_size": cfg.data.crop_size, "image_mean": cfg.data.image_mean, "image_std": cfg.data.image_std,
                            "fine_tuning": False, "corpus": cfg.data.name, "split": "public"}},
        )
        stage.metrics.update({f"pretrain/{k}": v for k, v in result.last_logs.items()})
        stage.metrics.update(steps=result.step, bad_steps=result.bad_steps_total, seconds=time.time() - t0,
                             utterances=len(dataset), **count_parameters(model), **dataset.skips.report())
        log.info("pretrained %s -> %s", cfg.model.name, ckpt)
        return stage.metrics
