"""Synthetic speakers: voice and appearance parameters, and speaker-disjoint splits.

Every parameter is drawn from a generator seeded by (corpus seed, speaker index), so
speaker k is the same person whatever the corpus size. Identity is spread over many
parameters (voice variant, F0, range, rate, vocal-tract length, tilt, an EQ
resonance, breathiness; lip width/thickness, shading, skin texture, head motion,
articulation) so no single scalar separates speakers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from data.manifest import SPLITS

MALE_VOICES = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "croak", "klatt", "klatt2", "klatt3", "adam", "edward", "max", "quincy")
FEMALE_VOICES = ("f1", "f2", "f3", "f4", "f5", "steph")
_SPEAKER_STREAM = 1  # seed-sequence tags keep speaker, utterance and texture streams independent
UTTERANCE_STREAM = 2
TEXTURE_STREAM = 3


@dataclass(frozen=True)
class SpeakerParams:
    id: str
    index: int
    gender: str  # "f" | "m" (voice family; also shifts vtl and pitch)
    # voice
    voice: str  # espeak voice, e.g. en+m3
    pitch: int  # espeak pitch 0..99 (relative to the variant's base)
    pitch_range: int  # espeak range 0..99
    rate: int  # words per minute before the vtl tempo change
    vtl: float  # vocal-tract-length factor (>1 = shorter tract, higher formants)
    tilt: float  # spectral tilt coefficient
    eq_freq: float  # Hz, a fixed resonance
    eq_gain_db: float
    breath: float
    # face / mouth (pixels at 96x96; scaled with data.roi_size)
    lip_width: float  # outer half-width of the mouth
    lip_upper: float  # upper-lip thickness
    lip_lower: float  # lower-lip thickness
    jaw: float  # inner half-height at full opening
    bow: float  # cupid's-bow depth 0..1
    mouth_y: float  # vertical offset of the mouth centre
    lip_shade: float  # grey level of the lips
    skin_shade: float
    light_angle: float  # radians, direction of the lighting gradient
    light_amp: float
    texture_contrast: float
    teeth_shade: float
    round_gain: float
    spread_gain: float
    coartic_ms: float  # smoothing of the viseme trajectory (articulation speed)
    head_motion: float  # pixels of slow head translation

    @property
    def seed_key(self) -> tuple[int, int]:
        return (_SPEAKER_STREAM, self.index)


def speaker_id(index: int) -> str:
    return f"s{index + 1:02d}"


def make_speaker(corpus_seed: int, index: int) -> SpeakerParams:
    rng = np.random.default_rng(np.random.SeedSequence([corpus_seed, _SPEAKER_STREAM, index]))
    female = rng.random() < 0.45
    voices = FEMALE_VOICES if female else MALE_VOICES
    u = rng.uniform
    return SpeakerParams(
        id=speaker_id(index),
        index=index,
        gender="f" if female else "m",
        voice="en+" + voices[int(rng.integers(len(voices)))],
        pitch=int(rng.integers(40, 80) if female else rng.integers(20, 65)),
        pitch_range=int(rng.integers(20, 90)),
        rate=int(rng.integers(145, 200)),
        vtl=round(float(u(1.02, 1.14) if female else u(0.88, 1.04)), 4),
        tilt=round(float(u(-0.5, 0.6)), 3),
        eq_freq=round(float(np.exp(u(np.log(600), np.log(4000)))), 1),
        eq_gain_db=round(float(u(-6, 6)), 2),
        breath=round(float(u(0.0, 0.6)), 3),
        lip_width=round(float(u(20, 30)), 2),
        lip_upper=round(float(u(3.0, 7.0)), 2),
        lip_lower=round(float(u(4.0, 9.0)), 2),
        jaw=round(float(u(9, 16)), 2),
        bow=round(float(u(0.0, 0.45)), 3),
        mouth_y=round(float(u(-6, 6)), 2),
        lip_shade=round(float(u(50, 150)), 1),
        skin_shade=round(float(u(100, 200)), 1),
        light_angle=round(float(u(0, 2 * np.pi)), 3),
        light_amp=round(float(u(0.0, 0.35)), 3),
        texture_contrast=round(float(u(3, 16)), 2),
        teeth_shade=round(float(u(170, 235)), 1),
        round_gain=round(float(u(0.6, 1.2)), 3),
        spread_gain=round(float(u(0.6, 1.3)), 3),
        coartic_ms=round(float(u(14, 30)), 2),
        head_motion=round(float(u(0.5, 3.0)), 2),
    )


def make_speakers(corpus_seed: int, num_speakers: int) -> list[SpeakerParams]:
    return [make_speaker(corpus_seed, i) for i in range(num_speakers)]


def speaker_table_header() -> list[str]:
    return [f.name for f in fields(SpeakerParams) if f.name not in ("id", "index")]


def speaker_table_row(spk: SpeakerParams) -> list[str]:
    d = asdict(spk)
    return [str(d[k]) for k in speaker_table_header()]


# ----------------------------------------------------------------------------- splits
MIN_SPEAKERS = {"public": 1, "train": 1, "valid": 1, "test": 1, "attacker_train": 1, "attacker_trials": 2}


def split_sizes(num_speakers: int, requested: dict[str, int]) -> tuple[dict[str, int], bool]:
    """Speakers per split for a corpus of `num_speakers`.

    If `num_speakers` equals the requested total, the requested sizes are used.
    Otherwise they are scaled proportionally (largest remainder), with at least
    1 speaker per split and 2 for attacker_trials (non-target trials need two).
    With fewer than 7 speakers there is no room for a separate public split: it
    then gets 0 speakers of its own and *shares the train speakers* (second
    return value True), so tiny smoke-test corpora (6 speakers) still have every
    split. Fewer than 6 speakers is an error.
    """
    missing = [s for s in SPLITS if s not in requested]
    if missing:
        raise ValueError(f"data.splits is missing {missing}; expected speaker counts for {list(SPLITS)}")
    for s in SPLITS:
        if requested[s] < 0:
            raise ValueError(f"data.splits.{s}={requested[s]}: speaker counts must be >= 0")
    need = sum(MIN_SPEAKERS[s] for s in SPLITS if s != "public")
    if num_speakers < need:
        raise ValueError(
            f"data.num_speakers={num_speakers}: SynthGRID needs at least {need} speakers "
            "(1 each for train/valid/test/attacker_train, 2 for attacker_trials)"
        )
    total = sum(requested[s] for s in SPLITS)
    if num_speakers == total and all(requested[s] >= MIN_SPEAKERS[s] for s in SPLITS):
        return {s: int(requested[s]) for s in SPLITS}, False
    share_public = num_speakers < need + MIN_SPEAKERS["public"]
    names = [s for s in SPLITS if not (share_public and s == "public")]
    weights = {s: max(requested[s], 0) for s in names}
    wsum = sum(weights.values()) or len(names)
    raw = {s: num_speakers * (weights[s] if sum(weights.values()) else 1) / wsum for s in names}
    sizes = {s: max(MIN_SPEAKERS[s], int(np.floor(raw[s]))) for s in names}
    # deterministic largest-remainder correction; ties broken by split order
    while sum(sizes.values()) > num_speakers:
        cands = [s for s in names if sizes[s] > MIN_SPEAKERS[s]]
        sizes[max(cands, key=lambda s: (sizes[s] - raw[s], -names.index(s)))] -= 1
    while sum(sizes.values()) < num_speakers:
        sizes[max(names, key=lambda s: (raw[s] - sizes[s], -names.index(s)))] += 1
    if share_public:
        sizes = {"public": 0, **sizes}
    return {s: sizes[s] for s in SPLITS}, share_public


def check_extra_speakers(num_speakers: int, extra_train: int = 0, extra_test: int = 0, extra_train_after_test: int = 0) -> None:
    """The appended blocks of :func:`assign_splits` leave at least one speaker for the ordinary splits."""
    if not 0 <= extra_train < num_speakers:
        raise ValueError(f"data.extra_train_speakers={extra_train}: expected 0 <= value < data.num_speakers={num_speakers}")
    if not 0 <= extra_test < num_speakers - extra_train:
        raise ValueError(f"data.extra_test_speakers={extra_test}: expected 0 <= value < data.num_speakers - "
                         f"data.extra_train_speakers = {num_speakers - extra_train}")
    if not 0 <= extra_train_after_test < num_speakers - extra_train - extra_test:
        raise ValueError(f"data.extra_train_speakers_after_test={extra_train_after_test}: expected 0 <= value < "
                         f"data.num_speakers - data.extra_train_speakers - data.extra_test_speakers = "
                         f"{num_speakers - extra_train - extra_test}")


def assign_splits(
    speakers: list[SpeakerParams], requested: dict[str, int], extra_train: int = 0, extra_test: int = 0,
    extra_train_after_test: int = 0,
) -> tuple[dict[str, list[str]], bool]:
    """Contiguous blocks of speakers: train, valid, test, attacker_train, attacker_trials, then public last.

    The public split (self-supervised pretraining and the shipped starting checkpoint) is the
    last block, so it can grow (more public speakers, `data.num_speakers` up by as many) without
    moving any speaker of the other splits: with the defaults train is s01..s12, ..., public s39..s78.
    `extra_train` more train speakers come after the public block, then `extra_test` more test
    speakers (the last `extra_test` of `speakers`), so that a larger training population or a larger
    test set keeps every other speaker where the smaller corpus has it: the same public speakers (the
    shipped start never saw a training speaker), the same training speakers and the same test speakers.
    `extra_train_after_test` more train speakers come after the extra test speakers (the last of `speakers`),
    so that a larger population keeps the test set of a corpus with extra test speakers too.
    """
    check_extra_speakers(len(speakers), extra_train, extra_test, extra_train_after_test)
    late = len(speakers) - extra_train_after_test  # the extra test block ends here
    blocks = speakers[: late - extra_train - extra_test]
    sizes, share_public = split_sizes(len(blocks), requested)
    out, start = {}, 0
    for s in [*[s for s in SPLITS if s != "public"], "public"]:
        out[s] = [spk.id for spk in blocks[start : start + sizes[s]]]
        start += sizes[s]
    out["train"] += [spk.id for spk in speakers[len(blocks) : late - extra_test]]
    out["test"] += [spk.id for spk in speakers[late - extra_test : late]]
    out["train"] += [spk.id for spk in speakers[late:]]
    if share_public:
        out["public"] = list(out["train"])
    return {s: out[s] for s in SPLITS}, share_public
