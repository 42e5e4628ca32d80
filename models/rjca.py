"""RJCA: recursive joint cross-attention audio-visual speaker verification (the privacy attacker).

Our reading of Praveen & Alam, "Audio-Visual Person Verification based on
Recursive Fusion of Joint Cross-Attention" (arXiv 2403.04654) and of its code
(praveena2j/RJCAforSpeakerVerification: `orig_cam.py`, `av_crossatten.py`,
`dense_coattn.py`, `layer.py`, `ASP.py`, `loss.py`). Written from scratch.

What is kept from the original
  * an utterance becomes L segment embeddings per modality, a ``[B, L, d_a]``
    and v ``[B, L, d_v]``, L2-normalised;
  * each goes through a BiLSTM block (2-layer BiLSTM, hidden d/2 per direction,
    concat[input, output] -> dropout -> Linear -> L2 norm);
  * ``recursions`` joint cross-attention steps, each with its own weights:
      J   = Linear_{dv+da}(cat[v, a])                    [B, L, dv+da]
      K_m = Linear_{L->L}(X_m^T)  (mixes the time axis)   [B, d_m, L]
      V_m = Linear_{d_m}(X_m)                             [B, L, d_m]
      C_m = dropout(tanh(K_m J / sqrt(dv+da)))            [B, d_m, dv+da]
      H_m = relu(tanh(V_m C_m))                           [B, L, dv+da]
      X_m <- X_m + dropout(relu(Linear_{dv+da -> d_m}(H_m)))
  * cat[v, a] -> BiLSTM block -> attentive statistics pooling over the L
    segments -> Linear -> the speaker embedding, trained with AAM-softmax,
    scored by cosine.

What differs, and why
  * The original backbones are frozen pretrained ECAPA (audio, 1 s crops) and
    IResNet-18 (one face image per segment). Here the backbones are trained
    with the fusion, run once over the whole utterance, and the L segment
    embeddings come from pooling each segment of the frame sequence
    (attentive statistics pooling restricted to the segment). Our utterances
    are 1.5-2.5 s, far shorter than 8 x 1 s crops.
  * L is a config value (the K projection is Linear(L, L), so a model is tied
    to its L, as in the original where L=8 is hard-coded); segment boundaries
    adapt to each utterance's valid length (see `segment_masks`).
  * Inputs are either "raw" (16 kHz waveform -> 80-mel log fbank computed here;
    mouth-ROI video ``[B, 1, T, H, W]``) or "features" (AV-HuBERT front-end
    output sequences ``[B, T, Da]`` / ``[B, T, Dv]``, clean or privacy-masked),
    which is what the attacker sees in the privacy experiments.
  * modalities=("audio",) or ("video",) gives the unimodal ablations: the
    fusion steps are skipped, the rest is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.ecapa import AttentiveStatsPool, ECAPATDNN, PooledEmbedding

__all__ = [
    "RJCAConfig",
    "LogMelFbank",
    "VisualFrontend2D",
    "TemporalConvNet",
    "BiLSTMBlock",
    "JointCrossAttention",
    "RecursiveJointCrossAttention",
    "AAMSoftmax",
    "RJCASpeakerVerifier",
    "segment_masks",
    "lengths_from_padding_mask",
]

MODALITIES = ("audio", "video")
INPUT_KINDS = ("features", "raw")


@dataclass
class RJCAConfig:
    input_kind: str = "features"  # features | raw
    modalities: Sequence[str] = ("audio", "video")
    # "features" inputs: per-frame dims of the audio / video sequences (AV-HuBERT front-end: encoder_embed_dim)
    audio_feat_dim: int = 768
    video_feat_dim: int = 768
    # "raw" audio: log-mel fbank as in the RJCA repo (n_fft 512, win 400, hop 160, 20-7600 Hz, pre-emphasis 0.97)
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    f_min: float = 20.0
    f_max: float = 7600.0
    # audio branch: ECAPA-TDNN trunk
    ecapa_channels: int = 256
    ecapa_res2net_scale: int = 8
    ecapa_se_channels: int = 64
    # visual branch: 2D ResNet over ROI frames ("raw" only), then a temporal conv net
    visual_cnn_widths: Sequence[int] = (16, 32, 64)
    visual_channels: int = 256
    visual_temporal_layers: int = 2
    # segment embeddings and fusion
    audio_dim: int = 192  # d_a (192 in the original)
    video_dim: int = 256  # d_v (512 in the original)
    segments: int = 8  # L
    recursions: int = 2
    attention_dropout: float = 0.6
    lstm_layers: int = 2
    lstm_dropout: float = 0.1
    pool_attention_dim: int = 128  # ASP bottleneck (256 in the original fusion head, 128 in ECAPA)
    embed_dim: int = 192

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        self.visual_cnn_widths = tuple(int(w) for w in self.visual_cnn_widths)
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"RJCAConfig.input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"RJCAConfig.modalities must be a non-empty subset of {MODALITIES}, got {list(self.modalities)}")
        for name in ("segments", "recursions", "audio_dim", "video_dim", "embed_dim", "lstm_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "recursions" else 1):
                raise ValueError(f"RJCAConfig.{name} must be a positive integer, got {value!r}")
        if self.ecapa_channels % self.ecapa_res2net_scale:
            raise ValueError(f"RJCAConfig.ecapa_channels ({self.ecapa_channels}) must be divisible by "
                             f"ecapa_res2net_scale ({self.ecapa_res2net_scale})")

    @classmethod
    def from_dict(cls, values: dict) -> "RJCAConfig":
        """Build from a (Hydra) mapping, ignoring keys that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})


# --------------------------------------------------------------------------- masks / segments
def lengths_from_padding_mask(padding_mask: torch.Tensor | None, batch: int, frames: int,
                              device: torch.device) -> torch.Tensor:
    """Valid frame counts ``[B]`` on a time axis of ``frames`` frames.

    ``padding_mask`` ``[B, T]`` (True = pad) may be on a different frame rate than
    the stream (e.g. 25 Hz mask, 100 Hz fbank): the valid *fraction* is carried
    over, so both modalities cover the same span of the utterance.
    """
    if padding_mask is None:
        return torch.full((batch,), frames, dtype=torch.long, device=device)
    if padding_mask.dim() != 2 or padding_mask.shape[0] != batch:
        raise ValueError(f"padding_mask must be [B={batch}, T] (True = pad), got {tuple(padding_mask.shape)}")
    valid = (~padding_mask.bool()).sum(1)
    if bool((valid == 0).any()):
        raise ValueError(f"padding_mask marks every frame as padding for batch item(s) {torch.nonzero(valid == 0).flatten().tolist()}")
    if padding_mask.shape[1] == frames:
        return valid.to(device)
    frac = valid.double() / padding_mask.shape[1]
    return (frac * frames).round().long().clamp(1, frames).to(device)


def segment_masks(lengths: torch.Tensor, frames: int, segments: int) -> torch.Tensor:
    """Boolean ``[B, L, T]``: segment l of item b covers frames [start, end) of its valid part.

    start = floor(l n / L), end = max(ceil((l+1) n / L), start + 1) for valid
    length n: L contiguous, near-equal segments that tile the utterance. When n
    is not a multiple of L neighbouring segments share a boundary frame, and
    when n < L frames are reused, so no segment is ever empty.
    """
    l = torch.arange(segments, device=lengths.device)
    n = lengths.long().unsqueeze(1)  # [B, 1]
    start = (l * n) // segments
    end = torch.maximum(-((-(l + 1) * n) // segments), start + 1)
    t = torch.arange(frames, device=lengths.device)
    return (t >= start.unsqueeze(-1)) & (t < end.unsqueeze(-1))


# --------------------------------------------------------------------------- raw audio front-end
def _hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0) if isinstance(f, float) else 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular HTK-mel filters ``[n_fft // 2 + 1, n_mels]`` (unnormalised, as torchaudio's default)."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    m_min, m_max = _hz_to_mel(float(f_min)), _hz_to_mel(float(f_max))
    mel_pts = torch.linspace(m_min, m_max, n_mels + 2, dtype=torch.float64)
    hz_pts = 700.0 * (10.0 ** (mel_pts / 2595.0) - 1.0)
    lower, centre, upper = hz_pts[:-2], hz_pts[1:-1], hz_pts[2:]
    f = freqs.unsqueeze(1)
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMelFbank(nn.Module):
    """16 kHz waveform ``[B, N]`` -> log-mel fbank ``[B, n_mels, T]`` (T = N // hop + 1), mean-normalised over time.

    Pre-emphasis 0.97, Hamming window, power spectrum, HTK mel filters,
    log(x + 1e-6), then the per-utterance mean over the valid frames is removed
    (as the RJCA audio model does).
    """

    def __init__(self, sample_rate=16000, n_mels=80, n_fft=512, win_length=400, hop_length=160,
                 f_min=20.0, f_max=7600.0, preemphasis=0.97):
        super().__init__()
        if f_max > sample_rate / 2:
            raise ValueError(f"LogMelFbank: f_max={f_max} exceeds the Nyquist frequency {sample_rate / 2}")
        self.n_fft, self.win_length, self.hop_length, self.preemphasis = n_fft, win_length, hop_length, preemphasis
        self.register_buffer("window", torch.hamming_window(win_length, periodic=True), persistent=False)
        self.register_buffer("mel", mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1

    def forward(self, wav: torch.Tensor, valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        if wav.dim() != 2:
            raise ValueError(f"LogMelFbank expects a waveform [B, N], got {tuple(wav.shape)}")
        wav = wav.float()
        wav = torch.cat([wav[:, :1], wav[:, 1:] - self.preemphasis * wav[:, :-1]], dim=1)
        pad = self.n_fft // 2
        mode = "reflect" if wav.shape[1] > pad else "constant"
        wav = F.pad(wav.unsqueeze(1), (pad, pad), mode=mode).squeeze(1)
        spec = torch.stft(wav, self.n_fft, self.hop_length, self.win_length, self.window,
                          center=False, return_complex=True)
        power = spec.abs().pow(2)  # [B, n_fft/2+1, T]
        logmel = torch.log(torch.matmul(power.transpose(1, 2), self.mel) + 1e-6).transpose(1, 2)
        T = logmel.shape[-1]
        if valid_frames is None:
            return logmel - logmel.mean(-1, keepdim=True)
        keep = (torch.arange(T, device=wav.device) < valid_frames.unsqueeze(1)).unsqueeze(1).float()
        mean = (logmel * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1.0)
        return (logmel - mean) * keep


# --------------------------------------------------------------------------- visual front-ends
class _BasicBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class VisualFrontend2D(nn.Module):
    """Small ResNet over grayscale mouth-ROI frames: ``[B, 1, T, H, W]`` -> ``[B, T, widths[-1]]``.

    Per-frame (2D) so identity cues (lip shape, texture) are read from each frame;
    temporal modelling is left to `TemporalConvNet`.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        widths = tuple(widths)
        self.out_dim = widths[-1]
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 5, 2, 2, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(_BasicBlock2D(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 1:
            raise ValueError(f"raw video must be grayscale ROI frames [B, 1, T, H, W], got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, 1, H, W)
        feats = self.stages(self.stem(frames)).mean(dim=(2, 3))
        return feats.reshape(B, T, -1)


class TemporalConvNet(nn.Module):
    """Per-frame visual features ``[B, D, T]`` -> ``[B, C, T]``: 1x1 projection, then residual dilated TDNN blocks."""

    def __init__(self, in_dim: int, channels: int, layers: int = 2):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv1d(in_dim, channels, 1), nn.ReLU(), nn.BatchNorm1d(channels))
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv1d(channels, channels, 3, dilation=2 ** i, padding=2 ** i), nn.ReLU(),
                          nn.BatchNorm1d(channels))
            for i in range(layers)
        ])

    def forward(self, x: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = None if valid_mask is None else valid_mask.unsqueeze(1).to(x.dtype)
        h = self.proj(x if keep is None else x * keep)
        for block in self.blocks:
            h = h if keep is None else h * keep
            h = h + block(h)
        return h if keep is None else h * keep


# --------------------------------------------------------------------------- fusion
class BiLSTMBlock(nn.Module):
    """BiLSTM over segments with a residual concat: ``[B, L, d]`` -> L2-normalised ``[B, L, d]``."""

    def __init__(self, dim: int, num_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        hidden = max(dim // 2, 1)
        self.rnn = nn.LSTM(dim, hidden, num_layers=num_layers, batch_first=True, bidirectional=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim + 2 * hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return F.normalize(self.proj(self.dropout(torch.cat([x, out], dim=-1))), dim=-1)


class JointCrossAttention(nn.Module):
    """One joint cross-attention step (module docstring); returns residually updated (v, a)."""

    def __init__(self, video_dim: int, audio_dim: int, segments: int, dropout: float = 0.6):
        super().__init__()
        joint = video_dim + audio_dim
        self.joint = nn.Linear(joint, joint)
        self.key_video = nn.Linear(segments, segments)
        self.key_audio = nn.Linear(segments, segments)
        self.value_video = nn.Linear(video_dim, video_dim)
        self.value_audio = nn.Linear(audio_dim, audio_dim)
        self.attn_dropout_video = nn.Dropout(dropout)
        self.attn_dropout_audio = nn.Dropout(dropout)
        self.update_video = nn.Sequential(nn.Linear(joint, video_dim), nn.ReLU(), nn.Dropout(dropout))
        self.update_audio = nn.Sequential(nn.Linear(joint, audio_dim), nn.ReLU(), nn.Dropout(dropout))
        self.segments = segments

    @staticmethod
    def _attend(joint, key, value, dropout):
        # key [B, d_m, L] . joint [B, L, dJ] -> correlation between each feature of
        # modality m and each joint feature, summed over segments.
        corr = dropout(torch.tanh(torch.bmm(key, joint) / math.sqrt(joint.shape[-1])))  # [B, d_m, dJ]
        return F.relu(torch.tanh(torch.bmm(value, corr)))  # [B, L, dJ]

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if video.shape[1] != self.segments or audio.shape[1] != self.segments:
            raise ValueError(f"JointCrossAttention was built for L={self.segments} segments, "
                             f"got video {tuple(video.shape)} and audio {tuple(audio.shape)}")
        joint = self.joint(torch.cat([video, audio], dim=-1))
        att_v = self._attend(joint, self.key_video(video.transpose(1, 2)), self.value_video(video), self.attn_dropout_video)
        att_a = self._attend(joint, self.key_audio(audio.transpose(1, 2)), self.value_audio(audio), self.attn_dropout_audio)
        return video + self.update_video(att_v), audio + self.update_audio(att_a)


class RecursiveJointCrossAttention(nn.Module):
    """``recursions`` joint cross-attention steps, each with its own weights (as the original's ModuleList)."""

    def __init__(self, video_dim: int, audio_dim: int, segments: int, recursions: int = 2, dropout: float = 0.6):
        super().__init__()
        self.steps = nn.ModuleList([JointCrossAttention(video_dim, audio_dim, segments, dropout) for _ in range(recursions)])

    def forward(self, video, audio):
        for step in self.steps:
            video, audio = step(video, audio)
        return video, audio


# --------------------------------------------------------------------------- loss
class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace): ``loss, accuracy = aam(embeddings [B, E], labels [B])``.

    logit_target = s cos(theta + m) when theta + m < pi, else s (cos(theta) - m sin(m))
    (keeps the target logit monotone in theta); other logits s cos(theta).
    Accuracy (fraction, no margin) is top-1 on the plain cosine logits.
    """

    def __init__(self, embed_dim: int, n_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"AAMSoftmax needs at least 2 classes (speakers), got n_classes={n_classes}")
        self.weight = nn.Parameter(torch.empty(n_classes, embed_dim))
        nn.init.xavier_normal_(self.weight)
        self.margin, self.scale = float(margin), float(scale)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings, dim=-1), F.normalize(self.weight, dim=-1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.weight.shape[0]
        if labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"AAMSoftmax labels must be in [0, {n - 1}], got range [{int(labels.min())}, {int(labels.max())}]")
        cos = self.cosine(embeddings)
        sin = (1.0 - cos.pow(2)).clamp(0.0, 1.0).sqrt()
        with_margin = cos * self.cos_m - sin * self.sin_m
        with_margin = torch.where(cos > self.threshold, with_margin, cos - self.fallback)
        target = F.one_hot(labels, n).bool()
        logits = self.scale * torch.where(target, with_margin, cos)
        loss = F.cross_entropy(logits, labels)
        accuracy = (cos.argmax(-1) == labels).float().mean()
        return loss, accuracy.detach()


# --------------------------------------------------------------------------- the attacker
class RJCASpeakerVerifier(nn.Module):
    """Audio-visual (or unimodal) speaker embedding network.

    ``forward(audio_feats=None, video_feats=None, padding_mask=None) -> [B, embed_dim]``

    * input_kind "features": audio ``[B, T, audio_feat_dim]``, video ``[B, T, video_feat_dim]``;
    * input_kind "raw": audio waveform ``[B, N]`` (sample_rate), video ``[B, 1, T, H, W]``;
    * ``padding_mask`` ``[B, T]``, True = pad, on the frame axis of the inputs
      (for raw audio alone: any frame axis spanning the waveform); the valid
      fraction is applied to each stream.
    """

    def __init__(self, config: RJCAConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = RJCAConfig(**overrides)
        elif overrides:
            raise ValueError("give either an RJCAConfig or keyword overrides, not both")
        self.config = c = config
        self.use_audio = "audio" in c.modalities
        self.use_video = "video" in c.modalities
        if self.use_audio:
            if c.input_kind == "raw":
                self.fbank = LogMelFbank(c.sample_rate, c.n_mels, c.n_fft, c.win_length, c.hop_length, c.f_min, c.f_max)
            audio_in = c.n_mels if c.input_kind == "raw" else c.audio_feat_dim
            self.audio_encoder = ECAPATDNN(audio_in, c.ecapa_channels, c.audio_dim, res2net_scale=c.ecapa_res2net_scale,
                                           se_channels=c.ecapa_se_channels, attention_channels=c.pool_attention_dim)
            self.audio_lstm = BiLSTMBlock(c.audio_dim, c.lstm_layers, c.lstm_dropout)
        if self.use_video:
            if c.input_kind == "raw":
                self.visual_frontend = VisualFrontend2D(c.visual_cnn_widths)
                video_in = self.visual_frontend.out_dim
            else:
                video_in = c.video_feat_dim
            self.visual_temporal = TemporalConvNet(video_in, c.visual_channels, c.visual_temporal_layers)
            self.visual_segment_head = PooledEmbedding(c.visual_channels, c.video_dim, c.pool_attention_dim, True)
            self.video_lstm = BiLSTMBlock(c.video_dim, c.lstm_layers, c.lstm_dropout)
        if self.use_audio and self.use_video:
            self.fusion = RecursiveJointCrossAttention(c.video_dim, c.audio_dim, c.segments, c.recursions, c.attention_dropout)
        joint_dim = (c.video_dim if self.use_video else 0) + (c.audio_dim if self.use_audio else 0)
        self.joint_lstm = BiLSTMBlock(joint_dim, c.lstm_layers, 0.0)
        self.pool = AttentiveStatsPool(joint_dim, c.pool_attention_dim, global_context=False)
        self.embedding = nn.Linear(2 * joint_dim, c.embed_dim)

    # ---------------------------------------------------------------- inputs
    def _check_inputs(self, audio, video):
        c = self.config
        for name, x, used in (("audio_feats", audio, self.use_audio), ("video_feats", video, self.use_video)):
            if used and x is None:
                raise ValueError(f"RJCASpeakerVerifier with modalities={list(c.modalities)} needs {name}, got None")
            if not used and x is not None:
                raise ValueError(f"RJCASpeakerVerifier with modalities={list(c.modalities)} does not use {name}; pass None")
        if c.input_kind == "features":
            for name, x, dim in (("audio_feats", audio, c.audio_feat_dim), ("video_feats", video, c.video_feat_dim)):
                if x is not None and (x.dim() != 3 or x.shape[-1] != dim):
                    raise ValueError(f"{name}: expected a feature sequence [B, T, {dim}] (input_kind='features'), "
                                     f"got {tuple(x.shape)}")
        else:
            if audio is not None and audio.dim() != 2:
                raise ValueError(f"audio_feats: expected a waveform [B, N] (input_kind='raw'), got {tuple(audio.shape)}")
            if video is not None and (video.dim() != 5 or video.shape[1] != 1):
                raise ValueError(f"video_feats: expected ROI frames [B, 1, T, H, W] (input_kind='raw'), got {tuple(video.shape)}")
        if audio is not None and video is not None and audio.shape[0] != video.shape[0]:
            raise ValueError(f"audio_feats and video_feats have different batch sizes: {audio.shape[0]} vs {video.shape[0]}")

    def _audio_segments(self, audio, padding_mask):
        c = self.config
        B = audio.shape[0]
        if c.input_kind == "raw":
            frames = self.fbank.num_frames(audio.shape[1])
            lengths = lengths_from_padding_mask(padding_mask, B, frames, audio.device)
            x = self.fbank(audio, lengths)
        else:
            x = audio.transpose(1, 2)
            lengths = lengths_from_padding_mask(padding_mask, B, x.shape[-1], audio.device)
        T = x.shape[-1]
        valid = torch.arange(T, device=x.device) < lengths.unsqueeze(1)
        return self.audio_encoder(x, valid, segment_masks(lengths, T, c.segments))  # [B, L, d_a]

    def _video_segments(self, video, padding_mask):
        c = self.config
        feats = self.visual_frontend(video) if c.input_kind == "raw" else video  # [B, T, D]
        B, T = feats.shape[:2]
        lengths = lengths_from_padding_mask(padding_mask, B, T, feats.device)
        valid = torch.arange(T, device=feats.device) < lengths.unsqueeze(1)
        h = self.visual_temporal(feats.transpose(1, 2), valid)
        return self.visual_segment_head(h, segment_masks(lengths, T, c.segments))  # [B, L, d_v]

    # ---------------------------------------------------------------- model
    def segment_embeddings(self, audio_feats=None, video_feats=None, padding_mask=None):
        """Fused per-segment features before pooling, ``[B, L, d_v + d_a]`` (video first, as the original)."""
        self._check_inputs(audio_feats, video_feats)
        parts = []
        video = audio = None
        if self.use_video:
            video = self.video_lstm(F.normalize(self._video_segments(video_feats, padding_mask), dim=-1))
        if self.use_audio:
            audio = self.audio_lstm(F.normalize(self._audio_segments(audio_feats, padding_mask), dim=-1))
        if video is not None and audio is not None:
            video, audio = self.fusion(video, audio)
        parts = [p for p in (video, audio) if p is not None]
        return self.joint_lstm(torch.cat(parts, dim=-1))

    def forward(self, audio_feats=None, video_feats=None, padding_mask=None) -> torch.Tensor:
        joint = self.segment_embeddings(audio_feats, video_feats, padding_mask)
        return self.embedding(self.pool(joint.transpose(1, 2)))

    @torch.no_grad()
    def embed(self, audio_feats=None, video_feats=None, padding_mask=None) -> torch.Tensor:
        """L2-normalised embeddings in eval mode (the module's train/eval mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            return F.normalize(self(audio_feats, video_feats, padding_mask), dim=-1)
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- scoring
    @staticmethod
    def score_trials(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of paired embeddings ``[N, E]`` x ``[N, E]`` -> ``[N]``."""
        if emb_a.shape != emb_b.shape:
            raise ValueError(f"score_trials: paired embeddings must have the same shape, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
        return F.cosine_similarity(emb_a, emb_b, dim=-1)

    @staticmethod
    def s_norm(scores: torch.Tensor, emb_a: torch.Tensor, emb_b: torch.Tensor, cohort_emb: torch.Tensor,
               top_k: int | None = None) -> torch.Tensor:
        """Symmetric score normalisation.

        s' = ((s - mu_a) / sd_a + (s - mu_b) / sd_b) / 2, where mu_x, sd_x are the
        mean and std of the cosine scores of side x against the cohort (the
        ``top_k`` highest only, for adaptive S-norm). The cohort must come from
        speakers outside the trials (e.g. attacker-train speakers).
        """
        if cohort_emb.dim() != 2 or cohort_emb.shape[0] < 2:
            raise ValueError(f"s_norm: cohort_emb must be [N_cohort >= 2, E], got {tuple(cohort_emb.shape)}")
        cohort = F.normalize(cohort_emb, dim=-1)

        def stats(emb):
            s = F.normalize(emb, dim=-1) @ cohort.T  # [N, N_cohort]
            if top_k is not None:
                s = s.topk(min(top_k, s.shape[1]), dim=1).values
            return s.mean(1), s.std(1).clamp_min(1e-6)

        mu_a, sd_a = stats(emb_a)
        mu_b, sd_b = stats(emb_b)
        return 0.5 * ((scores - mu_a) / sd_a + (scores - mu_b) / sd_b)
