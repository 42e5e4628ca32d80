"""The RJCA speaker-verification attacker on an ASR run's representations.

Which representation (`training/avhubert/export.py`, EXPORT_KINDS) the attacker trains on
(attacker_train speakers), enrols with (utterance a of each trial) and tests (utterance b), on the
held-out attacker_trials speakers. The trials are every pair of attacker_trials utterances
(attacker.trials=all_pairs, the default; attacker.max_nontarget_trials caps the non-target pairs for
large corpora) or the corpus' manifests/trials.txt (attacker.trials=list, e.g. VoxCeleb's official list):

    attacker.input=raw        raw inputs (waveform -> log-mel, mouth-ROI frames); needs no ASR run
    attacker.input=clean      clean front-end features everywhere (no protection at all)
    attacker.input=protected  by attacker.scenario (VoicePrivacy; docs/method.md, section 5):
                              training     enrolment        trials
        ignorant              clean        clean            protected
        lazy_informed         clean        protected_enrol  protected   (same system, another noise draw)
        semi_informed         protected    protected        protected
        untrained_masks       untrained    protected        protected   (extra variant, not VoicePrivacy's:
                              trained on masks of the same kind at their initial parameters)

attacker.normalize=mean|mean_std|mean_std_sign|segment_mean (extra variant) normalises every feature
sequence per utterance (per segment of masks.segment_frames frames) first, and writes to
`attack/<clean|scenario>-<mode>/`.

Outputs go to `<run_dir>/attack/<raw|clean|scenario>/`: metrics.json (EER, minDCF
at p_target 0.01 and 0.05, and their 95 % confidence intervals from resampling the trial
speakers, `*_ci_low` / `*_ci_high`), scores.txt (`label utt_a utt_b score`), det.png, and the
training log (log.csv, log.jsonl; wandb too under logger=wandb).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.manifest import all_pair_trials, manifest_dir, read_trials
from data.samplers import BucketBatchSampler
from common.device import move_to_device, pin_memory_for
from models.rjca import AAMSoftmax, RJCAConfig, RJCASpeakerVerifier
from training.run_logger import logger_from_config
from training.loop import train
from common.metrics import det_curve, plot_det_curve, speaker_bootstrap_ci, speaker_verification_metrics
from common.files import atomic_write_text
from common.progress import Progress
from common.seeding import seed_everything
from training.stage import open_stage

log = logging.getLogger(__name__)

# attacker.scenario -> the export kinds of (training data, enrolment, trials)
SCENARIOS = {
    "ignorant": ("clean", "clean", "protected"),
    "lazy_informed": ("clean", "protected_enrol", "protected"),
    "semi_informed": ("protected", "protected", "protected"),
    "untrained_masks": ("untrained", "protected", "protected"),
}


def scenario_kinds(input_: str, scenario: str) -> tuple[str, str, str]:
    """The export kinds (training data, enrolment, trials) an attack reads."""
    if input_ == "clean":
        return "clean", "clean", "clean"
    if input_ != "protected":
        raise ValueError(f"attacker.input={input_!r}: expected raw, clean or protected")
    if scenario not in SCENARIOS:
        raise ValueError(f"attacker.scenario={scenario!r}: expected one of {sorted(SCENARIOS)}")
    return SCENARIOS[scenario]


# Per-utterance normalisations: make_tables' "strongest" attacker is the best of these.
UTTERANCE_NORMALIZATIONS = ("none", "mean", "mean_std", "mean_std_sign")
# segment_mean: each segment of masks.segment_frames frames (the masks' grid, from the utterance's first frame) minus its mean
NORMALIZATIONS = UTTERANCE_NORMALIZATIONS + ("segment_mean",)
# mean_std_sign: |skewness| below this counts as zero (see normalize_utterances)
SKEW_SIGN_TOLERANCE = 1e-3


def attack_stage_name(cfg: DictConfig) -> str:
    a = cfg.attacker
    normalize = a.get("normalize", "none")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"attacker.normalize={normalize!r}: expected one of {list(NORMALIZATIONS)}")
    if normalize == "segment_mean" and not (isinstance(cfg.masks.get("segment_frames"), int) and cfg.masks.segment_frames >= 1):
        raise ValueError(f"attacker.normalize=segment_mean subtracts the mean of each masks.segment_frames-frame segment, but "
                         f"masks.segment_frames={cfg.masks.get('segment_frames')!r}: expected an integer >= 1")
    suffix = "" if normalize == "none" else f"-{normalize}"
    if a.input == "raw":
        if suffix:
            raise ValueError(f"attacker.normalize={normalize} conflicts with attacker.input=raw: it normalises exported "
                             "feature sequences; attack features (attacker.input=protected or clean) or drop attacker.normalize")
        return "attack/raw"
    if a.input == "clean":
        return "attack/clean" + suffix
    scenario_kinds(a.input, a.scenario)  # validates both
    return f"attack/{a.scenario}" + suffix


def normalize_utterances(seqs: list[torch.Tensor] | None, mode: str, segment_frames: int | None = None) -> list[torch.Tensor] | None:
    """Each [T, D] sequence minus its time mean per dimension (`mean`), also divided by its time std
    (`mean_std`), and then also multiplied per dimension by the sign of its time skewness
    (`mean_std_sign`). An attacker that knows the noise is drawn once per utterance can do this.
    `mean` removes utterance-level additive noise exactly (x + c - mean(x + c) = x - mean(x)).
    `mean_std` also removes a positive per-utterance scale. `mean_std_sign` removes any per-utterance,
    per-dimension affine map z = m x + a with m != 0 of either sign: standardising z gives
    sign(m) * standardised(x), and skew(z) = sign(m) * skew(x), so the product is the same for z and x.
    Every utterance-level feature-wise mask (additive, multiplicative, both) is such a map, so on
    those masks this attacker sees exactly what it sees on clean features.

    A dimension whose |skewness| is below SKEW_SIGN_TOLERANCE (standardised units) keeps its sign
    (factor +1): its sign cannot be read from the third moment, and a near-zero skew would flip with
    float rounding. A 1-frame utterance has no spread: it is left centred (zeros) rather than divided by 0.

    `segment_mean` subtracts, per dimension, the mean of each run of `segment_frames` frames counted
    from the utterance's first frame (the masks' segment grid, privacy/masks.py): it removes
    segment-level additive noise exactly, as `mean` does utterance-level noise."""
    if seqs is None or mode == "none":
        return seqs
    if mode not in NORMALIZATIONS:
        raise ValueError(f"attacker.normalize={mode!r}: expected one of {list(NORMALIZATIONS)}")
    if mode == "segment_mean":
        if not (isinstance(segment_frames, int) and segment_frames >= 1):
            raise ValueError(f"attacker.normalize=segment_mean needs the segment length masks.segment_frames >= 1, got {segment_frames!r}")
        out = []
        for s in seqs:
            if s.shape[0] == 0:
                out.append(s)
                continue
            segment = torch.arange(s.shape[0], device=s.device) // segment_frames
            n = int(segment[-1]) + 1
            sums = s.new_zeros((n, s.shape[1])).index_add_(0, segment, s)
            counts = torch.bincount(segment, minlength=n).to(s.dtype).unsqueeze(1)
            out.append(s - (sums / counts)[segment])
        return out
    out = []
    for s in seqs:
        centred = s - s.mean(dim=0, keepdim=True)
        if mode in ("mean_std", "mean_std_sign") and s.shape[0] > 1:
            centred = centred / s.std(dim=0, keepdim=True).clamp_min(1e-5)
            if mode == "mean_std_sign":
                skew = centred.pow(3).mean(dim=0, keepdim=True)
                centred = torch.where(skew < -SKEW_SIGN_TOLERANCE, -centred, centred)
        out.append(centred)
    return out


class FeatureSet(torch.utils.data.Dataset):
    """Per-utterance feature sequences (from an export) or raw inputs, with speaker labels."""

    def __init__(self, audio: list | None, video: list | None, speakers: list[str], ids: list[str], lengths: list[int]):
        self.audio, self.video, self.ids, self.lengths = audio, video, ids, lengths
        self.speaker_names = sorted(set(speakers))
        index = {s: i for i, s in enumerate(self.speaker_names)}
        self.labels = [index[s] for s in speakers]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return i


def _pad(seqs: list[torch.Tensor]) -> torch.Tensor:
    n = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros((len(seqs), n) + tuple(seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def make_collate(fs: FeatureSet):
    def collate(indices):
        frames = [fs.lengths[i] for i in indices]
        n = max(frames)
        pad = torch.arange(n).unsqueeze(0) >= torch.tensor(frames).unsqueeze(1)
        batch = {"labels": torch.tensor([fs.labels[i] for i in indices]), "padding_mask": pad}
        batch["audio"] = _pad([fs.audio[i] for i in indices]) if fs.audio is not None else None
        batch["video"] = _pad([fs.video[i] for i in indices]) if fs.video is not None else None
        return batch

    return collate


def _check_finite(name: str, seqs: list[torch.Tensor] | None, source: Path | str) -> None:
    if seqs is None:
        return
    for i, s in enumerate(seqs):
        if not torch.isfinite(s).all():
            raise ValueError(f"{source}: {name} features of utterance #{i} contain NaN/inf; re-run the export (task=export)")


def load_feature_sets(cfg: DictConfig):
    """(training, enrolment, trials FeatureSets, feature dim) from the ASR run's export, by scenario."""
    from training.avhubert.export import read_export
    from training.avhubert.finetune import asr_run_dir

    a = cfg.attacker
    export_dir = Path(cfg.paths.run_dir) / "export"
    if not export_dir.is_dir():
        raise FileNotFoundError(
            f"no exported representations in {export_dir}. The attacker reads what the ASR run wrote; create it with\n"
            f"  python train_avhubert.py task=finetune <the same overrides>   (fine-tunes, evaluates and exports)\n"
            f"or, for an existing fine-tuned run, python train_avhubert.py task=export <the same overrides>"
            + (f"\n(asr_run={cfg.asr_run}: the export runs this corpus through that run's model)" if cfg.get("asr_run") else "")
        )
    index = export_dir / "attacker_train.json"
    source = json.loads(index.read_text()).get("asr_run") if index.is_file() else None
    expected = asr_run_dir(cfg).resolve()
    if source is not None and Path(source) != expected:
        raise ValueError(f"{export_dir} was exported through the model of {source}, but this attack is on asr_run={expected}; "
                         "re-run `python train_avhubert.py task=export force=true <the same overrides>`")
    train_kind, enrol_kind, test_kind = scenario_kinds(a.input, a.scenario)
    sets = []
    for split, kind in (("attacker_train", train_kind), ("attacker_trials", enrol_kind), ("attacker_trials", test_kind)):
        feats, ids, speakers = read_export(export_dir, split)
        if f"audio/{kind}" not in feats:
            raise ValueError(f"{export_dir / (split + '.safetensors')} has no '{kind}' features (it holds "
                             f"{sorted({k.split('/', 1)[1] for k in feats})}), which attacker.scenario={a.scenario} needs; "
                             "it was written by an older export: re-run `python train_avhubert.py task=export force=true <the same overrides>`")
        normalize, grid = a.get("normalize", "none"), cfg.masks.get("segment_frames")
        audio = normalize_utterances(feats[f"audio/{kind}"], normalize, grid) if "audio" in a.modalities else None
        video = normalize_utterances(feats[f"video/{kind}"], normalize, grid) if "video" in a.modalities else None
        _check_finite("audio", audio, export_dir / f"{split}.safetensors")
        _check_finite("video", video, export_dir / f"{split}.safetensors")
        lengths = [t.shape[0] for t in feats[f"audio/{kind}"]]
        sets.append(FeatureSet(audio, video, speakers, ids, lengths))
    dim = sets[0].audio[0].shape[-1] if sets[0].audio is not None else sets[0].video[0].shape[-1]
    train_set, enrol_set, test_set = sets
    if enrol_kind == test_kind:
        enrol_set = test_set  # embedded once
    return train_set, enrol_set, test_set, dim


def load_raw_sets(cfg: DictConfig):
    """Raw waveforms and normalised mouth-ROI frames of the attacker splits."""
    from training.avhubert.finetune import make_dataset

    out = []
    for split in ("attacker_train", "attacker_trials"):
        ds = make_dataset(cfg, split, None, return_waveform=True)
        audio, video, lengths = [], [], []
        for i in range(len(ds)):
            item = ds[i]
            audio.append(item["waveform"])
            video.append(item["video"].unsqueeze(0))  # [1, T, H, W]
            lengths.append(item["video"].shape[0])
        fs = FeatureSet(audio if "audio" in cfg.attacker.modalities else None, None, [u.speaker for u in ds.utterances],
                        [u.id for u in ds.utterances], lengths)
        fs.video = [v.transpose(0, 1) for v in video] if "video" in cfg.attacker.modalities else None  # [T, 1, H, W]
        out.append(fs)
    return out[0], out[1], None


def _trials(cfg: DictConfig, path: Path, test_set: FeatureSet, metrics: dict) -> list:
    """The verification trials: every pair of the trials split's utterances (attacker.trials=all_pairs; an
    utterance the export skipped is simply not in it) or the corpus' trials.txt (attacker.trials=list)."""
    if cfg.attacker.trials == "list":
        return _usable_trials(cfg, path, set(test_set.ids), metrics)
    metrics.update({"skipped/trials": 0, "skipped/total": 0})
    return all_pair_trials(test_set.ids, [test_set.speaker_names[k] for k in test_set.labels],
                           max_nontarget=cfg.attacker.max_nontarget_trials, seed=int(cfg.data.seed))


def _usable_trials(cfg: DictConfig, path: Path, ids: set[str], metrics: dict) -> list:
    """The trials.txt verification trials; with data.on_error=skip, trials naming an utterance the export (or the raw
    dataset) skipped are dropped and counted (skipped/trials), and too many dropped fail the stage."""
    if cfg.data.on_error != "skip":
        metrics.update({"skipped/trials": 0, "skipped/total": 0})
        return read_trials(path, known_ids=ids)
    trials = read_trials(path)
    kept = [t for t in trials if t.a in ids and t.b in ids]
    dropped = len(trials) - len(kept)
    metrics.update({"skipped/trials": dropped, "skipped/total": dropped})
    if dropped:
        log.warning("%s: %d of %d trials name skipped utterances; scored %d", path, dropped, len(trials), len(kept))
    if not kept or dropped / len(trials) > cfg.data.max_skip_fraction:
        raise ValueError(f"{path}: {dropped} of {len(trials)} trials name utterances that were skipped (data.on_error=skip), "
                         f"more than data.max_skip_fraction={cfg.data.max_skip_fraction:g}")
    return kept


def _inputs(fs_batch: dict, raw: bool):
    audio, video = fs_batch["audio"], fs_batch["video"]
    if raw and video is not None:
        video = video.transpose(1, 2)  # [B, T, 1, H, W] -> [B, 1, T, H, W]
    pad = fs_batch["padding_mask"]
    if raw and audio is not None and video is None:
        pad = None  # raw audio alone: no frame-aligned mask; padded tail is silence
    return audio, video, pad


@torch.no_grad()
def embed_set(model: RJCASpeakerVerifier, fs: FeatureSet, raw: bool, device, batch_size: int = 32,
              desc: str = "speaker embeddings") -> torch.Tensor:
    """Speaker embeddings [N, E] of every utterance of a FeatureSet, in its order (progress as `desc`)."""
    collate = make_collate(fs)
    embs = []
    with Progress(total=len(fs), desc=desc, unit="utt", every=max(1, len(fs) // 10)) as progress:
        for start in range(0, len(fs), batch_size):
            batch = move_to_device(collate(list(range(start, min(start + batch_size, len(fs))))), device)
            audio, video, pad = _inputs(batch, raw)
            embs.append(model.embed(audio, video, pad).float().cpu())
            progress.update(len(embs[-1]))
    return torch.cat(embs)


def run_attack(cfg: DictConfig) -> dict:
    a = cfg.attacker
    name = attack_stage_name(cfg)
    raw = a.input == "raw"
    trials_path = manifest_dir(cfg.data.dir) / "trials.txt"
    with open_stage(cfg, name) as stage:
        gen = seed_everything(cfg.seed)
        if raw:
            train_set, test_set, dim = load_raw_sets(cfg)
            enrol_set = test_set
        else:
            train_set, enrol_set, test_set, dim = load_feature_sets(cfg)
        trials = _trials(cfg, trials_path, test_set, stage.metrics)
        rcfg = RJCAConfig.from_dict({**OmegaConf.to_container(a, resolve=True), "input_kind": "raw" if raw else "features",
                                     "audio_feat_dim": dim or 768, "video_feat_dim": dim or 768})
        from training.avhubert.finetune import task_device

        device = task_device(cfg)
        model = RJCASpeakerVerifier(rcfg)
        head = AAMSoftmax(rcfg.embed_dim, len(train_set.speaker_names), a.aam_margin, a.aam_scale)
        system = torch.nn.ModuleDict({"verifier": model, "aam": head}).to(device)
        sampler = BucketBatchSampler(train_set.lengths, a.batch_size, shuffle=True, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=make_collate(train_set),
                                             pin_memory=pin_memory_for(device))
        steps_per_epoch = len(sampler)
        max_steps = a.epochs * steps_per_epoch
        optimizer = torch.optim.Adam(system.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: a.lr_decay ** (s // steps_per_epoch))

        def step_fn(m, batch):
            audio, video, pad = _inputs(batch, raw)
            emb = m["verifier"](audio, video, pad)
            loss, acc = m["aam"](emb, batch["labels"])
            return loss, {"acc": float(acc)}

        t0 = time.time()
        logger = logger_from_config(cfg.logger, stage.dir, OmegaConf.to_container(cfg, resolve=True), run_name=f"{cfg.run_name}-{name}")
        result = train(system, step_fn, loader, optimizer, scheduler, max_steps=max_steps, ckpt_dir=stage.dir / "checkpoints",
                       logger=logger, grad_clip=5.0, log_every=max(1, steps_per_epoch), ckpt_every=steps_per_epoch * max(1, a.epochs // 4),
                       progress_bar=cfg.trainer.progress_bar, desc=name, device=device)  # fp32: a small model; AAM logits at scale s
        logger.close()
        train_seconds = time.time() - t0
        # Embed every trials utterance once per representation (enrolment, test), then score the pairs:
        # utterance a of a trial is the enrolment, utterance b the test.
        model.eval()
        t1 = time.time()
        emb_test = embed_set(model, test_set, raw, device, desc=f"{name}: test embeddings")
        emb_enrol = emb_test if enrol_set is test_set else embed_set(model, enrol_set, raw, device, desc=f"{name}: enrolment embeddings")
        index = {uid: i for i, uid in enumerate(test_set.ids)}
        if enrol_set.ids != test_set.ids:
            raise ValueError("attack: the enrolment and trial features list different utterances; re-run the export")
        ea = emb_enrol[[index[t.a] for t in trials]]
        eb = emb_test[[index[t.b] for t in trials]]
        scores = RJCASpeakerVerifier.score_trials(ea, eb)
        if a.score_norm == "snorm":
            cohort = embed_set(model, train_set, raw, device, desc=f"{name}: s-norm cohort embeddings")
            scores = RJCASpeakerVerifier.s_norm(scores, ea, eb, cohort, a.snorm_top_k)
        score_seconds = time.time() - t1
        if not torch.isfinite(scores).all():
            raise ValueError(f"attack: {int((~torch.isfinite(scores)).sum())} trial scores are NaN/inf; the attacker diverged")
        labels = [int(t.target) for t in trials]
        metrics = speaker_verification_metrics(scores.numpy(), labels)
        if a.get("ci_resamples", 0):
            speaker_of = {uid: test_set.speaker_names[test_set.labels[i]] for i, uid in enumerate(test_set.ids)}
            metrics.update(speaker_bootstrap_ci(scores.numpy(), labels, [speaker_of[t.a] for t in trials],
                                                [speaker_of[t.b] for t in trials], n_resamples=a.ci_resamples, seed=cfg.seed))
        atomic_write_text(stage.dir / "scores.txt", "".join(f"{l} {t.a} {t.b} {s:.6f}\n" for l, t, s in zip(labels, trials, scores.tolist())))
        far, frr, _ = det_curve(scores.numpy(), labels)
        plot_det_curve({name: (far, frr)}, stage.dir / "det.png")
        stage.metrics.update(metrics)
        stage.metrics.update(n_trials=len(trials), n_train_utterances=len(train_set), n_train_speakers=len(train_set.speaker_names),
                             train_seconds=train_seconds, scoring_seconds=score_seconds, steps=result.step,
                             **{f"train/{k}": v for k, v in result.last_logs.items()})
        log.info("%s: EER %.2f%%, minDCF(0.05) %.3f over %d trials", name, 100 * metrics["eer"], metrics.get("min_dcf_p0.05", float("nan")), len(trials))
        return dict(stage.metrics)
