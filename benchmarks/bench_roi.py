"""Mouth-ROI extraction speed (frames per second on this machine) for the real-corpus preparation."""

from __future__ import annotations

from benchmarks.common import write_result


def run() -> dict:
    from data.roi import benchmark_roi

    result = {
        "dlib_cnn_detect_every_5_fps": benchmark_roi(50, method="dlib_cnn", detect_every=5),
        "dlib_cnn_detect_every_frame_fps": benchmark_roi(25, method="dlib_cnn", detect_every=1),
        "dlib_hog_detect_every_5_fps": benchmark_roi(50, method="dlib_hog", detect_every=5),
        "input": "224x224 RGB frames made from skimage's astronaut() photo, 2 CPU cores",
    }
    write_result("roi", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
