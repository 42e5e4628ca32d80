"""Bit-reproducible H.264 mp4 writing for SynthGRID.

data.io.write_video (crf 18, veryfast, 1 thread) is *not* byte-reproducible on this
libx264 build: encoding the same frames twice in one process occasionally gives
different bitstreams (seen with B-frames/mb-tree lookahead on, under CPU load; never
with the options below in hundreds of repeats). SynthGRID promises identical bytes
for the same seed, so it writes with B-frames, mb-tree, lookahead and scenecut off.
Same container, codec, pixel format and reader (data.io.read_video) as write_video.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

X264_OPTIONS = {
    "crf": "18",
    "preset": "veryfast",
    "threads": "1",
    "x264-params": "bframes=0:mbtree=0:rc-lookahead=0:sync-lookahead=0:scenecut=0:weightp=0",
}


def gray_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W] full-range grey -> [T, 3H/2, W] planar yuv420p (limited-range luma, neutral chroma).

    The same mapping swscale applies for gray -> yuv420p, done once for all frames
    instead of per frame."""
    T, H, W = frames.shape
    out = np.full((T, H * 3 // 2, W), 128, dtype=np.uint8)
    out[:, :H] = (frames.astype(np.uint16) * 219 + 127) // 255 + 16
    return out


def write_video_reproducible(path: str | Path, frames: np.ndarray, fps: int = 25) -> None:
    import av

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"expected uint8 [T, H, W] frames with even H and W, got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    yuv = gray_to_yuv420p(frames)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.thread_count = 1
        stream.options = dict(X264_OPTIONS)
        container.metadata["encoder"] = ""
        for i, plane in enumerate(yuv):
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
