"""EVALUATION.md's precision quality gate: an FP32 bundle and its reduced-precision conversions on
the held-out synthetic split (clip seeds from seed 1, as scripts/evaluate_synthetic.py), same seed.

    python scripts/evaluate_precision.py --out runs/eval_precision [--bundle DIR] [--clips 16]

The real-speech half: scripts/evaluate_real_speech.py run once per bundle (--bundle, --out DIR,
--json-out FILE), then its figures side by side with their change to FP32, and the motion
difference over every run:

    python scripts/evaluate_precision.py --real-speech fp32=DIR,FILE int8=DIR,FILE fp16=DIR,FILE

Prints, per bundle, the motion difference to FP32 over every clip (max and RMS) and the
DualTalk-protocol metrics side by side with their relative change to FP32; a bundle whose metrics
move by more than GATE (5 %) fails the gate and is not offered as a default. Writes results.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.evaluate import evaluate_dirs, generate_split
from timar_sdk.export.precision import convert_bundle
from timar_sdk.metrics import published_scale
from timar_sdk.runtime.bundle import DEFAULT_BUNDLE

GATE = 0.05
VARIANTS = {"int8": ("int8", "float32"), "fp16": ("fp16", "float32"), "fp16-cache16": ("fp16", "float16"),
            "int8-cache16": ("int8", "float16"), "int8-static": ("int8", "float32")}
# The metrics (scripts/evaluate_synthetic.py's rows). The rPCC rows are near 0 by construction and
# their relative change says little; they are shown and gated on the absolute change below.
ROWS = [("FD-EXP", "fd_exp"), ("FD-JAW x1e3", "fd_jaw"), ("FD-POSE x1e2", "fd_pose"),
        ("MSE-EXP x10", "mse_exp"), ("MSE-JAW x1e3", "mse_jaw"), ("MSE-POSE x1e2", "mse_pose"),
        ("P-FD-EXP", "pfd_exp"), ("SID-EXP", "sid_exp"), ("rPCC-EXP x1e2", "rpcc_exp"),
        ("rPCC-JAW x10", "rpcc_jaw")]


def motion_difference(pred: Path, ref: Path) -> dict:
    diffs = [np.load(p) - np.load(ref / p.name) for p in sorted(pred.glob("*.npy"))]
    d = np.concatenate(diffs)
    return {"max": float(np.abs(d).max()), "rms": float(np.sqrt((d ** 2).mean()))}


def real_speech_table(arms: list[str]) -> None:
    """NAME=OUT_DIR,JSON per bundle (the first is FP32): the mean over the AMI pairs of each figure,
    its change to FP32 relative to max(|FP32 value|, 0.01) (the figures near 0: silent frames, neck
    velocity, are compared on that floor), and the motion difference to FP32 over every run."""
    rows = {}
    for arm in arms:
        name, _, paths = arm.partition("=")
        out_dir, json_file = paths.split(",")
        rows[name] = (Path(out_dir), json.loads(Path(json_file).read_text())[0]["pairs_mean"])
    ref_dir, ref = next(iter(rows.values()))
    figures = [k for k in ref if k != "jaw_r_partner_voice"]
    print("| bundle | motion diff max / RMS | " + " | ".join(figures) + " | worst change | gate |")
    print("|" + "---|" * (len(figures) + 4))
    for name, (out_dir, means) in rows.items():
        diff = motion_difference(next(out_dir.iterdir()), next(ref_dir.iterdir())) if name != next(iter(rows)) else None
        change = {k: (means[k] - ref[k]) / max(abs(ref[k]), 0.01) for k in figures}
        worst = max(abs(v) for v in change.values())
        cells = [f"{means[k]:.4f}" + ("" if diff is None else f" ({100 * change[k]:+.1f} %)") for k in figures]
        print(f"| {name} | " + ("-" if diff is None else f"{diff['max']:.4f} / {diff['rms']:.5f}") + " | "
              + " | ".join(cells) + f" | {100 * worst:.1f} % | {'pass' if worst <= GATE else 'FAIL'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/eval_precision")
    ap.add_argument("--bundle", default=None, help="the FP32 bundle (default: the shipped one)")
    ap.add_argument("--variants", default="int8,fp16", help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--real-speech", nargs="+", default=None, metavar="NAME=OUT_DIR,JSON",
                    help="instead: compare evaluate_real_speech.py runs (the first is FP32)")
    args = ap.parse_args()
    if args.real_speech:
        real_speech_table(args.real_speech)
        return
    out = Path(args.out)
    test = write_synthetic_corpus(out / "data", 0, seconds=args.seconds, seed=1, splits={"test": args.clips}) / "test"
    src = Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
    bundles = {"fp32": src}
    for name in args.variants.split(","):
        precision, cache = VARIANTS[name]
        bundles[name] = out / "bundles" / name
        if not bundles[name].exists():
            convert_bundle(src, bundles[name], precision, cache, "static" if name == "int8-static" else None)
    results = {}
    for name, bundle in bundles.items():
        pred = out / f"pred_{name}"
        generate_split(test, pred, bundle=bundle, backend="onnxruntime", seed=args.seed, progress=False)
        r = evaluate_dirs(pred, test, workers=args.workers)
        results[name] = {"files": r["files"], "published": published_scale(r["metrics"])}
        if name != "fp32":
            results[name]["motion_diff"] = motion_difference(pred, out / "pred_fp32")
    ref = results["fp32"]["published"]
    for name, r in results.items():
        change = {k: (r["published"][k] - ref[k]) / abs(ref[k]) if ref[k] else 0.0 for _, k in ROWS}
        r["relative_change"] = change
        r["worst_change"] = max(abs(v) for v in change.values())
        r["passes_gate"] = r["worst_change"] <= GATE
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| bundle | motion diff max / RMS | " + " | ".join(r[0] for r in ROWS) + " | worst change | gate |")
    print("|" + "---|" * (len(ROWS) + 4))
    for name, r in results.items():
        diff = r.get("motion_diff")
        cells = [f"{r['published'][k]:.3f}" + ("" if name == "fp32" else f" ({100 * r['relative_change'][k]:+.1f} %)")
                 for _, k in ROWS]
        print(f"| {name} | " + (f"{diff['max']:.4f} / {diff['rms']:.5f}" if diff else "-") + " | "
              + " | ".join(cells) + f" | {100 * r['worst_change']:.1f} % | {'pass' if r['passes_gate'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
