"""Shared test setup: one torch thread (the suite runs on 2 shared cores; many small
ops are slower with thread contention), offline wandb / Hugging Face."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def repo_root():
    from training.config import PROJECT_ROOT

    return PROJECT_ROOT
