"""AV-HuBERT fine-tuning (AdaLoRA + masks + contrastive loss) and evaluation, and the builders the
AV-HuBERT stages share (dataset, logger, pretrained encoder, masked system, fine-tuned system).

Each stage reads the composed config, builds data/model/privacy pieces from it,
and hands a `step_fn` to the training loop (`training.loop.train`).
Stage outputs: `<run_dir>/<stage>/{metrics.json,config.yaml,status.json,...}`.
Pretraining is in training/avhubert/pretrain.py, the export of protected features
for the attacker in training/avhubert/export.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.progress import Progress
from data.collate import collate_av
from data.dataset import AVSRDataset, build_dataloader
from data.tokenizer import build_tokenizer, load_tokenizer
from models.adapters import AdapterSpec, adalora_schedule, apply_adapter, count_parameters
from models.avhubert import AVHubertConfig, AVHubertModel, freeze_frontends
from models.avhubert_checkpoint import load_avhubert_checkpoint
from common.device import move_to_device, pin_memory_for, resolve_device
from models.heads import AVHubertForCTC
from privacy.adversary import SpeakerAdversary, check_privacy_terms
from privacy.contrastive import ProjectionHead, check_loss_options
from privacy.masks import build_masks, check_noise_granularity, mask_kind, sigma_summary
from privacy.probe import cosine_probe_eer, speaker_probe
from privacy.system import MaskedAVSR
from data.ctc_decode import build_beam_decoder, check_decoder_options, ctc_greedy_decode
from training.train_state import CheckpointError, load_checkpoint
from training.loop import loop_kwargs_from_config, train
from common.metrics import char_error_rate, word_error_rate
from training.optim import optimizer_and_scheduler_from_config
from training.run_logger import RunLogger, logger_from_config
from training import ddp
from common.files import atomic_write, atomic_write_text
from common.seeding import seed_everything
from training.stage import open_stage

log = logging.getLogger(__name__)

MODALITY_INPUTS = {"audio_video": ("audio", "video"), "audio": ("audio",), "video": ("video",)}


# --------------------------------------------------------------------------- building blocks
def avhubert_config(cfg: DictConfig) -> AVHubertConfig:
    """AVHubertConfig from the `model` group (fields with the same names; the rest is ignored)."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    return AVHubertConfig.from_dict(values)


def make_dataset(cfg: DictConfig, split: str, tokenizer=None, train: bool = False, noise: Optional[dict] = None,
                 modalities=("audio", "video"), return_waveform: bool = False, cache_items: bool = False,
                 anonymize: Optional[str] = None) -> AVSRDataset:
    """anonymize=None: data.anonymize (the protection applied to every split); 'none' forces the original audio."""
    d = cfg.data
    return AVSRDataset(
        d.dir, split, tokenizer, train=train, modalities=tuple(modalities), return_waveform=return_waveform,
        noise=noise, on_error=d.on_error, max_av_length_mismatch=d.max_av_length_mismatch, seed=cfg.seed,
        sample_rate=d.sample_rate, fps=d.fps, stack_order=d.stack_order_audio, normalize_audio=d.normalize_audio,
        crop_size=d.crop_size, image_mean=d.image_mean, image_std=d.image_std, cache_items=cache_items,
        roi_size=d.roi_size, max_skip_fraction=d.max_skip_fraction,
        anonymize=d.get("anonymize", "none") if anonymize is None else anonymize, mcadams_alpha=d.get("mcadams_alpha", 0.8),
    )


def make_logger(cfg: DictConfig, directory: Path) -> RunLogger:
    return logger_from_config(cfg.logger, directory, OmegaConf.to_container(cfg, resolve=True), run_name=cfg.run_name,
                              enabled=ddp.is_main())


def task_device(cfg: DictConfig, group: str = "trainer") -> torch.device:
    """The device of this process for a task (`<group>.device`; under torchrun the local rank's GPU)."""
    import os

    return resolve_device(cfg[group].device, int(os.environ.get("LOCAL_RANK", "0")), field=f"{group}.device")


FINETUNE_REGULARISATION = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                           "modality_dropout", "audio_dropout", "finetune_modality_dropout", "dropout_input",
                           "feature_grad_mult")


def load_pretrained_avhubert(cfg: DictConfig) -> tuple[AVHubertModel, dict]:
    """The pretrained encoder named by model.checkpoint (fairseq .pt, HF directory or ours).

    Architecture comes from the checkpoint; dropout rates come from the config,
    since fine-tuning regularises differently from pretraining. A fine-tuned
    checkpoint's CTC head is returned in info["ctc_head"] (with its dictionary in
    info["dictionaries"]); `build_system` reuses it only when the vocabularies agree.
    A checkpoint with a model card (the shipped one) must match the card's sha256.
    """
    from training.starting_checkpoint import REGENERATE, StartingCheckpointError, verify_starting_checkpoint

    path = cfg.model.checkpoint
    if path is None:
        log.warning("model.checkpoint is null: %s starts from random weights", cfg.model.name)
        return AVHubertModel(avhubert_config(cfg)), {"source": "random"}
    if not Path(path).exists():
        raise FileNotFoundError(
            f"model.checkpoint={path} does not exist. For the shipped starting checkpoint regenerate it with "
            f"`{REGENERATE}`; for a pretrained-only embedded model `python train_avhubert.py task=pretrain` "
            "(then model.checkpoint=<pretrained_dir>/<model>/iter1/checkpoint_last.pt); for real weights point "
            "model.checkpoint at a fairseq .pt or a Hugging Face AV-HuBERT directory."
        )
    verify_starting_checkpoint(path)
    try:
        loaded, info = load_avhubert_checkpoint(path, strict=True, expected_format=cfg.model.checkpoint_format)
    except Exception as exc:
        from training.starting_checkpoint import card_paths

        if card_paths(path)[0].is_file():  # the shipped checkpoint: say how to get a good one back
            raise StartingCheckpointError(f"{path}: cannot load the checkpoint ({exc}). Regenerate it with `{REGENERATE}`") from exc
        raise
    if isinstance(loaded, AVHubertForCTC):
        info["ctc_head"] = {k: v.detach().clone() for k, v in loaded.ctc_proj.state_dict().items()}
        loaded = loaded.avhubert
    arch = loaded.cfg.to_dict()
    arch.update({k: cfg.model[k] for k in FINETUNE_REGULARISATION})
    model = AVHubertModel(AVHubertConfig(**arch))
    model.load_state_dict(loaded.state_dict())
    return model, info


@torch.no_grad()
def video_feature_cache(model: AVHubertModel, dataset: AVSRDataset, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Frozen video front-end outputs per utterance id ([T, D], centre crop), kept on the CPU.

    The ResNet is most of the compute of a tiny model; with frozen front-ends its
    output never changes, so fine-tuning and evaluation compute it once (on the
    model's device; `pad_cached` batches come back to it with the rest of a batch).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cache: dict[str, torch.Tensor] = {}
    loader = build_dataloader(dataset, "bucket", batch_size=batch_size, seed=0, num_workers=0, train=False,
                              pin_memory=pin_memory_for(device))
    progress = Progress(total=len(dataset), desc=f"video front-end cache ({dataset.split})", unit="utt", enabled=ddp.is_main())
    for batch in loader:
        _, fv = model.extract_frontends(None, batch["video"].to(device, non_blocking=True))
        fv = fv.float().cpu()
        for i, uid in enumerate(batch["ids"]):
            cache[uid] = fv[i, : int(batch["lengths"][i])].clone()
        progress.update(len(batch["ids"]))
    progress.close()
    model.train(was_training)
    return cache


def pad_cached(cache: dict[str, torch.Tensor], ids: list[str], frames: int) -> torch.Tensor:
    out = torch.zeros(len(ids), frames, next(iter(cache.values())).shape[-1])
    for i, uid in enumerate(ids):
        if uid not in cache:
            raise KeyError(f"utterance {uid!r} has no cached video front-end output (its video was skipped or not "
                           "cached); the audio dataset must be filtered to the cache (AVSRDataset.keep_only)")
        f = cache[uid][:frames]
        out[i, : f.shape[0]] = f
    return out


# --------------------------------------------------------------------------- finetune
def masks_from_config(m: DictConfig, core_cfg: AVHubertConfig, generator: torch.Generator):
    """The masks of the `masks` group for an encoder of `core_cfg` (None for masks=none).

    Fine-tuning, evaluation and export all build them here, so the protected representation
    (kind, position, noise level and noise granularity) is defined once."""
    return build_masks(mask_kind(m.additive, m.multiplicative), m.position, m.layer, core_cfg.encoder_embed_dim,
                       tuple(m.modalities), m.init_scale, core_cfg.encoder_layers, m.min_scale, m.noise_at_eval, generator,
                       # a config saved before these options existed (asr_run) meant frame noise
                       noise_granularity=m.get("noise_granularity", "frame"), segment_frames=m.get("segment_frames", 1))


def build_system(cfg: DictConfig, vocab_size: int, symbols: Optional[list[str]] = None) -> tuple[MaskedAVSR, Any]:
    """Pretrained AV-HuBERT + CTC head + masks (+ projection head), adapter applied, front-ends frozen."""
    core, info = load_pretrained_avhubert(cfg)
    asr = AVHubertForCTC(core, vocab_size, final_dropout=cfg.model.final_dropout)
    # symbols=None: the caller loads a fine-tuned head over this one (evaluate / export), nothing to report
    if cfg.model.reuse_ctc_head and "ctc_head" in info and symbols is not None:
        from training.starting_checkpoint import head_vocabulary

        if head_vocabulary(info) == list(symbols):
            asr.ctc_proj.load_state_dict(info["ctc_head"])
            log.info("CTC head initialised from %s (same %d-symbol vocabulary)", cfg.model.checkpoint, len(symbols))
        else:
            log.info("CTC head of %s not reused: its vocabulary differs from this run's tokenizer", cfg.model.checkpoint)
    if cfg.model.freeze_frontends:
        freeze_frontends(asr)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 7)
    masks = masks_from_config(cfg.masks, core.cfg, mask_gen)
    # Defaults for the options a config saved before they existed lacks (asr_run): today's behaviour.
    lc = OmegaConf.merge({"projection": "learned", "adversary_weight": 0.0, "adversary_input": "fused",
                          "adversary_hidden_dim": 256, "adversary_grl_scale": 1.0}, cfg.loss)
    projection = None
    if lc.contrastive and lc.projection != "none":
        projection = ProjectionHead(core.cfg.encoder_embed_dim, lc.projection_dim, pooling=lc.pooling)
        if lc.projection == "frozen":
            projection.requires_grad_(False)  # a fixed random map: it cannot learn to drop the speaker itself
    adversary = None
    if lc.adversary_weight > 0:
        from data.manifest import read_split

        # speaker_idx in a batch indexes the sorted speakers of the train manifest (data/dataset.py)
        n_speakers = len({u.speaker for u in read_split(cfg.data.dir, "train")})
        adversary = SpeakerAdversary(core.cfg.encoder_embed_dim, n_speakers, lc.adversary_hidden_dim, lc.adversary_grl_scale)
    a = cfg.adapter
    total = cfg.trainer.max_steps
    tinit, tfinal, delta_t = adalora_schedule(total, a.tinit_frac, a.tfinal_frac, a.delta_t) if a.name == "adalora" else (0, 0, a.delta_t)
    spec = AdapterSpec(kind=a.name, target_modules=list(a.target_modules), r=a.r, init_r=a.init_r, target_r=a.target_r,
                       lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                       total_step=total, beta1=a.beta1, beta2=a.beta2, orth_reg_weight=a.orth_reg_weight)
    # Adapters go on the transformer; everything else of the pretrained model (front-ends,
    # fusion, pretraining heads) stays frozen. The CTC head trains fully (it is new).
    if a.name != "none":
        asr.avhubert.requires_grad_(False)
    _, handle = apply_adapter(asr.avhubert.encoder, spec, trainable_extra=[])
    system = MaskedAVSR(asr, masks, projection, adversary, lc.adversary_input)
    for p in asr.ctc_proj.parameters():
        p.requires_grad_(True)
    if a.name == "none":
        for name, p in asr.avhubert.named_parameters():
            p.requires_grad_(not (cfg.model.freeze_frontends and name.startswith("feature_extractor_")))
        # Pretraining-only parameters get no gradient from CTC.
        for p in (asr.avhubert.final_proj.weight, asr.avhubert.final_proj.bias, asr.avhubert.label_embs_concat, asr.avhubert.mask_emb):
            p.requires_grad_(False)
    return system, handle, mask_gen


def validate_options(cfg: DictConfig) -> None:
    """Incompatible options fail here, before any data is loaded."""
    check_noise_granularity(cfg.masks.noise_granularity, cfg.masks.segment_frames)
    if cfg.masks.noise_granularity == "segment":
        check_segment_against_data(cfg.masks.segment_frames, cfg.data.dir)
    check_loss_options(cfg.loss, cfg.trainer.sampler, cfg.trainer.utterances_per_speaker, cfg.masks.name)
    check_privacy_terms(cfg.loss.adversary_weight, cfg.loss.adversary_input, cfg.loss.noise_weight, cfg.masks.name,
                        cfg.masks.position, cfg.masks.modalities, cfg.model.modalities)
    check_decoder_options(cfg.eval.decoder, cfg.data.tokenizer, cfg.eval.beam_size)
    task_device(cfg)  # an unusable trainer.device fails here, not after the data is loaded
    if cfg.masks.position == "encoder" and cfg.masks.layer >= cfg.model.encoder_layers:
        raise ValueError(f"masks.layer={cfg.masks.layer} is beyond the encoder depth model.encoder_layers={cfg.model.encoder_layers}")
    if cfg.trainer.sampler == "speaker" and cfg.trainer.speakers_per_batch * cfg.trainer.utterances_per_speaker < 2:
        raise ValueError("trainer.sampler=speaker needs speakers_per_batch x utterances_per_speaker >= 2")


def check_segment_against_data(segment_frames: int, data_dir: str, split: str = "train") -> None:
    """masks.segment_frames must be shorter than the longest utterance of the prepared corpus.

    A segment at least as long as every utterance is one draw per utterance under another
    name (and a run directory that hides it); nothing to check before the corpus is prepared."""
    from data.manifest import manifest_dir, read_split

    if not (manifest_dir(data_dir) / f"{split}.tsv").is_file():
        return
    longest = max((u.n_frames for u in read_split(data_dir, split)), default=0)
    if longest and segment_frames >= longest:
        raise ValueError(
            f"masks.segment_frames={segment_frames} is not shorter than the longest utterance of "
            f"data.dir={data_dir} ({split}: {longest} frames), so masks.noise_granularity=segment would draw one noise "
            "per utterance; use masks.noise_granularity=utterance, or a smaller masks.segment_frames"
        )


def tokenizer_for_run(cfg: DictConfig, texts: list[str] | None = None, run_dir: str | Path | None = None,
                      rebuild: bool = False):
    """The run's tokenizer (`<run_dir>/tokenizer`), built from `texts` by fine-tuning; `rebuild` (fine-tuning
    with force=true, which may change data.tokenizer) replaces the one an earlier attempt built."""
    tok_dir = Path(run_dir if run_dir is not None else cfg.paths.run_dir) / "tokenizer"
    if rebuild and texts is not None and tok_dir.is_dir():
        import shutil

        shutil.rmtree(tok_dir)
    if (tok_dir / "tokenizer.json").is_file() or any(tok_dir.glob("*")):
        return load_tokenizer(tok_dir)
    if texts is None:
        raise FileNotFoundError(f"{tok_dir}: no tokenizer; run task=finetune with the same overrides first")
    return build_tokenizer(cfg.data.tokenizer, texts, tok_dir, cfg.data.sentencepiece_vocab)


def finetune(cfg: DictConfig) -> dict:
    """AdaLoRA fine-tuning with CTC (+ masks, + contrastive loss); training/tasks.py then runs
    evaluate and export (eval_after_finetune=true).

    Under `torchrun --nproc_per_node=N` the batches are split across N processes
    (DDP, gloo on CPU); rank 0 logs, checkpoints, evaluates and exports.
    """
    validate_options(cfg)
    rank, world, _ = ddp.setup_distributed()
    with open_stage(cfg, "finetune") as stage:
        gen = seed_everything(cfg.seed)
        from data.manifest import read_split

        train_texts = [u.text for u in read_split(cfg.data.dir, "train")]
        tokenizer = tokenizer_for_run(cfg, train_texts, rebuild=stage.force and stage.writer)
        tc = cfg.trainer
        device = task_device(cfg)
        system, adapter, mask_gen = build_system(cfg, tokenizer.vocab_size, getattr(tokenizer, "symbols", None))
        system.to(device)
        cache_video = tc.cache_frontends and cfg.model.freeze_frontends
        modalities = ("audio",) if cache_video else ("audio", "video")
        train_ds = make_dataset(cfg, "train", tokenizer, train=True, modalities=modalities, cache_items=cache_video)
        video_cache = None
        if cache_video:
            video_ds = make_dataset(cfg, "train", tokenizer, modalities=("video",))
            video_cache = video_feature_cache(system.core, video_ds)
            # data.on_error=skip: the video dataset may have skipped utterances the audio one kept
            train_ds.keep_only(video_cache, video_ds.skipped, what="the video front-end cache")
        loader = build_dataloader(train_ds, tc.sampler, batch_size=tc.batch_size, P=tc.speakers_per_batch, K=tc.utterances_per_speaker,
                                  seed=cfg.seed, num_workers=tc.num_workers, train=True, num_replicas=world, rank=rank,
                                  pin_memory=pin_memory_for(device))
        lam = float(cfg.loss["lambda"])
        lc = cfg.loss
        capture = bool(lc.contrastive) or lc.adversary_weight > 0

        def step_fn(model, batch):
            system_ = ddp.unwrap(model)
            fv = pad_cached(video_cache, batch["ids"], batch["audio"].shape[-1]).to(device, non_blocking=True) if video_cache is not None else None
            out = model(batch["audio"], batch["video"], batch["padding_mask"], feat_video=fv, capture=capture)
            ctc = system_.asr.ctc_loss(out.ctc, batch["targets"], batch["target_lengths"])
            loss = ctc + adapter.regularization()
            logs = {"ctc": float(ctc.detach())}
            if capture or lc.noise_weight > 0:
                privacy, privacy_logs = system_.privacy_loss(
                    out, batch["speaker_idx"], batch["padding_mask"], contrastive_weight=lam if lc.contrastive else None,
                    temperature=lc.temperature, pooling=lc.pooling, other_speaker_negatives=lc.other_speaker_negatives,
                    negatives_from=lc.negatives, adversary_weight=lc.adversary_weight, noise_weight=lc.noise_weight)
                loss = loss + privacy
                logs.update(privacy_logs)
            if system_.masks is not None:
                logs["mask_log_sigma"] = float(system_.masks.mean_log_sigma().detach())
            return loss, logs

        probe = LeakageProbe(cfg, system, video_cache_source="train")
        valid = Validation(cfg, tokenizer, "valid")

        def eval_fn(model, step):
            metrics = valid(model)
            metrics.update(probe(model))
            return metrics

        params = [(n, p) for n, p in system.named_parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_scheduler_from_config(params, tc)
        stage.metrics.update(count_parameters(system))
        log.info("finetune: %d / %d parameters trainable (%s, masks=%s, loss=%s)", stage.metrics["params/trainable"],
                 stage.metrics["params/total"], cfg.adapter.name, cfg.masks.name, cfg.loss.name)
        logger = make_logger(cfg, stage.dir)
        t0 = time.time()
        # Layer drop skips whole layers (and their adapters) on some ranks: only then does DDP need to
        # look for unused parameters. Modality dropout keeps its dropped branch in the graph.
        model = ddp.wrap_ddp(system, find_unused_parameters=cfg.model.encoder_layerdrop > 0) if world > 1 else system
        result = train(model, step_fn, loader, optimizer, scheduler, ckpt_dir=stage.dir / "checkpoints", logger=logger,
                       eval_fn=eval_fn, after_optimizer_step=adapter.after_optimizer_step, generators={"mask": mask_gen},
                       extra_state={"adalora": adapter}, desc="finetune", device=device, **loop_kwargs_from_config(tc))
        logger.close()
        if not ddp.is_main():
            return {}
        save_system(stage.dir / "model.pt", system)
        stage.metrics.update(steps=result.step, bad_steps=result.bad_steps_total, seconds=time.time() - t0,
                             rank_budget=adapter.rank_budget(), utterances=len(train_ds), **train_ds.skips.report())
        stage.metrics.update({f"valid/{k}": v for k, v in valid.skips.items()})
        if system.masks is not None:
            stage.metrics.update(sigma_summary(system.masks))
        stage.metrics.update({f"train/{k}": v for k, v in result.last_logs.items()})
        stage.metrics.update({k.replace("eval/", ""): v for k, v in result.last_eval.items()})
    return dict(stage.metrics)


def save_system(path: Path, system: MaskedAVSR) -> None:
    state = {k: v.detach().cpu() for k, v in system.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"model": state}, f))


def asr_run_dir(cfg: DictConfig) -> Path:
    """The ASR run whose fine-tuned model evaluate / export (and so the attacker) use: `asr_run`, else this run."""
    return Path(cfg.asr_run) if cfg.get("asr_run") else Path(cfg.paths.run_dir)


def asr_run_config(cfg: DictConfig) -> DictConfig:
    """The config the fine-tuned model was built with: this one, or the one `asr_run`'s fine-tuning saved.

    Model, adapter, masks, loss, trainer and seed come from there (they define the system and its
    mask noise); data, attacker and eval stay this command's, so an LRS3 model can export
    VoxCeleb2 features.
    """
    if not cfg.get("asr_run"):
        return cfg
    saved = Path(cfg.asr_run) / "finetune" / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"asr_run={cfg.asr_run}: {saved} not found; asr_run must be the run directory of a "
                                "finished `python train_avhubert.py task=finetune ...` (the directory holding finetune/)")
    other = OmegaConf.load(saved)
    merged = OmegaConf.to_container(cfg, resolve=True)
    for key in ("model", "adapter", "masks", "loss", "trainer", "seed"):
        merged[key] = OmegaConf.to_container(other, resolve=True)[key] if key in other else merged[key]
    return OmegaConf.create(merged)


def load_finetuned(cfg: DictConfig, device: torch.device | None = None):
    """The fine-tuned system of this run directory (same overrides as task=finetune), or of `asr_run`.

    Returns (system on `device` in eval mode, tokenizer, mask generator, the config it was built from).
    """
    run_dir = asr_run_dir(cfg)
    path = run_dir / "finetune" / "model.pt"
    if not path.is_file():
        how = (f"asr_run={cfg.asr_run} holds no finished fine-tuning (finetune/model.pt)" if cfg.get("asr_run") else
               f"no finished fine-tuning run for these overrides. Create it with "
               f"`python train_avhubert.py task=finetune <the same overrides>` (run dir {cfg.paths.run_dir}), or point "
               "asr_run=<run dir> at the ASR run to use")
        raise FileNotFoundError(f"{path} not found: {how}")
    system_cfg = asr_run_config(cfg)
    tokenizer = tokenizer_for_run(cfg, run_dir=run_dir)
    system, _, mask_gen = build_system(system_cfg, tokenizer.vocab_size)  # head and all: overwritten by model.pt
    state = load_checkpoint(path)  # CRC-checked, weights_only, errors name the file
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: expected {{'model': state dict}} as written by save_system, found keys {sorted(state)}")
    system.load_state_dict(state["model"])
    system.to(device if device is not None else torch.device("cpu"))
    system.eval()
    return system, tokenizer, mask_gen, system_cfg


# --------------------------------------------------------------------------- probes / validation
class LeakageProbe:
    """Speaker information in pooled clean vs protected representations of one split's speakers
    (default: the train speakers the masks were trained on; evaluate also runs it on the held-out
    attacker_trials speakers).

    A linear classifier (half the utterances of each speaker to fit, half to test)
    and cosine-scoring EER; cheap enough to log at every evaluation.
    """

    def __init__(self, cfg: DictConfig, system: MaskedAVSR, video_cache_source: str = "train", per_speaker: int = 8,
                 split: str = "train"):
        self.cfg = cfg
        ds = make_dataset(cfg, split, None, modalities=("audio", "video"))
        by_spk: dict[str, list[int]] = {}
        for i, u in enumerate(ds.utterances):
            by_spk.setdefault(u.speaker, []).append(i)
        self.indices = [i for idx in by_spk.values() for i in idx[:per_speaker]]
        self.items = [ds[i] for i in self.indices]
        self.batch = collate_av(self.items)

    @torch.no_grad()
    def __call__(self, system: MaskedAVSR) -> dict:
        b = move_to_device(self.batch, next(system.parameters()).device)
        out = system(b["audio"], b["video"], b["padding_mask"], capture=True)
        if out.clean is None:
            return {}
        keep = (~b["padding_mask"]).unsqueeze(-1).float()
        metrics = {}
        spk = [it["speaker"] for it in self.items]
        for name, rep in (("clean", out.clean), ("protected", out.protected)):
            pooled = ((rep.float() * keep).sum(1) / keep.sum(1)).cpu().numpy()
            even = np.arange(len(spk)) % 2 == 0
            acc = speaker_probe(pooled[even], np.array(spk)[even], pooled[~even], np.array(spk)[~even])
            metrics[f"probe/speaker_acc_{name}"] = acc["accuracy"]
            metrics[f"probe/eer_{name}"] = cosine_probe_eer(pooled, spk, n_pairs=1000, seed=0)
            metrics["probe/chance"] = acc["chance"]
        metrics["probe/speaker_acc"] = metrics["probe/speaker_acc_protected"]
        metrics["probe/eer"] = metrics["probe/eer_protected"]
        return metrics


class Validation:
    """Greedy-decoding WER on a split (audio-visual, clean) for logging during training."""

    def __init__(self, cfg: DictConfig, tokenizer, split: str):
        self.tokenizer = tokenizer
        ds = make_dataset(cfg, split, tokenizer)
        self.skips = ds.skips.report()
        self.batches = list(build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=0, train=False))

    @torch.no_grad()
    def __call__(self, system: MaskedAVSR) -> dict:
        refs, hyps = [], []
        device = next(system.parameters()).device
        for b in self.batches:
            b = move_to_device(b, device)
            out = system(b["audio"], b["video"], b["padding_mask"])
            hyps += ctc_greedy_decode(out.ctc.log_probs, out.ctc.output_lengths, self.tokenizer)
            refs += b["texts"]
        return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps)}


# --------------------------------------------------------------------------- evaluate
def _conditions(cfg: DictConfig) -> list[tuple[str, Optional[dict]]]:
    conds = [("clean", None)]
    for kind in cfg.eval.noise_types:
        for snr in cfg.eval.snrs:
            conds.append((f"{kind}_{snr:g}", {"type": kind, "snr": float(snr)}))
    return conds


def evaluate(cfg: DictConfig) -> dict:
    """WER/CER per modality (audio-visual, audio, video) and noise condition; hypotheses written alongside."""
    check_decoder_options(cfg.eval.decoder, cfg.data.tokenizer, cfg.eval.beam_size)
    with open_stage(cfg, "evaluate") as stage:
        seed_everything(cfg.seed)
        device = task_device(cfg)
        system, tokenizer, mask_gen, system_cfg = load_finetuned(cfg, device)
        split = cfg.eval.split
        video_ds = make_dataset(cfg, split, tokenizer, modalities=("video",))
        video_cache = video_feature_cache(system.core, video_ds)
        beam = None
        if cfg.eval.decoder == "beam":
            from data.manifest import read_split

            # Character units decode into the words of this corpus' training transcripts.
            lexicon_texts = [u.text for u in read_split(cfg.data.dir, "train")] if tokenizer.kind == "char" else []
            beam = build_beam_decoder(tokenizer, lexicon_texts, beam_size=cfg.eval.beam_size)
        hyp_dir = stage.dir / "hypotheses"
        for condition, noise in _conditions(cfg):
            ds = make_dataset(cfg, split, tokenizer, modalities=("audio",), noise=noise)
            ds.keep_only(video_cache, video_ds.skipped, what="the video front-end cache")  # both modalities score the same set
            if noise is None:
                scored = ds
            loader = build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=cfg.trainer.num_workers, train=False)
            batches = list(loader)  # kept on the CPU (every condition of a split at once); moved per batch
            for modality in cfg.eval.modalities:
                if modality == "video" and condition != "clean":
                    continue  # audio noise does not reach a video-only model
                inputs = MODALITY_INPUTS[modality]
                mask_gen.manual_seed(system_cfg.seed + 11)  # same mask noise for every condition
                refs, hyps, ids = [], [], []
                n_utts = sum(len(b["ids"]) for b in batches)
                # by time only: most conditions take seconds, so each logs just its closing line (count, rate,
                # time); a slow condition still reports every 30 s with an ETA
                progress = Progress(total=n_utts, desc=f"evaluate {modality} {condition}", unit="utt")
                with torch.no_grad():
                    for b in batches:
                        frames = b["audio"].shape[-1]
                        fv = pad_cached(video_cache, b["ids"], frames).to(device, non_blocking=True) if "video" in inputs else None
                        audio = b["audio"].to(device, non_blocking=True) if "audio" in inputs else None
                        out = system(audio, None, b["padding_mask"].to(device, non_blocking=True), feat_video=fv)
                        if beam is not None:
                            hyps += beam.decode(out.ctc.log_probs, out.ctc.output_lengths)
                        else:
                            hyps += ctc_greedy_decode(out.ctc.log_probs, out.ctc.output_lengths, tokenizer)
                        refs += b["texts"]
                        ids += b["ids"]
                        progress.update(len(b["ids"]))
                progress.close()
                stage.metrics[f"wer/{modality}/{condition}"] = word_error_rate(refs, hyps)
                stage.metrics[f"cer/{modality}/{condition}"] = char_error_rate(refs, hyps)
                atomic_write_text(hyp_dir / f"{modality}.{condition}.hyp", "".join(f"{i}\t{h}\n" for i, h in zip(ids, hyps)))
                atomic_write_text(hyp_dir / f"{modality}.{condition}.ref", "".join(f"{i}\t{r}\n" for i, r in zip(ids, refs)))
                log.info("evaluate %s %-12s WER %.2f%%", modality, condition, 100 * stage.metrics[f"wer/{modality}/{condition}"])
        stage.metrics["n_utterances"] = len(scored)  # scored; skipped/* says how many were dropped and why
        stage.metrics.update(scored.skips.report())
        # The linear probe on speakers neither the ASR model nor its masks ever saw (attacker_trials),
        # after the WER loop so the WER noise draws are unchanged.
        mask_gen.manual_seed(cfg.seed + 13)
        heldout = LeakageProbe(cfg, system, split="attacker_trials")(system)
        stage.metrics.update({k.replace("probe/", "probe_heldout/"): v for k, v in heldout.items()})
        return dict(stage.metrics)
