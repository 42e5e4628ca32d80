"""scripts.make_tables on synthetic run folders: grouping, mean +- std over seeds, failed runs reported, plots."""

import json
from pathlib import Path

import numpy as np
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
                     "bytes_per_client_round": 1000.0, "compression_ratio": 1.0, "bytes_on_wire": 1,
                     **({"dp/noise_from_os_csprng": 1, "not_private": 0} if dp != "none" else {})})
        if fed != "none":
            rounds_log = {"rounds": [{"server_round": i, "eval": {"eval_loss": 4.0 / i, "eval_wer": 1.0 - wer / i}} for i in (1, 2, 3)]}
            (runs / name / "s1" / "federated" / "federated_rounds.json").write_text(json.dumps(rounds_log))
    text = make_tables(runs, tmp_path / "out")
    assert (tmp_path / "out" / "federated_rounds.png").stat().st_size > 1000
    rows = [line for line in (tmp_path / "out" / "fl_dp.md").read_text().splitlines() if line.startswith("| wav2vec2")]
    assert len(rows) == 7
    assert sum("local DP ε=8.0 (utterance-level), 10x20 steps" in r for r in rows) == 1 and sum("2x20 steps" in r for r in rows) == 1
    assert "FL + local DP, compression none: smallest ε within +2 points of the centralised 50.0 % WER: ε = 3 (WER 51.5 %)" in text
    assert "FL + local DP, compression int8: smallest ε within +2 points of the centralised 50.0 % WER: none of ε ∈ {8}" in text
    assert "2x20 steps, FL + local DP" not in text  # no centralised baseline with that budget: no claim
    # a diagnostic variant of the centralised run (lr decay) is a row of its own, not a second reference
    decayed = fl_config("none", "none", 8.0)
    decayed["federated"]["lr_decay"] = "linear"
    write_stage(runs / "central-decay" / "s1", "federated", decayed, {"wer": 0.700, "cer": 0.3, "epsilon/max": 0.0, "test_loss": 2.0})
    assert "smallest ε within +2 points of the centralised 50.0 % WER: ε = 3 (WER 51.5 %)" in make_tables(runs, tmp_path / "out")
    import shutil

    shutil.rmtree(runs / "central-decay")
    # the epsilon column names the privacy unit and the adjacency; rows say their unit
    assert "ε spent (max client), δ = 1e-5, add/remove one utterance (local DP) |" in text
    assert sum("local DP ε=3.0 (utterance-level)" in r for r in rows) == 1
    assert not any("NOT PRIVATE" in r for r in rows)

    # a run with reproducible noise (the option, or an old run without the CSPRNG marker) is labelled
    # NOT PRIVATE, kept apart from the private rows, and never supports a privacy claim
    reproducible = fl_config("fedavg", "local", 1.0)
    reproducible["dp"]["reproducible_noise_NOT_PRIVATE"] = True
    write_stage(runs / "e1-repro" / "s1", "federated", reproducible,
                {"wer": 0.50, "cer": 0.2, "epsilon/max": 1.0, "test_loss": 2.0, "dp/noise_from_os_csprng": 0, "not_private": 1})
    write_stage(runs / "e2-old" / "s1", "federated", fl_config("fedavg", "central", 2.0),
                {"wer": 0.50, "cer": 0.2, "epsilon/max": 2.0, "test_loss": 2.0, "bytes_per_client_round": 1000.0})
    text = make_tables(runs, tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "fl_dp.md").read_text().splitlines() if line.startswith("| wav2vec2")]
    flagged = [r for r in rows if "NOT PRIVATE" in r]
    assert len(rows) == 9 and len(flagged) == 2
    assert any("local DP ε=1.0" in r for r in flagged) and any("central DP ε=2.0 (client-level)" in r and "not the wire" in r for r in flagged)
    assert "add/remove one client (central DP) / utterance (local DP)" in text
    assert "smallest ε within +2 points of the centralised 50.0 % WER: ε = 3 (WER 51.5 %)" in text  # not ε = 1 (50 %, not private)
    assert "FL + central DP" not in text


def test_where_selects_runs_by_config_value(tmp_path):
    import pytest

    make_runs(tmp_path / "runs")
    text = make_tables(tmp_path / "runs", tmp_path / "out", where=["masks.name=both"])
    assert "masks=both" in text and "masks=none" not in text and "--where masks.name=both" in text
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        make_tables(tmp_path / "runs", tmp_path / "out", where=["masks.name"])


# --------------------------------------------------------------------------- plots a reviewer can use
def _capture_figures(monkeypatch):
    """Keep every figure make_tables closes, to inspect what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    original = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) if fig is not None else original())
    return figures


def _extent(artist, fig):
    return artist.get_window_extent(renderer=fig.canvas.get_renderer())


def _labels_overlap(ax, fig, axis="x") -> bool:
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    boxes = sorted((_extent(t, fig) for t in ticks if t.get_text()), key=lambda b: b.x0 if axis == "x" else b.y0)
    return any((a.x1 > b.x0) if axis == "x" else (a.y1 > b.y0) for a, b in zip(boxes, boxes[1:]))


def make_full_runs(root: Path):
    """The unmasked baseline attacked on clean features and raw inputs, three masked systems attacked in
    every scenario, two seeds each (so error bars exist)."""
    import numpy as np

    rng = np.random.default_rng(0)
    scores = lambda d: [(1, float(x)) for x in rng.normal(d, 1, 200)] + [(0, float(x)) for x in rng.normal(0, 1, 400)]
    for masks, loss, wer, d in (("none", "ctc", 0.77, 3.0), ("additive", "ctc", 0.75, 1.5), ("both", "ctc", 0.73, 1.0),
                                ("both", "ctc_contrastive", 0.72, 0.8)):
        for seed in (1, 2):
            run = root / "synthgrid" / f"{masks}-{loss}" / f"s{seed}"
            cfg = config(masks, loss, seed)
            write_stage(run, "evaluate", cfg, {"wer/audio_video/clean": wer + 0.01 * seed})
            stages = ("clean", "raw") if masks == "none" else ("ignorant", "lazy_informed", "semi_informed")
            for stage in stages:
                write_stage(run, f"attack/{stage}", cfg, {"eer": 0.4 / d + 0.01 * seed}, scores=scores(d))


def test_privacy_utility_plot_has_the_baselines_plain_labels_and_the_legend_outside(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    make_full_runs(tmp_path / "runs")
    make_tables(tmp_path / "runs", tmp_path / "out")
    fig = next(f for f in figures if "Privacy vs utility: semi-informed" in f.axes[0].get_title())
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert "no masks (attacker on its clean features)" in texts and "attacker on raw audio + video" in texts
    assert {"additive masks", "both masks", "both masks + contrastive (λ=0.1)"} <= set(texts)
    assert "attack/" not in ax.get_ylabel() and "[" not in ax.get_ylabel()
    assert _extent(legend, fig).y1 <= _extent(ax, fig).y0  # legend below the axes, not over the data
    # error bars: two seeds per system give a vertical bar at every masked point
    assert any(len(c.get_segments()) for c in ax.collections)
    # automatic range: every point is inside the axes
    low, high = ax.get_ylim()
    assert low <= 100 * (0.4 / 3.0 + 0.01) and high >= 100 * (0.4 / 0.8 + 0.02)


def test_det_overlay_panels_per_scenario_with_readable_ticks(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    make_full_runs(tmp_path / "runs")
    make_tables(tmp_path / "runs", tmp_path / "out")
    fig = next(f for f in figures if f.legends and len(f.axes) == 3)
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split("\n")[0] for t in titles] == ["ignorant attacker", "lazy-informed attacker", "semi-informed attacker"]
    for ax in fig.axes:
        assert not _labels_overlap(ax, fig, "x") and not _labels_overlap(ax, fig, "y")
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "attacker on clean features (no protection)" in legend_texts  # baseline in every panel
    assert len(legend_texts) == 5  # 3 systems + 2 baselines, seeds share their system's entry
    assert _extent(fig.legends[0], fig).y1 <= min(_extent(ax, fig).y0 for ax in fig.axes)


def test_det_ticks_never_crowd_and_read_as_percentages():
    from scipy.stats import norm

    from common.metrics import _tick_label, det_ticks

    for low in (1e-4, 1e-3, 0.01):
        ticks = det_ticks(low, 1 - low)
        assert len(ticks) >= 5
        assert min(np.diff(norm.ppf(ticks))) >= 0.42
    assert [_tick_label(t) for t in (0.001, 0.01, 0.5, 0.999)] == ["0.1", "1", "50", "99.9"]


def test_epsilon_plot_labels_the_no_dp_baselines_or_says_there_is_none(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    runs = tmp_path / "runs"
    for name, (fed, dp, eps, wer) in {"c": ("none", "none", 8.0, 0.7), "e1": ("fedavg", "local", 1.0, 2.0),
                                       "e8": ("fedavg", "local", 8.0, 1.0)}.items():
        write_stage(runs / name / "s1", "federated", fl_config(fed, dp, eps),
                    {"wer": wer, "cer": wer, "epsilon/max": eps if dp != "none" else 0.0})
    make_tables(runs, tmp_path / "out")
    ax = next(f for f in figures if "privacy budget" in f.axes[0].get_title()).axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "no DP: centralised (70.0 %)" in texts and "FL (fedavg) + local DP (per client), no compression" in texts
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8"]

    figures.clear()
    import shutil

    shutil.rmtree(runs / "c")
    make_tables(runs, tmp_path / "out2")
    ax = next(f for f in figures if "privacy budget" in f.axes[0].get_title()).axes[0]
    assert any("no run without DP" in t.get_text() for t in ax.texts)


def test_federated_rounds_plot_shows_every_value_and_whole_rounds(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    runs = tmp_path / "runs"
    write_stage(runs / "fl" / "s1", "federated", fl_config("fedavg", "local", 8.0), {"wer": 5.0, "cer": 1.0, "epsilon/max": 8.0})
    rounds = {"rounds": [{"server_round": i, "eval": {"eval_loss": 50.0 / i, "eval_wer": w}} for i, w in ((1, 6.0), (2, 3.5), (3, 1.0))]}
    (runs / "fl" / "s1" / "federated" / "federated_rounds.json").write_text(json.dumps(rounds))
    make_tables(runs, tmp_path / "out")
    fig = next(f for f in figures if f._suptitle is not None and "per round" in f._suptitle.get_text())
    ax_loss, ax_wer = fig.axes[:2]
    assert ax_wer.get_ylim()[1] >= 600 and ax_wer.get_ylim()[0] <= 100  # nothing clipped (was a fixed 0-200)
    for ax in (ax_loss, ax_wer):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)  # rounds 1, 2, 3: never 1.5
    assert _extent(fig.axes[0].get_yaxis().get_label(), fig).x0 >= 0  # the y label is inside the figure


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


def test_issue17_axes_split_systems_and_the_mcadams_baseline_is_drawn_with_the_target(tmp_path, monkeypatch):
    """Runs differing only in noise granularity / adversary weight are separate rows; McAdams (no masks,
    anonymised audio) is its own row and its own baseline marker, never merged with the unmasked model;
    the semi-informed plot shows the target region and the speaker-resampling intervals."""
    figures = _capture_figures(monkeypatch)
    runs = tmp_path / "runs"

    def add(name, cfg, wer, eer):
        run = runs / "synthgrid" / name / "s1"
        write_stage(run, "evaluate", cfg, {"wer/audio_video/clean": wer})
        write_stage(run, "attack/semi_informed", cfg, {"eer": eer, "eer_ci_low": eer - 0.05, "eer_ci_high": eer + 0.05})

    unmasked = config("none", "ctc", 1)
    unmasked["data"]["anonymize"] = "none"
    mcadams = config("none", "ctc", 1)
    mcadams["data"].update(anonymize="mcadams", mcadams_alpha=0.8)
    frame = config("both", "ctc_contrastive", 1)
    frame["masks"].update(noise_granularity="frame", init_scale=2.0)
    utt = config("both", "ctc_contrastive", 1)
    utt["masks"].update(noise_granularity="utterance", init_scale=2.0)
    utt["loss"].update(adversary_weight=1.0, projection="none")
    add("none", unmasked, 0.05, 0.10)
    add("mcadams", mcadams, 0.09, 0.30)
    add("frame", frame, 0.06, 0.15)
    add("utt", utt, 0.065, 0.35)
    make_tables(runs, tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "masks.md").read_text().splitlines() if line.startswith("| avhubert")]
    assert len(rows) == 4
    assert any("McAdams α=0.8, masks=none" in r and "| 9.0 |" in r for r in rows)
    assert any("noise per utterance" in r and "adversary 1.0" in r and "(no head)" in r for r in rows)
    assert any("35.0 [30.0, 40.0]" in r for r in rows)  # the interval is in the table
    ax = next(f for f in figures if "Privacy vs utility: semi-informed" in f.axes[0].get_title()).axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "McAdams voice anonymisation of the audio (VoicePrivacy baseline) (α=0.8)" in texts
    assert "no masks (attacker on its clean features)" in texts
    assert any(t.startswith("target: EER ≥ 40 %") for t in texts)
    assert any("one noise draw per utterance" in t and "speaker adversary (weight 1.0)" in t for t in texts)
    assert ax.get_ylim()[1] > 50  # the target and chance are inside the range


def test_fine_tuning_budget_splits_systems_and_is_said_only_when_rows_differ(tmp_path):
    """An AV-HuBERT run fine-tuned for 1000 steps is another system than the same setting at 500 steps
    (issue 17 compares masked and unmasked models at the same budget); the budget appears in the
    labels only when the table's rows differ in it."""
    runs = tmp_path / "runs"

    def add(name, masks, loss, steps, wer):
        cfg = config(masks, loss, 1)
        cfg["trainer"] = {"max_steps": steps}
        write_stage(runs / "synthgrid" / name / "s1", "evaluate", cfg, {"wer/audio_video/clean": wer})

    add("none-500", "none", "ctc", 500, 0.05)
    add("both-500", "both", "ctc_contrastive", 500, 0.10)
    make_tables(runs, tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "masks.md").read_text().splitlines() if line.startswith("| avhubert")]
    assert len(rows) == 2 and not any("fine-tuning steps" in r for r in rows)
    add("none-1000", "none", "ctc", 1000, 0.04)
    add("both-1000", "both", "ctc_contrastive", 1000, 0.07)
    make_tables(runs, tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "masks.md").read_text().splitlines() if line.startswith("| avhubert")]
    assert len(rows) == 4
    assert any("masks=none" in r and "1000 fine-tuning steps" in r and "| 4.0 |" in r for r in rows)
    assert any("masks=both" in r and "500 fine-tuning steps" in r and "| 10.0 |" in r for r in rows)


def population_config(fed: str, dp: str, seed: int, compression: str = "none", q: float = 0.25, rounds: int = 10, eps: float = 8.0):
    cfg = fl_config(fed, dp, eps, compression, rounds)
    cfg["seed"] = seed
    cfg["federated"].update(num_clients=320, local_steps=5, cohort_sampling="poisson", cohort_rate=q)
    return cfg


def test_paired_differences_are_per_seed_against_the_baseline_of_the_same_seed(tmp_path):
    import pytest

    from scripts.make_tables import main

    runs = tmp_path / "runs"
    wers = {"none": (0.60, 0.70, 0.65), "int8": (0.61, 0.69, 0.67), "topk": (0.66, 0.70, 0.69)}
    for comp, values in wers.items():
        for seed, wer in zip((1, 2, 3), values):
            write_stage(runs / comp / f"s{seed}", "federated", population_config("fedavg", "none", seed, comp), {"wer": wer, "cer": wer})
    write_stage(runs / "int8" / "s4", "federated", population_config("fedavg", "none", 4, "int8"), {"wer": 0.5, "cer": 0.5})
    # central DP runs with private noise and cohorts: one seed does not pair them, even with their own baseline present
    for comp, wer in (("none", 0.68), ("int8", 0.66)):
        write_stage(runs / f"dp-{comp}" / "s1", "federated", population_config("fedavg", "central", 1, comp),
                    {"wer": wer, "cer": wer, "epsilon/max": 8.0, "dp/noise_from_os_csprng": 1, "not_private": 0})
    text = make_tables(runs, tmp_path / "out", paired=["compression.name=none"])
    table = (tmp_path / "out" / "paired_1.md").read_text()
    assert "vs compression.name=none" in table and table in text
    rows = [line for line in table.splitlines() if line.startswith("| wav2vec2")]
    assert len(rows) == 2  # int8 and topk; the central-DP pair is not a pair
    int8 = next(r for r in rows if ", int8," in r)
    topk = next(r for r in rows if ", topk," in r)
    # int8 - none per seed: +1, -1, +2 points (seed 4 has no baseline: listed, not paired)
    assert "s1: +1.0, s2: -1.0, s3: +2.0 (no baseline for seed 4)" in int8 and "| 3 |" in int8
    assert "+0.67 ± 1.53" in int8 and "-1.0 / +2.0" in int8
    assert "[-3.13, +4.46]" in int8  # mean ± t(0.975, 2) x std / sqrt(3) = 0.67 ± 4.303 x 1.53 / 1.732
    assert "s1: +6.0, s2: +0.0, s3: +4.0" in topk and "+3.33 ± 3.06" in topk
    assert "central DP" not in table
    assert "--paired compression.name=none" in text.splitlines()[0]  # the command in the generated header

    with pytest.raises(ValueError, match=r"--paired 'compression\.nam=none'.*table axes"):
        make_tables(runs, tmp_path / "out", paired=["compression.nam=none"])
    with pytest.raises(SystemExit, match=r"--paired 'compression'.*AXIS=BASELINE"):
        main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--paired", "compression"])
    # two baseline runs of one seed (a repeat in the same directory) make the pairing ambiguous: named, refused
    write_stage(runs / "none-repeat" / "s1", "federated", population_config("fedavg", "none", 1), {"wer": 0.6, "cer": 0.6})
    with pytest.raises(ValueError, match=r"two baseline runs of seed 1.*none/s1.*none-repeat/s1"):
        make_tables(runs, tmp_path / "out", paired=["compression.name=none"])


def test_cohort_size_plot_compares_cohorts_at_one_client_step_budget_with_the_baselines(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    runs = tmp_path / "runs"
    for name, (fed, dp, q, rounds, wers) in {
        "central": ("none", "none", 0.25, 10, (0.58, 0.60)),
        "fl80": ("fedavg", "none", 0.25, 10, (0.66, 0.68)),
        "fl4": ("fedavg", "none", 0.0125, 200, (0.60,)),
        "dp80": ("fedavg", "central", 0.25, 10, (0.69,)),
        "fl80-short": ("fedavg", "none", 0.25, 2, (0.69,)),  # another budget with one cohort size: no line of its own
    }.items():
        for seed, wer in enumerate(wers, 1):
            write_stage(runs / name / f"s{seed}", "federated", population_config(fed, dp, seed, q=q, rounds=rounds),
                        {"wer": wer, "cer": wer, "epsilon/max": 8.0 if dp != "none" else 0.0})
    damped = population_config("fedavg", "none", 1, q=0.0125, rounds=200)
    damped["federated"].update(fedavg_server_lr=0.3, server_momentum=0.0)  # a smaller server step: a line of its own
    write_stage(runs / "fl4-slr0.3" / "s1", "federated", damped, {"wer": 0.62, "cer": 0.62, "epsilon/max": 0.0})
    one_step = population_config("fedavg", "none", 1, q=0.05, rounds=250)
    one_step["federated"]["local_steps"] = 1  # the same 4,000 client steps, one per client and round: a line of its own
    write_stage(runs / "fl16-1step" / "s1", "federated", one_step, {"wer": 0.64, "cer": 0.64, "epsilon/max": 0.0})
    start = population_config("none", "none", 1, rounds=0)
    write_stage(runs / "start" / "s1", "federated", start, {"wer": 0.70, "cer": 0.7})
    for name, fed, q in (("central-decay", "none", 0.25), ("fl80-decay", "fedavg", 0.25)):  # lr-decay variants: rows of their
        decayed = population_config(fed, "none", 1, q=q, rounds=10)                      # own, not points of these lines
        decayed["federated"]["lr_decay"] = "linear"
        write_stage(runs / name / "s1", "federated", decayed, {"wer": 0.90, "cer": 0.9, "epsilon/max": 0.0})
    text = make_tables(runs, tmp_path / "out")
    assert "cohort_size.png" in text and (tmp_path / "out" / "cohort_size.png").stat().st_size > 1000
    ax = next(f for f in figures if "cohort size" in f.axes[0].get_title()).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "16", "80"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "FedAvg, no DP, 4,000 client steps of which 5 per client and round (seeds per point: 1, 2)" in labels
    assert "centralised, 4,000 steps (59.0 ± 1.4 %)" in labels and "within 2 points of centralised (the target)" in labels
    assert "FedAvg + user-level central DP ε=8 (1 seed)" in labels and "no private training (public start, 70.0 %)" in labels
    assert "FedAvg, server learning rate 0.3, no DP, 4,000 client steps of which 5 per client and round (seeds per point: 1)" in labels
    lines = [l for l in ax.get_lines() if l.get_linestyle() == "-" and list(l.get_xdata()) != [0, 1]]  # not the horizontal lines, not the caps
    assert "FedAvg, no DP, 4,000 client steps of which 1 per client and round (seeds per point: 1)" in labels
    assert len(lines) == 3 and list(lines[0].get_xdata()) == [4.0, 80.0] and np.allclose(lines[0].get_ydata(), [60.0, 67.0])
    assert list(lines[1].get_xdata()) == [16.0] and np.allclose(lines[1].get_ydata(), [64.0])
    assert list(lines[2].get_xdata()) == [4.0] and np.allclose(lines[2].get_ydata(), [62.0])
    low, high = ax.get_ylim()
    assert low < 57 and high > 70  # the target band and the start are inside the automatic range

    figures.clear()
    import shutil

    shutil.rmtree(runs / "fl4")  # one cohort size left at every budget: nothing to compare, no plot
    assert "cohort_size.png" not in make_tables(runs, tmp_path / "out2")


def test_strongest_semi_informed_attacker_is_the_lowest_eer_over_all_normalisations(tmp_path, monkeypatch):
    """Per seed, the strongest column takes the variant with the lowest EER (with that variant's minDCF and
    interval, and its name); a row where a seed lacks one of the four variants shows "-", never a minimum
    over a subset; the strongest plot draws the target, the unmasked model and McAdams, and names the variant."""
    figures = _capture_figures(monkeypatch)
    runs = tmp_path / "runs"
    variants = ("", "-mean", "-mean_std", "-mean_std_sign")

    def add(name, cfg, seed, wer, eers, skip=()):
        run = runs / "synthgrid" / name / f"s{seed}"
        cfg = {**cfg, "seed": seed}
        write_stage(run, "evaluate", cfg, {"wer/audio_video/clean": wer})
        for suffix, eer in zip(variants, eers):
            if suffix not in skip:
                write_stage(run, f"attack/semi_informed{suffix}", cfg,
                            {"eer": eer, "eer_ci_low": eer - 0.02, "eer_ci_high": eer + 0.02, "min_dcf_p0.05": eer + 0.5})

    unmasked, mcadams = config("none", "ctc", 1), config("none", "ctc", 1)
    mcadams["data"].update(anonymize="mcadams", mcadams_alpha=0.8)
    additive = config("additive", "ctc", 1)
    additive["masks"].update(noise_granularity="utterance", init_scale=2.0)
    both = config("both", "ctc", 1)
    both["masks"].update(noise_granularity="utterance", init_scale=1.0)
    incomplete = config("both", "ctc", 1)
    incomplete["masks"].update(noise_granularity="utterance", init_scale=4.0)
    add("none", unmasked, 1, 0.05, (0.06, 0.11, 0.10, 0.21))
    add("mcadams", mcadams, 1, 0.18, (0.09, 0.12, 0.13, 0.25))
    add("additive", additive, 1, 0.10, (0.35, 0.11, 0.12, 0.21))  # mean wins
    add("additive", additive, 2, 0.10, (0.36, 0.13, 0.12, 0.22))  # mean_std wins on this seed
    add("both", both, 1, 0.12, (0.34, 0.27, 0.33, 0.21))  # sign wins
    segment = config("additive", "ctc", 1)
    segment["masks"].update(noise_granularity="segment", segment_frames=10, init_scale=2.0)
    add("segment", segment, 1, 0.24, (0.27, 0.28, 0.32, 0.47))
    write_stage(runs / "synthgrid" / "segment" / "s1", "attack/semi_informed-segment_mean", {**segment, "seed": 1},
                {"eer": 0.13, "min_dcf_p0.05": 0.8})  # the grid-aware attacker counts when the run has it
    add("incomplete", incomplete, 1, 0.20, (0.44, 0.30, 0.40, 0.20))
    add("incomplete", incomplete, 2, 0.20, (0.44, 0.30, 0.40, 0.20), skip=("-mean_std_sign",))  # one seed lacks a variant
    text = make_tables(runs, tmp_path / "out")
    header = next(line for line in text.splitlines() if line.startswith("| system"))
    rows = {r.split(" | ")[0]: r for r in text.splitlines() if r.startswith("| avhubert")}
    columns = [h.strip() for h in header.strip("|").split("|")]
    cell = lambda row, title: [c.strip() for c in row.strip("|").split("|")][columns.index(title)]
    strongest, dcf, which = "EER semi-inf., strongest attacker", "minDCF₀.₀₅ semi-inf., strongest", "strongest variant"
    additive_row = next(r for k, r in rows.items() if "masks=additive" in k and "noise per utterance" in k)
    assert cell(additive_row, strongest) == "11.5 ± 0.7 [9.5, 13.5]"  # per seed: 11 (mean), then 12 (mean_std, not 13)
    assert cell(additive_row, which) in ("mean (1), mean_std (1)", "mean_std (1), mean (1)")
    both_row = next(r for k, r in rows.items() if "masks=both" in k and "init σ=1.0" in k)
    assert cell(both_row, strongest) == "21.0 [19.0, 23.0]" and cell(both_row, which) == "mean_std_sign"
    assert cell(both_row, dcf) == "0.710"  # the minDCF of the same (sign) variant, not the smallest minDCF
    unmasked_row = next(r for k, r in rows.items() if "masks=none" in k and "McAdams" not in k)
    assert cell(unmasked_row, strongest) == "6.0 [4.0, 8.0]" and cell(unmasked_row, which) == "none"
    segment_row = next(r for k, r in rows.items() if "noise per segment" in k)
    assert cell(segment_row, strongest) == "13.0" and cell(segment_row, which) == "segment_mean"
    incomplete_row = next(r for k, r in rows.items() if "init σ=4.0" in k)
    assert cell(incomplete_row, strongest) == "-" and cell(incomplete_row, which) == "-"
    assert cell(incomplete_row, "EER semi-inf.") == "44.0 ± 0.0 [42.0, 46.0]"  # the other columns are unaffected
    assert "lowest semi-informed EER over the attacker.normalize variants none, mean, mean_std, mean_std_sign (and segment_mean" in text
    ax = next(f for f in figures if "strongest semi-informed attacker" in f.axes[0].get_title()).axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("target: EER ≥ 40 %") for t in texts)
    assert "no masks (attacker on its clean features) [none]" in texts
    assert any(t.startswith("McAdams voice anonymisation of the audio") and t.endswith("[none]") for t in texts)
    assert any(t.startswith("both masks (init σ=1.0") and t.endswith("[mean_std_sign]") for t in texts)
    assert not any("init σ=4.0" in t for t in texts)  # no strongest value: not drawn
    assert any(t.startswith("ceiling for one-draw-per-utterance masks") and "(21.0 %)" in t for t in texts)
    points = {round(float(y), 3) for line in ax.get_lines() for y in line.get_ydata()}
    assert 21.0 in points and 11.5 in points  # the strongest EERs, not the plain semi-informed ones


def test_runs_from_before_the_poisson_cohort_keys_join_the_rows_of_newer_runs(tmp_path):
    """A config written before federated.cohort_rate / fedavg_server_lr / server_momentum existed had
    their defaults' meaning: an AV-HuBERT seed run then and one run now are one system (one row)."""
    runs = tmp_path / "runs"
    old, new = config("both", "ctc", 1), config("both", "ctc", 2)
    new["federated"].update(cohort_rate=1.0, fedavg_server_lr=1.0, server_momentum=0.0)
    write_stage(runs / "synthgrid" / "both" / "s1", "evaluate", old, {"wer/audio_video/clean": 0.10})
    write_stage(runs / "synthgrid" / "both" / "s2", "evaluate", new, {"wer/audio_video/clean": 0.12})
    make_tables(runs, tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "masks.md").read_text().splitlines() if line.startswith("| avhubert")]
    assert len(rows) == 1 and "| 2 | 11.0 ± 1.4 |" in rows[0]


def test_epsilon_wer_plot_keeps_federations_apart_and_names_their_differences():
    """FedAvg + DP and server-Adam + DP runs are separate series; runs without DP that differ in strategy, cohort
    rate, lr schedule or budget are separate baselines named by what differs, never averaged together."""
    from scripts.make_tables import Run, _epsilon_wer_series

    def run(name, fed, dp, eps, wer, q=0.25, rounds=10, steps=5, decay="none"):
        config = {"model": {"name": "wav2vec2_tiny"}, "dp": {"name": dp, "target_epsilon": eps}, "compression": {"name": "none"},
                  "federated": {"name": fed, "num_rounds": rounds, "local_steps": steps, "num_clients": 320,
                                "cohort_sampling": "poisson", "cohort_rate": q, "lr_decay": decay}}
        metrics = {"federated:wer": wer, **({"federated:epsilon/max": eps} if dp != "none" else {})}
        return Run(Path(name), config, metrics)

    runs = [run("a", "fedavg", "central", 8.0, 0.68), run("b", "fedadam", "central", 8.0, 0.66, rounds=100, steps=1),
            run("c", "none", "none", 0.0, 0.58), run("d", "none", "none", 0.0, 0.59, decay="linear"),
            run("e", "fedavg", "none", 0.0, 0.66), run("f", "fedadam", "none", 0.0, 0.62, q=0.003125, rounds=4000, steps=1),
            run("g", "fedadam", "none", 0.0, 0.61, q=0.003125, rounds=4000, steps=1, decay="linear")]
    with_dp, no_dp = _epsilon_wer_series(runs)
    assert sorted(k[3] for k in with_dp) == ["fedadam", "fedavg"]  # one budget among the runs without DP: not named
    assert no_dp == {"centralised": [0.58], "centralised (lr decayed)": [0.59], "FL (fedavg, q=0.25)": [0.66],
                     "FL (fedadam, q=0.003125)": [0.62], "FL (fedadam, q=0.003125, lr decayed)": [0.61]}
    longer = run("h", "none", "none", 0.0, 0.54, rounds=40, decay="linear")
    _, no_dp = _epsilon_wer_series(runs + [longer])
    assert no_dp["centralised (lr decayed, 16,000 client steps)"] == [0.54] and no_dp["centralised (4,000 client steps)"] == [0.58]


def test_a_larger_speaker_population_is_another_system_with_its_own_centralised_reference(tmp_path):
    """data=synthgrid_population_1600 (extra train speakers, 2 utterances each): its runs never merge with the
    320-speaker ones, are labelled with the population, and the ε margin line compares them with the centralised
    run on the SAME population."""
    from scripts.make_tables import Run, _epsilon_wer_series, _label

    def population(config, extra, per_speaker):
        config["data"].update({"splits": {"train": 320}, "utterances_per_speaker": 10, "extra_train_speakers": extra,
                               "train_utterances_per_speaker": per_speaker})
        return config

    runs = tmp_path / "runs"
    for name, (fed, dp, wer, extra, per_speaker) in {
        "central320": ("none", "none", 0.500, None, None),  # written before the population keys existed
        "central1600": ("none", "none", 0.560, 1280, 2),
        "dp320": ("fedavg", "central", 0.700, 0, None),
        "dp1600": ("fedavg", "central", 0.570, 1280, 2),
    }.items():
        config = fl_config(fed, dp, 8.0)
        if extra is not None:
            config = population(config, extra, per_speaker)
        write_stage(runs / name / "s1", "federated", config,
                    {"wer": wer, "cer": wer / 2, "epsilon/max": 8.0 if dp != "none" else 0.0, "test_loss": 2.0,
                     **({"dp/noise_from_os_csprng": 1, "not_private": 0} if dp != "none" else {})})
    text = make_tables(runs, tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "fl_dp.md").read_text().splitlines() if line.startswith("| wav2vec2")]
    assert len(rows) == 4 and sum("1600 speakers x 2 utterances" in r for r in rows) == 2
    assert "compression none: smallest ε within +2 points of the centralised 50.0 % WER: none of ε ∈ {8}" in text
    assert ("wav2vec2_tiny, 1600 speakers x 2 utterances, 10x20 steps, FL + central DP, compression none: smallest ε "
            "within +2 points of the centralised 56.0 % WER: ε = 8 (WER 57.0 %)") in text
    old = Run(Path("a"), fl_config("none", "none", 8.0))
    assert Run(Path("b"), population(fl_config("none", "none", 8.0), 0, None)).system == old.system
    assert "speakers" not in _label(old)
    _, no_dp = _epsilon_wer_series([Run(Path(n), population(fl_config("none", "none", 8.0), e, u), {"federated:wer": w})
                                    for n, e, u, w in (("c", 0, None, 0.5), ("d", 1280, 2, 0.56))])
    assert len(no_dp) == 2 and any("1600 speakers x 2 utterances" in name for name in no_dp)


def test_topk_at_another_fraction_or_value_width_is_its_own_row_and_pairs_with_the_same_baseline(tmp_path):
    runs = tmp_path / "runs"
    wers = {"none": (0.60, 0.62), "topk": (0.64, 0.66), "topk0.18-v8": (0.605, 0.63)}
    for tag, values in wers.items():
        for seed, wer in zip((1, 2), values):
            cfg = population_config("fedavg", "none", seed, "none" if tag == "none" else "topk")
            if tag == "topk":  # a run from before the value width was an option: no topk_value_bits key
                cfg["compression"]["topk_fraction"] = 0.05
            if tag == "topk0.18-v8":
                cfg["compression"].update(topk_fraction=0.18, topk_value_bits=8)
            write_stage(runs / tag / f"s{seed}", "federated", cfg, {"wer": wer, "cer": wer})
    make_tables(runs, tmp_path / "out", paired=["compression.name=none"])
    table = (tmp_path / "out" / "paired_1.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| wav2vec2")]
    assert len(rows) == 2
    old = next(r for r in rows if ", topk," in r)
    new = next(r for r in rows if ", topk 18 % int8 values," in r)
    assert "s1: +4.0, s2: +4.0" in old and "s1: +0.5, s2: +1.0" in new


def test_centralised_baselines_of_different_lengths_are_separate_epsilon_references():
    """Two centralised baselines of one budget (rounds, local steps, population) trained for 4,000 and 8,000 steps
    (cohort rates 0.0125 and 0.025) are two references for the ε margin, each named by its steps, not one average."""
    from scripts.make_tables import Run, smallest_epsilon_within_margin

    def run(name, fed, dp, wer, q):
        config = fl_config(fed, dp, 8.0)
        config["federated"].update(cohort_sampling="poisson", cohort_rate=q, num_clients=6400, local_steps=5)
        return Run(Path(name), config, {"federated:wer": wer, **({"federated:dp/noise_from_os_csprng": 1} if dp != "none" else {})})

    runs = [run("c4000", "none", "none", 0.575, 0.0125), run("c8000", "none", "none", 0.535, 0.025),
            run("dp", "fedavg", "central", 0.59, 0.0125)]
    lines = smallest_epsilon_within_margin(runs)
    assert len(lines) == 2
    assert "centralised (4,000 steps) 57.5 % WER: ε = 8 (WER 59.0 %)" in lines[0]
    assert "centralised (8,000 steps) 53.5 % WER: none of ε ∈ {8}" in lines[1]  # not one reference of 55.5 %
    assert smallest_epsilon_within_margin(runs[1:]) == [lines[1].replace(" (8,000 steps)", "")]  # one baseline: unnamed


def test_rounds_plot_draws_one_curve_per_system_and_names_what_tells_them_apart(tmp_path, monkeypatch):
    """Two DP runs that differ only in the server lr share the legend text "FL (fedadam) + central DP ε=8": the
    per-round plot keeps them as two curves (seeds of one system averaged), each named with its lr."""
    import matplotlib.figure

    from scripts.make_tables import find_runs, plot_federated_rounds

    runs = tmp_path / "runs"
    for name, lr, seed, wer in (("a", 0.01, 1, 0.58), ("a", 0.01, 2, 0.60), ("b", 0.02, 1, 0.56)):
        cfg = population_config("fedadam", "central", seed)
        cfg["federated"]["server_lr"] = lr
        run = runs / name / f"s{seed}"
        write_stage(run, "federated", cfg, {"wer": wer, "cer": wer, "dp/noise_from_os_csprng": 1})
        evals = [{"server_round": r, "server_eval": {"loss": 2.0 - r / 10, "wer": wer + (3 - r) / 100}} for r in (1, 2, 3)]
        (run / "federated" / "federated_rounds.json").write_text(json.dumps({"rounds": evals}))
    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.update(
        {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}))
    assert plot_federated_rounds(find_runs(runs), tmp_path / "rounds.png")
    assert set(drawn) == {"FL (fedadam) + central DP ε=8, server_lr=0.01 (mean of 2 seeds)", "FL (fedadam) + central DP ε=8, server_lr=0.02"}
    assert drawn["FL (fedadam) + central DP ε=8, server_lr=0.02"] == [1.9, 1.8, 1.7]


def test_det_overlay_colours_systems_not_legend_texts(tmp_path, monkeypatch):
    """Two mask systems that differ only in their fine-tuning budget share the plain label "no masks": the DET
    overlay gives them two legend entries (named by the budget), as the per-round plot does."""
    figures = _capture_figures(monkeypatch)
    runs = tmp_path / "runs"
    for name, steps in (("short", 1000), ("long", 3000)):
        cfg = config("none", "ctc", 1)
        cfg["trainer"] = {"max_steps": steps}
        write_stage(runs / name / "s1", "attack/semi_informed", cfg, {"eer": 0.1, "min_dcf_p0.05": 0.5},
                    scores=[(1, 0.9), (1, 0.7), (0, 0.2), (0, 0.6)])
    make_tables(runs, tmp_path / "out")
    fig = next(f for f in figures if f.legends and any("semi-informed" in ax.get_title() for ax in f.axes))
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"no masks, max_steps=1000", "no masks, max_steps=3000"}


def test_rounds_plot_puts_schedules_of_one_budget_on_a_client_step_axis(tmp_path, monkeypatch):
    """100 rounds of ~1,600 clients and 400 rounds of ~400 spend the same client steps: with two such systems the
    x axis is the expected client steps so far (round x q x N, in thousands), and both curves end at the budget;
    systems of one rate keep the round axis."""
    import matplotlib.figure

    from scripts.make_tables import find_runs, plot_federated_rounds

    def write(runs, name, q, rounds):
        cfg = population_config("fedadam", "central", 1)
        cfg["federated"].update(num_clients=12800, cohort_rate=q, num_rounds=rounds, local_steps=1)
        run = runs / name / "s1"
        write_stage(run, "federated", cfg, {"wer": 0.55, "cer": 0.4, "dp/noise_from_os_csprng": 1})
        evals = [{"server_round": r, "server_eval": {"loss": 2.0 - r / rounds, "wer": 0.6}} for r in (rounds // 2, rounds)]
        (run / "federated" / "federated_rounds.json").write_text(json.dumps({"rounds": evals}))

    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.update(
        {"xlabel": fig.axes[0].get_xlabel(), **{line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()}}))
    runs = tmp_path / "runs"
    write(runs, "r100", 0.125, 100)
    assert plot_federated_rounds(find_runs(runs), tmp_path / "one.png")
    assert drawn["xlabel"] == "round"
    write(runs, "r400", 0.03125, 400)
    drawn.clear()
    assert plot_federated_rounds(find_runs(runs), tmp_path / "two.png")
    assert drawn["xlabel"].startswith("expected client steps so far")
    curves = [x for label, x in drawn.items() if label != "xlabel"]
    assert sorted(curves) == [[80.0, 160.0], [80.0, 160.0]]  # 50 x 1,600 and 200 x 400 clients, then the budget
