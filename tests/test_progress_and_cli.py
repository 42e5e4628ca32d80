"""Logs a newcomer can read: progress lines with ETA in log files, one-line configuration errors,
options before or after overrides, expected third-party messages explained once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from training.config import PROJECT_ROOT


# --------------------------------------------------------------------------- progress
def test_progress_in_a_log_file_is_lines_with_rate_and_eta(caplog):
    from common.progress import Progress

    caplog.set_level(logging.INFO, logger="common.progress")
    progress = Progress(total=10, desc="synthgrid", unit="utt", every=4, seconds=1e9, terminal=False)
    for _ in range(10):
        progress.update()
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # after 4 and 8 items, and the final line
    assert lines[0].startswith("synthgrid 4/10 (40%)") and "s/utt" in lines[0] and "utt/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("synthgrid 10/10 (100%)") and "ETA 0.0s" in lines[-1]
    assert not any("\r" in line for line in lines)


def test_progress_in_a_terminal_is_a_bar_and_logs_nothing(caplog):
    from common.progress import Progress

    caplog.set_level(logging.INFO, logger="common.progress")
    with Progress(total=3, desc="x", every=1, terminal=True) as progress:
        for _ in range(3):
            progress.update()
    assert not caplog.records


def test_progress_lines_come_at_the_configured_interval_outside_a_terminal(caplog, monkeypatch):
    from common import progress as progress_module

    clock = iter(float(t) for t in range(100))  # each perf_counter call: one second later
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="common.progress")
    progress = progress_module.Progress(total=20, desc="phase", unit="it", every=None, seconds=3, terminal=False)
    logged = [progress.update() is not None for _ in range(8)]
    # start at t=0; updates at t=1..8: a line once 3 s have passed since the last one (t=3, 6)
    assert logged == [False, False, True, False, False, True, False, False]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "phase 3/20 (15%)  1 s/it  1 it/s  elapsed 3.0s  ETA 17s"
    assert lines[1].startswith("phase 6/20 (30%)") and lines[1].endswith("ETA 14s")


def _blobs(seed: int = 0, n: int = 3000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (6, 4))
    return [(centres[i % 6] + rng.normal(0, 1, (n // 30, 4))).astype(np.float32) for i in range(30)]


def test_kmeans_fit_logs_minibatch_progress_with_eta_and_the_same_clusters(caplog):
    from sklearn.cluster import MiniBatchKMeans

    from data.targets import KMEANS_PARAMS, fit_kmeans

    feats = _blobs()
    caplog.set_level(logging.INFO, logger="common.progress")
    km = fit_kmeans(feats, 6, seed=3, desc="k-means fit (test)")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("k-means fit (test)")]
    # at most max_iter * n_samples // batch_size minibatch steps (the batch is at most n_samples = 3000):
    # a line every 10 % of them, with the ETA for the maximum
    n_steps = KMEANS_PARAMS["max_iter"] * 3000 // min(KMEANS_PARAMS["batch_size"], 3000)
    assert len(lines) >= 2 and all("s/step" in line and "ETA" in line for line in lines)
    assert lines[0].startswith(f"k-means fit (test) {max(1, n_steps // 10)}/{n_steps} (")
    assert not any("\r" in line for line in lines)
    assert km.n_steps_ < n_steps  # these blobs converge early; the last line says so, with the count complete
    assert lines[-1].startswith(f"k-means fit (test) {km.n_steps_}/{km.n_steps_} (100%)")
    assert lines[-1].endswith(f"ETA 0.0s  converged (at most {n_steps} steps)")
    # the hook only counts: the clusters are those of sklearn's own class on the same standardised frames
    frames = np.concatenate(feats)
    plain = MiniBatchKMeans(n_clusters=6, random_state=3, **KMEANS_PARAMS).fit((frames - km.feature_mean_) / km.feature_std_)
    np.testing.assert_array_equal(km.cluster_centers_, plain.cluster_centers_)
    assert km.n_steps_ == plain.n_steps_


def test_training_step_lines_carry_step_time_throughput_and_eta(caplog):
    from training.loop import train

    caplog.set_level(logging.INFO, logger="training.loop")
    model = torch.nn.Linear(3, 1)
    data = [{"ids": [f"u{i}" for i in range(4)], "x": torch.randn(4, 3)} for _ in range(6)]

    def step_fn(m, batch):
        return m(batch["x"]).pow(2).mean(), {}

    train(model, step_fn, data, torch.optim.SGD(model.parameters(), lr=0.1), max_steps=6, log_every=3, progress_bar=False,
          desc="finetune")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finetune step")]
    assert [line.split()[2] for line in lines] == ["3/6", "6/6"]
    assert all("s/step" in line and "utt/s" in line and "ETA" in line for line in lines)
    assert lines[-1].split("ETA ")[1] == "0.0s"


# --------------------------------------------------------------------------- command line
def test_options_may_come_before_or_after_the_overrides():
    from training.cli import hydra_argv

    assert hydra_argv(["t.py", "dry_run=true", "-m", "masks=a,b"]) == ["t.py", "-m", "dry_run=true", "masks=a,b"]
    assert hydra_argv(["t.py", "seed=2", "--cfg", "job", "--resolve"]) == ["t.py", "--cfg", "job", "--resolve", "seed=2"]
    assert hydra_argv(["t.py", "--info", "defaults", "a=1"]) == ["t.py", "--info", "defaults", "a=1"]
    assert hydra_argv(["t.py", "a=1", "--info"]) == ["t.py", "--info", "a=1"]


def _run(args, **env):
    return subprocess.run([sys.executable, "train_avhubert.py", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_a_configuration_error_is_one_message_without_traceback(tmp_path):
    args = ["masks=both", "loss=ctc_contrastive", "trainer.sampler=bucket", f"paths.root_dir={tmp_path}"]
    proc = _run(args, HYDRA_FULL_ERROR="0")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "Traceback" not in out
    assert out.count("loss=ctc_contrastive conflicts with trainer.sampler=bucket") == 1
    assert "HYDRA_FULL_ERROR=1" in out
    full = _run(args, HYDRA_FULL_ERROR="1")
    assert full.returncode != 0 and "Traceback" in full.stderr and "StartupError" in full.stderr


def test_a_missing_input_stops_a_real_run_but_is_listed_by_a_dry_run(tmp_path):
    from hydra import compose, initialize_config_dir

    from training.startup import MissingInputError
    from training.tasks import run_attack_task

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}", "masks=both"])
        dry = compose("config", overrides=[f"paths.root_dir={tmp_path}", "masks=both", "dry_run=true"])
    with pytest.raises(MissingInputError, match=r"export/attacker_train.safetensors .*python train_avhubert.py task=finetune"):
        run_attack_task(cfg)
    run_attack_task(dry)  # no error: the plan lists what is missing
    assert len(list((tmp_path / "runs").rglob("plan/attack_semi_informed.yaml"))) == 1


# --------------------------------------------------------------------------- third-party messages
def test_expected_third_party_messages_are_explained_once_and_others_kept(caplog):
    from common import library_logs

    library_logs.quiet_third_party()
    library_logs._explained.clear()  # "once per process": start this test's count from zero
    caplog.set_level(logging.INFO)
    absl = logging.getLogger("absl")
    for alpha in (1.1, 1.2):
        absl.warning("_compute_log_a_frac failed to converge after 1000 iterations with q=0.25, sigma=0.3, alpha=%s. "
                     "Excluding this order from the epsilon computation.", alpha)
    absl.warning("something else entirely")
    shown = []
    with warnings.catch_warnings():  # (pytest records warnings itself; install the filter inside this block)
        warnings.simplefilter("always")
        warnings.showwarning = library_logs._showwarning_with_explanations(lambda message, *rest: shown.append(str(message)))
        for _ in range(2):
            warnings.warn_explicit("Secure RNG turned off. This is perfectly fine for experimentation", UserWarning,
                                   "/venv/site-packages/opacus/privacy_engine.py", 98)
        warnings.warn_explicit("an unrelated warning", UserWarning, "/venv/site-packages/opacus/other.py", 1)
    assert shown == ["an unrelated warning"]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("failed to converge" in m for m in messages)
    assert "something else entirely" in messages
    explained = [m for m in messages if m.startswith("expected third-party message")]
    assert sum("Renyi orders" in m for m in explained) == 1 and sum("secure_mode" in m for m in explained) == 1


def test_flower_lines_are_printed_once_under_a_root_handler():
    from flwr.common.logger import FLOWER_LOGGER

    from common.library_logs import dedupe_flower_logs

    seen = []

    class Count(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger()
    handler = Count()
    root.addHandler(handler)
    saved = list(FLOWER_LOGGER.handlers)
    try:
        dedupe_flower_logs()
        assert not [h for h in FLOWER_LOGGER.handlers if type(h).__name__ == "ConsoleHandler"]
        FLOWER_LOGGER.info("round 1 done")
        assert seen.count("round 1 done") == 1
    finally:
        root.removeHandler(handler)
        for h in saved:
            if h not in FLOWER_LOGGER.handlers:
                FLOWER_LOGGER.addHandler(h)
