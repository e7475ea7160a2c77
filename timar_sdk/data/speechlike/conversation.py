"""Who says what when: voices, the floor plan of a conversation, and each speaker's timeline.

A conversation has two participants (A = speaker 1, B = speaker 2) and, in about 40 % of the
clips, a third person in the room ("meeting" clips) who is heard only as crosstalk, during
which both participants listen. Turns of 1-3 phrases alternate with gaps drawn from
N(0.35 s, 0.45 s) clipped to [-0.8, 1.8] s (negative gaps are overlaps: the next speaker
starts before the current one has finished); with `lulls`, after about one turn in five
nobody speaks for 1.5-4 s instead (the pair is silent together, as often in meetings);
listeners answer about a third of the other phrases' ends with a backchannel ("mm",
"yeah", ...), and now and then backchannel in the middle of a long phrase (overlapping speech).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from timar_sdk.data.speechlike.text import backchannel, sentence
from timar_sdk.data.speechlike.tts import (ESPEAK_ACCENTS, ESPEAK_VARIANTS, FESTIVAL_VOICES,
                                           Utterance, Voice, synthesize)
from timar_sdk.data.speechlike.visemes import is_pause, is_vowel, phone_classes
from timar_sdk.layout import SAMPLE_RATE

__all__ = ["random_voice", "Placed", "Timeline", "speak", "floor_plan", "timeline"]

LULL_PROB, LULL_S = 0.2, (1.5, 4.0)    # turns followed by a shared silence, its length


def random_voice(rng: np.random.Generator, engines: tuple[str, ...]) -> Voice:
    """A random speaker: espeak-ng (accent, timbre variant, pitch, range, rate) or, when
    "festival" is among `engines`, one of Festival's voices in about 40 % of the draws."""
    female = rng.random() < 0.5
    if "festival" in engines and ("espeak" not in engines or rng.random() < 0.4):
        names = [n for n, (sex, _, _) in FESTIVAL_VOICES.items()
                 if (sex == "female") == female] or list(FESTIVAL_VOICES)
        name = names[int(rng.integers(len(names)))]
        diphone = FESTIVAL_VOICES[name][2]
        return Voice("festival", name, pitch=rng.uniform(90, 140) if diphone else 0,
                     pitch_range=rng.uniform(10, 30), rate=rng.uniform(150, 200))
    variants = ESPEAK_VARIANTS["female" if female else "male"]
    accent = ESPEAK_ACCENTS[int(rng.integers(len(ESPEAK_ACCENTS)))]
    variant = variants[int(rng.integers(len(variants)))]
    return Voice("espeak", f"{accent}+{variant}", pitch=rng.uniform(25, 75),
                 pitch_range=rng.uniform(30, 90), rate=rng.uniform(140, 210))


@dataclass
class Placed:
    """An utterance placed in the clip: who (0 = A, 1 = B, 2 = the third person), start (s),
    kind ("phrase" or "backchannel"), gain_db (phrase-level vocal effort)."""
    who: int
    start: float
    utt: Utterance
    kind: str
    gain_db: float

    @property
    def end(self) -> float:
        return self.start + self.utt.duration


def speak(voice: Voice, rng: np.random.Generator, n_phrases: int,
          n_backchannels: int) -> tuple[list[Utterance], list[Utterance]]:
    """Synthesize random phrases and backchannels for one voice (one TTS batch), each trimmed
    to its speech (30 ms before the first sound, 80 ms after the last) and scaled to an active
    level of -20 dBFS."""
    from timar_sdk.data.speechlike.microphone import active_level_db
    texts = ([sentence(rng) for _ in range(n_phrases)]
             + [backchannel(rng, voice.engine) for _ in range(n_backchannels)])
    out: list[Utterance | None] = []
    for u in synthesize(voice, texts):
        classes, _ = phone_classes(u.phones, voice.engine)
        sounding = [k for k, c in enumerate(classes) if not is_pause(c)]
        if not sounding:            # nothing audible: dropped below
            out.append(None)
            continue
        t0 = max(0.0, u.start[sounding[0]] - 0.03)
        t1 = min(u.duration, u.end[sounding[-1]] + 0.08)
        a = u.audio[int(t0 * SAMPLE_RATE):int(t1 * SAMPLE_RATE)]
        a = a * np.float32(10 ** ((-20.0 - active_level_db(a, hop=320)) / 20))
        keep = (u.end > t0) & (u.start < t1)
        out.append(Utterance(u.text, a, [p for p, k in zip(u.phones, keep) if k],
                             np.maximum(u.start[keep], t0) - t0, np.minimum(u.end[keep], t1) - t0))
    return ([u for u in out[:n_phrases] if u is not None],
            [u for u in out[n_phrases:] if u is not None])


def _free(placed: list[Placed], who: int, a: float, b: float, margin: float) -> bool:
    return all(p.end + margin < a or p.start > b + margin for p in placed if p.who == who)


def floor_plan(duration: float, rng: np.random.Generator, phrases: list[list[Utterance]],
               backchannels: list[list[Utterance]], meeting: bool, lulls: bool = False) -> list[Placed]:
    """Place phrases and backchannels of the participants (see the module doc), sorted by
    start. phrases[who] / backchannels[who] are used in order and recycled if they run out."""
    placed: list[Placed] = []
    used = [0, 0, 0]
    who = int(rng.integers(2))
    t = rng.uniform(0.0, 1.0)
    last_end = [-1.0, -1.0, -1.0]
    while t < duration:
        for k in range(int(rng.integers(1, 4))):
            if k:
                t += rng.uniform(0.15, 0.6)
            utt = phrases[who][used[who] % len(phrases[who])]
            used[who] += 1
            start = max(t, last_end[who] + 0.15)
            placed.append(Placed(who, start, utt, "phrase", float(rng.normal(0.0, 2.0))))
            t = last_end[who] = start + utt.duration
        gap = float(np.clip(rng.normal(0.35, 0.45), -0.8, 1.8))
        t += rng.uniform(*LULL_S) if lulls and rng.random() < LULL_PROB else gap
        if who == 2:
            who = int(rng.integers(2))
        elif meeting and rng.random() < 0.3:
            who = 2
        else:
            who = 1 - who
    # Backchannels of A and B to everybody else's phrases.
    bc_used = [0, 0]
    for p in [p for p in placed if p.kind == "phrase"]:
        for listener in (0, 1):
            if listener == p.who or not backchannels[listener]:
                continue
            if rng.random() < 0.33:
                at = p.end + rng.uniform(0.05, 0.35)
            elif p.utt.duration > 1.5 and rng.random() < 0.12:
                at = p.start + rng.uniform(0.5, p.utt.duration - 0.3)   # overlapping
            else:
                continue
            utt = backchannels[listener][bc_used[listener] % len(backchannels[listener])]
            if at < duration and _free(placed, listener, at, at + utt.duration, 0.2):
                bc_used[listener] += 1
                placed.append(Placed(listener, at, utt, "backchannel",
                                     float(rng.uniform(-8.0, -3.0))))
    placed.sort(key=lambda p: p.start)
    return placed


@dataclass
class Timeline:
    """One participant's speech in clip time.

    audio: float32 [samples] dry voice (16 kHz). Phones: start, end (s), classes, db (active
    level of each phone's audio, dBFS), bc (bool: inside a backchannel). phrases: (start, end,
    kind, is_question) of each placed utterance.
    """
    audio: np.ndarray
    start: np.ndarray
    end: np.ndarray
    classes: list
    db: np.ndarray
    bc: np.ndarray
    phrases: list = field(default_factory=list)
    unknown_phones: int = 0

    def vowel_mask(self) -> np.ndarray:
        return np.array([is_vowel(c) for c in self.classes], bool)


def timeline(placed: list[Placed], who: int, engine: str, n_samples: int) -> Timeline:
    """Mix participant `who`'s placed utterances into a dry track and collect its phones."""
    audio = np.zeros(n_samples, np.float32)
    start, end, classes, db, bc, phrases = [], [], [], [], [], []
    unknown = 0
    for p in placed:
        if p.who != who:
            continue
        a = p.utt.audio * np.float32(10 ** (p.gain_db / 20))
        i0 = int(round(p.start * SAMPLE_RATE))
        seg = audio[i0:i0 + len(a)]
        seg += a[:len(seg)]
        cls, unk = phone_classes(p.utt.phones, engine)
        unknown += unk
        for s, e, c in zip(p.utt.start, p.utt.end, cls):
            x = a[int(s * SAMPLE_RATE):max(int(e * SAMPLE_RATE), int(s * SAMPLE_RATE) + 1)]
            start.append(p.start + s)
            end.append(p.start + e)
            classes.append(c)
            db.append(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-10))
            bc.append(p.kind == "backchannel")
        phrases.append((p.start, p.end, p.kind, p.utt.text.rstrip().endswith("?")))
    return Timeline(audio, np.array(start), np.array(end), classes, np.array(db),
                    np.array(bc, bool), phrases, unknown)
