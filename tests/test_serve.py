"""timar-serve: a real server on 127.0.0.1 (ephemeral ports), real websockets clients. The motion a
client receives equals Session run in-process; bad clients (malformed, oversized, never reading,
idle, flooding, unauthenticated, vanishing mid-turn) get clear refusals and leave the others'
motion intact; memory returns to its level after many connections; SIGTERM finishes turns in
flight. Every wait is bounded."""
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("websockets", reason="timar-serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("prometheus_client", reason="timar-serve tests need the serve extra: pip install -e '.[serve]'")

from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from timar_sdk import Model, Session, TimarInputError  # noqa: E402
from timar_sdk.data.synthetic import generate_conversation  # noqa: E402
from timar_sdk.serve import protocol as P  # noqa: E402
from timar_sdk.serve.client import Client, ServerError  # noqa: E402
from timar_sdk.serve.config import ServeConfig  # noqa: E402
from timar_sdk.serve.loadtest import server_stats, start_server, stop_server  # noqa: E402
from timar_sdk.serve.server import ServerThread  # noqa: E402

TURN = 16000                     # samples per turn (1 s at 16 kHz)
LIMITS = ServeConfig(max_sessions=12, max_pending=4, send_buffer_bytes=4096, close_timeout_s=5.0,
                     max_buffer_s=60.0, max_message_bytes=200_000)


@pytest.fixture(scope="module")
def model():
    return Model()


@pytest.fixture(scope="module")
def server():
    with ServerThread(Model(), LIMITS) as running:      # a Model of its own (its batches are probed)
        yield running


@pytest.fixture
def beside():
    """A thread for a well-behaved client beside a misbehaving one; result() re-raises its failure."""
    with ThreadPoolExecutor(1) as pool:
        yield pool


def speech(seconds: float, seed: int):
    """Speech-like int16 audio of the user and the agent (synthetic conversation)."""
    c = generate_conversation(seconds, seed)
    return tuple(np.clip(np.round(c[k] * 32768), -32768, 32767).astype(np.int16) for k in ("audio1", "audio2"))


def in_process(model, settings, user, agent, motion=None):
    """What Session gives for the whole input, flushed: the reference."""
    s = Session(model, **settings)
    return np.concatenate([s.feed(user_audio=user, agent_audio=agent, user_motion=motion), s.flush()])


def metric(server, name, **labels) -> float:
    return server.server.metrics.registry.get_sample_value(name, labels or None) or 0.0


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def error_of(client: Client, timeout: float = 5.0) -> ServerError:
    with pytest.raises(ServerError) as e:
        client.receive(timeout=timeout)
    return e.value


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stream_and_check(model, url, settings, seconds=2.5, seed=7, chunk=320):
    """A well-behaved client: streams, flushes, and its motion must equal Session's."""
    user, agent = speech(seconds, seed)
    with Client(url, **settings) as client:
        for i in range(0, len(user), chunk):
            client.send_audio(user[i:i + chunk], agent[i:i + chunk])
        got = client.flush(timeout=30)
    assert [c.turn for c in got] == list(range(len(got)))
    assert np.abs(np.concatenate([c.frames for c in got]) - in_process(model, settings, user, agent)).max() < 1e-5


# ---- correctness -------------------------------------------------------------------------------
def test_motion_equals_session_in_process(model, server):
    """Three concurrent conversations (other settings, chunk sizes, one with user motion) are
    batched on the server; each receives exactly what Session gives in-process."""
    settings = [dict(seed=1), dict(seed=2, cfg=2.0, steps=3), dict(seed=3, smoothing=False, temperature=0.7)]
    chunks = [320, 1111, TURN]
    data = [speech(3.5, 10 + k) for k in range(3)]
    motion = np.random.default_rng(0).uniform(-0.3, 0.3, (88, 56)).astype(np.float32)   # 3.52 s, client 2
    clients = [Client(server.url, **s) for s in settings]
    try:
        assert clients[0].info["samples_per_turn"] == TURN and clients[1].info["cfg"] == 2.0
        clients[2].send_motion(motion)
        for step in range(0, len(data[0][0]), 320):               # interleaved, like audio callbacks
            for client, (user, agent), size in zip(clients, data, chunks):
                if step % size < 320 or size == 320:
                    at = step - step % size
                    client.send_audio(user[at:at + size], agent[at:at + size])
        got = [[c.receive(timeout=20) for _ in range(3)] + c.flush(timeout=20) for c in clients]
    finally:
        for c in clients:
            c.close()
    for k, (s, (user, agent), chunks_k) in enumerate(zip(settings, data, got)):
        want = in_process(model, s, user, agent, motion if k == 2 else None)
        assert [c.turn for c in chunks_k] == [0, 1, 2, 3] and [c.start_s for c in chunks_k] == [0.0, 1.0, 2.0, 3.0]
        assert [len(c.frames) for c in chunks_k] == [25, 25, 25, len(user) * 25 // TURN - 75]
        assert np.abs(np.concatenate([c.frames for c in chunks_k]) - want).max() < 1e-5, s
    assert metric(server, "timar_batch_size_sum") > 0 and metric(server, "timar_turn_latency_seconds_count") >= 12


def test_reset_and_flush(model, server):
    user, agent = speech(1.5, 3)
    with Client(server.url, seed=9) as client:
        client.send_audio(user, agent)
        first = client.receive(timeout=10)
        tail = client.flush()
        assert (first.turn, [(c.turn, len(c.frames)) for c in tail]) == (0, [(1, len(user) * 25 // TURN - 25)])
        client.send_audio(user[:320], agent[:320])
        assert error_of(client).code == P.BAD_STATE
        client.reset()
        client.send_audio(user[:TURN], agent[:TURN])
        again = client.receive(timeout=10)
    assert again.turn == 0 and np.abs(again.frames - first.frames).max() < 1e-5


# ---- bad input -----------------------------------------------------------------------------------
def test_server_limits_are_checked():
    with pytest.raises(TimarInputError, match="max_sessions: expected a number > 0, got 0"):
        ServeConfig(max_sessions=0)
    with pytest.raises(TimarInputError, match="max_pending: expected an integer > 0, got 2.5"):
        ServeConfig(max_pending=2.5)
    with pytest.raises(TimarInputError, match="token: expected a non-empty string"):
        ServeConfig(token="")


@pytest.mark.parametrize("settings, field", [
    (dict(seed=-1), "seed:"), (dict(seed=1.5), "seed:"), (dict(cfg="high"), "cfg:"),
    (dict(temperature=99), "temperature:"), (dict(steps=10_000), "steps:"), (dict(smoothing={"jaw": -1}), "smoothing"),
    (dict(speed=2), "settings: unknown ['speed']")])
def test_bad_settings_name_the_field(server, settings, field):
    with pytest.raises(ServerError) as e:
        Client(server.url, **settings)
    assert e.value.code == P.BAD_SETTINGS and e.value.message.startswith(field), e.value.message


def test_malformed_frames_get_errors_and_the_connection_goes_on(model, server):
    user, agent = speech(1.0, 5)
    bad = [(b"\x01", P.BAD_FRAME, "8-byte header"),
           (P.HEADER.pack(9, 1, 0, 0) + b"\0\0", P.BAD_FRAME, "kind 9"),
           (P.HEADER.pack(1, 7, 0, 0) + b"\0\0", P.BAD_FRAME, "version 7"),
           (P.HEADER.pack(1, 1, 0, 5) + b"\0\0\0", P.BAD_FRAME, "even payload"),
           (P.HEADER.pack(2, 1, 0, 2) + b"\0" * 100, P.BAD_FRAME, "2 frames x 56"),
           (P.encode_motion(np.full((3, 56), np.nan)), P.BAD_INPUT, "user_motion: contains NaN"),
           (P.encode_motion(np.full((3, 56), 1e6)), P.BAD_INPUT, "user_motion: expected FLAME values"),
           ("not json", P.BAD_MESSAGE, "expected JSON"), ('{"type": "dance"}', P.BAD_MESSAGE, "one of"),
           ('{"type": "start"}', P.BAD_STATE, "already open")]
    with Client(server.url, seed=4) as client:
        for message, code, text in bad:
            client.websocket.send(message)
            e = error_of(client)
            assert e.code == code and text in e.message, (message[:12], e)
        client.send_audio(user, agent)                        # still serving, still correct
        got = client.receive(timeout=10)
    assert np.abs(got.frames - Session(model, seed=4).step(user, None, agent)).max() < 1e-5
    assert metric(server, "timar_errors_total", code=P.BAD_FRAME) >= 5


def test_audio_before_start_and_too_much_of_one_speaker(server):
    with connect(server.url, compression=None) as ws:
        ws.send(P.encode_audio(np.zeros(320, np.int16), None))
        reply = json.loads(ws.recv(timeout=5))
        assert reply["code"] == P.BAD_STATE and "start message first" in reply["message"]
        ws.send('{"type": "start", "settings": [1]}')
        reply = json.loads(ws.recv(timeout=5))
        assert reply["code"] == P.BAD_SETTINGS and reply["message"] == "settings: expected a JSON object, got [1]"
    with Client(server.url, seed=1) as client:                 # only the user speaks: never a turn
        for _ in range(61):
            client.send_audio(np.zeros(TURN, np.int16), None)
        e = error_of(client)
    assert e.code == P.BUFFER_FULL and e.message.startswith("user_audio:") and "both speakers" in e.message


def test_oversized_message_closes_that_client_only(model, server):
    with Client(server.url, seed=1) as client:
        client.websocket.send(b"\0" * 300_000)
        with pytest.raises(ConnectionClosed) as e:
            client.receive(timeout=5)
    assert e.value.rcvd.code == 1009
    stream_and_check(model, server.url, dict(seed=2), seconds=1.2)


# ---- clients that misbehave --------------------------------------------------------------------
def test_disconnect_mid_turn_leaves_the_others_correct(model, server):
    user, agent = speech(2.6, 6)
    opened = metric(server, "timar_sessions")
    for abrupt in (True, False):
        client = Client(server.url, seed=1)
        client.send_audio(user, agent)                        # two whole turns in flight, half a turn buffered
        if abrupt:
            client.websocket.socket.shutdown(socket.SHUT_RDWR)   # gone without a closing handshake
        client.close()
    stream_and_check(model, server.url, dict(seed=3), seconds=1.5)
    assert wait_until(lambda: metric(server, "timar_sessions") == opened)


def test_client_that_never_reads_is_closed_with_a_reason_others_unaffected(model, server, beside):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)      # small window: backpressure comes soon
    sock.connect(("127.0.0.1", server.server.port))
    turn = np.full(TURN, 100, np.int16)
    before = metric(server, "timar_errors_total", code=P.NOT_READING)
    with connect(server.url, sock=sock, max_queue=1, compression=None) as ws:
        ws.send(P.encode_json(P.START, settings={"seed": 1}))
        good = beside.submit(stream_and_check, model, server.url, dict(seed=5), 2.2)
        for _ in range(60):                                   # motion piles up; it is never read
            ws.send(P.encode_audio(turn, turn))
            if metric(server, "timar_errors_total", code=P.NOT_READING) > before:
                break
            time.sleep(0.05)
        assert wait_until(lambda: metric(server, "timar_errors_total", code=P.NOT_READING) > before, 8)
        with pytest.raises(ConnectionClosed) as e:            # reading now: the motion, then the close
            while True:
                ws.recv(timeout=5)
    good.result(timeout=30)                                   # raises what failed in the good client
    assert e.value.rcvd.code == P.CLOSE_NOT_READING and e.value.rcvd.reason.startswith("not_reading:")


def test_slow_sender_is_served_and_others_unaffected(model, server, beside):
    """Three times slower than real time, in 20 ms pieces; a normal client beside it."""
    user, agent = speech(1.1, 8)
    good = beside.submit(stream_and_check, model, server.url, dict(seed=6), 1.6)
    with Client(server.url, seed=2) as slow:
        for i in range(0, len(user), 320):
            slow.send_audio(user[i:i + 320], agent[i:i + 320])
            time.sleep(0.06)
        got = [slow.receive(timeout=10)] + slow.flush()
    good.result(timeout=30)
    assert np.abs(np.concatenate([c.frames for c in got]) - in_process(model, dict(seed=2), user, agent)).max() < 1e-5


def test_idle_client_is_closed(model):
    with ServerThread(model, ServeConfig(idle_timeout_s=0.5, close_timeout_s=1.0)) as server:
        with Client(server.url, seed=1) as client:
            t0 = time.monotonic()
            assert error_of(client, timeout=5).code == P.IDLE_TIMEOUT
            with pytest.raises(ConnectionClosed) as e:
                client.receive(timeout=5)
    assert e.value.rcvd.code == P.CLOSE_IDLE and time.monotonic() - t0 < 3


def test_flood_past_the_limit_is_refused_clearly(model):
    with ServerThread(model, ServeConfig(max_sessions=3)) as server:
        held = [Client(server.url, seed=k) for k in range(3)]
        refusals = []

        def try_one():
            try:
                Client(server.url, seed=9).close()
            except InvalidStatus as e:
                refusals.append((e.response.status_code, e.response.body.decode()))

        flood = [threading.Thread(target=try_one) for _ in range(10)]
        for t in flood:
            t.start()
        for t in flood:
            t.join(20)
        assert len(refusals) == 10 and all(code == 503 and "server full: 3 of 3" in body for code, body in refusals)
        assert http_get(server.http_url + "/readyz")[0] == 503
        assert metric(server, "timar_refused_connections_total", reason="full") == 10
        held.pop().close()                                    # a place frees up
        assert wait_until(lambda: http_get(server.http_url + "/readyz")[0] == 200)
        stream_and_check(model, server.url, dict(seed=1), seconds=1.1)
        for c in held:
            c.close()


def test_auth_required_and_refused(model):
    with ServerThread(model, ServeConfig(token="s3cret")) as server:
        for token in (None, "wrong"):
            with pytest.raises(InvalidStatus) as e:
                Client(server.url, token=token, seed=1)
            assert e.value.response.status_code == 401 and b"Authorization: Bearer" in e.value.response.body
        with Client(server.url, token="s3cret", seed=1) as client:
            assert client.info["seed"] == 1
        assert metric(server, "timar_refused_connections_total", reason="auth") == 2
        assert http_get(server.http_url + "/healthz") == (200, "ok\n")      # probes need no token


# ---- operations ------------------------------------------------------------------------------------
def test_health_readiness_metrics(server):
    assert http_get(server.http_url + "/healthz") == (200, "ok\n")
    assert http_get(server.http_url + "/readyz") == (200, "ready\n")
    status, text = http_get(server.http_url + "/metrics")
    for name in ("timar_sessions ", "timar_turn_latency_seconds_bucket", "timar_batch_size_bucket",
                 "timar_queue_wait_seconds_bucket", "process_resident_memory_bytes"):
        assert name in text, name
    assert status == 200 and http_get(server.http_url + "/nope")[0] == 404


@pytest.mark.slow
def test_timar_serve_memory_flat_and_sigterm_finishes_turns_in_flight():
    """The real command in a subprocess: 360 short conversations (clean closes and dropped
    connections, every 20th with a turn) and its idle RSS, read every 40, does not climb; then
    SIGTERM with turns in flight: they arrive, then the close (1001).

    Idle RSS without a leak sits at one of two levels about 5.5 MB apart (measured 119.2 and
    124.8 MB; most likely the allocator keeping or returning freed blocks) and can stay at either for
    several readings, so the bound must pass that step: the lowest of the last three readings
    may exceed the lowest of the first three by at most 8 MB. A leak of 35 kB per conversation
    exceeds that over the 240 between them; a closed Connection kept alive leaks about 390 kB."""
    proc, url = start_server(None, extra=("--max-sessions", "4"))
    http = url.rsplit("/v1/", 1)[0].replace("ws://", "http://")
    user, agent = speech(4.0, 9)

    def idle_rss() -> float:                                  # once every conversation is gone
        assert wait_until(lambda: server_stats(http)["sessions"] == 0)
        return server_stats(http)["rss"] / 1e6

    try:
        rss = []
        for k in range(360):
            client = Client(url, seed=k)
            client.send_audio(user[:TURN + 4800 if k % 20 == 0 else 4800], agent[:TURN + 4800])
            if k % 20 == 0:
                client.receive(timeout=10)
            if k % 2:
                client.websocket.socket.shutdown(socket.SHUT_RDWR)
            client.close()
            if k % 40 == 39:
                rss.append(idle_rss())
        assert min(rss[-3:]) - min(rss[:3]) < 8, f"server idle RSS climbed, MB every 40 conversations: {rss}"
        with Client(url, seed=1) as client:
            client.send_audio(user, agent)                    # four whole turns in one message
            assert client.receive(timeout=10).turn == 0
            proc.send_signal(signal.SIGTERM)
            turns = [client.receive(timeout=10).turn for _ in range(3)]
            with pytest.raises(ConnectionClosed) as e:
                client.receive(timeout=10)
        assert turns == [1, 2, 3] and e.value.rcvd.code == 1001
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            stop_server(proc)


# ---- load tools ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_counts_every_conversation_turn_and_refusal(model):
    """timar-loadtest --soak: clients come and go; each conversation's turns are all counted and
    received; a slot the server refuses is an error and the soak does not hold."""
    import asyncio

    from timar_sdk.serve.loadtest import soak
    with ServerThread(model, LIMITS) as running:
        r = asyncio.run(soak(running.url, clients=2, seconds=9.0, session_seconds=(2.5, 3.0)))
    # 2 slots, 9 s, conversations of 2.5 to 3 s (2 turns; a slot's last one may be cut shorter)
    assert 4 <= r["conversations"] <= 6, r
    assert r["turns_expected"] >= 2 * r["conversations"] - 4 and r["turns"] == r["turns_expected"], r
    assert r["failed"] == 0 and r["error_count"] == 0 and r["holds"], r
    assert r["server_rss_mb"]["max"] >= r["server_rss_mb"]["first"] > 0
    with ServerThread(model, ServeConfig(max_sessions=1)) as running:
        r = asyncio.run(soak(running.url, clients=2, seconds=5.0, session_seconds=(3.0, 3.0)))
    assert r["error_count"] >= 1 and not r["holds"], r
    assert any("slot 1" in e for e in r["errors"]), r["errors"]


def test_a_finished_conversation_is_freed_at_once(model):
    """A conversation's session (and its KV cache) is freed by reference counting when its client
    leaves, not by a later pass of the cycle collector: a 10-minute soak held hundreds of MB of
    caches that only gc could free (cycles through the connection's callback and its cancelled
    sender task)."""
    import gc
    import weakref

    user, agent = speech(2.5, 11)
    with ServerThread(model, LIMITS) as running:
        conversations = running.server.conversations
        gc.disable()
        try:
            sessions = []
            for k, drop in enumerate((False, True)):             # a clean close, and a vanished client
                client = Client(running.url, seed=k)
                client.send_audio(user, agent)
                assert client.receive(timeout=20).turn == 0
                assert wait_until(lambda: len(conversations.connections) == 1)
                sessions.append(weakref.ref(next(iter(conversations.connections)).stream.session))
                if drop:
                    client.websocket.socket.shutdown(socket.SHUT_RDWR)
                client.close()
                assert wait_until(lambda: not conversations.connections and not conversations.scheduler._streams)
            assert wait_until(lambda: all(s() is None for s in sessions)), "a finished conversation is still alive"
        finally:
            gc.enable()
