"""Shared machinery for preparing the real corpora into SynthGRID's manifest format.

A corpus module scans `data.raw_dir` into `SourceItem`s (one per source video, with its
speaker and transcript) and assigns them to splits; `prepare_corpus` then

* decodes each video with PyAV: RGB frames resampled to 25 fps by timestamp (logged and
  counted when the source is not 25 fps) and the audio stream resampled to 16 kHz mono
  (`av.AudioResampler`);
* makes the 96x96 mouth ROI (data/roi.py) and writes `audio/<id>.wav` and `video/<id>.mp4`
  (each via a temporary file + rename, audio padded/trimmed to 640 samples per video frame);
* in worker processes (`data.num_workers`, spawned) with progress (a tqdm bar in a terminal, log lines with ETA in a log file);
* keeps outputs that already exist and are valid (resume), and rewrites the manifests,
  `speakers.tsv`, `trials.txt` and `meta.json` atomically at the end.

Bad input (unreadable/truncated video, no audio stream, missing or malformed transcript,
trial naming a missing file) raises `CorpusError` naming the file, or with
`data.on_error=skip` is counted per reason (common.skips.SkipCounter), reported at the end
and in the returned metrics (which `data.prepare.prepare` writes to `<data.dir>/prepare/metrics.json`).
Utterances with too many frames without a face are always skipped and counted
(`missing_face`), as AV-HuBERT's preparation drops them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from data.media import MediaError, check_existing, write_video, write_wav
from data.manifest import SPLITS, Trial, Utterance, write_split, write_trials

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
NO_TRANSCRIPT = "<none>"  # VoxCeleb2 has no transcripts; '<' is outside every tokenizer, so ASR use fails loudly
_ALLOWED_TEXT = re.compile(r"^[A-Z' ]+$")
MAX_AV_DURATION_GAP = 0.5  # seconds; larger audio/video duration differences mean a truncated stream


class CorpusError(ValueError):
    """A corpus file that is missing or not in the corpus's published format."""


@dataclass(frozen=True)
class SourceItem:
    id: str  # our utterance id, e.g. "trainval/00j9bKdiOjk/50001" (no blanks)
    speaker: str
    video: str  # source video (absolute path)
    text: str  # normalised transcript (upper-case words), NO_TRANSCRIPT if the corpus has none
    audio: str | None = None  # separate audio file (GRID releases with 50 kHz wavs); None = the video's audio stream


@dataclass(frozen=True)
class RoiSettings:
    method: str = "dlib_cnn"  # dlib_cnn | dlib_hog | center
    size: int = 96
    detect_every: int = 5
    detect_max_side: int = 360
    smooth_window: int = 12
    max_missing_face_frac: float = 0.2

    @classmethod
    def from_config(cls, data_cfg: Any) -> "RoiSettings":
        s = cls(
            method=str(data_cfg.roi_method),
            size=int(data_cfg.roi_size),
            detect_every=int(data_cfg.roi_detect_every),
            detect_max_side=int(data_cfg.roi_detect_max_side),
            smooth_window=int(data_cfg.roi_smooth_window),
            max_missing_face_frac=float(data_cfg.max_missing_face_frac),
        )
        if s.method not in ("dlib_cnn", "dlib_hog", "center"):
            raise ValueError(f"data.roi_method={s.method!r}: expected dlib_cnn, dlib_hog or center")
        if s.detect_every < 1 or s.size < 8 or not 0.0 <= s.max_missing_face_frac <= 1.0:
            raise ValueError(f"invalid ROI settings {s}: roi_detect_every >= 1, roi_size >= 8, 0 <= max_missing_face_frac <= 1")
        return s

    def fingerprint(self) -> dict[str, Any]:
        # what changes the bytes of the ROI videos (max_missing_face_frac only filters)
        return {"method": self.method, "size": self.size, "detect_every": self.detect_every,
                "detect_max_side": self.detect_max_side, "smooth_window": self.smooth_window}  # fmt: skip


# ----------------------------------------------------------------------------- text
def normalise_transcript(text: str, source: str) -> str:
    """Upper-case words separated by single spaces; only A-Z, apostrophe and space allowed."""
    words = " ".join(text.upper().split())
    if not words:
        raise CorpusError(f"{source}: empty transcript")
    if not _ALLOWED_TEXT.match(words):
        bad = sorted({c for c in words if not re.match(r"[A-Z' ]", c)})
        raise CorpusError(f"{source}: transcript {words!r} has characters {bad} outside A-Z, apostrophe and space (the tokenizer's alphabet)")
    return words


# ----------------------------------------------------------------------------- media
@dataclass
class DecodedMedia:
    frames: np.ndarray  # uint8 [T, H, W, 3] at 25 fps
    audio: np.ndarray  # float32 [S] at 16 kHz
    source_fps: float
    resampled: bool  # frames were re-timed to 25 fps


def _frames_at_25fps(frames: list[np.ndarray], times: list[float], fps: float, path: str) -> tuple[np.ndarray, bool]:
    if abs(fps - FPS) < 1e-3:
        return np.stack(frames), False
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, frames = t[order], [frames[i] for i in order]
    duration = t[-1] - t[0] + 1.0 / fps
    n_out = max(1, int(round(duration * FPS)))
    # output frame k shows what was on screen at t0 + k/25: the last source frame starting by then
    idx = np.clip(np.searchsorted(t, t[0] + np.arange(n_out) / FPS + 1e-6, side="right") - 1, 0, len(t) - 1)
    log.info("%s: %.3g fps video resampled to %d fps (%d -> %d frames)", path, fps, FPS, len(t), n_out)
    return np.stack([frames[i] for i in idx]), True


def _resample_audio(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return samples.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(rate), SAMPLE_RATE)
    return resample_poly(samples, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


def decode_media(video_path: str | Path, audio_path: str | Path | None = None) -> DecodedMedia:
    """RGB frames at 25 fps and 16 kHz mono audio from one video file (or a separate audio file)."""
    import av

    path = str(video_path)
    if not Path(path).is_file():
        raise MediaError(f"{path}: video file not found")
    frames: list[np.ndarray] = []
    times: list[float] = []
    chunks: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            vstream = container.streams.video[0]
            fps = float(vstream.average_rate or vstream.guessed_rate or 0) or None
            streams = [vstream]
            if audio_path is None:
                if not container.streams.audio:
                    raise MediaError(f"{path}: no audio stream (expected the speech track in the video container)")
                streams.append(container.streams.audio[0])
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        frames.append(frame.to_ndarray(format="rgb24"))
                        times.append(float(frame.time) if frame.time is not None else len(times) / (fps or FPS))
                    else:
                        for out in resampler.resample(frame):
                            chunks.append(out.to_ndarray().reshape(-1))
            if audio_path is None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as e:  # av.error.* on truncated / non-video files
        raise MediaError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not frames:
        raise MediaError(f"{path}: video has no decodable frames (truncated?)")
    if fps is None:
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float(FPS)
    video, resampled = _frames_at_25fps(frames, times, fps, path)
    if audio_path is None:
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        where = path
    else:
        import soundfile as sf

        try:
            samples, rate = sf.read(str(audio_path), dtype="float32", always_2d=True)
        except Exception as e:
            raise MediaError(f"{audio_path}: cannot read audio ({e})") from e
        audio = _resample_audio(samples.mean(axis=1), rate)
        where = str(audio_path)
    if len(audio) == 0:
        raise MediaError(f"{where}: audio stream has no samples (truncated?)")
    gap = abs(len(audio) / SAMPLE_RATE - len(video) / FPS)
    if gap > MAX_AV_DURATION_GAP:
        raise MediaError(
            f"{path}: audio lasts {len(audio) / SAMPLE_RATE:.2f} s but video {len(video) / FPS:.2f} s "
            f"(differ by more than {MAX_AV_DURATION_GAP} s: truncated file?)"
        )
    return DecodedMedia(video, audio, float(fps), resampled)


def fit_audio(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """Pad with silence / trim to exactly n_frames * 640 samples (the manifest's length rule)."""
    n = n_frames * SAMPLES_PER_FRAME
    return audio[:n] if len(audio) >= n else np.pad(audio, (0, n - len(audio)))


# ----------------------------------------------------------------------------- worker
_LANDMARKER: dict[tuple, Any] = {}


def _landmarker(roi: RoiSettings):
    if roi.method == "center":
        return None
    key = (roi.method, roi.detect_max_side)
    if key not in _LANDMARKER:
        from data.roi import FaceLandmarker

        _LANDMARKER[key] = FaceLandmarker(roi.method, roi.detect_max_side)
    return _LANDMARKER[key]


def audio_rel(uid: str) -> str:
    return f"audio/{uid}.wav"


def video_rel(uid: str) -> str:
    return f"video/{uid}.mp4"


def prepare_item(job: tuple[SourceItem, str, RoiSettings, bool]) -> dict[str, Any]:
    """Worker: keep a valid prepared utterance or make it. Never raises (errors are returned)."""
    from data.roi import MissingFaceError, extract_mouth_roi

    item, out_dir_s, roi, force = job
    out_dir = Path(out_dir_s)
    t0 = time.perf_counter()
    try:
        kept = None if force else check_existing(out_dir / audio_rel(item.id), out_dir / video_rel(item.id), roi.size, SAMPLE_RATE, FPS)
        if kept is not None:
            return {"id": item.id, "status": "kept", "n_frames": kept[0], "n_samples": kept[1]}
        media = decode_media(item.video, item.audio)
        result = extract_mouth_roi(
            media.frames, _landmarker(roi), size=roi.size, detect_every=roi.detect_every,
            smooth_window=roi.smooth_window, max_missing_face_frac=roi.max_missing_face_frac, source=item.video,
        )  # fmt: skip
        n_frames = len(result.frames)
        # video first, then audio: check_existing needs both, so a crash in between is redone
        write_video(out_dir / video_rel(item.id), result.frames, fps=FPS)
        write_wav(out_dir / audio_rel(item.id), fit_audio(media.audio, n_frames), SAMPLE_RATE)
        return {
            "id": item.id, "status": "prepared", "n_frames": n_frames, "n_samples": n_frames * SAMPLES_PER_FRAME,
            "resampled_fps": media.source_fps if media.resampled else None, "missing_face_frames": result.missing_face_frames,
            "av_gap_samples": abs(len(media.audio) - n_frames * SAMPLES_PER_FRAME), "seconds": time.perf_counter() - t0,
        }  # fmt: skip
    except MissingFaceError as e:
        return {"id": item.id, "status": "missing_face", "error": str(e)}
    except MediaError as e:
        return {"id": item.id, "status": "error", "reason": "bad_media", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises or counts a skip
        return {"id": item.id, "status": "error", "reason": "prepare_error", "error": f"{item.video}: {type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- driver
class Problems:
    """`data.on_error`: raise CorpusError at once, or count a skip per reason."""

    def __init__(self, corpus: str, on_error: str):
        from common.skips import SkipCounter

        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={on_error!r}: expected raise or skip")
        self.on_error = on_error
        self.skips = SkipCounter(f"prepare/{corpus}")

    def report(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise CorpusError(f"{message} (set data.on_error=skip to skip and count such items)")
        self.skips.skip(reason, message)


def dir_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


@dataclass
class PreparedCorpus:
    """What prepare_corpus made: lengths of every prepared utterance and the stage metrics."""

    lengths: dict[str, tuple[int, int]]  # id -> (n_frames, n_samples)
    metrics: dict[str, Any] = field(default_factory=dict)


def prepare_media(
    items: Sequence[SourceItem], out_dir: Path, roi: RoiSettings, problems: Problems, num_workers: int, corpus: str, progress: bool = True
) -> PreparedCorpus:
    """Prepare (or keep) every item's wav + ROI mp4 in parallel; returns lengths of the good ones."""
    from common.progress import Progress

    meta_path = out_dir / "meta.json"
    force = False
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text()).get("roi")
        except json.JSONDecodeError:
            old = None
        if old is not None and old != roi.fingerprint():
            log.warning("%s: prepared with ROI settings %s, now %s; every ROI video is made again", meta_path, old, roi.fingerprint())
            force = True
    jobs = [(it, str(out_dir), roi, force) for it in items]
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    bar = Progress(total=len(jobs), desc=f"prepare {corpus}", unit="utt", every=max(1, len(jobs) // 20), enabled=progress)
    if num_workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            r = prepare_item(job)
            results[r["id"]] = r
            bar.update()
    else:
        with mp.get_context("spawn").Pool(processes=min(num_workers, len(jobs))) as pool:
            for r in pool.imap_unordered(prepare_item, jobs, chunksize=1):
                results[r["id"]] = r
                bar.update()
    bar.close()
    wall = time.perf_counter() - t0

    lengths: dict[str, tuple[int, int]] = {}
    n_missing_face = 0
    for it in items:  # source order: deterministic error/skip order
        r = results[it.id]
        if r["status"] == "error":
            problems.report(r["reason"], r["error"])
        elif r["status"] == "missing_face":
            n_missing_face += 1
            problems.skips.skip("missing_face", r["error"])
        else:
            lengths[it.id] = (r["n_frames"], r["n_samples"])
    prepared = [r for r in results.values() if r["status"] == "prepared"]
    resampled = [r for r in prepared if r.get("resampled_fps")]
    if resampled:
        log.warning("%d videos were not 25 fps and were resampled to 25 fps (e.g. %s at %g fps)", len(resampled), resampled[0]["id"], resampled[0]["resampled_fps"])
    prepared_hours = sum(r["n_frames"] for r in prepared) / FPS / 3600
    out_bytes = dir_bytes(p for uid in lengths for p in (out_dir / audio_rel(uid), out_dir / video_rel(uid)))
    total_hours = sum(n for n, _ in lengths.values()) / FPS / 3600
    metrics = {
        "utterances": len(lengths),
        "utterances_prepared": len(prepared),
        "utterances_kept": sum(r["status"] == "kept" for r in results.values()),
        "hours": total_hours,
        "bytes": out_bytes,
        "resampled_fps_videos": len(resampled),
        "missing_face_skipped": n_missing_face,
        "interpolated_face_frames": sum(r.get("missing_face_frames", 0) for r in prepared),
        "max_av_gap_ms": max((r["av_gap_samples"] for r in prepared), default=0) / SAMPLE_RATE * 1000,
        "seconds": wall,
        "cpu_seconds_per_hour_of_video": (sum(r["seconds"] for r in prepared) / prepared_hours) if prepared_hours else None,
        "bytes_per_hour_of_video": out_bytes / total_hours if total_hours else None,
    }
    return PreparedCorpus(lengths, metrics)


def write_corpus(
    out_dir: Path,
    corpus: str,
    split_items: Mapping[str, Sequence[SourceItem]],
    prepared: PreparedCorpus,
    roi: RoiSettings,
    problems: Problems,
    trials: Sequence[Trial] | None = None,
    meta_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Manifests for every split in SPLITS (missing ones empty), speakers.tsv, trials.txt, meta.json; returns metrics."""
    from common.files import atomic_write_text, write_metrics

    unknown = set(split_items) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    speaker_split: dict[str, str] = {}
    counts: dict[str, Any] = {}
    for split in SPLITS:
        utts = [
            Utterance(it.id, video_rel(it.id), audio_rel(it.id), *prepared.lengths[it.id], it.speaker, it.text)
            for it in split_items.get(split, [])
            if it.id in prepared.lengths
        ]
        write_split(out_dir, split, utts)
        for u in utts:  # a speaker's row names its first non-public split (public may share speakers)
            current = speaker_split.get(u.speaker)
            if current is None or (current == "public" and split != "public"):
                speaker_split[u.speaker] = split
        counts[f"split/{split}/utterances"] = len(utts)
        counts[f"split/{split}/speakers"] = len({u.speaker for u in utts})
        counts[f"split/{split}/hours"] = sum(u.n_frames for u in utts) / FPS / 3600
    if trials is not None:
        write_trials(out_dir, trials)
        counts["trials/target"] = sum(t.target for t in trials)
        counts["trials/nontarget"] = sum(not t.target for t in trials)
    rows = ["speaker\tsplit"] + [f"{s}\t{speaker_split[s]}" for s in sorted(speaker_split)]
    atomic_write_text(out_dir / "manifests" / "speakers.tsv", "\n".join(rows) + "\n")
    metrics = {**prepared.metrics, **counts, **problems.skips.report()}
    meta = {
        "corpus": corpus,
        "roi": roi.fingerprint(),
        "mean_face": "data.roi.MEAN_FACE_68 (derived from skimage astronaut landmarks; see data/roi.py)",
        "sample_rate": SAMPLE_RATE,
        "fps": FPS,
        "roi_size": roi.size,
        "length_rule": "n_samples = n_frames * 640 (audio padded with silence / trimmed to the 25 fps video)",
        "audio_format": "wav PCM_16 mono 16 kHz, extracted from the video container with PyAV",
        "video_format": "mp4 H.264 yuv420p, grayscale mouth ROI",
        **(dict(meta_extra) if meta_extra else {}),
        "metrics": {k: v for k, v in metrics.items() if k != "seconds"},
    }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    write_metrics(out_dir / "prepare", metrics)
    if problems.skips.total:
        log.warning("%s: %d items skipped (see %s)", corpus, problems.skips.total, out_dir / "prepare" / "metrics.json")
    return metrics


def check_raw_dir(data_cfg: Any, corpus: str) -> Path:
    raw = data_cfg.raw_dir
    if raw is None:
        raise CorpusError(f"data.raw_dir is not set: give the directory where {corpus} was unpacked (data/README.md), e.g. data.raw_dir=/data/{corpus}")
    raw = Path(os.path.expanduser(str(raw)))
    if not raw.is_dir():
        raise CorpusError(f"data.raw_dir={raw}: directory not found")
    return raw


def limit(items: list[SourceItem], max_utterances: int | None) -> list[SourceItem]:
    return items if max_utterances is None else items[: int(max_utterances)]


def balanced_trials(utts_by_speaker: Mapping[str, list[str]], per_speaker: int, seed: int) -> list[Trial]:
    """Balanced generated trials, the same rule as SynthGRID's (data.synthgrid.generate.make_trials)."""
    from data.synthgrid.generate import make_trials

    return make_trials(utts_by_speaker, per_speaker, seed)
