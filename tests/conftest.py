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


@pytest.fixture(autouse=True)
def _absl_handler_off_pytests_capture():
    """absl's log handler (dp_accounting logs through absl) keeps the sys.stderr of the test that
    first used it, i.e. pytest's capture stream, and its close() closes any stream that is not the
    current sys.stderr. Hydra's logging set-up in a later in-process test closes every handler, so
    pytest's own capture file was closed under it. Point the handler back at the real stderr."""
    yield
    import sys

    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        handler = absl_logging.get_absl_handler().python_handler
        if handler.stream is not sys.__stderr__:
            handler.stream = sys.__stderr__
