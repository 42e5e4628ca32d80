"""The embedded starting checkpoint: the tiny analogue of the released "pretrained + fine-tuned" AV-HuBERT.

`make checkpoints` (= `python train_avhubert.py task=build_checkpoint`) runs, on SynthGRID's public
split (speakers disjoint from every other split):

    1. split the public speakers: the last `heldout_speakers` are held out (manifests public_fit /
       public_heldout, derived views written next to the corpus's manifests);
    2. self-supervised pretraining on public_fit, iteration 1 (MFCC k-means targets,
       conf/pretrain/iter1.yaml) and, with `iterations: 2`, iteration 2 (k-means on the
       iteration-1 model's layer features);
    3. CTC fine-tuning on public_fit (word units, transformer fully trained, front-ends frozen,
       no modality dropout, no input masking, as the original's fine-tuning);
    4. greedy-decoding WER on public_heldout (audio-visual, audio, video; clean);
    5. the fine-tuned model in fairseq's AVHubertCtc layout (`w2v_encoder.w2v_model.*`,
       `w2v_encoder.proj.*`, the word dictionary in task_state) at `starting_checkpoint.path`,
       with its model card (`<path minus .pt>.card.json` and `.md`): command, seed, data checksum,
       steps, wall time, held-out WER, sha256 of the checkpoint file.

`model.checkpoint` points at the shipped file by default, so every fine-tuning run starts from it;
`verify_starting_checkpoint` refuses a file whose sha256 differs from its card's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from data.dataset import build_dataloader
from data.manifest import read_split, write_split
from data.tokenizer import WordTokenizer
from models.avhubert import AVHubertModel, compute_span_mask, freeze_frontends
from models.avhubert_checkpoint import CheckpointError, load_avhubert_checkpoint, save_avhubert_checkpoint
from models.heads import AVHubertForCTC
from data.ctc_decode import ctc_greedy_decode
from training.loop import loop_kwargs_from_config, train
from common.metrics import word_error_rate
from training.optim import optimizer_and_scheduler_from_config
from common.files import atomic_write_text, file_sha256
from common.seeding import seed_everything
from training.stage import open_stage

log = logging.getLogger(__name__)

REGENERATE = ("make checkpoints   (= python -m scripts.prepare_data && "
              "python train_avhubert.py experiment=starting_checkpoint task=build_checkpoint)")
FIT_SPLIT, HELDOUT_SPLIT = "public_fit", "public_heldout"
INPUTS = {"audio_video": ("audio", "video"), "audio": ("audio",), "video": ("video",)}


class StartingCheckpointError(RuntimeError):
    """The shipped starting checkpoint is missing, corrupt or does not match its model card."""


# --------------------------------------------------------------------------- card + verification
def card_paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """(<stem>.card.json, <stem>.md) next to the checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_suffix(".card.json"), checkpoint.with_suffix(".md")


sha256_file = file_sha256  # the name this module's users import (one implementation: common.files)


def verify_starting_checkpoint(path: str | Path, regenerate: str = REGENERATE) -> Optional[dict]:
    """If `path` has a model card, check the file against it; returns the card (None without a card).

    Missing file, checksum mismatch or unreadable card -> StartingCheckpointError naming the file,
    both checksums where they exist, and the command that regenerates the checkpoint.
    """
    path = Path(path)
    card_json, _ = card_paths(path)
    if not card_json.is_file():
        if not path.is_file():
            raise StartingCheckpointError(f"{path}: checkpoint not found. Regenerate it with `{regenerate}`")
        return None
    try:
        card = json.loads(card_json.read_text())
        expected = str(card["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StartingCheckpointError(f"{card_json}: unreadable model card ({exc}); expected JSON with a 'sha256' field. "
                                      f"Regenerate checkpoint and card with `{regenerate}`") from exc
    if not path.is_file():
        raise StartingCheckpointError(f"{path}: checkpoint not found (its card {card_json} exists). "
                                      f"Regenerate it with `{regenerate}`")
    actual = sha256_file(path)
    if actual != expected:
        raise StartingCheckpointError(
            f"{path}: sha256 {actual} does not match its model card {card_json} (sha256 {expected}); refusing to use it. "
            f"Restore the shipped file (git checkout -- {path}) or regenerate checkpoint and card with `{regenerate}`")
    return card


def load_starting_checkpoint(path: str | Path, expected_format: str = "auto"):
    """verify_starting_checkpoint, then load strictly; a corrupt file names the regenerate command."""
    card = verify_starting_checkpoint(path)
    try:
        model, info = load_avhubert_checkpoint(path, strict=True, expected_format=expected_format)
    except (CheckpointError, RuntimeError, EOFError, ValueError) as exc:
        raise StartingCheckpointError(f"{path}: cannot load the checkpoint ({exc}). Regenerate it with `{REGENERATE}`") from exc
    info["card"] = card
    return model, info


FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def head_vocabulary(info: dict) -> Optional[list[str]]:
    """The CTC head's symbols of a loaded checkpoint (its task_state dictionary without fairseq's
    four specials, which our stand-in Dictionary puts first), or None if it stores no dictionary."""
    dictionaries = info.get("dictionaries") or []
    if not dictionaries or dictionaries[0] is None:
        return None
    symbols = list(dictionaries[0])
    return symbols[len(FAIRSEQ_SPECIALS):] if symbols[:len(FAIRSEQ_SPECIALS)] == FAIRSEQ_SPECIALS else symbols


# --------------------------------------------------------------------------- data
def corpus_checksum(data_dir: str | Path, splits: tuple[str, ...]) -> str:
    """sha256 over the manifests of `splits` and the media checksums of their utterances."""
    data_dir = Path(data_dir)
    sums = {}
    sums_file = data_dir / "checksums.sha256"
    if sums_file.is_file():
        for line in sums_file.read_text().splitlines():
            digest, _, rel = line.partition("  ")
            sums[rel] = digest
    digest = hashlib.sha256()
    for split in splits:
        for u in read_split(data_dir, split):
            digest.update(f"{split}\t{u.id}\t{u.speaker}\t{u.text}\t{u.n_frames}\t{u.n_samples}\n".encode())
            for media in (u.audio, u.video):
                if not media:  # an audio-only corpus has no video
                    continue
                rel = Path(media).resolve().relative_to(data_dir.resolve()).as_posix()
                digest.update(f"{sums.get(rel, 'unknown')}\n".encode())
    return digest.hexdigest()


def split_public(data_dir: str | Path, heldout_speakers: int) -> tuple[list[str], list[str]]:
    """Write public_fit / public_heldout manifests (last `heldout_speakers` public speakers held out)."""
    data_dir = Path(data_dir).resolve()
    utts = read_split(data_dir, "public")
    speakers = list(dict.fromkeys(u.speaker for u in utts))  # manifest order = speaker index order (s99 before s100)
    if not 1 <= heldout_speakers < len(speakers):
        raise ValueError(f"starting_checkpoint.heldout_speakers={heldout_speakers}: the public split has "
                         f"{len(speakers)} speakers; expected 1..{len(speakers) - 1}")
    held = speakers[-heldout_speakers:]
    write_split(data_dir, FIT_SPLIT, [u for u in utts if u.speaker not in held])
    write_split(data_dir, HELDOUT_SPLIT, [u for u in utts if u.speaker in held])
    return [s for s in speakers if s not in held], held


# --------------------------------------------------------------------------- fine-tuning
def _ctc_finetune(cfg: DictConfig, pretrained: Path, tokenizer: WordTokenizer, stage_dir: Path) -> tuple[AVHubertForCTC, dict]:
    """CTC fine-tuning of the whole transformer (front-ends frozen, their video output cached)."""
    from training.avhubert.finetune import FINETUNE_REGULARISATION, make_dataset, pad_cached, video_feature_cache

    sc = cfg.starting_checkpoint
    tc = sc.finetune
    loaded, _ = load_avhubert_checkpoint(pretrained, strict=True)
    arch = loaded.cfg.to_dict()
    arch.update({k: cfg.model[k] for k in FINETUNE_REGULARISATION})
    core = AVHubertModel(type(loaded.cfg)(**arch))
    core.load_state_dict(loaded.state_dict())
    model = AVHubertForCTC(core, tokenizer.vocab_size, final_dropout=cfg.model.final_dropout)
    freeze_frontends(model)
    for p in (core.final_proj.weight, core.final_proj.bias, core.label_embs_concat, core.mask_emb):
        p.requires_grad_(False)  # pretraining-only parameters get no gradient from CTC
    train_ds = make_dataset(cfg, FIT_SPLIT, tokenizer, train=True, modalities=("audio",), cache_items=True, anonymize="none")
    video_cache = video_feature_cache(core, make_dataset(cfg, FIT_SPLIT, tokenizer, modalities=("video",), anonymize="none"))
    loader = build_dataloader(train_ds, "bucket", batch_size=tc.batch_size, seed=cfg.seed, num_workers=tc.num_workers, train=True)
    heldout = make_dataset(cfg, HELDOUT_SPLIT, tokenizer, modalities=("audio",), anonymize="none")
    heldout_video = video_feature_cache(core, make_dataset(cfg, HELDOUT_SPLIT, tokenizer, modalities=("video",), anonymize="none"))
    heldout_batches = list(build_dataloader(heldout, "bucket", batch_size=16, seed=0, num_workers=0, train=False))

    mask_prob, mask_length = float(sc.finetune_mask_prob), int(sc.finetune_mask_length)
    mask_gen = torch.Generator().manual_seed(int(cfg.seed) + 3)

    def time_mask(feat_audio, feat_video):
        """Spans of frames zeroed in both front-end outputs (fairseq's fine-tuning `apply_mask`, here
        on the front-end outputs since the video one is cached); one span draw per modality."""
        out = []
        for feat in (feat_audio, feat_video):
            spans, _ = compute_span_mask(None, feat.size(0), feat.size(1), mask_prob, mask_length, generator=mask_gen)
            out.append(feat.masked_fill(spans.unsqueeze(-1), 0.0))
        return tuple(out)

    def step_fn(m, batch):
        fv = pad_cached(video_cache, batch["ids"], batch["audio"].shape[-1])
        out = m(batch["audio"], None, batch["padding_mask"], feat_video=fv,
                frontend_hook=time_mask if mask_prob > 0 else None)
        loss = m.ctc_loss(out, batch["targets"], batch["target_lengths"])
        return loss, {"ctc": float(loss.detach())}

    def eval_fn(m, step):
        return {"wer": heldout_wer(m, heldout_batches, heldout_video, tokenizer, ("audio", "video"))}

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_scheduler_from_config(params, tc)
    result = train(model, step_fn, loader, optimizer, scheduler, ckpt_dir=stage_dir / "checkpoints", eval_fn=eval_fn,
                   generators={"mask": mask_gen}, **loop_kwargs_from_config(tc))
    model.eval()
    wers = {f"wer/{name}/clean": heldout_wer(model, heldout_batches, heldout_video, tokenizer, inputs)
            for name, inputs in INPUTS.items()}
    info = {"steps": result.step, "train/ctc": result.last_logs.get("ctc"), **wers,
            "trainable_parameters": sum(p.numel() for _, p in params), "fit_utterances": len(train_ds),
            "heldout_utterances": len(heldout)}
    return model, info


@torch.no_grad()
def heldout_wer(model: AVHubertForCTC, batches: list, video_cache: dict, tokenizer, inputs: tuple[str, ...]) -> float:
    from training.avhubert.finetune import pad_cached

    was_training = model.training
    model.eval()
    refs, hyps = [], []
    for b in batches:
        fv = pad_cached(video_cache, b["ids"], b["audio"].shape[-1]) if "video" in inputs else None
        out = model(b["audio"] if "audio" in inputs else None, None, b["padding_mask"], feat_video=fv)
        hyps += ctc_greedy_decode(out.log_probs, out.output_lengths, tokenizer)
        refs += b["texts"]
    model.train(was_training)
    return word_error_rate(refs, hyps)


# --------------------------------------------------------------------------- the pipeline
def _pretrain_iteration(cfg: DictConfig, iteration: int, previous: Optional[Path]) -> tuple[Path, dict]:
    from training.avhubert import pretrain
    from training.stage import skip_if_done

    over = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    over.pretrain.iteration = iteration
    over.pretrain.split = FIT_SPLIT
    if iteration >= 2:
        over.pretrain.target_checkpoint = str(previous)
    out_dir = pretrain.pretrain_out_dir(over)
    metrics = skip_if_done(over, "pretrain", out_dir)
    if metrics is None:
        metrics = pretrain.pretrain(over)
    return out_dir / "checkpoint_last.pt", metrics


def build_starting_checkpoint(cfg: DictConfig) -> dict:
    """Pretrain (1 or 2 iterations) + CTC fine-tune on the public split; write checkpoint + card."""
    sc = cfg.starting_checkpoint
    out_path = Path(sc.path)
    t_start = time.time()
    fit_speakers, held_speakers = split_public(cfg.data.dir, int(sc.heldout_speakers))
    previous: Optional[Path] = None
    pretrain_metrics = []
    for iteration in range(1, int(sc.iterations) + 1):
        previous, metrics = _pretrain_iteration(cfg, iteration, previous)
        pretrain_metrics.append({"iteration": iteration, "steps": metrics.get("steps"), "seconds": metrics.get("seconds"),
                                 "targets_seconds": metrics.get("targets_seconds"),
                                 "loss": metrics.get("pretrain/train/loss"), "acc_masked": metrics.get("pretrain/train/acc_masked")})
    stage_dir = Path(cfg.paths.pretrained_dir) / cfg.model.name / "finetune_public"
    with open_stage(cfg, "finetune_public", directory=stage_dir) as stage:
        seed_everything(cfg.seed)
        from data.synthgrid.grammar import GRID_WORDS

        tokenizer = WordTokenizer(GRID_WORDS)  # the whole closed vocabulary, whatever a split happens to contain
        t0 = time.time()
        model, ft = _ctc_finetune(cfg, previous, tokenizer, stage_dir)
        ft["seconds"] = time.time() - t0
        stage.metrics.update(ft)
    data_sum = corpus_checksum(cfg.data.dir, (FIT_SPLIT, HELDOUT_SPLIT))
    save_avhubert_checkpoint(
        out_path, model, dictionary_symbols=list(tokenizer.symbols),
        cfg_dict={"task": {"labels": ["wrd"], "fine_tuning": True, "sample_rate": cfg.data.fps,
                           "stack_order_audio": cfg.data.stack_order_audio, "image_crop_size": cfg.data.crop_size,
                           "image_mean": cfg.data.image_mean, "image_std": cfg.data.image_std, "normalize": cfg.data.normalize_audio}},
        extra={"corpus": cfg.data.name, "fit_split": FIT_SPLIT, "heldout_split": HELDOUT_SPLIT, "data_sha256": data_sum},
    )
    card = {
        "checkpoint": out_path.name,
        "sha256": sha256_file(out_path),
        "bytes": out_path.stat().st_size,
        "command": REGENERATE,
        "overrides": list(sc.get("command_overrides") or []),
        "seed": int(cfg.seed),
        "model": cfg.model.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary": list(tokenizer.symbols),
        "data": {"corpus": cfg.data.name, "corpus_seed": int(cfg.data.seed), "sha256": data_sum,
                 "fit_speakers": fit_speakers, "heldout_speakers": held_speakers,
                 "fit_utterances": ft["fit_utterances"], "heldout_utterances": ft["heldout_utterances"]},
        "pretraining": pretrain_metrics,
        "pretrain_recipe": {k: OmegaConf.to_container(cfg.pretrain, resolve=True)[k] for k in (
            "masking_type", "mask_prob_audio", "mask_length_audio", "modality_dropout", "feature_grad_mult",
            "features_pen_weight", "kmeans_clusters", "target_layer", "max_steps", "batch_size", "lr")},
        "finetuning": {"steps": ft["steps"], "seconds": round(ft["seconds"], 1), "lr": float(sc.finetune.lr),
                       "batch_size": int(sc.finetune.batch_size), "final_train_ctc": ft["train/ctc"],
                       "frozen": "front-ends (audio projection, video ResNet + projection)"},
        "heldout_wer_clean": {k.split("/")[1]: round(100 * v, 2) for k, v in ft.items() if k.startswith("wer/")},
        # this invocation (split, any pretraining not already done, fine-tuning, evaluation, save); the
        # pretraining rows above give each iteration's own time, also when an earlier invocation ran it
        "wall_seconds": round(time.time() - t_start, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    write_card(out_path, card)
    log.info("starting checkpoint -> %s (sha256 %s); held-out WER %s", out_path, card["sha256"], card["heldout_wer_clean"])
    return {"starting_checkpoint/" + k: v for k, v in ft.items() if isinstance(v, (int, float))}


def write_card(checkpoint: Path, card: dict) -> None:
    card_json, card_md = card_paths(checkpoint)
    atomic_write_text(card_json, json.dumps(card, indent=1) + "\n")
    wer = card["heldout_wer_clean"]
    def _r(value, digits=0):
        return "-" if value is None else round(value, digits) if digits else round(value)

    pre = "\n".join(f"| {p['iteration']} | {p['steps']} | {_r(p.get('targets_seconds'))} s | {_r(p['seconds'])} s | "
                    f"{_r(p['loss'], 3)} | {_r(p['acc_masked'], 3)} |" for p in card["pretraining"])
    md = f"""# Model card: `{card['checkpoint']}`

<!-- written by `python train_avhubert.py task=build_checkpoint`; do not edit by hand -->

A tiny AV-HuBERT ({card['model']}, {card['parameters']:,} parameters) pretrained by masked prediction
and CTC-fine-tuned (word units) on SynthGRID's **public** split: the embedded analogue of the released
"pretrained + LRS3-fine-tuned" AV-HuBERT the paper starts from. Fairseq `AVHubertCtc` layout
(`w2v_encoder.w2v_model.*`, `w2v_encoder.proj.*`, word dictionary in `task_state`);
`models.avhubert_checkpoint.load_avhubert_checkpoint` reads it.

| field | value |
|---|---|
| command | `{card['command']}` |
| seed | {card['seed']} |
| sha256 | `{card['sha256']}` ({card['bytes']:,} bytes) |
| data | {card['data']['corpus']} (corpus seed {card['data']['corpus_seed']}), sha256 of manifests + media checksums `{card['data']['sha256']}` |
| fit speakers | {len(card['data']['fit_speakers'])} ({card['data']['fit_speakers'][0]}..{card['data']['fit_speakers'][-1]}), {card['data']['fit_utterances']} utterances |
| held-out public speakers | {', '.join(card['data']['heldout_speakers'])} ({card['data']['heldout_utterances']} utterances) |
| fine-tuning | {card['finetuning']['steps']} steps, batch {card['finetuning']['batch_size']}, lr {card['finetuning']['lr']}, {card['finetuning']['seconds']} s; frozen: {card['finetuning']['frozen']} |
| wall time | this `build_checkpoint` invocation {card['wall_seconds']} s, plus pretraining as in the table below; {card['machine']} |

Pretraining (one row per HuBERT iteration; recipe `{json.dumps(card['pretrain_recipe'])}`):

| iteration | steps | k-means targets | training | final loss | masked accuracy |
|---|---|---|---|---|---|
{pre}

Greedy-decoding WER (%) on the held-out public speakers, clean:

| audio-visual | audio | video |
|---|---|---|
| {wer.get('audio_video')} | {wer.get('audio')} | {wer.get('video')} |
"""
    atomic_write_text(card_md, md)


__all__ = ["REGENERATE", "StartingCheckpointError", "build_starting_checkpoint", "card_paths", "corpus_checksum", "head_vocabulary",
           "load_starting_checkpoint", "sha256_file", "split_public", "verify_starting_checkpoint"]
