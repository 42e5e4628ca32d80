"""Private fine-tuning of a public Wav2Vec2 CTC start with few parameters, on cached encoder outputs.

DP noise grows with the number of trained parameters (its norm is sigma * C * sqrt(d)), so private
training touches as little as possible: LoRA adapters (peft) on the top encoder layer(s) and the CTC
head (``lm_head``); everything else is frozen. Because nothing below the first adapted layer
trains, that part's output is a fixed function of the utterance: it is computed once per
utterance (:func:`encode_below`, eval mode, one utterance at a time so no padding enters it) and
cached, and a training step runs only :class:`CachedTopCTC` (the top layer(s), the final layer norm
and the head) on the cached features, which costs milliseconds.

``CachedTopCTC(cached features)`` equals the full ``Wav2Vec2ForCTC`` forward of the same utterance
in eval mode (tests/test_fl_population.py checks it).

The public start is saved with :func:`save_wav2vec2_ctc` as one ``.pt`` file (the HF config as JSON,
the state dict, the vocabulary) and loaded with :func:`load_wav2vec2_ctc` (``weights_only=True``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

CHECKPOINT_FORMAT = "wav2vec2_ctc/1"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense")


# --------------------------------------------------------------------------- checkpoint file
def save_wav2vec2_ctc(path: str | Path, model: nn.Module, vocabulary: Sequence[str], extra: Optional[dict[str, Any]] = None) -> None:
    """One file, written atomically: {format, config (JSON), state_dict, vocabulary, extra (JSON)}.
    The positional convolution's weight norm is folded first (the layout every DP run trains in)."""
    from common.files import atomic_write_bytes
    from models.wav2vec2 import fold_positional_conv_weight_norm

    fold_positional_conv_weight_norm(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_json_string(use_diff=False),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "vocabulary": list(vocabulary),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_wav2vec2_ctc(path: str | Path) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """(Wav2Vec2ForCTC in eval mode, vocabulary, extra) of a :func:`save_wav2vec2_ctc` file; strict."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from models.wav2vec2 import fold_positional_conv_weight_norm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Wav2Vec2 CTC checkpoint not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a Wav2Vec2 CTC checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    config = Wav2Vec2Config(**json.loads(payload["config"]))
    model = Wav2Vec2ForCTC(config)
    fold_positional_conv_weight_norm(model)
    model.load_state_dict(payload["state_dict"], strict=True)
    vocabulary = list(payload["vocabulary"])
    if len(vocabulary) != config.vocab_size:
        raise ValueError(f"{path}: {len(vocabulary)} vocabulary symbols but the CTC head has {config.vocab_size} outputs")
    return model.eval(), vocabulary, json.loads(payload["extra"])


# --------------------------------------------------------------------------- frozen bottom, cached
def _check_split_layer(model: nn.Module, first_trainable_layer: int) -> int:
    n = len(model.wav2vec2.encoder.layers)
    if not model.config.do_stable_layer_norm:
        raise ValueError("CachedTopCTC needs a pre-LN (do_stable_layer_norm) Wav2Vec2, as wav2vec2_tiny_config builds")
    if not 0 <= first_trainable_layer < n:
        raise ValueError(f"first trainable layer {first_trainable_layer}: the encoder has layers 0..{n - 1}")
    return n


@torch.no_grad()
def encode_below(model: nn.Module, waveform: torch.Tensor, first_trainable_layer: int) -> torch.Tensor:
    """(frames, hidden) input of encoder layer `first_trainable_layer` for ONE unpadded utterance, eval mode."""
    _check_split_layer(model, first_trainable_layer)
    was_training = model.training
    model.eval()
    try:
        body = model.wav2vec2
        features = body.feature_extractor(waveform.reshape(1, -1)).transpose(1, 2)
        hidden, _ = body.feature_projection(features)
        encoder = body.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        for layer in encoder.layers[:first_trainable_layer]:
            hidden = layer(hidden, attention_mask=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    finally:
        model.train(was_training)
    return hidden[0].clone()


class CachedTopCTC(nn.Module):
    """Encoder layers `first_trainable_layer`.., the final layer norm and the CTC head of a Wav2Vec2ForCTC
    (copied), applied to cached inputs of the first of those layers.

    forward(hidden (B, T, H) zero-padded, lengths (B,)) -> logits (B, T, vocab). Padded frames are
    masked out of the attention, as in the full model.
    """

    def __init__(self, model: nn.Module, first_trainable_layer: int):
        super().__init__()
        import copy

        n = _check_split_layer(model, first_trainable_layer)
        self.config = copy.deepcopy(model.config)
        self.layers = nn.ModuleList(copy.deepcopy(model.wav2vec2.encoder.layers[i]) for i in range(first_trainable_layer, n))
        self.layer_norm = copy.deepcopy(model.wav2vec2.encoder.layer_norm)
        self.lm_head = copy.deepcopy(model.lm_head)
        self.blank_id = int(model.config.pad_token_id)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        frames = torch.arange(hidden.shape[1], device=hidden.device)
        keep = (frames[None, :] < lengths[:, None]).long()
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=keep)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.lm_head(self.layer_norm(hidden))


def add_lora(top: CachedTopCTC, rank: int, alpha: float, targets: Iterable[str] = LORA_TARGETS, train_head: bool = True,
             dropout: float = 0.0) -> int:
    """LoRA adapters (peft) on `targets` of every layer of `top`; freezes all else except lm_head
    (if `train_head`). rank 0 = no adapters (head only). Returns the number of trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in top.parameters():
        p.requires_grad_(False)
    if rank > 0:
        targets = list(targets)
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"LoRA targets {unknown}: expected a subset of {LORA_TARGETS}")
        config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets, bias="none")
        inject_adapter_in_model(config, top.layers)
        for name, p in top.layers.named_parameters():
            p.requires_grad_("lora_" in name)
    if train_head:
        top.lm_head.requires_grad_(True)
    n = sum(p.numel() for p in top.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError("add_lora: nothing would train (rank 0 and train_head=False)")
    return n


def ctc_loss_on_cached(top: nn.Module, hidden: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, blank_id: int) -> torch.Tensor:
    """Mean over utterances of CTC loss / target length (Hugging Face's ctc_loss_reduction="mean");
    labels padded with -100; infinite losses zeroed (ctc_zero_infinity)."""
    log_probs = top(hidden, lengths).log_softmax(-1).transpose(0, 1)
    target_lengths = (labels >= 0).sum(-1)
    targets = labels.clamp(min=0)
    return nn.functional.ctc_loss(log_probs, targets, lengths, target_lengths, blank=blank_id, reduction="mean", zero_infinity=True)
