"""The command-line tools on real files: bad input ends in one line naming the file, nothing is
lost silently, long waits show progress, every tool documents its options and has --version.

Most tests run the commands with click's CliRunner on the shipped bundle; the ones about a
missing optional package run the installed entry point in a subprocess whose import of that
package fails."""
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import click
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from timar_sdk import Session
from timar_sdk.cli import bench_cmd, run_cmd, train_cmd
from timar_sdk.evaluate import eval_cmd

SR, FPS = 16000, 25


def tone(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(round(seconds * SR)))).astype(np.float32)


def wav(path, audio, rate=SR):
    sf.write(str(path), audio, rate, subtype="FLOAT")
    return str(path)


def run(*args):
    return CliRunner().invoke(run_cmd, [str(a) for a in args])


def assert_one_line_error(res, *names, code=1):
    """Exit `code`, no traceback, exactly one `Error:` line, naming every one of `names`."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}"
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def without(modules, tool, *args, tmp_path):
    """Run the installed console script `tool` in a subprocess where importing `modules` fails."""
    code = ("import sys\nfrom importlib.metadata import entry_points\n"
            f"for m in {list(modules)!r}: sys.modules[m] = None\n"
            f"(ep,) = [e for e in entry_points(group='console_scripts') if e.name == {tool!r}]\n"
            f"sys.argv = [{tool!r}] + {[str(a) for a in args]!r}\n"
            "sys.exit(ep.load()())\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})


@pytest.fixture
def agent(tmp_path):
    return wav(tmp_path / "agent.wav", tone(2.5, 1))


def m4a_file(path) -> str:
    """A real AAC-in-M4A file made with imageio-ffmpeg's ffmpeg, or one with M4A's magic bytes."""
    wav(path.with_suffix(".wav"), tone(1.0))
    try:
        import imageio_ffmpeg
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i",
                        str(path.with_suffix(".wav")), "-c:a", "aac", str(path)], check=True, timeout=60)
    except (ImportError, subprocess.SubprocessError, OSError):
        path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(4000))
    return str(path)


# ----------------------------------------------------------------------- 8: one-line errors
@pytest.mark.parametrize("kind", ["text", "empty_file", "random_bytes", "m4a"])
def test_unreadable_audio_is_one_line_naming_the_file(tmp_path, agent, kind):
    path = tmp_path / ("user.m4a" if kind == "m4a" else "user.wav")
    if kind == "text":
        path.write_text("this is not audio\n")
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        m4a_file(path)
    res = run("--user-audio", path, "--agent-audio", agent, "--out", tmp_path / "o.npy")
    line = assert_one_line_error(res, "--user-audio", path)
    assert "cannot read it as audio" in line and "WAV" in line
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("value, words", [(np.nan, "NaN"), (1e20, "magnitude")])
def test_nan_or_huge_audio_is_refused_naming_the_file(tmp_path, agent, value, words):
    audio = tone(2.5)
    audio[1000] = value
    path = wav(tmp_path / "user.wav", audio)
    res = run("--user-audio", path, "--agent-audio", agent, "--out", tmp_path / "o.npy")
    assert words in assert_one_line_error(res, "--user-audio", "user.wav")


@pytest.mark.parametrize("samples", [0, 300])
def test_empty_or_sub_frame_audio_fails(tmp_path, agent, samples):
    path = wav(tmp_path / "user.wav", tone(1.0)[:samples])
    res = run("--user-audio", path, "--agent-audio", agent, "--out", tmp_path / "o.npy")
    assert_one_line_error(res, "--user-audio", "user.wav")
    assert not (tmp_path / "o.npy").exists()


def test_missing_audio_file_names_it(tmp_path, agent):
    res = run("--user-audio", tmp_path / "nope.wav", "--agent-audio", agent, "--out", tmp_path / "o.npy")
    assert_one_line_error(res, "--user-audio", "nope.wav", code=2)


def _motion(frames, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal((frames, 56))).astype(np.float32)


@pytest.mark.parametrize("kind, words", [("txt", ".npy"), ("npz_keys", "'exp' and 'pose'"),
                                         ("nan", "NaN"), ("huge", "20"), ("truncated_npz", "numpy"),
                                         ("wrong_shape", "(T, 56)")])
def test_bad_motion_file_is_one_line_naming_it(tmp_path, agent, kind, words):
    m = _motion(63)
    path = tmp_path / {"txt": "m.txt", "npz_keys": "m.npz", "truncated_npz": "m.npz"}.get(kind, "m.npy")
    if kind == "txt":
        np.savetxt(path, m)
    elif kind == "npz_keys":
        np.savez(path, expression=m[:, :50])
    elif kind == "truncated_npz":
        np.savez(path, exp=m[:, :50], pose=m[:, 50:])
        path.write_bytes(path.read_bytes()[:200])
    else:
        if kind == "nan":
            m[5, 7] = np.nan
        elif kind == "huge":
            m[5, 7] = 1e6
        np.save(path, m[None] if kind == "wrong_shape" else m)
    res = run("--user-audio", agent, "--agent-audio", agent, "--user-motion", path, "--out", tmp_path / "o.npy")
    assert words in assert_one_line_error(res, "--user-motion", path.name)
    assert not list(tmp_path.glob("*o.npy*"))


def test_unwritable_out_fails_before_the_run_naming_it(tmp_path, agent):
    (tmp_path / "afile").write_text("x")
    res = run("--user-audio", agent, "--agent-audio", agent, "--out", tmp_path / "afile" / "o.npy")
    assert_one_line_error(res, "--out", "afile")
    (tmp_path / "d.npy").mkdir()
    res = run("--user-audio", agent, "--agent-audio", agent, "--out", tmp_path / "d.npy")
    assert "folder" in assert_one_line_error(res, "--out", "d.npy")
    assert "frames" not in res.output                 # nothing ran


def test_out_must_be_a_npy_name(tmp_path, agent):
    res = run("--user-audio", agent, "--agent-audio", agent, "--out", tmp_path / "outdir")
    assert ".npy" in assert_one_line_error(res, "--out", "outdir", code=2)
    assert not list(tmp_path.glob("outdir*"))


def test_warnings_are_one_plain_line(tmp_path, agent):
    user = wav(tmp_path / "user44.wav", tone(2.5)[:int(2.5 * 44100) // 3], rate=44100)
    res = run("--user-audio", user, "--agent-audio", agent, "--out", tmp_path / "o.npy")
    assert res.exit_code == 0, res.output
    assert "warning: audio file" in res.stderr and "44100 Hz" in res.stderr
    assert "UserWarning" not in res.stderr and "warnings.warn" not in res.stderr


def test_train_resume_of_a_refused_file_is_one_line(tmp_path):
    pytest.importorskip("torch")
    bad = tmp_path / "junk.pt"
    bad.write_text("not a checkpoint\n")
    res = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "t.pt"), "--resume", str(bad), "--steps", "1"])
    assert_one_line_error(res, "junk.pt")


def test_eval_without_scipy_says_which_extra(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    r = without(["scipy", "sklearn"], "timar-eval", "--pred", "p", "--gt", "g", tmp_path=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: timar-eval needs the Python package 'scipy', which is not installed: "
        'pip install -e ".[eval]" in the timar-sdk checkout']


def test_bench_random_preset_without_torch_says_which_extra(tmp_path):
    r = without(["torch"], "timar-bench", "--preset", "base", "--random-weights", tmp_path=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: timar-bench needs the Python package 'torch', which is not installed: "
        'pip install -e ".[export]" in the timar-sdk checkout']


def test_demo_with_only_the_runtime_skips_plot_and_video(tmp_path):
    r = without(["torch", "matplotlib", "PIL", "imageio_ffmpeg"], "timar-run", "--demo", "--out", "demo",
                "--demo-seconds", "2", tmp_path=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "plot skipped: matplotlib is not installed" in r.stdout
    assert ('preview video skipped: Pillow is needed to write a video: install the render extra: '
            'pip install -e ".[render]"') in r.stdout
    assert np.load(tmp_path / "demo" / "agent_motion.npy").shape == (50, 56)
    assert not (tmp_path / "demo" / "preview.mp4").exists()


# ------------------------------------------------------------------------- 9: no silent loss
def test_run_keeps_the_partial_turn_and_reports_cuts(tmp_path):
    agent_audio = tone(18.55, 1)
    agent, user = wav(tmp_path / "agent.wav", agent_audio[:int(4.55 * SR)]), wav(tmp_path / "user.wav", tone(3.2, 2))
    res = run("--user-audio", user, "--agent-audio", agent, "--out", tmp_path / "o.npy")
    assert res.exit_code == 0, res.output
    assert "agent audio 4.55 s, user audio 3.20 s: cut to 3.20 s" in res.stdout
    assert "the last 0.20 s is a partial turn" in res.stdout
    assert f"wrote {tmp_path / 'o.npy'}: 80 frames" in res.stdout
    agent = wav(tmp_path / "agent.wav", agent_audio)

    # the same audio for both: every frame of 18.55 s, what Session.feed + flush give
    res = run("--user-audio", agent, "--agent-audio", agent, "--out", tmp_path / "full.npy")
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "full.npy")
    session = Session()
    want = np.concatenate([session.feed(user_audio=agent_audio, agent_audio=agent_audio), session.flush()])
    assert got.shape == (463, 56) and want.shape == (463, 56)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_run_short_audio_and_short_motion_are_padded_and_said(tmp_path):
    a = tone(0.3)
    user, agent = wav(tmp_path / "u.wav", a), wav(tmp_path / "a.wav", tone(0.3, 1))
    res = run("--user-audio", user, "--agent-audio", agent, "--out", tmp_path / "o.npy")
    assert res.exit_code == 0, res.output
    assert "padded with silence" in res.stdout and np.load(tmp_path / "o.npy").shape == (7, 56)

    user, agent = wav(tmp_path / "u.wav", tone(2.5)), wav(tmp_path / "a.wav", tone(2.5, 1))
    np.save(tmp_path / "m.npy", _motion(10))
    res = run("--user-audio", user, "--agent-audio", agent, "--user-motion", tmp_path / "m.npy",
              "--out", tmp_path / "o.npy")
    assert res.exit_code == 0, res.output
    assert "user motion 0.40 s (10 frames), audio 2.50 s: the last motion frame is repeated for the " \
           "missing 52 frames" in res.stdout
    assert np.load(tmp_path / "o.npy").shape == (62, 56)

    np.save(tmp_path / "m.npy", _motion(80))
    res = run("--user-audio", user, "--agent-audio", agent, "--user-motion", tmp_path / "m.npy",
              "--out", tmp_path / "o.npy")
    assert res.exit_code == 0, res.output
    assert "user motion 3.20 s (80 frames), audio 2.50 s: motion cut to 63 frames" in res.stdout


# ---------------------------------------------------------------------- 10: progress shown
def test_bench_says_what_it_is_doing_on_stderr(tmp_path):
    res = CliRunner().invoke(bench_cmd, ["--turns", "1", "--no-torch", "--json"])
    assert res.exit_code == 0, res.output
    assert "timing 1 turns" in res.stderr and "session turns" in res.stderr
    assert json.loads(res.stdout)["session"]["turn"]["n"] == 1      # stdout stays JSON


@pytest.mark.slow
def test_demo_shows_render_progress_throttled_in_logs(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("PIL")
    res = run("--demo", "--out", tmp_path / "demo", "--demo-seconds", "1")
    assert res.exit_code == 0, res.output
    assert "rendering" in res.stdout and (tmp_path / "demo" / "preview.mp4").is_file()
    bar = [part for part in res.stderr.split("\r") if part.startswith("render preview.mp4")]
    # stderr is not a terminal here: the bar is drawn at its start and end, not ten times a second
    assert bar and len(bar) <= 3 and "25/25" in bar[-1], res.stderr


# ------------------------------------------------------------------------- 11: help, version
def _tools():
    return {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("timar-")}


def test_every_tool_documents_every_option_and_has_version():
    tools = _tools()
    assert {"timar-run", "timar-bench", "timar-eval", "timar-render", "timar-train"} <= set(tools)
    for name, ep in tools.items():
        if name == "timar-build":
            continue                                  # timar_sdk/export/tensorrt_build.py
        cmd = ep.load()
        undocumented = [p.name for p in cmd.params if isinstance(p, click.Option) and not p.help]
        assert not undocumented, (name, undocumented)
        res = CliRunner().invoke(cmd, ["--version"])
        assert res.exit_code == 0 and res.output.startswith(f"{name} (timar-sdk "), res.output


def test_json_means_the_same_in_every_tool():
    for name, ep in _tools().items():
        params = {p.name: p for p in ep.load().params}
        json_flags = [p for p in params.values() if "--json" in p.opts]
        assert all(p.is_flag for p in json_flags), name
        if "json_out" in params:
            assert not params["json_out"].is_flag and "--json-out" in params["json_out"].opts
    assert "--json-out" in [o for p in eval_cmd.params for o in p.opts]


def test_bench_sessions_compares_batched_with_one_at_a_time():
    res = CliRunner().invoke(bench_cmd, ["--sessions", "3", "--max-batch", "2", "--turns", "5", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["sessions"] == 3 and r["max_batch"] == 2 and r["rounds"] == 3
    for mode in ("alone", "batched"):
        m = r[mode]
        assert 0 < m["latency_p50_ms"] <= m["latency_p99_ms"] and m["turns_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["batched"]["turns_per_s"] / r["alone"]["turns_per_s"])
    assert r["state_mb_per_session"] == pytest.approx(6.31, abs=0.01)


def test_bench_streams_reports_push_and_turn_latency():
    res = CliRunner().invoke(bench_cmd, ["--streams", "2", "--seconds", "2", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["streams"] == 2 and r["turns"] == r["turns_expected"] == 2 + 2    # staggered: 2 + 2 turns
    assert r["push_ms"]["n"] == 2 * 100 and 0 < r["push_ms"]["p50"] <= r["push_ms"]["p99"]
    assert 0 < r["turn_latency_ms"]["p50"] <= r["turn_latency_ms"]["p99"]


@pytest.mark.parametrize("value, words", [("jaw=-1", "jaw"), ("mouth=0.1", "mouth"), ("jaw:0.1", "REGION=SECONDS")])
def test_export_refuses_bad_smoothing_naming_it(tmp_path, value, words):
    from timar_sdk.cli import export_cmd
    res = CliRunner().invoke(export_cmd, ["--out", str(tmp_path / "b"), "--smoothing", value])
    assert_one_line_error(res, "--smoothing", words, code=2)
    assert not (tmp_path / "b").exists()


def test_run_with_and_without_smoothing(tmp_path, agent):
    """--no-smoothing gives the exact model output; the default takes the bundle's smoothing."""
    user = tmp_path / "user.wav"
    wav(user, tone(2.0, seed=1))
    outs = {}
    for flags in ((), ("--no-smoothing",)):
        out = tmp_path / f"m{len(flags)}.npy"
        res = run("--user-audio", user, "--agent-audio", agent, "--out", out, *flags)
        assert res.exit_code == 0, res.output
        outs[flags] = np.load(out)
    from timar_sdk import Session
    expected_equal = not any(Session().smoothing.values())
    assert np.array_equal(outs[()], outs[("--no-smoothing",)]) == expected_equal
