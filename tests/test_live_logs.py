"""Live run logs of the Wav2Vec2 stages: a user tailing log.csv sees each federated round, each
log_every window of the centralised baseline and of wav2vec2 pretraining as it ends, with a
progress line (ETA) per round; the logged values and the run's results are those of the run."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_fl_synthgrid import _cfg, _write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("tinygrid_live"))


def _rows(path: Path) -> list[tuple[int, str, str]]:
    """(step, key, value) rows of a log.csv as it is on disk now ([] before it exists)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), r["key"], r["value"]) for r in csv.DictReader(f)]


def test_federated_log_has_each_round_before_the_next_one_ends_with_a_progress_line(corpus, tmp_path, monkeypatch, caplog):
    from privacy.federated import server_app
    from common.files import read_jsonl
    from training.run_logger import RunLogger
    from training.wav2vec2.finetune import log_round, run_wav2vec2_task
    import models.wav2vec2

    cfg = _cfg(corpus, tmp_path / "runs", "dp=none", "federated.num_rounds=3", "pretrain.log_every=1")
    run_dir = Path(cfg.paths.run_dir) / "federated"
    checkpoint = Path(cfg.model.checkpoint)
    seen_by_round: list[list[int]] = []  # log.csv's steps when the server appends a round to its round log
    original_append = server_app.append_line

    def snapshot_then_append(path, line):
        seen_by_round.append(sorted({step for step, _, _ in _rows(run_dir / "log.csv")}))
        original_append(path, line)

    monkeypatch.setattr(server_app, "append_line", snapshot_then_append)
    pretrain_seen: list[int] = []  # pretraining's log.csv rows at each step, and each step's loss
    pretrain_losses: list[float] = []
    original_loss = models.wav2vec2.pretraining_loss

    def snapshot_then_loss(*args, **kwargs):
        pretrain_seen.append(len(_rows(checkpoint / "log.csv")))
        loss, stats = original_loss(*args, **kwargs)
        pretrain_losses.append(stats["loss"])
        return loss, stats

    monkeypatch.setattr(models.wav2vec2, "pretraining_loss", snapshot_then_loss)
    caplog.set_level(logging.INFO, logger="common.progress")
    metrics = run_wav2vec2_task(cfg)

    # the server appends each round to federated_rounds.jsonl as it ends: log.csv already holds every earlier
    # round, i.e. each row is on disk while the federation still runs
    assert seen_by_round == [[], [1], [1, 2]]
    # wav2vec2 pretraining (log_every=1): the row of step s is on disk before step s + 1 runs
    assert pretrain_seen == [0, 1] and [v for _, _, v in _rows(checkpoint / "log.csv")] == [repr(x) for x in pretrain_losses]

    # the rows are the server's round summaries (federated_rounds.json, what the stage wrote at the
    # end before) and the test result is the stage's metric
    import json

    summary = json.loads((run_dir / "federated_rounds.json").read_text())
    assert read_jsonl(run_dir / "federated_rounds.jsonl") == summary["rounds"]  # the live log = the summary's rounds
    expected = RunLogger(tmp_path / "expected")
    for entry in summary["rounds"]:
        log_round(expected, entry)
    live = _rows(run_dir / "log.csv")
    assert sorted(live[:-3]) == sorted(_rows(tmp_path / "expected" / "log.csv"))  # the JSON sorts the eval keys
    log = read_jsonl(run_dir / "log.jsonl")
    assert [e["step"] for e in log] == [1, 2, 3, 3] and log[-1]["test/wer"] == metrics["wer"]
    assert "eval/wer" in log[0]  # without DP the clients evaluate each round

    # one progress line per round, with time per round and ETA
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("federated round")]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("s/round" in line and "ETA" in line and "train_loss" in line for line in lines)
    assert lines[-1].split("ETA ")[1].startswith("0.0s")


def test_round_callback_does_not_change_the_federation():
    from privacy.federated.runner import run_federated

    tiny = {"task": "privacy.federated.task:tiny_synthetic_task", "num-rounds": 2, "lr": 0.1, "seed": 3}
    entries = []
    a = run_federated(tiny, num_clients=2, backend="sequential", on_round=entries.append)
    b = run_federated(tiny, num_clients=2, backend="sequential")
    assert [e["server_round"] for e in entries] == [1, 2] and entries == a["rounds"]
    for key in a["final_state"]:
        np.testing.assert_array_equal(a["final_state"][key], b["final_state"][key])
    assert [r["train_loss"] for r in a["rounds"]] == [r["train_loss"] for r in b["rounds"]]


def test_centralised_log_has_a_row_every_log_every_steps_before_evaluation(corpus, tmp_path, monkeypatch, caplog):
    from privacy.federated import task as task_module
    from common.files import read_jsonl
    from training.wav2vec2.finetune import run_wav2vec2_task

    # rounds x local steps x clients = 2 x 2 x 2 = 8 steps, a row after steps 3, 6 and 8
    cfg = _cfg(corpus, tmp_path / "runs", "federated=none", "dp=none", "federated.num_rounds=2", "federated.local_steps=2",
               "trainer.log_every=3")
    run_dir = Path(cfg.paths.run_dir) / "federated"
    seen_at_step: list[list[int]] = []
    step_losses: list[tuple[float, int]] = []
    original_train_local = task_module.train_local

    def recording_train_local(*args, on_step=None, **kwargs):
        def on_step_then_look(done, loss, n):
            step_losses.append((loss, n))
            on_step(done, loss, n)
            seen_at_step.append([s for s, _, _ in _rows(run_dir / "log.csv")])
        return original_train_local(*args, on_step=on_step_then_look, **kwargs)

    monkeypatch.setattr(task_module, "train_local", recording_train_local)
    caplog.set_level(logging.INFO, logger="common.progress")
    metrics = run_wav2vec2_task(cfg)

    assert metrics["steps"] == 8
    assert seen_at_step == [[], [], [3], [3], [3], [3, 6], [3, 6], [3, 6, 8]]
    log = read_jsonl(run_dir / "log.jsonl")
    assert [e["step"] for e in log] == [3, 6, 8, 8] and log[-1]["test/wer"] == metrics["wer"]
    windows = [step_losses[0:3], step_losses[3:6], step_losses[6:8]]
    for entry, window in zip(log, windows):  # the window's loss, weighted by examples as train_loss is
        assert entry["train/loss"] == pytest.approx(sum(l * n for l, n in window) / sum(n for _, n in window), rel=1e-12)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("centralised step")]
    assert [line.split()[2] for line in lines] == ["3/8", "6/8", "8/8"]
    assert all("s/step" in line and "ETA" in line and "loss" in line for line in lines)


def test_wav2vec2_pretraining_reports_each_window_mean_as_it_ends(caplog):
    from models.wav2vec2 import pretrain_wav2vec2_tiny, wav2vec2_tiny_config

    caplog.set_level(logging.INFO, logger="models.wav2vec2")
    torch.manual_seed(0)
    waves = [torch.randn(2, 8000) * 0.1 for _ in range(3)]
    reported = []
    _, losses = pretrain_wav2vec2_tiny(waves, steps=5, out_dir=None, log_every=2, seed=1,
                                       config=wav2vec2_tiny_config(vocab_size=32), on_log=lambda s, l: reported.append((s, l)))
    # windows [0, 2), [2, 4), [4, 5): reported at steps 2, 4 and 5 with their mean
    assert [s for s, _ in reported] == [2, 4, 5]
    assert [l for _, l in reported] == [float(np.mean(losses[0:2])), float(np.mean(losses[2:4])), float(np.mean(losses[4:5]))]
    # progress lines with ETA at the same steps, and after the first (an early ETA)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wav2vec2 pretrain step")]
    assert [line.split()[3] for line in lines] == ["1/5", "2/5", "4/5", "5/5"] and all("ETA" in line for line in lines)


@pytest.mark.slow
def test_round_callback_runs_under_the_ray_backend(tmp_path):
    from privacy.federated.runner import run_federated

    entries = []
    summary = run_federated({"task": "privacy.federated.task:tiny_synthetic_task", "num-rounds": 2, "lr": 0.1, "seed": 3,
                             "run-dir": str(tmp_path)}, num_clients=2, backend="ray", on_round=entries.append)
    # the ServerApp runs in a thread of this process: the callback saw each round, as the summary records it
    assert [e["server_round"] for e in entries] == [1, 2]
    assert [e["train_loss"] for e in entries] == [r["train_loss"] for r in summary["rounds"]]
