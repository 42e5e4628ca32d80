"""The federation's checkpoint: everything the server loop needs to continue after round r as if never stopped.

:func:`privacy.federated.server_app.run_server` writes ``<run-dir>/server_checkpoint.npz`` after every
``checkpoint-every``-th round (and the last), right after that round's line in ``federated_rounds.jsonl``; a run started
again in the same directory with the same configuration continues after the checkpoint's round (``resume``,
trainer.resume on the Hydra side). The file holds

* the global model and, with ``ema`` > 0, the server's iterate average;
* the strategy's state (:meth:`ValidatingStrategy.state_dict`): the server optimiser (FedAvgM velocity, server
  Adam moments and step count, Flower's FedAdam moments), the privacy accountant (rounds released so far, so
  epsilon composes over the whole run instead of restarting), the public-subspace basis;
* the generators the server draws from (Python's ``random``, which Flower's fixed-cohort sampling uses, NumPy's
  and torch's global ones; common.seeding.capture_rng_state);
* the clients' ``context.state`` (local-DP accountants, top-k error-feedback residuals) when the grid is this
  process's (:class:`privacy.federated.runner.InProcessGrid`). Under Ray or a deployment the SuperNodes hold it,
  so a run whose clients keep state (``clients_keep_state``) is resumed only on the sequential grid.

The per-round log is not duplicated: the rounds up to the checkpoint's are read back from ``federated_rounds.jsonl``
(appended first, so it always reaches at least the checkpoint's round; later rounds of the interrupted attempt are
dropped and run again; a checkpoint written before the log was appended, when ``federated_rounds.json`` was rewritten
every round, is resumed from that file). The checkpoint also lists the rounds the run was resumed after so far.

Under DP nothing released may fall outside the accountant. The accountant is restored with the checkpoint, so it
counts the rounds up to the checkpoint's; a round the interrupted attempt logged AFTER the checkpoint released a
model (central DP) or its clients' updates (local DP) that a resumed run would release again, uncounted, so
:func:`privacy.federated.server_app.run_server` then refuses to resume (with ``checkpoint-every`` = 1 that needs a
stop between the round log's write and the checkpoint's). A round cut off before it was logged released nothing
under central DP (the server had not aggregated it); under local DP the clients that had already replied to it
had sent a noised update the restored accountants do not hold, as a run started again from scratch would forget
its first attempt's replies: a simulation's server is this process, but a deployment should count them. Under
central DP with noise from the OS CSPRNG the resumed rounds draw fresh noise and cohorts; with reproducible noise
(NOT private) or without DP a resumed run is bit-identical to an uninterrupted one.

A checkpoint names the public start and the corpus by path (``task-checkpoint``, ``task-data-dir``) and by content
(:func:`location_digests`: the start's sha256, the corpus's media checksums and manifests). A project moved or
copied elsewhere with its runs resumes when the files there are the same; other contents are refused as another
configuration. (A checkpoint written before the digests were kept compares the paths.)

Format: an ``.npz`` read with ``allow_pickle=False``: the arrays, and one ``__meta__`` entry holding the rest as
JSON (no pickled objects, so loading a checkpoint cannot run code).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from common.config_diff import config_diff
from common.files import atomic_write_bytes

SERVER_CHECKPOINT = "server_checkpoint.npz"
FORMAT_VERSION = 2  # 2: the generators as common.seeding.capture_rng_state holds them
META_KEY = "__meta__"
# run-config keys that change neither what a round computes nor its accounting: a run may resume with others
OPERATIONAL_KEYS = ("run-dir", "resume", "checkpoint-every", "round-timeout", "server-eval-every", "device")


# run-config keys that name files by where they are: compared by content when both sides have its digest
LOCATION_KEYS = ("task-checkpoint", "task-data-dir")
CORPUS_FILES = ("checksums.sha256", "manifests")  # what a corpus's content digest covers (media checksums, manifests)


class CheckpointMismatch(ValueError):
    """The checkpoint in the run directory belongs to another configuration (or cannot be resumed here)."""


# --------------------------------------------------------------------------- nested state <-> npz
def _split_arrays(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    """`value` with every ndarray replaced by {"__array__": key} (stored in `arrays`); the rest must be JSON."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, torch.Tensor):
        return _split_arrays(value.detach().cpu().numpy(), arrays, path)
    if isinstance(value, Mapping):
        return {"__dict__": [[str(k) if not isinstance(k, int) else k, _split_arrays(v, arrays, f"{path}.{k}")]
                             for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"server checkpoint: {path} is a {type(value).__name__}; expected arrays, numbers, strings, lists, dicts")


def _join_arrays(value: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            return np.array(arrays[value["__array__"]])
        return {k: _join_arrays(v, arrays) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def write_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """`state` (nested dicts / lists of arrays, numbers, strings) as one .npz, atomically."""
    arrays: dict[str, np.ndarray] = {}
    meta = _split_arrays(dict(state), arrays, "state")
    arrays[META_KEY] = np.frombuffer(json.dumps({"version": FORMAT_VERSION, "state": meta}).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`write_checkpoint`'s state, read without unpickling anything."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if META_KEY not in arrays:
        raise ValueError(f"{path}: not a server checkpoint (no {META_KEY} entry)")
    meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: server checkpoint format {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
    return _join_arrays(meta["state"], arrays)


# --------------------------------------------------------------------------- back to torch
def as_tensors(value: Any) -> Any:
    """A state read back with :func:`read_checkpoint`, its arrays tensors again: what torch-side state (an optimiser's
    state_dict, common.seeding.capture_rng_state's generators) was saved from and loads into."""
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    if isinstance(value, Mapping):
        return {k: as_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_tensors(v) for v in value]
    return value


# --------------------------------------------------------------------------- clients' state
def context_states(grid: Any) -> Optional[dict[int, np.ndarray]]:
    """node id -> its non-empty ``context.state`` as Flower's wire bytes; None when the grid keeps no contexts here."""
    contexts = getattr(grid, "contexts", None)
    if contexts is None:
        return None
    from flwr.common.serde import recorddict_to_proto

    return {int(node): np.frombuffer(recorddict_to_proto(context.state).SerializeToString(), dtype=np.uint8)
            for node, context in contexts.items() if len(context.state)}


def restore_context_states(grid: Any, states: Mapping[int, np.ndarray]) -> None:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    contexts = grid.contexts
    for node, blob in states.items():
        if int(node) not in contexts:
            raise CheckpointMismatch(f"the checkpoint holds the state of client node {node}; this grid has nodes 1..{len(contexts)}")
        proto = RecordDictProto()
        proto.ParseFromString(np.asarray(blob, dtype=np.uint8).tobytes())
        contexts[int(node)].state = recorddict_from_proto(proto)


# --------------------------------------------------------------------------- checks
def content_digest(path: str | Path) -> str:
    """sha256 of a file; of a corpus directory, of its media checksums and manifests (CORPUS_FILES); '' for neither."""
    import hashlib

    from common.files import file_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return ""
    files = []
    for name in CORPUS_FILES:
        entry = path / name
        files += sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else ([entry] if entry.is_file() else [])
    if not files:
        return ""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def location_digests(cfg: Mapping[str, Any]) -> dict[str, str]:
    """{key: content digest} of the files the run config names by path (LOCATION_KEYS; unset or missing ones left out)."""
    digests = {}
    for key in LOCATION_KEYS:
        value = str(cfg.get(key) or "")
        digest = content_digest(value) if value else ""
        if digest:
            digests[key] = digest
    return digests


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], saved_digests: Optional[Mapping[str, str]] = None,
                       current_digests: Optional[Mapping[str, str]] = None) -> list[str]:
    """"key: saved -> current" for every run-config key that changes what the rounds compute. A path key
    (LOCATION_KEYS) is compared by the content digest of what it names when both sides have one, else as text."""
    def kept(cfg: Mapping[str, Any], digests: Mapping[str, str], other: Mapping[str, str]) -> dict[str, Any]:
        out = {key: value for key, value in cfg.items() if key not in OPERATIONAL_KEYS}
        for key in LOCATION_KEYS:
            mine, theirs = digests.get(key), other.get(key)
            if mine and theirs:  # where the same content lies is no difference; other content at the same path is one
                out[key] = {"content sha256": mine} if mine == theirs else f"{out.get(key)} (content sha256 {mine[:16]}...)"
        return out

    saved_digests, current_digests = dict(saved_digests or {}), dict(current_digests or {})
    return config_diff(kept(saved, saved_digests, current_digests), kept(current, current_digests, saved_digests))


def check_resumable(path: Path, checkpoint: Mapping[str, Any], cfg: Mapping[str, Any], grid: Any,
                    digests: Optional[Mapping[str, str]] = None) -> None:
    """Raise CheckpointMismatch if `checkpoint` cannot continue this run (other configuration, or clients' state missing).
    `digests`: this run's :func:`location_digests` (None: computed here)."""
    digests = location_digests(cfg) if digests is None else digests
    diff = config_differences(checkpoint["config"], cfg, checkpoint.get("location_digests"), digests)
    if diff:
        raise CheckpointMismatch(
            f"{path} was written by a federation with another configuration:\n  " + "\n  ".join(diff)
            + "\nResume with the configuration it was written with, or start from scratch: delete the file "
            "(Hydra runs: force=true, or another run directory)")
    if checkpoint["client_states"] is None and clients_keep_state(cfg):
        raise CheckpointMismatch(
            f"{path}: the clients of this run keep state between rounds ({clients_state_reason(cfg)}); it lived in the "
            f"Ray workers / SuperNodes of the interrupted run and is not in the checkpoint, so the run cannot resume "
            f"exactly. Run it on the sequential grid (federated.backend=sequential), whose checkpoints hold the clients' "
            f"state, or start from scratch (force=true)")


def clients_keep_state(cfg: Mapping[str, Any]) -> bool:
    return bool(clients_state_reason(cfg))


def clients_state_reason(cfg: Mapping[str, Any]) -> str:
    """Why the ClientApp keeps ``context.state`` between rounds under `cfg` ('' if it does not)."""
    reasons = []
    if cfg["dp"] == "local":
        reasons.append("local-DP accountants")
    if cfg["compression"] == "topk" and bool(cfg["error-feedback"]):
        reasons.append("top-k error-feedback residuals")
    return " and ".join(reasons)
