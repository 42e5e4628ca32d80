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
