"""TensorRT engines for a bundle (``timar-build``), with the TensorRT 10 or 11 Python API.

For every graph in ``manifest.json`` this parses the ONNX file with ``trt.OnnxParser``, builds
one optimisation profile covering the manifest's dynamic axes, chooses the network typing and
builder flags from the graph's precision (``timar_sdk.runtime.tensorrt_compat``: FP16 graphs and
INT8 Q/DQ graphs are built strongly typed; ``--fp16`` on an FP32 graph enables FP16 kernels while
keeping normalisation and reduction layers in FP32, TensorRT 10 only), reuses a timing cache kept
in the bundle (``engines/timing.cache``), and writes ``engines/<gpu-slug>-trt<version>/<graph>.plan``.
The engine set is then recorded in the manifest's ``engines`` list (schema ``engine_set``:
``dir``, ``gpu``, ``tensorrt``, ``files``, plus build details); nothing else in the manifest changes.

Dynamic axes (shape entries that are strings): ``batch`` = 1..max_batch (opt min(2, max_batch):
one conversation with its CFG row), ``rows`` = 1..max_batch*frames_per_turn (opt
opt_batch*frames_per_turn). Engines are tied to the GPU model and TensorRT version that built them.

Written against NVIDIA's TensorRT 10 and 11 Python API documentation; no TensorRT was available
where this was written, so the build path has only been exercised where ``tests/test_op_support.py``
and ``tests/test_tensorrt_api.py`` find ``tensorrt`` and a CUDA GPU.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import click

from timar_sdk.cli import tool
from timar_sdk.runtime.bundle import MANIFEST, Bundle, graph_precision, sha256_of, write_manifest
from timar_sdk.runtime.tensorrt_compat import BuildSettings, apply_settings, build_settings, create_network
from timar_sdk.runtime.tensorrt_env import (INSTALL_HINT, TensorRTUnavailable,  # noqa: F401 - re-exported
                                            check_tensorrt_available, gpu_info)

TIMING_CACHE = Path("engines") / "timing.cache"
# Layer types kept in FP32 under --fp16 (names of trt.LayerType members; missing names are skipped).
FP32_LAYER_TYPES: tuple[str, ...] = ("NORMALIZATION", "REDUCE")
DEFAULT_FRAMES_PER_TURN = 25


def slug(text: str) -> str:
    """Lower-case file-name form: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "gpu"


def frames_per_turn(manifest: Mapping[str, Any]) -> int:
    """Motion frames per turn F: ``manifest["frames_per_turn"]``, else dim 1 of encoder_step's ``z``
    output, else 25."""
    f = manifest.get("frames_per_turn")
    if isinstance(f, int) and f > 0:
        return f
    for out in manifest.get("graphs", {}).get("encoder_step", {}).get("outputs", []):
        shape = out.get("shape", [])
        if out.get("name") == "z" and len(shape) > 1 and isinstance(shape[1], int):
            return shape[1]
    return DEFAULT_FRAMES_PER_TURN


def axis_ranges(manifest: Mapping[str, Any], max_batch: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for each named dynamic axis of the bundle."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    f = frames_per_turn(manifest)
    opt = min(2, max_batch)
    return {"batch": (1, opt, max_batch), "rows": (1, opt * f, max_batch * f)}


def profile_shapes(inputs: Sequence[Mapping[str, Any]], ranges: Mapping[str, tuple[int, int, int]],
                   graph: str = "graph") -> dict[str, dict[str, list[int]]]:
    """``{input: {"min": [...], "opt": [...], "max": [...]}}`` for every input with a dynamic axis.

    ``inputs`` are manifest tensor entries (``name``, ``dtype``, ``shape`` with ints and axis names).
    """
    out: dict[str, dict[str, list[int]]] = {}
    for spec in inputs:
        shape = spec["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        for d in shape:
            if isinstance(d, str) and d not in ranges:
                raise ValueError(f"{graph}: input {spec['name']!r} has dynamic axis {d!r}; "
                                 f"timar-build knows {sorted(ranges)}")
        out[spec["name"]] = {k: [ranges[d][i] if isinstance(d, str) else int(d) for d in shape]
                             for i, k in enumerate(("min", "opt", "max"))}
    return out


def _parser_error(err: Any) -> str:
    """One parser error as text: description, and the ONNX node where the parser says it failed."""
    parts = [str(err.desc())]
    name = getattr(err, "node_name", None)
    op = getattr(err, "node_operator", None)
    where = []
    if callable(op) and op():
        where.append(op())
    if callable(name) and name():
        where.append(repr(name()))
    if not where and err.node() >= 0:
        where.append(f"node #{err.node()}")
    if where:
        parts.append("at " + " ".join(where))
    return " ".join(parts)


def _pin_fp32(trt: Any, network: Any, layer_types: Sequence[str]) -> int:
    """Ask TensorRT to run the given layer types in FP32 (precision, output types, and compute
    precision of normalisation layers). Layers with non-float32 or shape-tensor outputs (integer
    reductions on shapes) are left alone. Returns how many layers were pinned."""
    kinds = {getattr(trt.LayerType, n) for n in layer_types if hasattr(trt.LayerType, n)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if any(t.dtype != trt.float32 or getattr(t, "is_shape_tensor", False) for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == getattr(trt.LayerType, "NORMALIZATION", None):
            try:  # reach INormalizationLayer's attributes through the generic ILayer handle
                layer.__class__ = trt.INormalizationLayer
                layer.compute_precision = trt.float32
            except (AttributeError, TypeError):
                pass
        pinned += 1
    return pinned


def _read_cache(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_qdq(onnx_path: str | Path, graph: str = "graph") -> int:
    """An INT8 graph TensorRT can build: explicit Q/DQ only (no MatMulInteger / DynamicQuantizeLinear /
    QLinear* operators), and every QuantizeLinear/DequantizeLinear zero point int8 and 0 (TensorRT
    quantises symmetrically; uint8 or asymmetric activations are refused). Returns the number of
    Q/DQ nodes; raises ValueError naming the graph and the first offending node otherwise."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger") or node.op_type.startswith("QLinear"):
            raise ValueError(f"{graph}: node {node.name!r} is {node.op_type} (operator-based quantisation); "
                             "TensorRT builds explicit Q/DQ graphs only: convert with static Q/DQ quantisation")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            continue                          # no zero point: 0
        values = numpy_helper.to_array(zp)
        if values.dtype.name != "int8" or values.any():
            raise ValueError(f"{graph}: {node.op_type} {node.name!r} has a {values.dtype.name} zero point "
                             f"{values.ravel()[:4].tolist()}; TensorRT needs symmetric int8 quantisation "
                             "(zero point int8 0): convert with int8 symmetric activations")
    if count == 0:
        raise ValueError(f"{graph}: the manifest says int8 but the graph has no QuantizeLinear/DequantizeLinear")
    return count


def plan_builds(manifest: Mapping[str, Any], names: Sequence[str], version: str, fp16: bool,
                graph_paths: Mapping[str, Path]) -> dict[str, BuildSettings]:
    """The build settings of each graph for TensorRT `version`, from its manifest precision; checks
    every graph before anything is built (ValueError naming the graph)."""
    settings = {}
    for name in names:
        g = manifest["graphs"][name]
        precision = graph_precision(g)
        settings[name] = build_settings(version, precision, fp16, name, g.get("quantization"))
        if precision == "int8":
            check_qdq(graph_paths[name], name)
    return settings


def _build_one(trt: Any, logger: Any, onnx_path: Path, shapes: Mapping[str, Mapping[str, list[int]]],
               settings: BuildSettings, workspace_bytes: int, cache_path: Path,
               fp32_layers: Sequence[str]) -> tuple[bytes, int]:
    """Parse, configure and build one engine; returns (serialized plan, number of FP32-pinned layers)."""
    builder = trt.Builder(logger)
    network = create_network(trt, builder, settings)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["(no error reported)"]
        raise RuntimeError(f"{onnx_path}: TensorRT {trt.__version__} could not parse it:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in shapes:
            s = shapes[tensor.name]
            profile.set_shape(tensor.name, s["min"], s["opt"], s["max"])
        elif any(d < 0 for d in tensor.shape):
            raise ValueError(f"{onnx_path}: input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} "
                             "but manifest.json gives it no dynamic axis")
    if shapes:
        config.add_optimization_profile(profile)

    apply_settings(trt, config, settings)
    pinned = _pin_fp32(trt, network, fp32_layers) if settings.pin_fp32 else 0

    # Timing cache shared by all builds of this bundle. A cache from another GPU or TensorRT
    # version is refused (ignore_mismatch=False) and replaced by a fresh one.
    try:
        cache = config.create_timing_cache(_read_cache(cache_path))
        loaded = cache is not None and config.set_timing_cache(cache, False)
    except (RuntimeError, TypeError, ValueError):  # unreadable cache file
        loaded = False
    if not loaded:
        config.set_timing_cache(config.create_timing_cache(b""), False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine "
                           "(see the TensorRT messages above)")
    _write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan)), pinned


def build_engines(bundle_dir: str | Path, fp16: bool = False, workspace_gb: float = 4.0, max_batch: int = 2,
                  timing_cache: str | Path | None = None, graphs: Sequence[str] | None = None,
                  fp32_layers: Sequence[str] = FP32_LAYER_TYPES) -> dict:
    """Build one TensorRT engine per bundle graph on the current GPU and record them in manifest.json.

    Each graph is built at the precision the manifest gives it (``graphs.<name>.precision``,
    absent = fp32; ``tensorrt_compat``): FP16 graphs and INT8 Q/DQ graphs strongly typed.

    Args:
        bundle_dir: bundle folder (``manifest.json`` and the ONNX graphs it lists).
        fp16: allow FP16 kernels in FP32 graphs (TensorRT 10 only); layers of ``fp32_layers``
            types stay FP32.
        workspace_gb: builder workspace memory pool limit, GiB.
        max_batch: largest batch of the optimisation profile (``rows`` axis: max_batch * frames_per_turn).
        timing_cache: timing cache file, loaded if present and rewritten after each build
            (default ``<bundle>/engines/timing.cache``).
        graphs: subset of graph names to build (default: all in the manifest).
    Returns:
        The engine-set entry written to ``manifest["engines"]`` (``dir``, ``gpu``, ``tensorrt``,
        ``compute_capability``, ``fp16``, ``max_batch``, ``files`` {graph: file, sha256, profile,
        precision, strongly_typed, ...}).
    Raises:
        TensorRTUnavailable: TensorRT, pycuda or a GPU is missing (before anything else is done).
        FileNotFoundError / ValueError: bundle problems (missing file, sha256 mismatch, unknown axis).
        RuntimeError: TensorRT could not parse or build a graph (parser errors listed).
        ValueError also: a precision this TensorRT cannot build (``--fp16`` on TensorRT 11,
            dynamically quantised or asymmetric INT8 graphs).
    """
    check_tensorrt_available()
    import tensorrt as trt

    loaded = Bundle(bundle_dir)          # digest, schema, paths and graph hashes checked
    bundle, manifest = loaded.dir, loaded.manifest
    manifest_path = bundle / MANIFEST
    if manifest["attention"] == "window_recompute":
        raise ValueError(f"{manifest_path}: a window_recompute bundle (an authors' checkpoint); TensorRT "
                         f"engines are built for cached bundles only (run this one with ONNX Runtime)")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    names = list(graphs) if graphs is not None else list(manifest["graphs"])
    unknown = [n for n in names if n not in manifest["graphs"]]
    if unknown:
        raise ValueError(f"{manifest_path}: no graph(s) {unknown}; it has {list(manifest['graphs'])}")
    ranges = axis_ranges(manifest, max_batch)
    plans = {}
    for name in names:
        g = manifest["graphs"][name]
        path, digest = loaded.graph_path(name), g["sha256"]
        plans[name] = (path, digest, profile_shapes(g["inputs"], ranges, name))
    settings = plan_builds(manifest, names, trt.__version__, fp16, {n: p[0] for n, p in plans.items()})

    gpu = gpu_info()
    rel_dir = Path("engines") / f"{slug(gpu['name'])}-trt{trt.__version__}"
    cache_path = Path(timing_cache) if timing_cache is not None else bundle / TIMING_CACHE
    logger = trt.Logger(trt.Logger.WARNING)
    files: dict[str, dict] = {}
    for name, (path, digest, shapes) in plans.items():
        t0 = time.perf_counter()
        plan, pinned = _build_one(trt, logger, path, shapes, settings[name], int(workspace_gb * (1 << 30)),
                                  cache_path, fp32_layers)
        rel = rel_dir / f"{name}.plan"
        _write_atomic(bundle / rel, plan)
        files[name] = {"file": rel.as_posix(), "sha256": sha256_of(bundle / rel), "onnx_sha256": digest,
                       "bytes": len(plan), "profile": shapes, "fp32_layers": pinned,
                       "precision": graph_precision(manifest["graphs"][name]),
                       "strongly_typed": settings[name].strongly_typed,
                       "build_seconds": round(time.perf_counter() - t0, 1)}

    entry = {"dir": rel_dir.as_posix(), "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
             "tensorrt": trt.__version__, "fp16": bool(fp16), "fp32_layer_types": list(fp32_layers) if fp16 else [],
             "max_batch": int(max_batch), "workspace_gb": float(workspace_gb),
             "timing_cache": cache_path.relative_to(bundle).as_posix() if cache_path.is_relative_to(bundle)
             else str(cache_path),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    # Re-read just before writing: keep every other field as it is on disk now.
    manifest = Bundle(bundle, verify_hashes=False).manifest
    manifest["engines"] = [e for e in manifest["engines"] if e.get("dir") != entry["dir"]] + [entry]
    write_manifest(bundle, manifest)
    return entry


@tool("timar-build")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Bundle folder written by timar-export.")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels in FP32 graphs (normalisation/reductions stay FP32; "
              "TensorRT 10 only). FP16 and INT8 bundles are built at their own precision without it.")
@click.option("--workspace-gb", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Builder workspace memory limit, GiB.")
@click.option("--max-batch", type=click.IntRange(min=1), default=2, show_default=True,
              help="Largest batch the engines accept (CFG counts: one conversation with CFG is 2).")
def build_cmd(bundle_dir: Path, fp16: bool, workspace_gb: float, max_batch: int) -> None:
    """Build TensorRT engines for a bundle on this GPU and record them in its manifest.json."""
    try:
        entry = build_engines(bundle_dir, fp16=fp16, workspace_gb=workspace_gb, max_batch=max_batch)
    except (RuntimeError, ValueError, OSError, KeyError) as e:  # TensorRTUnavailable is a RuntimeError
        raise click.ClickException(str(e) if not isinstance(e, KeyError) else f"manifest.json: missing key {e}") from None
    click.echo(f"{entry['gpu']} (sm {entry['compute_capability']}), TensorRT {entry['tensorrt']}, "
               f"fp16={entry['fp16']}, max_batch={entry['max_batch']}")
    for name, f in entry["files"].items():
        click.echo(f"  {f['file']}  {f['bytes'] / 1e6:.1f} MB  {f['build_seconds']} s  sha256 {f['sha256'][:12]}")
