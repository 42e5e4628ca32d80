"""The GRID sentence grammar (Cooke et al., 2006): six slots, 51 words.

A sentence is `command colour preposition letter digit adverb`, e.g.
"BIN BLUE AT F TWO NOW". Letters exclude W (three syllables in English, as in GRID).
"""

from __future__ import annotations

import numpy as np

COMMANDS = ("BIN", "LAY", "PLACE", "SET")
COLOURS = ("BLUE", "GREEN", "RED", "WHITE")
PREPOSITIONS = ("AT", "BY", "IN", "WITH")
LETTERS = tuple(c for c in "ABCDEFGHIJKLMNOPQRSTUVXYZ")  # no W
DIGITS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")
ADVERBS = ("AGAIN", "NOW", "PLEASE", "SOON")

SLOTS = (COMMANDS, COLOURS, PREPOSITIONS, LETTERS, DIGITS, ADVERBS)
GRID_WORDS: tuple[str, ...] = tuple(w for slot in SLOTS for w in slot)
assert len(GRID_WORDS) == 51 and len(set(GRID_WORDS)) == 51

# espeak reads a lone "A" as the article and "I" as the pronoun; GRID speakers say
# the letter names, so those two are given as espeak phoneme strings.
_LETTER_PHONEMES = {"A": "[['eI]]", "I": "[['aI]]"}


def sample_sentence(rng: np.random.Generator) -> list[str]:
    """One GRID sentence (upper-case words), uniformly over each slot."""
    return [slot[int(rng.integers(len(slot)))] for slot in SLOTS]


def espeak_text(words: list[str]) -> str:
    """Text for espeak (synthesised with the espeakPHONEMES flag so [[...]] is honoured)."""
    out = []
    for w in words:
        if w not in GRID_WORDS:
            raise ValueError(f"{w!r} is not a GRID word; expected one of {', '.join(GRID_WORDS)}")
        if w in _LETTER_PHONEMES:
            out.append(_LETTER_PHONEMES[w])
        elif len(w) == 1:
            out.append(w)  # upper-case single letter: espeak says the letter name
        else:
            out.append(w.lower())
    return " ".join(out)
