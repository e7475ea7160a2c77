"""Per-turn latency of the C++ runtime (timar_bench) against the Python Session on the same
bundle, machine and thread count: one whole turn (audio encoder, encoder step, sampler).

    python runtime/bench/bench_vs_python.py [--bundle DIR] [--turns 50] [--threads 2] [--cfg 1]

Without --bundle: the shipped default bundle, else a tiny random-weight bundle (needs torch).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--build", default=str(ROOT / "runtime" / "build"))
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--cfg", type=float, default=None)
    args = ap.parse_args()

    from timar_sdk.bench import bench_session, random_weight_bundle
    from timar_sdk.runtime.bundle import DEFAULT_BUNDLE
    from timar_sdk.runtime.session import Session

    tmp = None
    bundle = args.bundle
    if bundle is None:
        if (DEFAULT_BUNDLE / "manifest.json").is_file():
            bundle = str(DEFAULT_BUNDLE)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="timar-bench-")
            bundle = str(Path(tmp.name) / "tiny")
            random_weight_bundle("tiny", Path(bundle))
    s = Session(bundle, backend="onnxruntime", threads=args.threads or None, cfg=args.cfg)
    py = bench_session(s, turns=args.turns, warmup=args.warmup)["turn"]
    cmd = [str(Path(args.build) / "timar_bench"), "--bundle", bundle, "--turns", str(args.turns),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--backend", "cpu"]
    if args.cfg is not None:
        cmd += ["--cfg", str(args.cfg)]
    cpp = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"bundle {bundle} ({s.bundle['model']['preset']}), steps {s.steps}, cfg {s.cfg}, "
          f"threads {args.threads or 'default'}, {args.turns} turns")
    print(f"{'runtime':<10}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    print(f"{'python':<10}{py['p50_ms']:>10.2f}{py['p95_ms']:>10.2f}{py['mean_ms']:>10.2f}")
    print(f"{'c++':<10}{cpp['p50_ms']:>10.2f}{cpp['p95_ms']:>10.2f}{cpp['mean_ms']:>10.2f}")
    print(json.dumps({"python": py, "cpp": cpp}))


if __name__ == "__main__":
    main()
