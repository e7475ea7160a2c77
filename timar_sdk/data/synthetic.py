"""Synthetic two-person conversations in the DualTalk format (docs/DESIGN.md 6).

Deterministic from a seed, numpy only. A conversation has two speakers taking turns with
gaps, overlaps and short backchannels. Each speaker gets:

- audio: float32 [samples] at 16 kHz in [-1, 1]: voiced harmonics (band-limited pulse train)
  with a moving pitch, shaped by moving formants (vowel targets per syllable), amplitude
  modulated at the syllable rate (about 4.5 Hz), consonant noise bursts at syllable onsets and
  a noise floor (about -50 dBFS).
- motion: float32 [frames, 56] at 25 fps in the SDK layout (`timar_sdk.layout`): FLAME-like
  expression 0..49 (unitless, leading coefficients within about +-2), jaw axis-angle 50..52
  (rad) and neck axis-angle 53..55 (rad).

Dependencies a model has to learn, from both speakers:

- jaw opening (index 50, rad, 0..0.3) follows the speaker's own amplitude envelope;
- expression 0..2 follow the own envelope, loudness (0.4 s average) and pitch (semitones);
  expression 4 follows the own stress; expression 3 follows the partner's loudness;
- the listener nods (neck pitch, index 53, a damped ~1.8 Hz oscillation of up to about
  0.1 rad) just after the partner's pauses (the end of each of the partner's phrases);
- the speaker's head moves with stressed syllables (neck pitch beat, yaw and roll);
- everything has slow drift (knots every 2 s) and small noise.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

from timar_sdk.layout import FPS, MOTION_DIM, SAMPLE_RATE

__all__ = ["generate_conversation", "write_synthetic_corpus"]

CTRL_RATE = 100                      # control signals (envelope, pitch, formants), Hz
CTRL_PER_FRAME = CTRL_RATE // FPS    # 4 control steps per motion frame
HOP = 256                            # formant filter hop (samples); frames of 2 * HOP
# Vowel formant targets (F1, F2, F3) in Hz for an adult male voice.
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240],
                   [530, 1840, 2480], [570, 840, 2410], [660, 1720, 2410]], dtype=np.float64)
FORMANT_GAIN = np.array([1.0, 0.55, 0.3])
FORMANT_BW = np.array([80.0, 110.0, 160.0])   # Gaussian std of each formant peak, Hz


def generate_conversation(seconds: float, seed: int) -> dict[str, np.ndarray]:
    """Generate one conversation of `seconds` seconds, fully determined by `seed`.

    Returns a dict with `audio1`, `audio2`: float32 [frames * 640] at 16 kHz, and `motion1`,
    `motion2`: float32 [frames, 56] at 25 fps, where frames = round(seconds * 25).
    """
    n_frames = int(round(seconds * FPS))
    if n_frames < 1:
        raise ValueError(f"seconds must give at least one frame at {FPS} fps, got {seconds}")
    n_ctrl = n_frames * CTRL_PER_FRAME
    n_samples = n_frames * (SAMPLE_RATE // FPS)
    rng = np.random.default_rng(seed)
    voices = [_voice(rng) for _ in range(2)]
    phrases = _schedule(n_frames / FPS, rng)
    sylls = [_syllables(phrases[s], rng) for s in range(2)]
    ctrl = [_control(sylls[s], phrases[s], voices[s], n_ctrl, rng) for s in range(2)]
    out = {}
    for s in range(2):
        out[f"audio{s + 1}"] = _synth_audio(ctrl[s], sylls[s], voices[s], n_samples, rng)
    for s in range(2):
        pauses = np.array([end for _, end, bc in phrases[1 - s] if not bc])
        out[f"motion{s + 1}"] = _motion(ctrl[s], ctrl[1 - s], sylls[s], pauses, voices[s],
                                        n_frames, rng)
    return out


def write_synthetic_corpus(out_dir: str | os.PathLike, n_clips: int, seconds: float = 20.0,
                           seed: int = 0, splits: dict[str, int] | None = None) -> Path:
    """Write synthetic conversations in the DualTalk format and return `out_dir` as a Path.

    Layout: `<out_dir>/<split>/<clip>_speaker{1,2}.wav` (float32 WAV, 16 kHz mono) and
    `<clip>_speaker{1,2}.npz` with `exp` (T, 50), `pose` (T, 6) (pose[:, 0:3] neck/global,
    pose[:, 3:6] jaw) and zero `shape` (T, 100), `tex` (T, 50), `cam` (T, 3), `light` (T, 27).
    `splits` maps split name -> clip count (e.g. {"train": 40, "val": 8, "test": 8}); when it
    is None, `n_clips` clips go to "train". Clips are numbered `syn00000`, `syn00001`, ...
    across all splits in order, and clip i is generated from a seed derived from (seed, i), so
    splits never share a seed.
    """
    out = Path(out_dir)
    splits = {"train": n_clips} if splits is None else splits
    index = 0
    for split, count in splits.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            conv = generate_conversation(seconds, clip_seed)
            for s in (1, 2):
                stem = folder / f"syn{index:05d}_speaker{s}"
                sf.write(stem.with_suffix(".wav"), conv[f"audio{s}"], SAMPLE_RATE,
                         subtype="FLOAT")
                m = conv[f"motion{s}"]
                t = len(m)
                np.savez(stem.with_suffix(".npz"), exp=m[:, :50],
                         pose=np.concatenate([m[:, 53:56], m[:, 50:53]], axis=1),
                         shape=np.zeros((t, 100), np.float32), tex=np.zeros((t, 50), np.float32),
                         cam=np.zeros((t, 3), np.float32), light=np.zeros((t, 27), np.float32))
            index += 1
    return out


# ----------------------------------------------------------------------------- structure

def _voice(rng: np.random.Generator) -> dict:
    """Per-speaker constants: pitch, formant scale, loudness and motion style."""
    high = rng.random() < 0.5
    return {
        "f0": rng.uniform(175, 235) if high else rng.uniform(95, 140),    # Hz
        "formant_scale": rng.uniform(1.1, 1.2) if high else rng.uniform(0.95, 1.05),
        "gain": rng.uniform(0.7, 1.0),
        "jaw": rng.uniform(0.85, 1.1),
        "expressive": rng.uniform(0.8, 1.2),
        "nod": rng.uniform(0.08, 0.14),        # rad
        "nod_prob": rng.uniform(0.6, 0.9),
        "exp_extra": rng.normal(0.0, 0.3, size=(5, 3)),  # expressions 5..9 from (E, L, P)
    }


def _schedule(duration: float, rng: np.random.Generator) -> list[list[tuple]]:
    """Phrases per speaker: lists of (start s, end s, is_backchannel), sorted by start.

    A turn is 1-3 phrases separated by short pauses; the floor then changes after a gap
    (N(0.35, 0.35) s, clipped to [-0.6, 1.2]: negative values are overlaps). The listener
    answers about a third of the partner's phrase ends with a backchannel of 0.18-0.4 s.
    """
    phrases: list[list[tuple]] = [[], []]
    spk = int(rng.integers(2))
    t = rng.uniform(0.0, 0.6)
    while t < duration:
        if phrases[spk]:   # after an overlap, never restart before the own last phrase ended
            t = max(t, phrases[spk][-1][1] + 0.2)
        for k in range(int(rng.integers(1, 4))):
            if k:
                t += rng.uniform(0.15, 0.45)
            d = rng.uniform(0.7, 2.4)
            phrases[spk].append((t, t + d, False))
            t += d
        t += float(np.clip(rng.normal(0.35, 0.35), -0.6, 1.2))
        spk = 1 - spk
    for s in range(2):
        own = phrases[1 - s][:]
        for _, end, _ in phrases[s]:
            if rng.random() < 0.35:
                a = end + rng.uniform(0.05, 0.25)
                b = a + rng.uniform(0.18, 0.4)
                if all(b + 0.1 < p0 or a > p1 + 0.1 for p0, p1, _ in own):
                    phrases[1 - s].append((a, b, True))
    for p in phrases:
        p.sort()
    return phrases


def _syllables(phrases: list[tuple], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Syllables of one speaker: start (s), dur (s), amp (0..1), stressed (bool), vowel (int).

    Syllables last 0.16-0.28 s (about 4.5 per second) and fill each phrase; 30 % are stressed
    (louder, higher pitch); a backchannel is one quiet syllable.
    """
    start, dur, bc = [], [], []
    for a, b, is_bc in phrases:
        if is_bc:
            start.append(np.array([a]))
            dur.append(np.array([b - a]))
            bc.append(np.array([True]))
            continue
        d = rng.uniform(0.16, 0.28, size=int((b - a) / 0.16) + 1)
        s = a + np.concatenate([[0.0], np.cumsum(d)[:-1]])
        keep = s < b - 0.08
        s, d = s[keep], np.minimum(d[keep], b - s[keep])
        start.append(s)
        dur.append(d)
        bc.append(np.zeros(len(s), bool))
    start_a = np.concatenate(start) if start else np.zeros(0)
    dur_a = np.concatenate(dur) if dur else np.zeros(0)
    bc_a = np.concatenate(bc) if bc else np.zeros(0, bool)
    n = len(start_a)
    stressed = (rng.random(n) < 0.3) & ~bc_a
    amp = np.where(stressed, rng.uniform(0.8, 1.0, n), rng.uniform(0.35, 0.65, n))
    amp = np.where(bc_a, rng.uniform(0.25, 0.45, n), amp)
    return {"start": start_a, "dur": dur_a, "amp": amp, "stressed": stressed, "bc": bc_a,
            "vowel": rng.integers(len(VOWELS), size=n), "sign": rng.choice([-1.0, 1.0], n)}


def _locate(starts: np.ndarray, durs: np.ndarray, t: np.ndarray):
    """Index of the interval (sorted, non-empty list) holding each time t, the phase (0..1)
    in it, and an inside mask."""
    idx = np.searchsorted(starts, t, side="right") - 1
    safe = np.maximum(idx, 0)
    phase = (t - starts[safe]) / durs[safe]
    return safe, phase, (idx >= 0) & (phase >= 0) & (phase < 1)


def _control(syl: dict, phrases: list[tuple], voice: dict, n_ctrl: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Control signals at 100 Hz: `env` (0..1), `semitones` (pitch re the speaker's f0),
    `f0` (Hz), `formants` [n_ctrl, 3] (Hz)."""
    t = (np.arange(n_ctrl) + 0.5) / CTRL_RATE
    if len(syl["start"]) == 0:      # a speaker who stays silent in a short clip
        zero = np.zeros(n_ctrl)
        return {"env": zero, "semitones": zero, "f0": zero + voice["f0"],
                "formants": np.tile(VOWELS[0] * voice["formant_scale"], (n_ctrl, 1))}
    i, ph, inside = _locate(syl["start"], syl["dur"], t)
    env = np.where(inside, syl["amp"][i] * np.sin(np.pi * np.clip(ph, 0, 1)) ** 0.6, 0.0)
    p0 = np.array([p[0] for p in phrases])
    p1 = np.array([p[1] for p in phrases])
    pbc = np.array([p[2] for p in phrases], bool)
    j, pph, pin = _locate(p0, np.maximum(p1 - p0, 1e-6), t)
    contour = np.where(pbc[j], 2.0 * pph - 1.0, 1.5 - 3.0 * pph)
    semis = np.where(pin, contour, 0.0)
    semis += np.where(inside & syl["stressed"][i], 2.5 * np.sin(np.pi * np.clip(ph, 0, 1)), 0.0)
    semis += 0.7 * _smooth_noise(rng, n_ctrl, 1, CTRL_RATE)[:, 0]
    semis = np.where(env > 0, semis, 0.0)
    centres = syl["start"] + 0.5 * syl["dur"]
    targets = VOWELS[syl["vowel"]] * voice["formant_scale"]
    formants = np.stack([np.interp(t, centres, targets[:, k]) for k in range(3)], axis=1)
    return {"env": env, "semitones": semis, "f0": voice["f0"] * 2.0 ** (semis / 12.0),
            "formants": formants}


# ----------------------------------------------------------------------------- audio

def _synth_audio(ctrl: dict, syl: dict, voice: dict, n_samples: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Audio of one speaker, float32 [n_samples] at 16 kHz."""
    t = np.arange(n_samples) / SAMPLE_RATE
    tc = (np.arange(len(ctrl["env"])) + 0.5) / CTRL_RATE
    env = np.interp(t, tc, ctrl["env"]).astype(np.float32)
    f0 = np.repeat(ctrl["f0"] * (1.0 / SAMPLE_RATE), SAMPLE_RATE // CTRL_RATE)  # cycles/sample
    # Band-limited pulse train: sum_{k=1..K} cos(k phi) in closed form (Dirichlet kernel);
    # the phase is accumulated in float64, the rest runs in float32.
    n_harm = int(4500 // voice["f0"])
    cycles = np.cumsum(f0)
    phi = (2 * np.pi * (cycles - np.floor(cycles))).astype(np.float32)
    half = np.sin(np.float32(0.5) * phi)
    small = np.abs(half) < 1e-4
    pulses = np.where(small, np.float32(n_harm),
                      np.sin(np.float32(n_harm + 0.5) * phi) / (2 * np.where(small, 1, half)) - 0.5)
    voiced = _formant_filter(pulses * env / np.float32(np.sqrt(n_harm)), ctrl["formants"])
    # Consonant bursts: high-passed noise decaying over ~25 ms after 60 % of syllable onsets.
    burst = np.zeros(n_samples, np.float32)
    onsets = (syl["start"] * SAMPLE_RATE).astype(int)
    pick = (rng.random(len(onsets)) < 0.6) & ~syl["bc"] & (onsets < n_samples)
    kernel = np.exp(-np.arange(int(0.06 * SAMPLE_RATE)) / (0.025 * SAMPLE_RATE)).astype(np.float32)
    for on, a in zip(onsets[pick], syl["amp"][pick]):
        seg = burst[on:on + len(kernel)]
        seg += a * kernel[:len(seg)]
    noise = rng.standard_normal(n_samples + 1, dtype=np.float32)
    audio = 0.8 * voiced + 0.12 * burst * np.diff(noise) + 0.003 * noise[1:]  # + noise floor
    return np.float32(voice["gain"]) * audio


def _formant_filter(x: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """Shape x [samples] with a moving formant envelope; float32 [samples] out.

    formants: [n_ctrl, 3] Hz at 100 Hz. Periodic Hann frames of 2*HOP samples at hop HOP,
    filtered in the frequency domain and overlap-added; such windows sum to one, so a flat
    envelope gives x back. Even and odd frames each tile the signal without overlap, so each
    set is a plain reshape.
    """
    n = len(x)
    n_pairs = n // (2 * HOP) + 2
    padded = np.zeros((2 * n_pairs + 1) * HOP, np.float32)
    padded[HOP:HOP + n] = x
    win = (0.5 - 0.5 * np.cos(np.pi * np.arange(2 * HOP) / HOP)).astype(np.float32)
    freqs = np.fft.rfftfreq(2 * HOP, 1.0 / SAMPLE_RATE).astype(np.float32)
    tilt = (1.0 / (1.0 + freqs / 1500.0)).astype(np.float32)
    tc = (np.arange(len(formants)) + 0.5) / CTRL_RATE
    out = np.zeros_like(padded)
    for offset in (0, HOP):
        seg = slice(offset, offset + 2 * HOP * n_pairs)
        centre = (offset + 2 * HOP * np.arange(n_pairs)) / SAMPLE_RATE  # s, unpadded time
        shape = np.full((n_pairs, len(freqs)), 0.02, np.float32)
        for k in range(3):
            fk = np.interp(centre, tc, formants[:, k]).astype(np.float32)[:, None]
            u = (freqs[None, :] - fk) * np.float32(1.0 / FORMANT_BW[k])
            shape += np.float32(FORMANT_GAIN[k]) * np.exp(-0.5 * u * u)
        spec = np.fft.rfft(padded[seg].reshape(n_pairs, 2 * HOP) * win, axis=1)
        out[seg] += np.fft.irfft(spec * (shape * tilt), n=2 * HOP, axis=1).reshape(-1)
    return out[HOP:HOP + n]


# ----------------------------------------------------------------------------- motion

def _motion(own: dict, partner: dict, syl: dict, partner_pauses: np.ndarray, voice: dict,
            n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Motion of one speaker, float32 [n_frames, 56] in the SDK layout (see module doc)."""
    def per_frame(x):
        return x.reshape(n_frames, CTRL_PER_FRAME).mean(axis=1)

    env = per_frame(own["env"])                                   # 0..1, syllable rate
    loud = _smooth(env, 10)                                       # 0.4 s average
    pitch = _smooth(per_frame(own["semitones"]), 5)                 # semitones, 0 unvoiced
    p_loud = _smooth(per_frame(partner["env"]), 10)
    speaking = _smooth(env > 0.02, 12) > 0.05                     # own voice near this frame

    # Stress: impulses at stressed syllable onsets, smoothed into head/face beats.
    stress = np.zeros(n_frames)
    stress_yaw = np.zeros(n_frames)
    on = (syl["start"] * FPS).astype(int)
    ok = syl["stressed"] & (on < n_frames)
    np.add.at(stress, on[ok], syl["amp"][ok])
    np.add.at(stress_yaw, on[ok], syl["amp"][ok] * syl["sign"][ok])
    beat = np.sin(np.pi * np.arange(10) / 10) ** 2                # 0.4 s bump
    stress = np.convolve(stress, beat)[:n_frames]
    stress_yaw = np.convolve(stress_yaw, beat)[:n_frames]

    # Nods: the listener answers the partner's pauses with a damped oscillation.
    nod = np.zeros(n_frames)
    at = ((partner_pauses + rng.uniform(0.1, 0.3, len(partner_pauses))) * FPS).astype(int)
    go = rng.random(len(at)) < voice["nod_prob"]
    amp = rng.uniform(0.6, 1.0, len(at))
    for a, g, m in zip(at, go, amp):
        if g and a < n_frames and not speaking[a]:
            nod[a] += m
    tk = np.arange(int(1.2 * FPS)) / FPS
    nod = np.convolve(nod, np.sin(2 * np.pi * 1.8 * tk) * np.exp(-tk / 0.35))[:n_frames]

    motion = np.zeros((n_frames, MOTION_DIM))
    sigma = 0.45 / (1.0 + np.arange(50) / 6.0)
    motion[:, :50] = _smooth_noise(rng, n_frames, 50, 2 * FPS) * sigma
    motion[:, :50] += 0.03 * rng.standard_normal((n_frames, 50)) * sigma / sigma[0]
    e = voice["expressive"]
    motion[:, 0] += e * 1.8 * env
    motion[:, 1] += e * (2.0 * loud + 0.15 * pitch)
    motion[:, 2] += e * 0.35 * pitch
    motion[:, 3] += e * (1.2 * p_loud + 0.5 * nod)
    motion[:, 4] += e * 0.6 * stress
    motion[:, 5:10] += e * np.stack([env, loud, 0.3 * pitch], axis=1) @ voice["exp_extra"].T

    motion[:, 50] = np.clip(0.015 + 0.22 * voice["jaw"] * env ** 0.9
                            + 0.004 * rng.standard_normal(n_frames), 0.0, 0.3)
    motion[:, 51:53] = 0.01 * _smooth_noise(rng, n_frames, 2, FPS)

    drift = _smooth_noise(rng, n_frames, 3, 2 * FPS) * np.array([0.05, 0.12, 0.04])
    motion[:, 53:56] = drift + 0.003 * rng.standard_normal((n_frames, 3))
    motion[:, 53] += voice["nod"] * nod + 0.05 * stress + 0.02 * loud
    motion[:, 54] += 0.04 * stress_yaw
    motion[:, 55] += 0.02 * stress_yaw
    return motion.astype(np.float32)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of a 1-D signal (same length)."""
    x = np.asarray(x, float)
    start = (width - 1) // 2
    return np.convolve(x, np.ones(width) / width)[start:start + len(x)]


def _smooth_noise(rng: np.random.Generator, n: int, dims: int, spacing: int) -> np.ndarray:
    """Slowly varying noise [n, dims] with about unit std: Gaussian knots every `spacing`
    steps, linearly interpolated and box-smoothed over `spacing`."""
    n_knots = n // spacing + 3
    knots = rng.standard_normal((n_knots, dims))
    pos = np.arange(n + spacing) / spacing
    lin = np.stack([np.interp(pos, np.arange(n_knots), knots[:, d]) for d in range(dims)], 1)
    box = np.ones(spacing) / spacing
    out = np.stack([np.convolve(lin[:, d], box, mode="valid")[:n] for d in range(dims)], 1)
    return out / 0.75
