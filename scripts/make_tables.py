"""Turn `runs/**/<stage>/metrics.json` into markdown/LaTeX tables and plots.

    python -m scripts.make_tables                       # all runs under ./runs -> runs/tables/
    python -m scripts.make_tables --runs-dir runs --out results --where model.name=wav2vec2_tiny

Every run directory (`<runs>/<data>/<run_name>/s<seed>`) is one row before
seed aggregation; its stages contribute columns as `<stage>:<metric>`. Rows are
grouped by the config axes that identify a system (everything but the seed), and
numbers become mean +- std over seeds. A stage that started but did not finish
(`status.json` says running, failed or interrupted, or no metrics.json) is listed in a
"failed or incomplete" section: never silently dropped.

Plots (PNG, next to the tables): privacy vs utility per attack scenario (every
masked system, the unmasked model attacked on its clean features, the raw-input
attacker, the Pareto front; error bars = std over seeds), DET curves per attack
scenario with the unprotected attacks as baselines, WER vs epsilon of the
Wav2Vec2 DP runs with the runs without DP as labelled lines, and the per-round
federated evaluation. Legends sit outside the axes; ranges follow the data.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from training.attack import NORMALIZATIONS, UTTERANCE_NORMALIZATIONS
from training.stage import stage_status

# The config keys that identify a system (a table row); seeds are aggregated.
AXES = (
    "data.name",
    "model.name",
    "adapter.name",
    "masks.name",
    "loss.name",
    "loss.lambda",
    "masks.init_scale",
    "masks.min_scale",
    "masks.noise_granularity",  # issue 17's privacy axes: a run differing in any of them is another system
    "masks.segment_frames",
    "loss.projection",
    "loss.negatives",
    "loss.adversary_weight",
    "loss.adversary_input",
    "loss.noise_weight",
    "trainer.max_steps",  # AV-HuBERT fine-tuning budget: a longer run is another system (the Wav2Vec2 rows use the federated axes)
    "data.anonymize",  # McAdams (signal-level anonymisation) is a system of its own, never merged with the unmasked one
    "data.mcadams_alpha",
    "federated.name",
    "dp.name",
    "dp.target_epsilon",
    "dp.unit",  # utterance / client / speaker: a different guarantee, never merged
    "dp.accountant",  # prv: sigma calibrated with Opacus' PRV accountant (less noise for the same epsilon); rdp = None
    "dp.reproducible_noise_NOT_PRIVATE",
    "compression.name",  # top-k's fraction, value width, error feedback and bias option are part of it (compression_words)
    "federated.num_rounds",  # the Wav2Vec2 rows' step budget (rounds x local steps; the centralised
    "federated.local_steps",  # baseline makes the same total), so a demo run never merges with a sweep
    "federated.cohort_rate",  # Poisson cohorts: the per-round sampling rate the user-level DP is accounted at
    "dp.clipping_norm",  # central DP's per-client bound C (chosen per compression: a top-k update is ~1/4 of the dense norm)
    "federated.fedavg_server_lr",  # the Poisson-cohort FedAvg server optimiser (FedAvgM): another system
    "federated.server_momentum",
    "federated.server_lr",  # fedadam's server Adam (lr, betas, tau): another system; unused (None) for the other strategies
    "federated.server_beta1",
    "federated.server_beta2",
    "federated.server_tau",
    "federated.local_optimizer",  # the Wav2Vec2 rows' (client) optimiser and lr: SGD clients are another system
    "trainer.lr",
    "federated.centralised_optimizer_reset_every",  # the centralised baseline with a fresh optimiser every k steps: a diagnostic, another system
    "federated.public_subspace_dim",  # client updates projected onto k public-gradient directions: another system
    "federated.public_subspace_refresh",
    "trainer.batch_size",  # utterances per client (or centralised) step: clients of 1 utterance are another system
    "federated.server_adam_bc",  # the server Adam's second moment debiased for the DP noise: another system
    "federated.server_shrink",  # the server step shrunk per coordinate by its DP noise variance: another system
    "federated.ema",  # the run returns the EMA of its models (server per round, centralised per step): another system
    "federated.lr_decay",  # the run's own optimiser (centralised Adam / the Poisson-cohort server step) decayed linearly: another system
    "data.extra_train_speakers",  # SynthGRID populations (synthgrid_population_1600): other training data, another system
    "data.extra_test_speakers",  # a larger SynthGRID test set (synthgrid_population_6400_test200): another measurement
    "data.extra_train_speakers_after_test",  # more SynthGRID training speakers after those: other training data
    "data.train_utterances_per_speaker",
)


@dataclass
class Run:
    run_dir: Path
    config: dict
    metrics: dict[str, float] = field(default_factory=dict)  # "<stage>:<key>" -> value
    problems: list[str] = field(default_factory=list)
    det_scores: dict[str, Path] = field(default_factory=dict)  # attack stage -> scores.txt
    labels: dict[str, str] = field(default_factory=dict)  # "<stage>:<key>" -> a word (add_strongest_attack's variant)

    def axis(self, key: str):
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def system(self) -> tuple:
        axes = [self.axis(k) for k in AXES]
        # lambda / epsilon only distinguish systems where they are used
        if self.axis("loss.name") != "ctc_contrastive":
            axes[AXES.index("loss.lambda")] = None
        defaults = {"masks.min_scale": 0.0, "masks.noise_granularity": "frame", "loss.projection": "learned",
                    "loss.negatives": "clean", "loss.adversary_weight": 0.0, "loss.noise_weight": 0.0, "data.anonymize": "none",
                    "federated.cohort_rate": 1.0, "federated.fedavg_server_lr": 1.0, "federated.server_momentum": 0.0,
                    "federated.centralised_optimizer_reset_every": 0, "federated.lr_decay": "none", "federated.ema": 0.0,
                    "federated.server_shrink": 0.0, "federated.server_adam_bc": 0.0, "federated.public_subspace_dim": 0, "federated.public_subspace_refresh": 1,
                    "data.extra_train_speakers": 0, "data.extra_test_speakers": 0, "data.extra_train_speakers_after_test": 0}
        for key, default in defaults.items():  # older runs lack the key: it had the default's meaning
            if axes[AXES.index(key)] is None:
                axes[AXES.index(key)] = default
        if self.axis("masks.name") in (None, "none"):
            for key in ("masks.init_scale", "masks.min_scale", "masks.noise_granularity", "masks.segment_frames",
                        "loss.adversary_weight", "loss.noise_weight"):
                axes[AXES.index(key)] = None
        if axes[AXES.index("masks.noise_granularity")] != "segment":
            axes[AXES.index("masks.segment_frames")] = None
        if self.axis("loss.name") != "ctc_contrastive":
            axes[AXES.index("loss.projection")] = axes[AXES.index("loss.negatives")] = None
        if not axes[AXES.index("loss.adversary_weight")]:
            axes[AXES.index("loss.adversary_input")] = None
        if axes[AXES.index("data.anonymize")] != "mcadams":
            axes[AXES.index("data.mcadams_alpha")] = None
        if self.axis("dp.name") in (None, "none"):
            for key in ("dp.target_epsilon", "dp.unit", "dp.reproducible_noise_NOT_PRIVATE"):
                axes[AXES.index(key)] = None
        if self.axis("compression.name") == "topk":  # top-k with other options is another system
            axes[AXES.index("compression.name")] = compression_words(self)
        if self.axis("dp.name") in (None, "none") or axes[AXES.index("dp.accountant")] in (None, "rdp"):
            axes[AXES.index("dp.accountant")] = None  # RDP: the default, and the only accountant of older runs
        if str(self.axis("model.name")).startswith("wav2vec2"):
            axes[AXES.index("trainer.max_steps")] = None
        if self.axis("federated.name") != "fedadam":
            for key in ("federated.server_lr", "federated.server_beta1", "federated.server_beta2", "federated.server_tau"):
                axes[AXES.index(key)] = None
        if not str(self.axis("model.name")).startswith("wav2vec2"):
            axes[AXES.index("federated.local_optimizer")] = axes[AXES.index("trainer.lr")] = None
            axes[AXES.index("trainer.batch_size")] = None  # the AV-HuBERT rows' batch is not a table axis
        if not axes[AXES.index("federated.public_subspace_dim")]:
            axes[AXES.index("federated.public_subspace_refresh")] = None
        return tuple(axes)

    @property
    def dp_unit(self) -> str | None:
        """The privacy unit of a DP row (older configs have no dp.unit: local DP = utterance, central DP = client)."""
        dp = self.axis("dp.name")
        if dp in (None, "none"):
            return None
        return str(self.axis("dp.unit") or {"local": "utterance", "central": "client"}.get(dp, dp))

    @property
    def not_private(self) -> bool:
        """A DP row whose noise can be regenerated from its configuration: the NOT-PRIVATE option, or a run
        from before the noise came from the OS CSPRNG (its metrics lack federated:dp/noise_from_os_csprng)."""
        if self.axis("dp.name") in (None, "none"):
            return False
        return self.metrics.get("federated:dp/noise_from_os_csprng") != 1

    @property
    def seed(self):
        return self.axis("seed")


def _stage_name(run_dir: Path, stage_dir: Path) -> str:
    return stage_dir.relative_to(run_dir).as_posix()


def find_runs(runs_dir: Path) -> list[Run]:
    """Every directory holding stage folders with config.yaml; run_dir = parent of the stage folders."""
    runs: dict[Path, Run] = {}
    for cfg_path in sorted(runs_dir.glob("**/config.yaml")):
        stage_dir = cfg_path.parent
        # A stage folder always has status.json (training.stage.Stage); Hydra's own folders
        # (.hydra/, multirun job folders) hold a config.yaml too and are not stages.
        if ".hydra" in stage_dir.parts or not (stage_dir / "status.json").is_file():
            continue
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            print(f"warning: {cfg_path}: unreadable config ({e}); skipped")
            continue
        run_dir_value = (config.get("paths") or {}).get("run_dir")
        run_dir = Path(run_dir_value) if run_dir_value else stage_dir.parent
        if not str(stage_dir.resolve()).startswith(str(run_dir.resolve())):
            run_dir = stage_dir.parent  # runs moved since: fall back to the directory layout
        run_dir = run_dir.resolve()
        run = runs.setdefault(run_dir, Run(run_dir=run_dir, config=config))
        stage = _stage_name(run_dir, stage_dir.resolve())
        status = stage_status(stage_dir)  # "running" without a live lock holder reads as "interrupted"
        metrics_path = stage_dir / "metrics.json"
        if status.get("status") != "done" or not metrics_path.is_file():
            reason = status.get("error") or status.get("status") or "no metrics.json"
            run.problems.append(f"{stage}: {reason}")
            continue
        for key, value in json.loads(metrics_path.read_text()).items():
            run.metrics[f"{stage}:{key}"] = float("nan") if value is None else value
        if (stage_dir / "scores.txt").is_file():
            run.det_scores[stage] = stage_dir / "scores.txt"
    return list(runs.values())


STRONGEST = "strongest"


def add_strongest_attack(run: Run, scenario: str = "semi_informed") -> None:
    """`attack/<scenario>-strongest:*`: the metrics of the attacker.normalize variant (training/attack.py)
    with the lowest EER on this run, i.e. the strongest attacker of the scenario we have; its name goes to
    `Run.labels["attack/<scenario>-strongest:variant"]`. Only when the run has every per-utterance variant
    (UTTERANCE_NORMALIZATIONS): a minimum over a subset would silently be a weaker attacker. A variant
    that needs more knowledge of the system (segment_mean: the masks' segment grid) counts when the run has it."""
    stage = lambda v: f"attack/{scenario}" + ("" if v == "none" else f"-{v}")
    eer = lambda v: run.metrics.get(f"{stage(v)}:eer")
    if any(eer(v) is None or math.isnan(eer(v)) for v in UTTERANCE_NORMALIZATIONS):
        return
    candidates = [v for v in NORMALIZATIONS if eer(v) is not None and not math.isnan(eer(v))]
    best = min(candidates, key=eer)  # ties: the first in NORMALIZATIONS (the simplest attacker)
    prefix, target = f"{stage(best)}:", f"attack/{scenario}-{STRONGEST}:"
    run.metrics.update({target + k[len(prefix):]: v for k, v in list(run.metrics.items()) if k.startswith(prefix)})
    run.labels[target + "variant"] = best


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def ci_suffix(members: list, c: "Column") -> str:
    """" [low, high]": the 95 % speaker-resampling interval of the metric (training/attack.py), averaged
    over the seeds that report one; "" when none does."""
    bounds = [(r.metrics.get(f"{c.key}_ci_low"), r.metrics.get(f"{c.key}_ci_high")) for r in members]
    bounds = [(lo, hi) for lo, hi in bounds if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))]
    if not bounds:
        return ""
    lo, hi = (statistics.mean(b[i] for b in bounds) * c.scale for i in (0, 1))
    return f" [{lo:.{c.digits}f}, {hi:.{c.digits}f}]"


@dataclass
class Column:
    title: str
    key: str  # "<stage>:<metric>"
    scale: float = 100.0  # fractions shown as %
    digits: int = 1
    every_seed: bool = False  # a value only when every seed of the row has one (else "-")
    text: bool = False  # a word per seed (Run.labels), not a number


MASK_TABLE = [
    Column("WER AV clean", "evaluate:wer/audio_video/clean"),
    Column("WER A clean", "evaluate:wer/audio/clean"),
    Column("WER V clean", "evaluate:wer/video/clean"),
    Column("WER AV babble 0 dB", "evaluate:wer/audio_video/babble_0"),
    Column("WER A babble 0 dB", "evaluate:wer/audio/babble_0"),
    Column("probe spk acc", "finetune:probe/speaker_acc"),
    Column("probe EER", "finetune:probe/eer"),
    Column("probe spk acc held-out", "evaluate:probe_heldout/speaker_acc"),
    Column("probe chance held-out", "evaluate:probe_heldout/chance"),
    Column("EER raw inputs", "attack/raw:eer"),
    Column("EER clean feats", "attack/clean:eer"),
    Column("EER ignorant", "attack/ignorant:eer"),
    Column("EER lazy-inf.", "attack/lazy_informed:eer"),
    Column("EER semi-inf.", "attack/semi_informed:eer"),
    Column("minDCF₀.₀₅ semi-inf.", "attack/semi_informed:min_dcf_p0.05", scale=1.0, digits=3),
    Column("EER untrained masks", "attack/untrained_masks:eer"),
    # extra variant: the semi-informed attacker on per-utterance mean- (and std-) normalised features
    Column("EER semi-inf., mean-normalising", "attack/semi_informed-mean:eer"),
    Column("EER semi-inf., mean+std-normalising", "attack/semi_informed-mean_std:eer"),
    Column("EER semi-inf., mean+std+sign-normalising", "attack/semi_informed-mean_std_sign:eer"),
    Column("EER semi-inf., segment-mean-normalising", "attack/semi_informed-segment_mean:eer"),
    # the lowest semi-informed EER over all four variants (add_strongest_attack), and which variant it was
    Column("EER semi-inf., strongest attacker", "attack/semi_informed-strongest:eer", every_seed=True),
    Column("minDCF₀.₀₅ semi-inf., strongest", "attack/semi_informed-strongest:min_dcf_p0.05", scale=1.0, digits=3, every_seed=True),
    Column("strongest variant", "attack/semi_informed-strongest:variant", every_seed=True, text=True),
]
STRONGEST_NOTE = ("*EER semi-inf., strongest attacker*: per seed, the lowest semi-informed EER over the attacker.normalize "
                  "variants " + ", ".join(UTTERANCE_NORMALIZATIONS) + " (and " + ", ".join(v for v in NORMALIZATIONS
                  if v not in UTTERANCE_NORMALIZATIONS) + " where the run has it; minDCF and interval: that variant's; *strongest "
                  "variant* names it, with the number of seeds when they differ); \"-\" where a seed lacks one of the four "
                  "per-utterance attacks.")
FL_TABLE = [
    Column("WER", "federated:wer"),
    Column("CER", "federated:cer"),
    Column("ε spent (max client)", "federated:epsilon/max", scale=1.0, digits=2),  # title completed by epsilon_title()
    Column("rounds", "federated:rounds", scale=1.0, digits=0),
    Column("test CTC loss", "federated:test_loss", scale=1.0, digits=2),
    Column("clients / round", "federated:mean_cohort_size", scale=1.0, digits=1),
    Column("DP noise / signal (mean over rounds)", "federated:dp/noise_to_signal_mean", scale=1.0, digits=2),
    Column("KB sent / client / round", "federated:bytes_per_client_round", scale=1e-3, digits=1),
    Column("compression ratio", "federated:compression_ratio", scale=1.0, digits=2),
]
WER_MARGIN = 0.02  # the seed document's claim: under 2 points absolute WER degradation


UNIT_NAMES = {"utterance": "utterance", "client": "client", "speaker": "speaker"}


def epsilon_title(runs: list[Run]) -> str:
    """The ε column header names the privacy unit and the adjacency of every kind of DP row in the table."""
    units = sorted({(r.axis("dp.name"), r.dp_unit) for r in runs if r.dp_unit and "federated:epsilon/max" in r.metrics})
    if not units:
        return "ε spent (max client)"
    # every accountant here is add/remove: Opacus RDP/PRV with Poisson sampling, Flower's ADD_OR_REMOVE_ONE
    which = " / ".join(f"{unit} ({dp} DP)" for dp, unit in units)
    return f"ε spent (max client), δ = 1e-5, add/remove one {which}"


def _no_training(run: Run) -> bool:
    """The public start evaluated as it is (federated=none, dp=none, 0 rounds): the "no private training" row."""
    return run.axis("federated.name") in (None, "none") and run.axis("dp.name") in (None, "none") and run.axis("federated.num_rounds") == 0


def _plain_centralised(run: Run) -> bool:
    """The centralised non-private baseline itself: not its variants (optimiser resets, lr decay, iterate average), which
    are rows of their own and never the reference a federation is compared with."""
    return (run.axis("federated.name") in (None, "none") and run.axis("dp.name") in (None, "none")
            and not run.axis("federated.centralised_optimizer_reset_every") and run.axis("federated.lr_decay") in (None, "none")
            and not run.axis("federated.ema"))


def _small_client_batch(run: Run) -> "int | None":
    """The client batch of a population federation (Poisson cohorts) when it is below the 10 utterances a client holds
    and steps on by default (conf/experiment/fl_dp_population.yaml); None otherwise (named in labels only then)."""
    batch = run.axis("trainer.batch_size")
    if run.axis("federated.name") in (None, "none") or run.axis("federated.cohort_sampling") != "poisson" or batch is None:
        return None
    return int(batch) if int(batch) < 10 else None


def _population(run: Run) -> "str | None":
    """'1600 speakers x 2 utterances' for a SynthGRID population other than the one its data config extends
    (data.extra_train_speakers, data.extra_train_speakers_after_test or data.train_utterances_per_speaker set);
    None for the others."""
    extra = int(run.axis("data.extra_train_speakers") or 0) + int(run.axis("data.extra_train_speakers_after_test") or 0)
    per_speaker = run.axis("data.train_utterances_per_speaker")
    if not extra and per_speaker is None:
        return None
    speakers = int(run.axis("data.splits.train") or 0) + int(extra)
    per_speaker = per_speaker if per_speaker is not None else run.axis("data.utterances_per_speaker")
    return f"{speakers} speakers x {per_speaker} utterances"


def _label(run: Run) -> str:
    parts = [str(run.axis("model.name")), str(run.axis("adapter.name"))]
    if str(run.axis("model.name")).startswith("wav2vec2"):
        parts = [str(run.axis("model.name"))]
        if _population(run):
            parts.append(_population(run))
        if _no_training(run):
            return ", ".join(parts + ["no private training (the public start as it is)"])
        fed, dp = run.axis("federated.name"), run.axis("dp.name")
        if run.axis("adapter.name") == "lora":
            parts.append(f"LoRA r={run.axis('adapter.r')} + CTC head")
        parts.append("centralised" if fed in (None, "none") else f"FL {fed}")
        if run.axis("federated.centralised_optimizer_reset_every"):
            every = int(run.axis("federated.centralised_optimizer_reset_every"))
            parts.append("optimiser re-created every step" if every == 1 else f"optimiser re-created every {every} steps")
        if fed not in (None, "none") and run.axis("federated.cohort_sampling") == "poisson":
            parts.append(f"{run.axis('federated.num_clients')} clients, Poisson q={run.axis('federated.cohort_rate')}")
            server_lr, momentum = run.axis("federated.fedavg_server_lr"), run.axis("federated.server_momentum")
            if fed == "fedadam":
                parts.append(f"server Adam lr {run.axis('federated.server_lr'):g} (β {run.axis('federated.server_beta1'):g}/"
                             f"{run.axis('federated.server_beta2'):g}, τ {run.axis('federated.server_tau'):g})")
            elif (server_lr not in (None, 1.0)) or momentum:
                parts.append(f"server lr {server_lr if server_lr is not None else 1.0:g}" + (f", momentum {momentum:g}" if momentum else ""))
        if run.axis("federated.lr_decay") not in (None, "none"):
            parts.append(f"{'server ' if fed not in (None, 'none') else ''}lr decayed {run.axis('federated.lr_decay')}ly")
        if run.axis("federated.ema"):
            parts.append(f"EMA of the {'global models' if fed not in (None, 'none') else 'parameters'} "
                         f"(β {float(run.axis('federated.ema')):g} per {'round' if fed not in (None, 'none') else 'step'})")
        if run.axis("federated.server_adam_bc"):
            parts.append(f"second moment debiased for the DP noise (floor {float(run.axis('federated.server_adam_bc')):g} x its std)")
        if run.axis("federated.server_shrink"):
            parts.append(f"server step shrunk by its DP noise (κ {float(run.axis('federated.server_shrink')):g})")
        if run.axis("federated.public_subspace_dim"):
            refresh = int(run.axis("federated.public_subspace_refresh") or 1)
            parts.append(f"updates projected on {int(run.axis('federated.public_subspace_dim'))} public-gradient directions"
                         + ("" if refresh == 1 else f" (basis every {refresh} rounds)"))
        batch = _small_client_batch(run)
        if batch:
            parts.append(f"client batches of {batch} utterance{'s' if batch > 1 else ''}")
        if run.axis("federated.local_optimizer") == "sgd":  # Adam is the experiments' local optimiser
            parts.append(f"SGD {'clients ' if fed not in (None, 'none') else ''}lr {run.axis('trainer.lr'):g}")
        if dp not in (None, "none"):
            parts.append(f"{dp} DP ε={run.axis('dp.target_epsilon')} ({run.dp_unit}-level)"
                         + (", PRV accountant" if run.axis("dp.accountant") == "prv" else "")
                         + (f", C={run.axis('dp.clipping_norm'):g}" if dp == "central" and run.axis("dp.clipping_norm") is not None else ""))
        if run.axis("compression.name") not in (None, "none"):
            parts.append(compression_words(run))
        steps = _client_steps(run) if fed in (None, "none") else None
        if steps:
            # the centralised baseline: the steps it takes (q N R x local steps of a FedAvg reference, as in
            # plot_cohort_size), since "10x5 steps" named baselines of different length the same (session 13)
            parts.append(f"{steps:,.0f} steps")
        else:
            parts.append(f"{run.axis('federated.num_rounds')}x{run.axis('federated.local_steps') or 'epoch'} steps")
        if run.not_private:
            parts.append("**NOT PRIVATE: DP noise reproducible from the config**")
        if fed not in (None, "none") and "federated:bytes_on_wire" not in run.metrics and "federated:bytes_per_client_round" in run.metrics:
            parts.append("bytes from array sizes, not the wire (old run)")
        return ", ".join(parts)
    if run.axis("data.anonymize") == "mcadams":
        parts.append(f"McAdams α={run.axis('data.mcadams_alpha')}")
    parts.append(f"masks={run.axis('masks.name')}")
    masked = run.axis("masks.name") not in (None, "none")
    if masked and run.axis("masks.init_scale") is not None:  # always said: rows of a sweep differ in it
        parts.append(f"init σ={run.axis('masks.init_scale')}")
    if masked and run.axis("masks.min_scale"):
        parts.append(f"min σ={run.axis('masks.min_scale')}")
    if masked and run.axis("masks.noise_granularity") is not None:
        granularity = run.axis("masks.noise_granularity")
        parts.append(f"noise per {granularity}" + (f" ({run.axis('masks.segment_frames')} frames)" if granularity == "segment" else ""))
    if run.axis("loss.name") == "ctc_contrastive":
        notes = []
        if run.axis("loss.projection") not in (None, "learned"):
            notes.append("no head" if run.axis("loss.projection") == "none" else f"{run.axis('loss.projection')} head")
        if run.axis("loss.negatives") == "protected":
            notes.append("protected negatives")
        parts.append(f"contrastive λ={run.axis('loss.lambda')}" + (f" ({', '.join(notes)})" if notes else ""))
    if masked and run.axis("loss.adversary_weight"):
        parts.append(f"adversary {run.axis('loss.adversary_weight')}" + ("" if run.axis("loss.adversary_input") in (None, "fused") else f" ({run.axis('loss.adversary_input')})"))
    if masked and run.axis("loss.noise_weight"):
        parts.append(f"noise term β={run.axis('loss.noise_weight')}")
    return ", ".join(parts)


def compression_words(run: Run) -> str:
    """ "int8", "topk" (5 %, fp16 values, error feedback: every top-k run before these were axes),
    "topk 18 % int8 values", "topk 18 % int8 values no error feedback"."""
    name = str(run.axis("compression.name"))
    if name != "topk":
        return "none" if name == "None" else name
    fraction, bits = float(run.axis("compression.topk_fraction") or 0.05), int(run.axis("compression.topk_value_bits") or 16)
    feedback = run.axis("compression.error_feedback") in (None, True)
    words = "topk" if fraction == 0.05 else f"topk {100 * fraction:g} %"
    return (words + ("" if bits == 16 else f" int{bits} values") + ("" if feedback else " no error feedback")
            + (" biases in full" if run.axis("compression.topk_keep_biases") else ""))


def plain_label(run: Run) -> str:
    """A system in words, for plot legends ("both masks + contrastive (λ=0.1)", "no masks",
    "FL + local DP, int8 updates")."""
    if str(run.axis("model.name")).startswith("wav2vec2"):
        if _no_training(run):
            return "no private training (public start)"
        fed, dp, comp = run.axis("federated.name"), run.axis("dp.name"), run.axis("compression.name")
        text = "centralised" if fed in (None, "none") else f"FL ({fed})"
        if dp not in (None, "none"):
            text += f" + {dp} DP ε={float(run.axis('dp.target_epsilon')):g}"
        if comp not in (None, "none"):
            text += f", {compression_words(run)} updates"
        return text
    masks = run.axis("masks.name")
    text = "no masks" if masks in (None, "none") else f"{masks} masks"
    if run.axis("data.anonymize") == "mcadams":
        text = f"McAdams voice anonymisation (α={run.axis('data.mcadams_alpha')})" + ("" if masks in (None, "none") else f" + {text}")
    if masks not in (None, "none"):
        details = []
        if run.axis("masks.init_scale") is not None:  # always said: points of a sweep differ in it
            details.append(f"init σ={run.axis('masks.init_scale')}")
        granularity = run.axis("masks.noise_granularity")
        if granularity == "frame":  # said only when the run's config has the key (older runs: frame, unsaid)
            details.append("one noise draw per frame")
        elif granularity == "utterance":
            details.append("one noise draw per utterance")
        elif granularity == "segment":
            details.append(f"one noise draw per {run.axis('masks.segment_frames')} frames")
        if details:
            text += f" ({', '.join(details)})"
    if run.axis("loss.name") == "ctc_contrastive":
        text += f" + contrastive (λ={run.axis('loss.lambda')}" + (", no head" if run.axis("loss.projection") == "none" else "") + ")"
    if masks not in (None, "none") and run.axis("loss.adversary_weight"):
        text += f" + speaker adversary (weight {run.axis('loss.adversary_weight')})"
    if masks not in (None, "none") and run.axis("loss.noise_weight"):
        text += f" + noise term (β={run.axis('loss.noise_weight')})"
    return text


def _budget(run: Run) -> tuple:
    return (*(run.axis(k) for k in ("data.name", "data.tokenizer", "model.name", "federated.num_rounds", "federated.local_steps")),
            _population(run))


def smallest_epsilon_within_margin(runs: list[Run], margin: float = WER_MARGIN) -> list[str]:
    """Per DP kind and compression: the smallest epsilon whose WER is within `margin` of the
    centralised non-DP baseline with the same data, model and step budget (mean over seeds)."""
    wer = lambda rs: statistics.mean(r.metrics["federated:wer"] for r in rs)
    by_budget: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if "federated:wer" in run.metrics:
            by_budget[_budget(run)].append(run)
    lines = []
    for budget, members in sorted(by_budget.items(), key=lambda kv: [str(x) for x in kv[0]]):
        # Centralised baselines of one budget trained for different numbers of steps (the cohort rate sets them) are
        # separate references, never averaged into one: each gets its own line, named by its steps.
        by_steps: dict = defaultdict(list)
        for r in members:
            if _plain_centralised(r):
                by_steps[_client_steps(r)].append(r)
        if not by_steps:
            continue
        groups: dict[tuple, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
        for r in members:  # a NOT-PRIVATE row cannot support a privacy claim
            if r.axis("dp.name") not in (None, "none") and r.axis("federated.name") != "none" and not r.not_private:
                groups[(r.axis("dp.name"), compression_words(r))][float(r.axis("dp.target_epsilon"))].append(r)
        for steps, base in sorted(by_steps.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            reference = wer(base)
            which = f" ({steps:,.0f} steps)" if len(by_steps) > 1 and steps is not None else ""
            for (dp, comp), by_eps in sorted(groups.items()):
                tried = sorted(by_eps)
                ok = [e for e in tried if wer(by_eps[e]) - reference <= margin]
                what = f"ε = {ok[0]:g} (WER {100 * wer(by_eps[ok[0]]):.1f} %)" if ok else f"none of ε ∈ {{{', '.join(f'{e:g}' for e in tried)}}}"
                lines.append(f"- {budget[2]}{', ' + budget[5] if budget[5] else ''}, {budget[3]}x{budget[4] or 'epoch'} steps, FL + {dp} DP, compression {comp}: "
                             f"smallest ε within +{100 * margin:.0f} points of the centralised{which} {100 * reference:.1f} % WER: {what}")
    return lines


def build_table(runs: list[Run], columns: list[Column]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Rows grouped by system; only columns with at least one value are kept."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    has = lambda r, c: c.key in (r.labels if c.text else r.metrics)
    for run in runs:
        if any(has(run, c) for c in columns):
            groups[run.system].append(run)
    used = [c for c in columns if any(has(r, c) for rs in groups.values() for r in rs)]
    header = ["system", "seeds"] + [c.title for c in used]
    rows, raw = [], []
    # The AV-HuBERT fine-tuning budget is said only when the table's AV-HuBERT rows differ in it.
    budgets = {rs[0].axis("trainer.max_steps") for rs in groups.values() if not str(rs[0].axis("model.name")).startswith("wav2vec2")}
    for system, members in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        steps = members[0].axis("trainer.max_steps") if len(budgets) > 1 else None
        steps_note = "" if system[AXES.index("trainer.max_steps")] is None or steps is None else f", {steps} fine-tuning steps"
        label, plain = _label(members[0]) + steps_note, plain_label(members[0]) + steps_note
        row = [label, str(len(members))]
        record = {"label": label, "plain": plain, "n_seeds": len(members), "steps_note": steps_note,
                  "masks": members[0].axis("masks.name"), "anonymize": members[0].axis("data.anonymize")}
        for c in used:
            if c.every_seed and not all(has(r, c) for r in members):
                row.append("-")
                continue
            if c.text:
                words = [r.labels[c.key] for r in members]
                counts = sorted(set(words), key=lambda w: (-words.count(w), w))
                record[c.key] = counts[0]  # the most frequent one
                row.append(counts[0] if len(counts) == 1 else ", ".join(f"{w} ({words.count(w)})" for w in counts))
                continue
            values = [r.metrics.get(c.key) for r in members]
            row.append(fmt(values, c.scale, c.digits) + ci_suffix(members, c))
            finite = [v for v in values if v is not None and not math.isnan(v)]
            record[c.key] = statistics.mean(finite) if finite else None
            record[f"{c.key}#std"] = statistics.stdev(finite) if len(finite) > 1 else None  # error bars over seeds
            bounds = [(r.metrics.get(f"{c.key}_ci_low"), r.metrics.get(f"{c.key}_ci_high")) for r in members]
            bounds = [b for b in bounds if None not in b and not any(math.isnan(v) for v in b)]
            if bounds:  # the 95 % speaker-resampling interval, averaged over seeds (as in the table)
                record[f"{c.key}#ci"] = tuple(statistics.mean(b[i] for b in bounds) for i in (0, 1))
        rows.append(row)
        raw.append(record)
    return header, rows, raw


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_latex(header: list[str], rows: list[list[str]], caption: str) -> str:
    esc = lambda s: s.replace("±", r"$\pm$").replace("_", r"\_").replace("%", r"\%").replace("λ", r"$\lambda$").replace("ε", r"$\varepsilon$")
    out = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule"]
    out.append(" & ".join(esc(h) for h in header) + r" \\")
    out.append(r"\midrule")
    out += [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}", r"\end{table}"]
    return "\n".join(out) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when we want low WER (x) and high EER (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


SCENARIO_TITLES = {
    "semi_informed": "semi-informed attacker (retrained on protected features)",
    "lazy_informed": "lazy-informed attacker (trained on clean features, enrols with protected ones)",
    "semi_informed-mean": "mean-normalising attacker (semi-informed, extra variant)",
    "semi_informed-mean_std": "mean+std-normalising attacker (semi-informed, extra variant)",
    "semi_informed-mean_std_sign": "mean+std+sign-normalising attacker (semi-informed, extra variant)",
    "semi_informed-segment_mean": "segment-mean-normalising attacker (semi-informed, extra variant; knows the masks' segment grid)",
    "semi_informed-strongest": "strongest semi-informed attacker (per point, the best of its normalising attackers)",
    "ignorant": "ignorant attacker (trained on clean features)",
    "clean": "attacker on clean features (no protection)",
    "raw": "attacker on raw audio + video",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _distinct_colours() -> tuple:
    """18 distinct hues for one colour per system (tab20 would pair light/dark shades of one hue)."""
    plt = _pyplot()
    return plt.cm.tab10.colors + plt.cm.Dark2.colors


def _legend_below(fig, ax, handles=None, labels=None, ncol: int = 1) -> None:
    """Legend under the axes (never over the data); bbox_inches="tight" keeps it in the file."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=ncol, frameon=False)


TARGET_EER = 0.40  # issue 17's target: semi-informed EER >= 40 % at <= WER_MARGIN above the unmasked model
TARGET_SCENARIOS = ("semi_informed", f"semi_informed-{STRONGEST}")  # the plots that draw the target region
# On any per-utterance per-dimension affine mask the mean_std_sign attacker's input equals its input on clean features,
# so its EER on the unmasked model bounds the strongest attacker's EER on every such mask (drawn on the strongest plot)
CEILING_KEY = "attack/semi_informed-mean_std_sign:eer"


def plot_privacy_utility(raw: list[dict], path: Path, wer_key: str, eer_key: str) -> bool:
    """Utility (WER, x) vs privacy (attacker EER, y) of every masked system, with the unmasked model
    (attacked on its clean features), the McAdams signal-level anonymisation baseline and the
    raw-input attacker as baselines, the Pareto front of the masked systems, chance (50 % EER) when
    it is within reach of the data, and (semi-informed) the target region. Thick bars: std over seeds;
    thin vertical bars: the 95 % speaker-resampling interval of the EER."""
    scenario = eer_key.split(":")[0].split("/")[-1]
    pts = [r for r in raw if r.get(wer_key) is not None and r.get(eer_key) is not None and r.get("masks") not in (None, "none")]
    if not pts:
        return False
    clean_key, raw_key = "attack/clean:eer", "attack/raw:eer"
    unmasked = [r for r in raw if r.get("masks") in (None, "none") and r.get("anonymize") != "mcadams" and r.get(wer_key) is not None
                and (r.get(eer_key) is not None or r.get(clean_key) is not None)]
    mcadams = [r for r in raw if r.get("masks") in (None, "none") and r.get("anonymize") == "mcadams"
               and r.get(wer_key) is not None and r.get(eer_key) is not None]
    raw_attack = [r[raw_key] for r in raw if r.get(raw_key) is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    pct = lambda v: None if v is None else 100 * v

    def draw(r, x, y, ci, **style):
        if ci is not None:  # thin: the speaker-resampling interval (kept inside the axes' range)
            all_y.extend([pct(ci[0]), pct(ci[1])])
            ax.errorbar([x], [y], yerr=[[y - pct(ci[0])], [pct(ci[1]) - y]], fmt="none", color=style["color"], elinewidth=0.6,
                        alpha=0.6, capsize=0)
        ax.errorbar([x], [y], xerr=[pct(r.get(f"{wer_key}#std")) or 0], yerr=[pct(r.get(f"{eer_key}#std")) or 0],
                    elinewidth=1.4, capsize=2, **style)

    xs, ys = [pct(r[wer_key]) for r in pts], [pct(r[eer_key]) for r in pts]
    all_x, all_y = list(xs), list(ys)
    colours = _distinct_colours()
    variant_key = eer_key.rsplit(":", 1)[0] + ":variant"  # the strongest plot names each point's attacker
    which = lambda r: f" [{r[variant_key]}]" if r.get(variant_key) else ""
    for i, (x, y, r) in enumerate(zip(xs, ys, pts)):  # one colour per system; squares: with the contrastive term
        draw(r, x, y, r.get(f"{eer_key}#ci"), fmt="s" if "contrastive" in r["plain"] else "o", ms=7,
             color=colours[i % len(colours)], label=r["plain"] + which(r))
    front = sorted(pareto_front(list(zip(xs, ys))), key=lambda i: xs[i])
    if len(front) > 1:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="0.35", lw=1, zorder=0, label="Pareto front (masked systems)")
    reference_wer = None
    for i, r in enumerate(unmasked):  # several budgets: the first filled, the others hollow
        eer = r.get(eer_key) if r.get(eer_key) is not None else r.get(clean_key)
        ci = r.get(f"{eer_key}#ci") if r.get(eer_key) is not None else r.get(f"{clean_key}#ci")
        x, y = pct(r[wer_key]), pct(eer)
        draw(r, x, y, ci, fmt="*", ms=13, color="black", mfc="black" if i == 0 else "white",
             label="no masks (attacker on its clean features)" + r.get("steps_note", "") + which(r))
        all_x.append(x), all_y.append(y)
        reference_wer = x if reference_wer is None else min(reference_wer, x)
    for r in mcadams:
        x, y = pct(r[wer_key]), pct(r[eer_key])
        draw(r, x, y, r.get(f"{eer_key}#ci"), fmt="D", ms=8, color="firebrick",
             label=r["plain"].replace("McAdams voice anonymisation", "McAdams voice anonymisation of the audio (VoicePrivacy baseline)")
             + which(r))
        all_x.append(x), all_y.append(y)
    for eer in raw_attack[:1]:
        ax.axhline(pct(eer), color="0.45", lw=1, ls="-.", label="attacker on raw audio + video")
        all_y.append(pct(eer))
    # the unmasked row with the most seeds (every unmasked budget has the same frozen front-end features)
    ceiling = [r[CEILING_KEY] for r in sorted(unmasked, key=lambda r: -r["n_seeds"]) if r.get(CEILING_KEY) is not None][:1] \
        if scenario.endswith(STRONGEST) else []
    for eer in ceiling:  # training/attack.py normalize_utterances: the sign-canonicalising attacker sees clean features
        ax.axhline(pct(eer), color="tab:purple", lw=1, ls="--",
                   label=f"ceiling for one-draw-per-utterance masks: the mean+std+sign attacker on unmasked features ({pct(eer):.1f} %)")
        all_y.append(pct(eer))
    if scenario in TARGET_SCENARIOS and reference_wer is not None:
        all_y.append(100 * TARGET_EER)
    if max(all_y) >= 30:  # chance is within reach of the data: show it; otherwise it would squash the points
        ax.axhline(50, color="gray", lw=0.8, ls=":", label="chance (EER 50 %)")
        all_y.append(50)
    span = max(all_y) - min(all_y) or 1.0
    ax.set_ylim(max(0.0, min(all_y) - 0.12 * span), max(all_y) + 0.12 * span)
    xspan = max(all_x) - min(all_x) or 1.0
    ax.set_xlim(max(0.0, min(all_x) - 0.1 * xspan), max(all_x) + 0.1 * xspan)
    if scenario in TARGET_SCENARIOS and reference_wer is not None:
        low_x, high_y = ax.get_xlim()[0], ax.get_ylim()[1]
        ax.fill_between([low_x, reference_wer + 100 * WER_MARGIN], 100 * TARGET_EER, high_y, color="tab:green", alpha=0.12, lw=0,
                        label=f"target: EER ≥ {100 * TARGET_EER:.0f} % at ≤ {100 * WER_MARGIN:.0f} WER points above no masks")
    ax.set_xlabel("Word error rate, audio-visual, clean test set, unseen speakers (%)  — lower is better")
    ax.set_ylabel("Attacker's equal error rate (%)  — higher is more private")
    ax.set_title(f"Privacy vs utility: {SCENARIO_TITLES.get(scenario, scenario)}\n"
                 "thick bars: ± std over seeds; thin bars: 95 % interval from resampling speakers"
                 + ("\n[in brackets: the attacker's normalisation with the lowest EER]" if scenario.endswith(STRONGEST) else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, ncol=1)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _server_adam(run: Run) -> tuple[float, float]:
    """(server lr, β1) of a fedadam run: the server optimiser settings the docs' sweeps vary."""
    return float(run.axis("federated.server_lr") or 0.0), float(run.axis("federated.server_beta1") or 0.0)


def _epsilon_wer_series(runs: list[Run]) -> tuple[dict[tuple, dict[float, list[tuple[float, float]]]], dict[str, list[float]]]:
    """The ε-WER plot's content: DP runs as series keyed by (DP-only?, DP kind, compression, how the federation
    trains) with their (ε spent, WER) per target ε, and runs without DP as named baselines. A series or a baseline
    holds one system only: the federation's strategy, cohort rate, server Adam's lr and β1, lr schedule, iterate
    average, public-subspace projection, client batch, speaker population and budget (client steps) are in its key or
    name whenever the runs differ in them, so FedAvg and
    server-Adam runs, or projected and unprojected ones, are never averaged together."""
    with_dp: dict[tuple, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    no_dp: dict[str, list[float]] = defaultdict(list)
    scored = [r for r in runs if "federated:wer" in r.metrics]
    budgets = {_client_steps(r) for r in scored if r.axis("dp.name") in (None, "none") and not _no_training(r)}

    server_adams = {_server_adam(r) for r in scored if r.axis("federated.name") == "fedadam"}

    def how(r: Run, with_rate: bool = True) -> str:
        fed = r.axis("federated.name")
        parts = [] if fed in (None, "none") else [str(fed)]
        if with_rate and fed not in (None, "none") and r.axis("federated.cohort_sampling") == "poisson":
            parts.append(f"q={float(r.axis('federated.cohort_rate')):g}")
        if fed == "fedadam" and len(server_adams) > 1:  # server Adams of other settings are other systems
            lr, beta1 = _server_adam(r)
            parts.append(f"server lr {lr:g}, β1 {beta1:g}")
        if r.axis("federated.lr_decay") not in (None, "none"):
            parts.append("lr decayed")
        if r.axis("federated.ema"):
            parts.append(f"EMA {float(r.axis('federated.ema')):g}")
        if r.axis("federated.server_adam_bc"):
            parts.append(f"Adam BC {float(r.axis('federated.server_adam_bc')):g}")
        if r.axis("federated.server_shrink"):
            parts.append(f"shrink κ {float(r.axis('federated.server_shrink')):g}")
        if r.axis("federated.public_subspace_dim"):
            parts.append(f"{int(r.axis('federated.public_subspace_dim'))} public directions")
        if _small_client_batch(r):
            parts.append(f"{_small_client_batch(r)}-utterance clients")
        if _population(r):
            parts.append(_population(r))
        if len(budgets) > 1 and _client_steps(r) is not None:
            parts.append(f"{_client_steps(r):,.0f} client steps")
        return ", ".join(parts)

    for r in scored:
        if r.axis("dp.name") in (None, "none"):
            fed, comp = r.axis("federated.name"), compression_words(r)
            detail = how(r)
            name = (plain_label(r) if _no_training(r) else ("centralised" if fed in (None, "none") else "FL")
                    + (f" ({detail})" if detail else ""))
            if fed not in (None, "none") and comp != "none":
                name += f", {comp} updates"
            no_dp[name].append(r.metrics["federated:wer"])
        elif "federated:epsilon/max" in r.metrics:  # FL + DP and DP-only (one data holder) are separate lines
            key = (r.axis("federated.name") in (None, "none"), r.axis("dp.name"), compression_words(r), how(r, with_rate=False))
            with_dp[key][float(r.axis("dp.target_epsilon"))].append((r.metrics["federated:epsilon/max"], r.metrics["federated:wer"]))
    return with_dp, no_dp


def plot_epsilon_wer(runs: list[Run], path: Path) -> bool:
    """WER vs epsilon per kind of DP, compression and federation (mean ± std over seeds), with the runs without DP
    as labelled horizontal baselines (or a note that there is none)."""
    with_dp, no_dp = _epsilon_wer_series(runs)
    if not with_dp:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = iter(["o", "s", "^", "D", "v", "P", "X", "<", ">"] * 3)
    for (dp_only, dp_kind, comp, fed_how), by_target in sorted(with_dp.items(), key=lambda kv: [str(x) for x in kv[0]]):
        eps, wer, err = [], [], []
        for target in sorted(by_target):
            e, _ = _mean_std([p[0] for p in by_target[target]])
            w, sd = _mean_std([100 * p[1] for p in by_target[target]])
            eps.append(e), wer.append(w), err.append(sd)
        what = "local DP (per client)" if dp_kind == "local" else "central DP (server)" if dp_kind == "central" else f"{dp_kind} DP"
        what = "DP-only, centralised DP-SGD" if dp_only else f"FL ({fed_how}) + {what}" if fed_how else f"FL + {what}"
        ax.errorbar(eps, wer, yerr=err if any(err) else None, fmt=next(markers) + "-", capsize=2, ms=5, alpha=0.85,
                    label=f"{what}, {'no compression' if comp in (None, 'none') else comp + ' updates'}")
    styles = iter([":", "--", "-.", (0, (1, 3)), (0, (5, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1))])
    greys = iter(["black", "0.45", "0.25", "0.6", "0.35", "0.5"])
    for name, values in sorted(no_dp.items()):
        w, sd = _mean_std([100 * v for v in values])
        if name.startswith("no private training"):  # the line every private run must get below: solid, apart from the rest
            ax.axhline(w, color="firebrick", lw=1.4, ls="-", label=f"{name} ({w:.1f} %)")
            continue
        ax.axhline(w, color=next(greys, "gray"), lw=1.2, ls=next(styles, ":"), label=f"no DP: {name} ({w:.1f} %)")
    if not no_dp:
        ax.text(0.99, 0.98, "no run without DP among these runs:\nno baseline to compare with", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="0.35")
    ax.set_xscale("log")
    targets = sorted({t for by_target in with_dp.values() for t in by_target})
    ax.set_xticks(targets, [f"{t:g}" for t in targets])  # the budgets run, in plain numbers
    ax.minorticks_off()
    ax.set_xlabel("ε spent, largest over clients (δ = 1e-5)")
    ax.set_ylabel("Word error rate, test speakers (%)")
    ax.set_title("Wav2Vec2 federated + DP: privacy budget vs word error rate", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend_below(fig, ax, ncol=2)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


def _distinct_plain_labels(by_system: dict[tuple, Run]) -> dict[tuple, str]:
    """plain_label of each system's run; systems whose plain labels coincide get the axes they differ in appended
    ("FL (fedadam) + central DP ε=8, server_lr=0.02"), so a legend never shows one name for two systems."""
    plain = {system: plain_label(run) for system, run in by_system.items()}
    names = dict(plain)
    for text in set(plain.values()):
        same = [system for system in plain if plain[system] == text]
        if len(same) < 2:
            continue
        differ = [i for i in range(len(AXES)) if len({repr(system[i]) for system in same}) > 1]
        for system in same:
            names[system] = text + "".join(f", {AXES[i].split('.')[-1]}={system[i]}" for i in differ)
    return names


def plot_federated_rounds(runs: list[Run], path: Path) -> bool:
    """Per-round federated evaluation (clients' held-out utterances) of every FL run: CTC loss and WER,
    each on its own automatic scale (log when the values span more than a factor of 10).

    When the plotted systems spend their client steps at different rates (e.g. 100 rounds of ~1,600 clients
    against 400 rounds of ~400), the x axis is the expected client steps so far (round x q x N x local steps), so
    that schedules of one budget end at the same x; otherwise it is the round."""
    curves = []
    for run in runs:
        rounds_file = run.run_dir / "federated" / "federated_rounds.json"
        if "federated:wer" not in run.metrics or not rounds_file.is_file():
            continue
        all_rounds = json.loads(rounds_file.read_text()).get("rounds", [])
        server = [r for r in all_rounds if r.get("server_eval")]
        if server:  # the server scored the global model on the test speakers every round
            curves.append((run, [r["server_round"] for r in server], [r["server_eval"]["loss"] for r in server],
                           [100 * r["server_eval"]["wer"] for r in server]))
            continue
        rounds = [r for r in all_rounds if r.get("eval")]
        if rounds:
            curves.append((run, [r["server_round"] for r in rounds], [r["eval"]["eval_loss"] for r in rounds],
                           [100 * r["eval"]["eval_wer"] for r in rounds]))
    if not curves:
        return False
    # one curve per system (never per legend text: two systems that differ only in, say, the server lr share a plain
    # label), the mean over its seeds at each round
    grouped: dict[tuple, list] = defaultdict(list)
    first: dict[tuple, Run] = {}  # a run of each system, for its name
    for run, x, loss, wer in curves:
        system = run.system
        grouped[system].append((x, loss, wer))
        first.setdefault(system, run)
    names = _distinct_plain_labels(first)
    curves = []
    for system, members in grouped.items():
        label, dp = names[system], system[AXES.index("dp.name")]
        common = sorted(set.intersection(*(set(m[0]) for m in members)))
        mean = lambda k: [statistics.mean(m[k][m[0].index(x)] for m in members) for x in common]
        budget, rounds = _client_steps(first[system]), first[system].axis("federated.num_rounds")
        per_round = budget / float(rounds) if budget and rounds else None
        curves.append((label + (f" (mean of {len(members)} seeds)" if len(members) > 1 else ""), common, mean(1), mean(2), dp, per_round))
    rates = {c[5] for c in curves}
    by_client_steps = len(rates) > 1 and None not in rates
    if by_client_steps:
        curves = [(label, [r * per_round / 1000 for r in x], loss, wer, dp, per_round) for label, x, loss, wer, dp, per_round in curves]
    starts = [100 * r.metrics["federated:wer"] for r in runs if _no_training(r) and "federated:wer" in r.metrics]
    on_test = any(r.run_dir.joinpath("federated", "federated_rounds.json").is_file() and '"server_eval"' in
                  r.run_dir.joinpath("federated", "federated_rounds.json").read_text() for r in runs if "federated:wer" in r.metrics)
    where = "test speakers (server-side)" if on_test else "clients' held-out utterances"
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax_loss, ax_wer) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"local": "--", "central": ":"}  # line style = kind of DP, colour = run
    colours = _distinct_colours()
    for i, (label, x, loss, wer, dp, _) in enumerate(sorted(curves)):
        kwargs = dict(ls=style.get(dp, "-"), marker="o", ms=3, color=colours[i % len(colours)])
        ax_loss.plot(x, loss, label=label, **kwargs)
        ax_wer.plot(x, wer, **kwargs)
    for ax, values in ((ax_loss, [v for c in curves for v in c[2]]), (ax_wer, [v for c in curves for v in c[3]])):
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 10:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expected client steps so far (thousands; round x q x N x local steps)" if by_client_steps else "round")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel(f"CTC loss, {where}")
    ax_wer.set_ylabel(f"Word error rate, {where} (%)")
    if starts and on_test:  # the public start scored on the same speakers: the line to get below
        ax_wer.axhline(statistics.mean(starts), color="black", lw=1.2, ls="-.",
                       label=f"no private training (public start, {statistics.mean(starts):.1f} %)")
    if max(v for c in curves for v in c[3]) >= 90:
        ax_wer.axhline(100, color="gray", lw=0.8, ls=":")
    fig.suptitle("The global model per round (solid: no DP, dashed: local DP, dotted: central DP)", fontsize=10)
    handles, labels = ax_loss.get_legend_handles_labels()
    extra_handles, extra_labels = ax_wer.get_legend_handles_labels()
    handles, labels = handles + [h for h, l in zip(extra_handles, extra_labels) if l.startswith("no private")], \
        labels + [l for l in extra_labels if l.startswith("no private")]
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_det_overlay(runs: list[Run], path: Path) -> bool:
    """DET curves, one panel per attack scenario, one colour per system (every seed drawn in that
    colour); the unprotected attacks (clean features, raw inputs) drawn in every panel as baselines."""
    from common.metrics import det_curve, det_range, draw_det

    by_scenario: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    names = _distinct_plain_labels({run.system: run for run in runs if run.det_scores})  # one colour per system, not per legend text
    for run in runs:
        for stage, scores_path in run.det_scores.items():
            rows = [line.split() for line in scores_path.read_text().splitlines() if line.strip()]
            labels = [int(r[0]) for r in rows]
            if len(set(labels)) < 2:
                continue
            far, frr, _ = det_curve([float(r[-1]) for r in rows], labels)
            by_scenario[stage.split("/")[-1]][names[run.system]].append((far, frr))
    if not by_scenario:
        return False
    baselines = {name: by_scenario.pop(name) for name in ("clean", "raw") if name in by_scenario}
    panels = [s for s in ("ignorant", "lazy_informed", "semi_informed") if s in by_scenario] + sorted(
        s for s in by_scenario if s not in ("ignorant", "lazy_informed", "semi_informed"))
    if not panels:  # only unprotected attacks: one panel with them
        panels, by_scenario, baselines = ["clean"], {"clean": {}}, baselines
    systems = sorted({name for s in panels for name in by_scenario[s]})
    colours = dict(zip(systems, _distinct_colours() * 2))  # 18 hues before a colour repeats
    baseline_style = {"clean": dict(color="black", ls="--", lw=1.2), "raw": dict(color="0.45", ls="-.", lw=1.2)}
    everything = {f"{s}|{n}|{i}": c for s in panels for n, cs in by_scenario[s].items() for i, c in enumerate(cs)}
    everything.update({f"{b}|{n}|{i}": c for b, d in baselines.items() for n, cs in d.items() for i, c in enumerate(cs)})
    rate_range = det_range(everything)
    plt = _pyplot()
    ncols = min(4, len(panels))  # at most 4 panels a row: the normalising variants add panels
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.6 * nrows), squeeze=False)
    axes = [list(grid.flat[: len(panels)])]
    for ax in grid.flat[len(panels):]:
        fig.delaxes(ax)
    handles: dict[str, object] = {}
    for ax, scenario in zip(axes[0], panels):
        curves, styles = {}, {}
        for name, seeds in by_scenario[scenario].items():
            for i, c in enumerate(seeds):
                key = f"{name}#{i}"
                curves[key], styles[key] = c, dict(color=colours[name], lw=1.4, alpha=1.0 if i == 0 else 0.5)
        for base, d in baselines.items():
            for name, seeds in d.items():
                for i, c in enumerate(seeds):
                    key = SCENARIO_TITLES[base] + ("" if name == "no masks" else f": {name}") + f"#{i}"
                    curves[key], styles[key] = c, dict(baseline_style[base], alpha=1.0 if i == 0 else 0.5)
        draw_det(ax, curves, rate_range, styles)
        for line in ax.get_lines():
            label = line.get_label().split("#")[0]
            if not label.startswith("_"):
                handles.setdefault(label, line)
        ax.set_title(SCENARIO_TITLES.get(scenario, scenario).replace(" (", "\n("), fontsize=9)
    for i, ax in enumerate(axes[0]):
        if i % ncols:
            ax.set_ylabel("")
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


def _seeded(run: Run) -> bool:
    """Everything random in the run comes from its seed: no DP, or DP noise reproducible from the config (NOT private).
    A private DP run draws its noise (and, under central DP, its cohorts) from the OS CSPRNG: two such runs of one
    seed share nothing, so they are never paired."""
    return run.axis("dp.name") in (None, "none") or run.not_private


def paired_differences(runs: list[Run], paired: str, metric: str = "federated:wer") -> list[dict]:
    """Per-seed differences `metric(run) - metric(baseline)` between runs of the same seed whose systems differ
    only in one axis, the baseline having the given value ("compression.name=none": int8 - none and top-k - none
    on the same cohorts). One record per compared system: its label, the baseline's label and the (seed, Δ) pairs;
    seeds without a partner are listed, not paired with anything else. Runs with private DP noise are left out
    (`_seeded`): the same seed does not make them draw the same cohorts or noise."""
    axis, sep, baseline = paired.partition("=")
    if not sep or axis not in AXES:
        raise ValueError(f"--paired {paired!r}: expected AXIS=BASELINE with AXIS one of the table axes {list(AXES)}")
    position = AXES.index(axis)
    partners: dict[tuple, dict] = defaultdict(dict)  # (system without the axis) -> seed -> baseline run
    for run in runs:
        if metric in run.metrics and str(run.system[position]) == baseline and _seeded(run):
            key = run.system[:position] + run.system[position + 1:]
            if run.seed in partners[key]:
                raise ValueError(f"--paired {paired!r}: two baseline runs of seed {run.seed} for one system "
                                 f"({partners[key][run.seed].run_dir} and {run.run_dir}); pass --where to keep one")
            partners[key][run.seed] = run
    compared: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: (str(r.run_dir))):
        if metric not in run.metrics or str(run.system[position]) == baseline or not _seeded(run):
            continue
        key = run.system[:position] + run.system[position + 1:]
        if not partners.get(key):
            continue  # nothing to compare with (another budget, another kind of DP ...)
        record = compared.setdefault(run.system, {"label": _label(run), "baseline": _label(next(iter(partners[key].values()))),
                                                  "pairs": [], "unpaired": []})
        partner = partners[key].get(run.seed)
        if partner is None:
            record["unpaired"].append(run.seed)
        else:
            record["pairs"].append((run.seed, run.metrics[metric] - partner.metrics[metric]))
    return [compared[k] for k in sorted(compared, key=lambda k: [str(x) for x in k])]


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The two-sided Student-t interval of the mean (None below two values)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.mean(values) - half, statistics.mean(values) + half


def paired_markdown(records: list[dict], paired: str, metric: str, scale: float = 100.0) -> str:
    header = ["system", "baseline", "pairs", "Δ per seed (seed: Δ)", "Δ mean ± std over pairs", "95 % t-interval of the mean Δ",
              "Δ min / max"]
    rows = []
    for r in records:
        deltas = [d * scale for _, d in sorted(r["pairs"])]
        interval = mean_interval(deltas)
        per_seed = ", ".join(f"s{seed}: {d * scale:+.1f}" for seed, d in sorted(r["pairs"]))
        if r["unpaired"]:
            per_seed += f" (no baseline for seed {', '.join(str(s) for s in sorted(r['unpaired']))})"
        mean = "-" if not deltas else f"{statistics.mean(deltas):+.2f}" + (f" ± {statistics.stdev(deltas):.2f}" if len(deltas) > 1 else "")
        extremes = "-" if not deltas else f"{min(deltas):+.1f} / {max(deltas):+.1f}"
        rows.append([r["label"], r["baseline"], str(len(deltas)), per_seed, mean,
                     "-" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]", extremes])
    title = f"### Paired differences of {metric} (points) vs {paired}: same seed, every other axis equal\n\n"
    note = "\nRuns with private DP noise (OS CSPRNG noise and cohorts) are not paired: one seed does not give them the same draws.\n"
    return title + to_markdown(header, rows) + note


def _client_steps(run: Run) -> float | None:
    """The federation's expected sample-gradient budget: rounds x q x N x local steps (Poisson cohorts); the centralised
    baseline makes the same number of steps from the same fields (training/wav2vec2/plan.py centralised_steps)."""
    values = [run.axis(k) for k in ("federated.num_rounds", "federated.cohort_rate", "federated.num_clients", "federated.local_steps")]
    if any(v is None for v in values) or run.axis("federated.cohort_sampling") != "poisson":
        return None
    rounds, q, n, steps = values
    return round(float(rounds) * float(q) * float(n) * float(steps), 6)


def plot_cohort_size(runs: list[Run], path: Path) -> bool:
    """WER vs the expected cohort (q x N) of plain FedAvg runs without DP or compression that spend the same number
    of client steps (rounds x q x N x local steps) with different cohorts, mean ± std over seeds; the centralised
    run of that budget and the public start as labelled lines; FedAvg + central DP runs of that budget as points
    (the cohort at which user-level DP was run); runs with a FedAvgM server learning rate < 1 as lines of their own.
    Drawn only when some budget has plain-FedAvg runs of two or more cohort sizes."""
    plain = lambda r: (r.axis("compression.name") in (None, "none") and not r.axis("federated.server_momentum")
                       and r.axis("federated.lr_decay") in (None, "none") and not r.axis("federated.ema")
                       and not r.axis("federated.server_shrink") and not r.axis("federated.server_adam_bc"))
    server_lr = lambda r: float(r.axis("federated.fedavg_server_lr") or 1.0)
    by_budget: dict[tuple, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))  # (budget, server lr, local steps) -> cohort -> runs
    dp_points: dict[float, dict[tuple, list[Run]]] = defaultdict(lambda: defaultdict(list))
    central: dict[float, list[float]] = defaultdict(list)
    starts = []
    for r in runs:
        if "federated:wer" not in r.metrics or not str(r.axis("model.name")).startswith("wav2vec2"):
            continue
        budget = _client_steps(r)
        if _no_training(r):
            starts.append(100 * r.metrics["federated:wer"])
        elif budget is None or not plain(r):
            continue
        elif r.axis("federated.name") in (None, "none"):  # (the server learning rate does not exist there)
            if _plain_centralised(r):
                central[budget].append(100 * r.metrics["federated:wer"])
        elif r.axis("federated.name") == "fedavg":
            cohort = float(r.axis("federated.cohort_rate")) * float(r.axis("federated.num_clients"))
            if r.axis("dp.name") in (None, "none"):
                by_budget[(budget, server_lr(r), int(r.axis("federated.local_steps")))][cohort].append(r)
            elif r.axis("dp.name") == "central" and server_lr(r) == 1.0:
                dp_points[budget][(cohort, float(r.axis("dp.target_epsilon")))].append(r)
    # a budget is drawn when its plain-FedAvg runs (server lr 1) cover two or more cohort sizes; its runs with a
    # smaller server step (FedAvgM learning rate < 1, for the small cohorts) are drawn as lines of their own
    budgets = sorted({b for (b, lr, _), cohorts in by_budget.items() if lr == 1.0 and len(cohorts) > 1})
    if not budgets:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    markers = iter(["o", "s", "^", "D"] * 3)
    xs_all, ys_all = [], []
    greys = iter(["black", "0.4", "0.6"])
    colours = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:olive", "tab:cyan"] * 2)
    for budget in budgets:
        for key in sorted((k for k in by_budget if k[0] == budget), key=lambda k: (-k[1], -k[2])):
            series, lr, local_steps = by_budget[key], key[1], key[2]
            cohorts = sorted(series)
            stats = [_mean_std([100 * r.metrics["federated:wer"] for r in series[c]]) for c in cohorts]
            seeds = [len(series[c]) for c in cohorts]
            what = "FedAvg" if lr == 1.0 else f"FedAvg, server learning rate {lr:g}"
            ax.errorbar(cohorts, [m for m, _ in stats], yerr=[sd for _, sd in stats], fmt=next(markers) + "-", capsize=3, ms=6,
                        color=next(colours), label=f"{what}, no DP, {budget:,.0f} client steps of which {local_steps} per client and round "
                                                   f"(seeds per point: {', '.join(map(str, seeds))})")
            xs_all += cohorts
            ys_all += [m + sd for m, sd in stats] + [m - sd for m, sd in stats]
        if central.get(budget):
            w, sd = _mean_std(central[budget])
            colour = next(greys, "gray")
            ax.axhline(w, color=colour, ls="--", lw=1.2, label=f"centralised, {budget:,.0f} steps ({w:.1f} ± {sd:.1f} %)")
            ax.axhspan(w - 100 * WER_MARGIN, w + 100 * WER_MARGIN, color=colour, alpha=0.08, lw=0,
                       label=f"within {100 * WER_MARGIN:.0f} points of centralised (the target)")
            ys_all += [w - 100 * WER_MARGIN, w + 100 * WER_MARGIN]
        dp_styles = iter(zip(["*", "P", "X", "v", "^", "D"] * 2, ["tab:red", "black", "tab:brown", "tab:pink", "crimson", "gold"] * 2))
        for (cohort, eps), members in sorted(dp_points.get(budget, {}).items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            w, sd = _mean_std([100 * r.metrics["federated:wer"] for r in members])
            marker, colour = next(dp_styles)
            ax.errorbar([cohort], [w], yerr=[sd], fmt=marker, ms=11, capsize=3, color=colour, alpha=0.85,
                        label=f"FedAvg + user-level central DP ε={eps:g} ({len(members)} seed{'s' if len(members) != 1 else ''})")
            xs_all.append(cohort)
            ys_all += [w - sd, w + sd]
    if starts:
        w = statistics.mean(starts)
        ax.axhline(w, color="firebrick", lw=1.2, ls="-", label=f"no private training (public start, {w:.1f} %)")
        ys_all.append(w)
    ax.set_xscale("log")
    ticks = sorted(set(xs_all))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
    span = max(ys_all) - min(ys_all) or 1.0
    ax.set_ylim(min(ys_all) - 0.08 * span, max(ys_all) + 0.08 * span)
    ax.set_xlabel("clients per round (expected cohort q x N); fewer clients = more rounds for the same client steps")
    ax.set_ylabel("Word error rate, test speakers (%)")
    ax.set_title("FedAvg at a fixed number of client steps: cohort size vs word error rate", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, ncol=1)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


def select_runs(runs: list[Run], where: list[str]) -> list[Run]:
    """Keep the runs whose config matches every "dotted.key=value" (compared as strings)."""
    conditions = []
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {item!r}: expected dotted.key=value, e.g. model.name=wav2vec2_tiny")
        conditions.append((key, value))
    return [r for r in runs if all(str(r.axis(k)) == v for k, v in conditions)]


def make_tables(runs_dir: Path, out_dir: Path, context: str = "", where: list[str] | None = None,
                paired: list[str] | None = None) -> str:
    runs = select_runs(find_runs(runs_dir), where or [])
    for run in runs:
        add_strongest_attack(run, "semi_informed")
    paired_sections = [(p, paired_differences(runs, p)) for p in paired or []]  # bad AXIS=BASELINE fails before any output
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    header, rows, raw_masks = build_table(runs, MASK_TABLE)
    if rows:
        sections.append(("AV-HuBERT + masks: utility (WER, %) and identity leakage (probe, attacker EER, %)", "masks", header, rows))
    fl_columns = [Column(epsilon_title(runs), c.key, c.scale, c.digits) if c.key == "federated:epsilon/max" else c for c in FL_TABLE]
    header_fl, rows_fl, _ = build_table(runs, fl_columns)
    if rows_fl:
        sections.append(("Wav2Vec2 federated + DP (WER/CER in %)", "fl_dp", header_fl, rows_fl))
    margin_lines = smallest_epsilon_within_margin(runs)  # the seed's "< 2 points at epsilon 1" claim, checked
    command = (f"python -m scripts.make_tables --runs-dir {runs_dir}" + "".join(f" --where {w}" for w in where or [])
               + "".join(f" --paired {p}" for p in paired or []))
    md = [f"<!-- generated by `{command}`; do not edit by hand -->\n"]
    if context:
        md.append(context.strip() + "\n")
    for title, name, h, r in sections:
        md.append(f"### {title}\n\n" + to_markdown(h, r))
        (out_dir / f"{name}.md").write_text(to_markdown(h, r))
        (out_dir / f"{name}.tex").write_text(to_latex(h, r, title))
        if name == "masks" and any(t.startswith("EER semi-inf., strongest") for t in h):
            md.append(STRONGEST_NOTE + "\n")
        if name == "fl_dp" and margin_lines:
            md.append("\n".join(margin_lines) + "\n")
    for number, (pair, records) in enumerate(paired_sections):
        if records:
            text = paired_markdown(records, pair, "federated:wer")
            md.append(text)
            (out_dir / f"paired_{number + 1}.md").write_text(text)
        else:
            md.append(f"No pairs for --paired {pair}: no run differs from a baseline run of the same seed in that axis alone.\n")
    plots = []
    for scenario in ("semi_informed", "lazy_informed", "ignorant", "semi_informed-mean", f"semi_informed-{STRONGEST}"):
        if plot_privacy_utility(raw_masks, out_dir / f"privacy_utility_{scenario}.png", "evaluate:wer/audio_video/clean", f"attack/{scenario}:eer"):
            plots.append(f"privacy_utility_{scenario}.png")
    if plot_epsilon_wer(runs, out_dir / "epsilon_wer.png"):
        plots.append("epsilon_wer.png")
    if plot_federated_rounds(runs, out_dir / "federated_rounds.png"):
        plots.append("federated_rounds.png")
    if plot_cohort_size(runs, out_dir / "cohort_size.png"):
        plots.append("cohort_size.png")
    if plot_det_overlay(runs, out_dir / "det_overlay.png"):
        plots.append("det_overlay.png")
    if plots:
        md.append("Plots: " + ", ".join(f"`{out_dir / p}`" for p in plots) + "\n")
    problems = [(r.run_dir, p) for r in runs for p in r.problems]
    if problems:
        md.append("### Failed or incomplete stages\n\n" + "\n".join(f"- `{d}`: {p}" for d, p in problems) + "\n")
    if not sections and not problems:
        md.append(f"No runs with metrics under `{runs_dir}`.\n")
    text = "\n".join(md)
    (out_dir / "tables.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <runs-dir>/tables)")
    parser.add_argument("--context", default="", help="a line stating data, model size, seeds and hardware")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs whose config has this value (repeatable), e.g. --where model.name=wav2vec2_tiny")
    parser.add_argument("--paired", action="append", default=[], metavar="AXIS=BASELINE",
                        help="per-seed WER differences against the runs with AXIS=BASELINE that differ in nothing else "
                             "(repeatable), e.g. --paired compression.name=none")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        raise SystemExit(f"error: runs directory {args.runs_dir} does not exist (run train_avhubert.py first)")
    try:
        print(make_tables(args.runs_dir, args.out or args.runs_dir / "tables", args.context, args.where, args.paired))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
