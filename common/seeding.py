"""Seeding: one call makes a run deterministic given its seed; the generators' state captured and restored
(exact resume: training/loop.py, privacy/federated/server_checkpoint.py)."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Mapping

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch Generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for what this process can run on.

    On a machine without an accelerator it seeds the CPU generator only, which is all ``torch.manual_seed`` changes
    there, without its lazy CUDA seeding: on a CPU build that formats the caller's stack trace on every call (kept in
    case CUDA is initialised later), 4.8 % of a federated round that seeds each of ~400 one-step clients
    (py-spy, session 20; benchmarks/bench_fl_dp.py, "message_path").
    """
    if torch.accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(int(seed))


def capture_rng_state(generators: Mapping[str, torch.Generator] = {}) -> dict[str, Any]:
    """All RNG states as tensors and primitives (loadable with weights_only=True)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] = {}) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
    missing = set(generators) - set(state["generators"])
    if missing:
        raise KeyError(f"checkpoint has no RNG state for generator(s) {sorted(missing)}; it holds {sorted(state['generators'])}")
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng(generators: Mapping[str, torch.Generator] = {}) -> Iterator[None]:
    """Run a block (evaluation) without moving any RNG the training sequence depends on."""
    saved = capture_rng_state(generators)
    try:
        yield
    finally:
        restore_rng_state(saved, generators)
