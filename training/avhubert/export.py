"""Export of an AV-HuBERT run's protected (and clean) features for the attacker, and its reader.

`train_speaker_verification.py` (training/attack.py) reads what `export` writes
with `read_export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.files import atomic_write_text
from common.seeding import seed_everything
from data.dataset import build_dataloader
from common.device import move_to_device
from training.avhubert.finetune import asr_run_dir, load_finetuned, make_dataset, masks_from_config, task_device
from training.stage import Stage


# --------------------------------------------------------------------------- export
EXPORT_SPLITS = ("attacker_train", "attacker_trials")


@torch.no_grad()
def export(cfg: DictConfig) -> dict:
    """Protected (and clean) per-modality front-end features of the attacker splits.

    Format (docs/method.md): `<run_dir>/export/<split>.safetensors` with float16 tensors
    `{audio,video}/{clean,protected,lazy}` of shape [sum of frames, D] and an int64
    `offsets` [N+1]; `<split>.json` lists ids and speakers in the same order.
    `protected` = this run's trained masks with fresh noise; `lazy` = masks of the
    same kind at their initial parameters with another seed (an attacker who
    knows the method but not the trained masks). With `asr_run` the model (and its
    masks) is that run's and the data this command's; `<split>.json` records the
    ASR run (`asr_run`), which the attacker checks.
    """
    from safetensors.torch import save_file

    with Stage(cfg, "export") as stage:
        seed_everything(cfg.seed)
        device = task_device(cfg)
        system, tokenizer, mask_gen, system_cfg = load_finetuned(cfg, device)
        m = system_cfg.masks
        lazy_gen = torch.Generator().manual_seed(system_cfg.seed + cfg.attacker.lazy_seed_offset)
        lazy_masks = masks_from_config(m, system.core.cfg, lazy_gen)
        if lazy_masks is not None:
            lazy_masks.to(device).eval()
        for split in EXPORT_SPLITS:
            ds = make_dataset(cfg, split, None)
            loader = build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=cfg.trainer.num_workers, train=False)
            store: dict[str, list[torch.Tensor]] = {f"{mod}/{kind}": [] for mod in ("audio", "video") for kind in ("clean", "protected", "lazy")}
            ids, speakers, lengths = [], [], []
            for b in loader:
                b = move_to_device(b, device)
                ca, cv, pa, pv = system.protected_features(b["audio"], b["video"], b["padding_mask"])
                _, _, la, lv = system.protected_features(b["audio"], b["video"], b["padding_mask"], masks=lazy_masks) if lazy_masks is not None else (None, None, ca, cv)
                for i in range(len(b["ids"])):
                    n = int(b["lengths"][i])
                    for key, t in (("audio/clean", ca), ("video/clean", cv), ("audio/protected", pa), ("video/protected", pv),
                                   ("audio/lazy", la), ("video/lazy", lv)):
                        store[key].append(t[i, :n].to(torch.float16).cpu())
                    lengths.append(n)
                ids += b["ids"]
                speakers += b["speakers"]
            tensors = {k: torch.cat(v) for k, v in store.items()}
            tensors["offsets"] = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
            out = stage.dir / f"{split}.safetensors"
            save_file(tensors, str(out.with_suffix(".tmp")))
            out.with_suffix(".tmp").replace(out)
            atomic_write_text(stage.dir / f"{split}.json", json.dumps({"ids": ids, "speakers": speakers, "dim": int(tensors["audio/clean"].shape[-1]),
                                                                      "masks": system_cfg.masks.name,
                                                                      "asr_run": str(asr_run_dir(cfg).resolve())}, indent=1))
            stage.metrics[f"{split}/utterances"] = len(ids)
            stage.metrics[f"{split}/frames"] = int(sum(lengths))
            stage.metrics[f"{split}/bytes"] = out.stat().st_size
        return dict(stage.metrics)


def read_export(directory: str | Path, split: str) -> tuple[dict[str, list[torch.Tensor]], list[str], list[str]]:
    """Inverse of `export`: {key: [per-utterance [T, D] float32]}, ids, speakers."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path, index = directory / f"{split}.safetensors", directory / f"{split}.json"
    if not path.is_file() or not index.is_file():
        raise FileNotFoundError(f"{path} (or its .json index) not found: run `python train_avhubert.py task=export <same overrides>`")
    tensors = load_file(str(path))
    meta = json.loads(index.read_text())
    offsets = tensors.pop("offsets").tolist()
    if len(offsets) != len(meta["ids"]) + 1:
        raise ValueError(f"{path}: {len(offsets) - 1} utterances but {index} lists {len(meta['ids'])}")
    out = {k: [v[a:b].float() for a, b in zip(offsets[:-1], offsets[1:])] for k, v in tensors.items()}
    return out, meta["ids"], meta["speakers"]
