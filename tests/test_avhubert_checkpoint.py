"""Checkpoint import: fairseq .pt (pretrained, CTC, seq2seq), Hugging Face port, ours; strict errors."""

from __future__ import annotations

import argparse
import json
import sys
import types

import numpy as np
import pytest
import sentencepiece as real_spm  # bound before any test replaces sys.modules["sentencepiece"]
import torch
from safetensors.torch import save_file

from models import avhubert_checkpoint as ckpt
from models.avhubert import AVHubertModel, avhubert_tiny
from models.avhubert_checkpoint import CheckpointError, load_avhubert_checkpoint, save_avhubert_checkpoint
from models.heads import AVHubertForCTC

T = 10


def tiny_model(seed: int = 0, **kw) -> AVHubertModel:
    torch.manual_seed(seed)
    return AVHubertModel(avhubert_tiny(num_classes=24, **kw)).eval()


def run(model, seed: int = 5) -> torch.Tensor:
    model.eval()  # a freshly built model is in training mode (dropout), as torch modules are
    g = torch.Generator().manual_seed(seed)
    audio, video = torch.randn(2, 104, T, generator=g), torch.randn(2, 1, T, 32, 32, generator=g)
    with torch.no_grad():
        out = model(audio=audio, video=video)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def fake_fairseq(monkeypatch):
    """A stand-in `fairseq.data.dictionary` importable while the test writes its checkpoint, as fairseq would."""

    class Dictionary:  # the attributes fairseq's Dictionary pickles
        def __init__(self, symbols):
            self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
            self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + list(symbols)
            self.count = [1] * len(self.symbols)
            self.indices = {s: i for i, s in enumerate(self.symbols)}
            self.bos_index, self.pad_index, self.eos_index, self.unk_index, self.nspecial = 0, 1, 2, 3, 4

    class AverageMeter:
        def __init__(self):
            self.val, self.sum, self.count = np.float64(1.5), np.float64(3.0), 2

    for name in ("fairseq", "fairseq.data", "fairseq.logging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    dict_mod = types.ModuleType("fairseq.data.dictionary")
    meters_mod = types.ModuleType("fairseq.logging.meters")
    Dictionary.__module__, Dictionary.__qualname__ = dict_mod.__name__, "Dictionary"
    AverageMeter.__module__, AverageMeter.__qualname__ = meters_mod.__name__, "AverageMeter"
    dict_mod.Dictionary, meters_mod.AverageMeter = Dictionary, AverageMeter
    monkeypatch.setitem(sys.modules, dict_mod.__name__, dict_mod)
    monkeypatch.setitem(sys.modules, meters_mod.__name__, meters_mod)
    return types.SimpleNamespace(Dictionary=Dictionary, AverageMeter=AverageMeter)


@pytest.fixture
def only_weights_only_loads(monkeypatch):
    real = torch.load

    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "checkpoints must be read with weights_only=True"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)


def fairseq_arch(model: AVHubertModel) -> dict:
    c = model.cfg
    return {"_name": "av_hubert", "label_rate": 25, "encoder_layers": c.encoder_layers,
            "encoder_embed_dim": c.encoder_embed_dim, "encoder_ffn_embed_dim": c.encoder_ffn_embed_dim,
            "encoder_attention_heads": c.encoder_attention_heads, "layer_norm_first": True,
            "final_dim": c.final_dim, "untie_final_proj": True, "conv_pos": c.conv_pos,
            "conv_pos_groups": c.conv_pos_groups, "resnet_relu_type": "prelu", "sub_encoder_layers": 0,
            "audio_feat_dim": 104, "modality_fuse": "concat", "masking_type": "input", "encoder_layerdrop": 0.05,
            "feature_grad_mult": 0.1, "decoder_layers": 6, "mask_prob_audio": 0.8}


def write_fairseq(path, state, cfg, fake, args=None):
    checkpoint = {
        "args": args, "cfg": cfg, "model": state, "criterion": None, "optimizer_history": [{"num_updates": 3}],
        "task_state": {"dictionaries": [fake.Dictionary([str(i) for i in range(20)])]},
        "extra_state": {"metrics": {"train": [(0, "loss", "AverageMeter", fake.AverageMeter())]},
                        "train_iterator": {"epoch": 2}},
        "last_optimizer_state": None,
    }
    torch.save(checkpoint, path)


def test_fairseq_pretrained_checkpoint_loads_strictly(tmp_path, fake_fairseq, only_weights_only_loads):
    source = tiny_model(seed=1)
    path = tmp_path / "base_vox_iter5.pt"
    write_fairseq(path, source.state_dict(), {"model": fairseq_arch(source), "task": {"labels": ["km"]}},
                  fake_fairseq)
    model, info = load_avhubert_checkpoint(path)
    assert isinstance(model, AVHubertModel)
    assert info["format"] == "fairseq" and info["kind"] == "pretrained"
    assert info["missing"] == info["unexpected"] == info["mismatched"] == []
    assert info["dictionaries"][0][:4] == ["<s>", "<pad>", "</s>", "<unk>"] and len(info["dictionaries"][0]) == 24
    assert model.cfg.encoder_attention_heads == 4 and model.cfg.encoder_layerdrop == 0.05
    torch.testing.assert_close(run(model), run(source))


def test_fairseq_namespace_args_are_accepted(tmp_path, fake_fairseq, only_weights_only_loads):
    source = tiny_model(seed=2)
    path = tmp_path / "old.pt"
    write_fairseq(path, source.state_dict(), None, fake_fairseq,
                  args=argparse.Namespace(encoder_attention_heads=4, arch="av_hubert"))
    model, info = load_avhubert_checkpoint(path)
    torch.testing.assert_close(run(model), run(source))


def test_fairseq_ctc_checkpoint_loads_into_ctc_model(tmp_path, fake_fairseq, only_weights_only_loads):
    source = AVHubertForCTC(tiny_model(seed=3), vocab_size=31).eval()
    state = {"w2v_encoder.w2v_model." + k: v for k, v in source.avhubert.state_dict().items()
             if not k.startswith("final_proj") and k != "label_embs_concat"}  # remove_pretraining_modules
    state["w2v_encoder.proj.weight"] = source.ctc_proj.weight.detach().clone()
    state["w2v_encoder.proj.bias"] = source.ctc_proj.bias.detach().clone()
    cfg = {"model": {"_name": "av_hubert_ctc", "w2v_args": {"model": fairseq_arch(source.avhubert)},
                     "dropout": 0.0, "final_dropout": 0.0, "layerdrop": 0.1}}
    path = tmp_path / "finetuned_ctc.pt"
    write_fairseq(path, state, cfg, fake_fairseq)
    model, info = load_avhubert_checkpoint(path)
    assert isinstance(model, AVHubertForCTC) and model.vocab_size == 31
    assert info["kind"] == "ctc" and info["head_loaded"]
    assert "avhubert.final_proj.weight" in info["missing_optional"]
    assert model.cfg.encoder_layerdrop == 0.1 and model.cfg.dropout == 0.0
    torch.testing.assert_close(run(model.eval()), run(source))
    # The same checkpoint into a bare AVHubertModel: the head is reported as ignored.
    core, info = load_avhubert_checkpoint(path, tiny_model(seed=9))
    assert "w2v_encoder.proj.weight" in info["ignored"]


def test_seq2seq_checkpoint_keeps_encoder_and_reports_decoder(tmp_path, fake_fairseq):
    source = tiny_model(seed=4)
    state = {"encoder.w2v_model." + k: v for k, v in source.state_dict().items()}
    state["decoder.embed_tokens.weight"] = torch.zeros(30, 128)
    state["decoder.layers.0.fc1.weight"] = torch.zeros(512, 128)
    path = tmp_path / "s2s.pt"
    write_fairseq(path, state, {"model": {"_name": "av_hubert_seq2seq", "w2v_args": {"model": fairseq_arch(source)}}},
                  fake_fairseq)
    model, info = load_avhubert_checkpoint(path)
    assert info["kind"] == "seq2seq"
    assert info["ignored"] == ["decoder.embed_tokens.weight", "decoder.layers.0.fc1.weight"]
    torch.testing.assert_close(run(model), run(source))


def to_hf(state: dict, parametrizations: bool) -> dict:
    """The renaming of nguyenvulebinh/AV-HuBERT-S2S export_muavic_checkpoint_to_hf.py, written out by hand."""
    hf = {}
    for key, value in state.items():
        if key.startswith("final_proj"):
            continue  # the HF port has no final_proj
        key = key.replace("encoder.pos_conv.0.", "encoder.pos_conv_embed.conv.")
        key = key.replace(".self_attn_layer_norm.", ".layer_norm.").replace(".self_attn.", ".attention.")
        key = key.replace(".fc1.", ".feed_forward.intermediate_dense.").replace(".fc2.", ".feed_forward.output_dense.")
        if parametrizations:
            key = key.replace(".weight_g", ".parametrizations.weight.original0")
            key = key.replace(".weight_v", ".parametrizations.weight.original1")
        hf["model.encoder." + key] = value.contiguous()
    hf["model.decoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 4)
    hf["lm_head.weight"] = torch.zeros(5, 4)
    return hf


@pytest.mark.parametrize("parametrizations", [False, True])
def test_hf_directory_loads_strictly(tmp_path, parametrizations):
    source = tiny_model(seed=5)
    hf = to_hf(source.state_dict(), parametrizations)
    assert "model.encoder.encoder.layers.0.attention.q_proj.weight" in hf
    assert "model.encoder.encoder.layers.0.layer_norm.weight" in hf
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_size": 128}))
    with pytest.raises(CheckpointError, match="expected a fairseq checkpoint"):
        load_avhubert_checkpoint(tmp_path, expected_format="fairseq")
    model, info = load_avhubert_checkpoint(tmp_path, expected_format="hf")
    assert info["format"] == "hf" and info["missing"] == [] and info["unexpected"] == []
    assert info["ignored"] == ["lm_head.weight", "model.decoder.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(run(model), run(source))


def test_our_checkpoint_round_trip_and_fairseq_layout(tmp_path, only_weights_only_loads):
    source = AVHubertForCTC(tiny_model(seed=6), vocab_size=12, final_dropout=0.2)
    path = save_avhubert_checkpoint(tmp_path / "ours.pt", source, {"task": {"labels": ["km"]}}, {"step": 7},
                                    dictionary_symbols=["a", "b"])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == ["fairseq.data.dictionary.Dictionary"]
    raw = ckpt.load_torch_file(path, str(path))
    assert {"args", "cfg", "model", "criterion", "optimizer_history", "task_state", "extra_state"} <= set(raw)
    assert raw["cfg"]["model"]["w2v_args"]["model"]["_name"] == "av_hubert"
    assert "w2v_encoder.proj.weight" in raw["model"] and "w2v_encoder.w2v_model.encoder.pos_conv.0.weight_g" in raw["model"]
    model, info = load_avhubert_checkpoint(path)
    assert info["format"] == "ours" and info["extra"] == {"step": 7} and info["dictionaries"] == [
        ["<s>", "<pad>", "</s>", "<unk>", "a", "b"]]
    assert model.final_dropout.p == 0.2
    torch.testing.assert_close(run(model.eval()), run(source.eval()))


def test_pretrained_checkpoint_into_ctc_model_keeps_fresh_head(tmp_path):
    source = tiny_model(seed=7)
    path = save_avhubert_checkpoint(tmp_path / "pre.pt", source)
    target = AVHubertForCTC(tiny_model(seed=8), vocab_size=5)
    head_before = target.ctc_proj.weight.clone()
    model, info = load_avhubert_checkpoint(path, target)
    assert model is target and not info["head_loaded"]
    assert torch.equal(target.ctc_proj.weight, head_before)
    torch.testing.assert_close(target.avhubert.encoder.layers[0].fc1.weight, source.encoder.layers[0].fc1.weight)


def test_strict_errors_list_missing_unexpected_and_shapes(tmp_path):
    source = tiny_model(seed=1)
    state = source.state_dict()
    del state["encoder.layers.1.fc2.bias"]
    state["encoder.layers.0.bogus"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save({"cfg": {"model": fairseq_arch(source)}, "model": state}, path)
    target = tiny_model(seed=2)
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_avhubert_checkpoint(path, target)
    message = str(err.value)
    assert str(path) in message and "encoder.layers.1.fc2.bias" in message and "encoder.layers.0.bogus" in message
    assert all(torch.equal(v, target_before[k]) for k, v in target.state_dict().items())  # nothing half-loaded

    # Shape mismatch: a model with wider FFN.
    wide = AVHubertModel(avhubert_tiny(num_classes=24, encoder_ffn_embed_dim=256))
    path2 = save_avhubert_checkpoint(tmp_path / "ok.pt", source)
    with pytest.raises(CheckpointError, match=r"encoder.layers.0.fc1.weight: checkpoint \(512, 128\) vs model \(256, 128\)"):
        load_avhubert_checkpoint(path2, wide)
    model, info = load_avhubert_checkpoint(path, tiny_model(seed=2), strict=False)
    assert info["missing"] == ["encoder.layers.1.fc2.bias"] and info["unexpected"] == ["encoder.layers.0.bogus"]
    torch.testing.assert_close(model.encoder.layers[0].fc1.weight, source.encoder.layers[0].fc1.weight)


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = save_avhubert_checkpoint(tmp_path / "good.pt", tiny_model())
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_avhubert_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_avhubert_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' state dict"):
        load_avhubert_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such"):
        load_avhubert_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_avhubert_checkpoint(tmp_path / "emptydir")


def test_unknown_non_fairseq_globals_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {}, "extra_state": {"thing": argparse.ArgumentParser}}, path)
    with pytest.raises(CheckpointError, match="ArgumentParser"):
        load_avhubert_checkpoint(path)


def test_peft_lora_targets_attention_and_ffn_by_name():
    peft = pytest.importorskip("peft")
    model = AVHubertForCTC(tiny_model(), vocab_size=6)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    wrapped = peft.get_peft_model(model, config)
    lora_layers = [n for n, _ in wrapped.named_modules() if n.endswith("fc1") or n.endswith("q_proj")]
    assert len(lora_layers) == 2 * model.cfg.encoder_layers
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = wrapped(audio=torch.randn(1, 104, T))
    assert out.logits.shape == (1, T, 6)


# --------------------------------------------------------------------------- seq2seq fine-tunes, config refusals, shards
def sentencepiece_model(tmp_path) -> bytes:
    real_spm.SentencePieceTrainer.train(sentence_iterator=iter(["bin blue at f two now", "place red by g nine again"] * 20),
                                   model_prefix=str(tmp_path / "spm"), vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    return (tmp_path / "spm.model").read_bytes()


@pytest.fixture
def fake_sentencepiece_bpe(monkeypatch):
    """fairseq's SentencepieceBPE as pickled by the released AVSR/VSR fine-tunes (2021 sentencepiece pickles the
    serialized model as bytes). Any code of these classes running at load time would raise."""

    class SentencePieceProcessor:
        def __init__(self, proto: bytes):
            self.proto = proto

        def __getstate__(self):
            return self.proto

        def __setstate__(self, state):
            raise AssertionError("code from the checkpoint ran")

    class SentencepieceBPE:
        def __init__(self, proto: bytes):
            self.sp = SentencePieceProcessor(proto)

        def __setstate__(self, state):
            raise AssertionError("code from the checkpoint ran")

    spm_mod = types.ModuleType("sentencepiece")
    bpe_mod = types.ModuleType("fairseq.data.encoders.sentencepiece_bpe")
    SentencePieceProcessor.__module__, SentencePieceProcessor.__qualname__ = "sentencepiece", "SentencePieceProcessor"
    SentencepieceBPE.__module__, SentencepieceBPE.__qualname__ = bpe_mod.__name__, "SentencepieceBPE"
    spm_mod.SentencePieceProcessor, bpe_mod.SentencepieceBPE = SentencePieceProcessor, SentencepieceBPE
    monkeypatch.setitem(sys.modules, "fairseq.data.encoders", types.ModuleType("fairseq.data.encoders"))
    monkeypatch.setitem(sys.modules, bpe_mod.__name__, bpe_mod)
    monkeypatch.setitem(sys.modules, "sentencepiece", spm_mod)
    return SentencepieceBPE


def write_seq2seq(path, source, fake, tokenizer, model_cfg=None, task_cfg=None):
    state = {"encoder.w2v_model." + k: v for k, v in source.state_dict().items() if k != "mask_emb"}
    state["decoder.embed_tokens.weight"] = torch.zeros(30, 128)
    cfg = {"model": {"_name": "av_hubert_seq2seq", "w2v_args": {"model": model_cfg or fairseq_arch(source),
                                                                 "task": task_cfg or {"labels": ["km"]}},
                     "decoder_layers": 6}, "task": {"labels": ["wrd"], "is_s2s": True, "fine_tuning": True}}
    checkpoint = {"args": None, "cfg": cfg, "model": state, "criterion": None, "optimizer_history": [],
                  "task_state": {"dictionaries": [fake.Dictionary([str(i) for i in range(20)])],
                                 "target_dictionary": fake.Dictionary(["▁bin", "▁blue"]), "s2s_tokenizer": tokenizer},
                  "extra_state": {}, "last_optimizer_state": None}
    torch.save(checkpoint, path)


def test_seq2seq_finetune_with_pickled_sentencepiece_tokenizer_loads_and_recovers_it(
        tmp_path, fake_fairseq, fake_sentencepiece_bpe, only_weights_only_loads):
    proto = sentencepiece_model(tmp_path)
    source = tiny_model(seed=7)
    path = tmp_path / "base_vox_433h_s2s.pt"
    write_seq2seq(path, source, fake_fairseq, fake_sentencepiece_bpe(proto))
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {"sentencepiece.SentencePieceProcessor", "fairseq.data.encoders.sentencepiece_bpe.SentencepieceBPE"} <= unsafe
    model, info = load_avhubert_checkpoint(path)
    assert info["kind"] == "seq2seq" and info["ignored"] == ["decoder.embed_tokens.weight"]
    assert "mask_emb" in info["missing_optional"]  # hubert_asr deletes it before fine-tuning
    assert info["target_dictionary"][4:] == ["▁bin", "▁blue"]
    assert info["s2s_tokenizer"] == {"kind": "sentencepiece", "model_proto": proto}
    torch.testing.assert_close(run(model), run(source))
    # the recovered bytes are the tokenizer: the real sentencepiece reads them back
    out = ckpt.write_recovered_tokenizer(info, tmp_path / "recovered.model")
    assert real_spm.SentencePieceProcessor(model_file=str(out)).encode("bin blue", out_type=str) == \
        real_spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model")).encode("bin blue", out_type=str)


def test_tokenizer_pickled_by_current_sentencepiece_is_recovered_too(tmp_path, fake_fairseq, only_weights_only_loads, monkeypatch):
    """sentencepiece >= 0.2 pickles a dict (model_proto + options, with builtins.int as the output type)."""
    proto = sentencepiece_model(tmp_path)

    class SentencepieceBPE:
        def __init__(self):
            self.sp = real_spm.SentencePieceProcessor(model_proto=proto)

    bpe_mod = types.ModuleType("fairseq.data.encoders.sentencepiece_bpe")
    SentencepieceBPE.__module__, SentencepieceBPE.__qualname__ = bpe_mod.__name__, "SentencepieceBPE"
    bpe_mod.SentencepieceBPE = SentencepieceBPE
    monkeypatch.setitem(sys.modules, bpe_mod.__name__, bpe_mod)
    source = tiny_model(seed=8)
    write_seq2seq(tmp_path / "s2s.pt", source, fake_fairseq, SentencepieceBPE())
    _, info = load_avhubert_checkpoint(tmp_path / "s2s.pt")
    assert info["s2s_tokenizer"]["model_proto"] == proto


@pytest.mark.parametrize("field, value, message", [
    ("layer_norm_first", False, r"cfg.model.layer_norm_first=False is not implemented \(post-LN"),
    ("sim_type", "dot", r"cfg.model.sim_type='dot' is not implemented \(dot-product logits"),
    ("target_glu", True, r"cfg.model.target_glu=True is not implemented"),
    ("sub_encoder_layers", 2, r"cfg.model.sub_encoder_layers=2 is not implemented"),
])
def test_config_the_model_does_not_implement_is_refused_naming_the_field(tmp_path, fake_fairseq, field, value, message):
    source = tiny_model(seed=1)
    for layout in ("pretrained", "ctc"):
        arch = {**fairseq_arch(source), field: value}
        if layout == "pretrained":
            state, cfg = source.state_dict(), {"model": arch}
        else:
            state = {"w2v_encoder.w2v_model." + k: v for k, v in source.state_dict().items()}
            cfg = {"model": {"_name": "av_hubert_ctc", "w2v_args": {"model": arch}}}
        write_fairseq(tmp_path / f"{layout}.pt", state, cfg, fake_fairseq)
        with pytest.raises(CheckpointError, match=message):
            load_avhubert_checkpoint(tmp_path / f"{layout}.pt")
        with pytest.raises(CheckpointError, match=message):  # also into a model the caller built
            load_avhubert_checkpoint(tmp_path / f"{layout}.pt", tiny_model(seed=2))


def test_several_label_sets_are_refused_but_one_untied_or_tied_loads(tmp_path, fake_fairseq):
    source = tiny_model(seed=1)
    tied = {**fairseq_arch(source), "untie_final_proj": False}
    write_fairseq(tmp_path / "tied.pt", source.state_dict(), {"model": tied, "task": {"labels": ["km"]}}, fake_fairseq)
    model, _ = load_avhubert_checkpoint(tmp_path / "tied.pt")  # one label set: tied and untied are the same projection
    torch.testing.assert_close(run(model), run(source))
    write_fairseq(tmp_path / "two.pt", source.state_dict(), {"model": tied, "task": {"labels": ["mfcc", "km"]}}, fake_fairseq)
    with pytest.raises(CheckpointError, match=r"cfg.task.labels=\['mfcc', 'km'\]: 2 label sets \(untie_final_proj=False\)"):
        load_avhubert_checkpoint(tmp_path / "two.pt")
    write_fairseq(tmp_path / "hubert.pt", source.state_dict(), {"model": {**tied, "_name": "hubert"}}, fake_fairseq)
    with pytest.raises(CheckpointError, match=r"cfg.model._name='hubert' is not an AV-HuBERT model"):
        load_avhubert_checkpoint(tmp_path / "hubert.pt")


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_sharded_hf_checkpoint_loads_from_its_index(tmp_path, weights):
    source = tiny_model(seed=5)
    hf = to_hf(source.state_dict(), parametrizations=False)
    keys = sorted(hf)
    shards = {f"model-0000{i + 1}-of-00002.{weights}": dict((k, hf[k]) for k in keys[i::2]) for i in range(2)}
    for name, part in shards.items():
        save_file(part, str(tmp_path / name)) if weights == "safetensors" else torch.save(part, tmp_path / name)
    index_name = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    for where in (tmp_path, tmp_path / index_name):
        model, info = load_avhubert_checkpoint(where)
        assert info["format"] == "hf" and info["missing"] == info["unexpected"] == []
        torch.testing.assert_close(run(model), run(source))
    first = next(iter(shards))
    (tmp_path / first).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{first}' is listed but .* does not exist"):
        load_avhubert_checkpoint(tmp_path)
