#!/usr/bin/env bash
# Regenerates the shipped default model (timar_sdk/assets/tiny_synthetic.pt) from scratch.
# Synthetic corpus (seed 0, 96 train + 24 val clips of 30 s), tiny preset, CPU, about an hour (500 steps)
# on 2 cores. Writes the full checkpoint to runs/ and the slim (EMA, fp16) copy to the package.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
timar-train --data synthetic --preset tiny --out runs/tiny_synthetic_full.pt \
  --steps "${STEPS:-500}" --diffusion-batch-mul 1 --batch-size 4 --lr 5e-4 --warmup 50 --val-every 100 \
  --synthetic-clips 96 --synthetic-seconds 30 --turns-per-window 9 --seed 0 \
  ${RESUME:+--resume "$RESUME"}
python -c "from timar_sdk.model.checkpoint import slim_checkpoint as s; s('runs/tiny_synthetic_full.pt', 'timar_sdk/assets/tiny_synthetic.pt')"
