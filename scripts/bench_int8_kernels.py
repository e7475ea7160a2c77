"""One graph of a bundle under ONNX Runtime's INT8 forms, called directly and interleaved:
FP32, the INT8 bundle's graph (timar-convert's dynamic quantisation: MatMulInteger), and
weight-only MatMulNBits (8-bit and 4-bit blocks; accuracy_level 4 = int8 arithmetic, 1 = float).
Random inputs shaped like one turn (batch 1). BENCHMARKS.md "Precision" records the result.

    python scripts/bench_int8_kernels.py --fp32 BUNDLE_FP32 --int8 BUNDLE_INT8 --work /tmp/nbits
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

NBITS = {"nbits8_int8": (8, 4), "nbits4_int8": (4, 4), "nbits8_float": (8, 1)}   # name: (bits, accuracy_level)
BLOCK = 32


def nbits_graph(src: Path, out: Path, bits: int, level: int) -> Path:
    """src's MatMul weights as symmetric `bits`-bit blocks of BLOCK (written once to `out`)."""
    if not out.exists():
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=BLOCK, is_symmetric=True,
                                 accuracy_level=level)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def random_inputs(session: ort.InferenceSession) -> dict:
    """Every input at batch 1 (the other dynamic axes too), float N(0, 0.1) or int64 zeros."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = ((rng.standard_normal(shape) * 0.1).astype(np.float32) if "float" in i.type
                         else np.zeros(shape, np.int64))
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", type=Path, required=True, help="FP32 bundle folder")
    ap.add_argument("--int8", type=Path, required=True, help="the same bundle after timar-convert --precision int8")
    ap.add_argument("--work", type=Path, required=True, help="folder for the MatMulNBits graphs")
    ap.add_argument("--graph", default="encoder_step")
    ap.add_argument("--rounds", type=int, default=12)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.fp32 / f"{a.graph}.onnx"
    paths = {"fp32": src, "int8_dynamic": a.int8 / f"{a.graph}.onnx"}
    paths |= {name: nbits_graph(src, a.work / f"{a.graph}_{name}.onnx", bits, level)
              for name, (bits, level) in NBITS.items()}
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    feeds = random_inputs(sessions["fp32"])
    reference = sessions["fp32"].run(None, feeds)
    times: dict = {k: [] for k in sessions}
    for r in range(a.rounds):
        for k in list(sessions)[::1 if r % 2 == 0 else -1]:        # alternate the order
            t = time.perf_counter()
            out = sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t)
            if r == 0:
                diff = max(float(np.abs(x - y).max()) for x, y in zip(out, reference))
                print(f"{k:14s} max output difference to FP32 {diff:.3e}")
    base = np.median(times["fp32"])
    for k, t in times.items():
        print(f"{a.graph} {k:14s} p50 {np.median(t) * 1e3:8.1f} ms  x{np.median(t) / base:.2f}  "
              f"p95 {np.percentile(t, 95) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
