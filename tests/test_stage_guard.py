"""Runs never report or resume another run's results (issue 21): configuration fingerprints per
stage, an exclusive lock per stage directory, status failed/interrupted when a stage dies,
enum-like options rejected at composition and checkpoints checked against their CRC-32s."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import training.config  # noqa: F401
from training.config import PROJECT_ROOT, ConfigChoiceError, check_choices
from training.fingerprint import stage_fingerprint
from training.stage import StageConfigMismatch, StageLock, StageLocked, open_stage, stage_status


def compose_cfg(tmp, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=[f"paths.root_dir={tmp}", "trainer=debug", *overrides])


# --------------------------------------------------------------------------- fingerprints
def test_fingerprint_covers_what_the_stage_computes(tmp_path):
    base = stage_fingerprint(compose_cfg(tmp_path), "finetune")
    assert base["trainer.lr"] == 1e-3 and base["data.tokenizer"] == "word" and base["seed"] == 1
    # operational settings and attacker options do not change what fine-tuning computes
    same = compose_cfg(tmp_path, "trainer.progress_bar=false", "trainer.log_every=3", "attacker.epochs=99", "logger.mode=disabled",
                       "eval.beam_size=3", "force=true")
    assert stage_fingerprint(same, "finetune") == base
    other = compose_cfg(tmp_path, "trainer.lr=0.05", "trainer.max_steps=60")
    assert stage_fingerprint(other, "finetune") != base
    # ... but they do change the attack, and the export uses the lazy-informed seed offset
    attack = compose_cfg(tmp_path, "attacker.epochs=99")
    assert stage_fingerprint(attack, "attack/semi_informed") != stage_fingerprint(compose_cfg(tmp_path), "attack/semi_informed")
    assert "attacker.lazy_seed_offset" in stage_fingerprint(attack, "export") and "attacker.epochs" not in stage_fingerprint(attack, "export")
    assert stage_fingerprint(compose_cfg(tmp_path, "eval.decoder=beam"), "evaluate") != stage_fingerprint(compose_cfg(tmp_path), "evaluate")
    # paths under the project root are compared relative to it: a moved project still matches its runs
    assert base["data.dir"] == "${paths.root_dir}/datasets/synthgrid"
    assert stage_fingerprint(compose_cfg(tmp_path / "moved"), "finetune") == base
    # pretraining is shared by every fine-tuning configuration (and predicts k-means units, not tokens)
    assert stage_fingerprint(other, "pretrain") == stage_fingerprint(compose_cfg(tmp_path, "data.tokenizer=char"), "pretrain")
    assert stage_fingerprint(compose_cfg(tmp_path, "pretrain.lr=0.1"), "pretrain") != stage_fingerprint(other, "pretrain")


def _finish(cfg, name="finetune", metrics=None):
    with open_stage(cfg, name) as stage:
        (stage.dir / "checkpoints").mkdir(exist_ok=True)
        (stage.dir / "checkpoints" / "checkpoint_4.pt").write_bytes(b"state of this configuration")
        stage.metrics.update(metrics or {"wer": 0.25})
    return stage.dir


def test_finished_stage_is_reused_only_with_the_same_fingerprint(tmp_path):
    """The issue's scenario: trainer.lr=0.05 trainer.max_steps=60 in the directory of a finished run
    used to print "already done; skipping" and return the old metrics."""
    d = _finish(compose_cfg(tmp_path))
    assert open_stage(compose_cfg(tmp_path), "finetune").finished() == {"wer": 0.25}
    changed = compose_cfg(tmp_path, "trainer.lr=0.05", "trainer.max_steps=60")
    with pytest.raises(StageConfigMismatch) as e:
        open_stage(changed, "finetune").finished()
    msg = str(e.value)
    assert str(d) in msg and "trainer.lr: 0.001 -> 0.05" in msg and "trainer.max_steps: 4 -> 60" in msg
    assert "force=true" in msg and "run_name=" in msg
    # the way out: force=true starts from scratch (the old checkpoints are not resumed)
    forced = compose_cfg(tmp_path, "trainer.lr=0.05", "trainer.max_steps=60", "force=true")
    assert open_stage(forced, "finetune").finished() is None
    with open_stage(forced, "finetune") as stage:
        assert not (stage.dir / "checkpoints").exists() and not (stage.dir / "metrics.json").exists()
        stage.metrics["wer"] = 0.5
    assert open_stage(changed, "finetune").finished() == {"wer": 0.5}
    assert json.loads((d / "fingerprint.json").read_text())["values"]["trainer.lr"] == 0.05
    assert OmegaConf.load(d / "config.yaml").trainer.lr == 0.05


def test_resume_after_a_crash_with_another_configuration_is_refused(tmp_path):
    cfg = compose_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="crash"):
        with open_stage(cfg, "finetune") as stage:
            (stage.dir / "checkpoints").mkdir()
            (stage.dir / "checkpoints" / "checkpoint_2.pt").write_bytes(b"lr=1e-3 state")
            raise RuntimeError("crash")
    assert stage_status(stage.dir)["status"] == "failed"
    changed = compose_cfg(tmp_path, "trainer.lr=0.05")
    with pytest.raises(StageConfigMismatch):  # the skip check refuses it before any data is read ...
        open_stage(changed, "finetune").finished()
    with pytest.raises(StageConfigMismatch, match=r"finetune run \(failed\) made with .*\n  trainer.lr: 0.001 -> 0.05"):
        with open_stage(changed, "finetune"):  # ... and so does entering the stage
            pytest.fail("a stage with another fingerprint must not start in this directory")
    # config.yaml still describes the checkpoints on disk
    assert OmegaConf.load(stage.dir / "config.yaml").trainer.lr == 1e-3
    with open_stage(cfg, "finetune") as again:  # the same configuration resumes
        assert (again.dir / "checkpoints" / "checkpoint_2.pt").is_file()


def test_stages_written_before_fingerprints_are_compared_through_config_yaml(tmp_path):
    cfg = compose_cfg(tmp_path)
    d = Path(cfg.paths.run_dir) / "finetune"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "status.json").write_text('{"status": "done"}')
    (d / "metrics.json").write_text('{"wer": 0.3}')
    assert open_stage(cfg, "finetune").finished() == {"wer": 0.3}
    with pytest.raises(StageConfigMismatch, match="data.on_error: 'raise' -> 'skip'"):
        open_stage(compose_cfg(tmp_path, "data.on_error=skip"), "finetune").finished()


# --------------------------------------------------------------------------- locks and status
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from hydra import compose, initialize_config_dir
    import training.config
    from training.stage import open_stage
    with initialize_config_dir(version_base="1.3", config_dir={conf!r}):
        cfg = compose("config", overrides=["paths.root_dir={tmp}", "trainer=debug"])
    with open_stage(cfg, "finetune") as stage:
        print("holding", flush=True)
        {body}
""")


def _start_holder(tmp_path, body="time.sleep(60)"):
    code = HOLDER.format(root=str(PROJECT_ROOT), conf=str(PROJECT_ROOT / "conf"), tmp=str(tmp_path), body=body)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "holding", proc.stderr.read()
    return proc


def test_a_second_run_on_a_locked_stage_stops_at_once_naming_the_holder(tmp_path):
    proc = _start_holder(tmp_path)
    try:
        cfg = compose_cfg(tmp_path)
        t0 = time.time()
        with pytest.raises(StageLocked) as e:
            with open_stage(cfg, "finetune"):
                pytest.fail("two runs in one stage directory")
        assert time.time() - t0 < 30  # it does not wait for the lock: the holder keeps it for 60 s
        assert f"PID {proc.pid}" in str(e.value) and f"host {socket.gethostname()}" in str(e.value)
        assert stage_status(Path(cfg.paths.run_dir) / "finetune")["status"] == "running"
        assert StageLock.holder(Path(cfg.paths.run_dir) / "finetune")["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # killed outright (SIGKILL): status.json still says running, but nobody holds the lock
    d = Path(cfg.paths.run_dir) / "finetune"
    assert json.loads((d / "status.json").read_text())["status"] == "running"
    assert stage_status(d)["status"] == "interrupted" and StageLock.holder(d) is None
    with open_stage(cfg, "finetune") as stage:  # the stale lock is taken over
        assert stage._lock.stale_holder["pid"] == proc.pid
    assert stage_status(d)["status"] == "done" and (d / ".lock").read_text() == ""


def test_sigterm_records_interrupted_and_releases_the_lock(tmp_path):
    proc = _start_holder(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    d = Path(compose_cfg(tmp_path).paths.run_dir) / "finetune"
    status = json.loads((d / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"]
    assert StageLock.holder(d) is None and (d / ".lock").read_text() == ""


def test_an_exception_records_failed_with_the_error(tmp_path):
    proc = _start_holder(tmp_path, body="raise ValueError('bad batch')")
    proc.wait(timeout=30)
    d = Path(compose_cfg(tmp_path).paths.run_dir) / "finetune"
    assert json.loads((d / "status.json").read_text()) == {"status": "failed", "error": "ValueError: bad batch"}


# --------------------------------------------------------------------------- enum-like options
@pytest.mark.parametrize("override, field", [
    ("trainer.sampler=speakr", "trainer.sampler"), ("data.on_error=skipp", "data.on_error"),
    ("trainer.precision=fp16", "trainer.precision"), ("eval.decoder=beams", "eval.decoder"),
    ("eval.modalities=[audio,vidoe]", "eval.modalities"), ("attacker.scenario=lazy", "attacker.scenario"),
])
def test_enum_like_options_fail_at_composition(tmp_path, override, field):
    """These used to fail only after data validation and model building (17-21 s), or never (eval.decoder). No corpus
    exists under tmp_path, so a task that read data or built a stage before checking its options would fail with
    another error, or leave a run directory."""
    from training.tasks import run_asr_task, run_attack_task

    cfg = compose_cfg(tmp_path, override)
    for task in (run_asr_task, run_attack_task):
        with pytest.raises(ConfigChoiceError) as e:
            task(cfg)
        assert str(e.value).startswith(f"{field}=") and "expected one of" in str(e.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # ~45 compositions
def test_every_shipped_config_passes_the_choice_checks(tmp_path):
    conf = PROJECT_ROOT / "conf"
    groups = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in conf.iterdir() if g.is_dir() and g.name != "hydra"}
    checked = 0
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        for group, options in groups.items():
            for option in options:
                check_choices(compose("config", overrides=[f"paths.root_dir={tmp_path}", f"{group}={option}"]))
                checked += 1
    assert checked >= 40


# --------------------------------------------------------------------------- checkpoint integrity
def _flip_tensor_bytes(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # local header (30 bytes + name + extra) precedes the member's data; stored, not compressed
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_tensor_data_are_refused_naming_the_file(tmp_path):
    from models.avhubert_checkpoint import CheckpointError as ModelCheckpointError, load_avhubert_checkpoint
    from training.train_state import CheckpointError, load_checkpoint, load_latest_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 1, {"model": {"w": torch.arange(4096.0)}})
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.arange(4096.0) + 1}})
    newest = tmp_path / "checkpoint_2.pt"
    torch.load(newest, weights_only=True)  # intact
    _flip_tensor_bytes(newest)
    assert not torch.equal(torch.load(newest, weights_only=True)["model"]["w"], torch.arange(4096.0) + 1)  # torch alone: silent
    with pytest.raises(CheckpointError, match=rf"{newest}.*CRC"):
        load_checkpoint(newest)
    path, state = load_latest_checkpoint(tmp_path)  # resume falls back to the intact older one
    assert path.name == "checkpoint_1.pt" and torch.equal(state["model"]["w"], torch.arange(4096.0))
    with pytest.raises(ModelCheckpointError, match=rf"{newest}: corrupt checkpoint.*CRC"):
        load_avhubert_checkpoint(newest)


def test_fine_tuned_model_loads_through_the_checked_loader(tmp_path, monkeypatch):
    """load_finetuned used a bare torch.load: a damaged model.pt gave torch's own message (which
    suggests weights_only=False) or, with flipped tensor bytes, loaded silently."""
    import training.avhubert.finetune as asr
    from training.train_state import CheckpointError

    cfg = compose_cfg(tmp_path)
    d = Path(cfg.paths.run_dir) / "finetune"
    d.mkdir(parents=True)
    asr.save_system(d / "model.pt", torch.nn.Linear(64, 64))
    _flip_tensor_bytes(d / "model.pt")
    monkeypatch.setattr(asr, "tokenizer_for_run", lambda cfg, **kwargs: type("T", (), {"vocab_size": 5})())
    monkeypatch.setattr(asr, "build_system", lambda cfg, n: (torch.nn.Linear(64, 64), None, None))
    with pytest.raises(CheckpointError, match=rf"{d / 'model.pt'} is corrupt.*CRC"):
        asr.load_finetuned(cfg)


def test_exported_features_are_checked_against_their_recorded_sha256(tmp_path):
    """Safetensors files carry no checksum: the export records a sha256 in its index, and the attacker's
    read_export refuses a file that no longer matches it."""
    from safetensors.torch import save_file

    from common.files import file_sha256
    from training.avhubert.export import read_export

    path = tmp_path / "attacker_trials.safetensors"
    save_file({"audio/clean": torch.arange(12.0).reshape(6, 2), "offsets": torch.tensor([0, 2, 6])}, str(path))
    (tmp_path / "attacker_trials.json").write_text(json.dumps({"ids": ["a", "b"], "speakers": ["s1", "s2"], "sha256": file_sha256(path)}))
    feats, ids, _ = read_export(tmp_path, "attacker_trials")
    assert ids == ["a", "b"] and feats["audio/clean"][1].shape == (4, 2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the tensor data: safetensors itself loads it without complaint
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{path}: sha256 differs"):
        read_export(tmp_path, "attacker_trials")


def test_config_diff_names_changed_keys_and_ignores_key_order_inside_nested_values():
    from common.config_diff import config_diff

    old = {"lr": 0.1, "splits": {"train": 12, "test": 4}, "gone": 1}
    new = {"splits": {"test": 4, "train": 12}, "lr": 0.2, "added": [1, 2]}
    assert config_diff(old, new) == ["added: <absent> -> [1, 2]", "gone: 1 -> <absent>", "lr: 0.1 -> 0.2"]
    assert config_diff(old, {**old, "splits": {"test": 4, "train": 12}}) == []  # the same mapping, other order
    assert config_diff(old, {**old, "splits": {"train": 12, "test": 5}}) == ["splits: {'train': 12, 'test': 4} -> {'train': 12, 'test': 5}"]
    many = config_diff({f"k{i}": i for i in range(25)}, {})
    assert len(many) == 21 and many[-1] == "... and 5 more"
