"""Mouth-ROI video: phoneme events -> visemes -> smooth lip trajectory -> rendered frames.

Three articulatory channels drive the mouth: opening (jaw/lip aperture), spreading
(lip corners pulled back) and rounding (protrusion: narrower, thicker lips). Each
espeak phoneme is mapped to a viseme target (diphthongs to a sequence of targets);
targets are placed at the centres of their phoneme intervals, linearly
interpolated on a 200 Hz grid and smoothed with a Gaussian whose width is the
speaker's coarticulation time, then sampled at the video frame centres.

Rendering is vectorised over all frames of an utterance with numpy; edges are
anti-aliased with a one-pixel linear ramp on the vertical distance to each contour.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from data.synthgrid.speakers import TEXTURE_STREAM, SpeakerParams

# (opening, spreading, rounding) targets
VISEMES: dict[str, tuple[float, float, float]] = {
    "sil": (0.02, 0.0, 0.0),
    "bilabial": (0.0, 0.0, 0.0),
    "labiodental": (0.08, 0.15, 0.0),
    "dental": (0.22, 0.2, 0.0),
    "alveolar": (0.18, 0.25, 0.0),
    "postalveolar": (0.22, 0.0, 0.55),
    "velar": (0.3, 0.1, 0.0),
    "r": (0.2, 0.0, 0.45),
    "w": (0.08, 0.0, 0.95),
    "j": (0.2, 0.45, 0.0),
    "open": (0.95, 0.15, 0.0),
    "mid": (0.6, 0.45, 0.0),
    "close_front": (0.28, 0.85, 0.0),
    "schwa": (0.4, 0.1, 0.0),
    "open_round": (0.7, 0.0, 0.55),
    "mid_round": (0.5, 0.0, 0.75),
    "close_round": (0.22, 0.0, 0.9),
}
OPEN_VISEMES = ("open", "mid", "open_round")

_CONSONANTS = {
    **dict.fromkeys(("p", "b", "m"), "bilabial"),
    **dict.fromkeys(("f", "v"), "labiodental"),
    **dict.fromkeys(("T", "D"), "dental"),
    **dict.fromkeys(("t", "d", "n", "l", "s", "z", "t#", "d#", "l/", "n-", "?"), "alveolar"),
    **dict.fromkeys(("S", "Z", "tS", "dZ"), "postalveolar"),
    **dict.fromkeys(("k", "g", "N", "h", "x"), "velar"),
    **dict.fromkeys(("r", "r-", "R"), "r"),
    "w": "w",
    "j": "j",
}
_VOWEL_BY_FIRST_CHAR = {
    **dict.fromkeys("aAV", "open"),
    **dict.fromkeys("Ee", "mid"),
    **dict.fromkeys("iI", "close_front"),
    **dict.fromkeys("@3", "schwa"),
    **dict.fromkeys("OQ0", "open_round"),
    "o": "mid_round",
    **dict.fromkeys("uU", "close_round"),
}
# diphthongs move through their elements within the phoneme's interval
_DIPHTHONGS = {
    "aI": "aI", "aU": "aU", "eI": "eI", "oU": "oU", "OI": "OI", "e@": "e@", "i@": "i@",
    "U@": "U@", "A@": "A@", "O@": "O@", "o@": "o@", "aI@": "aI@", "aU@": "aU@", "i@3": "i@",
}  # fmt: skip


def phoneme_visemes(phoneme: str) -> list[str]:
    """Viseme names for one espeak phoneme mnemonic (stress marks already stripped)."""
    ph = phoneme.strip()
    if not ph or ph.startswith("_"):
        return ["sil"]
    if ph in _CONSONANTS:
        return [_CONSONANTS[ph]]
    if ph in _DIPHTHONGS:
        return [_VOWEL_BY_FIRST_CHAR.get(c, "schwa") for c in _DIPHTHONGS[ph]]
    if ph[0] in _VOWEL_BY_FIRST_CHAR:
        return [_VOWEL_BY_FIRST_CHAR[ph[0]]]
    if ph[0] in _CONSONANTS:
        return [_CONSONANTS[ph[0]]]
    return ["schwa"]


def mouth_trajectory(
    phonemes: list[tuple[float, str]], duration: float, n_frames: int, fps: int, coartic_ms: float
) -> np.ndarray:
    """[n_frames, 3] (opening, spreading, rounding) at frame centres t = (k + 0.5) / fps."""
    times, targets = [0.0], [VISEMES["sil"]]
    for i, (start, name) in enumerate(phonemes):
        end = phonemes[i + 1][0] if i + 1 < len(phonemes) else min(start + 0.1, duration)
        end = max(end, start + 1e-3)
        parts = phoneme_visemes(name)
        for k, vis in enumerate(parts):
            times.append(start + (k + 0.5) / len(parts) * (end - start))
            targets.append(VISEMES[vis])
    times.append(duration)
    targets.append(VISEMES["sil"])
    order = np.argsort(np.asarray(times), kind="stable")
    t = np.asarray(times)[order]
    v = np.asarray(targets, dtype=np.float64)[order]
    step = 0.005
    grid = np.arange(0.0, duration + step, step)
    dense = np.stack([np.interp(grid, t, v[:, c]) for c in range(3)], axis=1)
    dense = gaussian_filter1d(dense, sigma=coartic_ms / 1000.0 / step, axis=0, mode="nearest")
    frame_t = (np.arange(n_frames) + 0.5) / fps
    return np.stack([np.interp(frame_t, grid, dense[:, c]) for c in range(3)], axis=1)


@lru_cache(maxsize=64)
def face_maps(spk: SpeakerParams, corpus_seed: int, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-speaker maps in face coordinates, [size, size] float32 each, centred on the mouth:
    (texture: pores + blotches, unit variance; skin: shade, lighting gradient, texture, nose shadow).
    They move with the head: frames sample them at head-motion-shifted positions."""
    rng = np.random.default_rng(np.random.SeedSequence([corpus_seed, TEXTURE_STREAM, spk.index]))
    fine = gaussian_filter(rng.standard_normal((size, size)), 0.8 * scale)
    coarse = gaussian_filter(rng.standard_normal((size, size)), 5.0 * scale)
    tex = fine / fine.std() + 1.5 * coarse / coarse.std()
    tex = (tex / tex.std()).astype(np.float32)
    y, x = (np.mgrid[0:size, 0:size] + 0.5 - size / 2) / scale  # 96-pixel units, mouth at 0
    la = spk.light_angle
    skin = spk.skin_shade * (1 + spk.light_amp * (x * np.cos(la) + y * np.sin(la)) / 48.0)
    skin = skin + spk.texture_contrast * tex - 18 * np.exp(-(((y + 40) / 7.0) ** 2)) * np.exp(-((x / 18.0) ** 2))
    return tex, skin.astype(np.float32)


def _ramp(d: np.ndarray) -> np.ndarray:
    """Coverage of a pixel whose centre is at signed distance d (pixels) inside an edge."""
    return np.clip(d + 0.5, 0.0, 1.0)


def render_mouth(
    spk: SpeakerParams, traj: np.ndarray, rng: np.random.Generator, corpus_seed: int, roi: int = 96, fps: int = 25
) -> np.ndarray:
    """uint8 [T, roi, roi] grayscale mouth-ROI frames for a trajectory [T, 3].

    Head motion is a slow translation plus a small roll, the roll applied as a
    vertical shear (exact to first order for these angles), which keeps every
    function of the horizontal coordinate separable and cheap: [T, 1, roi].
    """
    f32 = np.float32
    T = traj.shape[0]
    s = roi / 96.0  # geometry parameters are in 96x96 pixels
    margin = int(np.ceil(12 * s))
    tex_map, skin_map = face_maps(spk, corpus_seed, roi + 2 * margin, s)
    t = ((np.arange(T) + 0.5) / fps)[:, None, None]
    # slow head motion: sinusoids with utterance-specific frequencies and phases
    ph = rng.uniform(0, 2 * np.pi, size=3)
    fr = rng.uniform(0.15, 0.6, size=3)
    a = spk.head_motion * s
    cx = (roi / 2 + a * np.sin(2 * np.pi * fr[0] * t + ph[0])).astype(f32)
    cy = (roi / 2 + spk.mouth_y * s + 0.6 * a * np.sin(2 * np.pi * fr[1] * t + ph[1])).astype(f32)
    roll = (0.012 * spk.head_motion * np.sin(2 * np.pi * fr[2] * t + ph[2])).astype(f32)
    o, sp, rd = (traj[:, c][:, None, None].astype(f32) for c in range(3))
    # skin everywhere (the roll is left out here: invisible on a smooth texture)
    grid = np.arange(roi, dtype=f32) + f32(0.5)
    lim = skin_map.shape[0] - 1
    iy = np.clip(np.rint(grid[None, :, None] - cy + (roi / 2 + margin)), 0, lim).astype(np.intp)  # [T, R, 1]
    ix = np.clip(np.rint(grid[None, None, :] - cx + (roi / 2 + margin)), 0, lim).astype(np.intp)  # [T, 1, R]
    img = skin_map[iy, ix]
    # the mouth is drawn only inside a box that holds it in every frame
    top = 0.8 * spk.jaw + 1.8 * spk.lip_upper + 3
    bottom = 1.2 * spk.jaw + 1.4 * spk.lip_lower + 22  # includes the shadow under the lower lip
    half_w = 1.25 * spk.lip_width + 3
    r0, r1 = (int(np.clip(v, 0, roi)) for v in (np.floor(cy.min() - top * s), np.ceil(cy.max() + bottom * s)))
    c0, c1 = (int(np.clip(v, 0, roi)) for v in (np.floor(cx.min() - half_w * s), np.ceil(cx.max() + half_w * s)))
    x = (grid[None, None, c0:c1] - cx) / f32(s)  # [T, 1, C], 96-pixel units
    y = (grid[None, r0:r1, None] - cy) / f32(s) - roll * x  # [T, H, C]
    iy, ix = iy[:, r0:r1], ix[:, :, c0:c1]
    skin = img[:, r0:r1, c0:c1]

    W = spk.lip_width * (1 + 0.18 * spk.spread_gain * sp - 0.25 * spk.round_gain * rd)
    h = spk.jaw * o * (1 - 0.15 * rd)
    Wi = W * (0.8 - 0.25 * spk.round_gain * rd)
    tu = spk.lip_upper * (1 + 0.35 * rd)
    tl = spk.lip_lower * (1 + 0.35 * rd)
    # horizontal profiles [T, 1, R]
    ax = np.abs(x)
    prof = np.sqrt(np.clip(1 - (x / W) ** 2, 0, None))
    bow = 1 - spk.bow * np.exp(-((x / (0.2 * W)) ** 2)) + 0.3 * spk.bow * np.exp(-(((ax - 0.3 * W) / (0.15 * W)) ** 2))
    outer_top = -(0.8 * h + tu * bow) * prof
    outer_bot = (1.2 * h + tl) * prof
    inner_prof = np.sqrt(np.clip(1 - (x / Wi) ** 2, 0, None))
    in_top, in_bot = -0.8 * h * inner_prof, 1.2 * h * inner_prof
    in_width = _ramp((Wi - ax) * s)
    chin_x = np.clip(1 - (x / (1.1 * W)) ** 2, 0, None)
    teeth_h = np.minimum(3.5, 0.45 * h)
    upper_teeth_x = in_width * (ax < 0.75 * Wi)
    lower_teeth_x = in_width * (ax < 0.6 * Wi)
    tongue_x = 1 - (x / (0.55 * Wi)) ** 2
    tongue_on = np.clip((o - 0.25) * 4, 0, 1)

    lips_cov = _ramp((y - outer_top) * s) * _ramp((outer_bot - y) * s) * _ramp((W - ax) * s)
    inner_cov = _ramp((y - in_top) * s) * _ramp((in_bot - y) * s) * in_width

    texture = tex_map[iy, ix]
    skin = skin - 22 * np.exp(-(((y - outer_bot - 6) * f32(0.25)) ** 2)) * chin_x
    # lips: darker upper lip, highlight on the lower lip
    lips = spk.lip_shade + 0.5 * spk.texture_contrast * texture - 12 * (y < 0)
    lips += 30 * np.exp(-(((y - (1.2 * h + 0.45 * tl) * prof) / (0.3 * tl)) ** 2)) * prof
    # inside the mouth: dark cavity, tongue, upper and lower teeth
    inner = 22 + 6 * texture
    tongue = _ramp((tongue_x - ((y - 0.75 * h) / (0.5 * h + 0.5)) ** 2) * 4) * tongue_on
    inner += (95 - inner) * tongue
    upper_teeth = _ramp((in_top + teeth_h - y) * s) * upper_teeth_x
    inner += (spk.teeth_shade - inner) * upper_teeth
    lower_teeth = _ramp((y - (in_bot - 0.6 * teeth_h)) * s) * lower_teeth_x
    inner += (0.8 * spk.teeth_shade - inner) * lower_teeth

    mouth = skin + (lips - skin) * lips_cov
    mouth += (inner - mouth) * inner_cov
    img[:, r0:r1, c0:c1] = mouth
    img *= f32(rng.uniform(0.97, 1.03))
    img += f32(1.2) * rng.standard_normal(size=img.shape, dtype=f32)  # sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
