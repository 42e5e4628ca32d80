"""Differential privacy against an honest-but-curious server, and a federation one client cannot crash (issue 18).

The server here knows the whole run configuration and seed, can rebuild every
deterministic part of a client's computation from it, and sees every reply.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privacy.federated.client_app import handle_train, make_client_app
from privacy.federated.compression import wire_nbytes
from privacy.federated.runner import _set_task_identity, run_federated
from privacy.federated.settings import resolve_run_config
from privacy.federated.strategy import build_strategy
from privacy.federated.task import federated_state, tiny_synthetic_task, train_local

pytest.importorskip("opacus")

TINY = {"task": "privacy.federated.task:tiny_synthetic_task", "num-rounds": 2, "lr": 0.1, "seed": 3}
# one DP-SGD step of plain SGD with lr 1 on a 3.3 k-parameter model: the update is -(clipped sum + noise) / B
ONE_DP_STEP = {**TINY, "dp": "local", "target-epsilon": 1.0, "target-delta": 1e-3, "num-rounds": 1, "local-steps": 1,
               "batch-size": 16, "tiny-hidden": 256, "lr": 1.0, "max-grad-norm": 1.0}


def _flat(state) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in sorted(state)])


def _client_update(cfg, loss_scale: float = 1.0, partition_id: int = 0) -> np.ndarray:
    """What client `partition_id` computes in round 1 (privacy.federated.client_app.handle_train does the same)."""
    from privacy.federated.local_dp import LocalDPSession

    task = tiny_synthetic_task(cfg)
    model = task.build_model()
    before = federated_state(model)
    loader, _ = task.build_loaders(partition_id, 2)

    def loss_fn(m, batch):
        loss, n = task.loss_fn(m, batch)
        return loss * loss_scale, n

    session = LocalDPSession.from_run_config(cfg, len(loader.dataset), None, partition_id=partition_id)
    train_local(model, loader, loss_fn, steps=1, lr=float(cfg["lr"]), dp=session)
    return _flat(federated_state(model)) - _flat(before)


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_server_knowing_the_configuration_cannot_remove_the_local_dp_noise(reproducible):
    cfg = resolve_run_config({**ONE_DP_STEP, "dp-reproducible-noise-NOT-PRIVATE": reproducible})
    update = _client_update(cfg)
    again = _client_update(cfg)  # the same client, configuration and seed, run again
    # The attack: rerun the client's computation from the configuration with zero gradients (the data is not
    # needed: only the Poisson batch draws and the noise are), which yields -noise / B if the noise is a
    # function of the configuration, and subtract it from the client's noisy update.
    regenerated_noise = _client_update(cfg, loss_scale=0.0)
    residual = update - regenerated_noise
    noise_norm = np.linalg.norm(regenerated_noise)
    assert noise_norm > 3.0  # sigma C sqrt(d) / B: the noise dominates the clipped sum (at most C |batch| / B)
    if reproducible:
        np.testing.assert_array_equal(update, again)  # bit for bit: the loudly named option does what it says
        # and the server recovers the un-noised sum of clipped gradients: what is left is within the clipping bound
        assert np.linalg.norm(residual) < 0.25 * noise_norm
    else:
        assert not np.array_equal(update, again)
        assert abs(np.corrcoef(update, again)[0, 1]) < 0.5  # independent noise, not the same noise twice
        # subtracting the regenerated "noise" adds a second, independent one: |N - N'| = sqrt(2) |N|
        assert np.linalg.norm(residual) > 1.2 * noise_norm


def test_two_clients_draw_independent_noise():
    cfg = resolve_run_config(ONE_DP_STEP)
    noise_a = _client_update(cfg, loss_scale=0.0, partition_id=0)
    noise_b = _client_update(cfg, loss_scale=0.0, partition_id=1)
    assert abs(np.corrcoef(noise_a, noise_b)[0, 1]) < 0.2  # 0.991 before: every client drew the same noise


def test_two_identical_federated_dp_runs_differ_unless_the_not_private_option_is_on():
    cfg = {**TINY, "dp": "local", "target-epsilon": 5.0, "target-delta": 1e-3, "num-rounds": 1, "local-steps": 2, "batch-size": 40}
    a = run_federated(cfg, num_clients=2, backend="sequential")
    b = run_federated(cfg, num_clients=2, backend="sequential")
    assert not np.array_equal(_flat(a["final_state"]), _flat(b["final_state"]))
    assert a["not_private"] is False
    repro = {**cfg, "dp-reproducible-noise-NOT-PRIVATE": True}
    c = run_federated(repro, num_clients=2, backend="sequential")
    d = run_federated(repro, num_clients=2, backend="sequential")
    np.testing.assert_array_equal(_flat(c["final_state"]), _flat(d["final_state"]))
    assert c["not_private"] is True


def test_central_dp_noise_is_secret_and_leaves_numpys_global_generator_as_it_was():
    cfg = {**TINY, "dp": "central", "noise-multiplier": 1.0, "clipping-norm": 0.1, "target-epsilon": 1e3, "num-rounds": 1}
    np.random.seed(7)
    a = run_federated(cfg, num_clients=2, backend="sequential")
    after_a = np.random.random()
    np.random.seed(7)
    b = run_federated(cfg, num_clients=2, backend="sequential")
    after_b = np.random.random()
    # the clients' (noise-free) updates are identical, so the whole difference is the server's noise
    assert not np.array_equal(_flat(a["final_state"]), _flat(b["final_state"]))
    assert after_a == after_b  # the CSPRNG seeding is undone after the aggregation
    repro = {**cfg, "dp-reproducible-noise-NOT-PRIVATE": True}
    np.testing.assert_array_equal(_flat(run_federated(repro, num_clients=2, backend="sequential")["final_state"]),
                                  _flat(run_federated(repro, num_clients=2, backend="sequential")["final_state"]))


def test_the_csprng_generator_uses_its_whole_state():
    from privacy.dp import csprng_generator

    # why manual_seed is not enough: torch keeps only the low 32 bits of the seed
    same = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5 + 2**32)
    assert torch.equal(torch.randn(8, generator=same[0]), torch.randn(8, generator=same[1]))
    x, y = torch.randn(200_000, generator=csprng_generator()), torch.randn(200_000, generator=csprng_generator())
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.01


# --------------------------------------------------------------------------- nothing outside the guarantee
def test_under_local_dp_replies_carry_only_the_update_and_epsilon_and_clients_refuse_evaluation():
    cfg = {**TINY, "dp": "local", "target-epsilon": 5.0, "target-delta": 1e-3, "num-rounds": 1, "local-steps": 2, "batch-size": 40}
    summary = run_federated(cfg, num_clients=2, backend="sequential")
    grid = summary["grid"]
    train_replies = [m for m in grid.received if m.metadata.message_type == MessageType.TRAIN]
    assert len(train_replies) == 2
    for reply in train_replies:
        assert set(reply.content["metrics"]) == {"epsilon", "partition-id"}  # no loss, no example count
    assert not [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]  # the server does not ask
    assert summary["client_evaluation"] is False and summary["rounds"][0]["eval"] == {}
    assert summary["rounds"][0]["train_loss"] is None
    # and a client asked anyway refuses: its held-out statistics would be a release outside the guarantee
    from privacy.federated.client_app import handle_evaluate

    context = grid.contexts[1]
    instruction = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in summary["final_state"].items()}),
                                      "config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.EVALUATE)
    with pytest.raises(PermissionError, match="client-evaluation"):
        handle_evaluate(instruction, context, resolve_run_config(cfg))


def test_client_evaluation_under_dp_is_opt_in_and_reported():
    cfg = {**TINY, "dp": "central", "noise-multiplier": 1.0, "clipping-norm": 0.1, "target-epsilon": 1e3, "num-rounds": 1,
           "client-evaluation": "on"}
    summary = run_federated(cfg, num_clients=2, backend="sequential")
    assert summary["client_evaluation"] is True and 0 <= summary["rounds"][0]["eval"]["eval_wer"] <= 1
    assert run_federated({**TINY, "num-rounds": 1}, num_clients=2, backend="sequential")["client_evaluation"] is True  # no DP: on


def test_every_dp_option_reaches_the_clients_or_is_rejected():
    from privacy.dp import DPPlanError
    from privacy.federated.local_dp import LocalDPSession

    with pytest.raises(ValueError, match="dp-poisson-sampling"):
        resolve_run_config({**TINY, "dp": "local", "dp-poisson-sampling": False})
    with pytest.raises(ValueError, match="dp-accountant.*central"):
        resolve_run_config({**TINY, "dp": "central", "dp-accountant": "prv"})
    with pytest.raises(ValueError, match="dp-unit"):
        resolve_run_config({**TINY, "dp": "local", "dp-unit": "speaker"})
    with pytest.raises(ValueError, match="no DP noise"):
        resolve_run_config({**TINY, "dp-reproducible-noise-NOT-PRIVATE": True})
    # the accountant and the noise cap reach the client's DP session
    cfg = resolve_run_config({**ONE_DP_STEP, "dp-accountant": "prv"})
    task = tiny_synthetic_task(cfg)
    loader, _ = task.build_loaders(0, 2)
    session = LocalDPSession.from_run_config(cfg, len(loader.dataset), None)
    train_local(task.build_model(), loader, task.loss_fn, steps=1, lr=1.0, dp=session)
    assert session.accountant.mechanism == "prv" and session.accountant.steps == 1
    capped = resolve_run_config({**ONE_DP_STEP, "target-epsilon": 0.05, "dp-max-noise-multiplier": 2.0})
    session = LocalDPSession.from_run_config(capped, len(loader.dataset), None)
    with pytest.raises(DPPlanError, match="noise_multiplier=2"):
        train_local(task.build_model(), loader, task.loss_fn, steps=1, lr=1.0, dp=session)
    # central DP: the same cap
    with pytest.raises(ValueError, match="dp.max_noise_multiplier"):
        build_strategy(resolve_run_config({**TINY, "dp": "central", "target-epsilon": 0.01, "dp-max-noise-multiplier": 2.0}), 2)


# --------------------------------------------------------------------------- a crafted reply costs its sender the round
def _reply(node_id: int, payload: dict[str, np.ndarray], metrics: dict) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=instruction)


def _strategy(**overrides):
    _set_task_identity(run_id=21)
    cfg = resolve_run_config({**TINY, "local-steps": 5, "batch-size": 10, **overrides})
    strategy, _ = build_strategy(cfg, num_clients=4)
    strategy.current = {"w": np.zeros((53, 128), np.float32), "b": np.zeros(4, np.float32)}
    return strategy


HONEST = {"w::dense": np.full((53, 128), 0.01, np.float32), "b::dense": np.zeros(4, np.float32)}
CRAFTED = {
    "shape 2**40": {"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32), "w::shape": np.array([2**40]),
                    "b::dense": np.zeros(4, np.float32)},
    "no ::shape": {"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32), "b::dense": np.zeros(4, np.float32)},
    "int8 without ::block": {"w::q": np.zeros(53 * 128, np.int8), "w::scale": np.ones(27, np.float32),
                             "w::shape": np.array([53, 128]), "b::dense": np.zeros(4, np.float32)},
    "wrong shape": {"w::dense": np.zeros((128, 53), np.float32), "b::dense": np.zeros(4, np.float32)},
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_payload_is_rejected_with_a_reason_and_the_round_aggregates_the_others(case):
    strategy = _strategy()
    replies = [_reply(1, HONEST, {"num-examples": 50}), _reply(2, HONEST, {"num-examples": 50}), _reply(3, CRAFTED[case], {"num-examples": 50})]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.rounds[1]
    assert len(record.clients) == 2 and record.aggregated and arrays is not None
    assert [r["node_id"] for r in record.rejected] == [3] and "does not decode" in record.rejected[0]["reason"]
    np.testing.assert_allclose(arrays["w"].numpy(), 0.01)


def test_any_exception_while_checking_a_reply_is_a_rejection_not_a_crash(monkeypatch):
    import privacy.federated.strategy as strategy_module

    strategy = _strategy()

    def out_of_memory(*args, **kwargs):
        raise MemoryError("4 TiB")

    monkeypatch.setattr(strategy_module, "arrays_to_state", out_of_memory)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, HONEST, {"num-examples": 50})])
    assert arrays is None and "MemoryError: 4 TiB" in strategy.rounds[1].rejected[0]["reason"]
    assert "1 accepted" not in strategy.rounds[1].skip_reason and "0 accepted" in strategy.rounds[1].skip_reason


def test_num_examples_is_bounded_by_the_plan_and_ignored_by_robust_aggregators():
    strategy = _strategy()  # fedavg, 5 local steps x batch 10: at most 50 examples per round
    honest = {"w::dense": np.full((53, 128), 0.01, np.float32), "b::dense": np.zeros(4, np.float32)}
    liar = {"w::dense": np.full((53, 128), 5.0, np.float32), "b::dense": np.zeros(4, np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, honest, {"num-examples": 50}), _reply(2, liar, {"num-examples": 1e12})])
    assert "num-examples 1000000000000.0 exceeds 50" in strategy.rounds[1].rejected[0]["reason"]
    np.testing.assert_allclose(arrays["w"].numpy(), 0.01)
    # an explicit bound
    assert _strategy(**{"max-num-examples": 80}).max_num_examples == 80
    # robust aggregators and DP: uniform weights, the claim is not even read
    for overrides in ({"strategy": "fedmedian"}, {"dp": "central"}, {"strategy": "fedtrimmedavg", "trimmed-beta": 0.25}):
        strategy = _strategy(**overrides)
        assert strategy.uniform_weights
    strategy = _strategy(strategy="fedmedian")
    arrays, _ = strategy.aggregate_train(1, [_reply(i, honest, {"num-examples": 1e12 if i == 2 else 5}) for i in (1, 2, 3)])
    assert arrays is not None and not strategy.rounds[1].rejected


def test_robust_aggregators_are_validated_at_start_up():
    cfg = lambda **kw: resolve_run_config({**TINY, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="int\\(beta x n\\).*from n = 5"):
        build_strategy(cfg(strategy="fedtrimmedavg", **{"trimmed-beta": 0.2}), num_clients=4)  # trims nothing with 4
    strategy, _ = build_strategy(cfg(strategy="fedtrimmedavg", **{"trimmed-beta": 0.25}), num_clients=4)
    assert strategy.min_accepted == 4
    with pytest.raises(ValueError, match="krum-malicious.*explicitly"):
        build_strategy(cfg(strategy="krum"), num_clients=5)
    with pytest.raises(ValueError, match="n >= 2f \\+ 3"):
        build_strategy(cfg(strategy="krum", **{"krum-malicious": 1}), num_clients=4)
    strategy, _ = build_strategy(cfg(strategy="krum", **{"krum-malicious": 1}), num_clients=5)
    # too few accepted updates in a round: no aggregation, and the round says why
    strategy.current = {"w": np.zeros(3, np.float32)}
    _set_task_identity(run_id=22)
    arrays, _ = strategy.aggregate_train(1, [_reply(i, {"w::dense": np.ones(3, np.float32)}, {}) for i in (1, 2, 3, 4)])
    assert arrays is None and "needs 5" in strategy.rounds[1].skip_reason


def test_bytes_are_measured_by_the_server_on_the_wire():
    summary = run_federated({**TINY, "compression": "int8", "int8-block-size": 64, "num-rounds": 1, "tiny-hidden": 4096},
                            num_clients=2, backend="sequential")
    grid = summary["grid"]
    replies = {int(m.metadata.src_node_id): m for m in grid.received if m.metadata.message_type == MessageType.TRAIN}
    for client in summary["rounds"][0]["clients"]:
        reply = replies[client["node_id"]]
        assert client["bytes_sent"] == wire_nbytes(reply)
        array_bytes = sum(a.numpy().nbytes for a in reply.content["arrays"].values())
        assert client["bytes_sent"] > array_bytes  # the serialised message, not the bare arrays
        dense_array_bytes = sum(v.nbytes for v in summary["final_state"].values())
        assert 2.5 < client["dense_bytes"] / client["bytes_sent"] < dense_array_bytes / array_bytes


# --------------------------------------------------------------------------- timeout and stop reasons
def _apps(kind: dict[int, str]):
    cfg = resolve_run_config(TINY)
    honest = make_client_app(cfg)

    def build(what: str) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(msg, context):
            if what == "raise":
                raise RuntimeError("device went away")
            if what == "slow":
                time.sleep(0.7)
            return handle_train(msg, context, cfg)

        @app.evaluate()
        def evaluate(msg, context):
            return honest(msg, context)

        return app

    apps = {node: build(what) for node, what in kind.items()}
    return lambda node_id: apps.get(node_id, honest)


def test_the_sequential_grid_enforces_the_round_timeout():
    # every client takes 0.7 s, the round 1.0 s: the first reply is in time, the second arrives late and is
    # discarded, the third client is not called any more (whatever order the strategy samples them in)
    summary = run_federated({**TINY, "num-rounds": 1, "round-timeout": 1.0}, num_clients=3, backend="sequential",
                            client_app=_apps({1: "slow", 2: "slow", 3: "slow"}))
    record = summary["rounds"][0]
    assert len(record["clients"]) == 1 and record["num_failed"] == 2
    reasons = sorted(f["reason"] for f in record["failed"])
    assert "came after the round timeout of 1 s" in reasons[0] and "had passed before this node was called" in reasons[1]


def test_a_round_in_which_every_client_failed_is_not_reported_as_completed():
    summary = run_federated({**TINY, "num-rounds": 2}, num_clients=2, backend="sequential", client_app=_apps({1: "raise", 2: "raise"}))
    assert summary["rounds_completed"] == 2 and summary["rounds_not_aggregated"] == [1, 2]
    assert summary["stop_reason"] != "completed" and "2 round(s) aggregated nothing" in summary["stop_reason"]
    assert "2 failed" in summary["stop_reason"]
    fine = run_federated({**TINY, "num-rounds": 1}, num_clients=2, backend="sequential")
    assert fine["stop_reason"] == "completed" and fine["rounds_not_aggregated"] == []
    assert math.isfinite(fine["rounds"][0]["train_loss"])
