"""RJCA attacker: training throughput (utterances/s) and scoring time per 1,000 trials."""

from __future__ import annotations

import time

import torch

from benchmarks.common import time_it, write_result
from models.rjca import AAMSoftmax, RJCAConfig, RJCASpeakerVerifier


def run() -> dict:
    torch.manual_seed(0)
    out = {}
    for name, overrides in (("rjca_small", dict(segments=4, audio_dim=64, video_dim=64, embed_dim=64, ecapa_channels=64,
                                                 ecapa_se_channels=32, visual_channels=64, pool_attention_dim=32, lstm_layers=1)),
                            ("rjca", {})):
        cfg = RJCAConfig(audio_feat_dim=128, video_feat_dim=128, **overrides)
        model = RJCASpeakerVerifier(cfg)
        head = AAMSoftmax(cfg.embed_dim, 12)
        opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), 1e-3)
        B, T = 32, 50
        a, v, y = torch.randn(B, T, 128), torch.randn(B, T, 128), torch.randint(0, 12, (B,))

        def step():
            loss, _ = head(model(a, v), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

        t_step = time_it(step, repeat=3)["median_s"]
        # Scoring 1,000 trials: embed 2,000 utterances once (batches of 64), then 1,000 cosines.
        aa, vv = torch.randn(64, T, 128), torch.randn(64, T, 128)
        t_embed = time_it(lambda: model.embed(aa, vv), repeat=3)["median_s"]
        e = torch.nn.functional.normalize(torch.randn(2000, cfg.embed_dim), dim=-1)
        t0 = time.perf_counter()
        RJCASpeakerVerifier.score_trials(e[:1000], e[1000:])
        t_cos = time.perf_counter() - t0
        out[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "train_utterances_per_s": B / t_step,
            "scoring_s_per_1000_trials": (2000 / 64) * t_embed + t_cos,
        }
    write_result("attacker", {"input": "feature sequences [2 s x 25 fps x 128]", **out})
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
