"""`timar-bench`: per-turn latency of a Session, split by stage, against the torch full-window
recompute of the same model (what the authors' code does every turn)."""
from __future__ import annotations

import queue
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from timar_sdk.progress import progress_bar
from timar_sdk.runtime.model import Model
from timar_sdk.runtime.session import Session


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _summary(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "n": len(ms)}


class _StageTimer:
    """Wraps a backend's graph calls and accumulates their time per turn."""

    def __init__(self, backend):
        self.backend, self.current = backend, {}
        # window_recompute bundles: token embedding + the window pass count as the encoder step.
        for method, stage in (("encode_audio", "audio_encoder"), ("encoder_step", "encoder_step"),
                              ("embed_turn", "encoder_step"), ("encode_window", "encoder_step"),
                              ("denoise", "sampler")):
            if hasattr(backend, method):
                setattr(backend, method, self._wrap(getattr(backend, method), stage))

    def _wrap(self, fn, stage):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.current[stage] = self.current.get(stage, 0.0) + time.perf_counter() - t0
        return timed


def bench_session(session: Session, turns: int = 50, warmup: int | None = None, seed: int = 0,
                  progress: bool = False) -> dict:
    """Latency of `session.step` over `turns` turns of random audio and motion, after `warmup`
    turns (default: enough to fill the context window, so the numbers are the steady state).
    progress: a bar over the turns on stderr (updated outside the timed calls)."""
    if warmup is None:
        warmup = max(5, session.bundle["context_turns"])
    rng = np.random.default_rng(seed)
    s, f = session.samples, session.frames
    timer = _StageTimer(session.backend)
    total, stages = [], {"audio_encoder": [], "encoder_step": [], "sampler": []}
    for i in progress_bar(range(warmup + turns), desc="session turns", unit="turn", disable=not progress):
        ua = (rng.standard_normal(s) * 0.1).astype(np.float32)
        aa = (rng.standard_normal(s) * 0.1).astype(np.float32)
        um = (rng.standard_normal((f, 56)) * 0.1).astype(np.float32)
        timer.current = {}
        t0 = time.perf_counter()
        session.step(ua, um, aa)
        dt = time.perf_counter() - t0
        if i >= warmup:
            total.append(dt)
            for k in stages:
                stages[k].append(timer.current.get(k, 0.0))
    turn_s = f / session.bundle["fps"]
    # The sampler stage holds the denoiser calls; its numpy arithmetic is in "other".
    other = [t - sum(stages[k][i] for k in stages) for i, t in enumerate(total)]
    return {"turn": _summary(total), **{k: _summary(v) for k, v in stages.items()},
            "other": _summary(other),
            "real_time_factor": turn_s / float(np.median(total)),
            "peak_rss_mb": _peak_rss_mb(), "session_start_s": session.start_seconds}


def bench_sessions(model, sessions: int, rounds: int = 10, warmup: int | None = None,
                   max_batch: int | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Throughput of `sessions` conversations on one Model. Each round every session takes one
    turn, all of them ready at the same instant (the worst case for latency): "alone" runs them one
    after another with `Session.step`, "batched" in batches of up to `max_batch` sessions with
    `step_many` (default: all in one). The two alternate round by round on the same inputs, so
    the machine's load affects both alike. A turn's latency is from the round's start to the end
    of the call that produced it; turns per second are per round (median over rounds)."""
    from timar_sdk.runtime.session import step_many

    if warmup is None:
        warmup = max(3, model.bundle["context_turns"])
    rng = np.random.default_rng(seed)
    s, f = model.samples, model.frames
    pool = [((rng.standard_normal(s) * 0.1).astype(np.float32), (rng.standard_normal((f, 56)) * 0.1).astype(np.float32),
             (rng.standard_normal(s) * 0.1).astype(np.float32)) for _ in range(7)]
    modes = {"alone": [Session(model, seed=seed + k) for k in range(sessions)],
             "batched": [Session(model, seed=seed + k) for k in range(sessions)]}
    size = max_batch or sessions
    latency = {m: [] for m in modes}
    throughput = {m: [] for m in modes}
    for r in progress_bar(range(warmup + rounds), desc=f"{sessions} sessions", unit="round", disable=not progress):
        for mode in (("alone", "batched") if r % 2 == 0 else ("batched", "alone")):
            turn = [pool[(r + k) % len(pool)] for k in range(sessions)]
            lat, t0 = [], time.perf_counter()
            if mode == "alone":
                for sess, (ua, um, aa) in zip(modes[mode], turn):
                    sess.step(ua, um, aa)
                    lat.append(time.perf_counter() - t0)
            else:
                for i in range(0, sessions, size):
                    out = step_many([(sess, *turn[k]) for k, sess in enumerate(modes[mode][i:i + size], start=i)])
                    bad = [o for o in out if isinstance(o, BaseException)]
                    if bad:
                        raise bad[0]
                    lat += [time.perf_counter() - t0] * len(out)
            if r >= warmup:
                latency[mode] += lat
                throughput[mode].append(sessions / lat[-1])
    turn_s = f / model.bundle["fps"]
    result = {"sessions": sessions, "max_batch": size, "rounds": rounds}
    for mode in modes:
        ms = np.asarray(latency[mode]) * 1000.0
        tps = float(np.median(throughput[mode]))
        result[mode] = {"turns_per_s": tps, "real_time_streams": tps * turn_s,
                        "latency_p50_ms": float(np.percentile(ms, 50)), "latency_p95_ms": float(np.percentile(ms, 95)),
                        "latency_p99_ms": float(np.percentile(ms, 99))}
    result["speedup"] = result["batched"]["turns_per_s"] / result["alone"]["turns_per_s"]
    result["state_mb_per_session"] = modes["alone"][0].state_bytes / 1e6
    return result


def bench_streams(model, streams: int, seconds: float = 10.0, max_batch: int | None = None, chunk_ms: int = 20,
                  seed: int = 0) -> dict:
    """Real-time streaming through a Scheduler: `streams` conversations, each pushed `chunk_ms`
    of both speakers' audio every `chunk_ms` by one feeder thread, as audio callbacks would, for
    `seconds`; their turn boundaries are staggered evenly over a turn. Measures every push call
    (it must only buffer) and every turn's latency (input complete -> motion ready)."""
    from timar_sdk.runtime.scheduler import Scheduler

    rng = np.random.default_rng(seed)
    sr, samples = model.bundle["sample_rate"], model.samples
    chunk = sr * chunk_ms // 1000
    audio = (rng.standard_normal(samples * 4) * 0.1).astype(np.float32)
    push_s, turn_s, got = [], [], [0] * streams
    with Scheduler(model, max_batch=max_batch) as scheduler:
        handles = [scheduler.open(seed=seed + k) for k in range(streams)]
        for k, h in enumerate(handles):                       # stagger the turn boundaries
            if k:
                h.push(user_audio=audio[:k * samples // streams], agent_audio=audio[:k * samples // streams])
        start, ticks = time.perf_counter(), int(seconds * 1000 / chunk_ms)
        for tick in range(ticks):
            piece = audio[(tick * chunk) % (3 * samples):][:chunk]
            for h in handles:
                t0 = time.perf_counter()
                h.push(user_audio=piece, agent_audio=piece)
                push_s.append(time.perf_counter() - t0)
            for k, h in enumerate(handles):                   # collect what is ready, never wait
                while True:
                    try:
                        turn_s.append(h.get(timeout=0).latency_s)
                        got[k] += 1
                    except queue.Empty:
                        break
            time.sleep(max(0.0, start + (tick + 1) * chunk_ms / 1000 - time.perf_counter()))
        expected = sum(int((seconds * sr + (k * samples // streams)) // samples) for k in range(streams))
        deadline = time.perf_counter() + 30
        while sum(got) < expected and time.perf_counter() < deadline:   # turns still in flight
            for k, h in enumerate(handles):
                try:
                    turn_s.append(h.get(timeout=0.05).latency_s)
                    got[k] += 1
                except queue.Empty:
                    pass
    push_ms, turn_ms = np.asarray(push_s) * 1e3, np.asarray(turn_s) * 1e3
    return {"streams": streams, "seconds": seconds, "max_batch": max_batch or streams, "turns": int(sum(got)),
            "turns_expected": expected,
            "push_ms": {"p50": float(np.percentile(push_ms, 50)), "p99": float(np.percentile(push_ms, 99)),
                        "max": float(push_ms.max()), "n": len(push_ms)},
            "turn_latency_ms": {"p50": float(np.percentile(turn_ms, 50)), "p95": float(np.percentile(turn_ms, 95)),
                                "p99": float(np.percentile(turn_ms, 99)), "max": float(turn_ms.max())}}


def bench_torch_window_recompute(model, turns: int = 20, warmup: int = 3, seed: int = 0,
                                 steps: int = 5, progress: bool = False) -> dict:
    """What the authors' code does each turn: encode the turn's audio, run the backbone over the
    whole W-turn window (W*110 tokens), and sample the current turn; torch eager, no cache."""
    import torch

    from timar_sdk.model.diffusion import numpy_denoiser
    from timar_sdk.runtime.rng import PhiloxNormal
    from timar_sdk.sampler import respaced_schedule, sample_turn

    c = model.cfg
    w, f = c.context_turns, c.frames_per_turn
    g = torch.Generator().manual_seed(seed)
    feats = model.encode_audio(torch.randn(2, w, c.samples_per_turn, generator=g) * 0.1).detach()
    motion = torch.randn(w, f, 56, generator=g)[None] * 0.1
    sched = respaced_schedule(model.head.schedule, steps)
    noise = PhiloxNormal(seed)
    denoise = numpy_denoiser(model.head.net)
    times = []
    with torch.no_grad():
        for i in progress_bar(range(warmup + turns), desc="torch turns", unit="turn", disable=not progress):
            t0 = time.perf_counter()
            model.encode_audio(torch.randn(2, c.samples_per_turn, generator=g) * 0.1)
            z = model.forward_full(feats[0:1], motion, feats[1:2], motion, torch.ones(1, w, f),
                                   torch.zeros(1, w, 2 * f), torch.zeros(1, w))
            sample_turn(denoise, z[0, -1].numpy(), noise, sched)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return _summary(times)


def random_weight_bundle(preset_name: str, out_dir: Path):
    """Export a randomly initialised model of a preset (for timing only) and return it.
    "timar_base"/"timar_large": the authors' structure (window recompute) with a randomly
    initialised wav2vec2 of wav2vec2-large-960h-lv60-self's structure."""
    import torch

    from timar_sdk.export.onnx_export import export_bundle, export_window_bundle
    from timar_sdk.model.config import preset
    from timar_sdk.model.timar import Timar

    torch.manual_seed(0)
    if preset_name.startswith("timar_"):
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        from timar_sdk.model.authors import AUTHORS_PRESETS, WindowTimar, WindowTimarConfig
        w2v = out_dir.parent / "wav2vec2-large-lv60-random"
        Wav2Vec2Model(Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, do_stable_layer_norm=True, feat_extract_norm="layer",
                                     conv_bias=True)).save_pretrained(w2v)
        width, depth, heads = AUTHORS_PRESETS[preset_name]
        model = WindowTimar(WindowTimarConfig(preset=preset_name, width=width, depth=depth, heads=heads,
                                              wav2vec2_path=str(w2v))).eval()
        export_window_bundle(model, out_dir, source="random weights")
        return None          # its own runtime already recomputes the window: no torch baseline
    model = Timar(preset(preset_name)).eval()
    export_bundle(model, out_dir, source="random weights")
    return model


def run_bench(bundle=None, backend="auto", preset_name=None, turns=50, threads=None,
              compare_torch=True, steps=None, log: Callable[[str], None] | None = None, spin: bool = False) -> dict:
    """Benchmark a bundle (or a random-weight `preset_name`); `log`, when given, receives a line
    before each long stage and progress bars are shown on stderr."""
    say = log or (lambda line: None)
    tmp = None
    model = None
    if preset_name:
        import torch  # noqa: F401 - a missing export extra fails here, before the export is announced
        tmp = tempfile.TemporaryDirectory(prefix="timar-bench-")
        bundle = Path(tmp.name) / preset_name
        say(f"exporting a random-weight {preset_name} bundle (a minute or more for the large presets)")
        model = random_weight_bundle(preset_name, bundle)
    session = Session(Model(bundle, backend=backend, threads=threads, spin=spin), steps=steps)
    say(f"timing {turns} turns of {session.bundle.dir} on {session.backend.name}, after a warm-up")
    result = {"bundle": str(session.bundle.dir), "preset": session.bundle["model"]["preset"],
              "backend": session.backend.name, "providers": session.backend.providers,
              "steps": session.steps, "session": bench_session(session, turns, progress=log is not None)}
    if compare_torch:
        try:
            import torch
        except ImportError:
            result["torch_window_recompute"] = "skipped: torch not installed"
        else:
            if threads:
                torch.set_num_threads(threads)
            if session.window:
                result["torch_window_recompute"] = "not applicable: this bundle recomputes the window itself"
            else:
                if model is None:
                    say("loading the bundle's checkpoint in torch for the full-window recompute baseline")
                    from timar_sdk.model.checkpoint import load_model
                    from timar_sdk.runtime.backends import resolve_checkpoint
                    path = resolve_checkpoint(session.bundle.manifest.get("source_checkpoint", ""), session.bundle.dir)
                    model = load_model(path) if path else None
                if model is None:
                    result["torch_window_recompute"] = "skipped: the bundle's checkpoint is not available"
                else:
                    say("timing the torch full-window recompute baseline (--no-torch skips it)")
                    rec = bench_torch_window_recompute(model, max(5, turns // 3), steps=session.steps,
                                                       progress=log is not None)
                    result["torch_window_recompute"] = rec
                    result["speedup_vs_torch_window_recompute"] = rec["p50_ms"] / result["session"]["turn"]["p50_ms"]
    if tmp:
        tmp.cleanup()
    return result


def format_result(r: dict) -> str:
    s = r["session"]
    lines = [f"bundle {r['bundle']} (preset {r['preset']}), backend {r['backend']} {r['providers']}, steps {r['steps']}",
             f"per turn         p50 {s['turn']['p50_ms']:8.2f} ms   p95 {s['turn']['p95_ms']:8.2f} ms",
             *(f"  {k:<14} p50 {s[k]['p50_ms']:8.2f} ms   p95 {s[k]['p95_ms']:8.2f} ms"
               for k in ("audio_encoder", "encoder_step", "sampler", "other")),
             f"real-time factor {s['real_time_factor']:.1f}x   peak RSS {s['peak_rss_mb']:.0f} MB   "
             f"session start {s['session_start_s']:.2f} s"]
    rec = r.get("torch_window_recompute")
    if isinstance(rec, dict):
        lines.append(f"torch full-window recompute p50 {rec['p50_ms']:.2f} ms   p95 {rec['p95_ms']:.2f} ms   "
                     f"-> session is {r['speedup_vs_torch_window_recompute']:.1f}x faster")
    elif rec:
        lines.append(f"torch full-window recompute: {rec}")
    return "\n".join(lines)


def format_sessions(r: dict) -> str:
    """bench_sessions' result as a few lines of text."""
    lines = [f"{r['sessions']} sessions on one model, {r['rounds']} rounds, batches of up to {r['max_batch']}, "
             f"{r['state_mb_per_session']:.1f} MB of state per session"]
    for mode in ("alone", "batched"):
        m = r[mode]
        lines.append(f"{mode:8s} {m['turns_per_s']:7.1f} turns/s ({m['real_time_streams']:.0f} real-time streams)  "
                     f"turn latency p50 {m['latency_p50_ms']:.0f} ms  p95 {m['latency_p95_ms']:.0f} ms  "
                     f"p99 {m['latency_p99_ms']:.0f} ms")
    lines.append(f"batched / alone: {r['speedup']:.2f}x")
    return "\n".join(lines)
