"""Input features exactly as AV-HuBERT computes them (avhubert/hubert_dataset.py, utils.py).

Audio: 16 kHz waveform -> `python_speech_features.logfbank` with its defaults
(26 filters, 25 ms window, 10 ms hop, nfft 512, pre-emphasis 0.97, rectangular
window) -> [T100, 26] at 100 Hz -> 4 consecutive frames concatenated
frame-major ([f0 | f1 | f2 | f3], the tail zero-padded to a multiple of 4) ->
[T25, 104] at 25 Hz, the video rate. Then trimmed / zero-padded to the video length
and, with `normalize=True`, `F.layer_norm(feats, feats.shape[1:])`: on a [T, 104]
array `shape[1:] == (104,)`, so this is a per-frame normalisation over the 104
dimensions (zero mean, unit variance per frame, eps 1e-5, no affine).

Why waveforms are scaled to int16 range: the original reads wavs with
`scipy.io.wavfile`, i.e. raw int16 values, so its log-energies are
ln(32768^2) ~ 20.8 higher than on [-1, 1] floats. The per-frame layer norm
cancels that constant, but un-normalised features (and frames of digital silence,
which logfbank floors at machine eps) would differ; scaling keeps us identical.

Video: grayscale mouth ROI 96x96 at 25 fps -> /255 -> 88x88 crop (random + whole-
sequence horizontal flip with p=0.5 in training, centre at eval) ->
(x - 0.421) / 0.165. Cropping is done on the uint8 frames before scaling, which is
the same thing and cheaper.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
VIDEO_FPS = 25
FBANK_WIN = 400  # 25 ms at 16 kHz
FBANK_HOP = 160  # 10 ms at 16 kHz
IMAGE_MEAN = 0.421
IMAGE_STD = 0.165
INT16_SCALE = 32768.0  # soundfile's float PCM_16 = int16 / 32768


def stack_frames(feats: np.ndarray, stack_order: int = 4) -> np.ndarray:
    """Concatenate `stack_order` consecutive frames: [T, F] -> [ceil(T/k), k*F], tail zero-padded."""
    if feats.ndim != 2:
        raise ValueError(f"stack_frames expects [T, F] features, got shape {feats.shape}")
    n, dim = feats.shape
    remainder = (-n) % stack_order
    if remainder:
        feats = np.concatenate([feats, np.zeros((remainder, dim), dtype=feats.dtype)], axis=0)
    return feats.reshape(-1, stack_order * dim)


def num_fbank_frames(n_samples: int) -> int:
    """Frames python_speech_features produces for `n_samples` at 16 kHz (it pads the last frame)."""
    if n_samples <= FBANK_WIN:
        return 1
    return 1 + math.ceil((n_samples - FBANK_WIN) / FBANK_HOP)


def num_audio_frames(n_samples: int, stack_order: int = 4) -> int:
    """Length in 25 Hz frames of `logfbank_stacked` for a waveform of `n_samples` (before alignment)."""
    return math.ceil(num_fbank_frames(n_samples) / stack_order)


def logfbank_stacked(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, stack_order: int = 4) -> np.ndarray:
    """26-d log-fbank at 100 Hz, stacked x`stack_order` -> float32 [ceil(T100/k), 26*k] (104-d at 25 Hz).

    Float input is taken as [-1, 1] audio and scaled to int16 range (see module doc);
    integer input is used as is (the original's scipy int16 path).
    """
    from python_speech_features import logfbank

    wav = np.asarray(wav)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"logfbank_stacked expects a non-empty mono waveform [N], got shape {wav.shape}")
    if sample_rate != SAMPLE_RATE:
        # the window/hop in samples and the 25 Hz stacking assume 16 kHz, as the original asserts
        raise ValueError(f"logfbank_stacked expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    signal = wav.astype(np.float64) * INT16_SCALE if np.issubdtype(wav.dtype, np.floating) else wav
    feats = logfbank(signal, samplerate=sample_rate).astype(np.float32)
    return stack_frames(feats, stack_order)


def normalize_audio(feats: np.ndarray | torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-frame layer norm over the feature dimension, no affine: [T, D] -> float32 tensor [T, D]."""
    x = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats, dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"normalize_audio expects [T, D] features, got shape {tuple(x.shape)}")
    with torch.no_grad():
        return F.layer_norm(x, x.shape[1:], eps=eps)


def align_audio_to_video(feats: np.ndarray, n_frames: int) -> np.ndarray:
    """Trim or zero-pad audio frames [T, D] to the video's `n_frames`, as the original does."""
    diff = len(feats) - n_frames
    if diff > 0:
        return feats[:n_frames]
    if diff < 0:
        return np.concatenate([feats, np.zeros((-diff, feats.shape[1]), dtype=feats.dtype)], axis=0)
    return feats


def crop_video(frames: np.ndarray, size: int = 88, train: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
    """[T, H, W] -> [T, size, size]. Train: one random offset and a p=0.5 horizontal flip for the
    whole sequence (drawn from `rng`); eval: the original's centre crop (offset int((W-size)/2))."""
    t, h, w = frames.shape
    if h < size or w < size:
        raise ValueError(f"crop_video: frames {h}x{w} are smaller than the crop {size}x{size}")
    if train:
        if rng is None:
            raise ValueError("crop_video(train=True) needs an rng so that augmentation is reproducible")
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        out = frames[:, top : top + size, left : left + size]
        if rng.random() < 0.5:
            out = out[:, :, ::-1]
        return np.ascontiguousarray(out)
    top, left = int((h - size) / 2), int((w - size) / 2)
    return np.ascontiguousarray(frames[:, top : top + size, left : left + size])


def normalize_video(frames: np.ndarray, mean: float = IMAGE_MEAN, std: float = IMAGE_STD) -> np.ndarray:
    """uint8 frames -> float32 ((x / 255) - mean) / std."""
    return ((frames.astype(np.float32) / 255.0) - mean) / std
