"""The native runtime (runtime/): the C ABI tests (one model shared by many sessions included:
batched turns equal each session alone), and the C++ runtime, the C# (Unity) bindings under Mono
(one head, and two heads sharing one model through its native worker) and the C++ example each
give the Python Session's motion for the same conversation (also with output smoothing: custom,
direct and batched, and a bundle's manifest defaults);
the C++ runtime also on a window_recompute bundle (the authors' models: token window + running
audio normalisation). Through ctypes, the C ABI on tampered bundles (files outside the folder,
manifest.sha256, the manifest's numbers) and on graphs rewritten to emit Inf/NaN (a turn that
would commit them fails with TIMAR_ERR_NUMERIC and changes nothing); timar_wav's command line.

Builds with scripts/build_native.sh (incremental: a no-op when runtime/build is up to date; set
TIMAR_NATIVE_BUILD to use another build folder as it is). Skips, saying why, where cmake, npm
(to fetch ONNX Runtime), nlohmann-json or mono are missing.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from timar_sdk import Session
from timar_sdk.runtime.rng import PhiloxNormal

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "timar_sdk" / "assets" / "default_bundle"
ORT_ROOT = Path(os.environ.get("ONNXRUNTIME_ROOT", ROOT / "runtime" / "third_party" / "onnxruntime"))
W = 8
TURNS = 2 * W + 3
SEED = 3
TOL = 1e-3


def _skip_without_toolchain() -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed (apt-get install cmake g++): the native runtime is not built")
    if not (ORT_ROOT / "lib").is_dir() and shutil.which("npm") is None:
        pytest.skip("npm not installed and no ONNX Runtime SDK under runtime/third_party/onnxruntime "
                    "(set ONNXRUNTIME_ROOT, or install npm so scripts/build_native.sh can fetch it)")
    if not any(Path(d, "nlohmann", "json.hpp").is_file() for d in ("/usr/include", "/usr/local/include")):
        pytest.skip("nlohmann-json not installed (apt-get install nlohmann-json3-dev)")


def _build(asan: bool = False) -> Path:
    """The build folder, brought up to date (an incremental make). A first build (minutes, and it
    fetches the ONNX Runtime SDK) is not started from a test run: without one the test skips,
    saying how to make it, unless TIMAR_BUILD_NATIVE=1 asks for it."""
    if not asan and os.environ.get("TIMAR_NATIVE_BUILD"):
        return Path(os.environ["TIMAR_NATIVE_BUILD"])
    _skip_without_toolchain()
    folder = ROOT / "runtime" / ("build-asan" if asan else "build")
    cmd = ["bash", str(ROOT / "scripts" / "build_native.sh")] + (["--asan"] if asan else [])
    if not (folder / "CMakeCache.txt").is_file() and os.environ.get("TIMAR_BUILD_NATIVE") != "1":
        pytest.skip(f"native runtime not built: run `bash scripts/build_native.sh{' --asan' if asan else ''}` first "
                    f"(or set TIMAR_BUILD_NATIVE=1 to build it from the tests)")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return folder


@pytest.fixture(scope="session")
def build() -> Path:
    return _build()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The shipped default bundle; without one, a tiny model with random (perturbed) weights."""
    if (DEFAULT_BUNDLE / "manifest.json").is_file():
        return DEFAULT_BUNDLE
    torch = pytest.importorskip("torch", reason="no default bundle and no torch to export a test bundle")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import perturbed
    from timar_sdk.export.onnx_export import export_bundle
    from timar_sdk.model.config import preset
    from timar_sdk.model.timar import Timar

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("native") / "bundle"
    export_bundle(perturbed(Timar(preset("tiny")), seed=0), path)
    return path


@pytest.fixture(scope="session")
def bad_bundle(bundle, tmp_path_factory) -> Path:
    """The bundle with one byte of denoiser.onnx changed: its sha256 no longer matches."""
    path = tmp_path_factory.mktemp("native") / "bad_bundle"
    shutil.copytree(bundle, path)
    with open(path / "denoiser.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


@pytest.fixture(scope="session")
def conversation(tmp_path_factory):
    """2W+3 turns and a half turn (so flush has work), written as raw float32 files."""
    rng = np.random.default_rng(0)
    n = TURNS * 16000 + 8000
    ua = (rng.standard_normal(n) * 0.2).astype(np.float32)
    aa = (rng.standard_normal(n) * 0.2).astype(np.float32)
    um = (rng.standard_normal((TURNS * 25 + 12, 56)) * 0.3).astype(np.float32)
    d = tmp_path_factory.mktemp("conversation")
    for name, a in (("ua", ua), ("aa", aa), ("um", um)):
        a.tofile(d / f"{name}.f32")
    return {"ua": ua, "aa": aa, "um": um, "dir": d}


_reference: dict = {}


def python_motion(bundle, conv, cfg, with_motion, history=None, seed=SEED, smoothing=None):
    """The Python Session's motion (onnxruntime backend): all whole turns fed, then flush."""
    key = (str(bundle), str(conv["dir"]), cfg, with_motion, history, seed, repr(smoothing))
    if key not in _reference:
        s = Session(bundle, backend="onnxruntime", seed=seed, cfg=cfg, history=history, smoothing=smoothing)
        fed = s.feed(user_audio=conv["ua"], user_motion=conv["um"] if with_motion else None, agent_audio=conv["aa"])
        _reference[key] = np.concatenate([fed, s.flush()])
    return _reference[key]


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


# ---- C ABI ----------------------------------------------------------------------------------
def test_c_abi_generator_bad_input_state_feed(build, bundle, bad_bundle):
    out = _run([build / "timar_test_c", bundle, bad_bundle])
    assert out.strip().endswith(" 0 failed"), out


@pytest.mark.parametrize("seed,counter", [(0, 0), (SEED, 350), (0x0123456789ABCDEF, (5 << 64) + (1 << 64) - 2)])
def test_generator_equals_python(build, tmp_path, seed, counter):
    n = 1400 * 3 + 3   # whole [25, 56] draws and a ragged tail
    _run([build / "timar_conv", "--normals", n, "--seed", seed, "--counter-lo", counter & ((1 << 64) - 1),
          "--counter-hi", counter >> 64, "--out", tmp_path / "z.f32"])
    g = PhiloxNormal(seed)
    g.set_state({"seed": seed, "counter": counter})
    want = g.normal(n)
    got = np.fromfile(tmp_path / "z.f32", np.float32)
    assert np.array_equal(got, want), np.abs(got - want).max()


# ---- C++ == Python --------------------------------------------------------------------------
CASES = [(1.0, True, None), (1.0, False, None), (2.0, True, None), (2.0, False, None), (2.0, True, "feedback")]


@pytest.mark.parametrize("cfg,with_motion,history", CASES)
@pytest.mark.parametrize("mode", ["step", "feed"])
def test_cpp_equals_python(build, bundle, conversation, tmp_path, cfg, with_motion, history, mode):
    d = conversation["dir"]
    cmd = [build / "timar_conv", "--bundle", bundle, "--user-audio", d / "ua.f32", "--agent-audio", d / "aa.f32",
           "--seed", SEED, "--cfg", cfg, "--out", tmp_path / "m.f32"]
    cmd += ["--user-motion", d / "um.f32"] if with_motion else []
    cmd += ["--history", history] if history else []
    cmd += ["--chunk", 3000, "--flush"] if mode == "feed" else []   # step mode: whole turns only
    _run(cmd)
    got = np.fromfile(tmp_path / "m.f32", np.float32).reshape(-1, 56)
    want = python_motion(bundle, conversation, cfg, with_motion, history)
    if mode == "step":
        want = want[:TURNS * 25]
    assert got.shape == want.shape
    err = np.abs(got - want).max(axis=1)
    assert err.max() < TOL, f"frame {int(err.argmax())} (turn {int(err.argmax()) // 25}) differs by {err.max():.2e}"


# ---- window_recompute bundles (the authors' models) ------------------------------------------
@pytest.fixture(scope="session")
def window_bundle(tmp_path_factory) -> Path:
    """A tiny window_recompute bundle: the authors' structure shrunk, random weights."""
    pytest.importorskip("torch", reason="torch is needed to export the test window bundle")
    pytest.importorskip("transformers", reason="transformers is needed for the test window bundle's wav2vec2")
    sys.path.insert(0, str(Path(__file__).parent))
    from authors_fixture import write_tiny_window_bundle

    path = write_tiny_window_bundle(tmp_path_factory.mktemp("window"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["attention"] == "window_recompute" and manifest["window"]["max_turns"] == W
    return path


@pytest.fixture(scope="session")
def window_conversation(conversation, tmp_path_factory):
    """The conversation with its own level and DC offset per turn for each speaker (quiet and loud
    turns), so that the running audio normalisation matters: the tiny wav2vec2 normalises its
    features, which would hide a constant gain on stationary noise."""
    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("window_conversation")
    out = {"um": conversation["um"], "dir": d}
    for name in ("ua", "aa"):
        x = conversation[name] / np.float32(0.2)
        turns = -(-len(x) // 16000)
        gain = np.repeat(rng.uniform(0.02, 0.5, turns), 16000)[:len(x)]
        offset = np.repeat(rng.uniform(-0.2, 0.2, turns), 16000)[:len(x)]
        out[name] = (x * gain + offset).astype(np.float32)
    for name in ("ua", "aa", "um"):
        out[name].tofile(d / f"{name}.f32")
    return out


def test_c_abi_on_window_bundle(build, window_bundle, bad_bundle, bundle):
    """The whole C test on a window bundle (bad input leaves the token window and the audio
    statistics as they were, state, reset, feed == step, flush, feed rollback), and state blobs
    refused across the two attention kinds."""
    out = _run([build / "timar_test_c", window_bundle, bad_bundle, bundle])
    assert out.strip().endswith(" 0 failed"), out


@pytest.mark.parametrize("cfg,with_motion", [(1.0, True), (1.0, False), (2.0, True), (2.0, False)])
@pytest.mark.parametrize("mode", ["step", "feed"])
def test_window_cpp_equals_python(build, window_bundle, window_conversation, tmp_path, cfg, with_motion, mode):
    """2W+3 turns: the window fills up to W-1 past turns, then drops its oldest each turn; the
    audio is normalised with running statistics (per speaker, this turn included). Step mode also restores the snapshot taken after
    W+2 turns (the ring wrapped) in a fresh session and replays the rest bit for bit; feed mode
    ends with a half turn through flush."""
    conversation = window_conversation
    d = conversation["dir"]
    cmd = [build / "timar_conv", "--bundle", window_bundle, "--user-audio", d / "ua.f32",
           "--agent-audio", d / "aa.f32", "--seed", SEED, "--cfg", cfg, "--out", tmp_path / "m.f32"]
    cmd += ["--user-motion", d / "um.f32"] if with_motion else []
    cmd += ["--chunk", 3000, "--flush"] if mode == "feed" else ["--snapshot-at", W + 2]
    out = _run(cmd)
    if mode == "step":
        assert f"snapshot after turn {W + 2}" in out and "max diff 0\n" in out, out
    got = np.fromfile(tmp_path / "m.f32", np.float32).reshape(-1, 56)
    want = python_motion(window_bundle, conversation, cfg, with_motion)
    if mode == "step":
        want = want[:TURNS * 25]
    assert got.shape == want.shape
    err = np.abs(got - want).max(axis=1)
    assert err.max() < TOL, f"frame {int(err.argmax())} (turn {int(err.argmax()) // 25}) differs by {err.max():.2e}"


def test_window_context_turns_equals_python(build, window_bundle, window_conversation, tmp_path):
    """context_turns = 3: only the last 3 past turns are in the window (the ring keeps W-1)."""
    d = window_conversation["dir"]
    _run([build / "timar_conv", "--bundle", window_bundle, "--user-audio", d / "ua.f32", "--agent-audio",
          d / "aa.f32", "--user-motion", d / "um.f32", "--seed", SEED, "--cfg", 2.0, "--context-turns", 3,
          "--out", tmp_path / "m.f32"])
    got = np.fromfile(tmp_path / "m.f32", np.float32).reshape(-1, 56)
    s = Session(window_bundle, backend="onnxruntime", seed=SEED, cfg=2.0, context_turns=3)
    n = TURNS * 16000
    want = s.feed(user_audio=window_conversation["ua"][:n], user_motion=window_conversation["um"][:TURNS * 25],
                  agent_audio=window_conversation["aa"][:n])
    assert got.shape == want.shape
    err = np.abs(got - want).max(axis=1)
    assert err.max() < TOL, f"frame {int(err.argmax())} (turn {int(err.argmax()) // 25}) differs by {err.max():.2e}"
    full = python_motion(window_bundle, window_conversation, 2.0, True)[:TURNS * 25]
    assert np.abs(got - full).max() > 10 * TOL   # the limit changes the motion


# ---- C# (Unity bindings) under Mono ---------------------------------------------------------
def _csharp_program(tmp_path_factory, test: str) -> Path:
    """runtime/tests/csharp/{test}.cs compiled with the Unity bindings (and TestSupport.cs) into an .exe."""
    if shutil.which("mcs") is None or shutil.which("mono") is None:
        pytest.skip("mono not installed (apt-get install mono-mcs mono-runtime): C# bindings not tested")
    exe = tmp_path_factory.mktemp("csharp") / f"{test}.exe"
    sources = sorted((ROOT / "runtime" / "unity" / "Runtime").glob("*.cs"))
    _run(["mcs", "-langversion:7", "-unsafe", "-warnaserror+", f"-out:{exe}", *sources,
          ROOT / "runtime" / "tests" / "csharp" / "TestSupport.cs", ROOT / "runtime" / "tests" / "csharp" / f"{test}.cs"])
    return exe


@pytest.fixture(scope="session")
def csharp_test(build, tmp_path_factory) -> Path:
    return _csharp_program(tmp_path_factory, "ConversationTest")


@pytest.fixture(scope="session")
def csharp_two_heads(build, tmp_path_factory) -> Path:
    return _csharp_program(tmp_path_factory, "TwoHeadsTest")


SMOOTHING = {"expression": 0.12, "jaw": 0.04, "neck": 0.3}


@pytest.mark.parametrize("cfg,with_motion,smoothing", [(1.0, True, None), (1.0, False, SMOOTHING), (2.0, True, None),
                                                       (2.0, False, None)])
def test_csharp_bindings_equal_python(build, csharp_test, bundle, conversation, tmp_path, cfg, with_motion, smoothing):
    """The conversation fed in pieces, then flushed; one case with custom output smoothing."""
    d = conversation["dir"]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{build}:{ORT_ROOT / 'lib'}"}
    taus = ",".join(str(smoothing[r]) for r in REGIONS) if smoothing else "-"
    out = _run(["mono", csharp_test, bundle, d / "ua.f32", d / "aa.f32", d / "um.f32" if with_motion else "-",
                SEED, cfg, 1024, tmp_path / "m.f32", taus], env=env)
    assert " 0 failed" in out, out
    got = np.fromfile(tmp_path / "m.f32", np.float32).reshape(-1, 56)
    want = python_motion(bundle, conversation, cfg, with_motion, smoothing=smoothing)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL


def test_csharp_bindings_on_window_bundle(build, csharp_test, window_bundle, window_conversation, tmp_path):
    d = window_conversation["dir"]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{build}:{ORT_ROOT / 'lib'}"}
    out = _run(["mono", csharp_test, window_bundle, d / "ua.f32", d / "aa.f32", d / "um.f32", SEED, 2.0, 1024,
                tmp_path / "m.f32", "-"], env=env)
    assert " 0 failed" in out, out
    got = np.fromfile(tmp_path / "m.f32", np.float32).reshape(-1, 56)
    want = python_motion(window_bundle, window_conversation, 2.0, True)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL


def test_csharp_two_heads_share_one_model(build, csharp_two_heads, bundle, conversation, tmp_path):
    """Two heads (seeds SEED and SEED+1; cfg 1 with the user's motion, cfg 2 without) on one
    TimarModel: input accepted from an audio thread in 20 ms pieces, turns run batched by the
    native worker, motion polled on the main thread, the trailing half turn flushed after the
    model was disposed: each head equals the Python Session of its seed."""
    d = conversation["dir"]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{build}:{ORT_ROOT / 'lib'}"}
    out = _run(["mono", csharp_two_heads, bundle, d / "ua.f32", d / "aa.f32", d / "um.f32", SEED, 320,
                tmp_path / "a.f32", tmp_path / "b.f32"], env=env)
    assert " 0 failed" in out, out
    for name, cfg, with_motion, seed in (("a", 1.0, True, SEED), ("b", 2.0, False, SEED + 1)):
        got = np.fromfile(tmp_path / f"{name}.f32", np.float32).reshape(-1, 56)
        want = python_motion(bundle, conversation, cfg, with_motion, seed=seed)
        assert got.shape == want.shape, name
        err = np.abs(got - want).max(axis=1)
        assert err.max() < TOL, f"head {name}: frame {int(err.argmax())} differs by {err.max():.2e}"


# ---- the C++ example --------------------------------------------------------------------------
def _write_wav(path: Path, audio: np.ndarray, pcm16: bool) -> None:
    data = (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes() if pcm16 else audio.astype("<f4").tobytes()
    fmt, bits = (1, 16) if pcm16 else (3, 32)
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, fmt, 1, 16000,
                         16000 * bits // 8, bits // 8, bits, b"data", len(data))
    path.write_bytes(header + data)


def test_example_wav_program(build, bundle, conversation, tmp_path):
    exe = build / "examples" / "timar_wav"
    if not exe.exists():
        pytest.skip("examples/cpp not built (TIMAR_BUILD_EXAMPLES=OFF)")
    n = 3 * 16000 + 4000
    ua, aa, um = conversation["ua"][:n], conversation["aa"][:n], conversation["um"][:3 * 25 + 6]
    _write_wav(tmp_path / "user.wav", ua, pcm16=True)
    _write_wav(tmp_path / "agent.wav", aa, pcm16=False)
    np.save(tmp_path / "user_motion.npy", um)
    _run([exe, bundle, tmp_path / "user.wav", tmp_path / "agent.wav", tmp_path / "out.npy",
          "--user-motion", tmp_path / "user_motion.npy", "--seed", SEED])
    got = np.load(tmp_path / "out.npy")
    user_pcm = (np.clip(ua, -1, 1 - 1 / 32768) * 32768).astype(np.int16)
    s = Session(bundle, backend="onnxruntime", seed=SEED)
    want = np.concatenate([s.feed(user_audio=user_pcm, user_motion=um, agent_audio=aa), s.flush()])
    assert got.dtype == np.float32 and got.shape == want.shape == (3 * 25 + 6, 56)
    assert np.abs(got - want).max() < TOL


# ---- AddressSanitizer / LeakSanitizer -------------------------------------------------------
@pytest.mark.parametrize("kind", ["cached", "window"])
def test_c_abi_under_address_sanitizer(request, bundle, bad_bundle, kind):
    """The C test built with -fsanitize=address runs clean, on a cached and on a window bundle.
    LeakSanitizer suppressions (runtime/tests/lsan.supp) cover frames inside libonnxruntime only."""
    if os.environ.get("TIMAR_SKIP_ASAN"):
        pytest.skip("TIMAR_SKIP_ASAN is set")
    args = [bundle, bad_bundle] if kind == "cached" else [request.getfixturevalue("window_bundle"), bad_bundle, bundle]
    build = _build(asan=True)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
           "LSAN_OPTIONS": f"suppressions={ROOT / 'runtime' / 'tests' / 'lsan.supp'}:print_suppressions=0"}
    r = subprocess.run([str(build / "timar_test_c"), *map(str, args)], capture_output=True, text=True, env=env)
    report = r.stdout[-3000:] + r.stderr[-6000:]
    assert r.returncode == 0, report
    assert "Sanitizer" not in r.stderr, report
    assert r.stdout.strip().endswith(" 0 failed"), report


# ---- the C ABI in process (ctypes): tampered bundles, numeric guard -------------------------
REGIONS = ("expression", "jaw", "neck")
_SMOOTHING_FIELDS = [("smoothing", ctypes.c_int32)] + [(f"smoothing_{r}", ctypes.c_double) for r in REGIONS]
TIMAR_SMOOTHING_OFF, TIMAR_SMOOTHING_CUSTOM = 1, 2


class _Options(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("steps", ctypes.c_uint32), ("seed", ctypes.c_uint64),
                ("temperature", ctypes.c_double), ("cfg", ctypes.c_double), ("history", ctypes.c_int32),
                ("threads", ctypes.c_int32), ("context_turns", ctypes.c_int32), ("backend", ctypes.c_int32),
                ("verify_hashes", ctypes.c_int32), ("device_id", ctypes.c_int32)] + _SMOOTHING_FIELDS


class _SessionOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("steps", ctypes.c_uint32), ("seed", ctypes.c_uint64),
                ("temperature", ctypes.c_double), ("cfg", ctypes.c_double), ("history", ctypes.c_int32),
                ("context_turns", ctypes.c_int32)] + _SMOOTHING_FIELDS


class _Info(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32)] + [(n, ctypes.c_int32) for n in (
        "fps", "sample_rate", "frames_per_turn", "samples_per_turn", "motion_dim", "context_turns", "steps",
        "history", "backend")] + [("temperature", ctypes.c_double), ("cfg", ctypes.c_double),
                                  ("seed", ctypes.c_uint64), ("turns", ctypes.c_uint64)] + [
        (n, ctypes.c_int32) for n in ("exp_begin", "exp_end", "jaw_begin", "jaw_end", "neck_begin", "neck_end")] + [
        (f"smoothing_{r}", ctypes.c_double) for r in REGIONS]


def _set_smoothing(options, smoothing) -> None:
    """Python's smoothing argument in C options: None the bundle's, False off, a dict custom."""
    if smoothing is False:
        options.smoothing = TIMAR_SMOOTHING_OFF
    elif smoothing is not None:
        options.smoothing = TIMAR_SMOOTHING_CUSTOM
        for region, tau in smoothing.items():
            setattr(options, f"smoothing_{region}", tau)


class _ModelOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("backend", ctypes.c_int32), ("threads", ctypes.c_int32),
                ("device_id", ctypes.c_int32), ("verify_hashes", ctypes.c_int32), ("spin", ctypes.c_int32)]


TIMAR_ERR_BUNDLE, TIMAR_ERR_NUMERIC = 6, 12
_F32P = ctypes.POINTER(ctypes.c_float)
_SIZEP = ctypes.POINTER(ctypes.c_size_t)


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(_F32P)


class CApi:
    """libtimar loaded with ctypes: create a session and run turns, keeping status and message."""

    def __init__(self, build: Path):
        self.lib = lib = ctypes.CDLL(str(build / "libtimar.so"))
        lib.timar_last_error.restype = ctypes.c_char_p
        lib.timar_session_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Options), ctypes.POINTER(ctypes.c_void_p)]
        lib.timar_session_destroy.argtypes = [ctypes.c_void_p]
        lib.timar_session_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Info)]
        lib.timar_step.argtypes = [ctypes.c_void_p, _F32P, ctypes.c_size_t, _F32P, ctypes.c_size_t, _F32P,
                                   ctypes.c_size_t, _F32P, ctypes.c_size_t]
        lib.timar_get_state.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, _SIZEP]
        lib.timar_model_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(_ModelOptions),
                                           ctypes.POINTER(ctypes.c_void_p)]
        lib.timar_model_destroy.argtypes = [ctypes.c_void_p]
        lib.timar_model_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Info)]
        lib.timar_session_create_from_model.argtypes = [ctypes.c_void_p, ctypes.POINTER(_SessionOptions),
                                                        ctypes.POINTER(ctypes.c_void_p)]
        lib.timar_session_accept.argtypes = [ctypes.c_void_p, _F32P, ctypes.c_size_t, _F32P, ctypes.c_size_t, _F32P,
                                             ctypes.c_size_t, _SIZEP]
        lib.timar_model_run_ready.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _SIZEP, _SIZEP]
        lib.timar_session_poll_motion.argtypes = [ctypes.c_void_p, _F32P, ctypes.c_size_t, _SIZEP,
                                                  ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_double)]

    def error(self) -> str:
        return self.lib.timar_last_error().decode("utf-8", "replace")

    def create(self, bundle: Path, smoothing=None) -> tuple[int, ctypes.c_void_p | None]:
        o = _Options()
        self.lib.timar_options_init(ctypes.byref(o))
        o.seed, o.threads, o.backend = SEED, 1, 1   # TIMAR_BACKEND_ORT_CPU
        _set_smoothing(o, smoothing)
        s = ctypes.c_void_p()
        status = self.lib.timar_session_create(str(bundle).encode(), ctypes.byref(o), ctypes.byref(s))
        return status, (s if status == 0 else None)

    def step(self, s, ua: np.ndarray, um: np.ndarray | None, aa: np.ndarray) -> tuple[int, np.ndarray]:
        out = np.zeros((25, 56), np.float32)
        status = self.lib.timar_step(s, _ptr(ua), len(ua), _ptr(um), 0 if um is None else len(um), _ptr(aa), len(aa),
                                     _ptr(out), 25)
        return status, out

    def create_model(self, bundle: Path) -> ctypes.c_void_p:
        o = _ModelOptions()
        self.lib.timar_model_options_init(ctypes.byref(o))
        o.threads, o.backend = 1, 1   # TIMAR_BACKEND_ORT_CPU
        m = ctypes.c_void_p()
        assert self.lib.timar_model_create(str(bundle).encode(), ctypes.byref(o), ctypes.byref(m)) == 0, self.error()
        return m

    def session_of(self, model, seed: int = 0, smoothing=None) -> ctypes.c_void_p:
        """A session of `model` with the bundle's sampling settings."""
        o = _SessionOptions()
        self.lib.timar_session_options_init(ctypes.byref(o))
        o.seed = seed
        _set_smoothing(o, smoothing)
        s = ctypes.c_void_p()
        assert self.lib.timar_session_create_from_model(model, ctypes.byref(o), ctypes.byref(s)) == 0, self.error()
        return s

    def accept(self, s, ua: np.ndarray, um: np.ndarray | None, aa: np.ndarray) -> int:
        ready = ctypes.c_size_t()
        assert self.lib.timar_session_accept(s, _ptr(ua), len(ua), _ptr(um), 0 if um is None else len(um), _ptr(aa),
                                             len(aa), ctypes.byref(ready)) == 0, self.error()
        return ready.value

    def run_ready(self, model) -> tuple[int, int]:
        turns, batches = ctypes.c_size_t(), ctypes.c_size_t()
        assert self.lib.timar_model_run_ready(model, 0, ctypes.byref(turns), ctypes.byref(batches)) == 0, self.error()
        return turns.value, batches.value

    def poll(self, s) -> tuple[int, int, np.ndarray]:
        """(status, turn index, frames) of the session's oldest queued turn."""
        out, frames, turn = np.zeros((25, 56), np.float32), ctypes.c_size_t(), ctypes.c_uint64(99)
        status = self.lib.timar_session_poll_motion(s, _ptr(out), 25, ctypes.byref(frames), ctypes.byref(turn), None)
        return status, turn.value, out[:frames.value]

    def info(self, s) -> _Info:
        info = _Info(struct_size=ctypes.sizeof(_Info))
        assert self.lib.timar_session_info(s, ctypes.byref(info)) == 0, self.error()
        return info

    def turns(self, s) -> int:
        return self.info(s).turns

    def smoothing(self, s) -> dict:
        """The time constants timar_session_info reports."""
        return {r: getattr(self.info(s), f"smoothing_{r}") for r in REGIONS}

    def state(self, s) -> bytes:
        n = ctypes.c_size_t()
        assert self.lib.timar_get_state(s, None, 0, ctypes.byref(n)) == 0, self.error()
        buf = ctypes.create_string_buffer(n.value)
        assert self.lib.timar_get_state(s, buf, n, ctypes.byref(n)) == 0, self.error()
        return buf.raw

    def open_error(self, bundle: Path) -> tuple[int, str]:
        """(status, message) of creating a session; a session that opens is closed again."""
        status, s = self.create(bundle)
        if s is not None:
            self.lib.timar_session_destroy(s)
        return status, self.error() if status else ""


@pytest.fixture(scope="session")
def capi(build) -> CApi:
    return CApi(build)


@pytest.fixture(scope="session")
def bundle_copy(bundle, tmp_path_factory) -> Path:
    """A copy of the bundle on the temporary file system, for hard links into tampered copies."""
    path = tmp_path_factory.mktemp("native") / "base"
    shutil.copytree(bundle, path)
    return path


def _tampered(base: Path, dest: Path, edit=None) -> Path:
    """`base` hard-linked into `dest` with its manifest changed by edit(manifest, dest) and
    written with a matching manifest.sha256 (so the check under test is the one behind it)."""
    from timar_sdk.runtime.bundle import write_manifest

    dest.mkdir(parents=True)
    for f in base.iterdir():
        if f.name not in ("manifest.json", "manifest.sha256"):
            os.link(f, dest / f.name)
    manifest = json.loads((base / "manifest.json").read_text())
    if edit:
        edit(manifest, dest)
    write_manifest(dest, manifest)
    return dest


def _outside_file(base: Path, dest: Path) -> Path:
    (dest.parent / "outside").mkdir(exist_ok=True)
    target = dest.parent / "outside" / "denoiser.onnx"
    if not target.exists():
        os.link(base / "denoiser.onnx", target)
    return target


def _graph_file(value_of):
    def edit(m, dest):
        m["graphs"]["denoiser"]["file"] = value_of(dest)
    return edit


def _symlink(name: str, to_dir: bool):
    def value_of(dest):
        target = dest.parent / "outside"
        (dest / name).symlink_to(target if to_dir else target / "denoiser.onnx")
        return name + "/denoiser.onnx" if to_dir else name
    return value_of


PATH_CASES = {
    "dotdot": (_graph_file(lambda d: "../outside/denoiser.onnx"), "graphs.denoiser.file"),
    "absolute": (_graph_file(lambda d: str(d.parent / "outside" / "denoiser.onnx")), "graphs.denoiser.file"),
    "symlink": (_graph_file(_symlink("link.onnx", False)), "resolves outside"),
    "symlinked_dir": (_graph_file(_symlink("sub", True)), "resolves outside"),
    "engine": (lambda m, d: m["engines"].append({"dir": "engines/x", "gpu": "X", "tensorrt": "10.0", "files": {
        "denoiser": {"file": "../../../../../etc/passwd", "sha256": "0" * 64}}}), "engines[0].files.denoiser.file"),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_bundle_files_stay_inside_the_folder(capi, bundle_copy, tmp_path, case):
    """A manifest naming a file outside the bundle ('..', an absolute path, a symlink out, an
    engine plan) is refused at load, naming the field, even when the file there is valid."""
    edit, needle = PATH_CASES[case]
    dest = tmp_path / "bundle"
    _outside_file(bundle_copy, dest)
    status, msg = capi.open_error(_tampered(bundle_copy, dest, edit))
    assert status == TIMAR_ERR_BUNDLE and needle in msg, (status, msg)


def _set(path: str, value):
    def edit(m, dest):
        *keys, last = path.split(".")
        node = m
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value(node[int(last)]) if callable(value) else value
        else:
            node[last] = value(node[last]) if callable(value) else value
    return edit


MANIFEST_CASES = {
    "std_zero": (_set("motion_std.3", 0.0), "motion_std: expected values > 0"),
    "std_float32_overflow": (_set("motion_std.0", 1e39), "motion_std: expected 56 finite float32 values"),
    "mean_float32_overflow": (_set("motion_mean.5", -1e39), "motion_mean: expected 56 finite float32 values"),
    "alphas_not_decreasing": (lambda m, d: m["diffusion"]["alphas_cumprod"].__setitem__(
        10, m["diffusion"]["alphas_cumprod"][9]), "diffusion.alphas_cumprod: expected"),
    "alphas_one": (_set("diffusion.alphas_cumprod.0", 1.0), "diffusion.alphas_cumprod: expected"),
    "samples_per_turn": (_set("samples_per_turn", 16001), "samples_per_turn: expected"),
    "context_turns": (_set("context_turns", 9), "cache.slots: expected 8"),
    "cache_tokens": (_set("cache.past_key_values_shape.4", 880), "cache.past_key_values_shape[4]: expected"),
    "temperature_default": (_set("sampling.temperature", 50.0), "sampling.temperature: expected"),
    "cfg_default": (_set("sampling.cfg", -1.0), "sampling.cfg: expected"),
    "steps_default": (_set("sampling.steps", 5000), "sampling.steps: expected"),
    "schema_version": (_set("schema_version", 1), "than this runtime reads (2)"),
    "smoothing_negative": (_set("smoothing", {"jaw": -0.1}), "smoothing.jaw: expected a time constant"),
    "smoothing_too_long": (_set("smoothing", {"neck": 2.5}), "smoothing.neck: expected a time constant"),
    "smoothing_not_a_number": (_set("smoothing", {"expression": "0.1"}), "smoothing.expression: expected"),
    "smoothing_unknown_region": (_set("smoothing", {"mouth": 0.1}), "smoothing: expected only the keys"),
    "smoothing_not_an_object": (_set("smoothing", 0.1), "smoothing: expected false or an object"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_numbers_checked_at_load(capi, bundle_copy, tmp_path, case):
    edit, needle = MANIFEST_CASES[case]
    status, msg = capi.open_error(_tampered(bundle_copy, tmp_path / "bundle", edit))
    assert status == TIMAR_ERR_BUNDLE and needle in msg and "manifest.json" in msg, (status, msg)


def test_manifest_digest(capi, bundle_copy, tmp_path):
    """manifest.json is covered by manifest.sha256: missing, a changed digit, or a binary file."""
    ok = _tampered(bundle_copy, tmp_path / "ok")
    assert capi.open_error(ok) == (0, "")
    (ok / "manifest.sha256").write_text((ok / "manifest.sha256").read_text().strip() + "\r\n")
    assert capi.open_error(ok) == (0, ""), "trailing whitespace of the sidecar is not part of the digest"

    missing = _tampered(bundle_copy, tmp_path / "missing")
    (missing / "manifest.sha256").unlink()
    status, msg = capi.open_error(missing)
    assert status == TIMAR_ERR_BUNDLE and "no manifest.sha256" in msg, msg

    edited = _tampered(bundle_copy, tmp_path / "edited")
    text = (edited / "manifest.json").read_text()
    mean = json.loads(text)["motion_mean"][0]
    changed = text.replace(repr(mean), repr(mean + 0.5), 1)
    assert changed != text
    (edited / "manifest.json").write_text(changed)
    status, msg = capi.open_error(edited)
    assert status == TIMAR_ERR_BUNDLE and "does not match manifest.sha256" in msg, msg

    binary = _tampered(bundle_copy, tmp_path / "binary")
    data = bytes(range(256)) * 4
    (binary / "manifest.json").write_bytes(data)
    (binary / "manifest.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    status, msg = capi.open_error(binary)
    assert status == TIMAR_ERR_BUNDLE and "manifest.json" in msg and "UTF-8" in msg, msg


def _poison_graph(path: Path, output: str, factor) -> None:
    """Rewrite an ONNX graph so that `output` is multiplied by factor(graph) (a tensor name)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    model = onnx.load(str(path))
    g = model.graph
    for node in g.node:
        node.output[:] = [o + "_raw" if o == output else o for o in node.output]
    g.node.extend(factor(helper) + [helper.make_node("Mul", [output + "_raw", "poison"], [output])])
    onnx.save(model, str(path))


def _poisoned(base: Path, dest: Path, graph: str, output: str, factor) -> Path:
    from timar_sdk.runtime.bundle import sha256_of

    def edit(m, d):
        (d / f"{graph}.onnx").unlink()
        shutil.copy(base / f"{graph}.onnx", d / f"{graph}.onnx")
        _poison_graph(d / f"{graph}.onnx", output, factor)
        m["graphs"][graph]["sha256"] = sha256_of(d / f"{graph}.onnx")
    return _tampered(base, dest, edit)


def _inverse_of(name: str, shape: list[int]):
    """poison = reshape(1 / (1 - name)) or 1 / name: Inf exactly where the input is 1 (or 0)."""
    def nodes(helper):
        from onnx import TensorProto
        one = helper.make_tensor("poison_one", TensorProto.FLOAT, [], [1.0])
        dims = helper.make_tensor("poison_shape", TensorProto.INT64, [len(shape)], shape)
        body = [helper.make_node("Constant", [], ["poison_shape_c"], value=dims)]
        if name == "t":
            body.append(helper.make_node("Reciprocal", ["t"], ["poison_r"]))
        else:
            body += [helper.make_node("Constant", [], ["poison_one_c"], value=one),
                     helper.make_node("Sub", ["poison_one_c", name], ["poison_d"]),
                     helper.make_node("Reciprocal", ["poison_d"], ["poison_r"])]
        return body + [helper.make_node("Reshape", ["poison_r", "poison_shape_c"], ["poison"])]
    return nodes


def test_non_finite_turn_is_not_committed(capi, bundle_copy, tmp_path):
    """A model that puts Inf into the cache on untracked turns (and one whose motion is always
    NaN): the turn fails with TIMAR_ERR_NUMERIC and nothing in the session changes; the next
    good turn equals a session that never saw the failure."""
    rng = np.random.default_rng(5)
    ua, aa = [(rng.standard_normal(16000) * 0.2).astype(np.float32) for _ in range(2)]
    um = (rng.standard_normal((25, 56)) * 0.3).astype(np.float32)
    cache_bad = _poisoned(bundle_copy, tmp_path / "cache", "encoder_step", "present_key_values",
                          _inverse_of("user_motion_absent", [1, 1, -1, 1, 1, 1]))
    st, s = capi.create(cache_bad)
    st_ref, ref = capi.create(cache_bad)
    assert s is not None and ref is not None, capi.error()
    try:
        for sess in (s, ref):
            assert capi.step(sess, ua, um, aa)[0] == 0, capi.error()
        before = capi.state(s)
        status, _ = capi.step(s, ua, None, aa)   # untracked: Inf keys/values, finite motion
        assert status == TIMAR_ERR_NUMERIC and "NaN or Inf" in capi.error() and "cache" in capi.error(), capi.error()
        assert capi.turns(s) == 1 and capi.state(s) == before
        got, want = capi.step(s, ua, um, aa), capi.step(ref, ua, um, aa)
        assert got[0] == want[0] == 0 and np.array_equal(got[1], want[1])
    finally:
        capi.lib.timar_session_destroy(s)
        capi.lib.timar_session_destroy(ref)

    motion_bad = _poisoned(bundle_copy, tmp_path / "motion", "denoiser", "model_output", _inverse_of("t", [-1, 1]))
    st, s = capi.create(motion_bad)
    assert s is not None, capi.error()
    try:
        before = capi.state(s)
        status, _ = capi.step(s, ua, um, aa)
        assert status == TIMAR_ERR_NUMERIC and "motion" in capi.error(), capi.error()
        assert capi.turns(s) == 0 and capi.state(s) == before
    finally:
        capi.lib.timar_session_destroy(s)


def test_non_finite_turn_fails_only_its_session_in_a_batch(capi, bundle_copy, tmp_path):
    """One batch of two sessions of one model whose graph puts Inf into the cache on untracked
    turns: the untracked session's turn fails alone (TIMAR_ERR_NUMERIC through its own poll, its
    input dropped, its state as before), the tracked one's is committed and equals it alone."""
    rng = np.random.default_rng(6)
    ua, aa = [(rng.standard_normal(16000) * 0.2).astype(np.float32) for _ in range(2)]
    um = (rng.standard_normal((25, 56)) * 0.3).astype(np.float32)
    cache_bad = _poisoned(bundle_copy, tmp_path / "cache", "encoder_step", "present_key_values",
                          _inverse_of("user_motion_absent", [1, 1, -1, 1, 1, 1]))
    model = capi.create_model(cache_bad)
    tracked, untracked, alone = (capi.session_of(model) for _ in range(3))
    try:
        before = capi.state(untracked)
        assert capi.accept(tracked, ua, um, aa) == 1 and capi.accept(untracked, ua, None, aa) == 1
        assert capi.run_ready(model) == (2, 1)                  # both turns in one batch
        status, turn, frames = capi.poll(untracked)
        assert status == TIMAR_ERR_NUMERIC and turn == 0 and len(frames) == 0, (status, capi.error())
        assert "turn 0" in capi.error() and "cache" in capi.error(), capi.error()
        assert capi.turns(untracked) == 0 and capi.state(untracked) == before
        status, turn, frames = capi.poll(tracked)
        want = capi.step(alone, ua, um, aa)
        assert status == 0 and turn == 0 and want[0] == 0 and np.abs(frames - want[1]).max() < 1e-5
        assert capi.turns(tracked) == 1
    finally:
        capi.lib.timar_model_destroy(model)   # before its sessions: they keep the graphs
        for s in (tracked, untracked, alone):
            capi.lib.timar_session_destroy(s)


# ---- output smoothing ---------------------------------------------------------------------------
def _turns(conv, n: int, with_motion: bool = True):
    """The first n turns of a conversation: (user audio, user motion or None, agent audio) per turn."""
    return [(conv["ua"][t * 16000:(t + 1) * 16000], conv["um"][t * 25:(t + 1) * 25] if with_motion else None,
             conv["aa"][t * 16000:(t + 1) * 16000]) for t in range(n)]


def _python_turns(bundle, conv, n: int, smoothing=None) -> np.ndarray:
    s = Session(bundle, backend="onnxruntime", seed=SEED, smoothing=smoothing)
    return np.concatenate([s.step(*turn) for turn in _turns(conv, n)])


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max(axis=1)
    assert err.max() < TOL, f"{what}: frame {int(err.argmax())} (turn {int(err.argmax()) // 25}) differs by {err.max():.2e}"


def test_smoothing_equals_python_direct_and_batched(capi, bundle, conversation):
    """Custom smoothing over four turns (the filter carries across the turn boundaries): timar_step
    and the batched accept/run_ready/poll path each equal the Python Session with that smoothing;
    the unsmoothed motion differs from it by far more than the tolerance."""
    n = 4
    want = _python_turns(bundle, conversation, n, SMOOTHING)
    assert np.abs(want - _python_turns(bundle, conversation, n, False)).max() > 20 * TOL

    status, direct = capi.create(bundle, SMOOTHING)
    assert status == 0, capi.error()
    model = capi.create_model(bundle)
    batched = capi.session_of(model, seed=SEED, smoothing=SMOOTHING)
    try:
        assert capi.smoothing(direct) == capi.smoothing(batched) == SMOOTHING
        steps, polled = [], []
        for ua, um, aa in _turns(conversation, n):
            status, frames = capi.step(direct, ua, um, aa)
            assert status == 0, capi.error()
            steps.append(frames)
            assert capi.accept(batched, ua, um, aa) == 1
            assert capi.run_ready(model)[0] == 1
            status, turn, frames = capi.poll(batched)
            assert status == 0 and turn == len(polled), capi.error()
            polled.append(frames)
        _assert_close(np.concatenate(steps), want, "timar_step")
        _assert_close(np.concatenate(polled), want, "accept/run_ready/poll")
    finally:
        capi.lib.timar_session_destroy(direct)
        capi.lib.timar_session_destroy(batched)
        capi.lib.timar_model_destroy(model)


def test_bundle_smoothing_defaults(capi, bundle_copy, conversation, tmp_path):
    """A bundle whose manifest sets smoothing defaults is smoothed by default, in C++ and in Python
    alike (timar_session_info and timar_model_info report them); TIMAR_SMOOTHING_OFF gives the
    exact model output, as Python's smoothing=False."""
    smoothed = _tampered(bundle_copy, tmp_path / "smoothed", _set("smoothing", SMOOTHING))
    n = 2
    for smoothing in (None, False):
        want = _python_turns(smoothed, conversation, n, smoothing)
        status, s = capi.create(smoothed, smoothing)
        assert status == 0, capi.error()
        try:
            assert capi.smoothing(s) == (SMOOTHING if smoothing is None else dict.fromkeys(REGIONS, 0.0))
            got = []
            for turn in _turns(conversation, n):
                status, frames = capi.step(s, *turn)
                assert status == 0, capi.error()
                got.append(frames)
            _assert_close(np.concatenate(got), want, f"smoothing={smoothing}")
        finally:
            capi.lib.timar_session_destroy(s)
    assert np.array_equal(_python_turns(smoothed, conversation, n, False), _python_turns(bundle_copy, conversation, n, False))
    model = capi.create_model(smoothed)
    try:
        info = _Info(struct_size=ctypes.sizeof(_Info))
        assert capi.lib.timar_model_info(model, ctypes.byref(info)) == 0, capi.error()
        assert {r: getattr(info, f"smoothing_{r}") for r in REGIONS} == SMOOTHING
    finally:
        capi.lib.timar_model_destroy(model)


# ---- the C++ example's command line ------------------------------------------------------------
def test_example_wav_command_line(build):
    exe = build / "examples" / "timar_wav"
    if not exe.exists():
        pytest.skip("examples/cpp not built (TIMAR_BUILD_EXAMPLES=OFF)")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: timar_wav" in r.stdout and "--user-motion" in r.stdout, r
    r = subprocess.run([str(exe), "b", "u.wav", "a.wav", "o.npy", "--bogus", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr and "usage:" in r.stderr, r
    r = subprocess.run([str(exe), "b", "u.wav", "a.wav", "o.npy", "--seed"], capture_output=True, text=True)
    assert r.returncode == 2 and "--seed needs a value" in r.stderr, r
    r = subprocess.run([str(exe), "b", "u.wav", "a.wav", "o.npy", "--seed", "x1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--seed" in r.stderr, r
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr, r
