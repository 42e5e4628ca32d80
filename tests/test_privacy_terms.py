"""Privacy pressure on the masks themselves: contrastive term without a learned head and with
protected negatives, the gradient-reversal adversary, the noise-level term (privacy/system.py,
privacy/adversary.py, privacy/contrastive.py)."""

import pytest
import torch
import torch.nn.functional as F

from models.avhubert import AVHubertModel, avhubert_tiny
from models.heads import AVHubertForCTC
from privacy.adversary import SpeakerAdversary, adversary_loss, check_privacy_terms, gradient_reversal
from privacy.contrastive import privacy_contrastive_loss
from privacy.masks import build_masks
from privacy.system import MaskedAVSR

B, T = 8, 10  # 4 speakers x 2 utterances


def tiny_system(adversary=None, adversary_input="fused", kind="additive", granularity="utterance"):
    torch.manual_seed(0)
    core = AVHubertModel(avhubert_tiny(dropout=0.0, attention_dropout=0.0, modality_dropout=0.0, audio_dropout=0.0))
    asr = AVHubertForCTC(core, vocab_size=5, final_dropout=0.0)
    masks = build_masks(kind, dim=core.cfg.encoder_embed_dim, modalities=("audio",), init_scale=0.5, noise_granularity=granularity,
                        generator=torch.Generator().manual_seed(1))
    return MaskedAVSR(asr, masks, projection=None, adversary=adversary, adversary_input=adversary_input)


def audio_batch():
    g = torch.Generator().manual_seed(2)
    spk = torch.arange(4).repeat_interleave(2)
    audio = torch.randn(B, 104, T, generator=g) + spk.view(B, 1, 1).float()  # speaker-dependent offset
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 7:] = True
    return audio, pad, spk


def mask_params(system):
    return {n: p for n, p in system.named_parameters() if n.startswith("masks.")}


def test_protected_negatives_match_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    spk = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, _ = privacy_contrastive_loss(a, p, spk, temperature=0.5, negatives_from="protected")
    an, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    ref = 0.0
    for i in range(6):
        pos = torch.exp(an[i] @ pn[i] / 0.5)
        neg = sum(torch.exp(an[i] @ an[j] / 0.5) for j in range(6) if j != i and spk[j] == spk[i])
        ref = ref - torch.log(pos / (pos + neg))
    torch.testing.assert_close(loss, ref / 6)
    clean, _ = privacy_contrastive_loss(a, p, spk, temperature=0.5, negatives_from="clean")
    assert not torch.isclose(loss, clean)
    with pytest.raises(ValueError, match="loss.negatives must be one of"):
        privacy_contrastive_loss(a, p, spk, negatives_from="noisy")


def test_contrastive_term_without_head_trains_only_the_masks():
    """No projection head: the gradient of L_con lands on the masks (nothing else is on its path)."""
    system = tiny_system()
    audio, pad, spk = audio_batch()
    out = system(audio, None, pad, capture=True)
    loss, logs = system.privacy_loss(out, spk, pad, contrastive_weight=1.0, negatives_from="protected")
    loss.backward()
    grads = {n: p.grad for n, p in system.named_parameters()}
    masks = mask_params(system)
    assert masks and all(grads[n] is not None and grads[n].abs().sum() > 0 and torch.isfinite(grads[n]).all() for n in masks)
    assert all(g is None for n, g in grads.items() if not n.startswith("masks.") and not n.startswith("asr.avhubert.feature_extractor")
               and "layer_norm" not in n and "post_extract_proj" not in n), "only the masks (and the frozen fusion) are on the path"
    assert {"contrastive", "cl_pos_sim", "cl_accuracy"} <= set(logs)


def test_gradient_reversal_flips_the_sign_at_the_masks_and_the_classifier_learns():
    adv = SpeakerAdversary(128, num_speakers=4, hidden_dim=32, grl_scale=1.0)
    system = tiny_system(adversary=adv)
    audio, pad, spk = audio_batch()
    masks = list(mask_params(system).values())

    system.masks.generator.manual_seed(5)
    out = system(audio, None, pad, capture=True)
    reversed_grads = torch.autograd.grad(adversary_loss(out.adversary_logits, spk)[0], masks)
    # the same draw without the reversal layer: the plain gradient of the classifier's loss
    system.masks.generator.manual_seed(5)
    out = system(audio, None, pad, capture=True)
    from privacy.contrastive import masked_mean_over_time

    plain_logits = adv.net(masked_mean_over_time(out.protected, pad))
    torch.testing.assert_close(out.adversary_logits, plain_logits)  # identity forward
    plain_grads = torch.autograd.grad(F.cross_entropy(plain_logits, spk), masks)
    for r, p in zip(reversed_grads, plain_grads):
        assert p.abs().sum() > 0
        torch.testing.assert_close(r, -p)

    # the classifier itself is trained normally (its gradient is not reversed): its loss goes down
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        out = system(audio, None, pad, capture=True)
        loss, logs = system.privacy_loss(out, spk, pad, adversary_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and logs["adversary_acc"] > 0.5


def test_adversary_pushes_the_mask_noise_up():
    """Masks alone against the reversed classifier on speaker-separable features: to confuse it they
    raise their noise level."""
    torch.manual_seed(0)
    spk = torch.arange(4).repeat_interleave(8)
    centres = torch.randn(4, 16) * 2
    masks = build_masks("additive", dim=16, init_scale=0.3, noise_granularity="utterance",
                        generator=torch.Generator().manual_seed(0), modalities=("audio",))
    adv = SpeakerAdversary(16, 4, hidden_dim=32)
    opt = torch.optim.Adam(list(masks.parameters()) + list(adv.parameters()), lr=2e-2)
    start = masks.masks["audio"].additive.relative_sigma().mean().item()
    for _ in range(150):
        x = centres[spk].unsqueeze(1) + 0.3 * torch.randn(len(spk), 6, 16)
        protected, _ = masks(x, None)
        loss, _ = adversary_loss(adv(protected), spk)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert masks.masks["audio"].additive.relative_sigma().mean().item() > 1.1 * start


def test_gradient_reversal_scale():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    (gradient_reversal(x, 0.5) * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * w)


def test_noise_level_term_raises_sigma():
    system = tiny_system()
    audio, pad, spk = audio_batch()
    out = system(audio, None, pad, capture=True)
    term, _ = system.privacy_loss(out, spk, pad, noise_weight=0.3)
    torch.testing.assert_close(term, -0.3 * system.masks.mean_log_sigma())
    before = system.masks.mean_log_sigma().item()
    opt = torch.optim.SGD(mask_params(system).values(), lr=1.0)
    opt.zero_grad()
    term.backward()
    opt.step()
    assert system.masks.mean_log_sigma().item() > before


@pytest.mark.parametrize("kwargs, message", [
    (dict(adversary_weight=0.5, mask_name="none"), r"loss.adversary_weight=0.5 conflicts with masks=none"),
    (dict(adversary_input="video", mask_position="encoder"), r"loss.adversary_input=video conflicts with masks.position=encoder"),
    (dict(adversary_input="video", model_modalities=["audio"]), r"loss.adversary_input=video conflicts with model.modalities=\['audio'\]"),
    (dict(adversary_input="audio", mask_modalities=["video"]), r"loss.adversary_input=audio conflicts with masks.modalities=\['video'\]"),
    (dict(noise_weight=0.1, mask_name="none", adversary_weight=0.0), r"loss.noise_weight=0.1 conflicts with masks=none"),
    (dict(adversary_weight=-1.0), r"loss.adversary_weight must be >= 0"),
])
def test_incompatible_privacy_terms_fail_naming_both_options(kwargs, message):
    args = dict(adversary_weight=0.5, adversary_input="fused", noise_weight=0.0, mask_name="both", mask_position="frontend",
                mask_modalities=["audio", "video"], model_modalities=["audio", "video"]) | kwargs
    with pytest.raises(ValueError, match=message):
        check_privacy_terms(**args)


def test_build_system_frozen_head_and_adversary(tmp_path):
    from hydra import compose, initialize_config_dir

    from data.manifest import Utterance, write_split
    from training.avhubert.finetune import build_system
    from training.config import PROJECT_ROOT

    write_split(tmp_path, "train", [Utterance(f"u{i}", "", f"a{i}.wav", 50, 32000, f"spk{i % 3}", "bin blue") for i in range(6)])
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = compose("config", overrides=["masks=both", "loss=ctc_contrastive", "loss.projection=frozen",
                                           "loss.adversary_weight=0.5", "model.checkpoint=null", f"data.dir={tmp_path}"])
    system, _, _ = build_system(cfg, vocab_size=6)
    assert system.projection is not None and not any(p.requires_grad for p in system.projection.parameters())
    assert system.adversary.num_speakers == 3 and all(p.requires_grad for p in system.adversary.parameters())
    assert cfg.paths.run_dir.endswith("both-s1.0-cl0.1-t0.1-pfrozen-adv0.5/s1")


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_noise_term_raises_sigma_only_where_the_task_tolerates_it(beta):
    """-beta * mean log sigma against a task that needs dimensions 0-3 clean and ignores 4-7 (as CTC
    ignores dimensions without words): sigma grows where the task's gradient is zero and does not
    grow where the task pays for the noise; without the term the ignored dimensions never move."""
    torch.manual_seed(0)
    masks = build_masks("additive", dim=8, init_scale=1.0, noise_granularity="utterance",
                        generator=torch.Generator().manual_seed(0), modalities=("audio",))
    mask = masks.masks["audio"].additive
    opt = torch.optim.Adam(masks.parameters(), lr=2e-2)
    for _ in range(200):
        x = torch.randn(16, 6, 8)
        protected, _ = masks(x, None)
        task = (protected - x)[..., :4].pow(2).mean()  # noise in dims 0-3 costs, in 4-7 it is free
        loss = task - beta * masks.mean_log_sigma()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sigma = mask.relative_sigma().detach()
    assert (sigma[:4] < 0.5).all()  # the task drives its own dimensions' noise down, with or without the term
    if beta == 0:
        torch.testing.assert_close(sigma[4:], torch.full((4,), 1.0))  # no gradient: no move
    else:
        assert (sigma[4:] > 2.0).all()


def test_sigma_summary_reports_the_per_dimension_spread():
    from privacy.masks import sigma_summary

    masks = build_masks("both", dim=10, init_scale=1.0, modalities=("audio", "video"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # additive audio sigma = 0.1, 0.2, ..., 1.0
        masks.masks["audio"].additive.rho_a.copy_(torch.log(torch.expm1(torch.linspace(0.1, 1.0, 10))))
    stats = sigma_summary(masks)
    assert {k.rsplit("/", 1)[0] for k in stats} == {"mask_sigma/audio/additive", "mask_sigma/audio/multiplicative",
                                                    "mask_sigma/video/additive", "mask_sigma/video/multiplicative"}
    a = {k.rsplit("/", 1)[1]: v for k, v in stats.items() if k.startswith("mask_sigma/audio/additive/")}
    assert a["min"] == pytest.approx(0.1, abs=1e-5) and a["max"] == pytest.approx(1.0, abs=1e-5)
    assert a["mean"] == pytest.approx(0.55, abs=1e-5) and a["median"] == pytest.approx(0.55, abs=1e-5)
    assert a["p10"] == pytest.approx(0.19, abs=1e-5) and a["p90"] == pytest.approx(0.91, abs=1e-5)
    assert stats["mask_sigma/video/multiplicative/min"] == pytest.approx(1.0) == stats["mask_sigma/video/multiplicative/max"]
    encoder = build_masks("additive", position="encoder", layer=0, dim=4, init_scale=2.0)
    assert sigma_summary(encoder)["mask_sigma/encoder/additive/median"] == pytest.approx(2.0)
