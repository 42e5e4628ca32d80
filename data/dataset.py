"""The audio-visual ASR dataset over a prepared corpus (data.manifest format).

`AVSRDataset(...)[i]` is a dict:

    id, speaker, text          str
    speaker_idx                int, index of the speaker in the sorted speakers of the split's manifest
    targets                    LongTensor [S] (None without a tokenizer)
    audio                      FloatTensor [T, 104] log-fbank stacked x4, per-frame layer-normed (None if not a modality)
    video                      FloatTensor [T, 88, 88] cropped + normalised (None if not a modality)
    waveform                   FloatTensor [N] at 16 kHz, after noise if any (None unless return_waveform)
    n_frames                   int T (25 Hz; audio is trimmed / zero-padded to the video length)

Every item is checked once up front (`validate()`, run by the constructor): missing,
corrupt or truncated files, a wrong sample rate, audio and video lengths differing by
more than `max_av_length_mismatch` video frames (also against the manifest's counts,
which the samplers bucket on), empty transcripts and characters the tokenizer does not know. on_error="raise" stops at the first with a `DatasetError`
naming the file and what was expected; on_error="skip" drops the item and counts it
in `self.skips` (common.skips.SkipCounter; `self.skips.report()` gives the counts for
metrics.json), so skips happen before training and indices never shift mid-run.

Randomness (crop, flip, noise) comes from a generator seeded by (seed, epoch, index),
so an item is the same whenever it is loaded with the same epoch, in any worker, and a
resumed run sees exactly the augmentations it would have seen. Call `set_epoch` (or
`set_loader_epoch`) at the start of every epoch; at eval (train=False) the epoch is
ignored, so evaluation noise is identical every time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.files import read_text
from data import features
from data.collate import collate_av
from data.media import MediaError, read_video, read_wav
from data.manifest import ManifestError, Utterance, manifest_dir, read_split
from data.anonymize import ANONYMIZERS, anonymize_waveform
from data.noise import babble_noise, mix_at_snr, white_noise
from data.samplers import BucketBatchSampler, SpeakerBatchSampler
from data.tokenizer import TokenizerError

log = logging.getLogger(__name__)

MODALITIES = ("audio", "video")
NOISE_TYPES = ("white", "babble")


class DatasetError(ValueError):
    """An utterance that cannot be used: the message names the file and what was expected."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # short category used for skip counts


def _read_split_tolerant(data_dir: str | Path, split: str, on_bad) -> list[Utterance]:
    """data.manifest.read_split, but a malformed line is passed to `on_bad(reason, message)` and
    dropped instead of failing the whole split (on_error=skip). File-level problems still raise."""
    try:
        return read_split(data_dir, split)
    except ManifestError:
        pass  # fall through: find the bad lines one by one
    mdir = manifest_dir(data_dir)
    tsv, wrd, spk = mdir / f"{split}.tsv", mdir / f"{split}.wrd", mdir / f"{split}.spk"
    for path in (tsv, wrd, spk):
        if not path.is_file():
            raise ManifestError(f"{path}: file not found (prepare the corpus with `python -m scripts.prepare_data data=...`)")
    lines = read_text(tsv, ManifestError).splitlines()
    if not lines:
        raise ManifestError(f"{tsv}: empty file; expected a root line followed by one line per utterance")
    words = read_text(wrd, ManifestError).splitlines()
    speakers = read_text(spk, ManifestError).splitlines()
    entries = lines[1:]
    for other, name in ((words, wrd), (speakers, spk)):
        if len(other) != len(entries):
            raise ManifestError(f"{name}: {len(other)} lines but {tsv} lists {len(entries)} utterances; they must match line by line")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = (Path(data_dir) / root).resolve()
    out, seen = [], set()
    for i, (line, text, speaker) in enumerate(zip(entries, words, speakers), start=2):
        cols = line.split("\t")
        if len(cols) != 5:
            on_bad("manifest", f"{tsv}:{i}: expected 5 tab-separated columns (id, video, audio, n_video_frames, n_audio_samples), got {len(cols)}: {line!r}")
            continue
        uid, video, audio, n_frames, n_samples = cols
        try:
            nf, ns = int(n_frames), int(n_samples)
        except ValueError:
            on_bad("manifest", f"{tsv}:{i}: frame/sample counts must be integers, got {n_frames!r} and {n_samples!r}")
            continue
        if uid in seen:
            on_bad("manifest", f"{tsv}:{i}: duplicate utterance id {uid!r}")
            continue
        if not text.strip():
            on_bad("empty_transcript", f"{wrd}:{i - 1}: empty transcript for utterance {uid!r}")
            continue
        seen.add(uid)
        out.append(Utterance(uid, str(root / video) if video else "", str(root / audio), nf, ns, speaker.strip(), text.strip()))
    return out


class AVSRDataset(Dataset):
    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        tokenizer: Any = None,
        train: bool = False,
        modalities: Sequence[str] = MODALITIES,
        return_waveform: bool = False,
        noise: Optional[dict] = None,
        on_error: str = "raise",
        max_av_length_mismatch: int = 2,
        seed: int = 0,
        *,
        sample_rate: int = features.SAMPLE_RATE,
        fps: float = features.VIDEO_FPS,
        stack_order: int = 4,
        normalize_audio: bool = True,
        crop_size: int = 88,
        image_mean: float = features.IMAGE_MEAN,
        image_std: float = features.IMAGE_STD,
        validate: bool = True,
        cache_items: bool = False,
        roi_size: Optional[int] = None,
        max_skip_fraction: float = 1.0,
        anonymize: str = "none",
        mcadams_alpha: float = 0.8,
    ):
        from common.skips import SkipCounter

        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.data_dir, self.split = Path(data_dir), split
        self.tokenizer, self.train = tokenizer, train
        self.modalities = modalities
        self.return_waveform = return_waveform
        self.on_error = on_error
        self.max_av_length_mismatch = max_av_length_mismatch
        self.seed, self.epoch = int(seed), 0
        self.sample_rate, self.fps, self.stack_order = sample_rate, fps, stack_order
        self.normalize_audio = normalize_audio
        self.crop_size, self.image_mean, self.image_std = crop_size, image_mean, image_std
        self.roi_size = roi_size  # prepared mouth ROIs are roi_size x roi_size; None: any size >= crop_size
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
        self.max_skip_fraction = max_skip_fraction
        self.skips = SkipCounter(f"dataset {split}")
        self.skipped: dict[str, str] = {}  # utterance id -> skip reason (validation and keep_only)
        self._wrd_path = manifest_dir(data_dir) / f"{split}.wrd"
        self.noise = self._check_noise(noise)
        if anonymize not in ANONYMIZERS:
            raise ValueError(f"data.anonymize must be one of {list(ANONYMIZERS)}, got {anonymize!r}")
        if anonymize == "mcadams" and not (0 < float(mcadams_alpha) and np.isfinite(mcadams_alpha)):
            raise ValueError(f"data.mcadams_alpha must be a positive number, got {mcadams_alpha}")
        # Signal-level anonymisation (data/anonymize.py), applied after any evaluation noise: the
        # device anonymises what its microphone recorded, environment included.
        self.anonymize, self.mcadams_alpha = anonymize, float(mcadams_alpha)

        if on_error == "raise":
            utterances = read_split(data_dir, split)
        else:
            utterances = _read_split_tolerant(data_dir, split, self.skips.skip)
        # speaker indices come from the manifest, not from what survives validation,
        # so they do not depend on which files happen to be broken
        self.speakers = sorted({u.speaker for u in utterances})
        self._speaker_index = {s: i for i, s in enumerate(self.speakers)}
        self.utterances = utterances
        self._babble_pool = None
        # Items that cannot change between epochs (no random crop, no noise) can be kept in
        # memory: fine-tuning with the cached video front-end then decodes each wav once.
        epoch_dependent = train and ("video" in modalities or self.noise is not None)
        if cache_items and epoch_dependent:
            raise ValueError(f"cache_items=True needs items that do not change between epochs; split {split!r} with "
                             f"train=True has {'random video crops' if 'video' in modalities else 'noise augmentation'}")
        self._items: Optional[dict[int, dict[str, Any]]] = {} if cache_items else None
        if validate:
            self.validate()
        if not self.utterances:
            raise DatasetError("empty", f"{manifest_dir(data_dir) / (split + '.tsv')}: no usable utterances in split {split!r}")

    # ------------------------------------------------------------------ config checks
    @staticmethod
    def _check_noise(noise: Optional[dict]) -> Optional[dict]:
        if noise is None or noise.get("type") in (None, "none"):
            return None
        spec = {"prob": 1.0, "n_talkers": 4, "pool": None} | dict(noise)
        if spec["type"] not in NOISE_TYPES:
            raise ValueError(f"noise.type must be one of {NOISE_TYPES} or 'none', got {spec['type']!r}")
        snr = spec.get("snr")
        if snr is None or (not isinstance(snr, (int, float)) and len(snr) != 2):
            raise ValueError(f"noise.snr must be a number (dB) or a [low, high] range, got {snr!r}")
        return spec

    # ------------------------------------------------------------------ validation
    def _fail(self, reason: str, message: str) -> DatasetError:
        return DatasetError(reason, f"split {self.split!r}, utterance {message}")

    def _load_waveform(self, u: Utterance) -> np.ndarray:
        import soundfile as sf

        path = Path(u.audio)
        if not path.is_file():
            raise self._fail("missing_file", f"{u.id}: {path}: audio file not found")
        try:
            rate = sf.info(str(path)).samplerate
        except Exception as e:
            raise self._fail("corrupt_audio", f"{u.id}: {path}: cannot read audio ({e}); expected a {self.sample_rate} Hz mono wav") from e
        if rate != self.sample_rate:
            raise self._fail("wrong_sample_rate", f"{u.id}: {path}: sample rate {rate} Hz, expected {self.sample_rate} Hz")
        try:
            return read_wav(path, expected_rate=self.sample_rate)
        except MediaError as e:
            raise self._fail("corrupt_audio", f"{u.id}: {e}") from e

    def _load_frames(self, u: Utterance) -> np.ndarray:
        if not u.video:
            raise self._fail("missing_file", f"{u.id}: the manifest gives no video file, but modalities include 'video'")
        path = Path(u.video)
        if not path.is_file():
            raise self._fail("missing_file", f"{u.id}: {path}: video file not found")
        try:
            frames = read_video(path, expected_fps=self.fps)
        except MediaError as e:
            raise self._fail("corrupt_video", f"{u.id}: {e}") from e
        if self.roi_size is not None and frames.shape[1:] != (self.roi_size, self.roi_size):
            raise self._fail(
                "wrong_frame_size", f"{u.id}: {path}: frames are {frames.shape[1]}x{frames.shape[2]}, expected "
                f"{self.roi_size}x{self.roi_size} mouth ROIs (data.roi_size); a larger frame is not a mouth ROI "
                "(prepare real videos with `python -m data.prepare`, which crops the mouth)"
            )
        if frames.shape[1] < self.crop_size or frames.shape[2] < self.crop_size:
            raise self._fail(
                "corrupt_video", f"{u.id}: {path}: frames are {frames.shape[1]}x{frames.shape[2]}, expected at least {self.crop_size}x{self.crop_size}"
            )
        return frames

    def _encode(self, u: Utterance) -> Optional[list[int]]:
        if not u.text.split():
            raise self._fail("empty_transcript", f"{u.id}: {self._wrd_path}: empty transcript")
        if self.tokenizer is None:
            return None
        try:
            return self.tokenizer.encode(u.text, utt_id=u.id)
        except TokenizerError as e:
            raise self._fail("non_vocabulary_transcript", f"{u.id}: {self._wrd_path}: {e}") from e

    def _check_lengths(self, u: Utterance, wav: Optional[np.ndarray], frames: Optional[np.ndarray]) -> None:
        if wav is None or frames is None:
            return
        n_audio = features.num_audio_frames(len(wav), self.stack_order)
        if abs(n_audio - len(frames)) > self.max_av_length_mismatch:
            raise self._fail(
                "length_mismatch",
                f"{u.id}: {u.audio} gives {n_audio} audio frames at 25 Hz ({len(wav)} samples) but {u.video} has "
                f"{len(frames)} video frames; expected them to differ by at most {self.max_av_length_mismatch}",
            )

    def _check(self, u: Utterance) -> None:
        self._encode(u)
        wav = self._load_waveform(u) if ("audio" in self.modalities or self.return_waveform or self.noise) else None
        frames = self._load_frames(u) if "video" in self.modalities else None
        self._check_lengths(u, wav, frames)
        # bucketing uses the manifest's counts, so a stale manifest is an error too
        tol = self.max_av_length_mismatch
        tsv = manifest_dir(self.data_dir) / f"{self.split}.tsv"
        if frames is not None and abs(len(frames) - u.n_frames) > tol:
            raise self._fail("manifest_mismatch", f"{u.id}: {tsv} says {u.n_frames} video frames but {u.video} has {len(frames)}")
        spf = self.sample_rate / self.fps
        if wav is not None and abs(len(wav) - u.n_samples) > tol * spf:
            raise self._fail("manifest_mismatch", f"{u.id}: {tsv} says {u.n_samples} audio samples but {u.audio} has {len(wav)}")

    def validate(self) -> dict[str, int]:
        """Check every utterance (decodes all media once); returns the skip counts."""
        kept = []
        for u in self.utterances:
            try:
                self._check(u)
            except DatasetError as e:
                if self.on_error == "raise":
                    raise
                self.skips.skip(e.reason, str(e))
                self.skipped[u.id] = e.reason
                continue
            kept.append(u)
        self.utterances = kept
        report = self.skips.report()
        if self.skips.total:
            log.warning("split %r: %d usable utterances, %d skipped", self.split, len(kept), self.skips.total)
        self.check_skip_fraction()
        return report

    def keep_only(self, ids: Any, reasons: Optional[dict[str, str]] = None, what: str = "the other modality") -> None:
        """Drop the utterances whose id is not in `ids` (e.g. those without a cached video front-end
        output because the video dataset skipped them), counting each as a skip with its reason in
        `reasons` (the other dataset's `skipped`), so both modalities hold the same utterances."""
        ids, reasons = set(ids), reasons or {}
        kept = []
        for u in self.utterances:
            if u.id in ids:
                kept.append(u)
                continue
            reason = reasons.get(u.id, "missing_" + what.replace(" ", "_"))
            self.skips.skip(reason, f"split {self.split!r}, utterance {u.id}: dropped, {what} skipped it ({reason})")
            self.skipped[u.id] = reason
        if len(kept) != len(self.utterances):
            self.utterances = kept
            self._items = {} if self._items is not None else None  # indices shifted
            self.check_skip_fraction()
        if not self.utterances:
            raise DatasetError("empty", f"{manifest_dir(self.data_dir) / (self.split + '.tsv')}: no usable utterances in split {self.split!r}")

    def check_skip_fraction(self) -> None:
        """data.on_error=skip may drop a few broken utterances, not a large part of a split."""
        seen = len(self.utterances) + self.skips.total
        if seen and self.skips.total / seen > self.max_skip_fraction:
            examples = "; ".join(f"{n} x {r} (e.g. {self.skips.examples[r]})" for r, n in self.skips.reasons.most_common(3))
            raise DatasetError(
                "too_many_skips",
                f"split {self.split!r} of {self.data_dir}: {self.skips.total} of {seen} utterances skipped "
                f"({self.skips.total / seen:.0%}), more than data.max_skip_fraction={self.max_skip_fraction:g}: {examples}",
            )

    # ------------------------------------------------------------------ items
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def lengths(self) -> list[int]:
        """Length of each item in 25 Hz frames, from the manifest (for bucketing)."""
        if "video" in self.modalities:
            return [u.n_frames for u in self.utterances]
        return [features.num_audio_frames(u.n_samples, self.stack_order) for u in self.utterances]

    @property
    def speaker_ids(self) -> list[str]:
        return [u.speaker for u in self.utterances]

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        epoch = self.epoch if self.train else 0
        return np.random.default_rng([self.seed, epoch, index, stream])

    def _noise_pool(self, index: int) -> list[str]:
        if self.noise["pool"] is not None:
            return list(self.noise["pool"])
        speaker = self.utterances[index].speaker
        return [u.audio for u in self.utterances if u.speaker != speaker] or [u.audio for j, u in enumerate(self.utterances) if j != index]

    def _add_noise(self, wav: np.ndarray, index: int) -> np.ndarray:
        spec, rng = self.noise, self._rng(index, stream=1)
        if rng.random() >= spec["prob"]:
            return wav
        snr = spec["snr"]
        snr_db = float(snr) if isinstance(snr, (int, float)) else float(rng.uniform(snr[0], snr[1]))
        if spec["type"] == "white":
            noise = white_noise(len(wav), rng)
        else:
            pool = self._noise_pool(index)
            if not pool:
                raise DatasetError("noise", f"split {self.split!r}: babble noise needs other utterances, but the split has only one")
            picks = rng.choice(len(pool), size=min(spec["n_talkers"], len(pool)), replace=False)
            talkers = [read_wav(pool[int(k)], expected_rate=self.sample_rate) for k in picks]
            noise = babble_noise(talkers, len(wav), rng, n_talkers=spec["n_talkers"])
        return mix_at_snr(wav, noise, snr_db, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._items is not None:
            if index not in self._items:
                self._items[index] = self._make_item(index)
            return self._items[index]
        return self._make_item(index)

    def _make_item(self, index: int) -> dict[str, Any]:
        u = self.utterances[index]
        targets = self._encode(u)
        need_wav = "audio" in self.modalities or self.return_waveform
        wav = self._load_waveform(u) if need_wav else None
        if wav is not None and self.noise is not None:
            wav = self._add_noise(wav, index)
        if wav is not None and self.anonymize != "none":
            wav = anonymize_waveform(wav, self.anonymize, self.sample_rate, self.mcadams_alpha)
        frames = self._load_frames(u) if "video" in self.modalities else None
        self._check_lengths(u, wav, frames)

        video = audio = None
        if frames is not None:
            cropped = features.crop_video(frames, self.crop_size, train=self.train, rng=self._rng(index, stream=0))
            video = torch.from_numpy(features.normalize_video(cropped, self.image_mean, self.image_std))
        if "audio" in self.modalities:
            feats = features.logfbank_stacked(wav, self.sample_rate, self.stack_order)
            if frames is not None:
                feats = features.align_audio_to_video(feats, len(frames))
            audio = features.normalize_audio(feats) if self.normalize_audio else torch.from_numpy(feats)
        n_frames = len(frames) if frames is not None else len(audio)
        return {
            "id": u.id,
            "speaker": u.speaker,
            "speaker_idx": self._speaker_index[u.speaker],
            "text": u.text,
            "targets": torch.tensor(targets, dtype=torch.long) if targets is not None else None,
            "audio": audio,
            "video": video,
            "waveform": torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)) if self.return_waveform else None,
            "n_frames": n_frames,
        }


def build_dataloader(
    dataset: AVSRDataset,
    sampler_kind: str = "bucket",
    batch_size: int = 8,
    P: int = 4,
    K: int = 2,
    seed: int = 0,
    num_workers: int = 0,
    train: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader with a length-bucketed ("bucket") or P x K speaker ("speaker") batch sampler.

    Workers are not persistent, so the dataset's epoch set by `set_loader_epoch` reaches them.
    pin_memory: page-locked batches, for non_blocking copies to a GPU (`common.device.pin_memory_for`).
    """
    if sampler_kind == "bucket":
        sampler = BucketBatchSampler(dataset.lengths, batch_size, shuffle=train, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
    elif sampler_kind == "speaker":
        sampler = SpeakerBatchSampler(dataset.speaker_ids, P, K, seed=seed, num_replicas=num_replicas, rank=rank)
    else:
        raise ValueError(f"sampler_kind must be 'bucket' or 'speaker', got {sampler_kind!r}")
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_av, num_workers=num_workers, persistent_workers=False,
                      pin_memory=pin_memory)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch on both the batch sampler (order) and the dataset (augmentation)."""
    loader.batch_sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
