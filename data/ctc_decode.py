"""CTC decoding: greedy, and beam search (flashlight-text) for every unit kind.

    eval.decoder   data.tokenizer   decoder
    greedy         any              best path (argmax per frame, merge repeats, drop blanks)
    beam           char             LexiconBeamDecoder: only words of a lexicon (SynthGRID: the
                                    51 GRID words; real corpora: the training transcripts' words)
    beam           sentencepiece    LexiconFreeBeamDecoder: CTC prefix beam search over the pieces
                                    (paths that collapse to the same pieces are summed), words
                                    joined by SentencePiece's own "▁" markers, so any word the
                                    pieces can spell is allowed (LRS3's open vocabulary)
    beam           word             LexiconFreeBeamDecoder over the word units

No language model (ZeroLM). `check_decoder_options` is called at start-up (finetune,
evaluate), so a combination nothing can decode fails before any training.
flashlight-text is used because it works with numpy 2, whereas pyctcdecode pins numpy < 2.
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
                f"lexicon beam search spells words in characters (data.tokenizer=char); got {type(tokenizer).__name__}. "
                "build_beam_decoder picks LexiconFreeBeamDecoder for sentencepiece and word units."
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


class LexiconFreeBeamDecoder:
    """CTC prefix beam search over the token vocabulary (flashlight's LexiconFreeDecoder, ZeroLM).

    Hypotheses are token sequences; alignments that collapse to the same tokens are merged
    (log-add), which is what lets beam search beat the best path. The result is turned into
    text by the tokenizer (`decode(ids)`), so SentencePiece pieces become words at their
    "▁" markers and word units are joined by spaces.
    """

    def __init__(self, tokenizer, beam_size: int = 20, beam_threshold: float = 25.0):
        from flashlight.lib.text.decoder import CriterionType, LexiconFreeDecoder, LexiconFreeDecoderOptions, ZeroLM

        self.tokenizer = tokenizer
        self.blank = tokenizer.blank_id
        options = LexiconFreeDecoderOptions(beam_size=beam_size, beam_size_token=tokenizer.vocab_size, beam_threshold=beam_threshold,
                                            lm_weight=0.0, sil_score=0.0, log_add=True, criterion_type=CriterionType.CTC)
        # No unit means silence here; the blank takes that role (with sil_score 0 it changes no score).
        self.decoder = LexiconFreeDecoder(options, ZeroLM(), self.blank, self.blank, [])

    def decode_ids(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        from data.tokenizer import ctc_collapse

        emissions = log_probs.detach().float().cpu().contiguous()
        out = []
        for b in range(emissions.shape[0]):
            n = int(lengths[b])
            em = np.ascontiguousarray(emissions[b, :n].numpy())
            results = self.decoder.decode(em.ctypes.data, n, em.shape[1])
            # tokens: one per frame plus a start and an end marker, with blanks and repeats.
            out.append(ctc_collapse([t for t in results[0].tokens if t >= 0], self.blank) if results else [])
        return out

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(ids) for ids in self.decode_ids(log_probs, lengths)]


DECODERS = ("greedy", "beam")
UNIT_KINDS = ("char", "sentencepiece", "word")


def check_decoder_options(decoder: str, tokenizer_kind: str, beam_size: int) -> None:
    """Start-up check of eval.decoder x data.tokenizer (and that the beam decoder can be built)."""
    if decoder not in DECODERS:
        raise ValueError(f"eval.decoder={decoder!r}: expected one of {', '.join(DECODERS)}")
    if tokenizer_kind not in UNIT_KINDS:
        raise ValueError(f"data.tokenizer={tokenizer_kind!r}: expected one of {', '.join(UNIT_KINDS)}")
    if decoder == "beam":
        if beam_size < 1:
            raise ValueError(f"eval.beam_size={beam_size}: the beam decoder needs at least 1")
        try:
            import flashlight.lib.text.decoder  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"eval.decoder=beam needs flashlight-text (requirements.txt): {exc}") from exc


def build_beam_decoder(tokenizer, train_texts: Sequence[str], beam_size: int = 20):
    """The beam decoder for this tokenizer's units (table in the module docstring)."""
    check_decoder_options("beam", tokenizer.kind, beam_size)
    if tokenizer.kind == "char":
        return LexiconBeamDecoder(tokenizer, lexicon_from_texts(train_texts), beam_size=beam_size)
    return LexiconFreeBeamDecoder(tokenizer, beam_size=beam_size)


def lexicon_from_texts(texts: Sequence[str]) -> list[str]:
    return sorted({w for t in texts for w in t.split()})
