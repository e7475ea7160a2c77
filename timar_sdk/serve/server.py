"""`TimarServer`: one Model, one Scheduler, one Connection per WebSocket client (docs/PROTOCOL.md).

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
import hmac
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from timar_sdk.runtime.model import Model
from timar_sdk.runtime.scheduler import Scheduler
from timar_sdk.serve import protocol as P
from timar_sdk.serve.config import ServeConfig
from timar_sdk.serve.connection import Connection
from timar_sdk.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics

TICK_S = 0.25          # housekeeping period: turn errors, idle timeouts
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
    for the metrics) with the limits of `config`."""

    def __init__(self, model: Model, config: ServeConfig | None = None):
        self.model, self.config = model, config or ServeConfig()
        self.max_steps = self.config.max_steps or 4 * model.bundle.manifest["sampling"]["steps"]
        self.metrics = ServerMetrics()
        self.metrics.probe_batches(model)
        self.connections: set[Connection] = set()
        self.port: int | None = None
        self.draining = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, host: str = "127.0.0.1", port: int = 8765,
                  on_listening: Callable[[int], None] | None = None) -> None:
        """Serve until `request_shutdown()`; then take no new connections, finish every
        connection's turns in flight (at most drain_timeout_s), close them (1001) and return.
        port 0 picks a free port; `on_listening(port)` is called once listening."""
        c = self.config
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        scheduler = Scheduler(self.model, c.max_batch)
        try:
            async with serve(lambda ws: self._serve_client(ws, scheduler), host, port,
                             process_request=self._process_request, compression=None,
                             max_size=c.max_message_bytes, close_timeout=c.close_timeout_s) as server:
                self.port = server.sockets[0].getsockname()[1]
                if on_listening is not None:
                    on_listening(self.port)
                housekeeping = asyncio.create_task(self._housekeeping())
                await self._stop.wait()
                self.draining = True
                server.close(close_connections=False)       # new handshakes get 503
                await asyncio.gather(*(conn.finish(False, P.CLOSE_GOING_AWAY, "server shutting down")
                                       for conn in list(self.connections)))
                try:
                    await asyncio.wait_for(server.wait_closed(), c.close_timeout_s + 1)
                except asyncio.TimeoutError:
                    pass
                housekeeping.cancel()
        finally:
            scheduler.close()

    def request_shutdown(self) -> None:
        """Begin the graceful shutdown; callable from any thread (a signal handler too)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    # ---- connections -----------------------------------------------------------------------------
    async def _serve_client(self, ws: ServerConnection, scheduler: Scheduler) -> None:
        if len(self.connections) >= self.config.max_sessions:   # handshakes that raced past the check
            self.metrics.refused.labels("full").inc()
            await ws.close(P.CLOSE_TRY_AGAIN_LATER, self._full_message())
            return
        conn = Connection(ws, scheduler, self.metrics, self.config, self.max_steps)
        self.connections.add(conn)
        self.metrics.sessions.inc()
        self.metrics.sessions_opened.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.metrics.sessions.dec()


    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._tick(asyncio.get_running_loop().time())

    def _tick(self, now: float) -> None:
        for conn in list(self.connections):
            conn.tick(now)

    def _full_message(self) -> str:
        n = self.config.max_sessions
        return f"server full: {n} of {n} conversations open; retry later"

    # ---- HTTP: health, readiness, metrics, refusals ------------------------------------------------
    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?")[0]
        if path == "/healthz":
            return ws.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            problem = self._not_ready()
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, problem + "\n") if problem else ws.respond(HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            body = self.metrics.render()
            headers = Headers([("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return Response(HTTPStatus.OK, "OK", headers, body)
        if path != P.PATH:
            return ws.respond(HTTPStatus.NOT_FOUND, f"not found: {path}; the conversation endpoint is {P.PATH}, "
                                                    f"and /healthz, /readyz, /metrics\n")
        token = self.config.token
        if token is not None and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
            self.metrics.refused.labels("auth").inc()
            response = ws.respond(HTTPStatus.UNAUTHORIZED, "unauthorized: expected the header "
                                                           "'Authorization: Bearer <token>' with this server's token\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        problem = self._not_ready()
        if problem:
            self.metrics.refused.labels("shutting_down" if self.draining else "full").inc()
            response = ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, problem + "\n")
            response.headers["Retry-After"] = "1"
            return response
        if self.config.send_buffer_bytes:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        return None

    def _not_ready(self) -> str:
        if self.draining:
            return "shutting down: finishing the turns in flight"
        if len(self.connections) >= self.config.max_sessions:
            return self._full_message()
        return ""


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
