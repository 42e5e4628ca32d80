"""Behaviour of the privacy contrastive loss (privacy/contrastive.py)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from privacy.contrastive import ProjectionHead, check_loss_options, masked_mean_over_time, privacy_contrastive_loss

SPK = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])  # P=3 speakers, K=2..3


def reference_infonce(anchor, positive, spk, tau, other_speaker=False):
    """Loop-based InfoNCE written straight from the formula in docs/method.md."""
    a = F.normalize(anchor.double(), dim=-1)
    p = F.normalize(positive.double(), dim=-1)
    total = 0.0
    for i in range(len(a)):
        pos = math.exp(float(a[i] @ p[i]) / tau)
        neg = sum(
            math.exp(float(a[i] @ p[j]) / tau)
            for j in range(len(a))
            if j != i and (other_speaker or spk[j] == spk[i])
        )
        total += -math.log(pos / (pos + neg))
    return total / len(a)


def batch(seed=0, dim=16, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(len(SPK), dim, generator=g)
    noisy = clean + noise * torch.randn(clean.shape, generator=g)
    return noisy, clean


@pytest.mark.parametrize("other", [False, True])
def test_matches_loop_reference(other):
    noisy, clean = batch(1)
    loss, diag = privacy_contrastive_loss(noisy, clean, SPK, temperature=0.2, other_speaker_negatives=other)
    assert loss.item() == pytest.approx(reference_infonce(noisy, clean, SPK.tolist(), 0.2, other), rel=1e-5)
    expected_negs = (len(SPK) - 1) if other else (2 * 3 + 3 * 2 + 2 * 1) / 8
    assert diag["num_negatives"].item() == pytest.approx(expected_negs)


def test_correct_positive_beats_shuffled_positive():
    noisy, clean = batch(2)
    good, diag = privacy_contrastive_loss(noisy, clean, SPK, 0.1)
    # shuffle positives within each speaker: every anchor now gets another utterance as "positive"
    perm = torch.tensor([1, 2, 0, 4, 5, 3, 7, 6])
    bad, bad_diag = privacy_contrastive_loss(noisy, clean[perm], SPK, 0.1)
    assert good.item() < bad.item()
    assert diag["accuracy"].item() == 1.0 and bad_diag["accuracy"].item() < 0.5
    assert diag["pos_sim"] > diag["neg_sim"]


@pytest.mark.parametrize("pooling", ["utterance", "frame"])
def test_invariant_to_batch_order(pooling):
    g = torch.Generator().manual_seed(3)
    noisy = torch.randn(len(SPK), 5, 8, generator=g)
    clean = noisy + 0.5 * torch.randn(noisy.shape, generator=g)
    pad = torch.zeros(len(SPK), 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[5, 1:] = True
    perm = torch.randperm(len(SPK), generator=g)
    l1, _ = privacy_contrastive_loss(noisy, clean, SPK, 0.1, padding_mask=pad, pooling=pooling)
    l2, _ = privacy_contrastive_loss(noisy[perm], clean[perm], SPK[perm], 0.1, padding_mask=pad[perm], pooling=pooling)
    assert abs(l1.item() - l2.item()) < 1e-6
    # speaker labels are only compared for equality: renaming them changes nothing
    renamed = [f"spk{int(s) * 7}" for s in SPK]
    l3, _ = privacy_contrastive_loss(noisy, clean, renamed, 0.1, padding_mask=pad, pooling=pooling)
    assert abs(l1.item() - l3.item()) < 1e-6


def test_padding_is_ignored_in_utterance_pooling():
    g = torch.Generator().manual_seed(4)
    noisy = torch.randn(len(SPK), 6, 8, generator=g)
    clean = torch.randn(len(SPK), 6, 8, generator=g)
    pad = torch.zeros(len(SPK), 6, dtype=torch.bool)
    pad[:, 4:] = True
    l1, _ = privacy_contrastive_loss(noisy, clean, SPK, 0.1, padding_mask=pad)
    noisy2, clean2 = noisy.clone(), clean.clone()
    noisy2[:, 4:] = 1e3
    clean2[:, 4:] = -1e3
    l2, _ = privacy_contrastive_loss(noisy2, clean2, SPK, 0.1, padding_mask=pad)
    assert l1.item() == pytest.approx(l2.item(), abs=1e-6)
    l3, _ = privacy_contrastive_loss(noisy[:, :4].mean(1), clean[:, :4].mean(1), SPK, 0.1)
    assert l1.item() == pytest.approx(l3.item(), abs=1e-6)


def test_frame_level_matches_reference():
    """Frame (i,t): positive = clean (i,t); negatives = every frame of the other same-speaker utterances."""
    g = torch.Generator().manual_seed(5)
    spk = torch.tensor([0, 0, 1, 1])
    T = 3
    noisy = torch.randn(4, T, 4, generator=g)
    clean = torch.randn(4, T, 4, generator=g)
    loss, _ = privacy_contrastive_loss(noisy, clean, spk, 0.5, pooling="frame")
    a, p = F.normalize(noisy.double(), dim=-1), F.normalize(clean.double(), dim=-1)
    per_utt = []
    for i in range(4):
        terms = []
        for t in range(T):
            pos = math.exp(float(a[i, t] @ p[i, t]) / 0.5)
            neg = sum(math.exp(float(a[i, t] @ p[j, s]) / 0.5) for j in range(4) if j != i and spk[j] == spk[i] for s in range(T))
            terms.append(-math.log(pos / (pos + neg)))
        per_utt.append(sum(terms) / T)
    assert loss.item() == pytest.approx(sum(per_utt) / 4, rel=1e-5)


def test_training_a_projection_lowers_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    # identity dominates the raw features, content is a small signal: the head must learn to use content
    speaker_part = torch.randn(3, 32, generator=g)[SPK] * 3.0
    content = torch.randn(len(SPK), 32, generator=g)
    clean = (speaker_part + content).unsqueeze(1).expand(-1, 4, -1).contiguous()
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=g)
    head = ProjectionHead(32, 16)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, _ = privacy_contrastive_loss(head(noisy), head(clean), SPK, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_projection_head_shapes_and_padding():
    x = torch.randn(2, 5, 12)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    utt = ProjectionHead(12, 7)
    assert utt(x, pad).shape == (2, 7)
    torch.testing.assert_close(utt(x, pad)[1], utt(x[1:2, :2])[0])
    assert ProjectionHead(12, 7, pooling="frame")(x).shape == (2, 5, 7)
    with pytest.raises(ValueError, match="loss.pooling"):
        ProjectionHead(12, 7, pooling="max")


def test_gradients_reach_both_branches():
    noisy, clean = batch(7)
    noisy.requires_grad_(True)
    clean.requires_grad_(True)
    loss, _ = privacy_contrastive_loss(noisy, clean, SPK, 0.1)
    loss.backward()
    assert noisy.grad.abs().sum() > 0 and clean.grad.abs().sum() > 0


def test_speaker_with_single_utterance_is_a_clear_error():
    noisy, clean = batch(8)
    spk = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])
    with pytest.raises(ValueError, match=r"speaker\(s\) \[2, 3\].*trainer.sampler=speaker.*utterances_per_speaker >= 2"):
        privacy_contrastive_loss(noisy, clean, spk, 0.1)
    # the all-other-utterances ablation does not need same-speaker pairs
    loss, _ = privacy_contrastive_loss(noisy, clean, spk, 0.1, other_speaker_negatives=True)
    assert torch.isfinite(loss)


def test_bad_arguments():
    noisy, clean = batch(9)
    with pytest.raises(ValueError, match="temperature"):
        privacy_contrastive_loss(noisy, clean, SPK, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        privacy_contrastive_loss(noisy, clean[:4], SPK, 0.1)
    with pytest.raises(ValueError, match="one entry per utterance"):
        privacy_contrastive_loss(noisy, clean, SPK[:4], 0.1)
    with pytest.raises(ValueError, match="frame pooling"):
        privacy_contrastive_loss(noisy, clean, SPK, 0.1, pooling="frame")
    with pytest.raises(ValueError, match="entirely padding"):
        masked_mean_over_time(torch.zeros(2, 3, 4), torch.tensor([[True] * 3, [False] * 3]))


def contrastive_cfg(**kw):
    base = {"name": "ctc_contrastive", "contrastive": True, "lambda": 0.1, "temperature": 0.1, "pooling": "utterance",
            "other_speaker_negatives": False}
    base.update(kw)
    return base


def test_check_loss_options_accepts_valid_setups():
    check_loss_options(contrastive_cfg(), "speaker", 2, "additive")
    check_loss_options({"name": "ctc", "contrastive": False}, "bucket", 1, "none")
    check_loss_options(contrastive_cfg(other_speaker_negatives=True), "bucket", 1, "both")


def test_check_loss_options_works_with_the_structured_config():
    from omegaconf import OmegaConf

    from training.config import LossConfig

    cfg = OmegaConf.structured(LossConfig)
    cfg.name, cfg.tag, cfg.contrastive = "ctc_contrastive", "x", True
    assert cfg["lambda"] == pytest.approx(0.1)
    check_loss_options(cfg, "speaker", 4, "both")
    with pytest.raises(ValueError, match="trainer.sampler=bucket"):
        check_loss_options(cfg, "bucket", 4, "both")


@pytest.mark.parametrize(
    "cfg, sampler, k, masks, message",
    [
        (contrastive_cfg(), "bucket", 4, "additive", r"loss=ctc_contrastive conflicts with trainer.sampler=bucket"),
        (contrastive_cfg(), "speaker", 1, "additive", r"trainer.utterances_per_speaker=1"),
        (contrastive_cfg(), "speaker", 4, "none", r"masks=none"),
        (contrastive_cfg(temperature=0), "speaker", 4, "additive", r"loss.temperature"),
        (contrastive_cfg(**{"lambda": -1.0}), "speaker", 4, "additive", r"loss.lambda"),
        (contrastive_cfg(pooling="max"), "speaker", 4, "additive", r"loss.pooling"),
    ],
)
def test_check_loss_options_rejects_conflicts(cfg, sampler, k, masks, message):
    with pytest.raises(ValueError, match=message):
        check_loss_options(cfg, sampler, k, masks)


def test_check_loss_options_reads_attribute_objects():
    cfg = SimpleNamespace(name="ctc_contrastive", contrastive=True, temperature=0.1, pooling="utterance")
    with pytest.raises(ValueError, match="sampler"):
        check_loss_options(cfg, "bucket", 4, "both")
