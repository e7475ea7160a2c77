"""Time preview rendering end to end (motion + audio in, MP4 out) on synthetic input.

    python -m timar_sdk.render.bench --frames 250 --size 512 [--partner] [--out DIR]

The input is deterministic: a speaking head (jaw following a syllable envelope, nods, turns,
brows, smile) and a matching voiced audio track at 16 kHz.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from timar_sdk.layout import FPS, MOTION_DIM, SAMPLE_RATE


def synthetic_talk(n_frames: int, seed: int = 0, fps: float = FPS):
    """(motion (T, 56) float32, audio float32 at 16 kHz) of someone talking."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) / fps
    syll = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None)  # syllables
    phrase = (np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6)) > -0.3).astype(np.float64)
    env = syll * phrase
    m = np.zeros((n_frames, MOTION_DIM), np.float32)
    m[:, 50] = 0.22 * env  # jaw opening
    m[:, 0] = 1.2 * env - 0.2
    m[:, 1] = 0.8 * np.sin(2 * np.pi * 0.15 * t)
    m[:, 2] = 1.2 * np.clip(np.sin(2 * np.pi * 0.35 * t), 0, None)
    m[:, 3] = 0.6 * np.sin(2 * np.pi * 0.1 * t + 1.0)
    m[:, 53] = 0.10 * np.sin(2 * np.pi * 0.9 * t) * phrase + 0.03  # nods
    m[:, 54] = 0.25 * np.sin(2 * np.pi * 0.12 * t)  # turns
    m[:, 55] = 0.05 * np.sin(2 * np.pi * 0.2 * t)
    ts = np.arange(int(round(n_frames / fps * SAMPLE_RATE))) / SAMPLE_RATE
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.7 * ts)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    env_a = np.interp(ts, t, env)
    audio = (0.12 * voiced * env_a + 0.002 * rng.standard_normal(len(ts))).astype(np.float32)
    return m, audio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--partner", action="store_true", help="render two heads side by side")
    ap.add_argument("--out", type=Path, default=None, help="keep the video in this folder")
    args = ap.parse_args(argv)

    from timar_sdk.render.video import render_video

    motion, audio = synthetic_talk(args.frames, seed=0)
    partner = partner_audio = None
    if args.partner:
        partner, partner_audio = synthetic_talk(args.frames, seed=1)
        partner[:, 50] *= 0.3  # mostly listening
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)) / "bench.mp4"
        t0 = time.perf_counter()
        render_video(motion, out, audio=(audio, SAMPLE_RATE), partner=partner,
                     partner_audio=None if partner_audio is None else (partner_audio, SAMPLE_RATE),
                     size=args.size, progress=False)
        dt = time.perf_counter() - t0
    heads = 2 if args.partner else 1
    print(f"rendered {args.frames} frames, {heads} head(s) at {args.size}x{args.size} each, "
          f"H.264 + AAC: {dt:.1f} s ({args.frames / dt:.1f} frames/s)")
    return dt


if __name__ == "__main__":
    main()
