"""`Connection`: one client's conversation on the server, from its first message to its close.

Everything here runs on the event loop thread and only buffers: `Stream.push` checks the input
and appends it (well under a millisecond); the Scheduler's worker thread runs the turns. The
worker's `on_motion` only schedules `_drain` on the loop (call_soon_threadsafe), which moves the
stream's motion (and turn errors) into this connection's outgoing queue; a sender task writes
that queue to the socket. A client that stops reading fills the queue and is closed (4001).

The socket is anything with websockets' connection interface (`async for message in socket`,
`await send(str | bytes)`, `await close(code, reason)`): a websockets connection (server.py), or
an adapter of another transport (ray_app.StarletteSocket) that raises `SocketClosed` when the
client is gone.
"""
from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass

from timar_sdk.errors import TimarInputError
from timar_sdk.runtime.scheduler import MotionChunk, Scheduler, Stream
from timar_sdk.runtime.session import SETTINGS
from timar_sdk.serve import protocol as P
from timar_sdk.serve.config import ServeConfig
from timar_sdk.serve.metrics import ServerMetrics


class SocketClosed(ConnectionError):
    """Raised by a socket adapter (not websockets', which raises its ConnectionClosed) when the
    client is gone."""


@dataclass(frozen=True)
class _Close:
    """Queued after the last message: close the socket with this code and reason."""
    code: int
    reason: str


class Connection:
    """One client. `run()` serves it until it closes; `finish()` ends it from the server side
    (shutdown) after the turns in flight; `tick()` is called a few times a second."""

    def __init__(self, socket, scheduler: Scheduler, metrics: ServerMetrics, config: ServeConfig, max_steps: int,
                 replica: str | None = None):
        self.socket, self.scheduler, self.metrics, self.config = socket, scheduler, metrics, config
        self.max_steps, self.replica = max_steps, replica
        self.loop = asyncio.get_running_loop()
        self.last_message = self.loop.time()
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.closing = False              # a close is under way: no more input is taken
        self.stream: Stream | None = None
        self.settings: dict | None = None
        self.state = "new"                # new -> open -> flushing -> flushed; reset -> open
        self._sender: asyncio.Task | None = None
        self._closer: asyncio.Task | None = None      # abort()'s close
        self._close_queued = False                      # a close waits behind the queued messages
        self._new_stream_counts()

    # ---- the connection's life ----------------------------------------------------------------
    async def run(self) -> None:
        """Serve this client until it disconnects or is closed."""
        from websockets.exceptions import ConnectionClosed

        self._sender = asyncio.create_task(self._send_loop())
        try:
            async for message in self.socket:
                self.last_message = self.loop.time()
                if self.closing:
                    continue                              # closing: input is ignored
                close = self._handle(message)
                if close is not None:
                    await self.finish(close, P.CLOSE_NORMAL, "closed by the client")
                    await asyncio.wait([self._sender], timeout=self.config.close_timeout_s + 1)
        except (ConnectionClosed, SocketClosed):
            pass                                          # the client went away
        finally:
            self._end_stream(flush=False, discard=True)       # nobody to send the rest to
            self._sender.cancel()
            # The cancelled task keeps its CancelledError, whose traceback holds the sender's frame
            # and so this connection: dropping the task breaks that cycle, so the conversation's
            # session and KV cache are freed now, not at some later garbage collection.
            self._sender = None

    async def finish(self, flush: bool, code: int, reason: str) -> None:
        """Stop taking input, wait (at most drain_timeout_s) for the turns already complete (and,
        with `flush`, the trailing partial turn), send them, then close with `code`."""
        if self.closing:
            return
        self.closing = True
        if self.state == "open":
            self._end_stream(flush)
        if self.state in ("open", "flushing"):
            self._drain()
            try:
                await asyncio.wait_for(self._ended.wait(), self.config.drain_timeout_s)
            except asyncio.TimeoutError:
                pass
        self._queue_close(code, reason)

    def abort(self, code: int, error: str, message: str) -> None:
        """Close at once (the client is misbehaving): no more motion, `code` and a reason."""
        if self._closer is not None:
            return
        self.closing = True
        self.metrics.errors.labels(error).inc()
        self._end_stream(flush=False, discard=True)
        if self._sender is not None:
            self._sender.cancel()
        self._closer = asyncio.create_task(self.socket.close(code, f"{error}: {message}"[:120]))

    def tick(self, now: float) -> None:
        """Housekeeping: pick up turn errors (they wake nothing), close an idle client."""
        self._drain()
        idle = now - self.last_message
        if not self.closing and idle > self.config.idle_timeout_s:
            self.closing = True
            self._error(P.IDLE_TIMEOUT, f"no message for {idle:.0f} s (the server's idle timeout is "
                                        f"{self.config.idle_timeout_s:g} s)")
            self._queue_close(P.CLOSE_IDLE, f"{P.IDLE_TIMEOUT}: no message for {idle:.0f} s")
            self._end_stream(flush=False)

    # ---- messages from the client ------------------------------------------------------------
    def _handle(self, message: bytes | str) -> bool | None:
        """Act on one message; errors go back to the client as error messages. Returns the
        close message's flush flag when the client asked to close, else None."""
        try:
            if isinstance(message, bytes):
                kind, inputs = P.decode_client_frame(message)
                self._push(kind, inputs)
                return None
            request = P.decode_client_text(message)
            kind = request["type"]
            if kind == P.START:
                self._start(request.get("settings", {}))
            elif kind == P.RESET:
                self._reset()
            elif kind == P.FLUSH:
                self._flush()
            elif kind == P.CLOSE:
                flush = request.get("flush", False)
                if not isinstance(flush, bool):
                    raise P.ProtocolError(P.BAD_MESSAGE, f"close: flush: expected true or false, got {flush!r}")
                return flush
        except P.ProtocolError as e:
            self._error(e.code, str(e))
        return None

    def _start(self, settings) -> None:
        if self.state != "new":
            raise P.ProtocolError(P.BAD_STATE, "start: the conversation is already open; send reset to start over")
        if not isinstance(settings, dict):
            raise P.ProtocolError(P.BAD_SETTINGS, f"settings: expected a JSON object, got {settings!r}")
        if set(settings) - set(SETTINGS):
            raise P.ProtocolError(P.BAD_SETTINGS, f"settings: unknown {sorted(set(settings) - set(SETTINGS))}; "
                                                  f"expected some of {list(SETTINGS)}")
        steps = settings.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > self.max_steps:
            raise P.ProtocolError(P.BAD_SETTINGS, f"steps: expected an integer in 1..{self.max_steps} on this "
                                                  f"server (its --max-steps), got {steps}")
        self._open_stream(settings)

    def _reset(self) -> None:
        if self.state == "new":
            raise P.ProtocolError(P.BAD_STATE, "reset: send a start message first")
        self._end_stream(flush=False, discard=True)       # the old conversation's motion is dropped
        self._open_stream(self.settings)

    def _flush(self) -> None:
        if self.state != "open":
            raise P.ProtocolError(P.BAD_STATE, f"flush: the conversation is {self.state}; expected an open one "
                                               f"(send start, or reset after a flush)")
        self._end_stream(flush=True)
        self.state = "flushing"
        self._drain()

    def _push(self, kind: str, inputs: dict) -> None:
        if self.state != "open":
            what = {"new": "send a start message first", "flushing": "it was flushed; send reset to start a new one",
                    "flushed": "it was flushed; send reset to start a new one"}[self.state]
            raise P.ProtocolError(P.BAD_STATE, f"{kind} frame: the conversation takes no input now: {what}")
        self._check_buffer(inputs)
        try:
            self.stream.push(**inputs)
        except TimarInputError as e:
            raise P.ProtocolError(P.BAD_INPUT, str(e)) from None
        for name, value in inputs.items():
            if value is not None:
                self._fed[name] += len(value)

    def _check_buffer(self, inputs: dict) -> None:
        """Refuse input that would buffer more than max_buffer_s of one stream."""
        s = self.stream.session
        turns_done = self._frames_done // s.frames
        limits = {"user_audio": s.samples, "agent_audio": s.samples, "user_motion": s.frames}
        for name, value in inputs.items():
            if value is None:
                continue
            per_s = limits[name] * s.bundle["fps"] / s.frames
            buffered = self._fed[name] + len(value) - turns_done * limits[name]
            if buffered > self.config.max_buffer_s * per_s:
                raise P.ProtocolError(P.BUFFER_FULL, f"{name}: {buffered / per_s:.1f} s would be buffered without a "
                                                     f"turn completing (the server's limit is "
                                                     f"{self.config.max_buffer_s:g} s); a turn needs both speakers' "
                                                     f"audio; send in real time")

    # ---- the stream ------------------------------------------------------------------------------
    def _open_stream(self, settings: dict) -> None:
        try:
            self.stream = self.scheduler.open(on_motion=self._on_motion, **settings)
        except TimarInputError as e:
            raise P.ProtocolError(P.BAD_SETTINGS, str(e)) from None
        self.settings, self.state = dict(settings), "open"
        self._new_stream_counts()
        info = {**self.stream.session.info, "max_buffer_s": self.config.max_buffer_s}
        if self.replica is not None:
            info["replica"] = self.replica
        self._send(P.encode_json(P.READY, info=info))

    def _new_stream_counts(self) -> None:
        self._fed = {"user_audio": 0, "agent_audio": 0, "user_motion": 0}
        self._frames_done = 0             # frames delivered (or failed) by the current stream
        self._expected: int | None = None  # frames the stream will deliver in all, once it is closed
        self._ended = asyncio.Event()

    def _end_stream(self, flush: bool, discard: bool = False) -> None:
        """Close the current stream; its remaining turns (and, with flush, its padded tail) still
        run, and `_expected` says how many frames they make (as Session.flush counts them). With
        `discard` (the client is gone or aborted), turns not yet started are dropped instead."""
        stream = self.stream
        if stream is None or stream.closed:
            return
        s = stream.session
        real = min(self._fed["user_audio"], self._fed["agent_audio"])
        if flush:
            self._expected = real * s.frames // s.samples
        else:
            ready = real // s.samples
            if self._fed["user_motion"]:
                ready = min(ready, self._fed["user_motion"] // s.frames)
            self._expected = ready * s.frames
        stream.close(flush=flush, discard=discard)

    def _on_motion(self, chunk: MotionChunk) -> None:
        """On the worker thread: count the turn, wake the loop to send it."""
        self.metrics.observe_turn(chunk)
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass                                          # the loop is gone (server stopped)

    def _drain(self) -> None:
        """Move the current stream's motion and turn errors to the outgoing queue."""
        stream = self.stream
        if stream is None:
            return
        while True:
            try:
                item = stream.get(timeout=0)
            except queue.Empty:
                break
            if isinstance(item, BaseException):           # a failed turn (its input is dropped)
                self._frames_done = self._expected if self._expected is not None else \
                    self._frames_done + stream.session.frames
                self._error(P.TURN_FAILED, str(item))
                continue
            self._frames_done += len(item.frames)
            self._send(P.encode_turn(item))
        if self._expected is not None and self._frames_done >= self._expected and not self._ended.is_set():
            self._ended.set()
            if self.state == "flushing":
                self.state = "flushed"
                self._send(P.encode_json(P.FLUSHED, turns=stream.session.turns, frames=self._frames_done))

    # ---- messages to the client --------------------------------------------------------------
    def _error(self, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        self._send(P.encode_json(P.ERROR, code=code, message=message))

    def _queue_close(self, code: int, reason: str) -> None:
        """Close after the messages queued so far; nothing more is queued."""
        if not self._close_queued:
            self._close_queued = True
            self.outgoing.put_nowait(_Close(code, reason))

    def _send(self, message: bytes | str) -> None:
        if self._closer is not None or self._close_queued:
            return
        if self.outgoing.qsize() >= self.config.max_pending:
            self.abort(P.CLOSE_NOT_READING, P.NOT_READING,
                       f"{self.outgoing.qsize()} messages unsent; read your motion")
            return
        self.outgoing.put_nowait(message)

    async def _send_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                item = await self.outgoing.get()
                if isinstance(item, _Close):
                    await self.socket.close(item.code, item.reason)
                    return
                await self.socket.send(item)
        except (ConnectionClosed, SocketClosed):
            pass
