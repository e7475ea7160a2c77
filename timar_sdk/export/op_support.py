"""Operator check for exported graphs: only ops that ONNX Runtime (CPU) and TensorRT 10 both run.

The list lives next to this module in ``supported_ops.json`` (default ONNX domain, opset 17),
with the documents it was built from (``sources``) and the restrictions worth knowing
(``notes``). A graph passes when every node, including nodes inside ``If``/``Loop``/``Scan``
subgraphs and inside model-local functions, is a default-domain op from that list.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Union

import onnx

SUPPORTED_OPS_FILE = Path(__file__).with_name("supported_ops.json")
_DEFAULT_DOMAINS = ("", "ai.onnx")

ModelLike = Union[onnx.ModelProto, str, Path]


@lru_cache(maxsize=1)
def supported_ops_info() -> dict:
    """The parsed ``supported_ops.json``: ``ops``, ``opset``, ``sources``, ``notes``, ``excluded``."""
    return json.loads(SUPPORTED_OPS_FILE.read_text(encoding="utf-8"))


def supported_ops() -> frozenset[str]:
    """Default-domain op types that both runtimes support (opset 17)."""
    return frozenset(supported_ops_info()["ops"])


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    # Weights are irrelevant to the op check: do not pull external data in.
    return onnx.load(str(model), load_external_data=False)


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def used_ops(model: ModelLike) -> set[str]:
    """Every op used by ``model``, as ``"OpType"`` (default domain) or ``"domain:OpType"``.

    Walks the main graph, all nested subgraphs, and the bodies of model-local functions that
    are called (a call to a local function counts as the ops inside it, since ONNX Runtime and
    the TensorRT parser both inline local functions).
    """
    proto = _load(model)
    functions = {(f.domain, f.name): f for f in proto.functions}
    found: set[str] = set()
    expanded: set[tuple[str, str]] = set()

    def visit(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                if key not in expanded:
                    expanded.add(key)
                    visit(functions[key].node)
                continue
            found.add(node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}")
            for g in _subgraphs(node):
                visit(g.node)

    visit(proto.graph.node)
    return found


def unsupported_ops(model: ModelLike) -> list[str]:
    """Sorted ops of ``model`` (a ``ModelProto`` or a path) that are not in the supported list.

    Ops from any non-default domain (``com.microsoft``, custom domains) are always unsupported
    and are reported as ``"domain:OpType"``.
    """
    ok = supported_ops()
    return sorted(op for op in used_ops(model) if op not in ok)


def check_ops(path: Union[str, Path], allowed: frozenset[str] = frozenset()) -> None:
    """Raise ``ValueError`` naming ``path`` and its unsupported ops, if it has any beyond
    ``allowed`` (ops this graph may use although not every runtime has them, as reported by
    ``unsupported_ops``, e.g. ``"com.microsoft:MultiHeadAttention"``)."""
    bad = [op for op in unsupported_ops(path) if op not in allowed]
    if bad:
        also = f", and {', '.join(sorted(allowed))} in this graph" if allowed else ""
        raise ValueError(
            f"{path}: operator(s) not supported by both ONNX Runtime (CPU) and TensorRT 10: "
            f"{', '.join(bad)} (supported list: {SUPPORTED_OPS_FILE.name}{also})"
        )
