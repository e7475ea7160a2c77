#!/usr/bin/env bash
# Regenerates the shipped default model (timar_sdk/assets/tiny_synthetic.pt) from scratch.
# Speech-like synthetic corpus (timar_sdk.data.speechlike: TTS conversations with phoneme-timed
# mouths; seed 0, 96 train + 24 val clips of 30 s), tiny preset, CPU, in two phases (MODEL_CARD.md):
#   1. 2000 steps on windows of 2 turns, batch 8: cheap steps, in which the model learns to read
#      the agent's speech at the same frame;
#   2. 300 steps on windows of 9 turns (W + 1) at the end of the same cosine schedule, so the
#      turn-distance biases of every distance in the context are trained.
# Needs the TTS voices: apt-get install espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
# Writes the full checkpoint to runs/ and the slim (EMA, fp16) copy to the package.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
[ -d runs/speech_corpus/train ] || \
  python scripts/make_speech_corpus.py --out runs/speech_corpus --train 96 --val 24 --seconds 30 --seed 0
common=(--data runs/speech_corpus --preset tiny --out runs/tiny_synthetic_full.pt --diffusion-batch-mul 1
        --lr 5e-4 --warmup 100 --seed 0)
timar-train "${common[@]}" --steps 2000 --batch-size 8 --turns-per-window 2 --val-every 500
timar-train "${common[@]}" --steps 2300 --batch-size 4 --turns-per-window 9 --val-every 100 \
  --resume runs/tiny_synthetic_full.pt
python -c "from timar_sdk.model.checkpoint import slim_checkpoint as s; s('runs/tiny_synthetic_full.pt', 'timar_sdk/assets/tiny_synthetic.pt')"
