"""Learned feature-wise noise masks (Becker & Martin, WASPAA 2025; our reading, see docs/method.md).

Additive mask        y = x + sigma_a * eps,               sigma_a = (softplus(rho_a) + min_scale) * s
Multiplicative mask  y = x * (mu_m + sigma_m * eps),      sigma_m = softplus(rho_m) + min_scale
eps ~ N(0, I), one draw per feature dimension and per noise unit, the unit set by
`noise_granularity`: "frame" (a fresh draw for every frame, the default), "segment" (one draw
per run of `segment_frames` frames, counted from each utterance's first frame) or "utterance"
(one draw per utterance, the same for all its frames). Identity is an utterance-level
statistic, and frame-wise noise is averaged away by any pooling over time; segment and
utterance noise is not. Given a padding_mask, padded frames (True) are never changed.

`rho_a`, `rho_m`, `mu_m` are one parameter per feature dimension. `s` is a per-dimension
buffer holding the feature standard deviation (calibrated on the first batch the mask
sees) so that `init_scale` means "noise std relative to the feature scale" for the
additive mask too; the multiplicative mask is already relative.

Noise is drawn at inference as well: the protected (masked) representation is what leaves
the device, so an attacker sees noisy features. `noise=False` (attribute or per-call)
removes the random part only, leaving the deterministic part `x * mu_m` (the identity
at initialisation). The frozen-front-end hook contract is

    feat_audio, feat_video = masks(feat_audio, feat_video)   # [B, T, D] each, or None

and the encoder-position contract is `x = layer_hook(i, x)` after encoder layer i.

Plain PyTorch; nothing here knows about Hydra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

MASK_KINDS = ("none", "additive", "multiplicative", "both")
MASK_POSITIONS = ("frontend", "encoder")
NOISE_GRANULARITIES = ("frame", "segment", "utterance")
KNOWN_MODALITIES = ("audio", "video")


def inverse_softplus(value: float) -> float:
    """rho such that softplus(rho) == value (value > 0)."""
    if value <= 0:
        raise ValueError(f"inverse_softplus needs a positive value, got {value}")
    # log(expm1(v)) overflows for large v; softplus is ~identity there.
    return value + math.log(-math.expm1(-value))


def _randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    if generator.device != like.device:
        # A CPU generator for CUDA tensors: draw on the generator's device, then move,
        # which keeps the stream reproducible across devices.
        return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def check_noise_granularity(granularity: str, segment_frames: int) -> None:
    if granularity not in NOISE_GRANULARITIES:
        raise ValueError(f"masks.noise_granularity must be one of {list(NOISE_GRANULARITIES)}, got {granularity!r}")
    if granularity == "segment" and not (isinstance(segment_frames, int) and segment_frames >= 1):
        raise ValueError(f"masks.noise_granularity=segment needs masks.segment_frames >= 1, got {segment_frames!r}")


def _draw_noise(
    x: torch.Tensor,
    generator: Optional[torch.Generator],
    granularity: str = "frame",
    segment_frames: int = 1,
    feature_axis: int = -1,
) -> torch.Tensor:
    """Standard normal noise shaped like x, shared over time within a segment / utterance.

    x is [B, T, D] (feature_axis -1) or [B, D, T] (feature_axis 1); time is the other
    non-batch axis. Frame noise is the plain element-wise draw (the same stream as before
    granularity existed, so frame-level runs are unchanged).
    """
    if granularity == "frame":
        return _randn(x.shape, x, generator)
    if x.dim() != 3:
        raise ValueError(f"noise_granularity={granularity!r} needs a 3-d [B, T, D] input, got {tuple(x.shape)}")
    time_axis = 2 if feature_axis % 3 == 1 else 1
    frames = x.shape[time_axis]
    units = 1 if granularity == "utterance" else -(-frames // segment_frames)
    shape = list(x.shape)
    shape[time_axis] = units
    eps = _randn(shape, x, generator)
    if granularity == "utterance":
        return eps.expand_as(x)
    return eps.repeat_interleave(segment_frames, dim=time_axis).narrow(time_axis, 0, frames)


def _param_view(p: torch.Tensor, x: torch.Tensor, feature_axis: int) -> torch.Tensor:
    """Shape a [D] parameter so it broadcasts along `feature_axis` of x."""
    axis = feature_axis % x.dim()
    if x.shape[axis] != p.shape[0]:
        raise ValueError(
            f"mask was built for {p.shape[0]} feature dimensions but the input has {x.shape[axis]} "
            f"along axis {feature_axis} (input shape {tuple(x.shape)})"
        )
    shape = [1] * x.dim()
    shape[axis] = p.shape[0]
    return p.view(shape)


def _keep_padding(y: torch.Tensor, x: torch.Tensor, padding_mask: Optional[torch.Tensor], feature_axis: int) -> torch.Tensor:
    """Leave padded frames untouched (padding_mask [B, T], True = pad, features on the last or axis-1)."""
    if padding_mask is None:
        return y
    if padding_mask.dim() != 2 or y.dim() != 3:
        raise ValueError(f"padding_mask must be [B, T] for a 3-d input, got {tuple(padding_mask.shape)} and {tuple(y.shape)}")
    pad = padding_mask.unsqueeze(-1) if feature_axis % 3 == 2 else padding_mask.unsqueeze(1)
    return torch.where(pad, x, y)


class _NoiseMask(nn.Module):
    """Shared switches: whether noise is drawn, where the generator comes from."""

    def __init__(self, dim: int, noise: bool, noise_at_eval: bool, feature_axis: int, generator: Optional[torch.Generator],
                 noise_granularity: str = "frame", segment_frames: int = 1):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"mask dim must be positive, got {dim}")
        check_noise_granularity(noise_granularity, segment_frames)
        self.dim = dim
        self.noise_granularity = noise_granularity
        self.segment_frames = int(segment_frames)
        self.noise = noise
        self.noise_at_eval = noise_at_eval
        self.feature_axis = feature_axis
        self.generator = generator  # not a buffer: the trainer saves/restores its state for exact resume

    def _eps(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return _draw_noise(x, generator if generator is not None else self.generator, self.noise_granularity,
                           self.segment_frames, self.feature_axis)

    def _noise_on(self, noise: Optional[bool]) -> bool:
        if noise is not None:
            return noise
        return self.noise and (self.training or self.noise_at_eval)


def _scale_parameter(dim: int, init_scale: float, min_scale: float) -> nn.Parameter:
    """rho with softplus(rho) + min_scale = init_scale in every dimension."""
    if init_scale <= min_scale:
        raise ValueError(f"init_scale ({init_scale}) must be larger than min_scale ({min_scale})")
    return nn.Parameter(torch.full((dim,), inverse_softplus(init_scale - min_scale)))


class AdditiveMask(_NoiseMask):
    """y = x + (softplus(rho_a) + min_scale) * s * eps, per feature dimension."""

    def __init__(
        self,
        dim: int,
        init_scale: float = 1.0,
        min_scale: float = 0.0,
        calibrate: bool = True,
        noise: bool = True,
        noise_at_eval: bool = True,
        feature_axis: int = -1,
        generator: Optional[torch.Generator] = None,
        noise_granularity: str = "frame",
        segment_frames: int = 1,
    ):
        super().__init__(dim, noise, noise_at_eval, feature_axis, generator, noise_granularity, segment_frames)
        self.min_scale = float(min_scale)
        self.rho_a = _scale_parameter(dim, init_scale, min_scale)
        # Feature std per dimension; 1 until calibrated. Buffers travel with the state_dict,
        # so a resumed or exported model keeps the scale it was trained with.
        self.register_buffer("feature_scale", torch.ones(dim))
        self.register_buffer("calibrated", torch.tensor(not calibrate))

    def sigma(self) -> torch.Tensor:
        """Noise standard deviation per dimension, in feature units, [D]."""
        return (F.softplus(self.rho_a) + self.min_scale) * self.feature_scale

    def relative_sigma(self) -> torch.Tensor:
        return F.softplus(self.rho_a) + self.min_scale

    def needs_calibration(self) -> bool:
        # A meta tensor (device checks, FLOP counts) has no values to calibrate from.
        return not self.calibrated.is_meta and not bool(self.calibrated)

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> None:
        """Set the per-dimension feature scale from the (non-padded) frames of x."""
        axis = self.feature_axis % x.dim()
        feats = x.detach().movedim(axis, -1)  # [B, T, D] for either layout
        if padding_mask is not None and feats.dim() == 3:
            feats = feats[~padding_mask.to(torch.bool)]
        feats = feats.reshape(-1, self.dim).float()
        if feats.shape[0] < 2:
            return  # cannot estimate a spread; keep scale 1 and try again next batch
        std = feats.std(dim=0)
        # Dead dimensions (constant features) would get zero noise forever; give them the mean scale.
        fallback = std[std > 0].mean() if (std > 0).any() else torch.tensor(1.0, device=std.device)
        std = torch.where(std > 1e-8, std, fallback)
        self.feature_scale.copy_(std.to(self.feature_scale.dtype))
        self.calibrated.fill_(True)

    def forward(
        self,
        x: torch.Tensor,
        noise: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.needs_calibration():
            self.calibrate_(x, padding_mask)
        if not self._noise_on(noise):
            return x
        eps = self._eps(x, generator)
        y = x + _param_view(self.sigma(), x, self.feature_axis).to(x.dtype) * eps
        return _keep_padding(y, x, padding_mask, self.feature_axis)


class MultiplicativeMask(_NoiseMask):
    """y = x * (mu_m + (softplus(rho_m) + min_scale) * eps), per feature dimension."""

    def __init__(
        self,
        dim: int,
        init_scale: float = 1.0,
        min_scale: float = 0.0,
        learn_mean: bool = True,
        noise: bool = True,
        noise_at_eval: bool = True,
        feature_axis: int = -1,
        generator: Optional[torch.Generator] = None,
        noise_granularity: str = "frame",
        segment_frames: int = 1,
    ):
        super().__init__(dim, noise, noise_at_eval, feature_axis, generator, noise_granularity, segment_frames)
        self.min_scale = float(min_scale)
        self.rho_m = _scale_parameter(dim, init_scale, min_scale)
        mu = torch.ones(dim)
        if learn_mean:
            self.mu_m = nn.Parameter(mu)
        else:
            self.register_buffer("mu_m", mu)

    def sigma(self) -> torch.Tensor:
        """Standard deviation of the multiplicative factor per dimension, [D]."""
        return F.softplus(self.rho_m) + self.min_scale

    relative_sigma = sigma

    def forward(
        self,
        x: torch.Tensor,
        noise: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        mu = _param_view(self.mu_m, x, self.feature_axis).to(x.dtype)
        if not self._noise_on(noise):
            return _keep_padding(x * mu, x, padding_mask, self.feature_axis)
        eps = self._eps(x, generator)
        y = x * (mu + _param_view(self.sigma(), x, self.feature_axis).to(x.dtype) * eps)
        return _keep_padding(y, x, padding_mask, self.feature_axis)


class FeatureMask(nn.Module):
    """Multiplicative then additive: y = x * (mu_m + sigma_m * eps_m) + sigma_a * eps_a.

    This order keeps the additive noise's scale independent of the multiplicative factor
    (additive after multiplicative cannot be undone by a small |mu_m + sigma_m eps_m|), and
    eps_m, eps_a are independent draws.
    """

    def __init__(
        self,
        dim: int,
        additive: bool = True,
        multiplicative: bool = False,
        init_scale: float = 1.0,
        min_scale: float = 0.0,
        calibrate: bool = True,
        learn_mean: bool = True,
        noise: bool = True,
        noise_at_eval: bool = True,
        feature_axis: int = -1,
        generator: Optional[torch.Generator] = None,
        noise_granularity: str = "frame",
        segment_frames: int = 1,
    ):
        super().__init__()
        if not (additive or multiplicative):
            raise ValueError("FeatureMask needs additive=True and/or multiplicative=True (use no mask for neither)")
        self.dim = dim
        self.generator = generator
        self.multiplicative = (
            MultiplicativeMask(dim, init_scale, min_scale, learn_mean, noise, noise_at_eval, feature_axis,
                               noise_granularity=noise_granularity, segment_frames=segment_frames) if multiplicative else None
        )
        self.additive = AdditiveMask(dim, init_scale, min_scale, calibrate, noise, noise_at_eval, feature_axis,
                                     noise_granularity=noise_granularity, segment_frames=segment_frames) if additive else None

    def parts(self) -> list[_NoiseMask]:
        return [m for m in (self.multiplicative, self.additive) if m is not None]

    def set_noise(self, noise: bool) -> None:
        for m in self.parts():
            m.noise = noise

    def forward(
        self,
        x: torch.Tensor,
        noise: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        gen = generator if generator is not None else self.generator
        if self.additive is not None and self.additive.needs_calibration():
            # The additive scale is relative to the clean features, not to the multiplied ones.
            self.additive.calibrate_(x, padding_mask)
        for part in self.parts():
            x = part(x, noise=noise, generator=gen, padding_mask=padding_mask)
        return x

    def mean_log_sigma(self) -> torch.Tensor:
        """Mean log of the relative noise std over all parts and dims (a differentiable 'noise level')."""
        return torch.stack([torch.log(p.relative_sigma()).mean() for p in self.parts()]).mean()


class ModalityMasks(nn.Module):
    """One FeatureMask per modality: the `frontend_hook` between frozen front-ends and fusion.

    `forward(feat_audio, feat_video, noise=None, padding_mask=None, generator=None)` returns
    the masked pair; a missing modality (None) passes through.
    """

    def __init__(
        self,
        dim: Union[int, Mapping[str, int]],
        modalities: Sequence[str] = KNOWN_MODALITIES,
        additive: bool = True,
        multiplicative: bool = False,
        generator: Optional[torch.Generator] = None,
        **mask_kwargs,
    ):
        super().__init__()
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in KNOWN_MODALITIES]
        if not modalities or unknown or len(set(modalities)) != len(modalities):
            raise ValueError(f"masks modalities must be a non-empty subset of {list(KNOWN_MODALITIES)}, got {list(modalities)}")
        self.modalities = modalities
        self.generator = generator
        self.masks = nn.ModuleDict(
            {
                m: FeatureMask(dim[m] if isinstance(dim, Mapping) else dim, additive, multiplicative, **mask_kwargs)
                for m in modalities
            }
        )

    def set_noise(self, noise: bool) -> None:
        for mask in self.masks.values():
            mask.set_noise(noise)

    def forward(
        self,
        feat_audio: Optional[torch.Tensor],
        feat_video: Optional[torch.Tensor],
        noise: Optional[bool] = None,
        padding_mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        gen = generator if generator is not None else self.generator
        # Fixed order (audio, then video) so one generator gives the same draws on every run.
        out = {}
        for name, feat in (("audio", feat_audio), ("video", feat_video)):
            if feat is None or name not in self.masks:
                out[name] = feat
            else:
                out[name] = self.masks[name](feat, noise=noise, generator=gen, padding_mask=padding_mask)
        return out["audio"], out["video"]

    def mean_log_sigma(self) -> torch.Tensor:
        return torch.stack([m.mean_log_sigma() for m in self.masks.values()]).mean()


class EncoderLayerMask(nn.Module):
    """A FeatureMask applied to the encoder stream after encoder layer `layer` (0-based) only.

    Use as `layer_hook(i, x)`; x is [B, T, D] (the encoder's layout). Segment / utterance noise
    needs that layout; pass `padding_mask` to leave padded frames untouched.
    """

    def __init__(self, dim: int, layer: int, additive: bool = True, multiplicative: bool = False,
                 generator: Optional[torch.Generator] = None, **mask_kwargs):
        super().__init__()
        if layer < 0:
            raise ValueError(f"masks.layer must be >= 0, got {layer}")
        self.layer = layer
        self.generator = generator
        mask_kwargs.pop("feature_axis", None)
        self.mask = FeatureMask(dim, additive, multiplicative, feature_axis=-1, **mask_kwargs)

    def set_noise(self, noise: bool) -> None:
        self.mask.set_noise(noise)

    def forward(self, i: int, x: torch.Tensor, noise: Optional[bool] = None,
                generator: Optional[torch.Generator] = None, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if i != self.layer:
            return x
        return self.mask(x, noise=noise, generator=generator if generator is not None else self.generator,
                         padding_mask=padding_mask)

    def mean_log_sigma(self) -> torch.Tensor:
        return self.mask.mean_log_sigma()


def relative_sigmas(masks: Union["ModalityMasks", "EncoderLayerMask"]) -> dict[str, torch.Tensor]:
    """The learned relative noise std of every mask part, [D] each, keyed "<where>/<part>"
    (where = audio / video / encoder, part = additive / multiplicative)."""
    if isinstance(masks, ModalityMasks):
        named = dict(masks.masks.items())
    elif isinstance(masks, EncoderLayerMask):
        named = {"encoder": masks.mask}
    else:
        raise TypeError(f"relative_sigmas needs ModalityMasks or EncoderLayerMask, got {type(masks).__name__}")
    out = {}
    for where, mask in named.items():
        for part_name in ("multiplicative", "additive"):
            part = getattr(mask, part_name)
            if part is not None:
                out[f"{where}/{part_name}"] = part.relative_sigma().detach()
    return out


def sigma_summary(masks: Union["ModalityMasks", "EncoderLayerMask"]) -> dict[str, float]:
    """Per-dimension spread of the learned noise levels, for metrics: `mask_sigma/<where>/<part>/<stat>`
    with stat = mean, min, p10, median, p90, max over the D feature dimensions (relative std, as
    masks.init_scale). A mean alone hides a noise term that moves some dimensions up and others down."""
    stats = {}
    for key, sigma in relative_sigmas(masks).items():
        s = sigma.float()
        q = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9]))
        for name, value in (("mean", s.mean()), ("min", s.min()), ("p10", q[0]), ("median", q[1]), ("p90", q[2]), ("max", s.max())):
            stats[f"mask_sigma/{key}/{name}"] = float(value)
    return stats


def mask_kind(additive: bool, multiplicative: bool) -> str:
    """The build_masks `kind` for the config booleans (masks.name may carry a position tag)."""
    return {(False, False): "none", (True, False): "additive", (False, True): "multiplicative", (True, True): "both"}[
        (bool(additive), bool(multiplicative))
    ]


def build_masks(
    kind: str,
    position: str = "frontend",
    layer: int = 0,
    dim: Union[int, Mapping[str, int]] = 768,
    modalities: Sequence[str] = KNOWN_MODALITIES,
    init_scale: float = 1.0,
    num_layers: Optional[int] = None,
    min_scale: float = 0.0,
    noise_at_eval: bool = True,
    generator: Optional[torch.Generator] = None,
    noise_granularity: str = "frame",
    segment_frames: int = 1,
) -> Optional[Union[ModalityMasks, EncoderLayerMask]]:
    """Masks from config values; None for kind='none'.

    position='frontend' -> ModalityMasks (pass as `frontend_hook`);
    position='encoder'  -> EncoderLayerMask after layer `layer` (pass as `layer_hook`),
    validated against `num_layers` (the encoder depth) when given.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"masks.name must be one of {list(MASK_KINDS)}, got {kind!r}")
    if position not in MASK_POSITIONS:
        raise ValueError(f"masks.position must be one of {list(MASK_POSITIONS)}, got {position!r}")
    if not (init_scale > 0 and math.isfinite(init_scale)):
        raise ValueError(f"masks.init_scale must be a positive number, got {init_scale}")
    check_noise_granularity(noise_granularity, segment_frames)
    if kind == "none":
        return None
    additive = kind in ("additive", "both")
    multiplicative = kind in ("multiplicative", "both")
    common = dict(init_scale=init_scale, min_scale=min_scale, noise_at_eval=noise_at_eval,
                  noise_granularity=noise_granularity, segment_frames=segment_frames)
    if position == "frontend":
        return ModalityMasks(dim, modalities, additive, multiplicative, generator=generator, **common)
    if isinstance(dim, Mapping):
        raise ValueError(f"masks.position=encoder needs one encoder dim, got per-modality dims {dict(dim)}")
    if not isinstance(layer, int) or layer < 0:
        raise ValueError(f"masks.layer must be a non-negative integer, got {layer!r}")
    if num_layers is not None and layer >= num_layers:
        raise ValueError(
            f"masks.layer={layer} is beyond the encoder depth model.encoder_layers={num_layers} "
            f"(valid: 0..{num_layers - 1})"
        )
    return EncoderLayerMask(dim, layer, additive, multiplicative, generator=generator, **common)
