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
ArrayRecord + one MetricRecord, its payload does not decode (any exception while
decoding, e.g. a declared shape of 2**40 values: shapes are compared with the
global model's BEFORE anything is allocated, see compression.decompress), its
parameter names or shapes differ from the global model's, it has a NaN/inf, its
update norm exceeds ``max_update_norm``, its message is larger on the wire than
the dense update would be, or its ``num-examples`` (when the strategy uses it)
is not a positive number within what the server knows a client can have
processed. An error reply (the client raised, timed out, crashed) is counted as
FAILED. The round completes with whatever was accepted; when fewer replies are
accepted than the aggregator needs (1; for fedtrimmedavg enough to trim one per
side; for krum 2f + 3), the global model stays as it was and the round records
why (``skip_reason``).

Aggregation weight: the inner strategy weighs by ``aggregation-weight``:
``num-examples`` for fedavg / fedprox / fedadam without DP, bounded by
``max-num-examples`` (or local-steps x batch-size, the most a client can process
in a round); 1 (uniform) under any DP (clients do not send counts, and user-level
sensitivity assumes every client moves the mean by at most C / n) and for the
robust aggregators, which must not let one client buy influence by claiming data.
Central DP with Flower's accountant requires plain FedAvg aggregation (Flower
checks this) and skips a round in which fewer than the sampled number of
clients were accepted (averaging fewer updates with noise calibrated for more
would under-noise). Its noise comes from the OS CSPRNG (:class:`SecureNoiseServerSideFixedClipping`).

Bytes: ``bytes_sent`` of a client is measured by the server on the reply
message as Flower serialises it (compression.wire_nbytes), ``dense_bytes`` on
the same reply with the update sent uncompressed; nothing a client claims.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

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

from privacy.dp import ACCOUNTANTS, central_noise_multiplier_for_budget
from privacy.federated.compression import MalformedPayload, NoCompression, decompress, wire_nbytes, wire_nbytes_with_part
from privacy.federated.task import apply_delta, arrays_to_state, state_to_arrays, update_norm

log = logging.getLogger(__name__)

WEIGHT_KEY = "aggregation-weight"
PER_CLIENT_ONLY_METRICS = ("partition-id",)
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")


@dataclass
class RoundRecord:
    server_round: int
    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    aggregated: bool = False
    eval: dict[str, float] = field(default_factory=dict)
    eval_failed: int = 0
    skip_reason: str = ""


class UpdateRejected(ValueError):
    pass


def validate_update(
    payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_update_norm: float
) -> dict[str, np.ndarray]:
    """Decode and check one client's update against the global model; raises UpdateRejected with the reason.

    Whatever goes wrong while decoding becomes UpdateRejected: a crafted payload
    must cost its sender the round, not end the federation.
    """
    try:
        delta = decompress(payload, {name: np.shape(value) for name, value in reference.items()})
    except MalformedPayload as error:
        raise UpdateRejected(f"payload does not decode: {error}") from None
    for name, value in delta.items():
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"{name!r} has non-finite values")
    norm = update_norm(delta)
    if not norm <= max_update_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:.4g}")
    return delta


class ValidatingStrategy(Strategy):
    """Wraps a Flower strategy: see the module docstring.

    ``max_num_examples``: None = clients' ``num-examples`` are ignored (uniform
    weights); a number = the largest claim accepted (larger ones are rejected).
    ``min_accepted``: fewer accepted replies than this and the round is not aggregated.
    """

    def __init__(
        self,
        inner: Strategy,
        max_update_norm: float,
        max_num_examples: Optional[float] = None,
        min_accepted: int = 1,
        min_accepted_reason: str = "",
    ):
        self.inner = inner
        self.max_update_norm = float(max_update_norm)
        self.max_num_examples = max_num_examples
        self.min_accepted = int(min_accepted)
        self.min_accepted_reason = min_accepted_reason
        self.current: dict[str, np.ndarray] = {}
        self.rounds: dict[int, RoundRecord] = {}
        self._dense_array_bytes: dict[tuple, int] = {}  # (name, shape, dtype) of a delta -> its dense ArrayRecord's wire bytes

    @property
    def uniform_weights(self) -> bool:
        return self.max_num_examples is None

    def _record(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    def summary(self) -> None:
        log.info(
            "ValidatingStrategy(max_update_norm=%g, weights=%s, min_accepted=%d) around %s", self.max_update_norm,
            "uniform" if self.uniform_weights else f"num-examples <= {self.max_num_examples:g}", self.min_accepted, type(self.inner).__name__,
        )
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = arrays_to_state(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _check_reply(self, reply: Message) -> tuple[dict[str, np.ndarray], MetricRecord, int, int]:
        """(delta, metrics, wire bytes, dense wire bytes) of an acceptable reply; UpdateRejected otherwise."""
        content = reply.content
        if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"] or content.config_records:
            raise UpdateRejected(
                f"reply must hold exactly ArrayRecord 'arrays' and MetricRecord 'metrics', got arrays={list(content.array_records)} "
                f"metrics={list(content.metric_records)} configs={list(content.config_records)}"
            )
        metrics = content["metrics"]
        for key, value in metrics.items():
            if isinstance(value, (list, bool)) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                raise UpdateRejected(f"metric {key!r} is not a finite number: {value!r}")
        if not self.uniform_weights:
            weight = metrics.get("num-examples")
            if weight is None or not weight > 0:
                raise UpdateRejected(f"num-examples must be a positive number, got {weight!r}")
            if weight > self.max_num_examples:
                raise UpdateRejected(
                    f"num-examples {weight!r} exceeds {self.max_num_examples:g}, the most a client can have processed in a round "
                    f"(max-num-examples, or local-steps x batch-size)"
                )
        sent, sent_arrays = wire_nbytes_with_part(reply, content["arrays"])
        payload = arrays_to_state(content["arrays"])
        delta = validate_update(payload, self.current, self.max_update_norm)
        dense = sent - sent_arrays + self._dense_nbytes(delta)
        if sent > 1.5 * dense + 4096:
            raise UpdateRejected(f"reply of {sent} bytes is larger than the dense update would be ({dense} bytes)")
        return delta, metrics, sent, dense

    def _dense_nbytes(self, delta: dict[str, np.ndarray]) -> int:
        """Wire bytes of the delta's dense ArrayRecord. They depend on names, shapes and dtypes only (Flower serialises
        an array as its raw bytes plus a header of those and an id of fixed length), so each layout is encoded once.
        Encoding it again for every reply was ~1 of the ~3 ms a reply's check takes (the 8,756-parameter LoRA update,
        medians of 7 x 200 replies on the loaded 2-core machine): ~1.6 s of a 1,600-client round, a few per cent."""
        layout = tuple((name, value.shape, value.dtype.str) for name, value in delta.items())
        if layout not in self._dense_array_bytes:
            self._dense_array_bytes[layout] = wire_nbytes(state_to_arrays(NoCompression().compress(delta)))
        return self._dense_array_bytes[layout]

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
                delta, metrics, sent, dense = self._check_reply(reply)
            except Exception as error:  # whatever a crafted reply triggers, it costs that client the round, not the run
                reason = str(error) if isinstance(error, UpdateRejected) else f"reply does not decode ({type(error).__name__}: {error})"
                log.warning("round %d: update from node %d REJECTED: %s", server_round, node, reason)
                record.rejected.append({"node_id": node, "reason": reason[:500]})
                continue
            record.clients.append(
                {
                    "node_id": node,
                    "partition_id": int(metrics.get("partition-id", -1)),
                    "num_examples": float(metrics["num-examples"]) if "num-examples" in metrics else None,
                    "train_loss": float(metrics["train_loss"]) if "train_loss" in metrics else None,
                    "epsilon": float(metrics.get("epsilon", 0.0)),
                    "bytes_sent": int(sent),
                    "dense_bytes": int(dense),
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
        if len(accepted) < self.min_accepted:
            record.skip_reason = (
                f"{len(accepted)} accepted update(s) ({len(record.failed)} failed, {len(record.rejected)} rejected), "
                f"the aggregator needs {self.min_accepted}" + (f" ({self.min_accepted_reason})" if self.min_accepted_reason else "")
            )
            log.warning("round %d NOT aggregated: %s", server_round, record.skip_reason)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        record.aggregated = arrays is not None
        if arrays is None:
            record.skip_reason = f"{type(self.inner).__name__} returned no aggregate (e.g. central DP with fewer accepted clients than sampled)"
        return arrays, metrics

    def state_dict(self) -> dict[str, Any]:
        """What the aggregation carries from round to round (server_checkpoint.py): the wrapped strategies' optimiser
        and accountant state. The per-round records are rebuilt from the round log (:meth:`restore_rounds`)."""
        return strategy_state(self.inner)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_strategy_state(self.inner, state)

    def restore_rounds(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """The per-round records of rounds already run, from their entries in ``federated_rounds.json``."""
        names = RoundRecord.__dataclass_fields__
        for entry in entries:
            self.rounds[int(entry["server_round"])] = RoundRecord(**{k: copy.deepcopy(entry[k]) for k in names if k in entry})

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


# Flower's FedOpt family (FedAdam) keeps its moments in these attributes (flwr/serverapp/strategy/fedopt.py)
_FLOWER_MOMENT_ATTRIBUTES = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The state a strategy carries between rounds, as arrays and JSON values (server_checkpoint.py).

    Ours: PoissonCohortFedAvg's optimiser, accountant and public subspace. Flower's: the central-DP wrapper's
    RDP accountant (its own JSON state) around the strategy it wraps; FedAdam's moments. Flower's other
    strategies (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum) keep nothing between rounds."""
    if isinstance(strategy, PoissonCohortFedAvg):
        return {"poisson": strategy.state_dict()}
    if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        return {"dp_accountant": strategy.accountant.state_dict() if strategy.accountant is not None else None,
                "wrapped": strategy_state(strategy.strategy)}
    moments = {name: dict(getattr(strategy, name)) for name in _FLOWER_MOMENT_ATTRIBUTES if hasattr(strategy, name)}
    return {"flower_moments": moments} if moments else {}


def load_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`strategy_state` on a strategy built from the same configuration."""
    if isinstance(strategy, PoissonCohortFedAvg):
        strategy.load_state_dict(state["poisson"])
    elif isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        if state["dp_accountant"] is not None:
            strategy.accountant.load_state_dict(dict(state["dp_accountant"]))
        load_strategy_state(strategy.strategy, state["wrapped"])
    else:
        for name, value in (state.get("flower_moments") or {}).items():
            setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})


def robust_min_clients(cfg: Mapping[str, Any]) -> tuple[int, str]:
    """The fewest accepted updates the configured aggregator can work with, and why."""
    name = str(cfg["strategy"])
    if name == "fedtrimmedavg":
        beta = float(cfg["trimmed-beta"])
        if not 0 < beta < 0.5:
            raise ValueError(f"run_config['trimmed-beta']={beta}: must be in (0, 0.5) (the fraction trimmed at each end)")
        need = math.ceil(1.0 / beta - 1e-9)
        return need, f"fedtrimmedavg trims int(beta x n) per side; with beta={beta:g} that is >= 1 only from n = {need}"
    if name == "krum":
        f = int(cfg["krum-malicious"])
        return 2 * f + 3, f"krum with f={f} needs n >= 2f + 3"
    return 1, ""


def build_strategy(cfg: Mapping[str, Any], num_clients: int, subspace: Optional[Callable] = None
                   ) -> tuple[ValidatingStrategy, Optional[DifferentialPrivacyServerSideFixedClipping]]:
    """The strategy stack for a flat run config (see settings.py). Robust aggregators are validated here, at start-up.

    subspace: the public-gradient subspace of ``public-subspace-dim`` > 0 (public_subspace.py; the server builds it
    from its task), for Poisson cohorts only; None when only the configuration is being checked (plan.check_config)."""
    if int(cfg["public-subspace-dim"]) > 0 and str(cfg["cohort-sampling"]) != "poisson":
        raise ValueError(f"public-subspace-dim={cfg['public-subspace-dim']} (federated.public_subspace_dim) with cohort-sampling="
                         f"{cfg['cohort-sampling']!r}: the public-subspace projection is implemented for Poisson cohorts only "
                         f"(federated.cohort_sampling=poisson)")
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
    if name == "krum" and int(cfg["krum-malicious"]) < 1:
        raise ValueError(
            f"run_config['krum-malicious']={cfg['krum-malicious']}: krum needs the number of malicious clients f it should "
            f"tolerate, explicitly and >= 1 (federated.krum_malicious); with f = 0 it defends against nobody"
        )
    min_accepted, why = robust_min_clients(cfg)
    if sample_size < min_accepted:
        raise ValueError(
            f"strategy={name} with {sample_size} sampled clients per round (num-clients={num_clients}, fraction-train="
            f"{cfg['fraction-train']}): {why}. Use more clients, or a larger trimmed-beta / smaller krum-malicious"
        )
    if str(cfg["cohort-sampling"]) == "poisson":
        return _poisson_strategy(cfg, num_clients, subspace)
    if float(cfg["fedavg-server-lr"]) != 1.0 or float(cfg["server-momentum"]) != 0.0:
        raise ValueError(
            f"fedavg-server-lr={cfg['fedavg-server-lr']}, server-momentum={cfg['server-momentum']}: the FedAvg server optimiser "
            f"is implemented for cohort-sampling=poisson only (got {cfg['cohort-sampling']!r}); leave them at 1.0 and 0.0"
        )
    if str(cfg["lr-decay"]) != "none":
        raise ValueError(f"lr-decay={cfg['lr-decay']!r} (federated.lr_decay): the server lr schedule is implemented for "
                         f"cohort-sampling=poisson only (got {cfg['cohort-sampling']!r}); leave it at none")
    inner: Strategy
    if name == "fedavg":
        inner = FedAvg(**common)
    elif name == "fedprox":
        inner = FedProx(proximal_mu=float(cfg["proximal-mu"]), **common)
    elif name == "fedadam":
        inner = FedAdam(eta=float(cfg["server-lr"]), eta_l=float(cfg["lr"]), beta_1=float(cfg["server-beta1"]),
                        beta_2=float(cfg["server-beta2"]), tau=float(cfg["server-tau"]), **common)
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
            noise = central_noise_multiplier_for_budget(
                float(cfg["target-epsilon"]), float(cfg["target-delta"]), int(cfg["num-rounds"]), float(cfg["dp-max-noise-multiplier"])
            )
        dp_wrapper = SecureNoiseServerSideFixedClipping(
            inner,
            noise_multiplier=noise,
            clipping_norm=float(cfg["clipping-norm"]),
            num_sampled_clients=sample_size,
            accountant=central_accountant(float(cfg["target-delta"]), num_clients, float(cfg["target-epsilon"])),
        )
        dp_wrapper.reproducible_seed = (
            int(cfg["seed"]) if bool(cfg["dp-reproducible-noise-NOT-PRIVATE"]) else None
        )
        inner = dp_wrapper
    return ValidatingStrategy(inner, float(cfg["max-update-norm"]), max_num_examples=max_num_examples(cfg, name),
                              min_accepted=min_accepted, min_accepted_reason=why), dp_wrapper


def _poisson_strategy(cfg: Mapping[str, Any], num_clients: int, subspace: Optional[Callable] = None
                      ) -> tuple[ValidatingStrategy, "PoissonCohortFedAvg"]:
    """FedAvg over Poisson cohorts (cohort-sampling = poisson), with user-level DP under dp=central."""
    from privacy.dp import noise_multiplier_for_budget

    if str(cfg["strategy"]) not in ("fedavg", "fedadam"):
        raise ValueError(f"cohort-sampling=poisson with strategy={cfg['strategy']!r}: Poisson cohorts are implemented for "
                         f"fedavg (server SGD, FedAvgM) and fedadam (server Adam) only")
    adam = str(cfg["strategy"]) == "fedadam"
    if adam and (float(cfg["fedavg-server-lr"]) != 1.0 or float(cfg["server-momentum"]) != 0.0):
        raise ValueError(f"fedavg-server-lr={cfg['fedavg-server-lr']}, server-momentum={cfg['server-momentum']} with strategy=fedadam: "
                         f"these set FedAvg's server SGD; FedAdam's server step is server-lr, server-beta1, server-beta2, server-tau "
                         f"(federated.server_lr, ...); leave them at 1.0 and 0.0")
    noise = None
    if cfg["dp"] == "central":
        noise = float(cfg["noise-multiplier"])
        if noise < 0:
            noise = noise_multiplier_for_budget(float(cfg["target-epsilon"]), float(cfg["target-delta"]), float(cfg["cohort-rate"]),
                                                int(cfg["num-rounds"]), str(cfg["dp-accountant"]), float(cfg["dp-max-noise-multiplier"]))
    # Cohorts (and noise) come from the OS CSPRNG under central DP: amplification by sampling needs a sample the
    # server's adversary cannot regenerate. Without central DP nothing rests on the draw, so it is seeded and a
    # run is reproducible (local DP's guarantee is the clients' own, whoever the server picks).
    cohort_seed = None if noise is not None and not bool(cfg["dp-reproducible-noise-NOT-PRIVATE"]) else int(cfg["seed"])
    inner = PoissonCohortFedAvg(num_clients, float(cfg["cohort-rate"]), noise, float(cfg["clipping-norm"]),
                                reproducible_seed=cohort_seed,
                                server_lr=float(cfg["server-lr" if adam else "fedavg-server-lr"]),
                                server_momentum=float(cfg["server-momentum"]), server_optimizer="adam" if adam else "sgd",
                                server_betas=(float(cfg["server-beta1"]), float(cfg["server-beta2"])), server_tau=float(cfg["server-tau"]),
                                lr_decay=str(cfg["lr-decay"]), num_rounds=int(cfg["num-rounds"]), subspace=subspace,
                                server_shrink=float(cfg["server-shrink"]), server_adam_bc=float(cfg["server-adam-bc"]),
                                accountant=str(cfg["dp-accountant"]))
    # Under central DP every round releases the noised sum, also when the Poisson cohort is empty or every reply
    # was rejected: the subsampled Gaussian mechanism the accountant analyses outputs noise then, whereas skipping
    # the round would release "nobody was sampled", an event whose probability depends on who is in the population.
    min_accepted = 0 if noise is not None else 1
    return ValidatingStrategy(inner, float(cfg["max-update-norm"]), max_num_examples=max_num_examples(cfg, "fedavg"),
                              min_accepted=min_accepted), inner


def max_num_examples(cfg: Mapping[str, Any], name: Optional[str] = None) -> Optional[float]:
    """The largest ``num-examples`` the server accepts, or None: weights are uniform and client counts ignored.

    Uniform under any DP (clients send no counts; central DP's sensitivity assumes
    equal weights) and for the robust aggregators. Otherwise ``max-num-examples``
    if set, else local-steps x batch-size (the most a client processes in a round
    without DP); with epoch-based rounds and no bound the server knows nothing,
    so weights are uniform too.
    """
    name = name or str(cfg["strategy"])
    if cfg["dp"] != "none" or name in ROBUST_STRATEGIES:
        return None
    if float(cfg["max-num-examples"]) > 0:
        return float(cfg["max-num-examples"])
    if int(cfg["local-steps"]) > 0:
        return float(int(cfg["local-steps"]) * int(cfg["batch-size"]))
    return None


class SecureNoiseServerSideFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping central DP, with its Gaussian noise drawn from the OS CSPRNG.

    Flower draws the noise from NumPy's global generator (``np.random.normal``),
    which the entry script seeds from the run's seed, so anyone knowing the
    configuration could regenerate the noise and subtract it from the released
    model. Around each aggregation the global generator is re-seeded with 256 bits
    from ``os.urandom`` (its previous state is restored afterwards, so nothing else
    changes). ``reproducible_seed`` (set only by the NOT-PRIVATE option) seeds it
    from the run seed and the round instead.
    """

    reproducible_seed: Optional[int] = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        saved = np.random.get_state()
        if self.reproducible_seed is None:
            np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
        else:
            np.random.seed([self.reproducible_seed % 2**32, server_round])
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            np.random.set_state(saved)


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


class PoissonCohortFedAvg(Strategy):
    """FedAvg over Poisson-sampled cohorts, optionally with user-level central DP (DP-FedAvg,
    McMahan et al. 2018, "Learning differentially private recurrent language models").

    Every round each of the N clients joins the cohort independently with probability q
    (``cohort-rate``); the sampling draws from the OS CSPRNG (the server must not be able to
    choose or replay cohorts in a way that breaks the amplification argument).

    Without DP the new global model is the old one plus the uniform mean of the accepted updates.
    With DP (``noise_multiplier`` not None) each update is clipped to L2 norm <= C (``clipping_norm``),
    the clipped updates are SUMMED, Gaussian noise N(0, sigma^2 C^2) is added per coordinate, and the
    sum is divided by the EXPECTED cohort size qN (a fixed denominator: the sensitivity of the
    released quantity to adding or removing one client is then C / (qN) whatever the realised
    cohort size). Each round is one Poisson-subsampled Gaussian mechanism with rate q and noise
    multiplier sigma; :meth:`epsilon` composes them with Opacus' RDP accountant, or its PRV accountant
    (``accountant="prv"``, dp.accountant: a numerical privacy-loss accountant, tighter than RDP, so the same
    epsilon needs about 6 % less noise on these plans) (privacy.dp.opacus_epsilon), and the run cross-checks
    it with dp_accounting (its RDP, or PLD accountant for prv).

    Server optimiser (FedAvgM, Hsu et al. 2019, "Measuring the effects of non-identical data distribution"):
    the round's mean update m (the noised one under DP) feeds a momentum buffer v <- beta v + m and the
    global model moves by eta v (``server_lr`` eta, ``server_momentum`` beta; eta = 1, beta = 0 is plain
    FedAvg). It only post-processes the released m, so the DP guarantee is unchanged.

    Server Adam (``server_optimizer="adam"``, FedAdam, Reddi et al. 2021, "Adaptive Federated Optimization";
    strategy=fedadam): m is a pseudo-gradient; the server keeps mu <- beta1 mu + (1 - beta1) m and
    nu <- beta2 nu + (1 - beta2) m^2 and moves the global model by eta_t mu / (sqrt(nu) + tau), with Adam's bias
    correction folded into eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t) (t = server steps so far, as Flower's
    FedAdam does). The clients then run plain SGD. Under central DP it, too, sees only the noised mean: the moments
    and the step are functions of released values alone (post-processing), so the guarantee is the same.

    ``lr_decay="linear"``: in round r of ``num_rounds`` = T the server step (of either optimiser) is multiplied by
    1 - (r - 1) / T, so the last round moves the model by 1/T of a full step; a data-independent schedule, so
    post-processing under DP as well. It settles the final model where single-round steps are noisy (few-client
    cohorts of one-speaker clients). "none": a constant step.

    ``server_shrink`` = kappa > 0 (under DP; Wiener / positive-part James-Stein shrinkage): the optimiser buffer b
    (FedAvgM's v, Adam's mu) is a linear filter of the released means, so the DP noise it carries has a per-coordinate
    variance s2 the server knows from public constants alone (sigma, C, qN and the betas; ``buffer_noise_var``, updated every step).
    The step uses b_i x max(0, 1 - kappa s2 / b_i^2) instead of b_i: coordinates whose buffer is within the noise
    level move little or not at all, coordinates with a clear signal move as before (kappa = 1: the signal power
    estimated as b_i^2 - s2). The buffer itself is kept unshrunk. Post-processing of released values, so the guarantee
    is the same. Logged per round: ``shrink_zeroed`` (fraction of coordinates not moved) and ``shrink_mean``
    (the mean factor).

    ``server_adam_bc`` = rho > 0 (server Adam under DP; DP-AdamBC, Tang et al. 2024): the second moment of the noised
    mean is E[m_i^2] = s_i^2 + sigma_c^2 (sigma_c = sigma C / qN, known), so plain server Adam normalises every
    coordinate by about the noise's scale and takes SGD steps of lr / sigma_c: coordinates with small gradients barely
    move. Here the bias-corrected second moment loses the noise variance, nu_hat = max(nu / (1 - beta2^t) - sigma_c^2,
    (rho sigma_c)^2), and the step is eta mu_hat / (sqrt(nu_hat) + tau) (mu_hat = mu / (1 - beta1^t)); rho floors the
    scale of a coordinate whose signal the noise hides. Post-processing. Logged: ``adam_bc_floored`` (the fraction of
    coordinates at the floor).

    ``subspace`` (privacy/federated/public_subspace.py; run-config ``public-subspace-dim`` > 0): a callable
    (global state, round) -> orthonormal basis V (k x d) computed from PUBLIC data at the current global model.
    Each update u is replaced by its coefficients V u before clipping (so with DP it is the k coefficients that are
    clipped to C and noised, k noise draws instead of d), and the round's mean m in coefficients becomes V^T m. V is
    public, so each client's contribution is still bounded by C and the accounting is the same; the noise norm
    shrinks by sqrt(d / k). ``subspace_kept`` records the mean fraction of an update's squared norm V keeps.

    Per round it records what DP costs in signal: ``noise_norm`` (||noise|| / qN), ``signal_norm``
    (||sum of clipped updates|| / qN), their ratio ``noise_to_signal``, the fraction of clipped updates
    and the cohort size. These diagnostics are computed from the clients' updates and are not covered by the
    DP guarantee (the run's logs, not a release).
    """

    def __init__(
        self,
        population: int,
        cohort_rate: float,
        noise_multiplier: Optional[float] = None,
        clipping_norm: float = 1.0,
        reproducible_seed: Optional[int] = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: str = "sgd",
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_tau: float = 1e-3,
        lr_decay: str = "none",
        num_rounds: Optional[int] = None,
        subspace: Optional[Callable[[Mapping[str, np.ndarray], int], np.ndarray]] = None,
        server_shrink: float = 0.0,
        server_adam_bc: float = 0.0,
        accountant: str = "rdp",
    ):
        if population < 1:
            raise ValueError(f"population={population}: need at least one client")
        if not 0 < cohort_rate <= 1:
            raise ValueError(f"cohort-rate={cohort_rate}: must be in (0, 1]")
        if noise_multiplier is not None and not (noise_multiplier >= 0 and clipping_norm > 0):
            raise ValueError(f"noise_multiplier={noise_multiplier}, clipping_norm={clipping_norm}: need sigma >= 0 and C > 0")
        if not (server_lr > 0 and 0 <= server_momentum < 1):
            raise ValueError(f"fedavg-server-lr={server_lr}, server-momentum={server_momentum}: need eta > 0 and 0 <= beta < 1")
        if lr_decay not in ("none", "linear"):
            raise ValueError(f"lr-decay={lr_decay!r}: expected none | linear")
        if lr_decay != "none" and not (isinstance(num_rounds, int) and num_rounds >= 1):
            raise ValueError(f"lr-decay={lr_decay!r} needs the run's num-rounds (>= 1), got {num_rounds!r}")
        if server_optimizer not in ("sgd", "adam"):
            raise ValueError(f"server_optimizer={server_optimizer!r}: expected sgd (FedAvg / FedAvgM) | adam (FedAdam)")
        if server_optimizer == "adam":
            beta1, beta2 = (float(b) for b in server_betas)
            if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and server_tau > 0):
                raise ValueError(f"server-beta1={beta1}, server-beta2={beta2}, server-tau={server_tau}: FedAdam needs "
                                 f"0 <= beta1, beta2 < 1 and tau > 0")
            if server_momentum != 0.0:
                raise ValueError(f"server-momentum={server_momentum} with server Adam: Adam's momentum is server-beta1")
        if not 0 <= server_shrink <= 10:
            raise ValueError(f"server-shrink={server_shrink}: expected kappa in [0, 10] (0: off)")
        if server_shrink and (noise_multiplier is None or subspace is not None):
            raise ValueError(f"server-shrink={server_shrink}: shrinks the per-coordinate DP noise of the server step; needs "
                             f"central DP (a noise multiplier) and no public subspace (its noise is not per coordinate)")
        if not 0 <= server_adam_bc <= 1:
            raise ValueError(f"server-adam-bc={server_adam_bc}: expected rho in [0, 1] (0: off)")
        if server_adam_bc and (server_optimizer != "adam" or noise_multiplier is None or subspace is not None):
            raise ValueError(f"server-adam-bc={server_adam_bc}: debiases the server Adam's second moment for per-coordinate DP "
                             f"noise; needs server Adam, central DP (a noise multiplier) and no public subspace")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant={accountant!r}: expected rdp | prv (Opacus' accountants for the Poisson-subsampled Gaussian)")
        self.accountant = accountant
        self.server_adam_bc = float(server_adam_bc)
        self.server_optimizer = server_optimizer
        self.subspace = subspace
        self.server_shrink = float(server_shrink)
        self.buffer_noise_var = 0.0  # per-coordinate variance of the DP noise in the optimiser buffer (velocity)
        self.last_step_stats: dict[str, float] = {}
        self.lr_decay, self.num_rounds = lr_decay, num_rounds
        self.server_betas = (float(server_betas[0]), float(server_betas[1]))
        self.server_tau = float(server_tau)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.velocity: Optional[np.ndarray] = None
        self.second_moment: Optional[np.ndarray] = None
        self.server_steps = 0
        self.population = int(population)
        self.cohort_rate = float(cohort_rate)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = float(clipping_norm)
        self.reproducible_seed = reproducible_seed
        self.current: dict[str, np.ndarray] = {}
        self.releases = 0
        self.round_stats: dict[int, dict[str, float]] = {}

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def summary(self) -> None:
        server = (f"server Adam lr {self.server_lr:g}, betas {self.server_betas[0]:g}/{self.server_betas[1]:g}, tau {self.server_tau:g}"
                  if self.server_optimizer == "adam" else f"server lr {self.server_lr:g}, momentum {self.server_momentum:g}")
        if self.lr_decay != "none":
            server += f", lr decayed {self.lr_decay}ly over {self.num_rounds} rounds"
        if self.server_adam_bc:
            server += f", second moment debiased for the DP noise (floor {self.server_adam_bc:g} x its std)"
        if self.server_shrink:
            server += f", step shrunk by its DP noise (kappa {self.server_shrink:g})"
        if self.subspace is not None:
            server += f", updates projected on {getattr(self.subspace, 'dim', '?')} public-gradient directions"
        log.info("PoissonCohortFedAvg(N=%d, q=%g, expected cohort %.1f, %s, %s)", self.population,
                 self.cohort_rate, self.population * self.cohort_rate, server,
                 f"user-level DP: sigma={self.noise_multiplier:.4g}, C={self.clipping_norm:g}, {self.accountant.upper()} accountant, "
                 f"noise std on the released mean {self.mean_noise_std():.3g} per coordinate"
                 if self.private else "no DP")

    def _generator(self, server_round: int, stream: int):
        import torch

        if self.reproducible_seed is None:
            from privacy.dp import csprng_generator

            return csprng_generator()
        return torch.Generator().manual_seed(int(self.reproducible_seed) * 1_000_003 + server_round * 7 + stream)

    def sample_cohort(self, node_ids: list[int], server_round: int) -> list[int]:
        """Each node independently with probability q (Poisson sampling)."""
        import torch

        draws = torch.rand(len(node_ids), generator=self._generator(server_round, 0), dtype=torch.float64)
        return [node for node, u in zip(node_ids, draws.tolist()) if u < self.cohort_rate]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        from flwr.app import MessageType

        self.current = arrays_to_state(arrays)
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) != self.population:
            raise RuntimeError(f"the grid has {len(node_ids)} nodes, the DP plan assumes a population of {self.population}")
        cohort = self.sample_cohort(node_ids, server_round)
        self.releases += 1  # every round is one run of the mechanism, whatever the cohort
        self.round_stats[server_round] = {"cohort_size": float(len(cohort))}
        log.info("round %d: Poisson cohort of %d / %d clients (q=%g)", server_round, len(cohort), len(node_ids), self.cohort_rate)
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})  # one payload for every node, as Flower's FedAvg
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in cohort]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # final scoring is on the held-out test speakers, by the entry script

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        import torch

        names = list(self.current)
        deltas = []
        for reply in replies:
            weights = arrays_to_state(reply.content["arrays"])
            deltas.append(np.concatenate([(np.asarray(weights[n], np.float64) - self.current[n]).ravel() for n in names]))
        stats = self.round_stats.setdefault(server_round, {})
        stats["accepted"] = float(len(deltas))
        dim = sum(int(np.size(self.current[n])) for n in names)
        basis = None
        if self.subspace is not None and (deltas or self.private):  # a non-private empty round moves nothing
            from privacy.federated.public_subspace import project

            basis = np.asarray(self.subspace(self.current, server_round), dtype=np.float64)
            if basis.ndim != 2 or basis.shape[1] != dim:
                raise ValueError(f"public subspace: basis of shape {basis.shape}, expected (k, {dim}) for this model")
            deltas, kept = project(deltas, basis)
            dim = basis.shape[0]
            stats["subspace_dim"] = float(dim)
            if len(kept):
                stats["subspace_kept"] = float(np.mean(kept))
        if not self.private:
            if not deltas:
                return None, None
            step = np.mean(deltas, axis=0)
        else:
            norms = np.array([float(np.linalg.norm(d)) for d in deltas]) if deltas else np.zeros(0)
            clipped = [d * min(1.0, self.clipping_norm / max(n, 1e-12)) for d, n in zip(deltas, norms)]
            total = np.sum(clipped, axis=0) if clipped else np.zeros(dim)
            noise = torch.normal(0.0, float(self.noise_multiplier) * self.clipping_norm, (dim,),
                                 generator=self._generator(server_round, 1), dtype=torch.float64).numpy()
            expected = self.cohort_rate * self.population
            step = (total + noise) / expected
            signal_norm, noise_norm = float(np.linalg.norm(total)) / expected, float(np.linalg.norm(noise)) / expected
            stats.update(signal_norm=signal_norm, noise_norm=noise_norm,
                         clipped_fraction=float(np.mean(norms > self.clipping_norm)) if len(norms) else 0.0,
                         mean_update_norm=float(np.mean(norms)) if len(norms) else 0.0)
            if signal_norm > 0:  # an empty cohort releases pure noise: no ratio (it would swamp the run's mean)
                stats["noise_to_signal"] = noise_norm / signal_norm
        if basis is not None:
            step = basis.T @ step  # back to the model's coordinates: a step within the public subspace
        step = self.server_step(step, server_round)
        stats["server_step_norm"] = float(np.linalg.norm(step))
        stats.update(self.last_step_stats)
        new, offset = {}, 0
        for n in names:
            size = int(np.size(self.current[n]))
            new[n] = (self.current[n] + step[offset:offset + size].reshape(np.shape(self.current[n]))).astype(np.float32)
            offset += size
        return state_to_arrays(new), MetricRecord({k: float(v) for k, v in stats.items()})

    def lr_scale(self, server_round: Optional[int]) -> float:
        """The schedule's factor of the server step in `server_round` (1-based): 1 for "none", 1 - (r - 1) / T for "linear"."""
        if self.lr_decay == "none" or server_round is None:
            return 1.0
        return max(0.0, 1.0 - (int(server_round) - 1) / float(self.num_rounds))

    def server_step(self, mean_update: np.ndarray, server_round: Optional[int] = None) -> np.ndarray:
        """The change of the global model for this round's (released) mean update: FedAvgM or server Adam, times the
        lr schedule's factor of `server_round` (None: no schedule)."""
        self.server_steps += 1
        self.last_step_stats = {}  # this step's diagnostics (shrinkage, Adam-BC), read by aggregate_train
        scale = self.lr_scale(server_round)
        noise_var = self.mean_noise_std() ** 2
        if self.server_optimizer == "sgd":
            self.velocity = mean_update if self.velocity is None else self.server_momentum * self.velocity + mean_update
            self.buffer_noise_var = self.server_momentum ** 2 * self.buffer_noise_var + noise_var
            return scale * self.server_lr * self.shrunk(self.velocity)
        beta1, beta2 = self.server_betas
        if self.velocity is None:
            self.velocity, self.second_moment = np.zeros_like(mean_update), np.zeros_like(mean_update)
        self.velocity = beta1 * self.velocity + (1 - beta1) * mean_update
        self.buffer_noise_var = beta1 ** 2 * self.buffer_noise_var + (1 - beta1) ** 2 * noise_var
        self.second_moment = beta2 * self.second_moment + (1 - beta2) * np.square(mean_update)
        t = self.server_steps
        if self.server_adam_bc:
            nu_hat = self.second_moment / (1 - beta2 ** t) - noise_var
            floor = (self.server_adam_bc * math.sqrt(noise_var)) ** 2
            step = scale * self.server_lr / (1 - beta1 ** t) * self.shrunk(self.velocity) / (np.sqrt(np.maximum(nu_hat, floor)) + self.server_tau)
            self.last_step_stats["adam_bc_floored"] = float(np.mean(nu_hat <= floor))
            return step
        lr_t = scale * self.server_lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        return lr_t * self.shrunk(self.velocity) / (np.sqrt(self.second_moment) + self.server_tau)

    def mean_noise_std(self) -> float:
        """Per-coordinate standard deviation of the DP noise in a round's released mean: sigma C / (q N); 0 without DP.
        At a fixed epsilon it, not sigma alone, compares schedules: it grows with the square root of the rounds
        whatever the cohort (docs/results.md, session 20); the start-up log states it."""
        if not self.private:
            return 0.0
        return float(self.noise_multiplier) * self.clipping_norm / (self.cohort_rate * self.population)

    def shrunk(self, buffer: np.ndarray) -> np.ndarray:
        """The buffer with every coordinate multiplied by max(0, 1 - kappa s2 / b_i^2) (s2 = ``buffer_noise_var``);
        the buffer itself when shrinkage is off or there is no noise. Records the step's shrink diagnostics."""
        if not self.server_shrink or self.buffer_noise_var == 0.0:
            return buffer
        power = np.square(buffer)
        factor = np.where(power > 0, np.maximum(0.0, 1.0 - self.server_shrink * self.buffer_noise_var / np.where(power > 0, power, 1.0)), 0.0)
        self.last_step_stats.update(shrink_zeroed=float(np.mean(factor == 0.0)), shrink_mean=float(np.mean(factor)))
        return buffer * factor

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    def state_dict(self) -> dict[str, Any]:
        """The server optimiser, the accountant's release count and the public subspace (round_stats are in the round log)."""
        state: dict[str, Any] = {"server_steps": self.server_steps, "releases": self.releases,
                                 "buffer_noise_var": self.buffer_noise_var,
                                 "velocity": self.velocity, "second_moment": self.second_moment}
        if self.subspace is not None and hasattr(self.subspace, "basis"):
            state["subspace"] = {"basis": self.subspace.basis, "computed_at": self.subspace.computed_at}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_steps, self.releases = int(state["server_steps"]), int(state["releases"])
        self.buffer_noise_var = float(state["buffer_noise_var"])
        self.velocity = None if state["velocity"] is None else np.asarray(state["velocity"])
        self.second_moment = None if state["second_moment"] is None else np.asarray(state["second_moment"])
        if "subspace" in state:
            if self.subspace is None:
                raise ValueError("the saved state has a public subspace, this strategy has none")
            saved = state["subspace"]
            self.subspace.basis = None if saved["basis"] is None else np.asarray(saved["basis"])
            self.subspace.computed_at = saved["computed_at"]

    def epsilon(self, delta: float) -> float:
        """User-level epsilon after the rounds so far (Opacus' RDP or PRV accountant, Poisson rate q, sigma)."""
        from privacy.dp import opacus_epsilon

        if not self.private or self.releases == 0:
            return 0.0
        return opacus_epsilon(float(self.noise_multiplier), self.cohort_rate, self.releases, delta, self.accountant)
