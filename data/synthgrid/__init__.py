"""SynthGRID: the embedded, generated audio-visual corpus (see data/README.md)."""

from data.synthgrid.generate import SynthGridParams, generate_corpus, make_trials, plan_utterances, synthesize_utterance
from data.synthgrid.grammar import GRID_WORDS, sample_sentence

__all__ = [
    "GRID_WORDS",
    "SynthGridParams",
    "generate_corpus",
    "make_trials",
    "plan_utterances",
    "sample_sentence",
    "synthesize_utterance",
]
