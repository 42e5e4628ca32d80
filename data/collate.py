"""Batching AVSRDataset items into AV-HuBERT's input layout.

    ids, speakers, texts      lists of str (len B)
    speaker_idx               LongTensor [B]
    audio                     FloatTensor [B, 104, T]   (features x time, as AV-HuBERT takes it) or None
    video                     FloatTensor [B, 1, T, 88, 88]                                        or None
    padding_mask              BoolTensor  [B, T]  True = padded frame
    lengths                   LongTensor  [B]     valid frames (25 Hz)
    targets                   LongTensor  [B, S]  padded with TARGET_PAD = -1                     or None
    target_lengths            LongTensor  [B]                                                     or None
    waveform                  FloatTensor [B, N]  zero-padded, only if items carry one            or None
    waveform_lengths          LongTensor  [B]                                                     or None

A missing modality (or no tokenizer / no waveform) gives the key with value None, so
`batch["video"] is None` is the one check consumers need. Targets are padded with -1,
not -100: CTC takes `target_lengths` and ignores the padding, and -1 can never be a
real id (0 is the CTC blank), so a padding leak shows up as an index error.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

TARGET_PAD = -1


def _pad_stack(tensors: Sequence[torch.Tensor], length: int, value: float = 0.0) -> torch.Tensor:
    """Stack [T_i, ...] tensors into [B, length, ...], padding dim 0 with `value`."""
    out = tensors[0].new_full((len(tensors), length, *tensors[0].shape[1:]), value)
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out


def collate_av(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not items:
        raise ValueError("collate_av: empty batch")
    lengths = torch.tensor([int(it["n_frames"]) for it in items], dtype=torch.long)
    T = int(lengths.max())
    batch: dict[str, Any] = {
        "ids": [it["id"] for it in items],
        "speakers": [it["speaker"] for it in items],
        "speaker_idx": torch.tensor([int(it["speaker_idx"]) for it in items], dtype=torch.long),
        "texts": [it["text"] for it in items],
        "lengths": lengths,
        "padding_mask": torch.arange(T)[None, :] >= lengths[:, None],
    }
    for key in ("audio", "video", "targets", "waveform"):
        present = [it.get(key) is not None for it in items]
        if any(present) and not all(present):
            raise ValueError(f"collate_av: {key!r} is present in some items of the batch but not in others")
    if items[0].get("audio") is not None:
        batch["audio"] = _pad_stack([it["audio"] for it in items], T).transpose(1, 2).contiguous()
    else:
        batch["audio"] = None
    if items[0].get("video") is not None:
        batch["video"] = _pad_stack([it["video"] for it in items], T).unsqueeze(1)
    else:
        batch["video"] = None
    if items[0].get("targets") is not None:
        targets = [torch.as_tensor(it["targets"], dtype=torch.long) for it in items]
        batch["target_lengths"] = torch.tensor([len(t) for t in targets], dtype=torch.long)
        batch["targets"] = _pad_stack(targets, int(batch["target_lengths"].max()), TARGET_PAD)
    else:
        batch["targets"] = batch["target_lengths"] = None
    if items[0].get("waveform") is not None:
        waves = [it["waveform"] for it in items]
        batch["waveform_lengths"] = torch.tensor([len(w) for w in waves], dtype=torch.long)
        batch["waveform"] = _pad_stack(waves, int(batch["waveform_lengths"].max()))
    else:
        batch["waveform"] = batch["waveform_lengths"] = None
    return batch
