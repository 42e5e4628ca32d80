"""Self-supervised wav2vec 2.0 pretraining of the tiny model on the public split (task=pretrain)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from common.device import resolve_device

log = logging.getLogger(__name__)


def checkpoint_ready(path: str | Path | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / "config.json").is_file() and any((p / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def pretrain(cfg: DictConfig) -> dict:
    """Self-supervised wav2vec 2.0 pre-training of the tiny model on the public split (audio only)."""
    from models.wav2vec2 import pretrain_wav2vec2_tiny
    from privacy.federated.synthgrid_task import load_split
    from common.seeding import seed_everything
    from training.stage import open_stage

    if not cfg.model.get("checkpoint"):
        raise ValueError(f"task=pretrain with model={cfg.model.name}: model.checkpoint is empty; where should the model go?")
    out_dir = Path(cfg.model.checkpoint)
    with open_stage(cfg, "pretrain", directory=out_dir) as stage:
        generator = seed_everything(int(cfg.seed))
        _, _, waves, _ = load_split(cfg.data.dir, "public")
        loader = DataLoader(waves, batch_size=int(cfg.pretrain.batch_size), shuffle=True, generator=generator,
                            collate_fn=_pad_waveforms, drop_last=len(waves) > int(cfg.pretrain.batch_size))
        t0 = time.time()
        steps = int(cfg.pretrain.max_steps)
        from omegaconf import OmegaConf

        from training.run_logger import logger_from_config

        # a row every log_every steps as training goes: the mean loss of those steps
        with logger_from_config(cfg.logger, out_dir, OmegaConf.to_container(cfg, resolve=True), run_name=f"{cfg.run_name}-pretrain") as logger:
            logger.reset()
            _, losses = pretrain_wav2vec2_tiny(loader, steps=steps, out_dir=out_dir, lr=float(cfg.pretrain.lr), seed=int(cfg.seed),
                                               log_every=int(cfg.pretrain.log_every),
                                               device=resolve_device(cfg.pretrain.device, field="pretrain.device"),
                                               on_log=lambda step, loss: logger.log(step, {"train/loss": loss}))
        tail = losses[-max(1, min(20, len(losses) // 5)):]
        stage.metrics.update({
            "pretrain/loss": float(np.mean(tail)),
            "pretrain/loss_first": float(losses[0]),
            "pretrain/steps": steps,
            "pretrain/utterances": len(waves),
            "pretrain/seconds": time.time() - t0,
        })
        log.info("wav2vec2 tiny pre-trained: loss %.3f -> %.3f in %d steps, saved to %s",
                 losses[0], stage.metrics["pretrain/loss"], steps, out_dir)
    return stage.metrics


def _pad_waveforms(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(w) for w in waves)
    x = torch.zeros(len(waves), n)
    mask = torch.zeros(len(waves), n, dtype=torch.long)
    for i, w in enumerate(waves):
        x[i, : len(w)], mask[i, : len(w)] = w, 1
    return x, mask


def ensure_pretrained(cfg: DictConfig) -> None:
    checkpoint = cfg.model.get("checkpoint")
    if not checkpoint:
        log.warning("model.checkpoint is empty: %s starts from a random initialisation (no pre-training)", cfg.model.name)
        return
    if not checkpoint_ready(checkpoint):
        log.info("no pre-trained %s at %s: pre-training it first on the public split (task=pretrain)", cfg.model.name, checkpoint)
        pretrain(cfg)
