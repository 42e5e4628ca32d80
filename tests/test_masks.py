"""Behaviour of the learned noise masks (privacy/masks.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from privacy.masks import (
    AdditiveMask,
    EncoderLayerMask,
    FeatureMask,
    ModalityMasks,
    MultiplicativeMask,
    build_masks,
    inverse_softplus,
)

B, T, D = 3, 7, 6


def feats(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g) * scale


@pytest.mark.parametrize("value", [1e-3, 0.5, 1.0, 5.0, 40.0])
def test_inverse_softplus_roundtrip(value):
    assert F.softplus(torch.tensor(inverse_softplus(value), dtype=torch.float64)).item() == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "both"])
def test_noise_false_is_identity_at_init(kind):
    m = build_masks(kind, dim=D, modalities=("audio", "video"))
    a, v = feats(1), feats(2)
    a2, v2 = m(a, v, noise=False)
    assert torch.equal(a2, a) and torch.equal(v2, v)
    m.set_noise(False)  # attribute form
    a3, _ = m(a, v)
    assert torch.equal(a3, a)


def test_vanishing_scale_is_identity():
    x = feats(3)
    add = AdditiveMask(D, calibrate=False)
    mul = MultiplicativeMask(D)
    with torch.no_grad():
        add.rho_a.fill_(-60.0)  # softplus(-60) ~ 1e-26
        mul.rho_m.fill_(-60.0)
    torch.testing.assert_close(add(x), x, rtol=0, atol=1e-20)
    torch.testing.assert_close(mul(x), x, rtol=0, atol=1e-20)


def test_noise_has_the_parameterised_std():
    x = torch.zeros(200, 50, D)
    add = AdditiveMask(D, init_scale=0.7, calibrate=False, generator=torch.Generator().manual_seed(0))
    y = add(x)
    assert y.std().item() == pytest.approx(0.7, rel=0.03)
    ones = torch.ones(200, 50, D)
    mul = MultiplicativeMask(D, init_scale=0.3, generator=torch.Generator().manual_seed(0))
    z = mul(ones)
    assert z.mean().item() == pytest.approx(1.0, abs=0.01) and z.std().item() == pytest.approx(0.3, rel=0.03)


def test_additive_scale_is_relative_to_calibrated_feature_std():
    g = torch.Generator().manual_seed(0)
    stds = torch.tensor([0.1, 1.0, 10.0, 2.0, 0.5, 3.0])
    x = torch.randn(64, 40, D, generator=g) * stds
    add = AdditiveMask(D, init_scale=0.5, generator=torch.Generator().manual_seed(1))
    add(x)  # first batch calibrates
    assert bool(add.calibrated)
    torch.testing.assert_close(add.feature_scale, stds, rtol=0.05, atol=0)
    noise = add(x) - x
    torch.testing.assert_close(noise.reshape(-1, D).std(0), 0.5 * stds, rtol=0.06, atol=0)
    # calibration travels with the state_dict
    fresh = AdditiveMask(D, init_scale=0.5)
    fresh.load_state_dict(add.state_dict())
    assert bool(fresh.calibrated) and torch.equal(fresh.feature_scale, add.feature_scale)


def test_calibration_ignores_padded_frames():
    x = torch.randn(4, 10, D)
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[:, 6:] = True
    x[pad] = 1000.0
    add = AdditiveMask(D)
    add.calibrate_(x, pad)
    torch.testing.assert_close(add.feature_scale, x[~pad].std(0))


def test_padding_mask_leaves_padded_frames_untouched():
    m = build_masks("both", dim=D, modalities=("audio",))
    x = feats(4)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 4:] = True
    y, _ = m(x, None, padding_mask=pad)
    assert torch.equal(y[pad], x[pad])
    assert not torch.allclose(y[~pad], x[~pad])


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "both"])
def test_noise_at_inference_differs_per_call_but_is_reproducible(kind):
    m = build_masks(kind, dim=D).eval()
    a, v = feats(5), feats(6)
    a1, v1 = m(a, v)
    a2, v2 = m(a, v)
    assert not torch.allclose(a1, a2) and not torch.allclose(v1, v2)
    r1 = m(a, v, generator=torch.Generator().manual_seed(11))
    r2 = m(a, v, generator=torch.Generator().manual_seed(11))
    r3 = m(a, v, generator=torch.Generator().manual_seed(12))
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert not torch.allclose(r1[0], r3[0])
    # audio and video get independent draws from one generator
    same = m(a, a, generator=torch.Generator().manual_seed(11))
    assert not torch.allclose(same[0], same[1])


def test_noise_at_eval_false_switches_noise_off_in_eval_only():
    m = build_masks("additive", dim=D, noise_at_eval=False)
    a = feats(7)
    assert torch.equal(m.eval()(a, None)[0], a)
    assert not torch.allclose(m.train()(a, None)[0], a)


def test_generator_state_resume_gives_identical_noise():
    gen = torch.Generator().manual_seed(3)
    m = build_masks("both", dim=D, generator=gen)
    a = feats(8)
    m(a, None)
    state = gen.get_state()
    after1 = m(a, None)[0]
    gen.set_state(state)
    after2 = m(a, None)[0]
    assert torch.equal(after1, after2)


def test_none_modality_passes_through_and_unmasked_modality_untouched():
    m = build_masks("additive", dim=D, modalities=("audio",))
    v = feats(9)
    a2, v2 = m(None, v)
    assert a2 is None and v2 is v


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "both"])
def test_mask_parameters_get_gradients_and_change(kind):
    m = build_masks(kind, dim=D, generator=torch.Generator().manual_seed(0))
    head = torch.nn.Linear(D, 1)
    for p in head.parameters():
        p.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    a, v = feats(10), feats(11)
    a2, v2 = m(a, v)
    # Reward noise energy so the gradient is non-trivial in every parameter.
    loss = -(head(a2).pow(2).mean() + head(v2).pow(2).mean())
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in m.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    assert all(k.split(".")[-1] in ("rho_a", "rho_m", "mu_m") for k in before)


def test_parameters_are_one_per_feature_dimension():
    m = build_masks("both", dim=D)
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert shapes == {
        f"masks.{mod}.{part}.{p}": (D,)
        for mod in ("audio", "video")
        for part, p in (("multiplicative", "rho_m"), ("multiplicative", "mu_m"), ("additive", "rho_a"))
    }


def test_feature_mask_is_multiplicative_then_additive():
    x = feats(12)
    fm = FeatureMask(D, additive=True, multiplicative=True, calibrate=False)
    g1 = torch.Generator().manual_seed(5)
    y = fm(x, generator=g1)
    g2 = torch.Generator().manual_seed(5)
    eps_m = torch.randn(x.shape, generator=g2)
    eps_a = torch.randn(x.shape, generator=g2)
    expected = x * (fm.multiplicative.mu_m + fm.multiplicative.sigma() * eps_m) + fm.additive.sigma() * eps_a
    torch.testing.assert_close(y, expected)


def test_channels_first_layout():
    """feature_axis=1 puts the per-dimension scale on axis 1 of a [B, D, T] input."""
    m = FeatureMask(D, additive=True, multiplicative=False, feature_axis=1, calibrate=False)
    with torch.no_grad():
        m.additive.rho_a.copy_(torch.linspace(-2, 2, D))
    y = m(torch.zeros(100, D, 60), generator=torch.Generator().manual_seed(0))
    measured = y.transpose(1, 2).reshape(-1, D).std(0)
    torch.testing.assert_close(measured, m.additive.sigma().detach(), rtol=0.05, atol=0)
    pad = torch.zeros(100, 60, dtype=torch.bool)
    pad[:, 30:] = True
    y = m(torch.zeros(100, D, 60), padding_mask=pad)
    assert torch.all(y[:, :, 30:] == 0) and torch.all(y[:, :, :30] != 0)
    with pytest.raises(ValueError, match="6 feature dimensions"):
        m(feats(13))  # [B, T, D] with T != D along axis 1


def test_encoder_layer_mask_applies_only_at_its_layer():
    hook = build_masks("additive", position="encoder", layer=2, dim=D, num_layers=4)
    assert isinstance(hook, EncoderLayerMask)
    x = feats(14)
    assert hook(0, x) is x and hook(3, x) is x
    assert not torch.allclose(hook(2, x), x)
    assert torch.equal(hook(2, x, noise=False), x)


def test_build_masks_none_and_types():
    assert build_masks("none") is None
    assert isinstance(build_masks("both", dim=D), ModalityMasks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="gaussian"), "masks.name"),
        (dict(kind="additive", position="decoder"), "masks.position"),
        (dict(kind="additive", position="encoder", layer=12, num_layers=12), r"masks.layer=12.*model.encoder_layers=12"),
        (dict(kind="additive", position="encoder", layer=-1), "masks.layer"),
        (dict(kind="additive", init_scale=0.0), "init_scale"),
        (dict(kind="additive", modalities=("audio", "text")), "modalities"),
        (dict(kind="additive", modalities=()), "modalities"),
    ],
)
def test_build_masks_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_masks(dim=D, **kwargs)


def test_wrong_feature_dim_is_a_clear_error():
    m = build_masks("multiplicative", dim=D)
    with pytest.raises(ValueError, match="built for 6 feature dimensions"):
        m(torch.zeros(2, 3, D + 1), None)


def test_min_scale_floors_the_noise():
    add = AdditiveMask(D, init_scale=1.0, min_scale=0.2, calibrate=False)
    with torch.no_grad():
        add.rho_a.fill_(-80.0)
    assert torch.allclose(add.sigma(), torch.full((D,), 0.2))
    assert math.isfinite(build_masks("both", dim=D, min_scale=0.1).mean_log_sigma().item())


def test_mask_kind_from_config_booleans():
    from privacy.masks import mask_kind

    assert [mask_kind(a, m) for a, m in ((0, 0), (1, 0), (0, 1), (1, 1))] == ["none", "additive", "multiplicative", "both"]


# --------------------------------------------------------------------------- noise granularity
def _noise_of(mask_kind_, granularity, x, pad=None, segment_frames=3, seed=0):
    m = build_masks(mask_kind_, dim=D, modalities=("audio",), init_scale=0.5, noise_granularity=granularity,
                    segment_frames=segment_frames, generator=torch.Generator().manual_seed(seed))
    y, _ = m(x, None, padding_mask=pad)
    return y


def test_frame_noise_is_the_plain_elementwise_draw():
    """The default draws exactly what the mask drew before granularity existed: frame-level runs are unchanged."""
    x = feats(4)
    add = AdditiveMask(D, init_scale=0.5, calibrate=False, generator=torch.Generator().manual_seed(3))
    expected = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(add(x), expected)
    y = _noise_of("additive", "frame", x)
    noise = y - x
    assert not torch.allclose(noise[:, 0], noise[:, 1])  # a new draw on every frame


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "both"])
def test_utterance_noise_is_one_draw_per_utterance_and_leaves_padding_alone(kind):
    x = feats(5) + 3.0  # away from zero so the multiplicative factor is visible
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True  # utterance 1 has 4 valid frames
    y = _noise_of(kind, "utterance", x, pad)
    assert torch.equal(y[1, 4:], x[1, 4:])  # padded frames untouched
    for b in range(B):
        n = int((~pad[b]).sum())
        if kind == "additive":
            change = y[b, :n] - x[b, :n]
        elif kind == "multiplicative":
            change = y[b, :n] / x[b, :n]
        else:  # x * m + a: the affine map per dim is the same for every frame, so two frames fix it
            m_ = (y[b, 1] - y[b, 0]) / (x[b, 1] - x[b, 0])
            change = y[b, :n] - x[b, :n] * m_
        torch.testing.assert_close(change, change[:1].expand_as(change), rtol=1e-4, atol=1e-4)
        assert change[0].abs().sum() > 0
    # utterances get different draws
    assert not torch.allclose(y[0, 0] - x[0, 0], y[2, 0] - x[2, 0])


def test_utterance_noise_of_an_utterance_does_not_depend_on_its_padding():
    """One draw per utterance: the same utterance padded to another length in another batch gets the same noise
    at its valid frames (given the same generator state)."""
    x = feats(6)
    short = x[:, :4]
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[:, 4:] = True
    y_padded = _noise_of("additive", "utterance", x, pad, seed=9)
    y_short = _noise_of("additive", "utterance", short, None, seed=9)
    torch.testing.assert_close(y_padded[:, :4], y_short)


def test_segment_noise_is_constant_within_segments_counted_from_the_first_frame():
    x = torch.zeros(B, T, D)  # T = 7, segments of 3 frames: [0..2], [3..5], [6]
    y = _noise_of("additive", "segment", x, segment_frames=3)
    for b in range(B):
        for seg in ((0, 3), (3, 6), (6, 7)):
            block = y[b, seg[0]:seg[1]]
            torch.testing.assert_close(block, block[:1].expand_as(block))
        assert not torch.allclose(y[b, 0], y[b, 3]) and not torch.allclose(y[b, 3], y[b, 6])


def test_pooling_removes_frame_noise_but_not_utterance_noise():
    """Why granularity exists: the utterance mean keeps utterance noise at full strength."""
    x = torch.zeros(64, 50, D)
    frame_mean = _noise_of("additive", "frame", x).mean(dim=1)
    utt_mean = _noise_of("additive", "utterance", x).mean(dim=1)
    assert frame_mean.std().item() == pytest.approx(0.5 / math.sqrt(50), rel=0.15)
    assert utt_mean.std().item() == pytest.approx(0.5, rel=0.1)


def test_encoder_mask_granularity_and_padding():
    x = torch.zeros(B, T, D)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 5:] = True
    m = build_masks("additive", "encoder", 1, dim=D, noise_granularity="utterance",
                    generator=torch.Generator().manual_seed(0))
    y = m(1, x + 1.0, padding_mask=pad) - 1.0
    assert torch.equal(y[0, 5:], torch.zeros(2, D))
    torch.testing.assert_close(y[0, :5], y[0, :1].expand(5, D))


@pytest.mark.parametrize("granularity, segment_frames, fragment", [
    ("sentence", 3, "masks.noise_granularity must be one of"),
    ("segment", 0, "masks.segment_frames >= 1"),
])
def test_bad_granularity_is_a_clear_error(granularity, segment_frames, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_masks("additive", dim=D, noise_granularity=granularity, segment_frames=segment_frames)
