"""CTC decoding: greedy, and lexicon-constrained beam search (flashlight-text).

The beam decoder only emits words of a lexicon (for SynthGRID: the 51 GRID
words; for real corpora: the training transcripts' words), with no language
model (ZeroLM) unless one is given. flashlight-text is used because it works
with numpy 2, whereas pyctcdecode pins numpy < 2.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch


def ctc_greedy_ids(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best path per utterance: argmax per frame, merge repeats, drop blanks. log_probs [B,T,V]."""
    from data.tokenizer import ctc_collapse

    best = log_probs.argmax(dim=-1).cpu()
    return [ctc_collapse(seq[:n].tolist(), blank) for seq, n in zip(best, lengths.cpu().tolist())]


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, tokenizer) -> list[str]:
    return [tokenizer.decode(ids) for ids in ctc_greedy_ids(log_probs, lengths, blank=tokenizer.blank_id)]


class LexiconBeamDecoder:
    """Lexicon-constrained CTC beam search over a token vocabulary (chars or sentencepiece pieces).

    `tokenizer` must provide: blank_id, word_sep_id (the token between words;
    silence for the decoder), spell(word) -> list[int] (the tokens of one word,
    without separators) and decode(ids).
    """

    def __init__(self, tokenizer, words: Iterable[str], beam_size: int = 20, beam_threshold: float = 25.0, word_score: float = 0.0):
        from flashlight.lib.text.decoder import (
            CriterionType,
            LexiconDecoder,
            LexiconDecoderOptions,
            SmearingMode,
            Trie,
            ZeroLM,
        )

        if not hasattr(tokenizer, "spell"):
            raise ValueError(
                f"lexicon beam search needs a character tokenizer (data.tokenizer=char); got {type(tokenizer).__name__}. "
                "Use eval.decoder=greedy with sentencepiece units."
            )
        self.tokenizer = tokenizer
        self.words = sorted(set(w for w in words if w))
        if not self.words:
            raise ValueError("LexiconBeamDecoder needs a non-empty lexicon")
        self.lm = ZeroLM()
        self.trie = Trie(tokenizer.vocab_size, tokenizer.word_sep_id)
        start = self.lm.start(False)
        for idx, word in enumerate(self.words):
            spelling = tokenizer.spell(word) + [tokenizer.word_sep_id]  # fairseq lexicons end each word with "|"
            if not spelling:
                raise ValueError(f"lexicon word {word!r} has no tokens in this tokenizer")
            _, score = self.lm.score(start, idx)
            self.trie.insert(spelling, idx, score)
        self.trie.smear(SmearingMode.MAX)
        options = LexiconDecoderOptions(
            beam_size=beam_size,
            beam_size_token=tokenizer.vocab_size,
            beam_threshold=beam_threshold,
            lm_weight=0.0,
            word_score=word_score,
            unk_score=float("-inf"),
            sil_score=0.0,
            log_add=False,
            criterion_type=CriterionType.CTC,
        )
        self.decoder = LexiconDecoder(options, self.trie, self.lm, tokenizer.word_sep_id, tokenizer.blank_id, -1, [], False)

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        emissions = log_probs.detach().float().cpu().contiguous()
        hyps = []
        for b in range(emissions.shape[0]):
            n = int(lengths[b])
            em = np.ascontiguousarray(emissions[b, :n].numpy())
            results = self.decoder.decode(em.ctypes.data, n, em.shape[1])
            hyps.append(" ".join(self.words[i] for i in results[0].words if i >= 0) if results else "")
        return hyps


def lexicon_from_texts(texts: Sequence[str]) -> list[str]:
    return sorted({w for t in texts for w in t.split()})
