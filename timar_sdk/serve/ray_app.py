"""timar-serve on Ray Serve (extra `ray`): the same WebSocket protocol (docs/PROTOCOL.md) from N
replicas, each holding one Model and batching its own conversations (`Conversations`), behind
Ray Serve's HTTP proxy (docs/SERVE_RAY.md).

    serve run timar_sdk.serve.ray_app:build num_replicas=2 bundle=/path/to/bundle
    ray.init(); serve.run(build({"num_replicas": 2}), route_prefix="/")     # from Python

A WebSocket is one long request to the replica that accepted it (a FastAPI ingress; the proxy
relays its messages), so a conversation stays on its replica for its lifetime. Each replica
names itself in the `ready` message (info["replica"]) and in the X-Timar-Replica header of
/metrics, /readyz and /healthz (which reach whichever replica the proxy picks).
"""
# No `from __future__ import annotations` here: FastAPI must see the real `WebSocket` annotation
# of the route below (Ray's class-based view rewrites its signature; with string annotations
# every handshake was refused with 1008, FastAPI's request-validation close).

import asyncio
import dataclasses
import os
import typing
from http import HTTPStatus

from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse, Response
from ray import serve
from ray.serve import Application
from starlette.websockets import WebSocketDisconnect

from timar_sdk.errors import TimarInputError
from timar_sdk.serve import protocol as P
from timar_sdk.serve.config import ServeConfig
from timar_sdk.serve.connection import SocketClosed
from timar_sdk.serve.conversations import Conversations
from timar_sdk.serve.metrics import CONTENT_TYPE_LATEST

TOKEN_ENV = "TIMAR_SERVE_TOKEN"
PROBE_REQUESTS = 8        # ongoing requests a replica takes beyond its conversations: probes, refusals
CLOSE_POLICY = 1008       # a refused handshake, where the proxy cannot answer it with an HTTP status

api = FastAPI(title="timar-serve", docs_url=None, redoc_url=None, openapi_url=None)


class StarletteSocket:
    """A Starlette (FastAPI) WebSocket, accepted, as connection.py's socket: `async for message`
    (ends when the client is gone; a message over `max_message_bytes` closes it with 1009, as
    the websockets library does), `send` (raises SocketClosed when the client is gone), `close`."""

    def __init__(self, websocket: WebSocket, max_message_bytes: int):
        self.websocket, self.max_message_bytes = websocket, max_message_bytes

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                continue
            size = len(data) if isinstance(data, bytes) else len(data.encode())
            if size > self.max_message_bytes:
                await self.close(1009, f"message too big: {size} bytes; this server takes {self.max_message_bytes}")
                return
            yield data

    async def send(self, message: bytes | str) -> None:
        try:
            if isinstance(message, bytes):
                await self.websocket.send_bytes(message)
            else:
                await self.websocket.send_text(message)
        except (WebSocketDisconnect, RuntimeError, OSError) as e:
            raise SocketClosed(str(e)) from e

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except (RuntimeError, OSError):
            pass                                          # already closed


async def _refuse(websocket: WebSocket, status: HTTPStatus, message: str) -> None:
    """Answer a handshake with an HTTP error as timar-serve does (401/503 and the text), where the
    server supports the ASGI denial-response extension; else accept and close with 1008 (auth)
    or 1013 (full, shutting down) and the text as the reason."""
    headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else {"Retry-After": "1"}
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(message + "\n", int(status), headers))
        return
    await websocket.accept()
    await websocket.close(CLOSE_POLICY if status == HTTPStatus.UNAUTHORIZED else P.CLOSE_TRY_AGAIN_LATER,
                          message[:120])


@serve.deployment(name="timar")
@serve.ingress(api)
class TimarReplica:
    """One replica: a Model of its own and `Conversations` over it. `config`: the limits of this
    replica (max_sessions is per replica); the token, if None, is read from TIMAR_SERVE_TOKEN in
    the replica's environment (a runtime_env's env_vars)."""

    def __init__(self, bundle: str | None = None, backend: str = "auto", threads: int | None = 1,
                 config: ServeConfig | None = None):
        from timar_sdk.runtime.model import Model
        from timar_sdk.serve.server import return_freed_caches_to_the_os

        return_freed_caches_to_the_os()
        config = config or ServeConfig()
        if config.token is None and os.environ.get(TOKEN_ENV):
            config = dataclasses.replace(config, token=os.environ[TOKEN_ENV])
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.conversations = Conversations(Model(bundle, backend=backend, threads=threads), config, self.replica)
        self._housekeeping: asyncio.Task | None = None

    @api.websocket(P.PATH)
    async def conversation(self, websocket: WebSocket) -> None:
        refusal = self.conversations.admit(websocket.headers.get("authorization"))
        if refusal is not None:
            await _refuse(websocket, refusal.status, refusal.message)
            return
        if self._housekeeping is None:                    # on the replica's event loop
            self._housekeeping = asyncio.get_running_loop().create_task(self.conversations.housekeeping())
        await websocket.accept()
        await self.conversations.serve(StarletteSocket(websocket, self.conversations.config.max_message_bytes))

    @api.get("/healthz")
    async def healthz(self) -> PlainTextResponse:
        return PlainTextResponse("ok\n", headers=self._named())

    @api.get("/readyz")
    async def readyz(self) -> PlainTextResponse:
        problem = self.conversations.not_ready()
        return PlainTextResponse((problem or "ready") + "\n", 503 if problem else 200, self._named())

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.conversations.metrics.render(), media_type=CONTENT_TYPE_LATEST, headers=self._named())

    def check_health(self) -> None:
        """Ray Serve's health check: the Scheduler's worker thread must be alive."""
        if not self.conversations.scheduler.alive:
            raise RuntimeError("timar replica: the scheduler's worker thread has stopped")

    async def __del__(self) -> None:
        """Replica shutdown. Ray Serve calls this once the replica's requests (its WebSockets)
        have ended, or not at all if they outlast graceful_shutdown_timeout_s (then the replica
        is killed and its clients see the connection drop): close what is left (1001) after
        its turns in flight, stop the worker."""
        try:
            await self.conversations.drain()
        finally:
            if self._housekeeping is not None:
                self._housekeeping.cancel()
            self.conversations.close()

    def _named(self) -> dict:
        return {"X-Timar-Replica": self.replica}


BUILD_ARGS = {"bundle": str | None, "backend": str, "threads": int | None, "num_replicas": int, "num_cpus": float}
CONFIG_ARGS = typing.get_type_hints(ServeConfig)


def _typed(name: str, value, kind):
    """`value` as `kind` (strings from the command line are converted), or TimarInputError."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        names = {int: "an integer", float: "a number", str: "a string", type(None): "None"}
        expected = " or ".join(names[k] for k in typing.get_args(kind) or (kind,))
        raise TimarInputError(f"{name}: expected {expected}, got {value!r}") from None


def build(args: dict) -> Application:
    """The Ray Serve application (a Serve application builder: `serve run
    timar_sdk.serve.ray_app:build key=value ...`, or the `args` of an application in a Serve
    config file).

    args: bundle (folder; default: the shipped bundle), backend ("auto"), threads (intra-op
    threads per replica, 1), num_replicas (1), num_cpus (Ray CPUs reserved per replica; default
    threads), and any ServeConfig limit (max_sessions, idle_timeout_s, max_message_bytes, ...;
    per replica). Values may be strings (from the command line)."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(BUILD_ARGS) - set(CONFIG_ARGS))
    if unknown:
        raise TimarInputError(f"args: unknown {unknown}; expected some of {list(BUILD_ARGS) + list(CONFIG_ARGS)}")
    config = ServeConfig(**{k: _typed(k, v, CONFIG_ARGS[k]) for k, v in args.items() if k in CONFIG_ARGS})
    threads = _typed("threads", args.get("threads", 1), BUILD_ARGS["threads"])
    replicas = _typed("num_replicas", args.get("num_replicas", 1), int)
    num_cpus = _typed("num_cpus", args.get("num_cpus", threads or 1), float)
    if replicas < 1:
        raise TimarInputError(f"num_replicas: expected an integer >= 1, got {replicas}")
    if num_cpus < 0:
        raise TimarInputError(f"num_cpus: expected a number >= 0, got {num_cpus}")
    deployment = TimarReplica.options(
        num_replicas=replicas,
        max_ongoing_requests=config.max_sessions + PROBE_REQUESTS,   # the replica refuses past max_sessions
        ray_actor_options={"num_cpus": num_cpus})
    return deployment.bind(_typed("bundle", args.get("bundle"), BUILD_ARGS["bundle"]),
                           _typed("backend", args.get("backend", "auto"), str), threads, config)
