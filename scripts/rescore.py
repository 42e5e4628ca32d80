"""Score finished Wav2Vec2 runs on a larger test set, with confidence intervals from resampling test speakers.

    python -m scripts.rescore --runs-dir runs --data-dir data/synthgrid_population_6400_test200 \
        --where data.extra_train_speakers=6080 --baseline "centralised"

A run's own test set may be small (synthgrid_population_6400: 8 speakers x 10 utterances), too small to tell
rows 1-2 WER points apart. This script takes every run under ``--runs-dir`` whose ``federated`` stage finished
and kept its trained parameters (``global_model.npz``: a federation's final global model, the centralised
baseline's trained model; centralised runs of code before session 11 did not keep it and are listed as
skipped), rebuilds the model from the run's ``config.yaml`` with the corpus replaced by ``--data-dir``, and
transcribes its ``--split``. Nothing is trained and nothing is selected on the test set.

The other corpus must hold the run's training data, or the score is of another model's test set: it must be a
SynthGRID corpus with the run's generator fingerprint, the same public speakers and every training speaker of
the run (e.g. ``data=synthgrid_population_6400_test200``, which only appends test speakers, or
``data=synthgrid_population_25600_test200``, which appends training speakers after those: runs of both
populations are then scored on the same test utterances and paired), and none of its test speakers may be a
public or training speaker of the run. Where the run's own test speakers are all in it, their WER is
recomputed and must reproduce the run's metrics.json (a check that the rebuilt model is the run's).

Writes, per run, ``<run>/federated/rescore_<corpus>_<split>.json`` (WER, CER, CTC loss, per-utterance word
errors and speakers) and, over all runs, ``<out>/rescore.md``, ``rescore.json`` and ``rescore.png``: per system (runs that
differ only in the seed, grouped as scripts.make_tables groups rows) the WER of each seed, mean and std over
seeds, and the 95 % interval of the seed mean with the test speakers resampled; with ``--baseline`` also each
system's difference to the baseline system, its interval from the same (paired) speaker draws, and the seeds'
spread of the difference. A difference is separable when it exceeds both.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("rescore")

STAGE = "federated"


class RescoreError(ValueError):
    """A run that cannot be scored on the given corpus (the message says which and why)."""


def run_splits(data_cfg: Any) -> dict[str, list[str]]:
    """The speakers of every split of the SynthGRID corpus a run was trained on, from its data config alone."""
    from data.synthgrid.generate import SynthGridParams
    from data.synthgrid.speakers import assign_splits, make_speakers

    params = SynthGridParams.from_config(data_cfg)
    splits, _ = assign_splits(make_speakers(params.seed, params.num_speakers), params.splits,
                              params.extra_train_speakers, params.extra_test_speakers, params.extra_train_speakers_after_test)
    return splits


def check_corpus(run_name: str, data_cfg: Any, data_dir: Path) -> dict[str, list[str]]:
    """Refuse a corpus whose training data is not the run's (see the module docstring); returns the run's splits."""
    from data.synthgrid.generate import SynthGridParams

    if str(data_cfg.get("name")) != "synthgrid":
        raise RescoreError(f"{run_name}: data.name={data_cfg.get('name')!r}; rescoring checks the training data by the "
                           f"SynthGRID generator's speaker plan, so it takes SynthGRID runs only")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise RescoreError(f"{meta_path} not found: --data-dir must be a prepared SynthGRID corpus (python -m scripts.prepare_data)")
    meta = json.loads(meta_path.read_text())
    mine = SynthGridParams.from_config(data_cfg)
    if meta.get("corpus") != "synthgrid" or meta.get("fingerprint") != mine.fingerprint():
        raise RescoreError(f"{run_name}: {meta_path} was generated with {meta.get('fingerprint')}, the run's corpus with "
                           f"{mine.fingerprint()}: its utterances are other audio")
    splits = run_splits(data_cfg)
    theirs = meta.get("split_speakers", {})
    if theirs.get("public") != splits["public"]:
        raise RescoreError(f"{run_name}: the public speakers of {data_dir} ({len(theirs.get('public', []))}) are not the run's "
                           f"({len(splits['public'])}): another public start's data, not another test set")
    missing = sorted(set(splits["train"]) - set(theirs.get("train", [])))
    if missing:  # a corpus may train MORE speakers (a larger population); the run's own must all be training speakers there
        raise RescoreError(f"{run_name}: {len(missing)} training speakers of the run are not training speakers of {data_dir} "
                           f"(e.g. {missing[:3]}): another training population, not another test set")
    for key in ("public_utterances_per_speaker", "train_utterances_per_speaker"):
        if meta.get(key) != getattr(mine, key):
            raise RescoreError(f"{run_name}: {meta_path} has {key}={meta.get(key)}, the run's corpus {getattr(mine, key)}")
    seen = set(splits["public"]) | set(splits["train"])
    leaked = sorted(seen & set(theirs.get("test", [])))
    if leaked:
        raise RescoreError(f"{run_name}: test speakers of {data_dir} were public or training speakers of the run: {leaked[:5]}")
    return splits


def rescore_run(stage_dir: Path, data_dir: Path, split: str = "test", checkpoint: str | None = None) -> dict[str, Any]:
    """Transcribe `split` of `data_dir` with the run's trained model; returns the per-run record (see the module docstring)."""
    from omegaconf import OmegaConf

    from common.metrics import char_error_rate, utterance_word_errors
    from privacy.federated.server_app import GLOBAL_MODEL
    from privacy.federated.synthgrid_task import load_split_without_audio
    from privacy.federated.task import load_federated_state, load_task, read_state_npz
    from training.config import CompressionConfig, FederatedConfig
    from training.starting_checkpoint import sha256_file
    from training.wav2vec2.public_start import verify_public_start
    from training.wav2vec2.run_config import uses_lora, wav2vec2_run_config

    cfg = OmegaConf.load(stage_dir / "config.yaml")
    # options added after a run was made (compression.topk_value_bits, federated.checkpoint_every, ...): the schema's
    # defaults, which are what that run did (a new option defaults to the old behaviour)
    cfg.compression = OmegaConf.merge(OmegaConf.structured(CompressionConfig), cfg.compression)
    cfg.federated = OmegaConf.merge(OmegaConf.structured(FederatedConfig), cfg.federated)
    name = f"{cfg.run_name}/s{cfg.seed}"
    model_path = stage_dir / GLOBAL_MODEL
    if not model_path.is_file():
        raise RescoreError(f"{name}: no {model_path} (the run did not keep its trained parameters)")
    splits = check_corpus(name, cfg.data, data_dir)
    trained_on = str(cfg.data.dir)
    cfg.data.dir = str(data_dir)
    if checkpoint:
        cfg.model.checkpoint = checkpoint
    if uses_lora(cfg):
        verify_public_start(cfg.model.checkpoint)
    run_config = wav2vec2_run_config(cfg, str(stage_dir), strategy="fedavg" if cfg.federated.name == "none" else None)
    task = load_task(run_config)
    model = task.build_model()
    load_federated_state(model, read_state_npz(model_path))
    t0 = time.time()
    refs, hyps, loss = task.transcribe_split(model, split)
    speakers = load_split_without_audio(data_dir, split)[0]
    if len(speakers) != len(refs):
        raise RescoreError(f"{name}: {len(refs)} transcripts but {len(speakers)} utterances in split {split!r} of {data_dir}")
    errors, words = utterance_word_errors(refs, hyps)
    record: dict[str, Any] = {
        "run": name, "run_dir": str(stage_dir.parent), "trained_on": trained_on, "corpus": str(data_dir), "split": split,
        "model_sha256": sha256_file(model_path), "utterances": len(refs), "speakers": len(set(speakers)),
        "wer": float(errors.sum() / words.sum()), "cer": char_error_rate(refs, hyps), "test_loss": float(loss),
        "seconds": round(time.time() - t0, 1),
        "utterance_speakers": list(speakers), "utterance_errors": errors.tolist(), "utterance_words": words.tolist(),
    }
    own = set(splits.get(split, [])) if split == str(cfg.eval.split) else set()  # the split the run's metrics.json scored
    metrics_path = stage_dir / "metrics.json"
    if own and own <= set(speakers) and metrics_path.is_file():
        # the run's own test set is part of this one: its WER must be what the run reported
        keep = np.array([s in own for s in speakers])
        reproduced = float(errors[keep].sum() / words[keep].sum())
        reported = float(json.loads(metrics_path.read_text())["wer"])
        record.update(own_test_wer_reported=reported, own_test_wer_reproduced=reproduced, own_test_utterances=int(keep.sum()))
        if abs(reproduced - reported) > 1e-9:
            raise RescoreError(f"{name}: on its own {int(keep.sum())} test utterances the rebuilt model scores WER {reproduced:.4f}, "
                               f"the run reported {reported:.4f}: this is not the run's model, or the corpus is not its corpus")
    return record


def finished_runs(runs_dir: Path, where: list[str]) -> list:
    """The Wav2Vec2 runs under runs_dir whose `federated` stage finished and whose config matches every KEY=VALUE of
    `where`: scripts.make_tables' runs (find_runs, select_runs), so a row here is a row there."""
    from scripts.make_tables import find_runs, select_runs

    runs = select_runs(find_runs(runs_dir), where)
    return [r for r in runs if f"{STAGE}:wer" in r.metrics and str(r.axis("model.name")).startswith("wav2vec2")]


def summarise(records: list[dict], systems_of: list[tuple[tuple, str]], baseline: str | None, resamples: int,
              seed: int = 0) -> dict[str, Any]:
    """Per system: seeds, WERs, mean +- std, the speaker-resampled interval of the mean; differences to the baseline.
    `systems_of[i]`: (system key, row label) of records[i] (scripts.make_tables' Run.system and label)."""
    from common.metrics import percentile_ci, speaker_bootstrap_wer

    if not records:
        raise RescoreError("no run was scored")
    first = records[0]
    for r in records[1:]:  # paired resampling needs one test set
        if r["utterance_speakers"] != first["utterance_speakers"] or r["utterance_words"] != first["utterance_words"]:
            raise RescoreError(f"{r['run']} was scored on other utterances than {first['run']} (corpus {r['corpus']} vs {first['corpus']})")
    wer, replicates = speaker_bootstrap_wer([r["utterance_errors"] for r in records], first["utterance_words"],
                                            first["utterance_speakers"], n_resamples=resamples, seed=seed)
    systems: dict[tuple, dict[str, Any]] = {}
    for i, (key, label) in enumerate(systems_of):
        entry = systems.setdefault(key, {"label": label, "members": []})
        entry["members"].append(i)
    rows = []
    for entry in systems.values():
        idx = entry["members"]
        seeds = [records[i]["run"].rsplit("/s", 1)[1] for i in idx]
        values = [100 * float(wer[i]) for i in idx]
        mean_replicates = 100 * replicates[:, idx].mean(axis=1)
        own = [100 * records[i]["own_test_wer_reported"] for i in idx if "own_test_wer_reported" in records[i]]
        rows.append({
            "label": entry["label"], "seeds": seeds, "wer": values, "wer_mean": statistics.mean(values),
            "wer_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "wer_mean_ci": percentile_ci(mean_replicates), "test_loss_mean": statistics.mean(records[i]["test_loss"] for i in idx),
            "own_test_wer": own if len(own) == len(idx) else None,
            "own_test_wer_mean": statistics.mean(own) if len(own) == len(idx) else None, "_replicates": mean_replicates, "_idx": idx,
        })
    out: dict[str, Any] = {"utterances": first["utterances"], "speakers": first["speakers"], "corpus": first["corpus"],
                           "split": first["split"], "resamples": resamples, "rows": rows, "baseline": None}
    if baseline is not None:
        matches = [row for row in rows if baseline in row["label"]]
        if len(matches) != 1:
            raise RescoreError(f"--baseline {baseline!r} matches {len(matches)} systems; it must name one of: "
                               + "; ".join(row["label"] for row in rows))
        base = matches[0]
        out["baseline"] = base["label"]
        for row in rows:
            if row is base:
                continue
            row["diff"] = row["wer_mean"] - base["wer_mean"]
            row["diff_ci"] = percentile_ci(row["_replicates"] - base["_replicates"])
            # the seeds' spread of the difference: the std of a difference of two independent seed means
            row["diff_seed_std"] = float(np.sqrt(row["wer_std"] ** 2 / len(row["wer"]) + base["wer_std"] ** 2 / len(base["wer"])))
    for row in rows:
        row.pop("_replicates")
        row.pop("_idx")
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"Scored on split `{summary['split']}` of `{summary['corpus']}`: {summary['utterances']} utterances of "
             f"{summary['speakers']} speakers. WER in %; mean ± std over seeds; CI = 95 % percentile interval over "
             f"{summary['resamples']} resamples of the test speakers (the same draws for every run: differences are paired)."]
    if summary["baseline"]:
        lines.append(f"Δ = WER minus that of the baseline **{summary['baseline']}**; seeds' spread of Δ = "
                     "sqrt(std_a² / n_a + std_b² / n_b).")
    lines += ["", "| system | seeds | WER per seed | WER | 95 % CI (speakers) | test CTC loss | own test set's WER | Δ | 95 % CI of Δ | seeds' spread of Δ |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        low, high = row["wer_mean_ci"]
        own = f"{row['own_test_wer_mean']:.1f}" if row["own_test_wer_mean"] is not None else "-"
        is_base = row["label"] == summary["baseline"]  # without --baseline no row is one, and there is no Δ
        diff = (("baseline" if is_base else "-"), "-", "-") if "diff" not in row else (
            f"{row['diff']:+.1f}", f"[{row['diff_ci'][0]:+.1f}, {row['diff_ci'][1]:+.1f}]", f"{row['diff_seed_std']:.1f}")
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {' / '.join(f'{v:.1f}' for v in row['wer'])} | "
                     f"{row['wer_mean']:.1f} ± {row['wer_std']:.1f} | [{low:.1f}, {high:.1f}] | {row['test_loss_mean']:.3f} | {own} | "
                     + " | ".join(diff) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Per system: each seed's WER on the larger test set (dots) and on the run's own test set (rings, where it has
    one), the seed mean with its speaker-resampled 95 % interval (bar); the baseline's mean as a dashed line."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.75 * len(rows)))
    for y, row in enumerate(rows):
        low, high = row["wer_mean_ci"]
        ax.errorbar([row["wer_mean"]], [y], xerr=[[row["wer_mean"] - low], [high - row["wer_mean"]]], fmt="s", color="C0",
                    capsize=4, label="mean over seeds, 95 % CI (test speakers resampled)" if y == 0 else None)
        ax.scatter(row["wer"], [y + 0.15] * len(row["wer"]), color="C0", s=14,
                   label=f"a seed, {summary['utterances']} test utterances" if y == 0 else None)
        if row.get("own_test_wer"):
            ax.scatter(row["own_test_wer"], [y - 0.15] * len(row["own_test_wer"]), facecolors="none", edgecolors="C3", s=22,
                       label="a seed, the run's own (smaller) test set" if y == 0 else None)
    if summary["baseline"]:
        base = next(r for r in rows if r["label"] == summary["baseline"])
        ax.axvline(base["wer_mean"], color="grey", ls="--", lw=1, label="baseline mean")
        ax.axvline(base["wer_mean"] + 2, color="grey", ls=":", lw=1, label="baseline + 2 points")
    ax.set_yticks(range(len(rows)), [textwrap.fill(r["label"], 70) for r in rows], fontsize=6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("WER (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from common.files import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--data-dir", type=Path, required=True, help="the prepared corpus whose split is scored")
    parser.add_argument("--split", default="test")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="only runs whose config has this value")
    parser.add_argument("--baseline", default=None, help="a substring of exactly one system's label: differences are taken to it")
    parser.add_argument("--checkpoint", default=None, help="the public start, where the path in the runs' config no longer exists")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <runs-dir>/rescore_<corpus>)")
    parser.add_argument("--force", action="store_true", help="re-score runs that already have this corpus's record")
    parser.add_argument("--dry-run", action="store_true", help="list the runs it would score and what is missing; score nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    data_dir = args.data_dir.resolve()
    tag = f"{data_dir.name}_{args.split}"
    try:
        runs = finished_runs(args.runs_dir, args.where) if args.runs_dir.is_dir() else []
    except ValueError as error:  # a malformed --where
        raise SystemExit(f"error: {error}") from None
    stages = [run.run_dir / STAGE for run in runs]
    if args.dry_run:
        missing = [] if (data_dir / "meta.json").is_file() else [f"{data_dir}/meta.json (prepare the corpus: python -m scripts.prepare_data data=<its config>)"]
        missing += [f"{s / 'global_model.npz'} (the run kept no trained model)" for s in stages if not (s / "global_model.npz").is_file()]
        sys.stdout.write(f"dry run: {len(stages)} finished Wav2Vec2 run(s) under {args.runs_dir} to score on split {args.split!r} of {data_dir}\n"
                         + "".join(f"  {s.parent}\n" for s in stages) + "".join(f"missing: {m}\n" for m in missing))
        return
    if not stages:
        raise SystemExit(f"error: no finished Wav2Vec2 run under {args.runs_dir} matches {args.where or 'anything'}")
    from scripts.make_tables import _label
    from training.starting_checkpoint import sha256_file

    records, systems_of, skipped = [], [], []
    for i, (run, stage_dir) in enumerate(zip(runs, stages), 1):
        path = stage_dir / f"rescore_{tag}.json"
        try:
            record = json.loads(path.read_text()) if path.is_file() and not args.force else None
            model = stage_dir / "global_model.npz"
            if record is None or not model.is_file() or record.get("model_sha256") != sha256_file(model):
                record = rescore_run(stage_dir, data_dir, args.split, args.checkpoint)
                atomic_write_text(path, json.dumps(record) + "\n")
        except (RescoreError, FileNotFoundError) as error:
            skipped.append(str(error))
            log.warning("[%d/%d] skipped %s", i, len(stages), error)
            continue
        systems_of.append((run.system, _label(run)))
        records.append(record)
        log.info("[%d/%d] %s: WER %.1f %% on %d utterances (%s s)", i, len(stages), record["run"], 100 * record["wer"],
                 record["utterances"], record.get("seconds"))
    if not records:
        raise SystemExit("error: no run could be scored:\n  " + "\n  ".join(skipped))
    try:
        summary = summarise(records, systems_of, args.baseline, args.resamples)
    except RescoreError as error:
        raise SystemExit(f"error: {error}") from None
    summary["skipped"] = skipped
    out = args.out or args.runs_dir / f"rescore_{data_dir.name}"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(summary)
    if skipped:
        text += "\nNot scored:\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    atomic_write_text(out / "rescore.md", text)
    atomic_write_text(out / "rescore.json", json.dumps(summary, indent=2) + "\n")
    plot_summary(summary, out / "rescore.png")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
