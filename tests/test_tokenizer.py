"""Tokenizers: round trips, CTC blank at 0, unknown characters rejected with the utterance named."""

import pytest

from data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
    ctc_collapse,
    load_tokenizer,
)

GRID = ["BIN BLUE AT F TWO NOW", "PLACE RED IN A ONE SOON", "SET GREEN BY Z NINE AGAIN", "LAY WHITE WITH Q SEVEN PLEASE"]


def test_char_round_trip_and_layout():
    tok = CharTokenizer()
    assert tok.vocab_size == 29 and tok.blank_id == 0
    ids = tok.encode("BIN  BLUE")
    assert 0 not in ids
    assert tok.symbols[ids[3]] == "|" and [tok.symbols[i] for i in ids] == list("BIN|BLUE")
    for text in GRID + ["DON'T STOP"]:
        assert tok.decode(tok.encode(text)) == text
    # blanks and the -1 collate padding are ignored
    assert tok.decode([0] + tok.encode("AB") + [-1, -1]) == "AB"


@pytest.mark.parametrize("text,bad", [("bin blue", "b"), ("SET 9", "9"), ("A|B", "|"), ("CAFÉ", "É")])
def test_char_rejects_unknown_character_naming_it_and_the_utterance(text, bad):
    with pytest.raises(TokenizerError) as e:
        CharTokenizer().encode(text, utt_id="spk3_0007")
    assert repr(bad) in str(e.value) and "spk3_0007" in str(e.value)


def test_empty_transcript_rejected():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer().encode("   ", utt_id="u1")


def test_ctc_collapse():
    assert ctc_collapse([0, 3, 3, 0, 3, 5, 5, 0]) == [3, 3, 5]


def test_char_save_load(tmp_path):
    tok = build_tokenizer("char", GRID, tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode(GRID[0]) == tok.encode(GRID[0])
    with pytest.raises(TokenizerError, match="'x'"):
        build_tokenizer("char", GRID + ["x"], tmp_path / "bad")


def test_sentencepiece_train_round_trip_and_reject(tmp_path):
    tok = build_tokenizer("sentencepiece", GRID * 10, tmp_path, vocab_size=40)
    assert isinstance(tok, SentencePieceTokenizer) and tok.blank_id == 0
    for text in GRID:
        ids = tok.encode(text)
        assert 0 not in ids and tok.decode(ids) == text
    again = load_tokenizer(tmp_path)
    assert again.encode(GRID[1]) == tok.encode(GRID[1]) and again.vocab_size == tok.vocab_size
    with pytest.raises(TokenizerError) as e:
        tok.encode("SET XYLO", utt_id="u42")
    assert "'X'" in str(e.value) and "u42" in str(e.value)


def test_unknown_kind():
    with pytest.raises(TokenizerError, match="kind"):
        build_tokenizer("bpe", GRID, "/nonexistent")


def test_word_tokenizer_round_trip_and_unknown_words(tmp_path):
    from data.tokenizer import TokenizerError, WordTokenizer, build_tokenizer, load_tokenizer

    tok = build_tokenizer("word", ["BIN BLUE AT A ONE NOW", "SET RED BY B TWO SOON"], tmp_path)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size == 13 and tok.blank_id == 0
    ids = tok.encode("SET BLUE AT A TWO NOW")
    assert len(ids) == 6 and 0 not in ids
    assert tok.decode([0, *ids, 0]) == "SET BLUE AT A TWO NOW"
    assert load_tokenizer(tmp_path).encode("BIN RED") == tok.encode("BIN RED")
    with pytest.raises(TokenizerError, match="'PLACE'"):
        tok.encode("PLACE RED", utt_id="u1")
