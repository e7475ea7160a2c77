"""The timar-serve wire protocol (docs/PROTOCOL.md): constants, and the encoding and decoding of
its messages. Pure numpy + json + struct, shared by the server, the clients and the load test.

Binary frames start with an 8-byte little-endian header `<B B H I`: kind, protocol version, a
16-bit field, a 32-bit count. Client -> server:
  KIND_AUDIO:  count = n user samples; payload = n int16 user samples, then the agent's int16
               samples (the rest of the frame). Either part may be empty.
  KIND_MOTION: count = frames; payload = frames x 56 float32 (the user's FLAME motion).
Server -> client, a 24-byte header `<B B H I d d`:
  KIND_TURN: frames (16-bit field), turn index, start_s (media time of the first frame, s),
             latency_s (server: turn input complete -> motion ready, s); payload frames x 56 float32.
Everything else is a JSON text message with a "type" field.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from timar_sdk.layout import MOTION_DIM
from timar_sdk.runtime.scheduler import MotionChunk

VERSION = 1
PATH = "/v1/conversation"          # the WebSocket endpoint; /healthz, /readyz, /metrics beside it

KIND_AUDIO, KIND_MOTION, KIND_TURN = 1, 2, 3
HEADER = struct.Struct("<BBHI")            # kind, version, reserved (0), count
TURN_HEADER = struct.Struct("<BBHIdd")     # kind, version, frames, turn, start_s, latency_s

# JSON message types.
START, FLUSH, RESET, CLOSE = "start", "flush", "reset", "close"          # client -> server
READY, FLUSHED, ERROR = "ready", "flushed", "error"                       # server -> client

# Error codes (the "code" of an error message; also the label of the errors metric).
BAD_MESSAGE = "bad_message"      # text that is not a JSON object of a known type
BAD_FRAME = "bad_frame"          # a binary frame with a wrong header or length
BAD_SETTINGS = "bad_settings"    # start settings refused (the message names the setting)
BAD_INPUT = "bad_input"          # audio or motion refused by the runtime (names the input)
BAD_STATE = "bad_state"          # a message out of order (audio before start, after flush, ...)
BUFFER_FULL = "buffer_full"      # too much input buffered without a turn completing
TURN_FAILED = "turn_failed"      # the model could not compute a turn (TimarRuntimeError)
IDLE_TIMEOUT = "idle_timeout"    # no message for --idle-timeout seconds
NOT_READING = "not_reading"      # the client stopped reading its motion (backpressure)

# WebSocket close codes beyond the standard ones (1000 normal, 1001 server shutting down,
# 1009 message too big, 1011 internal error, 1013 server full).
CLOSE_IDLE, CLOSE_NOT_READING = 4000, 4001
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER = 1000, 1001, 1013


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is one of the error codes above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---- client -> server ---------------------------------------------------------------------------
def to_pcm16(audio, name: str) -> np.ndarray:
    """`audio` as int16 PCM: int16 is kept, float in [-1, 1] is scaled by 32768 and rounded
    (the inverse of the runtime's int16 -> float / 32768). Raises ValueError naming `name`."""
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D (mono) array of samples, got shape {a.shape}")
    if a.dtype == np.int16:
        return a
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError(f"{name}: expected int16 or finite float samples in [-1, 1], got {a.dtype}")
    return np.clip(np.round(a * 32768.0), -32768, 32767).astype(np.int16)


def encode_audio(user=None, agent=None) -> bytes:
    """One audio frame holding the next samples of the user and/or the agent (16 kHz mono)."""
    u = to_pcm16(user, "user") if user is not None else np.zeros(0, np.int16)
    a = to_pcm16(agent, "agent") if agent is not None else np.zeros(0, np.int16)
    return HEADER.pack(KIND_AUDIO, VERSION, 0, len(u)) + u.astype("<i2").tobytes() + a.astype("<i2").tobytes()


def encode_motion(frames) -> bytes:
    """One frame of the user's motion, float [frames, 56] raw FLAME values."""
    m = np.asarray(frames, dtype="<f4")
    if m.ndim != 2 or m.shape[1] != MOTION_DIM:
        raise ValueError(f"user_motion: expected shape (frames, {MOTION_DIM}), got {m.shape}")
    return HEADER.pack(KIND_MOTION, VERSION, 0, len(m)) + m.tobytes()


def encode_json(kind: str, **fields) -> str:
    """A JSON text message of type `kind`."""
    return json.dumps({"type": kind, **fields})


def decode_client_frame(data: bytes) -> tuple[str, dict]:
    """A binary frame from a client as ("audio", {"user_audio", "agent_audio"}) (int16 arrays or
    None) or ("motion", {"user_motion"}) (float32 [frames, 56]). Raises ProtocolError(BAD_FRAME)."""
    if len(data) < HEADER.size:
        raise ProtocolError(BAD_FRAME, f"binary frame: expected an {HEADER.size}-byte header, got {len(data)} bytes")
    kind, version, _, count = HEADER.unpack_from(data)
    payload = memoryview(data)[HEADER.size:]
    if version != VERSION:
        raise ProtocolError(BAD_FRAME, f"binary frame: protocol version {version}, this server speaks {VERSION}")
    if kind == KIND_AUDIO:
        if len(payload) % 2 or count * 2 > len(payload):
            raise ProtocolError(BAD_FRAME, f"audio frame: expected an even payload of at least {count} user samples "
                                           f"(2 bytes each), got {len(payload)} bytes")
        pcm = np.frombuffer(payload, dtype="<i2").astype(np.int16)
        user, agent = pcm[:count], pcm[count:]
        if not len(user) and not len(agent):
            raise ProtocolError(BAD_FRAME, "audio frame: no samples")
        return "audio", {"user_audio": user if len(user) else None, "agent_audio": agent if len(agent) else None}
    if kind == KIND_MOTION:
        if count == 0 or len(payload) != count * MOTION_DIM * 4:
            raise ProtocolError(BAD_FRAME, f"motion frame: expected {count} frames x {MOTION_DIM} float32 "
                                           f"({count * MOTION_DIM * 4} bytes, at least one frame), got {len(payload)} bytes")
        return "motion", {"user_motion": np.frombuffer(payload, dtype="<f4").reshape(count, MOTION_DIM).astype(np.float32)}
    raise ProtocolError(BAD_FRAME, f"binary frame: kind {kind} is not {KIND_AUDIO} (audio) or {KIND_MOTION} (motion)")


def decode_client_text(text: str) -> dict:
    """A JSON message from a client, checked to be an object with a known "type"."""
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError(BAD_MESSAGE, f"text message: expected JSON, got {text[:40]!r}") from None
    kinds = (START, FLUSH, RESET, CLOSE)
    if not isinstance(message, dict) or message.get("type") not in kinds:
        raise ProtocolError(BAD_MESSAGE, f"text message: expected a JSON object with \"type\" one of {kinds}, "
                                         f"got {text[:60]!r}")
    return message


# ---- server -> client ---------------------------------------------------------------------------
def encode_turn(chunk: MotionChunk) -> bytes:
    """A turn's motion as a binary frame."""
    frames = np.ascontiguousarray(chunk.frames, dtype="<f4")
    return TURN_HEADER.pack(KIND_TURN, VERSION, len(frames), chunk.turn, chunk.start_s, chunk.latency_s) + frames.tobytes()


def decode_server_message(message: bytes | str) -> MotionChunk | dict:
    """A server message: a MotionChunk (latency_s: the server's), or the JSON object."""
    if isinstance(message, str):
        return json.loads(message)
    kind, version, frames, turn, start_s, latency_s = TURN_HEADER.unpack_from(message)
    if kind != KIND_TURN or version != VERSION:
        raise ValueError(f"server frame: kind {kind} version {version}, expected {KIND_TURN} version {VERSION}")
    motion = np.frombuffer(message, dtype="<f4", offset=TURN_HEADER.size).reshape(frames, MOTION_DIM)
    return MotionChunk(turn, start_s, motion.astype(np.float32), latency_s)
