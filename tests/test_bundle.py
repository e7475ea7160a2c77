"""Loading a bundle refuses what it cannot trust: a manifest that does not match its digest,
numbers that would give NaN motion or an inconsistent cache, and files outside the folder.
Runs on copies of the shipped default bundle (no export needed)."""
import hashlib
import json
import math
import shutil

import numpy as np
import pytest

from timar_sdk import Bundle, BundleError, Session
from timar_sdk.runtime.bundle import DEFAULT_BUNDLE, write_manifest


@pytest.fixture
def copy(tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, out)
    return out


def edit(bundle, change, rehash=True):
    """Change manifest.json; rehash=True records the new digest as an export would."""
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    if rehash:
        write_manifest(bundle, m)
    else:
        (bundle / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")


def test_shipped_bundle_digest_is_its_manifest_sha256_and_its_id():
    data = (DEFAULT_BUNDLE / "manifest.json").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert (DEFAULT_BUNDLE / "manifest.sha256").read_text() == digest + "\n"
    assert Bundle().id == digest


def test_one_changed_digit_in_the_manifest_is_refused(copy):
    text = (copy / "manifest.json").read_text()
    i = text.index('"motion_mean": [') + len('"motion_mean": [') + 5
    digit = text[i]
    assert digit.isdigit()
    (copy / "manifest.json").write_text(text[:i] + str((int(digit) + 1) % 10) + text[i + 1:])
    with pytest.raises(BundleError, match="manifest.json: does not match manifest.sha256"):
        Bundle(copy)


def test_missing_digest_is_refused_with_a_re_export_hint(copy):
    (copy / "manifest.sha256").unlink()
    with pytest.raises(BundleError, match="no manifest.sha256.*re-export"):
        Bundle(copy)


def test_binary_manifest_names_the_file(copy):
    data = bytes(range(256)) * 4
    (copy / "manifest.json").write_bytes(data)
    (copy / "manifest.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    with pytest.raises(BundleError, match=r"manifest.json: not a text file"):
        Bundle(copy)


BAD_NUMBERS = {
    "motion_std zero": (lambda m: m["motion_std"].__setitem__(3, 0.0), "motion_std: expected values > 0"),
    "motion_std NaN": (lambda m: m["motion_std"].__setitem__(3, math.nan), "motion_std: expected 56 finite"),
    "motion_mean Inf": (lambda m: m["motion_mean"].__setitem__(0, math.inf), "motion_mean: expected 56 finite"),
    "context_turns": (lambda m: m.update(context_turns=5), "cache.slots: expected 4"),
    "cache tokens": (lambda m: m["cache"]["past_key_values_shape"].__setitem__(4, 660),
                     r"cache.past_key_values_shape\[4\]: expected"),
    "samples_per_turn": (lambda m: m.update(samples_per_turn=15999), "samples_per_turn: expected"),
    "schedule not decreasing": (lambda m: m["diffusion"]["alphas_cumprod"].__setitem__(10, 0.99999),
                                "diffusion.alphas_cumprod: expected finite values in \\(0, 1\\), strictly decreasing"),
    "temperature default": (lambda m: m["sampling"].update(temperature=math.inf), "sampling.temperature"),
    "steps default": (lambda m: m["sampling"].update(steps=5000), "sampling.steps: expected 1..1000"),
    "smoothing NaN": (lambda m: m.update(smoothing={"jaw": math.nan}), "smoothing: jaw: expected a time constant"),
    "smoothing region": (lambda m: m.update(smoothing={"mouth": 0.1}), "invalid at smoothing: .*mouth"),
    "smoothing too long": (lambda m: m.update(smoothing={"neck": 3.0}), "invalid at smoothing.neck: 3.0 is greater"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_numbers_that_would_break_a_turn_are_refused_at_load(copy, case):
    change, message = BAD_NUMBERS[case]
    edit(copy, change)
    with pytest.raises(BundleError, match="manifest.json: " + message):
        Bundle(copy)


def test_default_schedule_is_the_float64_cosine_schedule():
    """Written in full double precision: float32 lost three digits near t = 0."""
    steps = 1000
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    want, prod = [], 1.0
    for i in range(steps):
        prod *= 1.0 - min(1.0 - f(i + 1) / f(i), 0.999)
        want.append(prod)
    got = np.asarray(Bundle().manifest["diffusion"]["alphas_cumprod"])
    assert np.abs(got - want).max() < 1e-15
    assert abs((1 - got[0]) / (1 - want[0]) - 1) < 1e-9


def test_engine_path_that_leaves_the_bundle_is_refused_at_load(copy):
    edit(copy, lambda m: m.update(engines=[{"dir": "engines/x", "gpu": "g", "tensorrt": "10.0", "files": {
        "denoiser": {"file": "../../../../../etc/passwd", "sha256": "0" * 64}}}]))
    with pytest.raises(BundleError, match=r"engines\[0\].files.denoiser.file: expected a relative path inside"):
        Bundle(copy)


def test_graph_symlinked_outside_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "denoiser.onnx", outside)
    (copy / "denoiser.onnx").unlink()
    (copy / "denoiser.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="graphs.denoiser.file: 'denoiser.onnx' resolves outside the bundle"):
        Bundle(copy)


def test_absolute_engine_path_is_refused(copy):
    edit(copy, lambda m: m.update(engines=[{"dir": "e", "gpu": "g", "tensorrt": "10.0",
                                            "files": {"denoiser": {"file": "/etc/passwd", "sha256": "0" * 64}}}]))
    with pytest.raises(BundleError, match="expected a relative path inside the bundle folder, got '/etc/passwd'"):
        Session(copy)
