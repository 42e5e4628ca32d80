"""GRID (Cooke et al. 2006): 34 speakers x 1000 sentences "BIN BLUE AT F TWO NOW".

Layout under data.raw_dir (both spellings of the published archives are accepted):

    s1/bbaf2n.mpg                    or  s1/video/mpg_6000/bbaf2n.mpg
    s1/align/bbaf2n.align            or  align/s1/bbaf2n.align, alignments/s1/bbaf2n.align,
                                         s1/bbaf2n.align
    (optional) s1/audio/bbaf2n.wav   the 50 kHz audio release; used only if the .mpg has no audio

`.align` lines are `start end word` with times in units of 1/25000 s (the 25 kHz audio
sample clock of the original recordings: 1000 units = one 25 fps video frame); the
transcript is the words without `sil` and `sp`, upper-cased. s21 has no video in the
release.

Splits (`data.split_speakers`, conf/data/grid.yaml): LipNet's unseen-speaker split puts
s1, s2, s20, s22 in test; we hold out s23, s24 as valid, s25-s29 as attacker_train and
s30-s34 as attacker_trials; train = every other speaker; public = train (GRID is too
small for a separate pre-training set; marked in meta.json).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from data.corpora.common import (
    CorpusError, Problems, RoiSettings, SourceItem, balanced_trials, check_raw_dir, limit,
    normalise_transcript, prepare_media, write_corpus,
)  # fmt: skip

log = logging.getLogger(__name__)
ALIGN_UNITS_PER_SECOND = 25000
SILENCE = ("sil", "sp")
DEFAULT_SPLIT_SPEAKERS = {
    "test": ["s1", "s2", "s20", "s22"],
    "valid": ["s23", "s24"],
    "attacker_train": ["s25", "s26", "s27", "s28", "s29"],
    "attacker_trials": ["s30", "s31", "s32", "s33", "s34"],
}


def read_align(path: Path) -> tuple[str, float]:
    """(transcript, end time in seconds) from a GRID .align file; CorpusError names the file and line."""
    words, end = [], 0.0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 3 or not cols[0].isdigit() or not cols[1].isdigit():
            raise CorpusError(f"{path}:{i}: expected 'start end word' with integer times (1/25000 s), got {line!r}")
        end = max(end, int(cols[1]) / ALIGN_UNITS_PER_SECOND)
        if cols[2].lower() not in SILENCE:
            words.append(cols[2])
    return normalise_transcript(" ".join(words), str(path)), end


def _align_path(raw: Path, speaker: str, uid: str) -> Path | None:
    for cand in (raw / speaker / "align" / f"{uid}.align", raw / "align" / speaker / f"{uid}.align",
                 raw / "alignments" / speaker / f"{uid}.align", raw / speaker / f"{uid}.align"):  # fmt: skip
        if cand.is_file():
            return cand
    return None


def scan(raw: Path, problems: Problems) -> list[SourceItem]:
    videos = sorted(set(raw.glob("s*/*.mpg")) | set(raw.glob("s*/video/mpg_6000/*.mpg")))
    if not videos:
        raise CorpusError(f"{raw}: no GRID videos found (expected s<N>/*.mpg or s<N>/video/mpg_6000/*.mpg)")
    items = []
    for video in videos:
        speaker = next(p for p in video.relative_to(raw).parts if re.fullmatch(r"s\d+", p))
        uid = video.stem
        align = _align_path(raw, speaker, uid)
        if align is None:
            problems.report("missing_transcript", f"{video}: no alignment {speaker}/align/{uid}.align (or align/{speaker}/{uid}.align) under {raw}")
            continue
        try:
            text, _ = read_align(align)
        except CorpusError as e:
            problems.report("bad_transcript", str(e))
            continue
        wav = raw / speaker / "audio" / f"{uid}.wav"
        items.append(SourceItem(f"{speaker}/{uid}", speaker, str(video.resolve()), text, str(wav.resolve()) if wav.is_file() and not _has_audio(video) else None))
    return items


def _has_audio(video: Path) -> bool:
    import av

    try:
        with av.open(str(video)) as c:
            return bool(c.streams.audio)
    except Exception:  # noqa: BLE001 - an unreadable video fails later with a named error
        return True


def assign_splits(items: list[SourceItem], split_speakers: dict[str, list[str]]) -> dict[str, list[SourceItem]]:
    owner: dict[str, str] = {}
    for split, speakers in split_speakers.items():
        if split in ("train", "public"):
            raise ValueError(f"data.split_speakers.{split}: train (and public) are every speaker not listed; list only test/valid/attacker splits")
        for s in speakers:
            if s in owner:
                raise ValueError(f"data.split_speakers: speaker {s} is in both {owner[s]} and {split}")
            owner[s] = split
    out: dict[str, list[SourceItem]] = {"train": [], "valid": [], "test": [], "attacker_train": [], "attacker_trials": []}
    for it in items:
        out.setdefault(owner.get(it.speaker, "train"), []).append(it)
    out["public"] = list(out["train"])
    return out


def prepare(cfg: Any) -> dict[str, Any]:
    data = cfg.data
    raw = check_raw_dir(data, "grid")
    out_dir = Path(data.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    roi = RoiSettings.from_config(data)
    problems = Problems("grid", str(data.on_error))
    items = limit(scan(raw, problems), data.get("max_utterances"))
    split_speakers = {k: list(v) for k, v in (data.get("split_speakers") or {}).items()} or DEFAULT_SPLIT_SPEAKERS
    splits = assign_splits(items, split_speakers)
    prepared = prepare_media(items, out_dir, roi, problems, int(data.num_workers), "grid")
    by_speaker: dict[str, list[str]] = {}
    for it in splits["attacker_trials"]:
        if it.id in prepared.lengths:
            by_speaker.setdefault(it.speaker, []).append(it.id)
    trials = balanced_trials(by_speaker, int(data.trials_per_speaker), int(data.seed)) if len(by_speaker) >= 2 else None
    if trials is None:
        log.warning("grid: fewer than 2 attacker_trials speakers with prepared utterances; no trials.txt written")
    meta = {"raw_dir": str(raw), "split_speakers": split_speakers, "public_shares_train_speakers": True,
            "align_time_unit": "1/25000 s"}  # fmt: skip
    return write_corpus(out_dir, "grid", splits, prepared, roi, problems, trials, meta)
