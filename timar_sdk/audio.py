"""Audio input for every part of the SDK: files and in-memory arrays to float32 mono.

TIMAR works on 16 kHz mono audio in [-1, 1] (docs/DESIGN.md 1). Arrays returned here are 1-D
float32 of shape [samples]. numpy, soundfile and soxr only (no torch).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from timar_sdk.errors import TimarInputError
from timar_sdk.layout import AUDIO_LIMIT, SAMPLE_RATE

__all__ = ["RunningNorm", "load_audio", "to_float32"]


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file (any format soundfile reads) as float32 mono at `sample_rate` Hz.

    Multi-channel files are downmixed by averaging the channels. A file at another rate is
    resampled with soxr (HQ) and a `UserWarning` names the file, its rate and the target rate.
    Integer PCM is scaled to [-1, 1) by soundfile.

    Returns: float32 array [samples] at `sample_rate`.
    Raises: ValueError naming the file when it holds NaN or Inf samples.
    """
    data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)  # [samples, channels]
    audio = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(audio).all():
        raise ValueError(f"audio file {path} contains NaN or Inf samples")
    if rate != sample_rate and audio.size:
        warnings.warn(f"audio file {path} is at {rate} Hz, resampling to {sample_rate} Hz",
                      stacklevel=2)
        audio = soxr.resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def to_float32(audio: np.ndarray, name: str = "audio") -> np.ndarray:
    """Check an in-memory waveform and return it as a 1-D float32 array [samples].

    Accepts float32 / float64 arrays (values kept, expected in [-1, 1]; at most AUDIO_LIMIT = 4.0
    in magnitude) and int16 arrays (scaled by 1/32768, so -32768 -> -1.0). Raises
    TimarInputError, naming `name` and what was expected, for anything else: not a numpy array,
    another dtype, not 1-D (stereo), empty, NaN or Inf (also after the float64 -> float32 cast),
    or samples beyond AUDIO_LIMIT.
    """
    if not isinstance(audio, np.ndarray):
        raise TimarInputError(f"{name}: expected a 1-D numpy array of float32, float64 or int16 "
                              f"samples, got {type(audio).__name__}")
    if audio.dtype == np.int16:
        out = audio.astype(np.float32) / np.float32(32768.0)
    elif audio.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):   # values beyond float32 become Inf, refused below
            out = audio.astype(np.float32, copy=False)
    else:
        raise TimarInputError(f"{name}: expected dtype float32, float64 or int16, got {audio.dtype}")
    if out.ndim != 1:
        hint = " (downmix stereo first, e.g. audio.mean(axis=1))" if out.ndim == 2 else ""
        raise TimarInputError(f"{name}: expected a 1-D (mono) array [samples], got shape {audio.shape}{hint}")
    if out.size == 0:
        raise TimarInputError(f"{name}: expected at least one sample, got an empty array")
    if audio.dtype == np.int16:
        return out                          # always finite, in [-1, 1): nothing to scan for
    if not np.isfinite(out).all():
        raise TimarInputError(f"{name}: expected finite samples, found NaN or Inf")
    peak = float(np.abs(out).max())
    if peak > AUDIO_LIMIT:
        raise TimarInputError(f"{name}: expected float samples in [-1, 1] (at most {AUDIO_LIMIT:g} in "
                              f"magnitude), got a sample of magnitude {peak:.4g}; pass int16 PCM as int16, "
                              f"or divide it by 32768")
    return out


@dataclass(frozen=True)
class RunningNorm:
    """Zero-mean, unit-variance audio normalisation over everything heard so far in a stream.

    The authors' wav2vec2 models were trained on audio normalised over the *whole file*
    ((x - mean) / sqrt(var + 1e-7), the Hugging Face processor's rule). A stream cannot see the
    file's end, so the runtime uses the statistics of all samples received so far, this turn's
    included; they converge to the whole-file statistics as the conversation goes on
    (docs/AUTHORS_CHECKPOINT.md measures the difference). Immutable: `update` returns a new one,
    so a failed turn leaves the session's statistics untouched.

    A stream starts best from statistics known in advance (`from_audio`: a calibration clip of
    the speaker; `from_stats`: mean and variance the application knows), passed to
    `Session.prime_audio_normalization`; the first turns are then normalised close to what
    whole-file normalisation gives.
    """
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    eps: float = 1e-7

    @classmethod
    def from_audio(cls, audio: np.ndarray, eps: float = 1e-7) -> "RunningNorm":
        """The statistics of a calibration clip (1-D float samples, e.g. a few seconds of this
        speaker through the same microphone and gain), as if it had been heard before the stream.
        Raises ValueError when it is empty or not finite."""
        a = np.asarray(audio)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise ValueError(f"expected a non-empty 1-D array of finite float samples, got {a.dtype} {a.shape}")
        return cls(eps=eps).update(a)

    @classmethod
    def from_stats(cls, mean: float, var: float, count: int, eps: float = 1e-7) -> "RunningNorm":
        """Statistics the application knows: the `mean` and variance `var` of this speaker's float
        samples (full scale 1.0; what whole-file normalisation would compute), weighted as `count`
        samples already heard (e.g. 5 * 16000: later turns move them as much as after 5 s of
        audio). Raises ValueError naming mean, var or count."""
        mean, var = float(mean), float(var)
        if not (np.isfinite(mean) and abs(mean) <= 4.0):
            raise ValueError(f"mean: expected a finite number in [-4, 4] (float samples), got {mean!r}")
        if not (np.isfinite(var) and 0.0 <= var <= 16.0):
            raise ValueError(f"var: expected a finite variance in [0, 16] (float samples), got {var!r}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count: expected an integer >= 1 (samples the statistics stand for), got {count!r}")
        return cls(int(count), mean * int(count), (var + mean * mean) * int(count), eps)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> float:
        return max(self.total_sq / max(self.count, 1) - self.mean ** 2, 0.0)

    def check(self) -> None:
        """ValueError unless these are statistics of at least one sample: count an integer >= 1,
        finite totals, a non-negative sum of squares."""
        if isinstance(self.count, bool) or not isinstance(self.count, (int, np.integer)) or self.count < 1:
            raise ValueError(f"expected statistics of at least one sample, got count {self.count!r}")
        if not (np.isfinite(self.total) and np.isfinite(self.total_sq) and self.total_sq >= 0):
            raise ValueError(f"expected finite statistics, got total {self.total!r}, total_sq {self.total_sq!r}")

    def update(self, audio: np.ndarray) -> "RunningNorm":
        a = audio.astype(np.float64)
        return RunningNorm(self.count + a.size, self.total + float(a.sum()),
                           self.total_sq + float(np.dot(a, a)), self.eps)

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """float32 [samples] normalised with these statistics."""
        mean = self.total / max(self.count, 1)
        var = max(self.total_sq / max(self.count, 1) - mean * mean, 0.0)
        return ((audio - mean) / np.sqrt(var + self.eps)).astype(np.float32)

    def to_list(self) -> list[float]:
        return [self.count, self.total, self.total_sq]

    @classmethod
    def from_list(cls, values, eps: float = 1e-7) -> "RunningNorm":
        count, total, total_sq = values
        return cls(int(count), float(total), float(total_sq), eps)
