"""CTC decoding: greedy best path and lexicon-constrained beam search."""

import torch

from data.tokenizer import CharTokenizer
from data.ctc_decode import LexiconBeamDecoder, ctc_greedy_decode


def emissions_for(tok: CharTokenizer, text: str, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Log-probs [1, T, V] whose best path spells `text` (each token twice, then a blank)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for t in tok.encode(text):
        frames += [t, t, tok.blank_id]
    logits = torch.full((len(frames), tok.vocab_size), -5.0)
    logits[torch.arange(len(frames)), torch.tensor(frames)] = 5.0
    logits += noise * torch.randn(logits.shape, generator=g)
    return logits.log_softmax(-1).unsqueeze(0)


def test_greedy_recovers_the_best_path():
    tok = CharTokenizer()
    em = emissions_for(tok, "BIN BLUE AT A ONE NOW")
    assert ctc_greedy_decode(em, torch.tensor([em.shape[1]]), tok) == ["BIN BLUE AT A ONE NOW"]


def test_beam_search_only_emits_lexicon_words():
    tok = CharTokenizer()
    lexicon = ["BIN", "BLUE", "AT", "A", "ONE", "NOW", "PLACE"]
    em = emissions_for(tok, "BIN BLUE AT A ONE NOW")
    # Corrupt one letter of BLUE so greedy decoding misspells it; the lexicon decoder must still output words it knows.
    u = tok.encode("U")[0]
    x = tok.encode("X")[0]
    pos = (em[0].argmax(-1) == u).nonzero()[:, 0]
    em[0, pos, x] = em[0, pos, u] + 1.0
    lengths = torch.tensor([em.shape[1]])
    greedy = ctc_greedy_decode(em, lengths, tok)[0]
    beam = LexiconBeamDecoder(tok, lexicon, beam_size=20).decode(em, lengths)[0]
    assert "BLXE" in greedy
    assert beam == "BIN BLUE AT A ONE NOW"
    assert set(beam.split()) <= set(lexicon)


# --------------------------------------------------------------------------- beam search for every unit kind
import pytest  # noqa: E402

from data.tokenizer import SentencePieceTokenizer, WordTokenizer  # noqa: E402
from data.ctc_decode import LexiconFreeBeamDecoder, build_beam_decoder, check_decoder_options  # noqa: E402

GRID = ["bin blue at f two now", "place red by g nine again", "set white with p four soon", "lay green in z one please"]


def uncertain_first_token(ids: list[int], vocab: int, blank: int = 0) -> torch.Tensor:
    """Log-probs [1, T, V]: the first token at 0.4 against the blank at 0.6 on each of 3 frames, then the rest
    clearly. The best path drops the first token; summed over its alignments it is kept (1 - 0.6^3 = 0.78)."""
    probs = []
    for _ in range(3):
        p = torch.full((vocab,), 1e-6)
        p[blank], p[ids[0]] = 0.6, 0.4
        probs.append(p)
    for t in ids[1:]:
        for k in (t, blank):
            p = torch.full((vocab,), 1e-6)
            p[k] = 1.0
            probs.append(p)
    em = torch.stack(probs)
    return (em / em.sum(-1, keepdim=True)).log().unsqueeze(0)


@pytest.mark.parametrize("kind", ["sentencepiece", "word"])
def test_beam_search_over_sentencepiece_and_word_units_sums_alignments(tmp_path, kind):
    tok = (SentencePieceTokenizer.train(GRID * 5, vocab_size=40, model_prefix=tmp_path / "spm") if kind == "sentencepiece"
           else WordTokenizer(sorted({w for t in GRID for w in t.split()})))
    text = "place red by g nine again"
    em = uncertain_first_token(tok.encode(text), tok.vocab_size)
    lengths = torch.tensor([em.shape[1]])
    decoder = build_beam_decoder(tok, [], beam_size=8)
    assert isinstance(decoder, LexiconFreeBeamDecoder)
    greedy = ctc_greedy_decode(em, lengths, tok)[0]
    assert greedy != text  # the best path lost the first unit
    assert decoder.decode(em, lengths) == [text]


def test_build_beam_decoder_keeps_the_lexicon_decoder_for_characters():
    assert isinstance(build_beam_decoder(CharTokenizer(), ["BIN BLUE"], beam_size=4), LexiconBeamDecoder)


def test_decoder_unit_checks_name_the_option():
    check_decoder_options("beam", "sentencepiece", 20)
    with pytest.raises(ValueError, match="eval.decoder='viterbi': expected one of greedy, beam"):
        check_decoder_options("viterbi", "char", 20)
    with pytest.raises(ValueError, match="data.tokenizer='bpe'"):
        check_decoder_options("greedy", "bpe", 20)
    with pytest.raises(ValueError, match="eval.beam_size=0"):
        check_decoder_options("beam", "word", 0)


def test_lrs3_base_passes_its_start_up_checks_and_a_bad_decoder_fails_before_training(tmp_path):
    from hydra import compose, initialize_config_dir

    import training.config  # noqa: F401
    from training.avhubert.finetune import validate_options
    from training.config import PROJECT_ROOT

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}", "experiment=lrs3_base", "trainer.device=cpu"])
        bad = compose("config", overrides=[f"paths.root_dir={tmp_path}", "experiment=lrs3_base", "eval.decoder=viterbi"])
    assert cfg.eval.decoder == "beam" and cfg.data.tokenizer == "sentencepiece"
    validate_options(cfg)
    with pytest.raises(ValueError, match="eval.decoder='viterbi'"):
        validate_options(bad)
