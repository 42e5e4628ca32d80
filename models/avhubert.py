"""AV-HuBERT (Shi et al., 2022) in plain PyTorch, with the original checkpoint key names.

Read from facebookresearch/av_hubert (`avhubert/hubert.py`, `resnet.py`) and the
fairseq `wav2vec2.py` TransformerEncoder it builds on; written anew. Only the
configuration the released checkpoints use is implemented: no per-modality
sub-encoders (`sub_encoder_layers=0`), pre-LN transformer layers
(`layer_norm_first=True`), GELU, one label set.

Data flow (`forward`)::

    audio [B,104,T] --feature_extractor_audio.proj--> feat_audio [B,T,D] --+
                                                                           |-- frontend_hook (privacy masks)
    video [B,1,T,88,88] --ResNet--> [B,T,512] --proj--> feat_video [B,T,D] +
        --> modality dropout (training) --> fuse: concat [B,T,2D] -> layer_norm -> post_extract_proj -> dropout_input
        --> encode: x + pos_conv(x) -> dropout -> layers (layer_hook after each) -> encoder.layer_norm

A missing modality is replaced by zeros at the front-end output, as the
original `extract_finetune` does, so audio-only, video-only and audio-visual
inputs all run through the same weights.

State-dict keys equal the fairseq ones (`feature_extractor_video.resnet.trunk...`,
`encoder.pos_conv.0.weight_g`, `encoder.layers.N.self_attn.q_proj.weight`, ...).
The positional convolution's weight normalisation is written out by hand
(`WeightNormConv1d`: parameters `weight_g`, `weight_v`, `bias`) instead of
`torch.nn.utils.weight_norm`, which is deprecated and breaks `copy.deepcopy`,
or the parametrizations API, which would rename the keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import ResEncoder

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]
FrontendHook = Callable[[Optional[torch.Tensor], Optional[torch.Tensor]], tuple]


# --------------------------------------------------------------------------- config
@dataclass
class AVHubertConfig:
    """Architecture and regularisation of an AV-HuBERT model.

    Field names follow fairseq's `AVHubertConfig` (what a checkpoint's
    `cfg['model']` holds), plus the two front-end sizes the original hard-codes.
    """

    encoder_embed_dim: int = 768
    encoder_layers: int = 12
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    audio_feat_dim: int = 104  # 26 log-fbank x 4 stacked frames
    resnet_stem_channels: int = 64
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    resnet_relu_type: str = "prelu"  # prelu | relu
    conv_pos: int = 128
    conv_pos_groups: int = 16
    final_dim: int = 256  # <= 0 means encoder_embed_dim, as in fairseq
    untie_final_proj: bool = True
    modality_fuse: str = "concat"  # concat | add
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.0
    dropout_features: float = 0.0
    encoder_layerdrop: float = 0.0
    # The released iter5 configs use 0.5 / 0.5 (fairseq's code default is 0 / 0).
    modality_dropout: float = 0.5  # probability that one modality is zeroed in training
    audio_dropout: float = 0.5  # given a modality drop, probability that it is the audio
    # The original applies modality dropout only in pretraining (`forward`), never when fine-tuning
    # (`extract_finetune`). True also applies it in `AVHubertModel.forward` (fine-tuning here).
    finetune_modality_dropout: bool = False
    # Gradient reaching the front-ends in pretraining is scaled by this (0: front-ends get none);
    # fairseq's code default is 1.0, every pretraining yaml sets 0.1.
    feature_grad_mult: float = 1.0
    masking_type: str = "input"  # input (mask_emb is [audio_feat_dim]) | feature (mask_emb is [D])
    mask_prob_audio: float = 0.8
    mask_length_audio: int = 10
    mask_prob_image: float = 0.3
    mask_length_image: int = 5
    selection_type: str = "same_seq"  # video spans are replaced by frames of: same_seq | same_other_seq
    logit_temp: float = 0.1
    # Rows of label_embs_concat. fairseq counts its Dictionary, i.e. K clusters + 4
    # specials (bos, pad, eos, unk); forward_pretrain targets index these rows directly.
    num_classes: int = 504

    def __post_init__(self) -> None:
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
                             f"encoder_attention_heads={self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
                             f"conv_pos_groups={self.conv_pos_groups}")
        if self.modality_fuse not in ("concat", "add"):
            raise ValueError(f"modality_fuse must be 'concat' or 'add', got {self.modality_fuse!r}")
        if self.masking_type not in ("input", "feature"):
            raise ValueError(f"masking_type must be 'input' or 'feature', got {self.masking_type!r}")
        if self.selection_type not in ("same_seq", "same_other_seq"):
            raise ValueError(f"selection_type must be 'same_seq' or 'same_other_seq', got {self.selection_type!r}")
        if len(self.resnet_widths) != 4:
            raise ValueError(f"resnet_widths needs 4 stage widths, got {list(self.resnet_widths)}")
        self.resnet_widths = [int(w) for w in self.resnet_widths]

    @property
    def projection_dim(self) -> int:
        return self.final_dim if self.final_dim > 0 else self.encoder_embed_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], ignore_unknown: bool = True) -> "AVHubertConfig":
        """Build from a mapping such as a fairseq `cfg['model']`; unknown keys are skipped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown and not ignore_unknown:
            raise ValueError(f"unknown AVHubertConfig fields: {unknown}")
        return cls(**{k: v for k, v in values.items() if k in known})


def avhubert_tiny(**overrides: Any) -> AVHubertConfig:
    """CPU-sized: D=128, 4 layers, FFN 512, 4 heads, ResNet [16,32,64,128] (about 1.6M parameters)."""
    values = dict(encoder_embed_dim=128, encoder_layers=4, encoder_ffn_embed_dim=512, encoder_attention_heads=4,
                  resnet_stem_channels=16, resnet_widths=[16, 32, 64, 128], conv_pos=32, conv_pos_groups=8,
                  final_dim=64, num_classes=104)
    values.update(overrides)
    return AVHubertConfig(**values)


def avhubert_base(**overrides: Any) -> AVHubertConfig:
    """BASE (`base_*_iter5.yaml`): 12 x 768, FFN 3072, 12 heads (about 103M parameters)."""
    values = dict(encoder_embed_dim=768, encoder_layers=12, encoder_ffn_embed_dim=3072, encoder_attention_heads=12)
    values.update(overrides)
    return AVHubertConfig(**values)


def avhubert_large(**overrides: Any) -> AVHubertConfig:
    """LARGE (`large_*_iter5.yaml`): 24 x 1024, FFN 4096, 16 heads (about 325M parameters)."""
    values = dict(encoder_embed_dim=1024, encoder_layers=24, encoder_ffn_embed_dim=4096, encoder_attention_heads=16)
    values.update(overrides)
    return AVHubertConfig(**values)


PRESETS: dict[str, Callable[..., AVHubertConfig]] = {
    "avhubert_tiny": avhubert_tiny,
    "avhubert_base": avhubert_base,
    "avhubert_large": avhubert_large,
}


# --------------------------------------------------------------------------- outputs
@dataclass
class AVHubertOutput:
    last_hidden_state: torch.Tensor  # [B, T, D]
    padding_mask: Optional[torch.Tensor]  # [B, T] bool, True = pad
    hidden_states: Optional[list[torch.Tensor]] = None  # encoder input + after each layer, [B, T, D] each
    feat_audio: Optional[torch.Tensor] = None  # [B, T, D] front-end output after frontend_hook
    feat_video: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------- building blocks
class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is g * v / ||v||, the norm taken per kernel tap (fairseq's `weight_norm(dim=2)`)."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        weight = torch.empty(channels, channels // groups, kernel_size)
        # fairseq's init: N(0, sqrt(4 / (k * D))), then weight_norm sets g = ||w||.
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * channels)))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(self._norm(weight).detach().clone())
        self.bias = nn.Parameter(torch.zeros(channels))

    @staticmethod
    def _norm(v: torch.Tensor) -> torch.Tensor:
        return v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()  # [1, 1, k]

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self._norm(self.weight_v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the extra last frame an even-sized centred convolution produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-self.remove] if self.remove else x


class MultiheadSelfAttention(nn.Module):
    """fairseq-named projections (q_proj, k_proj, v_proj, out_proj) over scaled_dot_product_attention.

    Separate nn.Linear modules so adapters (peft LoRA/AdaLoRA) can target them by name.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        attn_mask = None
        if padding_mask is not None and padding_mask.any():
            keep = ~padding_mask
            # An all-padding row would softmax over nothing (NaN); let it attend to itself instead.
            keep = keep | (~keep.any(dim=1, keepdim=True))
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerEncoderLayer(nn.Module):
    """Pre-LN block: x + Drop(Attn(LN(x))), then x + Drop(fc2(Drop(GELU(fc1(LN(x))))))."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int, dropout: float, attention_dropout: float,
                 activation_dropout: float):
        super().__init__()
        self.self_attn = MultiheadSelfAttention(embed_dim, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), padding_mask))
        h = self.activation_dropout(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(self.fc2(h))


class TransformerEncoder(nn.Module):
    """Convolutional relative position embedding + pre-LN layers + final LayerNorm (fairseq wav2vec2)."""

    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos),
                                      nn.GELU())
        self.layers = nn.ModuleList([
            TransformerEncoderLayer(d, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads, cfg.dropout,
                                    cfg.attention_dropout, cfg.activation_dropout)
            for _ in range(cfg.encoder_layers)
        ])
        self.layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layerdrop = cfg.encoder_layerdrop

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                layer_hook: Optional[LayerHook] = None, output_hidden_states: bool = False):
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout(x)
        hidden_states = [x] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            skip = self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop
            if not skip:
                x = layer(x, padding_mask)
            if layer_hook is not None:
                # Called even when the layer was dropped: a privacy mask at this position must always act.
                x = layer_hook(index, x)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.layer_norm(x), hidden_states


class ModalityFrontEnd(nn.Module):
    """fairseq `SubModel` without a sub-encoder: optional ResNet, then a linear projection to D."""

    def __init__(self, input_dim: int, embed_dim: int, resnet: Optional[ResEncoder] = None):
        super().__init__()
        self.resnet = resnet
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resnet is not None:
            x = self.resnet(x)  # [B, T, C]
        else:
            x = x.transpose(1, 2)  # audio [B, F, T] -> [B, T, F]
        return self.proj(x)


def _init_bert_params(module: nn.Module) -> None:
    """fairseq init_bert_params for the transformer: N(0, 0.02) linears, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- span masking
def compute_span_mask(padding_mask: Optional[torch.Tensor], batch: int, length: int, mask_prob: float,
                      mask_length: int, min_masks: int = 2, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """fairseq's `compute_mask_indices` (static span length, overlap allowed), as AV-HuBERT uses it.

    Per row of unpadded length L: n = max(min_masks, int(mask_prob * L / mask_length + U[0,1)))
    span starts drawn *without replacement* from [0, L - mask_length) (the range widened when the
    row is too short for n spans), each span `mask_length` frames clipped at L. Every row is then cut
    to the same number of masked frames, the smallest any row has, by keeping a random subset of
    its masked frames (fairseq's equalisation; it is why the masked fraction is well below
    mask_prob, 0.44 at p=0.8, L=10 on 75 frames). Rows without a valid frame are left unmasked
    and do not take part in the equalisation (fairseq would then mask nothing anywhere).

    The random draws follow fairseq's order with torch's generator in place of numpy's global
    state (U[0,1) -> torch.rand, choice without replacement -> randperm): the same distribution,
    not the same bits. Returns the [B, T] bool mask and the merged runs of masked frames as
    (batch index, start, end) spans, which is what the video `same_seq` replacement uses.
    """
    mask = torch.zeros(batch, length, dtype=torch.bool)
    spans: list[tuple[int, int, int]] = []
    if mask_prob <= 0:
        return mask.to(device) if device is not None else mask, spans
    # fairseq draws the whole-length count first, whether or not a padding mask replaces it.
    all_num_mask = max(min_masks, int(mask_prob * length / float(mask_length) + float(torch.rand((), generator=generator))))
    rows: list[Optional[torch.Tensor]] = []
    for b in range(batch):
        if padding_mask is not None:
            size = length - int(padding_mask[b].long().sum())
            num_mask = max(min_masks, int(mask_prob * size / float(mask_length) + float(torch.rand((), generator=generator))))
        else:
            size, num_mask = length, all_num_mask
        if size <= 0:
            rows.append(None)
            continue
        min_len = mask_length
        if size - min_len <= num_mask:
            min_len = size - num_mask - 1
        starts = torch.randperm(size - min_len, generator=generator)[:num_mask]
        frames = (starts.view(-1, 1) + torch.arange(mask_length).view(1, -1)).flatten()
        rows.append(torch.unique(frames[frames < size]))
    counts = [len(r) for r in rows if r is not None]
    keep = min(counts) if counts else 0
    for b, frames in enumerate(rows):
        if frames is None:
            continue
        if len(frames) > keep:
            frames = frames[torch.randperm(len(frames), generator=generator)[:keep]]
        mask[b, frames] = True
        # merged runs of masked frames
        row = torch.cat([torch.zeros(1, dtype=torch.int8), mask[b].to(torch.int8), torch.zeros(1, dtype=torch.int8)])
        edges = torch.diff(row)
        for start, end in zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()):
            spans.append((b, start, end))
    return (mask.to(device) if device is not None else mask), spans


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` backward (fairseq's GradMultiply, `feature_grad_mult`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


# --------------------------------------------------------------------------- the model
class AVHubertModel(nn.Module):
    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder_embed_dim
        self.feature_extractor_audio = ModalityFrontEnd(cfg.audio_feat_dim, d)
        resnet = ResEncoder(cfg.resnet_stem_channels, cfg.resnet_widths, cfg.resnet_relu_type)
        self.feature_extractor_video = ModalityFrontEnd(resnet.out_channels, d, resnet)
        fused_dim = 2 * d if cfg.modality_fuse == "concat" else d
        self.layer_norm = nn.LayerNorm(fused_dim)
        self.post_extract_proj = nn.Linear(fused_dim, d) if fused_dim != d else None
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        mask_dim = cfg.audio_feat_dim if cfg.masking_type == "input" else d
        self.mask_emb = nn.Parameter(torch.empty(mask_dim).uniform_())
        self.encoder = TransformerEncoder(cfg)
        self.encoder.apply(_init_bert_params)
        self.final_proj = nn.Linear(d, cfg.projection_dim)
        self.label_embs_concat = nn.Parameter(torch.empty(cfg.num_classes, cfg.projection_dim).uniform_())
        self.frontends_frozen = False

    # ----------------------------------------------------------------- train/eval
    def train(self, mode: bool = True) -> "AVHubertModel":
        super().train(mode)
        if self.frontends_frozen:
            # Frozen front-ends keep their BatchNorm running statistics.
            self.feature_extractor_audio.eval()
            self.feature_extractor_video.eval()
        return self

    # ----------------------------------------------------------------- pieces others call
    def extract_frontends(self, audio: Optional[torch.Tensor] = None, video: Optional[torch.Tensor] = None
                          ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Front-end outputs before fusion: audio [B,104,T] -> [B,T,D]; video [B,1,T,H,W] -> [B,T,D]."""
        if audio is None and video is None:
            raise ValueError("AVHubertModel needs audio, video or both; got neither")
        if audio is not None and (audio.dim() != 3 or audio.size(1) != self.cfg.audio_feat_dim):
            raise ValueError(f"audio must be [B, {self.cfg.audio_feat_dim}, T], got shape {tuple(audio.shape)}")
        if video is not None and (video.dim() != 5 or video.size(1) != 1):
            raise ValueError(f"video must be [B, 1, T, H, W], got shape {tuple(video.shape)}")
        if audio is not None and video is not None and (audio.size(0), audio.size(2)) != (video.size(0), video.size(2)):
            raise ValueError(f"audio [B={audio.size(0)}, T={audio.size(2)}] and video [B={video.size(0)}, "
                             f"T={video.size(2)}] disagree in batch size or frame count")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frontends_frozen):
            feat_audio = self.feature_extractor_audio(audio) if audio is not None else None
            feat_video = self.feature_extractor_video(video) if video is not None else None
        return feat_audio, feat_video

    def modality_dropout(self, feat_audio: Optional[torch.Tensor], feat_video: Optional[torch.Tensor]):
        """In training, with probability modality_dropout zero one modality (audio w.p. audio_dropout).

        The dropped features are multiplied by 0 rather than replaced by new zeros: the values are
        the same, but whatever produced them (front-end, privacy masks) stays in the autograd graph
        with a zero gradient, so DistributedDataParallel (find_unused_parameters=False) sees every
        parameter used on every rank whichever modality a rank dropped.
        """
        if not self.training or self.cfg.modality_dropout <= 0 or feat_audio is None or feat_video is None:
            return feat_audio, feat_video
        if float(torch.rand(())) < self.cfg.modality_dropout:
            if float(torch.rand(())) < self.cfg.audio_dropout:
                feat_audio = feat_audio * 0.0
            else:
                feat_video = feat_video * 0.0
        return feat_audio, feat_video

    def fuse(self, feat_audio: Optional[torch.Tensor], feat_video: Optional[torch.Tensor]) -> torch.Tensor:
        """[B,T,D] x2 -> [B,T,D]: zeros for a missing modality, concat (or add), layer_norm, post_extract_proj."""
        if feat_audio is None and feat_video is None:
            raise ValueError("fuse needs at least one modality's features")
        if feat_audio is None:
            feat_audio = torch.zeros_like(feat_video)
        if feat_video is None:
            feat_video = torch.zeros_like(feat_audio)
        if feat_audio.shape != feat_video.shape:
            raise ValueError(f"audio features {tuple(feat_audio.shape)} and video features "
                             f"{tuple(feat_video.shape)} must have the same [B, T, D] shape")
        if self.cfg.modality_fuse == "concat":
            x = torch.cat([feat_audio, feat_video], dim=-1)
        else:
            x = feat_audio + feat_video
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.dropout_input(x)

    def encode(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
               layer_hook: Optional[LayerHook] = None, output_hidden_states: bool = False) -> AVHubertOutput:
        """Transformer encoder on fused features x [B,T,D]; layer_hook(i, x) runs after layer i (0-based)."""
        if padding_mask is not None and padding_mask.shape != x.shape[:2]:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} does not match features "
                             f"[B, T] = {tuple(x.shape[:2])}")
        out, hidden = self.encoder(x, padding_mask, layer_hook, output_hidden_states)
        return AVHubertOutput(last_hidden_state=out, padding_mask=padding_mask, hidden_states=hidden)

    def forward(self, audio: Optional[torch.Tensor] = None, video: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, frontend_hook: Optional[FrontendHook] = None,
                layer_hook: Optional[LayerHook] = None, mask: bool = False,
                output_hidden_states: bool = False, feat_video: Optional[torch.Tensor] = None) -> AVHubertOutput:
        """`feat_video` [B,T,D]: precomputed video front-end output (frozen front-ends never change it,
        so fine-tuning and evaluation compute it once per utterance); `video` is then not used."""
        if mask:
            audio, video, _ = self.apply_input_mask(audio, video, padding_mask)
        if feat_video is not None:
            if audio is not None and (audio.size(0), audio.size(2)) != tuple(feat_video.shape[:2]):
                raise ValueError(f"audio [B={audio.size(0)}, T={audio.size(2)}] and feat_video {tuple(feat_video.shape)} disagree")
            feat_audio = self.extract_frontends(audio, None)[0] if audio is not None else None
        else:
            feat_audio, feat_video = self.extract_frontends(audio, video)
        if frontend_hook is not None:
            feat_audio, feat_video = frontend_hook(feat_audio, feat_video)
        dropped_audio, dropped_video = feat_audio, feat_video
        if self.cfg.finetune_modality_dropout:
            dropped_audio, dropped_video = self.modality_dropout(feat_audio, feat_video)
        x = self.fuse(dropped_audio, dropped_video)
        out = self.encode(x, padding_mask, layer_hook, output_hidden_states)
        out.feat_audio, out.feat_video = feat_audio, feat_video
        return out

    # ----------------------------------------------------------------- pretraining
    def apply_input_mask(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor],
                         padding_mask: Optional[torch.Tensor], generator: Optional[torch.Generator] = None):
        """Input masking: audio spans -> mask_emb; video spans -> frames from elsewhere (same or other sequence).

        Returns (audio, video, mask_indices [B,T] bool) with fresh tensors (inputs are not modified).
        """
        ref = audio if audio is not None else video
        batch, frames = ref.size(0), ref.size(2)
        mask_indices = torch.zeros(batch, frames, dtype=torch.bool, device=ref.device)
        if audio is not None:
            m, _ = compute_span_mask(padding_mask, batch, frames, self.cfg.mask_prob_audio,
                                     self.cfg.mask_length_audio, generator=generator, device=audio.device)
            audio = torch.where(m.unsqueeze(1), self.mask_emb.view(1, -1, 1).to(audio.dtype), audio)
            mask_indices |= m
        if video is not None:
            m, spans = compute_span_mask(padding_mask, batch, frames, self.cfg.mask_prob_image,
                                         self.cfg.mask_length_image, generator=generator, device=video.device)
            video = self._replace_video_spans(video, m, spans, padding_mask, generator)
            mask_indices |= m
        return audio, video, mask_indices

    def _replace_video_spans(self, video, mask, spans, padding_mask, generator):
        batch, frames = video.size(0), video.size(2)
        source_b = torch.arange(batch).view(-1, 1).expand(batch, frames).clone()
        source_t = torch.arange(frames).view(1, -1).expand(batch, frames).clone()
        if self.cfg.selection_type == "same_other_seq" and batch > 1:
            shift = int(torch.randint(1, batch, (1,), generator=generator))
            source_b = (source_b + shift) % batch
        else:
            lengths = [frames] * batch if padding_mask is None else (~padding_mask).sum(1).tolist()
            for b, start, end in spans:
                span = end - start
                valid = int(lengths[b])
                # Any start whose span does not overlap [start - span, end), as in the original same_seq.
                candidates = [s for s in range(0, max(valid - span + 1, 1)) if s + span <= start or s >= end]
                other = candidates[int(torch.randint(0, len(candidates), (1,), generator=generator))] if candidates else 0
                source_t[b, start:end] = torch.arange(other, other + span).clamp(max=frames - 1)
        # video [B, 1, T, H, W]; gather the source frames then keep them only on masked frames.
        replaced = video[source_b.to(video.device), :, source_t.to(video.device)]  # [B, T, 1, H, W]
        replaced = replaced.permute(0, 2, 1, 3, 4)
        return torch.where(mask.view(batch, 1, frames, 1, 1), replaced, video)

    def compute_logits(self, projected: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of final_proj(x) [N, F] with each label embedding, divided by logit_temp."""
        sim = F.normalize(projected, dim=-1, eps=1e-6) @ F.normalize(self.label_embs_concat, dim=-1, eps=1e-6).t()
        return sim / self.cfg.logit_temp

    def pretrain_frontends(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor]):
        """Front-ends as fairseq's `forward_features` in pretraining: gradient scaled by feature_grad_mult
        (none at 0), then modality dropout."""
        mult = self.cfg.feature_grad_mult
        with torch.set_grad_enabled(torch.is_grad_enabled() and mult > 0):
            feat_audio, feat_video = self.extract_frontends(audio, video)
        if mult > 0 and mult != 1.0 and torch.is_grad_enabled():
            feat_audio = GradMultiply.apply(feat_audio, mult) if feat_audio is not None else None
            feat_video = GradMultiply.apply(feat_video, mult) if feat_video is not None else None
        return self.modality_dropout(feat_audio, feat_video)

    def forward_pretrain(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor],
                         padding_mask: Optional[torch.Tensor], targets: torch.Tensor,
                         generator: Optional[torch.Generator] = None,
                         features_pen_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked prediction of cluster ids targets [B,T] (rows of label_embs_concat); CE over masked frames.

        Loss = mean CE over masked frames + features_pen_weight * mean(fused front-end features^2)
        (fairseq's criterion: `loss_weights: [10]` on `features_pen`, normalised by the masked-frame count).
        """
        ref = audio if audio is not None else video
        if ref is None:
            raise ValueError("forward_pretrain needs audio, video or both")
        batch, frames = ref.size(0), ref.size(2)
        if targets.shape != (batch, frames):
            raise ValueError(f"targets must be [B, T] = {(batch, frames)}, got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.cfg.num_classes):
            raise ValueError(f"targets must be in [0, {self.cfg.num_classes}), got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        if self.cfg.masking_type == "input":
            audio, video, mask_indices = self.apply_input_mask(audio, video, padding_mask, generator)
        feat_audio, feat_video = self.pretrain_frontends(audio, video)
        # fairseq: mean square of the fused features before layer_norm (a missing modality counts as zeros)
        ref_feat = feat_audio if feat_audio is not None else feat_video
        if self.cfg.modality_fuse == "concat":
            squares = sum(f.float().pow(2).sum() for f in (feat_audio, feat_video) if f is not None)
            features_pen = squares / (2 * ref_feat.numel())
        else:
            features_pen = sum(f.float() for f in (feat_audio, feat_video) if f is not None).pow(2).mean()
        x = self.fuse(feat_audio, feat_video)
        if self.cfg.masking_type == "feature":
            mask_indices, _ = compute_span_mask(padding_mask, batch, frames, self.cfg.mask_prob_audio,
                                                self.cfg.mask_length_audio, generator=generator, device=x.device)
            x = torch.where(mask_indices.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        out = self.encode(x, padding_mask)
        logits = self.compute_logits(self.final_proj(out.last_hidden_state))  # [B, T, V]
        valid = torch.ones_like(mask_indices) if padding_mask is None else ~padding_mask
        masked, unmasked = mask_indices & valid, ~mask_indices & valid
        ce = F.cross_entropy(logits[masked], targets[masked], reduction="sum") / masked.sum().clamp(min=1)
        loss = ce + features_pen_weight * features_pen
        with torch.no_grad():
            pred = logits.argmax(-1)
            correct = pred == targets
            logs = {
                "loss": float(loss.detach()),
                "ce_masked": float(ce.detach()),
                "features_pen": float(features_pen.detach()),
                "acc_masked": float(correct[masked].float().mean()) if masked.any() else 0.0,
                "acc_unmasked": float(correct[unmasked].float().mean()) if unmasked.any() else 0.0,
                "n_masked": int(masked.sum()),
                "n_unmasked": int(unmasked.sum()),
            }
        return loss, logs


# --------------------------------------------------------------------------- helpers
def freeze_frontends(model: nn.Module) -> nn.Module:
    """Freeze the audio and video front-ends: no gradients, BatchNorm statistics fixed (eval mode)."""
    core = model.avhubert if hasattr(model, "avhubert") else model
    if not isinstance(core, AVHubertModel):
        raise TypeError(f"freeze_frontends expects an AVHubertModel or AVHubertForCTC, got {type(model).__name__}")
    for module in (core.feature_extractor_audio, core.feature_extractor_video):
        module.requires_grad_(False)
        module.eval()
    core.frontends_frozen = True
    return model


def count_parameters(cfg: AVHubertConfig, pretraining_heads: bool = True) -> int:
    """Parameter count of AVHubertModel(cfg) without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        model = AVHubertModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    if not pretraining_heads:
        total -= model.final_proj.weight.numel() + model.final_proj.bias.numel() + model.label_embs_concat.numel()
    return total


__all__ = [
    "AVHubertConfig", "AVHubertModel", "AVHubertOutput", "PRESETS", "avhubert_base", "avhubert_large",
    "avhubert_tiny", "compute_span_mask", "count_parameters", "freeze_frontends",
]
