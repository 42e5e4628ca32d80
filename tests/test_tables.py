"""scripts.make_tables on synthetic run folders: grouping, mean +- std over seeds, failed runs reported, plots."""

import json
from pathlib import Path

import yaml

from scripts.make_tables import find_runs, make_tables, pareto_front


def write_stage(run_dir: Path, stage: str, config: dict, metrics: dict | None, status: str = "done", scores=None):
    d = run_dir / stage
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump({**config, "paths": {"run_dir": str(run_dir)}}))
    (d / "status.json").write_text(json.dumps({"status": status, **({"error": "RuntimeError: boom"} if status == "failed" else {})}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if scores is not None:
        (d / "scores.txt").write_text("".join(f"{l} a b {s}\n" for l, s in scores))


def config(masks: str, loss: str, seed: int, lam=0.1):
    return {"seed": seed, "data": {"name": "synthgrid"}, "model": {"name": "avhubert_tiny"}, "adapter": {"name": "adalora"},
            "masks": {"name": masks}, "loss": {"name": loss, "lambda": lam}, "federated": {"name": "none"},
            "dp": {"name": "none", "target_epsilon": 8.0}, "compression": {"name": "none"}}


def make_runs(root: Path):
    for masks, loss, wers, eers in (("none", "ctc", (0.05, 0.07), (0.02, 0.04)), ("both", "ctc_contrastive", (0.08, 0.10), (0.40, 0.44))):
        for seed, wer, eer in zip((1, 2), wers, eers):
            run = root / "synthgrid" / f"{masks}-{loss}" / f"s{seed}"
            cfg = config(masks, loss, seed)
            write_stage(run, "finetune", cfg, {"probe/speaker_acc": 0.9, "probe/eer": 0.1})
            write_stage(run, "evaluate", cfg, {"wer/audio_video/clean": wer, "wer/audio/clean": wer + 0.01})
            write_stage(run, "attack/semi_informed", cfg, {"eer": eer, "min_dcf_p0.05": 0.5},
                        scores=[(1, 0.9), (1, 0.7), (0, 0.2), (0, 0.6)])
    failed = root / "synthgrid" / "additive-ctc" / "s1"
    write_stage(failed, "finetune", config("additive", "ctc", 1), None, status="failed")


def test_runs_grouped_by_system_with_mean_and_std(tmp_path):
    make_runs(tmp_path / "runs")
    text = make_tables(tmp_path / "runs", tmp_path / "out")
    md = (tmp_path / "out" / "masks.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| avhubert")]
    assert len(rows) == 2  # two systems, seeds aggregated
    both = next(r for r in rows if "masks=both" in r)
    none = next(r for r in rows if "masks=none" in r)
    assert "9.0 ± 1.4" in both  # WER AV clean (8, 10) -> mean 9.0, sample std 1.41
    assert "42.0 ± 2.8" in both  # semi-informed EER (40, 44)
    assert "6.0 ± 1.4" in none
    assert "| 2 |" in both  # two seeds
    assert "Failed or incomplete" in text and "additive-ctc" in text and "RuntimeError: boom" in text
    tex = (tmp_path / "out" / "masks.tex").read_text()
    assert r"\pm" in tex and r"\begin{tabular}" in tex
    assert (tmp_path / "out" / "privacy_utility_semi_informed.png").stat().st_size > 1000
    assert (tmp_path / "out" / "det_overlay.png").stat().st_size > 1000


def test_hydra_job_folders_are_not_mistaken_for_stages(tmp_path):
    make_runs(tmp_path / "runs")
    job = tmp_path / "runs" / "multirun" / "2026-01-01_00-00-00" / "0"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(yaml.safe_dump({"seed": 1}))
    runs = find_runs(tmp_path / "runs")
    assert not any("multirun" in str(r.run_dir) for r in runs)


def test_incomplete_stage_without_metrics_is_reported_not_dropped(tmp_path):
    run = tmp_path / "runs" / "synthgrid" / "x" / "s1"
    write_stage(run, "evaluate", config("none", "ctc", 1), None, status="running")
    # status.json says running, but no live process holds the stage's lock: it was killed
    runs = find_runs(tmp_path / "runs")
    assert len(runs) == 1 and runs[0].problems == ["evaluate: the process died while the stage was running (killed?)"]
    from training.stage import StageLock

    lock = StageLock(run / "evaluate").acquire()  # a live run holds it
    try:
        assert find_runs(tmp_path / "runs")[0].problems == ["evaluate: running"]
    finally:
        lock.release()


def test_pareto_front_low_wer_high_eer():
    pts = [(5.0, 10.0), (6.0, 40.0), (7.0, 30.0), (9.0, 45.0)]
    assert sorted(pareto_front(pts)) == [0, 1, 3]


def fl_config(fed: str, dp: str, eps: float, compression: str = "none", rounds: int = 10):
    return {"seed": 1, "data": {"name": "synthgrid", "tokenizer": "word"}, "model": {"name": "wav2vec2_tiny"},
            "adapter": {"name": "none"}, "masks": {"name": "none"}, "loss": {"name": "ctc"},
            "federated": {"name": fed, "num_rounds": rounds, "local_steps": 20},
            "dp": {"name": dp, "target_epsilon": eps}, "compression": {"name": compression}}


def test_fl_rows_and_the_smallest_epsilon_within_two_points(tmp_path):
    runs = tmp_path / "runs"
    for name, (fed, dp, eps, comp, wer, rounds) in {
        "central": ("none", "none", 8.0, "none", 0.500, 10),
        "fl": ("fedavg", "none", 8.0, "none", 0.510, 10),
        "e1": ("fedavg", "local", 1.0, "none", 0.900, 10),
        "e3": ("fedavg", "local", 3.0, "none", 0.515, 10),
        "e8": ("fedavg", "local", 8.0, "none", 0.505, 10),
        "e8-int8": ("fedavg", "local", 8.0, "int8", 0.600, 10),
        "demo": ("fedavg", "local", 8.0, "none", 0.990, 2),  # another budget: its own row, not a second seed
    }.items():
        write_stage(runs / name / "s1", "federated", fl_config(fed, dp, eps, comp, rounds),
                    {"wer": wer, "cer": wer / 2, "epsilon/max": eps if dp != "none" else 0.0, "test_loss": 2.0,
                     "bytes_per_client_round": 1000.0, "compression_ratio": 1.0})
        if fed != "none":
            rounds_log = {"rounds": [{"server_round": i, "eval": {"eval_loss": 4.0 / i, "eval_wer": 1.0 - wer / i}} for i in (1, 2, 3)]}
            (runs / name / "s1" / "federated" / "federated_rounds.json").write_text(json.dumps(rounds_log))
    text = make_tables(runs, tmp_path / "out")
    assert (tmp_path / "out" / "federated_rounds.png").stat().st_size > 1000
    rows = [line for line in (tmp_path / "out" / "fl_dp.md").read_text().splitlines() if line.startswith("| wav2vec2")]
    assert len(rows) == 7
    assert sum("local DP ε=8.0, 10x20 steps" in r for r in rows) == 1 and sum("2x20 steps" in r for r in rows) == 1
    assert "FL + local DP, compression none: smallest ε within +2 points of the centralised 50.0 % WER: ε = 3 (WER 51.5 %)" in text
    assert "FL + local DP, compression int8: smallest ε within +2 points of the centralised 50.0 % WER: none of ε ∈ {8}" in text
    assert "2x20 steps, FL + local DP" not in text  # no centralised baseline with that budget: no claim


def test_where_selects_runs_by_config_value(tmp_path):
    import pytest

    make_runs(tmp_path / "runs")
    text = make_tables(tmp_path / "runs", tmp_path / "out", where=["masks.name=both"])
    assert "masks=both" in text and "masks=none" not in text and "--where masks.name=both" in text
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        make_tables(tmp_path / "runs", tmp_path / "out", where=["masks.name"])


def test_speaker_resampling_intervals_are_shown_next_to_the_eer(tmp_path):
    run = tmp_path / "runs" / "synthgrid" / "both" / "s1"
    cfg = config("both", "ctc_contrastive", 1)
    write_stage(run, "evaluate", cfg, {"wer/audio_video/clean": 0.1})
    write_stage(run, "attack/semi_informed", cfg, {"eer": 0.2, "eer_ci_low": 0.12, "eer_ci_high": 0.31, "min_dcf_p0.05": 0.5,
                                                   "min_dcf_p0.05_ci_low": 0.4, "min_dcf_p0.05_ci_high": 0.65})
    write_stage(run, "attack/ignorant", cfg, {"eer": 0.3})  # an older run without intervals: the value alone
    make_tables(tmp_path / "runs", tmp_path / "out")
    row = next(line for line in (tmp_path / "out" / "masks.md").read_text().splitlines() if "masks=both" in line)
    assert "20.0 [12.0, 31.0]" in row and "0.500 [0.400, 0.650]" in row and "| 30.0 |" in row
