"""Mouth ROI (data/roi.py) on a real face photograph shipped by scikit-image (astronaut)."""

from __future__ import annotations

import numpy as np
import pytest

from data import roi


@pytest.fixture(scope="module")
def astronaut():
    from skimage.data import astronaut as load

    return load()


@pytest.fixture(scope="module")
def landmarks(astronaut):
    return roi.astronaut_landmarks()  # dlib CNN detector + 68-point predictor


def test_model_files_come_from_the_wheel():
    files = roi.model_files()
    assert files["cnn_face_detector"].name == "mmod_human_face_detector.dat"
    assert all(p.stat().st_size > 100_000 for p in files.values())


def test_landmarks_lie_on_the_face(landmarks):
    assert landmarks.shape == (68, 2)
    mouth = landmarks[roi.MOUTH].mean(axis=0)
    eyes_y = landmarks[36:48, 1].mean()
    # the astronaut's face is at x ~170-265, y ~70-170 in the 512x512 photo
    assert 195 < mouth[0] < 250 and 130 < mouth[1] < 165
    assert eyes_y < landmarks[33, 1] < mouth[1] < landmarks[8, 1]  # eyes above nose above mouth above chin


def test_mean_face_is_the_documented_derivation(landmarks):
    derived = roi.derive_mean_face([landmarks])
    np.testing.assert_allclose(roi.MEAN_FACE_68, derived, atol=0.02)
    mirrored = roi.MEAN_FACE_68[roi.MIRROR_68].copy()
    mirrored[:, 0] = 256 - mirrored[:, 0]
    np.testing.assert_allclose(mirrored, roi.MEAN_FACE_68, atol=1e-6)  # symmetric
    left, right = roi.MEAN_FACE_68[36:42].mean(0), roi.MEAN_FACE_68[42:48].mean(0)
    assert np.hypot(*(right - left)) == pytest.approx(roi.EYE_DISTANCE, abs=0.02)
    assert sorted(roi.MIRROR_68.tolist()) == list(range(68))


def test_crop_is_centred_on_the_mouth_landmarks(astronaut, landmarks):
    gray = roi.rgb_to_gray(astronaut)
    centre = landmarks[roi.MOUTH].mean(axis=0)
    marked = gray.copy()
    cx, cy = np.rint(centre).astype(int)
    marked[cy - 1 : cy + 2, cx - 1 : cx + 2] = 255 if gray[cy, cx] < 128 else 0  # a dot at the mouth centre
    diff = np.abs(roi.cut_mouth(marked, landmarks).astype(int) - roi.cut_mouth(gray, landmarks).astype(int))
    y, x = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() > 50
    assert abs(x - 47.5) <= 2 and abs(y - 47.5) <= 2  # the dot lands in the crop centre
    # and the crop's mapping of the mouth landmarks is centred and upright
    m = np.linalg.inv(roi.crop_transform(landmarks))
    mouth = np.c_[landmarks[roi.MOUTH], np.ones(20)] @ m.T
    np.testing.assert_allclose(mouth[:, :2].mean(0), [48, 48], atol=1e-6)
    assert abs(mouth[6, 1] - mouth[0, 1]) < 3  # mouth corners 48 and 54 level after alignment


def test_shifted_video_gives_a_stable_roi(astronaut):
    from skimage.registration import phase_cross_correlation

    shifts = [(0, 0), (3, -2), (-4, 3), (2, 4), (-3, -4), (5, 1)]  # (dy, dx) of the camera window
    frames = np.stack([np.ascontiguousarray(astronaut[20 + dy : 276 + dy, 100 + dx : 356 + dx]) for dy, dx in shifts])
    landmarker = roi.FaceLandmarker("dlib_cnn")
    result = roi.extract_mouth_roi(frames, landmarker, detect_every=3)
    # frames 0 and 3 detected; the 7 px jump into frame 2 loses the tracker, which re-detects
    assert result.frames.shape == (6, 96, 96) and result.detections <= 3 and result.missing_face_frames == 0
    crops = result.frames.astype(float)
    fixed = roi.rgb_to_gray(frames)[:, 110:206, 70:166].astype(float)  # the same window, no compensation
    for t in range(1, len(shifts)):
        residual, _, _ = phase_cross_correlation(crops[0], crops[t], upsample_factor=10)
        raw_shift, _, _ = phase_cross_correlation(fixed[0], fixed[t], upsample_factor=10)
        assert np.hypot(*residual) < 2.5, (t, residual)  # compensated to within ~2 px (detector box jitter)
        np.testing.assert_allclose(raw_shift, shifts[t], atol=0.6)  # while the face itself moved
    compensated = np.abs(crops[1:] - crops[0]).mean()
    uncompensated = np.abs(fixed[1:] - fixed[0]).mean()
    assert compensated < 0.5 * uncompensated
    # landmarks followed the shifts (tracked frames included)
    moved = result.landmarks[:, roi.MOUTH].mean(1) - result.landmarks[0, roi.MOUTH].mean(0)
    np.testing.assert_allclose(moved, -np.array([(dx, dy) for dy, dx in shifts], float), atol=2.0)


def test_missing_faces_are_interpolated_or_rejected():
    lm = np.zeros((5, 68, 2))
    lm[:, :, 0] = np.arange(5)[:, None] * 10.0
    found = np.array([True, False, False, True, False])
    filled = roi.interpolate_missing(np.where(found[:, None, None], lm, np.nan), found)
    np.testing.assert_allclose(filled[:, 0, 0], [0, 10, 20, 30, 30])  # linear inside, held at the end

    class NoFace:
        def detect(self, rgb):
            return None

    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(roi.MissingFaceError, match=r"clip.mp4: no face in 4 of 4 frames"):
        roi.extract_mouth_roi(frames, NoFace(), source="clip.mp4")


def test_smoothing_keeps_translation_and_removes_jitter():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, size=(68, 2))
    t = np.arange(30)
    drift = np.stack([t * 2.0, t * 0.5], -1)[:, None, :]
    jitter = rng.normal(0, 1.0, size=(30, 68, 2))
    smoothed = roi.smooth_landmarks(base + drift + jitter, window=12)
    np.testing.assert_allclose(smoothed.mean(1), (base + drift + jitter).mean(1), atol=1e-9)  # centroid kept
    shape_err = lambda x: np.abs(x - x.mean(1, keepdims=True) - (base - base.mean(0))).mean()  # noqa: E731
    assert shape_err(smoothed) < 0.5 * shape_err(base + drift + jitter)


def test_center_method_and_bad_input():
    frames = np.random.default_rng(0).integers(0, 255, size=(3, 120, 100, 3), dtype=np.uint8)
    out = roi.extract_mouth_roi(frames, None).frames
    assert out.shape == (3, 96, 96)
    np.testing.assert_array_equal(out, roi.rgb_to_gray(frames)[:, 12:108, 2:98])
    with pytest.raises(ValueError, match=r"v.mp4: expected RGB uint8"):
        roi.extract_mouth_roi(frames[..., 0], None, source="v.mp4")
    with pytest.raises(ValueError, match="roi method"):
        roi.FaceLandmarker("opencv")


@pytest.mark.slow
def test_benchmark_roi_reports_frames_per_second():
    fps = roi.benchmark_roi(10)
    assert 0.1 < fps < 10_000
