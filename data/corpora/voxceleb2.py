"""VoxCeleb2 (Chung et al. 2018): celebrity interview clips, 224x224 face tracks at 25 fps.

Layout under data.raw_dir (the `vox2_dev_mp4` / `vox2_test_mp4` archives):

    dev/mp4/id00012/<youtube id>/00001.mp4     (dev/id00012/... also accepted)
    test/mp4/id00017/<youtube id>/00001.mp4

Utterance ids are `<dev|test>/<speaker>/<youtube id>/<n>`. There are no transcripts: the
.wrd lines hold `<none>` (outside every tokenizer alphabet, so ASR training on it fails
with a clear error).

Splits: dev speakers -> attacker_train and public (the same utterances; AV-HuBERT
pre-trains on VoxCeleb2 dev); test speakers -> attacker_trials. trials.txt comes from the
official-format list in data.trials_file (`1 id00017/abc/00001.wav id00017/def/00002.wav`;
.wav or .mp4 names, optionally prefixed by `test/`, `test/mp4/`, `mp4/`) or, without one,
is generated balanced (data.trials_per_speaker per speaker, half target, seeded).
A trial naming a file that is not in the test set is an error naming the list, line and
file, or with data.on_error=skip a counted skip; trials whose utterance was skipped during
preparation are dropped and counted (`trial_utterance_skipped`).
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

from data.corpora.common import (
    NO_TRANSCRIPT, CorpusError, Problems, RoiSettings, SourceItem, balanced_trials, check_raw_dir, limit,
    prepare_media, write_corpus,
)  # fmt: skip
from common.files import read_text
from data.manifest import Trial

log = logging.getLogger(__name__)


def scan(raw: Path) -> dict[str, list[SourceItem]]:
    parts: dict[str, list[SourceItem]] = {}
    for part in ("dev", "test"):
        base = raw / part / "mp4" if (raw / part / "mp4").is_dir() else raw / part
        parts[part] = [
            SourceItem(f"{part}/{v.parent.parent.name}/{v.parent.name}/{v.stem}", v.parent.parent.name, str(v.resolve()), NO_TRANSCRIPT)
            for v in sorted(base.glob("id*/*/*.mp4"))
        ]
    if not any(parts.values()):
        raise CorpusError(f"{raw}: no VoxCeleb2 videos found (expected dev/mp4/idNNNNN/<clip>/<n>.mp4 and test/mp4/...)")
    return parts


def trial_key(name: str) -> str:
    """`id00017/abc/00001.wav` (any extension or `test/mp4/` prefix) -> `id00017/abc/00001`."""
    p = PurePosixPath(name)
    parts = p.with_suffix("").parts if p.suffix else p.parts
    if len(parts) < 3:
        raise ValueError(f"expected <speaker>/<clip>/<n>.wav, got {name!r}")
    return "/".join(parts[-3:])


def read_official_trials(path: Path, test_ids: dict[str, str], problems: Problems) -> list[Trial]:
    """Official-format list -> trials on our utterance ids (test_ids: `spk/clip/n` -> id)."""
    if not path.is_file():
        raise CorpusError(f"data.trials_file={path}: file not found")
    trials = []
    for i, line in enumerate(read_text(path, CorpusError).splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 3 or cols[0] not in ("0", "1"):
            raise CorpusError(f"{path}:{i}: expected '<1|0> <spk/clip/n.wav> <spk/clip/n.wav>', got {line!r}")
        ids = []
        for name in cols[1:]:
            try:
                key = trial_key(name)
            except ValueError as e:
                raise CorpusError(f"{path}:{i}: {e}") from None
            if key not in test_ids:
                problems.report("trial_missing_file", f"{path}:{i}: names {name}, which is not in the VoxCeleb2 test set under data.raw_dir")
                break
            ids.append(test_ids[key])
        if len(ids) == 2:
            trials.append(Trial(cols[0] == "1", ids[0], ids[1]))
    return trials


def prepare(cfg: Any) -> dict[str, Any]:
    data = cfg.data
    raw = check_raw_dir(data, "voxceleb2")
    out_dir = Path(data.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    roi = RoiSettings.from_config(data)
    problems = Problems("voxceleb2", str(data.on_error))
    parts = scan(raw)
    dev, test = limit(parts["dev"], data.get("max_utterances")), limit(parts["test"], data.get("max_utterances"))
    trials_file = data.get("trials_file")
    official = None
    if trials_file:  # read before the slow media step so a bad list fails at once
        official = read_official_trials(Path(str(trials_file)), {it.id.split("/", 1)[1]: it.id for it in test}, problems)
    prepared = prepare_media(dev + test, out_dir, roi, problems, int(data.num_workers), "voxceleb2")
    ok = prepared.lengths
    if official is not None:
        trials = []
        for t in official:
            if t.a in ok and t.b in ok:
                trials.append(t)
            else:
                problems.skips.skip("trial_utterance_skipped", f"trial {t.a} {t.b}: an utterance was skipped during preparation")
        if not trials:
            raise CorpusError(f"{trials_file}: no usable trials left")
    else:
        by_speaker: dict[str, list[str]] = {}
        for it in test:
            if it.id in ok:
                by_speaker.setdefault(it.speaker, []).append(it.id)
        trials = balanced_trials(by_speaker, int(data.trials_per_speaker), int(data.seed)) if len(by_speaker) >= 2 else None
    splits = {"public": dev, "attacker_train": dev, "attacker_trials": test}
    meta = {"raw_dir": str(raw), "trials_file": str(trials_file) if trials_file else None,
            "public_shares_attacker_train_speakers": True, "transcripts": "none (.wrd lines are <none>)"}  # fmt: skip
    return write_corpus(out_dir, "voxceleb2", splits, prepared, roi, problems, trials, meta)
