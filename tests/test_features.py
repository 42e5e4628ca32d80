"""Features against independent re-derivations of AV-HuBERT's preprocessing; noise SNR; collate."""

import numpy as np
import pytest
import torch

from data import features
from data.collate import TARGET_PAD, collate_av
from data.noise import babble_noise, mix_at_snr, white_noise


def _chirp(n, rate=16000):
    t = np.arange(n) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)).astype(np.float32)


def _reference_stacker(feats, stack_order):
    # the original's logic, written out frame by frame: row j = frames 4j..4j+3 concatenated
    n, dim = feats.shape
    n_out = -(-n // stack_order)
    out = np.zeros((n_out, stack_order * dim), dtype=feats.dtype)
    for j in range(n_out):
        for k in range(stack_order):
            if j * stack_order + k < n:
                out[j, k * dim : (k + 1) * dim] = feats[j * stack_order + k]
    return out


@pytest.mark.parametrize("n_samples", [16000, 16000 + 480, 7777, 300])
def test_logfbank_stacked_matches_original_pipeline(n_samples):
    from python_speech_features import logfbank

    # the original reads int16 with scipy; soundfile gives the same file as float PCM_16 = int16 / 32768
    pcm = np.round(_chirp(n_samples) * 32767).astype(np.int16)
    wav = pcm.astype(np.float32) / 32768
    ours = features.logfbank_stacked(wav)
    ref = _reference_stacker(logfbank(pcm, samplerate=16000).astype(np.float32), 4)
    assert ours.shape == ref.shape == (features.num_audio_frames(n_samples), 104)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    # frame-major layout: columns 26..51 of row 0 are the 100 Hz frame 1
    raw = logfbank(wav.astype(np.float64) * 32768, samplerate=16000).astype(np.float32)
    if len(raw) > 1:
        np.testing.assert_array_equal(ours[0, 26:52], raw[1])


def test_one_second_gives_25_frames_and_tail_is_zero_padded():
    feats = features.logfbank_stacked(_chirp(16000))
    assert feats.shape == (25, 104)  # 99 frames at 100 Hz -> ceil(99/4)
    assert np.all(feats[-1, 3 * 26 :] == 0) and np.any(feats[-1, : 3 * 26] != 0)


def test_logfbank_rejects_wrong_rate_and_stereo():
    with pytest.raises(ValueError, match="16000"):
        features.logfbank_stacked(_chirp(800), sample_rate=8000)
    with pytest.raises(ValueError, match="mono"):
        features.logfbank_stacked(np.zeros((100, 2), np.float32))


def test_normalize_audio_is_per_frame_layer_norm():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((7, 104)) * 3 + np.arange(7)[:, None] * 10).astype(np.float32)
    out = features.normalize_audio(feats).numpy()
    ref = (feats - feats.mean(1, keepdims=True)) / np.sqrt(feats.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(1), 1, atol=1e-3)


def test_align_audio_to_video_trims_and_pads():
    feats = np.ones((10, 104), np.float32)
    assert features.align_audio_to_video(feats, 8).shape == (8, 104)
    padded = features.align_audio_to_video(feats, 12)
    assert padded.shape == (12, 104) and np.all(padded[10:] == 0) and np.all(padded[:10] == 1)
    assert features.align_audio_to_video(feats, 10) is feats


def test_crop_centre_at_eval_random_and_reproducible_at_train():
    frames = np.arange(3 * 96 * 96, dtype=np.int64).reshape(3, 96, 96).astype(np.uint8)
    centre = features.crop_video(frames, 88, train=False)
    np.testing.assert_array_equal(centre, frames[:, 4:92, 4:92])
    np.testing.assert_array_equal(features.crop_video(frames, 88, train=False), centre)
    crops = [features.crop_video(frames, 88, train=True, rng=np.random.default_rng(s)) for s in range(20)]
    assert all(c.shape == (3, 88, 88) for c in crops)
    assert len({c.tobytes() for c in crops}) > 5
    np.testing.assert_array_equal(
        features.crop_video(frames, 88, train=True, rng=np.random.default_rng(3)), crops[3]
    )
    # every train crop is some window of the input, possibly mirrored as a whole sequence
    c = crops[0]
    windows = [frames[:, i : i + 88, j : j + 88] for i in range(9) for j in range(9)]
    assert any(np.array_equal(c, w) or np.array_equal(c, w[:, :, ::-1]) for w in windows)
    with pytest.raises(ValueError, match="rng"):
        features.crop_video(frames, 88, train=True)


def test_normalize_video():
    x = np.array([[[0, 255]]], np.uint8)
    np.testing.assert_allclose(features.normalize_video(x), [[[-0.421 / 0.165, (1 - 0.421) / 0.165]]], rtol=1e-6)


# ----------------------------------------------------------------------------- noise
def _snr_db(clean, mixed):
    noise = mixed.astype(np.float64) - clean.astype(np.float64)
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))


@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.5, 20.0])
def test_mix_at_snr_is_exact(snr):
    rng = np.random.default_rng(1)
    clean = _chirp(8000)
    for noise in (white_noise(3000, rng), _chirp(20000)[::-1] * 5):  # shorter (tiled) and longer (cut) noise
        mixed = mix_at_snr(clean, noise, snr, np.random.default_rng(2))
        assert mixed.shape == clean.shape and mixed.dtype == np.float32
        assert abs(_snr_db(clean, mixed) - snr) < 0.01


def test_mix_is_deterministic_and_handles_silence():
    clean, noise = _chirp(4000), white_noise(4000, np.random.default_rng(0))
    a = mix_at_snr(clean, noise, 5, np.random.default_rng(9))
    np.testing.assert_array_equal(a, mix_at_snr(clean, noise, 5, np.random.default_rng(9)))
    np.testing.assert_array_equal(mix_at_snr(np.zeros(100, np.float32), noise, 5, np.random.default_rng(0)), 0)
    with pytest.raises(ValueError, match="silent"):
        mix_at_snr(clean, np.zeros(50), 5, np.random.default_rng(0))


def test_babble_is_unit_rms_mixture_of_the_pool():
    rng = np.random.default_rng(0)
    pool = [_chirp(3000 + 100 * i) for i in range(6)]
    babble = babble_noise(pool, 5000, rng, n_talkers=4)
    assert babble.shape == (5000,)
    assert abs(np.sqrt(np.mean(babble.astype(np.float64) ** 2)) - 1) < 1e-4
    with pytest.raises(ValueError, match="non-silent"):
        babble_noise([np.zeros(10)], 100, rng)


# ----------------------------------------------------------------------------- collate
def _item(i, T, S, with_video=True):
    return {
        "id": f"u{i}", "speaker": f"s{i % 2}", "speaker_idx": i % 2, "text": "A",
        "targets": torch.arange(1, S + 1), "audio": torch.full((T, 104), float(i + 1)),
        "video": torch.full((T, 88, 88), float(i + 1)) if with_video else None,
        "waveform": torch.ones(T * 640), "n_frames": T,
    }


def test_collate_layout_and_padding_masks():
    batch = collate_av([_item(0, 5, 3), _item(1, 3, 6)])
    assert batch["audio"].shape == (2, 104, 5)
    assert batch["video"].shape == (2, 1, 5, 88, 88)
    assert batch["padding_mask"].tolist() == [[False] * 5, [False] * 3 + [True] * 2]
    assert batch["lengths"].tolist() == [5, 3] and batch["target_lengths"].tolist() == [3, 6]
    assert batch["targets"].shape == (2, 6) and batch["targets"][0, 3:].tolist() == [TARGET_PAD] * 3
    assert torch.all(batch["audio"][1, :, 3:] == 0) and torch.all(batch["audio"][1, :, :3] == 2)
    assert torch.all(batch["video"][1, 0, 3:] == 0)
    assert batch["waveform"].shape == (2, 3200) and batch["waveform_lengths"].tolist() == [3200, 1920]
    assert batch["speaker_idx"].tolist() == [0, 1]


def test_collate_missing_modality_is_none():
    batch = collate_av([_item(0, 4, 2, with_video=False), _item(1, 4, 2, with_video=False)])
    assert batch["video"] is None and batch["audio"].shape == (2, 104, 4)
    with pytest.raises(ValueError, match="video"):
        collate_av([_item(0, 4, 2), _item(1, 4, 2, with_video=False)])
