"""DualTalk-format dataset: discovery, loading, motion statistics and training windows.

A DualTalk folder (docs/DESIGN.md 6) holds, per clip, `<clip>_speaker1.wav`, `<clip>_speaker1.npz`,
`<clip>_speaker2.wav`, `<clip>_speaker2.npz`. WAV: mono 16 kHz float. NPZ: `exp` (T, 50) and
`pose` (T, 6) at 25 fps with pose[:, 0:3] = neck/global and pose[:, 3:6] = jaw (other keys
unused). The SDK motion vector is concat(exp, jaw, neck) = 56 floats per frame
(`timar_sdk.layout`). Each clip gives two examples: each speaker is the agent once, the partner
is the user. numpy only (no torch): a training loop wraps `WindowDataset` itself.

Bad data is handled as follows (errors are ValueErrors naming the file):
- audio at another sample rate: resampled with soxr and a warning (`timar_sdk.audio.load_audio`);
- multi-channel audio: downmixed by averaging the channels;
- NaN or Inf in audio or motion: error;
- npz without `exp` / `pose`, wrong widths, or different frame counts for the two: error;
- the four streams of an example (user/agent audio/motion) more than `max_mismatch_s` (1 s)
  apart in duration: error naming the longest and shortest file and their durations; smaller
  mismatches are cropped to whole turns;
- an example shorter than one turn: error.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timar_sdk.audio import load_audio
from timar_sdk.layout import FPS, MOTION_DIM, SAMPLE_RATE

__all__ = ["Example", "motion_from_npz", "motion_to_npz_dict", "list_examples",
           "load_example", "compute_motion_stats", "normalize_audio", "WindowDataset"]

_STEM = re.compile(r"^(?P<clip>.+)_speaker(?P<speaker>[12])$")


@dataclass(frozen=True)
class Example:
    """One training/evaluation example: `agent` (1 or 2) is the speaker whose motion is
    predicted; the other speaker of the clip is the user."""
    clip: str
    agent: int
    agent_wav: Path
    agent_npz: Path
    user_wav: Path
    user_npz: Path

    @property
    def name(self) -> str:
        """The agent file stem, e.g. `syn00012_speaker1` (predictions are saved under it)."""
        return self.agent_npz.stem


def motion_from_npz(npz: Mapping[str, np.ndarray] | str | os.PathLike,
                    name: str | None = None) -> np.ndarray:
    """SDK motion float32 [T, 56] = concat(exp, pose[:, 3:6] jaw, pose[:, 0:3] neck).

    `npz` is a loaded npz / dict with `exp` (T, 50) and `pose` (T, 6), or a path to one.
    Raises ValueError naming `name` (or the path) for missing keys, wrong shapes, different
    frame counts, or NaN / Inf values.
    """
    if isinstance(npz, (str, os.PathLike)):
        name = name or os.fspath(npz)
        with np.load(npz, allow_pickle=False) as f:
            return motion_from_npz({k: f[k] for k in ("exp", "pose") if k in f.files}, name)
    name = name or "npz"
    missing = [k for k in ("exp", "pose") if k not in npz]
    if missing:
        raise ValueError(f"{name}: missing key(s) {missing}; a DualTalk npz needs 'exp' (T, 50) "
                         f"and 'pose' (T, 6)")
    exp, pose = np.asarray(npz["exp"]), np.asarray(npz["pose"])
    if exp.ndim != 2 or exp.shape[1] != 50 or pose.ndim != 2 or pose.shape[1] != 6:
        raise ValueError(f"{name}: expected exp (T, 50) and pose (T, 6), got exp {exp.shape} "
                         f"and pose {pose.shape}")
    if len(exp) != len(pose):
        raise ValueError(f"{name}: exp has {len(exp)} frames but pose has {len(pose)}")
    motion = np.concatenate([exp, pose[:, 3:6], pose[:, 0:3]], axis=1).astype(np.float32)
    if not np.isfinite(motion).all():
        raise ValueError(f"{name}: motion contains NaN or Inf values")
    return motion


def motion_to_npz_dict(motion: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of `motion_from_npz`: [T, 56] -> {"exp": (T, 50), "pose": (T, 6)} float32,
    pose = concat(neck, jaw)."""
    motion = np.asarray(motion, dtype=np.float32)
    if motion.ndim != 2 or motion.shape[1] != MOTION_DIM:
        raise ValueError(f"motion: expected shape (T, {MOTION_DIM}), got {motion.shape}")
    return {"exp": motion[:, 0:50].copy(),
            "pose": np.concatenate([motion[:, 53:56], motion[:, 50:53]], axis=1)}


def list_examples(root: str | os.PathLike) -> list[Example]:
    """All examples of a DualTalk split folder (not recursive), sorted by clip, speaker 1 first.

    Files whose stem ends in `_speaker1` / `_speaker2` with suffix .wav or .npz define the
    clips; every clip must have all four files. Raises ValueError when `root` is not a folder,
    holds no clip, or a clip lacks a file (the message names the missing paths).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    clips = sorted({m["clip"] for p in root.iterdir() if p.suffix in (".wav", ".npz")
                    and (m := _STEM.match(p.stem))})
    if not clips:
        raise ValueError(f"no <clip>_speaker1/2 .wav/.npz files in {root}")
    examples = []
    for clip in clips:
        files = {(s, ext): root / f"{clip}_speaker{s}.{ext}"
                 for s in (1, 2) for ext in ("wav", "npz")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise ValueError(f"clip {clip!r} in {root} is incomplete: missing {', '.join(missing)}")
        for agent in (1, 2):
            user = 3 - agent
            examples.append(Example(clip, agent, files[agent, "wav"], files[agent, "npz"],
                                    files[user, "wav"], files[user, "npz"]))
    return examples


def load_example(example: Example, sample_rate: int = SAMPLE_RATE, fps: int = FPS,
                 frames_per_turn: int = FPS, max_mismatch_s: float = 1.0) -> dict:
    """Load one example, cropped to whole turns.

    Returns a dict: `user_audio`, `agent_audio` float32 [turns * S] (S = samples per turn,
    16 000 by default, raw waveform in [-1, 1]); `user_motion`, `agent_motion` float32
    [turns * F, 56] (raw, not normalised); `turns` (int); `name` (agent file stem).
    turns = floor(min(duration of the four streams) / turn length). Bad data: see the module
    docstring.
    """
    if (sample_rate * frames_per_turn) % fps:
        raise ValueError(f"a turn of {frames_per_turn} frames at {fps} fps is not a whole "
                         f"number of samples at {sample_rate} Hz")
    spt = sample_rate * frames_per_turn // fps
    ua = load_audio(example.user_wav, sample_rate)
    aa = load_audio(example.agent_wav, sample_rate)
    um = motion_from_npz(example.user_npz)
    am = motion_from_npz(example.agent_npz)
    durations = {example.user_wav: len(ua) / sample_rate, example.agent_wav: len(aa) / sample_rate,
                 example.user_npz: len(um) / fps, example.agent_npz: len(am) / fps}
    longest = max(durations, key=durations.get)
    shortest = min(durations, key=durations.get)
    if durations[longest] - durations[shortest] > max_mismatch_s:
        raise ValueError(f"{longest} lasts {durations[longest]:.2f} s but {shortest} lasts "
                         f"{durations[shortest]:.2f} s: more than {max_mismatch_s} s apart")
    turns = min(len(ua) // spt, len(aa) // spt, len(um) // frames_per_turn,
                len(am) // frames_per_turn)
    if turns < 1:
        raise ValueError(f"{shortest} lasts {durations[shortest]:.2f} s, shorter than one turn "
                         f"({frames_per_turn / fps} s)")
    n, t = turns * spt, turns * frames_per_turn
    return {"user_audio": ua[:n], "agent_audio": aa[:n], "user_motion": um[:t],
            "agent_motion": am[:t], "turns": turns, "name": example.name}


def compute_motion_stats(examples: Iterable[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std float32 [56] over all `agent_motion` frames of loaded examples.

    The std is floored at 1e-3 so constant dimensions do not explode when normalising. Since
    every clip gives two examples, this covers every speaker's motion once.
    """
    total, count = np.zeros(MOTION_DIM), 0
    total_sq = np.zeros(MOTION_DIM)
    for ex in examples:
        m = np.asarray(ex["agent_motion"], np.float64)
        total += m.sum(axis=0)
        total_sq += (m * m).sum(axis=0)
        count += len(m)
    if count == 0:
        raise ValueError("compute_motion_stats: no motion frames")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole signal, as the wav2vec2 processor does:
    (x - mean) / sqrt(var + 1e-7), float32 [samples]."""
    x = np.asarray(audio, np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


_normalize = normalize_audio   # WindowDataset's argument of the same name shadows it


class WindowDataset:
    """Training windows of `turns_per_window` consecutive turns, numpy out.

    Built from loaded examples (`load_example` dicts). Window starts are 0, stride, 2*stride,
    ... while the window fits (a tail shorter than the stride is not covered); examples with
    fewer than `turns_per_window` turns give no window and are skipped. With
    `normalize_audio=True` each example's audio is normalised to zero mean and unit variance
    over the whole loaded example (the file cropped to whole turns) before cutting, as the
    authors' wav2vec2 processor does per file.

    Item i is a dict of float32 arrays, T = turns_per_window, S = samples per turn,
    F = frames per turn: `user_audio`, `agent_audio` [T, S]; `user_motion`, `agent_motion`
    [T, F, 56] (raw motion: normalise in the training loop).
    """

    def __init__(self, examples: Sequence[Mapping], turns_per_window: int = 12,
                 stride_turns: int | None = None, normalize_audio: bool = True):
        if turns_per_window < 1:
            raise ValueError(f"turns_per_window must be >= 1, got {turns_per_window}")
        stride = turns_per_window if stride_turns is None else stride_turns
        if stride < 1:
            raise ValueError(f"stride_turns must be >= 1, got {stride}")
        self.turns_per_window, self.stride_turns = turns_per_window, stride
        self._data: list[dict[str, np.ndarray]] = []
        self._names: list[str] = []
        self._index: list[tuple[int, int]] = []
        for ex in examples:
            turns = int(ex["turns"])
            if turns < turns_per_window:
                continue
            arrays = {}
            for key in ("user_audio", "agent_audio"):
                a = np.asarray(ex[key], np.float32)
                a = _normalize(a) if normalize_audio else a
                arrays[key] = a.reshape(turns, -1)
            for key in ("user_motion", "agent_motion"):
                arrays[key] = np.asarray(ex[key], np.float32).reshape(turns, -1, MOTION_DIM)
            k = len(self._data)
            self._data.append(arrays)
            self._names.append(str(ex.get("name", k)))
            self._index += [(k, s) for s in range(0, turns - turns_per_window + 1, stride)]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k, start = self._index[i]   # IndexError past the end ends plain iteration
        sl = slice(start, start + self.turns_per_window)
        return {key: arr[sl].copy() for key, arr in self._data[k].items()}

    def window_info(self, i: int) -> tuple[str, int]:
        """(example name, first turn) of window i."""
        k, start = self._index[i]
        return self._names[k], start
