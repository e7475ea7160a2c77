"""`TimarServer`: `Conversations` (one Model, one Scheduler, one Connection per client) served
with the `websockets` library (docs/PROTOCOL.md).

    model = timar_sdk.Model(bundle)                   # the server's own: it probes the batches
    asyncio.run(TimarServer(model, ServeConfig()).run("127.0.0.1", 8765))
    with ServerThread(model) as server:               # or on a thread of its own (tests, notebooks)
        client = Client(server.url, seed=1)

The `websockets` library serves both the WebSocket endpoint (protocol.PATH) and, through its
`process_request` hook, plain HTTP GETs on the same port: /healthz (the process answers),
/readyz (it would accept a conversation now) and /metrics (Prometheus). The same hook refuses
connections beyond max_sessions (503), without the bearer token (401) or during shutdown (503).
Inference runs on the Scheduler's worker thread, never on the event loop.
"""
from __future__ import annotations

import asyncio
import ctypes
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from timar_sdk.runtime.model import Model
from timar_sdk.serve import protocol as P
from timar_sdk.serve.config import ServeConfig
from timar_sdk.serve.conversations import Conversations
from timar_sdk.serve.metrics import CONTENT_TYPE_LATEST

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_caches_to_the_os(threshold: int = 128 * 1024) -> None:
    """Process-wide (glibc; elsewhere nothing): blocks from `threshold` bytes up are mmap'd, so
    a closed conversation's cache (6 MB for the tiny bundle) goes back to the OS when freed.
    By default glibc raises its threshold past the largest block freed, keeps such blocks in
    its heap, and a server whose conversations come and go holds (and fragments) its peak:
    measured here, RSS wandering 140..260 MB over 600 connections instead of 120..140 MB."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


class TimarServer:
    """A timar-serve server over `model` (give it a Model of its own: its batches are probed
    for the metrics) with the limits of `config`: `Conversations` on the `websockets` library."""

    def __init__(self, model: Model, config: ServeConfig | None = None):
        self.conversations = Conversations(model, config)
        self.model, self.config, self.metrics = model, self.conversations.config, self.conversations.metrics
        self.port: int | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, host: str = "127.0.0.1", port: int = 8765,
                  on_listening: Callable[[int], None] | None = None) -> None:
        """Serve until `request_shutdown()`; then take no new connections, finish every
        connection's turns in flight (at most drain_timeout_s), close them (1001) and return.
        port 0 picks a free port; `on_listening(port)` is called once listening."""
        c, conversations = self.config, self.conversations
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with serve(conversations.serve, host, port, process_request=self._process_request,
                             compression=None, max_size=c.max_message_bytes,
                             close_timeout=c.close_timeout_s) as server:
                self.port = server.sockets[0].getsockname()[1]
                if on_listening is not None:
                    on_listening(self.port)
                housekeeping = asyncio.create_task(conversations.housekeeping())
                await self._stop.wait()
                server.close(close_connections=False)       # new handshakes get 503
                await conversations.drain()                 # (it marks the server draining at once)
                try:
                    await asyncio.wait_for(server.wait_closed(), c.close_timeout_s + 1)
                except asyncio.TimeoutError:
                    pass
                housekeeping.cancel()
        finally:
            conversations.close()

    def request_shutdown(self) -> None:
        """Begin the graceful shutdown; callable from any thread (a signal handler too)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    # ---- HTTP: health, readiness, metrics, refusals ------------------------------------------------
    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?")[0]
        if path == "/healthz":
            return ws.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            problem = self.conversations.not_ready()
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, problem + "\n") if problem else ws.respond(HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            body = self.metrics.render()
            headers = Headers([("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return Response(HTTPStatus.OK, "OK", headers, body)
        if path != P.PATH:
            return ws.respond(HTTPStatus.NOT_FOUND, f"not found: {path}; the conversation endpoint is {P.PATH}, "
                                                    f"and /healthz, /readyz, /metrics\n")
        refusal = self.conversations.admit(request.headers.get("Authorization"))
        if refusal is not None:
            response = ws.respond(refusal.status, refusal.message + "\n")
            if refusal.status == HTTPStatus.UNAUTHORIZED:
                response.headers["WWW-Authenticate"] = "Bearer"
            else:
                response.headers["Retry-After"] = "1"
            return response
        if self.config.send_buffer_bytes:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        return None


class ServerThread:
    """A TimarServer on an event loop of its own thread; a context manager that starts it on
    `host` (port 0: a free port) and shuts it down gracefully on exit."""

    def __init__(self, model: Model, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.server = TimarServer(model, config)
        self.host, self._port = host, port
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="timar-serve", daemon=True)

    @property
    def url(self) -> str:
        """The conversation endpoint, ws://host:port/v1/conversation."""
        return f"ws://{self.host}:{self.server.port}{P.PATH}"

    @property
    def http_url(self) -> str:
        """http://host:port, for /healthz, /readyz and /metrics."""
        return f"http://{self.host}:{self.server.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        if not self._listening.wait(timeout) or self._error is not None:
            raise RuntimeError(f"timar-serve did not start on {self.host}:{self._port}: {self._error}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown; waits for the thread (at most `timeout` seconds)."""
        self.server.request_shutdown()
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self.server.run(self.host, self._port, lambda port: self._listening.set()))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._listening.set()
