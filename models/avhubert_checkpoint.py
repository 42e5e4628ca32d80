"""Load and save AV-HuBERT checkpoints: fairseq .pt, the Hugging Face port, and ours.

Formats read by `load_avhubert_checkpoint`:

* fairseq (facebookresearch/av_hubert): a torch-pickled dict with `args`, `cfg`,
  `model`, `criterion`, `optimizer_history`, `task_state`, `extra_state`.
  `cfg['model']` holds the AVHubertConfig fields. State-dict layouts:
  pretrained `AVHubertModel` keys at the top of `model`; fine-tuned CTC
  (`AVHubertCtc`) under `w2v_encoder.w2v_model.` plus the head `w2v_encoder.proj`;
  seq2seq (`AVHubertSeq2Seq`) under `encoder.w2v_model.` (the `decoder.*` keys
  are ignored and reported).
* Hugging Face port (nguyenvulebinh/AV-HuBERT): a directory with `config.json`
  and `model.safetensors` or `pytorch_model.bin`, or shards of either listed in
  `model.safetensors.index.json` / `pytorch_model.bin.index.json` (also accepted as the
  path itself), keys `model.encoder.*` renamed
  by `export_muavic_checkpoint_to_hf.py` (`pos_conv.0` -> `pos_conv_embed.conv`,
  `self_attn.*_proj` -> `attention.*_proj`, `self_attn_layer_norm` -> `layer_norm`,
  `fc1`/`fc2` -> `feed_forward.intermediate_dense`/`output_dense`); `model.decoder.*`
  and `lm_head.*` are ignored and reported. Weight-norm keys may be `weight_g`/
  `weight_v` or `parametrizations.weight.original0`/`original1`.
* ours: exactly the fairseq layout (what `save_avhubert_checkpoint` writes), with
  two extra top-level keys, `format` and `extra`.

Everything is read with `torch.load(weights_only=True)`. fairseq pickles some of
its own objects (a `Dictionary` in `task_state`, meters in `extra_state`, and in the
seq2seq fine-tunes `task_state['s2s_tokenizer']`, a `SentencepieceBPE` holding a
`sentencepiece.SentencePieceProcessor`); those globals are replaced by inert stand-in
classes that only keep the pickled attributes, so no code from the checkpoint runs and
neither fairseq nor sentencepiece is called. The tokenizer's serialized SentencePiece
model (what the processor pickles) comes back as bytes in `info['s2s_tokenizer']`. Any
other non-tensor global is refused with an error naming it.

A checkpoint whose config asks for something `AVHubertModel` does not implement (post-LN
layers, dot-product logits, a target GLU, per-modality sub-encoders, several label sets,
another model class) is refused with an error naming the field and its value
(`UNIMPLEMENTED`), rather than loaded into a model that would compute something else.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from common.files import zip_integrity_error
from models.avhubert import AVHubertConfig, AVHubertModel
from models.heads import AVHubertForCTC

FORMAT_TAG = "privacy-avsr/avhubert-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, of an unknown layout, or does not fit the model."""


# --------------------------------------------------------------------------- fairseq stand-ins
class _FairseqStandIn:
    """An inert object standing in for a pickled fairseq class: it only stores what was pickled."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def __repr__(self) -> str:
        return f"<stand-in {type(self).__module__}.{type(self).__qualname__}>"


def _make_standin(module: str, name: str) -> type:
    cls = type(name, (_FairseqStandIn,), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


class Dictionary(_FairseqStandIn):
    """Stand-in for `fairseq.data.dictionary.Dictionary` (symbols, count, indices, special indices)."""

    def __init__(self, symbols: Optional[list[str]] = None, *args: Any, **kwargs: Any):
        super().__init__()
        self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
        specials = [self.bos_word, self.pad_word, self.eos_word, self.unk_word]
        self.symbols = specials + list(symbols or [])
        self.count = [1] * len(self.symbols)
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
        self.nspecial = len(specials)
        self.extra_special_symbols = None

    def __len__(self) -> int:
        return len(self.symbols)


Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"


class SentencePieceProcessor:
    """Stand-in for `sentencepiece.SentencePieceProcessor` as pickled inside fairseq's SentencepieceBPE.

    sentencepiece pickles the serialized model: bytes (versions of 2021, the released
    checkpoints) or a dict with `model_proto` and the processor's options (0.2.x).
    Only those are kept; sentencepiece is never called while loading.
    """

    model_proto: Optional[bytes] = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            proto = state.get("model_proto")
            self.options = {k: v for k, v in state.items() if k != "model_proto" and isinstance(v, (bool, int, float, str))}
        else:
            proto = state
        self.model_proto = bytes(proto) if isinstance(proto, (bytes, bytearray)) else None

    def __repr__(self) -> str:
        size = len(self.model_proto) if self.model_proto is not None else 0
        return f"<stand-in sentencepiece.SentencePieceProcessor, {size} bytes of model>"


SentencePieceProcessor.__module__, SentencePieceProcessor.__qualname__ = "sentencepiece", "SentencePieceProcessor"
_STANDINS: dict[str, type] = {"fairseq.data.dictionary.Dictionary": Dictionary,
                              "sentencepiece.SentencePieceProcessor": SentencePieceProcessor}


def _standin_for(full_name: str) -> type:
    if full_name not in _STANDINS:
        module, _, name = full_name.rpartition(".")
        _STANDINS[full_name] = _make_standin(module, name)
    return _STANDINS[full_name]


def _numpy_safe_globals() -> list[tuple[Any, str]]:
    """numpy scalars/arrays that fairseq's extra_state (meters) may hold, under numpy 1.x and 2.x names."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    found: list[tuple[Any, str]] = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(multiarray.scalar, f"{module_name}.scalar"),
                  (multiarray._reconstruct, f"{module_name}._reconstruct")]
    for dtype_cls in vars(getattr(np, "dtypes", types.SimpleNamespace())).values():
        if isinstance(dtype_cls, type):
            found.append((dtype_cls, f"numpy.dtypes.{dtype_cls.__name__}"))
    return found


def load_torch_file(source: Union[str, Path, io.BytesIO], name: str) -> Any:
    """torch.load(weights_only=True) with fairseq globals mapped to stand-ins; zip archives are
    checked against their CRC-32s first."""
    # builtins.int: sentencepiece >= 0.2 pickles its output type (`_return_type = int`) with the model.
    allowed: list[Any] = [(argparse.Namespace, "argparse.Namespace"), (int, "builtins.int")] + _numpy_safe_globals()
    allowed += [(cls, full) for full, cls in _STANDINS.items()]
    if isinstance(source, (str, Path)) and zipfile.is_zipfile(source):
        damage = zip_integrity_error(source)
        if damage is not None:
            raise CheckpointError(f"{name}: corrupt checkpoint: {damage}")
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(source))
        except Exception as exc:  # noqa: BLE001 - any failure here means a damaged archive
            raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
        known = {full for _, full in allowed}
        allowed += [(_standin_for(g), g) for g in unsafe if g.startswith("fairseq.") and g not in known]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{name}: refused to unpickle (weights_only=True): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad magic number, EOF, ...
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


class _StandInPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles stand-in classes under their fairseq names, so saved files read like fairseq's own."""

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        if isinstance(obj, type) and issubclass(obj, _FairseqStandIn):
            self.write(pickle.GLOBAL + obj.__module__.encode() + b"\n" + obj.__qualname__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


# torch.save(pickle_module=...) only needs a module-like object with a Pickler and a __name__.
_STANDIN_PICKLE_MODULE = types.ModuleType("avhubert_standin_pickle")
_STANDIN_PICKLE_MODULE.Pickler = _StandInPickler  # type: ignore[attr-defined]
_STANDIN_PICKLE_MODULE.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- key layouts
_HF_TO_FAIRSEQ = [
    (re.compile(r"^encoder\.pos_conv_embed\.conv\."), "encoder.pos_conv.0."),
    (re.compile(r"^(encoder\.layers\.\d+)\.attention\."), r"\1.self_attn."),
    (re.compile(r"^(encoder\.layers\.\d+)\.layer_norm\."), r"\1.self_attn_layer_norm."),
    (re.compile(r"^(encoder\.layers\.\d+)\.feed_forward\.intermediate_dense\."), r"\1.fc1."),
    (re.compile(r"^(encoder\.layers\.\d+)\.feed_forward\.output_dense\."), r"\1.fc2."),
]
# Keys the released fine-tuned / HF checkpoints drop (fairseq remove_pretraining_modules, no
# dictionaries at fine-tuning); when absent they keep the model's initialisation.
_OPTIONAL = re.compile(r"^(avhubert\.)?(final_proj\.|label_embs_concat$|mask_emb$)|num_batches_tracked$")


def _weight_norm_names(key: str) -> str:
    return key.replace(".parametrizations.weight.original0", ".weight_g").replace(
        ".parametrizations.weight.original1", ".weight_v")


def _split_layout(state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Return (kind, AVHubertModel keys, CTC head keys as ctc_proj.*, ignored keys) for a fairseq/ours state."""
    state = {_weight_norm_names(k): v for k, v in state.items()}
    body: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    if any(k.startswith("w2v_encoder.w2v_model.") for k in state):
        kind = "ctc"
        for k, v in state.items():
            if k.startswith("w2v_encoder.w2v_model."):
                body[k[len("w2v_encoder.w2v_model."):]] = v
            elif k.startswith("w2v_encoder.proj."):
                head["ctc_proj." + k[len("w2v_encoder.proj."):]] = v
            else:
                ignored.append(k)
    elif any(k.startswith("encoder.w2v_model.") for k in state):
        kind = "seq2seq"
        for k, v in state.items():
            if k.startswith("encoder.w2v_model."):
                body[k[len("encoder.w2v_model."):]] = v
            else:
                ignored.append(k)
    else:
        kind = "pretrained"
        body = dict(state)
    return kind, body, head, ignored


def _from_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    body: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    prefixed = any(k.startswith("model.encoder.") for k in state)
    for key, value in state.items():
        if prefixed:
            if not key.startswith("model.encoder."):
                ignored.append(key)  # model.decoder.*, lm_head.*
                continue
            key = key[len("model.encoder."):]
        key = _weight_norm_names(key)
        for pattern, repl in _HF_TO_FAIRSEQ:
            key = pattern.sub(repl, key)
        body[key] = value
    return body, ignored


# --------------------------------------------------------------------------- config from shapes
def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    return {}


def _architecture_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The AVHubertConfig fields of a fairseq cfg; fine-tuned ones nest the pretraining cfg in w2v_args."""
    model_cfg = _as_dict(cfg.get("model"))
    w2v_args = _as_dict(model_cfg.get("w2v_args"))
    base = _as_dict(w2v_args.get("model")) if "model" in w2v_args else {}
    merged = dict(base)
    # The fine-tuning config overrides the encoder's regularisation (fairseq copies these into w2v_args).
    for key in ("dropout", "attention_dropout", "activation_dropout", "dropout_input"):
        if key in model_cfg:
            merged[key] = model_cfg[key]
    if "layerdrop" in model_cfg:
        merged["encoder_layerdrop"] = model_cfg["layerdrop"]
    if not base:
        merged.update({k: v for k, v in model_cfg.items() if k != "w2v_args"})
    return merged


# cfg['model'] fields (of the pretraining config, w2v_args for fine-tunes) whose other values
# AVHubertModel does not compute: (the value it implements, what the other value would need).
UNIMPLEMENTED: dict[str, tuple[Any, str]] = {
    "layer_norm_first": (True, "post-LN transformer layers (every released AV-HuBERT is pre-LN)"),
    "sim_type": ("cosine", "dot-product logits against the label embeddings"),
    "target_glu": (False, "a GLU on the label embeddings"),
    "sub_encoder_layers": (0, "per-modality transformer sub-encoders"),
    "activation_fn": ("gelu", "another activation in the transformer layers"),
    "layer_type": ("transformer", "conformer layers"),
}
MODEL_NAMES = ("av_hubert", "av_hubert_ctc", "av_hubert_seq2seq")


def check_implemented(model_cfg: Mapping[str, Any], top_cfg: Mapping[str, Any], name: str) -> None:
    """Refuse a checkpoint config AVHubertModel does not implement, naming the field and its value.

    untie_final_proj only matters with several label sets: with one, fairseq projects once either
    way (hubert.py: the untied projection is chunked into one piece), so False loads; several
    label sets are refused here, whatever untie_final_proj says.
    """
    model_name = _as_dict(top_cfg.get("model")).get("_name")
    if model_name is not None and model_name not in MODEL_NAMES:
        raise CheckpointError(f"{name}: cfg.model._name={model_name!r} is not an AV-HuBERT model (expected one of {list(MODEL_NAMES)})")
    for key, (implemented, meaning) in UNIMPLEMENTED.items():
        value = model_cfg.get(key)
        if value is not None and value != implemented:
            raise CheckpointError(f"{name}: cfg.model.{key}={value!r} is not implemented ({meaning}); "
                                  f"AVHubertModel implements {key}={implemented!r}")
    task = _as_dict(top_cfg.get("task"))
    w2v_task = _as_dict(_as_dict(_as_dict(top_cfg.get("model")).get("w2v_args")).get("task"))
    labels = task.get("labels") if not w2v_task else w2v_task.get("labels", task.get("labels"))
    if labels is not None and not isinstance(labels, str) and len(list(labels)) > 1:
        raise CheckpointError(f"{name}: cfg.task.labels={list(labels)!r}: {len(list(labels))} label sets "
                              f"(untie_final_proj={model_cfg.get('untie_final_proj')!r}) are not implemented; "
                              "AVHubertModel predicts one label set")


def infer_config(body: Mapping[str, torch.Tensor], cfg_values: Optional[Mapping[str, Any]] = None) -> AVHubertConfig:
    """AVHubertConfig from the state-dict shapes; non-shape fields (heads, dropouts, masking) from cfg_values."""
    values = {k: v for k, v in dict(cfg_values or {}).items() if v is not None}

    def need(key: str) -> torch.Tensor:
        if key not in body:
            raise CheckpointError(f"checkpoint lacks {key!r}, needed to infer the model shape")
        return body[key]

    audio_proj = need("feature_extractor_audio.proj.weight")
    d, audio_dim = audio_proj.shape
    layers = sorted({int(m.group(1)) for k in body if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    weight_v = need("encoder.pos_conv.0.weight_v")
    values.update(
        encoder_embed_dim=int(d),
        audio_feat_dim=int(audio_dim),
        encoder_layers=len(layers),
        encoder_ffn_embed_dim=int(need("encoder.layers.0.fc1.weight").shape[0]) if layers else values.get(
            "encoder_ffn_embed_dim", 4 * int(d)),
        conv_pos=int(weight_v.shape[2]),
        conv_pos_groups=int(d) // int(weight_v.shape[1]),
        resnet_stem_channels=int(need("feature_extractor_video.resnet.frontend3D.0.weight").shape[0]),
        resnet_widths=[int(need(f"feature_extractor_video.resnet.trunk.layer{i}.0.conv1.weight").shape[0])
                       for i in range(1, 5)],
        resnet_relu_type="prelu" if "feature_extractor_video.resnet.frontend3D.2.weight" in body else "relu",
        modality_fuse="concat" if "post_extract_proj.weight" in body else "add",
    )
    heads = values.get("encoder_attention_heads") or values.get("num_attention_heads")
    values["encoder_attention_heads"] = int(heads) if heads else max(1, int(d) // 64)
    if "mask_emb" in body:
        values["masking_type"] = "input" if body["mask_emb"].shape[0] == audio_dim else "feature"
    if "final_proj.weight" in body:
        values["final_dim"] = int(body["final_proj.weight"].shape[0])
    elif "label_embs_concat" in body:
        values["final_dim"] = int(body["label_embs_concat"].shape[1])
    if "label_embs_concat" in body:
        values["num_classes"] = int(body["label_embs_concat"].shape[0])
    return AVHubertConfig.from_dict(values)


# --------------------------------------------------------------------------- reading
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_weights(path: Path) -> Mapping[str, torch.Tensor]:
    state = _read_safetensors(path) if path.suffix == ".safetensors" else load_torch_file(path, str(path))
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The union of the shards a Hugging Face `*.index.json` lists (`weight_map`: key -> shard file)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a shard index (expected JSON with a 'weight_map' of key -> shard file): {exc}") from exc
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is empty or not a mapping")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / str(shard)
        if not shard_path.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} is listed but {shard_path} does not exist")
        tensors = _read_weights(shard_path)
        wanted = sorted(k for k, f in weight_map.items() if f == shard)
        absent = [k for k in wanted if k not in tensors]
        if absent:
            raise CheckpointError(f"{shard_path}: the index puts {absent[:3]} in this shard but it does not hold them")
        extra = sorted(set(tensors) - set(wanted))
        if extra:
            raise CheckpointError(f"{shard_path}: holds {extra[:3]}, which {index.name} maps elsewhere or not at all")
        state.update({k: tensors[k] for k in wanted})
    return state


def _read_source(path: Path) -> dict[str, Any]:
    """Raw contents: format, state (flat tensors), cfg, task_state, extra."""
    name = str(path)
    if not path.exists():
        raise CheckpointError(f"{name}: no such checkpoint file or directory")
    if path.is_file() and path.name.endswith(".index.json"):
        path, index = path.parent, path
    else:
        index = next((path / n for n in SHARD_INDEXES if (path / n).is_file()), None) if path.is_dir() else None
    if path.is_dir():
        weights = None
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if index is None and (path / candidate).is_file():
                weights = path / candidate
                break
        if weights is None and index is None:
            raise CheckpointError(f"{name}: a Hugging Face checkpoint directory needs model.safetensors, "
                                  f"pytorch_model.bin or a shard index ({' or '.join(SHARD_INDEXES)})")
        hf_config: dict[str, Any] = {}
        if (path / "config.json").is_file():
            try:
                hf_config = json.loads((path / "config.json").read_text())
            except ValueError as exc:
                raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({exc})") from exc
        state = _read_sharded(index) if index is not None else _read_weights(weights)
        return {"format": "hf", "state": dict(state), "cfg_values": hf_config, "raw": {}}
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
        fmt = "hf" if any(k.startswith("model.encoder.") or ".attention." in k for k in state) else "fairseq"
        return {"format": fmt, "state": state, "cfg_values": {}, "raw": {}}
    raw = load_torch_file(path, name)
    if not isinstance(raw, Mapping) or "model" not in raw or not isinstance(raw["model"], Mapping):
        found = sorted(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{name}: not an AV-HuBERT checkpoint: expected a dict with a 'model' state dict "
                              f"(fairseq layout), found {found}")
    cfg = _as_dict(raw.get("cfg"))
    if not cfg and raw.get("args") is not None:
        cfg = {"model": _as_dict(raw["args"])}  # very old fairseq: everything in an argparse Namespace
    fmt = "ours" if raw.get("format") == FORMAT_TAG else "fairseq"
    return {"format": fmt, "state": dict(raw["model"]), "cfg_values": _architecture_cfg(cfg), "raw": raw, "cfg": cfg}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- loading
def _check_and_assign(model: nn.Module, source: Mapping[str, torch.Tensor], strict: bool, name: str,
                      allow_missing: re.Pattern) -> dict[str, list]:
    target = model.state_dict()
    missing = sorted(k for k in target if k not in source)
    missing_optional = [k for k in missing if _OPTIONAL.search(k) or allow_missing.search(k)]
    missing = [k for k in missing if k not in missing_optional]
    unexpected = sorted(k for k in source if k not in target)
    mismatched = [(k, tuple(source[k].shape), tuple(target[k].shape)) for k in sorted(source)
                  if k in target and tuple(source[k].shape) != tuple(target[k].shape)]
    if strict and (missing or unexpected or mismatched):
        lines = [f"{name}: checkpoint does not fit {type(model).__name__} "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape mismatches)"]
        lines += [f"  missing:    {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape:      {k}: checkpoint {s} vs model {t}" for k, s, t in mismatched]
        raise CheckpointError("\n".join(lines))
    bad = {k for k, _, _ in mismatched}
    # Assemble the complete new state first, so a failure never leaves the model half-loaded.
    fresh = {k: (source[k].to(dtype=v.dtype) if k in source and k not in bad else v) for k, v in target.items()}
    model.load_state_dict(fresh, strict=True)
    return {"missing": missing, "missing_optional": missing_optional, "unexpected": unexpected,
            "mismatched": mismatched}


def load_avhubert_checkpoint(path: Union[str, Path], model_or_config: Union[nn.Module, AVHubertConfig, None] = None,
                             strict: bool = True, final_dropout: Optional[float] = None,
                             expected_format: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Load a fairseq / Hugging Face / our AV-HuBERT checkpoint.

    model_or_config: an AVHubertModel or AVHubertForCTC to load into, an AVHubertConfig to build one,
    or None to build from the checkpoint (shapes + cfg). expected_format (auto|fairseq|hf|ours, the
    `model.checkpoint_format` option) makes a different detected format an error. Without a given model, a fine-tuned CTC
    checkpoint gives an AVHubertForCTC, anything else an AVHubertModel. Loading a checkpoint without a
    CTC head into an AVHubertForCTC keeps the head's fresh initialisation (info['head_loaded'] False).

    Returns (model, info) with info keys: path, format (fairseq|hf|ours), kind (pretrained|ctc|seq2seq|hf),
    config (dict), missing, missing_optional, unexpected, mismatched, ignored, head_loaded,
    dictionaries (symbol lists from task_state), target_dictionary (fine-tunes), s2s_tokenizer ({kind,
    model_proto} of a seq2seq fine-tune, else None), cfg (the checkpoint's cfg dict), extra (ours only).
    """
    path = Path(path)
    name = str(path)
    if expected_format not in ("auto", "fairseq", "hf", "ours"):
        raise ValueError(f"expected_format must be auto, fairseq, hf or ours; got {expected_format!r}")
    src = _read_source(path)
    if expected_format != "auto" and src["format"] != expected_format:
        raise CheckpointError(f"{name}: expected a {expected_format} checkpoint, found the {src['format']} format")
    if src["format"] == "hf":
        body, ignored = _from_hf(src["state"])
        kind, head = "hf", {}
    else:
        kind, body, head, ignored = _split_layout(src["state"])
    if not body:
        raise CheckpointError(f"{name}: no AV-HuBERT weights found")
    if src["format"] != "hf":
        check_implemented(src["cfg_values"], src.get("cfg", {}), name)

    if isinstance(model_or_config, (AVHubertModel, AVHubertForCTC)):
        model = model_or_config
    else:
        try:
            cfg = model_or_config if isinstance(model_or_config, AVHubertConfig) else infer_config(body, src["cfg_values"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{name}: cannot build a model from the checkpoint's config: {exc}") from exc
        core = AVHubertModel(cfg)
        if head:
            dropout = final_dropout if final_dropout is not None else float(
                _as_dict(src.get("cfg", {}).get("model")).get("final_dropout", 0.1))
            model = AVHubertForCTC(core, vocab_size=int(head["ctc_proj.weight"].shape[0]), final_dropout=dropout)
        else:
            model = core

    allow_missing = re.compile(r"$^")
    if isinstance(model, AVHubertForCTC):
        source = {"avhubert." + k: v for k, v in body.items()}
        source.update(head)
        if not head:
            allow_missing = re.compile(r"^ctc_proj\.")
    else:
        source = dict(body)
        ignored += [f"w2v_encoder.proj.{k.split('.', 1)[1]}" for k in head]
    report = _check_and_assign(model, source, strict, name, allow_missing)

    raw = src["raw"]
    dictionaries = []
    for d in _as_dict(raw.get("task_state")).get("dictionaries", []) or []:
        symbols = getattr(d, "symbols", None)
        dictionaries.append(list(symbols) if symbols is not None else None)
    task_state = _as_dict(raw.get("task_state"))
    target = getattr(task_state.get("target_dictionary"), "symbols", None)
    core_model = model.avhubert if isinstance(model, AVHubertForCTC) else model
    info = {
        "s2s_tokenizer": _recovered_tokenizer(task_state.get("s2s_tokenizer")),
        "target_dictionary": list(target) if target is not None else None,
        "path": name,
        "format": src["format"],
        "kind": kind,
        "config": core_model.cfg.to_dict(),
        "ignored": sorted(ignored),
        "head_loaded": bool(head) and isinstance(model, AVHubertForCTC),
        "dictionaries": dictionaries,
        "cfg": src.get("cfg", {}),
        "extra": raw.get("extra") if src["format"] == "ours" else None,
        **report,
    }
    return model, info


def _recovered_tokenizer(bpe: Any) -> Optional[dict[str, Any]]:
    """{'kind': 'sentencepiece', 'model_proto': bytes or None} from a pickled fairseq SentencepieceBPE stand-in."""
    if bpe is None:
        return None
    processor = getattr(bpe, "sp", None)
    proto = getattr(processor, "model_proto", None) if isinstance(processor, SentencePieceProcessor) else None
    return {"kind": "sentencepiece" if processor is not None else type(bpe).__qualname__, "model_proto": proto}


def write_recovered_tokenizer(info: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Write the SentencePiece model a seq2seq checkpoint pickled (info from load_avhubert_checkpoint) to `path`."""
    from common.files import atomic_write_bytes

    tokenizer = info.get("s2s_tokenizer") or {}
    if not tokenizer.get("model_proto"):
        raise CheckpointError(f"{info.get('path')}: the checkpoint holds no SentencePiece model "
                              f"(task_state['s2s_tokenizer'] is {'absent' if not tokenizer else tokenizer.get('kind')})")
    atomic_write_bytes(path, tokenizer["model_proto"])
    return Path(path)


# --------------------------------------------------------------------------- saving
def avhubert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under fairseq's key names (AVHubertCtc layout for AVHubertForCTC)."""
    if isinstance(model, AVHubertForCTC):
        state = {"w2v_encoder.w2v_model." + k: v for k, v in model.avhubert.state_dict().items()}
        state.update({"w2v_encoder.proj." + k: v for k, v in model.ctc_proj.state_dict().items()})
    elif isinstance(model, AVHubertModel):
        state = dict(model.state_dict())
    else:
        raise TypeError(f"expected an AVHubertModel or AVHubertForCTC, got {type(model).__name__}")
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_avhubert_checkpoint(path: Union[str, Path], model: nn.Module, cfg_dict: Optional[Mapping[str, Any]] = None,
                             extra: Optional[Mapping[str, Any]] = None,
                             dictionary_symbols: Optional[list[str]] = None) -> Path:
    """Write `model` in the fairseq checkpoint layout, atomically.

    cfg_dict: other cfg sections to store (e.g. {'task': {...}}); cfg['model'] is always written from the
    model's AVHubertConfig (`_name` av_hubert, or av_hubert_ctc with the pretraining config in w2v_args).
    dictionary_symbols: the label set (e.g. cluster ids as strings) stored as a fairseq Dictionary in
    task_state, as fairseq's pretraining checkpoints do. extra: our own additions (plain data and tensors).
    """
    from common.files import atomic_write_bytes

    core = model.avhubert if isinstance(model, AVHubertForCTC) else model
    if not isinstance(core, AVHubertModel):
        raise TypeError(f"expected an AVHubertModel or AVHubertForCTC, got {type(model).__name__}")
    arch = {"_name": "av_hubert", "layer_norm_first": True, "sub_encoder_layers": 0, **core.cfg.to_dict()}
    cfg = {k: v for k, v in dict(cfg_dict or {}).items()}
    if isinstance(model, AVHubertForCTC):
        cfg["model"] = {"_name": "av_hubert_ctc", "w2v_args": {"model": arch},
                        "final_dropout": float(model.final_dropout.p), "vocab_size": model.vocab_size}
    else:
        cfg["model"] = arch
    dictionaries = [Dictionary(dictionary_symbols)] if dictionary_symbols is not None else []
    checkpoint = {
        "args": None,
        "cfg": cfg,
        "model": avhubert_state_dict(model),
        "criterion": {},
        "optimizer_history": [],
        "task_state": {"dictionaries": dictionaries},
        "extra_state": {},
        "last_optimizer_state": None,
        "format": FORMAT_TAG,
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, pickle_module=_STANDIN_PICKLE_MODULE)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


__all__ = ["CheckpointError", "Dictionary", "FORMAT_TAG", "SentencePieceProcessor", "UNIMPLEMENTED", "avhubert_state_dict",
           "check_implemented", "infer_config", "load_avhubert_checkpoint", "save_avhubert_checkpoint",
           "write_recovered_tokenizer"]
