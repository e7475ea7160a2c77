"""How far the runtime's streaming audio normalisation is from the authors' whole-file one.

The authors normalise each whole audio file to zero mean and unit variance before cutting it into
1 s turns; a stream cannot. The runtime uses the statistics of everything heard so far
(`timar_sdk.audio.RunningNorm`). This compares, turn by turn, against whole-file normalisation:
the normalised waveform and the wav2vec2 features the model sees (relative RMS error), for the
running statistics and for per-turn statistics (the other obvious choice).

    python scripts/measure_audio_normalization.py [--wav2vec2 DIR] [--clips 8]

Without --wav2vec2 the features come from a small random wav2vec2 (structure of lv60-self), which
shows how the difference propagates through the architecture, not the trained model's numbers.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from timar_sdk.audio import RunningNorm, load_audio
from timar_sdk.data.dualtalk import list_examples
from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.model.audio_encoder import Wav2Vec2Encoder

TURN = 16000


def whole_file(a: np.ndarray) -> np.ndarray:
    return ((a - a.mean()) / np.sqrt(a.var() + 1e-7)).astype(np.float32)


def running(a: np.ndarray) -> np.ndarray:
    norm, out = RunningNorm(), []
    for i in range(len(a) // TURN):
        turn = a[i * TURN:(i + 1) * TURN]
        norm = norm.update(turn)
        out.append(norm.apply(turn))
    return np.concatenate(out)


def per_turn(a: np.ndarray) -> np.ndarray:
    return np.concatenate([whole_file(a[i * TURN:(i + 1) * TURN]) for i in range(len(a) // TURN)])


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wav2vec2", default=None, help="local wav2vec2 directory (default: a small random one)")
    ap.add_argument("--clips", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="timar-norm-"))
    w2v = args.wav2vec2
    if w2v is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from authors_fixture import write_small_wav2vec2
        w2v = str(write_small_wav2vec2(tmp / "wav2vec2", hidden=64))
    encoder = Wav2Vec2Encoder(w2v, 25).eval()
    data = write_synthetic_corpus(tmp / "data", 0, seconds=20.0, seed=1, splits={"test": args.clips})
    rows = {"running": [], "per_turn": []}      # (turn index, waveform error, feature error)
    for ex in list_examples(data / "test"):
        a = load_audio(ex.agent_wav)
        a = a[:len(a) // TURN * TURN]
        ref = whole_file(a)
        with torch.no_grad():
            f_ref = encoder(torch.from_numpy(ref.reshape(-1, TURN))).numpy()
            for name, fn in (("running", running), ("per_turn", per_turn)):
                x = fn(a)
                f = encoder(torch.from_numpy(x.reshape(-1, TURN))).numpy()
                for i in range(len(a) // TURN):
                    rows[name].append((i, rel(x[i * TURN:(i + 1) * TURN], ref[i * TURN:(i + 1) * TURN]),
                                       rel(f[i], f_ref[i])))
    print(f"{args.clips} clips of 20 s (synthetic, agent side), wav2vec2: {'given' if args.wav2vec2 else 'small random'}")
    print("| normalisation | turns | waveform rel. error: median / p95 | features rel. error: median / p95 "
          "| features, turn 1 / turns 2-4 / turns 10+ (median) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        r = np.array(r)
        by = lambda lo, hi: float(np.median(r[(r[:, 0] >= lo) & (r[:, 0] < hi), 2]))  # noqa: E731
        print(f"| {name} | {len(r)} | {np.median(r[:, 1]):.3f} / {np.percentile(r[:, 1], 95):.3f} | "
              f"{np.median(r[:, 2]):.3f} / {np.percentile(r[:, 2], 95):.3f} | "
              f"{by(0, 1):.3f} / {by(1, 4):.3f} / {by(9, 10 ** 6):.3f} |")


if __name__ == "__main__":
    main()
