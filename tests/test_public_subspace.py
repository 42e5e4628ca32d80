"""Issue 19: client updates projected onto directions of PUBLIC gradients before clipping and noise
(privacy/federated/public_subspace.py, PoissonCohortFedAvg(subspace=...))."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from hydra import compose, initialize_config_dir

from tests.test_fl_population import _cfg, _Grid, _reply, corpus, public_start  # noqa: F401  (fixtures)
from training.config import PROJECT_ROOT


def _round(strategy, updates, server_round=1):
    """One aggregation of `updates` (vectors of 8 = w (6) + b (2)) from a zero model; returns (step, metrics)."""
    from privacy.federated.task import arrays_to_state, state_to_arrays

    current = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}
    strategy.configure_train(server_round, state_to_arrays(current), ConfigRecord(), _Grid(strategy.population))
    replies = [_reply({"w": u[:6].astype(np.float32), "b": u[6:].astype(np.float32)}) for u in updates]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    new = arrays_to_state(arrays)
    return np.r_[new["w"], new["b"]].astype(np.float64), metrics


def test_gradient_basis_is_the_orthonormal_top_singular_directions():
    from privacy.federated.public_subspace import gradient_basis

    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(40, 3)))[0].T  # 3 orthonormal directions in R^40
    gradients = rng.normal(size=(25, 3)) * [10.0, 5.0, 2.0] @ directions + 0.01 * rng.normal(size=(25, 40))
    basis = gradient_basis(gradients, 3)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-12)
    # it spans the gradients' directions: projecting them onto the basis loses almost nothing
    np.testing.assert_allclose(basis.T @ (basis @ directions.T), directions.T, atol=1e-2)
    np.testing.assert_array_equal(gradient_basis(gradients, 3), basis)  # a function of the gradients (signs fixed)
    with pytest.raises(ValueError, match=re.escape("public-subspace-dim=26: needs 1 <= k <= min(public gradients, parameters) = min(25, 40)")):
        gradient_basis(gradients, 26)


@pytest.mark.parametrize("private", [False, True])
def test_the_full_basis_changes_nothing(private):
    """k = d with the identity basis is the unprojected aggregation, noise draws included (reproducible seed)."""
    from privacy.federated.strategy import PoissonCohortFedAvg

    rng = np.random.default_rng(1)
    updates = [rng.normal(size=8) for _ in range(3)]
    kwargs = dict(noise_multiplier=0.7, clipping_norm=0.5) if private else {}
    plain, _ = _round(PoissonCohortFedAvg(12, 0.25, reproducible_seed=5, **kwargs), updates)
    full, metrics = _round(PoissonCohortFedAvg(12, 0.25, reproducible_seed=5, subspace=lambda state, r: np.eye(8), **kwargs), updates)
    np.testing.assert_allclose(full, plain, rtol=1e-6, atol=1e-7)
    assert metrics["subspace_dim"] == 8 and metrics["subspace_kept"] == pytest.approx(1.0)


def test_central_dp_clips_and_noises_the_coefficients_and_steps_inside_the_subspace():
    from privacy.federated.public_subspace import gradient_basis
    from privacy.federated.strategy import PoissonCohortFedAvg

    rng = np.random.default_rng(2)
    basis = gradient_basis(rng.normal(size=(5, 8)), 2)
    n, q, clip, sigma = 40, 0.25, 0.5, 3.0
    updates = [np.full(8, 100.0), basis.T @ [0.1, 0.0], rng.normal(size=8)]
    strategy = PoissonCohortFedAvg(n, q, noise_multiplier=sigma, clipping_norm=clip, subspace=lambda state, r: basis)
    step, metrics = _round(strategy, updates)
    # the step lies in the public subspace: nothing outside it, noise included, reaches the model
    np.testing.assert_allclose(step - basis.T @ (basis @ step), 0.0, atol=1e-6)
    # the coefficients are clipped to C: the first update's projection is far beyond it, the second inside
    coefficients = [basis @ u for u in updates]
    assert metrics["clipped_fraction"] == pytest.approx(np.mean([np.linalg.norm(c) > clip for c in coefficients]))
    # the noise has k = 2 coordinates of std sigma C: its norm / qN is about sigma C sqrt(2) / qN, not sqrt(8)
    assert metrics["noise_norm"] < sigma * clip * 4 / (q * n)
    assert metrics["subspace_kept"] == pytest.approx(np.mean([np.dot(c, c) / np.dot(u, u) for c, u in zip(coefficients, updates)]))
    # the accounting is that of the same mechanism without the projection
    plain = PoissonCohortFedAvg(n, q, noise_multiplier=sigma, clipping_norm=clip)
    _round(plain, updates)
    assert strategy.epsilon(1e-5) == plain.epsilon(1e-5) > 0


def test_noise_norm_scales_with_the_subspace_dimension_not_the_model():
    from privacy.federated.strategy import PoissonCohortFedAvg

    n, q, clip, sigma = 1000, 1.0, 1.0, 1.0
    basis = np.eye(8)[:2]
    norms = {}
    for name, subspace in (("full", None), ("k=2", lambda state, r: basis)):
        strategy = PoissonCohortFedAvg(n, q, noise_multiplier=sigma, clipping_norm=clip, subspace=subspace)
        # E ||noise||^2 = (number of noised coordinates) sigma^2 C^2
        norms[name] = np.mean([(_round(strategy, [], r)[1]["noise_norm"] * q * n) ** 2 for r in range(1, 401)])
    assert norms["full"] == pytest.approx(8, rel=0.1) and norms["k=2"] == pytest.approx(2, rel=0.15)


def test_public_gradient_subspace_uses_the_global_state_and_refreshes_on_schedule():
    from privacy.federated.public_subspace import PublicGradientSubspace
    from privacy.federated.task import federated_state

    torch.manual_seed(0)

    def build_model():
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        model[0].weight.requires_grad_(False)  # frozen: not in the state, never in the gradients
        return model

    xs = [torch.randn(4, 3) for _ in range(5)]
    batches = [(x, x.sum(1, keepdim=True)) for x in xs]

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), len(x)

    template = build_model()
    state = {k: v + 0.5 for k, v in federated_state(template).items()}
    subspace = PublicGradientSubspace(lambda: __import__("copy").deepcopy(template), batches, loss_fn, dim=2, refresh_every=3)
    gradients = subspace.public_gradients(state)
    assert gradients.shape == (5, 2 + 2 + 1)  # bias of layer 0, weight and bias of layer 1
    # by hand: the same model with the state loaded
    model = __import__("copy").deepcopy(template)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(torch.as_tensor(state[name]))
    x, y = batches[0]
    expected = torch.autograd.grad(((model(x) - y) ** 2).mean(), [dict(model.named_parameters())[k] for k in state])
    np.testing.assert_allclose(gradients[0], np.concatenate([g.numpy().ravel() for g in expected]), rtol=1e-5, atol=1e-7)
    first = subspace(state, 1)
    moved = {k: v + 1.0 for k, v in state.items()}
    assert subspace(moved, 2) is first and subspace(moved, 3) is first and subspace.computed_at == 1
    assert subspace(moved, 4) is not first and subspace.computed_at == 4  # round 1 + 3
    fourth = subspace.basis
    assert subspace(state, 8) is not fourth and subspace.computed_at == 8  # rounds 5-7 did not ask (empty cohorts)
    with pytest.raises(ValueError, match=r"public-subspace-dim=6: needs 1 <= k <= the 5 public gradients"):
        PublicGradientSubspace(build_model, batches, loss_fn, dim=6)
    with pytest.raises(ValueError, match=r"public-subspace-refresh=0: expected an integer >= 1"):
        PublicGradientSubspace(build_model, batches, loss_fn, dim=2, refresh_every=0)


def test_public_subspace_is_named_in_the_run_checked_at_start_up_and_refused_where_not_implemented(tmp_path):
    import training.config  # noqa: F401  (resolvers, schemas)
    from privacy.dp import DPPlanError
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.strategy import build_strategy
    from tests.test_fl_synthgrid import _write_corpus
    from training.wav2vec2.plan import check_config, check_plan

    corpus = _write_corpus(tmp_path / "corpus")  # its public split: 2 speakers x 2 utterances
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        base = ["experiment=fl_population_server_adam", f"data.dir={corpus}", "federated.num_clients=6", "dp.target_delta=1e-3"]
        on = compose("config", overrides=base + ["federated.public_subspace_dim=2", "trainer.batch_size=2"])
        every5 = compose("config", overrides=base + ["federated.public_subspace_dim=2", "federated.public_subspace_refresh=5"])
        off = compose("config", overrides=base)
        too_big = compose("config", overrides=base + ["federated.public_subspace_dim=3", "trainer.batch_size=2"])
        central = compose("config", overrides=base + ["federated=none", "dp=none", "federated.public_subspace_dim=2"])
    assert "-pub2-" in on.run_name and "-pub2r5-" in every5.run_name and "-pub" not in off.run_name
    assert check_config(on)["public-subspace-dim"] == 2
    with pytest.raises(DPPlanError, match=re.escape("federated.public_subspace_dim=3: the 'public' split of") + r".*4 utterances = 2 public "
                       r"gradients of trainer.batch_size=2; k must be <= 2"):
        check_plan(too_big)
    with pytest.raises(ValueError, match=r"federated.public_subspace_dim=2: projects the client updates of Poisson cohorts"):
        check_config(central)
    with pytest.raises(ValueError, match=re.escape("run_config['public-subspace-dim'] (federated.public_subspace_dim)=-1")):
        resolve_run_config({"public-subspace-dim": -1})
    with pytest.raises(ValueError, match=r"public-subspace-dim=4 \(federated.public_subspace_dim\) with cohort-sampling='fixed'"):
        build_strategy(resolve_run_config({"num-clients": 4, "public-subspace-dim": 4}), 4)


def test_population_run_with_the_public_subspace_under_user_level_dp(corpus, public_start, tmp_path):
    import json

    from training.wav2vec2.finetune import run_wav2vec2_task

    # the tiny corpus's public split has 4 utterances: 2 public gradients of 2 utterances, k = 2
    metrics = run_wav2vec2_task(_cfg(corpus, tmp_path / "runs", public_start, "dp.target_epsilon=8", "trainer.batch_size=2",
                                     "federated.public_subspace_dim=2"))
    assert 0 < metrics["epsilon/max"] <= 8.0 and metrics["epsilon/independent_rel_diff"] < 0.03
    run_dir = next((tmp_path / "runs").glob("**/federated"))
    assert "-pub2-" in str(run_dir)
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())["rounds"]
    assert all(r["cohort"]["subspace_dim"] == 2 for r in rounds)
    assert all(0 <= r["cohort"]["subspace_kept"] <= 1 + 1e-9 for r in rounds if r["cohort"]["accepted"] > 0)


def test_table_keeps_projected_and_one_utterance_client_runs_apart_and_reads_old_runs_as_unprojected():
    from pathlib import Path

    from scripts.make_tables import Run, _label

    fl = {"model": {"name": "wav2vec2_tiny"}, "adapter": {"name": "lora", "r": 4}, "dp": {"name": "none"},
          "compression": {"name": "none"}, "trainer": {"lr": 1.0, "batch_size": 10},
          "federated": {"name": "fedadam", "num_rounds": 100, "local_steps": 1, "num_clients": 320, "cohort_sampling": "poisson",
                        "cohort_rate": 0.25, "local_optimizer": "sgd", "server_lr": 0.01, "server_beta1": 0.9,
                        "server_beta2": 0.999, "server_tau": 1e-8}}
    old = Run(Path("a"), fl)  # written before federated.public_subspace_dim existed
    off = Run(Path("b"), {**fl, "federated": {**fl["federated"], "public_subspace_dim": 0, "public_subspace_refresh": 5}})
    on = Run(Path("c"), {**fl, "federated": {**fl["federated"], "public_subspace_dim": 64, "public_subspace_refresh": 1}})
    every5 = Run(Path("d"), {**fl, "federated": {**fl["federated"], "public_subspace_dim": 64, "public_subspace_refresh": 5}})
    one_utterance = Run(Path("e"), {**fl, "trainer": {"lr": 1.0, "batch_size": 1}})
    assert old.system == off.system != on.system != every5.system and one_utterance.system != old.system
    assert "updates projected on 64 public-gradient directions, " in _label(on) and "public" not in _label(off)
    assert "(basis every 5 rounds)" in _label(every5)
    assert "client batches of 1 utterance, " in _label(one_utterance) and "client batches" not in _label(old)


def test_public_subspace_experiment_is_the_server_adam_dp_federation_with_the_projection():
    import training.config  # noqa: F401  (resolvers, schemas)
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        exp = compose("config", overrides=["experiment=fl_population_public_subspace"])
        explicit = compose("config", overrides=[
            "experiment=fl_population_server_adam", "dp=central", "dp.target_epsilon=8", "federated.cohort_rate=0.25",
            "federated.num_rounds=100", "federated.server_lr=0.01", "federated.public_subspace_dim=64",
            "federated.public_subspace_refresh=5", "federated.server_eval_every=10"])
    assert OmegaConf.to_container(exp, resolve=True) == OmegaConf.to_container(explicit, resolve=True)
    assert exp.dp.clipping_norm == 1.0 and exp.trainer.batch_size == 10  # a client's whole data, clipped to C = 1
    assert "-pub64r5-" in exp.run_name and "cdp-eps8.0" in exp.run_name


def test_epsilon_wer_plot_keeps_projected_dp_runs_and_one_utterance_clients_apart():
    from pathlib import Path

    from scripts.make_tables import Run, _epsilon_wer_series

    def run(name, eps, wer, dim=0, batch=10, dp="central", rate=0.25):
        fed = {"name": "fedadam", "num_rounds": 100, "local_steps": 1, "num_clients": 320, "cohort_sampling": "poisson",
               "cohort_rate": rate, "public_subspace_dim": dim}
        config = {"model": {"name": "wav2vec2_tiny"}, "adapter": {"name": "lora"}, "trainer": {"batch_size": batch},
                  "dp": {"name": dp, "target_epsilon": eps}, "compression": {"name": "none"}, "federated": fed}
        metrics = {"federated:wer": wer, **({"federated:epsilon/max": eps} if dp != "none" else {})}
        return Run(Path(name), config, metrics)

    with_dp, no_dp = _epsilon_wer_series([run("a", 8.0, 66.0), run("b", 8.0, 65.0, dim=64),
                                           run("c", None, 58.0, batch=1, dp="none", rate=0.03125)])
    assert len(with_dp) == 2  # one series per projection, not their average
    assert any("64 public directions" in key[3] for key in with_dp)
    assert any("1-utterance clients" in name for name in no_dp)


def test_epsilon_wer_plot_keeps_server_adam_settings_apart():
    from pathlib import Path

    from scripts.make_tables import Run, _epsilon_wer_series

    def run(name, eps, wer, beta1=0.9, lr=0.01):
        fed = {"name": "fedadam", "num_rounds": 100, "local_steps": 1, "num_clients": 6400, "cohort_sampling": "poisson",
               "cohort_rate": 0.0625, "server_lr": lr, "server_beta1": beta1}
        config = {"model": {"name": "wav2vec2_tiny"}, "adapter": {"name": "lora"}, "trainer": {"batch_size": 10},
                  "dp": {"name": "central", "target_epsilon": eps}, "compression": {"name": "none"}, "federated": fed}
        return Run(Path(name), config, {"federated:wer": wer, "federated:epsilon/max": eps})

    with_dp, _ = _epsilon_wer_series([run("a", 8.0, 0.64), run("b", 8.0, 0.62, beta1=0.98, lr=0.02), run("c", 1.0, 0.65)])
    assert sorted(key[3] for key in with_dp) == ["fedadam, server lr 0.01, β1 0.9", "fedadam, server lr 0.02, β1 0.98"]
    assert sorted(with_dp[(False, "central", "none", "fedadam, server lr 0.01, β1 0.9")]) == [1.0, 8.0]
    alone, _ = _epsilon_wer_series([run("a", 8.0, 0.64), run("c", 1.0, 0.65)])
    assert [key[3] for key in alone] == ["fedadam"]  # one setting: nothing to tell apart


def test_population_1600_experiment_is_the_server_adam_dp_federation_over_1600_clients():
    import training.config  # noqa: F401  (resolvers, schemas)
    from omegaconf import OmegaConf

    from training.wav2vec2.plan import train_speaker_count

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        exp = compose("config", overrides=["experiment=fl_population_1600", "paths.data_dir=/nonexistent"])
        explicit = compose("config", overrides=[
            "experiment=fl_population_server_adam", "data=synthgrid_population_1600", "federated.num_clients=1600",
            "dp=central", "dp.target_epsilon=8", "federated.cohort_rate=0.25", "federated.num_rounds=100",
            "federated.server_lr=0.01", "federated.server_eval_every=10", "paths.data_dir=/nonexistent"])
    assert OmegaConf.to_container(exp, resolve=True) == OmegaConf.to_container(explicit, resolve=True)
    assert exp.data.extra_train_speakers == 1280 and exp.data.train_utterances_per_speaker == 2
    assert train_speaker_count(exp) == 1600  # from the data config alone: the corpus is not prepared
    assert "-c1600-" in exp.run_name and "cdp-eps8.0" in exp.run_name


def test_population_6400_experiment_is_the_1600_schedule_over_6400_clients_at_a_quarter_of_the_rate():
    import training.config  # noqa: F401  (resolvers, schemas)
    from omegaconf import OmegaConf

    from privacy.dp import noise_multiplier_for_budget
    from training.wav2vec2.plan import train_speaker_count

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        exp = compose("config", overrides=["experiment=fl_population_6400", "paths.data_dir=/nonexistent"])
        explicit = compose("config", overrides=[
            "experiment=fl_population_1600", "data=synthgrid_population_6400", "federated.num_clients=6400",
            "federated.cohort_rate=0.0625", "paths.data_dir=/nonexistent"])
    assert OmegaConf.to_container(exp, resolve=True) == OmegaConf.to_container(explicit, resolve=True)
    assert exp.data.extra_train_speakers == 6080 and exp.data.train_utterances_per_speaker == 2
    assert train_speaker_count(exp) == 6400  # from the data config alone: the corpus is not prepared
    assert exp.federated.cohort_rate * exp.federated.num_clients == 400  # the expected cohort of fl_population_1600
    assert "-c6400-" in exp.run_name and "q0.0625" in exp.run_name and "cdp-eps8.0" in exp.run_name
    # the experiment file's numbers: sigma 0.80 at q = 0.0625 against 1.82 at q = 0.25, 100 rounds, epsilon 8
    sigma = noise_multiplier_for_budget(8.0, 1e-5, 0.0625, 100)
    assert 0.79 < sigma < 0.82 and 1.81 < noise_multiplier_for_budget(8.0, 1e-5, 0.25, 100) < 1.84
