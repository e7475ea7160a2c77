"""`ServeConfig`: the limits and switches of a timar-serve server (the CLI's options)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from timar_sdk.errors import TimarInputError


@dataclass(frozen=True)
class ServeConfig:
    """Limits of one server. Times in seconds, sizes in bytes.

    max_sessions: conversations (connections) open at once; more are refused (HTTP 503).
    idle_timeout_s: a connection that sends nothing for this long is closed (code 4000).
    max_message_bytes: largest message a client may send; larger closes it (code 1009).
    max_pending: messages queued for a client that is not reading them; one more closes it
        (code 4001). A turn of motion is one message (5.6 kB).
    max_buffer_s: seconds of one speaker's input buffered without a turn completing (a client
        sending only one speaker, or faster than the server computes); more is refused.
    max_steps: largest `steps` setting a client may ask for (None: 4x the bundle's default),
        since one conversation's slow turns would delay everyone's batch.
    max_batch: turns per batched model call (None: all ready turns).
    token: bearer token every connection must present (None: no auth).
    drain_timeout_s: on shutdown, flush or close, how long to wait for turns in flight.
    close_timeout_s: how long a closing handshake may take before the TCP connection is dropped.
    send_buffer_bytes: the kernel send buffer of each connection (SO_SNDBUF; None: the OS's
        autotuning, which may hold megabytes before a client that stopped reading is noticed).
    """
    max_sessions: int = 64
    idle_timeout_s: float = 60.0
    max_message_bytes: int = 1 << 20
    max_pending: int = 32
    max_buffer_s: float = 20.0
    max_steps: int | None = None
    max_batch: int | None = None
    token: str | None = None
    drain_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    send_buffer_bytes: int | None = 65536

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "token":
                if value is not None and (not isinstance(value, str) or not value):
                    raise TimarInputError(f"token: expected a non-empty string or None, got {value!r}")
            elif value is None and f.name in ("max_steps", "max_batch", "send_buffer_bytes"):
                continue
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise TimarInputError(f"{f.name}: expected a number > 0, got {value!r}")
            elif f.name in ("max_sessions", "max_message_bytes", "max_pending", "max_steps", "max_batch",
                            "send_buffer_bytes") and not isinstance(value, int):
                raise TimarInputError(f"{f.name}: expected an integer > 0, got {value!r}")
