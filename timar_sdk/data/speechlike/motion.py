"""A participant's head and face motion from their own speech and the others' speech.

Output: float32 [frames, 56] at 25 fps in the SDK layout (`timar_sdk.layout`). Expression
dimensions (docs/TRAINING_DATA.md has the full table):

| dim | carries | driven by |
|---|---|---|
| exp_0 | lips apart | vowels (open > mid > close), effort; attentive: parted while listening, breathing in |
| exp_1 | spread / smile | i, e, s; listener smiles at the others' pauses; speaker smiles |
| exp_2 | brows raised | pitch/energy accents, questions, listening interest |
| exp_3 | frown (brows lowered) | slow variation, thinking before a turn |
| exp_4 | lip rounding / protrusion | u, o, w, r, sh |
| exp_5 | lip closure / press | b, p, m; lips pressed while listening (attentive: in silences) |
| exp_6 | lower lip tucked (f, v) | f, v |
| exp_7..49 | other face variation | slow and fast noise, weakly mixed with the mouth channels |

Jaw (50, rad): the coarticulated jaw channel of `visemes` scaled by the speaker's jaw range,
plus a rest opening (0..0.02 rad) and a little jitter; at rest in silence. An *attentive*
listener (`random_style(rng, attentive=True)`) instead relaxes the jaw open by 0.03..0.06 rad
(per person) while someone else talks, following the others' speech within about 0.3 s, not
their syllables, and parts the lips; at rest when nobody talks; before about half of the own
phrases the mouth opens a little to breathe in (0.25..0.5 s). Neck (53..55,
axis-angle rad, x = nod with positive = face down, y = turn, z = roll): slow drift; when
speaking, a faster sway, beats on accents and a drop at phrase ends (a rise after questions);
when listening, nods after the others' phrase ends and with the own backchannels.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from timar_sdk.data.speechlike.conversation import Timeline
from timar_sdk.data.speechlike.visemes import RATE, is_pause, mouth_tracks
from timar_sdk.data.synthetic import _smooth_noise
from timar_sdk.layout import FPS, MOTION_DIM

__all__ = ["random_style", "speaker_motion", "speaking_frames"]

SUB = RATE // FPS       # control samples per motion frame
# An attentive listener's jaw relaxes open while someone talks and closes again when nobody
# does. With lulls in the floor plan, this range makes the jaw about uncorrelated with the
# partner's voice over a clip, as in real conversational FLAME data (r 0.01; a still listener
# gives -0.3), with the own silence still closed (docs/TRAINING_DATA.md, how it was set).
LISTEN_JAW_RAD = (0.03, 0.06)
ENGAGE_TAU_S = 0.3      # how fast the listening posture follows the others' speech


def random_style(rng: np.random.Generator, attentive: bool = False) -> dict:
    """Per-person motion style (constant over a clip); `attentive`: the listening posture and
    breathing in before phrases (module doc)."""
    style = {
        "jaw": rng.uniform(0.75, 1.1),         # jaw range multiplier
        "jaw_rest": rng.uniform(0.0, 0.02),    # rad, mouth at rest
    }
    if attentive:
        style["jaw_listen"] = rng.uniform(*LISTEN_JAW_RAD)   # rad, relaxed open while attending
        style["inhale_prob"] = rng.uniform(0.4, 0.8)         # mouth opens to breathe in before a phrase
    style |= {
        "lead": rng.uniform(0.0, 0.04),        # s, articulation ahead of the sound
        "lips": rng.uniform(0.8, 1.2),         # lip-shape gain
        "head": rng.uniform(0.7, 1.3),         # head motion amplitude
        "beat": rng.uniform(0.6, 1.4),         # head beats on accents
        "nod_prob": rng.uniform(0.35, 0.8),    # nods at the others' phrase ends
        "smile_prob": rng.uniform(0.1, 0.35),
        "brow": rng.uniform(0.5, 1.3),
        "offset": rng.normal(0.0, 0.3, 50) * (np.arange(50) >= 7),  # identity, exp_7..49
        "loadings": rng.normal(0.0, 0.12, (43, 5)),   # exp_7..49 <- mouth channels
    }
    return style


def speaking_frames(tl: Timeline, n_frames: int) -> np.ndarray:
    """bool [n_frames]: frames overlapping a sounding (non-pause) phone of `tl`."""
    out = np.zeros(n_frames, bool)
    for s, e, c in zip(tl.start, tl.end, tl.classes):
        if not is_pause(c):
            out[int(s * FPS):min(n_frames, int(np.ceil(e * FPS)))] = True
    return out


def _impulses(n: int, times, amps) -> np.ndarray:
    x = np.zeros(n)
    for t, a in zip(times, amps):
        k = int(round(t * FPS))
        if 0 <= k < n:
            x[k] += a
    return x


def _bump(frames: int) -> np.ndarray:
    """A raised-cosine bump of `frames` frames, peak 1."""
    return np.sin(np.pi * (np.arange(frames) + 0.5) / frames) ** 2


def _accents(tl: Timeline) -> tuple[np.ndarray, np.ndarray]:
    """Times (s, vowel centres) and strengths (0..1.5) of energy accents: vowels of phrases
    within 3 dB of the speaker's loud vowels, at least 0.35 s apart."""
    vowel = tl.vowel_mask() & ~tl.bc & (tl.end - tl.start > 0.06)
    if not vowel.any():
        return np.zeros(0), np.zeros(0)
    ref = np.percentile(tl.db[vowel], 80)
    idx = np.flatnonzero(vowel & (tl.db > ref - 3))
    times, strengths = [], []
    for i in idx:
        t = 0.5 * (tl.start[i] + tl.end[i])
        s = float(np.clip((tl.db[i] - ref + 6) / 6, 0, 1.5))
        if times and t - times[-1] < 0.35:
            if s > strengths[-1]:
                times[-1], strengths[-1] = t, s
            continue
        times.append(t)
        strengths.append(s)
    return np.array(times), np.array(strengths)


def speaker_motion(tl: Timeline, others: list[Timeline], style: dict, n_frames: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Motion float32 [n_frames, 56] of the participant whose speech is `tl`; `others` are
    the other people's timelines (partner, and the third person in meeting clips)."""
    n = n_frames
    # --- mouth: coarticulated channels, effort from each phone's loudness -----------------
    vowel = tl.vowel_mask()
    ref = np.percentile(tl.db[vowel], 80) if vowel.any() else -20.0
    gain = style["jaw"] * (0.55 + 0.5 * np.clip((tl.db - ref) / 10 + 1, 0, 1.3))
    tracks = mouth_tracks(tl.start, tl.end, tl.classes, gain, n * SUB, lead=style["lead"])
    tracks = tracks.reshape(n, SUB, -1).mean(1)           # [n, 6] per frame
    jaw_ch, open_, spread, round_, close, tuck = tracks.T
    speaking = speaking_frames(tl, n)
    talk = np.convolve(speaking.astype(float), np.ones(13) / 13, "same")   # 0..1, 0.5 s
    listening = 1.0 - np.clip(talk * 2, 0, 1)
    attentive = "jaw_listen" in style
    attending = np.zeros(n)                # 0..1: someone else talks and this person listens
    if attentive:
        for o in others:
            attending = np.maximum(attending, speaking_frames(o, n))
        a = np.exp(-1.0 / (ENGAGE_TAU_S * FPS))
        attending = lfilter([1 - a], [1, -a], attending) * listening

    # --- events ----------------------------------------------------------------------------
    acc_t, acc_s = _accents(tl)
    own_ends = [(e, q) for s, e, kind, q in tl.phrases if kind == "phrase"]
    own_bc = [s for s, e, kind, q in tl.phrases if kind == "backchannel"]
    their_ends = sorted(e for o in others for s, e, kind, q in o.phrases if kind == "phrase")
    listen_ends = [e for e in their_ends if not speaking[min(n - 1, int((e + 0.2) * FPS))]]
    nod_at = [e + rng.uniform(0.05, 0.35) for e in listen_ends if rng.random() < style["nod_prob"]]
    nod_at += [s + rng.uniform(0.0, 0.1) for s in own_bc if rng.random() < 0.7]
    smile_at = [e + rng.uniform(0.0, 0.3) for e in listen_ends if rng.random() < style["smile_prob"]]
    smile_at += [s for s, e, kind, q in tl.phrases if kind == "phrase" and rng.random() < 0.1]

    # --- expression --------------------------------------------------------------------------
    exp = np.zeros((n, 50))
    lips = style["lips"]
    posture, inhale = np.zeros(n), np.zeros(n)   # inhale 0..1: breathing in before a phrase
    if attentive:
        posture = attending * (1 + 0.2 * _smooth_noise(rng, n, 1, 2 * FPS)[:, 0])
        for start in [s for s, e, kind, q in tl.phrases if kind == "phrase"]:
            if rng.random() < style["inhale_prob"]:
                shape = rng.uniform(0.5, 1.0) * _bump(max(2, int(rng.uniform(0.25, 0.5) * FPS)))
                k = int(start * FPS) - len(shape)
                lo, hi = max(0, k), min(n, k + len(shape))
                if hi > lo:
                    inhale[lo:hi] = np.maximum(inhale[lo:hi], shape[lo - k:hi - k])
    exp[:, 0] = 2.2 * lips * open_ + 0.25 * posture + 0.3 * inhale
    smile = np.zeros(n)
    for t in smile_at:
        k = int(t * FPS)
        hold = int(rng.uniform(0.3, 1.5) * FPS)
        shape = np.concatenate([_bump(20)[:10], np.ones(hold), _bump(30)[15:]])
        seg = smile[k:k + len(shape)]
        seg += rng.uniform(0.4, 1.2) * shape[:len(seg)]
    exp[:, 1] = 1.1 * lips * spread + smile
    brow = np.convolve(_impulses(n, acc_t, acc_s * (rng.random(len(acc_t)) < 0.4)), _bump(10))[:n]
    brow += np.convolve(_impulses(n, [e for e, q in own_ends if q], np.ones(len(own_ends))),
                        _bump(20))[:n]
    brow += 0.4 * np.convolve(_impulses(n, listen_ends, rng.random(len(listen_ends)) < 0.2),
                              _bump(25))[:n]
    exp[:, 2] = style["brow"] * (0.8 * brow + 0.25 * _smooth_noise(rng, n, 1, 2 * FPS)[:, 0])
    turn_starts = [s for s, e, kind, q in tl.phrases if kind == "phrase"]
    think = np.convolve(_impulses(n, [s - 0.6 for s in turn_starts],
                                  0.4 * (rng.random(len(turn_starts)) < 0.25)), _bump(20))[:n]
    exp[:, 3] = 0.35 * _smooth_noise(rng, n, 1, 3 * FPS)[:, 0] + think
    exp[:, 4] = 1.6 * lips * round_
    press = np.clip(_smooth_noise(rng, n, 1, 2 * FPS)[:, 0], 0, None)
    exp[:, 5] = 1.6 * lips * close + 0.3 * press * listening * (1 - attending)
    exp[:, 6] = 1.3 * lips * tuck
    # exp_7..49: per dimension, half slow drift, half fast AR(1) texture (lag-1 0.85).
    sigma = 0.7 / (1.0 + np.arange(43) / 40.0)
    slow = _smooth_noise(rng, n, 43, 2 * FPS)
    fast = lfilter([np.sqrt(1 - 0.85 ** 2)], [1, -0.85], rng.standard_normal((n, 43)), axis=0)
    mouth = np.stack([jaw_ch / 0.1, open_, spread, round_, close], axis=1)
    exp[:, 7:] = (slow + fast) * sigma / np.sqrt(2) + mouth @ style["loadings"].T
    exp += style["offset"]

    # --- jaw -----------------------------------------------------------------------------------
    jitter = lfilter([1.0], [1, -0.8], rng.standard_normal(n)) * 0.0035
    jitter += 0.008 * _smooth_noise(rng, n, 1, FPS // 2)[:, 0]
    jaw = style["jaw_rest"] + jaw_ch + jitter
    if attentive:
        jaw += style["jaw_listen"] * posture + 0.03 * inhale * (1 - np.clip(jaw_ch / 0.05, 0, 1))
    jaw = np.clip(jaw, -0.01, 0.4)

    # --- neck -----------------------------------------------------------------------------------
    h = style["head"]
    neck = _smooth_noise(rng, n, 3, 2 * FPS) * np.array([0.06, 0.10, 0.035]) * h
    sway = np.array([0.025, 0.04, 0.02]) + np.array([0.04, 0.06, 0.025]) * talk[:, None]
    neck += _smooth_noise(rng, n, 3, int(0.4 * FPS)) * sway * h
    beat = _impulses(n, acc_t, acc_s)
    sign = _impulses(n, acc_t, acc_s * rng.choice([-1.0, 1.0], len(acc_t)))
    neck[:, 0] += 0.05 * style["beat"] * np.convolve(beat, _bump(8))[:n]
    neck[:, 1] += 0.035 * style["beat"] * np.convolve(sign, _bump(10))[:n]
    neck[:, 2] += 0.015 * style["beat"] * np.convolve(sign, _bump(12))[:n]
    drop = _impulses(n, [e for e, q in own_ends], [-0.8 if q else 1.0 for e, q in own_ends])
    neck[:, 0] += 0.025 * h * np.convolve(drop, _bump(15))[:n]
    tk = np.arange(int(1.2 * FPS)) / FPS
    nods = np.zeros(n)
    for t in nod_at:
        k = int(t * FPS)
        f, tau = rng.uniform(1.6, 2.4), rng.uniform(0.2, 0.4)
        shape = np.sin(2 * np.pi * f * tk) * np.exp(-tk / tau)
        seg = nods[k:k + len(shape)]
        seg += rng.uniform(0.03, 0.07) * shape[:len(seg)]
    neck[:, 0] += nods
    neck += lfilter([1.0], [1, -0.6], rng.standard_normal((n, 3)), axis=0) * 0.002

    motion = np.zeros((n, MOTION_DIM))
    motion[:, :50] = exp
    motion[:, 50] = jaw
    motion[:, 51:53] = 0.004 * _smooth_noise(rng, n, 2, FPS)
    motion[:, 53:56] = neck
    return motion.astype(np.float32)
