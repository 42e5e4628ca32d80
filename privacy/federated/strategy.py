"""Server strategy: decompress, validate, then aggregate with a Flower strategy (optionally under central DP).

Composition (outermost first)::

    ValidatingStrategy                      # ours: error replies, decompression, validation, per-client log
      -> DifferentialPrivacyServerSideFixedClipping   # Flower's, only when dp=central
           -> FedAvg | FedProx | FedAdam | FedMedian | FedTrimmedAvg | Krum   # Flower's

Clients send compressed UPDATES (see compression.py), but every Flower
strategy aggregates full weights. :class:`ValidatingStrategy` therefore turns
each reply into ``global + delta`` under the global model's parameter names and
hands only the accepted, rebuilt replies to the inner strategy, so all of
Flower's aggregators and its central-DP wrapper (which clips ``reply - global``
and noises the aggregate) work unchanged.

A reply is REJECTED (logged with its reason, counted) when it is not exactly one
ArrayRecord + one MetricRecord, its payload does not decode, its parameter
names or shapes differ from the global model's, it has a NaN/inf, its update
norm exceeds ``max_update_norm``, its payload is larger than the dense update
would be, or ``num-examples`` is not a positive number. An error reply (the
client raised, timed out, crashed) is counted as FAILED. The round completes
with whatever was accepted; with none, the global model stays as it was.

Aggregation weight: the inner strategy weighs by ``aggregation-weight``, which
is ``num-examples`` normally and 1 under central DP, where user-level
sensitivity assumes every client moves the mean by at most C / n.
Central DP with Flower's accountant requires plain FedAvg aggregation (Flower
checks this) and skips a round in which fewer than the sampled number of
clients were accepted (averaging fewer updates with noise calibrated for more
would under-noise).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from privacy.dp import central_noise_multiplier_for_budget
from privacy.federated.compression import decompress
from privacy.federated.task import apply_delta, arrays_to_state, state_to_arrays, update_norm

log = logging.getLogger(__name__)

WEIGHT_KEY = "aggregation-weight"
PER_CLIENT_ONLY_METRICS = ("partition-id",)


@dataclass
class RoundRecord:
    server_round: int
    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    aggregated: bool = False
    eval: dict[str, float] = field(default_factory=dict)
    eval_failed: int = 0


class UpdateRejected(ValueError):
    pass


def validate_update(
    payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_update_norm: float
) -> dict[str, np.ndarray]:
    """Decode and check one client's update against the global model; raises UpdateRejected with the reason."""
    try:
        delta = decompress(payload)
    except ValueError as error:
        raise UpdateRejected(f"payload does not decode: {error}") from None
    missing, unexpected = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
    if missing or unexpected:
        raise UpdateRejected(f"parameter names differ from the global model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in delta.items():
        if value.shape != np.shape(reference[name]):
            raise UpdateRejected(f"{name!r} has shape {value.shape}, the global model has {np.shape(reference[name])}")
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"{name!r} has non-finite values")
    norm = update_norm(delta)
    if not norm <= max_update_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:.4g}")
    return delta


class ValidatingStrategy(Strategy):
    """Wraps a Flower strategy: see the module docstring."""

    def __init__(self, inner: Strategy, max_update_norm: float, uniform_weights: bool = False):
        self.inner = inner
        self.max_update_norm = float(max_update_norm)
        self.uniform_weights = uniform_weights
        self.current: dict[str, np.ndarray] = {}
        self.rounds: dict[int, RoundRecord] = {}

    def _record(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    def summary(self) -> None:
        log.info("ValidatingStrategy(max_update_norm=%g, uniform_weights=%s) around %s", self.max_update_norm, self.uniform_weights, type(self.inner).__name__)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = arrays_to_state(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _check_reply(self, reply: Message) -> tuple[dict[str, np.ndarray], MetricRecord]:
        content = reply.content
        if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"] or content.config_records:
            raise UpdateRejected(
                f"reply must hold exactly ArrayRecord 'arrays' and MetricRecord 'metrics', got arrays={list(content.array_records)} "
                f"metrics={list(content.metric_records)} configs={list(content.config_records)}"
            )
        metrics = content["metrics"]
        weight = metrics.get("num-examples")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise UpdateRejected(f"num-examples must be a positive number, got {weight!r}")
        for key, value in metrics.items():
            if isinstance(value, list) or not math.isfinite(float(value)):
                raise UpdateRejected(f"metric {key!r} is not a finite number: {value!r}")
        payload = arrays_to_state(content["arrays"])
        delta = validate_update(payload, self.current, self.max_update_norm)
        sent = sum(a.nbytes for a in payload.values())
        dense = sum(np.asarray(v, np.float32).nbytes for v in self.current.values())
        if sent > 1.5 * dense + 4096:
            raise UpdateRejected(f"payload of {sent} bytes is larger than the dense update would be ({dense} bytes)")
        return delta, metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        record = self._record(server_round)
        accepted: list[Message] = []
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                log.warning("round %d: client node %d FAILED: %s", server_round, node, reason)
                record.failed.append({"node_id": node, "reason": str(reason)[:500]})
                continue
            try:
                delta, metrics = self._check_reply(reply)
            except UpdateRejected as error:
                log.warning("round %d: update from node %d REJECTED: %s", server_round, node, error)
                record.rejected.append({"node_id": node, "reason": str(error)})
                continue
            record.clients.append(
                {
                    "node_id": node,
                    "partition_id": int(metrics.get("partition-id", -1)),
                    "num_examples": float(metrics["num-examples"]),
                    "train_loss": float(metrics.get("train_loss", math.nan)),
                    "epsilon": float(metrics.get("epsilon", 0.0)),
                    "bytes_sent": int(metrics.get("bytes_sent", 0)),
                    "dense_bytes": int(metrics.get("dense_bytes", 0)),
                    "update_norm": update_norm(delta),
                }
            )
            weights = apply_delta(self.current, delta)
            kept = {k: v for k, v in metrics.items() if k not in PER_CLIENT_ONLY_METRICS}
            kept[WEIGHT_KEY] = 1.0 if self.uniform_weights else float(metrics["num-examples"])
            # a copy: the client's message itself stays as it was received (tests inspect it)
            rebuilt = copy.copy(reply)
            rebuilt.content = RecordDict({"arrays": state_to_arrays({name: weights[name] for name in self.current}), "metrics": MetricRecord(kept)})
            accepted.append(rebuilt)
        log.info(
            "round %d: %d accepted, %d rejected, %d failed", server_round, len(accepted), len(record.rejected), len(record.failed)
        )
        if not accepted:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        record.aggregated = arrays is not None
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        record = self._record(server_round)
        errors = words = examples = 0.0
        loss_sum = 0.0
        for reply in replies:
            if reply.has_error():
                record.eval_failed += 1
                log.warning("round %d: evaluation on node %d FAILED: %s", server_round, reply.metadata.src_node_id, reply.error.reason)
                continue
            m = reply.content["metrics"]
            n = float(m.get("num-examples", 0))
            examples += n
            loss_sum += float(m.get("eval_loss", 0.0)) * n
            errors += float(m.get("word_errors", 0))
            words += float(m.get("words", 0))
        if examples == 0:
            return None
        # corpus WER over all clients' words, not a mean of per-client WERs
        result = {"eval_loss": loss_sum / examples, "eval_wer": errors / max(words, 1.0), "eval_examples": examples}
        record.eval = result
        return MetricRecord(result)


def build_strategy(cfg: Mapping[str, Any], num_clients: int) -> tuple[ValidatingStrategy, Optional[DifferentialPrivacyServerSideFixedClipping]]:
    """The strategy stack for a flat run config (see settings.py)."""
    name = str(cfg["strategy"])
    sample_size = max(int(num_clients * float(cfg["fraction-train"])), min(int(cfg["min-train-nodes"]), num_clients))
    common = dict(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=min(int(cfg["min-train-nodes"]), num_clients),
        min_evaluate_nodes=min(int(cfg["min-train-nodes"]), num_clients),
        min_available_nodes=num_clients,
        weighted_by_key=WEIGHT_KEY,
    )
    inner: Strategy
    if name == "fedavg":
        inner = FedAvg(**common)
    elif name == "fedprox":
        inner = FedProx(proximal_mu=float(cfg["proximal-mu"]), **common)
    elif name == "fedadam":
        inner = FedAdam(eta=float(cfg["server-lr"]), eta_l=float(cfg["lr"]), **common)
    elif name == "fedmedian":
        inner = FedMedian(**common)
    elif name == "fedtrimmedavg":
        inner = FedTrimmedAvg(beta=float(cfg["trimmed-beta"]), **common)
    elif name == "krum":
        inner = Krum(num_malicious_nodes=int(cfg["krum-malicious"]), **common)
    else:
        raise ValueError(f"unknown strategy {name!r}")

    dp_wrapper = None
    if cfg["dp"] == "central":
        if name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"dp=central needs a mean aggregator (fedavg | fedprox); {name!r} changes the sensitivity the noise is calibrated for"
            )
        noise = float(cfg["noise-multiplier"])
        if noise < 0:
            noise = central_noise_multiplier_for_budget(float(cfg["target-epsilon"]), float(cfg["target-delta"]), int(cfg["num-rounds"]))
        dp_wrapper = DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=noise,
            clipping_norm=float(cfg["clipping-norm"]),
            num_sampled_clients=sample_size,
            accountant=central_accountant(float(cfg["target-delta"]), num_clients, float(cfg["target-epsilon"])),
        )
        inner = dp_wrapper
    return ValidatingStrategy(inner, float(cfg["max-update-norm"]), uniform_weights=dp_wrapper is not None), dp_wrapper


def central_accountant(target_delta: float, population: int, max_epsilon: Optional[float]):
    """Flower's RDP accountant (dp-accounting) for user-level central DP, without sampling amplification."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            target_delta=target_delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        )
    )
