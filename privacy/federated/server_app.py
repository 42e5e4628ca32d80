"""Flower ServerApp (Message API): rounds of train -> validate/aggregate -> evaluate, with a per-round log.

:func:`run_server` is the whole server logic; the ServerApp's ``main(grid,
context)`` only calls it, and the sequential runner calls it with an in-process
grid, so both paths execute the same code. It is Flower's ``Strategy.start``
loop written out, because it also has to

* write per-round metrics (train loss, eval WER, epsilon and bytes per client,
  rejected / failed counts) to ``<run-dir>/federated_rounds.json`` and ``.csv``
  after every round (atomic writes, so a crash leaves the last complete round),
  log a progress line per round (time per round, ETA; common.progress) and hand
  the round's entry to ``on_round`` (the Hydra side writes its log.csv/wandb row there);
* stop early when the privacy budget is exhausted: central DP stops BEFORE a
  release that would exceed ``target-epsilon`` (Flower's accountant raises
  ``PrivacyBudgetExhausted`` in ``configure_train``); local DP stops once a
  client reports ``epsilon >= target-epsilon``;
* say honestly how the run ended: ``stop_reason`` is ``completed`` only if every
  planned round ran AND aggregated; a round that aggregated nothing (every
  client failed, was rejected, or too few for the aggregator) is listed in
  ``rounds_not_aggregated`` and named in the stop reason;
* run federated evaluation on the clients' held-out data only when enabled
  (settings.client_evaluation_enabled: off under DP unless asked for, because it
  releases statistics of private data outside the guarantee); the summary says
  ``client_evaluation`` and ``not_private`` (reproducible DP noise) explicitly.

The final global model (trainable parameters) is saved as
``<run-dir>/global_model.npz``. With ``ema`` = beta > 0 that is the server's
exponential moving average of the global models after rounds 1..t (:class:`task.IterateAverage`),
and the server's evaluations score it too; the clients keep training the last global
model. The average is a function of released models only: post-processing, under DP
the same guarantee.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common.files import atomic_write_bytes
from common.progress import Progress
from privacy.federated.settings import client_evaluation_enabled, not_private, resolve_run_config
from privacy.federated.strategy import PoissonCohortFedAvg, build_strategy
from privacy.federated.task import IterateAverage, arrays_to_state, federated_state, load_federated_state, load_task, state_to_arrays, write_state_npz

log = logging.getLogger(__name__)

ROUNDS_JSON = "federated_rounds.json"
ROUNDS_CSV = "federated_rounds.csv"
GLOBAL_MODEL = "global_model.npz"


def _write_round_log(run_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_bytes(run_dir / ROUNDS_JSON, (json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n").encode())
    buffer = io.StringIO()
    columns = ["round", "node_id", "partition_id", "status", "train_loss", "epsilon", "bytes_sent", "dense_bytes", "update_norm", "eval_wer", "reason"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rnd in summary["rounds"]:
        for client in rnd["clients"]:
            writer.writerow({"round": rnd["server_round"], "status": "accepted", "eval_wer": rnd["eval"].get("eval_wer", ""), **client})
        for status in ("rejected", "failed"):
            for client in rnd[status]:
                writer.writerow({"round": rnd["server_round"], "status": status, **client})
    atomic_write_bytes(run_dir / ROUNDS_CSV, buffer.getvalue().encode())


def run_server(grid: Grid, run_config: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None,
               on_round: Optional[Callable[[Mapping[str, Any]], None]] = None) -> dict[str, Any]:
    """The federation's rounds; `on_round(entry)` is called with each round's summary entry once it is written."""
    cfg = resolve_run_config(run_config, overrides)
    num_clients = int(cfg["num-clients"])
    run_dir = Path(cfg["run-dir"]) if cfg["run-dir"] else None
    torch.manual_seed(int(cfg["seed"]))
    task = load_task(cfg)
    initial = federated_state(task.build_model())
    subspace = None
    if int(cfg["public-subspace-dim"]) > 0:
        from privacy.federated.public_subspace import task_public_subspace

        subspace = task_public_subspace(task, str(cfg["public-subspace-split"]), int(cfg["public-subspace-dim"]),
                                        int(cfg["public-subspace-refresh"]), int(cfg["batch-size"]))
    strategy, dp_wrapper = build_strategy(cfg, num_clients, subspace)
    strategy.summary()

    arrays = state_to_arrays(initial)
    average = IterateAverage(float(cfg["ema"])) if float(cfg["ema"]) > 0 else None
    released = arrays  # the model the server scores and returns: the last global model, or the iterate average
    train_config = ConfigRecord({"lr": float(cfg["lr"])})
    stop_reason = "completed"
    rounds_done = 0
    evaluate_on_clients = client_evaluation_enabled(cfg)
    not_aggregated: list[int] = []
    t0 = time.time()
    summary: dict[str, Any] = {
        "config": dict(cfg),
        "rounds": [],
        "client_evaluation": evaluate_on_clients,
        "not_private": not_private(cfg),
        "dp_unit": cfg["dp-unit"] if cfg["dp"] != "none" else None,
    }
    # a line per round, in a terminal too: rounds are few and slow, and the line carries the round's numbers
    progress = Progress(total=int(cfg["num-rounds"]), desc="federated round", unit="round", every=1, terminal=False)
    if summary["not_private"]:
        log.warning("dp-reproducible-noise-NOT-PRIVATE is on: the DP noise can be regenerated from the configuration; this run is NOT PRIVATE")
    for server_round in range(1, int(cfg["num-rounds"]) + 1):
        try:
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
        except PrivacyBudgetExhausted as error:
            stop_reason = f"central privacy budget exhausted before round {server_round}: {error}"
            log.warning(stop_reason)
            break
        replies = grid.send_and_receive(messages, timeout=float(cfg["round-timeout"]))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if average is not None:
            average.update(arrays_to_state(arrays))  # a round that aggregated nothing repeats the model it kept
            released = state_to_arrays(average.average())
        else:
            released = arrays
        if evaluate_on_clients:
            eval_messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
            strategy.aggregate_evaluate(server_round, grid.send_and_receive(eval_messages, timeout=float(cfg["round-timeout"])))
        rounds_done = server_round

        record = strategy.rounds[server_round]
        entry = asdict(record)
        last_round = server_round == int(cfg["num-rounds"])
        if cfg["server-eval-split"] and (server_round % int(cfg["server-eval-every"]) == 0 or last_round):
            # the released model on speakers no client holds: post-processing, outside the clients (and it draws no
            # random numbers the training uses: every client reseeds), so the cadence changes only the curve's points
            entry["server_eval"] = _server_evaluation(task, released, str(cfg["server-eval-split"]))
            if average is not None:  # the same round's last global model: the average's effect, paired
                entry["server_eval_last_model"] = _server_evaluation(task, arrays, str(cfg["server-eval-split"]))
        entry["num_rejected"], entry["num_failed"] = len(record.rejected), len(record.failed)
        if not record.aggregated:
            not_aggregated.append(server_round)
            if not record.skip_reason:
                record.skip_reason = entry["skip_reason"] = (
                    f"no update accepted ({len(record.failed)} failed, {len(record.rejected)} rejected)"
                )
        accepted = record.clients
        losses = [(c["train_loss"], c["num_examples"] or 1.0) for c in accepted if c["train_loss"] is not None]
        entry["train_loss"] = float(np.average([l for l, _ in losses], weights=[w for _, w in losses])) if losses else None
        entry["max_client_epsilon"] = max((c["epsilon"] for c in accepted), default=0.0)
        entry["bytes_sent_total"] = sum(c["bytes_sent"] for c in accepted)
        if isinstance(dp_wrapper, PoissonCohortFedAvg):
            entry["cohort"] = dict(dp_wrapper.round_stats.get(server_round, {}))
            if dp_wrapper.private:
                entry["central_epsilon"] = dp_wrapper.epsilon(float(cfg["target-delta"]))
        elif dp_wrapper is not None and dp_wrapper.accountant is not None and dp_wrapper.accountant.num_releases:
            entry["central_epsilon"] = float(dp_wrapper.privacy_spent().epsilon)
        summary["rounds"].append(entry)
        summary.update(rounds_completed=rounds_done, rounds_not_aggregated=list(not_aggregated),
                       stop_reason=_honest(stop_reason, not_aggregated, strategy), seconds=time.time() - t0)
        if run_dir is not None:
            _write_round_log(run_dir, summary)
        if on_round is not None:
            on_round(entry)
        progress.update(extra=_round_numbers(entry))
        if cfg["dp"] == "local" and entry["max_client_epsilon"] >= float(cfg["target-epsilon"]):
            stop_reason = f"local privacy budget reached after round {server_round}: epsilon {entry['max_client_epsilon']:.3f} >= {cfg['target-epsilon']}"
            log.warning(stop_reason)
            break

    final = arrays_to_state(released)
    summary.update(
        ema=float(cfg["ema"]),
        rounds_completed=rounds_done,
        rounds_not_aggregated=not_aggregated,
        stop_reason=_honest(stop_reason, not_aggregated, strategy),
        seconds=time.time() - t0,
        noise_multiplier=dp_wrapper.noise_multiplier if dp_wrapper is not None else None,
        total_rejected=sum(r["num_rejected"] for r in summary["rounds"]),
        total_failed=sum(r["num_failed"] for r in summary["rounds"]),
    )
    if isinstance(dp_wrapper, PoissonCohortFedAvg):
        summary.update(cohort_sampling="poisson", cohort_rate=dp_wrapper.cohort_rate, population=dp_wrapper.population,
                       mean_cohort_size=float(np.mean([r["cohort"].get("cohort_size", 0.0) for r in summary["rounds"]] or [0.0])))
        if dp_wrapper.private:
            ratios = [r["cohort"]["noise_to_signal"] for r in summary["rounds"] if "noise_to_signal" in r["cohort"]]
            summary.update(central_epsilon=dp_wrapper.epsilon(float(cfg["target-delta"])), central_releases=dp_wrapper.releases,
                           noise_to_signal_mean=float(np.mean(ratios)) if ratios else None,
                           clipped_fraction_mean=float(np.mean([r["cohort"].get("clipped_fraction", 0.0) for r in summary["rounds"]])))
            zeroed = [r["cohort"]["shrink_zeroed"] for r in summary["rounds"] if "shrink_zeroed" in r["cohort"]]
            if zeroed:
                summary["shrink_zeroed_mean"] = float(np.mean(zeroed))
    elif dp_wrapper is not None and dp_wrapper.accountant is not None and dp_wrapper.accountant.num_releases:
        summary["central_epsilon"] = float(dp_wrapper.privacy_spent().epsilon)
    if run_dir is not None:
        _write_round_log(run_dir, summary)
        write_state_npz(run_dir / GLOBAL_MODEL, final)
    summary["final_state"] = final
    summary["initial_state"] = initial
    return summary


def _server_evaluation(task, arrays, split: str) -> dict[str, float]:
    """WER / CTC loss of the current global model on a whole split (the task's evaluate_split)."""
    if not hasattr(task, "evaluate_split"):
        raise TypeError(f"server-eval-split={split!r}: the task {type(task).__name__} has no evaluate_split")
    model = task.build_model()
    load_federated_state(model, arrays_to_state(arrays))
    result = task.evaluate_split(model, split)
    return {"wer": float(result["wer"]), "loss": float(result["loss"])}


def _round_numbers(entry: Mapping[str, Any]) -> str:
    """The numbers of a round's progress line: what a user watching the run wants to see."""
    if entry["train_loss"] is not None:
        parts = [f"train_loss {entry['train_loss']:.4g}"]
    elif entry.get("clients"):  # accepted replies without a loss: clients under DP do not report one
        parts = [f"{len(entry['clients'])} updates accepted (no train loss reported)"]
    else:
        parts = ["no update accepted"]
    if (entry.get("eval") or {}).get("eval_wer") is not None:
        parts.append(f"eval_wer {entry['eval']['eval_wer']:.4g}")
    if entry.get("server_eval"):
        parts.append(f"test_wer {entry['server_eval']['wer']:.4g} test_loss {entry['server_eval']['loss']:.4g}")
    if entry.get("server_eval_last_model"):
        parts.append(f"(last model {entry['server_eval_last_model']['wer']:.4g})")
    if (entry.get("cohort") or {}).get("noise_to_signal") is not None:
        parts.append(f"noise/signal {entry['cohort']['noise_to_signal']:.3g}")
    if (entry.get("cohort") or {}).get("shrink_zeroed") is not None:
        parts.append(f"shrink: {entry['cohort']['shrink_zeroed']:.0%} of coordinates still")
    if entry["max_client_epsilon"]:
        parts.append(f"epsilon {entry['max_client_epsilon']:.3g}")
    if entry.get("central_epsilon") is not None:
        parts.append(f"central epsilon {entry['central_epsilon']:.3g}")
    return "  ".join(parts)


def _honest(stop_reason: str, not_aggregated: list[int], strategy) -> str:
    """The stop reason, naming every round that aggregated nothing ('completed' only if there is none)."""
    if not not_aggregated:
        return stop_reason
    detail = "; ".join(f"round {r}: {strategy.rounds[r].skip_reason}" for r in not_aggregated)
    prefix = "completed all rounds" if stop_reason == "completed" else stop_reason
    return f"{prefix}, but {len(not_aggregated)} round(s) aggregated nothing ({detail})"


def make_server_app(overrides: Optional[Mapping[str, Any]] = None,
                    on_round: Optional[Callable[[Mapping[str, Any]], None]] = None) -> ServerApp:
    overrides = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context.run_config, overrides, on_round=on_round)

    return server_app


app = make_server_app()
