"""The Hydra configuration: one primary config, schemas that catch typos, run dirs that meet."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import training.config  # noqa: F401  (registers schemas and resolvers)
from training.config import PROJECT_ROOT

CONF = str(PROJECT_ROOT / "conf")


def cfg_for(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("config", overrides=list(overrides))


def test_defaults_compose_and_resolve():
    cfg = cfg_for()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["name"] == "avhubert_tiny"
    assert resolved["paths"]["run_dir"].endswith("runs/synthgrid/avhubert_tiny-adalora-ctc/s1")
    assert cfg_for("masks=both").paths.run_dir.endswith("avhubert_tiny-adalora-both-s1.0-ctc/s1")


def test_wav2vec2_run_names_carry_the_step_budget():
    # the centralised baseline's budget comes from the federated plan, not from federated.tag:
    # without the budget in the name, a demo-sized baseline would be "done" for the full table
    table = cfg_for("experiment=fl_dp", "federated=none", "dp=none").paths.run_dir
    demo = cfg_for("experiment=demo_fl_dp", "federated=none", "dp=none").paths.run_dir
    assert table.endswith("wav2vec2_tiny-ctc-b10x20/s1") and demo.endswith("wav2vec2_tiny-lora-ctc-int8-b10x3q0.5/s1")
    fl = cfg_for("experiment=fl_dp", "federated.local_steps=null", "federated.local_epochs=2").paths.run_dir
    assert fl.endswith("wav2vec2_tiny-ctc-fedavg-c4-r10-ldp-eps8.0-b10xe2/s1")


def test_topk_runs_at_another_fraction_or_value_width_get_their_own_directory():
    base = ("experiment=fl_dp_population", "dp=none")
    assert cfg_for(*base, "compression=topk").paths.run_dir.endswith("-fedavg-c320-r10-topk-b10x5q0.25/s1")  # the old name
    assert cfg_for(*base, "compression=topk", "compression.topk_fraction=0.18", "compression.topk_value_bits=8"
                   ).paths.run_dir.endswith("-fedavg-c320-r10-topk0.18-v8-b10x5q0.25/s1")
    assert cfg_for(*base, "compression=topk", "compression.topk_fraction=0.07").paths.run_dir.endswith("-topk0.07-b10x5q0.25/s1")
    # the preset is the same system as its overrides, so it shares their directory
    assert cfg_for(*base, "compression=topk_int4").paths.run_dir == cfg_for(
        *base, "compression=topk", "compression.topk_fraction=0.5", "compression.topk_value_bits=4").paths.run_dir
    # the top-k fields do not rename runs of the other compressors
    assert cfg_for(*base, "compression=int8", "compression.topk_fraction=0.5").paths.run_dir.endswith("-c320-r10-int8-b10x5q0.25/s1")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.max_steps=abc", "max_steps"),
        ("masks.positon=frontend", "positon"),
        ("loss.lambda=high", "lambda"),
        ("model=avhubert_huge", "avhubert_huge"),
    ],
)
def test_bad_overrides_fail_with_hydra_message(override, fragment):
    with pytest.raises(ConfigCompositionException) as err:
        cfg_for(override)
    assert fragment in str(err.value) or fragment in str(err.value.__cause__)


def test_run_dir_depends_on_what_the_asr_stage_learns_not_on_the_attacker():
    base = cfg_for("masks=both", "loss=ctc_contrastive")
    attack = cfg_for("masks=both", "loss=ctc_contrastive", "attacker=audio_only", "attacker.scenario=ignorant")
    assert base.paths.run_dir == attack.paths.run_dir
    assert cfg_for("masks=additive").paths.run_dir != base.paths.run_dir
    assert cfg_for("masks=both", "loss=ctc_contrastive", "loss.lambda=0.5").paths.run_dir != base.paths.run_dir
    assert cfg_for("seed=2").paths.run_dir != cfg_for("seed=1").paths.run_dir


def test_both_entry_scripts_resolve_the_same_run_dir(tmp_path):
    args = ["masks=both", "loss=ctc_contrastive", f"paths.root_dir={tmp_path}", "--cfg", "job", "--resolve"]
    outs = []
    for script in ("train_avhubert.py", "train_speaker_verification.py"):
        out = subprocess.run([sys.executable, script, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
        outs.append([line for line in out.splitlines() if line.strip().startswith("run_dir:")])
    assert outs[0] == outs[1] and outs[0]
    assert str(tmp_path) in outs[0][0]


def test_multirun_with_two_overrides_makes_two_run_dirs(tmp_path):
    """`-m` over two mask settings: two jobs, two distinct run directories (dry_run: compose and plan only)."""
    proc = subprocess.run(
        [sys.executable, "train_avhubert.py", "-m", "masks=additive,multiplicative", f"paths.root_dir={tmp_path}",
         "dry_run=true"],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = sorted((tmp_path / "runs").glob("synthgrid/*/s1/plan/finetune.yaml"))
    assert [p.parents[2].name for p in plans] == ["avhubert_tiny-adalora-additive-s1.0-ctc", "avhubert_tiny-adalora-multiplicative-s1.0-ctc"]
    masks = [OmegaConf.load(p).masks.name for p in plans]
    assert masks == ["additive", "multiplicative"]


def test_experiment_file_is_overridden_by_the_command_line():
    exp = cfg_for("experiment=paper_masks")
    assert exp.masks.name == "both"
    cli = cfg_for("experiment=paper_masks", "masks=additive", "trainer.max_steps=7")
    assert cli.masks.name == "additive" and cli.trainer.max_steps == 7


def test_every_experiment_composes():
    names = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml"))
    assert {"demo", "paper_masks", "paper_noise", "fl_dp", "privacy_utility", "lrs3_base", "voxceleb2_attacker"} <= set(names)
    for name in names:
        cfg = cfg_for(f"experiment={name}")
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_launchers_run_each_job_in_its_own_run_dir(tmp_path, launcher):
    """The joblib (local parallel) and submitit (SLURM; `submitit_local` here) launchers run the same jobs."""
    proc = subprocess.run(
        [sys.executable, "train_avhubert.py", "-m", f"hydra/launcher={launcher}", "masks=additive,both",
         f"paths.root_dir={tmp_path}", "dry_run=true"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = sorted(p.parents[2].name for p in (tmp_path / "runs").glob("synthgrid/*/s1/plan/finetune.yaml"))
    assert plans == ["avhubert_tiny-adalora-additive-s1.0-ctc", "avhubert_tiny-adalora-both-s1.0-ctc"]


@pytest.mark.parametrize("script, says", [
    ("train_avhubert.py", ["Wav2Vec2", "training/wav2vec2/", "== Configuration groups =="]),
    ("train_speaker_verification.py", ["RJCA speaker verification", "== Configuration groups =="]),
])
def test_help_starts_with_the_entry_scripts_docstring(script, says):
    out = subprocess.run([sys.executable, script, "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    header = out.stdout.split("== Configuration groups ==")[0]
    assert "powered by Hydra" not in header
    for text in says:
        assert text in out.stdout, text


def test_noise_granularity_is_in_the_run_name_only_when_not_frame():
    frame = cfg_for("masks=both").paths.run_dir
    assert frame.endswith("avhubert_tiny-adalora-both-s1.0-ctc/s1")  # today's run names stay valid
    assert cfg_for("masks=both", "masks.noise_granularity=utterance").paths.run_dir.endswith("both-s1.0-utt-ctc/s1")
    seg = cfg_for("masks=both", "masks.noise_granularity=segment", "masks.segment_frames=10").paths.run_dir
    assert seg.endswith("both-s1.0-seg10-ctc/s1")


def test_segment_longer_than_every_utterance_fails_at_start_up(tmp_path):
    from data.manifest import Utterance, write_split
    from training.avhubert.finetune import validate_options

    write_split(tmp_path, "train", [Utterance(f"u{i}", "", f"a{i}.wav", n, n * 640, "spk1", "bin blue")
                                    for i, n in enumerate((40, 62))])
    ok = cfg_for("masks=both", "masks.noise_granularity=segment", "masks.segment_frames=25", f"data.dir={tmp_path}")
    validate_options(ok)
    bad = cfg_for("masks=both", "masks.noise_granularity=segment", "masks.segment_frames=80", f"data.dir={tmp_path}")
    with pytest.raises(ValueError, match=r"masks.segment_frames=80 .*data.dir=.*62 frames.*masks.noise_granularity=utterance"):
        validate_options(bad)
    with pytest.raises(ValueError, match="masks.noise_granularity must be one of"):
        validate_options(cfg_for("masks=both", "masks.noise_granularity=word"))


def test_mcadams_baseline_has_its_own_run_dir_and_is_refused_by_the_wav2vec2_variant():
    from training.tasks import run_asr_task

    base = cfg_for().paths.run_dir
    anon = cfg_for("data.anonymize=mcadams", "data.mcadams_alpha=0.8").paths.run_dir
    assert anon.endswith("avhubert_tiny-mcadams0.8-adalora-ctc/s1") and anon != base
    with pytest.raises(ValueError, match="data.anonymize=mcadams conflicts with model.family=wav2vec2"):
        run_asr_task(cfg_for("experiment=fl_dp", "data.anonymize=mcadams"))


def test_privacy_stats_corpus_has_40_trial_speakers_in_its_own_directories():
    from data.synthgrid.speakers import split_sizes

    big, demo = cfg_for("experiment=privacy_stats"), cfg_for("experiment=demo")
    splits = OmegaConf.to_container(big.data.splits)
    sizes, _ = split_sizes(big.data.num_speakers, splits)
    assert sizes["attacker_trials"] >= 40 and sum(sizes.values()) == big.data.num_speakers
    assert big.data.dir != demo.data.dir and big.paths.run_dir != demo.paths.run_dir
    assert big.paths.pretrained_dir != demo.paths.pretrained_dir


def test_privacy_terms_tag_reads_contrastive_as_a_bool_whatever_its_spelling():
    # OmegaConf hands a resolver a bool, or the string a YAML/CLI value was written as; both must name the same run
    from training.config import _privacy_terms_tag

    for on in (True, "True", "true"):
        assert _privacy_terms_tag(on, "identity", "noisy", 0, "fused", 0) == "pidentity-nnoisy"
    for off in (False, "False", "false"):
        assert _privacy_terms_tag(off, "identity", "noisy", 0, "fused", 0) == "none"
