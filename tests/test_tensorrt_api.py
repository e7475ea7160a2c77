"""TensorRT 10 and 11 (issue 16 item 5): how timar-build chooses network typing and builder flags
from a graph's precision, the INT8 graphs it accepts, and the same against the real API.

The expected settings are those of NVIDIA's migration guide (TensorRT 11 removed weak typing:
no BuilderFlag.FP16/INT8, no precision constraints, no EXPLICIT_BATCH; every network strongly
typed). The tests of the decision and of the Q/DQ check run everywhere (ONNX Runtime's real
quantiser makes the graphs); the ones marked below need the `tensorrt` package, and a CUDA GPU
to build, and skip with the reason where they are missing (no TensorRT ran where this was written).
"""
from __future__ import annotations

import numpy as np
import pytest

from timar_sdk.runtime.tensorrt_compat import BuildSettings, build_settings, major_version

TRT10, TRT11 = "10.16.1.11", "11.4.0.106"


def test_fp32_graphs_compute_in_fp32_on_both_versions():
    assert build_settings(TRT10) == BuildSettings(strongly_typed=False, set_flags=(), clear_flags=("TF32",),
                                                  pin_fp32=False)
    assert build_settings(TRT11) == BuildSettings(strongly_typed=True, set_flags=(), clear_flags=("TF32",),
                                                  pin_fp32=False)


def test_fp16_request_on_an_fp32_graph_is_weak_typing_on_10_and_refused_on_11():
    s = build_settings(TRT10, "fp32", fp16=True)
    assert not s.strongly_typed and s.pin_fp32
    assert set(s.set_flags) == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    with pytest.raises(ValueError, match=r"^denoiser: --fp16 on an FP32 graph needs TensorRT 10 .*convert the "
                                         r"bundle to fp16"):
        build_settings(TRT11, "fp32", fp16=True, graph="denoiser")


@pytest.mark.parametrize("version", [TRT10, TRT11])
@pytest.mark.parametrize("precision,fp16", [("fp16", False), ("fp16", True), ("int8", False)])
def test_converted_graphs_are_built_strongly_typed_without_precision_flags(version, precision, fp16):
    s = build_settings(version, precision, fp16)
    assert s.strongly_typed and not s.pin_fp32
    assert not {"FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"} & set(s.set_flags)


def test_unbuildable_requests_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^encoder_step: an int8 graph quantised 'dynamic'"):
        build_settings(TRT10, "int8", graph="encoder_step", quantization="dynamic")
    build_settings(TRT10, "int8", quantization="static")
    with pytest.raises(ValueError, match=r"^g: precision 'bf16' is not one of"):
        build_settings(TRT10, "bf16", graph="g")
    for version in ("8.6.1", "12.0.0", "x"):
        with pytest.raises(ValueError, match="^tensorrt: "):
            build_settings(version)
    assert major_version(TRT10) == 10 and major_version(TRT11) == 11


# ---- INT8 graphs: what TensorRT can build -------------------------------------------------------
def _matmul_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _quantized(tmp_path, kind: str):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    src, dst = _matmul_model(tmp_path / "f32.onnx"), tmp_path / f"{kind}.onnx"
    if kind == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.feeds = iter([{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    symmetric = kind == "symmetric"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return dst


def test_int8_graphs_need_symmetric_int8_qdq(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from timar_sdk.export.tensorrt_build import check_qdq

    assert check_qdq(_quantized(tmp_path, "symmetric"), "denoiser") >= 3        # x, w and y quantised
    with pytest.raises(ValueError, match=r"^denoiser: QuantizeLinear .* has a uint8 zero point .* symmetric int8"):
        check_qdq(_quantized(tmp_path, "asymmetric"), "denoiser")
    with pytest.raises(ValueError, match=r"^denoiser: node .* is (DynamicQuantizeLinear|MatMulInteger)"):
        check_qdq(_quantized(tmp_path, "dynamic"), "denoiser")
    with pytest.raises(ValueError, match=r"^denoiser: the manifest says int8 but the graph has no"):
        check_qdq(tmp_path / "f32.onnx", "denoiser")


def test_plan_builds_follows_each_graphs_manifest_precision(tmp_path):
    """A real bundle (the shipped default) with its graphs marked fp16 / int8 as the converter marks
    them: each graph gets its own settings, and a refusal names the graph before anything is built."""
    from timar_sdk.export.tensorrt_build import plan_builds
    from timar_sdk.runtime.bundle import Bundle

    bundle = Bundle(None)
    manifest = {"graphs": {n: dict(g) for n, g in bundle.manifest["graphs"].items()}}
    paths = {n: bundle.graph_path(n) for n in manifest["graphs"]}
    names = list(manifest["graphs"])
    manifest["graphs"]["denoiser"]["precision"] = "fp16"
    plans = plan_builds(manifest, names, TRT10, False, paths)
    assert plans["denoiser"].strongly_typed and not plans["encoder_step"].strongly_typed
    assert all(p.strongly_typed for p in plan_builds(manifest, names, TRT11, False, paths).values())
    with pytest.raises(ValueError, match="^audio_encoder: --fp16 on an FP32 graph"):
        plan_builds(manifest, names, TRT11, True, paths)
    manifest["graphs"]["encoder_step"].update(precision="int8", quantization="static")
    with pytest.raises(ValueError, match="^encoder_step: the manifest says int8 but the graph has no"):
        plan_builds(manifest, names, TRT10, False, paths)      # an FP32 graph marked int8


# ---- the real API ------------------------------------------------------------------------------
def _trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (needs NVIDIA's package index "
                                                 "and an NVIDIA driver); the API checks run where it is")
    if not hasattr(trt, "BuilderFlag"):
        pytest.skip("the installed `tensorrt` is the PyPI stub without NVIDIA's libraries")
    return trt


def test_the_flags_we_use_exist_in_the_installed_tensorrt():
    trt = _trt()
    major = major_version(trt.__version__)
    cases = [("fp32", False), ("fp16", False), ("int8", False)] + ([("fp32", True)] if major == 10 else [])
    for precision, fp16 in cases:
        s = build_settings(trt.__version__, precision, fp16)
        for name in s.set_flags + s.clear_flags:
            assert hasattr(trt.BuilderFlag, name), name
    assert hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    # What the compatibility layer assumes about each version (NVIDIA's migration guide).
    assert hasattr(trt.BuilderFlag, "FP16") == (major == 10)
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") == (major == 10)


def test_engines_build_at_each_precision_on_this_gpu(tmp_path):
    trt = _trt()
    from timar_sdk.runtime.tensorrt_env import TensorRTUnavailable, check_tensorrt_available
    try:
        check_tensorrt_available()
    except TensorRTUnavailable as e:
        pytest.skip(str(e))
    from timar_sdk.export.tensorrt_build import _build_one

    logger = trt.Logger(trt.Logger.WARNING)
    graphs = {"fp32": (_matmul_model(tmp_path / "f32.onnx"), False), "int8": (_quantized(tmp_path, "symmetric"), False)}
    if major_version(trt.__version__) == 10:
        graphs["fp32 --fp16"] = (tmp_path / "f32.onnx", True)
    for label, (path, fp16) in graphs.items():
        settings = build_settings(trt.__version__, label.split()[0], fp16)
        plan, _ = _build_one(trt, logger, path, {}, settings, 1 << 28, tmp_path / "timing.cache", ())
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        assert engine is not None and engine.num_io_tensors == 2, label
