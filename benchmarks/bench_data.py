"""SynthGRID generation speed (seconds of audio-video per wall second) and loader throughput
(batches/s) against what fine-tuning consumes (steps/s), measured in one run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import training.config  # noqa: F401
from benchmarks.common import write_result
from training.config import PROJECT_ROOT


def _cfg(data_dir: str, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=[f"paths.data_dir={data_dir}", *overrides])


def run(num_speakers: int = 12, utterances: int = 10) -> dict:
    from data.dataset import build_dataloader
    from data.synthgrid import generate_corpus
    from data.tokenizer import CharTokenizer
    from training.avhubert.finetune import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(tmp, f"data.num_speakers={num_speakers}", f"data.utterances_per_speaker={utterances}")
        stats = generate_corpus(cfg, Path(cfg.data.dir), num_workers=2, progress=False)
        tok = CharTokenizer()
        loader_stats = {}
        for name, modalities in (("audio_video", ("audio", "video")), ("audio_only_cached_video", ("audio",))):
            ds = make_dataset(cfg, "public", tok, train=True, modalities=modalities)
            loader = build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=0, train=True)
            t0 = time.perf_counter()
            n = sum(1 for _ in loader)
            loader_stats[name] = {"batches_per_s": n / (time.perf_counter() - t0), "batch_size": 16}
    # What training consumes per step (tiny fine-tuning step with the cached video front-end)
    from benchmarks.bench_avhubert import _batch, _system, _train_step
    from benchmarks.common import time_it

    system = _system(False, False)
    batch = _batch()
    with torch.no_grad():
        cached = system.core.extract_frontends(None, batch["video"])[1]
    step = time_it(_train_step(system, batch, cached, False), repeat=5)["median_s"]
    pre = time_it(_train_step(system, batch, None, False), repeat=3)["median_s"]
    result = {
        "generation": {k: stats[k] for k in ("utterances", "audio_seconds", "wall_seconds", "realtime_factor", "num_workers")},
        "generation_goal_realtime_factor": 20.0,
        "loader": loader_stats,
        "training_steps_per_s": {"finetune_cached_video_batch8": 1.0 / step, "frontends_computed_batch8": 1.0 / pre},
        "loader_over_training_rate": {
            "finetune (audio-only loading, cached video)": loader_stats["audio_only_cached_video"]["batches_per_s"] * 2 / (1.0 / step),
            "pretrain (audio+video loading)": loader_stats["audio_video"]["batches_per_s"] * 2 / (1.0 / pre),
        },
        "note": "loader batches hold 16 utterances, training steps 8: rates are compared per utterance; > 1 means the loader is not the bottleneck",
    }
    write_result("data", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
