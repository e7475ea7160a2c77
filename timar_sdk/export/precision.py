"""Reduced-precision bundles: an FP32 bundle folder converted to FP16 or INT8 (issue 16).

    convert_bundle("bundle_fp32", "bundle_int8", "int8")                 # timar-convert
    convert_bundle("bundle_fp32", "bundle_fp16", "fp16", cache_dtype="float16")

FP16: ONNX Runtime's own converter (onnxruntime.transformers.float16), with the operators whose
range or accuracy FP16 cannot hold left in FP32: softmax and layer norm, and everything that feeds
a logarithm (the log-mel front end: power spectra pass 65504) or a sine/cosine (the diffusion
time embedding: t up to 1000 has a resolution of 0.5 in FP16).
INT8: ONNX Runtime's quantization tools, per graph either "dynamic" (weights int8, activations
quantised at run time: MatMulInteger / DynamicQuantizeLinear, 7-bit weights) or "static" (QDQ,
symmetric int8, activation scales calibrated on conversations the project generates,
timar_sdk.data.synthetic: the form TensorRT builds INT8 engines from). Only MatMul and Gemm are
quantised; the same front-end and time-embedding nodes, and the denoiser's output layer, stay float.
The defaults (dynamic; the audio encoder left FP32) were chosen by measurement: EVALUATION.md and
BENCHMARKS.md, "Precision".

Every graph keeps float32 inputs and outputs, so runtimes need no change, except the KV cache of
a cached bundle when `cache_dtype="float16"` (a half-size cache in the Python runtime; the C++
runtime casts at encoder_step and keeps a float32 host cache; both read the manifest's
`cache.dtype`). The manifest records each graph's `precision` and the cache's `dtype`; the graphs'
sha256 and manifest.sha256 are rewritten. Needs the export extra (onnx).
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np

from timar_sdk.runtime.bundle import (CACHE_DTYPES, PRECISIONS, Bundle, cache_dtype_of, graph_precision, sha256_of,
                                      write_manifest)

INT8_METHODS = ("dynamic", "static")
# The method per graph, chosen by measurement (EVALUATION.md / BENCHMARKS.md "Precision"): dynamic
# beat static on motion error for both graphs of the shipped model, and on speed. A graph mapped to
# None stays FP32 in an INT8 bundle: the SDK's audio encoder, whose one MatMul (the log-mel
# filterbank) stays float anyway. The authors' wav2vec2 audio encoders were not measured (pass
# int8_methods={"audio_encoder": "dynamic"} to try).
DEFAULT_INT8 = {"audio_encoder": None, "encoder_step": "dynamic", "denoiser": "dynamic",
                "token_embed": "dynamic", "window_encoder": "dynamic"}
FP16_BLOCKED_OPS = ["Softmax", "LayerNormalization"]
FLOAT_ROOTS = ("Log", "Sin", "Cos")       # these and everything feeding them stay float32
CALIBRATION_CALLS = 24                    # recorded calls per graph for static calibration
REDUCE_RANGE = True                       # 7-bit int8 weights (dynamic), see to_int8
# INT8 graphs whose final projections (`output_projections`) stay float: measured on the shipped
# model, the denoiser's output layer is half its INT8 motion error; encoder_step's (the fused qkv
# projections behind the cache output) change the motion by < 1e-4 RMS and are a quarter of its work.
FLOAT_OUTPUT_GRAPHS = {"denoiser"}


def convert_bundle(src, out, precision: str, cache_dtype: str = "float32",
                   int8_methods: dict | str | None = None, calibration_seconds: float = 12.0) -> dict:
    """Write the bundle folder `src` (an FP32 bundle) at `precision` into the new folder `out`.

    precision: "fp32" (only the cache dtype changes), "fp16" or "int8".
    cache_dtype: "float32" or "float16" (cached bundles: the KV cache the runtimes keep, half the
        bytes in float16).
    int8_methods: "dynamic" or "static" for every graph, or {graph: method or None} over
        DEFAULT_INT8 (None keeps that graph FP32).
    calibration_seconds: length of each of the two synthetic calibration conversations ("static").
    Returns the new manifest. Raises ValueError naming the argument for an unknown precision,
    a bundle that is not all FP32 with a float32 cache, or an `out` that exists; nothing is
    written then, and a failure half way leaves no `out` behind.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype: expected one of {CACHE_DTYPES}, got {cache_dtype!r}")
    methods = _int8_methods(int8_methods)
    bundle = Bundle(src)
    m = bundle.manifest
    converted = {n: graph_precision(g) for n, g in m["graphs"].items() if graph_precision(g) != "fp32"}
    if converted or cache_dtype_of(m) != "float32":
        raise ValueError(f"bundle: {bundle.dir} is already converted (graphs {converted or 'fp32'}, cache "
                         f"{cache_dtype_of(m)}); convert the FP32 bundle it came from")
    if cache_dtype == "float16" and m["attention"] != "cached":
        raise ValueError("cache_dtype: 'float16' is for cached bundles; this window_recompute bundle keeps no "
                         "KV cache (its past turns are token embeddings)")
    if precision == "fp32" and cache_dtype == "float32":
        raise ValueError("precision: 'fp32' with a float32 cache is the bundle as it is; ask for fp16, int8 or "
                         "cache_dtype='float16'")
    out = Path(out)
    if out.exists():
        raise ValueError(f"out: {out} exists; expected a new folder")
    import onnx

    cache_io = _cache_io(m) if cache_dtype == "float16" else set()
    calibration = _record_graph_inputs(bundle, calibration_seconds) if (
        precision == "int8" and "static" in methods.values()) else {}
    manifest = copy.deepcopy(m)
    manifest["engines"] = []                 # engines were built from the FP32 graphs
    manifest["converted_from"] = {"bundle_id": bundle.id, "precision": precision, "cache_dtype": cache_dtype}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)                         # mkdtemp's 0700 would follow the bundle
    try:
        for name, entry in manifest["graphs"].items():
            io = cache_io if name == "encoder_step" else set()
            target = tmp / entry["file"]
            reduced = precision == "fp16" or (precision == "int8" and methods.get(name) is not None)
            entry["precision"] = precision if reduced else "fp32"
            if not reduced and not io:           # unchanged: the file as it is
                shutil.copyfile(bundle.graph_path(name), target)
                continue
            model = onnx.load(str(bundle.graph_path(name)))
            if precision == "fp16":
                model = to_fp16(model, io)       # the converter leaves `io` float16
            else:
                if reduced:
                    model = to_int8(model, methods[name], calibration.get(name), tmp,
                                    float_outputs=name in FLOAT_OUTPUT_GRAPHS)
                    entry["quantization"] = methods[name]
                if io:
                    model = _float16_io(model, io)
            onnx.save(model, str(target))
            entry["sha256"] = sha256_of(target)
            for tensor in entry["inputs"] + entry["outputs"]:
                if tensor["name"] in io:
                    tensor["dtype"] = "float16"
        if m["attention"] == "cached":
            manifest["cache"]["dtype"] = cache_dtype
        write_manifest(tmp, manifest)
        for leftover in tmp.iterdir():       # quantisation's scratch files
            if leftover.name not in {e["file"] for e in manifest["graphs"].values()} | {
                    "manifest.json", "manifest.sha256"}:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        Bundle(tmp)                          # the result must load and pass every manifest check
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _int8_methods(value) -> dict:
    if value is None:
        return dict(DEFAULT_INT8)
    if isinstance(value, str):
        if value not in INT8_METHODS:
            raise ValueError(f"int8_methods: expected one of {INT8_METHODS} or a dict, got {value!r}")
        return {k: value for k in DEFAULT_INT8}
    bad = {k: v for k, v in value.items() if k not in DEFAULT_INT8 or v not in (*INT8_METHODS, None)}
    if bad:
        raise ValueError(f"int8_methods: expected {{graph: 'dynamic'|'static'|None}} for graphs "
                         f"{list(DEFAULT_INT8)}, got {bad}")
    return {**DEFAULT_INT8, **value}


def _cache_io(manifest: dict) -> set[str]:
    """encoder_step's cache inputs and its present keys/values output."""
    outputs = [t["name"] for t in manifest["graphs"]["encoder_step"]["outputs"]]
    return set(manifest["cache"]["past_key_values_inputs"]) | {o for o in outputs if o.startswith("present")}


def float_nodes(model) -> list[str]:
    """Names of the nodes that must stay float32: FLOAT_ROOTS and every node feeding one."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep, todo = set(), [n for n in model.graph.node if n.op_type in FLOAT_ROOTS]
    while todo:
        node = todo.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        todo += [producer[i] for i in node.input if i in producer]
    return sorted(keep)


def output_projections(model) -> list[str]:
    """Names of the MatMul/Gemm nodes nearest the graph's outputs (no other MatMul/Gemm, and no
    residual sum, between): the final projections (the denoiser's output layer, the key/value
    projections behind the cache output), kept float in INT8 graphs (measured on the shipped model's denoiser: its
    final linear layer alone is half the INT8 motion error)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constant = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found, seen = set(), set()
    todo = [producer[o.name] for o in model.graph.output if o.name in producer]
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.add(node.name)
            continue
        dynamic = [i for i in node.input if i in producer and i not in constant]
        if node.op_type in ("Add", "Sub") and len(dynamic) > 1:
            continue                         # a residual sum: the earlier layers are not "final"
        todo += [producer[i] for i in dynamic]
    return sorted(found)


def _named(model):
    """`model` with every node named (the converters address nodes by name)."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def to_fp16(model, float16_io: set[str] = frozenset()):
    """`model` in FP16 with float32 inputs/outputs except `float16_io` (see the module docstring)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _named(model)
    names = [v.name for v in list(model.graph.input) + list(model.graph.output)]
    return convert_float_to_float16(model, keep_io_types=[n for n in names if n not in float16_io],
                                    op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_BLOCKED_OPS,
                                    node_block_list=float_nodes(model))


def to_int8(model, method: str, calibration: list[dict] | None, scratch: Path, float_outputs: bool = False):
    """`model` with its MatMul/Gemm quantised to int8 (`method` "dynamic" or "static" QDQ, the
    latter calibrated on `calibration`, a list of input feeds), except `float_nodes` and, with
    `float_outputs`, the `output_projections`."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = _named(model)
    src, pre, dst = scratch / "q_src.onnx", scratch / "q_pre.onnx", scratch / "q_dst.onnx"
    onnx.save(model, str(src))
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    # Pre-processing renames and rewrites nodes: the exclusions are found in its output.
    model = _named(onnx.load(str(pre)))
    onnx.save(model, str(pre))
    exclude = float_nodes(model) + (output_projections(model) if float_outputs else [])
    # The quantiser rewrites a Gemm as "<name>_MatMul" + "<name>_Add" before it looks at the names.
    exclude += [f"{name}_MatMul" for name in exclude]
    common = dict(op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude, per_channel=True)
    if method == "dynamic":
        # 7-bit weights: on x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels can saturate their
        # 16-bit sums with full-range weights (its documentation; measured here: motion RMS error x46).
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE,
                         extra_options={"MatMulConstBOnly": True}, **common)
    else:
        if not calibration:
            raise ValueError("int8_methods: 'static' needs calibration inputs for this graph")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(calibration)

            def get_next(self):
                return next(self.feeds, None)

        # Symmetric int8 activations and weights: the Q/DQ form TensorRT builds INT8 engines from.
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, **common)
    out = onnx.load(str(dst))
    for f in (src, pre, dst):
        f.unlink(missing_ok=True)
    return out


def _float16_io(model, names: set[str]):
    """`model` with the graph inputs/outputs `names` as float16: a Cast to float32 after each such
    input and a Cast to float16 before each such output (for FP32 and INT8 graphs)."""
    from onnx import TensorProto, helper

    graph = model.graph
    head, tail = [], []
    for value, is_input in [(v, True) for v in graph.input] + [(v, False) for v in graph.output]:
        if value.name not in names:
            continue
        inner = value.name + "_f32"
        for node in graph.node:
            ports = node.input if is_input else node.output
            ports[:] = [inner if p == value.name else p for p in ports]
        if is_input:
            head.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT, name=f"cast_{inner}"))
        else:
            tail.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT16,
                                         name=f"cast_{value.name}"))
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _record_graph_inputs(bundle: Bundle, seconds: float) -> dict[str, list[dict]]:
    """The FP32 graphs' input feeds over two synthetic conversations (seeds 101, 102; the
    held-out evaluation split uses seed 1 and training seed 0), at most CALIBRATION_CALLS per graph,
    spread over the conversation."""
    from timar_sdk.conversation import run_conversation
    from timar_sdk.data.synthetic import generate_conversation
    from timar_sdk.runtime.model import Model
    from timar_sdk.runtime.session import Session

    model = Model(bundle, backend="onnxruntime", threads=1)
    backend = model.backend
    feeds: dict[str, list[dict]] = {}

    def record(name: str, fn, make_feed):
        def wrapped(*args):
            feeds.setdefault(name, []).append({k: np.array(v) for k, v in make_feed(*args).items()})
            return fn(*args)
        return wrapped

    backend.encode_audio = record("audio_encoder", backend.encode_audio, lambda w: {"waveform": w})
    backend.denoise = record("denoiser", backend.denoise, lambda x, t, z: {"x_t": x, "t": t, "z": z})
    if model.window:
        backend.embed_turn = record("token_embed", backend.embed_turn, lambda inputs: inputs)
        backend.encode_window = record("window_encoder", backend.encode_window, lambda t: {"tokens": t})
    else:
        backend.encoder_step = record("encoder_step", backend.encoder_step,
                                      lambda inputs, cache: {**inputs, **backend.cache_views(cache)})
    for seed in (101, 102):
        conv = generate_conversation(seconds, seed)
        # Temperature 1: the denoiser sees the noisy inputs of sampling, not only the mean path.
        session = Session(model, seed=seed, temperature=1.0, smoothing=False)
        run_conversation(session, conv["audio1"], conv["motion1"], conv["audio2"], progress=False)
    picked = {}
    for name, calls in feeds.items():
        idx = np.unique(np.linspace(0, len(calls) - 1, min(CALIBRATION_CALLS, len(calls))).astype(int))
        picked[name] = [calls[i] for i in idx]
    return picked
