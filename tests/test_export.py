"""Export: each ONNX graph equals its torch module; the bundle in a Session reproduces the
torch model in a Session (Model.from_torch); the op check; refusal of broken bundles."""
import json
import shutil

import numpy as np
import pytest
import torch

from timar_sdk.export.onnx_export import export_bundle, ort_vs_torch
from timar_sdk.model.graphs import example_inputs
from timar_sdk.model.config import preset
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.bundle import Bundle, BundleError, write_manifest
from timar_sdk.runtime.model import Model
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
def test_bundle_reproduces_the_torch_model_turn_by_turn(tiny, history):
    model, bundle = tiny
    w = model.cfg.context_turns
    turns = 2 * w + 3
    rng = np.random.default_rng(0)
    ua = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.2
    aa = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.2
    um = rng.standard_normal((turns, 25, 56)).astype(np.float32) * 0.3
    session = Session(bundle, backend="onnxruntime", seed=11, history=history)
    reference = Session(Model.from_torch(model), seed=11, history=history)
    for i in range(turns):
        user_motion = None if i % 4 == 3 else um[i]
        got = session.step(ua[i], user_motion, aa[i])
        want = reference.step(ua[i], user_motion, aa[i])
        assert np.abs(got - want).max() < 1e-3, f"turn {i}"


def test_in_memory_bundle_has_the_exported_manifest(tiny):
    """Model.from_torch runs the manifest export writes (the graph entries aside), and no files."""
    model, bundle = tiny
    in_memory = Model.from_torch(model).bundle
    written = json.loads((bundle / "manifest.json").read_text())
    assert {k for k in written if written[k] != in_memory[k]} <= {"created_at", "graphs", "source_weights"}
    with pytest.raises(ValueError, match="made in memory.*runs with 'torch'"):
        Model(in_memory, backend="onnxruntime")
    assert Model(in_memory).backend.name == "torch"           # "auto" takes the only backend it can
    with pytest.raises(ValueError, match="MLP head"):
        Model.from_torch(Timar(preset("tiny", head="mlp")))


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
    # Only the declared axes are symbolic: the exporter named the audio encoder's 25 frames "batch".
    outputs = {o["name"]: o["shape"] for g in m["graphs"].values() for o in g["outputs"]}
    assert outputs["speech_features"] == ["batch", 25, c.audio_dim]
    assert outputs["z"] == ["batch", 25, c.width]
    assert outputs["present_key_values"] == [c.depth, 2, "batch", c.heads, 110, c.head_dim]
    assert outputs["model_output"] == ["rows", 112]
    assert inputs["past_turn_age"]["dtype"] == "int64"


@pytest.fixture
def bundle_copy(tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny[1], out)
    return out


def rewrite_manifest(bundle, change):
    """Change the manifest and record its new digest, as a re-export would."""
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    write_manifest(bundle, m)


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


# ---- the diffusion schedule in float64 (issue 13, item 12) ------------------------------------
def adm_cosine_alphas_cumprod(n: int = 1000) -> np.ndarray:
    """The cosine schedule as improved DDPM defines it (Nichol & Dhariwal 2021, eq. 17; the
    authors' gaussian_diffusion.get_named_beta_schedule / betas_for_alpha_bar), written here
    independently of timar_sdk.sampler: betas from alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi/2)
    at t = i/n, clipped at 0.999, then the running product of 1 - beta, in float64."""
    import math

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    return np.cumprod(1.0 - betas)


def respaced_tables(alphas_cumprod: np.ndarray, steps: int) -> dict:
    """The respaced process as DiT/guided-diffusion's respace.py builds it (kept timesteps by
    rounding a fractional stride; new betas 1 - abar_k / abar_prev; the base process recomputed
    from those betas), and its posterior tables (gaussian_diffusion.GaussianDiffusion)."""
    stride = (len(alphas_cumprod) - 1) / (steps - 1)
    kept = sorted({round(i * stride) for i in range(steps)})
    betas, last = [], 1.0
    for i, ac in enumerate(alphas_cumprod):
        if i in kept:
            betas.append(1 - ac / last)
            last = ac
    betas = np.array(betas)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    return {"timesteps": np.array(kept), "log_beta": np.log(betas),
            "log_post_var": np.log(np.append(post_var[1], post_var[1:])),
            "coef_x0": betas * np.sqrt(ac_prev) / (1 - ac),
            "coef_xt": (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)}


def test_manifest_holds_the_float64_schedule_and_the_sampler_tables_are_float64(tiny):
    """float32 keeps only ~3 digits of 1 - alpha_bar near t = 0 (4.1e-5): the manifest must hold
    the float64 schedule itself, and the sampler's tables must be computed in float64 from it."""
    _, bundle = tiny
    written = json.loads((bundle / "manifest.json").read_text())["diffusion"]["alphas_cumprod"]
    want = adm_cosine_alphas_cumprod()
    assert np.array_equal(np.array(written, dtype=np.float64), want)      # every digit of the float64 values
    assert Bundle(bundle).alphas_cumprod.dtype == np.float64
    session = Session(bundle, backend="onnxruntime", steps=5)
    theirs = respaced_tables(want, 5)
    assert list(session.schedule.timesteps) == list(theirs["timesteps"]) == [0, 250, 500, 749, 999]
    for name in ("log_beta", "log_post_var", "coef_x0", "coef_xt"):
        ours = getattr(session.schedule, name)
        assert ours.dtype == np.float64, name
        assert np.abs(ours - theirs[name]).max() <= 1e-12 * np.abs(theirs[name]).max(), name


# ---- checkpoints that cannot be exported or resumed (issue 13, item 8) -------------------------
@pytest.fixture(scope="module")
def shipped_ckpt():
    from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT, read_checkpoint
    return read_checkpoint(DEFAULT_CHECKPOINT)


def _bad_checkpoints(ckpt: dict, d):
    """name -> (file, what the one-line error must say)."""
    import copy
    from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT
    data = DEFAULT_CHECKPOINT.read_bytes()
    files = {"empty": (b"", "corrupt or truncated file"),
             "truncated": (data[:len(data) // 2], "corrupt or truncated file"),
             "text": (b"not a checkpoint\n", "not a PyTorch checkpoint")}
    out = {}
    for name, (raw, want) in files.items():
        (d / f"{name}.pt").write_bytes(raw)
        out[name] = (d / f"{name}.pt", want)

    def variant(name, want, change):
        c = copy.copy(ckpt)
        c["model"] = dict(ckpt["model"])
        change(c)
        torch.save(c, d / f"{name}.pt")
        out[name] = (d / f"{name}.pt", want)
    variant("missing_key", r"missing special \(1\)", lambda c: c["model"].pop("special"))
    w = "head.net.input_proj.weight"
    variant("wrong_shape", r"wrong shape head.net.input_proj.weight \(56, 256\) \(expected \(256, 56\)\)",
            lambda c: c["model"].update({w: c["model"][w].T.contiguous()}))
    variant("wrong_config", r"unknown keys \['bogus'\]", lambda c: c.update(config={**c["config"], "bogus": 1}))
    variant("config_width", r"wrong shape", lambda c: c.update(config={**c["config"], "width": 128, "heads": 2}))
    variant("no_config", "has no 'config' dict", lambda c: c.pop("config"))
    variant("not_sdk", "not a timar-sdk checkpoint", lambda c: c.pop("format"))
    return out


def test_unusable_checkpoints_give_one_line_naming_the_file(shipped_ckpt, tmp_path):
    import re

    from click.testing import CliRunner

    from timar_sdk.cli import export_cmd
    for name, (path, want) in _bad_checkpoints(shipped_ckpt, tmp_path).items():
        result = CliRunner().invoke(export_cmd, ["--ckpt", str(path), "--out", str(tmp_path / "b")])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1, (name, result.output)
        assert lines[0].startswith("Error: ckpt: ") and str(path) in lines[0], (name, lines[0])
        assert re.search(want, lines[0]), (name, lines[0])
        assert not isinstance(result.exception, (IndexError, KeyError, RuntimeError)), name
        assert not (tmp_path / "b").exists()


def test_resume_refuses_unusable_checkpoints_in_one_line(shipped_ckpt, tmp_path):
    from click.testing import CliRunner

    from timar_sdk.cli import train_cmd
    from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT
    cases = {k: v for k, v in _bad_checkpoints(shipped_ckpt, tmp_path).items()
             if k in ("empty", "truncated", "wrong_shape", "wrong_config")}
    cases["shipped"] = (DEFAULT_CHECKPOINT, "cannot be resumed: it has no 'ema'")   # slimmed: no optimizer
    for name, (path, want) in cases.items():
        result = CliRunner().invoke(train_cmd, ["--resume", str(path), "--out", str(tmp_path / "o.pt"), "--steps", "1"])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1, (name, result.output)
        assert str(path) in lines[0] and (want in lines[0] or __import__("re").search(want, lines[0])), (name, lines[0])
        assert not (tmp_path / "o.pt").exists()
