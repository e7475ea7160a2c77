"""`Scheduler`: streaming that never blocks the caller on inference.

    model = timar_sdk.Model()
    with timar_sdk.Scheduler(model) as scheduler:
        stream = scheduler.open(seed=1)                      # one conversation (a Session)
        stream.push(user_audio=chunk_u, agent_audio=chunk_a)  # from the audio callback: buffers only
        chunk = stream.get(timeout=2.0)                       # MotionChunk: turn, start_s, frames [25, 56]

Threading model: `push` checks the input and appends it to the stream's buffers under the
stream's lock (microseconds), then wakes the scheduler's worker thread. The worker takes one
whole turn from every stream that has one, runs them as one batch (`step_many`'s machinery: each
graph once for all streams), commits each stream's turn and hands its motion to the stream's
queue (and `on_motion` callback, called on the worker thread: keep it short). A stream's turn
is late by one turn of audio (it needs the whole turn) plus the batch's compute time.

An error in one stream (a non-finite turn) goes to that stream's queue, with that turn's input
dropped; the other streams go on. Bad input is refused by `push` itself, in the caller.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from timar_sdk.errors import TimarInputError
from timar_sdk.runtime.model import Model
from timar_sdk.runtime.session import Session, _ready, _run_turns_together, _Turn

__all__ = ["MotionChunk", "Scheduler", "Stream"]


@dataclass(frozen=True)
class MotionChunk:
    """One turn of the agent's motion from a stream.

    turn: index of the turn in the conversation (0, 1, ...). start_s: media time of its first
    frame, seconds from the stream's start. frames: float32 [frames_per_turn, 56].
    latency_s: from the push that completed the turn's input to the motion being ready.
    """
    turn: int
    start_s: float
    frames: np.ndarray
    latency_s: float


class Stream:
    """One conversation fed by `push` and answered on `get` (or `on_motion`)."""

    def __init__(self, scheduler: "Scheduler", session: Session, on_motion=None):
        self.session = session
        self.on_motion = on_motion
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._completed_at: list[float] = []      # when each ready turn's input became complete
        self._queue: queue.Queue = queue.Queue()
        self._flush = False
        self._discard = False
        self.closed = False

    def push(self, user_audio=None, user_motion=None, agent_audio=None) -> None:
        """Buffer pieces of any length (as `Session.feed` takes them) and return at once; whole
        turns run on the scheduler's thread. Bad input raises TimarInputError here."""
        if self.closed:
            raise TimarInputError("stream: closed; open another one")
        with self._lock:
            before = self.session.ready_turns
            after = self.session.accept(user_audio, user_motion, agent_audio)
            self._completed_at += [time.perf_counter()] * (after - before)
        if after > before:
            self._scheduler._wake()

    def get(self, timeout: float | None = None) -> MotionChunk:
        """The next turn's motion (blocks up to `timeout` seconds; queue.Empty after). Raises the
        error of a turn that failed."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, flush: bool = True, discard: bool = False) -> None:
        """Stop taking input. Turns already complete still run and arrive on `get`; with `flush`,
        the trailing partial turn then runs too, padded as `Session.flush` pads it, and arrives
        as a last, shorter chunk. With `discard` (a listener that has gone), no turn that has not
        started runs: the scheduler drops the stream at its next round."""
        with self._lock:                    # after this, _take_turn takes nothing more
            self._flush = flush and not discard
            self._discard = discard
            self.closed = True
        self._scheduler._wake()

    # ---- used by the scheduler's worker ----------------------------------------------------
    def _finish(self) -> None:
        """A closed stream whose whole turns have run: its flushed tail, if asked for."""
        s = self.session
        if not self._flush or not min(len(s._conv.user_audio), len(s._conv.agent_audio)):
            return
        t0 = time.perf_counter()
        try:
            with self._lock:
                turn = s.turns
                frames = s.flush()
        except Exception as e:  # noqa: BLE001 - reported on this stream's queue
            self._queue.put(e)
            return
        if len(frames):
            self._deliver(turn, frames, t0)

    def _take_turn(self) -> tuple[_Turn, float] | None:
        """The first ready turn (inputs and the conversation it starts from), or None."""
        with self._lock:
            s, conv = self.session, self.session._conv
            if self._discard or not _ready(conv, s.samples, s.frames):
                return None
            ua, aa, um = conv.buffers
            turn = _Turn(s, conv, ua[:s.samples], um[:s.frames] if conv.motion_tracked else None, aa[:s.samples])
            return turn, self._completed_at[0]

    def _finish_turn(self, outcome, completed_at: float) -> None:
        """Commit (or drop, on error) the turn taken last, keeping what was pushed meanwhile."""
        s = self.session
        with self._lock:
            conv = s._conv
            ua, aa, um = conv.buffers
            rest = (ua[s.samples:], aa[s.samples:], um[s.frames:] if conv.motion_tracked else um)
            self._completed_at.pop(0)
            if isinstance(outcome, BaseException):
                s._conv = replace(conv, buffers=rest)
            else:
                motion, after, write = outcome
                write()
                s._conv = replace(after, buffers=rest, motion_tracked=conv.motion_tracked,
                                  last_motion=conv.last_motion)
        if isinstance(outcome, BaseException):
            self._queue.put(outcome)
            return
        self._deliver(after.turns - 1, motion, completed_at)

    def _deliver(self, turn: int, frames: np.ndarray, since: float) -> None:
        """Queue turn `turn`'s motion (and hand it to on_motion); latency counted from `since`."""
        s = self.session
        chunk = MotionChunk(turn, turn * s.samples / s.bundle["sample_rate"], frames, time.perf_counter() - since)
        self._queue.put(chunk)
        if self.on_motion is not None:
            try:
                self.on_motion(chunk)
            except Exception as e:  # noqa: BLE001 - the application's callback must not stop the worker
                self._queue.put(e)


class Scheduler:
    """Runs the complete turns of many streams on one Model, batched, on its own thread.

    model: the shared Model. max_batch: streams per batched call (None: all that are ready).
    """

    def __init__(self, model: Model, max_batch: int | None = None):
        if not isinstance(model, Model):
            raise TimarInputError(f"model: expected a timar_sdk.Model, got {model!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise TimarInputError(f"max_batch: expected an integer >= 1 or None, got {max_batch!r}")
        self.model, self.max_batch = model, max_batch
        self._streams: list[Stream] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="timar-scheduler", daemon=True)
        self._worker.start()

    def open(self, on_motion=None, **session_settings) -> Stream:
        """A new stream: a Session on this scheduler's model with `session_settings` (seed, steps,
        temperature, cfg, history, context_turns, smoothing). on_motion(chunk), if given, is called on the
        worker thread for every turn, as well as the chunk being queued for `get`."""
        if self._stopping:
            raise TimarInputError("scheduler: closed; make a new Scheduler")
        stream = Stream(self, Session(self.model, **session_settings), on_motion)
        with self._lock:
            self._streams.append(stream)
        return stream

    def close(self, timeout: float = 30.0) -> None:
        """Run the turns already complete, then stop the worker thread."""
        self._stopping = True
        self._wake()
        self._worker.join(timeout)

    @property
    def alive(self) -> bool:
        """The worker thread is running (False once closed, or if it died)."""
        return self._worker.is_alive()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            try:
                while self._round():
                    pass
            except Exception as e:  # noqa: BLE001 - never let the worker die silently: tell every stream
                with self._lock:
                    for stream in self._streams:
                        stream._queue.put(e)
            if self._stopping:
                return

    def _round(self) -> bool:
        """One turn of every stream that has one, in batches; False when none had one."""
        with self._lock:
            done = [s for s in self._streams if s.closed and (s._discard or not s.session.ready_turns)]
            self._streams = [s for s in self._streams if s not in done]
            streams = list(self._streams)
        for stream in done:
            stream._finish()
            stream.on_motion = None     # a callback usually refers back to its stream's owner: no cycle
        taken = [(stream, t) for stream in streams if (t := stream._take_turn()) is not None]
        size = self.max_batch or max(len(taken), 1)
        for i in range(0, len(taken), size):
            batch = taken[i:i + size]
            outcomes = _run_turns_together([turn for _, (turn, _) in batch])
            for (stream, (_, completed_at)), outcome in zip(batch, outcomes):
                stream._finish_turn(outcome, completed_at)
        return bool(taken)


