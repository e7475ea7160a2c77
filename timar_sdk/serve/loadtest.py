"""`timar-loadtest`: N simulated clients streaming speech-like audio in real time to timar-serve.

Each client opens a conversation and sends 20 ms of both speakers' audio every 20 ms (one
ticker for all clients, like audio callbacks; turn boundaries staggered evenly over a turn),
taken from synthetic conversations (timar_sdk.data.synthetic, as int16 PCM). A turn's latency is
from the send that completed its audio to its motion arriving at the client. A turn is late
when its latency exceeds the budget, failed when its motion never came (or came as an error).
The server's CPU and memory are read from its /metrics (process_cpu_seconds_total,
process_resident_memory_bytes), so they are measured for a remote server too.
"""
from __future__ import annotations

import asyncio
import re
import resource
import subprocess
import sys
import time
import urllib.request
from functools import lru_cache

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from timar_sdk.data.synthetic import generate_conversation
from timar_sdk.serve.client import AsyncClient, ServerError

POOL = 4                 # distinct synthetic conversations; clients share them at other offsets


@lru_cache(maxsize=2)
def _conversations(seconds: float) -> tuple:
    """POOL conversations of `seconds` as int16 (user, agent) pairs (about 1 s to make per minute)."""
    out = []
    for k in range(POOL):
        c = generate_conversation(seconds, seed=1000 + k)
        out.append(tuple(np.clip(np.round(c[f"audio{i}"] * 32768), -32768, 32767).astype(np.int16) for i in (1, 2)))
    return tuple(out)


def server_stats(http_url: str | None) -> dict | None:
    """The server's CPU seconds, resident memory (bytes) and open conversations, from its
    /metrics, or None."""
    if http_url is None:
        return None
    try:
        with urllib.request.urlopen(f"{http_url}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return {"cpu_s": values.get("process_cpu_seconds_total"), "rss": values.get("process_resident_memory_bytes"),
            "sessions": values.get("timar_sessions")}


def http_url_of(url: str) -> str:
    """ws://host:port/path -> http://host:port (wss -> https)."""
    m = re.match(r"ws(s?)://([^/]+)", url)
    if not m:
        raise ValueError(f"url: expected ws://host:port/v1/conversation, got {url!r}")
    return f"http{m.group(1)}://{m.group(2)}"


def latency_ms(latency_s: list[float]) -> tuple[np.ndarray, dict]:
    """Turn latencies (seconds) as milliseconds, and their p50 / p95 / p99 / max (NaN if none)."""
    ms = np.asarray(latency_s) * 1e3 if latency_s else np.full(1, np.nan)
    return ms, {q: float(np.percentile(ms, int(q[1:]))) for q in ("p50", "p95", "p99")} | {"max": float(ms.max())}


async def run_trial(url: str, clients: int, seconds: float = 60.0, budget_ms: float = 300.0, chunk_ms: int = 20,
                    token: str | None = None, grace_s: float = 10.0) -> dict:
    """`clients` real-time clients for `seconds`; their turn latencies, late and failed turns,
    the server's CPU (cores busy, on average) and memory (MB) and this process's CPU."""
    pool = _conversations(seconds + 2.0)
    conns = await asyncio.gather(*(AsyncClient.connect(url, token, seed=k) for k in range(clients)),
                                 return_exceptions=True)
    refused = [c for c in conns if isinstance(c, BaseException)]
    if refused:                                                 # e.g. past the server's max_sessions
        await asyncio.gather(*(c.close() for c in conns if not isinstance(c, BaseException)))
        return {"clients": clients, "seconds": seconds, "budget_ms": budget_ms, "holds": False,
                "error": f"{len(refused)} of {clients} connections failed: {refused[0]}"}
    samples, rate = conns[0].info["samples_per_turn"], conns[0].info["sample_rate"]
    chunk = rate * chunk_ms // 1000
    audio = [tuple(np.roll(a, -(k // POOL) * rate) for a in pool[k % POOL]) for k in range(clients)]
    sent, completed = [0] * clients, [[] for _ in range(clients)]   # completed[k][turn]: send time
    latency, received, failed = [], [0] * clients, [0] * clients
    stats_url, tick_lag = http_url_of(url), []

    def send_done(k: int, n: int) -> None:
        sent[k] += n
        while sent[k] >= (len(completed[k]) + 1) * samples:
            completed[k].append(time.perf_counter())

    async def receive(k: int) -> None:
        while True:
            try:
                chunk_ = await conns[k].receive()
            except ServerError:
                failed[k] += 1
                continue
            except Exception:  # noqa: BLE001 - the connection is gone: its missing turns count as failed
                return
            latency.append(time.perf_counter() - completed[k][chunk_.turn])
            received[k] += 1

    receivers = [asyncio.create_task(receive(k)) for k in range(clients)]
    for k in range(1, clients):                                   # stagger the turn boundaries
        n = k * samples // clients
        await conns[k].send_audio(audio[k][0][:n], audio[k][1][:n])
        send_done(k, n)
    before, cpu0 = await asyncio.to_thread(server_stats, stats_url), resource.getrusage(resource.RUSAGE_SELF)
    t0, rss_seen = time.perf_counter(), []

    async def sample_memory() -> None:                           # the server's memory, once a second
        while before:
            rss_seen.append((await asyncio.to_thread(server_stats, stats_url) or {}).get("rss"))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    start, ticks = time.perf_counter(), int(seconds * 1000 / chunk_ms)
    for tick in range(ticks):
        target = start + tick * chunk_ms / 1000
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        tick_lag.append(max(0.0, time.perf_counter() - target))   # is this load generator keeping up?
        for k, c in enumerate(conns):
            pos = sent[k]
            await c.send_audio(audio[k][0][pos:pos + chunk], audio[k][1][pos:pos + chunk])
            send_done(k, chunk)
    deadline = time.perf_counter() + grace_s
    while time.perf_counter() < deadline and any(received[k] + failed[k] < len(completed[k]) for k in range(clients)):
        await asyncio.sleep(0.05)
    after, cpu1 = await asyncio.to_thread(server_stats, stats_url), resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t0
    for task in receivers + [sampler]:
        task.cancel()
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    expected = sum(len(c) for c in completed)
    ms, lat = latency_ms(latency)
    result = {"clients": clients, "seconds": seconds, "budget_ms": budget_ms, "turns": len(latency),
              "turns_expected": expected, "failed": expected - len(latency), "late": int((ms > budget_ms).sum()),
              "latency_ms": lat,
              "client_cpu_cores": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall,
              "client_tick_lag_p99_ms": float(np.percentile(tick_lag, 99) * 1e3)}
    if before and after:
        rss = [r for r in rss_seen + [before["rss"], after["rss"]] if r]
        result["server"] = {"cpu_cores": (after["cpu_s"] - before["cpu_s"]) / wall, "rss_mb_start": before["rss"] / 1e6,
                            "rss_mb_end": after["rss"] / 1e6, "rss_mb_max": max(rss) / 1e6}
    result["holds"] = result["failed"] == 0 and result["latency_ms"]["p99"] <= budget_ms
    return result


async def search(url: str, budget_ms: float = 300.0, seconds: float = 60.0, start: int = 4, limit: int = 128,
                 step: int = 2, token: str | None = None, report=None) -> dict:
    """The largest N (within `step`) whose trial holds the budget (p99 <= budget_ms, no failed
    turns): doubling from `start` until a trial fails (or `limit`), then bisection.
    `report(result)` is called after each trial."""
    trials, good, bad, n = [], 0, None, start
    while bad is None:
        r = await run_trial(url, n, seconds, budget_ms, token=token)
        trials.append(r)
        if report:
            report(r)
        if not r["holds"]:
            bad = n
        elif n >= limit:
            good = n
            break
        else:
            good, n = n, min(2 * n, limit)
    while bad is not None and bad - good > step:
        n = (good + bad) // 2
        r = await run_trial(url, n, seconds, budget_ms, token=token)
        trials.append(r)
        if report:
            report(r)
        good, bad = (n, bad) if r["holds"] else (good, n)
    return {"budget_ms": budget_ms, "largest_clients": good, "first_failing": bad, "trials": trials}


async def soak(url: str, clients: int, seconds: float = 600.0, budget_ms: float = 300.0,
               session_seconds: tuple[float, float] = (10.0, 40.0), chunk_ms: int = 20, token: str | None = None,
               seed: int = 0, grace_s: float = 5.0) -> dict:
    """Clients connecting and leaving for `seconds`: `clients` slots, each opening a conversation,
    streaming it in real time for a random length in `session_seconds`, waiting up to `grace_s`
    for its last turns' motion, closing, and opening the next one at once. The server's memory
    is sampled once a second; `rss_drift` compares the median of the last minute with the median
    of the second minute (the first minute is warm-up: allocator pools, first sessions)."""
    pool = _conversations(session_seconds[1] + 2.0)
    rng = np.random.default_rng(seed)
    stats_url = http_url_of(url)
    end = time.perf_counter() + seconds
    latency, counts, errors, rss_seen = [], {"conversations": 0, "turns_expected": 0, "failed": 0}, [], []

    async def one_conversation(slot: int, length: float) -> None:
        conn = await AsyncClient.connect(url, token, seed=int(rng.integers(1 << 31)))
        samples, rate = conn.info["samples_per_turn"], conn.info["sample_rate"]
        chunk = rate * chunk_ms // 1000
        user, agent = pool[int(rng.integers(POOL))]
        completed, received = [], [0]

        async def receive() -> None:
            while True:
                try:
                    c = await conn.receive()
                except ServerError as e:
                    errors.append(f"{e.code}: {e.message}")
                    continue
                except Exception:  # noqa: BLE001 - the connection is gone: its missing turns count as failed
                    return
                latency.append(time.perf_counter() - completed[c.turn])
                received[0] += 1

        receiver = asyncio.create_task(receive())
        try:
            start, sent = time.perf_counter(), 0
            for tick in range(int(length * 1000 / chunk_ms)):
                await asyncio.sleep(max(0.0, start + tick * chunk_ms / 1000 - time.perf_counter()))
                await conn.send_audio(user[sent:sent + chunk], agent[sent:sent + chunk])
                sent += chunk
                while sent >= (len(completed) + 1) * samples:
                    completed.append(time.perf_counter())
            deadline = time.perf_counter() + grace_s
            while received[0] < len(completed) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
        finally:                            # a conversation cut short still counts its missing turns
            receiver.cancel()
            await conn.close()
            counts["conversations"] += 1
            counts["turns_expected"] += len(completed)
            counts["failed"] += len(completed) - received[0]

    async def slot_loop(slot: int) -> None:
        await asyncio.sleep(slot * session_seconds[0] / clients)          # stagger the arrivals
        while (left := end - time.perf_counter()) > 2.0:
            try:
                await one_conversation(slot, min(left - 1.0, float(rng.uniform(*session_seconds))))
            except Exception as e:  # noqa: BLE001 - a refused or broken connection is what the soak counts
                errors.append(f"slot {slot}: {type(e).__name__}: {e}")
                await asyncio.sleep(1.0)

    async def sample_memory() -> None:
        t0 = time.perf_counter()
        while True:
            stats = await asyncio.to_thread(server_stats, stats_url)
            if stats and stats["rss"]:
                rss_seen.append((time.perf_counter() - t0, stats["rss"] / 1e6))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(slot_loop(k) for k in range(clients)))
    sampler.cancel()
    ms, lat = latency_ms(latency)
    result = {"mode": "soak", "clients": clients, "seconds": seconds, "budget_ms": budget_ms, **counts,
              "turns": len(latency), "late": int((ms > budget_ms).sum()), "errors": errors[:20],
              "error_count": len(errors), "latency_ms": lat}
    if rss_seen:
        t, rss = np.array(rss_seen).T
        second, last = rss[(t >= 60) & (t < 120)], rss[t >= t[-1] - 60]
        result["server_rss_mb"] = {"first": float(rss[0]), "max": float(rss.max()), "last": float(rss[-1]),
                                   "median_second_minute": float(np.median(second)) if len(second) else None,
                                   "median_last_minute": float(np.median(last))}
        if len(second):
            result["rss_drift"] = float(np.median(last) / np.median(second) - 1.0)
    result["holds"] = result["failed"] == 0 and not errors and abs(result.get("rss_drift", 0.0)) <= 0.05
    return result


def describe_soak(r: dict) -> str:
    """The soak's result in a few lines."""
    lat, rss = r["latency_ms"], r.get("server_rss_mb", {})
    lines = [f"soak {r['seconds']:.0f} s, {r['clients']} client slots: {r['conversations']} conversations, "
             f"{r['turns']}/{r['turns_expected']} turns, failed {r['failed']}, late {r['late']}, "
             f"errors {r['error_count']}",
             f"  turn latency p50 {lat['p50']:.0f}  p95 {lat['p95']:.0f}  p99 {lat['p99']:.0f}  max {lat['max']:.0f} ms"]
    if rss:
        drift = r.get("rss_drift")
        lines.append(f"  server RSS first {rss['first']:.0f}, max {rss['max']:.0f}, last {rss['last']:.0f} MB; median "
                     f"second minute {rss['median_second_minute'] or float('nan'):.0f} -> last minute "
                     f"{rss['median_last_minute']:.0f} MB"
                     + (f" ({drift * 100:+.1f} %)" if drift is not None else ""))
    lines += [f"  error: {e}" for e in r["errors"][:5]]
    return "\n".join(lines) + ("" if r["holds"] else "\n  (does not hold: failed turns, errors or memory drift > 5 %)")


def start_server(bundle: str | None, port: int = 0, extra: tuple = (), timeout: float = 120.0) -> tuple:
    """`timar-serve` in a subprocess on 127.0.0.1; returns (process, ws url) once it listens."""
    cmd = [sys.executable, "-m", "timar_sdk.serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    if bundle:
        cmd += ["--bundle", str(bundle)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"ws://\S+", line)
        if m:
            return proc, m.group(0)
    proc.kill()
    raise RuntimeError("timar-serve did not start: " + "".join(lines[-5:]).strip())


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (graceful shutdown), then kill after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def describe(r: dict) -> str:
    """One line per trial."""
    if "error" in r:
        return f"{r['clients']:4d} clients  {r['error']}"
    lat, s = r["latency_ms"], r.get("server")
    line = (f"{r['clients']:4d} clients  {r['turns']}/{r['turns_expected']} turns  latency p50 {lat['p50']:.0f}  "
            f"p95 {lat['p95']:.0f}  p99 {lat['p99']:.0f}  max {lat['max']:.0f} ms  late {r['late']}  "
            f"failed {r['failed']}")
    if s:
        line += f"  server {s['cpu_cores']:.2f} cores, RSS {s['rss_mb_start']:.0f}->{s['rss_mb_end']:.0f} MB"
    return line + f"  loadgen {r['client_cpu_cores']:.2f} cores" + ("" if r["holds"] else "  (over budget)")
