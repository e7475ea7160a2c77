"""timar-generate and timar-eval on a small synthetic split with a random-weight tiny bundle."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from timar_sdk.audio import load_audio
from timar_sdk.conversation import run_conversation
from timar_sdk.data.dualtalk import motion_from_npz
from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.evaluate import eval_cmd, evaluate_dirs, generate_cmd, generate_split
from test_export import perturbed
from timar_sdk.export.onnx_export import export_bundle
from timar_sdk.metrics import aggregate, compute_metrics, published_scale
from timar_sdk.model.config import preset
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.session import Session

NAMES = ["syn00000_speaker1", "syn00000_speaker2", "syn00001_speaker1", "syn00001_speaker2"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    manifest = export_bundle(perturbed(Timar(preset("tiny"))), out)
    return out, manifest["context_turns"]


@pytest.fixture(scope="module")
def predicted(bundle, tmp_path_factory):
    """A synthetic split (2 clips x 6 s = 4 examples) and its predictions by timar-generate."""
    root = tmp_path_factory.mktemp("data")
    split = write_synthetic_corpus(root, n_clips=2, seconds=6) / "train"
    pred = root / "pred"
    res = CliRunner().invoke(generate_cmd, ["--data", str(split), "--out", str(pred),
                                            "--bundle", str(bundle[0]), "--threads", "1"])
    return split, pred, res


@pytest.fixture
def split(tmp_path):
    return write_synthetic_corpus(tmp_path / "data", n_clips=2, seconds=6) / "train"


def test_generate_writes_every_example_named_after_the_agent(bundle, predicted):
    split, pred, res = predicted
    assert res.exit_code == 0, res.output
    assert "wrote 4, skipped 0 already present, failed 0" in res.output
    assert sorted(p.stem for p in pred.glob("*.npy")) == NAMES
    assert not list(pred.glob(".*.tmp"))
    for name in NAMES:
        m = np.load(pred / f"{name}.npy")
        assert m.shape == (150, 56) and m.dtype == np.float32 and np.isfinite(m).all()
    # the agent is the file's speaker, the user its partner; a reused session equals a fresh one
    ua = load_audio(split / "syn00001_speaker1.wav")
    aa = load_audio(split / "syn00001_speaker2.wav")
    um = motion_from_npz(split / "syn00001_speaker1.npz")
    want = run_conversation(Session(bundle[0], backend="onnxruntime", seed=0, threads=1),
                            ua, um, aa, progress=False)
    np.testing.assert_allclose(np.load(pred / "syn00001_speaker2.npy"), want, atol=1e-5)
    assert not np.allclose(np.load(pred / "syn00001_speaker1.npy"), want, atol=1e-3)


def test_eval_end_to_end_matches_direct_metrics(predicted, tmp_path):
    split, pred, _ = predicted
    out = tmp_path / "m.json"
    res = CliRunner().invoke(eval_cmd, ["--pred", str(pred), "--gt", str(split),
                                        "--json-out", str(out), "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "EXP" in res.output and "P-FD" in res.output and "files: 4 scored" in res.output
    got = json.loads(out.read_text())
    assert got["files"] == 4 and got["skipped_nan"] == [] and got["errors"] == {}
    direct = []
    for name in NAMES:
        clip, s = name.rsplit("_speaker", 1)
        direct.append(compute_metrics(np.load(pred / f"{name}.npy"),
                                      motion_from_npz(split / f"{name}.npz"),
                                      motion_from_npz(split / f"{clip}_speaker{3 - int(s)}.npz")))
    want = aggregate(direct)
    assert got["metrics"].keys() == want.keys()
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-9, nan_ok=True), k
        assert got["published"][k] == pytest.approx(published_scale(want)[k], rel=1e-9, nan_ok=True)
    assert f"{published_scale(want)['mse_jaw']:.2f}" in res.output
    # one process gives the same numbers as two
    single = evaluate_dirs(pred, split, workers=1)
    assert single["metrics"] == pytest.approx(got["metrics"], rel=1e-12, nan_ok=True)


def test_second_run_skips_finished_files(bundle, predicted, tmp_path):
    split, first, _ = predicted
    pred = tmp_path / "pred"
    shutil.copytree(first, pred)
    (pred / "syn00000_speaker2.npy").unlink()
    kept = {n: (pred / f"{n}.npy").stat().st_mtime_ns for n in NAMES if n != "syn00000_speaker2"}
    res = CliRunner().invoke(generate_cmd, ["--data", str(split), "--out", str(pred),
                                            "--bundle", str(bundle[0]), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote 1, skipped 3 already present, failed 0" in res.output
    assert {n: (pred / f"{n}.npy").stat().st_mtime_ns for n in kept} == kept
    # the resumed file is what the uninterrupted run wrote (every file starts from the seed)
    np.testing.assert_allclose(np.load(pred / "syn00000_speaker2.npy"),
                               np.load(first / "syn00000_speaker2.npy"), atol=1e-6)
    again = generate_split(split, pred, bundle[0], threads=1, progress=False)
    assert again == {"written": 0, "skipped": 4, "failed": {}}


def test_other_settings_refuse_to_mix_into_a_prediction_folder(bundle, predicted, tmp_path):
    split, first, _ = predicted
    pred = tmp_path / "pred"
    shutil.copytree(first, pred)
    with pytest.raises(ValueError, match="other settings"):
        generate_split(split, pred, bundle[0], seed=1, progress=False)
    res = CliRunner().invoke(generate_cmd, ["--data", str(split), "--out", str(pred), "--bundle",
                                            str(bundle[0]), "--context-turns", "1"])
    assert res.exit_code == 1 and "other settings" in res.output


def test_bad_files_are_reported_and_the_rest_completes(bundle, split, tmp_path):
    (split / "syn00000_speaker2.npz").write_bytes(b"not a zip file at all")
    (split / "syn00001_speaker1.wav").write_bytes(b"RIFF garbage")
    pred = tmp_path / "pred"
    res = CliRunner().invoke(generate_cmd, ["--data", str(split), "--out", str(pred),
                                            "--bundle", str(bundle[0]), "--threads", "1"])
    assert res.exit_code == 1, res.output
    assert "wrote 1, skipped 0 already present, failed 3" in res.output
    # speaker2's npz is the user motion of syn00000_speaker1; the wav breaks both of clip 1
    for name in ("syn00000_speaker1", "syn00001_speaker1", "syn00001_speaker2"):
        assert f"FAILED {name}: " in res.output
    assert "FAILED syn00000_speaker1: syn00000_speaker2.npz: " in res.output
    assert "FAILED syn00001_speaker1: syn00001_speaker1.wav: " in res.output    # agent audio
    assert "FAILED syn00001_speaker2: syn00001_speaker1.wav: " in res.output    # user audio
    assert [p.name for p in pred.iterdir() if p.suffix != ".json"] == ["syn00000_speaker2.npy"]
    result = generate_split(split, pred, bundle[0], threads=1, progress=False)
    assert result["written"] == 0 and result["skipped"] == 1
    assert sorted(result["failed"]) == ["syn00000_speaker1", "syn00001_speaker1", "syn00001_speaker2"]


def test_context_turns_out_of_range_is_refused(bundle, split, tmp_path):
    path, w = bundle
    for bad in (str(w), "-1"):
        res = CliRunner().invoke(generate_cmd, ["--data", str(split), "--out", str(tmp_path / "p"),
                                                "--bundle", str(path), "--context-turns", bad])
        assert res.exit_code == 2, res.output
        assert "--context-turns" in res.output and f"expected 0..{w - 1}" in res.output
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match=rf"context_turns: expected 0\.\.{w - 1}"):
        generate_split(split, tmp_path / "p", path, context_turns=w, progress=False)


def test_context_turns_limits_the_history(bundle, predicted, tmp_path):
    split, full, _ = predicted
    res = generate_split(split, tmp_path / "n0", bundle[0], context_turns=0, threads=1,
                         progress=False)
    assert res == {"written": 4, "skipped": 0, "failed": {}}
    a, b = np.load(full / "syn00000_speaker1.npy"), np.load(tmp_path / "n0" / "syn00000_speaker1.npy")
    np.testing.assert_allclose(a[:25], b[:25], atol=1e-5)        # first turn: no history either way
    assert np.abs(a[25:] - b[25:]).max() > 1e-3


def test_eval_skips_nan_lists_missing_and_fails_on_errors(split, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(0)
    for name in NAMES:
        gt = motion_from_npz(split / f"{name}.npz")
        np.save(pred / f"{name}.npy", gt + 0.01 * rng.standard_normal(gt.shape).astype(np.float32))
    bad = np.load(pred / "syn00001_speaker1.npy")
    bad[10, 3] = np.nan
    np.save(pred / "syn00001_speaker1.npy", bad)
    np.save(pred / "syn00042_speaker1.npy", np.zeros((50, 56), np.float32))     # no ground truth
    out = tmp_path / "m.json"
    res = CliRunner().invoke(eval_cmd, ["--pred", str(pred), "--gt", str(split), "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    assert "files: 3 scored" in res.output
    assert "skipped (prediction contains NaN): 1: syn00001_speaker1" in res.output
    assert "syn00042_speaker1" in res.output
    got = json.loads(out.read_text())
    assert got["files"] == 3 and got["skipped_nan"] == ["syn00001_speaker1"]
    assert got["missing_gt"] == ["syn00042_speaker1"] and got["missing_pred"] == []
    assert sorted(got["per_file"]) == ["syn00000_speaker1", "syn00000_speaker2", "syn00001_speaker2"]
    assert got["metrics"]["mse_exp"] == pytest.approx(1e-4, rel=0.2)

    # a prediction of the wrong width is an error: listed, exit 1; a missing one is listed
    np.save(pred / "syn00000_speaker2.npy", np.zeros((150, 50), np.float32))
    (pred / "syn00000_speaker1.npy").unlink()
    res = CliRunner().invoke(eval_cmd, ["--pred", str(pred), "--gt", str(split)])
    assert res.exit_code == 1, res.output
    assert "FAILED syn00000_speaker2: ValueError: pred must have shape (T, 56)" in res.output
    assert "ground truth without a prediction: 1: syn00000_speaker1" in res.output
    assert "files: 1 scored" in res.output
