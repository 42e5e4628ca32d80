"""Wav2Vec2 CTC models for the federated + differentially-private variant.

Plain code around Hugging Face ``transformers`` (5.x): no Hydra, no Flower.

* :func:`wav2vec2_tiny_config` / :func:`build_wav2vec2_ctc`: a CPU-sized
  ``Wav2Vec2ForCTC`` (hidden 128, 4 pre-LN layers, 4 heads, FFN 512, a 7-layer
  conv feature encoder with 64 channels, same 320x down-sampling as wav2vec2-base,
  so one output frame is 20 ms; weights initialised with std 0.1, see the config
  for why), or wav2vec2-base loaded from a LOCAL Hugging Face
  checkpoint directory (nothing is ever downloaded). The conv feature encoder is
  always frozen for CTC fine-tuning, as in the wav2vec 2.0 paper.
* :func:`pretrain_wav2vec2_tiny`: self-supervised pre-training of the tiny model
  with ``Wav2Vec2ForPreTraining`` (contrastive loss over Gumbel-quantised
  targets + codebook diversity loss) on public audio, saved with
  ``save_pretrained`` so that ``build_wav2vec2_ctc(..., checkpoint_dir=...)``
  starts from it.
* :func:`make_dp_compatible`: makes the CTC model trainable by Opacus.

Opacus compatibility: what is done and why
------------------------------------------
Opacus computes per-sample gradients with a sampler per layer type (Linear,
Conv1d incl. groups, LayerNorm, GroupNorm, Embedding, ...). Three things in
``Wav2Vec2ForCTC`` break that:

1. ``encoder.pos_conv_embed.conv`` is weight-normalised with
   ``torch.nn.utils.parametrizations.weight_norm`` (a ``ParametrizationList``
   with ``original0``/``original1`` = g/v). Opacus has no sampler for it and
   rejects the module (opacus issue #646). We *fold* the parametrisation:
   ``remove_parametrizations(conv, "weight", leave_parametrized=True)`` stores
   the current effective weight ``g * v / ||v||`` as a plain ``Conv1d.weight``.
   The forward function is unchanged (tested), and the conv becomes an ordinary
   grouped Conv1d that Opacus can clip per sample, so it can keep training
   (``train_positional_conv=True``). Folding rather than freezing keeps the
   relative-position layer adaptable; only the weight-norm re-parametrisation of
   its optimisation is lost. (Old-style ``weight_g``/``weight_v`` hooks from
   ``torch.nn.utils.weight_norm`` are folded too, with ``remove_weight_norm``.)
   NOTE: a folded model's state dict has ``conv.weight`` instead of
   ``conv.parametrizations.weight.original0/1``; server and clients of a
   federation must therefore both call :func:`make_dp_compatible` (or
   :func:`fold_positional_conv_weight_norm`) so their state dicts match.
2. ``Wav2Vec2Model.masked_spec_embed`` is a bare ``nn.Parameter`` owned by a
   module that has no per-sample sampler (and it only enters the graph through
   an in-place masked assignment); a trainable one makes Opacus' GradSampleModule
   skip/complain. It is frozen (SpecAugment still uses its current value).
3. With the feature projection trainable, Opacus' backward hooks wrap its
   output, and wav2vec2 writes SpecAugment masks / padding zeros *in place*
   into that tensor, which autograd forbids ("Output 0 of BackwardHookFunction
   is a view and is being modified inplace"). A forward hook returns a copy of
   the projected features instead (SpecAugment stays on).
4. Parameters that get no gradient in a step have no ``grad_sample`` and Opacus
   fails with "Per sample gradient is not initialized". The frozen conv feature
   encoder is therefore frozen for good, and ``config.layerdrop`` is set to 0
   (LayerDrop would randomly leave whole layers without gradients).

What trains under DP (default ``trainable_layers=None``): feature projection
(LayerNorm + Linear), the folded positional conv, all transformer layers, the
encoder LayerNorm and ``lm_head``. With ``trainable_layers=k`` only the top k
transformer layers + ``lm_head`` train (cheaper per-sample gradients, fewer
dimensions to add noise to: the usual trade-off under DP). The returned
:class:`DPCompatibilityReport` says how many parameters train.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from common.progress import progress_line

log = logging.getLogger(__name__)

MODEL_SIZES = ("tiny", "base")


# --------------------------------------------------------------------------- config
def wav2vec2_tiny_config(vocab_size: int, blank_id: int = 0, **overrides) -> Wav2Vec2Config:
    """A CPU-sized wav2vec2 configuration (about 1 M parameters).

    ``blank_id`` is the CTC blank (HF uses ``pad_token_id`` as the blank).
    ``overrides`` are passed to ``Wav2Vec2Config`` (e.g. ``hidden_dropout=0``).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (blank + at least one token), got {vocab_size}")
    if not 0 <= blank_id < vocab_size:
        raise ValueError(f"blank_id must be in [0, vocab_size={vocab_size}), got {blank_id}")
    kwargs = dict(
        vocab_size=vocab_size,
        pad_token_id=blank_id,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        # same kernels/strides as wav2vec2-base (320x down-sampling, 20 ms frames), 64 channels instead of 512
        conv_dim=(64,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        feat_extract_norm="group",
        # pre-LN ("stable layer norm", as in wav2vec2-large-lv60): with post-LN the tiny model stayed on
        # the CTC blank/unigram plateau for 1500 steps on SynthGRID; pre-LN leaves it after ~300
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=8,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.1,
        layerdrop=0.0,
        # BERT's 0.02 init is sized for hidden 768; at hidden 128 the attention and FFN branches start so
        # small that the model could not even memorise 8 utterances in 150 steps; with 0.1 it does in ~75
        initializer_range=0.1,
        # SpecAugment during CTC fine-tuning (pre-training sets its own, larger mask probability)
        mask_time_prob=0.05,
        mask_time_length=5,
        # quantiser / contrastive head for pre-training, scaled down from base (2 x 320 codes, 100 negatives)
        num_codevector_groups=2,
        num_codevectors_per_group=32,
        codevector_dim=64,
        proj_codevector_dim=64,
        num_negatives=20,
        diversity_loss_weight=0.1,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
    )
    kwargs.update(overrides)
    return Wav2Vec2Config(**kwargs)


def _check_checkpoint_dir(checkpoint_dir: Union[str, Path], what: str) -> Path:
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: checkpoint directory {str(path)!r} does not exist. Expected a local Hugging Face "
            f"checkpoint directory (config.json + model.safetensors or pytorch_model.bin), e.g. one written by "
            f"save_pretrained / pretrain_wav2vec2_tiny; nothing is downloaded at run time."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: {str(path / 'config.json')!r} is missing; {str(path)!r} is not a Hugging Face checkpoint directory"
        )
    if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise FileNotFoundError(
            f"{what}: no weights in {str(path)!r} (expected model.safetensors or pytorch_model.bin)"
        )
    return path


def build_wav2vec2_ctc(
    vocab_size: int,
    size: str = "tiny",
    checkpoint_dir: Optional[Union[str, Path]] = None,
    blank_id: int = 0,
    **config_overrides,
) -> Wav2Vec2ForCTC:
    """A ``Wav2Vec2ForCTC`` with a fresh ``lm_head`` of ``vocab_size`` outputs and a frozen feature encoder.

    size="tiny": built from :func:`wav2vec2_tiny_config`; if ``checkpoint_dir`` is given, the
    wav2vec2 body is initialised from that local directory (e.g. written by
    :func:`pretrain_wav2vec2_tiny`).
    size="base": ``checkpoint_dir`` is required (a local wav2vec2-base HF directory).

    Forward: ``model(input_values=(B, T_samples) float, attention_mask=(B, T_samples) long,
    labels=(B, L) long padded with -100)`` -> ``.logits (B, T_frames, vocab_size)``, ``.loss``.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {MODEL_SIZES}, got {size!r}")
    ctc_settings = dict(
        vocab_size=vocab_size, pad_token_id=blank_id, ctc_loss_reduction="mean", ctc_zero_infinity=True
    )
    if size == "base" and checkpoint_dir is None:
        raise ValueError(
            "build_wav2vec2_ctc(size='base') needs checkpoint_dir: a local Hugging Face wav2vec2-base directory "
            "(model.checkpoint in the config); nothing is downloaded at run time"
        )
    if checkpoint_dir is None:
        model = Wav2Vec2ForCTC(wav2vec2_tiny_config(vocab_size, blank_id=blank_id, **config_overrides))
    else:
        path = _check_checkpoint_dir(checkpoint_dir, f"wav2vec2 {size}")
        # the checkpoint may be a pre-training one (no lm_head) or a CTC one with another vocabulary:
        # the body loads, lm_head is (re)initialised for this vocabulary
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its UNEXPECTED / MISSING key table is expected here: one line below instead
        try:
            model, info = Wav2Vec2ForCTC.from_pretrained(
                str(path), local_files_only=True, ignore_mismatched_sizes=True, output_loading_info=True,
                **ctc_settings, **config_overrides,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        _report_loading(path, info)
        if POS_CONV_PLAIN_WEIGHT in info["unexpected_keys"]:
            # saved after make_dp_compatible: transformers would silently re-initialise the weight-normed conv
            fold_positional_conv_weight_norm(model)
            weight = _read_checkpoint_tensor(path, POS_CONV_PLAIN_WEIGHT)
            with torch.no_grad():
                model.wav2vec2.encoder.pos_conv_embed.conv.weight.copy_(weight)
    model.freeze_feature_encoder()
    return model


# Keys a pre-training checkpoint has and Wav2Vec2ForCTC does not (quantizer, projections), and
# the CTC head a pre-training checkpoint lacks: expected when fine-tuning from it.
PRETRAINING_ONLY_PREFIXES = ("quantizer.", "project_q.", "project_hid.")
CTC_HEAD_PREFIX = "lm_head."


def _report_loading(path: Path, info: dict) -> None:
    """One line for the expected differences between a checkpoint and Wav2Vec2ForCTC; a warning
    naming any other missing / unexpected / resized tensor."""
    unexpected = [k for k in info.get("unexpected_keys", []) if k != POS_CONV_PLAIN_WEIGHT]
    missing = list(info.get("missing_keys", []))
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", [])]
    odd_unexpected = [k for k in unexpected if not k.startswith(PRETRAINING_ONLY_PREFIXES)]
    odd_missing = [k for k in missing + mismatched if not k.startswith(CTC_HEAD_PREFIX) and not k.startswith(POS_CONV_PREFIX)]
    log.info("wav2vec2 from %s: encoder loaded; %d pre-training-only tensors unused (quantizer, projections), "
             "CTC head new for this vocabulary (%d tensors)", path, len(unexpected) - len(odd_unexpected),
             len(missing) + len(mismatched) - len(odd_missing))
    if odd_unexpected or odd_missing:
        log.warning("wav2vec2 from %s: unexpected tensors %s, missing or resized %s", path, odd_unexpected, odd_missing)


POS_CONV_PREFIX = "wav2vec2.encoder.pos_conv_embed.conv."
POS_CONV_PLAIN_WEIGHT = POS_CONV_PREFIX + "weight"
POS_CONV_WEIGHT_G = POS_CONV_PREFIX + "parametrizations.weight.original0"
POS_CONV_WEIGHT_V = POS_CONV_PREFIX + "parametrizations.weight.original1"


def _read_checkpoint_tensor(path: Path, key: str) -> torch.Tensor:
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return f.get_tensor(key)
    from models.avhubert_checkpoint import load_torch_file

    return load_torch_file(path / "pytorch_model.bin", str(path / "pytorch_model.bin"))[key]


def match_pos_conv_format(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert the positional-conv keys of a state dict to the format of `model`.

    A model folded by :func:`make_dp_compatible` has ``...conv.weight``; an unfolded
    one has ``...conv.parametrizations.weight.original0/1`` (weight-norm g, v).
    Federated code that moves state dicts between folded and unfolded models calls
    this before ``load_state_dict``. Folded -> unfolded uses g = ||w|| (over all but
    dim 2), v = w, which gives the same effective weight.
    """
    model_keys = set(model.state_dict())
    out = dict(state_dict)
    if POS_CONV_PLAIN_WEIGHT in model_keys and POS_CONV_WEIGHT_V in out:
        g, v = out.pop(POS_CONV_WEIGHT_G), out.pop(POS_CONV_WEIGHT_V)
        out[POS_CONV_PLAIN_WEIGHT] = torch._weight_norm(v, g, 2)
    elif POS_CONV_WEIGHT_V in model_keys and POS_CONV_PLAIN_WEIGHT in out:
        w = out.pop(POS_CONV_PLAIN_WEIGHT)
        out[POS_CONV_WEIGHT_V] = w
        out[POS_CONV_WEIGHT_G] = torch.linalg.vector_norm(w, dim=(0, 1), keepdim=True)
    return out


# --------------------------------------------------------------------------- Opacus
@dataclass
class DPCompatibilityReport:
    trainable_params: int
    total_params: int
    trainable_modules: list[str] = field(default_factory=list)
    folded_weight_norm: bool = False

    def __str__(self) -> str:
        return (
            f"{self.trainable_params:,} of {self.total_params:,} parameters trainable "
            f"({100.0 * self.trainable_params / max(self.total_params, 1):.1f}%) in {', '.join(self.trainable_modules)}"
        )


def _wav2vec2_body(model: nn.Module) -> nn.Module:
    body = getattr(model, "wav2vec2", None)
    if body is None:
        raise TypeError(f"expected a Wav2Vec2ForCTC/Wav2Vec2ForPreTraining (with .wav2vec2), got {type(model).__name__}")
    return body


def fold_positional_conv_weight_norm(model: nn.Module) -> bool:
    """Replace the weight-norm parametrisation of ``pos_conv_embed.conv`` by its current plain weight.

    Returns True if something was folded (idempotent: False the second time).
    """
    conv = _wav2vec2_body(model).encoder.pos_conv_embed.conv
    if torch.nn.utils.parametrize.is_parametrized(conv, "weight"):
        torch.nn.utils.parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        return True
    if hasattr(conv, "weight_g") and hasattr(conv, "weight_v"):  # legacy torch.nn.utils.weight_norm hook
        torch.nn.utils.remove_weight_norm(conv)
        return True
    return False


def _clone_projected_features(module, args, output):
    # SpecAugment and padding masking write in place into the projected features; when Opacus
    # hooks the projection, that tensor is the output of a backward-hook Function and autograd
    # forbids in-place writes on it. A copy is cheap (B x T x hidden) and keeps the graph valid.
    hidden_states, norm_hidden_states = output
    return hidden_states.clone(), norm_hidden_states


def make_dp_compatible(
    model: Wav2Vec2ForCTC,
    trainable_layers: Optional[int] = None,
    train_positional_conv: bool = True,
) -> DPCompatibilityReport:
    """Prepare a Wav2Vec2ForCTC for Opacus in place (see the module docstring for why)."""
    body = _wav2vec2_body(model)
    folded = fold_positional_conv_weight_norm(model)
    model.config.layerdrop = 0.0
    if not getattr(body.feature_projection, "_dp_output_cloned", False):
        body.feature_projection.register_forward_hook(_clone_projected_features)
        body.feature_projection._dp_output_cloned = True
    model.freeze_feature_encoder()
    if getattr(body, "masked_spec_embed", None) is not None:
        body.masked_spec_embed.requires_grad_(False)

    layers = body.encoder.layers
    if trainable_layers is None:
        trainable = {"wav2vec2.feature_projection", "wav2vec2.encoder.layer_norm", "wav2vec2.encoder.layers", "lm_head"}
        if train_positional_conv:
            trainable.add("wav2vec2.encoder.pos_conv_embed")
    else:
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
        trainable = {"lm_head"} | {f"wav2vec2.encoder.layers.{i}" for i in range(len(layers) - trainable_layers, len(layers))}
    if getattr(body, "adapter", None) is not None:
        trainable.add("wav2vec2.adapter")

    def is_trainable(param_name: str) -> bool:
        return any(param_name == prefix or param_name.startswith(prefix + ".") for prefix in trainable)

    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name))

    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = DPCompatibilityReport(n_trainable, total, sorted(trainable), folded)
    log.info("make_dp_compatible: %s", report)
    return report


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- pre-training
def _as_waveform_batch(batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Accept (B, T) tensors, (waveforms, attention_mask) tuples or dicts with input_values."""
    if isinstance(batch, torch.Tensor):
        waveforms, attention_mask = batch, None
    elif isinstance(batch, dict):
        if "input_values" not in batch:
            raise KeyError(f"pre-training batch dict needs 'input_values', got keys {sorted(batch)}")
        waveforms, attention_mask = batch["input_values"], batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        waveforms = batch[0]
        attention_mask = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    else:
        raise TypeError(f"pre-training batch must be a (B, T) tensor, a tuple or a dict, got {type(batch).__name__}")
    if waveforms.dim() != 2:
        raise ValueError(f"pre-training waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
    return waveforms.float(), attention_mask


def _cycle(iterable: Iterable) -> Iterator:
    while True:
        empty = True
        for item in iterable:
            empty = False
            yield item
        if empty:
            raise ValueError("pre-training data loader yielded no batches")


def pretraining_loss(
    model: Wav2Vec2ForPreTraining,
    waveforms: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    mask_prob: float = 0.65,
    mask_length: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """wav2vec 2.0 loss per masked frame: (contrastive + alpha * diversity) / #masked.

    Masks and negatives come from numpy's global RNG (that is how transformers draws them);
    seed it (``np.random.seed``) for reproducibility.
    """
    config = model.config
    mask_length = config.mask_time_length if mask_length is None else mask_length
    batch_size, num_samples = waveforms.shape
    num_frames = int(model._get_feat_extract_output_lengths(num_samples))
    if num_frames <= mask_length:
        raise ValueError(
            f"waveforms of {num_samples} samples give {num_frames} frames, too short for mask_length={mask_length}"
        )
    frame_mask = None
    if attention_mask is not None:
        frame_mask = model._get_feature_vector_attention_mask(num_frames, attention_mask)
    mask_time_indices = _compute_mask_indices(
        (batch_size, num_frames), mask_prob=mask_prob, mask_length=mask_length, attention_mask=frame_mask, min_masks=2
    )
    # negatives are drawn among the valid (unpadded) frames only
    negative_pool = frame_mask.cpu().numpy().astype(bool) if frame_mask is not None else None
    sampled_negative_indices = _sample_negative_indices(
        (batch_size, num_frames), config.num_negatives, mask_time_indices=negative_pool
    )
    mask_time_indices = torch.as_tensor(mask_time_indices, dtype=torch.bool, device=waveforms.device)
    sampled_negative_indices = torch.as_tensor(sampled_negative_indices, dtype=torch.long, device=waveforms.device)
    out = model(
        waveforms,
        attention_mask=attention_mask,
        mask_time_indices=mask_time_indices,
        sampled_negative_indices=sampled_negative_indices,
    )
    num_masked = mask_time_indices.sum().clamp(min=1)
    loss = out.loss / num_masked
    stats = {
        "loss": float(loss.detach()),
        "contrastive": float(out.contrastive_loss.detach() / num_masked),
        "diversity": float(out.diversity_loss.detach() / num_masked),
        "perplexity": float(out.codevector_perplexity.detach()),
    }
    return loss, stats


def pretrain_wav2vec2_tiny(
    dataloader_of_waveforms: Iterable,
    steps: int,
    out_dir: Union[str, Path, None],
    config: Optional[Wav2Vec2Config] = None,
    lr: float = 5e-4,
    warmup_steps: Optional[int] = None,
    max_grad_norm: float = 5.0,
    gumbel_temperature: tuple[float, float] = (2.0, 0.5),
    mask_prob: float = 0.65,
    mask_length: Optional[int] = None,
    seed: int = 0,
    log_every: int = 50,
    model: Optional[Wav2Vec2ForPreTraining] = None,
    device: Optional[torch.device] = None,
    on_log: Optional[Callable[[int, float], None]] = None,
) -> tuple[Wav2Vec2ForPreTraining, list[float]]:
    """Self-supervised wav2vec 2.0 pre-training of the tiny model; returns (model, per-step losses).

    ``dataloader_of_waveforms`` yields (B, T) float waveforms (16 kHz, normalised), or
    (waveforms, attention_mask) tuples, or dicts with ``input_values`` [+ ``attention_mask``];
    it is cycled until ``steps`` updates are done. The feature encoder trains here (it is
    frozen only for CTC fine-tuning). The Gumbel temperature decays geometrically from
    ``gumbel_temperature[0]`` to ``[1]``. If ``out_dir`` is given, the model is saved there
    with ``save_pretrained`` (config.json + model.safetensors).
    Seeds torch and numpy's global RNG (transformers' mask/negative sampling uses it).
    ``device``: where the model trains and the batches go (default: where the model is).
    ``on_log(steps done, mean loss since the last call)``: every ``log_every`` steps and after the
    last one, as training goes (a live run log).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    if model is None:
        model = Wav2Vec2ForPreTraining(config if config is not None else wav2vec2_tiny_config(vocab_size=32))
    if device is not None:
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    t_start, t_end = gumbel_temperature
    losses: list[float] = []
    batches = _cycle(dataloader_of_waveforms)
    t0 = time.perf_counter()
    for step in range(steps):
        model.set_gumbel_temperature(t_start * (t_end / t_start) ** (step / max(1, steps - 1)))
        waveforms, attention_mask = _as_waveform_batch(next(batches))
        waveforms = waveforms.to(params[0].device, non_blocking=True)
        attention_mask = attention_mask.to(params[0].device, non_blocking=True) if attention_mask is not None else None
        loss, stats = pretraining_loss(model, waveforms, attention_mask, mask_prob=mask_prob, mask_length=mask_length)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"pre-training loss is {stats['loss']} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(stats["loss"])
        if on_log is not None and ((step + 1) % max(1, log_every) == 0 or step == steps - 1):
            on_log(step + 1, float(np.mean(losses[(step // max(1, log_every)) * max(1, log_every):])))
        if log_every and (step == 0 or (step + 1) % log_every == 0 or step == steps - 1):  # the log rows' steps, and the first
            log.info("%s", progress_line("wav2vec2 pretrain step", step + 1, steps, time.perf_counter() - t0, unit="step",
                                         extra=" ".join(f"{k} {v:.4g}" for k, v in stats.items())))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
    return model, losses
