"""Behaviour of the cheap leakage probes (privacy/probe.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privacy.probe import cosine_probe_eer, cosine_trial_pairs, pooled_representations, speaker_probe


def speaker_data(n_spk=6, per_spk=12, dim=16, separation=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_spk, dim)) * separation
    spk = np.repeat(np.arange(n_spk), per_spk)
    return centres[spk] + rng.normal(size=(len(spk), dim)), spk


def test_speaker_probe_high_on_separable_and_near_chance_on_random():
    x_tr, y_tr = speaker_data(seed=1)
    x_te, y_te = speaker_data(seed=1)
    x_te = x_te + np.random.default_rng(2).normal(size=x_te.shape)  # same speakers, other "utterances"
    sep = speaker_probe(x_tr, y_tr, x_te, y_te)
    assert sep["accuracy"] > 0.9
    assert sep["chance"] == pytest.approx(1 / 6) and sep["num_speakers"] == 6
    rng = np.random.default_rng(3)
    rand = speaker_probe(rng.normal(size=x_tr.shape), y_tr, rng.normal(size=x_te.shape), y_te)
    assert rand["accuracy"] < 0.4  # chance is 1/6 ~ 0.17


def test_speaker_probe_accepts_tensors_and_string_labels():
    x, y = speaker_data(n_spk=3, per_spk=6, seed=4)
    labels = np.array([f"spk{s}" for s in y])
    out = speaker_probe(torch.tensor(x, dtype=torch.float32), labels, torch.tensor(x, dtype=torch.float32), labels)
    assert out["accuracy"] == 1.0


def test_speaker_probe_errors():
    x, y = speaker_data(n_spk=3, per_spk=4)
    with pytest.raises(ValueError, match="closed-set"):
        speaker_probe(x, y, x, y + 10)
    with pytest.raises(ValueError, match="at least 2 training speakers"):
        speaker_probe(x, np.zeros_like(y), x, np.zeros_like(y))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        speaker_probe(x, y[:-1], x, y)


def test_cosine_pairs_are_balanced_and_deterministic():
    spk = np.repeat(np.arange(5), 4)
    i1, j1, l1 = cosine_trial_pairs(spk, 101, seed=7)
    i2, j2, l2 = cosine_trial_pairs(spk, 101, seed=7)
    assert np.array_equal(i1, i2) and np.array_equal(j1, j2) and np.array_equal(l1, l2)
    assert len(l1) == 101 and l1.sum() == 50
    assert np.all((spk[i1] == spk[j1]) == (l1 == 1))
    assert np.all(i1[l1 == 1] != j1[l1 == 1])
    with pytest.raises(ValueError, match="one speaker with >= 2 utterances"):
        cosine_trial_pairs(np.arange(5), 10)


def test_cosine_probe_eer_low_when_separable_and_half_when_random():
    x, y = speaker_data(n_spk=8, per_spk=8, seed=5)
    assert cosine_probe_eer(x, y, n_pairs=1000, seed=0) < 0.05
    rng = np.random.default_rng(6)
    eer = cosine_probe_eer(rng.normal(size=x.shape), y, n_pairs=4000, seed=0)
    assert 0.4 < eer < 0.6
    assert cosine_probe_eer(x, y, n_pairs=500, seed=3) == cosine_probe_eer(x, y, n_pairs=500, seed=3)


def test_pooled_representations_respects_padding_and_output_types():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    pad = torch.tensor([[False, False, False, False], [False, True, True, True]])
    expected = torch.stack([x[0].mean(0), x[1, 0]])
    torch.testing.assert_close(pooled_representations(x, pad), expected)
    torch.testing.assert_close(pooled_representations({"encoder_out": x}, pad), expected)
    torch.testing.assert_close(pooled_representations(SimpleNamespace(last_hidden_state=x), pad), expected)
    torch.testing.assert_close(pooled_representations(SimpleNamespace(last_hidden_state=x, padding_mask=pad)), expected)
    with pytest.raises(TypeError, match="pooled_representations"):
        pooled_representations({"logits": x})
