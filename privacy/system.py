"""The privacy-preserving AV-ASR system of Becker & Martin: AV-HuBERT CTC + feature masks + contrastive head.

    audio, video -> frozen front-ends -> [clean features] -> masks -> [protected features] -> fusion
                 -> transformer (AdaLoRA) -> CTC
    loss = CTC + lambda * InfoNCE(g(pool(protected)), g(pool(clean)), negatives = same-speaker utterances)
               + w_adv * CE(C(GRL(pool(protected))), speaker) - beta * mean log sigma
    (g: learned, frozen or no projection head; C: adversarial speaker classifier; both optional)

The protected features are what would leave the device; `protected_features`
returns them for export. With masks at an encoder position the clean/protected
pair is the hidden state before/after the mask on that layer instead.
See docs/method.md for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from models.heads import AVHubertForCTC, CTCOutput
from privacy.adversary import ADVERSARY_INPUTS, SpeakerAdversary, adversary_loss
from privacy.contrastive import ProjectionHead, privacy_contrastive_loss
from privacy.masks import EncoderLayerMask, ModalityMasks


@dataclass
class MaskedOutput:
    ctc: CTCOutput
    clean: Optional[torch.Tensor]  # [B, T, D] representation before the masks (fused front-end or layer output)
    protected: Optional[torch.Tensor]  # [B, T, D] the same after the masks
    # Contrastive projections of protected (anchor) and clean (positive), computed inside forward
    # so that DistributedDataParallel sees every trained parameter used in its forward pass.
    anchor: Optional[torch.Tensor] = None
    positive: Optional[torch.Tensor] = None
    # Adversarial speaker classifier's logits on pooled protected features (privacy/adversary.py).
    adversary_logits: Optional[torch.Tensor] = None


class MaskedAVSR(nn.Module):
    def __init__(
        self,
        asr: AVHubertForCTC,
        masks: ModalityMasks | EncoderLayerMask | None = None,
        projection: ProjectionHead | None = None,
        adversary: SpeakerAdversary | None = None,
        adversary_input: str = "fused",
    ):
        """projection=None: the contrastive anchors/positives are the representations themselves
        (pooled in the loss), so only the masks (and the encoder below them) can satisfy it.
        adversary_input: which protected features the adversary sees: fused (the representation the
        contrastive term uses), or one modality's front-end output (masks.position=frontend only)."""
        super().__init__()
        if adversary_input not in ADVERSARY_INPUTS:
            raise ValueError(f"loss.adversary_input must be one of {list(ADVERSARY_INPUTS)}, got {adversary_input!r}")
        if adversary is not None and adversary_input != "fused" and isinstance(masks, EncoderLayerMask):
            raise ValueError(f"loss.adversary_input={adversary_input} needs per-modality protected features, but "
                             "masks.position=encoder protects the fused stream; use loss.adversary_input=fused")
        self.asr = asr
        self.masks = masks
        self.projection = projection
        self.adversary = adversary
        self.adversary_input = adversary_input

    @property
    def core(self):
        return self.asr.avhubert

    def forward(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        feat_video: Optional[torch.Tensor] = None,
        capture: bool = False,
    ) -> MaskedOutput:
        """CTC output; with `capture`, also the clean and protected representations [B, T, D]."""
        captured: dict[str, tuple] = {}
        frontend_hook = layer_hook = None
        if isinstance(self.masks, EncoderLayerMask):
            layer = self.masks.layer

            def layer_hook(i, x):
                if i != layer:
                    return x
                y = self.masks(i, x, padding_mask=padding_mask)
                if capture:
                    captured["pair"] = (self.masks(i, x, noise=False, padding_mask=padding_mask), y)
                return y

        else:

            def frontend_hook(fa, fv):
                if self.masks is None:
                    captured["frontend"] = ((fa, fv), (fa, fv))
                    return fa, fv
                fa_p, fv_p = self.masks(fa, fv, padding_mask=padding_mask)
                if capture:
                    # The clean counterpart is the mask without its random part (x * mu_m),
                    # so the contrastive term measures what the noise removes.
                    captured["frontend"] = (self.masks(fa, fv, noise=False, padding_mask=padding_mask), (fa_p, fv_p))
                return fa_p, fv_p

        ctc = self.asr(audio=audio, video=video, padding_mask=padding_mask, frontend_hook=frontend_hook,
                       layer_hook=layer_hook, feat_video=feat_video)
        clean = protected = None
        if capture:
            if "pair" in captured:
                clean, protected = captured["pair"]
            elif "frontend" in captured:
                (fa, fv), (fa_p, fv_p) = captured["frontend"]
                # Fusion without modality dropout: the representation itself, not a training augmentation.
                clean, protected = self.core.fuse(fa, fv), self.core.fuse(fa_p, fv_p)
        anchor = positive = adversary_logits = None
        if capture and protected is not None:
            if self.projection is not None:
                anchor, positive = self.projection(protected, padding_mask), self.projection(clean, padding_mask)
            else:
                anchor, positive = protected, clean
        if capture and self.adversary is not None and protected is not None:
            if self.adversary_input == "fused":
                target = protected
            else:
                fa_p, fv_p = captured["frontend"][1]
                target = fa_p if self.adversary_input == "audio" else fv_p
                if target is None:
                    raise ValueError(f"loss.adversary_input={self.adversary_input}: this batch has no {self.adversary_input} input")
            adversary_logits = self.adversary(target, padding_mask)
        return MaskedOutput(ctc=ctc, clean=clean, protected=protected, anchor=anchor, positive=positive,
                            adversary_logits=adversary_logits)

    def contrastive_loss(self, out: MaskedOutput, speaker_idx: torch.Tensor, padding_mask: Optional[torch.Tensor],
                         temperature: float, pooling: str = "utterance", other_speaker_negatives: bool = False,
                         negatives_from: str = "clean"):
        if out.anchor is None:
            raise RuntimeError("contrastive_loss needs masks and forward(..., capture=True)")
        return privacy_contrastive_loss(out.anchor, out.positive, speaker_idx, temperature=temperature,
                                        other_speaker_negatives=other_speaker_negatives,
                                        padding_mask=padding_mask, pooling=pooling, negatives_from=negatives_from)

    def privacy_loss(self, out: MaskedOutput, speaker_idx: torch.Tensor, padding_mask: Optional[torch.Tensor],
                     contrastive_weight: Optional[float] = None, temperature: float = 0.1, pooling: str = "utterance",
                     other_speaker_negatives: bool = False, negatives_from: str = "clean",
                     adversary_weight: float = 0.0, noise_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """The privacy terms added to CTC:

            contrastive_weight * L_con + adversary_weight * L_adv - noise_weight * mean log sigma

        (contrastive_weight=None: no contrastive term; an adversary or noise term with weight 0 is not
        computed). Returns (scalar, detached logs)."""
        total = torch.zeros((), device=out.ctc.log_probs.device)
        logs: dict[str, float] = {}
        if contrastive_weight is not None:
            cl, diag = self.contrastive_loss(out, speaker_idx, padding_mask, temperature, pooling,
                                             other_speaker_negatives, negatives_from)
            total = total + contrastive_weight * cl
            logs.update(contrastive=float(cl.detach()), **{f"cl_{k}": float(v) for k, v in diag.items()})
        if adversary_weight > 0:
            if out.adversary_logits is None:
                raise RuntimeError("the adversarial term needs an adversary and forward(..., capture=True)")
            adv, diag = adversary_loss(out.adversary_logits, speaker_idx)
            total = total + adversary_weight * adv
            logs.update(adversary=float(adv.detach()), adversary_acc=float(diag["accuracy"]))
        if noise_weight > 0:
            if self.masks is None:
                raise RuntimeError("the noise-level term needs masks")
            total = total - noise_weight * self.masks.mean_log_sigma()
        return total, logs

    @torch.no_grad()
    def protected_features(self, audio, video, padding_mask=None, feat_video=None, masks=None, generator=None):
        """Per-modality front-end features before and after `masks` (default: this system's masks),
        the noise drawn from `generator` (default: the masks' own).

        Returns (clean_audio, clean_video, protected_audio, protected_video), each [B, T, D] or None.
        """
        fa, fv = self.core.extract_frontends(audio, None if feat_video is not None else video)
        if feat_video is not None:
            fv = feat_video
        masks = self.masks if masks is None else masks
        if masks is None:
            return fa, fv, fa, fv
        if isinstance(masks, EncoderLayerMask):
            raise ValueError("export of per-modality protected features needs masks.position=frontend")
        pa, pv = masks(fa, fv, padding_mask=padding_mask, generator=generator)
        return fa, fv, pa, pv
