"""AV-HuBERT model: shapes, padding, frozen front-ends, hooks, pretraining, parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.avhubert import (
    AVHubertConfig,
    AVHubertModel,
    WeightNormConv1d,
    avhubert_base,
    avhubert_large,
    avhubert_tiny,
    compute_span_mask,
    count_parameters,
    freeze_frontends,
)
from models.heads import AVHubertForCTC

B, T, H = 2, 12, 88


def tiny(**kw) -> AVHubertModel:
    torch.manual_seed(0)
    cfg = avhubert_tiny(dropout=0.0, attention_dropout=0.0, **kw)
    return AVHubertModel(cfg)


def inputs(batch: int = B, frames: int = T, size: int = H):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 104, frames, generator=g), torch.randn(batch, 1, frames, size, size, generator=g)


@pytest.mark.parametrize("modalities", ["audio", "video", "audio_video"])
def test_output_shapes_per_modality(modalities):
    model = tiny().eval()
    audio, video = inputs()
    out = model(audio=audio if "audio" in modalities else None, video=video if "video" in modalities else None,
                output_hidden_states=True)
    d = model.cfg.encoder_embed_dim
    assert out.last_hidden_state.shape == (B, T, d)
    assert len(out.hidden_states) == model.cfg.encoder_layers + 1
    assert (out.feat_audio is not None) == ("audio" in modalities)
    assert (out.feat_video is not None) == ("video" in modalities)
    assert torch.isfinite(out.last_hidden_state).all()


def test_missing_modality_is_zeros_at_frontend_output():
    model = tiny().eval()
    audio, _ = inputs()
    only_audio = model(audio=audio).last_hidden_state
    feat_audio, _ = model.extract_frontends(audio, None)
    explicit = model.encode(model.fuse(feat_audio, torch.zeros_like(feat_audio))).last_hidden_state
    torch.testing.assert_close(only_audio, explicit)


def test_bad_inputs_are_named():
    model = tiny().eval()
    audio, video = inputs()
    with pytest.raises(ValueError, match="audio must be"):
        model(audio=audio[:, :50])
    with pytest.raises(ValueError, match="disagree"):
        model(audio=audio, video=video[:, :, :-1])
    with pytest.raises(ValueError, match="neither"):
        model()


def test_padding_does_not_change_unpadded_frames():
    model = tiny().eval()
    audio, video = inputs()
    length = 8
    padding_mask = torch.zeros(B, T, dtype=torch.bool)
    padding_mask[1, length:] = True
    video[1, :, length:] = 0.0  # the collate pads video with zeros (the 3-D stem sees 2 frames ahead)
    padded = model(audio=audio, video=video, padding_mask=padding_mask).last_hidden_state
    # Different garbage in the padded audio frames changes nothing.
    audio2 = audio.clone()
    audio2[1, :, length:] = 100.0
    padded2 = model(audio=audio2, video=video, padding_mask=padding_mask).last_hidden_state
    torch.testing.assert_close(padded[1, :length], padded2[1, :length])
    # And equals the same utterance run alone without padding.
    alone = model(audio=audio[1:, :, :length], video=video[1:, :, :length]).last_hidden_state
    torch.testing.assert_close(padded[1, :length], alone[0], atol=1e-5, rtol=1e-4)
    # The unpadded utterance is unaffected by its neighbour's padding.
    alone0 = model(audio=audio[:1], video=video[:1]).last_hidden_state
    torch.testing.assert_close(padded[0], alone0[0], atol=1e-5, rtol=1e-4)


def test_frozen_frontends_get_no_gradient_and_keep_bn_stats():
    model = AVHubertForCTC(tiny(), vocab_size=10)
    freeze_frontends(model)
    model.train()
    assert not model.avhubert.feature_extractor_video.training
    bn = model.avhubert.feature_extractor_video.resnet.frontend3D[1]
    stats_before = bn.running_mean.clone()
    audio, video = inputs()
    out = model(audio=audio, video=video)
    loss = model.ctc_loss(out, torch.randint(1, 10, (B, 4)), torch.tensor([4, 3]))
    loss.backward()
    core = model.avhubert
    for name, p in core.named_parameters():
        if name.startswith("feature_extractor_"):
            assert not p.requires_grad and p.grad is None, name
    assert core.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert core.post_extract_proj.weight.grad.abs().sum() > 0
    assert model.ctc_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(bn.running_mean, stats_before)


def test_frontend_hook_and_layer_hook_are_applied():
    model = tiny().eval()
    audio, video = inputs()
    seen_layers = []

    def frontend_hook(fa, fv):
        return fa * 0.0, fv

    def layer_hook(i, x):
        seen_layers.append(i)
        return x + 1.0 if i == 1 else x

    base = model(audio=audio, video=video).last_hidden_state
    zero_audio = model(audio=audio, video=video, frontend_hook=frontend_hook)
    video_only = model(video=video).last_hidden_state
    torch.testing.assert_close(zero_audio.last_hidden_state, video_only)
    assert torch.equal(zero_audio.feat_audio, torch.zeros_like(zero_audio.feat_audio))

    hooked = model(audio=audio, video=video, layer_hook=layer_hook, output_hidden_states=True)
    assert seen_layers == list(range(model.cfg.encoder_layers))
    assert not torch.allclose(hooked.last_hidden_state, base)
    plain = model(audio=audio, video=video, output_hidden_states=True)
    torch.testing.assert_close(hooked.hidden_states[1], plain.hidden_states[1])  # before the hooked layer
    torch.testing.assert_close(hooked.hidden_states[2], plain.hidden_states[2] + 1.0)


def test_attention_matches_reference_multihead_attention():
    """Our SDPA attention on q/k/v/out_proj equals torch's MultiheadAttention with the same weights."""
    model = tiny().eval()
    attn = model.encoder.layers[0].self_attn
    d = model.cfg.encoder_embed_dim
    ref = torch.nn.MultiheadAttention(d, model.cfg.encoder_attention_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        ref.out_proj.load_state_dict(attn.out_proj.state_dict())
    x = torch.randn(2, 7, d)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    expected, _ = ref(x, x, x, key_padding_mask=pad)
    torch.testing.assert_close(attn(x, pad), expected, atol=1e-5, rtol=1e-4)


def test_weight_norm_conv_matches_torch_weight_norm():
    conv = WeightNormConv1d(16, kernel_size=8, groups=4)
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand_like(conv.weight_g) + 0.5)
    ref = torch.nn.Conv1d(16, 16, 8, padding=4, groups=4)
    ref = torch.nn.utils.parametrizations.weight_norm(ref, name="weight", dim=2)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(conv.weight_g)
        ref.parametrizations.weight.original1.copy_(conv.weight_v)
        ref.bias.copy_(conv.bias)
    x = torch.randn(2, 16, 20)
    torch.testing.assert_close(conv(x), ref(x))
    copy.deepcopy(conv)  # unlike the deprecated nn.utils.weight_norm


def test_state_dict_uses_original_key_names():
    keys = set(tiny().state_dict())
    for key in [
        "mask_emb", "feature_extractor_audio.proj.weight", "feature_extractor_video.proj.bias",
        "feature_extractor_video.resnet.frontend3D.0.weight", "feature_extractor_video.resnet.frontend3D.1.running_var",
        "feature_extractor_video.resnet.frontend3D.2.weight",
        "feature_extractor_video.resnet.trunk.layer2.0.downsample.0.weight",
        "feature_extractor_video.resnet.trunk.layer4.1.relu2.weight", "layer_norm.weight", "post_extract_proj.weight",
        "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias",
        "encoder.layers.3.self_attn.out_proj.weight", "encoder.layers.0.self_attn_layer_norm.bias",
        "encoder.layers.0.fc1.weight", "encoder.layers.0.final_layer_norm.weight", "encoder.layer_norm.weight",
        "final_proj.weight", "label_embs_concat",
    ]:
        assert key in keys, key
    assert "feature_extractor_video.resnet.trunk.layer1.0.downsample.0.weight" not in keys


def test_base_shapes_match_released_checkpoint_table():
    with torch.device("meta"):
        model = AVHubertModel(avhubert_base())
    sd = model.state_dict()
    assert sd["encoder.pos_conv.0.weight_g"].shape == (1, 1, 128)
    assert sd["encoder.pos_conv.0.weight_v"].shape == (768, 48, 128)
    assert sd["layer_norm.weight"].shape == (1536,)
    assert sd["post_extract_proj.weight"].shape == (768, 1536)
    assert sd["feature_extractor_video.resnet.frontend3D.0.weight"].shape == (64, 1, 5, 7, 7)
    assert sd["feature_extractor_video.resnet.trunk.layer3.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    assert sd["feature_extractor_video.proj.weight"].shape == (768, 512)
    assert sd["mask_emb"].shape == (104,)
    assert sd["final_proj.weight"].shape == (256, 768)


@pytest.mark.parametrize("preset, expected", [(avhubert_base, 103e6), (avhubert_large, 325e6)])
def test_parameter_counts(preset, expected):
    count = count_parameters(preset())
    assert abs(count - expected) / expected < 0.02, count


def test_tiny_is_small():
    assert 0.5e6 < count_parameters(avhubert_tiny()) < 5e6


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="encoder_attention_heads"):
        AVHubertConfig(encoder_embed_dim=100, encoder_attention_heads=3)
    with pytest.raises(ValueError, match="modality_fuse"):
        AVHubertConfig(modality_fuse="sum")


def test_add_fusion_has_no_post_extract_proj():
    model = tiny(modality_fuse="add").eval()
    assert model.post_extract_proj is None
    audio, video = inputs()
    assert model(audio=audio, video=video).last_hidden_state.shape == (B, T, 128)


def test_span_mask_counts_and_padding():
    torch.manual_seed(0)
    pad = torch.zeros(3, 50, dtype=torch.bool)
    pad[2, 20:] = True
    mask, spans = compute_span_mask(pad, 3, 50, mask_prob=0.8, mask_length=10)
    assert not (mask & pad).any()
    # fairseq equalises rows: each keeps as many masked frames as the least-masked row has; the
    # short row (20 frames, n = max(2, int(1.6 + U)) = 2 spans of 10) has at most 20
    counts = mask.sum(1).tolist()
    assert len(set(counts)) == 1 and 0 < counts[0] <= 20
    # spans are the merged runs of the mask
    assert sum(end - start for _, start, end in spans) == sum(counts)


def test_input_mask_replaces_video_spans_with_frames_of_same_sequence():
    model = tiny(mask_prob_image=0.5, mask_length_image=3, mask_prob_audio=0.5, mask_length_audio=3)
    frames = 20
    audio = torch.randn(2, 104, frames)
    # Each frame is a constant image carrying its (batch, frame) identity.
    ident = (torch.arange(2).view(2, 1) * 100 + torch.arange(frames).view(1, -1)).float()
    video = ident.view(2, 1, frames, 1, 1).expand(2, 1, frames, 8, 8).clone()
    torch.manual_seed(3)
    a2, v2, mask = model.apply_input_mask(audio, video, None)
    assert mask.any()
    new_ident = v2[:, 0, :, 0, 0]
    assert torch.equal(new_ident[~mask], ident[~mask])
    for b in range(2):
        assert ((new_ident[b] // 100) == b).all()  # frames come from the same sequence
    audio_masked = (a2 == model.mask_emb.view(1, -1, 1)).all(dim=1)
    assert audio_masked.any() and torch.equal(a2[~audio_masked.unsqueeze(1).expand_as(a2)],
                                              audio[~audio_masked.unsqueeze(1).expand_as(a2)])


def test_pretraining_loss_decreases():
    torch.manual_seed(0)
    cfg = avhubert_tiny(num_classes=12, dropout=0.0, attention_dropout=0.0, modality_dropout=0.5, audio_dropout=0.5,
                        encoder_layers=2, resnet_stem_channels=8, resnet_widths=[8, 8, 16, 16])
    model = AVHubertModel(cfg).train()
    audio, video = inputs(batch=2, frames=16, size=24)
    targets = torch.randint(0, 12, (2, 16), generator=torch.Generator().manual_seed(2))
    padding_mask = torch.zeros(2, 16, dtype=torch.bool)
    padding_mask[1, 12:] = True
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        loss, logs = model.forward_pretrain(audio, video, padding_mask, targets,
                                            generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert logs["n_masked"] > 0 and 0.0 <= logs["acc_masked"] <= 1.0
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_pretraining_logits_are_cosine_over_temperature():
    model = tiny(num_classes=7)
    proj = torch.randn(5, model.cfg.projection_dim)
    expected = F.cosine_similarity(proj.unsqueeze(1), model.label_embs_concat.unsqueeze(0), dim=-1) / 0.1
    torch.testing.assert_close(model.compute_logits(proj), expected)


def test_pretraining_rejects_bad_targets():
    model = tiny(num_classes=7)
    audio, video = inputs()
    with pytest.raises(ValueError, match="targets must be in"):
        model.forward_pretrain(audio, video, None, torch.full((B, T), 7))
    with pytest.raises(ValueError, match=r"targets must be \[B, T\]"):
        model.forward_pretrain(audio, video, None, torch.zeros(B, T + 1, dtype=torch.long))


def test_ctc_head_shapes_and_loss():
    model = AVHubertForCTC(tiny(), vocab_size=9, final_dropout=0.0).eval()
    audio, _ = inputs()
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 10:] = True
    out = model(audio=audio, padding_mask=pad)
    assert out.logits.shape == (B, T, 9) and out.log_probs.shape == (B, T, 9)
    assert out.output_lengths.tolist() == [10, T]
    assert out.pooled.shape == (B, 128)
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(B, T))
    loss = model.ctc_loss(out, torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]))
    assert torch.isfinite(loss) and loss > 0
    impossible = model.ctc_loss(out, torch.ones(B, 40, dtype=torch.long), torch.tensor([40, 40]))
    assert impossible.item() == 0.0  # zero_infinity


def test_modality_dropout_only_in_training():
    model = tiny(modality_dropout=1.0, audio_dropout=1.0)
    audio, video = inputs()
    fa, fv = model.extract_frontends(audio, video)
    model.train()
    da, dv = model.modality_dropout(fa, fv)
    assert torch.equal(da, torch.zeros_like(fa)) and torch.equal(dv, fv)
    model.eval()
    da, dv = model.modality_dropout(fa, fv)
    assert da is fa and dv is fv
