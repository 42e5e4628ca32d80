"""Additive noise at an exact signal-to-noise ratio (white noise, multi-talker babble).

SNR is defined on the whole utterance: 10 log10(mean(clean^2) / mean(scaled_noise^2)),
as in AV-HuBERT's `add_noise`. Unlike the original we do not rescale the mixture to
avoid int16 clipping: we work on float waveforms, and any rescaling of the mixture
would have to be applied to both parts to keep the SNR, so we leave that to the caller.
All randomness comes from the `rng` argument (numpy Generator), so mixing is reproducible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _fit_length(noise: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Tile `noise` to at least n samples and cut n of them at a random offset."""
    if noise.size == 0:
        raise ValueError("noise waveform is empty")
    reps = -(-(n + noise.size) // noise.size)  # enough to start anywhere within one period
    tiled = np.tile(noise, reps) if reps > 1 else noise
    start = int(rng.integers(0, noise.size)) if noise.size > 0 else 0
    start = min(start, tiled.size - n)
    return tiled[start : start + n]


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """clean + noise scaled so the mixture has exactly `snr_db` dB SNR; float32 [N] like `clean`.

    `noise` is tiled/cut to the clean length at a random offset. A silent clean signal is
    returned unchanged (every SNR is met by adding nothing); a silent noise is an error.
    """
    clean = np.asarray(clean, dtype=np.float64)
    if clean.ndim != 1:
        raise ValueError(f"mix_at_snr expects a mono waveform [N], got shape {clean.shape}")
    if not np.isfinite(snr_db):
        raise ValueError(f"mix_at_snr: SNR must be finite, got {snr_db}")
    segment = _fit_length(np.asarray(noise, dtype=np.float64).ravel(), clean.size, rng)
    clean_power = float(np.mean(clean**2))
    noise_power = float(np.mean(segment**2))
    if clean_power == 0.0:
        return clean.astype(np.float32)
    if noise_power == 0.0:
        raise ValueError("mix_at_snr: the noise segment is silent; cannot reach a finite SNR")
    scale = np.sqrt(clean_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (clean + scale * segment).astype(np.float32)


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise, unit variance, float32 [n]."""
    return rng.standard_normal(n).astype(np.float32)


def babble_noise(pool_of_wavs: Sequence[np.ndarray], n: int, rng: np.random.Generator, n_talkers: int = 4) -> np.ndarray:
    """Sum of `n_talkers` utterances from the pool (distinct if the pool allows), each at unit
    RMS and cut to n samples at a random offset; float32 [n] with unit RMS."""
    usable = [np.asarray(w, dtype=np.float64) for w in pool_of_wavs if np.size(w) and np.any(w)]
    if not usable:
        raise ValueError("babble_noise: the pool has no non-silent waveforms")
    picks = rng.choice(len(usable), size=n_talkers, replace=len(usable) < n_talkers)
    babble = np.zeros(n, dtype=np.float64)
    for k in picks:
        talker = _fit_length(usable[int(k)], n, rng)
        rms = np.sqrt(np.mean(talker**2))
        if rms > 0:
            babble += talker / rms
    rms = np.sqrt(np.mean(babble**2))
    return (babble / rms if rms > 0 else babble).astype(np.float32)
