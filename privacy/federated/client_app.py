"""Flower ClientApp (Message API): local training on one client's own speakers.

Per message the ClientApp is rebuilt; what must survive between rounds lives in
``context.state`` (kept per node by the SuperNode / simulation runtime):

* ``"compression-residual"`` (ArrayRecord): the top-k error-feedback residual;
* ``"privacy"`` (ConfigRecord, ``"accountant"`` = JSON): the local-DP accountant
  state, so epsilon composes over ALL rounds this client took part in, instead
  of restarting every round as with a fresh PrivacyEngine per round.

The reply holds ONLY the (compressed) update of the trainable parameters, keyed
``"<parameter name>::<field>"`` (see compression.py), and a MetricRecord of
numbers. No audio, features or transcripts. Which numbers depends on DP:

* without DP: ``num-examples``, ``train_loss``, ``partition-id``;
* under DP (local or central): ``epsilon`` and ``partition-id`` only. The
  training loss and the realised number of examples are functions of the
  private data that no DP mechanism covers, so they are not sent. ``epsilon``
  is a function of the public plan (sigma, sampling rate, steps); the sampling
  rate 1 / batches depends on the client's dataset size, which DP-SGD treats as
  public, as Opacus does.

Evaluation on the client's held-out utterances (``handle_evaluate``) is a
release of private data outside any DP guarantee: under DP the client refuses it
unless the run config says ``client-evaluation = "on"`` (see settings.py).
Bytes on the wire are measured by the server, not reported by the client.

Central DP: the server clips every update and adds noise to the aggregate
(Flower's ``DifferentialPrivacyServerSideFixedClipping``, see strategy.py).
Flower's client-side alternative, ``fixedclipping_mod``, requires the reply to
carry the full weights under the same keys as the global model, which a
compressed payload does not; so this app chooses server-side clipping (its
trust model: the server sees individual, un-clipped updates).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.device import resolve_device
from common.seeding import seed_torch
from privacy.federated.compression import build_compressor
from privacy.federated.settings import client_evaluation_enabled, resolve_run_config
from privacy.federated.task import (
    arrays_to_state,
    compute_delta,
    evaluate,
    federated_state,
    load_federated_state,
    load_task,
    state_to_arrays,
    train_local,
)

log = logging.getLogger(__name__)

RESIDUAL_KEY = "compression-residual"
PRIVACY_KEY = "privacy"

# task -> the model its clients train in this process (see client_model)
_CLIENT_MODELS: dict[int, tuple[Any, torch.nn.Module]] = {}


def client_model(task, cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The model a client trains this round, before the global state is loaded into it.

    ``task.build_model()`` deep-copies a template: for the Wav2Vec2 top layer 14 % of a one-step client's
    time on a quiet machine, a third with four training runs on the 2 cores (benchmarks/bench_fl_dp.py,
    "client_model"). The model a client starts from is the template with the
    global state loaded into its trainable parameters, and training changes nothing else (the optimiser
    holds only the trainable parameters), so one model per process, re-loaded for every client, is the same
    start. Not reused: under local DP (Opacus attaches hooks to the model it trains) and for a model with
    buffers (running statistics would carry from one client to the next).
    """
    if cfg["dp"] == "local":
        return task.build_model()
    entry = _CLIENT_MODELS.get(id(task))
    if entry is None or entry[0] is not task:  # the task object itself is kept, so its id cannot be reused
        model = task.build_model()
        if next(iter(model.buffers()), None) is not None:
            return model
        _CLIENT_MODELS[id(task)] = entry = (task, model)
    model = entry[1]
    model.zero_grad(set_to_none=True)
    return model.train()


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as error:
        raise KeyError(
            f"node_config lacks {error}; start the SuperNode with --node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def _local_dp(cfg: Mapping[str, Any], context: Context, num_examples: int, partition_id: int):
    """The client's local-DP engine, restored from context.state (privacy/dp.py does the Opacus work)."""
    from privacy.federated.local_dp import LocalDPSession

    saved = context.state[PRIVACY_KEY]["accountant"] if PRIVACY_KEY in context.state else None
    return LocalDPSession.from_run_config(cfg, num_examples=num_examples, saved_state=saved, partition_id=partition_id)


def handle_train(msg: Message, context: Context, overrides: Optional[Mapping[str, Any]] = None) -> Message:
    cfg = resolve_run_config(context.run_config, overrides)
    partition_id, num_partitions = _partition(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    # the client's generators depend only on (seed, round, partition): whoever trained before in this process (the
    # sequential grid, a Ray worker) and whatever order. NumPy's too: transformers draws Wav2Vec2's SpecAugment time
    # masks from np.random, which nothing seeded here before, so full-model runs differed from process to process
    client_seed = int(cfg["seed"]) * 100003 + server_round * 1009 + partition_id
    seed_torch(client_seed)
    np.random.seed(client_seed % 2**32)

    task = load_task(cfg)
    model = client_model(task, cfg)
    global_state = arrays_to_state(msg.content["arrays"])
    load_federated_state(model, global_state)
    train_loader, _ = task.build_loaders(partition_id, num_partitions)

    dp = None
    if cfg["dp"] == "local":
        dp = _local_dp(cfg, context, num_examples=len(train_loader.dataset), partition_id=partition_id)
    prox_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    steps = int(cfg["local-steps"]) or None
    metrics = train_local(
        model,
        train_loader,
        task.loss_fn,
        epochs=int(cfg["local-epochs"]),
        steps=steps,
        lr=float(cfg["lr"]),
        optimizer=str(cfg["local-optimizer"]),
        dp=dp,
        prox_mu=prox_mu,
        global_params=global_state if prox_mu > 0 else None,
        device=resolve_device(str(cfg["device"])),
    )
    epsilon = 0.0
    if dp is not None:
        epsilon = float(dp.epsilon(float(cfg["target-delta"])))
        context.state[PRIVACY_KEY] = ConfigRecord({"accountant": dp.to_json()})

    # the update, privatised above if local DP is on; compressed only now (see compression.py)
    delta = compute_delta(federated_state(model), global_state)
    compressor = build_compressor(
        str(cfg["compression"]),
        topk_fraction=float(cfg["topk-fraction"]),
        topk_value_bits=int(cfg["topk-value-bits"]),
        topk_keep_biases=bool(cfg["topk-keep-biases"]),
        error_feedback=bool(cfg["error-feedback"]),
        int8_block_size=int(cfg["int8-block-size"]) or None,
    )
    if RESIDUAL_KEY in context.state:
        compressor.load_state_dict(arrays_to_state(context.state[RESIDUAL_KEY]))
    payload = compressor.compress(delta)
    residual = compressor.state_dict()
    if residual:
        context.state[RESIDUAL_KEY] = state_to_arrays(residual)

    if cfg["dp"] == "none":
        reply_metrics = MetricRecord(
            {"num-examples": int(metrics["num-examples"]), "train_loss": float(metrics["train_loss"]), "partition-id": partition_id}
        )
    else:  # nothing outside the DP guarantee (see the module docstring)
        reply_metrics = MetricRecord({"epsilon": epsilon, "partition-id": partition_id})
    return Message(RecordDict({"arrays": state_to_arrays(payload), "metrics": reply_metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, overrides: Optional[Mapping[str, Any]] = None) -> Message:
    cfg = resolve_run_config(context.run_config, overrides)
    if not client_evaluation_enabled(cfg):
        raise PermissionError(
            f"evaluation on this client's private held-out data refused: dp={cfg['dp']} and client-evaluation="
            f"{cfg['client-evaluation']!r}; its loss and word errors would be a release outside the DP guarantee "
            f"(set client-evaluation='on' to allow it, and report it as such)"
        )
    partition_id, num_partitions = _partition(context)
    task = load_task(cfg)
    model = task.build_model()
    load_federated_state(model, arrays_to_state(msg.content["arrays"]))
    _, eval_loader = task.build_loaders(partition_id, num_partitions)
    result = evaluate(model, eval_loader, task.loss_fn, task.error_counts, device=resolve_device(str(cfg["device"])))
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": int(result["num-examples"]),
                        "eval_loss": float(result["eval_loss"]),
                        "eval_wer": float(result["eval_wer"]),
                        "word_errors": int(result["word_errors"]),
                        "words": int(result["words"]),
                        "partition-id": partition_id,
                    }
                )
            }
        ),
        reply_to=msg,
    )


def make_client_app(overrides: Optional[Mapping[str, Any]] = None) -> ClientApp:
    """A ClientApp whose run config is `context.run_config` with `overrides` on top (used by run_simulation)."""
    overrides = dict(overrides or {})
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides)

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return client_app


app = make_client_app()
