"""DP-SGD (Opacus), privacy accounting cross-checks (local and central DP), start-up validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import (
    ClientPrivacyAccountant,
    DPPlanError,
    central_epsilon,
    dp_validation_errors,
    independent_epsilon,
    make_private_local,
    noise_multiplier_for_budget,
    opacus_epsilon,
    validate_dp_plan,
)

DELTA = 1e-5


def _linear_task(n=64, dim=6, classes=3, batch_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, classes))
    return model, DataLoader(data, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))


def test_opacus_epsilon_after_real_steps_matches_dp_accounting():
    model, loader = _linear_task()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 24
    ledger = ClientPrivacyAccountant()
    model, optimizer, loader, sigma = make_private_local(
        model, optimizer, loader, target_epsilon=4.0, target_delta=DELTA, epochs_or_steps=steps,
        max_grad_norm=1.0, client_accountant=ledger,
    )
    done = 0
    while done < steps:
        for x, y in loader:
            if done == steps:
                break
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
    q = 1 / 8
    engine_eps = optimizer.privacy_engine.accountant.get_epsilon(delta=DELTA)
    reference = independent_epsilon(sigma, q, steps, DELTA, method="rdp")
    assert optimizer.privacy_engine.accountant.history == [(sigma, q, steps)]
    assert engine_eps == pytest.approx(reference, rel=0.02)
    assert engine_eps <= 4.0 + 0.01  # sigma was calibrated so the whole plan ends at the target
    assert ledger.history == [(sigma, q, steps)]
    assert ledger.epsilon(DELTA) == pytest.approx(engine_eps, rel=1e-9)
    # the numerical accountants agree too (PRV in Opacus vs PLD in dp_accounting)
    assert opacus_epsilon(sigma, q, steps, DELTA, "prv") == pytest.approx(independent_epsilon(sigma, q, steps, DELTA, "pld"), rel=0.05)


def test_client_accountant_composes_over_rounds_through_json_state():
    sigma, q, per_round = 1.1, 0.05, 40
    state = None
    single_round_eps = None
    for round_index in range(3):
        ledger = ClientPrivacyAccountant.from_state(json.loads(json.dumps(state)) if state else None)
        for _ in range(per_round):
            ledger.record(sigma, q)
        if round_index == 0:
            single_round_eps = ledger.epsilon(DELTA)
        state = ledger.to_state()
    final = ClientPrivacyAccountant.from_state(state)
    assert final.steps == 3 * per_round
    whole_plan = ClientPrivacyAccountant()
    whole_plan.record(sigma, q, 3 * per_round)
    assert final.epsilon(DELTA) == pytest.approx(whole_plan.epsilon(DELTA), rel=1e-12)
    assert final.epsilon(DELTA) > single_round_eps * 1.2
    assert final.epsilon(DELTA) == pytest.approx(independent_epsilon(sigma, q, 3 * per_round, DELTA), rel=0.02)
    assert final.budget_exhausted(final.epsilon(DELTA) - 1e-6, DELTA)
    assert not final.budget_exhausted(final.epsilon(DELTA) + 1.0, DELTA)
    # state is a flat dict of number lists (Flower ConfigRecord-compatible)
    assert set(state) == {"mechanism", "noise_multiplier", "sample_rate", "steps"}
    with pytest.raises(ValueError, match="different lengths"):
        ClientPrivacyAccountant.from_state({"noise_multiplier": [1.0], "sample_rate": [], "steps": [1]})


def test_per_sample_clipping_is_exact_and_bounded():
    from opacus import PrivacyEngine

    model, loader = _linear_task(n=16, batch_size=16)
    x, y = next(iter(loader))
    # reference per-sample gradients without Opacus (loss of one sample; Opacus scales "mean" back per sample)
    reference = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]) * 10, y[i : i + 1]).backward()
        reference.append([p.grad.clone() for p in model.parameters()])
    max_norm = 0.3
    engine = PrivacyEngine()
    dp_model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=max_norm, poisson_sampling=False,
    )
    optimizer.zero_grad()
    nn.functional.cross_entropy(dp_model(x) * 10, y).backward()
    params = [p for p in dp_model.parameters() if p.requires_grad]
    grad_samples = [p.grad_sample for p in params]
    for i, ref in enumerate(reference):
        for gs, r in zip(grad_samples, ref):
            assert torch.allclose(gs[i], r, atol=1e-5)
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grad_samples], dim=1).norm(dim=1)
    assert (norms > max_norm).sum() >= 8  # most samples really get clipped
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped_norms = norms * factors
    assert torch.all(clipped_norms <= max_norm + 1e-6)
    optimizer.clip_and_accumulate()
    for p, gs in zip(params, grad_samples):
        expected = torch.einsum("i,i...->...", factors, gs)
        assert torch.allclose(p.summed_grad, expected, atol=1e-6)


def test_noise_scale_is_sigma_times_clipping_norm():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = nn.Linear(100, 100)
    data = TensorDataset(torch.randn(32, 100))
    loader = DataLoader(data, batch_size=8)
    sigma, max_norm = 1.3, 0.7
    _, optimizer, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=sigma, max_grad_norm=max_norm, poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(1),
    )
    (x,) = next(iter(dp_loader))
    optimizer.zero_grad()
    (model(x) * 0.0).sum().backward()  # zero per-sample gradients: p.grad is pure noise
    optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    # Opacus adds N(0, sigma^2 C^2) to the sum and divides by the expected batch size (loss_reduction="mean")
    empirical = noise.std().item() * optimizer.expected_batch_size
    assert empirical == pytest.approx(sigma * max_norm, rel=0.03)
    assert abs(noise.mean().item()) < 4 * sigma * max_norm / 8 / math.sqrt(noise.numel())


def test_wav2vec2_tiny_is_opacus_valid_after_make_dp_compatible_and_dp_step_trains_only_trainable():
    from models.wav2vec2 import build_wav2vec2_ctc, make_dp_compatible

    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_wav2vec2_ctc(10, "tiny")
    # Opacus' own validator misses both problems; training would fail with "Per sample gradient is not initialized"
    errors = dp_validation_errors(model)
    assert any("masked_spec_embed" in e for e in errors)
    assert any("pos_conv_embed.conv" in e for e in errors)
    with pytest.raises(DPPlanError, match="masked_spec_embed"):
        make_private_local(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(torch.randn(8, 4000)), batch_size=4),
                           target_epsilon=8.0, target_delta=1e-2, epochs_or_steps=4, max_grad_norm=1.0)
    # SpecAugment on and padded inputs: wav2vec2 writes both in place into the (Opacus-hooked) projected features
    model.config.mask_time_prob, model.config.mask_time_length = 0.5, 2
    report = make_dp_compatible(model)
    model.train()
    assert ModuleValidator.validate(model, strict=False) == []
    assert dp_validation_errors(model) == []

    gen = torch.Generator().manual_seed(0)
    attention_mask = torch.ones(8, 4000, dtype=torch.long)
    attention_mask[::2, 3000:] = 0
    data = TensorDataset(torch.randn(8, 4000, generator=gen), torch.randint(1, 10, (8, 3), generator=gen), attention_mask)
    loader = DataLoader(data, batch_size=4, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(before[n].numel() for n in trainable) == report.trainable_params
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ledger = ClientPrivacyAccountant()
    dp_model, optimizer, dp_loader, sigma = make_private_local(
        model, optimizer, loader, target_epsilon=8.0, target_delta=1e-2, epochs_or_steps=4, max_grad_norm=1.0,
        client_accountant=ledger, generator=torch.Generator().manual_seed(0),
    )
    dp_model.train()
    x, y, mask = next(iter(dp_loader))
    assert len(x) > 0
    loss = dp_model(input_values=x * mask, attention_mask=mask, labels=y).loss
    loss.backward()
    optimizer.step()
    assert ledger.steps == 1 and sigma > 0
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name


def test_validate_dp_plan_errors():
    with pytest.raises(DPPlanError, match=r"delta=0\.01 must be < 1/N = 1/200"):
        validate_dp_plan(8.0, 1e-2, n_samples=200, steps=100, sample_rate=0.1)
    with pytest.raises(DPPlanError, match="unreachable"):
        validate_dp_plan(0.01, 1e-6, n_samples=1000, steps=100000, sample_rate=1.0)
    with pytest.raises(DPPlanError, match="sample_rate"):
        validate_dp_plan(8.0, 1e-6, n_samples=1000, steps=10, sample_rate=1.5)

    bn_model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(DPPlanError, match=r"BatchNorm.*\['1'\].*ModuleValidator.fix"):
        validate_dp_plan(8.0, 1e-5, n_samples=1000, steps=10, sample_rate=0.1, model=bn_model)
    from opacus.validators import ModuleValidator

    sigma = validate_dp_plan(8.0, 1e-5, n_samples=1000, steps=10, sample_rate=0.1, model=ModuleValidator.fix(bn_model))
    assert 0 < sigma < 2


def test_noise_multiplier_for_budget_hits_the_target():
    q, steps = 0.02, 500
    sigma = noise_multiplier_for_budget(3.0, DELTA, q, steps)
    assert opacus_epsilon(sigma, q, steps, DELTA) <= 3.0
    assert opacus_epsilon(sigma, q, steps, DELTA) > 3.0 - 0.02
    assert opacus_epsilon(sigma * 0.95, q, steps, DELTA) > 3.0


def test_update_norm_is_the_flat_l2_norm_of_all_tensors():
    # the norm the server's validation rejects updates by (central-DP clipping is Flower's, in strategy.py)
    from privacy.federated.task import update_norm

    update = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[0.0, 4.0]], np.float32)}
    assert update_norm(update) == pytest.approx(5.0)
    assert update_norm({}) == 0.0


def test_central_epsilon_is_the_independent_accountant_without_amplification_and_grows_with_rounds():
    eps_10 = central_epsilon(1.0, 10, DELTA)
    eps_20 = central_epsilon(1.0, 20, DELTA)
    assert eps_20 > eps_10 > 0
    assert eps_10 == independent_epsilon(1.0, 1.0, 10, DELTA)
    assert eps_10 > independent_epsilon(1.0, 0.5, 10, DELTA)  # no amplification by client sampling is claimed


def test_ghost_clipping_gives_the_same_clipped_gradient_as_hooks_on_wav2vec2():
    from opacus import PrivacyEngine

    from models.wav2vec2 import build_wav2vec2_ctc, make_dp_compatible
    from privacy.dp import CTCCriterion

    data = TensorDataset(torch.randn(3, 4000, generator=torch.Generator().manual_seed(0)), torch.tensor([[1, 2, 3], [4, 5, -100], [6, -100, -100]]))
    x, y = data.tensors
    grads = {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        model = build_wav2vec2_ctc(10, hidden_dropout=0.0, attention_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)
        make_dp_compatible(model)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        wrapped = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, criterion=CTCCriterion(), data_loader=DataLoader(data, batch_size=3),
            noise_multiplier=0.0, max_grad_norm=0.2, poisson_sampling=False, grad_sample_mode=mode,
        )
        if mode == "ghost":
            dp_model, optimizer, criterion, _ = wrapped
        else:
            (dp_model, optimizer, _), criterion = wrapped, CTCCriterion()
        criterion(dp_model(input_values=x).logits, y).backward()
        optimizer.step()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads["hooks"].keys() == grads["ghost"].keys()
    for name, g in grads["hooks"].items():
        assert torch.allclose(g, grads["ghost"][name], atol=1e-6), name


def test_ctc_criterion_matches_wav2vec2_ctc_loss():
    from models.wav2vec2 import build_wav2vec2_ctc
    from privacy.dp import CTCCriterion

    torch.manual_seed(0)
    model = build_wav2vec2_ctc(10).eval()
    labels = torch.tensor([[1, 2, 3], [4, -100, -100]])
    with torch.no_grad():
        out = model(input_values=torch.randn(2, 8000), labels=labels)
    assert CTCCriterion()(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert CTCCriterion(reduction="none")(out.logits, labels).shape == (2,)
