"""Flower ServerApp (Message API): rounds of train -> validate/aggregate -> evaluate, with a per-round log.

:func:`run_server` is the whole server logic; the ServerApp's ``main(grid,
context)`` only calls it, and the sequential runner calls it with an in-process
grid, so both paths execute the same code. It is Flower's ``Strategy.start``
loop written out, because it also has to

* log every round's entry (train loss, eval WER, epsilon and bytes per client,
  rejected / failed counts) as it ends: one line appended to ``<run-dir>/federated_rounds.jsonl``
  (fsynced; a crash leaves the complete rounds and at most a cut-off last line, which is not a round),
  a progress line (time per round, ETA; common.progress), and the entry handed to ``on_round``
  (the Hydra side writes its log.csv/wandb row there). The whole summary, ``federated_rounds.json``
  and ``.csv`` (a row per client and round), is written once, when the run ends (so it is on disk only for an
  ended federation; a resumption removes an unfinished attempt's): rewriting it after
  every round cost time and disk in the square of the rounds (68 MB written in round 126 of a run with
  ~1,600 clients per round, 55.6 MB of JSON and 12.4 MB of CSV; its line in the ``.jsonl`` is ~0.3 MB);
* stop early when the privacy budget is exhausted: central DP stops BEFORE a
  release that would exceed ``target-epsilon`` (Flower's accountant raises
  ``PrivacyBudgetExhausted`` in ``configure_train``); local DP stops once a
  client reports ``epsilon >= target-epsilon``;
* say honestly how the run ended: ``stop_reason`` is ``completed`` only if every
  planned round ran AND aggregated; a round that aggregated nothing (every
  client failed, was rejected, or too few for the aggregator) is listed in
  ``rounds_not_aggregated`` and named in the stop reason;
* checkpoint the federation after every ``checkpoint-every``-th round (``<run-dir>/server_checkpoint.npz``,
  written after the round's log) and, started again in a run directory holding one, continue after its round
  (``resume``; the rounds up to it are read back from the ``.jsonl``): the restored rounds are handed to ``on_round`` again first, so a log rebuilt from them equals an
  uninterrupted run's (server_checkpoint.py: what is saved, and what blocks a resumption);
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
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common.files import append_line, atomic_write_bytes, atomic_write_text, read_jsonl
from common.progress import Progress
from common.seeding import capture_rng_state, restore_rng_state
from privacy.federated.server_checkpoint import (SERVER_CHECKPOINT, CheckpointMismatch, as_tensors, check_resumable,
                                                 context_states, location_digests, read_checkpoint, restore_context_states,
                                                 write_checkpoint)
from privacy.federated.settings import client_evaluation_enabled, not_private, resolve_run_config
from privacy.federated.strategy import PoissonCohortFedAvg, build_strategy
from privacy.federated.task import IterateAverage, arrays_to_state, federated_state, load_federated_state, load_task, state_to_arrays, write_state_npz

log = logging.getLogger(__name__)

ROUNDS_JSON = "federated_rounds.json"
ROUNDS_LOG = "federated_rounds.jsonl"  # a line per round, appended as the round ends
ROUNDS_CSV = "federated_rounds.csv"
GLOBAL_MODEL = "global_model.npz"


def _entry_line(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, default=float)


def _write_round_log(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """The run's summary with every round (``federated_rounds.json``) and a row per client and round (``.csv``)."""
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
    # every generator the server loop draws from: torch's (model init), Python's (Flower's fixed-cohort sampling,
    # random.sample; unseeded, a run with fraction-train < 1 sampled other clients every time) and NumPy's
    torch.manual_seed(int(cfg["seed"]))
    random.seed(int(cfg["seed"]))
    np.random.seed(int(cfg["seed"]))
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
    summary: dict[str, Any] = {
        "config": dict(cfg),
        "rounds": [],
        "client_evaluation": evaluate_on_clients,
        "not_private": not_private(cfg),
        "dp_unit": cfg["dp-unit"] if cfg["dp"] != "none" else None,
    }
    checkpoint_path = run_dir / SERVER_CHECKPOINT if run_dir is not None else None
    checkpoint_every = int(cfg["checkpoint-every"])
    if checkpoint_every < 0:
        raise ValueError(f"run_config['checkpoint-every'] (federated.checkpoint_every)={checkpoint_every}: expected rounds "
                         f"between server checkpoints (>= 1), or 0 for none")
    seconds_before = 0.0  # the interrupted attempts' training time, when resumed
    finished = False
    # what the paths in the run config name, by content: a checkpoint resumes in a moved project if they are the same
    digests = location_digests(cfg) if checkpoint_path is not None else {}
    if checkpoint_path is not None and checkpoint_path.exists():
        resumed = _resume(checkpoint_path, cfg, grid, strategy, average, digests)
        arrays, rounds_done, seconds_before = resumed["arrays"], resumed["server_round"], resumed["seconds"]
        finished, stop_reason = resumed["finished"], resumed["stop_reason"]
        summary["rounds"] = resumed["entries"]
        not_aggregated = [int(e["server_round"]) for e in summary["rounds"] if not e["aggregated"]]
        summary["resumed_after_round"] = resumed["resumed_after_round"] + [rounds_done]  # every resumption of the run
        released = state_to_arrays(average.average()) if average is not None and average.steps else arrays
        if on_round is not None:  # the caller's log rebuilt from the restored rounds: it equals an uninterrupted run's
            for entry in summary["rounds"]:
                on_round(entry)
    if run_dir is not None:
        # the log holds exactly the rounds run so far: none on a fresh start (an attempt that left no checkpoint runs
        # again from round 1), the checkpoint's on a resumption (the interrupted attempt's later rounds are dropped)
        atomic_write_text(run_dir / ROUNDS_LOG, "".join(_entry_line(entry) + "\n" for entry in summary["rounds"]))
        if not finished:  # a summary on disk says the federation ended: an unfinished one's (an old attempt's) goes
            for name in (ROUNDS_JSON, ROUNDS_CSV):
                (run_dir / name).unlink(missing_ok=True)
    t0 = time.time() - seconds_before
    # a line per round, in a terminal too: rounds are few and slow, and the line carries the round's numbers
    progress = Progress(total=int(cfg["num-rounds"]), desc="federated round", unit="round", every=1, terminal=False,
                        initial=rounds_done)
    if summary["not_private"]:
        log.warning("dp-reproducible-noise-NOT-PRIVATE is on: the DP noise can be regenerated from the configuration; this run is NOT PRIVATE")
    last_planned = rounds_done if finished else int(cfg["num-rounds"])
    for server_round in range(rounds_done + 1, last_planned + 1):
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
        local_budget_spent = cfg["dp"] == "local" and entry["max_client_epsilon"] >= float(cfg["target-epsilon"])
        if local_budget_spent:
            stop_reason = f"local privacy budget reached after round {server_round}: epsilon {entry['max_client_epsilon']:.3f} >= {cfg['target-epsilon']}"
        if run_dir is not None:
            append_line(run_dir / ROUNDS_LOG, _entry_line(entry))
            if checkpoint_every and (server_round % checkpoint_every == 0 or last_round or local_budget_spent):
                _write_checkpoint(checkpoint_path, cfg, server_round, arrays, average, strategy, grid, time.time() - t0,
                                  finished=last_round or local_budget_spent, stop_reason=stop_reason,
                                  resumed_after_round=summary.get("resumed_after_round", []), digests=digests)
        if on_round is not None:
            on_round(entry)
        progress.update(extra=_round_numbers(entry))
        if local_budget_spent:
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


def _write_checkpoint(path: Path, cfg: Mapping[str, Any], server_round: int, arrays, average: Optional[IterateAverage],
                      strategy, grid: Grid, seconds: float, finished: bool, stop_reason: str,
                      resumed_after_round: list[int], digests: Mapping[str, str]) -> None:
    """The state after `server_round` (server_checkpoint.py), atomically, after that round's line in federated_rounds.jsonl."""
    write_checkpoint(path, {
        "config": dict(cfg),
        "location_digests": dict(digests),  # the start's and the corpus's content (server_checkpoint.location_digests)
        "server_round": int(server_round),
        "finished": bool(finished),  # no round follows (the last planned one ran, or the local budget stopped the run)
        "stop_reason": stop_reason,
        "seconds": float(seconds),
        "global_model": arrays_to_state(arrays),
        "average": None if average is None else {"steps": average.steps, "accumulator": average.accumulator},
        "strategy": strategy.state_dict(),
        "generators": capture_rng_state(),
        "client_states": context_states(grid),
        # the rounds this run was resumed after so far (the summary that lists them is written when the run ends; an
        # attempt stopped before its first checkpoint leaves no trace here, as it left no progress)
        "resumed_after_round": [int(r) for r in resumed_after_round],
    })


def _resume(path: Path, cfg: Mapping[str, Any], grid: Grid, strategy, average: Optional[IterateAverage],
            digests: Mapping[str, str]) -> dict[str, Any]:
    """Restore the server, its strategy, generators and (sequential grid) clients from `path`; the rounds run so far."""
    saved = read_checkpoint(path)
    done = int(saved["server_round"])
    if not bool(cfg["resume"]):
        raise CheckpointMismatch(
            f"{path} holds an earlier attempt of this federation, stopped after round {done}, but resume is off; resume it "
            f"(resume=true; Hydra: trainer.resume=true) or start from scratch (delete the file; Hydra: force=true)")
    check_resumable(path, saved, cfg, grid, digests)
    rounds_path = path.parent / ROUNDS_LOG
    if rounds_path.exists():
        logged = read_jsonl(rounds_path)
        previous_resumptions = [int(r) for r in saved.get("resumed_after_round", [])]
    else:  # the checkpoint of a run started before the log was appended: its summary was rewritten every round
        rounds_path = path.parent / ROUNDS_JSON
        logged_summary = json.loads(rounds_path.read_text()) if rounds_path.exists() else {}
        logged = logged_summary.get("rounds", [])
        previous_resumptions = [int(r) for r in logged_summary.get("resumed_after_round", [])]
    entries = [entry for entry in logged if int(entry["server_round"]) <= done]
    if [int(e["server_round"]) for e in entries] != list(range(1, done + 1)):
        raise CheckpointMismatch(f"{path} is after round {done} but {rounds_path} holds rounds "
                                 f"{[int(e['server_round']) for e in logged]}: the round log of the checkpoint's rounds is missing")
    later = [int(e["server_round"]) for e in logged if int(e["server_round"]) > done]
    if later and cfg["dp"] != "none":
        raise CheckpointMismatch(
            f"{path} is after round {done}, but the interrupted attempt also ran round(s) {later} ({rounds_path.name}): under DP "
            f"they were released, and resuming would run them again outside the accountant. Start from scratch (force=true); "
            f"with checkpoint-every = 1 (federated.checkpoint_every) this happens only if the run stops between the two files' writes")
    strategy.load_state_dict(saved["strategy"])
    strategy.restore_rounds(entries)
    if saved["client_states"] is not None and hasattr(grid, "contexts"):
        restore_context_states(grid, saved["client_states"])
    restore_rng_state(as_tensors(saved["generators"]))
    if average is not None:
        average.steps = int(saved["average"]["steps"])
        average.accumulator = {k: np.asarray(v) for k, v in saved["average"]["accumulator"].items()}
    log.info("resuming the federation in %s after round %d of %d%s (%s)", path.parent, done, int(cfg["num-rounds"]),
             f"; dropping round(s) {later} of the interrupted attempt, which ran after the checkpoint" if later else "",
             "already finished: " + saved["stop_reason"] if saved["finished"] else "the remaining rounds run now")
    return {"arrays": state_to_arrays({k: np.asarray(v) for k, v in saved["global_model"].items()}), "server_round": done,
            "seconds": float(saved["seconds"]), "finished": bool(saved["finished"]), "stop_reason": saved["stop_reason"],
            "entries": entries, "resumed_after_round": previous_resumptions}


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
