"""Privacy contrastive loss (InfoNCE) for the learned masks; formulas in docs/method.md.

anchor_i   = projection of the masked ("noisy") utterance i
positive_i = projection of the same utterance without noise (clean counterpart)
negatives  = clean projections of the OTHER utterances of the SAME speaker in the batch

    L = mean_i -log( exp(s(a_i, p_i)/tau) / (exp(s(a_i, p_i)/tau) + sum_{j in N(i)} exp(s(a_i, p_j)/tau)) )

with s = cosine similarity. Telling a speaker's utterances apart from their noisy versions
rewards content and cannot use identity (shared by all candidates). The batch must therefore
hold K >= 2 utterances per speaker: a P x K speaker sampler.

Plain PyTorch; nothing here knows about Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("utterance", "frame")
# Where the same-speaker negatives come from: the clean versions p_j (the retrieval form) or the
# protected versions a_j, so that the loss pushes the protected utterances of one speaker apart
# (a gradient through both sides of every negative pair reaches the masks).
NEGATIVE_SOURCES = ("clean", "protected")
# The contrastive term's projection: a learned head (discarded after training), a frozen random
# head, or none (cosine on the pooled representation itself). Only without a learned head does
# the loss have to be satisfied by the masks rather than by a head that drops the speaker.
PROJECTIONS = ("learned", "frozen", "none")

_BATCH_HINT = (
    "loss=ctc_contrastive needs batches of P speakers x K utterances with K >= 2: "
    "set trainer.sampler=speaker and trainer.utterances_per_speaker >= 2"
)


def masked_mean_over_time(x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T, D] -> [B, D], averaging only non-padded frames (padding_mask [B, T], True = pad)."""
    if x.dim() != 3:
        raise ValueError(f"expected [B, T, D] features, got shape {tuple(x.shape)}")
    if padding_mask is None:
        return x.mean(dim=1)
    if padding_mask.shape != x.shape[:2]:
        raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} does not match features [B, T] = {tuple(x.shape[:2])}")
    keep = (~padding_mask.to(torch.bool)).to(x.dtype).unsqueeze(-1)
    count = keep.sum(dim=1)
    if (count == 0).any():
        empty = torch.nonzero(count.squeeze(-1) == 0).flatten().tolist()
        raise ValueError(f"utterances {empty} are entirely padding; cannot pool them")
    return (x * keep).sum(dim=1) / count


class ProjectionHead(nn.Module):
    """Small MLP head for the contrastive loss, discarded after training.

    pooling='utterance': masked mean over time, then Linear-GELU-Linear -> [B, proj_dim];
    pooling='frame':     the same MLP on every frame                  -> [B, T, proj_dim].
    """

    def __init__(self, in_dim: int, proj_dim: int = 128, hidden_dim: Optional[int] = None, pooling: str = "utterance"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"loss.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if in_dim <= 0 or proj_dim <= 0:
            raise ValueError(f"ProjectionHead dims must be positive, got in_dim={in_dim}, proj_dim={proj_dim}")
        hidden_dim = hidden_dim or in_dim
        self.pooling = pooling
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, proj_dim))

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pooling == "utterance":
            return self.net(masked_mean_over_time(x, padding_mask))
        return self.net(x)


def _negative_mask(speaker_ids: torch.Tensor, other_speaker_negatives: bool) -> torch.Tensor:
    """[B, B] bool: j is a negative for anchor i."""
    not_self = ~torch.eye(len(speaker_ids), dtype=torch.bool, device=speaker_ids.device)
    if other_speaker_negatives:
        return not_self
    return not_self & (speaker_ids.unsqueeze(0) == speaker_ids.unsqueeze(1))


def _check_negatives(speaker_ids: torch.Tensor, negatives: torch.Tensor, other_speaker_negatives: bool) -> None:
    if negatives.is_meta:
        return  # meta tensors (device checks) have no values to check
    lonely = ~negatives.any(dim=1)
    if lonely.any():
        if other_speaker_negatives:
            raise ValueError(f"privacy contrastive loss needs at least 2 utterances in the batch, got {len(speaker_ids)}")
        spk = sorted(set(speaker_ids[lonely].tolist()))
        raise ValueError(
            f"privacy contrastive loss: speaker(s) {spk} have only one utterance in this batch, so their anchors have "
            f"no same-speaker negative. {_BATCH_HINT}."
        )


def _as_speaker_tensor(speaker_ids: Any, device: torch.device) -> torch.Tensor:
    if isinstance(speaker_ids, torch.Tensor):
        return speaker_ids.to(device=device, dtype=torch.long)
    # strings or ints: map to dense ids in order of first appearance
    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(s, len(index)) for s in speaker_ids], dtype=torch.long, device=device)


def privacy_contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    speaker_ids: Any,
    temperature: float = 0.1,
    other_speaker_negatives: bool = False,
    padding_mask: Optional[torch.Tensor] = None,
    pooling: str = "utterance",
    negatives_from: str = "clean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE with anchor = noisy, positive = clean, negatives = same-speaker utterances, their clean
    versions (negatives_from='clean') or their protected versions (negatives_from='protected').

    anchor, positive: [B, P] (already pooled) or [B, T, P] (pooled here with padding_mask
        when pooling='utterance'; pooling='frame' needs [B, T, P]).
    speaker_ids: [B] ints / tensor / strings.
    Returns (scalar loss, diagnostics) where diagnostics holds detached scalars
    pos_sim, neg_sim (mean cosine), accuracy (positive ranked first), num_negatives.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"loss.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if not temperature > 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    if negatives_from not in NEGATIVE_SOURCES:
        raise ValueError(f"loss.negatives must be one of {list(NEGATIVE_SOURCES)}, got {negatives_from!r}")
    if anchor.shape != positive.shape:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must have the same shape")
    spk = _as_speaker_tensor(speaker_ids, anchor.device)
    if spk.shape != (anchor.shape[0],):
        raise ValueError(f"speaker_ids must have one entry per utterance ({anchor.shape[0]}), got shape {tuple(spk.shape)}")
    negatives = _negative_mask(spk, other_speaker_negatives)
    _check_negatives(spk, negatives, other_speaker_negatives)

    if pooling == "utterance":
        if anchor.dim() == 3:
            anchor = masked_mean_over_time(anchor, padding_mask)
            positive = masked_mean_over_time(positive, padding_mask)
        elif anchor.dim() != 2:
            raise ValueError(f"utterance pooling expects [B, P] or [B, T, P], got {tuple(anchor.shape)}")
        return _utterance_infonce(anchor, positive, negatives, temperature, negatives_from)
    if anchor.dim() != 3:
        raise ValueError(f"frame pooling expects [B, T, P] projections, got {tuple(anchor.shape)}")
    return _frame_infonce(anchor, positive, negatives, temperature, padding_mask, negatives_from)


def _similarities(a: torch.Tensor, p: torch.Tensor, negatives_from: str) -> torch.Tensor:
    """[N, N] cosine logits: diagonal s(a_i, p_i); off-diagonal s(a_i, p_j) or s(a_i, a_j)."""
    sim = a @ p.T
    if negatives_from == "clean":
        return sim
    eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    return torch.where(eye, sim, a @ a.T)


def _utterance_infonce(anchor, positive, negatives, temperature, negatives_from="clean"):
    a = F.normalize(anchor, dim=-1)
    p = F.normalize(positive, dim=-1)
    sim = _similarities(a, p, negatives_from)  # [B, B]; diagonal = positives
    candidates = negatives | torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    logits = (sim / temperature).masked_fill(~candidates, float("-inf"))
    target = torch.arange(len(sim), device=sim.device)
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        pos = sim.diagonal()
        neg_count = negatives.sum(dim=1)
        neg_mean = (sim * negatives).sum(dim=1) / neg_count
        best_neg = sim.masked_fill(~negatives, float("-inf")).max(dim=1).values
        diag = {
            "pos_sim": pos.mean(),
            "neg_sim": neg_mean.mean(),
            "accuracy": (pos > best_neg).float().mean(),
            "num_negatives": neg_count.float().mean(),
        }
    return loss, diag


def _frame_infonce(anchor, positive, negatives, temperature, padding_mask, negatives_from="clean"):
    """Frame (i, t): positive = clean frame (i, t); negatives = all valid clean frames of the
    negative utterances. Other frames of utterance i are neither (neighbouring frames are near
    duplicates, so they would be false negatives). Each utterance weighs equally."""
    B, T, _ = anchor.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=anchor.device) if padding_mask is None else ~padding_mask.to(torch.bool)
    if valid.shape != (B, T):
        raise ValueError(f"padding_mask shape {tuple(valid.shape)} does not match [B, T] = {(B, T)}")
    if not valid.any(dim=1).all():
        raise ValueError("some utterances are entirely padding; cannot compute the frame-level contrastive loss")
    utt = torch.arange(B, device=anchor.device).unsqueeze(1).expand(B, T)[valid]  # [N]
    a = F.normalize(anchor[valid], dim=-1)  # [N, P]
    p = F.normalize(positive[valid], dim=-1)
    sim = _similarities(a, p, negatives_from)  # [N, N]
    same_frame = torch.eye(len(utt), dtype=torch.bool, device=sim.device)
    neg = negatives[utt][:, utt]  # frame j belongs to a negative utterance of frame i's utterance
    logits = (sim / temperature).masked_fill(~(neg | same_frame), float("-inf"))
    per_frame = F.cross_entropy(logits, torch.arange(len(utt), device=sim.device), reduction="none")
    per_utt = torch.zeros(B, dtype=per_frame.dtype, device=sim.device).index_add_(0, utt, per_frame) / valid.sum(1)
    loss = per_utt.mean()
    with torch.no_grad():
        pos = sim.diagonal()
        neg_count = neg.sum(dim=1)
        best_neg = sim.masked_fill(~neg, float("-inf")).max(dim=1).values
        diag = {
            "pos_sim": pos.mean(),
            "neg_sim": ((sim * neg).sum(dim=1) / neg_count).mean(),
            "accuracy": (pos > best_neg).float().mean(),
            "num_negatives": neg_count.float().mean(),
        }
    return loss, diag


def _field(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        return cfg[key]  # DictConfig
    except Exception:
        return getattr(cfg, key, default)


def check_loss_options(loss_cfg: Any, sampler: str, utterances_per_speaker: int, mask_name: str) -> None:
    """Start-up validation of the loss options against the sampler and the masks.

    Raises ValueError naming the conflicting options. Contrastive loss with masks=none is an
    error: anchor and positive would be the same tensor, so the loss only trains the projection
    head (and pushes same-speaker utterances apart) and says nothing about privacy; run
    loss=ctc for the unmasked baseline.
    """
    name = _field(loss_cfg, "name", "ctc")
    contrastive = bool(_field(loss_cfg, "contrastive", name == "ctc_contrastive"))
    if not contrastive:
        return
    temperature = _field(loss_cfg, "temperature", 0.1)
    if temperature is None or not float(temperature) > 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    weight = _field(loss_cfg, "lambda", 0.1)
    if weight is None or float(weight) < 0:
        raise ValueError(f"loss.lambda must be >= 0, got {weight}")
    projection = _field(loss_cfg, "projection", "learned")
    if projection not in PROJECTIONS:
        raise ValueError(f"loss.projection must be one of {list(PROJECTIONS)}, got {projection!r}")
    negatives_from = _field(loss_cfg, "negatives", "clean")
    if negatives_from not in NEGATIVE_SOURCES:
        raise ValueError(f"loss.negatives must be one of {list(NEGATIVE_SOURCES)}, got {negatives_from!r}")
    pooling = _field(loss_cfg, "pooling", "utterance")
    if pooling not in POOLINGS:
        raise ValueError(f"loss.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if bool(_field(loss_cfg, "other_speaker_negatives", False)):
        # The ablation takes every other utterance as a negative, so any batch of >= 2 works.
        pass
    elif sampler != "speaker":
        raise ValueError(f"loss={name} conflicts with trainer.sampler={sampler}: {_BATCH_HINT}")
    elif int(utterances_per_speaker) < 2:
        raise ValueError(
            f"loss={name} conflicts with trainer.utterances_per_speaker={utterances_per_speaker}: {_BATCH_HINT}"
        )
    if mask_name in (None, "none"):
        raise ValueError(
            f"loss={name} conflicts with masks={mask_name}: without a mask the noisy anchor equals its clean positive, "
            "so the contrastive term has nothing to protect; use loss=ctc for the unmasked baseline "
            "or choose masks=additive|multiplicative|both"
        )
