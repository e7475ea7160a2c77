"""What a real microphone track does to clean speech: room, crosstalk, noise, colouring, level.

`microphone_track(own, others, rng)` turns one speaker's dry (clean, time-placed) voice into
the track a headset or table microphone would record, with scipy.signal and soxr:

1. room: each voice is convolved with a room impulse response (exponentially decaying noise,
   RT60 0.15..0.7 s, a direct path on top; the direct-to-reverberant ratio is high for the
   own voice at the microphone and low for the others, who are farther away);
2. crosstalk: the other speakers' voices leak in 20..30 dB below the own voice (real headset
   tracks carry the other people in the room);
3. colouring: a high-pass (mic and cable rumble filter, 50..200 Hz), a low-pass (4..7.6 kHz)
   or, for about one track in five, a round trip through 8 or 11.025 kHz (telephone-like band
   and resampling artefacts), and one or two random peaking EQ bands (+-6 dB);
4. noise: a stationary floor (white, pink or brown mix, sometimes mains hum) at -70..-48 dBFS;
5. level: the own voice's active speech level lands at -32..-16 dBFS; the track is scaled down
   if its peak would pass 0.99, so samples stay in [-1, 1].
"""
from __future__ import annotations

import numpy as np
import soxr
from scipy import signal

from timar_sdk.layout import SAMPLE_RATE

__all__ = ["microphone_track", "active_level_db"]


def active_level_db(x: np.ndarray, hop: int = 640) -> float:
    """Active speech level (dBFS): RMS over the 40 ms frames within 30 dB of the loudest."""
    n = len(x) // hop
    if n == 0:
        return -120.0
    rms = np.sqrt((x[:n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(1)) + 1e-12
    db = 20 * np.log10(rms)
    active = db > db.max() - 30
    return float(10 * np.log10(np.mean(rms[active] ** 2)))


def _room_impulse(rng: np.random.Generator, rt60: float, drr_db: float) -> np.ndarray:
    """A room impulse response float64 [samples]: a unit direct path, then decaying noise
    whose energy is `drr_db` below the direct path's, darker as it decays (air absorption)."""
    n = int(1.2 * rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * 10 ** (-3 * t / rt60)        # -60 dB at t = rt60
    tail[: int(rng.uniform(0.002, 0.01) * SAMPLE_RATE)] = 0.0     # first reflection delay
    sos = signal.butter(2, rng.uniform(3000, 6000), fs=SAMPLE_RATE, output="sos")
    tail = signal.sosfilt(sos, tail)
    tail *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(tail ** 2) + 1e-12)
    tail[0] += 1.0
    return tail


def _coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS stationary noise [n]: a random mix of white, pink (1/f) and brown (1/f^2)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    slope = rng.choice([0.0, 0.5, 1.0], p=[0.3, 0.5, 0.2])       # amplitude ~ f^-slope
    x = np.fft.irfft(spec * f ** -slope, n)
    if rng.random() < 0.2:                                        # mains hum and harmonics
        mains = rng.choice([50.0, 60.0])
        t = np.arange(n) / SAMPLE_RATE
        x = x / (x.std() + 1e-12) + sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * mains * t)
                                        for k in (1, 2, 3))
    return x / (x.std() + 1e-12)


def _colour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Microphone and channel colouring: high-pass, band limit or resampling, peaking EQ."""
    sos = signal.butter(2, rng.uniform(50, 200), "highpass", fs=SAMPLE_RATE, output="sos")
    x = signal.sosfilt(sos, x)
    if rng.random() < 0.2:
        low_rate = float(rng.choice([8000.0, 11025.0]))
        y = soxr.resample(soxr.resample(x, SAMPLE_RATE, low_rate), low_rate, SAMPLE_RATE)
        x = np.pad(y[:len(x)], (0, max(0, len(x) - len(y))))
    else:
        sos = signal.butter(4, rng.uniform(4000, 7600), fs=SAMPLE_RATE, output="sos")
        x = signal.sosfilt(sos, x)
    for _ in range(int(rng.integers(1, 3))):                     # peaking EQ bands
        centre = np.exp(rng.uniform(np.log(200), np.log(5000)))
        band = signal.butter(1, [centre / 1.5, min(centre * 1.5, 7900)], "bandpass",
                             fs=SAMPLE_RATE, output="sos")
        gain = 10 ** (rng.uniform(-6, 6) / 20) - 1.0
        x = x + gain * signal.sosfilt(band, x)
    return x


def microphone_track(own: np.ndarray, others: list[np.ndarray],
                     rng: np.random.Generator) -> np.ndarray:
    """One speaker's microphone track float32 [samples] (16 kHz, in [-1, 1]).

    own: float [samples] the speaker's dry voice; others: the other voices in the room
    (same length), heard as crosstalk. See the module doc for the steps.
    """
    n = len(own)
    own_db = active_level_db(own)
    rt60 = rng.uniform(0.15, 0.7)
    out = signal.fftconvolve(own, _room_impulse(rng, rt60, rng.uniform(8, 20)))[:n]
    for voice in others:
        if not np.any(voice):
            continue
        leak = signal.fftconvolve(voice, _room_impulse(rng, rt60, rng.uniform(-6, 4)))[:n]
        rel = active_level_db(leak) - own_db + rng.uniform(20, 30)
        out = out + leak * 10 ** (-rel / 20)
    out = _colour(out, rng)
    target_db = rng.uniform(-32, -16)
    out = out * 10 ** ((target_db - active_level_db(out)) / 20)
    out = out + _coloured_noise(rng, n) * 10 ** (rng.uniform(-70, -48) / 20)
    peak = np.abs(out).max()
    if peak > 0.99:
        out = out * (0.99 / peak)
    return out.astype(np.float32)
