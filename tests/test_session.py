"""The runtime Session: backends agree, feed == step, snapshots, bad input leaves no trace."""
import re
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from test_export import perturbed
from timar_sdk import Session, TimarInputError, TimarRuntimeError
from timar_sdk.export.onnx_export import export_bundle
from timar_sdk.model.checkpoint import save_checkpoint
from timar_sdk.model.config import preset
from timar_sdk.model.timar import Timar

W = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(1)
    model = perturbed(Timar(preset("tiny")), seed=1)
    root = tmp_path_factory.mktemp("session")
    save_checkpoint(root / "model.pt", model, ema=None)
    export_bundle(model, root / "bundle", source=str(root / "model.pt"))
    return root / "bundle"


def conversation(turns, seed=0):
    rng = np.random.default_rng(seed)
    ua = (rng.standard_normal((turns, 16000)) * 0.2).astype(np.float32)
    aa = (rng.standard_normal((turns, 16000)) * 0.2).astype(np.float32)
    um = (rng.standard_normal((turns, 25, 56)) * 0.3).astype(np.float32)
    return ua, um, aa


@pytest.mark.parametrize("history", ["masked", "feedback"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("with_motion", [True, False])
def test_onnxruntime_and_torch_backends_agree(bundle, history, cfg, with_motion):
    turns = 2 * W + 3
    ua, um, aa = conversation(turns)
    a = Session(bundle, backend="onnxruntime", seed=3, history=history, cfg=cfg)
    b = Session(bundle, backend="torch", seed=3, history=history, cfg=cfg)
    for i in range(turns):
        m = um[i] if with_motion else None
        assert np.abs(a.step(ua[i], m, aa[i]) - b.step(ua[i], m, aa[i])).max() < 1e-3, f"turn {i}"


def test_settings_change_the_output(bundle):
    """The agreement above must not be trivial: cfg, history, seed and user motion all matter."""
    ua, um, aa = conversation(3)

    def run(motion=True, **kw):
        s = Session(bundle, backend="onnxruntime", **{"seed": 3, **kw})
        return np.concatenate([s.step(ua[i], um[i] if motion else None, aa[i]) for i in range(3)])

    base = run()
    for other in (run(cfg=2.0), run(history="feedback"), run(seed=4), run(motion=None)):
        assert np.abs(base - other).max() > 1e-3


def test_feed_in_random_pieces_equals_step(bundle):
    turns = 5
    ua, um, aa = conversation(turns, seed=1)
    stepped = Session(bundle, backend="onnxruntime", seed=5)
    want = np.concatenate([stepped.step(ua[i], um[i], aa[i]) for i in range(turns)])
    fed = Session(bundle, backend="onnxruntime", seed=5)
    rng = np.random.default_rng(2)
    flat = {"user_audio": ua.reshape(-1), "agent_audio": aa.reshape(-1), "user_motion": um.reshape(-1, 56)}
    pos = {k: 0 for k in flat}
    got = []
    while any(pos[k] < len(v) for k, v in flat.items()):
        key = list(flat)[rng.integers(3)]
        size = int(rng.integers(1, 3 * 16000)) if key != "user_motion" else int(rng.integers(1, 75))
        piece = flat[key][pos[key]:pos[key] + size]
        pos[key] += size
        if len(piece):
            got.append(fed.feed(**{key: piece}))
    got = np.concatenate(got)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5


def test_feed_returns_empty_until_a_turn_is_complete(bundle):
    s = Session(bundle, backend="onnxruntime")
    out = s.feed(user_audio=np.zeros(320, np.float32), agent_audio=np.zeros(320, np.float32))
    assert out.shape == (0, 56) and s.turns == 0


def test_flush_returns_only_real_frames(bundle):
    s = Session(bundle, backend="onnxruntime")
    ua, um, aa = conversation(2)
    s.feed(user_audio=ua.reshape(-1)[:16000 + 6400], agent_audio=aa.reshape(-1)[:16000 + 8000])
    assert s.turns == 1
    tail = s.flush()
    assert tail.shape == (10, 56) and s.turns == 2      # 6400 samples = 10 frames
    assert s.flush().shape == (0, 56)


def test_state_snapshot_reproduces_continuation_and_reset_equals_fresh(bundle):
    ua, um, aa = conversation(12, seed=3)
    s = Session(bundle, backend="onnxruntime", seed=9, cfg=2.0)
    for i in range(9):
        s.step(ua[i], um[i], aa[i])
    s.feed(user_audio=ua[9][:5000])                     # buffers are part of the state
    state = s.get_state()
    first = [s.step(ua[i], um[i], aa[i]) for i in (10, 11)]
    s.set_state(state)
    again = [s.step(ua[i], um[i], aa[i]) for i in (10, 11)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    # A fork in another session continues from the buffered 5000 samples like the original.
    s.set_state(state)
    fork = Session(bundle, backend="onnxruntime", seed=9, cfg=2.0)
    fork.set_state(state)
    rest = dict(user_audio=ua[9][5000:], agent_audio=aa[9])
    a, b = s.feed(**rest), fork.feed(**rest)
    assert a.shape == (25, 56) and np.array_equal(a, b)
    assert np.array_equal(fork.step(ua[10], um[10], aa[10]), s.step(ua[10], um[10], aa[10]))

    s.reset()
    fresh = Session(bundle, backend="onnxruntime", seed=9, cfg=2.0)
    for i in range(3):
        assert np.array_equal(s.step(ua[i], um[i], aa[i]), fresh.step(ua[i], um[i], aa[i]))


BAD_TURNS = {
    "short audio": dict(user_audio=np.zeros(15999, np.float32)),
    "NaN audio": dict(agent_audio=np.full(16000, np.nan, np.float32)),
    "Inf motion": dict(user_motion=np.full((25, 56), np.inf, np.float32)),
    "motion 55 wide": dict(user_motion=np.zeros((25, 55), np.float32)),
    "2-D audio": dict(user_audio=np.zeros((2, 8000), np.float32)),
    "empty audio": dict(user_audio=np.zeros(0, np.float32)),
    "int32 audio": dict(user_audio=np.zeros(16000, np.int32)),
    "stereo audio": dict(agent_audio=np.zeros((16000, 2), np.float32)),
    "one huge audio sample": dict(user_audio=np.r_[np.zeros(15999), 1e20].astype(np.float32)),
    "int16 values as float": dict(agent_audio=np.full(16000, 12000.0, np.float32)),
    "huge motion value": dict(user_motion=np.r_[np.zeros((24, 56)), np.full((1, 56), 1e37)].astype(np.float32)),
    "float64 motion beyond float32": dict(user_motion=np.full((25, 56), 1e39)),
    "wrong frame count": dict(user_motion=np.zeros((24, 56), np.float32)),
}


@pytest.mark.parametrize("case", list(BAD_TURNS))
def test_bad_turn_between_good_ones_leaves_no_trace(bundle, case):
    ua, um, aa = conversation(2, seed=4)
    clean = Session(bundle, backend="onnxruntime", seed=2)
    want = [clean.step(ua[i], um[i], aa[i]) for i in range(2)]
    s = Session(bundle, backend="onnxruntime", seed=2)
    got = [s.step(ua[0], um[0], aa[0])]
    bad = {"user_audio": ua[1], "user_motion": um[1], "agent_audio": aa[1], **BAD_TURNS[case]}
    arg = next(iter(BAD_TURNS[case]))
    with pytest.raises(TimarInputError, match=arg):
        s.step(**bad)
    if case not in ("short audio", "wrong frame count"):    # any length is fine for feed()
        with pytest.raises(TimarInputError, match=arg):
            s.feed(**bad)
    got.append(s.step(ua[1], um[1], aa[1]))
    assert all(np.array_equal(x, y) for x, y in zip(got, want))


def fail_on_denoiser_call(session: Session, n: int, error: BaseException = RuntimeError("device lost")):
    """Make the session's n-th denoiser call from now raise `error` (a lost device, or an
    interrupt); returns the real denoiser so the test can put it back."""
    real, calls = session.backend.denoise, []

    def failing(*args):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args)

    session.backend.denoise = failing
    return real


def test_backend_error_mid_turn_leaves_no_trace(bundle):
    ua, um, aa = conversation(2, seed=5)
    clean = Session(bundle, backend="onnxruntime", seed=2)
    want = [clean.step(ua[i], um[i], aa[i]) for i in range(2)]
    s = Session(bundle, backend="onnxruntime", seed=2)
    got = [s.step(ua[0], um[0], aa[0])]
    real = fail_on_denoiser_call(s, 3)      # the 3rd denoiser call of the turn fails
    with pytest.raises(RuntimeError):
        s.step(ua[1], um[1], aa[1])
    s.backend.denoise = real
    got.append(s.step(ua[1], um[1], aa[1]))
    assert all(np.array_equal(x, y) for x, y in zip(got, want))


BAD_SETTINGS = {
    "backend": dict(backend="cuda-magic"),
    "history": dict(history="forgetful"),
    "steps": dict(steps=0),
    "steps ": dict(steps=1e9),                  # the message echoes the value given, not int(0)
    "temperature": dict(temperature=float("inf")),
    "temperature ": dict(temperature=-0.5),
    "cfg": dict(cfg=float("nan")),
    "threads": dict(threads=1000),
    "threads ": dict(threads=0),
    "seed": dict(seed=None),
    "seed ": dict(seed=-1),
    "seed  ": dict(seed=2 ** 64),
    "context_turns": dict(context_turns=8),
    "model": dict(model=123),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_refused_naming_the_argument(bundle, case):
    kw = {"model": bundle, **BAD_SETTINGS[case]}
    value = next(iter(BAD_SETTINGS[case].values()))
    t0 = time.perf_counter()
    with pytest.raises(TimarInputError, match=f"^{case.strip()}: expected .*got {re.escape(repr(value))}$"):
        Session(**kw)
    assert time.perf_counter() - t0 < 5          # refused before any thread pool starts


def test_missing_bundle_folder_is_named(bundle):
    with pytest.raises(ValueError, match="bundle: no manifest.json"):
        Session(bundle.parent)


def test_info(bundle):
    info = Session(bundle, backend="onnxruntime").info
    assert info["frames_per_turn"] == 25 and info["samples_per_turn"] == 16000
    assert info["motion_dim"] == 56 and "motion_names" not in info     # print(info) stays short
    assert info["state_bytes"] == 4 * 2 * 1 * 4 * 7 * 110 * 64 * 4     # tiny: 6.3 MB of cache per CFG row
    assert info["backend"] == "onnxruntime" and info["providers"] == ["CPUExecutionProvider"]
    assert info["attention"] == "cached"


def test_runtime_never_imports_torch(bundle):
    code = ("import sys, numpy as np, timar_sdk; "
            f"s = timar_sdk.Session({str(bundle)!r}, backend='onnxruntime'); "
            "s.step(np.zeros(16000, np.float32), None, np.zeros(16000, np.int16)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_soak_2000_turns_keeps_memory_and_latency_flat(bundle):
    s = Session(bundle, backend="onnxruntime", steps=1)
    ua, um, aa = conversation(4, seed=6)
    times, rss = [], []
    for i in range(2000):
        t0 = time.perf_counter()
        s.step(ua[i % 4], um[i % 4] if i % 3 else None, aa[i % 4])
        times.append(time.perf_counter() - t0)
        if i == 49:
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert (rss[1] - rss[0]) / 1024 < 20, f"peak RSS grew {(rss[1] - rss[0]) / 1024:.1f} MB"
    early, late = np.median(times[50:250]), np.median(times[-200:])
    assert late < 3 * early, f"per-turn latency went from {early * 1e3:.1f} ms to {late * 1e3:.1f} ms"


def test_feed_rolls_back_every_turn_when_a_later_one_fails(bundle):
    ua, um, aa = conversation(3, seed=7)
    clean = Session(bundle, backend="onnxruntime", seed=2)
    want = clean.feed(user_audio=ua.reshape(-1), agent_audio=aa.reshape(-1))
    s = Session(bundle, backend="onnxruntime", seed=2)
    real = fail_on_denoiser_call(s, 8)      # the second turn's third denoiser call fails
    with pytest.raises(RuntimeError):
        s.feed(user_audio=ua.reshape(-1), agent_audio=aa.reshape(-1))
    assert s.turns == 0
    s.backend.denoise = real
    assert np.array_equal(s.feed(user_audio=ua.reshape(-1), agent_audio=aa.reshape(-1)), want)


def test_non_finite_turn_is_never_committed(bundle):
    """A model that produces NaN from valid input fails that turn; the session stays usable."""
    ua, um, aa = conversation(2, seed=8)
    clean = Session(bundle, backend="onnxruntime", seed=2)
    want = [clean.step(ua[i], um[i], aa[i]) for i in range(2)]
    s = Session(bundle, backend="onnxruntime", seed=2)
    got = [s.step(ua[0], um[0], aa[0])]
    real = s.backend.denoise
    s.backend.denoise = lambda *a: np.full_like(real(*a), np.nan)
    for call in (lambda: s.step(ua[1], um[1], aa[1]), lambda: s.feed(user_audio=ua[1], user_motion=um[1], agent_audio=aa[1])):
        with pytest.raises(TimarRuntimeError, match="turn 1: the model produced NaN or Inf"):
            call()
        assert s.turns == 1
    s.backend.denoise = real
    got.append(s.step(ua[1], um[1], aa[1]))
    assert all(np.array_equal(x, y) for x, y in zip(got, want))


def test_interrupt_inside_a_multi_turn_feed_rolls_everything_back(bundle):
    ua, um, aa = conversation(3, seed=9)
    feed = dict(user_audio=ua.reshape(-1), agent_audio=aa.reshape(-1), user_motion=um.reshape(-1, 56))
    want = Session(bundle, backend="onnxruntime", seed=2).feed(**feed)
    s = Session(bundle, backend="onnxruntime", seed=2)
    real = fail_on_denoiser_call(s, 8, KeyboardInterrupt())     # the second turn's third call
    with pytest.raises(KeyboardInterrupt):
        s.feed(**feed)
    assert s.turns == 0 and all(len(b) == 0 for b in s.get_state()["buffers"].values())
    s.backend.denoise = real
    assert np.array_equal(s.feed(**feed), want)


def test_flush_runs_every_buffered_turn_when_motion_lags(bundle):
    """3.5 turns of audio but one turn of motion: feed runs one turn; flush runs the other three
    (the last padded), holding the tracker's last frame, and returns the 62 frames left."""
    ua, um, aa = conversation(4, seed=10)
    n = 3 * 16000 + 8000
    s = Session(bundle, backend="onnxruntime", seed=2)
    assert s.feed(user_audio=ua.reshape(-1)[:n], agent_audio=aa.reshape(-1)[:n], user_motion=um[0]).shape == (25, 56)
    got = s.flush()
    assert got.shape == (62, 56) and s.turns == 4
    held = np.repeat(um[0][-1:], 25, axis=0)
    ref = Session(bundle, backend="onnxruntime", seed=2)
    want = [ref.step(ua[0], um[0], aa[0])] + [ref.step(ua[i], held, aa[i]) for i in (1, 2)]
    want.append(ref.step(np.r_[ua[3][:8000], np.zeros(8000, np.float32)], held,
                         np.r_[aa[3][:8000], np.zeros(8000, np.float32)])[:12])
    assert np.array_equal(got, np.concatenate(want)[25:])


def test_flush_keeps_a_tracked_user_tracked(bundle):
    """Motion for exactly one turn, audio for 1.5: the flushed half turn holds the last frame
    (it used to run as an untracked user)."""
    ua, um, aa = conversation(2, seed=11)
    s = Session(bundle, backend="onnxruntime", seed=4)
    s.feed(user_audio=ua.reshape(-1)[:24000], agent_audio=aa.reshape(-1)[:24000], user_motion=um[0])
    got = s.flush()
    ref = Session(bundle, backend="onnxruntime", seed=4)
    ref.step(ua[0], um[0], aa[0])
    pad = lambda a: np.r_[a[:8000], np.zeros(8000, np.float32)]  # noqa: E731
    want = ref.step(pad(ua[1]), np.repeat(um[0][-1:], 25, axis=0), pad(aa[1]))[:12]
    assert got.shape == (12, 56) and np.array_equal(got, want)


def broken_snapshots(state):
    """(what, snapshot) pairs, each wrong in one way."""
    def changed(**kw):
        return {**state, **kw}

    settings = state["settings"]
    missing = dict(state)
    del missing["noise"]
    nan_cache = state["cache"].copy()
    nan_cache[0, 0, 0, 0, 5, 3] = np.nan
    yield "missing key", missing, "missing \\['noise'\\]"
    yield "slot ages", changed(slot_age=[1, 1] + state["slot_age"][2:]), "slot_age"
    yield "NaN cache", changed(cache=nan_cache), "cache: contains NaN"
    yield "other seed", changed(settings={**settings, "seed": 99}), "taken with seed=99"
    yield "other steps", changed(settings={**settings, "steps": 2}), "taken with steps=2"
    yield "NaN buffer", changed(buffers={**state["buffers"], "user_audio": np.full(10, np.nan, np.float32)}), \
        "buffers.user_audio"
    yield "turns", changed(turns="3"), "turns"


def test_set_state_checks_everything_before_changing_anything(bundle):
    ua, um, aa = conversation(5, seed=12)
    s = Session(bundle, backend="onnxruntime", seed=6)
    for i in range(3):
        s.step(ua[i], um[i], aa[i])
    good = s.get_state()
    other = Session(bundle, backend="onnxruntime", seed=6)
    for i in range(2):
        other.step(ua[i], um[i], aa[i])
    other.feed(user_audio=ua[4][:100])
    before = other.get_state()
    for what, snapshot, message in broken_snapshots(good):
        with pytest.raises(TimarInputError, match="state: .*" + message):
            other.set_state(snapshot)
        after = other.get_state()
        assert after["turns"] == 2 and np.array_equal(after["cache"], before["cache"]), what
        assert after["noise"] == before["noise"] and len(after["buffers"]["user_audio"]) == 100, what
    other.set_state(good)
    assert np.array_equal(other.step(ua[3], um[3], aa[3]), s.step(ua[3], um[3], aa[3]))
