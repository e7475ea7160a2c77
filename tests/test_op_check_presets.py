"""Every op of every graph of the tiny, base and large presets is supported by both ONNX Runtime
(CPU) and TensorRT's ONNX parser (random weights; traced in memory, nothing written)."""
import pytest
import torch

from timar_sdk.export.onnx_export import trace_graphs
from timar_sdk.export.op_support import unsupported_ops
from timar_sdk.model.config import preset
from timar_sdk.model.timar import Timar


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", pytest.param("base", marks=pytest.mark.heavy),
                                  pytest.param("large", marks=pytest.mark.heavy)])
def test_exported_presets_use_only_supported_ops(name):
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Timar(preset(name))
    graphs = trace_graphs(model)
    assert set(graphs) == {"audio_encoder", "encoder_step", "denoiser"}
    for graph, proto in graphs.items():
        assert unsupported_ops(proto) == [], graph
        ops = {n.op_type for n in proto.graph.node}
        assert "LayerNormalization" in ops or graph == "audio_encoder"
        assert "STFT" not in ops and "Loop" not in ops and "If" not in ops
