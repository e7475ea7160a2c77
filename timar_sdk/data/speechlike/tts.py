"""Offline text-to-speech with per-phoneme timings: espeak-ng and Festival.

Both engines install from Debian (`apt-get install espeak-ng festival festvox-kallpc16k
festvox-kdlpc16k festvox-us-slt-hts`); nothing is downloaded at run time.

- espeak-ng runs in-process through its C library (libespeak-ng.so.1, via ctypes) in
  synchronous mode with phoneme events switched on: each event gives a phoneme's mnemonic
  (espeak's ASCII phoneme names, e.g. `aI`, `T`, `_:`) and its start in the audio in ms. This
  is what espeak-ng's own `--pho` option would need an MBROLA voice for.
- Festival runs as a subprocess (`festival -b script.scm`), one per batch of texts; each
  utterance is saved as a WAV and a `.segs` file of segment end times (Festival's radio
  phone set: `aa`, `th`, `pau`, ...).

`synthesize(voice, texts)` returns one `Utterance` per text: the audio at 16 kHz and the
phone segments. Both engines are deterministic: the same voice and text give the same audio.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from timar_sdk.layout import SAMPLE_RATE

__all__ = ["Voice", "Utterance", "available_engines", "synthesize", "APT_PACKAGES",
           "FESTIVAL_VOICES", "ESPEAK_ACCENTS", "ESPEAK_VARIANTS"]

APT_PACKAGES = "espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"

# espeak-ng English voices and voice variants (timbre presets shipped in espeak-ng-data).
ESPEAK_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = {"male": ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "klatt", "klatt3", "david",
                            "edward", "john", "max", "paul"),
                   "female": ("f1", "f2", "f3", "f4", "f5", "klatt4", "belinda", "linda",
                              "anika", "grandma")}
# Festival voice -> (sex, folder under /usr/share/festival/voices, uses int_lr intonation)
FESTIVAL_VOICES = {"kal_diphone": ("male", "english/kal_diphone", True),
                   "ked_diphone": ("male", "english/ked_diphone", True),
                   "cmu_us_slt_arctic_hts": ("female", "us/cmu_us_slt_arctic_hts", False)}
FESTIVAL_ROOT = Path("/usr/share/festival/voices")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    engine: "espeak" or "festival". name: an espeak voice with variant (`en-us+m3`) or a
    Festival voice (`kal_diphone`). pitch, pitch_range: espeak's 0..100 (50 = the voice's
    default); for Festival's diphone voices pitch is the target mean F0 in Hz (0 = default).
    rate: speaking rate in words per minute (espeak; Festival stretches durations by 175/rate).
    """
    engine: str
    name: str
    pitch: float = 50
    pitch_range: float = 50
    rate: float = 175


@dataclass
class Utterance:
    """One synthesized text. audio: float32 [samples] at 16 kHz, about -1..1 (engine level).
    phones: the engine's phone names; start, end: float64 [n] in seconds from the audio start
    (pauses are phones too: espeak `_`, `_:`; Festival `pau`)."""
    text: str
    audio: np.ndarray
    phones: list[str]
    start: np.ndarray
    end: np.ndarray

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def available_engines() -> tuple[str, ...]:
    """The engines installed on this machine, from ("espeak", "festival")."""
    found = []
    if ctypes.util.find_library("espeak-ng"):
        found.append("espeak")
    if shutil.which("festival") and all((FESTIVAL_ROOT / folder).is_dir()
                                        for _, folder, _ in FESTIVAL_VOICES.values()):
        found.append("festival")
    return tuple(found)


def synthesize(voice: Voice, texts: list[str]) -> list[Utterance]:
    """Synthesize each text with `voice`; one Utterance per text, in order.

    espeak-ng keeps state from one utterance to the next (the same text said twice comes out
    a few samples apart), so each call runs the library in a fresh forked process: the
    result depends only on (voice, texts).
    """
    if voice.engine == "espeak":
        return _in_fresh_process(_espeak_batch, voice, texts)
    if voice.engine == "festival":
        return _festival(voice, texts)
    raise ValueError(f"unknown TTS engine {voice.engine!r} (espeak or festival)")


# ----------------------------------------------------------------------------- espeak-ng

class _EspeakEvent(ctypes.Structure):
    """espeak_EVENT from espeak-ng's speak_lib.h."""
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_EspeakEvent))
_EV_END_OF_LIST, _EV_PHONEME = 0, 7
_OUTPUT_SYNCHRONOUS, _INIT_PHONEME_EVENTS = 2, 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CHARS_UTF8, _PHONEME_INPUT = 1, 0x100       # flags of espeak_Synth; [[...]] = phoneme input
_POS_CHARACTER = 1


class _Espeak:
    """The espeak-ng library, initialised once per process."""

    def __init__(self):
        path = ctypes.util.find_library("espeak-ng")
        if not path:
            raise RuntimeError(f"espeak-ng is not installed (apt-get install {APT_PACKAGES})")
        self.lib = ctypes.CDLL(path)
        self.rate = self.lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _CALLBACK(self._collect)    # kept alive as long as the library
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EV_END_OF_LIST:
            if events[i].type == _EV_PHONEME:
                name = bytes(events[i].id).split(b"\0")[0].decode("ascii", "replace")
                self._events.append((name, events[i].audio_position))
            i += 1
        return 0

    def say(self, voice: Voice, text: str) -> Utterance:
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}")
        for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch),
                             (_RANGE, voice.pitch_range)):
            self.lib.espeak_SetParameter(param, int(round(value)), 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                              _CHARS_UTF8 | _PHONEME_INPUT, None, None)
        self.lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(1, np.int16)
        audio = soxr.resample(pcm.astype(np.float32) / 32768.0, self.rate, SAMPLE_RATE)
        names = [n for n, _ in self._events]
        start = np.array([ms for _, ms in self._events], np.float64) / 1000.0
        end = np.append(start[1:], len(audio) / SAMPLE_RATE)
        keep = end > start          # espeak sometimes reports two events at the same time
        return Utterance(text, audio.astype(np.float32), [n for n, k in zip(names, keep) if k],
                         start[keep], end[keep])


def _espeak_batch(voice: Voice, texts: list[str]) -> list[Utterance]:
    engine = _Espeak()
    return [engine.say(voice, t) for t in texts]


_FRESH_PROCESSES = None


def _in_fresh_process(fn, *args):
    """Run fn(*args) in a new process and return its result (exceptions re-raised here).

    The process is forked from multiprocessing's fork server, a single-threaded process started
    once: forking this process itself would deadlock when it has threads (ONNX Runtime's, a
    scheduler's, torch's) holding a lock at the moment of the fork. Each call gets a new worker
    (maxtasksperchild=1), so no state survives from one call to the next. Where there is no
    fork (Windows), it runs in-process.
    """
    global _FRESH_PROCESSES
    if not hasattr(os, "fork"):
        return fn(*args)
    if _FRESH_PROCESSES is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        _FRESH_PROCESSES = ctx.Pool(1, maxtasksperchild=1)
    return _FRESH_PROCESSES.apply(fn, args)


# ----------------------------------------------------------------------------- Festival

def _festival(voice: Voice, texts: list[str]) -> list[Utterance]:
    """Run one Festival process for all texts and read back each WAV and `.segs` file."""
    if voice.name not in FESTIVAL_VOICES:
        raise ValueError(f"unknown Festival voice {voice.name!r}: {sorted(FESTIVAL_VOICES)}")
    if not shutil.which("festival"):
        raise RuntimeError(f"Festival is not installed (apt-get install {APT_PACKAGES})")
    int_lr = FESTIVAL_VOICES[voice.name][2]
    with tempfile.TemporaryDirectory(prefix="timar-festival-") as tmp:
        lines = [f"(voice_{voice.name})",
                 f"(Parameter.set 'Duration_Stretch {175.0 / voice.rate:.3f})"]
        if int_lr and voice.pitch > 0:
            lines.append(f"(set! int_lr_params '((target_f0_mean {voice.pitch:.0f}) "
                         f"(target_f0_std {voice.pitch_range:.0f}) (model_f0_mean 170) "
                         "(model_f0_std 34)))")
        for i, text in enumerate(texts):
            clean = "".join(c for c in text if c not in '"\\[]')
            lines.append(f'(set! utt (utt.synth (Utterance Text "{clean}")))')
            lines.append(f'(utt.save.wave utt "{tmp}/{i}.wav")')
            lines.append(f'(utt.save.segs utt "{tmp}/{i}.segs")')
        script = Path(tmp) / "batch.scm"
        script.write_text("\n".join(lines) + "\n")
        subprocess.run(["festival", "-b", str(script)], check=True, capture_output=True,
                       timeout=60 + 10 * len(texts), env={**os.environ, "LC_ALL": "C"})
        out = []
        for i, text in enumerate(texts):
            audio, rate = sf.read(f"{tmp}/{i}.wav", dtype="float32", always_2d=True)
            audio = soxr.resample(audio.mean(1), rate, SAMPLE_RATE).astype(np.float32)
            names, end = [], []
            body = Path(f"{tmp}/{i}.segs").read_text().split("#", 1)[-1]
            for row in body.split("\n"):
                parts = row.split()
                if len(parts) == 3:
                    end.append(float(parts[0]))
                    names.append(parts[2])
            end_a = np.minimum(np.array(end, np.float64), len(audio) / SAMPLE_RATE)
            start = np.concatenate([[0.0], end_a[:-1]])
            keep = end_a > start
            out.append(Utterance(text, audio, [n for n, k in zip(names, keep) if k],
                                 start[keep], end_a[keep]))
        return out
