"""timar-serve on Ray Serve (timar_sdk.serve.ray_app): a local Ray cluster started here, on the
loopback interface only, with 2 replicas behind Serve's HTTP proxy; the package's Client and
timar-loadtest talk to the proxy unchanged. The motion equals Session in-process; connections
spread over both replicas and each stays on its own; a bad client leaves the others' motion
intact. Serve and Ray are shut down at the end, also when a test fails."""
import ipaddress
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",    # Ray's node address is 127.0.0.1 and every
                 "RAY_USAGE_STATS_ENABLED": "0"}               # listener binds to it; no usage report
os.environ.update(LOOPBACK_ONLY)                             # before Ray is imported: it reads them then
ray = pytest.importorskip("ray", reason="the Ray Serve tests need the ray extra: pip install -e '.[ray]'")
pytest.importorskip("ray.serve", reason="the Ray Serve tests need the ray extra: pip install -e '.[ray]'")
pytest.importorskip("websockets", reason="timar-serve tests need the serve extra: pip install -e '.[serve]'")
psutil = pytest.importorskip("psutil", reason="psutil (installed with ray) measures the Ray processes' memory")

from click.testing import CliRunner  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from test_serve import TURN, error_of, in_process, speech, stream_and_check  # noqa: E402
from timar_sdk import Model, TimarInputError  # noqa: E402
from timar_sdk.serve import protocol as P  # noqa: E402
from timar_sdk.serve.client import Client  # noqa: E402
from timar_sdk.serve.ray_app import build  # noqa: E402

slow = pytest.mark.slow                  # Ray and 2 replicas take 25 to 45 s to start here

LIMITS = {"max_sessions": 6, "max_message_bytes": 200_000, "max_buffer_s": 60.0,   # per replica
          "idle_timeout_s": 10.0}
RAY_RSS_LIMIT = 2.5e9                                        # bytes, all of Ray's processes together


@dataclass
class RayServe:
    url: str                         # ws://127.0.0.1:PORT/v1/conversation, through Serve's proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def ray_rss() -> float:
    """Resident memory (bytes) of every process Ray started from this one."""
    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def deploy(app, timeout: float = 150.0, **options) -> None:
    """serve.run(app, **options), which waits for the replicas without a limit, within `timeout`."""
    from ray import serve

    failure = []

    def run():
        try:
            serve.run(app, **options)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"the Ray Serve application {options} was not running after {timeout:g} s")
    if failure:
        raise failure[0]


@pytest.fixture(scope="module")
def model():
    return Model()


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(build({"num_replicas": 2, "threads": 1, **LIMITS}), route_prefix="/")
        yield RayServe(f"ws://127.0.0.1:{port}{P.PATH}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_build_takes_command_line_strings_and_names_bad_args():
    """`serve run timar_sdk.serve.ray_app:build key=value` passes strings; they become the
    deployment's options and the replicas' limits; a bad one is named (no cluster needed)."""
    d = build({"num_replicas": "3", "max_sessions": "5", "threads": "2", "idle_timeout_s": "2.5"})._bound_deployment
    assert (d.num_replicas, d.max_ongoing_requests, d.ray_actor_options["num_cpus"]) == (3, 5 + 8, 2.0)
    bundle, backend, threads, config = d.init_args
    assert (bundle, backend, threads, config.max_sessions, config.idle_timeout_s) == (None, "auto", 2, 5, 2.5)
    for args, message in [({"replicas": 2}, "args: unknown ['replicas']; expected some of ['bundle'"),
                          ({"num_replicas": "two"}, "num_replicas: expected an integer, got 'two'"),
                          ({"num_replicas": 0}, "num_replicas: expected an integer >= 1, got 0"),
                          ({"max_sessions": "0"}, "max_sessions: expected a number > 0, got 0"),
                          ({"bundle": 3}, "bundle: expected a string or None, got 3")]:
        with pytest.raises(TimarInputError) as e:
            build(args)
        assert str(e.value).startswith(message), e.value


@slow
def test_listens_on_loopback_only(cluster):
    """Every socket Ray's processes and Serve's proxy listen on is bound to the loopback address,
    but one per replica: Ray Serve 2.60 binds each replica's inter-deployment gRPC server to
    [::]:0 (ray/serve/_private/replica.py, not configurable); it takes no HTTP, and Ray's token
    authentication is on."""
    bound = []
    for p in psutil.Process().children(recursive=True):
        try:
            bound += [(p.name(), c.laddr) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    outside = [(name, addr) for name, addr in bound if not is_loopback(addr.ip)]
    assert len(bound) > 5 and sorted(name for name, _ in outside) == ["ray::ServeReplica:default:timar"] * 2, outside
    assert all(addr.ip == "::" for _, addr in outside), outside


@slow
def test_motion_equals_session_in_process(model, cluster):
    """Four conversations at once (other settings and chunk sizes, each from its own thread)
    through the proxy, batched on their replicas; each receives exactly what Session gives
    in-process."""
    settings = [dict(seed=1), dict(seed=2, cfg=2.0, steps=3), dict(seed=3, smoothing=False, temperature=0.7),
                dict(seed=4)]
    with ThreadPoolExecutor(len(settings)) as pool:
        runs = [pool.submit(stream_and_check, model, cluster.url, s, 3.5, 20 + k, chunk)
                for k, (s, chunk) in enumerate(zip(settings, [320, 1111, TURN, 640]))]
        for run in runs:
            run.result(timeout=120)                       # raises what failed in that conversation


@slow
def test_connections_spread_over_both_replicas_and_stay(model, cluster):
    """Six conversations open at once land on both replicas; each keeps its replica: two turns
    of motion (the replica's Session state) are right, and a reset later is answered by the
    same replica, which starts that conversation over (turn 0 again, the same motion)."""
    user, agent = speech(2.0, 31)
    clients = [Client(cluster.url, seed=k) for k in range(6)]
    try:
        first = [c.info["replica"] for c in clients]
        assert len(set(first)) == 2, first
        for i in range(0, len(user), 1600):
            for c in clients:
                c.send_audio(user[i:i + 1600], agent[i:i + 1600])
        got = [[c.receive(timeout=30) for _ in range(2)] for c in clients]
        for c in clients:
            c.reset()
        assert [c.info["replica"] for c in clients] == first
        for c in clients:
            c.send_audio(user[:TURN], agent[:TURN])
        again = [c.receive(timeout=30) for c in clients]
    finally:
        for c in clients:
            c.close()
    for k, (chunks_k, turn0) in enumerate(zip(got, again)):
        want = in_process(model, dict(seed=k), user, agent)[:50]
        assert [c.turn for c in chunks_k] == [0, 1]
        assert np.abs(np.concatenate([c.frames for c in chunks_k]) - want).max() < 1e-5, k
        assert turn0.turn == 0 and np.abs(turn0.frames - want[:25]).max() < 1e-5, k


@slow
def test_bad_clients_leave_the_others_correct(model, cluster):
    """On the replica of a client that sends malformed frames and then an oversized message
    (closed, 1009), and beside one that vanishes mid-turn, other conversations get exact motion."""
    bad = Client(cluster.url, seed=1)
    good = []
    try:
        while len(good) < 4 and not any(c.info["replica"] == bad.info["replica"] for c in good):
            good.append(Client(cluster.url, seed=10 + len(good)))
        assert any(c.info["replica"] == bad.info["replica"] for c in good)   # shares a replica with bad
        user, agent = speech(2.2, 41)
        vanishing = Client(cluster.url, seed=2)
        vanishing.send_audio(user, agent)                     # two turns in flight, a partial one buffered
        vanishing.websocket.socket.shutdown(socket.SHUT_RDWR)
        vanishing.close()
        for message, code in [(b"\x01", P.BAD_FRAME), (P.HEADER.pack(9, 1, 0, 0) + b"\0\0", P.BAD_FRAME),
                              ("not json", P.BAD_MESSAGE), ('{"type": "start"}', P.BAD_STATE)]:
            bad.websocket.send(message)
            assert error_of(bad).code == code
        for i in range(0, len(user), 320):
            for c in good:
                c.send_audio(user[i:i + 320], agent[i:i + 320])
            if i == 16000:
                bad.websocket.send(b"\0" * 300_000)
        with pytest.raises(ConnectionClosed) as e:
            bad.receive(timeout=10)
        assert e.value.rcvd.code == 1009
        got = [[c.receive(timeout=30)] + c.flush(timeout=30) for c in good]
    finally:
        for c in good + [bad]:
            c.close()
    for k, chunks_k in enumerate(got):
        want = in_process(model, dict(seed=10 + k), user, agent)
        assert np.abs(np.concatenate([c.frames for c in chunks_k]) - want).max() < 1e-5, k
    stream_and_check(model, cluster.url, dict(seed=5), seconds=1.2)   # and new conversations are served


@slow
def test_loadtest_through_the_proxy(cluster):
    """timar-loadtest, unchanged, against Serve's proxy: 4 real-time clients for 4 s, every
    turn's motion arrives; the replicas' metrics are read through the proxy; Ray's processes
    stay within RAY_RSS_LIMIT."""
    from timar_sdk.serve.cli import loadtest_cmd

    result = CliRunner().invoke(loadtest_cmd, ["--url", cluster.url, "--clients", "4", "--seconds", "4", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["turns_expected"] >= 4 * 3 and r["turns"] == r["turns_expected"] and r["failed"] == 0, r
    assert r["server"]["rss_mb_max"] > 50, r              # one replica's /metrics, via the proxy
    rss = ray_rss()
    print(f"Ray's processes: {rss / 1e6:.0f} MB resident")
    assert 0 < rss < RAY_RSS_LIMIT, f"{rss / 1e6:.0f} MB"


@slow
def test_full_replicas_refuse_clearly(cluster):
    """Past max_sessions on the replica the proxy picks: HTTP 503 and the reason, as timar-serve
    answers (the ASGI denial response, relayed by the proxy); both replicas took conversations."""
    from websockets.exceptions import InvalidStatus

    clients, refusal = [], None
    try:
        while refusal is None and len(clients) <= 2 * LIMITS["max_sessions"]:
            try:
                clients.append(Client(cluster.url, seed=len(clients)))
            except InvalidStatus as e:
                refusal = e.response
        assert refusal is not None and refusal.status_code == 503, len(clients)
        assert refusal.body.decode() == "server full: 6 of 6 conversations open; retry later\n"
        assert refusal.headers["Retry-After"] == "1"
        assert len({c.info["replica"] for c in clients}) == 2 and len(clients) > LIMITS["max_sessions"]
    finally:
        for c in clients:
            c.close()


@slow
def test_idle_client_is_closed_by_its_replica(cluster):
    """The replica's housekeeping runs: a client that sends nothing gets idle_timeout, then the
    close (4000) with its reason, relayed by the proxy."""
    with Client(cluster.url, seed=1) as client:
        t0 = time.monotonic()
        assert error_of(client, timeout=20).code == P.IDLE_TIMEOUT
        with pytest.raises(ConnectionClosed) as e:
            client.receive(timeout=5)
    assert e.value.rcvd.code == P.CLOSE_IDLE and e.value.rcvd.reason.startswith("idle_timeout:")
    assert LIMITS["idle_timeout_s"] - 1 < time.monotonic() - t0 < LIMITS["idle_timeout_s"] + 4


@slow
def test_token_behind_a_route_prefix(model, cluster):
    """A second application under /auth with a bearer token: refused without it (HTTP 401, as
    timar-serve answers), served with it at ws://host:port/auth/v1/conversation."""
    from ray import serve
    from websockets.exceptions import InvalidStatus

    try:                                                   # no CPU left to reserve: num_cpus 0
        deploy(build({"num_replicas": 1, "num_cpus": 0, "token": "s3cret"}), name="auth", route_prefix="/auth")
        url = cluster.url.replace(P.PATH, "/auth" + P.PATH)
        for token in (None, "wrong"):
            with pytest.raises(InvalidStatus) as e:
                Client(url, token=token, seed=1)
            assert e.value.response.status_code == 401 and b"Authorization: Bearer" in e.value.response.body
            assert e.value.response.headers["WWW-Authenticate"] == "Bearer"
        user, agent = speech(1.2, 51)
        with Client(url, token="s3cret", seed=3) as client:
            client.send_audio(user, agent)
            got = [client.receive(timeout=30)] + client.flush(timeout=30)
        assert np.abs(np.concatenate([c.frames for c in got]) - in_process(model, dict(seed=3), user, agent)).max() < 1e-5
        rss = ray_rss()                                   # the most Ray holds here: 3 replicas
        print(f"Ray's processes with 3 replicas: {rss / 1e6:.0f} MB resident")
        assert rss < RAY_RSS_LIMIT, f"{rss / 1e6:.0f} MB"
    finally:
        serve.delete("auth")
