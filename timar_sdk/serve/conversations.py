"""`Conversations`: what one timar-serve process (or one Ray Serve replica) holds, whatever carries
its WebSockets: the Model, its Scheduler, the metrics, the open connections, admission
(max_sessions, bearer token, draining), housekeeping and the graceful drain.

    conversations = Conversations(model, config)        # starts the Scheduler's worker thread
    refusal = conversations.admit(authorization_header)  # None, or why not (HTTP status, message)
    await conversations.serve(socket)                    # one client, until it is gone
    await conversations.drain()                          # shutdown: finish turns in flight, close 1001
    conversations.close()                                # stop the worker thread

The transports: `server.TimarServer` (the `websockets` library) and `ray_app` (Starlette's
WebSocket under Ray Serve, through `ray_app.StarletteSocket`).
"""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from http import HTTPStatus

from timar_sdk.runtime.model import Model
from timar_sdk.runtime.scheduler import Scheduler
from timar_sdk.serve import protocol as P
from timar_sdk.serve.config import ServeConfig
from timar_sdk.serve.connection import Connection
from timar_sdk.serve.metrics import ServerMetrics

TICK_S = 0.25          # housekeeping period: turn errors, idle timeouts


@dataclass(frozen=True)
class Refusal:
    """Why a conversation is refused: the HTTP status of the handshake's answer and its text."""
    status: HTTPStatus
    message: str


class Conversations:
    """The conversations of one server over `model` (give it a Model of its own: its batches are
    probed for the metrics) with the limits of `config`. `replica`, when set, names this server
    among several (Ray Serve) and is sent in every `ready` message."""

    def __init__(self, model: Model, config: ServeConfig | None = None, replica: str | None = None):
        self.model, self.config, self.replica = model, config or ServeConfig(), replica
        self.max_steps = self.config.max_steps or 4 * model.bundle.manifest["sampling"]["steps"]
        self.metrics = ServerMetrics()
        self.metrics.probe_batches(model)
        self.scheduler = Scheduler(model, self.config.max_batch)
        self.connections: set[Connection] = set()
        self.draining = False

    def admit(self, authorization: str | None) -> Refusal | None:
        """None if a new conversation with this Authorization header may open now; else the
        refusal (counted in the metrics)."""
        token = self.config.token
        if token is not None and not hmac.compare_digest(authorization or "", f"Bearer {token}"):
            self.metrics.refused.labels("auth").inc()
            return Refusal(HTTPStatus.UNAUTHORIZED, "unauthorized: expected the header "
                                                    "'Authorization: Bearer <token>' with this server's token")
        problem = self.not_ready()
        if problem:
            self.metrics.refused.labels("shutting_down" if self.draining else "full").inc()
            return Refusal(HTTPStatus.SERVICE_UNAVAILABLE, problem)
        return None

    def not_ready(self) -> str:
        """Why a conversation would be refused now ("" if it would not)."""
        if self.draining:
            return "shutting down: finishing the turns in flight"
        if len(self.connections) >= self.config.max_sessions:
            return self.full_message()
        return ""

    def full_message(self) -> str:
        n = self.config.max_sessions
        return f"server full: {n} of {n} conversations open; retry later"

    async def serve(self, socket) -> None:
        """Serve one admitted client on `socket` (see connection.py) until it is gone."""
        if len(self.connections) >= self.config.max_sessions:   # handshakes that raced past admit()
            self.metrics.refused.labels("full").inc()
            await socket.close(P.CLOSE_TRY_AGAIN_LATER, self.full_message())
            return
        conn = Connection(socket, self.scheduler, self.metrics, self.config, self.max_steps, self.replica)
        self.connections.add(conn)
        self.metrics.sessions.inc()
        self.metrics.sessions_opened.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.metrics.sessions.dec()

    async def housekeeping(self) -> None:
        """Forever (cancel it): a few times a second, pick up turn errors and close idle clients."""
        while True:
            await asyncio.sleep(TICK_S)
            now = asyncio.get_running_loop().time()
            for conn in list(self.connections):
                conn.tick(now)

    async def drain(self) -> None:
        """Take no new conversations; finish every connection's turns in flight (at most
        drain_timeout_s), then close it (1001)."""
        self.draining = True
        await asyncio.gather(*(conn.finish(False, P.CLOSE_GOING_AWAY, "server shutting down")
                               for conn in list(self.connections)))

    def close(self) -> None:
        """Run the turns already complete, then stop the Scheduler's worker thread."""
        self.scheduler.close()
