"""Structured-config schemas for `conf/`.

Each config group's YAML files extend the dataclass registered here under
`schema/<group>` (`defaults: [/schema/<group>@_here_, _self_]`), so Hydra checks
every override against a type: `trainer.max_steps=abc` or `masks.positon=...`
fail at composition with Hydra's own message instead of becoming a silent
default. Models and privacy modules never import this file: entry code turns
these configs into plain constructor arguments.

Importing this module registers the schemas and the custom resolvers; both entry
scripts and `scripts.prepare_data` do it before `@hydra.main` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from privacy.federated.settings import LOCAL_OPTIMIZERS

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- enum-like options
# OmegaConf 2.3 has no typing.Literal; Enum fields would put Enum objects into every
# config dict (and from there into checkpoints, which weights_only loading refuses).
# So enum-like fields stay `str` and carry their allowed values as field metadata,
# which `check_choices` verifies right after composition (milliseconds, before any
# data or model is touched).
def one_of(default: str, *others: str) -> Any:
    """A str field whose value must be `default` or one of `others`."""
    return field(default=default, metadata={"choices": (default, *others)})


def list_of(choices: tuple[str, ...], default: list[str]) -> Any:
    """A list[str] field whose every element must be one of `choices`."""
    return field(default_factory=lambda: list(default), metadata={"choices": choices})


class ConfigChoiceError(ValueError):
    """An enum-like option has a value outside its allowed set."""


def check_choices(cfg: Any) -> None:
    """Every enum-like field (declared with `one_of` / `list_of`) of the composed config holds an allowed
    value; raises ConfigChoiceError naming the field, the value and the allowed values."""
    import dataclasses

    def walk(node: Any, schema: type, prefix: str) -> None:
        for f in dataclasses.fields(schema):
            if f.name not in node:
                continue
            value = node[f.name]
            choices = f.metadata.get("choices")
            if choices is not None and value is not None:
                values = list(value) if not isinstance(value, str) else [value]
                bad = [v for v in values if v not in choices]
                if bad:
                    raise ConfigChoiceError(f"{prefix}{f.name}={bad[0]!r}: expected one of {', '.join(choices)}")
            sub = SECTION_SCHEMAS.get(f.name) if not prefix else None
            if sub is not None and value is not None and hasattr(value, "keys"):
                walk(value, sub, f"{f.name}.")
            elif dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) and hasattr(value, "keys"):
                walk(value, f.type, f"{prefix}{f.name}.")

    walk(cfg, Config, "")


# --------------------------------------------------------------------------- groups
@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING  # prepared corpora live in <data_dir>/<data.name>
    runs_dir: str = MISSING
    run_dir: str = MISSING  # one directory per (data, model, adapter, masks, loss, fl, dp, compression, seed)
    pretrained_dir: str = MISSING  # embedded pretrained checkpoints


@dataclass
class SplitsConfig:
    """Number of speakers per speaker-disjoint split (SynthGRID; public is the last block of speakers)."""

    public: int = 80
    train: int = 12
    valid: int = 2
    test: int = 4
    attacker_train: int = 12
    attacker_trials: int = 8


@dataclass
class DataConfig:
    name: str = MISSING  # synthgrid | lrs3 | voxceleb2 | grid
    dir: str = MISSING  # prepared corpus directory (manifests/, audio/, video/)
    raw_dir: Optional[str] = None  # real corpora: where the downloaded archives were unpacked
    seed: int = 1234  # corpus seed (independent of the training seed)
    num_speakers: int = 118
    utterances_per_speaker: int = 24
    public_utterances_per_speaker: Optional[int] = 30  # SynthGRID public-split speakers (None: utterances_per_speaker)
    train_utterances_per_speaker: Optional[int] = None  # SynthGRID train-split speakers (None: utterances_per_speaker)
    extra_train_speakers: int = 0  # SynthGRID: train speakers appended after the public block (larger populations)
    extra_test_speakers: int = 0  # SynthGRID: test speakers appended after those (a larger test set, nothing else moves)
    extra_train_speakers_after_test: int = 0  # SynthGRID: train speakers appended after the extra test ones (same test set)
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    trials_per_speaker: int = 40  # verification trials per held-out speaker (half target, half non-target)
    sample_rate: int = 16000
    fps: int = 25
    roi_size: int = 96
    audio_only: bool = False  # SynthGRID: wav files only, no mouth video (audio-only models, large speaker populations)
    crop_size: int = 88
    image_mean: float = 0.421
    image_std: float = 0.165
    stack_order_audio: int = 4
    normalize_audio: bool = True
    max_av_length_mismatch: int = 2  # video frames; beyond this an utterance is invalid
    tokenizer: str = one_of("char", "sentencepiece", "word")  # word: closed vocabularies such as GRID (closed vocabularies such as GRID)
    sentencepiece_vocab: int = 64
    num_workers: int = 2  # preparation worker processes / DataLoader workers
    on_error: str = one_of("raise", "skip")  # skip: skips are counted in every stage's metrics.json as skipped/<reason>
    max_skip_fraction: float = 0.1  # on_error=skip: a split losing more than this fraction of its utterances fails the stage
    max_missing_face_frac: float = 0.2  # real corpora: utterances with more frames without a face are skipped
    subset: Optional[str] = None  # real corpora: e.g. lrs3 30h | 433h fine-tuning subset
    # real corpora (data/corpora/, data/roi.py; see data/README.md "Real corpora")
    trials_file: Optional[str] = None  # voxceleb2: official verification list (`1 id/clip/n.wav id/clip/n.wav`); None = balanced generated trials
    valid_utterances: int = 1200  # lrs3: size of the held-out valid set drawn (whole speakers) from trainval, as AV-HuBERT's 1200
    split_speakers: dict[str, list[str]] = field(default_factory=dict)  # grid: speakers per split; train = every speaker not listed
    roi_method: str = one_of("dlib_cnn", "dlib_hog", "center")  # center: no face detection (already mouth-centred video)
    roi_detect_every: int = 5  # run the face detector on every Nth frame; landmarks track the face in between
    roi_detect_max_side: int = 360  # frames larger than this are downscaled for detection only (CNN time ~ pixels)
    roi_smooth_window: int = 12  # landmark smoothing window (frames), AV-HuBERT's window_margin
    max_utterances: Optional[int] = None  # debugging: prepare only the first N source files (sorted)
    # Signal-level anonymisation of every waveform before the front-end (data/anonymize.py): none | mcadams
    # (the VoicePrivacy McAdams-coefficient baseline, pole angles phi -> phi ** mcadams_alpha).
    anonymize: str = one_of("none", "mcadams")
    mcadams_alpha: float = 0.8


@dataclass
class ModelConfig:
    name: str = MISSING  # avhubert_tiny | avhubert_base | avhubert_large | wav2vec2_tiny | wav2vec2_base
    family: str = one_of("avhubert", "wav2vec2")
    checkpoint: Optional[str] = None  # path to a pretrained checkpoint (fairseq .pt, HF dir/safetensors, ours)
    checkpoint_format: str = one_of("auto", "fairseq", "hf", "ours")
    encoder_embed_dim: int = 768
    encoder_layers: int = 12
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    resnet_stem_channels: int = 64
    audio_feat_dim: int = 104
    conv_pos: int = 128
    conv_pos_groups: int = 16
    final_dim: int = 256
    modality_fuse: str = one_of("concat", "add")
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.0
    dropout_features: float = 0.0
    final_dropout: float = 0.1
    encoder_layerdrop: float = 0.0
    modality_dropout: float = 0.5
    audio_dropout: float = 0.5
    finetune_modality_dropout: bool = False  # the original never drops a modality when fine-tuning (docs/method.md)
    feature_grad_mult: float = 1.0  # pretraining sets its own (conf/pretrain/*.yaml)
    freeze_frontends: bool = True
    reuse_ctc_head: bool = True  # a fine-tuned checkpoint's CTC head initialises ours when the vocabularies are equal
    modalities: list[str] = list_of(("audio", "video"), ["audio", "video"])
    # AV-HuBERT only (models.avhubert.AVHubertConfig.from_dict(model cfg) ignores the fields it lacks)
    resnet_relu_type: str = one_of("prelu", "relu")
    untie_final_proj: bool = True
    masking_type: str = one_of("input", "feature")
    mask_prob_audio: float = 0.8
    mask_length_audio: int = 10
    mask_prob_image: float = 0.3
    mask_length_image: int = 5
    selection_type: str = one_of("same_seq", "same_other_seq")
    logit_temp: float = 0.1
    num_classes: int = 504  # rows of label_embs_concat (k-means clusters + 4 fairseq specials)


@dataclass
class AdapterConfig:
    name: str = MISSING  # none | lora | adalora
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    r: int = 8
    init_r: int = 12
    target_r: int = 4
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    tinit_frac: float = 0.1  # AdaLoRA tinit = tinit_frac * total_step
    tfinal_frac: float = 0.3  # AdaLoRA tfinal = tfinal_frac * total_step
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


@dataclass
class MasksConfig:
    name: str = MISSING  # none | additive | multiplicative | both
    tag: str = MISSING  # run-directory tag (name + initial noise scale)
    additive: bool = False
    multiplicative: bool = False
    position: str = one_of("frontend", "encoder")
    layer: int = 0  # encoder position: after this encoder layer (0-based)
    init_scale: float = 1.0  # initial noise standard deviation (relative to feature scale)
    min_scale: float = 0.0  # floor on the relative noise std (keeps the masks from learning to vanish)
    modalities: list[str] = list_of(("audio", "video"), ["audio", "video"])  # frontend position: masked front-ends
    noise_at_eval: bool = True  # the protected representation is noisy at inference too (docs/method.md)
    # frame: a fresh noise draw per frame | segment: one per `segment_frames` frames | utterance: one per
    # utterance. The same at training, evaluation, export and attack (docs/method.md, section 2).
    noise_granularity: str = one_of("frame", "segment", "utterance")
    segment_frames: int = 25  # segment granularity: frames per draw (25 = 1 s at 25 fps)


class LossConfig:
    name: str = MISSING  # ctc | ctc_contrastive
    tag: str = MISSING  # run-directory tag (includes lambda/temperature when contrastive)
    contrastive: bool = False
    # `lambda` is a Python keyword; YAML and the command line still say loss.lambda
    temperature: float = 0.1
    pooling: str = one_of("utterance", "frame")
    other_speaker_negatives: bool = False  # ablation: every other utterance is a negative, not only same-speaker ones
    projection_dim: int = 128  # contrastive projection head output (head is dropped after training)
    projection: str = one_of("learned", "frozen", "none")  # learned | frozen (random, not trained) | none (cosine on the pooled representation)
    negatives: str = one_of("clean", "protected")  # clean | protected: which versions of the same-speaker utterances are the negatives
    # Gradient-reversal adversarial speaker classifier on pooled protected features (privacy/adversary.py); 0 = off.
    adversary_weight: float = 0.0
    adversary_grl_scale: float = 1.0
    adversary_input: str = one_of("fused", "audio", "video")  # fused | audio | video (the last two: front-end masks only)
    adversary_hidden_dim: int = 256
    noise_weight: float = 0.0  # beta in  - beta * mean log sigma  (pushes the noise level up); 0 = off


@dataclass
class DPConfig:
    name: str = MISSING  # none | local | central
    tag: str = MISSING
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0  # local: per-sample clipping bound
    clipping_norm: float = 1.0  # central: per-client update clipping bound
    noise_multiplier: Optional[float] = None  # central: if None, derived from the budget
    accountant: str = one_of("rdp", "prv")
    grad_sample_mode: str = one_of("hooks", "ghost")  # ghost needs privacy.dp.CTCCriterion as the loss
    poisson_sampling: bool = True
    trainable_layers: Optional[int] = None  # local DP: None = all transformer layers (+ pos conv, projection); k = top k + lm_head
    train_positional_conv: bool = True  # local DP: the folded positional conv keeps training
    max_noise_multiplier: float = 1.0e3  # a plan needing more noise than this is rejected at start-up
    unit: Optional[str] = None  # privacy unit; None: utterance (dp=local) / client (dp=central); speaker: dp=central, one speaker per client
    # True: DP noise and Poisson batches seeded from the run seed, so runs repeat bit for bit, and anyone who
    # knows the config can regenerate and subtract the noise. NOT PRIVATE; every metric/table row says so.
    reproducible_noise_NOT_PRIVATE: bool = False
    cross_check: bool = True  # also report epsilon from dp_accounting (independent accountant)


@dataclass
class FederatedConfig:
    name: str = MISSING  # none | fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg | krum
    tag: str = MISSING
    num_clients: int = 4
    num_rounds: int = 5
    local_epochs: int = 1
    local_steps: Optional[int] = None
    local_optimizer: str = one_of(*LOCAL_OPTIMIZERS)  # the client's optimiser (fresh every round; DP-Adam under dp=local)
    fraction_train: float = 1.0
    cohort_sampling: str = one_of("fixed", "poisson")  # poisson: every client joins a round with probability cohort_rate (fedavg)
    cohort_rate: float = 1.0  # poisson: q; user-level DP (dp=central) is accounted for Poisson subsampling at this rate
    min_train_nodes: int = 2
    proximal_mu: float = 0.01
    backend: str = one_of("ray", "sequential")  # sequential: in-process simulation of the same apps
    max_update_norm: float = 1.0e6  # updates larger than this are rejected as malformed
    round_timeout: float = 3600.0
    fraction_evaluate: float = 1.0
    server_lr: float = 0.1  # fedadam: server learning rate (eta)
    # fedadam's server Adam (Reddi et al. 2021): moment decays and the adaptivity floor tau; with Poisson cohorts the
    # clients should run plain SGD (local_optimizer=sgd); under central DP it post-processes the noised mean
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1.0e-3
    # Poisson-cohort fedavg only (FedAvgM, Hsu et al. 2019): the server keeps v <- server_momentum x v + mean update and
    # moves the global model by fedavg_server_lr x v; under central DP the mean is the noised one (post-processing).
    fedavg_server_lr: float = 1.0
    server_momentum: float = 0.0
    trimmed_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end
    krum_malicious: Optional[int] = None  # krum: number of malicious clients f to tolerate; required (>= 1) with krum
    # the server scores the global model on eval.split (test speakers) after every server_eval_every-th round and the
    # last one: the learning curve only; the reported WER is scored after the federation either way
    server_eval_every: int = 1
    # the server checkpoints the federation after every checkpoint_every-th round (and the last); a run started again
    # with the same configuration continues after it (trainer.resume; privacy/federated/server_checkpoint.py); 0: never
    checkpoint_every: int = 1
    # federated=none only (a diagnostic of FedAvg's gap): the centralised baseline re-creates its optimiser (fresh Adam
    # moments) every k steps, as a FedAvg client does every round; 0: one optimiser for the whole run
    centralised_optimizer_reset_every: int = 0
    # the run's OWN optimiser decays its lr linearly to 1/T of it at the last of its T steps: the centralised baseline's
    # Adam (per step) and the Poisson-cohort server's step (fedavg / fedadam, per round; post-processing under DP);
    # the clients' local optimisers are unchanged. none: a constant lr (every run of sessions 2-4)
    lr_decay: str = one_of("none", "linear")
    # the run's OWN iterates averaged: a fedavg / fedadam server scores and returns the bias-corrected exponential moving
    # average (decay ema per round) of its global models instead of the last one, the clients still training the last
    # one (a function of released models only, so post-processing under DP); the centralised baseline (federated=none)
    # returns the EMA of its parameters per optimiser step. 0: off (every run before session 8)
    ema: float = 0.0
    # Poisson cohorts under central DP: the server step is shrunk per coordinate by the DP noise its optimiser buffer
    # carries (known from sigma, C and qN): buffer_i x max(0, 1 - server_shrink x noise variance / buffer_i^2), the
    # positive-part James-Stein / Wiener factor (1: the signal power estimated as buffer_i^2 minus the noise variance).
    # A function of released means and public constants only, so post-processing. 0: off (every run before session 9)
    server_shrink: float = 0.0
    # fedadam with Poisson cohorts under central DP: the server Adam's second moment debiased for the DP noise
    # (DP-AdamBC, Tang et al. 2024, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias Correction)"):
    # nu_hat = max(nu / (1 - beta2^t) - (sigma C / qN)^2, (rho sigma C / qN)^2) in place of nu / (1 - beta2^t), so a
    # coordinate is normalised by its signal's scale, not by the noise's (rho = server_adam_bc, the floor as a fraction
    # of the noise std). Post-processing. 0: off (every run before session 9)
    server_adam_bc: float = 0.0
    # Poisson cohorts: k > 0 projects every client update onto the top-k directions of gradients on the PUBLIC
    # speakers (public_subspace_split) at the current global model, recomputed every public_subspace_refresh rounds;
    # under central DP the k coefficients are clipped and noised (noise norm / sqrt(d / k), same accounting).
    # 0: off (every run before session 6)
    public_subspace_dim: int = 0
    public_subspace_refresh: int = 1
    public_subspace_split: str = "public"
    client_evaluation: Optional[bool] = None  # per-round evaluation on the clients' held-out data; None: on without DP, off under DP
    max_num_examples: int = 0  # fedavg/fedprox/fedadam without DP: largest num-examples a client may claim (0: local_steps x batch_size)


@dataclass
class CompressionConfig:
    name: str = MISSING  # none | int8 | topk
    topk_fraction: float = 0.05
    topk_keep_biases: bool = False  # every 1-d parameter (the CTC head's bias) sent in full, top-k on the rest
    topk_value_bits: int = 16  # 16: fp16 values + 16-bit indices; 8 / 4: int8 / int4 values + a bitmask (compression.py, "Packing")
    error_feedback: bool = True
    int8_block_size: int = 0  # 0: one scale per tensor; > 0: one scale per block of this many values


@dataclass
class AttackerConfig:
    """RJCA attacker. Model fields mirror models.rjca.RJCAConfig (build it with
    RJCAConfig.from_dict(attacker) plus input_kind = "raw" if input == "raw" else
    "features" and audio_feat_dim / video_feat_dim from the features attacked)."""

    name: str = MISSING  # rjca | audio_only | video_only
    scenario: str = one_of("semi_informed", "ignorant", "lazy_informed", "untrained_masks")  # training/attack.py SCENARIOS
    input: str = one_of("protected", "raw", "clean")
    modalities: list[str] = list_of(("audio", "video"), ["audio", "video"])
    segments: int = 8  # L segment embeddings per utterance (boundaries adapt to its length)
    recursions: int = 2  # joint cross-attention steps, each with its own weights
    audio_dim: int = 192  # per-segment audio embedding d_a
    video_dim: int = 256  # per-segment visual embedding d_v
    embed_dim: int = 192  # final speaker embedding
    ecapa_channels: int = 256  # ECAPA-TDNN width C (divisible by ecapa_res2net_scale)
    ecapa_res2net_scale: int = 8
    ecapa_se_channels: int = 64
    visual_cnn_widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # raw ROI frames only
    visual_channels: int = 256
    visual_temporal_layers: int = 2
    attention_dropout: float = 0.6
    lstm_layers: int = 2
    lstm_dropout: float = 0.1
    pool_attention_dim: int = 128
    aam_margin: float = 0.2
    aam_scale: float = 30.0
    lr: float = 1.0e-3
    lr_decay: float = 0.95  # per epoch (the original uses 0.65 over many more epochs)
    weight_decay: float = 2.0e-5
    epochs: int = 20
    batch_size: int = 32
    score_norm: str = one_of("none", "snorm")
    snorm_top_k: Optional[int] = None  # adaptive S-norm: cohort scores kept per side (None = all)
    ci_resamples: int = 1000  # speaker-resampling bootstrap replicates for the EER / minDCF 95 % intervals; 0 = none
    # all_pairs: every pair of attacker_trials utterances (the statistics issue 17 asks for) | list: manifests/trials.txt
    # (a real corpus' official trial list)
    trials: str = one_of("all_pairs", "list")
    max_nontarget_trials: Optional[int] = None  # all_pairs: keep every target pair and this many non-target pairs (seeded by data.seed); None = all
    lazy_seed_offset: int = 1000  # export: lazy-informed enrolment noise seeded seed + offset, untrained masks seed + offset + 1
    # Per-utterance normalisation of every feature sequence the attacker reads (extra variant, not VoicePrivacy's):
    # mean subtracts each utterance's time mean per dimension (removes utterance-level additive noise exactly),
    # mean_std also divides by its std (removes utterance-level multiplicative noise up to sign), mean_std_sign also
    # multiplies each dimension by the sign of its skewness (removes any per-utterance per-dimension affine map, sign
    # included), segment_mean subtracts the mean of each segment of masks.segment_frames frames (removes segment-level
    # additive noise exactly). Stage attack/<scenario>-<mode>.
    normalize: str = one_of("none", "mean", "mean_std", "mean_std_sign", "segment_mean")


@dataclass
class TrainerConfig:
    name: str = MISSING
    max_steps: int = 1000
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_frac: float = 0.1
    schedule: str = one_of("tri_stage", "cosine", "constant")
    hold_frac: float = 0.4
    init_lr_scale: float = 0.01  # warm-up starts at init_lr_scale * lr (fairseq tri-stage default)
    final_lr_scale: float = 0.05  # tri_stage / cosine end at final_lr_scale * lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    batch_size: int = 16  # utterances per batch (P x K when the speaker sampler is on)
    speakers_per_batch: int = 4  # P
    utterances_per_speaker: int = 4  # K
    sampler: str = one_of("bucket", "speaker")  # speaker: P x K batches
    eval_every: int = 200
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in the stage directory
    max_bad_steps: int = 5  # consecutive NaN/inf losses or gradients before training stops
    progress_bar: bool = True  # tqdm; shown only on rank 0 and when stderr is a terminal
    num_workers: int = 0
    # auto | cpu | cuda | cuda:N (common.device.resolve_device); every task runs there: pretrain
    # (pretrain.device follows trainer.device), finetune, evaluate, export, attack, federated clients.
    device: str = "auto"
    precision: str = one_of("auto", "fp32", "bf16")  # auto: bf16 autocast on a CUDA GPU that has it, else fp32
    cache_frontends: bool = False


@dataclass
class PretrainConfig(TrainerConfig):
    """Embedded AV-HuBERT pretraining (`task=pretrain`): the optimiser fields of TrainerConfig plus the
    recipe of one HuBERT iteration, which overrides the model group's fields of the same name.
    Defaults are iteration 1 (`base_lrs3_iter1.yaml`); conf/pretrain/iter2.yaml, iter5.yaml change them."""

    iteration: int = 1  # 1: k-means on MFCCs; >= 2: k-means on features of the previous iteration's model
    split: str = "public"  # manifest the model is pretrained on
    kmeans_clusters: int = 100  # model.num_classes becomes kmeans_clusters + 4 (fairseq dictionary specials)
    target_checkpoint: Optional[str] = None  # iteration >= 2: model whose features are clustered
    target_layer: int = 3  # iteration >= 2: output of this encoder layer (1-based) is clustered
    masking_type: str = one_of("feature", "input")  # feature (iter1) | input (iter5)
    mask_prob_audio: float = 0.8
    mask_length_audio: int = 10
    mask_prob_image: float = 0.8
    mask_length_image: int = 10
    modality_dropout: float = 0.0
    audio_dropout: float = 0.5
    feature_grad_mult: float = 0.1
    features_pen_weight: float = 10.0  # criterion loss_weights: [10]
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1
    dropout_features: float = 0.1
    encoder_layerdrop: float = 0.05


@dataclass
class StartingCheckpointConfig:
    """`task=build_checkpoint` (`make checkpoints`): the shipped starting checkpoint (training/starting_checkpoint.py)."""

    path: str = MISSING  # where the checkpoint is written (its model card goes next to it)
    heldout_speakers: int = 4  # last public speakers, kept out of pretraining and fine-tuning; the card's WER
    iterations: int = 1  # HuBERT iterations before fine-tuning (2: k-means on the iteration-1 model's features)
    finetune: TrainerConfig = field(default_factory=lambda: TrainerConfig(name="finetune_public"))
    finetune_mask_prob: float = 0.0  # time masking of the front-end outputs while fine-tuning (0: off)
    finetune_mask_length: int = 5
    command_overrides: list[str] = field(default_factory=list)  # recorded in the card when not the defaults


@dataclass
class LoggerConfig:
    name: str = MISSING  # csv | wandb
    project: str = "privacy-avsr"
    mode: str = one_of("offline", "online", "disabled")  # wandb


@dataclass
class EvalConfig:
    modalities: list[str] = list_of(("audio_video", "audio", "video"), ["audio_video", "audio", "video"])
    noise_types: list[str] = list_of(("babble", "white"), ["babble", "white"])
    snrs: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0])
    decoder: str = one_of("greedy", "beam")  # beam: lexicon-constrained CTC beam search
    beam_size: int = 20
    split: str = "test"


@dataclass
class Config:
    defaults: list[Any] = field(default_factory=list)
    task: str = "finetune"  # pretrain | finetune | evaluate | export
    seed: int = 1
    dry_run: bool = False  # compose, print the run directory, write <run_dir>/plan/<task>.yaml, run nothing
    force: bool = False  # re-run a stage whose status.json says done (sweeps skip finished stages)
    eval_after_finetune: bool = True  # finetune also runs evaluate and export
    # evaluate / export (and so the attacker) use the fine-tuned model of this ASR run directory
    # (`<runs_dir>/<data>/<run_name>/s<seed>` of a finished task=finetune); null = this run
    asr_run: Optional[str] = None
    run_name: str = MISSING
    paths: PathsConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    adapter: AdapterConfig = MISSING
    masks: MasksConfig = MISSING
    loss: LossConfig = MISSING
    dp: DPConfig = MISSING
    federated: FederatedConfig = MISSING
    compression: CompressionConfig = MISSING
    attacker: AttackerConfig = MISSING
    trainer: TrainerConfig = MISSING  # fine-tuning (and the centralised Wav2Vec2 baseline)
    pretrain: PretrainConfig = MISSING  # embedded self-supervised pretraining (task=pretrain)
    logger: LoggerConfig = MISSING
    starting_checkpoint: StartingCheckpointConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


# The contrastive weight is `loss.lambda` on the command line, as in the paper.
# A keyword cannot be a Python parameter name, so the schema gets the field by
# name and no generated __init__ (OmegaConf reads fields, never calls it).
LossConfig.__annotations__["lambda"] = "float"
setattr(LossConfig, "lambda", 0.1)
LossConfig = dataclass(init=False, repr=False, eq=False)(LossConfig)

GROUP_SCHEMAS = {
    "paths": PathsConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "masks": MasksConfig,
    "loss": LossConfig,
    "dp": DPConfig,
    "federated": FederatedConfig,
    "compression": CompressionConfig,
    "attacker": AttackerConfig,
    "trainer": TrainerConfig,
    "pretrain": PretrainConfig,
    "logger": LoggerConfig,
    "starting_checkpoint": StartingCheckpointConfig,
}


# Config sections and the schema that types them (trainer and pretrain share TrainerConfig).
SECTION_SCHEMAS = {**GROUP_SCHEMAS, "pretrain": TrainerConfig, "eval": EvalConfig}


def _run_tags(*parts: Any) -> str:
    """Join run-name parts, dropping the ones that say a component is off."""
    kept = [str(p) for p in parts if str(p) not in ("none", "", "None")]
    return "-".join(kept) if kept else "base"


def _truthy(value: Any) -> bool:
    """A resolver argument that is a bool in the config (OmegaConf may hand it over as a string)."""
    return str(value).lower() == "true"


def _dp_tag_suffix(unit: Any, reproducible_noise_not_private: Any, accountant: Any = "rdp") -> str:
    """Run-name suffix of a DP run: "-spk" for speaker-level DP, "-prv" when sigma is calibrated with the PRV
    accountant (a smaller sigma for the same epsilon than RDP's), "-NOTPRIVATE" for reproducible noise, so such a
    run never shares a directory with (or is mistaken for) a private utterance-level RDP-calibrated run."""
    suffix = "-spk" if str(unit) == "speaker" else ""
    if str(accountant) == "prv":
        suffix += "-prv"
    if _truthy(reproducible_noise_not_private):
        suffix += "-NOTPRIVATE"
    return suffix


def _noise_tag(granularity: Any, segment_frames: Any) -> str:
    """Run-name suffix for the masks' noise granularity: empty for frame noise (the original
    run names stay valid), "-utt" for utterance noise, "-seg<N>" for segments of N frames."""
    if str(granularity) == "utterance":
        return "-utt"
    if str(granularity) == "segment":
        return f"-seg{segment_frames}"
    return ""


def _privacy_terms_tag(contrastive: Any, projection: Any, negatives: Any, adversary_weight: Any,
                       adversary_input: Any, noise_weight: Any) -> str:
    """Run-name part for the privacy terms beyond loss.tag; "none" (dropped) at their defaults."""
    parts = []
    if _truthy(contrastive):
        if str(projection) != "learned":
            parts.append(f"p{projection}")
        if str(negatives) != "clean":
            parts.append(f"n{negatives}")
    if float(adversary_weight) > 0:
        parts.append(f"adv{adversary_weight}" + ("" if str(adversary_input) == "fused" else f"{adversary_input}"))
    if float(noise_weight) > 0:
        parts.append(f"nw{noise_weight}")
    return "-".join(parts) if parts else "none"


def _anonymize_tag(method: Any, alpha: Any) -> str:
    """Run-name part for data.anonymize: "none" (dropped) when off, "mcadams0.8" otherwise."""
    if str(method) == "none":
        return "none"
    return f"{method}{alpha}" if str(method) == "mcadams" else str(method)


def _compression_tag(name: Any, topk_fraction: Any = 0.05, topk_value_bits: Any = 16, error_feedback: Any = True,
                     keep_biases: Any = False) -> str:
    """The compression in a run name: "none", "int8", "topk" (5 %, fp16 values, error feedback: the name every
    top-k run had before these were in the name), else e.g. "topk0.18-v8" / "topk0.18-v8-noef" / "topk-bias", so
    top-k runs at another fraction, value width, without error feedback or with biases in full never share a
    directory."""
    if str(name) != "topk":
        return str(name)
    tag = "topk" if float(topk_fraction) == 0.05 else f"topk{float(topk_fraction):g}"
    return (tag + ("" if int(topk_value_bits) == 16 else f"-v{int(topk_value_bits)}") + ("" if _truthy(error_feedback) else "-noef")
            + ("-bias" if _truthy(keep_biases) else ""))




def _budget_tag(family: Any, rounds: Any, local_steps: Any, local_epochs: Any, cohort_sampling: Any = "fixed",
                cohort_rate: Any = 1.0) -> str:
    """The Wav2Vec2 variant's step budget in its run name ("b10x20": rounds x local steps; the centralised
    baseline makes the same total; "b20x3q0.5" with Poisson cohorts of rate 0.5), so runs with other budgets
    never share a directory; "none" otherwise."""
    if str(family) != "wav2vec2":
        return "none"
    per_round = f"{local_steps}" if local_steps not in (None, 0) else f"e{local_epochs}"
    cohort = f"q{float(cohort_rate):g}" if str(cohort_sampling) == "poisson" else ""
    return f"b{rounds}x{per_round}{cohort}"


def _server_opt_tag(server_lr: Any, momentum: Any) -> str:
    """Run-name part of the Poisson-cohort FedAvg server optimiser: "" for plain FedAvg (lr 1, no momentum),
    "-slr3" / "-slr1m0.9" otherwise, so runs with another server optimiser never share a directory."""
    if float(server_lr) == 1.0 and float(momentum) == 0.0:
        return ""
    return f"-slr{float(server_lr):g}" + (f"m{float(momentum):g}" if float(momentum) else "")


def _server_adam_tag(beta1: Any, beta2: Any, tau: Any) -> str:
    """Run-name part of fedadam's moment decays and tau: "" at the defaults (0.9, 0.99, 1e-3, Flower's), else
    "-b0.9-0.999-tau1e-08", so server-Adam runs with other moments never share a directory."""
    if (float(beta1), float(beta2), float(tau)) == (0.9, 0.99, 1.0e-3):
        return ""
    return f"-b{float(beta1):g}-{float(beta2):g}-tau{float(tau):g}"


def _client_opt_tag(local_optimizer: Any, lr: Any) -> str:
    """Run-name part of a federated client's optimiser: "" for the default (Adam), "-sgd0.5" for plain SGD at lr 0.5.
    (Adam clients at another trainer.lr still need run_name=; the stage fingerprint refuses silent reuse.)"""
    return "" if str(local_optimizer) == "adam" else f"-{local_optimizer}{float(lr):g}"


def _optimizer_reset_tag(every: Any, lr_decay: Any = "none", ema: Any = 0.0) -> str:
    """Run-name tag of the centralised baseline (federated=none): "none" (dropped from the name) with one optimiser at a
    constant lr, "optreset5" when it is re-created every 5 steps, "lindecay" with federated.lr_decay=linear, "ema0.99"
    with federated.ema=0.99 (together: "optreset5-lindecay-ema0.99"), so these runs never share the baseline's directory."""
    parts = ([] if every in (None, 0, "0") else [f"optreset{every}"]) + [
        tag[1:] for tag in (_lr_decay_tag(lr_decay), _ema_tag(ema)) if tag]
    return "-".join(parts) if parts else "none"


def _lr_decay_tag(lr_decay: Any) -> str:
    """Run-name part of the run's own lr schedule: "" when constant, "-lindecay" when linear."""
    return "" if str(lr_decay) == "none" else f"-{str(lr_decay)[:3]}decay"


def _number_option_tag(prefix: str, value: Any) -> str:
    """Run-name part of a numeric option that is off at 0: "" when off, "-<prefix><value>" otherwise."""
    return "" if float(value) == 0 else f"-{prefix}{float(value):g}"


def _ema_tag(decay: Any) -> str:
    """Run-name part of the run's iterate average: "" when off, "-ema0.9" with federated.ema=0.9."""
    return _number_option_tag("ema", decay)


def _adam_bc_tag(rho: Any) -> str:
    """Run-name part of the server Adam's noise-debiased second moment: "" when off, "-bc0.3" with federated.server_adam_bc=0.3."""
    return _number_option_tag("bc", rho)


def _shrink_tag(kappa: Any) -> str:
    """Run-name part of the server step's noise shrinkage: "" when off, "-shrink1" with federated.server_shrink=1."""
    return _number_option_tag("shrink", kappa)


def _public_subspace_tag(dim: Any, refresh: Any) -> str:
    """Run-name part of the public-gradient subspace: "" when off, "-pub64" (basis every round), "-pub64r5" (every 5th)."""
    if int(dim) == 0:
        return ""
    return f"-pub{int(dim)}" + ("" if int(refresh) == 1 else f"r{int(refresh)}")


def _app_config_groups() -> str:
    """`--help`'s list of config groups, from conf/ itself: every group a user can choose
    (`group=option`), without Hydra's own and the internal `schema` group."""
    conf = PROJECT_ROOT / "conf"
    lines = []
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and p.name not in ("hydra", "schema")):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options:
            lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


def _entry_help(app_name: str) -> str:
    """The --help header: the entry script's own docstring (Hydra's template treats `$` as a placeholder)."""
    import sys

    doc = getattr(sys.modules.get("__main__"), "__doc__", None)
    text = doc.strip() + "\n" if doc else f"{app_name} is powered by Hydra.\n"
    return text.replace("$", "$$")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=schema)
    if not OmegaConf.has_resolver("run_tags"):
        OmegaConf.register_new_resolver("run_tags", _run_tags)
    if not OmegaConf.has_resolver("dp_tag_suffix"):
        OmegaConf.register_new_resolver("dp_tag_suffix", _dp_tag_suffix)
    if not OmegaConf.has_resolver("noise_tag"):
        OmegaConf.register_new_resolver("noise_tag", _noise_tag)
    if not OmegaConf.has_resolver("privacy_terms_tag"):
        OmegaConf.register_new_resolver("privacy_terms_tag", _privacy_terms_tag)
    if not OmegaConf.has_resolver("anonymize_tag"):
        OmegaConf.register_new_resolver("anonymize_tag", _anonymize_tag)
    if not OmegaConf.has_resolver("compression_tag"):
        OmegaConf.register_new_resolver("compression_tag", _compression_tag)
    if not OmegaConf.has_resolver("budget_tag"):
        OmegaConf.register_new_resolver("budget_tag", _budget_tag)
    if not OmegaConf.has_resolver("server_opt_tag"):
        OmegaConf.register_new_resolver("server_opt_tag", _server_opt_tag)
    if not OmegaConf.has_resolver("server_adam_tag"):
        OmegaConf.register_new_resolver("server_adam_tag", _server_adam_tag)
    if not OmegaConf.has_resolver("client_opt_tag"):
        OmegaConf.register_new_resolver("client_opt_tag", _client_opt_tag)
    if not OmegaConf.has_resolver("lr_decay_tag"):
        OmegaConf.register_new_resolver("lr_decay_tag", _lr_decay_tag)
    if not OmegaConf.has_resolver("ema_tag"):
        OmegaConf.register_new_resolver("ema_tag", _ema_tag)
    if not OmegaConf.has_resolver("adam_bc_tag"):
        OmegaConf.register_new_resolver("adam_bc_tag", _adam_bc_tag)
    if not OmegaConf.has_resolver("shrink_tag"):
        OmegaConf.register_new_resolver("shrink_tag", _shrink_tag)
    if not OmegaConf.has_resolver("public_subspace_tag"):
        OmegaConf.register_new_resolver("public_subspace_tag", _public_subspace_tag)
    if not OmegaConf.has_resolver("optimizer_reset_tag"):
        OmegaConf.register_new_resolver("optimizer_reset_tag", _optimizer_reset_tag)
    if not OmegaConf.has_resolver("app_config_groups"):
        OmegaConf.register_new_resolver("app_config_groups", _app_config_groups)
    if not OmegaConf.has_resolver("entry_help"):
        OmegaConf.register_new_resolver("entry_help", _entry_help)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


register()
