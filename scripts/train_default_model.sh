#!/usr/bin/env bash
# Regenerates the shipped default model (timar_sdk/assets/tiny_synthetic.pt) from scratch.
# Synthetic corpus (seed 0, 96 train + 24 val clips of 30 s), tiny preset, CPU, about 35 minutes
# on 2 cores, in two phases (MODEL_CARD.md):
#   1. 2000 steps on windows of 2 turns, batch 8: cheap steps, in which the model learns to read
#      the agent's speech at the same frame (the 9-turn recipe had not after 500 steps);
#   2. 300 steps on windows of 9 turns (W + 1) at the end of the same cosine schedule, so the
#      turn-distance biases of every distance in the context are trained.
# Writes the full checkpoint to runs/ and the slim (EMA, fp16) copy to the package.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
common=(--data synthetic --preset tiny --out runs/tiny_synthetic_full.pt --diffusion-batch-mul 1 --lr 5e-4
        --warmup 100 --synthetic-clips 96 --synthetic-seconds 30 --seed 0)
timar-train "${common[@]}" --steps 2000 --batch-size 8 --turns-per-window 2 --val-every 500
timar-train "${common[@]}" --steps 2300 --batch-size 4 --turns-per-window 9 --val-every 100 \
  --resume runs/tiny_synthetic_full.pt
python -c "from timar_sdk.model.checkpoint import slim_checkpoint as s; s('runs/tiny_synthetic_full.pt', 'timar_sdk/assets/tiny_synthetic.pt')"
