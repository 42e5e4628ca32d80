"""Scoring finished Wav2Vec2 runs on a larger test set (scripts/rescore.py) and the WER intervals it reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from training.config import PROJECT_ROOT

# a SynthGRID population small enough to generate in seconds: 12 speakers, 4 of them one-speaker clients
DATA = ["data.num_speakers=12", "data.utterances_per_speaker=3", "data.public_utterances_per_speaker=3",
        "data.train_utterances_per_speaker=2", "data.extra_train_speakers=2", "data.splits.public=2", "data.splits.train=2",
        "data.splits.valid=1", "data.splits.test=2", "data.splits.attacker_train=1", "data.splits.attacker_trials=2"]


# --------------------------------------------------------------------------- metrics
def test_utterance_word_errors_add_up_to_jiwers_corpus_counts():
    from common.metrics import utterance_word_errors, wer_details

    refs = ["bin blue at f two now", "lay red", "place green by a", "set white with q nine soon"]
    hyps = ["bin blue f two now please", "", "place green by a", "set with white q nine"]
    errors, words = utterance_word_errors(refs, hyps)
    details = wer_details(refs, hyps)
    assert errors.sum() == details["substitutions"] + details["deletions"] + details["insertions"]
    assert words.sum() == details["ref_words"] and errors[2] == 0 and errors[1] == 2
    assert utterance_word_errors([""], ["a b"])[0][0] == 2  # an empty reference: its words are insertions


def test_speaker_bootstrap_wer_brackets_the_corpus_wer_pairs_systems_and_narrows_with_more_speakers():
    from common.metrics import percentile_ci, speaker_bootstrap_wer

    rng = np.random.default_rng(0)

    def test_set(n_speakers):
        speakers = np.repeat([f"s{i}" for i in range(n_speakers)], 10)
        words = rng.integers(4, 8, speakers.size)
        skill = rng.uniform(0.2, 0.8, n_speakers).repeat(10)  # speakers differ: utterances of one speaker are alike
        errors = rng.binomial(words, skill)
        return speakers, words, errors

    speakers, words, errors = test_set(20)
    wer, reps = speaker_bootstrap_wer([errors, errors, np.minimum(errors + 1, words)], words, speakers, 500)
    assert wer[0] == pytest.approx(errors.sum() / words.sum()) and reps.shape == (500, 3)
    low, high = percentile_ci(reps[:, 0])
    assert low < wer[0] < high
    assert np.all(reps[:, 0] == reps[:, 1])  # the same draws for every system: a system minus itself is exactly 0
    diff_low, _ = percentile_ci(reps[:, 2] - reps[:, 0])
    assert diff_low > 0  # one more error on every utterance is separable although the two intervals overlap
    big = test_set(400)
    _, reps_big = speaker_bootstrap_wer([big[2]], big[1], big[0], 500)
    width = lambda r: np.subtract(*percentile_ci(r)[::-1])
    assert width(reps_big[:, 0]) < 0.5 * width(reps[:, 0])  # 20x the speakers: about sqrt(20) narrower
    with pytest.raises(ValueError, match="one entry per utterance"):
        speaker_bootstrap_wer([errors[:-1]], words, speakers)


def test_the_report_names_a_baseline_row_only_when_there_is_one():
    from scripts.rescore import markdown

    def row(label, diff=None):
        r = {"label": label, "seeds": [1], "wer": [50.0], "wer_mean": 50.0, "wer_std": 0.0, "wer_mean_ci": (49.0, 51.0),
             "test_loss_mean": 1.5, "own_test_wer_mean": None}
        if diff is not None:
            r.update(diff=diff, diff_ci=(diff - 1, diff + 1), diff_seed_std=0.0)
        return r

    common = {"split": "test", "corpus": "c", "utterances": 20, "speakers": 2, "resamples": 10}
    without = markdown({**common, "baseline": None, "rows": [row("a"), row("b")]})
    assert "baseline" not in without and without.count("| - | - | - |") == 2
    with_base = markdown({**common, "baseline": "a", "rows": [row("a"), row("b", diff=2.0)]})
    assert with_base.count("| baseline | - | - |") == 1 and "| +2.0 | [+1.0, +3.0] | 0.0 |" in with_base


# --------------------------------------------------------------------------- the script, end to end
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """(the corpus the runs train on, the same corpus with 3 more test speakers, the public start)."""
    from data.synthgrid import generate_corpus

    root = tmp_path_factory.mktemp("rescore")
    cfg = _cfg(root / "small", root / "runs", root / "start.pt")
    generate_corpus(cfg.data, root / "small", num_workers=0, progress=False)
    shutil.copytree(root / "small", root / "large", ignore=shutil.ignore_patterns("prepare", "feature_cache"))
    generate_corpus(_cfg(root / "large", root / "runs", root / "start.pt", "data.num_speakers=15",
                         "data.extra_test_speakers=3").data, root / "large", num_workers=0, progress=False)
    return root / "small", root / "large", _public_start(root / "start.pt")


def _public_start(path: Path) -> Path:
    import torch

    from data.synthgrid.grammar import GRID_WORDS
    from data.tokenizer import WordTokenizer
    from models.wav2vec2 import build_wav2vec2_ctc
    from models.wav2vec2_lora import save_wav2vec2_ctc
    from training.starting_checkpoint import sha256_file

    tokenizer = WordTokenizer(GRID_WORDS)
    torch.manual_seed(0)
    save_wav2vec2_ctc(path, build_wav2vec2_ctc(tokenizer.vocab_size, size="tiny").eval(), tokenizer.symbols)
    path.with_suffix(".card.json").write_text(json.dumps({"sha256": sha256_file(path)}))
    return path


def _cfg(corpus: Path, runs: Path, start: Path, *overrides: str):
    import training.config  # noqa: F401  (resolvers, schemas)

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=[
            "experiment=fl_dp_population", *DATA, f"data.dir={corpus}", f"paths.runs_dir={runs}", f"model.checkpoint={start}",
            "federated.num_clients=4", "federated.num_rounds=2", "federated.cohort_rate=0.5", "dp.target_delta=1e-3",
            "trainer.batch_size=2", *overrides])


def test_runs_are_rescored_on_the_larger_test_set_and_reproduce_their_own_test_wer(corpora, tmp_path):
    from scripts import rescore
    from training.wav2vec2.finetune import run_wav2vec2_task

    small, large, start = corpora
    runs = tmp_path / "runs"
    for seed in (1, 2):
        run_wav2vec2_task(_cfg(small, runs, start, "federated=none", "dp=none", f"seed={seed}"))
        run_wav2vec2_task(_cfg(small, runs, start, "dp=none", f"seed={seed}"))
    out = tmp_path / "report"
    rescore.main(["--runs-dir", str(runs), "--data-dir", str(large), "--baseline", "centralised", "--resamples", "300",
                  "--out", str(out)])
    summary = json.loads((out / "rescore.json").read_text())
    assert summary["utterances"] == 5 * 3 and summary["speakers"] == 5 and not summary["skipped"]
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("**/federated/rescore_large_test.json"))]
    assert len(records) == 4
    for r in records:  # the rebuilt model is the run's: its own 6 test utterances score what the run reported
        assert r["own_test_utterances"] == 6 and r["own_test_wer_reproduced"] == r["own_test_wer_reported"]
        assert len(r["utterance_errors"]) == 15 and r["wer"] == pytest.approx(sum(r["utterance_errors"]) / sum(r["utterance_words"]))
    rows = {("centralised" in row["label"]): row for row in summary["rows"]}
    assert set(rows) == {True, False} and "diff" not in rows[True] and rows[True]["seeds"] == ["1", "2"]
    fl = rows[False]
    assert fl["diff"] == pytest.approx(fl["wer_mean"] - rows[True]["wer_mean"])
    assert fl["diff_ci"][0] <= fl["diff"] <= fl["diff_ci"][1] and fl["wer_mean_ci"][0] <= fl["wer_mean"] <= fl["wer_mean_ci"][1]
    assert "| 95 % CI of Δ |" in (out / "rescore.md").read_text() and (out / "rescore.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="matches 0 systems"):  # a wrong baseline is refused naming the systems
        rescore.main(["--runs-dir", str(runs), "--data-dir", str(large), "--baseline", "no such row", "--out", str(out)])
    # a run made before compression.topk_value_bits / topk_keep_biases / federated.checkpoint_every existed rescores
    # with the schema's defaults
    config = Path(records[1]["run_dir"]) / "federated" / "config.yaml"
    lines = config.read_text().splitlines()
    added_later = ("topk_value_bits", "topk_keep_biases", "checkpoint_every")
    config.write_text("\n".join(l for l in lines if not any(key in l for key in added_later)) + "\n")
    assert len(config.read_text().splitlines()) == len(lines) - 3
    rescore.main(["--runs-dir", str(runs), "--data-dir", str(large), "--resamples", "50", "--force", "--out", str(out)])
    assert not json.loads((out / "rescore.json").read_text())["skipped"]
    # a model file that is not the one the run scored with fails the own-test-set check (and is skipped, saying so)
    from privacy.federated.task import read_state_npz, write_state_npz

    model = Path(records[0]["run_dir"]) / "federated" / "global_model.npz"
    rng = np.random.default_rng(0)  # a CTC head of large random weights: a word on most frames, many insertions
    write_state_npz(model, {k: (10 * rng.standard_normal(v.shape)).astype(v.dtype) if k.startswith("lm_head.") else v
                            for k, v in read_state_npz(model).items()})
    rescore.main(["--runs-dir", str(runs), "--data-dir", str(large), "--resamples", "50", "--out", str(out)])
    skipped = json.loads((out / "rescore.json").read_text())["skipped"]
    assert len(skipped) == 1 and "this is not the run's model" in skipped[0]


def test_a_corpus_with_other_training_data_is_refused_naming_what_differs(corpora, tmp_path):
    from data.synthgrid import generate_corpus
    from scripts.rescore import RescoreError, check_corpus

    small, large, start = corpora
    data = _cfg(small, tmp_path, start).data
    assert set(check_corpus("run", data, large)["test"]) < set(json.loads((large / "meta.json").read_text())["split_speakers"]["test"])
    with pytest.raises(RescoreError, match="generated with"):  # another generator seed: other audio
        check_corpus("run", _cfg(small, tmp_path, start, "data.seed=99").data, large)
    with pytest.raises(RescoreError, match="another training population"):
        check_corpus("run", _cfg(small, tmp_path, start, "data.num_speakers=13", "data.extra_train_speakers=3").data, large)
    # a corpus that trains MORE speakers after its test speakers (synthgrid_population_25600_test200) has the same
    # test set: the run is scored there (and paired with the larger population's runs); the reverse is refused
    grown = tmp_path / "grown"
    shutil.copytree(large, grown, ignore=shutil.ignore_patterns("prepare", "feature_cache"))
    grown_data = _cfg(grown, tmp_path, start, "data.num_speakers=17", "data.extra_test_speakers=3",
                      "data.extra_train_speakers_after_test=2").data
    generate_corpus(grown_data, grown, num_workers=0, progress=False)
    large_data = _cfg(large, tmp_path, start, "data.num_speakers=15", "data.extra_test_speakers=3").data
    assert check_corpus("run", large_data, grown)["test"] == check_corpus("run", large_data, large)["test"]
    with pytest.raises(RescoreError, match="2 training speakers of the run are not training speakers"):
        check_corpus("run", grown_data, large)
    with pytest.raises(RescoreError, match="train_utterances_per_speaker"):
        check_corpus("run", _cfg(small, tmp_path, start, "data.train_utterances_per_speaker=3").data, large)
    with pytest.raises(RescoreError, match="meta.json not found"):
        check_corpus("run", data, tmp_path)


def test_a_run_without_its_trained_model_is_skipped_and_reported(corpora, tmp_path):
    from scripts import rescore
    from training.wav2vec2.finetune import run_wav2vec2_task

    small, large, start = corpora
    runs = tmp_path / "runs"
    run_wav2vec2_task(_cfg(small, runs, start, "federated=none", "dp=none"))
    run_wav2vec2_task(_cfg(small, runs, start, "dp=none"))
    import yaml

    central = [p for p in runs.glob("**/federated/config.yaml") if yaml.safe_load(p.read_text())["federated"]["name"] == "none"]
    (central[0].parent / "global_model.npz").unlink()  # the centralised run, as code before session 11 left it
    rescore.main(["--runs-dir", str(runs), "--data-dir", str(large), "--resamples", "50", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "rescore.json").read_text())
    assert len(summary["rows"]) == 1 and len(summary["skipped"]) == 1 and "did not keep its trained parameters" in summary["skipped"][0]
