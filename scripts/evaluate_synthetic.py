"""EVALUATION.md's numbers: the shipped bundle vs simple baselines and the context experiment,
on a held-out synthetic test split (clip seeds from seed 1; training used seed 0).

    python scripts/evaluate_synthetic.py --out runs/eval [--clips 16] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from timar_sdk.data.dualtalk import list_examples, motion_from_npz
from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.evaluate import evaluate_dirs, generate_split
from timar_sdk.metrics import published_scale
from timar_sdk.runtime.bundle import Bundle

ROWS = [("FD-EXP", "fd_exp"), ("FD-JAW x1e3", "fd_jaw"), ("FD-POSE x1e2", "fd_pose"),
        ("MSE-EXP x10", "mse_exp"), ("MSE-JAW x1e3", "mse_jaw"), ("MSE-POSE x1e2", "mse_pose"),
        ("P-FD-EXP", "pfd_exp"), ("SID-EXP", "sid_exp"), ("rPCC-EXP x1e2", "rpcc_exp"),
        ("rPCC-JAW x10", "rpcc_jaw")]


def markdown_table(results: dict) -> str:
    """{method: {"files": n, "published": metrics}} -> EVALUATION.md's table."""
    lines = ["| method | files | " + " | ".join(r[0] for r in ROWS) + " |", "|" + "---|" * (len(ROWS) + 2)]
    lines += [f"| {name} | {r['files']} | " + " | ".join(f"{r['published'][k]:.2f}" for _, k in ROWS) + " |"
              for name, r in results.items()]
    return "\n".join(lines)


def write_baselines(test_dir: Path, out: Path, mean: np.ndarray, seed: int = 0) -> dict[str, Path]:
    """Mean motion, the partner's motion copied, and the ground truth shifted by a random turn."""
    rng = np.random.default_rng(seed)
    dirs = {k: out / k for k in ("mean_motion", "partner_copy", "gt_shifted_random_turn")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for ex in list_examples(test_dir):
        gt = motion_from_npz(ex.agent_npz)
        partner = motion_from_npz(ex.user_npz)
        t = min(len(gt), len(partner)) // 25 * 25
        np.save(dirs["mean_motion"] / f"{ex.name}.npy", np.repeat(mean[None], t, 0).astype(np.float32))
        np.save(dirs["partner_copy"] / f"{ex.name}.npy", partner[:t].astype(np.float32))
        shift = 25 * int(rng.integers(1, max(2, t // 25)))
        np.save(dirs["gt_shifted_random_turn"] / f"{ex.name}.npy", np.roll(gt[:t], shift, axis=0).astype(np.float32))
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    data = write_synthetic_corpus(out / "data", 0, seconds=args.seconds, seed=1, splits={"test": args.clips})
    test = data / "test"
    bundle = Bundle()
    preds = {"timar (shipped, n=7)": out / "pred_full"}
    generate_split(test, preds["timar (shipped, n=7)"], progress=False)
    for n in (0, 1, 3):
        preds[f"timar context n={n}"] = out / f"pred_n{n}"
        generate_split(test, preds[f"timar context n={n}"], context_turns=n, progress=False)
    preds.update(write_baselines(test, out / "baselines", bundle.motion_mean))
    results = {}
    for name, d in preds.items():
        r = evaluate_dirs(d, test, workers=args.workers)
        results[name] = {"files": r["files"], "published": published_scale(r["metrics"])}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
