"""data.media: wav/mp4 round trips, reproducible bytes, fast grey decoding equal to swscale's."""

import hashlib

import av
import numpy as np
import pytest

from data.media import MediaError, read_video, read_wav, write_video, write_wav


def test_fast_grey_decoding_equals_swscale_conversion(tmp_path):
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, None, :96], (3, 96, 1))
    ramp[1] = np.arange(160, 256, dtype=np.uint8)[None, :]
    ramp[2] = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    path = tmp_path / "ramp.mp4"
    write_video(path, ramp)
    with av.open(str(path)) as c:
        reference = np.stack([f.to_ndarray(format="gray") for f in c.decode(c.streams.video[0])])
    np.testing.assert_array_equal(read_video(path), reference)


def test_write_video_is_byte_reproducible(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (20, 96, 96), dtype=np.uint8)
    digests = set()
    for i in range(3):
        write_video(tmp_path / f"v{i}.mp4", frames)
        digests.add(hashlib.sha256((tmp_path / f"v{i}.mp4").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_wav_round_trip_and_errors(tmp_path):
    x = 0.5 * np.sin(np.arange(16000) / 10.0)
    write_wav(tmp_path / "a.wav", x)
    y = read_wav(tmp_path / "a.wav")
    assert y.shape == (16000,) and np.abs(y - x).max() < 1e-4
    write_wav(tmp_path / "b.wav", x, rate=8000)
    with pytest.raises(MediaError, match="8000 Hz, expected 16000"):
        read_wav(tmp_path / "b.wav")
    with pytest.raises(MediaError, match="not found"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "c.mp4").write_bytes(b"not a video")
    with pytest.raises(MediaError, match="c.mp4"):
        read_video(tmp_path / "c.mp4")
