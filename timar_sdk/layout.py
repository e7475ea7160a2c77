"""Fixed facts about TIMAR's data: the motion vector and the token layout of one turn.

Everything here is plain Python/numpy so every part of the SDK (training, export, runtime,
metrics, rendering) reads the same definitions.
"""
from __future__ import annotations

MOTION_DIM = 56
"""Floats per motion frame: FLAME expression 0..49, jaw pose 50..52, neck/global pose 53..55."""
EXP = slice(0, 50)
JAW = slice(50, 53)
NECK = slice(53, 56)
MOTION_GROUPS = {"exp": EXP, "jaw": JAW, "pose": NECK}
MOTION_NAMES = (
    [f"exp_{i}" for i in range(50)]
    + ["jaw_x", "jaw_y", "jaw_z"]
    + ["neck_x", "neck_y", "neck_z"]
)

FPS = 25
SAMPLE_RATE = 16_000

AUDIO_LIMIT = 4.0
"""Largest |sample| a runtime accepts in float audio. Full scale is 1.0; 4.0 leaves 12 dB for
float DSP overshoot. Larger values are int16 numbers passed as float, or garbage, and would
overflow the audio encoder."""
MOTION_LIMIT = 20.0
"""Largest |value| a runtime accepts in user motion (FLAME expression coefficients and
axis-angle radians, which a face tracker keeps within a few units)."""

SPECIAL_TOKENS = ("<TURN>", "<U_SP>", "</U_SP>", "<U_MO>", "</U_MO>",
                  "<A_SP>", "</A_SP>", "<A_MO>", "</A_MO>", "</TURN>")


def tokens_per_turn(frames_per_turn: int) -> int:
    """4F frame tokens + 10 special tokens."""
    return 4 * frames_per_turn + len(SPECIAL_TOKENS)


def turn_layout(frames_per_turn: int) -> dict[str, tuple[int, int]]:
    """Start (inclusive) and end (exclusive) index of each frame group inside one turn.

    Order: <TURN> <U_SP> user_speech[F] </U_SP> <U_MO> user_motion[F] </U_MO>
           <A_SP> agent_speech[F] </A_SP> <A_MO> agent_motion[F] </A_MO> </TURN>
    """
    f = frames_per_turn
    user_speech = 2
    user_motion = user_speech + f + 2
    agent_speech = user_motion + f + 2
    agent_motion = agent_speech + f + 2
    return {
        "user_speech": (user_speech, user_speech + f),
        "user_motion": (user_motion, user_motion + f),
        "agent_speech": (agent_speech, agent_speech + f),
        "agent_motion": (agent_motion, agent_motion + f),
    }


def special_token_positions(frames_per_turn: int) -> list[int]:
    """Positions of the 10 special tokens inside one turn, in SPECIAL_TOKENS order."""
    lay = turn_layout(frames_per_turn)
    pos = [0]
    for name in ("user_speech", "user_motion", "agent_speech", "agent_motion"):
        start, end = lay[name]
        pos += [start - 1, end]
    pos.append(tokens_per_turn(frames_per_turn) - 1)
    return pos
