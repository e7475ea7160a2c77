"""Dataset-wide generation and evaluation in the DualTalk protocol (docs/DESIGN.md sections 6
and 7).

    timar-generate --data DATA/test --out PRED [--bundle B] [--context-turns N] [--seed S]
    timar-eval --pred PRED --gt DATA/test [--json | --json-out metrics.json] [--workers N]

Generation (:func:`generate_split`): every example of a DualTalk folder (each clip's speaker as
the agent once, the partner as the user) runs through one :class:`~timar_sdk.Session`, reset to
its seed before each file, so a file's prediction does not depend on which files ran before it
(a resumed run gives the same motion as an uninterrupted one). The inputs are the user's audio
and tracked motion and the agent's audio, raw as the loaders return them; the output
`<clip>_speakerX.npy` (T, 56) float32 is named after the agent, with T = frames_per_turn *
floor(shortest of user audio, agent audio, user motion in turns), the authors' length (25 *
whole seconds). The agent's own ground truth is not read. Predictions are written atomically
(temporary file, then rename), existing ones are skipped, and the settings are recorded in
`timar-generate.json` so that a run with other settings (bundle, seed, context) refuses to mix its
predictions into the folder. A file that cannot be read or run is recorded and the run goes on.

Evaluation (:func:`evaluate_dirs`): each `<clip>_speakerX.npy` prediction is paired with its
ground truth `<clip>_speakerX.npz` and its partner's `<clip>_speakerY.npz` by name; predictions
with NaN are skipped and listed (as the reference driver drops them); metrics are
:func:`timar_sdk.metrics.compute_metrics` per file, averaged over files.

Exit codes: both commands exit 0 when every file was handled and 1 when any file failed
(timar-generate: a file could not be read or run; timar-eval: a prediction or ground truth
could not be read or scored, or no file could be scored). The summary names each failed file
and its reason either way, and the finished files stay usable. Predictions skipped for NaN and
predictions without ground truth are listed but are not failures. Bad arguments exit 2.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import click
import numpy as np

from timar_sdk.cli import BACKEND_HELP, tool, write_json

__all__ = ["generate_split", "evaluate_dirs", "generate_cmd", "eval_cmd", "SETTINGS_FILE"]

SETTINGS_FILE = "timar-generate.json"
_PRED = re.compile(r"^(?P<clip>.+)_speaker(?P<speaker>[12])$")


def _reason(e: BaseException) -> str:
    """One line: exception type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


class _InputError(Exception):
    """An input file of an example could not be read; the message starts with its name."""


def _read(path: Path, load):
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - turned into a per-file failure naming the file
        raise _InputError(f"{path.name}: {_reason(e)}") from e


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a hidden temporary file in the same folder, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Record `settings` in out_dir, or refuse when the folder's recorded settings differ."""
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = {k: (old.get(k) if isinstance(old, dict) else None, v) for k, v in settings.items()
                    if not isinstance(old, dict) or old.get(k) != v}
            raise ValueError(f"{out_dir} holds predictions made with other settings "
                             f"(recorded -> now: {diff}); use another --out folder, or delete "
                             f"{path} to mix them knowingly")
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)


def generate_split(data_dir, out_dir, bundle=None, backend: str = "auto",
                   context_turns: int | None = None, seed: int = 0, progress: bool = True,
                   threads: int | None = None) -> dict:
    """Predict the agent motion of every example of a DualTalk-format folder.

    Args:
        data_dir: folder of `<clip>_speaker{1,2}.wav/.npz` (e.g. the test split).
        out_dir: prediction folder (created); gets `<clip>_speakerX.npy` (T, 56) float32.
        bundle: bundle folder or :class:`Bundle` (None: the shipped default bundle).
        backend: Session backend ("auto", "onnxruntime", "tensorrt", "torch").
        context_turns: past turns kept visible, 0..W-1 (W: the bundle's context_turns); None
            keeps all W-1. The paper's "n previous turns" is context_turns = n.
        seed: the Session seed; every file starts from it.
        progress: show a tqdm bar over files.
        threads: intra-op threads of the backend (None: the backend's default).
    Returns:
        {"written": n, "skipped": n, "failed": {example name: one-line reason}}; "skipped"
        counts predictions already present.
    Raises:
        ValueError: context_turns out of range, a bad data folder (see `list_examples`), or
            `out_dir` holding predictions made with other settings. BundleError: a bad bundle.
    """
    from timar_sdk.audio import load_audio
    from timar_sdk.conversation import run_conversation
    from timar_sdk.progress import progress_bar
    from timar_sdk.data.dualtalk import list_examples, motion_from_npz
    from timar_sdk.runtime.bundle import Bundle
    from timar_sdk.runtime.session import Session

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    w = int(b.manifest["context_turns"])
    if context_turns is not None and not 0 <= context_turns <= w - 1:
        raise ValueError(f"context_turns: expected 0..{w - 1} (the bundle's window is {w} turns: "
                         f"the current one and up to {w - 1} previous), got {context_turns}")
    examples = list_examples(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = b.manifest
    _check_settings(out, {"graphs": {k: g["sha256"] for k, g in sorted(m["graphs"].items())},
                          "sampling": m["sampling"], "history": m["history"], "seed": seed,
                          "context_turns": context_turns})

    todo = [ex for ex in examples if not (out / f"{ex.name}.npy").exists()]
    result = {"written": 0, "skipped": len(examples) - len(todo), "failed": {}}
    if not todo:
        return result
    session = Session(b, backend=backend, seed=seed, context_turns=context_turns, threads=threads)
    sr = session.info["sample_rate"]
    s, f = session.samples, session.frames
    for ex in progress_bar(todo, desc="files", unit="file", disable=not progress):
        try:
            user_audio = _read(ex.user_wav, lambda p: load_audio(p, sr))
            agent_audio = _read(ex.agent_wav, lambda p: load_audio(p, sr))
            user_motion = _read(ex.user_npz, motion_from_npz)
            # the protocol's length: whole turns of the shortest input
            turns = min(len(user_audio) // s, len(agent_audio) // s, len(user_motion) // f)
            if turns == 0:
                raise ValueError("shorter than one turn: nothing to predict")
            session.reset()
            motion = run_conversation(session, user_audio[:turns * s], user_motion[:turns * f],
                                      agent_audio[:turns * s], progress=False)
            _save_atomic(out / f"{ex.name}.npy", np.asarray(motion, np.float32))
        except _InputError as e:
            result["failed"][ex.name] = str(e)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the split
            result["failed"][ex.name] = _reason(e)
        else:
            result["written"] += 1
    return result


def _summary_generate(result: dict) -> list[str]:
    lines = [f"wrote {result['written']}, skipped {result['skipped']} already present, "
             f"failed {len(result['failed'])}"]
    for name, reason in sorted(result["failed"].items()):
        lines.append(f"  FAILED {name}: {reason}")
    return lines


@tool("timar-generate")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="DualTalk-format folder (e.g. the test split).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Prediction folder: <clip>_speakerX.npy (T, 56) per example.")
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="Bundle folder (default: shipped).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]),
              help=BACKEND_HELP)
@click.option("--context-turns", default=None, type=int,
              help="Previous turns kept visible, 0..W-1 (default: all W-1); the paper's n = 0, 1, 3, 7.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the sampler's noise; every file starts from it.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Backend intra-op threads.")
def generate_cmd(data_dir, out_dir, bundle, backend, context_turns, seed, threads):
    """Predict every file of a DualTalk split (resumable). Exits 1 if any file failed."""
    from timar_sdk.runtime.bundle import Bundle
    b = Bundle(bundle)
    w = int(b.manifest["context_turns"])
    if context_turns is not None and not 0 <= context_turns <= w - 1:
        raise click.BadParameter(f"expected 0..{w - 1} (this bundle's window is {w} turns: the "
                                 f"current one and up to {w - 1} previous), got {context_turns}",
                                 param_hint="--context-turns")
    result = generate_split(data_dir, out_dir, b, backend=backend, context_turns=context_turns,
                            seed=seed, threads=threads)
    for line in _summary_generate(result):
        click.echo(line)
    if result["failed"]:
        raise SystemExit(1)


# ----------------------------------------------------------------------------- evaluation

def _eval_one(pred_path: str, gt_path: str, partner_path: str) -> tuple[str, object]:
    """("ok", metrics) | ("nan", None) | ("error", reason) for one prediction file."""
    from timar_sdk.data.dualtalk import motion_from_npz
    from timar_sdk.metrics import compute_metrics
    try:
        pred = np.load(pred_path, allow_pickle=False)
        if np.issubdtype(pred.dtype, np.floating) and np.isnan(pred).any():
            return "nan", None
        gt = motion_from_npz(gt_path)
        partner = motion_from_npz(partner_path)
        return "ok", compute_metrics(pred, gt, partner)
    except Exception as e:  # noqa: BLE001 - reported per file
        return "error", _reason(e)


def evaluate_dirs(pred_dir, gt_dir, workers: int = 1, progress: bool = False) -> dict:
    """DualTalk-protocol metrics of a prediction folder against a ground-truth folder.

    Args:
        pred_dir: `<clip>_speakerX.npy` predictions (T, 56); other files are ignored.
        gt_dir: the DualTalk split they predict (`<clip>_speaker{1,2}.npz`).
        workers: processes scoring files in parallel (1: in this process).
        progress: show a tqdm bar over files.
    Returns:
        {"files": number scored, "skipped_nan": [names], "missing_gt": [names of predictions
        lacking their own or their partner's npz], "missing_pred": [ground-truth examples with
        no prediction], "errors": {name: reason}, "metrics": mean unscaled metrics,
        "published": the same in the paper's scales, "per_file": {name: unscaled metrics}}.
        "metrics" and "published" are {} when no file was scored.
    """
    from timar_sdk.metrics import aggregate, published_scale
    from timar_sdk.progress import progress_bar

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "pred"), (gt_dir, "gt")):
        if not d.is_dir():
            raise ValueError(f"{what}: {d} is not a directory")
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    preds = sorted(p for p in pred_dir.glob("*.npy") if _PRED.match(p.stem))
    if not preds:
        raise ValueError(f"no <clip>_speaker1/2.npy predictions in {pred_dir}")

    jobs, missing_gt = {}, []
    for p in preds:
        m = _PRED.match(p.stem)
        gt = gt_dir / f"{p.stem}.npz"
        partner = gt_dir / f"{m['clip']}_speaker{3 - int(m['speaker'])}.npz"
        if gt.is_file() and partner.is_file():
            jobs[p.stem] = (str(p), str(gt), str(partner))
        else:
            missing_gt.append(p.stem)
    names = {p.stem for p in preds}
    missing_pred = sorted(g.stem for g in gt_dir.glob("*.npz") if (m := _PRED.match(g.stem))
                          and g.stem not in names
                          and (gt_dir / f"{m['clip']}_speaker{3 - int(m['speaker'])}.npz").is_file())

    results: dict[str, tuple[str, object]] = {}
    bar = progress_bar(total=len(jobs), desc="files", unit="file", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        for name, args in jobs.items():
            results[name] = _eval_one(*args)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        # spawn: the parent may hold threads (onnxruntime, torch) that fork would copy badly
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_eval_one, *args): name for name, args in jobs.items()}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()

    per_file = {n: r[1] for n, r in sorted(results.items()) if r[0] == "ok"}
    agg = aggregate(list(per_file.values())) if per_file else {}
    return {"files": len(per_file),
            "skipped_nan": sorted(n for n, r in results.items() if r[0] == "nan"),
            "missing_gt": missing_gt, "missing_pred": missing_pred,
            "errors": {n: r[1] for n, r in sorted(results.items()) if r[0] == "error"},
            "metrics": agg, "published": published_scale(agg) if agg else {},
            "per_file": per_file}


def _summary_eval(result: dict) -> list[str]:
    from timar_sdk.metrics import format_table
    lines = []
    if result["files"]:
        lines += [format_table(result["published"]), ""]
    lines.append(f"files: {result['files']} scored")
    for key, label in (("skipped_nan", "skipped (prediction contains NaN)"),
                       ("missing_gt", "no ground truth (own or partner npz)"),
                       ("missing_pred", "ground truth without a prediction")):
        if result[key]:
            lines.append(f"{label}: {len(result[key])}: {', '.join(result[key])}")
    for name, reason in result["errors"].items():
        lines.append(f"  FAILED {name}: {reason}")
    return lines


@tool("timar-eval")
@click.option("--pred", "pred_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prediction folder (<clip>_speakerX.npy).")
@click.option("--gt", "gt_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="DualTalk-format ground-truth folder (<clip>_speakerX.npz).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the results as JSON (files, skipped_nan, metrics unscaled, published scaled, "
                   "per_file) instead of the table.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON results here.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes scoring files in parallel.")
def eval_cmd(pred_dir, gt_dir, as_json, json_out, workers):
    """Score predictions in the DualTalk protocol; prints the paper's table and scales.
    Exits 1 if any file could not be scored or none was."""
    result = evaluate_dirs(pred_dir, gt_dir, workers=workers, progress=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for line in _summary_eval(result):
            click.echo(line)
    if json_out:
        write_json(json_out, result)
    if result["errors"] or not result["files"]:
        raise SystemExit(1)
