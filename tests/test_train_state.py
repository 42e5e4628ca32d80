"""Atomic checkpoints: what latest_checkpoint picks up, and weights_only loading."""

from __future__ import annotations

import logging

import pytest
import torch

from training.train_state import (
    LAST_NAME,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from common.seeding import capture_rng_state, restore_rng_state


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3, 2), float(step))}, "rng": [capture_rng_state({})], "note": "x", "betas": (0.9, 0.98)}


def test_save_load_roundtrip_keeps_last_n_and_points_last(tmp_path):
    for step in (2, 4, 6):
        path = save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert path.name == "checkpoint_6.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_4.pt", "checkpoint_6.pt", LAST_NAME]
    last = load_checkpoint(tmp_path / LAST_NAME)
    assert last["step"] == 6 and torch.equal(last["model"]["w"], torch.full((3, 2), 6.0))
    assert last["betas"] == (0.9, 0.98)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_6.pt"


def test_rng_state_survives_weights_only_roundtrip(tmp_path):
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path, 1, {"rng": capture_rng_state({"noise": gen})})
    expected = (torch.rand(3), np.random.randn(3), random.random(), torch.rand(2, generator=gen))
    torch.manual_seed(9), np.random.seed(9), random.seed(9), gen.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "checkpoint_1.pt")["rng"], {"noise": gen})
    got = (torch.rand(3), np.random.randn(3), random.random(), torch.rand(2, generator=gen))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_leftover_temp_and_truncated_newest_are_not_picked_up(tmp_path, caplog):
    save_checkpoint(tmp_path, 3, _state(3), keep=5)
    good = save_checkpoint(tmp_path, 6, _state(6), keep=5)
    # a crash while writing step 9 leaves a temp file behind
    (tmp_path / ".checkpoint_9.pt.abc123.tmp").write_bytes(good.read_bytes()[:100])
    assert latest_checkpoint(tmp_path) == good
    # a truncated (e.g. disk-full, copied half-way) newest checkpoint
    data = good.read_bytes()
    (tmp_path / "checkpoint_12.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == good
        path, state = load_latest_checkpoint(tmp_path)
    assert path == good and state["step"] == 6
    assert "checkpoint_12.pt" in caplog.text
    with pytest.raises(CheckpointError, match="checkpoint_12.pt.*(truncated|corrupt)"):
        load_checkpoint(tmp_path / "checkpoint_12.pt")
    # the next save clears the stale temp file
    save_checkpoint(tmp_path, 15, _state(15), keep=5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None


class Arbitrary:
    pass


def test_arbitrary_python_object_refused_at_load_and_at_save(tmp_path):
    evil = tmp_path / "checkpoint_1.pt"
    torch.save({"step": 1, "obj": Arbitrary()}, evil)
    with pytest.raises(CheckpointError, match=r"checkpoint_1\.pt.*weights_only"):
        load_checkpoint(evil)
    with pytest.raises(TypeError, match=r"state\['extra'\]\['obj'\].*Arbitrary"):
        save_checkpoint(tmp_path / "out", 1, {"extra": {"obj": Arbitrary()}})
    assert not (tmp_path / "out" / "checkpoint_1.pt").exists()


def test_not_a_checkpoint_and_missing_file_name_the_file(tmp_path):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(bogus)
    with pytest.raises(CheckpointError, match="nope.pt.*does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt.*expected a dict"):
        load_checkpoint(tmp_path / "list.pt")
