"""EVALUATION.md's ablation rows: models trained like the shipped one but with the MLP head or
full bidirectional attention, on the same held-out synthetic test split as evaluate_synthetic.py.

Every model generates in torch. The shipped model streams through the runtime's Session on its
torch modules (Model.from_torch, the same path as timar-generate; it equals the bundle to ~1e-3).
Neither ablation can stream (an MLP head has no sampler; full attention cannot use a cache), so
they run through the full forward: every turn reruns the whole history (full_forward_motion, which
the tests hold equal to the Session's cache for models that stream).

    python scripts/evaluate_ablations.py --ckpt mlp=runs/ablations/tiny_mlp.pt \
        --ckpt full=runs/ablations/tiny_full.pt --out runs/eval_ablations [--clips 12]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from timar_sdk.audio import load_audio
from timar_sdk.data.dualtalk import list_examples, motion_from_npz
from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.evaluate import evaluate_dirs, generate_split
from timar_sdk.export.manifest import in_memory_bundle
from timar_sdk.metrics import published_scale
from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT, load_model
from timar_sdk.model.full_forward import full_forward_motion
from timar_sdk.runtime.rng import PhiloxNormal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_synthetic import markdown_table  # noqa: E402


def generate(model, test_dir: Path, out: Path, seed: int = 0) -> None:
    """One .npy per example: the agent's motion, turn by turn, from the torch model."""
    cfg = model.cfg
    if cfg.head == "diffusion" and cfg.attention == "band":
        generate_split(test_dir, out, bundle=in_memory_bundle(model), backend="torch", seed=seed, progress=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    s, f = cfg.samples_per_turn, cfg.frames_per_turn
    for ex in list_examples(test_dir):
        if (out / f"{ex.name}.npy").exists():
            continue
        ua, aa = load_audio(ex.user_wav), load_audio(ex.agent_wav)
        um = motion_from_npz(ex.user_npz)
        turns = min(len(ua) // s, len(aa) // s, len(um) // f)
        motion = full_forward_motion(model, ua[:turns * s].reshape(turns, s), list(um[:turns * f].reshape(turns, f, -1)),
                                     aa[:turns * s].reshape(turns, s), PhiloxNormal(seed),
                                     temperature=cfg.temperature, cfg=cfg.cfg, history=cfg.history)
        np.save(out / f"{ex.name}.npy", motion.reshape(-1, motion.shape[-1]).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", default=[], help="name=checkpoint (repeatable)")
    ap.add_argument("--out", default="runs/eval_ablations")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    data = write_synthetic_corpus(out / "data", 0, seconds=args.seconds, seed=1, splits={"test": args.clips})
    test = data / "test"
    models = {"TIMAR tiny (shipped)": DEFAULT_CHECKPOINT}
    models.update(dict(item.split("=", 1) for item in args.ckpt))
    results = {}
    for name, path in models.items():
        model = load_model(path)
        pred = out / ("pred_" + "".join(c if c.isalnum() else "_" for c in name))
        generate(model, test, pred)
        r = evaluate_dirs(pred, test, workers=args.workers)
        results[name] = {"files": r["files"], "published": published_scale(r["metrics"]),
                         "head": model.cfg.head, "attention": model.cfg.attention}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown_table(results))

if __name__ == "__main__":
    main()
