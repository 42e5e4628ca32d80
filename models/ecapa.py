"""ECAPA-TDNN speaker encoder (Desplanques et al., 2020) in plain PyTorch.

Written after reading speechbrain's `lobes/models/ECAPA_TDNN.py` and the
`audiomodel.py` of praveena2j/RJCAforSpeakerVerification (the attacker's audio
backbone); no code is shared with either.

Layout: Conv1d(k=5) stem -> three SE-Res2Net blocks (k=3, dilations 2, 3, 4),
each fed the sum of the stem and all previous block outputs (the dense residual
of the original ECAPA paper / the RJCA repo) -> multi-layer feature aggregation
(concat of the three block outputs, 1x1 conv) -> attentive statistics pooling
with global context -> BN -> Linear -> embedding.

Inputs are channel-first sequences ``[B, F, T]`` (log-mel fbank, 104-d stacked
fbank, or any per-frame feature sequence). Variable lengths are given as a
boolean ``valid_mask`` ``[B, T]`` (True = real frame): padded frames are zeroed
before every block and excluded from every statistic (SE means, pooling).

`AttentiveStatsPool` and `PooledEmbedding` also accept a *segment* mask
``[B, L, T]`` and then pool each of the L segments separately, which is how the
RJCA attacker gets one embedding per segment from a single pass over the
utterance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TDNNBlock", "SERes2NetBlock", "AttentiveStatsPool", "PooledEmbedding", "ECAPATDNN"]


def _masked_mean(x: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of x [B, C, T] -> [B, C, 1], counting only valid frames."""
    if valid_mask is None:
        return x.mean(dim=2, keepdim=True)
    m = valid_mask.unsqueeze(1).to(x.dtype)
    return (x * m).sum(dim=2, keepdim=True) / m.sum(dim=2, keepdim=True).clamp_min(1.0)


class TDNNBlock(nn.Module):
    """Conv1d ('same' padding) -> ReLU -> BatchNorm, the ECAPA unit."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size - 1) // 2)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x)))


class SERes2NetBlock(nn.Module):
    """1x1 TDNN -> Res2Net (hierarchical dilated convs over channel groups) -> 1x1 TDNN -> SE, plus residual."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, scale: int = 8, se_channels: int = 128):
        super().__init__()
        if channels % scale:
            raise ValueError(f"SERes2NetBlock: channels ({channels}) must be divisible by res2net scale ({scale})")
        self.scale = scale
        width = channels // scale
        self.tdnn1 = TDNNBlock(channels, channels, 1)
        # The first group passes through unchanged; each later group sees its own
        # slice plus the previous group's output (growing receptive field).
        self.res2net = nn.ModuleList([TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1)])
        self.tdnn2 = TDNNBlock(channels, channels, 1)
        self.se_down = nn.Conv1d(channels, se_channels, 1)
        self.se_up = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Padded frames are re-zeroed before each dilated conv: BN shifts them off
        # zero, and the conv would otherwise carry them into the valid frames.
        keep = None if valid_mask is None else valid_mask.unsqueeze(1).to(x.dtype)

        def zero_pad(h):
            return h if keep is None else h * keep

        h = zero_pad(self.tdnn1(x))
        groups = torch.chunk(h, self.scale, dim=1)
        outs = [groups[0]]
        prev = None
        for conv, g in zip(self.res2net, groups[1:]):
            prev = zero_pad(conv(g if prev is None else g + prev))
            outs.append(prev)
        h = self.tdnn2(torch.cat(outs, dim=1))
        gate = torch.sigmoid(self.se_up(F.relu(self.se_down(_masked_mean(h, valid_mask)))))
        return h * gate + x


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling: per-channel softmax attention over time -> [weighted mean, weighted std].

    x: ``[B, C, T]``; mask: None, ``[B, T]`` (-> output ``[B, 2C]``) or a segment
    mask ``[B, L, T]`` (-> ``[B, L, 2C]``, each segment pooled on its own frames).
    With ``global_context`` the attention also sees the (segment's) mean and std,
    as in ECAPA-TDNN; without it, it is the plain ASP of the RJCA fusion head.
    """

    def __init__(self, channels: int, attention_channels: int = 128, global_context: bool = True, eps: float = 1e-4):
        super().__init__()
        self.global_context = global_context
        self.eps = eps
        self.frame_proj = nn.Conv1d(channels, attention_channels, 1)
        # The 1x1 conv over cat[x, mean, std] is linear, so its mean/std part is
        # applied to the [B, L, C] statistics once instead of to repeated frames.
        self.context_proj = nn.Linear(2 * channels, attention_channels, bias=False) if global_context else None
        self.norm = nn.BatchNorm1d(attention_channels)
        self.out = nn.Conv1d(attention_channels, channels, 1)

    def _stats(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, 1, C, T], w [B, L, C, T] summing to 1 over T
        mean = (x * w).sum(-1)
        var = ((x - mean.unsqueeze(-1)).pow(2) * w).sum(-1)
        return mean, var.clamp_min(self.eps).sqrt()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"AttentiveStatsPool expects x of shape [B, C, T], got {tuple(x.shape)}")
        B, C, T = x.shape
        single = mask is None or mask.dim() == 2
        if mask is None:
            mask = torch.ones(B, 1, T, dtype=torch.bool, device=x.device)
        elif mask.dim() == 2:
            mask = mask[:, None, :]
        if mask.shape[0] != B or mask.shape[-1] != T:
            raise ValueError(f"AttentiveStatsPool: mask shape {tuple(mask.shape)} does not match x [B={B}, C, T={T}]")
        if not bool(mask.any(-1).all()):
            raise ValueError("AttentiveStatsPool: a (segment) mask selects no frame")
        L = mask.shape[1]
        m = mask.to(x.dtype).unsqueeze(2)  # [B, L, 1, T]
        xe = x.unsqueeze(1)  # [B, 1, C, T]
        h = self.frame_proj(x).unsqueeze(1)  # [B, 1, A, T]
        if self.global_context:
            uniform = m / m.sum(-1, keepdim=True)
            mean, std = self._stats(xe, uniform)  # [B, L, C]
            h = h + self.context_proj(torch.cat([mean, std], -1)).unsqueeze(-1)  # [B, L, A, T]
        else:
            h = h.expand(B, L, -1, T)
        A = h.shape[2]
        h = torch.tanh(self.norm(F.relu(h).reshape(B * L, A, T)))
        logits = self.out(h).reshape(B, L, C, T).masked_fill(m == 0, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        mean, std = self._stats(xe, w)
        pooled = torch.cat([mean, std], dim=-1)  # [B, L, 2C]
        return pooled[:, 0] if single else pooled


class PooledEmbedding(nn.Module):
    """AttentiveStatsPool -> BatchNorm -> Linear: a frame sequence (or each of its segments) to an embedding."""

    def __init__(self, channels: int, embed_dim: int, attention_channels: int = 128, global_context: bool = True):
        super().__init__()
        self.pool = AttentiveStatsPool(channels, attention_channels, global_context)
        self.norm = nn.BatchNorm1d(2 * channels)
        self.fc = nn.Linear(2 * channels, embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.pool(x, mask)
        lead = pooled.shape[:-1]
        pooled = self.norm(pooled.reshape(-1, pooled.shape[-1]))
        return self.fc(pooled).reshape(*lead, -1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN: ``[B, in_dim, T]`` -> ``[B, embed_dim]`` (or ``[B, L, embed_dim]`` with a segment mask).

    ``channels`` is C of the paper (512 or 1024 there; 64-256 is plenty on CPU for
    small corpora). ``mfa_channels`` defaults to 3 * channels (1536 for C=512,
    as in the paper).
    """

    def __init__(self, in_dim: int, channels: int = 512, embed_dim: int = 192, mfa_channels: int | None = None,
                 res2net_scale: int = 8, se_channels: int = 128, attention_channels: int = 128,
                 dilations: tuple[int, ...] = (2, 3, 4)):
        super().__init__()
        self.in_dim = in_dim
        self.mfa_channels = mfa_channels or 3 * channels
        self.stem = TDNNBlock(in_dim, channels, kernel_size=5)
        self.blocks = nn.ModuleList([SERes2NetBlock(channels, 3, d, res2net_scale, se_channels) for d in dilations])
        self.mfa = TDNNBlock(channels * len(dilations), self.mfa_channels, 1)
        self.head = PooledEmbedding(self.mfa_channels, embed_dim, attention_channels, global_context=True)

    def frame_features(self, x: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, in_dim, T]`` -> multi-layer-aggregated frame features ``[B, mfa_channels, T]``."""
        if x.dim() != 3 or x.shape[1] != self.in_dim:
            raise ValueError(f"ECAPATDNN expects input [B, {self.in_dim}, T], got {tuple(x.shape)}")
        keep = None if valid_mask is None else valid_mask.unsqueeze(1).to(x.dtype)

        def zero_pad(h):
            return h if keep is None else h * keep

        h = zero_pad(self.stem(zero_pad(x)))
        total, outs = h, []
        for block in self.blocks:
            out = zero_pad(block(total, valid_mask))
            outs.append(out)
            total = total + out
        return zero_pad(self.mfa(torch.cat(outs, dim=1)))

    def forward(self, x: torch.Tensor, valid_mask: torch.Tensor | None = None,
                segment_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.frame_features(x, valid_mask)
        return self.head(h, segment_mask if segment_mask is not None else valid_mask)
