"""A/B per-turn latency of two (or more) timar-sdk checkouts, interleaved in time.

The 2-core machines this project runs on are shared: the same command drifts by +-20 % within
minutes, so two `timar-bench` runs made one after the other cannot show a 2 ms difference. Here
each checkout runs in its own worker process on its own default bundle; the workers take turns,
a few turns each, for many rounds, so both see the same machine at (nearly) the same time.

    git worktree add /tmp/base HEAD~1
    python scripts/bench_ab.py base=/tmp/base new=. --rounds 25 --turns-per-round 10

Prints per-turn p50/p95 for each arm and the ratio of p50s against the first arm.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = r"""
import json, sys, time
import numpy as np
from timar_sdk import Session
session = Session(backend="onnxruntime", threads=int(sys.argv[1]) or None)
rng = np.random.default_rng(0)
n, f = session.samples, session.frames
turns = [((rng.standard_normal(n) * 0.1).astype(np.float32), (rng.standard_normal((f, 56)) * 0.1).astype(np.float32),
          (rng.standard_normal(n) * 0.1).astype(np.float32)) for _ in range(16)]
for i in range(session.bundle["context_turns"] + 2):      # fill the cache first
    session.step(*turns[i % 16])
print("ready", flush=True)
i = 0
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        session.step(*turns[i % 16])
        times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    print(json.dumps(times), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", help="NAME=CHECKOUT_DIR, two or more")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--turns-per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    args = ap.parse_args()

    workers = {}
    for arm in args.arms:
        name, _, checkout = arm.partition("=")
        root = Path(checkout).resolve()
        if not (root / "timar_sdk" / "__init__.py").is_file():
            sys.exit(f"{arm}: expected NAME=DIR with DIR a timar-sdk checkout")
        env = {**os.environ, "PYTHONPATH": str(root)}    # this checkout's package, not the installed one
        workers[name] = subprocess.Popen([sys.executable, "-c", WORKER, str(args.threads)], cwd=root, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if workers[name].stdout.readline().strip() != "ready":
            sys.exit(f"{arm}: the worker did not start")
    times = {name: [] for name in workers}
    for _ in range(args.rounds):
        for name, proc in workers.items():
            time.sleep(0.05)
            proc.stdin.write(f"{args.turns_per_round}\n")
            proc.stdin.flush()
            times[name] += json.loads(proc.stdout.readline())
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    first = float(np.median(next(iter(times.values()))))
    for name, t in times.items():
        p50 = float(np.median(t))
        print(f"{name}: per turn p50 {p50:.2f} ms, p95 {np.percentile(t, 95):.2f} ms over {len(t)} turns; "
              f"{p50 / first:.2f}x the first arm")


if __name__ == "__main__":
    main()
