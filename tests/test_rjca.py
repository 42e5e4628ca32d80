"""RJCA attacker and ECAPA-TDNN: shapes, masking, use of both modalities, training signal, raw-input path."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.ecapa import AttentiveStatsPool, ECAPATDNN
from models.rjca import (
    AAMSoftmax,
    JointCrossAttention,
    LogMelFbank,
    RecursiveJointCrossAttention,
    RJCAConfig,
    RJCASpeakerVerifier,
    lengths_from_padding_mask,
    mel_filterbank,
    segment_masks,
)

DA, DV = 32, 24


@pytest.fixture(autouse=True)
def one_thread():
    # These small tensors run ~20x faster on one thread than on two contended cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**kw) -> RJCAConfig:
    base = dict(audio_feat_dim=DA, video_feat_dim=DV, ecapa_channels=32, ecapa_se_channels=16, visual_channels=32,
                audio_dim=24, video_dim=16, pool_attention_dim=16, embed_dim=20, segments=4, visual_cnn_widths=(8, 16))
    base.update(kw)
    return RJCAConfig(**base)


# --------------------------------------------------------------------------- segments / masks
def test_segment_masks_hand_computed():
    # n=8, L=4: [0,2) [2,4) [4,6) [6,8)
    # n=10: start = floor(10 l / 4) = 0,2,5,7; end = ceil(10 (l+1) / 4) = 3,5,8,10
    # n=3 (< L): start 0,0,1,2; end max(ceil(3(l+1)/4), start+1) = 1,2,3,3
    m = segment_masks(torch.tensor([8, 10, 3]), frames=10, segments=4)
    spans = [[(int(r.nonzero().min()), int(r.nonzero().max()) + 1) for r in item] for item in m]
    assert spans[0] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert spans[1] == [(0, 3), (2, 5), (5, 8), (7, 10)]
    assert spans[2] == [(0, 1), (0, 2), (1, 3), (2, 3)]
    assert m.any(-1).all()


def test_lengths_from_padding_mask_carries_fraction_across_rates():
    pm = torch.zeros(2, 40, dtype=torch.bool)
    pm[1, 30:] = True
    assert lengths_from_padding_mask(pm, 2, 40, torch.device("cpu")).tolist() == [40, 30]
    assert lengths_from_padding_mask(pm, 2, 160, torch.device("cpu")).tolist() == [160, 120]  # 25 Hz -> 100 Hz
    pm[0] = True
    with pytest.raises(ValueError, match="every frame as padding"):
        lengths_from_padding_mask(pm, 2, 40, torch.device("cpu"))


def test_attentive_stats_pool_segment_equals_cropped_pool():
    torch.manual_seed(0)
    pool = AttentiveStatsPool(6, 4, global_context=True).eval()
    x = torch.randn(2, 6, 12)
    seg = segment_masks(torch.tensor([12, 12]), 12, 3)  # [0,4) [4,8) [8,12)
    pooled = pool(x, seg)
    assert pooled.shape == (2, 3, 12)
    # segment 1 pooled inside the sequence == the crop pooled on its own
    assert torch.allclose(pooled[:, 1], pool(x[:, :, 4:8]), atol=1e-5)


# --------------------------------------------------------------------------- fusion block
def test_joint_cross_attention_shapes_and_unshared_recursions():
    torch.manual_seed(0)
    step = JointCrossAttention(video_dim=16, audio_dim=24, segments=5, dropout=0.0)
    v, a = torch.randn(3, 5, 16), torch.randn(3, 5, 24)
    v2, a2 = step(v, a)
    assert v2.shape == (3, 5, 16) and a2.shape == (3, 5, 24)
    assert not torch.allclose(v2, v) and not torch.allclose(a2, a)
    rec = RecursiveJointCrossAttention(16, 24, segments=5, recursions=3, dropout=0.0)
    assert len(rec.steps) == 3
    assert rec.steps[0].joint.weight.data_ptr() != rec.steps[1].joint.weight.data_ptr()
    assert rec.steps[0].key_audio.weight.shape == (5, 5)  # K mixes the L segments
    with pytest.raises(ValueError, match="L=5"):
        step(torch.randn(3, 4, 16), torch.randn(3, 4, 24))


# --------------------------------------------------------------------------- the verifier
def test_embedding_depends_on_both_modalities():
    torch.manual_seed(0)
    model = RJCASpeakerVerifier(small_config()).eval()
    a = torch.randn(2, 30, DA, requires_grad=True)
    v = torch.randn(2, 30, DV, requires_grad=True)
    emb = model(a, v)
    assert emb.shape == (2, 20)
    emb.pow(2).sum().backward()
    assert a.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    # every trainable part of the network receives gradient
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not [n for n in no_grad if "fusion" in n or "lstm" in n or "embedding" in n], no_grad


def test_padding_is_ignored():
    torch.manual_seed(0)
    model = RJCASpeakerVerifier(small_config()).eval()
    a, v = torch.randn(1, 26, DA), torch.randn(1, 26, DV)
    ref = model.embed(a, v)
    # same utterance padded to 40 frames with garbage, next to a full-length one
    a_pad = torch.cat([torch.cat([a, 100 * torch.randn(1, 14, DA)], 1), torch.randn(1, 40, DA)])
    v_pad = torch.cat([torch.cat([v, 100 * torch.randn(1, 14, DV)], 1), torch.randn(1, 40, DV)])
    pm = torch.zeros(2, 40, dtype=torch.bool)
    pm[0, 26:] = True
    out = model.embed(a_pad, v_pad, pm)
    assert torch.allclose(out[0], ref[0], atol=1e-5)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_unimodal_variants(modality):
    torch.manual_seed(0)
    model = RJCASpeakerVerifier(small_config(modalities=(modality,)))
    assert not hasattr(model, "fusion")
    a = torch.randn(3, 20, DA, requires_grad=True)
    v = torch.randn(3, 20, DV, requires_grad=True)
    kwargs = {"audio_feats": a} if modality == "audio" else {"video_feats": v}
    emb = model(**kwargs)
    assert emb.shape == (3, 20)
    emb.sum().backward()
    used = a if modality == "audio" else v
    assert used.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not use"):
        model(audio_feats=a, video_feats=v)


def test_input_validation_names_expected_and_got():
    model = RJCASpeakerVerifier(small_config())
    with pytest.raises(ValueError, match=rf"audio_feats: expected .*\[B, T, {DA}\].*got \(2, 10, 7\)"):
        model(torch.randn(2, 10, 7), torch.randn(2, 10, DV))
    with pytest.raises(ValueError, match="needs video_feats"):
        model(audio_feats=torch.randn(2, 10, DA))
    with pytest.raises(ValueError, match="input_kind"):
        RJCAConfig(input_kind="wav")
    with pytest.raises(ValueError, match="modalities"):
        RJCAConfig(modalities=("audio", "lips"))


def test_aam_softmax_without_margin_is_scaled_cosine_cross_entropy():
    torch.manual_seed(0)
    aam = AAMSoftmax(8, 5, margin=0.0, scale=10.0)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, acc = aam(emb, labels)
    cos = F.normalize(emb) @ F.normalize(aam.weight).T
    assert torch.allclose(loss, F.cross_entropy(10 * cos, labels), atol=1e-5)
    assert acc == (cos.argmax(1) == labels).float().mean()
    # a margin only makes the target logit smaller, so the loss goes up
    aam_m = AAMSoftmax(8, 5, margin=0.3, scale=10.0)
    aam_m.load_state_dict(aam.state_dict())
    assert aam_m(emb, labels)[0] > loss
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\]"):
        aam(emb, torch.tensor([0, 1, 2, 3, 4, 5]))


def test_aam_training_loss_decreases_on_separable_speakers():
    torch.manual_seed(0)
    n_spk, per_spk, T = 4, 4, 20
    centres_a, centres_v = torch.randn(n_spk, DA), torch.randn(n_spk, DV)
    labels = torch.arange(n_spk).repeat_interleave(per_spk)
    a = centres_a[labels, None, :] + 0.5 * torch.randn(len(labels), T, DA)
    v = centres_v[labels, None, :] + 0.5 * torch.randn(len(labels), T, DV)
    model = RJCASpeakerVerifier(small_config())
    head = AAMSoftmax(20, n_spk, margin=0.2, scale=30.0)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, acc = head(model(a, v), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert acc.item() == 1.0
    # the trained embeddings verify: same-speaker cosine > different-speaker cosine on average
    emb = model.embed(a, v)
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(labels), dtype=torch.bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.3


def test_score_trials_and_s_norm():
    torch.manual_seed(0)
    ea, eb, cohort = torch.randn(5, 8), torch.randn(5, 8), torch.randn(7, 8)
    s = RJCASpeakerVerifier.score_trials(ea, eb)
    assert torch.allclose(s, (F.normalize(ea) * F.normalize(eb)).sum(1), atol=1e-6)
    sn = RJCASpeakerVerifier.s_norm(s, ea, eb, cohort)
    ca, cb = F.normalize(ea) @ F.normalize(cohort).T, F.normalize(eb) @ F.normalize(cohort).T
    i = 2
    expected = 0.5 * ((s[i] - ca[i].mean()) / ca[i].std() + (s[i] - cb[i].mean()) / cb[i].std())
    assert torch.allclose(sn[i], expected, atol=1e-5)
    top = RJCASpeakerVerifier.s_norm(s, ea, eb, cohort, top_k=3)
    ka, kb = ca[i].topk(3).values, cb[i].topk(3).values
    assert torch.allclose(top[i], 0.5 * ((s[i] - ka.mean()) / ka.std() + (s[i] - kb.mean()) / kb.std()), atol=1e-5)


# --------------------------------------------------------------------------- raw inputs
def test_mel_filterbank_and_fbank_peak_at_tone():
    fb = mel_filterbank(80, 512, 16000, 20.0, 7600.0)
    assert fb.shape == (257, 80) and (fb >= 0).all() and (fb.max(0).values > 0).all()
    t = torch.arange(16000) / 16000
    wav = torch.sin(2 * math.pi * 1000 * t).unsqueeze(0)
    feats = LogMelFbank(preemphasis=0.0)(wav)
    assert feats.shape == (1, 80, 101)
    assert torch.allclose(feats.mean(-1), torch.zeros(1, 80), atol=1e-4)  # mean-normalised over time
    # the band with the most energy is the one whose centre is nearest 1 kHz
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    centres = [700 * (10 ** (m / 2595) - 1) for m in torch.linspace(mel(20.0), mel(7600.0), 82)[1:-1].tolist()]
    nearest = min(range(80), key=lambda k: abs(centres[k] - 1000))
    power = torch.stft(F.pad(wav, (256, 256), mode="reflect"), 512, 160, 400, torch.hamming_window(400), center=False,
                       return_complex=True).abs().pow(2)
    band_energy = (power.transpose(1, 2) @ fb).mean(1)[0]
    assert abs(int(band_energy.argmax()) - nearest) <= 1


def test_raw_input_path_shapes():
    torch.manual_seed(0)
    model = RJCASpeakerVerifier(small_config(input_kind="raw"))
    wav = torch.randn(2, 8000)  # 0.5 s
    video = torch.randn(2, 1, 12, 88, 88, requires_grad=True)
    pm = torch.zeros(2, 12, dtype=torch.bool)
    pm[1, 9:] = True
    emb = model(wav, video, pm)
    assert emb.shape == (2, 20)
    emb.sum().backward()
    assert video.grad.abs().sum() > 0
    # In eval mode padded frames do not reach the embedding (in training mode they
    # still enter the batch statistics of the CNN's BatchNorm, as in any padded batch).
    model.eval()
    video.grad = None
    model(wav, video, pm)[1].sum().backward()
    assert video.grad[1, :, :9].abs().sum() > 0
    assert video.grad[1, :, 9:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"video_feats: expected ROI frames \[B, 1, T, H, W\]"):
        model(wav, torch.randn(2, 12, 88, 88))


def test_ecapa_standalone_shapes():
    torch.manual_seed(0)
    enc = ECAPATDNN(in_dim=80, channels=32, embed_dim=12, se_channels=8, attention_channels=8)
    assert enc(torch.randn(3, 80, 50)).shape == (3, 12)
    assert enc.frame_features(torch.randn(3, 80, 50)).shape == (3, 96, 50)  # MFA = 3 x C
    seg = segment_masks(torch.tensor([50, 40, 30]), 50, 5)
    assert enc(torch.randn(3, 80, 50), segment_mask=seg).shape == (3, 5, 12)
    with pytest.raises(ValueError, match=r"expects input \[B, 80, T\]"):
        enc(torch.randn(3, 50, 80))
