"""Preview rendering (issue 6): procedural head, FLAME LBS, MP4 with audio, CLI.

Real ffmpeg (imageio-ffmpeg's binary), no mocks. Small image sizes keep this file fast.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
import types

import numpy as np
import pytest

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
sf = pytest.importorskip("soundfile")

from timar_sdk.render import (  # noqa: E402
    FlameFileError,
    FlameHead,
    FlameModel,
    ProceduralHead,
    Renderer,
    load_motion,
    render_frame,
    render_video,
)
from timar_sdk.render.flame import load_flame_arrays  # noqa: E402
from timar_sdk.render.head import MOUTH_Y  # noqa: E402
from timar_sdk.render.raster import axis_angle_to_matrix  # noqa: E402

SR = 16_000
FPS = 25


# ------------------------------------------------------------------------------- helpers
def _ffmpeg():
    return imageio_ffmpeg.get_ffmpeg_exe()


def _decode_audio(path, rate=SR) -> np.ndarray:
    """Decode the file's audio stream to mono float samples at ``rate``."""
    out = subprocess.run([_ffmpeg(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le",
                          "-ac", "1", "-ar", str(rate), "-"], capture_output=True, check=True)
    return np.frombuffer(out.stdout, dtype=np.int16).astype(np.float32) / 32768.0


def _count_video_frames(path):
    """Decode every frame and count them; also return the frame shape."""
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    n = 0
    shape = None
    for raw in gen:
        n += 1
        shape = (meta["size"][1], meta["size"][0], len(raw) // (meta["size"][0] * meta["size"][1]))
    return n, shape


def _talking_motion(n=50):
    t = np.arange(n) / FPS
    m = np.zeros((n, 56), np.float32)
    m[:, 50] = np.clip(0.25 * np.sin(2 * np.pi * 2.0 * t), 0.0, None)  # jaw opens and closes
    m[:, 53] = 0.15 * np.sin(2 * np.pi * 0.8 * t)  # nods
    m[:, 54] = 0.25 * np.sin(2 * np.pi * 0.4 * t)  # turns
    m[:, 0] = np.sin(2 * np.pi * 1.5 * t)
    m[:, 2] = np.sin(2 * np.pi * 0.5 * t)
    return m


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def renderer(head):
    return Renderer(head, 192)


# ------------------------------------------------------------------------------- imports
def test_import_timar_sdk_does_not_import_renderer_or_torch():
    code = (
        "import sys, timar_sdk\n"
        "assert 'timar_sdk.render' not in sys.modules, 'renderer imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "before = set(sys.modules)\n"
        "import timar_sdk.render\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "extra = new - set(sys.stdlib_module_names) - {'timar_sdk', 'numpy'}\n"
        "assert not extra, f'import timar_sdk.render pulled in {sorted(extra)}'\n"
        "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ the video
def test_video_has_one_frame_per_motion_frame_and_synced_audio(tmp_path):
    n = 50
    motion = _talking_motion(n)
    # 2.6 s of audio for 2.0 s of motion: a click train, with a loud tone burst at exactly 1.0 s
    audio = np.zeros(int(2.6 * SR), np.float32)
    burst = slice(SR, SR + SR // 10)
    audio[burst] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR // 10) / SR)
    wav = tmp_path / "agent.wav"
    sf.write(str(wav), audio, SR)
    np.save(tmp_path / "agent.npy", motion)
    out = render_video(tmp_path / "agent.npy", tmp_path / "out.mp4", audio=wav, size=128,
                       progress=False)
    n_frames, shape = _count_video_frames(out)
    assert n_frames == n
    assert shape == (128, 128, 3)
    assert imageio_ffmpeg.count_frames_and_secs(str(out)) == (n, pytest.approx(n / FPS, abs=1e-6))
    pcm = _decode_audio(out)
    assert len(pcm) / SR == pytest.approx(n / FPS, abs=0.03)  # trimmed to the video
    env = np.abs(pcm)
    onset = np.flatnonzero(env > 0.2)[0] / SR
    assert onset == pytest.approx(1.0, abs=0.02)  # audio in sync with frame 25


def test_partner_video_side_by_side_with_mixed_audio(tmp_path):
    n = 50
    agent, user = _talking_motion(n), 0.5 * _talking_motion(40)  # shorter: holds its last frame
    a = np.zeros(int(2.0 * SR), np.float32)
    u = np.zeros(int(1.2 * SR), np.float32)  # shorter: padded with silence
    a[: SR // 2] = 0.3 * np.sin(2 * np.pi * 300 * np.arange(SR // 2) / SR)
    u[SR:] = 0.3 * np.sin(2 * np.pi * 500 * np.arange(int(0.2 * SR)) / SR)
    sf.write(str(tmp_path / "a.wav"), a, SR)
    sf.write(str(tmp_path / "u.wav"), u, SR)
    out = render_video(agent, tmp_path / "pair.mp4", audio=tmp_path / "a.wav", partner=user,
                       partner_audio=tmp_path / "u.wav", size=96, progress=False)
    n_frames, shape = _count_video_frames(out)
    assert n_frames == n and shape == (96, 192, 3)
    pcm = _decode_audio(out)
    assert len(pcm) / SR == pytest.approx(2.0, abs=0.03)
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    assert rms(pcm[: int(0.4 * SR)]) > 0.1  # the agent speaks first
    assert rms(pcm[int(1.05 * SR): int(1.15 * SR)]) > 0.1  # then the user
    assert rms(pcm[int(0.6 * SR): int(0.9 * SR)]) < 0.02  # silence between


# --------------------------------------------------------------------- what the head shows
def _project(head, points, size):
    xy, _ = head.camera.project(np.asarray(points, dtype=np.float64), size, size)
    return xy


def test_jaw_open_changes_mouth_not_upper_head(head, renderer):
    size = renderer.size
    closed = np.zeros(56)
    opened = closed.copy()
    opened[50] = 0.3  # jaw x axis: opening
    a, b = renderer.render(closed), renderer.render(opened)
    diff = np.abs(a.astype(int) - b.astype(int)).sum(axis=2)
    mx, my = _project(head, [[0.0, MOUTH_Y - 0.01, 0.09]], size)[0]
    r = int(0.06 * size)
    mouth = diff[int(my) - r:int(my) + r, int(mx) - r:int(mx) + r]
    assert (mouth > 30).mean() > 0.15  # a visible part of the mouth region changed
    # everything above the nose bridge (eyes, brows, forehead, hair) is untouched
    _, top_y = _project(head, [[0.0, 0.005, 0.09]], size)[0]
    assert np.array_equal(a[: int(top_y)], b[: int(top_y)])


@pytest.mark.parametrize("index,angle,min_change", [(54, 20.0, 0.05), (53, 20.0, 0.02)],
                         ids=["yaw", "pitch"])
def test_neck_rotation_moves_head_silhouette(head, renderer, index, angle, min_change):
    size = renderer.size
    base = np.zeros(56)
    turned = base.copy()
    turned[index] = np.radians(angle)
    bg = renderer.background  # float RGB with the static shoulders already drawn
    bg8 = np.clip(bg * 255 + 0.5, 0, 255).astype(np.uint8)

    def silhouette(img):
        return np.abs(img.astype(int) - bg8.astype(int)).sum(axis=2) > 12

    s0, s1 = silhouette(renderer.render(base)), silhouette(renderer.render(turned))
    # the head's outline in the upper half of the picture
    top = slice(0, size // 2)
    union = (s0[top] | s1[top]).sum()
    changed = (s0[top] ^ s1[top]).sum()
    assert union > 0.05 * size * size // 2
    assert changed / union > min_change
    # and the face moved the way the rotation says: the nose tip goes right for +yaw, down
    # for +pitch (FLAME: +x rotation tilts the face down)
    nose = np.array([[0.0, -0.033, 0.113]])
    tip = np.argmin(np.linalg.norm(head.rest - nose, axis=1))
    p0 = _project(head, head.pose(base)[tip][None], size)[0]
    p1 = _project(head, head.pose(turned)[tip][None], size)[0]
    if index == 54:
        assert p1[0] - p0[0] > 0.02 * size
    else:
        assert p1[1] - p0[1] > 0.02 * size


def test_expressions_move_brows_and_mouth(head, renderer):
    base = renderer.render(np.zeros(56))
    brows = np.zeros(56)
    brows[2] = 2.0
    smile = np.zeros(56)
    smile[1] = 2.0
    size = renderer.size
    _, brow_y = _project(head, [[0.0, 0.025, 0.09]], size)[0]
    _, mouth_y = _project(head, [[0.0, MOUTH_Y, 0.09]], size)[0]
    d_brows = np.abs(renderer.render(brows).astype(int) - base).sum(axis=2)
    d_smile = np.abs(renderer.render(smile).astype(int) - base).sum(axis=2)
    assert d_brows[int(brow_y) - 10:int(brow_y) + 10].max() > 60
    assert d_brows[int(mouth_y) + 5:].max() == 0  # raising the brows leaves the mouth alone
    assert d_smile[int(mouth_y) - 8:int(mouth_y) + 8].max() > 60


def test_mouth_calibration_flame_jaw_radians_and_lip_shapes():
    """Issue 15 item 4: FLAME jaw radians look real on the preview head (0..0.05 rad closed,
    0.1 lips apart, 0.3 wide open) and the lip channels of the training data show: rounding
    (exp 4) makes the opening narrower and rounder, closure (exp 5) holds the lips together."""
    from timar_sdk.render.head import MOUTH, TEETH, TONGUE
    rig = ProceduralHead()
    # Paint the mouth interior (cavity, teeth, tongue) pure green: visible green = open mouth.
    rig.albedo[np.isin(rig.part, (MOUTH, TEETH, TONGUE))] = (0.0, 1.0, 0.0)
    r = Renderer(rig, 192, antialias=False)

    def interior(**values):
        frame = np.zeros(56)
        for key, v in values.items():
            frame[{"jaw": 50, "round": 4, "press": 5}[key]] = v
        img = r.render_float(frame)
        m = (img[..., 1] > img[..., 0] + 0.15) & (img[..., 1] > img[..., 2] + 0.15)
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        return int(m.sum()), int(np.ptp(cols) + 1 if len(cols) else 0), \
            int(np.ptp(rows) + 1 if len(rows) else 0)

    for jaw in (0.0, 0.03, 0.05):
        assert interior(jaw=jaw)[0] == 0, f"jaw {jaw} rad should show a closed mouth"
    assert interior(jaw=0.06, press=1.6)[0] == 0      # b/p/m: lips pressed over an open jaw
    small, wide = interior(jaw=0.1), interior(jaw=0.3)
    assert small[0] > 0                                # lips apart
    assert wide[0] > 4 * small[0] and wide[2] >= 6     # wide open: a tall dark opening
    rounded = interior(jaw=0.1, round=1.6)
    assert rounded[1] < 0.7 * small[1] and rounded[2] > small[2]   # narrower, rounder


def test_render_frame_api(head):
    img = render_frame(np.zeros(56), size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not a blank picture
    with pytest.raises(ValueError, match="56"):
        render_frame(np.zeros(55), size=64)


def test_load_motion_formats(tmp_path):
    exp = np.random.default_rng(0).normal(size=(7, 50)).astype(np.float32)
    pose = np.arange(42, dtype=np.float32).reshape(7, 6)
    np.savez(tmp_path / "dualtalk.npz", exp=exp, pose=pose, shape=np.zeros((7, 100)))
    m = load_motion(tmp_path / "dualtalk.npz")
    assert m.shape == (7, 56)
    np.testing.assert_array_equal(m[:, :50], exp)
    np.testing.assert_array_equal(m[:, 50:53], pose[:, 3:6])  # jaw
    np.testing.assert_array_equal(m[:, 53:56], pose[:, 0:3])  # neck/global
    with pytest.raises(ValueError, match=r"\(T, 56\)"):
        load_motion(np.zeros((5, 12)))
    with pytest.raises(ValueError, match="NaN"):
        load_motion(np.full((2, 56), np.nan))


# ---------------------------------------------------------------------------------- FLAME
N_SHAPE, N_EXPR = 300, 100
PARENTS_ROOT = 4294967295  # FLAME's kintree_table marks the root's parent with uint32 max


def _synthetic_flame(seed=0, posedirs_scale=0.0):
    """A small mesh with FLAME's structure: 5 joints (global, neck, jaw, eyes), shapedirs
    (V, 3, 300 shape + 100 expression), posedirs (V, 3, 36), dense J_regressor."""
    rng = np.random.default_rng(seed)
    n_lat, n_lon = 9, 12
    th = np.linspace(0.25, np.pi - 0.25, n_lat)
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    ring = np.stack([0.08 * np.sin(T) * np.sin(P), 0.1 * np.cos(T), 0.09 * np.sin(T) * np.cos(P)],
                    -1).reshape(-1, 3)
    verts = np.concatenate([ring, [[0, 0.1, 0], [0, -0.1, 0]]])
    faces = []
    for r in range(n_lat - 1):
        for c in range(n_lon):
            a, b = r * n_lon + c, r * n_lon + (c + 1) % n_lon
            d, e = a + n_lon, b + n_lon
            faces += [[a, d, b], [b, d, e]]
    top, bot = len(ring), len(ring) + 1
    for c in range(n_lon):
        faces.append([top, c, (c + 1) % n_lon])
        faces.append([bot, (n_lat - 1) * n_lon + (c + 1) % n_lon, (n_lat - 1) * n_lon + c])
    nv = len(verts)
    weights = np.zeros((nv, 5))
    y, z = verts[:, 1], verts[:, 2]
    jaw = (y < -0.04) & (z > 0.0)
    band = (y < -0.01) & (y >= -0.04) & (z > 0.0)
    weights[jaw, 2] = 1.0
    weights[band, 2] = 0.5
    weights[band, 1] = 0.5
    rest = ~(jaw | band)
    weights[rest & (y < -0.06), 0] = 1.0  # bottom: global only
    weights[rest & (y >= -0.06), 1] = 1.0  # the rest: neck
    weights[0, :] = [0, 0, 0, 1, 0]  # one vertex on each eye joint
    weights[1, :] = [0, 0, 0, 0, 1]
    jreg = np.zeros((5, nv))
    jreg[0] = 1.0 / nv
    jreg[1, np.argsort(y)[:12]] = 1.0 / 12  # neck: mean of the lowest vertices
    jreg[2, [np.argmin(np.abs(y + 0.02) + np.abs(verts[:, 0] - 0.08)),
             np.argmin(np.abs(y + 0.02) + np.abs(verts[:, 0] + 0.08))]] = 0.5
    jreg[3, 0] = 1.0
    jreg[4, 1] = 1.0
    return {
        "v_template": verts,
        "f": np.asarray(faces, dtype=np.uint32),
        "shapedirs": rng.normal(scale=1e-3, size=(nv, 3, N_SHAPE + N_EXPR)),
        "posedirs": rng.normal(scale=posedirs_scale, size=(nv, 3, 36)),
        "J_regressor": jreg,
        "kintree_table": np.array([[PARENTS_ROOT, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
    }


def _rotate_about(points, rot, center):
    return (points - center) @ rot.T + center


def test_flame_jaw_rotation_moves_only_jaw_skinned_vertices(tmp_path):
    arrays = _synthetic_flame()
    np.savez(tmp_path / "flame.npz", **arrays)
    model = FlameModel.load(tmp_path / "flame.npz")
    v0 = model.vertices()
    np.testing.assert_allclose(v0, arrays["v_template"], atol=1e-12)  # rest pose = template
    jaw_aa = np.array([0.3, 0.05, -0.02])
    v1 = model.vertices(jaw=jaw_aa)
    w = arrays["weights"][:, 2]
    moved = np.linalg.norm(v1 - v0, axis=1) > 1e-9
    assert np.array_equal(moved, w > 0)  # exactly the vertices skinned to the jaw
    j_jaw = arrays["J_regressor"][2] @ arrays["v_template"]
    jaw_rotated = _rotate_about(v0, axis_angle_to_matrix(jaw_aa), j_jaw)
    expected = (1 - w)[:, None] * v0 + w[:, None] * jaw_rotated
    np.testing.assert_allclose(v1, expected, atol=1e-12)


def test_flame_neck_chain_expression_and_pose_correctives(tmp_path):
    arrays = _synthetic_flame(posedirs_scale=1e-3)
    np.savez(tmp_path / "flame.npz", **arrays)
    model = FlameModel.load(tmp_path / "flame.npz")
    tmpl, wts, jreg = arrays["v_template"], arrays["weights"], arrays["J_regressor"]
    # expression: exactly the expression part of shapedirs (components 300..349)
    e = np.linspace(-1, 1, 50)
    shaped = tmpl + arrays["shapedirs"][:, :, N_SHAPE:N_SHAPE + 50] @ e
    np.testing.assert_allclose(model.vertices(expression=e), shaped, atol=1e-12)
    # neck + jaw: the jaw hangs off the neck; pose correctives come from (R - I) of joints 1..4
    neck_aa, jaw_aa = np.array([0.0, 0.35, 0.0]), np.array([0.25, 0.0, 0.0])
    rn, rj = axis_angle_to_matrix(neck_aa), axis_angle_to_matrix(jaw_aa)
    feat = np.concatenate([(rn - np.eye(3)).ravel(), (rj - np.eye(3)).ravel(), np.zeros(18)])
    posed = shaped + arrays["posedirs"].reshape(-1, 36).dot(feat).reshape(-1, 3)
    joints = jreg @ shaped
    head_only = _rotate_about(posed, rn, joints[1])
    jaw_world = _rotate_about(_rotate_about(posed, rj, joints[2]), rn, joints[1])
    w_head = wts[:, 1] + wts[:, 3] + wts[:, 4]
    expected = (wts[:, 0][:, None] * posed + w_head[:, None] * head_only
                + wts[:, 2][:, None] * jaw_world)
    # eye vertices (identity eye joints) follow the neck like head vertices
    got = model.vertices(expression=e, jaw=jaw_aa, neck=neck_aa)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    global_only = wts[:, 0] == 1
    assert global_only.any()
    np.testing.assert_allclose(got[global_only], posed[global_only], atol=1e-12)


def test_flame_head_renders_and_maps_the_motion_vector(tmp_path):
    arrays = _synthetic_flame()
    np.savez(tmp_path / "flame.npz", **arrays)
    rig = FlameHead(tmp_path / "flame.npz")
    frame = np.zeros(56)
    frame[:50] = 0.5
    frame[50:53] = [0.2, 0, 0]
    frame[53:56] = [0, 0.3, 0]
    expected = rig.model.vertices(expression=frame[:50], jaw=frame[50:53], neck=frame[53:56])
    np.testing.assert_allclose(rig.pose(frame), expected)
    img = render_frame(frame, size=64, mesh=rig)
    base = render_frame(np.zeros(56), size=64, mesh=rig)
    assert img.std() > 5 and np.abs(img.astype(int) - base).max() > 30


def test_flame_file_missing_keys_is_refused_with_their_names(tmp_path):
    arrays = _synthetic_flame()
    del arrays["posedirs"], arrays["weights"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FlameFileError, match=r"missing keys posedirs, weights"):
        FlameModel.load(tmp_path / "bad.npz")


def test_flame_pickle_loads_numpy_and_chumpy_style_arrays_without_running_code(tmp_path):
    arrays = _synthetic_flame()
    # 1. a pickle of plain numpy arrays
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump(arrays, fh, protocol=2)
    loaded = load_flame_arrays(tmp_path / "plain.pkl")
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
    # 2. FLAME's official layout: arrays inside chumpy Ch objects, J_regressor a scipy sparse
    #    matrix. A stand-in "chumpy.ch.Ch" class is pickled, then removed before loading, so
    #    loading must not need (or import) chumpy.
    sp = pytest.importorskip("scipy.sparse")
    fake_pkg, fake_mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
            self._dirty_vars = set()

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    fake_mod.Ch = Ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = fake_pkg, fake_mod
    try:
        official = {k: (Ch(v) if k in ("v_template", "shapedirs", "posedirs", "weights") else v)
                    for k, v in arrays.items()}
        official["J_regressor"] = sp.csc_matrix(arrays["J_regressor"])
        official["bs_style"] = "lbs"
        with open(tmp_path / "official.pkl", "wb") as fh:
            pickle.dump(official, fh, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    loaded = load_flame_arrays(tmp_path / "official.pkl")
    for k, v in arrays.items():
        np.testing.assert_allclose(loaded[k], v)
    # 3. anything else is refused before it runs
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({**arrays, "extra": Evil()}, fh, protocol=2)
    with pytest.raises(FlameFileError, match="refusing to load"):
        load_flame_arrays(tmp_path / "evil.pkl")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ CLI
def test_cli_render_with_partner_and_flame(tmp_path):
    from click.testing import CliRunner

    from timar_sdk.render.cli import render_cmd

    arrays = _synthetic_flame()
    np.savez(tmp_path / "flame.npz", **arrays)
    np.save(tmp_path / "a.npy", _talking_motion(12))
    np.save(tmp_path / "u.npy", _talking_motion(12))
    sf.write(str(tmp_path / "a.wav"), np.zeros(SR // 2, np.float32), SR)
    runner = CliRunner()
    res = runner.invoke(render_cmd, [str(tmp_path / "a.npy"), "--audio", str(tmp_path / "a.wav"),
                                     "--partner", str(tmp_path / "u.npy"), "--out",
                                     str(tmp_path / "o.mp4"), "--size", "64", "--flame",
                                     str(tmp_path / "flame.npz"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert _count_video_frames(tmp_path / "o.mp4") == (12, (64, 128, 3))
    del arrays["J_regressor"]
    np.savez(tmp_path / "bad.npz", **arrays)
    res = runner.invoke(render_cmd, [str(tmp_path / "a.npy"), "--out", str(tmp_path / "x.mp4"),
                                     "--flame", str(tmp_path / "bad.npz"), "--quiet"])
    assert res.exit_code != 0 and "missing keys J_regressor" in res.output
