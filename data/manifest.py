"""Manifests in AV-HuBERT's format, shared by SynthGRID and the real corpora.

A prepared corpus directory `<data.dir>` holds

    manifests/<split>.tsv    line 1: root directory (absolute, or "." = the corpus dir)
                             then: id <TAB> video_rel_path <TAB> audio_rel_path <TAB> n_video_frames <TAB> n_audio_samples
    manifests/<split>.wrd    one transcript per line, same order as the .tsv (upper-case words)
    manifests/<split>.spk    one speaker id per line, same order as the .tsv (our addition)
    manifests/trials.txt     verification trials: `<1|0> <utt_id_a> <utt_id_b>` (VoxCeleb style)
    manifests/speakers.tsv   speaker <TAB> split [<TAB> extra columns, header line]
    meta.json                how the corpus was made (generator version, seed, sizes)

Splits: public, train, valid, test, attacker_train, attacker_trials. Speakers are
disjoint across splits. Every reader error names the file, the line and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SPLITS = ("public", "train", "valid", "test", "attacker_train", "attacker_trials")


class ManifestError(ValueError):
    """A manifest, transcript or trial list that does not match the documented format."""


@dataclass(frozen=True)
class Utterance:
    id: str
    video: str  # absolute path ("" if the corpus has no video for it)
    audio: str  # absolute path
    n_frames: int  # video frames at 25 fps
    n_samples: int  # audio samples at 16 kHz
    speaker: str
    text: str


@dataclass(frozen=True)
class Trial:
    target: bool
    a: str
    b: str


def manifest_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "manifests"


def write_split(data_dir: str | Path, split: str, utterances: Sequence[Utterance], root: str = ".") -> None:
    """Write <split>.tsv/.wrd/.spk atomically (paths stored relative to `root`)."""
    from common.files import atomic_write_text

    mdir = manifest_dir(data_dir)
    base = Path(data_dir) if root == "." else Path(root)
    rows, words, spks = [root], [], []
    for u in utterances:
        for field_name, value in (("id", u.id), ("speaker", u.speaker)):
            if not value or any(c in value for c in "\t\n "):
                raise ManifestError(f"{split}: utterance {u.id!r} has an invalid {field_name} {value!r} (no blanks allowed)")
        if "\n" in u.text:
            raise ManifestError(f"{split}: transcript of {u.id!r} contains a newline")
        video = str(Path(u.video).relative_to(base)) if u.video and Path(u.video).is_absolute() else u.video
        audio = str(Path(u.audio).relative_to(base)) if Path(u.audio).is_absolute() else u.audio
        rows.append(f"{u.id}\t{video}\t{audio}\t{u.n_frames}\t{u.n_samples}")
        words.append(u.text)
        spks.append(u.speaker)
    atomic_write_text(mdir / f"{split}.tsv", "\n".join(rows) + "\n")
    atomic_write_text(mdir / f"{split}.wrd", "".join(w + "\n" for w in words))
    atomic_write_text(mdir / f"{split}.spk", "".join(s + "\n" for s in spks))


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ManifestError(f"{path}: file not found (prepare the corpus with `python -m scripts.prepare_data data=...`)")
    from common.files import read_text

    return read_text(path, ManifestError).splitlines()


def read_split(data_dir: str | Path, split: str) -> list[Utterance]:
    """Read one split; raises ManifestError naming file and line on any malformed entry."""
    mdir = manifest_dir(data_dir)
    tsv, wrd, spk = mdir / f"{split}.tsv", mdir / f"{split}.wrd", mdir / f"{split}.spk"
    lines = _read_lines(tsv)
    if not lines:
        raise ManifestError(f"{tsv}: empty file; expected a root line followed by one line per utterance")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = (Path(data_dir) / root).resolve()
    entries = lines[1:]
    words = _read_lines(wrd)
    speakers = _read_lines(spk)
    for other, name in ((words, wrd), (speakers, spk)):
        if len(other) != len(entries):
            raise ManifestError(f"{name}: {len(other)} lines but {tsv} lists {len(entries)} utterances; they must match line by line")
    out: list[Utterance] = []
    seen: set[str] = set()
    for i, (line, text, speaker) in enumerate(zip(entries, words, speakers), start=2):
        cols = line.split("\t")
        if len(cols) != 5:
            raise ManifestError(
                f"{tsv}:{i}: expected 5 tab-separated columns (id, video, audio, n_video_frames, n_audio_samples), got {len(cols)}: {line!r}"
            )
        uid, video, audio, n_frames, n_samples = cols
        try:
            nf, ns = int(n_frames), int(n_samples)
        except ValueError:
            raise ManifestError(f"{tsv}:{i}: frame/sample counts must be integers, got {n_frames!r} and {n_samples!r}") from None
        if uid in seen:
            raise ManifestError(f"{tsv}:{i}: duplicate utterance id {uid!r}")
        seen.add(uid)
        if not text.strip():
            raise ManifestError(f"{wrd}:{i - 1}: empty transcript for utterance {uid!r}")
        out.append(
            Utterance(
                id=uid,
                video=str(root / video) if video else "",
                audio=str(root / audio),
                n_frames=nf,
                n_samples=ns,
                speaker=speaker.strip(),
                text=text.strip(),
            )
        )
    return out


def write_trials(data_dir: str | Path, trials: Iterable[Trial]) -> None:
    from common.files import atomic_write_text

    atomic_write_text(manifest_dir(data_dir) / "trials.txt", "".join(f"{int(t.target)} {t.a} {t.b}\n" for t in trials))


def all_pair_trials(ids: Sequence[str], speakers: Sequence[str], max_nontarget: int | None = None,
                    seed: int = 0) -> list[Trial]:
    """Every unordered pair of distinct utterances as a trial (target iff same speaker); utterance a
    (the enrolment) is the earlier one in `ids` order. `max_nontarget` keeps all target pairs and a
    seeded random subset of that many non-target pairs (for corpora too large to score every pair)."""
    import numpy as np

    ids, speakers = list(ids), list(speakers)
    if len(ids) != len(speakers):
        raise ValueError(f"all_pair_trials: {len(ids)} utterance ids but {len(speakers)} speakers; expected one speaker per utterance")
    if len(set(ids)) != len(ids):
        raise ValueError("all_pair_trials: utterance ids repeat; expected distinct ids")
    if max_nontarget is not None and max_nontarget < 1:
        raise ValueError(f"all_pair_trials: max_nontarget={max_nontarget}; expected >= 1 or None (score every pair)")
    _, spk = np.unique(np.asarray(speakers), return_inverse=True)
    ia, ib = np.triu_indices(len(ids), k=1)
    target = spk[ia] == spk[ib]
    if not target.any() or target.all():
        raise ValueError(f"all_pair_trials: {len(ids)} utterances of {int(spk.max(initial=-1)) + 1} speaker(s) give "
                         f"{'no target' if not target.any() else 'no non-target'} pairs; need >= 2 speakers, one with >= 2 utterances")
    keep = np.ones(ia.size, dtype=bool)
    non = np.flatnonzero(~target)
    if max_nontarget is not None and non.size > max_nontarget:
        keep[non] = False
        keep[np.random.default_rng(seed).choice(non, size=max_nontarget, replace=False)] = True
    return [Trial(bool(t), ids[a], ids[b]) for t, a, b in zip(target[keep].tolist(), ia[keep].tolist(), ib[keep].tolist())]


def read_trials(path: str | Path, known_ids: set[str] | None = None) -> list[Trial]:
    """Read `<1|0> <utt_a> <utt_b>` lines; with `known_ids`, unknown utterances are an error."""
    path = Path(path)
    trials = []
    for i, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 3 or cols[0] not in ("0", "1"):
            raise ManifestError(f"{path}:{i}: expected '<1|0> <utt_a> <utt_b>', got {line!r}")
        t = Trial(target=cols[0] == "1", a=cols[1], b=cols[2])
        if known_ids is not None:
            for uid in (t.a, t.b):
                if uid not in known_ids:
                    raise ManifestError(f"{path}:{i}: trial names utterance {uid!r}, which is not in the trials split manifest")
        trials.append(t)
    if not trials:
        raise ManifestError(f"{path}: no trials")
    return trials
