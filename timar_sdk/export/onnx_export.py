"""Export a TIMAR model to the bundle of docs/DESIGN.md section 3: ONNX graphs and a manifest.

The SDK's own models ("cached" bundles):
- audio_encoder.onnx  waveform [B, S] -> speech_features [B, F, Da]
- encoder_step.onnx   one turn against a fixed-shape KV cache -> z [B, F, D], present KV
- denoiser.onnx       x_t [N, 56], t [N], z [N, D] -> model_output [N, 112]

The authors' checkpoints ("window_recompute" bundles, timar_sdk.model.authors): audio_encoder,
token_embed (one turn -> tokens [B, P, D]), window_encoder (tokens [B, N, D] -> z [B, F, D]),
denoiser.

Opset 17 (LayerNormalization), constants folded, static shapes except the batch axis (and the
window graph's token axis). The manifests come from timar_sdk.export.manifest.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from timar_sdk.export.manifest import build_manifest, build_window_manifest, check_streamable, with_defaults
from timar_sdk.export.op_support import check_ops
from timar_sdk.model.graphs import (GRAPH_OUTPUTS, STEP_INPUTS, TOKEN_INPUTS, WINDOW_GRAPH_OUTPUTS,
                                    cache_input_names, example_inputs, graph_modules, window_example_inputs,
                                    window_graph_modules)
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.bundle import sha256_of, validate_manifest, write_manifest


def _dynamic_axes(name: str, layers: int = 0) -> dict[str, dict[int, str]]:
    if name == "denoiser":
        return {n: {0: "rows"} for n in ("x_t", "t", "z", "model_output")}
    if name == "audio_encoder":
        return {"waveform": {0: "batch"}, "speech_features": {0: "batch"}}
    axes = {n: {0: "batch"} for n in STEP_INPUTS + cache_input_names(layers) + ["z"]}
    axes["present_key_values"] = {2: "batch"}
    return axes


def _io_spec(model_proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (symbolic axes as strings) of a graph's inputs and outputs."""
    def spec(v):
        tt = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        return {"name": v.name, "dtype": dtype, "shape": shape}
    return [spec(v) for v in model_proto.graph.input], [spec(v) for v in model_proto.graph.output]


def trace_graph(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
                dynamic_axes: dict, opset: int = 17) -> onnx.ModelProto:
    """Export one graph in memory (TorchScript exporter, constants folded) and check it."""
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), tuple(inputs.values()), buf, input_names=list(inputs),
                          output_names=outputs, dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
        traced = module(*inputs.values())
    proto = onnx.load_from_string(buf.getvalue())
    # The exporter leaves some computed output axes symbolic (and names them after another axis,
    # e.g. "batch" for the audio encoder's 25 frames): every axis not declared dynamic is static.
    traced = traced if isinstance(traced, tuple) else (traced,)
    for value, tensor in zip(proto.graph.output, traced):
        dynamic = dynamic_axes.get(value.name, {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis not in dynamic:
                dim.dim_value = tensor.shape[axis]
    onnx.checker.check_model(proto)
    return proto


def trace_graphs(model: Timar, batch: int = 1, opset: int = 17) -> dict[str, onnx.ModelProto]:
    """The bundle's three graphs as in-memory ONNX models."""
    inputs = example_inputs(model, batch)
    return {name: trace_graph(module, inputs[name], GRAPH_OUTPUTS[name], _dynamic_axes(name, model.cfg.depth), opset)
            for name, module in graph_modules(model.eval()).items()}


def export_bundle(model: Timar, out_dir: str | Path, opset: int = 17, batch: int = 1,
                  source: str = "", ema: bool = True, defaults: dict | None = None) -> dict:
    """Write the three graphs and manifest.json into out_dir (replacing an older bundle there).
    Returns the manifest. `batch` is the batch size used for tracing (the axis stays dynamic).
    defaults: the runtimes' default temperature and smoothing (`with_defaults`' arguments)."""
    check_streamable(model)
    if opset < 17:
        raise ValueError(f"opset: expected 17 or newer (LayerNormalization), got {opset}")
    model = model.eval().cpu()
    return _write_bundle(out_dir, trace_graphs(model, batch, opset),
                         lambda graphs: with_defaults(build_manifest(model, graphs, source, ema), **(defaults or {})))


def _write_bundle(out_dir: str | Path, protos: dict[str, onnx.ModelProto], make_manifest,
                  extra_ops: dict[str, frozenset[str]] | None = None) -> dict:
    """Save the graphs, check their ops, write the manifest; the folder appears whole or not at all.
    extra_ops: per graph, operators allowed beyond the portable list (op_support)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    graphs = {}
    for name, proto in protos.items():
        path = tmp / f"{name}.onnx"
        onnx.save(proto, str(path))
        check_ops(path, (extra_ops or {}).get(name, frozenset()))
        ins, outs = _io_spec(proto)
        graphs[name] = {"file": path.name, "sha256": sha256_of(path), "inputs": ins, "outputs": outs}
    manifest = make_manifest(graphs)
    validate_manifest(manifest)
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


def export_window_bundle(model, out_dir: str | Path, opset: int = 17, source: str = "",
                         ema: bool = True, defaults: dict | None = None, fused_attention: bool = True) -> dict:
    """Write a window-recompute bundle for an authors' model (timar_sdk.model.authors.WindowTimar):
    audio_encoder (wav2vec2 + interpolation), token_embed (one turn's tokens), window_encoder
    (the whole window, 1..W turns, dynamic token axis), denoiser; manifest attention
    'window_recompute'.

    fused_attention: window_encoder's attention as ONNX Runtime's MultiHeadAttention
    (com.microsoft domain; every runtime of window bundles runs ONNX Runtime, and TensorRT does
    not build window bundles), faster on the CPU (BENCHMARKS.md); False writes portable
    MatMul/Softmax attention."""
    from timar_sdk.model.authors import FUSED_ATTENTION_OPS

    if opset < 17:
        raise ValueError(f"opset: expected 17 or newer (LayerNormalization), got {opset}")
    if not isinstance(fused_attention, bool):
        raise ValueError(f"fused_attention: expected True or False, got {fused_attention!r}")
    model = model.eval().cpu()
    inputs = window_example_inputs(model)
    axes = {"audio_encoder": _dynamic_axes("audio_encoder"), "denoiser": _dynamic_axes("denoiser"),
            "token_embed": {**{n: {0: "batch"} for n in TOKEN_INPUTS}, "tokens": {0: "batch"}},
            "window_encoder": {"tokens": {0: "batch", 1: "window_tokens"}, "z": {0: "batch"}}}
    before, model.onnx_attention = model.onnx_attention, "fused" if fused_attention else "portable"
    try:
        protos = {name: trace_graph(module, inputs[name], WINDOW_GRAPH_OUTPUTS[name], axes[name], opset)
                  for name, module in window_graph_modules(model).items()}
    finally:
        model.onnx_attention = before
    return _write_bundle(out_dir, protos,
                         lambda graphs: with_defaults(build_window_manifest(model, graphs, source, ema), **(defaults or {})),
                         {"window_encoder": FUSED_ATTENTION_OPS} if fused_attention else None)


def ort_vs_torch(bundle_dir: str | Path, model: Timar, name: str,
                 inputs: dict[str, torch.Tensor]) -> float:
    """Parity harness: max abs difference over all outputs between the ONNX graph in ONNX
    Runtime (CPU) and the same torch module, on the same inputs."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(Path(bundle_dir) / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = graph_modules(model.eval())[name](*inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
