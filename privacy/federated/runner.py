"""Run a federation (Flower's simulation engine (Ray) or a sequential in-process grid), or its centralised baseline.

``run_federated(run_config, num_clients, backend)``:

* ``backend="ray"``: ``flwr.simulation.run_simulation`` with the Ray backend and
  one CPU per virtual client. Flower 1.42 marks ``run_simulation`` deprecated in
  favour of ``flwr run`` with a local-simulation SuperLink; it still works, needs
  no ``~/.flwr/config.toml`` and takes app objects (so the run config can be
  given as a Python dict), which is why it is used here. Its deprecation warning
  is logged once per call; it does not affect the run.
* ``backend="sequential"``: :class:`InProcessGrid` implements Flower's ``Grid``
  by calling the same ClientApp on each message in turn, in this process, with
  one persistent ``Context`` per virtual node (as a SuperNode keeps it). An
  exception in a client becomes an error reply, as in the real runtimes. No Ray,
  no threads: for debugging, deterministic tests, and benchmark comparison.
  The round timeout (``round-timeout``) is enforced as in Flower's grids: a reply
  that arrives after the deadline is discarded and counted as a failure
  ("timed out"), and clients not yet called when the deadline passes are not
  called. Without threads a running client cannot be interrupted, so one that
  never returns still blocks this grid; the Ray and deployment grids time it out.
  It keeps the last ``message_log`` messages it sent and received (``sent``, ``received``; default
  4,096 each) for inspection: a bounded log, because every reply carries a model update and a
  6,400-client run with 1,600 clients per round would otherwise hold ~50 MB more per round.

Both run :func:`privacy.federated.server_app.run_server`; results are read back
from the run directory (``federated_rounds.json``, ``global_model.npz``).

``run_centralised(run_config, steps)``: the baseline without a federation: one
data holder with the union of the clients' training data trains the same model
with the clients' local training (:func:`privacy.federated.task.train_local`,
DP-SGD when ``dp`` is ``local``) for ``steps`` steps.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from privacy.federated.server_app import GLOBAL_MODEL, ROUNDS_JSON, make_server_app, run_server
from privacy.federated.settings import resolve_run_config
from privacy.federated.task import read_state_npz

log = logging.getLogger(__name__)

CLIENT_EXCEPTION_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
TIMEOUT_CODE = ErrorCode.REPLY_MESSAGE_UNAVAILABLE  # no reply before the deadline


def _set_task_identity(run_id: int) -> None:
    """Flower stamps run/task ids on new messages; outside its runtimes someone must set them once."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _timeout_reply(message: Message, what: str) -> Message:
    """The error reply the strategy counts as a failure for a node the round timeout cut off."""
    reason = f"timed out: {what}"
    log.warning("node %d %s", message.metadata.dst_node_id, reason)
    return Message(Error(code=TIMEOUT_CODE, reason=reason), reply_to=message)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (node ids 1..N, partition-id = node id - 1)."""

    def __init__(
        self,
        client_app: ClientApp | Callable[[int], ClientApp],
        num_nodes: int,
        run_config: Mapping[str, Any],
        run_id: int = 1,
        message_log: int = 4096,
    ):
        from flwr.supercore.run import Run

        _set_task_identity(run_id)
        self._run = Run.create_empty(run_id=run_id)
        self._apps = client_app if callable(client_app) and not isinstance(client_app, ClientApp) else (lambda node_id: client_app)
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": node_id - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id in range(1, num_nodes + 1)
        }
        if message_log < 0:
            raise ValueError(f"message_log={message_log}: expected the number of recent messages to keep (>= 0)")
        # the most recent messages only (see the module docstring); iterate them like lists
        self.sent: deque[Message] = deque(maxlen=message_log)
        self.received: deque[Message] = deque(maxlen=message_log)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        for message in messages:
            node_id = message.metadata.dst_node_id
            self.sent.append(message)
            if deadline is not None and time.monotonic() > deadline:
                reply = _timeout_reply(message, f"the round timeout of {timeout:g} s had passed before this node was called")
                self.received.append(reply)
                replies.append(reply)
                continue
            try:
                reply = self._apps(node_id)(message, self.contexts[node_id])
            except Exception as error:  # a crashing client becomes an error reply, as in Flower's runtimes
                log.warning("node %d raised: %s", node_id, error)
                reason = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(code=CLIENT_EXCEPTION_CODE, reason=reason), reply_to=message)
            if deadline is not None and time.monotonic() > deadline:
                reply = _timeout_reply(message, f"the reply came after the round timeout of {timeout:g} s and was discarded")
            self.received.append(reply)
            replies.append(reply)
        return replies


def _read_results(run_dir: Path) -> dict[str, Any]:
    rounds_path = run_dir / ROUNDS_JSON
    if not rounds_path.exists():
        raise RuntimeError(f"the federation wrote no {rounds_path}: the ServerApp failed (see the log above)")
    summary = json.loads(rounds_path.read_text())
    summary["final_state"] = read_state_npz(run_dir / GLOBAL_MODEL)
    return summary


def run_federated(
    run_config: Mapping[str, Any],
    num_clients: int,
    backend: str = "ray",
    client_app: Optional[ClientApp | Callable[[int], ClientApp]] = None,
    on_round: Optional[Callable[[Mapping[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Run the federation; returns the round summary (see server_app.run_server) plus `final_state`.

    `on_round(entry)` is called after every round with its summary entry (both backends: the
    ServerApp runs in this process), e.g. to write a live log.

    `client_app` (sequential backend only) replaces the ClientApp, or maps a node
    id to one, e.g. to put a faulty or malicious client into a test federation.
    """
    cfg = dict(run_config)
    cfg["num-clients"] = num_clients
    temporary = None
    if not cfg.get("run-dir"):
        temporary = tempfile.TemporaryDirectory(prefix="federated-")
        cfg["run-dir"] = temporary.name
    cfg = resolve_run_config(cfg)
    run_dir = Path(cfg["run-dir"])
    try:
        if backend == "sequential":
            from privacy.federated.client_app import make_client_app

            grid = InProcessGrid(client_app or make_client_app(cfg), num_clients, cfg)
            summary = run_server(grid, cfg, on_round=on_round)
            summary["grid"] = grid
            return summary
        if backend != "ray":
            raise ValueError(f"backend must be 'ray' or 'sequential', got {backend!r}")
        if client_app is not None:
            raise ValueError("a custom client_app is only supported with backend='sequential'")
        from flwr.simulation import run_simulation

        from privacy.federated.client_app import make_client_app

        log.info("flwr.simulation.run_simulation is deprecated in Flower 1.42 (use `flwr run`); it is used here on purpose, see runner.py")
        run_simulation(
            server_app=make_server_app(cfg, on_round=on_round),
            client_app=make_client_app(cfg),
            num_supernodes=num_clients,
            backend_name="ray",
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": min(num_clients, 2)}},
        )
        return _read_results(run_dir)
    finally:
        if temporary is not None:
            temporary.cleanup()


def run_centralised(run_config: Mapping[str, Any], steps: int, task=None,
                    on_step: Optional[Callable[[int, Optional[float], int], None]] = None,
                    optimizer_reset_every: int = 0, checkpoint_every: int = 0,
                    on_checkpoint: Optional[Callable[[dict[str, Any]], None]] = None,
                    resume_from: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The centralised baseline of a federation (see the module docstring).

    `task` (default: the run config's task) must provide ``build_union_loader``, as
    :class:`privacy.federated.synthgrid_task.SynthGridTask` does. Returns the trained
    ``model``, the ``train_local`` ``stats`` and their ``train_seconds``, the ``dp`` session
    (None without DP), and the ``utterances`` and ``batches`` of the union loader. ``on_step``:
    train_local's per-step callback (logging). ``optimizer_reset_every``: train_local's (k > 0: a fresh
    optimiser every k steps, as a FedAvg client makes every round; a diagnostic, refused with DP).
    ``checkpoint_every`` / ``on_checkpoint`` / ``resume_from``: train_local's (its state every k steps, and a
    state to continue from, under DP with its privacy ledger; training/wav2vec2/finetune.py keeps them in the run
    directory).
    """
    from common.seeding import seed_everything
    from privacy.federated.local_dp import LocalDPSession
    from common.device import resolve_device
    from privacy.federated.task import load_task, train_local

    cfg = resolve_run_config(run_config)
    task = task if task is not None else load_task(cfg)
    if getattr(task, "build_union_loader", None) is None:
        raise TypeError(f"{cfg['task']}: the centralised baseline needs a task with build_union_loader (the clients' union)")
    generator = seed_everything(int(cfg["seed"]))
    loader = task.build_union_loader(int(cfg["num-clients"]), generator)
    utterances = len(loader.dataset)
    model = task.build_model()
    session = None
    if cfg["dp"] == "local":
        session = LocalDPSession.from_run_config(dict(cfg, **{"local-steps": steps, "num-rounds": 1}), utterances, None)
    optimizer = str(cfg["local-optimizer"])
    lr_decay = str(cfg["lr-decay"])
    log.info("centralised %s%s: %d steps of batch %d over %d utterances%s%s", "DP-" if session else "", optimizer.upper(), steps,
             cfg["batch-size"], utterances, f", optimiser re-created every {optimizer_reset_every} steps" if optimizer_reset_every else "",
             f", lr decayed {lr_decay}ly to 1/{steps}" if lr_decay != "none" else "")
    if float(cfg["ema"]):
        log.info("centralised: the model returned is the EMA of its parameters after every step (decay %g)", float(cfg["ema"]))
    t0 = time.time()
    stats = train_local(model, loader, task.loss_fn, steps=steps, lr=float(cfg["lr"]), optimizer=optimizer, dp=session,
                        device=resolve_device(str(cfg["device"])), on_step=on_step, optimizer_reset_every=optimizer_reset_every,
                        lr_decay=lr_decay, ema=float(cfg["ema"]), checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
                        resume_from=resume_from)
    return {"model": model, "stats": stats, "dp": session, "utterances": utterances, "batches": len(loader),
            "train_seconds": time.time() - t0}
