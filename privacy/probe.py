"""Cheap speaker-leakage probes for training-time logging.

These are not the attacker (that is the RJCA model trained by train_speaker_verification.py);
they are quick indicators that can run every few hundred steps on a handful of utterances:

* `speaker_probe`: closed-set speaker identification accuracy of a logistic-regression
  classifier on utterance-mean representations (higher = more identity leaks);
* `cosine_probe_eer`: EER of cosine scoring on same- vs different-speaker pairs of
  utterance-mean representations, without any training (lower = more identity leaks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from privacy.contrastive import masked_mean_over_time
from common.metrics import equal_error_rate

_OUTPUT_KEYS = ("x", "encoder_out", "last_hidden_state", "hidden_states")


def pooled_representations(model_output: Any, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Utterance means [B, D] of a [B, T, D] representation, ignoring padded frames (True = pad).

    `model_output` may be the tensor itself, a mapping with one of the keys
    x / encoder_out / last_hidden_state, or an object with such an attribute; without an
    explicit padding_mask, the output's own `padding_mask` (if any) is used.
    """
    x = model_output
    if padding_mask is None and not isinstance(x, torch.Tensor):
        # models.avhubert.AVHubertOutput carries its own padding mask
        padding_mask = x.get("padding_mask") if isinstance(x, Mapping) else getattr(x, "padding_mask", None)
    if not isinstance(x, torch.Tensor):
        for key in _OUTPUT_KEYS:
            value = x.get(key) if isinstance(x, Mapping) else getattr(x, key, None)
            if isinstance(value, torch.Tensor):
                x = value
                break
        else:
            raise TypeError(
                f"pooled_representations: expected a [B, T, D] tensor or an output with one of {list(_OUTPUT_KEYS)}, "
                f"got {type(model_output).__name__}"
            )
    return masked_mean_over_time(x, padding_mask)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def speaker_probe(
    embeddings_train: Any,
    spk_train: Any,
    embeddings_test: Any,
    spk_test: Any,
    max_iter: int = 1000,
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Closed-set speaker identification by a linear classifier.

    embeddings_*: [N, D] utterance representations; spk_*: [N] speaker labels (any hashable).
    Every test speaker must appear in training. Returns accuracy, chance (accuracy of always
    answering the most frequent test speaker) and num_speakers.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te = _as_numpy(embeddings_train), _as_numpy(embeddings_test)
    y_tr, y_te = _as_numpy(spk_train), _as_numpy(spk_test)
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"speaker_probe {name}: expected [N, D] embeddings and N labels, got {x.shape} and {y.shape}")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"speaker_probe: train dim {x_tr.shape[1]} != test dim {x_te.shape[1]}")
    classes = set(y_tr.tolist())
    if len(classes) < 2:
        raise ValueError(f"speaker_probe needs at least 2 training speakers, got {sorted(classes)}")
    unseen = sorted(set(y_te.tolist()) - classes)
    if unseen:
        raise ValueError(f"speaker_probe is closed-set: test speakers {unseen[:10]} do not occur in training")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(x_tr, y_tr)
    accuracy = float((clf.predict(x_te) == y_te).mean())
    _, counts = np.unique(y_te, return_counts=True)
    return {"accuracy": accuracy, "chance": float(counts.max() / len(y_te)), "num_speakers": len(classes)}


def cosine_trial_pairs(speaker_ids: Any, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n_pairs random utterance pairs, half same-speaker (target) and half different-speaker.

    Returns (first index, second index, label 1=target). Deterministic given seed.
    """
    spk = _as_numpy(speaker_ids)
    if n_pairs < 2:
        raise ValueError(f"cosine probe needs n_pairs >= 2, got {n_pairs}")
    _, spk_idx = np.unique(spk, return_inverse=True)
    groups = [np.flatnonzero(spk_idx == s) for s in range(spk_idx.max() + 1)]
    multi = [g for g in groups if len(g) >= 2]
    if not multi or len(groups) < 2:
        raise ValueError(
            "cosine probe needs at least 2 speakers and one speaker with >= 2 utterances, "
            f"got {len(groups)} speakers with utterance counts {[len(g) for g in groups]}"
        )
    rng = np.random.default_rng(seed)
    n_target = n_pairs // 2
    n_nontarget = n_pairs - n_target
    first, second = [], []
    for _ in range(n_target):
        g = multi[rng.integers(len(multi))]
        i, j = rng.choice(g, size=2, replace=False)
        first.append(i)
        second.append(j)
    n = len(spk_idx)
    while len(first) < n_target + n_nontarget:
        i, j = rng.integers(n, size=2)
        if spk_idx[i] != spk_idx[j]:
            first.append(i)
            second.append(j)
    labels = np.r_[np.ones(n_target, dtype=np.int64), np.zeros(n_nontarget, dtype=np.int64)]
    return np.asarray(first), np.asarray(second), labels


def cosine_probe_eer(embeddings: Any, speaker_ids: Any, n_pairs: int = 2000, seed: int = 0) -> float:
    """EER (fraction, 0..1) of cosine scoring on random target / non-target pairs; 0.5 = no leakage."""
    x = _as_numpy(embeddings).astype(np.float64)
    if x.ndim != 2 or len(x) != len(_as_numpy(speaker_ids)):
        raise ValueError(f"cosine_probe_eer: expected [N, D] embeddings and N speaker ids, got {x.shape}")
    first, second, labels = cosine_trial_pairs(speaker_ids, n_pairs, seed)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = np.sum(unit[first] * unit[second], axis=1)
    eer, _threshold = equal_error_rate(scores, labels)
    return float(eer)
