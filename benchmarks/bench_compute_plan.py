"""Compute plan for the paper's scale: one fine-tuning step of AV-HuBERT BASE and LARGE on this CPU.

For each size, in its own process (so peak memory is that model's alone), this builds the
system `experiment=lrs3_base` trains (`training.avhubert.finetune.build_system`: random weights of the
released architecture, CTC head over the SentencePiece vocabulary, masks=both, projection
head, AdaLoRA) and runs the fine-tuning step on a batch of the recipe's size
(`trainer.speakers_per_batch x trainer.utterances_per_speaker` utterances of FRAMES video
frames, video front-end computed, as `trainer.cache_frontends=false` does):

* step 1 under `torch.utils.flop_counter.FlopCounterMode`: FLOPs per step (forward + backward;
  matmuls, convolutions, attention; element-wise ops are not counted);
* step 2 timed: wall seconds and process CPU seconds (all threads) per step; peak resident
  memory after both steps. On a shared machine the wall time includes waiting for a core.

Then the GPU-hours the recipe needs: FLOPs/step x trainer.max_steps / (GPU bf16 peak x
utilisation). The peak is the vendor's dense bf16 figure and the utilisation an assumption,
both printed with the result (docs/paper_scale.md, "Compute plan"); the FLOPs and the CPU times are
measured. `gpu_hours_at_avhubert_batch` scales the FLOPs linearly to AV-HuBERT's own fine-tuning batch
(8 GPUs x 1000 frames per update) for comparison.

    nice -n 10 python -m benchmarks.bench_compute_plan            # both sizes
    nice -n 10 python -m benchmarks.bench_compute_plan --one large 4   # one size, a smaller batch (JSON line)
    python -m benchmarks.bench_compute_plan --derive   # recompute the estimates in compute_plan.json from its measurements
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

FRAMES = 150  # 6 s at 25 fps: LRS3 trainval clips are at most about 6 s
TARGET_TOKENS = 40  # SentencePiece units per 6 s utterance (about 15 words)
GPU_PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0}  # vendor dense bf16 peaks
ASSUMED_UTILISATION = 0.3  # model FLOPs utilisation assumed for the GPU estimate (not measured)


def _compose(size: str):
    from hydra import compose, initialize_config_dir

    import training.config  # noqa: F401  (schemas, resolvers)
    from training.config import PROJECT_ROOT

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=["experiment=lrs3_base", f"model=avhubert_{size}", "model.checkpoint=null"])


def measure(size: str, batch: int | None = None) -> dict:
    """One model size in this process: FLOPs of one step, time of the next, peak memory."""
    import logging

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import peak_rss_mb
    from models.adapters import count_parameters
    from training.avhubert.finetune import build_system

    logging.disable(logging.WARNING)  # "model.checkpoint is null": random weights are what we want here
    cfg = _compose(size)
    tc = cfg.trainer
    batch = batch or tc.speakers_per_batch * tc.utterances_per_speaker
    vocab = int(cfg.data.sentencepiece_vocab)
    torch.manual_seed(0)
    system, adapter, _ = build_system(cfg, vocab)
    system.train()
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, 104, FRAMES, generator=g)
    video = torch.randn(batch, 1, FRAMES, 88, 88, generator=g)
    pad = torch.zeros(batch, FRAMES, dtype=torch.bool)
    targets = torch.randint(1, vocab, (batch, TARGET_TOKENS), generator=g)
    target_lengths = torch.full((batch,), TARGET_TOKENS)
    speaker_idx = torch.arange(batch) // max(1, tc.utterances_per_speaker)
    params = [p for p in system.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(tc.lr))
    lam = float(cfg.loss["lambda"])

    def step():
        out = system(audio, video, pad, capture=True)
        loss = system.asr.ctc_loss(out.ctc, targets, target_lengths) + adapter.regularization()
        cl, _ = system.contrastive_loss(out, speaker_idx, pad, cfg.loss.temperature, cfg.loss.pooling)
        (loss + lam * cl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        step()
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    timed, cpu = time.perf_counter() - t0, time.process_time() - c0
    counts = count_parameters(system)
    return {
        "model": f"avhubert_{size}", "utterances": batch, "frames_per_utterance": FRAMES,
        "params_total": counts["params/total"], "params_trainable": counts["params/trainable"],
        "flops_per_step": int(counter.get_total_flops()), "step_s": timed, "step_cpu_s": cpu, "first_step_s_with_flop_counter": first,
        "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads(), "max_steps": int(tc.max_steps),
    }


def gpu_estimate(flops_per_step: int, steps: int) -> dict:
    return {gpu: flops_per_step * steps / (peak * 1e12 * ASSUMED_UTILISATION) / 3600.0
            for gpu, peak in GPU_PEAK_BF16_TFLOPS.items()}


AVHUBERT_RECIPE_FRAMES = 8 * 1000  # av_hubert conf/finetune/base_lrs3_30h.yaml: 8 GPUs x max_tokens 1000 frames per update


def derive(r: dict) -> dict:
    """The estimates that follow from one size's measurements (FLOPs, CPU seconds) and the stated assumptions."""
    steps = r["max_steps"]
    r["cpu_core_hours_for_recipe"] = r["step_cpu_s"] * steps / 3600.0  # process CPU time, all threads
    r["cpu_wall_hours_for_recipe"] = r["step_s"] * steps / 3600.0  # this machine's wall time, load included
    r.pop("cpu_hours_for_recipe", None)  # the first run's name for the wall-time figure
    r["gpu_hours_for_recipe"] = gpu_estimate(r["flops_per_step"], steps)
    frames = r["utterances"] * r["frames_per_utterance"]
    r["gpu_hours_at_avhubert_batch"] = gpu_estimate(r["flops_per_step"] * AVHUBERT_RECIPE_FRAMES // frames, steps)
    return r


def run(sizes=("base", "large")) -> dict:
    from benchmarks.common import write_result

    results = {}
    for size in sizes:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_compute_plan", "--one", size],
                              capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"compute plan, {size}: {proc.stderr[-3000:]}")
        results[size] = derive(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"frames_per_utterance": FRAMES, "assumed_gpu_utilisation": ASSUMED_UTILISATION,
              "gpu_peak_bf16_tflops": GPU_PEAK_BF16_TFLOPS, "avhubert_recipe_frames_per_update": AVHUBERT_RECIPE_FRAMES,
              **results}
    write_result("compute_plan", result)
    return result


def rederive() -> dict:
    """Recompute the derived fields of benchmarks/results/compute_plan.json from its measured ones (no new measurement)."""
    from benchmarks.common import RESULTS

    path = RESULTS / "compute_plan.json"
    result = json.loads(path.read_text())
    result["avhubert_recipe_frames_per_update"] = AVHUBERT_RECIPE_FRAMES
    for key, value in result.items():
        if isinstance(value, dict) and "flops_per_step" in value:
            derive(value)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--derive"]:
        print(json.dumps(rederive(), indent=2))
    elif len(sys.argv) >= 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)))
    else:
        print(json.dumps(run(tuple(a for a in sys.argv[1:]) or ("base", "large")), indent=2))
