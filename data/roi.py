"""Mouth region of interest (ROI) as AV-HuBERT's preparation makes it, with dlib only.

Pipeline per video (frames at 25 fps):

1. face detection with dlib's CNN (MMOD) face detector, upsample 0, on a copy of the
   frame downscaled to at most `detect_max_side` pixels (its cost grows with the pixel
   count), on every `detect_every`-th frame; every frame after a miss is re-detected
   until the face is found again;
2. 68-point landmarks (dlib's shape predictor) on every frame; between detections the
   last detector box is moved with the landmark centroid (tracking by landmarks: the
   shape predictor costs ~2 ms, a CNN detection ~0.3-1 s per 224x224 frame on one core);
3. frames whose detection failed get landmarks linearly interpolated from the nearest
   frames with a face (held at the ends); an utterance with more than
   `max_missing_face_frac` such frames is rejected (`MissingFaceError`);
4. landmarks are smoothed over +-window//2 frames and re-centred on the frame's own
   landmark centroid (removes jitter in shape/scale, keeps the translation);
5. a similarity transform maps the stable points (nose tip 33 and the eye corners
   36, 39, 42, 45) onto the mean face `MEAN_FACE_68` in a 256x256 reference frame;
6. the 96x96 grayscale crop centred on the transformed mouth landmarks 48-67 is
   sampled straight from the source frame (one bilinear warp per frame, edge pixels
   repeated outside the image).

The model files come from the `face_recognition_models` wheel (nothing is downloaded).

Mean face: AV-HuBERT aligns to `20words_mean_face.npy` (LRW), which is not shipped with any
package. `MEAN_FACE_68` is our own template, derived by `derive_mean_face` from the dlib
landmarks of the astronaut photograph in scikit-image (`skimage.data.astronaut()`): the
landmarks are rotated so the eye centres are level, scaled so the eye centres are
`EYE_DISTANCE` = 60 px apart, placed with their midpoint at (128, 96) in the 256x256 frame,
and averaged with their left-right mirror image (so the template is symmetric). The astronaut smiles broadly: her mouth is 62 px wide in the template, so a
neutral mouth spans roughly half of the 96x96 crop with cheeks and the chin top visible, as
in AV-HuBERT's ROIs (eye distance chosen for that; not fitted to LRW). tests/test_roi.py checks the constant against the derivation.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.media import MediaError

STD_SIZE = 256  # reference frame of the mean face
ROI_SIZE = 96
STABLE_POINTS = (33, 36, 39, 42, 45)  # nose tip, eye corners (as AV-HuBERT's align_mouth.py)
MOUTH = slice(48, 68)
TRACK_ITERATIONS = 5  # shape-predictor passes per tracked frame (each ~2 ms)
EYE_DISTANCE = 60.0
EYE_MIDPOINT = (128.0, 96.0)  # (x, y) in the 256x256 reference frame

# left-right mirror permutation of dlib's 68 points (jaw, brows, nose, eyes, outer/inner lips)
MIRROR_68 = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)


class MissingFaceError(MediaError):
    """Too many frames of a video without a detectable face."""


def model_files() -> dict[str, Path]:
    """Paths of the dlib model files shipped by the face_recognition_models wheel.

    Found without importing the package: its __init__ needs pkg_resources, which recent
    setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise RuntimeError("the face_recognition_models package is not installed (pip install face-recognition-models)")
    models = Path(spec.origin).parent / "models"
    files = {
        "cnn_face_detector": models / "mmod_human_face_detector.dat",
        "shape_predictor_68": models / "shape_predictor_68_face_landmarks.dat",
    }
    for name, path in files.items():
        if not path.is_file():
            raise RuntimeError(f"{path}: dlib model file for {name} missing from the face_recognition_models package")
    return files


class FaceLandmarker:
    """Face detection (dlib CNN or HOG) and 68-point landmarks on RGB uint8 frames."""

    def __init__(self, method: str = "dlib_cnn", detect_max_side: int = 360):
        import dlib

        if method not in ("dlib_cnn", "dlib_hog"):
            raise ValueError(f"roi method {method!r}: expected dlib_cnn or dlib_hog")
        files = model_files()
        self.method = method
        self.detect_max_side = int(detect_max_side)
        if method == "dlib_cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(files["cnn_face_detector"]))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(files["shape_predictor_68"]))
        self._dlib = dlib

    def detect(self, rgb: np.ndarray) -> tuple[float, float, float, float] | None:
        """Largest face as (left, top, right, bottom) in frame pixels, or None."""
        scale = 1.0
        image = rgb
        side = max(rgb.shape[:2])
        if side > self.detect_max_side:
            from skimage.transform import resize

            scale = self.detect_max_side / side
            shape = (round(rgb.shape[0] * scale), round(rgb.shape[1] * scale))
            image = (resize(rgb, shape, anti_aliasing=True, preserve_range=True)).astype(np.uint8)
        image = np.ascontiguousarray(image)
        if self.method == "dlib_cnn":
            rects = [d.rect for d in self._detector(image, 0)]
        else:  # HOG misses faces under ~80 px at upsample 0; it is cheap enough to upsample once
            rects = list(self._detector(image, 1))
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        return (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """68 (x, y) landmarks [68, 2] float for the face in `box`."""
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(np.ascontiguousarray(rgb), rect)
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)


def track_landmarks(frames_rgb: np.ndarray, landmarker: FaceLandmarker, detect_every: int = 5) -> tuple[np.ndarray, np.ndarray, int]:
    """Landmarks [T, 68, 2] (NaN where no face), found mask [T] bool, number of detector runs."""
    n = len(frames_rgb)
    out = np.full((n, 68, 2), np.nan)
    found = np.zeros(n, dtype=bool)
    key_box, key_centre, detections = None, None, 0
    for t in range(n):
        lm = None
        if key_box is not None and t % max(1, detect_every) != 0:
            lm = _track(frames_rgb[t], landmarker, key_box, key_centre, out[t - 1])
        if lm is None:  # detection frame, or tracking lost the face (it did not settle)
            detections += 1
            key_box = landmarker.detect(frames_rgb[t])
            if key_box is None:
                continue
            lm = landmarker.landmarks(frames_rgb[t], key_box)
            key_centre = lm.mean(axis=0)
        out[t], found[t] = lm, True
    return out, found, detections


def _track(rgb: np.ndarray, landmarker: FaceLandmarker, key_box, key_centre: np.ndarray, previous: np.ndarray) -> np.ndarray | None:
    """Landmarks with the last detector box moved along with the face, or None if they do not settle.

    Starts from the previous frame's landmark centroid and re-centres the box on this
    frame's own prediction until it moves < 0.5 px. The shape predictor needs a box within
    ~10% of the face: a box that is off makes it drift away (the centroid keeps moving),
    and the caller then runs the detector on this frame instead.
    """
    lm, shift = previous, None
    for _ in range(TRACK_ITERATIONS):
        new_shift = lm.mean(axis=0) - key_centre
        if shift is not None and np.abs(new_shift - shift).max() < 0.5:
            return lm
        shift = new_shift
        dx, dy = shift
        lm = landmarker.landmarks(rgb, (key_box[0] + dx, key_box[1] + dy, key_box[2] + dx, key_box[3] + dy))
    return None


def interpolate_missing(landmarks: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fill frames without a face linearly from the nearest frames with one (held at the ends)."""
    if not found.any():
        raise ValueError("no frame has a face; nothing to interpolate from")
    t = np.arange(len(landmarks))
    flat = landmarks.reshape(len(landmarks), -1).copy()
    for k in range(flat.shape[1]):
        flat[~found, k] = np.interp(t[~found], t[found], flat[found, k])
    return flat.reshape(landmarks.shape)


def smooth_landmarks(landmarks: np.ndarray, window: int = 12) -> np.ndarray:
    """Centred moving average over +-window//2 frames (shrinking at the ends), re-centred per frame."""
    n = len(landmarks)
    out = np.empty_like(landmarks)
    for t in range(n):
        half = min(window // 2, t, n - 1 - t)
        mean = landmarks[t - half : t + half + 1].mean(axis=0)
        out[t] = mean + (landmarks[t].mean(axis=0) - mean.mean(axis=0))
    return out


def similarity_to_mean_face(landmarks: np.ndarray, mean_face: np.ndarray | None = None) -> np.ndarray:
    """3x3 similarity (rotation, uniform scale, translation) taking frame (x, y) to the reference frame."""
    from skimage.transform import SimilarityTransform

    ref = MEAN_FACE_68 if mean_face is None else mean_face
    idx = list(STABLE_POINTS)
    tform = SimilarityTransform.from_estimate(landmarks[idx], ref[idx]) if hasattr(SimilarityTransform, "from_estimate") else None
    if tform is None:  # older scikit-image
        tform = SimilarityTransform()
        tform.estimate(landmarks[idx], ref[idx])
    return np.asarray(tform.params, dtype=np.float64)


def crop_transform(landmarks: np.ndarray, size: int = ROI_SIZE, mean_face: np.ndarray | None = None) -> np.ndarray:
    """3x3 map from crop pixel (x, y) to source frame (x, y): crop centred on the aligned mouth."""
    to_ref = similarity_to_mean_face(landmarks, mean_face)
    mouth = np.c_[landmarks[MOUTH], np.ones(20)] @ to_ref.T
    cx, cy = mouth[:, :2].mean(axis=0)
    crop_to_ref = np.array([[1.0, 0, cx - size / 2], [0, 1.0, cy - size / 2], [0, 0, 1.0]])
    return np.linalg.inv(to_ref) @ crop_to_ref


def cut_mouth(gray: np.ndarray, landmarks: np.ndarray, size: int = ROI_SIZE, mean_face: np.ndarray | None = None) -> np.ndarray:
    """Aligned size x size uint8 mouth crop from one grayscale frame and its (smoothed) landmarks."""
    from scipy.ndimage import map_coordinates

    m = crop_transform(landmarks, size, mean_face)
    # sample at pixel centres: crop pixel (u, v) covers [u, u+1), centre u + 0.5; source the same
    u, v = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    xs = m[0, 0] * u + m[0, 1] * v + m[0, 2] - 0.5
    ys = m[1, 0] * u + m[1, 1] * v + m[1, 2] - 0.5
    crop = map_coordinates(gray.astype(np.float32), [ys, xs], order=1, mode="nearest")
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, as cv2.COLOR_RGB2GRAY (what AV-HuBERT's loader uses)."""
    return np.rint(rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.uint8)


@dataclass
class RoiResult:
    frames: np.ndarray  # uint8 [T, size, size]
    missing_face_frames: int
    detections: int
    landmarks: np.ndarray  # smoothed [T, 68, 2] (source frame coordinates)


def extract_mouth_roi(
    frames_rgb: np.ndarray,
    landmarker: FaceLandmarker | None,
    *,
    size: int = ROI_SIZE,
    detect_every: int = 5,
    smooth_window: int = 12,
    max_missing_face_frac: float = 0.2,
    source: str = "video",
) -> RoiResult:
    """Mouth ROI video [T, size, size] uint8 from RGB frames [T, H, W, 3] uint8.

    `landmarker=None` is the `center` method: no detection, the centre size x size crop of
    the grayscale frame (resized if smaller), for video that is already mouth-centred.
    Raises MissingFaceError (naming `source`) if more than max_missing_face_frac of the
    frames have no face.
    """
    frames_rgb = np.asarray(frames_rgb)
    if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3 or frames_rgb.dtype != np.uint8 or len(frames_rgb) == 0:
        raise ValueError(f"{source}: expected RGB uint8 frames [T, H, W, 3] with T >= 1, got {frames_rgb.dtype} {frames_rgb.shape}")
    gray = rgb_to_gray(frames_rgb)
    if landmarker is None:
        return RoiResult(_center_crop(gray, size), 0, 0, np.zeros((len(gray), 0, 2)))
    landmarks, found, detections = track_landmarks(frames_rgb, landmarker, detect_every)
    missing = int((~found).sum())
    if missing > max_missing_face_frac * len(found) or not found.any():
        raise MissingFaceError(
            f"{source}: no face in {missing} of {len(found)} frames ({missing / len(found):.0%} > data.max_missing_face_frac={max_missing_face_frac:g})"
        )
    smoothed = smooth_landmarks(interpolate_missing(landmarks, found), smooth_window)
    crops = np.stack([cut_mouth(g, lm, size) for g, lm in zip(gray, smoothed)])
    return RoiResult(crops, missing, detections, smoothed)


def _center_crop(gray: np.ndarray, size: int) -> np.ndarray:
    t, h, w = gray.shape
    if min(h, w) < size:
        from skimage.transform import resize

        scale = size / min(h, w)
        gray = np.stack([resize(g, (max(size, round(h * scale)), max(size, round(w * scale))), preserve_range=True) for g in gray])
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        t, h, w = gray.shape
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(gray[:, top : top + size, left : left + size])


# ----------------------------------------------------------------------------- mean face
def normalise_face(landmarks: np.ndarray) -> np.ndarray:
    """Rotate/scale/translate 68 landmarks: eye centres level, EYE_DISTANCE apart, midpoint at EYE_MIDPOINT."""
    left, right = landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)
    d = right - left
    angle = np.arctan2(d[1], d[0])
    scale = EYE_DISTANCE / np.hypot(*d)
    c, s = np.cos(-angle) * scale, np.sin(-angle) * scale
    rot = np.array([[c, -s], [s, c]])
    return (landmarks - (left + right) / 2) @ rot.T + np.array(EYE_MIDPOINT)


def derive_mean_face(landmark_sets: list[np.ndarray]) -> np.ndarray:
    """Symmetric 68-point template [68, 2] in the 256x256 reference frame from one or more faces."""
    faces = [normalise_face(np.asarray(lm, dtype=np.float64)) for lm in landmark_sets]
    mean = np.mean(faces, axis=0)
    mirrored = mean[MIRROR_68].copy()
    mirrored[:, 0] = 2 * EYE_MIDPOINT[0] - mirrored[:, 0]
    return (mean + mirrored) / 2


# derive_mean_face([landmarks of skimage.data.astronaut(), dlib CNN box + 68-point predictor]),
# rounded to 0.01 px (regenerate: python -c "from data.roi import _derive_astronaut_mean_face as f; print(f())")
MEAN_FACE_68 = np.array(
    [
        [63.65, 101.95], [65.72, 117.17], [67.79, 132.39], [70.52, 148.34], [75.39, 164.26], [84.40, 177.41],
        [98.24, 189.22], [111.40, 198.23], [128.00, 201.76], [144.60, 198.23], [157.76, 189.22], [171.60, 177.41],
        [180.61, 164.26], [185.48, 148.34], [188.21, 132.39], [190.28, 117.17], [192.35, 101.95], [74.01, 86.72],
        [81.60, 78.48], [91.99, 76.37], [103.07, 77.06], [112.78, 81.89], [143.22, 81.89], [152.93, 77.06],
        [164.01, 76.37], [174.40, 78.48], [181.99, 86.72], [128.00, 95.01], [128.00, 106.12], [128.00, 118.55],
        [128.00, 129.59], [114.16, 135.88], [120.41, 137.92], [128.00, 140.71], [135.59, 137.92], [141.84, 135.88],
        [86.47, 95.77], [93.37, 91.63], [103.07, 90.94], [110.01, 98.53], [101.69, 99.22], [93.37, 99.91],
        [145.99, 98.53], [152.93, 90.94], [162.63, 91.63], [169.53, 95.77], [162.63, 99.91], [154.31, 99.22],
        [96.86, 147.65], [107.94, 146.96], [119.68, 146.93], [128.00, 149.00], [136.32, 146.93], [148.06, 146.96],
        [159.14, 147.65], [148.75, 162.19], [136.97, 168.44], [128.00, 169.86], [119.03, 168.44], [107.25, 162.19],
        [101.04, 149.73], [119.68, 152.45], [128.00, 153.21], [136.32, 152.45], [154.96, 149.73], [136.97, 161.46],
        [128.00, 161.50], [119.03, 161.46],
    ]
)


def astronaut_landmarks(method: str = "dlib_cnn") -> np.ndarray:
    """68 landmarks of the astronaut's face in skimage.data.astronaut() (full 512x512 image)."""
    from skimage.data import astronaut

    image = astronaut()
    # the face is in the top-left quarter; detect there (4x fewer pixels than the whole photo)
    window = np.ascontiguousarray(image[:256, 100:356])
    lm = FaceLandmarker(method, detect_max_side=512)
    box = lm.detect(window)
    if box is None:
        raise RuntimeError("no face found in skimage.data.astronaut()")
    return lm.landmarks(window, box) + np.array([100.0, 0.0])


def _derive_astronaut_mean_face() -> np.ndarray:
    return np.round(derive_mean_face([astronaut_landmarks()]), 2)


# ----------------------------------------------------------------------------- benchmark
def benchmark_roi(n_frames: int = 50, method: str = "dlib_cnn", detect_every: int = 5, side: int = 224) -> float:
    """ROI extraction speed in frames/second on this machine (one process).

    Input: a `side` x `side` clip cut around the astronaut's face (LRS3/VoxCeleb2 frames are
    224x224), shifted by a few pixels per frame so tracking has something to follow.
    Includes detection, landmarks, smoothing and cropping; excludes decoding and encoding.
    """
    from skimage.data import astronaut
    from skimage.transform import resize

    image = astronaut()
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n_frames):
        dy, dx = rng.integers(-4, 5, size=2)
        window = image[10 + dy : 250 + dy, 95 + dx : 335 + dx]
        frames.append(np.clip(np.rint(resize(window, (side, side), preserve_range=True)), 0, 255).astype(np.uint8))
    frames = np.stack(frames)
    landmarker = FaceLandmarker(method)
    t0 = time.perf_counter()
    extract_mouth_roi(frames, landmarker, detect_every=detect_every)
    return n_frames / (time.perf_counter() - t0)
