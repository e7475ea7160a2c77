"""How far the runtime's streaming audio normalisation is from the authors' whole-file one.

The authors normalise each whole audio file to zero mean and unit variance before cutting it into
1 s turns; a stream cannot. The runtime uses the statistics of everything heard so far
(`timar_sdk.audio.RunningNorm`), optionally primed before the first turn
(`Session.prime_audio_normalization`). This compares, turn by turn, against whole-file
normalisation of the streamed conversation: the normalised waveform and the wav2vec2 features
the model sees (relative RMS error), for

- running: running statistics from nothing (the runtime's default);
- per turn: each turn's own statistics (the other obvious choice);
- primed, calibration clip: running statistics started from a clip of the same speaker heard
  just before the stream (`RunningNorm.from_audio`, the first --calibration seconds of each
  clip; the stream is the rest);
- primed, application statistics: started from a mean and variance the application knows
  (`RunningNorm.from_stats`, here: the level of the *other* clips of the corpus, weighted as
  --calibration seconds of audio).

    python scripts/measure_audio_normalization.py [--wav2vec2 DIR | --structure lv60-large|small]
        [--clips 4] [--seconds 20] [--calibration 5]

Without --wav2vec2 the features come from a randomly initialised wav2vec2: `lv60-large` (the
default) has exactly the structure of facebook/wav2vec2-large-960h-lv60-self (24 layers of 1024,
7 convolutions of 512 channels with conv_bias, a layer norm after each); `small` keeps those
convolution settings (conv_bias, layer norm, 512 channels; they decide how the input's level
reaches the features) with a 2-layer, 256-wide encoder, to run faster. Random weights show how the
difference propagates through the architecture, not the trained model's numbers.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from timar_sdk.audio import RunningNorm, load_audio
from timar_sdk.data.dualtalk import list_examples
from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.model.audio_encoder import Wav2Vec2Encoder

TURN = 16000


def random_wav2vec2(directory: Path, structure: str) -> Path:
    """A randomly initialised wav2vec2 saved with save_pretrained (see the module docstring)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    conv = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True)
    if structure == "lv60-large":
        enc = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
    else:
        enc = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                   num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**conv, **enc)).eval().save_pretrained(directory)
    return directory


def whole_file(a: np.ndarray) -> np.ndarray:
    return ((a - a.mean()) / np.sqrt(a.var() + 1e-7)).astype(np.float32)


def running(a: np.ndarray, norm: RunningNorm) -> np.ndarray:
    out = []
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
    ap.add_argument("--wav2vec2", default=None, help="local wav2vec2 directory (default: a random one)")
    ap.add_argument("--structure", choices=["lv60-large", "small"], default="lv60-large",
                    help="structure of the random wav2vec2 (without --wav2vec2)")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="streamed seconds per clip")
    ap.add_argument("--calibration", type=float, default=5.0,
                    help="seconds of calibration audio before each stream (and the weight of the given statistics)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="timar-norm-"))
    w2v = args.wav2vec2 or str(random_wav2vec2(tmp / "wav2vec2", args.structure))
    encoder = Wav2Vec2Encoder(w2v, 25).eval()
    cal = int(args.calibration * TURN)
    data = write_synthetic_corpus(tmp / "data", 0, seconds=args.seconds + args.calibration, seed=1,
                                  splits={"test": args.clips})
    clips = []
    for ex in list_examples(data / "test"):                   # agent side of each conversation
        a = load_audio(ex.agent_wav)
        clips.append((a[:cal], a[cal:cal + (len(a) - cal) // TURN * TURN]))
    streams = [s.astype(np.float64) for _, s in clips]
    methods = {"running": lambda k: RunningNorm(),
               "per turn": None,
               "primed, calibration clip": lambda k: RunningNorm.from_audio(clips[k][0]),
               # the application's statistics: the level of the other clips (leave-one-out)
               "primed, application statistics": lambda k: RunningNorm.from_stats(
                   np.concatenate([s for j, s in enumerate(streams) if j != k]).mean(),
                   np.concatenate([s for j, s in enumerate(streams) if j != k]).var(), cal)}
    rows = {name: [] for name in methods}      # (turn index, waveform error, feature error)
    for k, (_, a) in enumerate(clips):
        ref = whole_file(a)
        with torch.no_grad():
            f_ref = encoder(torch.from_numpy(ref.reshape(-1, TURN))).numpy()
            for name, start in methods.items():
                x = per_turn(a) if start is None else running(a, start(k))
                f = encoder(torch.from_numpy(x.reshape(-1, TURN))).numpy()
                for i in range(len(a) // TURN):
                    rows[name].append((i, rel(x[i * TURN:(i + 1) * TURN], ref[i * TURN:(i + 1) * TURN]),
                                       rel(f[i], f_ref[i])))
    source = args.wav2vec2 or f"random, {args.structure} structure (conv_bias true)"
    print(f"{args.clips} clips (synthetic, agent side): {args.calibration:g} s calibration + {args.seconds:g} s "
          f"stream; wav2vec2: {source}; {time.time() - t0:.0f} s")
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
