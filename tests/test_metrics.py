"""WER/CER and speaker-verification metrics against hand computations and independent references."""

import math

import jiwer
import numpy as np
import pytest

from common.metrics import (
    char_error_rate,
    det_curve,
    equal_error_rate,
    min_dcf,
    plot_det_curve,
    speaker_verification_metrics,
    wer_details,
    word_error_rate,
)


# --------------------------------------------------------------------------- WER / CER
def test_wer_hand_computed():
    # 'A B C' -> 'A X C D': B->X is 1 substitution, D is 1 insertion; N = 3 -> 2/3.
    assert word_error_rate(["A B C"], ["A X C D"]) == pytest.approx(2 / 3)
    d = wer_details(["A B C"], ["A X C D"])
    assert (d["substitutions"], d["deletions"], d["insertions"], d["hits"], d["ref_words"]) == (1, 0, 1, 2, 3)


def test_wer_is_corpus_level_not_mean_of_utterances():
    # utt1: 'a b c d' vs 'a b c d' -> 0 errors / 4; utt2: 'x' vs '' -> 1 deletion / 1.
    # corpus = 1/5 = 0.2, while the mean of per-utterance WERs would be 0.5.
    assert word_error_rate(["a b c d", "x"], ["a b c d", ""]) == pytest.approx(0.2)
    assert wer_details(["a b c d", "x"], ["a b c d", ""])["deletions"] == 1


def test_wer_cer_equal_jiwer():
    refs = ["bin blue at f two now", "place red by g nine again", "set white with p four please"]
    hyps = ["bin blue at f two now", "place rad by nine again again", "set wite with b for pleas"]
    assert word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert char_error_rate(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    # CER by hand on one pair: 'ab c' -> 'ab d' is one substitution over 4 characters (space counts).
    assert char_error_rate(["ab c"], ["ab d"]) == pytest.approx(0.25)


def test_wer_bad_input():
    with pytest.raises(ValueError, match="same length"):
        word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        word_error_rate([""], ["a"])
    with pytest.raises(ValueError, match=r"hyps\[0\]"):
        word_error_rate(["a"], [None])


# --------------------------------------------------------------------------- EER / minDCF
def test_eer_perfect_separation_is_zero():
    eer, thr = equal_error_rate([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert eer == 0.0
    assert 0.2 < thr <= 0.8  # any threshold in (0.2, 0.8] separates perfectly


def test_eer_reversed_scores_is_one():
    eer, _ = equal_error_rate([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])
    assert eer == pytest.approx(1.0)


def test_eer_identical_distributions_is_half():
    rng = np.random.default_rng(0)
    n = 20000
    scores = rng.normal(size=2 * n)
    labels = np.r_[np.ones(n), np.zeros(n)]
    eer, _ = equal_error_rate(scores, labels)
    assert abs(eer - 0.5) < 0.02


def test_eer_hand_computed():
    # targets {0.4, 0.6, 0.9}, non-targets {0.1, 0.5}; accept iff score >= t.
    # sweep t:     0.1   0.4   0.5   0.6   0.9   next(0.9)
    # FRR (of 3):   0     0    1/3   1/3   2/3    1
    # FAR (of 2):   1    1/2   1/2    0     0     0
    # d=FAR-FRR:    1    1/2   1/6  -1/3  -2/3   -1
    # Crossing between t=0.5 (FAR 1/2, FRR 1/3) and t=0.6 (FAR 0, FRR 1/3):
    # alpha = (1/6) / (1/6 + 1/3) = 1/3; EER = 1/2 + 1/3 * (0 - 1/2) = 1/3;
    # threshold = 0.5 + 1/3 * 0.1.
    eer, thr = equal_error_rate([0.4, 0.6, 0.9, 0.1, 0.5], [1, 1, 1, 0, 0])
    assert eer == pytest.approx(1 / 3)
    assert thr == pytest.approx(0.5 + 0.1 / 3)


def test_eer_all_scores_tied():
    # one threshold accepts all (FAR 1, FRR 0), the next rejects all (FAR 0, FRR 1): midpoint 0.5.
    eer, _ = equal_error_rate([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0])
    assert eer == pytest.approx(0.5)


def test_eer_matches_brentq_on_interpolated_roc():
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 700)]
    labels = np.r_[np.ones(300), np.zeros(700)]
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    tpr_at = interp1d(fpr, tpr)
    ref = brentq(lambda x: 1.0 - x - tpr_at(x), 0.0, 1.0)
    eer, _ = equal_error_rate(scores, labels)
    assert eer == pytest.approx(ref, abs=1e-9)


def _brute_force_min_dcf(scores, labels, p_target, c_miss, c_fa):
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    best = math.inf
    for t in list(scores) + [math.inf]:
        p_miss = np.mean(scores[labels] < t)
        p_fa = np.mean(scores[~labels] >= t)
        best = min(best, c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target))
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


@pytest.mark.parametrize("p_target,c_miss,c_fa", [(0.01, 1, 1), (0.05, 1, 1), (0.5, 1, 1), (0.05, 10, 1)])
def test_min_dcf_matches_brute_force(p_target, c_miss, c_fa):
    rng = np.random.default_rng(2)
    scores = np.round(np.r_[rng.normal(1.5, 1.0, 60), rng.normal(0.0, 1.0, 140)], 1)  # rounding makes ties
    labels = np.r_[np.ones(60), np.zeros(140)]
    got, thr = min_dcf(scores, labels, p_target, c_miss, c_fa)
    assert got == pytest.approx(_brute_force_min_dcf(scores, labels, p_target, c_miss, c_fa))
    # the returned threshold attains the minimum
    s, y = scores, labels.astype(bool)
    cost = c_miss * np.mean(s[y] < thr) * p_target + c_fa * np.mean(s[~y] >= thr) * (1 - p_target)
    assert cost / min(c_miss * p_target, c_fa * (1 - p_target)) == pytest.approx(got)
    assert got <= 1.0 + 1e-12


def test_min_dcf_hand_computed():
    # Same trials as test_eer_hand_computed, p_target = 0.5, C_miss = C_fa = 1:
    # C_det = 0.5 FRR + 0.5 FAR at t = 0.1 .. next: 0.5, 0.25, 0.4167, 0.1667, 0.3333, 0.5
    # min = 1/6 at t = 0.6; C_def = min(0.5, 0.5) = 0.5 -> minDCF = 1/3.
    dcf, thr = min_dcf([0.4, 0.6, 0.9, 0.1, 0.5], [1, 1, 1, 0, 0], p_target=0.5)
    assert dcf == pytest.approx(1 / 3)
    assert thr == pytest.approx(0.6)
    # p_target = 0.01: C_def = 0.01; the reject-all point costs 0.01 * 1 -> normalised 1,
    # t = 0.6 costs 0.01/3 + 0 -> 1/3 is the minimum.
    dcf, _ = min_dcf([0.4, 0.6, 0.9, 0.1, 0.5], [1, 1, 1, 0, 0], p_target=0.01)
    assert dcf == pytest.approx(1 / 3)


def test_det_curve_ends_and_monotone():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=50)
    labels = rng.integers(0, 2, 50)
    labels[:2] = [0, 1]
    far, frr, thr = det_curve(scores, labels)
    assert (far[0], frr[0], far[-1], frr[-1]) == (1.0, 0.0, 0.0, 1.0)
    assert np.all(np.diff(far) <= 0) and np.all(np.diff(frr) >= 0) and np.all(np.diff(thr) > 0)


def test_verification_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        equal_error_rate([0.1, float("nan"), 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="single class"):
        equal_error_rate([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="single class"):
        min_dcf([0.1, 0.2], [0, 0], p_target=0.05)
    with pytest.raises(ValueError, match="same length"):
        speaker_verification_metrics([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        equal_error_rate([0.1, 0.2], [0, 2])


def test_speaker_verification_metrics_keys_and_plot(tmp_path):
    scores = [0.1, 0.2, 0.8, 0.9, 0.55, 0.45]
    labels = [0, 0, 1, 1, 0, 1]
    m = speaker_verification_metrics(scores, labels)
    assert {"eer", "min_dcf_p0.01", "min_dcf_p0.05"} <= set(m)
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert m["eer"] == pytest.approx(equal_error_rate(scores, labels)[0])
    far, frr, _ = det_curve(scores, labels)
    out = plot_det_curve({"sys": (far, frr), "chance": ([1, 0.5, 0], [0, 0.5, 1])}, tmp_path / "det" / "det.png")
    assert out.exists() and out.stat().st_size > 1000


def _speaker_trials(n_speakers=12, per_pair=4, separation=2.0, seed=0):
    from itertools import combinations

    rng = np.random.default_rng(seed)
    spk = [f"s{i}" for i in range(n_speakers)]
    offset = {s: rng.normal(0, 0.7) for s in spk}  # speaker-level effect: trials of a speaker are correlated
    scores, labels, sa, sb = [], [], [], []
    for s in spk:
        for _ in range(per_pair):
            scores.append(separation + offset[s] + rng.normal(0, 0.5)); labels.append(1); sa.append(s); sb.append(s)
    for s, t in combinations(spk, 2):
        scores.append(offset[s] + offset[t] + rng.normal(0, 0.5)); labels.append(0); sa.append(s); sb.append(t)
    return np.array(scores), np.array(labels), sa, sb


def test_speaker_bootstrap_ci_brackets_the_point_estimate_and_narrows_with_more_speakers():
    from common.metrics import equal_error_rate, speaker_bootstrap_ci

    scores, labels, sa, sb = _speaker_trials(n_speakers=8)
    ci = speaker_bootstrap_ci(scores, labels, sa, sb, n_resamples=300, seed=0)
    eer = equal_error_rate(scores, labels)[0]
    assert ci["eer_ci_low"] <= eer <= ci["eer_ci_high"] and ci["eer_ci_low"] < ci["eer_ci_high"]
    assert ci["min_dcf_p0.05_ci_low"] <= ci["min_dcf_p0.05_ci_high"] and ci["ci_speakers"] == 8
    assert ci == speaker_bootstrap_ci(scores, labels, sa, sb, n_resamples=300, seed=0)  # deterministic
    wide = ci["eer_ci_high"] - ci["eer_ci_low"]
    big = speaker_bootstrap_ci(*_speaker_trials(n_speakers=48), n_resamples=300, seed=0)
    assert big["eer_ci_high"] - big["eer_ci_low"] < 0.7 * wide


def test_speaker_bootstrap_ci_bad_input():
    from common.metrics import speaker_bootstrap_ci

    scores, labels, sa, sb = _speaker_trials(n_speakers=4)
    with pytest.raises(ValueError, match="one speaker per trial"):
        speaker_bootstrap_ci(scores, labels, sa[:-1], sb)
    with pytest.raises(ValueError, match="level must be in"):
        speaker_bootstrap_ci(scores, labels, sa, sb, level=95)


def test_speaker_bootstrap_ci_weighting_equals_repeating_the_trials():
    """The bootstrap weighs trials instead of repeating them (all-pairs lists are large); the
    intervals must be those of literally repeating each trial by its speaker counts."""
    import numpy as np

    from common.metrics import equal_error_rate, min_dcf, speaker_bootstrap_ci

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 8, (600, 2))
    labels = pairs[:, 0] == pairs[:, 1]
    scores = np.round(rng.normal(size=600) + labels, 1)  # rounded: many ties
    sa, sb = [f"s{i}" for i in pairs[:, 0]], [f"s{i}" for i in pairs[:, 1]]
    ci = speaker_bootstrap_ci(scores, labels, sa, sb, n_resamples=50, seed=3)
    names, inv = np.unique(np.concatenate([sa, sb]), return_inverse=True)
    ia, ib = inv[:600], inv[600:]
    draws, r = [], np.random.default_rng(3)
    while len(draws) < 50:  # the same replicate stream, the trials repeated literally
        c = np.bincount(r.integers(0, len(names), len(names)), minlength=len(names))
        w = np.where(ia == ib, c[ia], c[ia] * c[ib])
        s, y = np.repeat(scores, w), np.repeat(labels, w)
        if y.sum() in (0, y.size):
            continue
        draws.append((equal_error_rate(s, y)[0], min_dcf(s, y, 0.01)[0], min_dcf(s, y, 0.05)[0]))
    low, high = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    for k, key in enumerate(("eer", "min_dcf_p0.01", "min_dcf_p0.05")):
        assert ci[f"{key}_ci_low"] == pytest.approx(low[k], abs=1e-12)
        assert ci[f"{key}_ci_high"] == pytest.approx(high[k], abs=1e-12)
