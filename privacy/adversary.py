"""Adversarial speaker classifier behind a gradient-reversal layer (Ganin & Lempitsky, 2015).

A second, standard privacy objective for the masks (and a baseline for the contrastive term):

    logits = C( GRL_γ( mean_t protected[b, t] ) ),   L_adv = CE(logits, speaker)

The classifier C (Linear-GELU-Linear) minimises L_adv; the gradient-reversal layer GRL_γ is
the identity forward and multiplies the gradient by −γ backward, so everything before it (the
masks) receives −γ·∂L_adv and is trained to make the pooled protected features useless for
telling the training speakers apart. The total loss simply adds `weight * L_adv`.

Plain PyTorch; nothing here knows about Hydra.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.avhubert import GradMultiply
from privacy.contrastive import masked_mean_over_time

ADVERSARY_INPUTS = ("fused", "audio", "video")


def gradient_reversal(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; the gradient is multiplied by -scale in the backward pass
    (fairseq's GradMultiply, which the model already uses for feature_grad_mult, with a negative scale)."""
    return GradMultiply.apply(x, -float(scale))


class SpeakerAdversary(nn.Module):
    """Speaker classifier on utterance-mean protected features [B, T, D] -> logits [B, num_speakers]."""

    def __init__(self, in_dim: int, num_speakers: int, hidden_dim: int = 256, grl_scale: float = 1.0):
        super().__init__()
        if in_dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"SpeakerAdversary dims must be positive, got in_dim={in_dim}, hidden_dim={hidden_dim}")
        if num_speakers < 2:
            raise ValueError(f"the adversarial speaker classifier needs >= 2 training speakers, got {num_speakers}")
        if not grl_scale > 0:
            raise ValueError(f"loss.adversary_grl_scale must be > 0, got {grl_scale}")
        self.num_speakers = num_speakers
        self.grl_scale = float(grl_scale)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_speakers))

    def forward(self, features: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = masked_mean_over_time(features, padding_mask)
        return self.net(gradient_reversal(pooled, self.grl_scale))


def adversary_loss(logits: torch.Tensor, speaker_idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the adversary and its (detached) batch accuracy."""
    if speaker_idx.shape != logits.shape[:1]:
        raise ValueError(f"speaker_idx must be [B] = [{logits.shape[0]}], got {tuple(speaker_idx.shape)}")
    if int(speaker_idx.max()) >= logits.shape[1] or int(speaker_idx.min()) < 0:
        raise ValueError(f"speaker index {int(speaker_idx.max())} is outside the adversary's {logits.shape[1]} training speakers")
    loss = F.cross_entropy(logits, speaker_idx)
    with torch.no_grad():
        acc = (logits.argmax(dim=1) == speaker_idx).float().mean()
    return loss, {"accuracy": acc}


def check_privacy_terms(adversary_weight: float, adversary_input: str, noise_weight: float, mask_name: Optional[str],
                        mask_position: str, mask_modalities, model_modalities) -> None:
    """Start-up validation of the adversarial and noise-level terms against the masks and the model.

    Raises ValueError naming both conflicting options."""
    if adversary_weight is None or float(adversary_weight) < 0:
        raise ValueError(f"loss.adversary_weight must be >= 0, got {adversary_weight}")
    if noise_weight is None or float(noise_weight) < 0:
        raise ValueError(f"loss.noise_weight must be >= 0, got {noise_weight}")
    if adversary_input not in ADVERSARY_INPUTS:
        raise ValueError(f"loss.adversary_input must be one of {list(ADVERSARY_INPUTS)}, got {adversary_input!r}")
    no_masks = mask_name in (None, "none")
    if float(adversary_weight) > 0:
        if no_masks:
            raise ValueError(f"loss.adversary_weight={adversary_weight} conflicts with masks={mask_name}: without masks "
                             "nothing before the gradient reversal can learn to hide the speaker")
        if adversary_input != "fused":
            if mask_position == "encoder":
                raise ValueError(f"loss.adversary_input={adversary_input} conflicts with masks.position=encoder: the "
                                 "encoder mask protects the fused stream; use loss.adversary_input=fused")
            if adversary_input not in list(model_modalities):
                raise ValueError(f"loss.adversary_input={adversary_input} conflicts with model.modalities="
                                 f"{list(model_modalities)}: that modality is off")
            if adversary_input not in list(mask_modalities):
                raise ValueError(f"loss.adversary_input={adversary_input} conflicts with masks.modalities="
                                 f"{list(mask_modalities)}: that modality is not masked")
    if float(noise_weight) > 0 and no_masks:
        raise ValueError(f"loss.noise_weight={noise_weight} conflicts with masks={mask_name}: there is no noise level to raise")
