"""Reading and writing the corpus files: 16 kHz mono wav (soundfile) and grayscale mp4 (PyAV).

Every failure raises `MediaError` naming the file and what was expected, so a
stage can either stop with that message or count a skip (`data.on_error=skip`).
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class MediaError(ValueError):
    """An audio or video file that is missing, unreadable, truncated or in the wrong format."""


def read_wav(path: str | Path, expected_rate: int | None = 16000) -> np.ndarray:
    """Mono float32 samples in [-1, 1]. Raises MediaError for missing/corrupt files or a wrong rate."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: audio file not found")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError subclasses
        raise MediaError(f"{path}: cannot read audio ({e}); expected a 16 kHz mono wav") from e
    if expected_rate is not None and rate != expected_rate:
        raise MediaError(f"{path}: sample rate {rate} Hz, expected {expected_rate} Hz")
    if samples.shape[0] == 0:
        raise MediaError(f"{path}: audio has no samples")
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int(np.argmin(finite.all(axis=1)))
        raise MediaError(f"{path}: {int((~finite).sum())} samples are NaN or infinite (first at sample {bad}); "
                         "expected finite samples in [-1, 1]")
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]


def write_wav(path: str | Path, samples: np.ndarray, rate: int = 16000) -> None:
    """Write 16-bit PCM mono (deterministic bytes for identical input)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), np.clip(samples, -1.0, 1.0).astype(np.float32), rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)


# Limited-range luma (16..235) -> full-range grey, the mapping swscale applies for yuv420p -> gray.
_Y_TO_GRAY = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)


def _gray(frame) -> np.ndarray:
    """One decoded frame as uint8 grey [H, W]; for (limited-range) yuv420p the luma plane is read
    directly, ~100x faster than a swscale conversion and identical to it."""
    if frame.format.name == "yuv420p":
        plane = frame.planes[0]
        luma = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, : frame.width]
        return _Y_TO_GRAY[luma]
    if frame.format.name == "yuvj420p":  # full-range luma is already grey
        plane = frame.planes[0]
        return np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, : frame.width].copy()
    return frame.to_ndarray(format="gray")


def read_video(path: str | Path, expected_fps: float | None = 25.0) -> np.ndarray:
    """Grayscale frames as uint8 [T, H, W]. Raises MediaError for missing/corrupt files or a wrong frame rate."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            if expected_fps is not None and fps is not None and abs(fps - expected_fps) > 1e-3:
                raise MediaError(f"{path}: {fps:g} fps, expected {expected_fps:g} fps")
            frames = [_gray(f) for f in container.decode(stream)]
    except MediaError:
        raise
    except Exception as e:  # av.error.* for truncated / non-video files
        raise MediaError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not frames:
        raise MediaError(f"{path}: video has no decodable frames (truncated?)")
    return np.stack(frames)


# B-frames, mb-tree, lookahead and scenecut off: with them on, libx264 occasionally encodes
# the same frames into different bitstreams under CPU load; without them the output was
# byte-identical in hundreds of repeats, which SynthGRID's determinism relies on.
X264_OPTIONS = {
    "crf": "18",
    "preset": "veryfast",
    "threads": "1",
    "x264-params": "bframes=0:mbtree=0:rc-lookahead=0:sync-lookahead=0:scenecut=0:weightp=0",
}


def gray_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W] full-range grey -> [T, 3H/2, W] planar yuv420p (limited-range luma, neutral chroma).

    The mapping swscale applies for gray -> yuv420p, done once for all frames instead of per frame."""
    T, H, W = frames.shape
    out = np.full((T, H * 3 // 2, W), 128, dtype=np.uint8)
    out[:, :H] = (frames.astype(np.uint16) * 219 + 127) // 255 + 16
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: int = 25) -> None:
    """Write grayscale uint8 frames [T, H, W] (even H, W) as an H.264 mp4; same frames -> same bytes."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video expects uint8 [T, H, W] frames with even H and W, got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.thread_count = 1
        stream.options = dict(X264_OPTIONS)
        container.metadata["encoder"] = ""  # no version string in the file
        for i, plane in enumerate(gray_to_yuv420p(frames)):
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def check_existing(audio_path: str | Path, video_path: str | Path, roi_size: int, sample_rate: int = 16000,
                   fps: int = 25) -> tuple[int, int] | None:
    """(n_frames, n_samples) of a prepared utterance whose wav and mp4 exist, decode at `sample_rate` / `fps`
    and fit together (`roi_size` x `roi_size` frames, sample_rate / fps samples per frame); else None, with the
    reason logged, so that the caller makes it again."""
    audio_path, video_path = Path(audio_path), Path(video_path)
    if not (audio_path.is_file() and video_path.is_file()):
        return None
    try:
        n_samples = len(read_wav(audio_path, expected_rate=sample_rate))
        frames = read_video(video_path, expected_fps=fps)
    except MediaError as e:
        log.info("%s; making it again", e)
        return None
    per_frame = sample_rate // fps
    if frames.shape[1:] != (roi_size, roi_size) or n_samples != frames.shape[0] * per_frame:
        log.info("%s: %s frames and %d samples do not fit together (%d samples a frame, %dx%d); making it again",
                 video_path, frames.shape, n_samples, per_frame, roi_size, roi_size)
        return None
    return frames.shape[0], n_samples
