"""Tests of audio input, the synthetic conversation generator and the DualTalk loader."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import soundfile as sf

from timar_sdk.audio import load_audio, to_float32
from timar_sdk.data.dualtalk import (WindowDataset, compute_motion_stats, list_examples,
                                     load_example, motion_from_npz, motion_to_npz_dict,
                                     normalize_audio)
from timar_sdk.data.synthetic import generate_conversation, write_synthetic_corpus

SR, FPS = 16000, 25


def _write_clip(folder, clip="c0", audio_s=3.0, motion_s=3.0, seed=0):
    """A hand-made clip: two noise WAVs and two random-motion npz files. Returns the paths."""
    rng = np.random.default_rng(seed)
    paths = {}
    for s in (1, 2):
        wav, npz = folder / f"{clip}_speaker{s}.wav", folder / f"{clip}_speaker{s}.npz"
        sf.write(wav, (0.1 * rng.standard_normal(int(audio_s * SR))).astype(np.float32), SR,
                 subtype="FLOAT")
        t = int(round(motion_s * FPS))
        np.savez(npz, exp=rng.standard_normal((t, 50)).astype(np.float32),
                 pose=0.1 * rng.standard_normal((t, 6)).astype(np.float32))
        paths[s] = (wav, npz)
    return paths


def _agent1(folder):
    """The example of the first clip whose agent is speaker 1."""
    return next(e for e in list_examples(folder) if e.agent == 1)


def _envelope(audio):
    """RMS per 40 ms motion frame."""
    return np.sqrt((audio.reshape(-1, SR // FPS).astype(np.float64) ** 2).mean(axis=1))


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------- audio

def test_to_float32_int16_scaling_and_float():
    x = np.array([-32768, 0, 16384, 32767], np.int16)
    np.testing.assert_array_equal(to_float32(x), [-1.0, 0.0, 0.5, 32767 / 32768])
    assert to_float32(x).dtype == np.float32
    y = to_float32(np.array([0.25, -0.5], np.float64))
    assert y.dtype == np.float32 and y.tolist() == [0.25, -0.5]


@pytest.mark.parametrize("bad, expected", [
    ([0.1, 0.2], "numpy array"),
    (np.zeros(4, np.int32), "dtype"),
    (np.zeros((2, 4), np.float32), "1-D"),
    (np.zeros(0, np.float32), "at least one sample"),
    (np.array([0.0, np.nan], np.float32), "finite"),
    (np.array([0.0, np.inf]), "finite"),
    (np.array([0.0, 1e300]), "finite"),          # overflows to Inf in float32
])
def test_to_float32_errors_name_the_argument(bad, expected):
    with pytest.raises(ValueError, match=f"^mic: .*{expected}"):
        to_float32(bad, name="mic")


def test_load_audio_int16_file_and_stereo(tmp_path):
    pcm = np.array([0, 16384, -32768, 8192] * 100, np.int16)
    sf.write(tmp_path / "a.wav", np.stack([pcm, pcm // 2], axis=1), SR, subtype="PCM_16")
    out = load_audio(tmp_path / "a.wav")
    assert out.dtype == np.float32 and out.shape == (400,)
    np.testing.assert_allclose(out[:4], [0.0, 0.375, -0.75, 0.1875])   # mean of the channels


# ----------------------------------------------------------------------------- synthetic

def test_generator_is_deterministic_from_its_seed():
    a, b, c = (generate_conversation(3.0, s) for s in (7, 7, 8))
    assert sorted(a) == ["audio1", "audio2", "motion1", "motion2"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])
        assert a[k].dtype == np.float32 and np.isfinite(a[k]).all()
    assert a["audio1"].shape == (48000,) and a["motion1"].shape == (75, 56)
    assert np.abs(a["audio1"]).max() < 1.0
    assert 0.0 <= a["motion1"][:, 50].min() and a["motion1"][:, 50].max() <= 0.3


def test_synthetic_motion_has_the_promised_dependencies():
    conv = generate_conversation(40.0, seed=0)
    for s in (1, 2):
        own, partner = _envelope(conv[f"audio{s}"]), _envelope(conv[f"audio{3 - s}"])
        m = conv[f"motion{s}"].astype(np.float64)
        # The jaw follows the own speech envelope, not the partner's.
        assert _corr(own, m[:, 50]) > 0.7
        assert _corr(partner, m[:, 50]) < 0.1
        # Leading expressions follow own loudness; expression 3 the partner's loudness.
        smooth = np.ones(10) / 10
        assert _corr(np.convolve(own, smooth, "same"), m[:, 1]) > 0.4
        assert _corr(np.convolve(partner, smooth, "same"), m[:, 3]) > 0.3
        # The listener nods after the partner's pauses: more neck-pitch motion in the second
        # after the partner goes quiet than at other times when the agent is quiet too.
        partner_on = np.convolve(partner > 0.01, np.ones(5), "same") > 0
        own_quiet = np.convolve(own > 0.01, np.ones(5), "same") == 0
        after = np.zeros(len(m), bool)
        for o in np.flatnonzero(partner_on[:-1] & ~partner_on[1:]):
            after[o:o + FPS] = True
        speed = np.abs(np.diff(m[:, 53], prepend=m[0, 53]))
        assert speed[after & own_quiet].mean() > 1.25 * speed[~after & own_quiet].mean()


def test_synthetic_corpus_round_trip(tmp_path):
    root = write_synthetic_corpus(tmp_path, 0, seconds=4.0, seed=3,
                                  splits={"train": 2, "val": 1})
    assert root == tmp_path
    assert sorted(p.name for p in (root / "val").iterdir()) == [
        "syn00002_speaker1.npz", "syn00002_speaker1.wav",
        "syn00002_speaker2.npz", "syn00002_speaker2.wav"]
    info = sf.info(root / "train" / "syn00000_speaker1.wav")
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "FLOAT")
    with np.load(root / "train" / "syn00001_speaker2.npz") as f:
        assert {k: f[k].shape for k in f.files} == {
            "exp": (100, 50), "pose": (100, 6), "shape": (100, 100), "tex": (100, 50),
            "cam": (100, 3), "light": (100, 27)}
        exp, pose = f["exp"], f["pose"]

    examples = list_examples(root / "train")
    assert [(e.name, e.user_npz.stem) for e in examples] == [
        ("syn00000_speaker1", "syn00000_speaker2"), ("syn00000_speaker2", "syn00000_speaker1"),
        ("syn00001_speaker1", "syn00001_speaker2"), ("syn00001_speaker2", "syn00001_speaker1")]
    loaded = [load_example(e) for e in examples]
    for d in loaded:
        assert d["turns"] == 4
        assert d["user_audio"].shape == d["agent_audio"].shape == (4 * SR,)
        assert d["user_motion"].shape == d["agent_motion"].shape == (100, 56)
    a, b = loaded[2], loaded[3]            # the same clip with the roles swapped
    assert b["name"] == "syn00001_speaker2"
    np.testing.assert_array_equal(a["agent_audio"], b["user_audio"])
    np.testing.assert_array_equal(a["user_motion"], b["agent_motion"])
    np.testing.assert_array_equal(b["agent_motion"][:, :50], exp)
    np.testing.assert_array_equal(b["agent_motion"][:, 50:53], pose[:, 3:6])
    np.testing.assert_array_equal(b["agent_motion"][:, 53:56], pose[:, 0:3])
    # The writer puts the jaw where the loader expects it: column 50 follows the agent's voice.
    env = np.concatenate([_envelope(d["agent_audio"]) for d in loaded])
    jaw = np.concatenate([d["agent_motion"][:, 50] for d in loaded])
    assert _corr(env, jaw) > 0.8 and 0.0 <= jaw.min() and jaw.max() <= 0.3
    # Splits use their own seeds: the val clip differs from every train clip.
    val = load_example(list_examples(root / "val")[0])
    assert all(not np.allclose(val["agent_motion"], d["agent_motion"]) for d in loaded)


# ----------------------------------------------------------------------------- loader

def test_npz_keys_map_to_the_sdk_layout(tmp_path):
    _write_clip(tmp_path, audio_s=2.0, motion_s=2.0)
    t = 50
    exp = np.tile(np.arange(50, dtype=np.float32), (t, 1))
    pose = np.tile(np.array([100, 101, 102, 200, 201, 202], np.float32), (t, 1))  # neck, jaw
    np.savez(tmp_path / "c0_speaker1.npz", exp=exp, pose=pose, shape=np.zeros((t, 100)))
    m = load_example(_agent1(tmp_path))["agent_motion"]
    np.testing.assert_array_equal(m[0, :50], np.arange(50))
    np.testing.assert_array_equal(m[0, 50:53], [200, 201, 202])   # jaw = pose[:, 3:6]
    np.testing.assert_array_equal(m[0, 53:56], [100, 101, 102])   # neck = pose[:, 0:3]
    back = motion_to_npz_dict(m)
    np.testing.assert_array_equal(back["exp"], exp)
    np.testing.assert_array_equal(back["pose"], pose)
    np.testing.assert_array_equal(motion_from_npz(back), m)


def test_missing_partner_file_is_named(tmp_path):
    paths = _write_clip(tmp_path)
    paths[2][1].unlink()
    with pytest.raises(ValueError, match=re.escape(str(paths[2][1]))):
        list_examples(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no <clip>"):
        list_examples(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        list_examples(tmp_path / "absent")


def test_wrong_sample_rate_is_resampled_with_a_warning(tmp_path):
    paths = _write_clip(tmp_path, audio_s=3.0, motion_s=3.0)
    t = np.arange(3 * 22050) / 22050
    sf.write(paths[1][0], (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050,
             subtype="FLOAT")
    with pytest.warns(UserWarning, match=re.escape(str(paths[1][0])) + ".*22050 Hz.*16000 Hz"):
        d = load_example(_agent1(tmp_path))
    assert d["turns"] == 3 and d["agent_audio"].shape == (3 * SR,)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(3 * SR) / SR)
    assert np.abs(d["agent_audio"] - expected)[1000:-1000].max() < 1e-2


def test_stereo_is_downmixed(tmp_path):
    paths = _write_clip(tmp_path, audio_s=2.0, motion_s=2.0)
    rng = np.random.default_rng(1)
    left = (0.1 * rng.standard_normal(2 * SR)).astype(np.float32)
    right = np.full(2 * SR, 0.3, np.float32)
    sf.write(paths[1][0], np.stack([left, right], axis=1), SR, subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = load_example(_agent1(tmp_path))
    np.testing.assert_allclose(d["agent_audio"], (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("what", ["audio", "motion"])
def test_nan_is_an_error_naming_the_file(tmp_path, what):
    paths = _write_clip(tmp_path)
    if what == "audio":
        bad = paths[2][0]
        x = np.zeros(3 * SR, np.float32)
        x[100] = np.nan
        sf.write(bad, x, SR, subtype="FLOAT")
    else:
        bad = paths[2][1]
        with np.load(bad) as f:
            exp, pose = f["exp"].copy(), f["pose"]
        exp[10, 3] = np.inf
        np.savez(bad, exp=exp, pose=pose)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*NaN or Inf"):
        load_example(_agent1(tmp_path))


def test_length_mismatch(tmp_path):
    paths = _write_clip(tmp_path, audio_s=5.0, motion_s=3.0)
    with pytest.raises(ValueError) as err:
        load_example(_agent1(tmp_path))
    msg = str(err.value)
    assert "5.00 s" in msg and "3.00 s" in msg and ".wav" in msg and ".npz" in msg
    assert any(str(p) in msg for p in (paths[1][0], paths[2][0]))
    # Under a second apart: cropped to whole turns of the shortest stream.
    _write_clip(tmp_path, clip="c1", audio_s=3.5, motion_s=3.96)
    d = load_example(next(e for e in list_examples(tmp_path) if e.clip == "c1"))
    assert d["turns"] == 3
    assert d["agent_audio"].shape == (3 * SR,) and d["agent_motion"].shape == (75, 56)
    with pytest.raises(ValueError, match="shorter than one turn"):
        _write_clip(tmp_path, clip="c2", audio_s=0.5, motion_s=0.5)
        load_example(next(e for e in list_examples(tmp_path) if e.clip == "c2"))


@pytest.mark.parametrize("arrays, expected", [
    ({"exp": np.zeros((75, 50))}, "missing key.*pose"),
    ({"exp": np.zeros((75, 40)), "pose": np.zeros((75, 6))}, r"exp \(75, 40\)"),
    ({"exp": np.zeros((75, 50)), "pose": np.zeros((75, 3))}, r"pose \(75, 3\)"),
    ({"exp": np.zeros((75, 50)), "pose": np.zeros((70, 6))}, "75 frames but pose has 70"),
])
def test_bad_npz_is_an_error_naming_the_file(tmp_path, arrays, expected):
    paths = _write_clip(tmp_path)
    np.savez(paths[1][1], **arrays)
    with pytest.raises(ValueError, match=re.escape(str(paths[1][1])) + ".*" + expected):
        load_example(_agent1(tmp_path))


# ----------------------------------------------------------------------------- windows

def _fake_example(turns, s=16, f=FPS, seed=0, name="x"):
    rng = np.random.default_rng(seed)
    return {"user_audio": rng.standard_normal(turns * s).astype(np.float32) * 0.1 + 0.05,
            "agent_audio": rng.standard_normal(turns * s).astype(np.float32) * 0.2,
            "user_motion": rng.standard_normal((turns * f, 56)).astype(np.float32),
            "agent_motion": rng.standard_normal((turns * f, 56)).astype(np.float32),
            "turns": turns, "name": name}


def test_window_dataset_shapes_count_and_content():
    examples = [_fake_example(20, seed=0, name="a"), _fake_example(5, seed=1, name="short"),
                _fake_example(13, seed=2, name="b")]
    ds = WindowDataset(examples, turns_per_window=12, stride_turns=4)
    assert len(ds) == 3 + 1                     # starts 0, 4, 8 of "a"; 0 of "b"; "short" skipped
    assert [ds.window_info(i) for i in range(4)] == [("a", 0), ("a", 4), ("a", 8), ("b", 0)]
    item = ds[1]
    assert {k: v.shape for k, v in item.items()} == {
        "user_audio": (12, 16), "agent_audio": (12, 16),
        "user_motion": (12, 25, 56), "agent_motion": (12, 25, 56)}
    assert all(v.dtype == np.float32 for v in item.values())
    np.testing.assert_array_equal(item["agent_motion"].reshape(-1, 56),
                                  examples[0]["agent_motion"][4 * 25:16 * 25])
    # Audio is normalised over the whole example before cutting.
    full = normalize_audio(examples[0]["user_audio"])
    assert abs(full.mean()) < 1e-6 and abs(full.std() - 1) < 1e-3
    np.testing.assert_allclose(item["user_audio"].reshape(-1), full[4 * 16:16 * 16], atol=1e-6)
    raw = WindowDataset(examples, turns_per_window=12, stride_turns=4, normalize_audio=False)
    np.testing.assert_array_equal(raw[1]["user_audio"].reshape(-1),
                                  examples[0]["user_audio"][4 * 16:16 * 16])
    assert len(list(ds)) == 4 and len(WindowDataset(examples, turns_per_window=12)) == 2
    with pytest.raises(IndexError):
        ds[4]


def test_compute_motion_stats():
    examples = [_fake_example(3, seed=0), _fake_example(2, seed=1)]
    examples[0]["agent_motion"][:, 7] = 2.0
    examples[1]["agent_motion"][:, 7] = 2.0
    mean, std = compute_motion_stats(examples)
    frames = np.concatenate([e["agent_motion"] for e in examples]).astype(np.float64)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (56,)
    np.testing.assert_allclose(mean, frames.mean(0), atol=1e-6)
    keep = np.arange(56) != 7
    np.testing.assert_allclose(std[keep], frames.std(0)[keep], rtol=1e-5)
    assert mean[7] == 2.0 and std[7] == np.float32(1e-3)
