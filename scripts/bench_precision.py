"""Per-turn latency of a bundle at several precisions, interleaved in time (BENCHMARKS.md "Precision").

The FP32 bundle (the shipped one, or a random-weight preset exported here) is converted to each
asked precision; every bundle gets its own Session in this process and the sessions take turns,
a few turns each, for many rounds, so they all see the same (shared, 2-core) machine at nearly
the same time. Also the CPU time of each turn (time.process_time: the work done, which waiting for
a busy core does not inflate), each session's cache memory and the motion difference to FP32 over
the timed turns (same seed, same inputs).

    python scripts/bench_precision.py --work /tmp/prec_tiny --rounds 20
    python scripts/bench_precision.py --preset base --work /tmp/prec_base --rounds 12 --turns-per-round 3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from timar_sdk import Model, Session
from timar_sdk.export.precision import convert_bundle
from timar_sdk.runtime.bundle import DEFAULT_BUNDLE

VARIANTS = {"fp32": ("fp32", "float32"), "fp32-cache16": ("fp32", "float16"), "fp16": ("fp16", "float32"),
            "fp16-cache16": ("fp16", "float16"), "int8": ("int8", "float32"), "int8-static": ("int8", "float32"),
            "int8-cache16": ("int8", "float16")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the bundles (reused when present)")
    ap.add_argument("--preset", default=None, choices=["tiny", "base", "large"],
                    help="a random-weight preset exported here (default: the shipped tiny bundle)")
    ap.add_argument("--variants", default="fp32,int8,fp16", help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--turns-per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = DEFAULT_BUNDLE
    if args.preset:
        from timar_sdk.bench import random_weight_bundle
        src = work / f"{args.preset}_fp32"
        if not src.exists():
            random_weight_bundle(args.preset, src)
    bundles = {}
    for name in args.variants.split(","):
        precision, cache = VARIANTS[name]
        path = src if name == "fp32" else work / name
        if not path.exists():
            convert_bundle(src, path, precision, cache, "static" if name == "int8-static" else None)
        bundles[name] = path
    threads = args.threads or None
    sessions = {k: Session(Model(p, backend="onnxruntime", threads=threads), seed=0, smoothing=False)
                for k, p in bundles.items()}
    first = next(iter(sessions.values()))
    n, f = first.samples, first.frames
    rng = np.random.default_rng(0)
    total = args.rounds * args.turns_per_round + first.bundle["context_turns"]
    noise = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    inputs = [(noise(n), noise(f, 56), noise(n)) for _ in range(total)]
    warm = first.bundle["context_turns"]
    outputs = {k: [] for k in sessions}
    for k, s in sessions.items():                       # fill the context window first
        for i in range(warm):
            outputs[k].append(s.step(*inputs[i]))
    times = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}     # CPU seconds of this process: the work, less the waiting
    i = warm
    for r in range(args.rounds):
        order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
        for k in order:
            for j in range(args.turns_per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                out = sessions[k].step(*inputs[i + j])
                times[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.process_time() - c0) * 1e3)
                outputs[k].append(out)
        i += args.turns_per_round
    ref = np.concatenate(outputs[next(iter(sessions))])
    result = {}
    base_p50 = base_cpu = None
    for k, t in times.items():
        d = np.concatenate(outputs[k]) - ref
        p50, p95 = float(np.percentile(t, 50)), float(np.percentile(t, 95))
        cpu50 = float(np.percentile(cpu[k], 50))
        base_p50, base_cpu = base_p50 or p50, base_cpu or cpu50
        result[k] = {"p50_ms": p50, "p95_ms": p95, "ratio_p50": p50 / base_p50, "turns": len(t),
                     "cpu_p50_ms": cpu50, "ratio_cpu_p50": cpu50 / base_cpu,
                     "state_mb": sessions[k].state_bytes / 1e6, "max_diff": float(np.abs(d).max()),
                     "rms_diff": float(np.sqrt((d ** 2).mean())), "motion_rms": float(np.sqrt((ref ** 2).mean()))}
        print(f"{k:14s} p50 {p50:8.1f} ms  p95 {p95:8.1f} ms  x{p50 / base_p50:.2f}  CPU p50 {cpu50:8.1f} ms  "
              f"x{cpu50 / base_cpu:.2f}  cache "
              f"{result[k]['state_mb']:.2f} MB  motion diff max {result[k]['max_diff']:.2e} rms "
              f"{result[k]['rms_diff']:.2e}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
