"""Task heads on top of AVHubertModel.

`AVHubertForCTC` mirrors fairseq's `AVHubertCtc` (`avhubert/hubert_asr.py`): the
encoder output goes through `final_dropout` and one linear layer to the
vocabulary. fairseq names these `w2v_encoder.w2v_model.*` and `w2v_encoder.proj`;
here they are `avhubert.*` and `ctc_proj`, and `models.avhubert_checkpoint` translates
in both directions, so fine-tuned fairseq checkpoints load and ours save in the
fairseq layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.avhubert import AVHubertModel, FrontendHook, LayerHook


@dataclass
class CTCOutput:
    logits: torch.Tensor  # [B, T, V]
    log_probs: torch.Tensor  # [B, T, V] float32 log-softmax
    padding_mask: Optional[torch.Tensor]  # [B, T] bool, True = pad
    output_lengths: torch.Tensor  # [B] number of unpadded frames
    last_hidden_state: torch.Tensor  # [B, T, D] encoder output
    hidden_states: Optional[list[torch.Tensor]] = None
    feat_audio: Optional[torch.Tensor] = None  # [B, T, D] front-end outputs after frontend_hook
    feat_video: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None  # [B, D] mean of the encoder output over unpadded frames


def masked_mean(x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over time of x [B, T, D], ignoring padded frames."""
    if padding_mask is None:
        return x.mean(dim=1)
    keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class AVHubertForCTC(nn.Module):
    def __init__(self, model: AVHubertModel, vocab_size: int, final_dropout: float = 0.1, blank: int = 0):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"CTC needs a vocabulary with a blank and at least one token, got vocab_size={vocab_size}")
        if not 0 <= blank < vocab_size:
            raise ValueError(f"blank index {blank} is outside the vocabulary [0, {vocab_size})")
        self.avhubert = model
        self.cfg = model.cfg
        self.vocab_size = vocab_size
        self.blank = blank
        self.final_dropout = nn.Dropout(final_dropout)
        self.ctc_proj = nn.Linear(model.cfg.encoder_embed_dim, vocab_size)
        # fairseq's AVHubertCtc: Xavier-uniform weight, zero bias.
        nn.init.xavier_uniform_(self.ctc_proj.weight)
        nn.init.zeros_(self.ctc_proj.bias)

    def forward(self, audio: Optional[torch.Tensor] = None, video: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, frontend_hook: Optional[FrontendHook] = None,
                layer_hook: Optional[LayerHook] = None, output_hidden_states: bool = False,
                feat_video: Optional[torch.Tensor] = None) -> CTCOutput:
        out = self.avhubert(audio=audio, video=video, padding_mask=padding_mask, frontend_hook=frontend_hook,
                            layer_hook=layer_hook, output_hidden_states=output_hidden_states, feat_video=feat_video)
        hidden = out.last_hidden_state
        logits = self.ctc_proj(self.final_dropout(hidden))
        batch, frames = hidden.shape[:2]
        if padding_mask is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=hidden.device)
        else:
            lengths = (~padding_mask).sum(dim=1).long()
        return CTCOutput(
            logits=logits,
            log_probs=F.log_softmax(logits.float(), dim=-1),
            padding_mask=padding_mask,
            output_lengths=lengths,
            last_hidden_state=hidden,
            hidden_states=out.hidden_states,
            feat_audio=out.feat_audio,
            feat_video=out.feat_video,
            pooled=masked_mean(hidden, padding_mask),
        )

    def ctc_loss(self, output: CTCOutput, targets: torch.Tensor, target_lengths: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        """CTC loss; targets [B, S] (padded) or concatenated [sum S].

        Utterances whose targets cannot be aligned (more labels than frames) give an
        infinite loss, which zero_infinity turns into 0 with no gradient.
        """
        return F.ctc_loss(output.log_probs.transpose(0, 1), targets, output.output_lengths, target_lengths,
                          blank=self.blank, reduction=reduction, zero_infinity=True)
