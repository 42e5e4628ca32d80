"""`make demo`: the whole pipeline on the embedded SynthGRID corpus, end to end.

Every step is one of the README's commands (run as a subprocess with the same
Python), so what the demo shows is exactly what a user types:

  1. python -m scripts.prepare_data experiment=demo                SynthGRID corpus
  2. python train_avhubert.py experiment=demo                      fine-tune the shipped starting checkpoint
                                                                   (checkpoints/avhubert_tiny_synthgrid.pt), no masks
                                                                   (+ evaluate, export)
  3. python train_avhubert.py experiment=demo_protected            fine-tune with the protected setting of the
                                                                   privacy-utility front (conf/experiment/demo_protected.yaml)
  4. python train_speaker_verification.py experiment=demo[_protected] ...  RJCA attacker: clean features, and the
                                                                   protected ones under the three attack scenarios and,
                                                                   semi-informed, the three per-utterance normalisations
  5. python train_avhubert.py experiment=demo_fl_dp                Wav2Vec2, Flower FedAvg (LoRA on the public start),
     and the same with federated=none dp=none federated.num_rounds=0  the public start without private training
  6. python -m scripts.make_tables                                 the results table and plots

`python -m scripts.demo --rebuild-checkpoint` first regenerates both shipped starting checkpoints
the way `make checkpoints` does (AV-HuBERT: full corpus, pretraining + CTC fine-tuning on the public
split, about an hour on 2 cores; Wav2Vec2: the audio-only population's public speakers, about
22 min: 6 to generate the population, 16 for the checkpoint) and overwrites the shipped files and
their model cards.

Finished stages are skipped on a rerun (their status.json says done), so an
interrupted demo continues where it stopped. Extra arguments are passed to every
step, e.g. `python -m scripts.demo paths.root_dir=/scratch/demo`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The protected setting (conf/experiment/demo_protected.yaml): the demo's system with the point of the
# privacy-utility front on the strongest semi-informed attacker (docs/results.md, issue 17) make demo shows:
# both masks, one noise draw per utterance at the feature scale, head-free contrastive term with protected
# negatives, gradient-reversal speaker adversary.
PROTECTED = "experiment=demo_protected"

REBUILD_STEPS: list[tuple[str, list[str]]] = [
    ("prepare SynthGRID (full public split)", ["-m", "scripts.prepare_data"]),
    ("starting checkpoint: pretrain + CTC fine-tune on public", ["train_avhubert.py", "experiment=starting_checkpoint",
                                                                "task=build_checkpoint"]),
    ("prepare the audio-only SynthGRID population", ["-m", "scripts.prepare_data", "data=synthgrid_population"]),
    ("Wav2Vec2 public start: pretrain + CTC fine-tune on public", ["train_avhubert.py", "experiment=wav2vec2_public_start",
                                                                  "task=build_checkpoint"]),
]
STEPS: list[tuple[str, list[str]]] = [
    ("prepare SynthGRID", ["-m", "scripts.prepare_data", "experiment=demo"]),
    ("fine-tune, no masks", ["train_avhubert.py", "experiment=demo"]),
    ("fine-tune, masks (utterance noise) + contrastive + adversary", ["train_avhubert.py", PROTECTED]),
    ("attack: clean features", ["train_speaker_verification.py", "experiment=demo", "attacker.input=clean"]),
    ("attack: protected, ignorant", ["train_speaker_verification.py", PROTECTED, "attacker.scenario=ignorant"]),
    ("attack: protected, lazy-informed", ["train_speaker_verification.py", PROTECTED, "attacker.scenario=lazy_informed"]),
    ("attack: protected, semi-informed", ["train_speaker_verification.py", PROTECTED, "attacker.scenario=semi_informed"]),
    # The same attacker after normalising each utterance (attacker.normalize): mean removes one-draw-per-utterance
    # additive noise exactly, mean_std also a positive scale, mean_std_sign any per-utterance affine map, sign included.
    # With all four, make_tables' "strongest" column gives the lowest semi-informed EER and which attacker it was
    # (docs/results.md, issue 17).
    ("attack: protected, semi-informed, mean-normalising", ["train_speaker_verification.py", PROTECTED,
                                                            "attacker.scenario=semi_informed", "attacker.normalize=mean"]),
    ("attack: protected, semi-informed, mean+std-normalising", ["train_speaker_verification.py", PROTECTED,
                                                                "attacker.scenario=semi_informed", "attacker.normalize=mean_std"]),
    ("attack: protected, semi-informed, mean+std+sign-normalising", ["train_speaker_verification.py", PROTECTED,
                                                                     "attacker.scenario=semi_informed",
                                                                     "attacker.normalize=mean_std_sign"]),
    ("Wav2Vec2: the public start without private training", ["train_avhubert.py", "experiment=demo_fl_dp", "federated=none",
                                                              "dp=none", "federated.num_rounds=0"]),
    ("Wav2Vec2 FedAvg, LoRA on the public start (Flower)", ["train_avhubert.py", "experiment=demo_fl_dp"]),
]


def run(title: str, args: list[str], extra: list[str]) -> float:
    cmd = [sys.executable, *args, *extra]
    print(f"\n=== {title}\n$ {' '.join(['python', *args, *extra])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are Hydra overrides passed to every step.")
    parser.add_argument("--rebuild-checkpoint", action="store_true",
                        help="first regenerate checkpoints/{avhubert,wav2vec2}_tiny_synthgrid.pt as `make checkpoints` does "
                             "(about 1.5 hours)")
    args, extra = parser.parse_known_args(argv)
    steps = (REBUILD_STEPS if args.rebuild_checkpoint else []) + STEPS
    t_start = time.time()
    timings = []
    for title, args in steps:
        timings.append((title, run(title, args, extra)))
    runs_dir = ROOT / "runs"
    for arg in extra:
        if arg.startswith("paths.root_dir="):
            runs_dir = Path(arg.split("=", 1)[1]) / "runs"
        if arg.startswith("paths.runs_dir="):
            runs_dir = Path(arg.split("=", 1)[1])
    total = time.time() - t_start
    context = (f"SynthGRID (embedded corpus, demo size), avhubert_tiny + AdaLoRA, wav2vec2_tiny; seed 1; "
               f"`make demo` on {_hardware()}, {total / 60:.1f} min in total.")
    from scripts.make_tables import make_tables

    out = runs_dir / "tables"
    print("\n" + make_tables(runs_dir, out, context))
    print("=== timings")
    for title, seconds in timings:
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  {total:7.1f} s  total")
    print(f"\nResults: {out}/tables.md (markdown), {out}/*.tex (LaTeX), {out}/*.png (plots); runs in {runs_dir}")


def _hardware() -> str:
    import os
    import platform

    return f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU"


if __name__ == "__main__":
    main(sys.argv[1:])
