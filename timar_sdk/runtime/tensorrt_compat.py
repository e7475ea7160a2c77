"""The differences between the TensorRT 10 and 11 Python APIs that timar-build meets, in one place.

TensorRT 11 removed weak typing (NVIDIA's "Migrating from TensorRT 10.x to 11.x" guide): every
network is strongly typed, so a tensor's precision is what the ONNX graph declares. Gone are the
precision-enabling builder flags (``BuilderFlag.FP16``, ``INT8``, ``BF16``, ...), the precision
constraints (``OBEY_PRECISION_CONSTRAINTS``, ``PREFER_PRECISION_CONSTRAINTS``), per-layer
``precision`` / ``set_output_type`` and normalisation ``compute_precision``, and the
``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` flag (explicit batch is the only mode from 10;
``STRONGLY_TYPED`` is still accepted by 11 and ignored). The I/O tensor API the runtime uses
(``num_io_tensors``, ``get_tensor_name``/``mode``/``dtype``/``shape``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``, ``get_tensor_profile_shape``, ``trt.nptype``) is the
same in both.

So the precision of an engine comes from the bundle (manifest ``graphs.<name>.precision``:
"fp32", "fp16", "int8"; absent = "fp32"):

| graph precision | TensorRT 10 | TensorRT 11 |
|---|---|---|
| fp32 | weakly typed, TF32 off | strongly typed (always), TF32 off |
| fp32 + ``--fp16`` | weakly typed, FP16 flag, norms/reductions pinned FP32 | refused: no FP16 flag; convert the bundle to fp16 |
| fp16 (converted graph) | strongly typed | strongly typed |
| int8 (Q/DQ graph) | strongly typed (explicit quantisation) | strongly typed |

``build_settings`` decides from plain values (testable without TensorRT); ``create_network`` and
``apply_settings`` do it on the real API objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timar_sdk.runtime.bundle import PRECISIONS
SUPPORTED_MAJORS = (10, 11)


@dataclass(frozen=True)
class BuildSettings:
    """How to build one graph: the network typing and builder flags, by name (``trt.BuilderFlag``)."""
    strongly_typed: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    pin_fp32: bool          # weak typing only: keep FP32_LAYER_TYPES in FP32 (per-layer precision)


def major_version(version: str) -> int:
    """``"10.16.1.11"`` -> 10. Raises ValueError for a TensorRT other than 10 or 11."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"tensorrt: cannot read the version {version!r}") from None
    if major not in SUPPORTED_MAJORS:
        raise ValueError(f"tensorrt: version {version} is not supported; timar-build supports TensorRT "
                         f"{' and '.join(map(str, SUPPORTED_MAJORS))}")
    return major


def build_settings(version: str, precision: str = "fp32", fp16: bool = False, graph: str = "graph",
                   quantization: str | None = None) -> BuildSettings:
    """Network typing and builder flags for one graph of `precision` ("fp32"/"fp16"/"int8") with
    TensorRT `version`; fp16: the ``--fp16`` request (FP16 kernels for an FP32 graph).
    quantization: the manifest's int8 method ("static" Q/DQ or "dynamic"). Raises ValueError naming
    the graph when TensorRT cannot build what is asked."""
    major = major_version(version)
    if precision not in PRECISIONS:
        raise ValueError(f"{graph}: precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8" and quantization not in (None, "static"):
        raise ValueError(f"{graph}: an int8 graph quantised {quantization!r} (MatMulInteger / "
                         "DynamicQuantizeLinear) cannot be built by TensorRT, which runs explicit Q/DQ "
                         "quantisation only; convert the bundle with static (Q/DQ) quantisation")
    if precision != "fp32":
        # The graph carries its types (Cast to FP16 / Q/DQ nodes): build exactly what it says.
        return BuildSettings(strongly_typed=True, set_flags=(), clear_flags=("TF32",), pin_fp32=False)
    if not fp16:
        # TF32 is on by default on Ampere and newer; an FP32 engine computes in FP32 so it matches
        # ONNX Runtime to the parity tolerance.
        return BuildSettings(strongly_typed=major >= 11, set_flags=(), clear_flags=("TF32",), pin_fp32=False)
    if major >= 11:
        raise ValueError(f"{graph}: --fp16 on an FP32 graph needs TensorRT 10 (BuilderFlag.FP16, weak typing); "
                         f"TensorRT {version} builds the precision the graph declares: convert the bundle to "
                         "fp16 (timar-export --precision fp16) and build that")
    return BuildSettings(strongly_typed=False, set_flags=("FP16", "OBEY_PRECISION_CONSTRAINTS"), clear_flags=(),
                         pin_fp32=True)


def create_network(trt: Any, builder: Any, settings: BuildSettings) -> Any:
    """``builder.create_network`` with the creation flags of this TensorRT: explicit batch is the
    default from 10 (and the flag gone in 11); STRONGLY_TYPED where asked (11 ignores it)."""
    flags = 0
    if settings.strongly_typed and major_version(trt.__version__) == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def apply_settings(trt: Any, config: Any, settings: BuildSettings) -> None:
    """Set and clear the builder flags of `settings` on a ``trt.IBuilderConfig``."""
    for name in settings.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in settings.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
