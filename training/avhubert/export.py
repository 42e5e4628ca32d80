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

from common.files import atomic_write_text, file_sha256
from common.progress import Progress
from common.seeding import seed_everything
from data.dataset import build_dataloader
from common.device import move_to_device
from training.avhubert.finetune import asr_run_dir, load_finetuned, make_dataset, masks_from_config, task_device
from training.stage import open_stage


# --------------------------------------------------------------------------- export
EXPORT_SPLITS = ("attacker_train", "attacker_trials")


# The representations an export holds per modality (docs/method.md, section 5):
#   clean            front-end features of the original audio/video: no masks, no anonymisation
#   protected        this run's protection: data.anonymize (if any), then its trained masks (noise draw 1)
#   protected_enrol  the same protection with another noise draw (generator seed + attacker.lazy_seed_offset):
#                    what a lazy-informed attacker gets by running the same system on its enrolment data
#   untrained        masks of the same kind at their initial parameters (generator seed + lazy_seed_offset + 1)
#                    on the same audio: an attacker who knows the method but not the trained masks
EXPORT_KINDS = ("clean", "protected", "protected_enrol", "untrained")


@torch.no_grad()
def export(cfg: DictConfig) -> dict:
    """Clean and protected per-modality front-end features of the attacker splits.

    Format (docs/method.md): `<run_dir>/export/<split>.safetensors` with float16 tensors
    `{audio,video}/{clean,protected,protected_enrol,untrained}` (EXPORT_KINDS) of shape
    [sum of frames, D] and an int64 `offsets` [N+1]; `<split>.json` lists ids and speakers in
    the same order. With `asr_run` the model (and its masks) is that run's and the data this
    command's; `<split>.json` records the ASR run (`asr_run`), which the attacker checks.
    """
    from safetensors.torch import save_file

    with open_stage(cfg, "export") as stage:
        seed_everything(cfg.seed)
        device = task_device(cfg)
        system, tokenizer, mask_gen, system_cfg = load_finetuned(cfg, device)
        m = system_cfg.masks
        enrol_gen = torch.Generator().manual_seed(system_cfg.seed + cfg.attacker.lazy_seed_offset)
        untrained_gen = torch.Generator().manual_seed(system_cfg.seed + cfg.attacker.lazy_seed_offset + 1)
        untrained_masks = masks_from_config(m, system.core.cfg, untrained_gen)
        if untrained_masks is not None:
            untrained_masks.to(device).eval()
        anonymized = cfg.data.get("anonymize", "none") != "none"
        for split in EXPORT_SPLITS:
            ds = make_dataset(cfg, split, None)
            loader = build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=cfg.trainer.num_workers, train=False)
            # The original audio of the same utterances, in the same order (the sampler orders by length,
            # which anonymisation keeps): the clean reference of the ignorant and lazy-informed attackers.
            originals = iter(build_dataloader(make_dataset(cfg, split, None, modalities=("audio",), anonymize="none"), "bucket",
                                              batch_size=16, seed=0, num_workers=cfg.trainer.num_workers, train=False)) if anonymized else None
            store: dict[str, list[torch.Tensor]] = {f"{mod}/{kind}": [] for mod in ("audio", "video") for kind in EXPORT_KINDS}
            ids, speakers, lengths = [], [], []
            progress = Progress(total=len(ds), desc=f"export {split}", unit="utt", every=max(1, len(ds) // 10))
            for b in loader:
                b = move_to_device(b, device)
                ca, cv, pa, pv = system.protected_features(b["audio"], b["video"], b["padding_mask"])
                # The other two draws reuse the video front-end computed above (frozen, deterministic in eval mode):
                # the ResNet over mouth frames is most of the export's time on CPU.
                _, _, ea, ev = system.protected_features(b["audio"], b["video"], b["padding_mask"], feat_video=cv, generator=enrol_gen)
                _, _, ua, uv = (system.protected_features(b["audio"], b["video"], b["padding_mask"], feat_video=cv, masks=untrained_masks)
                                if untrained_masks is not None else (None, None, ca, cv))
                if originals is not None:
                    o = move_to_device(next(originals), device)
                    if o["ids"] != b["ids"]:
                        raise RuntimeError(f"export {split}: original and anonymised batches are not aligned ({o['ids'][:3]} vs {b['ids'][:3]})")
                    ca, _ = system.core.extract_frontends(o["audio"], None)
                for i in range(len(b["ids"])):
                    n = int(b["lengths"][i])
                    for key, t in (("audio/clean", ca), ("video/clean", cv), ("audio/protected", pa), ("video/protected", pv),
                                   ("audio/protected_enrol", ea), ("video/protected_enrol", ev),
                                   ("audio/untrained", ua), ("video/untrained", uv)):
                        store[key].append(t[i, :n].to(torch.float16).cpu())
                    lengths.append(n)
                ids += b["ids"]
                speakers += b["speakers"]
                progress.update(len(b["ids"]))
            progress.close()
            tensors = {k: torch.cat(v) for k, v in store.items()}
            tensors["offsets"] = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
            out = stage.dir / f"{split}.safetensors"
            save_file(tensors, str(out.with_suffix(".tmp")))
            out.with_suffix(".tmp").replace(out)
            atomic_write_text(stage.dir / f"{split}.json", json.dumps({"ids": ids, "speakers": speakers, "dim": int(tensors["audio/clean"].shape[-1]),
                                                                      "masks": system_cfg.masks.name,
                                                                      "anonymize": cfg.data.get("anonymize", "none"),
                                                                      "kinds": list(EXPORT_KINDS),
                                                                      "asr_run": str(asr_run_dir(cfg).resolve()), "sha256": file_sha256(out)}, indent=1))
            stage.metrics[f"{split}/utterances"] = len(ids)
            stage.metrics.update({f"{split}/{k}": v for k, v in ds.skips.report().items()})
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
    meta = json.loads(index.read_text())
    if "sha256" in meta and file_sha256(path) != meta["sha256"]:  # safetensors carry no checksum of their own
        raise ValueError(f"{path}: sha256 differs from the one {index} recorded at export; the file was modified or damaged "
                         "since. Re-run `python train_avhubert.py task=export force=true <same overrides>`")
    tensors = load_file(str(path))
    offsets = tensors.pop("offsets").tolist()
    if len(offsets) != len(meta["ids"]) + 1:
        raise ValueError(f"{path}: {len(offsets) - 1} utterances but {index} lists {len(meta['ids'])}")
    out = {k: [v[a:b].float() for a, b in zip(offsets[:-1], offsets[1:])] for k, v in tensors.items()}
    return out, meta["ids"], meta["speakers"]
