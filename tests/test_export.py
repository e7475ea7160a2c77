"""Export: each ONNX graph equals its torch module; the bundle loop reproduces the torch
streaming reference; the op check; refusal of broken bundles."""
import json
import shutil

import numpy as np
import pytest
import torch

from timar_sdk.export.onnx_export import export_bundle, ort_vs_torch
from timar_sdk.model.graphs import example_inputs
from timar_sdk.model.config import preset
from timar_sdk.model.streaming import StreamingReference
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.bundle import Bundle, BundleError
from timar_sdk.runtime.rng import PhiloxNormal
from timar_sdk.runtime.session import Session


def perturbed(model: Timar, seed: int = 0) -> Timar:
    """Random weights everywhere, including the zero-initialised adaLN, biases and turn biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.motion_mean.copy_(torch.randn(56, generator=g) * 0.1)
        model.motion_std.copy_(torch.rand(56, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = perturbed(Timar(preset("tiny")))
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(model, out)
    return model, out


def cache_ages(kind: str, batch: int, w: int, p: int) -> torch.Tensor:
    slots = {"empty": [w] * (w - 1), "partial": [2, w, 1, w, 3] + [w] * (w - 6),
             "full": list(range(1, w))}[kind]
    return torch.tensor(np.repeat(slots, p), dtype=torch.int64)[None].expand(batch, -1).contiguous()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cache", ["empty", "partial", "full"])
def test_encoder_step_matches_torch(tiny, batch, cache):
    model, bundle = tiny
    c = model.cfg
    inputs = example_inputs(model, batch)["encoder_step"]
    inputs["past_turn_age"] = cache_ages(cache, batch, c.context_turns, c.tokens_per_turn)
    inputs["uncond"] = torch.tensor([0.0, 1.0][:batch])
    inputs["user_motion_absent"] = torch.tensor([1.0, 0.0][:batch])
    inputs["agent_mask"] = (torch.rand(batch, c.frames_per_turn) > 0.5).float()
    assert ort_vs_torch(bundle, model, "encoder_step", inputs) < 1e-4


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["audio_encoder", "denoiser"])
def test_audio_encoder_and_denoiser_match_torch(tiny, batch, name):
    model, bundle = tiny
    inputs = example_inputs(model, batch)[name]
    if name == "denoiser":
        inputs["t"] = torch.tensor(np.linspace(0, 999, len(inputs["t"])), dtype=torch.float32)
    assert ort_vs_torch(bundle, model, name, inputs) < 1e-4


@pytest.mark.parametrize("history", ["masked", "feedback"])
def test_bundle_loop_reproduces_torch_streaming_reference(tiny, history):
    model, bundle = tiny
    w = model.cfg.context_turns
    turns = 2 * w + 3
    rng = np.random.default_rng(0)
    ua = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.2
    aa = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.2
    um = rng.standard_normal((turns, 25, 56)).astype(np.float32) * 0.3
    session = Session(bundle, backend="onnxruntime", seed=11, history=history)
    reference = StreamingReference(model, PhiloxNormal(11), history=history)
    for i in range(turns):
        user_motion = None if i % 4 == 3 else um[i]
        got = session.step(ua[i], user_motion, aa[i])
        want = reference.step(ua[i], user_motion, aa[i])
        assert np.abs(got - want).max() < 1e-3, f"turn {i}"


def test_manifest_is_plain_json_with_the_contract(tiny):
    model, bundle = tiny
    m = json.loads((bundle / "manifest.json").read_text())
    c = model.cfg
    assert m["cache"]["past_key_values_shape"] == [c.depth, 2, "batch", c.heads, (c.context_turns - 1) * 110, c.head_dim]
    assert len(m["diffusion"]["alphas_cumprod"]) == 1000
    assert m["motion_mean"] == pytest.approx(model.motion_mean.tolist())
    inputs = {i["name"]: i for i in m["graphs"]["encoder_step"]["inputs"]}
    cache_names = [f"past_key_values.{layer}.{kv}" for layer in range(c.depth) for kv in ("key", "value")]
    assert list(inputs)[-2 * c.depth - 1:] == ["past_turn_age"] + cache_names
    assert m["cache"]["past_key_values_inputs"] == cache_names
    for name in cache_names:
        assert inputs[name]["shape"] == ["batch", c.heads, (c.context_turns - 1) * 110, c.head_dim]
    assert [o["name"] for o in m["graphs"]["encoder_step"]["outputs"]] == ["z", "present_key_values"]
    assert inputs["past_turn_age"]["dtype"] == "int64"


@pytest.fixture
def bundle_copy(tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny[1], out)
    return out


def rewrite_manifest(bundle, change):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_refuses_hash_mismatch(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m["graphs"]["denoiser"].update(sha256="0" * 64))
    with pytest.raises(BundleError, match="denoiser.onnx: sha256 does not match"):
        Bundle(bundle_copy)


def test_refuses_missing_graph(bundle_copy):
    (bundle_copy / "encoder_step.onnx").unlink()
    with pytest.raises(BundleError, match="encoder_step.onnx: missing"):
        Bundle(bundle_copy)


def test_refuses_future_schema(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="manifest.json: schema_version 99 is newer"):
        Bundle(bundle_copy)


def test_refuses_older_schema_with_one_stacked_cache_input(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m.update(schema_version=1))
    with pytest.raises(BundleError, match="schema_version 1 is older.*re-export"):
        Bundle(bundle_copy)


def test_refuses_schema_violation(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m.update(motion_std=[1.0] * 55))
    with pytest.raises(BundleError, match="motion_std"):
        Bundle(bundle_copy)


def test_refuses_truncated_onnx(bundle_copy):
    from timar_sdk.runtime.bundle import sha256_of
    path = bundle_copy / "audio_encoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="audio_encoder.onnx: sha256 does not match"):
        Bundle(bundle_copy)
    # Even with a matching hash (a bad export), loading names the file.
    rewrite_manifest(bundle_copy, lambda m: m["graphs"]["audio_encoder"].update(sha256=sha256_of(path)))
    with pytest.raises(BundleError, match="audio_encoder.onnx: ONNX Runtime cannot load"):
        Session(bundle_copy, backend="onnxruntime")
