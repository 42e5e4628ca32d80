"""AVSRDataset on a tiny corpus written with data.media / data.manifest: items, determinism, noise, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data import features
from data.dataset import AVSRDataset, DatasetError, build_dataloader, set_loader_epoch
from data.media import read_video, read_wav, write_video, write_wav
from data.manifest import ManifestError, Utterance, manifest_dir, write_split
from data.tokenizer import CharTokenizer

SPF = 640  # audio samples per video frame (16 kHz / 25 fps)
TEXTS = ["BIN BLUE AT F TWO NOW", "PLACE RED IN A ONE SOON", "SET GREEN BY Z NINE AGAIN"]


def _write_utt(root: Path, uid: str, speaker: str, T: int, rng, text: str, n_audio_frames=None, rate=16000) -> Utterance:
    n = (n_audio_frames or T) * SPF
    t = np.arange(n * rate // 16000) / rate
    wav = 0.2 * np.sin(2 * np.pi * (150 + 40 * rng.random()) * t) + 0.02 * rng.standard_normal(len(t))
    write_wav(root / "audio" / f"{uid}.wav", wav.astype(np.float32), rate=rate)
    write_video(root / "video" / f"{uid}.mp4", rng.integers(0, 256, (T, 96, 96), dtype=np.uint8))
    return Utterance(uid, str(root / "video" / f"{uid}.mp4"), str(root / "audio" / f"{uid}.wav"), T, T * SPF, speaker, text)


def _corpus(root: Path, bad: str | None = None) -> tuple[list[Utterance], str]:
    """3 speakers x 2 utterances (8-10 frames), plus one bad utterance `bad_0` of the given kind.
    Returns the utterances and the path the error message has to name."""
    rng = np.random.default_rng(0)
    utts = [_write_utt(root, f"s{s}_{k}", f"spk{s}", 8 + k + s % 2, rng, TEXTS[(s + k) % 3]) for s in range(3) for k in range(2)]
    named = ""
    if bad is not None:
        kwargs = {"n_audio_frames": 20} if bad == "length_mismatch" else {"rate": 8000} if bad == "wrong_rate" else {}
        text = {"empty_transcript": "", "non_vocabulary": "BIN blue"}.get(bad, TEXTS[0])
        u = _write_utt(root, "bad_0", "spk1", 9, rng, text, **kwargs)
        named = u.audio if bad in ("length_mismatch", "wrong_rate", "corrupt_wav", "missing_file", "nan_wav") else u.video
        if bad == "corrupt_wav":
            Path(u.audio).write_bytes(b"RIFF\x00\x00garbage" * 10)
        elif bad == "truncated_mp4":
            data = Path(u.video).read_bytes()
            Path(u.video).write_bytes(data[: len(data) // 2])
        elif bad == "missing_file":
            Path(u.audio).unlink()
        elif bad == "stale_manifest":
            u = Utterance(u.id, u.video, u.audio, 30, u.n_samples, u.speaker, u.text)
            named = str(manifest_dir(root) / "train.tsv")
        elif bad in ("empty_transcript", "non_vocabulary"):
            named = str(manifest_dir(root) / "train.wrd")
        elif bad == "nan_wav":  # a float wav holding NaN (PCM cannot): accepted before, crashed later in the probe
            import soundfile as sf

            wav = read_wav(u.audio)
            wav[100:110] = np.nan
            sf.write(u.audio, wav, 16000, subtype="FLOAT")
        elif bad == "large_frames":  # a 192x192 frame with the mouth in a corner is not a 96x96 mouth ROI
            write_video(u.video, np.zeros((9, 192, 192), dtype=np.uint8))
        utts.insert(3, u)
    write_split(root, "train", utts)
    if bad == "missing_columns":
        tsv = manifest_dir(root) / "train.tsv"
        lines = tsv.read_text().splitlines()
        lines[4] = "\t".join(lines[4].split("\t")[:3])
        tsv.write_text("\n".join(lines) + "\n")
        named = str(tsv)
    return utts, named


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    utts, _ = _corpus(root)
    return root, utts


def test_item_matches_feature_pipeline(corpus):
    root, utts = corpus
    ds = AVSRDataset(root, "train", CharTokenizer(), train=False, return_waveform=True)
    assert len(ds) == 6 and ds.speakers == ["spk0", "spk1", "spk2"] and not ds.skips.total
    u = utts[1]
    item = ds[1]
    wav = read_wav(u.audio)
    frames = read_video(u.video)
    expect_audio = features.normalize_audio(features.align_audio_to_video(features.logfbank_stacked(wav), len(frames)))
    assert item["id"] == u.id and item["speaker_idx"] == 0 and item["text"] == u.text
    assert item["n_frames"] == len(frames) == u.n_frames
    assert item["audio"].shape == (len(frames), 104) and torch.equal(item["audio"], expect_audio)
    expect_video = features.normalize_video(frames[:, 4:92, 4:92])
    assert item["video"].shape == (len(frames), 88, 88) and np.allclose(item["video"].numpy(), expect_video)
    assert torch.equal(item["targets"], torch.tensor(CharTokenizer().encode(u.text)))
    assert np.array_equal(item["waveform"].numpy(), wav)


def test_modalities_and_no_tokenizer(corpus):
    root, _ = corpus
    audio_only = AVSRDataset(root, "train", modalities=("audio",))
    item = audio_only[0]
    assert item["video"] is None and item["targets"] is None and item["audio"].shape[1] == 104
    assert item["n_frames"] == features.num_audio_frames(len(read_wav(audio_only.utterances[0].audio)))
    video_only = AVSRDataset(root, "train", modalities=("video",))
    assert video_only[0]["audio"] is None and video_only[0]["video"].shape[1:] == (88, 88)


def test_train_crops_deterministic_per_epoch_eval_fixed(corpus):
    root, _ = corpus
    ds = AVSRDataset(root, "train", train=True, modalities=("video",), seed=5)
    a = [ds[i]["video"] for i in range(6)]
    assert all(torch.equal(x, ds[i]["video"]) for i, x in enumerate(a))
    ds.set_epoch(1)
    b = [ds[i]["video"] for i in range(6)]
    assert any(not torch.equal(x, y) for x, y in zip(a, b))
    ds.set_epoch(0)
    assert all(torch.equal(x, ds[i]["video"]) for i, x in enumerate(a))
    ev = AVSRDataset(root, "train", train=False, modalities=("video",))
    first = ev[2]["video"]
    ev.set_epoch(3)
    assert torch.equal(first, ev[2]["video"])


@pytest.mark.parametrize("kind,snr", [("white", 10.0), ("babble", 0.0)])
def test_noise_at_requested_snr(corpus, kind, snr):
    root, utts = corpus
    ds = AVSRDataset(root, "train", train=True, return_waveform=True, modalities=("audio",), noise={"type": kind, "snr": snr}, seed=1)
    clean = read_wav(utts[0].audio).astype(np.float64)
    noisy = ds[0]["waveform"].numpy().astype(np.float64)
    measured = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
    assert abs(measured - snr) < 0.01
    assert torch.equal(ds[0]["waveform"], ds[0]["waveform"])
    clean_feats = AVSRDataset(root, "train", modalities=("audio",))[0]["audio"]
    assert not torch.allclose(ds[0]["audio"], clean_feats)


def test_dataloader_batches(corpus):
    root, _ = corpus
    ds = AVSRDataset(root, "train", CharTokenizer(), train=True)
    loader = build_dataloader(ds, "speaker", P=3, K=2, seed=0)
    set_loader_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 1
    b = batches[0]
    assert b["audio"].shape[:2] == (6, 104) and b["video"].shape[:3] == (6, 1, b["lengths"].max())
    assert sorted(b["speaker_idx"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert (b["padding_mask"].sum(1) == b["lengths"].max() - b["lengths"]).all()
    bucket = build_dataloader(ds, "bucket", batch_size=4, train=False)
    assert sorted(i for b in bucket for i in b["ids"]) == sorted(u.id for u in ds.utterances)


BAD_CASES = ["corrupt_wav", "truncated_mp4", "missing_file", "wrong_rate", "length_mismatch", "empty_transcript", "non_vocabulary", "missing_columns",
             "stale_manifest", "nan_wav", "large_frames"]


@pytest.mark.parametrize("bad", BAD_CASES)
def test_bad_input_raises_naming_the_file(tmp_path, bad):
    _, named = _corpus(tmp_path, bad)
    with pytest.raises((DatasetError, ManifestError)) as e:
        AVSRDataset(tmp_path, "train", CharTokenizer(), roi_size=96)
    assert named in str(e.value), str(e.value)
    if bad == "nan_wav":
        assert "NaN" in str(e.value)
    if bad == "large_frames":
        assert "192x192" in str(e.value) and "96x96" in str(e.value) and "data.roi_size" in str(e.value)
    if bad == "non_vocabulary":
        assert "'b'" in str(e.value) and "bad_0" in str(e.value)
    if bad == "wrong_rate":
        assert "8000" in str(e.value) and "16000" in str(e.value)


@pytest.mark.parametrize("bad", BAD_CASES)
def test_bad_input_skipped_and_counted(tmp_path, bad):
    _corpus(tmp_path, bad)
    ds = AVSRDataset(tmp_path, "train", CharTokenizer(), on_error="skip", roi_size=96)
    assert len(ds) == 6 and "bad_0" not in {u.id for u in ds.utterances}
    report = ds.skips.report()
    assert report["skipped/total"] == 1
    assert ds.speakers == ["spk0", "spk1", "spk2"]
    assert [ds[i]["id"] for i in range(len(ds))]  # the survivors load


def test_too_many_skips_fail_the_split_naming_the_limit(tmp_path):
    _corpus(tmp_path, "truncated_mp4")  # 1 of 7 utterances broken
    with pytest.raises(DatasetError, match=r"1 of 7 utterances skipped .*data.max_skip_fraction=0.1") as e:
        AVSRDataset(tmp_path, "train", CharTokenizer(), on_error="skip", max_skip_fraction=0.1)
    assert e.value.reason == "too_many_skips"
    assert len(AVSRDataset(tmp_path, "train", CharTokenizer(), on_error="skip", max_skip_fraction=0.2)) == 6


def test_keep_only_aligns_an_audio_dataset_with_the_video_one(tmp_path):
    """Fine-tuning and evaluation with cached video front-ends read audio and video through two
    datasets; an utterance whose video the video dataset skipped must leave the audio one too,
    counted under the video's reason (it used to stay and crash with a bare KeyError)."""
    _corpus(tmp_path, "truncated_mp4")
    video = AVSRDataset(tmp_path, "train", None, modalities=("video",), on_error="skip")
    audio = AVSRDataset(tmp_path, "train", None, modalities=("audio",), on_error="skip", cache_items=True)
    assert len(audio) == 7 and video.skipped == {"bad_0": "corrupt_video"}
    audio[3]  # cached items are indexed by position: they must be dropped when positions shift
    audio.keep_only({u.id for u in video.utterances}, video.skipped, what="the video front-end cache")
    assert [u.id for u in audio.utterances] == [u.id for u in video.utterances]
    assert audio.skips.report() == {"skipped/corrupt_video": 1, "skipped/total": 1}
    assert [audio[i]["id"] for i in range(len(audio))] == [u.id for u in audio.utterances]
    with pytest.raises(DatasetError, match="max_skip_fraction"):
        strict = AVSRDataset(tmp_path, "train", None, modalities=("audio",), on_error="skip", max_skip_fraction=0.1)
        strict.keep_only({u.id for u in video.utterances}, video.skipped)


def test_non_utf8_transcript_names_the_file(tmp_path):
    _corpus(tmp_path)
    wrd = manifest_dir(tmp_path) / "train.wrd"
    wrd.write_bytes(wrd.read_bytes().replace(b"BLUE", "BL\u00dcE".encode("latin-1"), 1))
    for on_error in ("raise", "skip"):
        with pytest.raises(ManifestError) as e:
            AVSRDataset(tmp_path, "train", CharTokenizer(), on_error=on_error)
        assert str(wrd) in str(e.value) and "UTF-8" in str(e.value) and "0xdc" in str(e.value)


def test_mcadams_anonymisation_is_applied_to_the_waveform_before_the_front_end(corpus):
    from data.anonymize import mcadams_anonymize

    root, _ = corpus
    plain = AVSRDataset(root, "train", modalities=("audio",), return_waveform=True)[0]
    anon = AVSRDataset(root, "train", modalities=("audio",), return_waveform=True, anonymize="mcadams", mcadams_alpha=0.8)[0]
    expected = mcadams_anonymize(plain["waveform"].numpy(), 16000, 0.8)
    torch.testing.assert_close(anon["waveform"], torch.from_numpy(expected).float())
    assert anon["audio"].shape == plain["audio"].shape and not torch.allclose(anon["audio"], plain["audio"])
    with pytest.raises(ValueError, match="data.anonymize must be one of"):
        AVSRDataset(root, "train", modalities=("audio",), anonymize="pitch")
