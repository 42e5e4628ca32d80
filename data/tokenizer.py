"""Transcript tokenizers for CTC: characters (default) or SentencePiece units.

Both reserve id 0 for the CTC blank and share one interface: `encode(text, utt_id=None)
-> list[int]`, `decode(ids) -> str`, `vocab_size`, `save(dir)`, `load(dir)`.
`decode` drops blanks and negative ids (the -1 target padding of data.collate) but
does not collapse CTC repeats; use `ctc_collapse` on frame-level argmaxes first.

Characters follow fairseq's letter dictionaries: words are separated by '|'
("BIN BLUE" -> B I N | B L U E). Transcripts are upper-case words (data.manifest);
anything outside the vocabulary raises `TokenizerError` naming the character and the
utterance, rather than being silently mapped to <unk>.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from common.files import read_text

BLANK = "<blank>"
WORD_SEP = "|"
DEFAULT_ALPHABET = WORD_SEP + "'" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TokenizerError(ValueError):
    """A transcript the tokenizer cannot represent, or a malformed tokenizer file."""


def _where(utt_id: str | None) -> str:
    return f"utterance {utt_id!r}" if utt_id is not None else "transcript"


def ctc_collapse(ids: Sequence[int], blank: int = 0) -> list[int]:
    """Greedy CTC post-processing: merge repeats, then drop blanks."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def _symbols(ids: Iterable[int], symbols: Sequence[str]) -> list[str]:
    """The symbols of token ids, skipping blank (0) and padding (< 0); an unknown id is an error."""
    out = []
    for i in ids:
        i = int(i)
        if i <= 0:
            continue
        if i >= len(symbols):
            raise TokenizerError(f"token id {i} out of range for a vocabulary of {len(symbols)}")
        out.append(symbols[i])
    return out


def _write_spec(out_dir: str | Path, kind: str, **fields) -> Path:
    from common.files import atomic_write_text

    path = Path(out_dir) / "tokenizer.json"
    atomic_write_text(path, json.dumps({"kind": kind, **fields}) + "\n")
    return path


def _read_spec(path: str | Path, kind: str, field: str):
    """The `field` of a tokenizer.json written by `_write_spec` for `kind` (path: the file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        spec = json.loads(read_text(path, TokenizerError))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the {kind} tokenizer ({e})") from e
    if spec.get("kind") != kind or field not in spec:
        raise TokenizerError(f"{path}: expected {{'kind': {kind!r}, {field!r}: ...}}, got keys {sorted(spec)}")
    return spec[field]


class CharTokenizer:
    kind = "char"
    blank_id = 0

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if WORD_SEP not in alphabet or len(set(alphabet)) != len(alphabet):
            raise TokenizerError(f"alphabet must contain {WORD_SEP!r} and no repeated characters, got {alphabet!r}")
        self.alphabet = alphabet
        self.symbols = [BLANK] + list(alphabet)
        self._index = {c: i for i, c in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def word_sep_id(self) -> int:
        """The '|' token between words (the silence token of a lexicon decoder)."""
        return self._index[WORD_SEP]

    def spell(self, word: str) -> list[int]:
        """The tokens of one word, without separators (for lexicon-constrained decoding)."""
        return self.encode(word)

    def encode(self, text: str, utt_id: str | None = None) -> list[int]:
        words = text.split()
        if not words:
            raise TokenizerError(f"{_where(utt_id)}: empty transcript")
        ids = []
        for w, word in enumerate(words):
            if w:
                ids.append(self._index[WORD_SEP])
            for c in word:
                i = self._index.get(c)
                if i is None or c == WORD_SEP:
                    raise TokenizerError(
                        f"{_where(utt_id)}: character {c!r} in {text!r} is not in the tokenizer vocabulary "
                        f"(expected upper-case words over {self.alphabet.replace(WORD_SEP, '')!r})"
                    )
                ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        chars = _symbols(ids, self.symbols)
        return " ".join("".join(chars).replace(WORD_SEP, " ").split())

    def save(self, out_dir: str | Path) -> Path:
        return _write_spec(out_dir, self.kind, alphabet=self.alphabet)

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        return cls(_read_spec(path, cls.kind, "alphabet"))


class SentencePieceTokenizer:
    """Unigram SentencePiece units; id 0 is SentencePiece's pad piece, renamed to the CTC blank."""

    kind = "sentencepiece"
    blank_id = 0

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise TokenizerError(f"{self.model_file}: SentencePiece model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        if self.sp.id_to_piece(0) != BLANK:
            raise TokenizerError(f"{self.model_file}: id 0 is {self.sp.id_to_piece(0)!r}, expected {BLANK!r} (train it with SentencePieceTokenizer.train)")
        self.unk_id = self.sp.unk_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_prefix: str | Path) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        texts = [t for t in texts if t.strip()]
        if not texts:
            raise TokenizerError("SentencePieceTokenizer.train: no non-empty transcripts")
        Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            pad_piece=BLANK,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            hard_vocab_limit=False,  # a small corpus (GRID has 51 words) may not support the requested size
            num_threads=1,  # single-threaded training is reproducible
            minloglevel=2,
        )
        return cls(f"{model_prefix}.model")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, utt_id: str | None = None) -> list[int]:
        if not text.split():
            raise TokenizerError(f"{_where(utt_id)}: empty transcript")
        ids = self.sp.encode(" ".join(text.split()))
        if self.unk_id in ids:
            known = set()
            for i in range(self.vocab_size):
                known.update(self.sp.id_to_piece(i).replace("\u2581", ""))
            bad = sorted({c for c in text if not c.isspace() and c not in known}) or ["<unknown>"]
            raise TokenizerError(f"{_where(utt_id)}: character {bad[0]!r} in {text!r} is not in the SentencePiece vocabulary ({self.model_file})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) > 0])

    def save(self, out_dir: str | Path) -> Path:
        from common.files import atomic_write_bytes, atomic_write_text

        out_dir = Path(out_dir)
        target = out_dir / "tokenizer.model"
        if target.resolve() != self.model_file.resolve():
            atomic_write_bytes(target, self.model_file.read_bytes())
        atomic_write_text(out_dir / "tokenizer.json", json.dumps({"kind": self.kind, "model": "tokenizer.model"}) + "\n")
        return target

    @classmethod
    def load(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        return cls(path / "tokenizer.model" if path.is_dir() else path)


class WordTokenizer:
    """Whole words as CTC units (blank = 0), for closed-vocabulary corpora such as GRID / SynthGRID.

    GRID sentences are 6 words from a 51-word grammar spoken in about 2 s: at AV-HuBERT's
    25 Hz that is ~50 frames for ~30 characters, too tight for character CTC to learn
    quickly on a CPU budget, but easy with 6 word labels. Unknown words are an error.
    """

    kind = "word"
    blank_id = 0

    def __init__(self, words: Iterable[str]):
        self.words = sorted(set(words))
        if not self.words:
            raise TokenizerError("WordTokenizer needs at least one word")
        self.symbols = [BLANK] + self.words
        self._index = {w: i for i, w in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, utt_id: str | None = None) -> list[int]:
        words = text.split()
        if not words:
            raise TokenizerError(f"{_where(utt_id)}: empty transcript")
        unknown = [w for w in words if w not in self._index]
        if unknown:
            raise TokenizerError(f"{_where(utt_id)}: word {unknown[0]!r} in {text!r} is not in the word vocabulary "
                                 f"({len(self.words)} words from the training transcripts)")
        return [self._index[w] for w in words]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(_symbols(ids, self.symbols))

    def save(self, out_dir: str | Path) -> Path:
        return _write_spec(out_dir, self.kind, words=self.words)

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        return cls(_read_spec(path, cls.kind, "words"))


Tokenizer = CharTokenizer | SentencePieceTokenizer | WordTokenizer


def build_tokenizer(kind: str, texts: Iterable[str], out_dir: str | Path, vocab_size: int = 64) -> Tokenizer:
    """Build (char: fixed alphabet; sentencepiece: trained on `texts`), save into `out_dir`, return it.

    Char tokenizers check every transcript here, so a bad character fails before training.
    """
    out_dir = Path(out_dir)
    texts = list(texts)
    if kind == "char":
        tok: Tokenizer = CharTokenizer()
        for i, t in enumerate(texts):
            tok.encode(t, utt_id=f"#{i}")
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer.train(texts, vocab_size, out_dir / "tokenizer")
    elif kind == "word":
        tok = WordTokenizer(w for t in texts for w in t.split())
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected 'char', 'sentencepiece' or 'word'")
    tok.save(out_dir)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load whatever `build_tokenizer` saved into the directory `path`."""
    spec_path = Path(path) / "tokenizer.json"
    try:
        kind = json.loads(read_text(spec_path, TokenizerError))["kind"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise TokenizerError(f"{spec_path}: cannot read the tokenizer spec ({e}); build it with data.tokenizer.build_tokenizer") from e
    if kind == "char":
        return CharTokenizer.load(spec_path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.load(Path(path))
    if kind == "word":
        return WordTokenizer.load(spec_path)
    raise TokenizerError(f"{spec_path}: unknown tokenizer kind {kind!r}")
