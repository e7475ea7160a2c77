"""Phonemes -> mouth trajectories: articulation targets per phoneme class, coarticulation.

Six articulation channels, computed at `RATE` (100 Hz):

| channel | unit | what |
|---|---|---|
| `jaw` | rad | jaw opening (FLAME jaw pose x); 0 = teeth together |
| `open` | 0..1 | lips apart beyond what the jaw gives (vowels) |
| `spread` | 0..1 | lip corners pulled back (i, e, s) |
| `round` | 0..1.3 | lips rounded and protruded (u, o, w, r, sh) |
| `close` | 0..1 | lips pressed together (b, p, m) |
| `tuck` | 0..1 | lower lip under the upper teeth (f, v) |

Targets by phoneme class follow the usual viseme groupings of phonetics (open / mid / close
vowels, rounded vowels, bilabials, labiodentals, dentals, alveolars, post-alveolars, velars).
Coarticulation is a dominance blend in the spirit of Cohen and Massaro (1993): each phone
pulls each channel towards its target with a weight that is 1 over the phone's core and falls
off as a Gaussian outside it, wider before the phone (anticipation) than after; every channel
is the weight-normalised mix of all targets. Bilabial closure and labiodental tuck have high
dominance (the lips must close for b/p/m whatever the neighbours do); /h/ and schwa low (they
take their neighbours' shape). Visible articulation leads the sound by `lead` seconds.

Phone names of both engines are understood: espeak-ng's mnemonics (`aI`, `T`, `@`, `_:`) and
Festival's radio phone set (`ay`, `th`, `ax`, `pau`).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = ["CHANNELS", "RATE", "phone_classes", "mouth_tracks", "is_pause", "is_vowel"]

RATE = 100                  # Hz
CHANNELS = ("jaw", "open", "spread", "round", "close", "tuck")

# class: (jaw rad, open, spread, round, close, tuck), dominance
_CLASSES = {
    "sil":     ((0.000, 0.00, 0.00, 0.00, 0.00, 0.00), 1.0),
    "open":    ((0.300, 1.00, 0.20, 0.00, 0.00, 0.00), 1.0),   # a, ae, aa
    "mid":     ((0.210, 0.75, 0.10, 0.00, 0.00, 0.00), 1.0),   # V, ah, 3:, er
    "front":   ((0.170, 0.65, 0.65, 0.00, 0.00, 0.00), 1.0),   # e, eh
    "close":   ((0.080, 0.35, 1.00, 0.00, 0.00, 0.00), 1.0),   # i:, I, iy, ih
    "schwa":   ((0.120, 0.45, 0.05, 0.00, 0.00, 0.00), 0.4),   # @, ax
    "oround":  ((0.250, 0.80, 0.00, 0.70, 0.00, 0.00), 1.0),   # O:, 0, ao
    "mround":  ((0.170, 0.55, 0.00, 1.00, 0.00, 0.00), 1.0),   # o (of oU, ow)
    "uround":  ((0.070, 0.25, 0.00, 1.30, 0.00, 0.00), 1.0),   # u:, U, uw
    "w":       ((0.060, 0.20, 0.00, 1.30, 0.00, 0.00), 1.5),
    "bilabial": ((0.025, 0.00, 0.00, 0.00, 1.00, 0.00), 2.5),  # p, b, m
    "labiodental": ((0.045, 0.10, 0.10, 0.00, 0.15, 1.00), 2.0),  # f, v
    "dental":  ((0.070, 0.30, 0.10, 0.00, 0.00, 0.00), 0.8),   # T, D, th, dh
    "alveolar": ((0.055, 0.25, 0.15, 0.00, 0.00, 0.00), 0.7),  # t, d, n, l
    "sibilant": ((0.040, 0.20, 0.40, 0.00, 0.00, 0.00), 1.5),  # s, z
    "postalveolar": ((0.055, 0.30, 0.00, 0.85, 0.00, 0.00), 1.5),  # S, Z, tS, dZ
    "velar":   ((0.090, 0.30, 0.00, 0.00, 0.00, 0.00), 0.6),   # k, g, N
    "r":       ((0.080, 0.30, 0.00, 0.60, 0.00, 0.00), 1.0),
    "y":       ((0.060, 0.30, 0.80, 0.00, 0.00, 0.00), 1.0),   # j, y
    "h":       ((0.120, 0.50, 0.00, 0.00, 0.00, 0.00), 0.15),
}
CLASS_NAMES = tuple(_CLASSES)
_TARGETS = np.array([v[0] for v in _CLASSES.values()])        # [classes, 6]
_DOMINANCE = np.array([v[1] for v in _CLASSES.values()])      # [classes]
_VOWELS = {"open", "mid", "front", "close", "schwa", "oround", "mround", "uround"}
_VOWEL_IDS = {CLASS_NAMES.index(c) for c in _VOWELS}

# A phone is one class, or two (a diphthong: first class for its first half, then the second).
_ESPEAK = {
    "a": "open", "a#": "open", "A:": "open", "A@": "open", "aa": "open", "A": "open",
    "aI": "open close", "aI@": "open close", "aI3": "open close", "aU": "open uround",
    "aU@": "open uround", "E": "front", "E2": "front", "E3": "front", "e": "front",
    "e@": "front schwa", "eI": "front close", "@": "schwa", "@2": "schwa", "@5": "schwa",
    "@L": "schwa alveolar", "3": "mid", "3:": "mid r", "V": "mid", "i": "close", "i:": "close",
    "I": "close", "I2": "close", "I#": "close", "i@": "close schwa", "i@3": "close schwa",
    "0": "oround", "O": "oround", "O:": "oround", "O@": "oround schwa", "o@": "mround schwa",
    "O2": "oround", "oU": "mround uround", "o": "mround", "OI": "oround close",
    "u:": "uround", "U": "uround", "U@": "uround schwa", "u": "uround",
    "p": "bilabial", "b": "bilabial", "m": "bilabial", "m-": "bilabial",
    "f": "labiodental", "v": "labiodental", "T": "dental", "D": "dental",
    "t": "alveolar", "d": "alveolar", "n": "alveolar", "n-": "alveolar", "l": "alveolar",
    "t#": "alveolar", "d#": "alveolar", "t2": "alveolar", "l/": "alveolar", "l-": "alveolar",
    "s": "sibilant", "z": "sibilant", "S": "postalveolar", "Z": "postalveolar",
    "tS": "postalveolar", "dZ": "postalveolar", "k": "velar", "g": "velar", "N": "velar",
    "x": "velar", "h": "h", "r": "r", "r-": "r", "R": "r", "w": "w", "j": "y", "?": "schwa",
    "_": "sil", "_:": "sil", "_!": "sil", "_|": "sil", "_^_": "sil",
    "t[": "dental", "VR": "mid r", "IR": "close r", "3R": "mid r", "0R": "oround r",
    ";": "h",             # a palatalisation mark: no shape of its own, takes the neighbours'
}
_FESTIVAL = {
    "aa": "open", "ae": "open", "ah": "mid", "ao": "oround", "aw": "open uround",
    "ax": "schwa", "axr": "schwa r", "ay": "open close", "eh": "front", "er": "mid r",
    "ey": "front close", "ih": "close", "iy": "close", "ow": "mround uround",
    "oy": "oround close", "uh": "uround", "uw": "uround", "b": "bilabial", "p": "bilabial",
    "m": "bilabial", "em": "bilabial", "f": "labiodental", "v": "labiodental",
    "th": "dental", "dh": "dental", "t": "alveolar", "d": "alveolar", "n": "alveolar",
    "en": "alveolar", "dx": "alveolar", "nx": "alveolar", "l": "alveolar", "el": "alveolar",
    "s": "sibilant", "z": "sibilant", "sh": "postalveolar", "zh": "postalveolar",
    "ch": "postalveolar", "jh": "postalveolar", "k": "velar", "g": "velar", "ng": "velar",
    "hh": "h", "hv": "h", "r": "r", "w": "w", "y": "y", "pau": "sil", "h#": "sil",
    "brk": "sil",
}


def _lookup(name: str, engine: str) -> str | None:
    table = _ESPEAK if engine == "espeak" else _FESTIVAL
    if name in table:
        return table[name]
    if name.startswith("_"):
        return "sil"
    stripped = name.rstrip(":#/-[0123456789")      # espeak allophone marks: `I2`, `l/`, `@5`
    return table.get(stripped)


def phone_classes(names: list[str], engine: str) -> tuple[list[tuple[int, ...]], int]:
    """Class indices (into CLASS_NAMES) of each phone, and how many names were unknown
    (those count as schwa)."""
    out, unknown = [], 0
    for n in names:
        classes = _lookup(n, engine)
        if classes is None:
            unknown += 1
            classes = "schwa"
        out.append(tuple(CLASS_NAMES.index(c) for c in classes.split()))
    return out, unknown


def is_pause(classes: tuple[int, ...]) -> bool:
    return CLASS_NAMES[classes[0]] == "sil"


def is_vowel(classes: tuple[int, ...]) -> bool:
    return CLASS_NAMES[classes[0]] in _VOWELS


def mouth_tracks(start: np.ndarray, end: np.ndarray, classes: list[tuple[int, ...]],
                 gain: np.ndarray, n: int, lead: float = 0.04) -> np.ndarray:
    """Articulation channels float64 [n, 6] (CHANNELS order) at RATE Hz, sample k at
    (k + 0.5) / RATE s.

    start, end: float [p] phone times (s, on the same clock); classes: from `phone_classes`;
    gain: float [p] scale of each phone's jaw and lip opening (vocal effort: louder phones
    open wider). Outside all phones the mouth is at rest (all channels 0).
    """
    t = (np.arange(n) + 0.5) / RATE
    num = np.zeros((n, len(CHANNELS)))
    # Outside every phone (between utterances) the mouth is pulled to rest like in a pause.
    inside = np.zeros(n, bool)
    for s, e in zip(start, end):
        inside[max(0, int((s - lead) * RATE)):max(0, int(np.ceil((e - lead) * RATE)))] = True
    den = np.repeat(np.where(inside, 1e-3, 1.0)[:, None], len(CHANNELS), axis=1)
    scale = np.ones(len(CHANNELS))
    for s, e, cls, g in zip(start, end, classes, gain):
        parts = len(cls)
        for k, c in enumerate(cls):                 # a diphthong: consecutive halves
            a = s + (e - s) * k / parts - lead
            b = s + (e - s) * (k + 1) / parts - lead
            dur = b - a
            name = CLASS_NAMES[c]
            if name == "sil":                       # a pause holds rest over its middle
                core = (a + min(0.05, dur / 2), b - min(0.05, dur / 2))
            else:                                   # a sound reaches its target mid-way
                core = (a + 0.3 * dur, b - 0.3 * dur)
            if c in _VOWEL_IDS or name == "sil":
                flank = float(np.clip(0.45 * dur, 0.025, 0.06))
            else:                                   # consonants: brief, local gestures
                flank = float(np.clip(0.35 * dur, 0.015, 0.04))
            lo = int(max(0, (core[0] - 4 * flank) * RATE))
            hi = int(min(n, (core[1] + 3 * flank) * RATE + 1))
            if hi <= lo:
                continue
            tt = t[lo:hi]
            before = np.exp(-0.5 * ((tt - core[0]) / (1.3 * flank)) ** 2)
            after = np.exp(-0.5 * ((tt - core[1]) / flank) ** 2)
            w = np.where(tt < core[0], before, np.where(tt > core[1], after, 1.0))
            w = w * _DOMINANCE[c]
            target = _TARGETS[c].copy()
            scale[:2] = g                            # jaw and lip opening follow effort
            target = target * scale
            dom = np.ones(len(CHANNELS))
            if name in ("bilabial", "labiodental"):
                dom[4:] = 2.0                         # closure / tuck dominate their channels
            num[lo:hi] += (w[:, None] * dom) * target
            den[lo:hi] += w[:, None] * dom
    out = num / den
    return gaussian_filter1d(out, sigma=0.02 * RATE, axis=0, mode="nearest")
