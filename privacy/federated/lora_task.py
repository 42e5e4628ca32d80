"""The federated task for PRIVATE fine-tuning of the public Wav2Vec2 start: LoRA + CTC head on cached features.

``run_config["task"] = "privacy.federated.lora_task:wav2vec2_lora_task"`` (the Hydra side selects it with
``adapter=lora``). What it trains (models/wav2vec2_lora.py): LoRA adapters on the top
``task-trainable-layers`` encoder layer(s) of the public start (``task-checkpoint``, a
:func:`models.wav2vec2_lora.save_wav2vec2_ctc` file) and its CTC head; the encoder below is frozen,
so its output is computed once per utterance and cached (in memory, and on disk next to the corpus,
``<data dir>/feature_cache/``, keyed by the checkpoint's sha256 and the split) and a step costs
milliseconds.

Clients, data and evaluation follow privacy/federated/synthgrid_task.py (whole speakers per client,
``partition_by_speaker``; with ``num-clients`` = number of training speakers every client is one
speaker); a batch is a dict of tensors: ``hidden (B, T, H)`` zero-padded cached features,
``lengths (B,)`` frames, ``labels (B, L)`` word ids padded with -100. The tokenizer is the checkpoint's
vocabulary (blank first), so the head's outputs keep their meaning.

Run-config keys read here: those of synthgrid_task (``task-data-dir``, ``task-checkpoint``,
``task-train-split``, ``task-client-eval-utterances``, ``task-trainable-layers``, ``task-eval-batch-size``)
plus ``task-lora-rank``, ``task-lora-alpha``, ``task-lora-targets`` (comma-separated) and
``task-lora-dropout``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from common.files import file_sha256
from privacy.federated.synthgrid_task import (
    LABEL_PAD,
    SynthGridTask,
    load_split_without_audio,
    iter_split_waveforms,
    speaker_split_loaders,
    task_settings,
)

log = logging.getLogger(__name__)

TASK_REFERENCE = "privacy.federated.lora_task:wav2vec2_lora_task"
FEATURE_CACHE_DIR = "feature_cache"

_BASE_CACHE: dict[tuple[str, float], tuple[nn.Module, list[str], str]] = {}
_FEATURE_CACHE: dict[tuple[str, str, str, int], list[torch.Tensor]] = {}


def load_public_start(checkpoint: str | Path) -> tuple[nn.Module, list[str], str]:
    """(Wav2Vec2ForCTC, vocabulary, sha256) of the public start, read once per process."""
    from models.wav2vec2_lora import load_wav2vec2_ctc

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"task-checkpoint={str(checkpoint)!r}: the public Wav2Vec2 start is not there "
                                f"(build it with `make checkpoints`; see training/wav2vec2/public_start.py)")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _BASE_CACHE:
        model, vocabulary, _ = load_wav2vec2_ctc(path)
        _BASE_CACHE[key] = (model, vocabulary, file_sha256(path))
    return _BASE_CACHE[key]


def cached_features(base: nn.Module, checksum: str, data_dir: str | Path, split: str, first_layer: int) -> list[torch.Tensor]:
    """Input of encoder layer `first_layer` for every utterance of `split` (manifest order), computed once."""
    from common.files import atomic_write_bytes
    from models.wav2vec2_lora import encode_below

    key = (checksum, str(Path(data_dir).resolve()), split, int(first_layer))
    if key in _FEATURE_CACHE:
        return _FEATURE_CACHE[key]
    # the audio is read only to compute features the disk cache lacks, and not kept (load_split_without_audio)
    _, _, num_samples, _ = load_split_without_audio(data_dir, split)
    path = Path(data_dir) / FEATURE_CACHE_DIR / f"{checksum[:16]}_{split}_layer{first_layer}.pt"
    features = None
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, list) and len(saved) == len(num_samples) and all(
                f.shape[0] == base._get_feat_extract_output_lengths(n) for f, n in zip(saved, num_samples)):
            features = saved
        else:
            log.warning("%s does not match split %s of %s (%d utterances); recomputing it", path, split, data_dir, len(num_samples))
    if features is None:
        import time

        from common.progress import Progress

        t0 = time.time()
        bar = Progress(total=len(num_samples), desc=f"encoding {split} below layer {first_layer}", unit="utt",
                       every=max(1, len(num_samples) // 10), seconds=60.0)
        features = []
        with torch.inference_mode():  # one waveform at a time: only the (smaller) features are kept
            for wave in iter_split_waveforms(data_dir, split):
                features.append(encode_below(base, wave, first_layer))
                bar.update()
        bar.close()
        buffer = io.BytesIO()
        torch.save(features, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        log.info("cached the frozen encoder's output (layer %d input) for %d utterances of %s in %.1f s -> %s",
                 first_layer, len(features), split, time.time() - t0, path)
    _FEATURE_CACHE[key] = features
    return features


def collate_cached(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """-> hidden (B, T, H) zero-padded, lengths (B,), labels (B, L) padded with -100."""
    frames = max(int(f.shape[0]) for f, _ in items)
    label_len = max(int(t.shape[0]) for _, t in items)
    hidden = torch.zeros(len(items), frames, items[0][0].shape[1])
    lengths = torch.zeros(len(items), dtype=torch.long)
    labels = torch.full((len(items), label_len), LABEL_PAD, dtype=torch.long)
    for i, (f, t) in enumerate(items):
        hidden[i, : f.shape[0]] = f
        lengths[i] = f.shape[0]
        labels[i, : t.shape[0]] = t
    return {"hidden": hidden, "lengths": lengths, "labels": labels}


def _empty(batch: Any) -> bool:
    # Opacus' Poisson loader builds an empty batch as a list of empty tensors
    return not isinstance(batch, Mapping) or batch["hidden"].shape[0] == 0


@torch.no_grad()
def decode_cached(model: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer) -> tuple[list[str], list[str], float]:
    from data.ctc_decode import ctc_greedy_decode
    from models.wav2vec2_lora import ctc_loss_on_cached

    logits = model(batch["hidden"], batch["lengths"])
    hyps = ctc_greedy_decode(logits.log_softmax(-1), batch["lengths"], tokenizer)
    refs = [tokenizer.decode([int(i) for i in row if i >= 0]) for row in batch["labels"]]
    loss = ctc_loss_on_cached(model, batch["hidden"], batch["lengths"], batch["labels"], tokenizer.blank_id)
    return refs, hyps, float(loss)


_TASKS: dict[tuple, SynthGridTask] = {}
_TOPS: dict[tuple, nn.Module] = {}


def wav2vec2_lora_task(run_config: Mapping[str, Any]) -> SynthGridTask:
    """The FederatedTask factory named in run_config['task'] (see the module docstring); one per
    configuration and process (every client message asks for it)."""
    key = tuple(sorted((k, v) for k, v in run_config.items() if k.startswith("task-") or k in ("seed", "batch-size")))
    if key not in _TASKS:
        _TASKS[key] = _build_task(run_config)
    return _TASKS[key]


def _build_task(run_config: Mapping[str, Any]) -> SynthGridTask:
    from data.tokenizer import BLANK, WordTokenizer
    from models.wav2vec2_lora import CachedTopCTC, add_lora, ctc_loss_on_cached

    cfg = task_settings(run_config)
    seed = int(run_config.get("seed", 0))
    data_dir = str(cfg["task-data-dir"])
    base, vocabulary, checksum = load_public_start(str(cfg["task-checkpoint"]))
    if vocabulary[0] != BLANK:
        raise ValueError(f"{cfg['task-checkpoint']}: vocabulary starts with {vocabulary[0]!r}, expected the CTC blank {BLANK!r}")
    tokenizer = WordTokenizer(vocabulary[1:])
    if tokenizer.symbols != vocabulary:
        raise ValueError(f"{cfg['task-checkpoint']}: vocabulary is not a sorted word list after the blank")
    n_layers = len(base.wav2vec2.encoder.layers)
    top_layers = int(cfg["task-trainable-layers"])
    if not 1 <= top_layers <= n_layers:
        raise ValueError(f"task-trainable-layers={top_layers}: LoRA goes on the top 1..{n_layers} encoder layers")
    first_layer = n_layers - top_layers
    rank, alpha = int(cfg["task-lora-rank"]), float(cfg["task-lora-alpha"])
    targets = [t.strip() for t in str(cfg["task-lora-targets"]).split(",") if t.strip()]

    model_key = (checksum, first_layer, rank, alpha, tuple(targets), float(cfg["task-lora-dropout"]), seed)

    def build_model() -> nn.Module:
        import copy

        if model_key not in _TOPS:
            state = torch.random.get_rng_state()
            torch.manual_seed(seed)  # LoRA's A matrices are random: every node must build the same model
            try:
                top = CachedTopCTC(base, first_layer)
                add_lora(top, rank, alpha, targets, dropout=float(cfg["task-lora-dropout"]))
            finally:
                torch.random.set_rng_state(state)
            _TOPS[model_key] = top
        return copy.deepcopy(_TOPS[model_key]).train()

    def split_features(name: str):
        speakers, _, _, targets_ = load_split_without_audio(data_dir, name, tokenizer)
        return speakers, cached_features(base, checksum, data_dir, name, first_layer), targets_

    build_loaders, build_union_loader, build_split_loader = speaker_split_loaders(
        split_features, collate_cached, run_config)

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        if _empty(batch):
            return torch.zeros((), requires_grad=True), 0
        return ctc_loss_on_cached(model, batch["hidden"], batch["lengths"], batch["labels"], tokenizer.blank_id), int(batch["hidden"].shape[0])

    def error_counts(model: nn.Module, batch) -> tuple[int, int]:
        from common.metrics import wer_details

        if _empty(batch):
            return 0, 0
        refs, hyps, _ = decode_cached(model, batch, tokenizer)
        details = wer_details(refs, hyps)
        return int(details["substitutions"] + details["deletions"] + details["insertions"]), int(details["ref_words"])

    return SynthGridTask(build_model, build_loaders, loss_fn, error_counts, tokenizer=tokenizer,
                         build_union_loader=build_union_loader, build_split_loader=build_split_loader, decode=decode_cached)
