"""Issue 19: private fine-tuning of a public Wav2Vec2 start (LoRA + CTC head on cached features) over a
population of one-speaker clients with Poisson cohorts and user-level central DP."""

from __future__ import annotations

import json
import logging
import re
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from training.config import PROJECT_ROOT


def _tiny_ctc(vocab_size: int = 10, seed: int = 0):
    from models.wav2vec2 import build_wav2vec2_ctc

    torch.manual_seed(seed)
    return build_wav2vec2_ctc(vocab_size, size="tiny").eval()


# --------------------------------------------------------------------------- model: cache, LoRA, checkpoint file
def test_cached_top_layers_give_the_full_models_logits():
    from models.wav2vec2_lora import CachedTopCTC, encode_below

    model = _tiny_ctc()
    waves = [torch.randn(16000), torch.randn(11000)]
    top = CachedTopCTC(model, first_trainable_layer=3).eval()
    cached = [encode_below(model, w, 3) for w in waves]
    hidden = torch.zeros(2, cached[0].shape[0], cached[0].shape[1])
    for i, c in enumerate(cached):
        hidden[i, : c.shape[0]] = c
    lengths = torch.tensor([c.shape[0] for c in cached])
    logits = top(hidden, lengths)  # a padded batch: the padding must not reach the real frames
    with torch.no_grad():
        for i, w in enumerate(waves):
            full = model(w[None]).logits[0]
            assert full.shape[0] == lengths[i]
            torch.testing.assert_close(logits[i, : lengths[i]], full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="first trainable layer 4: the encoder has layers 0..3"):
        CachedTopCTC(model, 4)


def test_only_lora_adapters_and_the_ctc_head_get_gradients():
    from models.wav2vec2_lora import CachedTopCTC, add_lora, ctc_loss_on_cached, encode_below

    model = _tiny_ctc()
    top = CachedTopCTC(model, 3)
    n = add_lora(top, rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    trainable = {name for name, p in top.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("lm_head.") for name in trainable)
    assert n == sum(p.numel() for p in top.parameters() if p.requires_grad) == 2 * (128 * 4 + 4 * 128) + 128 * 10 + 10  # q_proj, v_proj adapters + head
    hidden = encode_below(model, torch.randn(16000), 3)[None]
    loss = ctc_loss_on_cached(top.train(), hidden, torch.tensor([hidden.shape[1]]), torch.tensor([[1, 2, 3]]), blank_id=0)
    loss.backward()
    for name, p in top.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
            if "lora_A" not in name:  # LoRA starts with B = 0, so A's first gradient is 0; B's and the head's are not
                assert float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None, name
    with pytest.raises(ValueError, match="LoRA targets \\['fc1'\\]"):
        add_lora(CachedTopCTC(model, 3), rank=2, alpha=4.0, targets=["fc1"])


def test_the_public_start_file_round_trips_and_a_foreign_file_is_refused(tmp_path):
    from models.wav2vec2_lora import load_wav2vec2_ctc, save_wav2vec2_ctc

    model = _tiny_ctc(vocab_size=5)
    path = tmp_path / "start.pt"
    save_wav2vec2_ctc(path, model, ["<blank>", "A", "B", "C", "D"], extra={"split": "public"})
    loaded, vocabulary, extra = load_wav2vec2_ctc(path)
    wave = torch.randn(1, 12000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave).logits, model(wave).logits)
    assert vocabulary == ["<blank>", "A", "B", "C", "D"] and extra == {"split": "public"}
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a Wav2Vec2 CTC checkpoint"):
        load_wav2vec2_ctc(tmp_path / "other.pt")


# --------------------------------------------------------------------------- Poisson cohorts, clipping, noise, accountant
class _Grid:
    def __init__(self, n):
        from privacy.federated.runner import _set_task_identity

        _set_task_identity(1)  # Flower stamps run ids on the messages the strategy creates
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _reply(state):
    from privacy.federated.task import state_to_arrays

    return SimpleNamespace(content={"arrays": state_to_arrays(state)})


def test_poisson_cohorts_sample_each_client_at_the_configured_rate():
    from privacy.federated.strategy import PoissonCohortFedAvg

    n, q, rounds = 400, 0.25, 40
    strategy = PoissonCohortFedAvg(n, q)
    sizes, seen = [], np.zeros(n)
    cohorts = []
    for r in range(1, rounds + 1):
        cohort = strategy.sample_cohort(list(range(1, n + 1)), r)
        cohorts.append(frozenset(cohort))
        sizes.append(len(cohort))
        seen[np.array(cohort, dtype=int) - 1] += 1
    # the cohort size is Binomial(N, q): mean qN = 100, std sqrt(Nq(1-q)) = 8.7 per round
    assert abs(np.mean(sizes) - q * n) < 4 * math.sqrt(n * q * (1 - q) / rounds)
    assert np.std(sizes) > 3  # not a fixed-size sample
    assert len(set(cohorts)) == rounds  # fresh draws every round
    # every client's participation count is Binomial(rounds, q): mean 10
    assert abs(seen.mean() - q * rounds) < 0.5
    # the draws come from the OS CSPRNG: two strategies configured alike sample different cohorts
    assert PoissonCohortFedAvg(n, q).sample_cohort(list(range(1, n + 1)), 1) != PoissonCohortFedAvg(n, q).sample_cohort(list(range(1, n + 1)), 1)
    # ... unless the NOT-PRIVATE reproducible option is on
    a = PoissonCohortFedAvg(n, q, reproducible_seed=3).sample_cohort(list(range(1, n + 1)), 1)
    assert a == PoissonCohortFedAvg(n, q, reproducible_seed=3).sample_cohort(list(range(1, n + 1)), 1)


def test_central_dp_clips_every_update_and_divides_by_the_expected_cohort():
    from privacy.federated.strategy import PoissonCohortFedAvg
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n, q, clip = 40, 0.25, 0.5
    strategy = PoissonCohortFedAvg(n, q, noise_multiplier=0.0, clipping_norm=clip)
    current = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}
    strategy.configure_train(1, state_to_arrays(current), __import__("flwr").app.ConfigRecord(), _Grid(n))
    # three clients: two far beyond the bound (norms 100 and 10), one inside it (0.3)
    updates = [np.full(8, 100 / math.sqrt(8)), np.r_[np.full(6, 10 / math.sqrt(6)), 0, 0], np.r_[0.3, np.zeros(7)]]
    replies = [_reply({"w": u[:6].astype(np.float32), "b": u[6:].astype(np.float32)}) for u in updates]
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = arrays_to_state(arrays)
    step = np.r_[new["w"], new["b"]]
    clipped = [u * min(1.0, clip / np.linalg.norm(u)) for u in updates]
    np.testing.assert_allclose(step, np.sum(clipped, axis=0) / (q * n), rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(step) <= 3 * clip / (q * n) + 1e-6  # sensitivity C / (qN) per client
    assert metrics["clipped_fraction"] == pytest.approx(2 / 3)
    assert metrics["noise_norm"] == 0.0 and metrics["signal_norm"] > 0


def test_noise_std_on_the_released_mean_is_the_noise_a_round_adds(caplog):
    """The start-up log's sigma C / (q N) is the std per coordinate of what an empty cohort's round releases (the
    noise alone); without DP it is 0."""
    from privacy.federated.strategy import PoissonCohortFedAvg
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n, q, sigma, clip = 50, 0.2, 1.5, 0.5
    strategy = PoissonCohortFedAvg(n, q, noise_multiplier=sigma, clipping_norm=clip, reproducible_seed=4)
    assert strategy.mean_noise_std() == pytest.approx(sigma * clip / (q * n)) == pytest.approx(0.075)
    with caplog.at_level("INFO", logger="privacy.federated.strategy"):
        strategy.summary()
    assert "noise std on the released mean 0.075 per coordinate" in caplog.text
    current = {"w": np.zeros(40_000, np.float32)}
    strategy.configure_train(1, state_to_arrays(current), __import__("flwr").app.ConfigRecord(), _Grid(n))
    arrays, _ = strategy.aggregate_train(1, [])  # nobody replied: the round releases the noise alone
    assert np.std(arrays_to_state(arrays)["w"]) == pytest.approx(strategy.mean_noise_std(), rel=0.02)
    assert PoissonCohortFedAvg(n, q).mean_noise_std() == 0.0


def test_server_momentum_and_learning_rate_act_on_the_released_mean():
    from flwr.app import ConfigRecord

    from privacy.federated.strategy import PoissonCohortFedAvg
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n, q, eta, beta = 8, 0.5, 2.0, 0.5
    strategy = PoissonCohortFedAvg(n, q, server_lr=eta, server_momentum=beta, reproducible_seed=1)
    plain = PoissonCohortFedAvg(n, q, reproducible_seed=1)
    state = {"w": np.zeros(3, np.float32)}
    plain_state = dict(state)
    means = [np.array([1.0, 0.0, -1.0]), np.array([0.0, 2.0, 0.0]), np.array([0.5, 0.5, 0.5])]
    velocity = np.zeros(3)
    for r, mean in enumerate(means, start=1):
        for s, st in ((strategy, state), (plain, plain_state)):
            s.configure_train(r, state_to_arrays(st), ConfigRecord(), _Grid(n))
        # two clients whose updates average to `mean`
        replies = [_reply({"w": (state["w"] + mean + d).astype(np.float32)}) for d in (0.25, -0.25)]
        before = state["w"].copy()
        state = arrays_to_state(strategy.aggregate_train(r, replies)[0])
        velocity = beta * velocity + mean
        np.testing.assert_allclose(state["w"] - before, eta * velocity, rtol=1e-5, atol=1e-6)
        # eta = 1, beta = 0 is plain FedAvg: the new model is the old one plus the mean update
        plain_replies = [_reply({"w": (plain_state["w"] + mean + d).astype(np.float32)}) for d in (0.25, -0.25)]
        plain_before = plain_state["w"].copy()
        plain_state = arrays_to_state(plain.aggregate_train(r, plain_replies)[0])
        np.testing.assert_allclose(plain_state["w"] - plain_before, mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="server-momentum=1.0"):
        PoissonCohortFedAvg(n, q, server_momentum=1.0)


def test_server_adam_on_a_quadratic_takes_the_hand_computed_adam_steps():
    """strategy=fedadam over Poisson cohorts: each client's update is one SGD step on f(w) = 1/2 ||w - w*||^2
    (update = lr (w* - w)); the server treats their mean as a pseudo-gradient and takes Adam steps
    (Reddi et al. 2021, bias-corrected as Kingma & Ba's alpha_t), computed here by hand, and approaches w*."""
    from flwr.app import ConfigRecord

    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import build_strategy
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n, eta, b1, b2, tau, client_lr = 8, 0.05, 0.9, 0.99, 1e-3, 0.5
    target = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
    cfg = resolve_run_config({"num-clients": n, "cohort-sampling": "poisson", "cohort-rate": 0.5, "strategy": "fedadam",
                              "server-lr": eta, "server-beta1": b1, "server-beta2": b2, "server-tau": tau, "num-rounds": 30})
    strategy = build_strategy(cfg, n)[1]  # the PoissonCohortFedAvg inside the validating wrapper
    assert strategy.server_optimizer == "adam" and strategy.server_lr == eta
    state = {"w": np.zeros(4, np.float32)}
    m, v, w = np.zeros(4), np.zeros(4), np.zeros(4)
    for t in range(1, 31):
        strategy.configure_train(t, state_to_arrays(state), ConfigRecord(), _Grid(n))
        # two clients; their noise cancels in the mean
        replies = [_reply({"w": (state["w"] + client_lr * (target - state["w"]) + d).astype(np.float32)}) for d in (0.1, -0.1)]
        state = arrays_to_state(strategy.aggregate_train(t, replies)[0])
        g = client_lr * (target - w)  # the pseudo-gradient (an ascent direction: the server ADDS the step)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        w = w + eta * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(state["w"], w, rtol=1e-4, atol=1e-5)
        if t == 1:  # Adam's first step: about eta in every coordinate that has a gradient, whatever its size
            np.testing.assert_allclose(np.abs(state["w"][[0, 1, 2]]), eta, rtol=0.05)
    assert np.linalg.norm(state["w"] - target) < 0.5 * np.linalg.norm(target)


@pytest.mark.parametrize("key, value", [("server-lr", 0.0), ("server-beta1", 1.0), ("server-beta2", -0.1),
                                        ("server-tau", 0.0), ("server-tau", True)])
def test_server_adam_refuses_bad_values_naming_the_option(key, value):
    from privacy.federated.settings import resolve_run_config

    field = "federated." + key.replace("-", "_")
    with pytest.raises(ValueError, match=re.escape(f"run_config['{key}'] ({field})={value!r}")):
        resolve_run_config({"strategy": "fedadam", key: value})


def test_server_adam_refuses_fedavg_server_options_and_is_allowed_under_central_dp_with_poisson_cohorts():
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import PoissonCohortFedAvg, build_strategy

    base = {"num-clients": 8, "cohort-sampling": "poisson", "cohort-rate": 0.5, "strategy": "fedadam", "num-rounds": 2}
    for key, value in (("fedavg-server-lr", 0.3), ("server-momentum", 0.9)):
        with pytest.raises(ValueError, match=re.escape(f"{key}=") + ".*with strategy=fedadam"):
            build_strategy(resolve_run_config({**base, key: value}), 8)
    inner = build_strategy(resolve_run_config({**base, "dp": "central", "noise-multiplier": 1.0}), 8)[1]
    assert inner.private and inner.server_optimizer == "adam"
    # fixed cohorts keep Flower's FedAdam (no central DP: not a mean aggregator there)
    with pytest.raises(ValueError, match="dp=central needs a mean aggregator"):
        build_strategy(resolve_run_config({**base, "cohort-sampling": "fixed", "dp": "central", "noise-multiplier": 1.0}), 8)
    with pytest.raises(ValueError, match="server_optimizer='rmsprop'"):
        PoissonCohortFedAvg(8, 0.5, server_optimizer="rmsprop")


def test_an_empty_poisson_cohort_still_releases_noise_under_central_dp():
    """The accountant analyses the subsampled Gaussian mechanism, which outputs noise when nobody is sampled:
    the server must release the noised zero sum then, not skip the round (without DP an empty round is skipped)."""
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import build_strategy
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n = 8
    current = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}
    for dp, released in (("central", True), ("none", False)):
        cfg = resolve_run_config({"num-clients": n, "cohort-sampling": "poisson", "cohort-rate": 0.25, "dp": dp,
                                  "noise-multiplier": 1.0, "clipping-norm": 1.0, "num-rounds": 1})
        strategy, inner = build_strategy(cfg, n)
        strategy.configure_train(1, state_to_arrays(current), __import__("flwr").app.ConfigRecord(), _Grid(n))
        arrays, metrics = strategy.aggregate_train(1, [])
        assert (arrays is not None) == released, dp
        if released:
            step = np.concatenate([v.ravel() for v in arrays_to_state(arrays).values()])
            assert np.linalg.norm(step) > 0 and metrics["accepted"] == 0.0 and metrics["noise_norm"] > 0
            assert "noise_to_signal" not in metrics  # no signal: no ratio
        else:
            assert strategy.rounds[1].skip_reason


def test_poisson_cohorts_are_seeded_without_central_dp_and_secret_with_it():
    """FedAvg without central DP is reproducible (cohorts drawn from the run's seed); under central DP the
    cohorts come from the OS CSPRNG, as the amplification-by-sampling argument needs."""
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import build_strategy

    n, nodes = 64, list(range(1, 65))

    def cohorts(dp, seed):
        cfg = resolve_run_config({"num-clients": n, "cohort-sampling": "poisson", "cohort-rate": 0.5, "dp": dp,
                                  "noise-multiplier": 1.0, "num-rounds": 3, "seed": seed})
        inner = build_strategy(cfg, n)[1]
        return [inner.sample_cohort(nodes, r) for r in (1, 2, 3)]

    assert cohorts("none", 1) == cohorts("none", 1) and cohorts("none", 1) != cohorts("none", 2)
    assert cohorts("local", 1) == cohorts("local", 1)
    assert cohorts("central", 1) != cohorts("central", 1)  # 2^-192 to collide


def test_the_server_optimiser_is_refused_outside_poisson_fedavg():
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import build_strategy

    cfg = resolve_run_config({"num-clients": 4, "server-momentum": 0.9})
    with pytest.raises(ValueError, match="server-momentum=0.9.*cohort-sampling=poisson only"):
        build_strategy(cfg, 4)


def test_central_dp_bound_holds_on_the_decoded_compressed_update():
    """Clients send int8 / top-k packed updates; the server clips what it DEcodes, so quantisation cannot
    push a client's influence beyond C / (qN)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from privacy.federated.compression import build_compressor
    from privacy.federated.strategy import PoissonCohortFedAvg, ValidatingStrategy
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n, q, clip = 8, 1.0, 0.1  # q = 1: every client is in the (CSPRNG-drawn) cohort, so three replies always have a message
    inner = PoissonCohortFedAvg(n, q, noise_multiplier=0.0, clipping_norm=clip)
    strategy = ValidatingStrategy(inner, max_update_norm=1e6)
    current = {"a": np.zeros((4, 5), np.float32), "b": np.zeros(3, np.float32)}
    messages = list(strategy.configure_train(1, state_to_arrays(current), ConfigRecord(), _Grid(n)))
    g = np.random.default_rng(0)
    replies = []
    for i, name in enumerate(["int8", "topk", "int8"]):
        delta = {"a": g.normal(size=(4, 5)).astype(np.float32) * 5, "b": g.normal(size=3).astype(np.float32) * 5}
        payload = build_compressor(name, topk_fraction=0.3).compress(delta)
        content = RecordDict({"arrays": state_to_arrays(payload), "metrics": MetricRecord({"epsilon": 1.0, "partition-id": i})})
        replies.append(Message(content, reply_to=messages[i]))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert len(strategy.rounds[1].clients) == 3 and not strategy.rounds[1].rejected
    step = np.concatenate([v.ravel() for v in arrays_to_state(arrays).values()])
    assert np.linalg.norm(step) <= 3 * clip / (q * n) * (1 + 1e-5)
    assert inner.round_stats[1]["clipped_fraction"] == 1.0
    assert all(c["bytes_sent"] < c["dense_bytes"] for c in strategy.rounds[1].clients)

    # the dense size each reply is compared with is the uncompressed encoding's, whatever the values (it is
    # encoded once per layout and remembered): zeros, large values, another dtype and another shape
    from privacy.federated.compression import dense_nbytes

    for delta in ({"a": np.zeros((4, 5), np.float32), "b": np.zeros(3, np.float32)},
                  {"a": g.normal(size=(4, 5)).astype(np.float32) * 1e30, "b": np.full(3, np.nan, np.float32)},
                  {"a": np.ones((4, 5), np.float64), "b": np.ones(3, np.float64)},
                  {"a": np.ones((2, 5), np.float32), "b": np.ones(3, np.float32)}):
        assert strategy._dense_nbytes(delta) == dense_nbytes(delta)
    assert len(strategy._dense_array_bytes) == 3  # one encoding per layout: float32 (4, 5) for 5 deltas, float64, float32 (2, 5)


def test_central_dp_noise_has_std_sigma_c_and_comes_from_the_os_csprng():
    from flwr.app import ConfigRecord

    from privacy.federated.strategy import PoissonCohortFedAvg
    from privacy.federated.task import arrays_to_state, state_to_arrays

    n, q, sigma, clip, dim = 20, 0.5, 1.5, 2.0, 20000
    current = {"w": np.zeros(dim, np.float32)}

    def one_step(**kwargs):
        strategy = PoissonCohortFedAvg(n, q, noise_multiplier=sigma, clipping_norm=clip, **kwargs)
        strategy.configure_train(1, state_to_arrays(current), ConfigRecord(), _Grid(n))
        arrays, metrics = strategy.aggregate_train(1, [_reply(current)])  # one client with a zero update: pure noise
        return arrays_to_state(arrays)["w"] * (q * n), metrics

    noise, metrics = one_step()
    assert np.std(noise) == pytest.approx(sigma * clip, rel=0.03)
    assert abs(np.mean(noise)) < 4 * sigma * clip / math.sqrt(dim)
    assert metrics["noise_norm"] == pytest.approx(np.linalg.norm(noise) / (q * n), rel=1e-4)
    again, _ = one_step()
    assert abs(np.corrcoef(noise, again)[0, 1]) < 0.05  # independent draws, not a seeded stream
    first, _ = one_step(reproducible_seed=7)
    second, _ = one_step(reproducible_seed=7)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("q,rounds,target", [(0.25, 40, 8.0), (0.1, 100, 1.0), (1.0, 5, 3.0)])
def test_user_level_epsilon_matches_an_independent_accountant(q, rounds, target):
    from flwr.app import ConfigRecord

    from privacy.dp import independent_epsilon, noise_multiplier_for_budget
    from privacy.federated.strategy import PoissonCohortFedAvg
    from privacy.federated.task import state_to_arrays

    sigma = noise_multiplier_for_budget(target, 1e-5, q, rounds, "rdp", 1e3)
    strategy = PoissonCohortFedAvg(400, q, noise_multiplier=sigma, clipping_norm=1.0)
    for r in range(1, rounds + 1):
        strategy.configure_train(r, state_to_arrays({"w": np.zeros(2, np.float32)}), ConfigRecord(), _Grid(400))
    eps = strategy.epsilon(1e-5)
    assert eps <= target * 1.001 and eps > 0.95 * target  # calibrated to the budget, not far below it
    independent = independent_epsilon(sigma, q, rounds, 1e-5, "rdp")  # Google's dp_accounting, Poisson-subsampled Gaussian
    assert abs(independent - eps) / eps < 0.03
    # amplification by sampling is used: the same sigma without sampling (q = 1) spends far more
    if q < 1:
        assert independent_epsilon(sigma, 1.0, rounds, 1e-5, "rdp") > 2 * eps


# --------------------------------------------------------------------------- the Hydra entry on a tiny corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from tests.test_fl_synthgrid import _write_corpus

    return _write_corpus(tmp_path_factory.mktemp("tinypopulation"))


@pytest.fixture(scope="module")
def public_start(tmp_path_factory) -> Path:
    from data.synthgrid.grammar import GRID_WORDS
    from data.tokenizer import WordTokenizer
    from models.wav2vec2_lora import save_wav2vec2_ctc
    from training.starting_checkpoint import sha256_file

    tokenizer = WordTokenizer(GRID_WORDS)
    path = tmp_path_factory.mktemp("start") / "wav2vec2_tiny_test.pt"
    save_wav2vec2_ctc(path, _tiny_ctc(tokenizer.vocab_size), tokenizer.symbols)
    path.with_suffix(".card.json").write_text(json.dumps({"sha256": sha256_file(path)}))
    return path


def _cfg(corpus: Path, runs: Path, start: Path, *overrides: str):
    import training.config  # noqa: F401  (resolvers, schemas)

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=[
            "experiment=fl_dp_population", f"data.dir={corpus}", f"paths.runs_dir={runs}", f"model.checkpoint={start}",
            "federated.num_clients=6", "federated.num_rounds=3", "federated.cohort_rate=0.5", "dp.target_delta=1e-3",
            "trainer.batch_size=4", *overrides])


def test_population_run_trains_only_lora_and_head_under_user_level_dp(corpus, public_start, tmp_path):
    from training.wav2vec2.finetune import run_wav2vec2_task

    metrics = run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", public_start, "dp.target_epsilon=8"))
    assert metrics["rounds"] == 3 and metrics["population"] == 6 and metrics["cohort_rate"] == 0.5
    assert 0 < metrics["epsilon/max"] <= 8.0 and metrics["epsilon/independent_rel_diff"] < 0.03
    assert metrics["dp/noise_to_signal_mean"] > 0 and 0 <= metrics["dp/clipped_fraction_mean"] <= 1
    run_dir = next((tmp_path / "runs").glob("**/federated"))
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())
    names = set(np.load(run_dir / "global_model.npz").files)
    assert names and all("lora_" in n or n.startswith("lm_head.") for n in names)
    for r in rounds["rounds"]:
        # Poisson cohorts of 6 clients at q = 0.5 are empty with probability 1/64 (CSPRNG, not seeded): such a round
        # still releases noise and has no noise/signal ratio
        assert ("noise_to_signal" in r["cohort"]) == (r["cohort"]["accepted"] > 0) and 0 <= r["server_eval"]["wer"]
        assert len(r["clients"]) == int(r["cohort"]["cohort_size"])  # every sampled client, nobody else


def test_the_lora_task_keeps_no_audio_and_its_disk_cache_holds_the_features_of_the_waveforms(public_start, tmp_path, caplog, monkeypatch):
    import shutil

    from models.wav2vec2_lora import encode_below
    from privacy.federated import lora_task, synthgrid_task
    from tests.test_fl_synthgrid import _write_corpus

    corpus = _write_corpus(tmp_path / "corpus")  # its own corpus: the module's may already have a cache on disk
    base, _, checksum = lora_task.load_public_start(public_start)
    key = (str(corpus.resolve()), "train")
    monkeypatch.setattr("common.progress.stderr_is_terminal", lambda: False)  # progress as log lines, as in a batch job
    with caplog.at_level(logging.INFO, logger="common.progress"):
        computed = lora_task.cached_features(base, checksum, corpus, "train", 1)  # no cache file: computed from the audio
    assert key not in synthgrid_task._WAVE_CACHE  # ... which was read and not kept
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encoding train below layer 1 ")]
    assert done and f"{len(computed)}/{len(computed)} (100%)" in done[-1]  # progress of the long encoding, to its end
    cache_file = next((corpus / lora_task.FEATURE_CACHE_DIR).glob("*_train_layer1.pt"))
    waves = synthgrid_task.read_split_waveforms(corpus, "train")
    with torch.inference_mode():
        expected = [encode_below(base, w, 1) for w in waves]
    assert len(computed) == len(expected) and all(torch.equal(a, b) for a, b in zip(computed, expected))
    # a new process (the in-memory caches cleared) loads the file; the sample counts it is checked against are the files'
    for cache in (lora_task._FEATURE_CACHE, synthgrid_task._SPLIT_CACHE, synthgrid_task._WAVE_CACHE):
        cache.clear()
    loaded = lora_task.cached_features(base, checksum, corpus, "train", 1)
    assert all(torch.equal(a, b) for a, b in zip(loaded, expected)) and key not in synthgrid_task._WAVE_CACHE
    _, _, num_samples, _ = synthgrid_task.load_split_without_audio(corpus, "train")
    assert num_samples == [len(w) for w in waves]
    # a cache file that does not fit the split (one utterance short) is recomputed, not trusted
    lora_task._FEATURE_CACHE.clear()
    torch.save(expected[:-1], cache_file)
    again = lora_task.cached_features(base, checksum, corpus, "train", 1)
    assert len(again) == len(expected) and all(torch.equal(a, b) for a, b in zip(again, expected))
    assert len(torch.load(cache_file, weights_only=True)) == len(expected)
    shutil.rmtree(corpus)


def test_no_private_training_row_evaluates_the_start_and_centralised_matches_the_expected_sample_gradients(corpus, public_start, tmp_path):
    from training.wav2vec2.finetune import run_wav2vec2_task
    from training.wav2vec2.plan import centralised_steps, client_plan

    zero = run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", public_start, "federated=none", "dp=none", "federated.num_rounds=0"))
    assert zero["steps"] == 0 and 0 <= zero["wer"]
    cfg = _cfg(corpus, tmp_path / "runs", public_start, "federated=none", "dp=none", "federated.local_steps=2")
    # 6 clients x 2 steps x 3 rounds x q = 0.5: the federation's expected number of steps
    assert centralised_steps(cfg, client_plan(cfg)) == 18
    assert run_wav2vec2_task(cfg)["steps"] == 18


def test_impossible_population_plans_fail_before_any_audio_with_the_numbers(corpus, public_start, tmp_path, monkeypatch):
    from privacy.dp import DPPlanError
    from privacy.federated import lora_task, synthgrid_task
    from training.starting_checkpoint import StartingCheckpointError
    from training.wav2vec2.finetune import run_wav2vec2_task

    def no_audio(*args, **kwargs):
        raise AssertionError("audio was read before the start-up checks failed")

    # every reader of a split's files goes through _split_entry; the lora task imports its two readers by name
    monkeypatch.setattr(synthgrid_task, "_split_entry", no_audio)
    monkeypatch.setattr(lora_task, "load_split_without_audio", no_audio)
    monkeypatch.setattr(lora_task, "iter_split_waveforms", no_audio)
    runs = tmp_path / "runs"
    with pytest.raises(DPPlanError, match=r"cohort_rate=1.5: the expected cohort q x N = 9 clients is larger than the population of N = 6"):
        run_wav2vec2_task(_cfg(corpus, runs, public_start, "federated.cohort_rate=1.5"))
    with pytest.raises(DPPlanError, match="num_clients=7 but the train split .* has only 6 speakers"):
        run_wav2vec2_task(_cfg(corpus, runs, public_start, "federated.num_clients=7"))
    with pytest.raises(DPPlanError, match=r"unreachable for 3 steps at sample_rate=0.5: even noise_multiplier=0.2"):
        run_wav2vec2_task(_cfg(corpus, runs, public_start, "dp.target_epsilon=1", "dp.max_noise_multiplier=0.2"))
    with pytest.raises(DPPlanError, match=r"dp.noise_multiplier=50 is beyond dp.max_noise_multiplier=10"):
        run_wav2vec2_task(_cfg(corpus, runs, public_start, "dp.noise_multiplier=50", "dp.max_noise_multiplier=10"))
    # the corpus is not even generated yet: the population size comes from the data config (320 training speakers)
    missing = tmp_path / "not_generated"
    with pytest.raises(DPPlanError, match="num_clients=400 but the train split of data=synthgrid .* has only 320 speakers"):
        run_wav2vec2_task(_cfg(missing, runs, public_start, "federated.num_clients=400"))
    assert not missing.exists()
    # a public start that does not match its model card is refused before anything is read
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(public_start.read_bytes() + b"x")
    tampered.with_suffix(".card.json").write_text(public_start.with_suffix(".card.json").read_text())
    with pytest.raises(StartingCheckpointError, match="does not match its model card"):
        run_wav2vec2_task(_cfg(corpus, runs, tampered))


def test_local_dp_stays_available_on_the_lora_task(corpus, public_start, tmp_path):
    from training.wav2vec2.finetune import run_wav2vec2_task

    metrics = run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", public_start, "dp=local", "dp.target_epsilon=8",
                                     "dp.target_delta=1e-3", "federated.num_rounds=2"))
    assert 0 < metrics["epsilon/max"] <= 8.0 and metrics["epsilon/independent_rel_diff"] < 0.03
    assert metrics["dp/noise_from_os_csprng"] == 1 and metrics["client_updates"] >= 1


def test_server_eval_every_thins_the_learning_curve_without_changing_the_model(corpus, public_start, tmp_path):
    from training.wav2vec2.finetune import run_wav2vec2_task

    results = {}
    for every in (1, 3):
        runs = tmp_path / f"every{every}"
        metrics = run_wav2vec2_task(_cfg(corpus, runs, public_start, "dp=none", "federated.num_rounds=4",
                                         f"federated.server_eval_every={every}"))
        run_dir = next(runs.glob("**/federated"))
        rounds = json.loads((run_dir / "federated_rounds.json").read_text())["rounds"]
        model = np.load(run_dir / "global_model.npz")
        results[every] = (metrics, [r["server_round"] for r in rounds if r.get("server_eval")], {n: model[n] for n in model.files})
    assert results[1][1] == [1, 2, 3, 4]
    assert results[3][1] == [3, 4]  # every third round, and always the last one
    (m1, _, model1), (m3, _, model3) = results[1], results[3]
    assert model1.keys() == model3.keys() and all(np.array_equal(model1[n], model3[n]) for n in model1)
    assert m1["wer"] == m3["wer"] and m1["test_loss"] == m3["test_loss"]


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_server_eval_every_refuses_what_is_not_a_positive_integer(value):
    from privacy.federated.settings import resolve_run_config

    with pytest.raises(ValueError, match=r"server-eval-every.*federated\.server_eval_every.*" + re.escape(repr(value))):
        resolve_run_config({"server-eval-every": value})


def test_small_cohort_experiment_spends_the_client_steps_of_the_population_experiment():
    """experiment=fl_population_small_cohorts is fl_dp_population without DP, with 4-client cohorts and as many client
    steps as the 80-client FedAvg (and so as the centralised baseline): a point of the cohort-size test."""
    import training.config  # noqa: F401  (resolvers, schemas)
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        small = compose("config", overrides=["experiment=fl_population_small_cohorts"])
        base = compose("config", overrides=["experiment=fl_dp_population", "dp=none", "federated.cohort_rate=0.0125",
                                             "federated.num_rounds=200", "federated.fedavg_server_lr=0.3",
                                             "federated.server_eval_every=5"])
        population = compose("config", overrides=["experiment=fl_dp_population"])
    assert OmegaConf.to_container(small, resolve=True) == OmegaConf.to_container(base, resolve=True)
    steps = lambda c: c.federated.num_rounds * c.federated.cohort_rate * c.federated.num_clients * c.federated.local_steps
    assert steps(small) == steps(population) == 4000
    assert small.federated.cohort_rate * small.federated.num_clients == 4 and small.dp.name == "none"
    assert small.run_name != population.run_name and "slr0.3" in small.run_name


def test_the_round_progress_line_says_updates_were_accepted_when_dp_clients_report_no_loss():
    from privacy.federated.server_app import _round_numbers

    base = {"max_client_epsilon": 0.0, "server_eval": {"wer": 0.5, "loss": 1.0}}
    under_dp = _round_numbers({**base, "train_loss": None, "clients": [{"partition_id": 0}, {"partition_id": 3}],
                               "cohort": {"noise_to_signal": 2.5}})
    assert under_dp.startswith("2 updates accepted (no train loss reported)") and "noise/signal 2.5" in under_dp
    assert _round_numbers({**base, "train_loss": None, "clients": []}).startswith("no update accepted")
    assert _round_numbers({**base, "train_loss": 1.25, "clients": [{}]}).startswith("train_loss 1.25")


def test_centralised_optimizer_reset_is_named_in_the_run_and_refused_outside_the_non_private_baseline():
    """federated.centralised_optimizer_reset_every (the diagnostic of FedAvg's gap): its runs get their own
    directory and table row; the baseline's name is unchanged when it is off; any other use is refused by name."""
    import training.config  # noqa: F401  (resolvers, schemas)
    from training.wav2vec2.plan import check_config

    base = ["experiment=fl_dp_population", "federated=none", "dp=none"]
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        plain = compose("config", overrides=base)
        reset = compose("config", overrides=base + ["federated.centralised_optimizer_reset_every=5"])
        fedavg = compose("config", overrides=["experiment=fl_dp_population", "dp=none", "federated.centralised_optimizer_reset_every=5"])
        local_dp = compose("config", overrides=["experiment=fl_dp_population", "federated=none", "dp=local",
                                                 "federated.centralised_optimizer_reset_every=5"])
        negative = compose("config", overrides=base + ["federated.centralised_optimizer_reset_every=-1"])
    assert plain.run_name == "wav2vec2_tiny-lora-ctc-b10x5q0.25"  # the centralised baseline's directory of sessions 3-4
    assert reset.run_name == "wav2vec2_tiny-lora-ctc-optreset5-b10x5q0.25"
    assert check_config(reset)["strategy"] == "fedavg"  # accepted (the centralised baseline runs on the FedAvg plumbing)
    for cfg, says in ((fedavg, "federated=fedavg dp=none"), (local_dp, "federated=none dp=local")):
        with pytest.raises(ValueError, match=r"federated\.centralised_optimizer_reset_every=5: only for the non-private "
                                             r"centralised baseline.*" + re.escape(says)):
            check_config(cfg)
    with pytest.raises(ValueError, match=r"federated\.centralised_optimizer_reset_every=-1: expected an int >= 0"):
        check_config(negative)


def test_table_keeps_the_optimizer_reset_diagnostic_apart_from_the_centralised_baseline():
    from scripts.make_tables import Run, _label

    config = {"model": {"name": "wav2vec2_tiny"}, "adapter": {"name": "lora", "r": 4},
              "federated": {"name": "none", "num_rounds": 10, "local_steps": 5}, "dp": {"name": "none"},
              "compression": {"name": "none"}}
    plain = Run(Path("a"), config)
    reset = Run(Path("b"), {**config, "federated": {**config["federated"], "centralised_optimizer_reset_every": 5}})
    assert plain.system != reset.system
    assert _label(reset) == "wav2vec2_tiny, LoRA r=4 + CTC head, centralised, optimiser re-created every 5 steps, 10x5 steps"
    assert "re-created" not in _label(plain)
    # centralised baselines of different length (the budget's cohort rate) are two systems with two labels: the steps
    population = {"num_clients": 6400, "cohort_sampling": "poisson"}
    short = Run(Path("s"), {**config, "federated": {**config["federated"], **population, "cohort_rate": 0.0125}})
    long = Run(Path("l"), {**config, "federated": {**config["federated"], **population, "cohort_rate": 0.025}})
    assert short.system != long.system
    assert _label(short).endswith("centralised, 4,000 steps") and _label(long).endswith("centralised, 8,000 steps")
    every_step = Run(Path("g"), {**config, "federated": {**config["federated"], "centralised_optimizer_reset_every": 1}})
    assert "optimiser re-created every step," in _label(every_step)
    # FedAvg with SGD clients and server Adam are systems of their own, with their options in the label
    fl = {**config, "federated": {"name": "fedavg", "num_rounds": 10, "local_steps": 5, "num_clients": 320,
                                  "cohort_sampling": "poisson", "cohort_rate": 0.25, "local_optimizer": "adam",
                                  "server_lr": 0.1}, "trainer": {"lr": 3e-3}}
    adam_clients = Run(Path("c"), fl)
    sgd_clients = Run(Path("d"), {**fl, "federated": {**fl["federated"], "local_optimizer": "sgd"}, "trainer": {"lr": 0.5}})
    fedadam = Run(Path("e"), {**sgd_clients.config, "federated": {**sgd_clients.config["federated"], "name": "fedadam",
                                                                  "server_lr": 0.01, "server_beta1": 0.9, "server_beta2": 0.99,
                                                                  "server_tau": 1e-3}})
    assert len({adam_clients.system, sgd_clients.system, fedadam.system}) == 3
    assert _label(sgd_clients) == ("wav2vec2_tiny, LoRA r=4 + CTC head, FL fedavg, 320 clients, Poisson q=0.25, "
                                   "SGD clients lr 0.5, 10x5 steps")
    assert _label(fedadam) == ("wav2vec2_tiny, LoRA r=4 + CTC head, FL fedadam, 320 clients, Poisson q=0.25, "
                               "server Adam lr 0.01 (β 0.9/0.99, τ 0.001), SGD clients lr 0.5, 10x5 steps")
    # the unused fedadam options of a FedAvg run do not split it
    other = Run(Path("f"), {**fl, "federated": {**fl["federated"], "server_lr": 0.5}})
    assert other.system == adam_clients.system


def test_client_optimiser_and_server_adam_moments_are_named_in_the_run_only_when_not_the_defaults():
    """SGD clients (and their lr) and fedadam's beta/tau get their own run directory; the names of the default runs
    (Adam clients; Flower's 0.9 / 0.99 / 1e-3) are the ones of sessions 3-4."""
    import training.config  # noqa: F401  (resolvers, schemas)

    base = ["experiment=fl_dp_population", "dp=none"]
    sgd = ["federated.local_optimizer=sgd", "trainer.lr=1.0"]
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        fedavg = compose("config", overrides=base)
        fedavg_sgd = compose("config", overrides=base + sgd)
        fedadam = compose("config", overrides=base + ["federated=fedadam", "federated.server_lr=0.01"])
        fedadam_sgd = compose("config", overrides=base + sgd + ["federated=fedadam", "federated.server_lr=0.01"])
        moments = compose("config", overrides=base + sgd + ["federated=fedadam", "federated.server_lr=0.01",
                                                            "federated.server_beta2=0.999", "federated.server_tau=1e-8"])
    assert fedavg.run_name == "wav2vec2_tiny-lora-ctc-fedavg-c320-r10-b10x5q0.25"
    assert fedavg_sgd.run_name == "wav2vec2_tiny-lora-ctc-fedavg-sgd1-c320-r10-b10x5q0.25"
    assert fedadam.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-c320-r10-b10x5q0.25"
    assert fedadam_sgd.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-sgd1-c320-r10-b10x5q0.25"
    assert moments.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-b0.9-0.999-tau1e-08-sgd1-c320-r10-b10x5q0.25"


def test_server_adam_experiment_is_one_step_fedsgd_with_the_centralised_adam_and_budget():
    """experiment=fl_population_server_adam: one local SGD step at lr 1 (the update is minus the client's gradient),
    server Adam with the centralised baseline's hyper-parameters, about one client per round, and as many client
    steps of 10 utterances as the centralised run of experiment=fl_dp_population."""
    import training.config  # noqa: F401  (resolvers, schemas)
    from omegaconf import OmegaConf

    from training.wav2vec2.plan import centralised_steps

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        exp = compose("config", overrides=["experiment=fl_population_server_adam"])
        explicit = compose("config", overrides=[
            "experiment=fl_dp_population", "dp=none", "federated=fedadam", "federated.local_optimizer=sgd",
            "trainer.lr=1.0", "federated.local_steps=1", "federated.cohort_rate=0.003125", "federated.num_rounds=4000",
            "federated.server_lr=0.003", "federated.server_beta2=0.999", "federated.server_tau=1e-8",
            "federated.server_eval_every=200"])
        population = compose("config", overrides=["experiment=fl_dp_population"])
    assert OmegaConf.to_container(exp, resolve=True) == OmegaConf.to_container(explicit, resolve=True)
    plan = lambda cfg, n: [{"steps_per_round": int(cfg.federated.local_steps)}] * n
    assert centralised_steps(exp, plan(exp, 320)) == centralised_steps(population, plan(population, 320)) == 4000
    assert exp.trainer.batch_size == population.trainer.batch_size == 10
    assert exp.federated.server_lr == population.trainer.lr  # the centralised Adam's learning rate
    assert "-sgd1-" in exp.run_name and "tau1e-08" in exp.run_name


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_server_lr_decay_scales_round_r_of_T_by_one_minus_r_minus_1_over_T(optimizer):
    """federated.lr_decay=linear on the server (Poisson cohorts): round r's step is the constant-lr step times
    1 - (r - 1) / T, for FedAvgM's and server Adam's step alike (the moments see the same updates)."""
    from privacy.federated.strategy import PoissonCohortFedAvg

    rng = np.random.default_rng(0)
    updates = [rng.normal(size=5) for _ in range(4)]
    kwargs = dict(server_lr=0.5, server_momentum=0.5) if optimizer == "sgd" else dict(server_lr=0.01, server_optimizer="adam")
    constant = PoissonCohortFedAvg(10, 0.5, reproducible_seed=0, **kwargs)
    decayed = PoissonCohortFedAvg(10, 0.5, reproducible_seed=0, lr_decay="linear", num_rounds=4, **kwargs)
    for r, m in enumerate(updates, start=1):
        np.testing.assert_allclose(decayed.server_step(m, r), (1 - (r - 1) / 4) * constant.server_step(m, r), rtol=1e-12)
    assert decayed.lr_scale(4) == 0.25 and constant.lr_scale(4) == 1.0
    with pytest.raises(ValueError, match=r"lr-decay='linear' needs the run's num-rounds"):
        PoissonCohortFedAvg(10, 0.5, lr_decay="linear")


def test_lr_decay_is_named_in_the_run_and_refused_where_nothing_implements_it():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import build_strategy
    from training.wav2vec2.plan import check_config

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        central = compose("config", overrides=["experiment=fl_dp_population", "federated=none", "dp=none", "federated.lr_decay=linear"])
        fedavg = compose("config", overrides=["experiment=fl_dp_population", "dp=none", "federated.lr_decay=linear"])
        fixed = compose("config", overrides=["experiment=fl_dp_population", "dp=none", "federated.cohort_sampling=fixed",
                                             "federated.lr_decay=linear"])
        local_dp = compose("config", overrides=["experiment=fl_dp_population", "federated=none", "dp=local", "federated.lr_decay=linear"])
    assert central.run_name == "wav2vec2_tiny-lora-ctc-lindecay-b10x5q0.25"
    assert fedavg.run_name == "wav2vec2_tiny-lora-ctc-fedavg-lindecay-c320-r10-b10x5q0.25"
    assert check_config(central) and check_config(fedavg)
    for cfg, says in ((fixed, "federated.cohort_sampling=fixed"), (local_dp, "dp=local")):
        with pytest.raises(ValueError, match=r"federated\.lr_decay=linear: decays the centralised baseline's optimiser.*" + re.escape(says)):
            check_config(cfg)
    with pytest.raises(ValueError, match=re.escape("run_config['lr-decay'] (federated.lr_decay)='cosine'")):
        resolve_run_config({"lr-decay": "cosine"})
    with pytest.raises(ValueError, match=r"lr-decay='linear' \(federated.lr_decay\): the server lr schedule is implemented for "
                                         r"cohort-sampling=poisson only"):
        build_strategy(resolve_run_config({"num-clients": 4, "lr-decay": "linear"}), 4)


def _server_adam_row_config(**federated) -> dict:
    """The config.yaml of a one-step-FedSGD server Adam row without DP, as make_tables reads it."""
    return {"model": {"name": "wav2vec2_tiny"}, "adapter": {"name": "lora", "r": 4}, "dp": {"name": "none"},
            "compression": {"name": "none"}, "trainer": {"lr": 1.0},
            "federated": {"name": "fedadam", "local_steps": 1, "cohort_sampling": "poisson", "local_optimizer": "sgd",
                          "server_beta1": 0.9, "server_beta2": 0.999, "server_tau": 1e-8, **federated}}


def test_table_keeps_lr_decay_runs_apart_and_reads_old_runs_as_constant():
    from scripts.make_tables import Run, _label

    fl = _server_adam_row_config(num_rounds=4000, num_clients=320, cohort_rate=0.003125, server_lr=0.003)
    old = Run(Path("a"), fl)  # written before federated.lr_decay existed
    constant = Run(Path("b"), {**fl, "federated": {**fl["federated"], "lr_decay": "none"}})
    decayed = Run(Path("c"), {**fl, "federated": {**fl["federated"], "lr_decay": "linear"}})
    assert old.system == constant.system != decayed.system
    assert "server lr decayed linearly" in _label(decayed) and "decayed" not in _label(constant)
    central = Run(Path("d"), {**fl, "trainer": {"lr": 3e-3}, "federated": {"name": "none", "num_rounds": 10, "local_steps": 5,
                                                                          "local_optimizer": "adam", "lr_decay": "linear"}})
    assert _label(central) == "wav2vec2_tiny, LoRA r=4 + CTC head, centralised, lr decayed linearly, 10x5 steps"


def test_iterate_average_is_the_bias_corrected_ema_of_the_global_models():
    from privacy.federated.task import IterateAverage

    models = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, -2.0])}, {"w": np.array([0.0, 4.0])}]
    average = IterateAverage(0.5)
    with pytest.raises(RuntimeError, match="before any update"):
        average.average()
    average.update(models[0])
    np.testing.assert_allclose(average.average()["w"], models[0]["w"])  # the start carries no weight
    average.update(models[1])
    average.update(models[2])
    # weights 0.25 : 0.5 : 1 for rounds 1, 2, 3 (beta^(t - i)), normalised
    expected = (0.25 * models[0]["w"] + 0.5 * models[1]["w"] + 1.0 * models[2]["w"]) / 1.75
    np.testing.assert_allclose(average.average()["w"], expected, rtol=1e-6)
    assert average.average()["w"].dtype == np.float32
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"ema \(federated.ema\)=" + re.escape(repr(bad))):
            IterateAverage(bad)


def test_server_ema_scores_and_returns_the_average_and_leaves_training_alone(corpus, public_start, tmp_path, monkeypatch):
    from privacy.federated import server_app
    from training.wav2vec2.finetune import run_wav2vec2_task

    seen: list[dict] = []
    update = server_app.IterateAverage.update
    monkeypatch.setattr(server_app.IterateAverage, "update", lambda self, state: (seen.append(dict(state)), update(self, state))[1])
    runs = {}
    for ema in (0.0, 0.5):
        out = tmp_path / f"ema{ema}"
        metrics = run_wav2vec2_task(_cfg(corpus, out, public_start, "dp=none", "federated.num_rounds=3", f"federated.ema={ema}"))
        run_dir = next(out.glob("**/federated"))
        rounds = json.loads((run_dir / "federated_rounds.json").read_text())
        model = np.load(run_dir / "global_model.npz")
        runs[ema] = (metrics, rounds, {n: model[n] for n in model.files}, run_dir)
    (plain, plain_rounds, plain_model, plain_dir), (avg, avg_rounds, avg_model, avg_dir) = runs[0.0], runs[0.5]
    assert "-ema0.5-" in str(avg_dir) and "-ema" not in str(plain_dir)
    assert avg_rounds["ema"] == 0.5 and plain_rounds["ema"] == 0.0
    # the clients trained the same models: every round's last global model scores as the plain run's
    for p, a in zip(plain_rounds["rounds"], avg_rounds["rounds"]):
        assert a["server_eval_last_model"] == p["server_eval"] and "server_eval_last_model" not in p
    # the saved (and scored) model is the bias-corrected EMA of the three global models, not the last one
    assert len(seen) == 3
    for name in avg_model:
        expected = (0.25 * seen[0][name] + 0.5 * seen[1][name] + 1.0 * seen[2][name]) / 1.75
        np.testing.assert_allclose(avg_model[name], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(seen[2][name], plain_model[name])
    assert any(not np.array_equal(avg_model[n], plain_model[n]) for n in avg_model)
    assert avg["wer"] == avg_rounds["rounds"][-1]["server_eval"]["wer"]


def test_ema_is_named_in_the_run_and_refused_where_nothing_averages():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.federated.settings import resolve_run_config
    from training.wav2vec2.plan import check_config

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        central = compose("config", overrides=["experiment=fl_dp_population", "federated=none", "dp=none", "federated.ema=0.99"])
        fedprox = compose("config", overrides=["experiment=fl_dp_population", "federated=fedprox", "federated.ema=0.9"])
        bad = compose("config", overrides=["experiment=fl_dp_population", "federated.ema=1.0"])
    assert central.run_name == "wav2vec2_tiny-lora-ctc-ema0.99-b10x5q0.25" and check_config(central)
    with pytest.raises(ValueError, match=r"federated\.ema=0\.9: averages the global models of a fedavg\|fedadam server.*federated=fedprox"):
        check_config(fedprox)
    with pytest.raises(ValueError, match=r"federated\.ema=1\.0: expected a decay in \[0, 1\)"):
        check_config(bad)
    with pytest.raises(ValueError, match=re.escape("run_config['ema'] (federated.ema)=-0.5")):
        resolve_run_config({"ema": -0.5})


def test_centralised_ema_leaves_the_model_at_the_average_of_its_steps():
    import torch
    from privacy.federated.task import train_local

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    torch.manual_seed(0)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(5)]
    models = {}
    for ema in (0.0, 0.5):
        torch.manual_seed(1)
        models[ema] = torch.nn.Linear(3, 1)
        train_local(models[ema], data, loss_fn, steps=5, lr=0.1, optimizer="sgd", ema=ema)
    # the same five SGD steps, replayed by hand: the EMA run ends at the bias-corrected average of the five iterates
    torch.manual_seed(1)
    replay = torch.nn.Linear(3, 1)
    iterates = []
    for x, y in data:
        replay.zero_grad()
        loss_fn(replay, (x, y))[0].backward()
        with torch.no_grad():
            for p in replay.parameters():
                p -= 0.1 * p.grad
        iterates.append([p.detach().clone() for p in replay.parameters()])
    weights = torch.tensor([0.5 ** (4 - i) for i in range(5)], dtype=torch.float64)
    for k, p in enumerate(models[0.5].parameters()):
        expected = sum(w * it[k].double() for w, it in zip(weights, iterates)) / weights.sum()
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    for p, last in zip(models[0.0].parameters(), iterates[-1]):
        torch.testing.assert_close(p.detach(), last)


def test_table_keeps_server_ema_runs_apart_and_reads_old_runs_as_the_last_model():
    from scripts.make_tables import Run, _label

    fl = _server_adam_row_config(num_rounds=100, num_clients=1600, cohort_rate=0.25, server_lr=0.01)
    old = Run(Path("a"), fl)  # written before federated.ema existed
    last = Run(Path("b"), {**fl, "federated": {**fl["federated"], "ema": 0.0}})
    averaged = Run(Path("c"), {**fl, "federated": {**fl["federated"], "ema": 0.9}})
    assert old.system == last.system != averaged.system
    assert "EMA of the global models (β 0.9 per round)" in _label(averaged) and "EMA" not in _label(last)


def test_the_client_plan_and_the_centralised_union_partition_the_speakers_once(corpus, public_start, tmp_path, monkeypatch):
    """A 6,400-client plan used to partition the population once per client (minutes before the first step)."""
    from privacy.federated import partition
    from privacy.federated.synthgrid_task import centralised_indices, client_indices, split_speakers
    from training.wav2vec2.plan import _eval_utterances, client_plan

    calls = []
    real = partition.partition_by_speaker
    monkeypatch.setattr(partition, "partition_by_speaker", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    cfg = _cfg(corpus, tmp_path / "runs", public_start)
    plan = client_plan(cfg)
    assert calls == [6] and len(plan) == 6
    speakers = split_speakers(cfg.data.dir, "train")
    held = _eval_utterances(cfg)
    union = centralised_indices(speakers, 6, int(cfg.seed), held)
    assert calls == [6, 6]
    clients = [client_indices(speakers, pid, 6, int(cfg.seed), held)[0] for pid in range(6)]
    assert union == sorted(i for train in clients for i in train)
    assert [p["n_train"] for p in plan] == [len(train) for train in clients]


@pytest.mark.parametrize("optimizer, momentum", [("adam", 0.9), ("adam", 0.98), ("sgd", 0.0), ("sgd", 0.9)])
def test_server_shrink_knows_the_dp_noise_variance_of_its_buffer(optimizer, momentum):
    """federated.server_shrink: the server's optimiser buffer (Adam's mu, FedAvgM's v) is a linear filter of the released
    means, so the variance of the DP noise it carries follows from sigma, C, qN and the betas alone. On pure noise
    (no client sampled, 4,000 coordinates) the tracked variance equals the closed form and the buffer's empirical one."""
    from privacy.federated.strategy import PoissonCohortFedAvg

    sigma, clip, n, q, rounds = 1.3, 0.7, 200, 0.1, 40
    options = ({"server_optimizer": "adam", "server_betas": (momentum, 0.999), "server_tau": 1e-8, "server_lr": 0.01}
               if optimizer == "adam" else {"server_optimizer": "sgd", "server_momentum": momentum})
    strategy = PoissonCohortFedAvg(n, q, noise_multiplier=sigma, clipping_norm=clip, reproducible_seed=3, server_shrink=1.0, **options)
    sc = sigma * clip / (q * n)
    assert strategy.mean_noise_std() == pytest.approx(sc)
    gen = np.random.default_rng(0)
    for _ in range(rounds):
        strategy.server_step(gen.normal(0.0, sc, 4000))
    gain = (1 - momentum) if optimizer == "adam" else 1.0
    closed = sc ** 2 * gain ** 2 * (1 - momentum ** (2 * rounds)) / (1 - momentum ** 2)
    assert strategy.buffer_noise_var == pytest.approx(closed, rel=1e-9)
    assert np.var(strategy.velocity) == pytest.approx(closed, rel=0.1)


def test_server_shrink_scales_each_coordinate_by_the_positive_part_james_stein_factor():
    """The step uses b_i max(0, 1 - kappa s2 / b_i^2): a coordinate within the noise level stays put, a strong one
    moves almost as without shrinkage; kappa = 0 (off) and sigma = 0 (nothing to shrink) leave the step unchanged."""
    from privacy.federated.strategy import PoissonCohortFedAvg

    mean = np.array([0.0, 0.05, -0.1, 0.2, 1.0])
    off = PoissonCohortFedAvg(10, 0.5, noise_multiplier=1.0, clipping_norm=0.5, server_lr=2.0)
    on = PoissonCohortFedAvg(10, 0.5, noise_multiplier=1.0, clipping_norm=0.5, server_lr=2.0, server_shrink=2.0)
    s2 = (1.0 * 0.5 / 5) ** 2  # FedAvg without momentum: the buffer is the round's mean, noise std sigma C / qN = 0.1
    expected = 2.0 * mean * np.maximum(0.0, 1 - 2.0 * s2 / np.where(mean == 0, 1.0, mean ** 2)) * (mean != 0)
    np.testing.assert_allclose(on.server_step(mean.copy()), expected)
    np.testing.assert_allclose(expected[:3], 0.0)  # |b| <= sqrt(2) x 0.1: not moved
    assert on.last_step_stats == {"shrink_zeroed": 0.6, "shrink_mean": pytest.approx((0.5 + 0.98) / 5)}  # 1 - 0.02 / 0.04, 1 - 0.02 / 1
    np.testing.assert_allclose(off.server_step(mean.copy()), 2.0 * mean)
    clip_only = PoissonCohortFedAvg(10, 0.5, noise_multiplier=0.0, clipping_norm=0.5, server_lr=2.0, server_shrink=1.0)
    np.testing.assert_allclose(clip_only.server_step(mean.copy()), 2.0 * mean)


def test_server_shrink_is_named_in_the_run_and_refused_where_there_is_no_per_coordinate_dp_noise():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import PoissonCohortFedAvg
    from training.wav2vec2.plan import check_config

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        shrunk = compose("config", overrides=["experiment=fl_population_6400", "federated.server_shrink=1"])
        plain = compose("config", overrides=["experiment=fl_population_6400"])
        no_dp = compose("config", overrides=["experiment=fl_population_6400", "dp=none", "federated.server_shrink=1"])
        projected = compose("config", overrides=["experiment=fl_population_public_subspace", "federated.server_shrink=1"])
        bad = compose("config", overrides=["experiment=fl_population_6400", "federated.server_shrink=-1"])
    assert shrunk.run_name == plain.run_name.replace("-sgd1-", "-sgd1-shrink1-") != plain.run_name
    assert "shrink" not in plain.run_name and check_config(shrunk)
    for cfg, field in ((no_dp, "dp=none"), (projected, "federated.public_subspace_dim=64")):
        with pytest.raises(ValueError, match=r"federated\.server_shrink=1\.0: shrinks the DP noise.*" + re.escape(field)):
            check_config(cfg)
    with pytest.raises(ValueError, match=r"federated\.server_shrink=-1\.0: expected a number in \[0, 10\]"):
        check_config(bad)
    with pytest.raises(ValueError, match=re.escape("run_config['server-shrink'] (federated.server_shrink)=1") + ".*got dp=none"):
        resolve_run_config({"server-shrink": 1, "strategy": "fedadam", "cohort-sampling": "poisson"})
    with pytest.raises(ValueError, match="server-shrink=1.0: .*needs central DP"):
        PoissonCohortFedAvg(8, 0.5, server_shrink=1.0)


def test_table_keeps_shrunk_server_steps_apart_and_reads_old_runs_as_unshrunk():
    from scripts.make_tables import Run, _label

    fl = _server_adam_row_config(num_rounds=100, num_clients=6400, cohort_rate=0.0625, server_lr=0.01)
    fl = {**fl, "dp": {"name": "central", "target_epsilon": 8.0, "clipping_norm": 1.0}}
    old = Run(Path("a"), fl)  # written before federated.server_shrink existed
    plain = Run(Path("b"), {**fl, "federated": {**fl["federated"], "server_shrink": 0.0}})
    shrunk = Run(Path("c"), {**fl, "federated": {**fl["federated"], "server_shrink": 1.0}})
    assert old.system == plain.system != shrunk.system
    assert "server step shrunk by its DP noise (κ 1)" in _label(shrunk) and "shrunk" not in _label(plain)


def test_a_shrunk_population_run_logs_how_much_of_the_step_it_kept(corpus, public_start, tmp_path):
    from training.wav2vec2.finetune import run_wav2vec2_task

    metrics = run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", public_start, "dp.target_epsilon=8", "federated.server_shrink=1"))
    run_dir = next((tmp_path / "runs").glob("**/federated"))
    assert "-shrink1-" in str(run_dir)
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())
    zeroed = [r["cohort"]["shrink_zeroed"] for r in rounds["rounds"]]
    assert len(zeroed) == 3 and all(0 <= z <= 1 for z in zeroed) and 0 <= metrics["rounds"] == 3
    assert rounds["shrink_zeroed_mean"] == pytest.approx(np.mean(zeroed))
    assert all(0 <= r["cohort"]["shrink_mean"] <= 1 for r in rounds["rounds"])


def test_server_adam_bc_takes_the_hand_computed_steps_with_the_noise_variance_removed():
    """federated.server_adam_bc (DP-AdamBC): the bias-corrected second moment minus sigma_c^2, floored at (rho sigma_c)^2,
    normalises the step; replayed by hand over rounds of given means, and the floored fraction is logged."""
    from privacy.federated.strategy import PoissonCohortFedAvg

    eta, b1, b2, tau, rho = 0.01, 0.9, 0.99, 1e-8, 0.3
    strategy = PoissonCohortFedAvg(50, 0.2, noise_multiplier=2.0, clipping_norm=0.5, server_optimizer="adam",
                                   server_betas=(b1, b2), server_tau=tau, server_lr=eta, server_adam_bc=rho)
    sc2 = (2.0 * 0.5 / 10) ** 2
    gen = np.random.default_rng(1)
    m, v = np.zeros(6), np.zeros(6)
    for t in range(1, 13):
        g = gen.normal(0.0, 0.1, 6) + np.array([0.0, 0.0, 0.02, -0.3, 0.5, 1.0])
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        nu_hat = np.maximum(v / (1 - b2 ** t) - sc2, rho ** 2 * sc2)
        np.testing.assert_allclose(strategy.server_step(g), eta / (1 - b1 ** t) * m / (np.sqrt(nu_hat) + tau), rtol=1e-12)
        assert strategy.last_step_stats["adam_bc_floored"] == pytest.approx(np.mean(v / (1 - b2 ** t) - sc2 <= rho ** 2 * sc2))
    # a coordinate whose mean is pure noise is normalised by the floor, one with a clear signal by its own scale
    assert 0 < strategy.last_step_stats["adam_bc_floored"] < 1


def test_server_adam_bc_moves_weak_signal_coordinates_at_the_adam_rate_the_noise_had_taken_away():
    """Under noise-dominated second moments plain server Adam is SGD at lr / sigma_c: a coordinate with a signal of half
    the noise std drifts at about half of its full-signal neighbour's rate. With the noise variance removed both drift
    at about the same rate (Adam's per-coordinate normalisation back)."""
    from privacy.federated.strategy import PoissonCohortFedAvg

    def drift(rho):
        s = PoissonCohortFedAvg(100, 0.5, noise_multiplier=1.0, clipping_norm=1.0, server_optimizer="adam", server_betas=(0.9, 0.999),
                                server_tau=1e-8, server_lr=0.01, server_adam_bc=rho)
        sc = s.mean_noise_std()
        signal = np.r_[np.full(200, 0.5 * sc), np.full(200, 3.0 * sc)]
        gen, total = np.random.default_rng(0), np.zeros(400)
        for t in range(1, 101):
            total += s.server_step(signal + gen.normal(0.0, sc, 400), t)
        return total[:200].mean(), total[200:].mean()

    weak, strong = drift(0.0)
    assert weak / strong < 0.6
    weak, strong = drift(0.3)
    assert 0.8 < weak / strong < 1.25


def test_server_adam_bc_is_named_in_the_run_and_refused_outside_server_adam_under_central_dp():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import PoissonCohortFedAvg
    from training.wav2vec2.plan import check_config

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        bc = compose("config", overrides=["experiment=fl_population_6400", "federated.server_adam_bc=0.3", "federated.server_shrink=1"])
        plain = compose("config", overrides=["experiment=fl_population_6400"])
        fedavg = compose("config", overrides=["experiment=fl_dp_population", "federated.cohort_sampling=poisson", "federated.server_adam_bc=0.3"])
        no_dp = compose("config", overrides=["experiment=fl_population_6400", "dp=none", "federated.server_adam_bc=0.3"])
    assert bc.run_name == plain.run_name.replace("-sgd1-", "-sgd1-shrink1-bc0.3-") and check_config(bc)
    for cfg, field in ((fedavg, "federated=fedavg"), (no_dp, "dp=none")):
        with pytest.raises(ValueError, match=r"federated\.server_adam_bc=0\.3: debiases the server Adam's second moment.*" + re.escape(field)):
            check_config(cfg)
    with pytest.raises(ValueError, match=re.escape("run_config['server-adam-bc'] (federated.server_adam_bc)=1.5")):
        resolve_run_config({"server-adam-bc": 1.5})
    with pytest.raises(ValueError, match="server-adam-bc=0.3: .*needs server Adam, central DP"):
        PoissonCohortFedAvg(8, 0.5, noise_multiplier=1.0, server_adam_bc=0.3)  # server SGD


def test_table_keeps_debiased_server_adam_apart():
    from scripts.make_tables import Run, _label

    fl = _server_adam_row_config(num_rounds=100, num_clients=6400, cohort_rate=0.0625, server_lr=0.01)
    fl = {**fl, "dp": {"name": "central", "target_epsilon": 8.0, "clipping_norm": 1.0}}
    assert Run(Path("a"), fl).system == Run(Path("b"), {**fl, "federated": {**fl["federated"], "server_adam_bc": 0.0}}).system
    debiased = Run(Path("c"), {**fl, "federated": {**fl["federated"], "server_adam_bc": 0.3}})
    assert debiased.system != Run(Path("a"), fl).system
    assert "second moment debiased for the DP noise (floor 0.3 x its std)" in _label(debiased)


def test_adam_bc_experiment_is_the_6400_client_experiment_with_the_debiased_server_adam():
    import training.config  # noqa: F401  (resolvers, schemas)

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        named = compose("config", overrides=["experiment=fl_population_6400_adam_bc"])
        spelled = compose("config", overrides=["experiment=fl_population_6400", "federated.server_adam_bc=0.3", "federated.server_lr=0.005"])
    assert named == spelled and named.federated.num_clients == 6400 and named.dp.name == "central"
    assert named.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.005-b0.9-0.999-tau1e-08-sgd1-bc0.3-c6400-r100-cdp-eps8.0-b100x1q0.0625"


def test_cohort1600_experiment_is_the_adam_bc_experiment_at_four_times_the_cohort():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.dp import noise_multiplier_for_budget

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        named = compose("config", overrides=["experiment=fl_population_6400_adam_bc_cohort1600"])
        spelled = compose("config", overrides=["experiment=fl_population_6400_adam_bc", "federated.cohort_rate=0.25", "federated.server_lr=0.01"])
    assert named == spelled and named.federated.cohort_rate * named.federated.num_clients == 1600
    assert named.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-b0.9-0.999-tau1e-08-sgd1-bc0.3-c6400-r100-cdp-eps8.0-b100x1q0.25"
    # the noise on the released mean, sigma C / (q N), is 1.76x lower than at q = 0.0625 for the same epsilon
    low = noise_multiplier_for_budget(8.0, 1e-5, 0.0625, 100, "rdp") / 400
    high = noise_multiplier_for_budget(8.0, 1e-5, 0.25, 100, "rdp") / 1600
    assert 1.7 < low / high < 1.8



def test_12800_client_experiment_is_the_cohort1600_experiment_on_twice_the_population_at_half_the_rate():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.dp import noise_multiplier_for_budget

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        named = compose("config", overrides=["experiment=fl_population_12800_adam_bc"])
        spelled = compose("config", overrides=["experiment=fl_population_6400_adam_bc_cohort1600", "data=synthgrid_population_12800_test200",
                                               "federated.num_clients=12800", "federated.cohort_rate=0.125"])
        small = compose("config", overrides=["experiment=fl_population_6400_adam_bc_cohort1600", "data=synthgrid_population_6400_test200"])
    assert named == spelled
    assert named.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-b0.9-0.999-tau1e-08-sgd1-bc0.3-c12800-r100-cdp-eps8.0-b100x1q0.125"
    # the same expected cohort (so the same client steps and run time) and everything but the population and q as there
    assert named.federated.cohort_rate * named.federated.num_clients == small.federated.cohort_rate * small.federated.num_clients == 1600
    for key in ("server_lr", "server_adam_bc", "num_rounds", "local_steps"):
        assert named.federated[key] == small.federated[key], key
    assert named.dp == small.dp
    # one client per training speaker; the blocks before the extra speakers (public, first test speakers) are 6,400's
    data, small_data = named.data, small.data
    assert data.extra_train_speakers + data.splits.train == named.federated.num_clients
    assert data.num_speakers - data.extra_train_speakers - data.extra_test_speakers == (
        small_data.num_speakers - small_data.extra_train_speakers - small_data.extra_test_speakers)
    assert data.extra_test_speakers == small_data.extra_test_speakers == 192
    # the noise on the released mean, sigma C / (q N), is 1.63x lower than the 6,400-client experiment's
    ratio = (noise_multiplier_for_budget(8.0, 1e-5, 0.25, 100, "rdp") / 1600) / (noise_multiplier_for_budget(8.0, 1e-5, 0.125, 100, "rdp") / 1600)
    assert 1.6 < ratio < 1.7



def test_25600_client_experiment_is_the_12800_client_experiment_on_twice_the_users_with_the_same_test_set():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.dp import noise_multiplier_for_budget
    from scripts.rescore import run_splits
    from training.wav2vec2.plan import train_speaker_count

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        overrides = ["paths.data_dir=/nonexistent"]  # the plan from the configuration alone, not a prepared corpus
        named = compose("config", overrides=["experiment=fl_population_25600_adam_bc", *overrides])
        spelled = compose("config", overrides=["experiment=fl_population_12800_adam_bc", "data=synthgrid_population_25600_test200",
                                               "federated.num_clients=25600", "federated.cohort_rate=0.0625",
                                               "federated.num_rounds=400", "federated.server_eval_every=20", *overrides])
        small = compose("config", overrides=["experiment=fl_population_12800_adam_bc", *overrides])
    assert named == spelled
    assert named.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-b0.9-0.999-tau1e-08-sgd1-bc0.3-c25600-r400-cdp-eps8.0-b400x1q0.0625"
    assert named.federated.cohort_rate * named.federated.num_clients == small.federated.cohort_rate * small.federated.num_clients == 1600
    assert train_speaker_count(named) == named.federated.num_clients == 25600
    # the 12,800 users first, then 12,800 more; the same public and test speakers (so the same test utterances)
    big, little = run_splits(named.data), run_splits(small.data)
    assert big["train"][: len(little["train"])] == little["train"] and len(big["train"]) == 2 * len(little["train"])
    for split in ("public", "test", "valid", "attacker_train", "attacker_trials"):
        assert big[split] == little[split], split
    # 400 rounds at q = 0.0625 put no more noise per step on the released mean, sigma C / (q N), than 100 at q = 0.125
    per_step = noise_multiplier_for_budget(8.0, 1e-5, 0.0625, 400, "rdp") / 1600
    assert per_step <= noise_multiplier_for_budget(8.0, 1e-5, 0.125, 100, "rdp") / 1600


# --------------------------------------------------------------------------- PRV accounting of Poisson central DP
@pytest.mark.parametrize("q,rounds,target", [(0.0625, 100, 8.0), (0.25, 100, 1.0)])
def test_prv_calibrated_central_dp_spends_its_budget_by_an_independent_pld_accountant_with_less_noise(q, rounds, target):
    from flwr.app import ConfigRecord

    from privacy.dp import independent_epsilon
    from privacy.federated.strategy import _poisson_strategy
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.task import state_to_arrays

    def strategy(accountant):
        cfg = resolve_run_config({"dp": "central", "cohort-sampling": "poisson", "strategy": "fedadam", "cohort-rate": q,
                                  "num-rounds": rounds, "target-epsilon": target, "target-delta": 1e-5, "num-clients": 6400,
                                  "dp-accountant": accountant})
        return _poisson_strategy(cfg, 6400)[1]

    prv, rdp = strategy("prv"), strategy("rdp")
    assert prv.accountant == "prv" and rdp.accountant == "rdp"
    assert 0.9 * rdp.noise_multiplier < prv.noise_multiplier < 0.97 * rdp.noise_multiplier  # ~6 % less noise on these plans
    for r in range(1, rounds + 1):
        prv.configure_train(r, state_to_arrays({"w": np.zeros(2, np.float32)}), ConfigRecord(), _Grid(6400))
    eps = prv.epsilon(1e-5)
    assert 0.95 * target < eps <= target * 1.001
    # Google's dp_accounting PLD accountant agrees: the smaller sigma does spend only the budget...
    independent = independent_epsilon(prv.noise_multiplier, q, rounds, 1e-5, "pld")
    assert abs(independent - eps) / eps < 0.03
    # ... and RDP, looser, would have called the same sigma over budget (what the PRV calibration gains)
    assert independent_epsilon(prv.noise_multiplier, q, rounds, 1e-5, "rdp") > target * 1.03


def test_prv_accountant_is_named_in_the_run_and_refused_for_fixed_cohorts():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import PoissonCohortFedAvg
    from scripts.make_tables import Run, _label

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        prv = compose("config", overrides=["experiment=fl_population_6400", "dp.accountant=prv"])
        rdp = compose("config", overrides=["experiment=fl_population_6400"])
        local = compose("config", overrides=["experiment=fl_dp_population", "dp=local", "dp.accountant=prv"])
    assert prv.run_name == rdp.run_name.replace("-cdp-eps8.0-", "-cdp-eps8.0-prv-") and prv.run_name != rdp.run_name
    assert "-ldp-eps" in local.run_name and "-prv" in local.run_name  # a local-DP run calibrated by PRV: its own name too
    with pytest.raises(ValueError, match=r"dp-accountant'\]='prv' with dp=central and cohort-sampling='fixed'.*use rdp, or cohort-sampling=poisson"):
        resolve_run_config({"dp": "central", "dp-accountant": "prv"})
    assert resolve_run_config({"dp": "central", "cohort-sampling": "poisson", "strategy": "fedadam", "dp-accountant": "prv"})["dp-accountant"] == "prv"
    with pytest.raises(ValueError, match="accountant='pld': expected rdp | prv"):
        PoissonCohortFedAvg(8, 0.5, noise_multiplier=1.0, accountant="pld")
    # the table: a PRV row is its own system, labelled; an RDP row and an older run without the field are one
    fl = _server_adam_row_config(num_rounds=100, num_clients=6400, cohort_rate=0.0625, server_lr=0.01)
    fl = {**fl, "dp": {"name": "central", "target_epsilon": 8.0, "clipping_norm": 1.0}}
    with_rdp = Run(Path("b"), {**fl, "dp": {**fl["dp"], "accountant": "rdp"}})
    with_prv = Run(Path("c"), {**fl, "dp": {**fl["dp"], "accountant": "prv"}})
    assert Run(Path("a"), fl).system == with_rdp.system != with_prv.system
    assert "central DP ε=8.0 (client-level), PRV accountant" in _label(with_prv) and "PRV" not in _label(with_rdp)


def test_a_prv_calibrated_population_run_is_cross_checked_with_dp_accountings_pld(corpus, public_start, tmp_path):
    from privacy.dp import noise_multiplier_for_budget
    from training.wav2vec2.finetune import run_wav2vec2_task

    metrics = run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", public_start, "dp.target_epsilon=8", "dp.accountant=prv"))
    assert metrics["noise_multiplier"] == pytest.approx(noise_multiplier_for_budget(8.0, 1e-3, 0.5, 3, "prv"))
    assert metrics["noise_multiplier"] < noise_multiplier_for_budget(8.0, 1e-3, 0.5, 3, "rdp")
    assert 0 < metrics["epsilon/max"] <= 8.0 * 1.001 and "epsilon/independent_rdp" not in metrics
    assert metrics["epsilon/independent_rel_diff"] < 0.03 and metrics["epsilon/independent_pld"] > 0
    assert "-prv" in next((tmp_path / "runs").glob("**/federated")).parent.parent.name


def test_arrays_decode_as_flower_decodes_them_and_parse_each_header_once(monkeypatch):
    """arrays_to_state parses a .npy header once and then copies the bytes after it: the arrays equal Array.numpy()'s
    (dtype, shape, memory order, values, writeable) for every kind an update or a state holds."""
    from flwr.app import Array, ArrayRecord

    from privacy.federated import task
    from privacy.federated.task import arrays_to_state

    rng = np.random.default_rng(0)
    arrays = {
        "lora_A": rng.standard_normal((4, 128)).astype(np.float32), "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.int8), "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
        "big_endian": np.arange(5, dtype=">i4"), "bools": np.array([True, False]), "half": rng.random(6).astype(np.float16),
        "packed": rng.integers(0, 255, 1000).astype(np.uint8),
    }
    record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    task._NPY_HEADERS.clear()
    for attempt in range(2):
        decoded = arrays_to_state(record)
        for name, value in arrays.items():
            flower = record[name].numpy()
            got = decoded[name]
            assert got.dtype == flower.dtype and got.shape == flower.shape, name
            assert got.flags.f_contiguous == flower.flags.f_contiguous and got.flags.writeable, name
            np.testing.assert_array_equal(got, flower)
        assert len(task._NPY_HEADERS) == len(arrays)  # each distinct header parsed once, on the first pass
    # the cache is bounded: past its size, headers are parsed every time (a client cannot grow the server's memory)
    monkeypatch.setattr(task, "_NPY_HEADERS_KEPT", len(arrays))
    odd = ArrayRecord({"odd": Array(np.zeros((7, 3), np.float32))})
    np.testing.assert_array_equal(arrays_to_state(odd)["odd"], np.zeros((7, 3), np.float32))
    assert len(task._NPY_HEADERS) == len(arrays)
    # an array whose bytes do not match its header goes through np.load, which says what is wrong
    broken = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=record["lora_A"].data[:-4])
    with pytest.raises(ValueError):
        arrays_to_state(ArrayRecord({"w": broken}))


def test_400_round_experiment_spends_the_12800_client_budget_on_four_times_the_server_steps():
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.dp import noise_multiplier_for_budget

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        overrides = ["paths.data_dir=/nonexistent"]  # the plan from the configuration alone, not a prepared corpus
        named = compose("config", overrides=["experiment=fl_population_12800_adam_bc_r400", *overrides])
        spelled = compose("config", overrides=["experiment=fl_population_12800_adam_bc", "federated.cohort_rate=0.03125",
                                               "federated.num_rounds=400", "federated.server_eval_every=40", *overrides])
        base = compose("config", overrides=["experiment=fl_population_12800_adam_bc", *overrides])
    assert named == spelled  # what session 20's runs were started with
    assert named.run_name == "wav2vec2_tiny-lora-ctc-fedadam-slr0.01-b0.9-0.999-tau1e-08-sgd1-bc0.3-c12800-r400-cdp-eps8.0-b400x1q0.03125"
    fed, small = named.federated, base.federated
    assert fed.num_rounds * fed.cohort_rate * fed.num_clients == small.num_rounds * small.cohort_rate * small.num_clients == 160_000
    assert fed.num_rounds == 4 * small.num_rounds
    for key in ("server_lr", "server_adam_bc", "local_steps", "num_clients"):
        assert fed[key] == small[key], key
    assert named.dp == base.dp and named.data == base.data
    # the price: 2.8x the noise per coordinate on each released mean (sigma C / (q N)), as at epsilon ~2 of 100 rounds
    noise = noise_multiplier_for_budget(8.0, 1e-5, 0.03125, 400, "rdp") / 400
    noise_100 = noise_multiplier_for_budget(8.0, 1e-5, 0.125, 100, "rdp") / 1600
    assert 2.7 < noise / noise_100 < 2.9
    assert noise_multiplier_for_budget(3.0, 1e-5, 0.125, 100, "rdp") / 1600 < noise < noise_multiplier_for_budget(1.0, 1e-5, 0.125, 100, "rdp") / 1600
