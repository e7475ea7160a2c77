"""Clients of timar-serve: `Client` (blocking) and `AsyncClient` (asyncio), one conversation each.

    with Client("ws://127.0.0.1:8765/v1/conversation", seed=1) as client:
        client.send_audio(user=chunk_u, agent=chunk_a)      # int16, or float in [-1, 1]; any size
        chunk = client.receive(timeout=5)                   # MotionChunk(turn, start_s, frames, latency_s)
        tail = client.flush()                               # the rest, the last turn padded

Settings are Session's: seed, steps, temperature, cfg, history, context_turns, smoothing. An
error message from the server raises ServerError(code, message). `websocket` is the underlying
websockets connection, for anything beyond this (raw frames in tests).
"""
from __future__ import annotations

import time
from contextlib import ExitStack

from websockets.asyncio.client import connect as async_connect
from websockets.sync.client import connect as sync_connect

from timar_sdk.runtime.scheduler import MotionChunk
from timar_sdk.serve import protocol as P


class ServerError(RuntimeError):
    """An error message from the server: `code` (protocol.py's error codes) and its message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _headers(token: str | None) -> dict | None:
    return {"Authorization": f"Bearer {token}"} if token else None


def _read(message, until: str | None) -> MotionChunk | dict | None:
    """A server message for a caller waiting for motion or for the JSON message `until`: the
    MotionChunk, the awaited JSON object, or None (a message to skip). Raises ServerError."""
    decoded = P.decode_server_message(message)
    if isinstance(decoded, MotionChunk):
        return decoded
    if decoded.get("type") == P.ERROR:
        raise ServerError(decoded.get("code", "?"), decoded.get("message", ""))
    return decoded if decoded.get("type") == until else None


class Client:
    """A blocking client: one conversation, opened with `settings` on `url`."""

    def __init__(self, url: str, token: str | None = None, open_timeout: float = 10.0, **settings):
        self._exit = ExitStack()                  # entering the connection: websockets' preferred use
        self.websocket = self._exit.enter_context(sync_connect(url, additional_headers=_headers(token),
                                                               compression=None, open_timeout=open_timeout,
                                                               max_size=None))
        try:
            self.websocket.send(P.encode_json(P.START, settings=settings))
            self.info: dict = self._until(P.READY, open_timeout)[1]["info"]
        except BaseException:
            self._exit.close()
            raise

    def send_audio(self, user=None, agent=None) -> None:
        """The next samples of the user and/or the agent (16 kHz mono int16, or float in [-1, 1])."""
        self.websocket.send(P.encode_audio(user, agent))

    def send_motion(self, frames) -> None:
        """The next frames of the user's motion, float [frames, 56] (only for a tracked user)."""
        self.websocket.send(P.encode_motion(frames))

    def receive(self, timeout: float | None = None) -> MotionChunk:
        """The next turn's motion (TimeoutError after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = _read(self.websocket.recv(left), None)
            if isinstance(item, MotionChunk):
                return item

    def flush(self, timeout: float = 30.0) -> list[MotionChunk]:
        """End the input: the motion still to come, the last turn padded (shorter). Then only
        reset() or close() are possible."""
        self.websocket.send(P.encode_json(P.FLUSH))
        return self._until(P.FLUSHED, timeout)[0]

    def reset(self, timeout: float = 30.0) -> None:
        """Start the conversation again (turn 0, same settings); motion still in flight is dropped.
        `info` becomes the new `ready` message's."""
        self.websocket.send(P.encode_json(P.RESET))
        self.info = self._until(P.READY, timeout)[1]["info"]

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _until(self, kind: str, timeout: float) -> tuple[list[MotionChunk], dict]:
        deadline, chunks = time.monotonic() + timeout, []
        while True:
            item = _read(self.websocket.recv(max(0.0, deadline - time.monotonic())), kind)
            if isinstance(item, MotionChunk):
                chunks.append(item)
            elif item is not None:
                return chunks, item


class AsyncClient:
    """The asyncio client: `client = await AsyncClient.connect(url, seed=1)`, then as Client
    with awaits."""

    def __init__(self, websocket, info: dict):
        self.websocket, self.info = websocket, info

    @classmethod
    async def connect(cls, url: str, token: str | None = None, open_timeout: float = 10.0,
                      **settings) -> "AsyncClient":
        websocket = await async_connect(url, additional_headers=_headers(token), compression=None,
                                        open_timeout=open_timeout, max_size=None)
        client = cls(websocket, {})
        try:
            await websocket.send(P.encode_json(P.START, settings=settings))
            while (item := _read(await websocket.recv(), P.READY)) is None or isinstance(item, MotionChunk):
                pass
        except BaseException:
            await websocket.close()
            raise
        client.info = item["info"]
        return client

    async def send_audio(self, user=None, agent=None) -> None:
        await self.websocket.send(P.encode_audio(user, agent))

    async def receive(self) -> MotionChunk:
        while not isinstance(item := _read(await self.websocket.recv(), None), MotionChunk):
            pass
        return item

    async def close(self) -> None:
        await self.websocket.close()
