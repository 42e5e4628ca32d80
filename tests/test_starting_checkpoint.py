"""The shipped starting checkpoint (issue 16): strict load, checksum = model card, refusal of a file
that does not match its card, and the regenerate command for a missing or corrupt one."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

import training.config  # noqa: F401
from data.synthgrid.grammar import GRID_WORDS
from data.tokenizer import WordTokenizer
from models.avhubert import AVHubertModel, avhubert_tiny
from models.avhubert_checkpoint import load_avhubert_checkpoint, save_avhubert_checkpoint
from models.heads import AVHubertForCTC
from training.config import PROJECT_ROOT
from training.starting_checkpoint import (
    REGENERATE,
    StartingCheckpointError,
    card_paths,
    head_vocabulary,
    load_starting_checkpoint,
    sha256_file,
    verify_starting_checkpoint,
)

SHIPPED = PROJECT_ROOT / "checkpoints" / "avhubert_tiny_synthgrid.pt"


def _compose(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return compose("config", overrides=list(overrides))


# --------------------------------------------------------------------------- the shipped file
def test_shipped_checkpoint_matches_its_card_and_loads_strictly():
    card_json, card_md = card_paths(SHIPPED)
    card = json.loads(card_json.read_text())
    assert sha256_file(SHIPPED) == card["sha256"]
    assert card["sha256"] in card_md.read_text()  # the human-readable card says the same
    for field in ("command", "seed", "finetuning", "pretraining", "wall_seconds", "heldout_wer_clean", "data"):
        assert field in card
    assert len(card["data"]["sha256"]) == 64 and card["finetuning"]["steps"] > 0
    assert {"audio_video", "audio", "video"} <= set(card["heldout_wer_clean"])
    # no public speaker the card names is in any split the demo trains or tests on
    assert card["data"]["heldout_speakers"] and not set(card["data"]["fit_speakers"]) & set(card["data"]["heldout_speakers"])

    model, info = load_starting_checkpoint(SHIPPED)
    assert isinstance(model, AVHubertForCTC)
    assert info["missing"] == [] and info["unexpected"] == [] and info["mismatched"] == []
    assert info["kind"] == "ctc" and info["card"]["sha256"] == card["sha256"]
    # the word dictionary in task_state is the GRID vocabulary with the CTC blank first
    assert head_vocabulary(info) == WordTokenizer(GRID_WORDS).symbols == card["vocabulary"]
    assert model.vocab_size == len(GRID_WORDS) + 1
    # the architecture the model group describes
    cfg = _compose()
    assert model.cfg.encoder_embed_dim == cfg.model.encoder_embed_dim and model.cfg.encoder_layers == cfg.model.encoder_layers
    assert cfg.model.checkpoint == str(SHIPPED)  # fine-tuning starts from it by default


def test_shipped_checkpoint_file_is_small():
    assert SHIPPED.stat().st_size < 10 * 2**20


# --------------------------------------------------------------------------- refusal / regenerate messages
@pytest.fixture
def carded(tmp_path):
    """A small checkpoint with a card, laid out like the shipped one."""
    torch.manual_seed(0)
    tok = WordTokenizer(GRID_WORDS)
    model = AVHubertForCTC(AVHubertModel(avhubert_tiny()), tok.vocab_size)
    path = tmp_path / "checkpoints" / "avhubert_tiny_synthgrid.pt"
    path.parent.mkdir()
    save_avhubert_checkpoint(path, model, dictionary_symbols=list(tok.symbols))
    card_json, _ = card_paths(path)
    card_json.write_text(json.dumps({"sha256": sha256_file(path)}))
    return path, model


def test_checksum_mismatch_is_refused_naming_both_checksums(carded):
    path, _ = carded
    expected = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = sha256_file(path)
    with pytest.raises(StartingCheckpointError) as err:
        verify_starting_checkpoint(path)
    message = str(err.value)
    assert expected in message and actual in message and str(path) in message and "make checkpoints" in message


def test_missing_checkpoint_names_the_regenerate_command(carded):
    path, _ = carded
    path.unlink()
    with pytest.raises(StartingCheckpointError, match="make checkpoints") as err:
        verify_starting_checkpoint(path)
    assert str(path) in str(err.value) and REGENERATE in str(err.value)


def test_corrupt_checkpoint_names_the_regenerate_command(carded):
    path, _ = carded
    path.write_bytes(b"not a checkpoint")
    card_paths(path)[0].write_text(json.dumps({"sha256": sha256_file(path)}))  # card agrees: corruption at write time
    with pytest.raises(StartingCheckpointError, match="cannot load the checkpoint") as err:
        load_starting_checkpoint(path)
    assert REGENERATE in str(err.value)


def test_a_checkpoint_without_card_is_loaded_without_a_check(tmp_path):
    model = AVHubertModel(avhubert_tiny())
    path = save_avhubert_checkpoint(tmp_path / "other.pt", model)
    assert verify_starting_checkpoint(path) is None
    loaded, _ = load_avhubert_checkpoint(path)
    assert isinstance(loaded, AVHubertModel)


def test_finetuning_refuses_a_tampered_starting_checkpoint_and_reuses_a_matching_head(carded, tmp_path):
    from training.avhubert.finetune import build_system

    path, model = carded
    tok = WordTokenizer(GRID_WORDS)
    cfg = _compose(f"model.checkpoint={path}", f"paths.root_dir={tmp_path}")
    system, _, _ = build_system(cfg, tok.vocab_size, tok.symbols)
    torch.testing.assert_close(system.asr.ctc_proj.weight, model.ctc_proj.weight)  # same vocabulary: head reused
    other = WordTokenizer(["BIN", "BLUE"])
    system, _, _ = build_system(cfg, other.vocab_size, other.symbols)
    assert system.asr.ctc_proj.weight.shape[0] == 3  # another vocabulary: a fresh head

    tampered = tmp_path / "tampered" / path.name
    tampered.parent.mkdir()
    shutil.copy(path, tampered)
    shutil.copy(card_paths(path)[0], card_paths(tampered)[0])
    with open(tampered, "ab") as f:
        f.write(b"\0")
    with pytest.raises(StartingCheckpointError, match="does not match its model card"):
        build_system(_compose(f"model.checkpoint={tampered}", f"paths.root_dir={tmp_path}"), tok.vocab_size, tok.symbols)
