"""Op-support list and check (runs everywhere), timar-build's missing-TensorRT path (everywhere),
and a real engine build (only where `tensorrt` imports and a CUDA GPU is present)."""
import json
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from timar_sdk.export import tensorrt_build as tb
from timar_sdk.export.op_support import check_ops, supported_ops, supported_ops_info, unsupported_ops

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, inits=(), opsets=OPSET, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _supported_model(batch_axis="batch"):
    """x [batch, 8] -> LayerNorm -> MatMul [8, 4] -> + Constant -> Softmax -> y [batch, 4]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "ln_s"),
             numpy_helper.from_array(np.zeros(8, np.float32), "ln_b"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["h"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["h", "w"], ["m"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full(4, 0.5, np.float32))),
             helper.make_node("Add", ["m", "c"], ["a"]),
             helper.make_node("Softmax", ["a"], ["y"], axis=-1)]
    return _model(nodes, [_vi("x", [batch_axis, 8])], [_vi("y", [batch_axis, 4])], inits)


def test_supported_list_is_documented():
    info = supported_ops_info()
    ops = info["ops"]
    assert ops == sorted(set(ops)) and len(ops) > 100 and info["opset"] == 17
    assert {"LayerNormalization", "MatMul", "Softmax", "Gather", "Constant", "Where"} <= supported_ops()
    assert not {"STFT", "DFT", "NonMaxSuppression", "Upsample"} & supported_ops()
    src = json.dumps(info["sources"])
    assert "onnx-tensorrt" in src and "operators.md" in src and "TensorRT 10" in src
    assert "OperatorKernels.md" in src and "001d12d2623fd411ce0f83d05abb5e82304a3389" in src
    assert info["date"] and any("Pad" in n for n in info["notes"]) and any("INT64" in n for n in info["notes"])


def test_supported_graph_passes_and_runs_on_ort_cpu(tmp_path):
    model = _supported_model()
    onnx.checker.check_model(model)
    path = tmp_path / "ok.onnx"
    onnx.save(model, path)
    assert unsupported_ops(model) == [] and unsupported_ops(path) == []
    check_ops(path)
    import onnxruntime as ort  # Constant has no ORT kernel: ORT folds it into an initializer

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)})
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)


def test_unsupported_op_is_named(tmp_path):
    nodes = [helper.make_node("Constant", [], ["step"], value=numpy_helper.from_array(np.array(4, np.int64))),
             helper.make_node("STFT", ["x", "step", "", ""], ["y"], onesided=1)]
    model = _model(nodes, [_vi("x", [1, 64, 1])], [_vi("y", None)])
    path = tmp_path / "stft.onnx"
    onnx.save(model, path)
    assert unsupported_ops(path) == ["STFT"]
    with pytest.raises(ValueError, match=r"stft\.onnx.*STFT"):
        check_ops(path)


def test_custom_domain_ops_inside_subgraphs_and_local_functions(tmp_path):
    then_g = helper.make_graph([helper.make_node("FancyNorm", ["x"], ["t"], domain="com.example")], "then", [],
                               [_vi("t", [4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", [4])])
    # a model-local function counts as the ops in its body (both runtimes inline local functions)
    fn = helper.make_function("local", "Half", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["k"], value_float=0.5),
                               helper.make_node("Mul", ["a", "k"], ["b"]),
                               helper.make_node("Erf", ["b"], ["unused"])],
                              opset_imports=OPSET)
    nodes = [helper.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Half", ["r"], ["y"], domain="local")]
    model = _model(nodes, [_vi("cond", [], TensorProto.BOOL), _vi("x", [4])], [_vi("y", [4])],
                   opsets=OPSET + [helper.make_opsetid("com.example", 1), helper.make_opsetid("local", 1)],
                   functions=[fn])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    assert unsupported_ops(model) == ["com.example:FancyNorm"]
    with pytest.raises(ValueError, match=r"custom\.onnx.*com\.example:FancyNorm"):
        check_ops(path)


def test_profile_shapes_from_manifest_axes():
    manifest = {"frames_per_turn": 25}
    ranges = tb.axis_ranges(manifest, max_batch=2)
    assert ranges == {"batch": (1, 2, 2), "rows": (1, 50, 50)}
    inputs = [{"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 4, 770, 64]},
              {"name": "x_t", "dtype": "float32", "shape": ["rows", 56]},
              {"name": "static", "dtype": "float32", "shape": [3, 4]}]
    shapes = tb.profile_shapes(inputs, tb.axis_ranges(manifest, max_batch=4))
    assert shapes["past_key_values.0.key"] == {"min": [1, 4, 770, 64], "opt": [2, 4, 770, 64],
                                               "max": [4, 4, 770, 64]}
    assert shapes["x_t"] == {"min": [1, 56], "opt": [50, 56], "max": [100, 56]} and "static" not in shapes
    with pytest.raises(ValueError, match="'frames'"):
        tb.profile_shapes([{"name": "a", "shape": ["frames", 2]}], ranges, "g")
    assert tb.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def _minimal_bundle(root, model=None, axis="batch"):
    root.mkdir(exist_ok=True)
    graphs = {}
    if model is not None:
        onnx.save(model, root / "tiny.onnx")
        from timar_sdk.runtime.bundle import sha256_of

        graphs["tiny"] = {"file": "tiny.onnx", "sha256": sha256_of(root / "tiny.onnx"),
                          "inputs": [{"name": "x", "dtype": "float32", "shape": [axis, 8]}],
                          "outputs": [{"name": "y", "dtype": "float32", "shape": [axis, 4]}]}
    manifest = {"schema_version": 2, "frames_per_turn": 25, "graphs": graphs, "engines": [],
                "keep_me": {"untouched": [1, 2, 3]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.exc_info[0] is SystemExit
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for n in needles:
        assert n in lines[0]


def test_timar_build_without_tensorrt_is_one_line(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("tensorrt imports here; the missing-TensorRT message cannot be shown")
    bundle = _minimal_bundle(tmp_path / "bundle")
    result = CliRunner().invoke(tb.build_cmd, ["--bundle", str(bundle), "--fp16"])
    _assert_one_line_error(result, "TensorRT is missing", "pip install -e '.[tensorrt]'",
                           "--extra-index-url https://pypi.nvidia.com", "CUDA driver")


def test_timar_build_names_missing_pycuda(tmp_path, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.Builder = fake.OnnxParser = object
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    result = CliRunner().invoke(tb.build_cmd, ["--bundle", str(_minimal_bundle(tmp_path / "b"))])
    _assert_one_line_error(result, "pycuda is missing", "pip install")


def _tensorrt_and_gpu_or_skip():
    try:
        tb.check_tensorrt_available()
    except tb.TensorRTUnavailable as e:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {e}")


@pytest.mark.slow
def test_build_engines_on_tiny_bundle(tmp_path):
    _tensorrt_and_gpu_or_skip()
    import tensorrt as trt

    bundle = _minimal_bundle(tmp_path / "bundle", _supported_model("rows"), axis="rows")
    entry = tb.build_engines(bundle, fp16=True, workspace_gb=0.25, max_batch=2)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["keep_me"] == {"untouched": [1, 2, 3]} and manifest["engines"] == [entry]
    f = entry["files"]["tiny"]
    plan = bundle / f["file"]
    assert plan.is_file() and f["file"].startswith(entry["dir"] + "/") and f["file"].endswith("tiny.plan")
    from timar_sdk.runtime.bundle import sha256_of

    assert sha256_of(plan) == f["sha256"] and entry["tensorrt"] == trt.__version__ and entry["fp16"]
    assert f["profile"]["x"] == {"min": [1, 8], "opt": [50, 8], "max": [50, 8]} and f["fp32_layers"] >= 1
    cache = bundle / "engines" / "timing.cache"
    assert cache.is_file() and cache.stat().st_size > 0
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    assert [list(s) for s in engine.get_tensor_profile_shape("x", 0)] == [[1, 8], [50, 8], [50, 8]]

    # A rebuild reuses the timing cache and replaces this GPU's engine set instead of adding one.
    entry2 = tb.build_engines(bundle, fp16=False, workspace_gb=0.25, max_batch=1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engines"] == [entry2] and entry2["files"]["tiny"]["profile"]["x"]["max"] == [25, 8]
