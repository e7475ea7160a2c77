"""Audio input for every part of the SDK: files and in-memory arrays to float32 mono.

TIMAR works on 16 kHz mono audio in [-1, 1] (DESIGN.md 1). Arrays returned here are 1-D
float32 of shape [samples]. numpy, soundfile and soxr only (no torch).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from timar_sdk.layout import SAMPLE_RATE

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

    Accepts float32 / float64 arrays (values kept, expected in [-1, 1]) and int16 arrays
    (scaled by 1/32768, so -32768 -> -1.0). Raises ValueError, naming `name` and what was
    expected, for anything else: not a numpy array, another dtype, not 1-D, empty, NaN or Inf
    (also after the float64 -> float32 cast).
    """
    if not isinstance(audio, np.ndarray):
        raise ValueError(f"{name}: expected a 1-D numpy array of float32, float64 or int16 "
                         f"samples, got {type(audio).__name__}")
    if audio.dtype == np.int16:
        out = audio.astype(np.float32) / np.float32(32768.0)
    elif audio.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):   # values beyond float32 become Inf, refused below
            out = audio.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{name}: expected dtype float32, float64 or int16, got {audio.dtype}")
    if out.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D (mono) array [samples], got shape {audio.shape}")
    if out.size == 0:
        raise ValueError(f"{name}: expected at least one sample, got an empty array")
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: expected finite samples, found NaN or Inf")
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
    """
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    eps: float = 1e-7

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
