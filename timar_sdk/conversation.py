"""A recorded conversation through a Session: inputs cut to a common length (saying what was
cut or padded), then fed turn by turn and flushed. Used by timar-run, the demo and timar-generate."""
from __future__ import annotations

import numpy as np

from timar_sdk.progress import progress_bar


def align_inputs(session, user_audio, user_motion, agent_audio):
    """Cut a recorded conversation's inputs to a common length and say what changed.

    The two audio tracks are cut to the shorter one. User motion (None: not tracked) longer than
    the audio is cut; shorter motion is kept, and `Session.flush` repeats its last frame for the
    frames it lacks. Returns (user_audio, user_motion, agent_audio, notes): one line per change,
    and one for a trailing partial turn, which `flush` pads with silence.
    """
    sr, fps = session.info["sample_rate"], session.info["fps"]
    notes = []
    n = min(len(user_audio), len(agent_audio))
    if len(user_audio) != len(agent_audio):
        notes.append(f"agent audio {len(agent_audio) / sr:.2f} s, user audio {len(user_audio) / sr:.2f} s: "
                     f"cut to {n / sr:.2f} s")
    user_audio, agent_audio = user_audio[:n], agent_audio[:n]
    frames, reach = n * fps // sr, -(-n * fps // sr)      # frames generated; frames the audio reaches
    if user_motion is not None:
        have = f"user motion {len(user_motion) / fps:.2f} s ({len(user_motion)} frames), audio {n / sr:.2f} s"
        if len(user_motion) > reach:
            notes.append(f"{have}: motion cut to {reach} frames")
            user_motion = user_motion[:reach]
        elif len(user_motion) < frames:
            notes.append(f"{have}: the last motion frame is repeated for the missing "
                         f"{frames - len(user_motion)} frames")
    rest = n % session.samples
    if rest:
        notes.append(f"the last {rest / sr:.2f} s is a partial turn: padded with silence to a whole turn, "
                     f"its {rest * fps // sr} frames kept")
    return user_audio, user_motion, agent_audio, notes


def run_conversation(session, user_audio, user_motion, agent_audio, progress: bool = True):
    """A recorded conversation through `session`, turn by turn with `Session.feed`, then
    `Session.flush` for what is left: the agent's motion, float32 (T, 56) with
    T = floor(audio seconds * fps). The two audio tracks must have the same length (see
    `align_inputs`); user_motion is (frames, 56), or None when the user's face is not tracked."""
    if len(user_audio) != len(agent_audio):
        raise ValueError(f"user_audio and agent_audio: expected the same length, got {len(user_audio)} "
                         f"and {len(agent_audio)} samples (cut them with align_inputs)")
    s, f = session.samples, session.frames
    out = []
    for i in progress_bar(range(-(-len(user_audio) // s)), desc="turns", unit="turn", disable=not progress):
        um = None if user_motion is None or len(user_motion) <= i * f else user_motion[i * f:(i + 1) * f]
        out.append(session.feed(user_audio=user_audio[i * s:(i + 1) * s], user_motion=um,
                                agent_audio=agent_audio[i * s:(i + 1) * s]))
    out.append(session.flush())
    return np.concatenate(out)
