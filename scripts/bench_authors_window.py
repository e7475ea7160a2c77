"""Per-turn time of the authors' window-recompute model: ONNX Runtime bundles against the same
model in eager torch, measured in one process, interleaved (issue 16 item 4).

Builds the authors' structure (default timar_base: 768 x 24, 12 heads) with random weights and a
randomly initialised wav2vec2 of wav2vec2-large-960h-lv60-self's structure (the real weights
cannot be downloaded here), exports it twice into --workdir (window graph with fused attention,
the default, and with portable MatMul/Softmax attention) and times, round-robin, repeated:

- per turn: `Session.step` on each bundle (ONNX Runtime) and on the torch model
  (`Model.from_torch`, the same loop in eager torch), after enough warm-up turns to fill the
  window (every measured turn runs the full W*110-token window);
- the window encoder alone: the bundle's window_encoder graph on a full window against the torch
  model's `forward_window` (their transformer: positions, blocks, norm).

--bundle adds any other bundle of the same structure (e.g. an FP16 or INT8 conversion of the fused
one) to both comparisons. Prints a table and writes --json. Memory: timar_base with wav2vec2-large
needs about 2 GB per copy (torch model, each bundle); exporting peaks near 7 GB.

    python scripts/bench_authors_window.py --workdir /tmp/authors_bench --turns 10 --window-reps 10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _stats(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def build_model(preset: str, workdir: Path, seed: int = 0):
    """The authors' structure with random weights (every parameter non-zero) and a random
    wav2vec2-large (lv60-self structure) saved under workdir."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from timar_sdk.model.authors import AUTHORS_PRESETS, WindowTimar, WindowTimarConfig

    w2v = workdir / "wav2vec2-large-lv60-random"
    if not (w2v / "config.json").is_file():
        torch.manual_seed(seed)
        Wav2Vec2Model(Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, do_stable_layer_norm=True, feat_extract_norm="layer",
                                     conv_bias=True)).save_pretrained(w2v)
    width, depth, heads = AUTHORS_PRESETS[preset]
    torch.manual_seed(seed)
    model = WindowTimar(WindowTimarConfig(preset=preset, width=width, depth=depth, heads=heads,
                                          wav2vec2_path=str(w2v))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("audio_encoder."):
                p.add_(torch.randn_like(p) * 0.02)     # the constructor leaves some at zero
    return model


def _turns(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield ((rng.standard_normal(16000) * 0.1).astype(np.float32),
               (rng.standard_normal((25, 56)) * 0.1).astype(np.float32),
               (rng.standard_normal(16000) * 0.05).astype(np.float32))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="where the random-weight bundles are written")
    ap.add_argument("--preset", default="timar_base", help="the authors' model (timar_base, timar_large)")
    ap.add_argument("--bundle", action="append", default=[], type=Path,
                    help="another bundle of the same structure to time beside them (repeatable)")
    ap.add_argument("--turns", type=int, default=10, help="measured turns per variant (0: window encoder only)")
    ap.add_argument("--window-reps", type=int, default=10, help="window-encoder-alone runs per variant")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads, ONNX Runtime and torch")
    ap.add_argument("--reuse", action="store_true", help="use bundles already in --workdir (same seed)")
    ap.add_argument("--no-portable", action="store_true", help="skip the portable-attention bundle")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    for name, least in (("turns", 0), ("window_reps", 1), ("threads", 1)):
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= {least}, got {getattr(args, name)}")
    for b in args.bundle:
        if not (b / "manifest.json").is_file():
            ap.error(f"--bundle: expected a bundle folder with manifest.json, got {b}")

    import torch

    from timar_sdk.export.onnx_export import export_window_bundle
    from timar_sdk.runtime.model import Model
    from timar_sdk.runtime.session import Session

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    model = build_model(args.preset, args.workdir)
    bundles = {"onnx fused attention": args.workdir / f"{args.preset}_fused"}
    if not args.no_portable:
        bundles["onnx portable attention"] = args.workdir / f"{args.preset}_portable"
    for label, path in bundles.items():
        if not (args.reuse and (path / "manifest.json").is_file()):
            say(f"exporting {path}")
            export_window_bundle(model, path, source="random weights", fused_attention="fused" in label)
    bundles.update({f"bundle {b}": b for b in args.bundle})

    say("loading")
    models = {label: Model(path, backend="onnxruntime", threads=args.threads) for label, path in bundles.items()}
    models["torch eager"] = Model.from_torch(model, threads=args.threads)
    sessions = {label: Session(m, seed=1) for label, m in models.items()}
    warmup = model.cfg.context_turns
    turns = list(_turns(warmup + args.turns, seed=0)) if args.turns else []
    per_turn = {label: [] for label in sessions}
    cpu_turn = {label: [] for label in sessions}       # process CPU seconds: the work, less the waiting
    outputs = {label: [] for label in sessions}
    for k, turn in enumerate(turns):
        for label, s in sessions.items():          # round-robin: every variant sees the same load
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[label].append(s.step(*turn))
            if k >= warmup:
                per_turn[label].append(time.perf_counter() - t0)
                cpu_turn[label].append(time.process_time() - c0)
        say(f"turn {k + 1}/{len(turns)}", {label: f"{v[-1]:.2f}s" for label, v in per_turn.items() if v})
    motion_diff = {label: float(np.abs(np.stack(o) - np.stack(outputs["torch eager"])).max()) if turns else float("nan")
                   for label, o in outputs.items()}

    tokens = torch.randn(1, warmup * model.cfg.tokens_per_turn, model.cfg.width,
                         generator=torch.Generator().manual_seed(1))
    window = {label: [] for label in models}
    cpu_window = {label: [] for label in models}
    window_diff = {}
    with torch.no_grad():
        want = model.forward_window(tokens).numpy()
        for r in range(args.window_reps + 1):
            for label, m in models.items():
                t0, c0 = time.perf_counter(), time.process_time()
                if label == "torch eager":
                    got = model.forward_window(tokens).numpy()
                else:
                    got = m.backend.sessions["window_encoder"].run(None, {"tokens": tokens.numpy()})[0]
                if r > 0:                           # the first run of each is warm-up
                    window[label].append(time.perf_counter() - t0)
                    cpu_window[label].append(time.process_time() - c0)
                window_diff[label] = float(np.abs(got.astype(np.float32) - want).max())

    result = {"preset": args.preset, "threads": args.threads, "window_tokens": int(tokens.shape[1]),
              "load_average_at_end": os.getloadavg(), "cpus": os.cpu_count(),
              "per_turn": {label: _stats(v) for label, v in per_turn.items() if v},
              "window_encoder": {label: _stats(v) for label, v in window.items()},
              "per_turn_cpu": {label: _stats(v) for label, v in cpu_turn.items() if v},
              "window_encoder_cpu": {label: _stats(v) for label, v in cpu_window.items()},
              "max_motion_diff_vs_torch": motion_diff, "max_window_z_diff_vs_torch": window_diff,
              "bundles": {label: str(p) for label, p in bundles.items()}}
    t_turn = result["per_turn"]["torch eager"]["p50_ms"] if turns else float("nan")
    t_win = result["window_encoder"]["torch eager"]["p50_ms"]
    print(f"{'variant':40s} {'turn p50':>9s} {'p95':>8s} {'/torch':>7s} {'window p50':>11s} {'p95':>8s} "
          f"{'/torch':>7s} {'motion diff':>11s}")
    for label in models:
        pt, w = result["per_turn"][label] if turns else {"p50_ms": np.nan, "p95_ms": np.nan}, result["window_encoder"][label]
        print(f"{label:40s} {pt['p50_ms']:9.0f} {pt['p95_ms']:8.0f} {pt['p50_ms'] / t_turn:7.2f} "
              f"{w['p50_ms']:11.0f} {w['p95_ms']:8.0f} {w['p50_ms'] / t_win:7.2f} {motion_diff[label]:11.2e}")
    print("process CPU seconds p50 (all threads; torch's OpenMP threads spin while waiting, which counts):")
    for label in models:
        cpu = result["per_turn_cpu"].get(label, {}).get("p50_ms", np.nan)
        print(f"  {label:38s} turn {cpu:9.0f} ms   window {result['window_encoder_cpu'][label]['p50_ms']:9.0f} ms")
    print(f"load average at the end: {result['load_average_at_end']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
