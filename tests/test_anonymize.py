"""The VoicePrivacy McAdams-coefficient anonymisation baseline (data/anonymize.py)."""

import numpy as np
import pytest
from scipy.signal import lfilter

from data.anonymize import anonymize_waveform, lpc, mcadams_anonymize

SR = 16000


def vowel(formants=((700, 80), (1200, 100)), seconds=1.0, f0=100):
    """An impulse train at f0 through two resonators: a vowel with known formants."""
    excitation = np.zeros(int(seconds * SR))
    excitation[:: SR // f0] = 1.0
    a = np.array([1.0])
    for f, bw in formants:
        r = np.exp(-np.pi * bw / SR)
        a = np.convolve(a, [1.0, -2 * r * np.cos(2 * np.pi * f / SR), r * r])
    return lfilter([1.0], a, excitation)


def formants_of(x, order=4):
    poles = np.roots(lpc(x * np.hanning(len(x)), order))
    return sorted(np.angle(poles[poles.imag > 0]) * SR / (2 * np.pi))


@pytest.mark.parametrize("n", [1, 250, 16000, 23457])
def test_output_has_the_input_length_and_is_finite(n):
    x = np.random.default_rng(0).standard_normal(n) * 0.1
    y = mcadams_anonymize(x, SR, 0.8)
    assert y.shape == x.shape and np.isfinite(y).all()
    silence = mcadams_anonymize(np.zeros(n), SR, 0.8)
    assert silence.shape == (n,) and np.isfinite(silence).all() and not silence.any()


def test_alpha_one_is_the_identity():
    x = vowel() + 0.01 * np.random.default_rng(1).standard_normal(SR)
    y = mcadams_anonymize(x, SR, 1.0)
    assert np.max(np.abs(y - x)) < 1e-8 * np.max(np.abs(x))


def test_alpha_moves_the_formants_to_angle_power_alpha():
    x = vowel()
    y = mcadams_anonymize(x, SR, 0.8)
    before, after = formants_of(x[2000:6000]), formants_of(y[2000:6000])
    assert before == pytest.approx([700, 1200], abs=10)
    # phi -> phi ** 0.8 (phi in rad): 700 Hz -> 905 Hz, 1200 Hz -> 1395 Hz
    expected = [(2 * np.pi * f / SR) ** 0.8 * SR / (2 * np.pi) for f in (700, 1200)]
    assert after == pytest.approx(expected, abs=40)
    assert np.max(np.abs(y)) == pytest.approx(np.max(np.abs(x)))  # level kept


def test_deterministic_and_bad_input():
    x = vowel(seconds=0.3)
    np.testing.assert_array_equal(mcadams_anonymize(x, SR, 0.8), mcadams_anonymize(x, SR, 0.8))
    assert anonymize_waveform(x, "none", SR) is x
    with pytest.raises(ValueError, match="data.mcadams_alpha must be a positive number"):
        mcadams_anonymize(x, SR, 0.0)
    with pytest.raises(ValueError, match="mono waveform"):
        mcadams_anonymize(np.stack([x, x]), SR, 0.8)
    with pytest.raises(ValueError, match="data.anonymize must be one of"):
        anonymize_waveform(x, "vocoder", SR)


def test_the_batched_lpc_and_pole_warping_match_the_per_frame_functions():
    """mcadams_anonymize computes LPC and warps poles for all frames at once; both must equal the
    per-frame reference functions (a silent frame included: the identity filter)."""
    from data.anonymize import lpc_frames, warp_pole_angles, warp_pole_angles_frames

    frames = np.random.default_rng(0).normal(size=(30, 320))
    frames[4] = 0.0
    a = lpc_frames(frames, 20)
    np.testing.assert_allclose(a, np.stack([lpc(f, 20) for f in frames]), atol=1e-12)
    np.testing.assert_array_equal(a[4], np.eye(21)[0])
    for alpha in (0.8, 1.0):
        np.testing.assert_allclose(warp_pole_angles_frames(a, alpha), np.stack([warp_pole_angles(r, alpha) for r in a]), atol=1e-9)
