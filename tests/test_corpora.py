"""Real-corpus preparation (data/corpora) on small fixtures in each corpus's published layout.

The fixtures are real containers written with PyAV (H.264 + AAC mp4 for LRS3/VoxCeleb2,
MPEG-1 + MP2 .mpg for GRID) with transcripts / align files / trial lists in the real syntax.
ROI: the `center` method (no face detection) keeps these fast; the dlib path is covered by
tests/test_roi.py and the slow end-to-end test at the bottom.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.media import read_video, read_wav
from data.manifest import read_split, read_trials
from training.config import DataConfig

TONE_HZ = 440.0


def write_av(path: Path, n_frames: int, fps: float = 25, size=(112, 112), audio_rate: int = 48000, audio: bool = True,
             seconds_audio: float | None = None, frames: np.ndarray | None = None) -> None:  # fmt: skip
    """A real container with a video stream (moving gradient) and a 440 Hz tone audio stream."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    mpg = path.suffix == ".mpg"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mpeg" if mpg else "mp4") as c:
        vs = c.add_stream("mpeg1video" if mpg else "libx264", rate=rate)
        vs.height, vs.width = size
        vs.pix_fmt = "yuv420p"
        if mpg:
            vs.bit_rate = 2_000_000
        if audio:
            as_ = c.add_stream("mp2" if mpg else "aac", rate=audio_rate)
            as_.layout = "stereo" if mpg else "mono"
        yy, xx = np.mgrid[: size[0], : size[1]]
        for i in range(n_frames):
            img = frames[i] if frames is not None else np.stack([(xx * 2 + i * 3) % 256, (yy * 2) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = None
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio:
            n = int(round((seconds_audio if seconds_audio is not None else n_frames / fps) * audio_rate))
            t = np.arange(n) / audio_rate
            tone = (0.3 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
            chunk = as_.codec_context.frame_size or 1024
            for k, start in enumerate(range(0, n, chunk)):
                block = tone[start : start + chunk]
                data = np.repeat(block[None], 2, 0) if mpg else block[None]
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="fltp", layout=as_.layout.name)
                af.sample_rate = audio_rate
                af.pts = start
                for p in as_.encode(af):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)


def make_cfg(name: str, raw: Path, out: Path, **overrides) -> OmegaConf:
    data = OmegaConf.structured(DataConfig)
    data = OmegaConf.merge(data, {"name": name, "dir": str(out), "raw_dir": str(raw), "roi_method": "center", "num_workers": 0,
                                  "trials_per_speaker": 4, **overrides})  # fmt: skip
    return OmegaConf.create({"data": data})


def dominant_hz(wav: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spec) * rate / len(wav))


# ----------------------------------------------------------------------------- GRID
GRID_ALIGN = "0 23750 sil\n23750 29500 bin\n29500 34000 blue\n34000 35500 at\n35500 41000 f\n41000 47250 two\n47250 53000 now\n53000 74500 sp\n"


def grid_fixture(raw: Path, speakers=("s1", "s3", "s23", "s30", "s31"), per_speaker: int = 2) -> None:
    for k, spk in enumerate(speakers):
        for j in range(per_speaker):
            uid = f"bba{k}{j}n"
            nested = k % 2 == 1  # both published layouts
            video = raw / spk / ("video/mpg_6000" if nested else "") / f"{uid}.mpg"
            write_av(video, n_frames=20, audio_rate=44100)
            align = (raw / "align" / spk if nested else raw / spk / "align") / f"{uid}.align"
            align.parent.mkdir(parents=True, exist_ok=True)
            align.write_text(GRID_ALIGN)


GRID_SPLITS = {"test": ["s1"], "valid": ["s23"], "attacker_trials": ["s30", "s31"]}


def test_grid_manifests_durations_and_splits(tmp_path):
    from data.corpora import grid

    raw, out = tmp_path / "raw", tmp_path / "out"
    grid_fixture(raw)
    metrics = grid.prepare(make_cfg("grid", raw, out, split_speakers=GRID_SPLITS))
    spk_of = {}
    for split, speakers in {"train": {"s3"}, "public": {"s3"}, "test": {"s1"}, "valid": {"s23"}, "attacker_trials": {"s30", "s31"}, "attacker_train": set()}.items():
        utts = read_split(out, split)
        assert {u.speaker for u in utts} == speakers, split
        for u in utts:
            spk_of[u.id] = u.speaker
            assert u.text == "BIN BLUE AT F TWO NOW"  # sil/sp dropped, upper-cased
            assert u.id.startswith(u.speaker + "/")
            frames = read_video(u.video)
            wav = read_wav(u.audio)
            assert frames.shape == (u.n_frames, 96, 96) and abs(u.n_frames - 20) <= 1
            assert len(wav) == u.n_samples == u.n_frames * 640
            assert abs(dominant_hz(wav[: 12800]) - TONE_HZ) < 5  # 44.1 kHz MP2 -> 16 kHz, same tone
    trials = read_trials(out / "manifests" / "trials.txt", known_ids={u.id for u in read_split(out, "attacker_trials")})
    assert {t.target for t in trials} == {True, False}
    for t in trials:
        assert (spk_of[t.a] == spk_of[t.b]) == t.target
    rows = dict(line.split("\t") for line in (out / "manifests" / "speakers.tsv").read_text().splitlines()[1:])
    assert rows == {"s1": "test", "s3": "train", "s23": "valid", "s30": "attacker_trials", "s31": "attacker_trials"}
    assert metrics["utterances"] == 10 and metrics["skipped/total"] == 0
    assert json.loads((out / "prepare" / "metrics.json").read_text())["utterances"] == 10
    assert json.loads((out / "meta.json").read_text())["corpus"] == "grid"


def test_grid_default_split_is_lipnet_unseen_speakers():
    from data.corpora.grid import DEFAULT_SPLIT_SPEAKERS, assign_splits
    from data.corpora.common import SourceItem

    items = [SourceItem(f"s{i}/x", f"s{i}", "/v.mpg", "BIN") for i in range(1, 35) if i != 21]
    splits = assign_splits(items, DEFAULT_SPLIT_SPEAKERS)
    assert sorted({it.speaker for it in splits["test"]}) == ["s1", "s2", "s20", "s22"]
    assert sum(len(v) for k, v in splits.items() if k != "public") == 33  # every speaker exactly once
    yaml_splits = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "grid.yaml").split_speakers
    assert OmegaConf.to_container(yaml_splits) == DEFAULT_SPLIT_SPEAKERS
    with pytest.raises(ValueError, match="s1 is in both"):
        assign_splits(items, {"test": ["s1"], "valid": ["s1"]})


def test_grid_align_units_and_bad_align(tmp_path):
    from data.corpora.common import CorpusError
    from data.corpora.grid import read_align

    p = tmp_path / "a.align"
    p.write_text(GRID_ALIGN)
    text, end = read_align(p)
    assert text == "BIN BLUE AT F TWO NOW" and end == pytest.approx(74500 / 25000)  # 2.98 s: a 75-frame video
    p.write_text("0 23750 sil\n23750 bin\n")
    with pytest.raises(CorpusError, match=r"a.align:2"):
        read_align(p)
    p.write_text("0 100 bin\n100 200 blue2\n")
    with pytest.raises(CorpusError, match=r"a.align.*outside A-Z"):
        read_align(p)


# ----------------------------------------------------------------------------- LRS3
def lrs3_txt(words: str) -> str:
    ws = words.split()
    return f"Text:  {words}\nConf:  4\n\nWORD START END ASDSCORE\n" + "".join(f"{w} {0.1 * i:.2f} {0.1 * i + 0.1:.2f} 3.1\n" for i, w in enumerate(ws))


def lrs3_fixture(raw: Path) -> None:
    layout = {"pretrain": {"talkA": 2, "talkB": 1, "talkC": 2, "talkP": 1}, "trainval": {"talkA": 2, "talkB": 2, "talkC": 1}, "test": {"talkT": 2}}
    for part, talks in layout.items():
        for talk, n in talks.items():
            for j in range(n):
                clip = raw / part / talk / f"5000{j}.mp4"
                write_av(clip, n_frames=15 + j)
                clip.with_suffix(".txt").write_text(lrs3_txt("it's the first time"))


def test_lrs3_subsets_and_speaker_disjoint_valid(tmp_path):
    from data.corpora import lrs3

    raw = tmp_path / "raw"
    lrs3_fixture(raw)
    out30 = tmp_path / "lrs3_30h"
    m = lrs3.prepare(make_cfg("lrs3", raw, out30, subset="30h", valid_utterances=1))
    s = {split: read_split(out30, split) for split in ("public", "train", "valid", "test", "attacker_train")}
    valid_talks = {u.speaker for u in s["valid"]}
    assert len(valid_talks) == 1 and valid_talks < {"talkA", "talkB", "talkC"}
    assert all(u.id.startswith("trainval/") for u in s["train"] + s["valid"])
    assert {u.speaker for u in s["train"]} == {"talkA", "talkB", "talkC"} - valid_talks
    assert [u.id for u in s["test"]] == ["test/talkT/50000", "test/talkT/50001"]
    assert {u.speaker for u in s["public"]} == {"talkP"}  # pretrain talks in no fine-tuning split
    assert s["attacker_train"] == []
    for u in s["test"]:
        assert u.text == "IT'S THE FIRST TIME"
        assert u.n_frames == int(u.id[-1]) + 15 and u.n_samples == u.n_frames * 640
    assert m["split/train/utterances"] == len(s["train"])

    out433 = tmp_path / "lrs3_433h"
    lrs3.prepare(make_cfg("lrs3", raw, out433, subset="433h", valid_utterances=1))
    train = read_split(out433, "train")
    assert {u.id.split("/")[0] for u in train} == {"pretrain", "trainval"}
    assert not {u.speaker for u in train} & {u.speaker for u in read_split(out433, "valid")}
    assert {u.speaker for u in train}.isdisjoint({"talkT"})
    with pytest.raises(ValueError, match="data.subset='100h'"):
        lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "x", subset="100h"))


def test_lrs3_bad_transcripts_raise_or_skip(tmp_path):
    from data.corpora import lrs3
    from data.corpora.common import CorpusError

    raw = tmp_path / "raw"
    write_av(raw / "test" / "t1" / "00001.mp4", 10)
    (raw / "test" / "t1" / "00001.txt").write_text(lrs3_txt("hello world"))
    write_av(raw / "test" / "t1" / "00002.mp4", 10)  # no transcript
    write_av(raw / "test" / "t1" / "00003.mp4", 10)
    (raw / "test" / "t1" / "00003.txt").write_text(lrs3_txt("caf\u00e9 {LG} 42"))
    with pytest.raises(CorpusError, match=r"00002.txt: transcript not found"):
        lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "o1"))
    (raw / "test" / "t1" / "00002.txt").write_text(lrs3_txt("fine"))
    with pytest.raises(CorpusError, match=r"00003.txt.*outside A-Z"):
        lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "o2"))
    (raw / "test" / "t1" / "00002.txt").unlink()
    m = lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "o3", on_error="skip"))
    assert m["skipped/missing_transcript"] == 1 and m["skipped/bad_transcript"] == 1
    assert [u.text for u in read_split(tmp_path / "o3", "test")] == ["HELLO WORLD"]
    saved = json.loads((tmp_path / "o3" / "prepare" / "metrics.json").read_text())
    assert saved["skipped/total"] == 2


# ----------------------------------------------------------------------------- bad media, fps, resume
def test_bad_media_raise_or_skip_and_fps_resampling(tmp_path):
    from data.corpora import lrs3
    from data.corpora.common import CorpusError

    raw, d = tmp_path / "raw", tmp_path / "raw" / "test" / "t1"
    write_av(d / "00001.mp4", 25, fps=30)  # 30 fps: resampled to 25 (~21 frames for 25/30 s)
    write_av(d / "00002.mp4", 10, audio=False)
    write_av(d / "00003.mp4", 10)
    data = (d / "00003.mp4").read_bytes()
    (d / "00003.mp4").write_bytes(data[: len(data) // 2])  # truncated (moov atom lost)
    for i in (1, 2, 3):
        (d / f"0000{i}.txt").write_text(lrs3_txt("hello"))
    with pytest.raises(CorpusError, match=r"00002.mp4: no audio stream"):
        lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "o1"))
    m = lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "o2", on_error="skip"))
    assert m["skipped/bad_media"] == 2 and m["resampled_fps_videos"] == 1
    (u,) = read_split(tmp_path / "o2", "test")
    assert u.id == "test/t1/00001" and u.n_frames == round(25 / 30 * 25) and len(read_video(u.video)) == u.n_frames


def test_decode_media_resamples_by_timestamps(tmp_path):
    from data.corpora.common import decode_media

    n = 30
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    for i in range(n):
        frames[i] = i * 8  # brightness encodes the source frame index
    write_av(tmp_path / "a.mp4", n, fps=50, size=(64, 64), frames=frames)
    media = decode_media(tmp_path / "a.mp4")
    assert media.resampled and media.source_fps == pytest.approx(50)
    assert len(media.frames) == 15  # 0.6 s at 25 fps
    src = np.rint(media.frames[:, 32, 32, 0] / 8).astype(int)
    assert src.tolist() == list(range(0, 30, 2))  # every second source frame
    assert abs(len(media.audio) - 0.6 * 16000) < 1600


def test_resume_keeps_valid_outputs_and_redoes_broken_ones(tmp_path):
    from data.corpora import grid

    raw, out = tmp_path / "raw", tmp_path / "out"
    grid_fixture(raw, speakers=("s1", "s30", "s31"), per_speaker=2)
    cfg = make_cfg("grid", raw, out, split_speakers=GRID_SPLITS)
    grid.prepare(cfg)
    vids = sorted((out / "video").rglob("*.mp4"))
    stamps = {p: p.stat().st_mtime_ns for p in vids}
    vids[0].write_bytes(b"broken")  # a damaged output is made again
    m = grid.prepare(cfg)
    assert m["utterances_kept"] == 5 and m["utterances_prepared"] == 1
    assert all(p.stat().st_mtime_ns == stamps[p] for p in vids[1:])
    assert read_video(vids[0]).shape[1:] == (96, 96)
    # another ROI setting invalidates every ROI video
    m = grid.prepare(make_cfg("grid", raw, out, split_speakers=GRID_SPLITS, roi_size=64))
    assert m["utterances_prepared"] == 6 and read_video(vids[1]).shape[1:] == (64, 64)
    assert not list(out.rglob("*.tmp*"))


# ----------------------------------------------------------------------------- VoxCeleb2
def vox_fixture(raw: Path) -> None:
    for part, speakers in {"dev": ("id00012", "id00015"), "test": ("id00017", "id00018")}.items():
        for spk in speakers:
            for clip in ("abcDEF12345", "xyz_-987654"):
                write_av(raw / part / "mp4" / spk / clip / "00001.mp4", 8)


def test_voxceleb2_splits_and_official_trials(tmp_path):
    from data.corpora import voxceleb2
    from data.corpora.common import CorpusError

    raw = tmp_path / "raw"
    vox_fixture(raw)
    lst = tmp_path / "list.txt"
    lst.write_text("1 id00017/abcDEF12345/00001.wav id00017/xyz_-987654/00001.wav\n0 id00017/abcDEF12345/00001.wav test/mp4/id00018/xyz_-987654/00001.mp4\n")
    out = tmp_path / "out"
    m = voxceleb2.prepare(make_cfg("voxceleb2", raw, out, trials_file=str(lst), num_workers=2))
    at, trials_split = read_split(out, "attacker_train"), read_split(out, "attacker_trials")
    assert {u.speaker for u in at} == {"id00012", "id00015"} and [u.id for u in read_split(out, "public")] == [u.id for u in at]
    assert {u.speaker for u in trials_split} == {"id00017", "id00018"}
    assert read_split(out, "train") == [] and all(u.text == "<none>" for u in at)
    assert "dev/id00012/abcDEF12345/00001" in {u.id for u in at}
    trials = read_trials(out / "manifests" / "trials.txt", known_ids={u.id for u in trials_split})
    assert [(t.target, t.a, t.b) for t in trials] == [
        (True, "test/id00017/abcDEF12345/00001", "test/id00017/xyz_-987654/00001"),
        (False, "test/id00017/abcDEF12345/00001", "test/id00018/xyz_-987654/00001"),
    ]
    assert m["trials/target"] == 1

    lst.write_text(lst.read_text() + "1 id00017/abcDEF12345/00001.wav id00099/nope/00001.wav\n")
    with pytest.raises(CorpusError, match=r"list.txt:3: names id00099/nope/00001.wav"):
        voxceleb2.prepare(make_cfg("voxceleb2", raw, tmp_path / "o2", trials_file=str(lst)))
    m = voxceleb2.prepare(make_cfg("voxceleb2", raw, out, trials_file=str(lst), on_error="skip"))
    assert m["skipped/trial_missing_file"] == 1 and m["trials/target"] + m["trials/nontarget"] == 2
    assert m["utterances_kept"] == 8  # resumed

    m = voxceleb2.prepare(make_cfg("voxceleb2", raw, out))  # no list: balanced generated trials
    trials = read_trials(out / "manifests" / "trials.txt")
    assert m["trials/target"] == m["trials/nontarget"] == 4


def test_missing_face_utterances_are_skipped_and_counted(tmp_path):
    from data.corpora import grid

    raw = tmp_path / "raw"
    grid_fixture(raw, speakers=("s1",), per_speaker=1)
    m = grid.prepare(make_cfg("grid", raw, tmp_path / "out", roi_method="dlib_hog", split_speakers={"test": ["s1"]}))
    assert m["skipped/missing_face"] == 1 and m["utterances"] == 0  # a gradient has no face
    assert read_split(tmp_path / "out", "test") == []


def test_raw_dir_errors(tmp_path):
    from data.corpora import grid, voxceleb2
    from data.corpora.common import CorpusError

    with pytest.raises(CorpusError, match="data.raw_dir is not set"):
        grid.prepare(make_cfg("grid", tmp_path, tmp_path / "o", raw_dir=None))
    with pytest.raises(CorpusError, match="no GRID videos found"):
        grid.prepare(make_cfg("grid", tmp_path, tmp_path / "o"))
    with pytest.raises(CorpusError, match="no VoxCeleb2 videos found"):
        voxceleb2.prepare(make_cfg("voxceleb2", tmp_path, tmp_path / "o"))


# ----------------------------------------------------------------------------- end to end with dlib
@pytest.mark.slow
def test_lrs3_end_to_end_with_dlib_cnn_on_a_real_face(tmp_path):
    from skimage.data import astronaut
    from skimage.transform import resize

    from data.corpora import lrs3

    image = astronaut()
    frames = []
    for i in range(12):  # a 224x224 face track (LRS3 framing) drifting by a pixel per frame
        window = image[10 + i : 250 + i, 95 + i : 335 + i]
        frames.append(np.clip(np.rint(resize(window, (224, 224), preserve_range=True)), 0, 255).astype(np.uint8))
    raw = tmp_path / "raw"
    write_av(raw / "test" / "astro" / "00001.mp4", 12, size=(224, 224), frames=np.stack(frames))
    (raw / "test" / "astro" / "00001.txt").write_text(lrs3_txt("hello"))
    m = lrs3.prepare(make_cfg("lrs3", raw, tmp_path / "out", roi_method="dlib_cnn", roi_detect_every=4))
    (u,) = read_split(tmp_path / "out", "test")
    roi = read_video(u.video).astype(float)
    assert roi.shape == (12, 96, 96) and m["interpolated_face_frames"] == 0
    assert np.abs(roi[1:] - roi[:-1]).mean() < 12  # stable ROI along the drifting track
