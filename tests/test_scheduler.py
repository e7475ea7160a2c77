"""Streaming through a Scheduler: push only buffers, turns of many streams run batched on the
worker thread, and every stream gets the motion its Session would give alone."""
import queue
import threading
import time

import numpy as np
import pytest

from test_shared_model import conversation
from timar_sdk import Model, Scheduler, Session, TimarInputError

CHUNK = 320          # 20 ms at 16 kHz


def test_streams_in_20ms_chunks_equal_sessions_alone():
    model = Model()
    settings = [dict(seed=1), dict(seed=2, cfg=2.0), dict(seed=3, history="feedback")]
    turns = 3
    data = [conversation(turns, seed=40 + k) for k in range(len(settings))]
    tracked = [False, True, False]                      # the user's face is tracked in stream 1 only
    want = []
    for st, (ua, um, aa), t in zip(settings, data, tracked):
        s = Session(model, **st)
        want.append([s.step(ua[i], um[i] if t else None, aa[i]) for i in range(turns)])
    seen_on_worker = []
    with Scheduler(model) as scheduler:
        streams = [scheduler.open(on_motion=lambda c: seen_on_worker.append(threading.current_thread().name), **st)
                   for st in settings]
        for i in range(turns):
            for pos in range(0, 16000, CHUNK):          # the three streams' callbacks, interleaved
                for stream, (ua, um, aa), t in zip(streams, data, tracked):
                    motion = um[i][pos * 25 // 16000:(pos + CHUNK) * 25 // 16000] if t else []
                    stream.push(user_audio=ua[i][pos:pos + CHUNK], agent_audio=aa[i][pos:pos + CHUNK],
                                user_motion=motion if len(motion) else None)
        for k, stream in enumerate(streams):
            for i in range(turns):
                chunk = stream.get(timeout=60)
                assert chunk.turn == i and chunk.start_s == pytest.approx(i * 1.0) and chunk.latency_s > 0
                assert np.abs(chunk.frames - want[k][i]).max() < 1e-5, (settings[k], i)
    assert len(seen_on_worker) == turns * len(settings) and set(seen_on_worker) == {"timar-scheduler"}


def test_push_refuses_bad_input_in_the_caller_and_other_streams_go_on():
    model = Model()
    ua, um, aa = conversation(1, seed=50)
    with Scheduler(model) as scheduler:
        good, bad = scheduler.open(seed=1), scheduler.open(seed=2)
        with pytest.raises(TimarInputError, match="agent_audio"):
            bad.push(user_audio=ua[0], agent_audio=np.full(16000, np.nan, np.float32))
        assert bad.session.ready_turns == 0 and len(bad.session.get_state()["buffers"]["user_audio"]) == 0
        good.push(user_audio=ua[0], agent_audio=aa[0])
        chunk = good.get(timeout=60)
        assert np.abs(chunk.frames - Session(model, seed=1).step(ua[0], None, aa[0])).max() < 1e-5
        with pytest.raises(queue.Empty):
            bad.get(timeout=0.2)
        bad.close()
        with pytest.raises(TimarInputError, match="stream: closed"):
            bad.push(user_audio=ua[0])


def test_close_flushes_the_trailing_partial_turn():
    model = Model()
    ua, um, aa = conversation(2, seed=60)
    n = 16000 + 8000
    want = Session(model, seed=5)
    want_frames = np.concatenate([want.feed(user_audio=ua.reshape(-1)[:n], agent_audio=aa.reshape(-1)[:n]),
                                  want.flush()])
    with Scheduler(model) as scheduler:
        stream = scheduler.open(seed=5)
        stream.push(user_audio=ua.reshape(-1)[:n], agent_audio=aa.reshape(-1)[:n])
        stream.close()
        first, last = stream.get(timeout=60), stream.get(timeout=60)
    assert (first.turn, last.turn) == (0, 1) and last.start_s == pytest.approx(1.0)
    assert first.frames.shape == (25, 56) and last.frames.shape == (12, 56)
    assert np.abs(np.concatenate([first.frames, last.frames]) - want_frames).max() < 1e-5


def test_a_closed_scheduler_opens_no_streams():
    scheduler = Scheduler(Model())
    assert scheduler.alive
    scheduler.close()
    assert not scheduler.alive and not scheduler._worker.is_alive()
    with pytest.raises(TimarInputError, match="scheduler: closed"):
        scheduler.open(seed=1)


def test_close_with_discard_drops_the_turns_not_started():
    """A listener that has gone: its queued turns are not computed (close without discard runs them all)."""
    model = Model()
    ua, um, aa = conversation(6, seed=70)
    with Scheduler(model) as scheduler:
        kept, dropped = scheduler.open(seed=1), scheduler.open(seed=2)
        for stream in (kept, dropped):
            stream.push(user_audio=ua.reshape(-1), agent_audio=aa.reshape(-1))      # six whole turns each
        dropped.close(discard=True)
        kept.close()
        assert [kept.get(timeout=60).turn for _ in range(6)] == list(range(6))
        deadline = time.monotonic() + 10
        while scheduler._streams and time.monotonic() < deadline:                # both leave the scheduler
            time.sleep(0.01)
        assert not scheduler._streams
    got = []
    while not dropped._queue.empty():
        got.append(dropped.get(timeout=0).turn)
    assert got in ([], [0]), got               # at most the turn the worker had taken before the close


def test_a_finished_stream_is_freed_without_the_cycle_collector():
    """An owner holding its stream, whose on_motion callback refers back to the owner (a server's
    connection): once the stream is done, nothing keeps its session (and its KV cache) alive but
    the owner; the cycle is broken, so it is freed by reference counting, not by a later gc pass
    (a server that waited for gc held hundreds of MB of caches)."""
    import gc
    import weakref

    class Owner:
        def on_motion(self, chunk):
            self.last = chunk.turn

    model = Model()
    ua, um, aa = conversation(1, seed=80)
    gc.disable()
    try:
        with Scheduler(model) as scheduler:
            owner = Owner()
            owner.stream = scheduler.open(seed=1, on_motion=owner.on_motion)
            owner.stream.push(user_audio=ua[0], agent_audio=aa[0])
            assert owner.stream.get(timeout=60).turn == 0
            owner.stream.close()
            deadline = time.monotonic() + 10
            while scheduler._streams and time.monotonic() < deadline:
                time.sleep(0.01)
            session = weakref.ref(owner.stream.session)
            del owner
            assert session() is None, "the finished stream's session is still alive (a reference cycle)"
    finally:
        gc.enable()
