"""LRS3-TED (Afouras et al. 2018): TED/TEDx talks, 224x224 face tracks at 25 fps.

Layout under data.raw_dir (as unpacked from lrs3_pretrain.zip, lrs3_trainval.zip, lrs3_test_v0.4.zip):

    pretrain/<talk>/<clip>.mp4 + <clip>.txt
    trainval/<talk>/<clip>.mp4 + <clip>.txt
    test/<talk>/<clip>.mp4     + <clip>.txt

`.txt`: first line `Text:  WORDS ...`, then `Conf:  <n>`, a blank line and word
alignments (`WORD START END ASDSCORE`); only the first line is read. LRS3 has no speaker
labels; the talk id (folder) is used as the speaker, as usual (one main speaker per talk).

Splits (AV-HuBERT's fine-tuning subsets, data.subset):
  30h:   train = trainval minus valid;                433h: train = pretrain + trainval minus valid
  valid: whole trainval talks drawn (seeded) until >= data.valid_utterances utterances (AV-HuBERT
         holds out 1200 trainval utterances; we hold out whole talks so speakers stay disjoint,
         and drop those talks' pretrain clips from train)
  test:  test
  public (pre-training): 30h: pretrain clips of talks in no other split; 433h: = train
  attacker_train / attacker_trials: empty (LRS3 has no speaker identities; the attacker uses
         data=voxceleb2 or the GRID/SynthGRID attacker splits)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from data.corpora.common import (
    CorpusError, Problems, RoiSettings, SourceItem, check_raw_dir, limit, normalise_transcript, prepare_media, write_corpus,
)  # fmt: skip

log = logging.getLogger(__name__)
PARTS = ("pretrain", "trainval", "test")
SUBSETS = ("30h", "433h")


def read_transcript(path: Path) -> str:
    """Words of an LRS3 .txt (first line `Text:  ...`), upper-cased; CorpusError names the file."""
    if not path.is_file():
        raise CorpusError(f"{path}: transcript not found (expected next to the .mp4)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or not lines[0].startswith("Text:"):
        raise CorpusError(f"{path}:1: expected a first line 'Text:  WORDS ...', got {lines[0] if lines else ''!r}")
    return normalise_transcript(lines[0][len("Text:") :], str(path))


def scan(raw: Path, problems: Problems) -> dict[str, list[SourceItem]]:
    parts: dict[str, list[SourceItem]] = {}
    for part in PARTS:
        items = []
        for video in sorted((raw / part).glob("*/*.mp4")):
            talk, clip = video.parent.name, video.stem
            try:
                text = read_transcript(video.with_suffix(".txt"))
            except CorpusError as e:
                problems.report("missing_transcript" if "not found" in str(e) else "bad_transcript", str(e))
                continue
            items.append(SourceItem(f"{part}/{talk}/{clip}", talk, str(video.resolve()), text))
        parts[part] = items
    if not any(parts.values()):
        raise CorpusError(f"{raw}: no LRS3 videos found (expected pretrain/, trainval/, test/ with <talk>/<clip>.mp4)")
    return parts


def assign_splits(parts: dict[str, list[SourceItem]], subset: str, valid_utterances: int, seed: int) -> dict[str, list[SourceItem]]:
    if subset not in SUBSETS:
        raise ValueError(f"data.subset={subset!r}: expected one of {SUBSETS} (AV-HuBERT's LRS3 fine-tuning subsets)")
    trainval = parts.get("trainval", [])
    talks = sorted({it.speaker for it in trainval})
    per_talk = {t: sum(it.speaker == t for it in trainval) for t in talks}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    valid_talks: set[str] = set()
    n_valid = 0
    for t in (talks[i] for i in rng.permutation(len(talks))):
        if n_valid >= valid_utterances or len(valid_talks) >= len(talks) - 1:
            break
        valid_talks.add(t)
        n_valid += per_talk[t]
    test = parts.get("test", [])
    test_talks = {it.speaker for it in test}
    if test_talks & valid_talks:
        log.warning("lrs3: talks %s are in both test and trainval", sorted(test_talks & valid_talks))
    train = [it for it in trainval if it.speaker not in valid_talks]
    pretrain = [it for it in parts.get("pretrain", []) if it.speaker not in valid_talks and it.speaker not in test_talks]
    if subset == "433h":
        train = pretrain + train
        public = list(train)
    else:
        used = {it.speaker for it in train} | valid_talks | test_talks
        public = [it for it in pretrain if it.speaker not in used]
    return {"public": public, "train": train, "valid": [it for it in trainval if it.speaker in valid_talks], "test": test}


def prepare(cfg: Any) -> dict[str, Any]:
    data = cfg.data
    raw = check_raw_dir(data, "lrs3")
    out_dir = Path(data.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    roi = RoiSettings.from_config(data)
    problems = Problems("lrs3", str(data.on_error))
    subset = str(data.subset) if data.get("subset") is not None else "30h"
    parts = scan(raw, problems)
    splits = assign_splits(parts, subset, int(data.valid_utterances), int(data.seed))
    needed = {it.id: it for split in splits.values() for it in split}
    items = limit(sorted(needed.values(), key=lambda it: it.id), data.get("max_utterances"))
    prepared = prepare_media(items, out_dir, roi, problems, int(data.num_workers), "lrs3")
    meta = {"raw_dir": str(raw), "subset": subset, "valid_talks": sorted({it.speaker for it in splits["valid"]}),
            "public_shares_train_speakers": subset == "433h", "speaker": "LRS3 talk id (no speaker labels in LRS3)"}  # fmt: skip
    return write_corpus(out_dir, "lrs3", splits, prepared, roi, problems, None, meta)
