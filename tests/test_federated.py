"""Federated learning: the same ServerApp/ClientApp in the sequential grid, Ray, and a loopback deployment."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privacy.federated.client_app import handle_train, make_client_app
from privacy.federated.compression import PAYLOAD_FIELDS, split_payload_key
from privacy.federated.runner import InProcessGrid, _set_task_identity, run_federated
from privacy.federated.settings import resolve_run_config
from privacy.dp import central_epsilon
from privacy.federated.strategy import build_strategy, validate_update
from privacy.federated.task import federated_state, tiny_synthetic_task, train_local

TINY = {"task": "privacy.federated.task:tiny_synthetic_task", "num-rounds": 2, "lr": 0.1, "seed": 3}


def _param_names():
    return set(federated_state(tiny_synthetic_task(resolve_run_config(TINY)).build_model()))


def _changed(summary) -> float:
    return max(float(np.abs(summary["final_state"][k] - summary["initial_state"][k]).max()) for k in summary["final_state"])


@pytest.mark.parametrize("compression", ["none", "int8", "topk"])
def test_sequential_simulation_trains_and_logs_rounds(tmp_path, compression):
    # hidden=2048: big enough that the per-array objects on the wire (~380 bytes each) do not dominate the payload
    cfg = {**TINY, "compression": compression, "topk-fraction": 0.1, "run-dir": str(tmp_path), "tiny-hidden": 2048}
    summary = run_federated(cfg, num_clients=3, backend="sequential")
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed"
    assert _changed(summary) > 1e-3
    rounds = summary["rounds"]
    assert [len(r["clients"]) for r in rounds] == [3, 3]
    assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
    assert 0.0 <= rounds[-1]["eval"]["eval_wer"] <= 1.0
    # written to the run dir, with bytes per client per round
    logged = json.loads((tmp_path / "federated_rounds.json").read_text())
    assert logged["rounds_completed"] == 2
    assert all(c["bytes_sent"] > 0 for r in logged["rounds"] for c in r["clients"])
    csv_lines = (tmp_path / "federated_rounds.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 6 and csv_lines[0].startswith("round,node_id")
    saved = np.load(tmp_path / "global_model.npz")
    np.testing.assert_array_equal(saved["0.weight"], summary["final_state"]["0.weight"])
    if compression != "none":
        c = logged["rounds"][0]["clients"][0]
        assert c["bytes_sent"] < 0.45 * c["dense_bytes"]


def test_sequential_simulation_is_deterministic():
    a = run_federated({**TINY, "compression": "topk"}, num_clients=2, backend="sequential")
    b = run_federated({**TINY, "compression": "topk"}, num_clients=2, backend="sequential")
    for k in a["final_state"]:
        np.testing.assert_array_equal(a["final_state"][k], b["final_state"][k])


@pytest.mark.parametrize("compression", ["none", "topk", "int8"])
def test_client_messages_carry_only_named_parameter_updates_and_numbers(compression):
    summary = run_federated({**TINY, "compression": compression, "num-rounds": 1}, num_clients=2, backend="sequential")
    grid: InProcessGrid = summary["grid"]
    names = _param_names()
    replies = [m for m in grid.received if m.metadata.message_type == MessageType.TRAIN]
    assert len(replies) == 2
    for reply in grid.received:
        content = reply.content
        assert not content.config_records, "clients send no config/text records"
        for record_name, record in content.array_records.items():
            assert record_name == "arrays"
            for key, array in record.items():
                name, field = split_payload_key(key)
                # a parameter's field, or (int8 / top-k) the whole update packed into one uint8 array
                assert (name in names and field in PAYLOAD_FIELDS) or (key == "update::packed" and compression != "none")
                assert array.numpy().dtype.kind in "fiu"  # numbers only, no bytes/strings
        for record in content.metric_records.values():
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values())
    # the training data never appears in a message: no array is larger than the dense update itself
    # (+ the packed header; a client's feature matrix would be far larger)
    largest = max(a.numpy().nbytes for m in grid.received for r in m.content.array_records.values() for a in r.values())
    assert largest <= sum(v.nbytes for v in summary["final_state"].values()) + 64


def _client_apps(faults: dict[int, str]):
    """Node id -> ClientApp; some nodes misbehave."""
    cfg = resolve_run_config(TINY)

    def faulty(kind: str) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(msg, context):
            if kind == "raise":
                raise RuntimeError("device went away mid-round")
            reply = handle_train(msg, context, cfg)
            payload = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            if kind == "nan":
                payload = {k: (np.full_like(v, np.nan) if k.endswith("::dense") else v) for k, v in payload.items()}
            elif kind == "misshaped":
                payload = {k: (v[:-1] if k.endswith("::dense") else v) for k, v in payload.items()}
            elif kind == "poison":
                payload = {k: (100.0 * v if k.endswith("::dense") else v) for k, v in payload.items()}
            reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
            return reply

        @app.evaluate()
        def evaluate(msg, context):
            return make_client_app(cfg)(msg, context)

        return app

    honest = make_client_app(cfg)
    apps = {node: faulty(kind) for node, kind in faults.items()}
    return lambda node_id: apps.get(node_id, honest)


def test_failed_and_malformed_clients_are_dropped_and_counted_while_the_round_completes(tmp_path):
    faults = {2: "raise", 3: "nan", 4: "misshaped"}
    summary = run_federated({**TINY, "run-dir": str(tmp_path)}, num_clients=5, backend="sequential", client_app=_client_apps(faults))
    assert summary["rounds_completed"] == 2
    for r in summary["rounds"]:
        assert r["num_failed"] == 1 and r["num_rejected"] == 2 and len(r["clients"]) == 2 and r["aggregated"]
        reasons = " ".join(x["reason"] for x in r["rejected"])
        assert "non-finite" in reasons and "shape" in reasons
        assert "device went away" in r["failed"][0]["reason"]
    assert _changed(summary) > 1e-3
    assert all(math.isfinite(float(v.sum())) for v in summary["final_state"].values())
    assert summary["total_failed"] == 2 and summary["total_rejected"] == 4


def test_update_validation_reasons():
    ref = {"w": np.zeros((2, 3), np.float32)}
    with pytest.raises(ValueError, match="exceeds max_update_norm"):
        validate_update({"w::dense": np.full((2, 3), 10.0, np.float32)}, ref, max_update_norm=1.0)
    with pytest.raises(ValueError, match="missing \\['w'\\], unexpected \\['v'\\]"):
        validate_update({"v::dense": np.zeros((2, 3), np.float32)}, ref, max_update_norm=1.0)
    with pytest.raises(ValueError, match="does not decode"):
        validate_update({"w::idx": np.array([7], np.int32), "w::val": np.ones(1, np.float32), "w::shape": np.array([2, 3])}, ref, 1.0)
    np.testing.assert_array_equal(validate_update({"w::dense": np.ones((2, 3), np.float32)}, ref, 10.0)["w"], np.ones((2, 3)))


def _reply(node_id: int, delta: dict[str, np.ndarray], num_examples: int = 10) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    payload = ArrayRecord({f"{k}::dense": Array(v.astype(np.float32)) for k, v in delta.items()})
    return Message(RecordDict({"arrays": payload, "metrics": MetricRecord({"num-examples": num_examples, "train_loss": 1.0})}), reply_to=instruction)


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedmedian", "krum", "fedtrimmedavg"])
def test_a_scaled_poisoned_update_moves_fedavg_but_not_robust_aggregators(strategy_name):
    _set_task_identity(run_id=11)
    rng = np.random.default_rng(0)
    current = {"w": np.zeros(50, np.float32), "b": np.zeros(5, np.float32)}
    honest_direction = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in current.items()}
    deltas = [{k: d + 0.05 * rng.normal(size=d.shape).astype(np.float32) for k, d in honest_direction.items()} for _ in range(4)]
    poisoned = {k: -100.0 * d for k, d in deltas[0].items()}  # x100 and flipped
    cfg = resolve_run_config({**TINY, "strategy": strategy_name, "krum-malicious": 1, "trimmed-beta": 0.2})

    def aggregate(with_poison: bool):
        strategy, _ = build_strategy(cfg, num_clients=5)
        strategy.current = dict(current)
        replies = [_reply(i + 1, d) for i, d in enumerate(deltas)] + ([_reply(5, poisoned)] if with_poison else [_reply(5, deltas[1])])
        arrays, _ = strategy.aggregate_train(1, replies)
        return np.concatenate([arrays[k].numpy().ravel() for k in current])

    clean, attacked = aggregate(False), aggregate(True)
    honest_mean = np.concatenate([np.mean([d[k] for d in deltas], axis=0).ravel() for k in current])
    shift = np.linalg.norm(attacked - clean) / np.linalg.norm(honest_mean)
    if strategy_name == "fedavg":
        assert shift > 10  # one client drags the average anywhere it likes
        assert np.dot(attacked, honest_mean) < 0
    else:
        assert shift < 0.2
        assert np.dot(attacked, honest_mean) / (np.linalg.norm(attacked) * np.linalg.norm(honest_mean)) > 0.95


def test_fedprox_term_keeps_local_weights_near_the_global_model():
    task = tiny_synthetic_task(resolve_run_config(TINY))
    loader, _ = task.build_loaders(0, 2)
    start = federated_state(task.build_model())

    def drift(mu):
        model = task.build_model()
        train_local(model, loader, task.loss_fn, steps=20, lr=0.2, prox_mu=mu, global_params=start)
        return sum(float(np.sum((v - start[k]) ** 2)) for k, v in federated_state(model).items()) ** 0.5

    assert drift(2.0) < 0.7 * drift(0.0)
    with pytest.raises(ValueError, match="global_params"):
        train_local(task.build_model(), loader, task.loss_fn, steps=1, prox_mu=0.1)


def test_fedprox_and_fedadam_run_end_to_end():
    for name in ("fedprox", "fedadam"):
        summary = run_federated({**TINY, "strategy": name, "server-lr": 0.05}, num_clients=2, backend="sequential")
        assert summary["rounds_completed"] == 2 and _changed(summary) > 1e-3


def test_central_dp_clips_noises_accounts_and_stops_when_the_budget_is_spent(tmp_path):
    cfg = {**TINY, "dp": "central", "noise-multiplier": 1.0, "clipping-norm": 0.1, "target-epsilon": 1e3, "num-rounds": 2}
    summary = run_federated(cfg, num_clients=2, backend="sequential")
    assert summary["rounds_completed"] == 2
    assert summary["central_epsilon"] == pytest.approx(central_epsilon(1.0, 2, 1e-5), rel=1e-3)
    # budget that allows one release but not two: the run stops before round 2
    one_round = central_epsilon(1.0, 1, 1e-5)
    stopped = run_federated({**cfg, "target-epsilon": one_round * 1.2, "run-dir": str(tmp_path)}, num_clients=2, backend="sequential")
    assert stopped["rounds_completed"] == 1 and "budget exhausted" in stopped["stop_reason"]
    assert json.loads((tmp_path / "federated_rounds.json").read_text())["stop_reason"].startswith("central privacy budget")


def test_central_dp_noise_multiplier_from_budget_meets_the_budget():
    cfg = resolve_run_config({**TINY, "dp": "central", "target-epsilon": 4.0, "num-rounds": 5})
    _, dp = build_strategy(cfg, num_clients=2)
    assert central_epsilon(dp.noise_multiplier, 5, 1e-5) <= 4.0
    assert central_epsilon(dp.noise_multiplier * 0.99, 5, 1e-5) > 4.0 * 0.98
    with pytest.raises(ValueError, match="mean aggregator"):
        build_strategy(resolve_run_config({**TINY, "dp": "central", "strategy": "krum", "krum-malicious": 1}), num_clients=5)


@pytest.mark.slow  # ~30-50 s: privacy/dp.py re-runs Opacus' noise-multiplier search in every client round
def test_local_dp_epsilon_composes_over_rounds_in_context_state():
    pytest.importorskip("opacus")
    # few, large Poisson batches: Opacus' noise-multiplier search (run each round by privacy/dp.py) stays cheap
    cfg = {**TINY, "dp": "local", "target-epsilon": 5.0, "target-delta": 1e-3, "num-rounds": 3, "local-steps": 2, "batch-size": 40}
    summary = run_federated(cfg, num_clients=2, backend="sequential")
    eps = [[c["epsilon"] for c in sorted(r["clients"], key=lambda c: c["node_id"])] for r in summary["rounds"]]
    assert len(eps) == 3
    for client in range(2):
        series = [e[client] for e in eps]
        assert 0 < series[0] < series[1] < series[2] <= 5.0 * 1.05  # composed, ends near the planned target
    assert summary["stop_reason"] == "completed" or "local privacy budget" in summary["stop_reason"]
    assert _changed(summary) > 1e-4


@pytest.mark.slow
def test_ray_simulation_backend(tmp_path):
    summary = run_federated({**TINY, "compression": "int8", "run-dir": str(tmp_path)}, num_clients=2, backend="ray")
    assert summary["rounds_completed"] == 2 and summary["total_failed"] == 0
    assert any(np.abs(v).sum() > 0 for v in summary["final_state"].values())
    assert all(len(r["clients"]) == 2 for r in summary["rounds"])


@pytest.mark.slow
def test_loopback_deployment_with_two_supernodes(tmp_path):
    from privacy.federated.deploy import deploy_local

    result = deploy_local(num_supernodes=2, run_config={"num-rounds": 1, "compression": "topk"}, work_dir=tmp_path, timeout=240)
    assert result["returncode"] == 0, result["log_tail"]
    assert result["summary"]["rounds_completed"] == 1
    assert len(result["summary"]["rounds"][0]["clients"]) == 2


def test_flower_app_config_and_hydra_config_agree_with_the_run_config_defaults():
    import tomllib
    from pathlib import Path

    from omegaconf import OmegaConf

    from privacy.federated.settings import DEFAULT_RUN_CONFIG
    from training.wav2vec2.run_config import run_config_from_cfg
    from training.config import CompressionConfig, DPConfig, FederatedConfig, TrainerConfig

    pyproject = tomllib.loads((Path(__file__).parents[1] / "privacy/federated/pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULT_RUN_CONFIG
    cfg = OmegaConf.create(
        {
            "seed": 5,
            "federated": OmegaConf.merge(OmegaConf.structured(FederatedConfig), {"name": "fedmedian", "tag": "x"}),
            "compression": OmegaConf.merge(OmegaConf.structured(CompressionConfig), {"name": "int8", "int8_block_size": 64}),
            "dp": OmegaConf.merge(OmegaConf.structured(DPConfig), {"name": "none", "tag": "none"}),
            "trainer": OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"name": "finetune"}),
        }
    )
    flat = run_config_from_cfg(cfg, task="privacy.federated.task:tiny_synthetic_task", run_dir="/tmp/x")
    assert flat["strategy"] == "fedmedian" and flat["int8-block-size"] == 64 and flat["seed"] == 5
    with pytest.raises(KeyError, match="unknown federated run_config key 'num-round'"):
        resolve_run_config({"num-round": 3})


def test_an_empty_poisson_batch_is_a_noised_and_accounted_step():
    pytest.importorskip("opacus")
    from privacy.dp import opacus_epsilon
    from privacy.federated.local_dp import LocalDPSession

    # batch size 1: the Poisson sample rate is 1/N, so about a third of the batches are empty
    cfg = resolve_run_config({**TINY, "dp": "local", "target-epsilon": 8.0, "target-delta": 1e-3, "num-rounds": 1,
                              "local-steps": 30, "batch-size": 1})
    task = tiny_synthetic_task(cfg)
    model = task.build_model()
    train, _ = task.build_loaders(0, 2)
    sizes = []

    def loss_fn(m, batch):
        loss, n = task.loss_fn(m, batch)
        sizes.append(n)
        return loss, n

    session = LocalDPSession.from_run_config(cfg, len(train.dataset), None)
    before = federated_state(model)
    stats = train_local(model, train, loss_fn, steps=30, lr=0.1, dp=session)
    assert sizes.count(0) >= 3  # the seed gives empty batches
    assert stats["steps"] == 30 == len(sizes) == session.accountant.steps  # every drawn batch is a step of the ledger
    assert stats["num-examples"] == sum(sizes)
    assert math.isfinite(stats["train_loss"])
    assert session.epsilon(1e-3) == pytest.approx(opacus_epsilon(session.noise_multiplier, 1.0 / len(train), 30, 1e-3), rel=1e-9)
    assert session.epsilon(1e-3) <= 8.0 * 1.001
    assert max(float(np.abs(federated_state(model)[k] - before[k]).max()) for k in before) > 0


def test_optimizer_reset_every_k_steps_equals_k_step_chunks_with_fresh_optimisers():
    """The centralised diagnostic (federated.centralised_optimizer_reset_every): one run with a fresh Adam every k
    steps is the same as k-step runs chained on the same batches, each with its own new Adam, and differs from
    one Adam kept throughout."""
    task = tiny_synthetic_task(resolve_run_config(TINY))
    loader, _ = task.build_loaders(0, 2)
    batches = list(loader)[:4]
    assert len(batches) == 4

    def trained(chunks, reset_every=0, optimizer="adam"):
        model = task.build_model()
        for chunk in chunks:
            train_local(model, chunk, task.loss_fn, steps=len(chunk), lr=0.05, optimizer=optimizer,
                        optimizer_reset_every=reset_every)
        return federated_state(model)

    reset = trained([batches], reset_every=2)
    chained = trained([batches[0:2], batches[2:4]])
    kept = trained([batches])
    for name in reset:
        np.testing.assert_allclose(reset[name], chained[name], rtol=0, atol=1e-6)
    assert max(float(np.abs(reset[k] - kept[k]).max()) for k in reset) > 1e-3  # the resets do change Adam's path
    # SGD has no state: resetting it changes nothing
    sgd_reset, sgd_kept = trained([batches], reset_every=2, optimizer="sgd"), trained([batches], optimizer="sgd")
    for name in sgd_reset:
        np.testing.assert_allclose(sgd_reset[name], sgd_kept[name], rtol=0, atol=1e-6)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"optimizer_reset_every=.*expected an int >= 0"):
            train_local(task.build_model(), batches, task.loss_fn, steps=1, optimizer_reset_every=bad)


def test_local_optimizer_is_selected_by_run_config_and_checked():
    from privacy.federated.task import build_local_optimizer

    cfg = resolve_run_config({**TINY, "local-optimizer": "adam"})
    task = tiny_synthetic_task(cfg)
    model = task.build_model()
    train, _ = task.build_loaders(0, 2)
    before = federated_state(model)
    stats = train_local(model, train, task.loss_fn, steps=3, lr=0.01, optimizer=cfg["local-optimizer"])
    assert stats["steps"] == 3
    # Adam's first step moves every parameter with a non-zero gradient by about lr, whatever the gradient's scale
    moved = np.concatenate([np.abs(federated_state(model)[k] - before[k]).ravel() for k in before])
    assert np.median(moved) == pytest.approx(0.03, rel=0.5)
    assert isinstance(build_local_optimizer("adam", list(model.parameters()), 0.1), torch.optim.Adam)
    with pytest.raises(ValueError, match="local-optimizer"):
        resolve_run_config({**TINY, "local-optimizer": "lbfgs"})
    with pytest.raises(ValueError, match="expected sgd | adam"):
        build_local_optimizer("rmsprop", list(model.parameters()), 0.1)


@pytest.mark.parametrize("key, value, reason", [
    ("topk-value-bits", 2, r"topk-value-bits.*expected 16 \(fp16 values\), 8 or 4"),
    ("topk-value-bits", True, "topk-value-bits"),
    ("topk-fraction", 0.0, r"topk-fraction.*expected a number in \(0, 1\]"),
    ("topk-fraction", 1.5, "topk-fraction"),
    ("compression", "zip", "expected none | int8 | topk"),
])
def test_bad_compression_settings_fail_at_start_up_naming_the_key(key, value, reason):
    with pytest.raises(ValueError, match=reason):
        resolve_run_config({**TINY, key: value})


def test_every_flower_setting_has_one_hydra_source_and_the_defaults_agree():
    """training/wav2vec2/run_config.py is the one translation: it covers every Flower setting once, and
    the composed Hydra defaults translate to the Flower side's defaults except where a reason is written down."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import training.config  # noqa: F401  (schemas, resolvers)
    from privacy.federated.settings import DEFAULT_RUN_CONFIG
    from privacy.federated.synthgrid_task import DEFAULT_TASK_CONFIG
    from training.wav2vec2.run_config import DEFAULTS_DIFFER_ON_PURPOSE, FLOWER_SIDE_ONLY, FROM_HYDRA, SET_PER_RUN

    flower = {**DEFAULT_RUN_CONFIG, **DEFAULT_TASK_CONFIG}
    sources = [*FROM_HYDRA, *SET_PER_RUN, *FLOWER_SIDE_ONLY]
    assert sorted(sources) == sorted(flower)  # every setting has exactly one source
    with initialize_config_dir(version_base="1.3", config_dir=str(training.config.PROJECT_ROOT / "conf")):
        cfg = compose("config", overrides=["model=wav2vec2_tiny", "federated=fedavg", "dp=none", "compression=none"])
    hydra = {key: convert(OmegaConf.select(cfg, path)) for key, (path, convert) in FROM_HYDRA.items()}
    differ = {key for key in FROM_HYDRA if hydra[key] != flower[key]}
    assert differ == set(DEFAULTS_DIFFER_ON_PURPOSE), {k: (hydra[k], flower[k]) for k in differ ^ set(DEFAULTS_DIFFER_ON_PURPOSE)}


def test_linear_lr_decay_gives_step_i_the_lr_times_one_minus_i_over_steps():
    """federated.lr_decay=linear on the centralised side: plain SGD steps of a linear decay equal single steps chained
    by hand at lr * (1 - i / steps); a constant lr differs; a decay without a step count is refused."""
    task = tiny_synthetic_task(resolve_run_config(TINY))
    loader, _ = task.build_loaders(0, 2)
    batches = list(loader)[:4]

    decayed = task.build_model()
    train_local(decayed, batches, task.loss_fn, steps=4, lr=0.2, optimizer="sgd", lr_decay="linear")
    by_hand = task.build_model()
    for i, batch in enumerate(batches):
        train_local(by_hand, [batch], task.loss_fn, steps=1, lr=0.2 * (1 - i / 4), optimizer="sgd")
    constant = task.build_model()
    train_local(constant, batches, task.loss_fn, steps=4, lr=0.2, optimizer="sgd")
    a, b, c = federated_state(decayed), federated_state(by_hand), federated_state(constant)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6)
    assert max(float(np.abs(a[k] - c[k]).max()) for k in a) > 1e-4
    with pytest.raises(ValueError, match=r"lr_decay='linear' needs a step count"):
        train_local(task.build_model(), batches, task.loss_fn, epochs=1, lr_decay="linear")
    with pytest.raises(ValueError, match=r"lr_decay='cosine': expected none \| linear"):
        train_local(task.build_model(), batches, task.loss_fn, steps=1, lr_decay="cosine")


def test_in_process_grid_keeps_a_bounded_log_of_the_most_recent_messages(tmp_path):
    # every reply carries a model update: a 100-round run with 1,600 clients per round must not hold them all
    from privacy.federated.server_app import run_server

    cfg = resolve_run_config({**TINY, "num-rounds": 2, "num-clients": 3})
    full = InProcessGrid(make_client_app(cfg), 3, cfg)
    bounded = InProcessGrid(make_client_app(cfg), 3, cfg, message_log=4)
    summaries = [run_server(grid, {**cfg, "run-dir": str(tmp_path / name)}) for grid, name in ((full, "full"), (bounded, "bounded"))]
    assert len(full.received) > 4 and len(full.sent) == len(full.received)
    assert len(bounded.received) == len(bounded.sent) == 4

    def kinds(messages):  # (Flower's FedAvg calls a round's clients in no fixed order: the kinds, in order)
        return [m.metadata.message_type for m in messages]

    assert kinds(bounded.received) == kinds(full.received)[-4:] == ["train"] + ["evaluate"] * 3
    assert kinds(bounded.sent) == kinds(full.sent)[-4:]
    assert {m.metadata.src_node_id for m in list(bounded.received)[1:]} == {1, 2, 3}  # the last round's evaluations
    # the log does not touch the training (equal up to the order in which the round's updates are summed)
    np.testing.assert_allclose(summaries[0]["final_state"]["0.weight"], summaries[1]["final_state"]["0.weight"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="message_log=-1"):
        InProcessGrid(make_client_app(cfg), 3, cfg, message_log=-1)


def test_clients_reuse_one_model_per_process_and_train_exactly_as_with_a_fresh_copy(monkeypatch):
    from privacy.federated import client_app

    task = tiny_synthetic_task(resolve_run_config(TINY))
    cfg = resolve_run_config(TINY)
    first = client_app.client_model(task, cfg)
    assert client_app.client_model(task, cfg) is first  # one model per task and process
    assert client_app.client_model(task, {**cfg, "dp": "local"}) is not first  # Opacus hooks: a fresh one under local DP

    # 2 clients: Flower's FedAvg calls a round's clients in no fixed order, and only a sum of two is order-free
    reused = run_federated({**TINY, "num-rounds": 3}, num_clients=2, backend="sequential")
    monkeypatch.setattr(client_app, "client_model", lambda task, cfg: task.build_model())
    fresh = run_federated({**TINY, "num-rounds": 3}, num_clients=2, backend="sequential")
    assert _changed(fresh) > 1e-3
    for k in fresh["final_state"]:
        np.testing.assert_array_equal(reused["final_state"][k], fresh["final_state"][k])


def test_client_training_sees_the_same_random_numbers_whatever_ran_before_it(monkeypatch):
    """A client's generators depend on (seed, round, partition) only: NumPy's global state as well as torch's, since
    transformers draws Wav2Vec2's SpecAugment time masks from np.random. Scrambling both before every client call
    (another client, another Ray worker, another process) leaves its draws unchanged."""
    import privacy.federated.client_app as client_app

    draws: list = []
    original = client_app.train_local

    def recording(*args, **kwargs):
        draws.append((float(np.random.rand()), float(torch.rand(1))))
        return original(*args, **kwargs)

    monkeypatch.setattr(client_app, "train_local", recording)
    cfg = {**TINY, "num-rounds": 2}
    run_federated(cfg, num_clients=2, backend="sequential")
    plain, draws[:] = list(draws), []
    app = make_client_app(resolve_run_config(cfg))

    def scrambled(node_id):
        def call(message, context):
            np.random.seed(1000 + 17 * len(draws) + node_id)
            torch.manual_seed(2000 + len(draws))
            return app(message, context)

        return call

    run_federated(cfg, num_clients=2, backend="sequential", client_app=scrambled)
    assert draws == plain and len(set(plain)) == 4
