"""SynthGRID: determinism, formats, identifiability, content, resume after corruption, splits, trials."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.media import read_video, read_wav
from data.manifest import SPLITS, read_split, read_trials
from data.synthgrid.grammar import GRID_WORDS, espeak_text, sample_sentence
from data.synthgrid.speakers import split_sizes

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=synthgrid", "data.num_speakers=6", "data.utterances_per_speaker=5"]


def _prepare(data_dir: Path, *overrides: str) -> Path:
    cmd = [sys.executable, "-m", "scripts.prepare_data", *SMALL, f"paths.data_dir={data_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data_dir / "synthgrid"


def _corpus_hashes(corpus: Path) -> dict[str, str]:
    """Every file of the corpus except the stage record in prepare/ (timings, paths)."""
    return {
        str(p.relative_to(corpus)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(corpus.rglob("*"))
        if p.is_file() and "prepare" not in p.relative_to(corpus).parts
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    a = _prepare(tmp_path_factory.mktemp("sg_a"), "data.num_workers=2")
    b = _prepare(tmp_path_factory.mktemp("sg_b"), "data.num_workers=1")
    return a, b


@pytest.fixture(scope="module")
def corpus(corpora) -> Path:
    return corpora[0]


def _all_utterances(corpus: Path):
    seen, out = set(), []
    for split in SPLITS:
        for u in read_split(corpus, split):
            if u.id not in seen:
                seen.add(u.id)
                out.append(u)
    return out


# ----------------------------------------------------------------------------- determinism and format
def test_same_seed_gives_identical_bytes_regardless_of_worker_count(corpora):
    a, b = corpora
    ha, hb = _corpus_hashes(a), _corpus_hashes(b)
    assert len(ha) == 2 * 30 + 3 * len(SPLITS) + 4  # media, manifests, trials + speakers + meta + checksums
    assert ha == hb
    assert (a / "prepare" / "metrics.json").is_file() and (a / "prepare" / "config.yaml").is_file()


def test_files_open_with_expected_rates_shapes_and_lengths(corpus):
    utts = _all_utterances(corpus)
    assert len(utts) == 30
    for u in utts:
        audio = read_wav(u.audio, expected_rate=16000)
        video = read_video(u.video, expected_fps=25.0)
        assert video.shape == (u.n_frames, 96, 96) and video.dtype == np.uint8
        assert len(audio) == u.n_samples == u.n_frames * 640  # audio padded to whole video frames
        assert 1.0 < u.n_samples / 16000 < 5.0


def test_transcripts_use_only_grid_words_in_grammar_order(corpus):
    for u in _all_utterances(corpus):
        words = u.text.split()
        assert len(words) == 6 and all(w in GRID_WORDS for w in words), u.text
    assert len(GRID_WORDS) == 51 and "W" not in GRID_WORDS


def test_splits_are_speaker_disjoint_and_public_shares_train_when_tiny(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    spk = {s: {u.speaker for u in read_split(corpus, s)} for s in SPLITS}
    own = [s for s in SPLITS if s != "public"]
    for i, s in enumerate(own):
        assert spk[s], s
        for t in own[i + 1 :]:
            assert not spk[s] & spk[t], (s, t)
    assert len(spk["attacker_trials"]) == 2
    assert meta["public_shares_train_speakers"] is True and spk["public"] == spk["train"]


def test_trials_balanced_and_within_trial_speakers(corpus):
    ids = {u.id: u.speaker for u in read_split(corpus, "attacker_trials")}
    trials = read_trials(corpus / "manifests" / "trials.txt", known_ids=set(ids))
    target = [t for t in trials if t.target]
    assert len(target) == len(trials) - len(target) == 2 * 20  # 2 speakers x trials_per_speaker / 2
    assert all((ids[t.a] == ids[t.b]) == t.target and t.a != t.b for t in trials)


# ----------------------------------------------------------------------------- identity and content
def _split_known_speakers(corpus: Path, feats: dict[str, np.ndarray]):
    xtr, ytr, xte, yte = [], [], [], []
    for u in _all_utterances(corpus):
        held_out = int(u.id[-3:]) > 3  # u004, u005 of every speaker are held out
        (xte if held_out else xtr).append(feats[u.id])
        (yte if held_out else ytr).append(u.speaker)
    return np.array(xtr), ytr, np.array(xte), yte


def _speaker_id_accuracy(xtr, ytr, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0)).fit(xtr, ytr)
    return float(clf.score(xte, yte))


def test_speaker_identifiable_from_audio_mfcc(corpus):
    from python_speech_features import mfcc

    feats = {}
    for u in _all_utterances(corpus):
        m = mfcc(read_wav(u.audio), samplerate=16000, numcep=13, nfft=512)
        feats[u.id] = np.concatenate([m.mean(0), m.std(0)])
    acc = _speaker_id_accuracy(*_split_known_speakers(corpus, feats))
    assert acc >= 0.75, acc  # chance = 1/6


def test_speaker_identifiable_from_video(corpus):
    feats = {}
    for u in _all_utterances(corpus):
        v = read_video(u.video).astype(np.float32).mean(0)
        feats[u.id] = v.reshape(12, 8, 12, 8).mean(axis=(1, 3)).ravel()  # 12x12 mean frame
    acc = _speaker_id_accuracy(*_split_known_speakers(corpus, feats))
    assert acc >= 0.75, acc


def test_mouth_opening_follows_speech_energy(corpus):
    """Dark (open-mouth) area per frame correlates with the audio energy of that frame."""
    rs = []
    for u in _all_utterances(corpus):
        audio = read_wav(u.audio)
        energy = np.log(np.square(audio.reshape(u.n_frames, 640)).mean(1) + 1e-8)
        video = read_video(u.video).astype(np.float32)
        dark = (video < 45).sum(axis=(1, 2)).astype(np.float64)
        if dark.std() > 0:
            rs.append(np.corrcoef(dark, energy)[0, 1])
    assert len(rs) >= 25 and np.mean(rs) > 0.3, (np.mean(rs), np.min(rs))


# ----------------------------------------------------------------------------- resume and bad input
def test_corrupt_files_are_detected_and_regenerated_on_rerun(corpus, tmp_path):
    from data.synthgrid import generate_corpus
    from hydra import compose, initialize_config_dir

    import training.config  # noqa: F401

    copy = tmp_path / "synthgrid"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("prepare"))
    original = _corpus_hashes(copy)
    wav, mp4 = copy / "audio/s02/s02_u003.wav", copy / "video/s03/s03_u001.mp4"
    wav.write_bytes(b"RIFF-not-really-a-wav" + bytes(100))
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, f"paths.data_dir={tmp_path}"])
    stats = generate_corpus(cfg, copy, num_workers=0, progress=False)
    assert stats["generated"] == 2 and stats["kept"] == 28
    assert _corpus_hashes(copy) == original


def test_edited_but_decodable_wav_is_detected_by_checksum(corpus, tmp_path):
    """A wav that still decodes but whose bytes changed is caught by checksums.sha256."""
    from data.synthgrid import SynthGridParams, generate_corpus

    copy = tmp_path / "synthgrid"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("prepare"))
    original = _corpus_hashes(copy)
    wav = copy / "audio/s01/s01_u002.wav"
    data = bytearray(wav.read_bytes())
    data[-100:] = bytes(100)  # silence the tail: still a valid 16 kHz wav of the right length
    wav.write_bytes(bytes(data))
    params = SynthGridParams(num_speakers=6, utterances_per_speaker=5)
    stats = generate_corpus(params, copy, num_workers=0, progress=False)
    assert stats["generated"] == 1
    assert _corpus_hashes(copy) == original


# ----------------------------------------------------------------------------- units
def test_split_sizes_default_scaled_and_minimum():
    req = {"public": 12, "train": 12, "valid": 2, "test": 4, "attacker_train": 12, "attacker_trials": 8}
    assert split_sizes(50, req) == (req, False)
    sizes, shared = split_sizes(20, req)
    assert sum(sizes.values()) == 20 and not shared
    assert all(sizes[s] >= 1 for s in SPLITS) and sizes["attacker_trials"] >= 2
    assert sizes["public"] > sizes["valid"]
    sizes, shared = split_sizes(6, req)
    assert shared and sizes["public"] == 0 and sizes["attacker_trials"] == 2 and sum(sizes.values()) == 6
    with pytest.raises(ValueError, match="at least 6 speakers"):
        split_sizes(5, req)
    with pytest.raises(ValueError, match="missing"):
        split_sizes(50, {"train": 3})


def test_grammar_sampling_is_seeded_and_letters_are_spoken_as_names():
    a = [sample_sentence(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert espeak_text(["BIN", "BLUE", "AT", "A", "ONE", "NOW"]) == "bin blue at [['eI]] one now"
    with pytest.raises(ValueError, match="not a GRID word"):
        espeak_text(["HELLO"])


def test_espeak_synthesis_is_deterministic_with_ordered_phoneme_events():
    from data.synthgrid.tts import ESPEAK_RATE, Espeak

    from data.synthgrid import generate

    tts = generate._espeak()
    assert isinstance(tts, Espeak)
    first = tts.synthesize("bin blue at [['eI]] one now", "en+m3", 170, 50, 50, seed=5)
    tts.synthesize("set red by Q nine please", "en+klatt", 150, 30, 60, seed=9)  # must not leak state
    again = tts.synthesize("bin blue at [['eI]] one now", "en+m3", 170, 50, 50, seed=5)
    assert np.array_equal(first.samples, again.samples) and first.phonemes == again.phonemes
    times = [t for t, _ in first.phonemes]
    assert times == sorted(times) and times[-1] <= len(first.samples) / ESPEAK_RATE + 0.05
    names = [n for _, n in first.phonemes]
    assert names[:3] == ["b", "I", "n"] and "eI" in names


def test_larger_population_appends_train_speakers_and_keeps_every_other_file(tmp_path):
    """data.extra_train_speakers / train_utterances_per_speaker (synthgrid_population_1600): the extra train
    speakers come after the public block, so public, test and the other splits keep their speakers and files,
    and a copy of the smaller corpus is reused (only the new speakers' utterances are synthesised)."""
    from data.synthgrid import SynthGridParams, generate_corpus

    splits = {"public": 2, "train": 2, "valid": 1, "test": 1, "attacker_train": 1, "attacker_trials": 2}
    small = SynthGridParams(num_speakers=9, utterances_per_speaker=3, public_utterances_per_speaker=4, splits=splits,
                            audio_only=True)
    generate_corpus(small, tmp_path / "small", num_workers=0, progress=False)
    shutil.copytree(tmp_path / "small", tmp_path / "large", ignore=shutil.ignore_patterns("prepare"))
    large = SynthGridParams(num_speakers=12, utterances_per_speaker=3, public_utterances_per_speaker=4, splits=splits,
                            audio_only=True, train_utterances_per_speaker=2, extra_train_speakers=3)
    stats = generate_corpus(large, tmp_path / "large", num_workers=0, progress=False)
    assert stats["generated"] == 3 * 2  # the 3 new speakers x 2 utterances; everything else is kept
    for split in SPLITS:
        a = {u.id for u in read_split(tmp_path / "small", split)}
        b = {u.id for u in read_split(tmp_path / "large", split)}
        if split == "train":
            assert b == {f"{s}/{s}_u00{i}" for s in ("s01", "s02", "s10", "s11", "s12") for i in (1, 2)}
            assert b - {f"s1{i}/s1{i}_u00{j}" for i in (0, 1, 2) for j in (1, 2)} < a
        else:
            assert a == b, split
    from data.synthgrid.generate import _read_checksums

    small_sums, large_sums = _read_checksums(tmp_path / "small"), _read_checksums(tmp_path / "large")
    shared = [k for k in large_sums if k in small_sums]  # public 2 x 4, train 2 x 2, the other 5 speakers x 3
    assert len(shared) == 2 * 4 + 2 * 2 + 5 * 3 and all(small_sums[k] == large_sums[k] for k in shared)
    assert len(large_sums) == len(shared) + 3 * 2
    with pytest.raises(ValueError, match="extra_train_speakers=12"):
        SynthGridParams(num_speakers=12, extra_train_speakers=12).validate()
    with pytest.raises(ValueError, match="train_utterances_per_speaker=0"):
        SynthGridParams(train_utterances_per_speaker=0).validate()


def test_larger_test_set_appends_test_speakers_and_keeps_every_other_speaker_and_file(tmp_path):
    """data.extra_test_speakers (synthgrid_population_6400_test200): the extra test speakers come last, so every
    other split keeps its speakers and utterances, and the smaller corpus's test speakers stay first."""
    from data.synthgrid import SynthGridParams, generate_corpus
    from data.synthgrid.generate import _read_checksums
    from data.synthgrid.speakers import assign_splits, make_speakers

    splits = {"public": 2, "train": 2, "valid": 1, "test": 1, "attacker_train": 1, "attacker_trials": 2}
    small = SynthGridParams(num_speakers=11, utterances_per_speaker=3, public_utterances_per_speaker=4, splits=splits,
                            audio_only=True, train_utterances_per_speaker=2, extra_train_speakers=2)
    generate_corpus(small, tmp_path / "small", num_workers=0, progress=False)
    shutil.copytree(tmp_path / "small", tmp_path / "large", ignore=shutil.ignore_patterns("prepare"))
    large = SynthGridParams(num_speakers=14, utterances_per_speaker=3, public_utterances_per_speaker=4, splits=splits,
                            audio_only=True, train_utterances_per_speaker=2, extra_train_speakers=2, extra_test_speakers=3)
    stats = generate_corpus(large, tmp_path / "large", num_workers=0, progress=False)
    assert stats["generated"] == 3 * 3  # the 3 new test speakers x 3 utterances
    for split in SPLITS:
        a = [u.id for u in read_split(tmp_path / "small", split)]
        b = [u.id for u in read_split(tmp_path / "large", split)]
        if split == "test":
            assert b[: len(a)] == a and b[len(a):] == [f"s{s}/s{s}_u00{i}" for s in (12, 13, 14) for i in (1, 2, 3)]
        else:
            assert a == b, split
    small_sums, large_sums = _read_checksums(tmp_path / "small"), _read_checksums(tmp_path / "large")
    assert all(large_sums[k] == v for k, v in small_sums.items()) and len(large_sums) == len(small_sums) + 9
    # the split plan alone: nothing but the test split changes
    a, _ = assign_splits(make_speakers(1, 11), splits, 2)
    b, _ = assign_splits(make_speakers(1, 14), splits, 2, 3)
    assert {k: v for k, v in b.items() if k != "test"} == {k: v for k, v in a.items() if k != "test"}
    assert b["test"] == a["test"] + ["s12", "s13", "s14"]
    with pytest.raises(ValueError, match="extra_test_speakers=12"):
        SynthGridParams(num_speakers=14, extra_train_speakers=2, extra_test_speakers=12).validate()


def test_population_grown_after_the_extra_test_speakers_keeps_the_test_set_and_every_file(tmp_path):
    """data.extra_train_speakers_after_test (synthgrid_population_25600_test200): more train speakers after the
    extra test speakers, so a larger population keeps the test set (speakers and files) of the corpus with extra
    test speakers, its training speakers first in the same order, and reuses its files."""
    from data.synthgrid import SynthGridParams, generate_corpus
    from data.synthgrid.generate import _read_checksums
    from data.synthgrid.speakers import assign_splits, make_speakers

    splits = {"public": 2, "train": 2, "valid": 1, "test": 1, "attacker_train": 1, "attacker_trials": 2}
    common = dict(utterances_per_speaker=3, public_utterances_per_speaker=4, splits=splits, audio_only=True,
                  train_utterances_per_speaker=2, extra_train_speakers=2, extra_test_speakers=3)
    small = SynthGridParams(num_speakers=14, **common)
    generate_corpus(small, tmp_path / "small", num_workers=0, progress=False)
    shutil.copytree(tmp_path / "small", tmp_path / "large", ignore=shutil.ignore_patterns("prepare"))
    large = SynthGridParams(num_speakers=16, extra_train_speakers_after_test=2, **common)
    stats = generate_corpus(large, tmp_path / "large", num_workers=0, progress=False)
    assert stats["generated"] == 2 * 2  # the 2 new train speakers x 2 utterances; everything else is kept
    for split in SPLITS:
        a = [u.id for u in read_split(tmp_path / "small", split)]
        b = [u.id for u in read_split(tmp_path / "large", split)]
        if split == "train":
            assert b[: len(a)] == a and b[len(a):] == [f"s{s}/s{s}_u00{i}" for s in (15, 16) for i in (1, 2)]
        else:
            assert a == b, split
    small_sums, large_sums = _read_checksums(tmp_path / "small"), _read_checksums(tmp_path / "large")
    assert all(large_sums[k] == v for k, v in small_sums.items()) and len(large_sums) == len(small_sums) + 4
    meta = json.loads((tmp_path / "large" / "meta.json").read_text())
    assert meta["extra_train_speakers_after_test"] == 2 and meta["split_speakers"]["train"][-2:] == ["s15", "s16"]
    # the split plan alone: without the option it is the old plan; with it only train grows, at its end
    a, _ = assign_splits(make_speakers(1, 14), splits, 2, 3)
    b, _ = assign_splits(make_speakers(1, 16), splits, 2, 3, 2)
    assert {k: v for k, v in b.items() if k != "train"} == {k: v for k, v in a.items() if k != "train"}
    assert b["train"] == a["train"] + ["s15", "s16"]
    with pytest.raises(ValueError, match="extra_train_speakers_after_test=12"):
        SynthGridParams(num_speakers=16, extra_train_speakers=2, extra_test_speakers=2, extra_train_speakers_after_test=12).validate()
