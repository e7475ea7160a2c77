"""The JavaScript runtime (web/, onnxruntime-web) and the demo page, against the Python Session.

Node: the same conversation through Python's Session and the JS Session on the shipped bundle
(bundle default smoothing, smoothing off with temperature > 0 and an untracked user, CFG with
history feedback) gives the same motion (1e-3); the Philox stream is bit-exact (raw words and
normals, counter carries and wrap); bad inputs, settings and tampered bundles give Python's
messages. Browser: headless Debian chromium loads the page web/scripts/build-demo.js writes, from a
local server on 127.0.0.1, a WAV file as the fake microphone; the page's motion equals Python's
on the audio the page captured, and a screenshot shows the head.

Skips, saying why, where node, web/node_modules (`npm ci` in web/) or chromium are missing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from timar_sdk import Session
from timar_sdk.audio import load_audio
from timar_sdk.runtime.rng import PhiloxNormal

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
HARNESS = WEB / "test" / "harness.mjs"
BUNDLE = ROOT / "timar_sdk" / "assets" / "default_bundle"
DEMO = ROOT / "timar_sdk" / "assets" / "demo_conversation"
TOL = 1e-3
SAMPLES, FRAMES, DIM = 16000, 25, 56


def _need_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed (apt-get install nodejs npm): the JS runtime cannot run")
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        pytest.skip("web/node_modules missing: run `npm ci` in web/")
    return node


def _node(*args, timeout: float = 120) -> str:
    node = _need_node()
    done = subprocess.run([node, str(HARNESS), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=WEB)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _conversation(turns: int):
    ua = load_audio(DEMO / "user.flac")[:turns * SAMPLES]
    aa = load_audio(DEMO / "agent.flac")[:turns * SAMPLES]
    um = np.load(DEMO / "user_motion.npy").astype(np.float32)[:turns * FRAMES]
    return ua, aa, um


def _python_turns(options: dict, ua, aa, um, turns: int) -> np.ndarray:
    py_options = {"context_turns" if k == "contextTurns" else k: v for k, v in options.items()}
    session = Session(seed=options.get("seed", 0), threads=1,
                      **{k: v for k, v in py_options.items() if k != "seed"})
    out = [session.step(ua[k * SAMPLES:(k + 1) * SAMPLES], None if um is None else um[k * FRAMES:(k + 1) * FRAMES],
                        aa[k * SAMPLES:(k + 1) * SAMPLES]) for k in range(turns)]
    return np.concatenate(out)


def _js_turns(tmp_path: Path, options: dict, ua, aa, um, turns: int, feed: int | None = None) -> np.ndarray:
    ua.astype(np.float32).tofile(tmp_path / "ua.f32")
    aa.astype(np.float32).tofile(tmp_path / "aa.f32")
    if um is not None:
        um.astype(np.float32).tofile(tmp_path / "um.f32")
    spec = {"bundle": str(BUNDLE), "options": options, "turns": turns, "user_audio": "ua.f32",
            "agent_audio": "aa.f32", "user_motion": None if um is None else "um.f32", "feed": feed}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _node("turns", tmp_path / "spec.json", tmp_path / "out.f32")
    return np.fromfile(tmp_path / "out.f32", np.float32).reshape(-1, DIM)


@pytest.mark.slow
@pytest.mark.parametrize("options,tracked,turns", [
    ({"seed": 7}, True, 10),                                                   # bundle defaults: smoothing on
    ({"seed": 123, "smoothing": False, "temperature": 1.0}, False, 4),         # exact output, noise matters
    ({"seed": 5, "cfg": 2.0, "temperature": 0.5, "history": "feedback", "contextTurns": 3}, True, 3),
    ({"seed": 9, "temperature": 1.0, "feed": 7000}, False, 3),               # any-size pieces through feed()
    ({"seed": 9, "temperature": 1.0, "feed": 37000}, False, 3),              # two turns in one feed() call
], ids=["defaults", "smoothing-off", "cfg-feedback", "feed", "feed-2-turns"])
def test_node_session_matches_python(tmp_path, options, tracked, turns):
    _need_node()
    ua, aa, um = _conversation(turns)
    um = um if tracked else None
    options = dict(options)
    feed = options.pop("feed", None)
    js = _js_turns(tmp_path, options, ua, aa, um, turns, feed)
    py = _python_turns(options, ua, aa, um, turns)
    assert js.shape == py.shape == (turns * FRAMES, DIM)
    err = float(np.abs(js - py).max())
    assert err <= TOL, f"JS motion differs from Python's by {err:.3g} (> {TOL})"
    assert float(np.abs(py).max()) > 10 * TOL    # a conversation that moves, not zeros on both sides


@pytest.mark.parametrize("seed,counter", [(0, 0), (12345678901234567890, 5), (2**64 - 1, 2**64 - 3),
                                          (42, 2**128 - 2)])
def test_node_philox_stream_is_bit_exact(tmp_path, seed, counter):
    n = 1003                                        # not a multiple of 4: the last block's leftovers
    out = json.loads(_node("philox", seed, counter, n, tmp_path / "philox.bin"))
    raw = np.fromfile(tmp_path / "philox.bin", np.uint32)
    gen = PhiloxNormal(seed)
    gen.set_state({"seed": seed, "counter": counter})
    np.testing.assert_array_equal(raw[:n], gen.uniform_u32(n))
    gen.set_state({"seed": seed, "counter": counter})
    np.testing.assert_array_equal(raw[n:], gen.normal(n).view(np.uint32))   # bit for bit
    assert int(out["counter"]) == gen.counter


def _array(desc):
    if desc is None:
        return None
    value = {"nan": np.nan, "inf": np.inf}.get(desc.get("value"), desc.get("value", 0))
    a = np.full(desc["n"], value, dtype=desc["dtype"])
    for i, v in desc.get("set", []):
        a[i] = {"nan": np.nan, "inf": np.inf}.get(v, v)
    return a.reshape(-1, DIM) if desc.get("motion") else a


def _audio(n=SAMPLES, dtype="float32", value=0.01, **kw):
    return {"dtype": dtype, "n": n, "value": value, **kw}


def _motion(frames=FRAMES, value=0.0, **kw):
    return {"dtype": "float32", "n": frames * DIM, "value": value, "motion": True, **kw}


ERROR_CASES = [
    {"options": {"seed": -1}}, {"options": {"seed": 1.5}}, {"options": {"steps": 0}},
    {"options": {"steps": 1001}}, {"options": {"temperature": 11}}, {"options": {"cfg": -1}},
    {"options": {"history": "later"}}, {"options": {"smoothing": {"jaw": 3}}},
    {"options": {"smoothing": {"lips": 0.1}}},
    {"step": {"user_audio": _audio(n=100), "user_motion": None, "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(), "user_motion": None, "agent_audio": _audio(n=SAMPLES + 1)}},
    {"step": {"user_audio": _audio(set=[[5, "nan"]]), "user_motion": None, "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(), "user_motion": None, "agent_audio": _audio(set=[[9, 5.0]])}},
    {"step": {"user_audio": _audio(dtype="float64", set=[[3, 1e39]]), "user_motion": None, "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(dtype="int32", value=3), "user_motion": None, "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(n=0), "user_motion": None, "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(), "user_motion": _motion(frames=3), "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(), "user_motion": _motion(set=[[60, "inf"]]), "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(), "user_motion": _motion(set=[[70, -25.5]]), "agent_audio": _audio()}},
    {"step": {"user_audio": _audio(dtype="int16", value=-32768), "user_motion": _motion(value=0.1),
              "agent_audio": _audio(dtype="float64", value=-0.5)}},                       # valid: no error
]


def _python_error(case) -> str | None:
    try:
        options = dict(case.get("options", {}))
        session = Session(seed=options.pop("seed", 0), threads=1, **options)
        if "step" in case:
            s = case["step"]
            session.step(_array(s["user_audio"]), _array(s["user_motion"]), _array(s["agent_audio"]))
        return None
    except Exception as e:  # noqa: BLE001 - the message is what is compared
        return f"{type(e).__name__}: {e}"


@pytest.mark.slow
def test_node_input_errors_match_python(tmp_path):
    (tmp_path / "cases.json").write_text(json.dumps(ERROR_CASES))
    js = json.loads(_node("errors", BUNDLE, tmp_path / "cases.json"))
    py = [_python_error(c) for c in ERROR_CASES]
    assert py[-1] is None and sum(m is None for m in py) == 1
    for case, p, j in zip(ERROR_CASES, py, js):
        assert j == p, f"case {case}"


def _tampered(tmp_path: Path, how: str) -> Path:
    b = tmp_path / how
    shutil.copytree(BUNDLE, b)
    if how == "graph":
        with open(b / "denoiser.onnx", "ab") as fh:
            fh.write(b"\0")
    elif how == "manifest":
        (b / "manifest.json").write_text((b / "manifest.json").read_text().replace('"fps": 25', '"fps": 30', 1))
    elif how == "digest":
        (b / "manifest.sha256").unlink()
    return b


@pytest.mark.parametrize("how", ["graph", "manifest", "digest"])
def test_node_refuses_tampered_bundles_as_python(tmp_path, how):
    from timar_sdk.runtime.bundle import Bundle
    b = _tampered(tmp_path, how)
    with pytest.raises(Exception) as err:
        Bundle(b)
    assert _node("bundle", b).strip() == f"BundleError: {err.value}"


@pytest.mark.parametrize("field,value,message", [
    ("attention", "window_recompute", "attention 'window_recompute' is not supported by the JavaScript runtime"),
    ("cache.dtype", "float16", "cache.dtype 'float16' is not supported by the JavaScript runtime"),
])
def test_node_refuses_bundle_kinds_it_does_not_run(tmp_path, field, value, message):
    from timar_sdk.runtime.bundle import write_manifest
    b = tmp_path / "other"
    shutil.copytree(BUNDLE, b)
    manifest = json.loads((b / "manifest.json").read_text())
    *parents, key = field.split(".")
    target = manifest
    for p in parents:
        target = target[p]
    target[key] = value
    write_manifest(b, manifest)
    out = _node("bundle", b).strip()
    assert out.startswith("BundleError: ") and message in out, out


# ---- the demo page in headless Chromium ---------------------------------------------------------------
BROWSER_TURNS = 3
BACKGROUND = np.array([0x2B, 0x33, 0x40])     # the head canvas's background colour (web/page/head.js)


def _need_browser() -> str:
    _need_node()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium): the page cannot be loaded")
    if not (WEB / "node_modules" / "puppeteer-core").is_dir():
        pytest.skip("puppeteer-core missing from web/node_modules: run `npm ci` in web/")
    return chromium


class _Server:
    """A static file server on 127.0.0.1 (a free port) for the demo folder, in a thread."""

    def __init__(self, folder: Path):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.mark.slow
def test_browser_page_motion_matches_python(tmp_path):
    import soundfile as sf
    from PIL import Image

    chromium = _need_browser()
    node = shutil.which("node")
    site, out = tmp_path / "site", tmp_path / "out"
    subprocess.run([node, str(WEB / "scripts" / "build-demo.js"), "--out", str(site)], check=True, timeout=60,
                   capture_output=True)
    wav = tmp_path / "user.wav"
    sf.write(wav, load_audio(DEMO / "user.flac")[:10 * SAMPLES], SAMPLES, subtype="PCM_16")
    shot = tmp_path / "page.png"
    with _Server(site) as server:
        done = subprocess.run([node, str(WEB / "test" / "browser.mjs"), "--url", server.url, "--wav", str(wav),
                               "--out", str(out), "--turns", str(BROWSER_TURNS), "--screenshot", str(shot),
                               "--at", "2", "--timeout", "100", "--chromium", chromium],
                              capture_output=True, text=True, timeout=115, cwd=WEB)
    result = json.loads((out / "result.json").read_text())
    assert done.returncode == 0 and result["error"] is None, (result, done.stderr[-2000:])
    assert result["info"]["isolated"], "the page is not cross-origin isolated (coi-serviceworker)"
    ua = np.fromfile(out / "user.f32", np.float32)
    aa = np.fromfile(out / "agent.f32", np.float32)
    motion = np.fromfile(out / "motion.f32", np.float32).reshape(-1, DIM)
    assert ua.shape == aa.shape == (BROWSER_TURNS * SAMPLES,) and motion.shape == (BROWSER_TURNS * FRAMES, DIM)
    # the microphone delivered the WAV (speech, not silence); the agent track is the file's samples
    # (Chromium scales 16-bit FLAC by 1/32767, soundfile by 1/32768: 3e-5 relative)
    assert float(np.sqrt(np.mean(ua[SAMPLES:] ** 2))) > 1e-3
    np.testing.assert_allclose(aa, load_audio(DEMO / "agent.flac")[:BROWSER_TURNS * SAMPLES], rtol=1e-4, atol=1e-7)
    py = _python_turns({"seed": 0}, ua, aa, None, BROWSER_TURNS)
    err = float(np.abs(motion - py).max())
    assert err <= TOL, f"the page's motion differs from Python's by {err:.3g} (> {TOL})"
    # the screenshot shows something drawn on the head's canvas, not the bare background
    img = np.asarray(Image.open(shot).convert("RGB"), np.int32)
    canvas = img[120:660, 30:580]
    drawn = np.abs(canvas - BACKGROUND).sum(axis=2) > 40
    assert drawn.mean() > 0.25, f"only {drawn.mean():.0%} of the head's canvas is drawn"
