"""The AV-HuBERT pretraining recipe against the original (issue 16): fairseq's compute_mask_indices,
features_pen, feature_grad_mult, the iteration configs, and no modality dropout when fine-tuning."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import training.config  # noqa: F401
from models.avhubert import AVHubertModel, avhubert_tiny, compute_span_mask
from training.config import PROJECT_ROOT


# --------------------------------------------------------------------------- compute_mask_indices
def fairseq_compute_mask_indices(shape, padding_mask, mask_prob, mask_length, min_masks, rs):
    """Reference: fairseq/AV-HuBERT `compute_mask_indices`, mask_type static, no_overlap False,
    transcribed here with an explicit numpy RandomState in place of the global one."""
    bsz, all_sz = shape
    mask = np.full((bsz, all_sz), False)
    all_num_mask = max(min_masks, int(mask_prob * all_sz / float(mask_length) + rs.rand()))
    mask_idcs = []
    for i in range(bsz):
        if padding_mask is not None:
            sz = all_sz - int(padding_mask[i].sum())
            num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rs.rand()))
        else:
            sz, num_mask = all_sz, all_num_mask
        lengths = np.full(num_mask, mask_length)
        min_len = min(lengths)
        if sz - min_len <= num_mask:
            min_len = sz - num_mask - 1
        mask_idc = rs.choice(sz - min_len, num_mask, replace=False)
        mask_idc = np.asarray([mask_idc[j] + offset for j in range(len(mask_idc)) for offset in range(lengths[j])])
        mask_idcs.append(np.unique(mask_idc[mask_idc < sz]))
    min_len = min(len(m) for m in mask_idcs)
    for i, mask_idc in enumerate(mask_idcs):
        if len(mask_idc) > min_len:
            mask_idc = rs.choice(mask_idc, min_len, replace=False)
        mask[i, mask_idc] = True
    return mask


B, T = 8, 75  # a batch of ~3 s utterances at 25 Hz
PADDING = np.zeros((B, T), dtype=bool)
for _row, _pad in enumerate([0, 5, 10, 20, 30, 15, 25, 8]):
    PADDING[_row, T - _pad:] = True


def _fractions(padding):
    ours, ref = [], []
    valid = B * T if padding is None else int((~padding).sum())
    for seed in range(200):
        m = fairseq_compute_mask_indices((B, T), padding, 0.8, 10, 2, np.random.RandomState(seed))
        ref.append(m.sum() / valid)
        pm = None if padding is None else torch.from_numpy(padding)
        mm, _ = compute_span_mask(pm, B, T, 0.8, 10, generator=torch.Generator().manual_seed(seed))
        ours.append(int(mm.sum()) / valid)
        for mask in (m, mm.numpy()):  # fairseq equalises: every row has the same number of masked frames
            assert len(set(mask.sum(1).tolist())) == 1
            if padding is not None:
                assert not mask[padding].any()
    return np.mean(ours), np.mean(ref)


@pytest.mark.parametrize("padding", [None, PADDING], ids=["no_padding", "padding"])
def test_masked_fraction_matches_fairseq_on_fixed_seeds(padding):
    ours, ref = _fractions(padding)
    # 200 batches each; the two means differ by sampling noise only (std of a mean ~0.004)
    assert abs(ours - ref) < 0.02, (ours, ref)
    # and both are far below mask_prob (overlap + equalisation), unlike the old with-replacement draw (0.57)
    assert 0.3 < ours < 0.5


def test_starts_are_drawn_without_replacement():
    # p=0.5, span 1, 20 frames: n = int(10 + U) = 10 starts from range(19). Drawn without replacement
    # they are 10 distinct frames every time; with replacement (the old code) 10 draws from 19
    # collide in ~93 % of rows.
    for seed in range(20):
        mask, spans = compute_span_mask(None, 4, 20, 0.5, 1, generator=torch.Generator().manual_seed(seed))
        assert mask.sum(1).tolist() == [10, 10, 10, 10]
        assert not mask[:, 19].any()  # starts never reach sz - mask_length = 19


def test_spans_are_the_merged_runs_of_the_mask():
    mask, spans = compute_span_mask(torch.from_numpy(PADDING), B, T, 0.8, 10, generator=torch.Generator().manual_seed(3))
    rebuilt = torch.zeros_like(mask)
    for b, start, end in spans:
        assert not rebuilt[b, start:end].any()
        rebuilt[b, start:end] = True
        assert start == 0 or not mask[b, start - 1]  # maximal runs: not extendable on either side
        assert end == T or not mask[b, end]
    assert torch.equal(rebuilt, mask)


def test_mask_is_deterministic_given_the_generator():
    a, _ = compute_span_mask(None, B, T, 0.8, 10, generator=torch.Generator().manual_seed(7))
    b, _ = compute_span_mask(None, B, T, 0.8, 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- features_pen, feature_grad_mult
def _batch(frames=12, batch=2):
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, 104, frames, generator=g)
    video = torch.randn(batch, 1, frames, 88, 88, generator=g)
    targets = torch.randint(4, 104, (batch, frames), generator=g)
    return audio, video, targets


def _quiet(**kw):
    return avhubert_tiny(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0,
                         modality_dropout=0.0, **kw)


def test_features_pen_is_the_mean_square_of_the_fused_frontend_features_and_weighted_into_the_loss():
    torch.manual_seed(0)
    model = AVHubertModel(_quiet(masking_type="feature"))
    audio, video, targets = _batch()
    loss0, logs0 = model.forward_pretrain(audio, video, None, targets, generator=torch.Generator().manual_seed(1))
    loss10, logs10 = model.forward_pretrain(audio, video, None, targets, generator=torch.Generator().manual_seed(1),
                                            features_pen_weight=10.0)
    fa, fv = model.extract_frontends(audio, video)
    expected = torch.cat([fa, fv], dim=-1).pow(2).mean().detach()
    assert logs10["features_pen"] == pytest.approx(float(expected), rel=1e-5)
    assert float((loss10 - loss0).detach()) == pytest.approx(10.0 * float(expected), rel=1e-4)


@pytest.mark.parametrize("mult", [0.1, 0.0])
def test_feature_grad_mult_scales_the_frontend_gradient_only(mult):
    audio, video, targets = _batch()
    grads = {}
    for m in (1.0, mult):
        torch.manual_seed(0)
        model = AVHubertModel(_quiet(masking_type="feature", feature_grad_mult=m))
        model.eval()  # BatchNorm statistics fixed, so both models compute the same function
        loss, _ = model.forward_pretrain(audio, video, None, targets, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads[m] = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    full, scaled = grads[1.0], grads[mult]
    for name in ("feature_extractor_audio.proj.weight", "feature_extractor_video.resnet.frontend3D.0.weight"):
        if mult == 0.0:
            assert scaled[name] is None or not scaled[name].any()
        else:
            torch.testing.assert_close(scaled[name], mult * full[name], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scaled["post_extract_proj.weight"], full["post_extract_proj.weight"])


# --------------------------------------------------------------------------- modality dropout
def test_finetuning_forward_never_drops_a_modality_unless_asked():
    audio, video, _ = _batch()
    torch.manual_seed(0)
    model = AVHubertModel(avhubert_tiny(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0,
                                        modality_dropout=1.0))
    model.train()
    model.feature_extractor_video.eval()  # BatchNorm in eval: the only randomness left is modality dropout
    with torch.no_grad():
        fa, fv = model.extract_frontends(audio, video)
        reference = model.encode(model.fuse(fa, fv)).last_hidden_state
        outs = [model(audio, feat_video=fv).last_hidden_state for _ in range(10)]
    for out in outs:  # modality_dropout=1.0 would zero a modality on every call; fine-tuning ignores it
        torch.testing.assert_close(out, reference)
    model.cfg.finetune_modality_dropout = True
    with torch.no_grad():
        dropped = [model(audio, feat_video=fv).last_hidden_state for _ in range(10)]
    assert all(not torch.allclose(out, reference) for out in dropped)


# --------------------------------------------------------------------------- iteration configs
def _compose(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=list(overrides))


def test_iteration_configs_follow_the_original_yamls():
    from training.avhubert.pretrain import pretrain_model_config

    it1 = pretrain_model_config(_compose())  # default: iteration 1
    assert (it1.masking_type, it1.mask_prob_audio, it1.mask_length_audio, it1.mask_prob_image, it1.mask_length_image) == \
        ("feature", 0.8, 10, 0.8, 10)
    assert it1.modality_dropout == 0.0 and it1.feature_grad_mult == 0.1 and it1.encoder_layerdrop == 0.05
    assert it1.num_classes == 104 and AVHubertModel(it1).mask_emb.shape == (128,)  # feature masking: [D]
    cfg5 = _compose("pretrain=iter5")
    it5 = pretrain_model_config(cfg5)
    assert (it5.masking_type, it5.mask_prob_audio, it5.mask_length_audio, it5.mask_prob_image, it5.mask_length_image) == \
        ("input", 0.8, 10, 0.3, 5)
    assert it5.modality_dropout == 0.5 and it5.audio_dropout == 0.5
    assert cfg5.pretrain.iteration == 5 and cfg5.pretrain.target_checkpoint.endswith("iter1/checkpoint_last.pt")
    assert AVHubertModel(it5).mask_emb.shape == (104,)
    it2 = _compose("pretrain=iter2").pretrain
    assert it2.iteration == 2 and it2.masking_type == "feature" and it2.target_layer >= 1
    # fine-tuning keeps modality dropout off unless asked
    assert _compose().model.finetune_modality_dropout is False
