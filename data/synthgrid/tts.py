"""espeak-ng (from the `espeakng-loader` wheel) through ctypes, plus the per-speaker timbre transform.

espeak keeps process-global state (voice tables, and wave-generator phase/noise
state that carries over from one utterance to the next), so the same text can give
different samples depending on what was synthesised before. To make every
utterance a pure function of its arguments, `Espeak.synthesize` forks a child per
call: the parent initialises espeak once and never synthesises, each child starts
from that pristine state, synthesises one utterance and pipes the samples and the
phoneme events back. A fork costs a few milliseconds. Never call this from threads.
"""

from __future__ import annotations

import ctypes
import os
import pickle
from dataclasses import dataclass

import numpy as np
from scipy import signal

ESPEAK_RATE = 22050  # espeak-ng's native output rate
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_PHONEME_EVENTS = 0x0001
ESPEAK_CHARS_UTF8 = 1
ESPEAK_PHONEMES = 0x100  # text inside [[ ]] is espeak phoneme code
EVENT_LIST_TERMINATED = 0
EVENT_PHONEME = 7
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4
POS_CHARACTER = 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    # espeak_EVENT in speak_lib.h (API revision 12); ctypes applies the same alignment as C
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of the synthesised audio
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Synthesis:
    samples: np.ndarray  # int16 at ESPEAK_RATE
    phonemes: list[tuple[float, str]]  # (start time in s, espeak phoneme mnemonic, stress marks stripped)


class EspeakError(RuntimeError):
    pass


class Espeak:
    """One per process. `synthesize` is deterministic given its arguments (see module doc)."""

    _instance_pid: int | None = None

    def __init__(self) -> None:
        import espeakng_loader

        if Espeak._instance_pid == os.getpid():
            raise EspeakError("espeak is process-global: create one Espeak per process (use worker processes, not threads)")
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        data_path = espeakng_loader.get_data_path()
        rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), ESPEAK_INITIALIZE_PHONEME_EVENTS)
        if rate != ESPEAK_RATE:
            raise EspeakError(f"espeak_Initialize({data_path}) returned {rate}; expected sample rate {ESPEAK_RATE}")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[float, str]] = []
        self._callback = _CALLBACK(self._on_synth)  # keep a reference: espeak holds the raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        Espeak._instance_pid = os.getpid()

    def _on_synth(self, wav, n, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == EVENT_PHONEME:
                name = bytes(ev.id.string).split(b"\0")[0].decode("utf-8", "replace").lstrip("',%=")
                self._events.append((ev.audio_position / 1000.0, name))
            i += 1
        return 0

    def _synthesize_here(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int) -> Synthesis:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"espeak voice {voice!r} not found in the espeakng-loader data")
        for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch), (PARAM_RANGE, pitch_range)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))  # some noise sources use libc rand()
        self._chunks.clear()
        self._events.clear()
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8 | ESPEAK_PHONEMES, None, None)
        self.lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise EspeakError(f"espeak_Synth failed (error {err}) for {text!r} with voice {voice!r}")
        return Synthesis(np.concatenate(self._chunks), list(self._events))

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int = 0) -> Synthesis:
        """Synthesise in a forked child so that no state leaks between utterances."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: synthesise, send, exit without running Python cleanup
            status = 0
            try:
                os.close(read_fd)
                try:
                    payload = pickle.dumps(("ok", self._synthesize_here(text, voice, rate, pitch, pitch_range, seed)))
                except Exception as e:  # report to the parent instead of dying silently
                    payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
                with os.fdopen(write_fd, "wb") as f:
                    f.write(payload)
            except BaseException:
                status = 1
            os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as f:
            payload = f.read()  # read everything before waiting: the result is larger than a pipe buffer
        _, status = os.waitpid(pid, 0)
        if not payload:
            raise EspeakError(f"espeak child process died (status {status}) synthesising {text!r} with voice {voice!r}")
        kind, result = pickle.loads(payload)
        if kind != "ok":
            raise EspeakError(result)
        return result


# ----------------------------------------------------------------------------- timbre
def _peaking_eq(freq: float, gain_db: float, q: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """RBJ audio-EQ-cookbook peaking biquad."""
    a = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * freq / rate
    alpha = np.sin(w0) / (2 * q)
    b = np.array([1 + alpha * a, -2 * np.cos(w0), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * np.cos(w0), 1 - alpha / a])
    return b / den[0], den / den[0]


def vtl_resample_ratio(vtl: float) -> tuple[int, int]:
    """(up, down) for resample_poly from 22050 Hz to 16 kHz with a vocal-tract-length factor.

    Treating espeak's output as if it had been recorded at 22050*vtl Hz scales every
    formant (and F0, and the tempo) by `vtl`: vtl > 1 is a shorter vocal tract.
    The factor is quantised to 1/441 so the polyphase ratio stays small.
    """
    return 320, int(round(441 * vtl))


def apply_timbre(
    samples: np.ndarray,
    vtl: float,
    tilt: float,
    eq_freq: float,
    eq_gain_db: float,
    breath: float,
    rng: np.random.Generator,
    out_rate: int = 16000,
) -> tuple[np.ndarray, float]:
    """int16 espeak samples -> float32 at `out_rate` with the speaker's timbre.

    Returns (audio, time_scale): an event at time t in the espeak output is at
    t * time_scale in the returned audio.
    """
    if out_rate != 16000:
        raise ValueError(f"SynthGRID audio is generated at 16000 Hz, got sample_rate={out_rate}")
    up, down = vtl_resample_ratio(vtl)
    x = signal.resample_poly(samples.astype(np.float64) / 32768.0, up, down)
    time_scale = 441.0 / down
    # spectral tilt: first-order pre-emphasis (tilt > 0 brighter, < 0 darker), gain-normalised at 1 kHz
    x = signal.lfilter([1.0, -tilt], [1.0], x) / abs(1 - tilt * np.exp(-2j * np.pi * 1000 / out_rate))
    b, a = _peaking_eq(eq_freq, eq_gain_db, 1.2, out_rate)
    x = signal.lfilter(b, a, x)
    if breath > 0:  # aspiration noise that follows the speech envelope
        env = signal.lfilter([0.02], [1, -0.98], np.abs(x))
        noise = np.diff(rng.standard_normal(len(x) + 1))
        x = x + breath * env * noise
    return x.astype(np.float32), time_scale
