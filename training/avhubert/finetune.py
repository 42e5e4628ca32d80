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

from data.collate import collate_av
from data.dataset import AVSRDataset, build_dataloader
from data.tokenizer import build_tokenizer, load_tokenizer
from models.adapters import AdapterSpec, adalora_schedule, apply_adapter, count_parameters
from models.avhubert import AVHubertConfig, AVHubertModel, freeze_frontends
from models.avhubert_checkpoint import load_avhubert_checkpoint
from models.heads import AVHubertForCTC
from privacy.adversary import SpeakerAdversary, check_privacy_terms
from privacy.contrastive import ProjectionHead, check_loss_options
from privacy.masks import build_masks, check_noise_granularity, mask_kind
from privacy.probe import cosine_probe_eer, speaker_probe
from privacy.system import MaskedAVSR
from data.ctc_decode import LexiconBeamDecoder, ctc_greedy_decode, lexicon_from_texts
from training.loop import loop_kwargs_from_config, train
from common.metrics import char_error_rate, word_error_rate
from training.optim import optimizer_and_scheduler_from_config
from training.run_logger import RunLogger, logger_from_config
from training import ddp
from common.files import atomic_write, atomic_write_text
from common.seeding import seed_everything
from training.stage import Stage

log = logging.getLogger(__name__)

MODALITY_INPUTS = {"audio_video": ("audio", "video"), "audio": ("audio",), "video": ("video",)}


# --------------------------------------------------------------------------- building blocks
def avhubert_config(cfg: DictConfig) -> AVHubertConfig:
    """AVHubertConfig from the `model` group (fields with the same names; the rest is ignored)."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    return AVHubertConfig.from_dict(values)


def make_dataset(cfg: DictConfig, split: str, tokenizer=None, train: bool = False, noise: Optional[dict] = None,
                 modalities=("audio", "video"), return_waveform: bool = False, cache_items: bool = False) -> AVSRDataset:
    d = cfg.data
    return AVSRDataset(
        d.dir, split, tokenizer, train=train, modalities=tuple(modalities), return_waveform=return_waveform,
        noise=noise, on_error=d.on_error, max_av_length_mismatch=d.max_av_length_mismatch, seed=cfg.seed,
        sample_rate=d.sample_rate, fps=d.fps, stack_order=d.stack_order_audio, normalize_audio=d.normalize_audio,
        crop_size=d.crop_size, image_mean=d.image_mean, image_std=d.image_std, cache_items=cache_items,
    )


def make_logger(cfg: DictConfig, directory: Path) -> RunLogger:
    return logger_from_config(cfg.logger, directory, OmegaConf.to_container(cfg, resolve=True), run_name=cfg.run_name,
                              enabled=ddp.is_main())


FINETUNE_REGULARISATION = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                           "modality_dropout", "audio_dropout")


def load_pretrained_avhubert(cfg: DictConfig) -> tuple[AVHubertModel, dict]:
    """The pretrained encoder named by model.checkpoint (fairseq .pt, HF directory or ours).

    Architecture comes from the checkpoint; dropout rates come from the config,
    since fine-tuning regularises differently from pretraining. A fine-tuned
    checkpoint's CTC head is dropped: our vocabulary is our own.
    """
    path = cfg.model.checkpoint
    if path is None:
        log.warning("model.checkpoint is null: %s starts from random weights", cfg.model.name)
        return AVHubertModel(avhubert_config(cfg)), {"source": "random"}
    if not Path(path).exists():
        raise FileNotFoundError(
            f"model.checkpoint={path} does not exist. For the embedded model create it with "
            f"`python train_avhubert.py task=pretrain model={cfg.model.name}`; for real weights point "
            "model.checkpoint at a fairseq .pt or a Hugging Face AV-HuBERT directory."
        )
    loaded, info = load_avhubert_checkpoint(path, strict=True, expected_format=cfg.model.checkpoint_format)
    if isinstance(loaded, AVHubertForCTC):
        loaded = loaded.avhubert
    arch = loaded.cfg.to_dict()
    arch.update({k: cfg.model[k] for k in FINETUNE_REGULARISATION})
    model = AVHubertModel(AVHubertConfig(**arch))
    model.load_state_dict(loaded.state_dict())
    return model, info


@torch.no_grad()
def video_feature_cache(model: AVHubertModel, dataset: AVSRDataset, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Frozen video front-end outputs per utterance id ([T, D], centre crop).

    The ResNet is most of the compute of a tiny model; with frozen front-ends its
    output never changes, so fine-tuning and evaluation compute it once.
    """
    was_training = model.training
    model.eval()
    cache: dict[str, torch.Tensor] = {}
    loader = build_dataloader(dataset, "bucket", batch_size=batch_size, seed=0, num_workers=0, train=False)
    for batch in loader:
        _, fv = model.extract_frontends(None, batch["video"])
        for i, uid in enumerate(batch["ids"]):
            cache[uid] = fv[i, : int(batch["lengths"][i])].clone()
    model.train(was_training)
    return cache


def pad_cached(cache: dict[str, torch.Tensor], ids: list[str], frames: int) -> torch.Tensor:
    out = torch.zeros(len(ids), frames, next(iter(cache.values())).shape[-1])
    for i, uid in enumerate(ids):
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
                       noise_granularity=m.noise_granularity, segment_frames=m.segment_frames)


def build_system(cfg: DictConfig, vocab_size: int) -> tuple[MaskedAVSR, Any]:
    """Pretrained AV-HuBERT + CTC head + masks (+ projection head), adapter applied, front-ends frozen."""
    core, info = load_pretrained_avhubert(cfg)
    asr = AVHubertForCTC(core, vocab_size, final_dropout=cfg.model.final_dropout)
    if cfg.model.freeze_frontends:
        freeze_frontends(asr)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 7)
    masks = masks_from_config(cfg.masks, core.cfg, mask_gen)
    lc = cfg.loss
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


def tokenizer_for_run(cfg: DictConfig, texts: list[str] | None = None):
    tok_dir = Path(cfg.paths.run_dir) / "tokenizer"
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
    with Stage(cfg, "finetune") as stage:
        gen = seed_everything(cfg.seed)
        from data.manifest import read_split

        train_texts = [u.text for u in read_split(cfg.data.dir, "train")]
        tokenizer = tokenizer_for_run(cfg, train_texts)
        tc = cfg.trainer
        system, adapter, mask_gen = build_system(cfg, tokenizer.vocab_size)
        cache_video = tc.cache_frontends and cfg.model.freeze_frontends
        modalities = ("audio",) if cache_video else ("audio", "video")
        train_ds = make_dataset(cfg, "train", tokenizer, train=True, modalities=modalities, cache_items=cache_video)
        video_cache = video_feature_cache(system.core, make_dataset(cfg, "train", tokenizer, modalities=("video",))) if cache_video else None
        loader = build_dataloader(train_ds, tc.sampler, batch_size=tc.batch_size, P=tc.speakers_per_batch, K=tc.utterances_per_speaker,
                                  seed=cfg.seed, num_workers=tc.num_workers, train=True, num_replicas=world, rank=rank)
        lam = float(cfg.loss["lambda"])
        lc = cfg.loss
        capture = bool(lc.contrastive) or lc.adversary_weight > 0

        def step_fn(model, batch):
            system_ = ddp.unwrap(model)
            fv = pad_cached(video_cache, batch["ids"], batch["audio"].shape[-1]) if video_cache is not None else None
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
        model = ddp.wrap_ddp(system) if world > 1 else system
        result = train(model, step_fn, loader, optimizer, scheduler, ckpt_dir=stage.dir / "checkpoints", logger=logger,
                       eval_fn=eval_fn, after_optimizer_step=adapter.after_optimizer_step, generators={"mask": mask_gen},
                       extra_state={"adalora": adapter}, **loop_kwargs_from_config(tc))
        logger.close()
        if not ddp.is_main():
            return {}
        save_system(stage.dir / "model.pt", system)
        stage.metrics.update(steps=result.step, bad_steps=result.bad_steps_total, seconds=time.time() - t0,
                             rank_budget=adapter.rank_budget(), **train_ds.skips.report())
        stage.metrics.update({f"train/{k}": v for k, v in result.last_logs.items()})
        stage.metrics.update({k.replace("eval/", ""): v for k, v in result.last_eval.items()})
    return dict(stage.metrics)


def save_system(path: Path, system: MaskedAVSR) -> None:
    atomic_write(path, lambda f: torch.save({"model": system.state_dict()}, f))


def load_finetuned(cfg: DictConfig):
    """The fine-tuned system of this run directory (same overrides as task=finetune)."""
    path = Path(cfg.paths.run_dir) / "finetune" / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: no finished fine-tuning run for these overrides. Create it with "
            f"`python train_avhubert.py task=finetune <the same overrides>` (run dir {cfg.paths.run_dir})"
        )
    tokenizer = tokenizer_for_run(cfg)
    system, _, mask_gen = build_system(cfg, tokenizer.vocab_size)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    system.load_state_dict(state)
    system.eval()
    return system, tokenizer, mask_gen


# --------------------------------------------------------------------------- probes / validation
class LeakageProbe:
    """Speaker information in pooled clean vs protected representations of train-speaker utterances.

    A linear classifier (half the utterances of each speaker to fit, half to test)
    and cosine-scoring EER; cheap enough to log at every evaluation.
    """

    def __init__(self, cfg: DictConfig, system: MaskedAVSR, video_cache_source: str = "train", per_speaker: int = 8):
        self.cfg = cfg
        ds = make_dataset(cfg, "train", None, modalities=("audio", "video"))
        by_spk: dict[str, list[int]] = {}
        for i, u in enumerate(ds.utterances):
            by_spk.setdefault(u.speaker, []).append(i)
        self.indices = [i for idx in by_spk.values() for i in idx[:per_speaker]]
        self.items = [ds[i] for i in self.indices]
        self.batch = collate_av(self.items)

    @torch.no_grad()
    def __call__(self, system: MaskedAVSR) -> dict:
        b = self.batch
        out = system(b["audio"], b["video"], b["padding_mask"], capture=True)
        if out.clean is None:
            return {}
        keep = (~b["padding_mask"]).unsqueeze(-1).float()
        metrics = {}
        spk = [it["speaker"] for it in self.items]
        for name, rep in (("clean", out.clean), ("protected", out.protected)):
            pooled = ((rep * keep).sum(1) / keep.sum(1)).numpy()
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
        self.batches = list(build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=0, train=False))

    @torch.no_grad()
    def __call__(self, system: MaskedAVSR) -> dict:
        refs, hyps = [], []
        for b in self.batches:
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
    with Stage(cfg, "evaluate") as stage:
        seed_everything(cfg.seed)
        system, tokenizer, mask_gen = load_finetuned(cfg)
        split = cfg.eval.split
        clean_ds = make_dataset(cfg, split, tokenizer, modalities=("video",))
        video_cache = video_feature_cache(system.core, clean_ds)
        beam = None
        if cfg.eval.decoder == "beam":
            from data.manifest import read_split

            beam = LexiconBeamDecoder(tokenizer, lexicon_from_texts([u.text for u in read_split(cfg.data.dir, "train")]),
                                      beam_size=cfg.eval.beam_size)
        hyp_dir = stage.dir / "hypotheses"
        for condition, noise in _conditions(cfg):
            ds = make_dataset(cfg, split, tokenizer, modalities=("audio",), noise=noise)
            loader = build_dataloader(ds, "bucket", batch_size=16, seed=0, num_workers=cfg.trainer.num_workers, train=False)
            batches = list(loader)
            for modality in cfg.eval.modalities:
                if modality == "video" and condition != "clean":
                    continue  # audio noise does not reach a video-only model
                inputs = MODALITY_INPUTS[modality]
                mask_gen.manual_seed(cfg.seed + 11)  # same mask noise for every condition
                refs, hyps, ids = [], [], []
                with torch.no_grad():
                    for b in batches:
                        frames = b["audio"].shape[-1]
                        fv = pad_cached(video_cache, b["ids"], frames) if "video" in inputs else None
                        audio = b["audio"] if "audio" in inputs else None
                        out = system(audio, None, b["padding_mask"], feat_video=fv)
                        if beam is not None:
                            hyps += beam.decode(out.ctc.log_probs, out.ctc.output_lengths)
                        else:
                            hyps += ctc_greedy_decode(out.ctc.log_probs, out.ctc.output_lengths, tokenizer)
                        refs += b["texts"]
                        ids += b["ids"]
                stage.metrics[f"wer/{modality}/{condition}"] = word_error_rate(refs, hyps)
                stage.metrics[f"cer/{modality}/{condition}"] = char_error_rate(refs, hyps)
                atomic_write_text(hyp_dir / f"{modality}.{condition}.hyp", "".join(f"{i}\t{h}\n" for i, h in zip(ids, hyps)))
                atomic_write_text(hyp_dir / f"{modality}.{condition}.ref", "".join(f"{i}\t{r}\n" for i, r in zip(ids, refs)))
                log.info("evaluate %s %-12s WER %.2f%%", modality, condition, 100 * stage.metrics[f"wer/{modality}/{condition}"])
        stage.metrics["n_utterances"] = len(clean_ds)
        return dict(stage.metrics)
