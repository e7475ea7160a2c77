"""Speech-driven synthetic conversations: TTS voices, phoneme-timed mouths, real-mic audio.

A sibling of `timar_sdk.data.synthetic` with the same output, built from synthesized speech
instead of a formant-filtered buzz (docs/TRAINING_DATA.md explains the whole recipe):

1. `conversation`: voices (espeak-ng accents and timbres, Festival's voices), random
   sentences (`text`) synthesized with per-phoneme timings (`tts`), placed as turns with
   pauses, overlaps and backchannels, sometimes with a third person in the room;
2. `visemes`: phonemes -> jaw opening, lip opening, spreading, rounding, closure and f/v tuck,
   coarticulated; `motion`: those plus prosody-linked head motion, listening behaviour (nods,
   small smiles, a still mouth or, with listener="attentive", a relaxed open one) and face
   variation -> 56 FLAME-layout values per frame;
3. `microphone`: each participant's track = own voice in a room + the others' crosstalk at
   -20..-30 dB + colouring, band limits, resampling, noise and level changes.

    from timar_sdk.data.speechlike import generate_conversation, write_speech_corpus
    conv = generate_conversation(30.0, seed=1)         # audio1/2, motion1/2 like synthetic's
    write_speech_corpus("data/speech", {"train": 96, "val": 24}, seconds=30.0)

Needs espeak-ng (and for the default engines Festival with three voices) from Debian:
`apt-get install espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts`,
and scipy. Deterministic: the same seed and engines give the same clip on any machine with
the same package versions.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf

from timar_sdk.data.dualtalk import motion_to_npz_dict
from timar_sdk.data.speechlike.conversation import floor_plan, random_voice, speak, timeline
from timar_sdk.data.speechlike.microphone import microphone_track
from timar_sdk.data.speechlike.motion import random_style, speaker_motion, speaking_frames
from timar_sdk.data.speechlike.tts import APT_PACKAGES, available_engines
from timar_sdk.layout import FPS, SAMPLE_RATE

__all__ = ["generate_conversation", "write_speech_corpus", "DEFAULT_ENGINES", "APT_PACKAGES",
           "LISTENERS", "available_engines"]

DEFAULT_ENGINES = ("espeak", "festival")
MEETING_PROB = 0.4       # clips with a third person in the room
LISTENERS = ("still", "attentive")   # how a listener's mouth behaves (docs/TRAINING_DATA.md)


def _check_listener(listener: str) -> None:
    if listener not in LISTENERS:
        raise ValueError(f"listener: expected one of {LISTENERS}, got {listener!r}")


def generate_conversation(seconds: float, seed: int, engines: tuple[str, ...] = DEFAULT_ENGINES,
                          details: bool = False, listener: str = "still") -> dict:
    """One two-person conversation of `seconds` seconds, fully determined by (seed, engines,
    listener). `listener`: "still" (the mouth at rest while listening; the shipped model's data)
    or "attentive" (the jaw relaxes open while someone talks, breathing in before phrases, and
    lulls in which nobody speaks).

    Returns `audio1`, `audio2`: float32 [frames * 640] at 16 kHz (each participant's
    microphone track), `motion1`, `motion2`: float32 [frames, 56] at 25 fps, with
    frames = round(seconds * 25); the same keys as `timar_sdk.data.synthetic`. With
    `details`, also `info`: {"speaking": bool [2, frames] (own voice sounding), "dry": float32
    [3, samples] (clean voices of A, B and the third person), "voices", "meeting",
    "unknown_phones", "utterances": [(who, start s, end s, kind, text)]}.
    """
    n_frames = int(round(seconds * FPS))
    if n_frames < 1:
        raise ValueError(f"seconds must give at least one frame at {FPS} fps, got {seconds}")
    _check_listener(listener)
    attentive = listener == "attentive"
    missing = [e for e in engines if e not in available_engines()]
    if missing or not engines:
        raise RuntimeError(f"TTS engine(s) {missing or engines} not installed: apt-get install "
                           f"{APT_PACKAGES} (or pass engines=('espeak',))")
    n_samples = n_frames * (SAMPLE_RATE // FPS)
    rng = np.random.default_rng(seed)
    meeting = bool(rng.random() < MEETING_PROB)
    voices = [random_voice(rng, tuple(engines)) for _ in range(3)]
    n_phrases = int(0.45 * seconds) + 3
    phrases, backchannels = [], []
    for who, voice in enumerate(voices):
        if who == 2 and not meeting:
            phrases.append([])
            backchannels.append([])
            continue
        p, b = speak(voice, rng, n_phrases if who < 2 else n_phrases // 2 + 1,
                     int(0.25 * seconds) + 2 if who < 2 else 0)
        phrases.append(p)
        backchannels.append(b)
    placed = floor_plan(seconds, rng, phrases, backchannels, meeting, lulls=attentive)
    lines = [timeline(placed, who, voices[who].engine, n_samples) for who in range(3)]
    out: dict = {}
    for s in (0, 1):
        others = [lines[1 - s].audio, lines[2].audio]
        out[f"audio{s + 1}"] = microphone_track(lines[s].audio, others, rng)
    for s in (0, 1):
        out[f"motion{s + 1}"] = speaker_motion(lines[s], [lines[1 - s], lines[2]],
                                               random_style(rng, attentive), n_frames, rng)
    if details:
        out["info"] = {
            "speaking": np.stack([speaking_frames(lines[s], n_frames) for s in (0, 1)]),
            "dry": np.stack([tl.audio for tl in lines]),
            "voices": voices, "meeting": meeting,
            "unknown_phones": sum(tl.unknown_phones for tl in lines),
            "utterances": [(p.who, p.start, p.end, p.kind, p.utt.text) for p in placed],
        }
    return out


def _write_clip(job: tuple) -> str:
    folder, name, seconds, clip_seed, engines, listener = job
    conv = generate_conversation(seconds, clip_seed, engines, listener=listener)
    for s in (1, 2):
        stem = Path(folder) / f"{name}_speaker{s}"
        sf.write(stem.with_suffix(".wav"), conv[f"audio{s}"], SAMPLE_RATE, subtype="FLOAT")
        npz = motion_to_npz_dict(conv[f"motion{s}"])
        t = len(npz["exp"])
        np.savez(stem.with_suffix(".npz"), **npz, shape=np.zeros((t, 100), np.float32),
                 tex=np.zeros((t, 50), np.float32), cam=np.zeros((t, 3), np.float32),
                 light=np.zeros((t, 27), np.float32))
    return name


def write_speech_corpus(out_dir: str | os.PathLike, splits: dict[str, int], seconds: float = 30.0,
                        seed: int = 0, engines: tuple[str, ...] = DEFAULT_ENGINES,
                        workers: int | None = None, progress=None, listener: str = "still") -> Path:
    """Write conversations in the DualTalk format the trainer reads; returns `out_dir`.

    Layout as `timar_sdk.data.synthetic.write_synthetic_corpus`: `<out_dir>/<split>/
    tts<i:05d>_speaker{1,2}.wav` (float32, 16 kHz) and `.npz` (`exp` (T, 50), `pose` (T, 6) =
    neck then jaw, zero `shape`, `tex`, `cam`, `light`). `splits` maps split -> clip count;
    clips are numbered across splits and clip i uses the seed SeedSequence([seed, i]), so
    splits never share a clip. `workers` processes (default: the CPU count) write clips in
    parallel; `progress(name)` is called after each clip. `listener`: as generate_conversation.
    """
    _check_listener(listener)
    out = Path(out_dir)
    jobs, index = [], 0
    for split, count in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            jobs.append((str(out / split), f"tts{index:05d}", seconds, clip_seed, tuple(engines), listener))
            index += 1
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        done = map(_write_clip, jobs)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("forkserver"))
        done = pool.map(_write_clip, jobs)
    for name in done:
        if progress:
            progress(name)
    if workers != 1:
        pool.shutdown()
    return out
