"""Cluster targets for AV-HuBERT's masked-prediction pretraining (iteration 1: MFCC k-means).

As in the original recipe: 39-d MFCC (13 + deltas + delta-deltas) at 100 Hz,
k-means over the pretraining split, one label per 10 ms frame. The model runs at
25 Hz, so like AV-HuBERT's `feat2tar_ratio` subsampling it predicts every 4th
label. Labels are written as `<split>.km` (one line per utterance, labels
separated by spaces), the format of the original's label files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

LABEL_RATE = 100  # Hz, MFCC frame rate
FEATURE_RATE = 25  # Hz, AV-HuBERT's input rate


def mfcc_39(wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """[T100, 39]: 13 MFCCs (python_speech_features defaults, 25 ms / 10 ms) with deltas and delta-deltas."""
    from python_speech_features import delta, mfcc

    feats = mfcc(wav, samplerate=sample_rate, numcep=13, nfft=512)
    d1 = delta(feats, 2)
    return np.concatenate([feats, d1, delta(d1, 2)], axis=1).astype(np.float32)


KMEANS_PARAMS = {"batch_size": 4096, "n_init": 3, "max_iter": 100}  # MiniBatchKMeans' settings besides k and the seed


def _kmeans_with_progress(desc: str, seconds: float, **params):
    """sklearn's MiniBatchKMeans, reporting its minibatch steps through common.progress.

    `fit` runs at most max_iter * n_samples // batch_size minibatch steps and stops early
    once the inertia stops improving; sklearn calls `_mini_batch_convergence(step, n_steps,
    ...)` after every step, which is the only place that knows both. The override counts
    and defers to sklearn, so the clusters are exactly those of the plain class
    (tests/test_progress_and_cli.py compares them). The ETA is for the maximum step count.
    """
    from sklearn.cluster import MiniBatchKMeans

    from common.progress import Progress

    class MiniBatchKMeansWithProgress(MiniBatchKMeans):
        _progress: Progress | None = None

        def _mini_batch_convergence(self, step, n_steps, *args, **kwargs):
            if self._progress is None:
                self._progress = Progress(total=n_steps, desc=desc, unit="step", every=max(1, n_steps // 10), seconds=seconds)
            self._progress.update()
            return super()._mini_batch_convergence(step, n_steps, *args, **kwargs)

        def fit(self, *args, **kwargs):
            try:
                return super().fit(*args, **kwargs)
            finally:
                progress, self._progress = self._progress, None
                if progress is not None:
                    maximum = progress.total
                    if progress.done < maximum:  # stopped early: the count is complete, the ETA 0
                        progress.total = progress.done
                    progress.close(extra=f"converged (at most {maximum} steps)" if progress.done < maximum else "")

    return MiniBatchKMeansWithProgress(**params)


def fit_kmeans(features: Sequence[np.ndarray], k: int, seed: int, max_frames: int = 200_000, desc: str = "k-means fit",
               progress_seconds: float = 30.0):
    """MiniBatch k-means on (a deterministic subsample of) the stacked frames.

    Progress of the fit (minibatch steps, ETA for the maximum) goes through common.progress as
    `desc`: a bar in a terminal, a line every 10 % of the maximum or `progress_seconds` otherwise.
    """
    frames = np.concatenate(features, axis=0)
    if len(frames) < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {len(frames)}; use fewer clusters or more data")
    rng = np.random.default_rng(seed)
    if len(frames) > max_frames:
        frames = frames[rng.choice(len(frames), max_frames, replace=False)]
    mean, std = frames.mean(0), frames.std(0) + 1e-5
    km = _kmeans_with_progress(desc, progress_seconds, **KMEANS_PARAMS, n_clusters=k, random_state=seed)
    km.fit((frames - mean) / std)
    km.feature_mean_, km.feature_std_ = mean, std
    return km



def assign_labels(km, features: np.ndarray) -> np.ndarray:
    return km.predict((features - km.feature_mean_) / km.feature_std_).astype(np.int64)


def labels_at_feature_rate(labels_100hz: np.ndarray, n_frames: int) -> np.ndarray:
    """Every 4th 100 Hz label, trimmed or edge-padded to the 25 Hz frame count."""
    ratio = LABEL_RATE // FEATURE_RATE
    sub = labels_100hz[::ratio][:n_frames]
    if len(sub) < n_frames:
        sub = np.pad(sub, (0, n_frames - len(sub)), mode="edge") if len(sub) else np.zeros(n_frames, np.int64)
    return sub


def write_km(path: str | Path, labels: Sequence[np.ndarray]) -> None:
    from common.files import atomic_write_text

    atomic_write_text(path, "".join(" ".join(map(str, lab.tolist())) + "\n" for lab in labels))


def read_km(path: str | Path, expected: int | None = None) -> list[np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found (run `train_avhubert.py task=pretrain`, which creates it)")
    from common.files import read_text

    lines = read_text(path).splitlines()
    if expected is not None and len(lines) != expected:
        raise ValueError(f"{path}: {len(lines)} label lines, expected {expected} (one per utterance of the manifest)")
    return [np.array([int(x) for x in line.split()], dtype=np.int64) for line in lines]
