"""TensorRT backend: the cache-commit copy layout and the refusals (everywhere); parity with ONNX
Runtime and snapshots (only where `tensorrt`, pycuda and a CUDA GPU are present)."""
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from test_export import perturbed
from timar_sdk import Session
from timar_sdk.export import tensorrt_build as tb
from timar_sdk.export.onnx_export import export_bundle
from timar_sdk.model.config import preset
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.backends import HostCacheBackend
from timar_sdk.runtime.bundle import sha256_of, write_manifest
from timar_sdk.runtime import tensorrt_backend
from timar_sdk.runtime.tensorrt_backend import FLOAT_BYTES, slot_copy


def _tensorrt_missing():
    try:
        tb.check_tensorrt_available()
    except tb.TensorRTUnavailable as e:
        return str(e)
    return None


MISSING = _tensorrt_missing()
needs_tensorrt = pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT, pycuda and a CUDA GPU: {MISSING}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random bundle without engines."""
    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("trt") / "bundle"
    export_bundle(perturbed(Timar(preset("tiny")), seed=2), out)
    return out


def with_foreign_engines(bundle, dst):
    """A copy of the bundle whose only engine set was built for another GPU and TensorRT."""
    shutil.copytree(bundle, dst)
    plan = dst / "engines" / "imaginary-gpu-trt0.0" / "denoiser.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"not an engine")
    manifest = json.loads((dst / "manifest.json").read_text())
    files = {"denoiser": {"file": plan.relative_to(dst).as_posix(), "sha256": sha256_of(plan)}}
    manifest["engines"] = [{"dir": plan.parent.relative_to(dst).as_posix(), "gpu": "Imaginary GPU",
                            "tensorrt": "0.0", "files": files}]
    write_manifest(dst, manifest)
    return dst


# ---- everywhere ------------------------------------------------------------------------------
def memcpy3d(src: np.ndarray, dst: np.ndarray, f: dict) -> None:
    """CUDA's pitched 3D copy (CUDA_MEMCPY3D between device pointers) on byte arrays: byte x of
    row y of slice z sits at base + (z * height + y) * pitch + x."""
    for z in range(f["depth"]):
        for y in range(f["height"]):
            s = ((f["src_z"] + z) * f["src_height"] + f["src_y"] + y) * f["src_pitch"] + f["src_x_in_bytes"]
            d = ((f["dst_z"] + z) * f["dst_height"] + f["dst_y"] + y) * f["dst_pitch"] + f["dst_x_in_bytes"]
            dst[d:d + f["width_in_bytes"]] = src[s:s + f["width_in_bytes"]]


@pytest.mark.parametrize("rows,batch", [(1, 1), (2, 2), (2, 1)])
def test_slot_copy_writes_what_the_host_commit_writes(rows, batch):
    layers, heads, p, slots, hd = 3, 2, 5, 4, 3
    rng = np.random.default_rng(rows * 10 + batch)
    host = HostCacheBackend()
    host.tokens_per_slot = p
    cache = rng.standard_normal((layers, 2, rows, heads, slots * p, hd)).astype(np.float32)
    for slot in range(slots):
        present = rng.standard_normal((layers, 2, batch, heads, p, hd)).astype(np.float32)
        device = cache.view(np.uint8).reshape(-1).copy()
        for row in range(rows):
            f = slot_copy(cache.shape, p, batch, slot, row)
            assert f["width_in_bytes"] <= min(f["src_pitch"], f["dst_pitch"])
            memcpy3d(present.view(np.uint8).reshape(-1), device, f)
        cache = host.commit(cache, present, slot)
        np.testing.assert_array_equal(device.view(np.float32).reshape(cache.shape), cache)
    assert FLOAT_BYTES == np.dtype(np.float32).itemsize


def test_tensorrt_refused_with_what_is_missing_and_auto_falls_back(bundle, tmp_path):
    foreign = with_foreign_engines(bundle, tmp_path / "foreign")
    for b in (bundle, foreign):
        with pytest.raises(ValueError, match="backend: 'tensorrt' unavailable: ") as e:
            Session(b, backend="tensorrt")
        expected = MISSING if MISSING is not None else "no TensorRT engines for "
        assert expected in str(e.value) and "\n" not in str(e.value)
        s = Session(b, backend="auto")                       # engines for another GPU: ONNX Runtime
        assert s.backend.name == "onnxruntime"
        assert s.step(np.zeros(16000, np.float32), None, np.zeros(16000, np.float32)).shape == (25, 56)


def test_no_engines_for_this_gpu_names_both_and_how_to_build(bundle, tmp_path, monkeypatch):
    """With TensorRT and a GPU faked: the engine-set lookup uses timar-build's GPU name."""
    foreign = with_foreign_engines(bundle, tmp_path / "foreign")
    monkeypatch.setattr(tensorrt_backend, "check_tensorrt_available", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "gpu_info", lambda device=0: {"name": "NVIDIA Test GPU", "compute_capability": "9.0"})
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    for b, has in ((bundle, "it has: none"), (foreign, "it has: Imaginary GPU / TensorRT 0.0")):
        with pytest.raises(ValueError) as e:
            Session(b, backend="tensorrt")
        msg = str(e.value)
        assert "no TensorRT engines for 'NVIDIA Test GPU' with TensorRT 10.3.0" in msg, msg
        assert has in msg and "timar-build --bundle" in msg and "\n" not in msg
    assert Session(foreign, backend="auto").backend.name == "onnxruntime"


# ---- on a GPU with TensorRT --------------------------------------------------------------------
@needs_tensorrt
@pytest.mark.parametrize("history,cfg", [("masked", 1.0), ("feedback", 2.0)])
def test_tensorrt_matches_onnxruntime_and_snapshots_round_trip(bundle, tmp_path, history, cfg):
    built = tmp_path / "built"
    shutil.copytree(bundle, built)
    tb.build_engines(built)
    w = json.loads((built / "manifest.json").read_text())["context_turns"]
    turns = 2 * w + 3
    rng = np.random.default_rng(5)
    ua = (rng.standard_normal((turns + 2, 16000)) * 0.2).astype(np.float32)
    aa = (rng.standard_normal((turns + 2, 16000)) * 0.2).astype(np.float32)
    um = (rng.standard_normal((turns + 2, 25, 56)) * 0.3).astype(np.float32)
    motion = lambda i: None if i % 4 == 3 else um[i]  # noqa: E731

    trt = Session(built, backend="tensorrt", seed=7, history=history, cfg=cfg)
    ort = Session(built, backend="onnxruntime", seed=7, history=history, cfg=cfg)
    assert trt.info["backend"] == "tensorrt" and Session(built, backend="auto").backend.name == "tensorrt"
    for i in range(turns):
        diff = np.abs(trt.step(ua[i], motion(i), aa[i]) - ort.step(ua[i], motion(i), aa[i])).max()
        assert diff < 1e-3, f"turn {i}: max |tensorrt - onnxruntime| = {diff}"
    state = trt.get_state()
    assert np.abs(state["cache"] - ort.get_state()["cache"]).max() < 1e-3    # the GPU ring == the host ring

    after = [trt.step(ua[i], motion(i), aa[i]) for i in (turns, turns + 1)]
    trt.set_state(state)
    again = [trt.step(ua[i], motion(i), aa[i]) for i in (turns, turns + 1)]
    np.testing.assert_allclose(again, after, atol=1e-5)
    ort.set_state(state)                                   # a TensorRT snapshot restores in ONNX Runtime
    assert np.abs(ort.step(ua[turns], motion(turns), aa[turns]) - after[0]).max() < 1e-3
