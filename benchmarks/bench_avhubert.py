"""AV-HuBERT: tiny training throughput (with / without the cached frozen video front-end), base forward
time, masks + contrastive overhead, peak memory. Ratios are measured in one run."""

from __future__ import annotations

import torch

from benchmarks.common import compare, peak_rss_mb, time_it, write_result
from models.adapters import AdapterSpec, apply_adapter
from models.avhubert import AVHubertModel, avhubert_base, avhubert_tiny, freeze_frontends
from models.heads import AVHubertForCTC
from privacy.contrastive import ProjectionHead
from privacy.masks import build_masks
from privacy.system import MaskedAVSR

B, T = 8, 50  # 8 utterances of 2 s (25 fps)


def _batch(d_audio=104):
    g = torch.Generator().manual_seed(0)
    return {
        "audio": torch.randn(B, d_audio, T, generator=g),
        "video": torch.randn(B, 1, T, 88, 88, generator=g),
        "targets": torch.randint(1, 29, (B, 20), generator=g),
        "target_lengths": torch.full((B,), 20),
        "speaker_idx": torch.arange(B) // 2,
    }


def _system(masks: bool, contrastive: bool) -> MaskedAVSR:
    torch.manual_seed(0)
    core = AVHubertModel(avhubert_tiny())
    asr = AVHubertForCTC(core, 29)
    freeze_frontends(asr)
    m = build_masks("both", dim=core.cfg.encoder_embed_dim, num_layers=core.cfg.encoder_layers) if masks else None
    proj = ProjectionHead(core.cfg.encoder_embed_dim, 128) if contrastive else None
    spec = AdapterSpec(kind="adalora", tinit=10, tfinal=10, total_step=100, delta_t=5)
    apply_adapter(core.encoder, spec)
    for p in asr.ctc_proj.parameters():
        p.requires_grad_(True)
    return MaskedAVSR(asr, m, proj)


def _train_step(system: MaskedAVSR, batch, cached_video, contrastive: bool):
    params = [p for p in system.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-3)

    def step():
        out = system(batch["audio"], None if cached_video is not None else batch["video"], None,
                     feat_video=cached_video, capture=contrastive)
        loss = system.asr.ctc_loss(out.ctc, batch["targets"], batch["target_lengths"])
        if contrastive:
            loss = loss + 0.1 * system.contrastive_loss(out, batch["speaker_idx"], None, 0.1)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def run() -> dict:
    batch = _batch()
    utt_seconds = B * T / 25.0
    plain = _system(False, False)
    private = _system(True, True)
    with torch.no_grad():
        cached = plain.core.extract_frontends(None, batch["video"])[1]
    t = compare({
        "full": _train_step(plain, batch, None, False),
        "cached": _train_step(plain, batch, cached, False),
        "private": _train_step(private, batch, cached, True),
    }, rounds=5)
    t_full, t_cached, t_private = ({"median_s": t[k]} for k in ("full", "cached", "private"))
    # Pretraining trains the video front-end, so it cannot use the cache.
    pre = AVHubertModel(avhubert_tiny())
    opt = torch.optim.AdamW(pre.parameters(), 1e-3)
    targets = torch.randint(4, 104, (B, T))

    def pretrain_step():
        loss, _ = pre.forward_pretrain(batch["audio"], batch["video"], None, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()

    t_pre = time_it(pretrain_step, repeat=3)
    torch.manual_seed(0)
    base = AVHubertModel(avhubert_base()).eval()
    b1 = {"audio": batch["audio"][:1], "video": batch["video"][:1]}
    with torch.no_grad():
        cached_base = base.extract_frontends(None, b1["video"])[1]
        t_base = time_it(lambda: base(b1["audio"], b1["video"]), repeat=3)
        t_base_cached = time_it(lambda: base(b1["audio"], None, feat_video=cached_base), repeat=3)
    result = {
        "batch": {"utterances": B, "frames": T, "utterance_seconds": utt_seconds},
        "tiny_finetune_step_s": {"frontends_computed": t_full["median_s"], "video_frontend_cached": t_cached["median_s"]},
        "tiny_finetune_utt_seconds_per_wall_second": {"frontends_computed": utt_seconds / t_full["median_s"],
                                                      "video_frontend_cached": utt_seconds / t_cached["median_s"]},
        "tiny_pretrain_step_s": t_pre["median_s"],
        "tiny_pretrain_utt_seconds_per_wall_second": utt_seconds / t_pre["median_s"],
        "masks_contrastive_step_over_plain_step": t_private["median_s"] / t_cached["median_s"],
        "masks_contrastive_overhead_goal": 1.3,
        "base_forward_1x2s_s": {"frontends_computed": t_base["median_s"], "video_frontend_cached": t_base_cached["median_s"]},
        "peak_rss_mb": peak_rss_mb(),
    }
    write_result("avhubert", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
