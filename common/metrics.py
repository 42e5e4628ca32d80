"""Recognition metrics (WER / CER) and speaker-verification metrics (EER, minDCF, DET).

Plain numpy / jiwer / matplotlib; no Hydra, no torch. Every metric returns a
fraction in [0, 1] (multiply by 100 for the percentages tables usually show).

Verification convention used throughout
---------------------------------------
A trial is *accepted* when ``score >= threshold``. Labels are 1 for target
(same-speaker) trials and 0 for non-target trials. For a threshold ``t``:

* FRR(t) = P_miss(t) = #{target scores < t} / #targets
* FAR(t) = P_fa(t)   = #{non-target scores >= t} / #non-targets

The operating points swept are every distinct score (each one as a threshold)
plus one threshold just above the largest score (``np.nextafter(max, inf)``,
"reject everything"). The smallest score as threshold is "accept everything"
(FRR = 0, FAR = 1), so the sweep covers both ends of the DET curve and ties
between scores are handled exactly (tied trials switch decision together).

EER: FAR(t) - FRR(t) is non-increasing along the sweep. The EER is taken where
it changes sign, by linear interpolation between the two neighbouring operating
points i, i+1 (the segment joining them on the ROC): with
``d = FAR - FRR`` and ``alpha = d_i / (d_i - d_{i+1})``,
``EER = FAR_i + alpha * (FAR_{i+1} - FAR_i)`` (= the FRR at the same alpha) and
the reported threshold is interpolated with the same alpha. If some operating
point has FAR == FRR exactly, that point is the EER and its threshold is
returned. This equals the usual "brentq on the interpolated ROC" value, and
differs from the ROC-convex-hull EER of BOSARIS when the ROC is not convex.

minDCF (NIST SRE / VoxCeleb definition):
``C_det(t) = C_miss * P_miss(t) * P_target + C_fa * P_fa(t) * (1 - P_target)``,
minimised over all swept thresholds, normalised by the cost of the best
trivial system ``C_def = min(C_miss * P_target, C_fa * (1 - P_target))``, so it
is <= 1 (the accept-all and reject-all points are always in the sweep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "word_error_rate",
    "char_error_rate",
    "wer_details",
    "utterance_word_errors",
    "speaker_bootstrap_wer",
    "percentile_ci",
    "det_curve",
    "equal_error_rate",
    "min_dcf",
    "speaker_verification_metrics",
    "plot_det_curve",
]


# --------------------------------------------------------------------------- WER / CER
def _check_transcripts(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[str], list[str]]:
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"refs and hyps must have the same length, got {len(refs)} references and {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("refs is empty: need at least one reference transcript")
    for name, items in (("refs", refs), ("hyps", hyps)):
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise ValueError(f"{name}[{i}] must be a str, got {type(s).__name__}: {s!r}")
    return refs, hyps


def wer_details(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus-level word alignment counts (whitespace tokenisation, case-sensitive).

    Returns ``{"wer", "substitutions", "deletions", "insertions", "hits", "ref_words"}``.
    Empty individual references are allowed (their hypothesis words count as
    insertions) as long as the corpus has at least one reference word.
    """
    import jiwer

    refs, hyps = _check_transcripts(refs, hyps)
    ref_words = sum(len(r.split()) for r in refs)
    if ref_words == 0:
        raise ValueError("all reference transcripts are empty: WER is undefined")
    out = jiwer.process_words(refs, hyps)
    return {
        "wer": float(out.wer),
        "substitutions": int(out.substitutions),
        "deletions": int(out.deletions),
        "insertions": int(out.insertions),
        "hits": int(out.hits),
        "ref_words": int(ref_words),
    }


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level WER = (S + D + I) / N as a fraction (may exceed 1)."""
    return wer_details(refs, hyps)["wer"]


def char_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level CER as a fraction; characters include the spaces between words (jiwer's convention)."""
    import jiwer

    refs, hyps = _check_transcripts(refs, hyps)
    if sum(len(r) for r in refs) == 0:
        raise ValueError("all reference transcripts are empty: CER is undefined")
    return float(jiwer.process_characters(refs, hyps).cer)


# --------------------------------------------------------------------------- verification
def _check_trials(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels_arr = np.asarray(labels)
    if scores.ndim != 1 or labels_arr.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels_arr.shape}")
    if scores.shape != labels_arr.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.shape[0]} and {labels_arr.shape[0]}")
    if scores.size == 0:
        raise ValueError("no trials: scores is empty")
    n_nan = int(np.isnan(scores).sum())
    if n_nan:
        raise ValueError(f"scores contain {n_nan} NaN value(s) of {scores.size} (first at index {int(np.flatnonzero(np.isnan(scores))[0])})")
    n_inf = int(np.isinf(scores).sum())
    if n_inf:
        raise ValueError(f"scores contain {n_inf} infinite value(s) of {scores.size}")
    uniq = np.unique(labels_arr)
    bad = [u for u in uniq.tolist() if u not in (0, 1, True, False)]
    if bad:
        raise ValueError(f"labels must be 0 (non-target) or 1 (target), got values {bad[:5]}")
    labels_arr = labels_arr.astype(bool)
    n_tar = int(labels_arr.sum())
    if n_tar == 0 or n_tar == labels_arr.size:
        which = "non-target (0)" if n_tar == 0 else "target (1)"
        raise ValueError(f"labels contain a single class (all {labels_arr.size} trials are {which}): need both target and non-target trials")
    return scores, labels_arr


def det_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAR, FRR at every swept threshold (increasing), see the module docstring.

    Returns ``(far, frr, thresholds)``, each of length (#distinct scores + 1);
    far is non-increasing, frr non-decreasing, far[0] = 1, frr[0] = 0,
    far[-1] = 0, frr[-1] = 1.
    """
    scores, labels = _check_trials(scores, labels)
    return _SortedTrials(scores, labels).det(np.ones(scores.size, dtype=np.int64))


class _SortedTrials:
    """Trials sorted by score once, so DET curves under many trial weightings (the speaker
    bootstrap) cost one cumulative sum each. Integer weight w is the same as repeating the trial w times."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        self.order = np.argsort(scores, kind="mergesort")
        s = scores[self.order]
        self.y = labels[self.order]
        distinct, self.first_idx = np.unique(s, return_index=True)
        self.thresholds = np.append(distinct, np.nextafter(distinct[-1], np.inf))

    def det(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(far, frr, thresholds) with trial i (original order) counted weights[i] times."""
        w = weights[self.order]
        tar, non = np.where(self.y, w, 0), np.where(self.y, 0, w)
        # Weighted target / non-target counts strictly below each distinct score.
        tar_below = np.append(np.concatenate([[0], np.cumsum(tar)])[self.first_idx], tar.sum())
        non_below = np.append(np.concatenate([[0], np.cumsum(non)])[self.first_idx], non.sum())
        frr = tar_below / tar.sum()
        far = 1.0 - non_below / non.sum()
        return far, frr, self.thresholds


def equal_error_rate(scores, labels) -> tuple[float, float]:
    """Exact EER (fraction) and its threshold, interpolated on the ROC (module docstring)."""
    return _eer_from_det(*det_curve(scores, labels))


def _eer_from_det(far: np.ndarray, frr: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    d = far - frr  # starts at +1, ends at -1, non-increasing
    exact = np.flatnonzero(d == 0)
    if exact.size:
        i = int(exact[0])
        return float(far[i]), float(thr[i])
    i = int(np.flatnonzero(d > 0)[-1])  # last point with FAR > FRR; i+1 has FAR < FRR
    alpha = d[i] / (d[i] - d[i + 1])
    eer = far[i] + alpha * (far[i + 1] - far[i])
    threshold = thr[i] + alpha * (thr[i + 1] - thr[i])
    return float(eer), float(threshold)


def min_dcf(scores, labels, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """Normalised minimum detection cost and the threshold that attains it."""
    return _min_dcf_from_det(*det_curve(scores, labels), p_target, c_miss, c_fa)


def _min_dcf_from_det(far, frr, thr, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"c_miss and c_fa must be positive, got c_miss={c_miss}, c_fa={c_fa}")
    c_det = c_miss * frr * p_target + c_fa * far * (1.0 - p_target)
    i = int(np.argmin(c_det))
    c_def = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(c_det[i] / c_def), float(thr[i])


def speaker_verification_metrics(scores, labels) -> dict[str, float]:
    """The numbers a verification run reports (flat keys for metrics.json)."""
    scores, labels = _check_trials(scores, labels)
    eer, eer_thr = equal_error_rate(scores, labels)
    dcf01, _ = min_dcf(scores, labels, p_target=0.01)
    dcf05, _ = min_dcf(scores, labels, p_target=0.05)
    return {
        "eer": eer,
        "eer_threshold": eer_thr,
        "min_dcf_p0.01": dcf01,
        "min_dcf_p0.05": dcf05,
        "num_target_trials": int(labels.sum()),
        "num_nontarget_trials": int((~labels).sum()),
    }


def speaker_bootstrap_ci(scores, labels, speakers_a: Sequence[str], speakers_b: Sequence[str], n_resamples: int = 1000,
                         seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Confidence intervals of EER and minDCF from resampling speakers (percentile bootstrap).

    Trials are not independent: every trial of a speaker shares that speaker's voice, so the
    speakers are the sampling unit. Each replicate draws the trial speakers with replacement
    (counts c_s) and weighs a target trial of speaker s by c_s and a non-target trial between s
    and t by c_s * c_t (every pair of drawn copies brings its trials); a weight w counts the trial w times.
    Replicates without both target and non-target trials are redrawn. Returns
    `{eer,min_dcf_p0.01,min_dcf_p0.05}_ci_{low,high}`, `ci_level`, `ci_resamples`, `ci_speakers`.
    """
    scores, labels = _check_trials(scores, labels)
    spk_a, spk_b = np.asarray(speakers_a), np.asarray(speakers_b)
    if spk_a.shape != scores.shape or spk_b.shape != scores.shape:
        raise ValueError(f"speakers_a / speakers_b need one speaker per trial ({scores.size}), got {spk_a.shape} and {spk_b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    names, inverse = np.unique(np.concatenate([spk_a, spk_b]), return_inverse=True)
    ia, ib = inverse[: scores.size], inverse[scores.size:]
    rng = np.random.default_rng(seed)
    sorted_trials = _SortedTrials(scores, labels)  # sorted once; each replicate only re-weighs (all-pairs lists are large)
    stats = {"eer": [], "min_dcf_p0.01": [], "min_dcf_p0.05": []}
    attempts = 0
    while len(stats["eer"]) < n_resamples:
        attempts += 1
        if attempts > 20 * n_resamples:
            raise ValueError("speaker resampling keeps losing all target or all non-target trials: too few trial speakers")
        counts = np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
        weights = np.where(ia == ib, counts[ia], counts[ia] * counts[ib])
        n_tar, n_all = int(weights[labels].sum()), int(weights.sum())
        if n_tar == 0 or n_tar == n_all:
            continue
        det = sorted_trials.det(weights)
        stats["eer"].append(_eer_from_det(*det)[0])
        stats["min_dcf_p0.01"].append(_min_dcf_from_det(*det, 0.01)[0])
        stats["min_dcf_p0.05"].append(_min_dcf_from_det(*det, 0.05)[0])
    tail = 100 * (1 - level) / 2
    out: dict[str, float] = {}
    for key, values in stats.items():
        low, high = np.percentile(values, [tail, 100 - tail])
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(low), float(high)
    out.update(ci_level=float(level), ci_resamples=int(n_resamples), ci_speakers=int(len(names)))
    return out


def utterance_word_errors(refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(word errors S + D + I, reference words) of every utterance; their sums give :func:`word_error_rate`."""
    import jiwer

    refs, hyps = _check_transcripts(refs, hyps)
    errors = np.zeros(len(refs), dtype=np.int64)
    words = np.array([len(r.split()) for r in refs], dtype=np.int64)
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not r.split():  # jiwer refuses an empty reference: every hypothesis word is an insertion
            errors[i] = len(h.split())
            continue
        out = jiwer.process_words(r, h)
        errors[i] = out.substitutions + out.deletions + out.insertions
    return errors, words


def speaker_bootstrap_wer(errors, words, speakers: Sequence[str], n_resamples: int = 1000,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Corpus WERs of several systems on one test set, and their replicates under resampled test speakers.

    `errors`: (systems, utterances) word errors (:func:`utterance_word_errors` of each system's hypotheses);
    `words`: (utterances,) reference words; `speakers`: the speaker of each utterance. An utterance's errors
    depend on its speaker's voice, so the speakers are the sampling unit: each replicate draws the test
    speakers with replacement (counts c_s) and a system's WER is sum_s c_s E_s / sum_s c_s W_s. Every system
    sees the same draws, so differences between systems (or between means over seeds) are paired.
    Returns (wer (systems,), replicates (n_resamples, systems)); percentiles of the replicates are the CI.
    """
    errors = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    words = np.asarray(words, dtype=np.float64)
    spk = np.asarray(speakers)
    if errors.shape[1] != words.shape[0] or spk.shape != words.shape:
        raise ValueError(f"errors {errors.shape}, words {words.shape} and speakers {spk.shape} must have one entry per utterance")
    if words.sum() <= 0:
        raise ValueError("the references have no words: WER is undefined")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    names, inverse = np.unique(spk, return_inverse=True)
    per_speaker_errors = np.stack([np.bincount(inverse, weights=e, minlength=len(names)) for e in errors])  # (systems, S)
    per_speaker_words = np.bincount(inverse, weights=words, minlength=len(names))  # (S,)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names)) for _ in range(n_resamples)])
    total_words = counts @ per_speaker_words
    if np.any(total_words <= 0):
        raise ValueError("a speaker resample drew only speakers without reference words")
    replicates = (counts @ per_speaker_errors.T) / total_words[:, None]
    return errors.sum(axis=1) / words.sum(), replicates


def percentile_ci(replicates, level: float = 0.95) -> tuple[float, float]:
    """The percentile-bootstrap interval of a statistic from its replicates."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------- plotting
# Candidate ticks (as rates) on a normal-deviate axis, most important first: the
# ticks drawn are the first ones that keep DET_TICK_GAP deviate units apart, so
# labels never overlap ("0.10.20.51 2") whatever the range.
_DET_TICK_PRIORITY = [0.5, 0.1, 0.9, 0.01, 0.99, 0.2, 0.8, 0.05, 0.95, 0.02, 0.98, 0.4, 0.6, 0.001, 0.999, 0.3, 0.7,
                      0.005, 0.995, 0.002, 0.998, 0.0001, 0.0005, 0.0002]
DET_TICK_GAP = 0.42  # normal-deviate units between tick labels (a 5-inch axis spans about 6 units)


def det_ticks(low: float, high: float, gap: float = DET_TICK_GAP) -> list[float]:
    """Readable tick rates within [low, high] (rates in (0, 1)), sorted; neighbours at least `gap` apart in deviates."""
    from scipy.stats import norm

    chosen: list[float] = []
    for rate in _DET_TICK_PRIORITY:
        if low <= rate <= high and all(abs(norm.ppf(rate) - norm.ppf(c)) >= gap for c in chosen):
            chosen.append(rate)
    return sorted(chosen)


def _tick_label(rate: float) -> str:
    return f"{round(100 * rate, 3):g}"  # 0.001 -> "0.1", 0.999 -> "99.9"


def det_range(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float]:
    """Axis range (rates) that fits every curve: from half the smallest non-zero rate (the
    resolution of the trial list) to 1 minus that, within [0.01 %, 99.99 %]."""
    smallest = 0.5
    for far, frr in curves.values():
        for rates in (np.asarray(far, dtype=float), np.asarray(frr, dtype=float)):
            positive = rates[(rates > 0) & (rates < 1)]
            if positive.size:
                smallest = min(smallest, float(positive.min()), float(1 - positive.max()))
    low = float(np.clip(smallest / 2, 1e-4, 0.05))
    return low, 1 - low


def draw_det(ax: Any, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], rate_range: tuple[float, float] | None = None,
             styles: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[float, float]:
    """DET curves (FRR vs FAR, normal-deviate axes, ticks in %) on a matplotlib axis.

    Rates of exactly 0 or 1 have no normal deviate: they are drawn at the edge of the
    range, so every curve's ends stay visible. `styles` gives plot keyword arguments per
    curve name (colour, line style). Returns the rate range used.
    """
    from scipy.stats import norm

    low, high = rate_range or det_range(curves)
    for name, (far, frr) in curves.items():
        far = np.clip(np.asarray(far, dtype=float), low, high)
        frr = np.clip(np.asarray(frr, dtype=float), low, high)
        if far.shape != frr.shape:
            raise ValueError(f"plot_det_curve: curve {name!r} has far of shape {far.shape} but frr of shape {frr.shape}")
        ax.plot(norm.ppf(far), norm.ppf(frr), label=str(name), **dict((styles or {}).get(name, {})))
    span = float(norm.ppf(high) - norm.ppf(low))
    ticks = det_ticks(low, high, gap=max(DET_TICK_GAP, span / 9))  # at most ~9 labels per axis
    labels = [_tick_label(t) for t in ticks]
    ax.set_xticks(norm.ppf(ticks), labels)
    ax.set_yticks(norm.ppf(ticks), labels)
    lim = norm.ppf([low, high])
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.plot(lim, lim, color="0.7", lw=0.8, ls="--", zorder=0)  # the EER line
    ax.set_xlabel("False acceptance rate (%)")
    ax.set_ylabel("False rejection rate (%)")
    ax.set_aspect("equal")
    ax.grid(True, lw=0.3)
    return low, high


def plot_det_curve(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                   title: str | None = None) -> Path:
    """Draw DET curves (FRR vs FAR on normal-deviate axes) for several systems into ``path``.

    ``curves`` maps a legend name to ``(far, frr)`` as returned by :func:`det_curve`.
    The range follows the data (:func:`det_range`), the ticks never overlap
    (:func:`det_ticks`), and the legend sits below the axes, so long system names
    never cover the curves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("plot_det_curve: curves is empty, nothing to plot")
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        draw_det(ax, curves)
        if title:
            ax.set_title(title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small", frameon=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
