"""Command-line tools. Each command imports its heavy dependencies lazily, so `timar-run` and
`timar-bench` on an edge device never import torch."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("timar-train")
@click.option("--data", default="synthetic", show_default=True,
              help="DualTalk-format folder (with train/ and val/) or 'synthetic'.")
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              type=click.Choice(["tiny", "base", "large"]))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=3e-4, show_default=True, type=float)
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(min=0))
@click.option("--turns-per-window", default=None, type=click.IntRange(min=1),
              help="Training window in turns (default: context turns + 2).")
@click.option("--val-every", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--synthetic-clips", default=48, show_default=True, type=click.IntRange(min=1))
@click.option("--synthetic-seconds", default=20.0, show_default=True, type=click.FloatRange(min=2.0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--history", type=click.Choice(["masked", "feedback"]), default=None)
@click.option("--head", type=click.Choice(["diffusion", "mlp"]), default=None, help="Ablation switch.")
@click.option("--attention", type=click.Choice(["band", "full"]), default=None, help="Ablation switch.")
@click.option("--diffusion-batch-mul", type=click.IntRange(min=1), default=None,
              help="Repeats of each token in the diffusion loss (paper: 4).")
@click.option("--resume", default=None, type=click.Path(exists=True, dir_okay=False))
def train_cmd(preset_name, out, **kw):
    """Train a TIMAR model (runs under torchrun with DistributedDataParallel when launched so)."""
    try:
        from timar_sdk.train import TrainArgs, train
    except ImportError as e:
        raise click.ClickException(f"timar-train needs the train extra: pip install 'timar-sdk[train]' ({e})")
    result = train(TrainArgs(preset=preset_name, out=out, **kw))
    click.echo(json.dumps(result, indent=2))


@click.command("timar-export")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint to export: a timar-sdk checkpoint (default: the shipped tiny model) or "
                   "the authors' TIMAR.pth (detected; needs --wav2vec2).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(min=17))
@click.option("--ema/--no-ema", default=True, show_default=True, help="Export the EMA weights.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size used for tracing (the batch axis stays dynamic).")
@click.option("--wav2vec2", "wav2vec2_dir", default=None, type=click.Path(),
              help="Authors' checkpoints: local directory of facebook/wav2vec2-large-960h-lv60-self.")
@click.option("--stats", default=None, type=click.Path(dir_okay=False),
              help="Authors' checkpoints trained with --do_norm: their stats JSON (exp/jawpose/neck).")
def export_cmd(ckpt, out, opset, ema, batch, wav2vec2_dir, stats):
    """Export a checkpoint to a bundle: ONNX graphs and manifest.json."""
    try:
        from timar_sdk.export.onnx_export import export_bundle, export_window_bundle
        from timar_sdk.model import authors
        from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT, check_format, load_model
    except ImportError as e:
        raise click.ClickException(f"timar-export needs the export extra: pip install 'timar-sdk[export]' ({e})")
    path = Path(ckpt) if ckpt else DEFAULT_CHECKPOINT
    # The shipped checkpoint is recorded relative to the package, so the bundle stays portable.
    source = f"package:{path.name}" if path.resolve() == DEFAULT_CHECKPOINT else str(path.resolve())
    try:
        raw = authors.read_authors_checkpoint(path)     # weights-only; also reads SDK checkpoints
        if authors.is_authors_checkpoint(raw):
            if wav2vec2_dir is None:
                raise click.UsageError("this is an authors' TIMAR checkpoint: --wav2vec2 DIR is required, the "
                                       "local directory of facebook/wav2vec2-large-960h-lv60-self (in your Hugging "
                                       "Face cache: ~/.cache/huggingface/hub/models--facebook--wav2vec2-large-960h-"
                                       "lv60-self/snapshots/<hash>)")
            motion_stats = authors.read_motion_stats(stats) if stats else None
            model = authors.load_authors_model(raw, str(Path(wav2vec2_dir).resolve()), ema=ema,
                                               motion_stats=motion_stats)
            manifest = export_window_bundle(model, out, opset=opset, source=source, ema=ema)
        else:
            if wav2vec2_dir or stats:
                raise click.UsageError("--wav2vec2 and --stats are for the authors' checkpoints; this is a "
                                       "timar-sdk checkpoint")
            check_format(raw, path)
            model = load_model(raw, ema=ema)           # the file is read once
            manifest = export_bundle(model, out, opset=opset, batch=batch, source=source, ema=ema)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    sizes = {g["file"]: (Path(out) / g["file"]).stat().st_size / 1e6 for g in manifest["graphs"].values()}
    click.echo(f"wrote {out} ({manifest['attention']}): " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))


def _read_user_motion(path: str):
    import numpy as np

    from timar_sdk.data.dualtalk import motion_from_npz
    if path.endswith(".npz"):
        return motion_from_npz(path)
    m = np.load(path)
    if m.ndim != 2 or m.shape[1] != 56:
        raise click.BadParameter(f"expected a (T, 56) array, got {m.shape}", param_hint="--user-motion")
    return m.astype(np.float32)


def run_conversation(session, user_audio, user_motion, agent_audio, progress: bool = True):
    """Whole turns of a recorded conversation through `session`: (T, 56) agent motion with
    T = frames_per_turn * floor(shortest input in turns)."""
    import numpy as np
    from tqdm import tqdm

    s, f = session.samples, session.frames
    turns = min(len(user_audio) // s, len(agent_audio) // s)
    if user_motion is not None:
        turns = min(turns, len(user_motion) // f)
    out = []
    for i in tqdm(range(turns), desc="turns", disable=not progress):
        um = None if user_motion is None else user_motion[i * f:(i + 1) * f]
        out.append(session.step(user_audio[i * s:(i + 1) * s], um, agent_audio[i * s:(i + 1) * s]))
    return np.concatenate(out) if out else np.zeros((0, 56), np.float32)


@click.command("timar-run")
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="Bundle folder (default: shipped).")
@click.option("--user-audio", type=click.Path(exists=True, dir_okay=False))
@click.option("--user-motion", type=click.Path(exists=True, dir_okay=False), help="DualTalk .npz or (T, 56) .npy.")
@click.option("--agent-audio", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="OUT.npy, or a folder with --demo.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Diffusion steps (default: manifest).")
@click.option("--cfg", default=None, type=float, help="Classifier-free guidance scale (default: manifest).")
@click.option("--demo", is_flag=True, help="Make a synthetic conversation and run it (no inputs needed).")
def run_cmd(bundle, user_audio, user_motion, agent_audio, out, backend, seed, steps, cfg, demo):
    """Generate the agent's head motion for a recorded conversation, or run the demo."""
    import numpy as np

    from timar_sdk import Session, load_audio
    try:
        session = Session(bundle, backend=backend, seed=seed, steps=steps, cfg=cfg)
    except ValueError as e:
        raise click.ClickException(str(e))
    if demo:
        from timar_sdk.demo import run_demo
        for line in run_demo(session, Path(out)):
            click.echo(line)
        return
    if not (user_audio and agent_audio):
        raise click.UsageError("--user-audio and --agent-audio are required (or use --demo)")
    sr = session.info["sample_rate"]
    motion = run_conversation(session, load_audio(user_audio, sr),
                              _read_user_motion(user_motion) if user_motion else None,
                              load_audio(agent_audio, sr))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.save(out, motion)
    click.echo(f"wrote {out}: {motion.shape[0]} frames x 56 ({motion.shape[0] / session.info['fps']:.1f} s)")


@click.command("timar-bench")
@click.option("--bundle", default=None, type=click.Path(file_okay=False))
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]))
@click.option("--preset", "preset_name", default=None,
              type=click.Choice(["tiny", "base", "large", "timar_base", "timar_large"]),
              help="Benchmark a preset with random weights (needs --random-weights and the export extra): the "
                   "SDK's cached tiny/base/large, or the authors' window-recompute timar_base/timar_large "
                   "(with a random wav2vec2-large-lv60; also needs the wav2vec2 extra).")
@click.option("--random-weights", is_flag=True)
@click.option("--turns", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=click.IntRange(min=1))
@click.option("--steps", default=None, type=click.IntRange(min=1))
@click.option("--no-torch", is_flag=True, help="Skip the torch full-window recompute baseline.")
@click.option("--json", "as_json", is_flag=True)
def bench_cmd(bundle, backend, preset_name, random_weights, turns, threads, steps, no_torch, as_json):
    """Per-turn latency (p50/p95 by stage), real-time factor, RSS, vs torch window recompute."""
    from timar_sdk.bench import format_result, run_bench
    if preset_name and not random_weights:
        raise click.UsageError("--preset needs --random-weights (there are no trained base/large weights)")
    try:
        result = run_bench(bundle, backend, preset_name, turns, threads, not no_torch, steps)
    except ValueError as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(result, indent=2) if as_json else format_result(result))
