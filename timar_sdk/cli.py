"""Command-line tools. Each command imports its heavy dependencies lazily, so `timar-run` and
`timar-bench` on an edge device never import torch.

Every `timar-*` command is declared with :func:`tool`: it has `--version`, prints an expected
failure (bad input, a missing optional package, an unwritable file) as one `Error: ...` line with
exit code 1 instead of a traceback, and prints Python warnings as one `warning: ...` line."""
from __future__ import annotations

import errno
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from timar_sdk.conversation import align_inputs, run_conversation
from timar_sdk.errors import install_hint
from timar_sdk.runtime.bundle import CACHE_DTYPES, PRECISIONS

# The extra that installs each optional Python package, for the message of a missing import.
_EXTRA_OF = {"torch": "export", "onnx": "export", "onnxscript": "export", "scipy": "eval",
             "sklearn": "eval", "threadpoolctl": "eval", "imageio_ffmpeg": "render", "PIL": "render",
             "matplotlib": "render", "transformers": "wav2vec2", "tensorrt": "tensorrt",
             "pycuda": "tensorrt"}


BACKEND_HELP = ("Inference backend. 'auto': the bundle's TensorRT engines for this GPU, else ONNX Runtime "
                "(CUDA when installed, else CPU).")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {str(message).strip()}", err=True)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines) or type(e).__name__


class _Tool(click.Command):
    """A click command whose expected failures end in one line (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise                                    # click's own (Exit and Abort are RuntimeErrors)
            except ImportError as e:
                name = (e.name or "").split(".")[0]
                if name not in _EXTRA_OF:
                    raise click.ClickException(_one_line(e)) from e
                raise click.ClickException(f"{ctx.info_name} needs the Python package {name!r}, which is not "
                                           f"installed: {install_hint(_EXTRA_OF[name])}") from e
            except (ValueError, RuntimeError, OSError) as e:   # bad input, a failed turn, a file
                raise click.ClickException(_one_line(e)) from e


def tool(name: str):
    """Decorator declaring the `timar-*` command `name` (use it in place of `click.command`)."""
    def wrap(fn):
        fn = click.version_option(package_name="timar-sdk", prog_name=name,
                                  message="%(prog)s (timar-sdk %(version)s)")(fn)
        return click.command(name, cls=_Tool)(fn)
    return wrap


@tool("timar-train")
@click.option("--data", default="synthetic", show_default=True,
              help="DualTalk-format folder (with train/ and val/) or 'synthetic'.")
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              type=click.Choice(["tiny", "base", "large"]), help="Model size.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
              help="Windows per step (per process under torchrun).")
@click.option("--lr", default=3e-4, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(min=0),
              help="Linear learning-rate warm-up steps.")
@click.option("--turns-per-window", default=None, type=click.IntRange(min=1),
              help="Training window in turns (default: context turns + 2).")
@click.option("--val-every", default=200, show_default=True, type=click.IntRange(min=1),
              help="Validate (and write the checkpoint) every N steps.")
@click.option("--synthetic-clips", default=48, show_default=True, type=click.IntRange(min=1),
              help="Training clips generated with --data synthetic.")
@click.option("--synthetic-seconds", default=20.0, show_default=True, type=click.FloatRange(min=2.0),
              help="Length of each synthetic clip.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the weights and the batches.")
@click.option("--device", default="auto", show_default=True,
              help="torch device: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
@click.option("--history", type=click.Choice(["masked", "feedback"]), default=None,
              help="History mode (default: the preset's, masked).")
@click.option("--head", type=click.Choice(["diffusion", "mlp"]), default=None, help="Ablation switch.")
@click.option("--attention", type=click.Choice(["band", "full"]), default=None, help="Ablation switch.")
@click.option("--diffusion-batch-mul", type=click.IntRange(min=1), default=None,
              help="Repeats of each token in the diffusion loss (paper: 4).")
@click.option("--resume", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Continue from this timar-sdk checkpoint (model, EMA, optimizer and step; its config wins).")
def train_cmd(preset_name, out, **kw):
    """Train a TIMAR model (runs under torchrun with DistributedDataParallel when launched so).
    Prints the final losses as JSON."""
    try:
        from timar_sdk.train import TrainArgs, train
    except ImportError as e:
        raise click.ClickException(f"timar-train needs the train extra: {install_hint('train')} ({e})")
    if kw.get("resume"):     # refuse a file that cannot be resumed in one line, before any work
        from timar_sdk.model.checkpoint import read_resume_checkpoint
        read_resume_checkpoint(kw["resume"])
    result = train(TrainArgs(preset=preset_name, out=out, **kw))
    click.echo(json.dumps(result, indent=2))


@tool("timar-export")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint to export: a timar-sdk checkpoint (default: the shipped tiny model) or "
                   "the authors' TIMAR.pth (detected; needs --wav2vec2).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(min=17), help="ONNX opset.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Export the EMA weights.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size used for tracing (the batch axis stays dynamic).")
@click.option("--wav2vec2", "wav2vec2_dir", default=None, type=click.Path(),
              help="Authors' checkpoints: local directory of facebook/wav2vec2-large-960h-lv60-self.")
@click.option("--stats", default=None, type=click.Path(dir_okay=False),
              help="Authors' checkpoints trained with --do_norm: their stats JSON (exp/jawpose/neck).")
@click.option("--temperature", default=None, type=click.FloatRange(0.0, 10.0),
              help="The bundle's default sampling temperature (default: the model config's).")
@click.option("--smoothing", default=None, metavar="REGION=SECONDS,...",
              help="The bundle's default output smoothing, e.g. expression=0.1,jaw=0.03,neck=0.25 "
                   "(time constants, 0..2 s; default: none).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="The graphs' arithmetic: fp32, fp16 (GPU/TensorRT; slower on a CPU) or int8 (dynamic "
                   "quantisation; see timar-convert and EVALUATION.md's quality gate).")
@click.option("--cache-dtype", default="float32", show_default=True, type=click.Choice(CACHE_DTYPES),
              help="The KV cache's element type: float16 halves each session's cache in the Python "
                   "runtime (cached bundles).")
def export_cmd(ckpt, out, opset, ema, batch, wav2vec2_dir, stats, temperature, smoothing, precision, cache_dtype):
    """Export a checkpoint to a bundle: ONNX graphs and manifest.json."""
    defaults = {"temperature": temperature, "smoothing": parse_smoothing(smoothing)}
    if Path(out).exists() and (precision, cache_dtype) != ("fp32", "float32"):
        raise click.BadParameter(f"{out} exists; expected a new folder for a converted bundle", param_hint="--out")
    final, out = out, (out if (precision, cache_dtype) == ("fp32", "float32") else f"{out}.fp32-export")
    try:
        from timar_sdk.export.onnx_export import export_bundle, export_window_bundle
        from timar_sdk.model import authors
        from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT, model_from_checkpoint
    except ImportError as e:
        raise click.ClickException(f"timar-export needs the export extra: {install_hint('export')} ({e})")
    path = Path(ckpt) if ckpt else DEFAULT_CHECKPOINT
    # The shipped checkpoint is recorded relative to the package, so the bundle stays portable.
    source = f"package:{path.name}" if path.resolve() == DEFAULT_CHECKPOINT else str(path.resolve())
    raw = authors.read_authors_checkpoint(path)     # weights-only; also reads SDK checkpoints
    if authors.is_authors_checkpoint(raw):
        if wav2vec2_dir is None:
            raise click.UsageError("this is an authors' TIMAR checkpoint: --wav2vec2 DIR is required, the "
                                   "local directory of facebook/wav2vec2-large-960h-lv60-self (in your Hugging "
                                   "Face cache: ~/.cache/huggingface/hub/models--facebook--wav2vec2-large-960h-"
                                   "lv60-self/snapshots/<hash>)")
        motion_stats = authors.read_motion_stats(stats) if stats else None
        model = authors.load_authors_model(raw, str(Path(wav2vec2_dir).resolve()), ema=ema,
                                           motion_stats=motion_stats, name=str(path))
        manifest = export_window_bundle(model, out, opset=opset, source=source, ema=ema, defaults=defaults)
    else:
        if wav2vec2_dir or stats:
            raise click.UsageError("--wav2vec2 and --stats are for the authors' checkpoints; this is a "
                                   "timar-sdk checkpoint")
        model = model_from_checkpoint(raw, path, ema=ema)     # the file is read once
        manifest = export_bundle(model, out, opset=opset, batch=batch, source=source, ema=ema,
                                 defaults=defaults)
    if final != out:
        import shutil
        from timar_sdk.export.precision import convert_bundle
        try:
            manifest = convert_bundle(out, final, precision, cache_dtype)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    _report_bundle(final, manifest)


def _report_bundle(out, manifest: dict) -> None:
    sizes = {g["file"]: (Path(out) / g["file"]).stat().st_size / 1e6 for g in manifest["graphs"].values()}
    from timar_sdk.runtime.bundle import cache_dtype_of, graph_precision
    precisions = sorted({graph_precision(g) for g in manifest["graphs"].values()})
    cache = f", cache {cache_dtype_of(manifest)}" if "cache" in manifest else ""
    click.echo(f"wrote {out} ({manifest['attention']}, {'/'.join(precisions)}{cache}): "
               + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))


@tool("timar-convert")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--precision", required=True, type=click.Choice(PRECISIONS),
              help="fp16 (ONNX Runtime's float16 converter; softmax, layer norm, the log-mel front end and "
                   "the time embedding stay fp32) or int8 (ONNX Runtime quantisation of MatMul/Gemm); fp32 "
                   "changes only the cache dtype.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New bundle folder to write.")
@click.option("--cache-dtype", default="float32", show_default=True, type=click.Choice(CACHE_DTYPES),
              help="The KV cache's element type: float16 halves each session's cache in the Python "
                   "runtime (cached bundles).")
@click.option("--int8-method", default=None, type=click.Choice(["dynamic", "static"]),
              help="int8: the quantisation of every quantised graph (default: per graph, as measured in "
                   "BENCHMARKS.md: dynamic, the audio encoder left fp32); static = QDQ calibrated on "
                   "synthetic conversations.")
def convert_cmd(bundle, precision, out, cache_dtype, int8_method):
    """Convert an FP32 bundle folder to an FP16 or INT8 bundle (and/or a float16 cache) in a new
    folder: graphs rewritten, their sha256 and the manifest's precision fields updated."""
    try:
        from timar_sdk.export.precision import convert_bundle
        import onnx  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"timar-convert needs the export extra: {install_hint('export')} ({e})")
    manifest = convert_bundle(bundle, out, precision, cache_dtype, int8_method)
    _report_bundle(out, manifest)


def parse_smoothing(text: str | None) -> dict | None:
    """--smoothing's "expression=0.1,jaw=0.03" as {"expression": 0.1, "jaw": 0.03} (checked)."""
    if text is None:
        return None
    from timar_sdk.runtime.smoothing import check_smoothing
    taus = {}
    for part in text.split(","):
        region, _, value = part.partition("=")
        try:
            taus[region.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected REGION=SECONDS,... (regions expression, jaw, neck), got {text!r}",
                                     param_hint="--smoothing") from None
    try:
        return check_smoothing(taus, "--smoothing")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--smoothing") from None


def read_audio_file(path: str, option: str, sample_rate: int):
    """`option`'s audio file as checked float32 mono at `sample_rate` (see `timar_sdk.audio`);
    a file that cannot be used raises click.ClickException naming the option and the file."""
    import soundfile as sf

    from timar_sdk.audio import load_audio, to_float32
    try:
        audio = load_audio(path, sample_rate)
    except sf.LibsndfileError as e:
        raise click.ClickException(
            f"{option} {path}: cannot read it as audio ({e.error_string.strip().rstrip('.')}); expected "
            f"WAV, FLAC, OGG or MP3 (convert others, e.g. ffmpeg -i IN -ac 1 -ar {sample_rate} OUT.wav)") from e
    except ValueError as e:
        raise click.ClickException(f"{option}: {e}") from e
    return to_float32(audio, f"{option} {path}")       # empty, NaN/Inf, beyond full scale


@contextmanager
def output_file(path: Path, option: str):
    """Write `path` atomically: a temporary file beside it is created at once (so a place that
    cannot be written fails before any work, naming `option` and the path), its binary file
    object is yielded, and it is renamed to `path` when the block succeeds, removed otherwise."""
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        f = open(tmp, "xb")                              # the permissions np.save would give
    except OSError as e:
        reason = "a file is in the way of its folder" if isinstance(e, FileExistsError) else e.strerror or e
        raise click.ClickException(f"{option} {path}: cannot write there ({reason})") from e
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@tool("timar-run")
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="Bundle folder (default: shipped).")
@click.option("--user-audio", type=click.Path(exists=True, dir_okay=False),
              help="The user's speech: WAV, FLAC, OGG or MP3, any rate (resampled) and channels (averaged).")
@click.option("--user-motion", type=click.Path(exists=True, dir_okay=False),
              help="The user's tracked face at the bundle's fps: (T, 56) .npy, or .npz with 'motion' or DualTalk "
                   "'exp'/'pose'. Leave out when the face is not tracked.")
@click.option("--agent-audio", type=click.Path(exists=True, dir_okay=False),
              help="The agent's speech (same formats as --user-audio).")
@click.option("--out", required=True, type=click.Path(),
              help="OUT.npy: the agent's motion (T, 56) float32; with --demo, a folder.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]),
              help=BACKEND_HELP)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sampler's noise.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Diffusion steps (default: manifest).")
@click.option("--cfg", default=None, type=float, help="Classifier-free guidance scale (default: manifest).")
@click.option("--temperature", default=None, type=float, help="Sampling temperature (default: manifest).")
@click.option("--no-smoothing", is_flag=True,
              help="The exact model output, without the bundle's default smoothing.")
@click.option("--demo", is_flag=True, help="Make a synthetic conversation and run it (no inputs needed).")
@click.option("--demo-seconds", default=20.0, show_default=True, type=click.FloatRange(min=1.0, max=30.0),
              help="Length of the --demo conversation (the shipped one is 30 s).")
def run_cmd(bundle, user_audio, user_motion, agent_audio, out, backend, seed, steps, cfg, temperature, no_smoothing,
            demo, demo_seconds):
    """Generate the agent's head motion for a recorded conversation, or run the demo.

    The audio tracks are cut to the shorter one, and the last partial turn is padded with
    silence (its real frames are kept): T = floor(seconds * fps) frames. What was cut or padded
    is printed."""
    import numpy as np

    from timar_sdk import Session, TimarInputError
    from timar_sdk.render.video import load_motion
    out = Path(out)
    settings = dict(backend=backend, seed=seed, steps=steps, cfg=cfg, temperature=temperature,
                    smoothing=False if no_smoothing else None)
    if demo:
        session = Session(bundle, **settings)
        from timar_sdk.demo import run_demo
        for line in run_demo(session, out, seconds=demo_seconds):
            click.echo(line)
        return
    if not (user_audio and agent_audio):
        raise click.UsageError("--user-audio and --agent-audio are required (or use --demo)")
    if out.suffix != ".npy":
        raise click.BadParameter(f"expected a file name ending in .npy, got {str(out)!r} (a folder only with --demo)",
                                 param_hint="--out")
    session = Session(bundle, **settings)
    sr, fps = session.info["sample_rate"], session.info["fps"]
    files = {"user_audio": f"--user-audio {user_audio}", "agent_audio": f"--agent-audio {agent_audio}",
             "user_motion": f"--user-motion {user_motion}"}
    ua = read_audio_file(user_audio, "--user-audio", sr)
    aa = read_audio_file(agent_audio, "--agent-audio", sr)
    um = None
    if user_motion:
        try:
            um = load_motion(user_motion)
        except ValueError as e:                       # the message starts with the file name
            raise click.ClickException(f"--user-motion {e}") from e
    shorter = "user_audio" if len(ua) < len(aa) else "agent_audio"
    if min(len(ua), len(aa)) * fps < sr:
        raise click.ClickException(f"{files[shorter]}: {min(len(ua), len(aa)) / sr:.3f} s of audio, shorter "
                                   f"than one frame ({1 / fps:.2f} s): nothing to generate")
    ua, um, aa, notes = align_inputs(session, ua, um, aa)
    with output_file(out, "--out") as f:
        for line in notes:
            click.echo(line)
        try:
            motion = run_conversation(session, ua, um, aa)
        except TimarInputError as e:                  # e.g. motion beyond the tracker's range
            arg = str(e).split(":", 1)[0]
            raise click.ClickException(f"{files[arg]}: {e}" if arg in files else str(e)) from e
        np.save(f, motion)
    click.echo(f"wrote {out}: {motion.shape[0]} frames x 56 ({motion.shape[0] / fps:.2f} s)")


@tool("timar-bench")
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="Bundle folder (default: shipped).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]),
              help=BACKEND_HELP)
@click.option("--preset", "preset_name", default=None,
              type=click.Choice(["tiny", "base", "large", "timar_base", "timar_large"]),
              help="Benchmark a preset with random weights (needs --random-weights and the export extra): the "
                   "SDK's cached tiny/base/large, or the authors' window-recompute timar_base/timar_large "
                   "(with a random wav2vec2-large-lv60; also needs the wav2vec2 extra).")
@click.option("--random-weights", is_flag=True,
              help="Confirms that --preset exports randomly initialised weights (timing only; there are no "
                   "trained base/large weights).")
@click.option("--turns", default=50, show_default=True, type=click.IntRange(min=1),
              help="Timed turns, after enough warm-up turns to fill the context window.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Intra-op threads of the backend and of torch (default: the backend's).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Diffusion steps (default: manifest).")
@click.option("--spin", is_flag=True, help="ONNX Runtime threads spin between operators (faster on a machine that "
                                          "runs nothing else, much slower beside other work).")
@click.option("--no-torch", is_flag=True, help="Skip the torch full-window recompute baseline.")
@click.option("--sessions", default=None, type=click.IntRange(min=1),
              help="Instead: N conversations on one Model, one turn each per round, one at a time against "
                   "batched (step_many) in alternating rounds: turns per second, real-time streams, latency.")
@click.option("--streams", default=None, type=click.IntRange(min=1),
              help="Instead: N conversations streamed in real time (20 ms pushes) through a Scheduler for "
                   "--seconds: push-call latency and turn latency (input complete -> motion).")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(min=1.0, max=3600.0),
              help="With --streams: how long to stream.")
@click.option("--max-batch", default=None, type=click.IntRange(min=1),
              help="With --sessions or --streams: sessions per batched call (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON results here.")
def bench_cmd(bundle, backend, preset_name, random_weights, turns, threads, steps, spin, no_torch, sessions, streams,
              seconds, max_batch, as_json, json_out):
    """Per-turn latency (p50/p95 by stage), real-time factor, RSS, vs torch window recompute; or,
    with --sessions, throughput of many conversations on one model. Progress goes to stderr,
    results to stdout."""
    from timar_sdk.bench import format_result, format_sessions, run_bench
    if preset_name and not random_weights:
        raise click.UsageError("--preset needs --random-weights (there are no trained base/large weights)")
    if sessions or streams:
        from timar_sdk import Model
        from timar_sdk.bench import bench_sessions, bench_streams
        if preset_name:
            raise click.UsageError("--sessions and --streams run a bundle (--bundle), not a random-weight --preset")
        model = Model(bundle, backend=backend, threads=threads, spin=spin)
        if streams:
            click.echo(f"streaming {streams} conversations for {seconds:g} s", err=True)
            result = bench_streams(model, streams, seconds, max_batch=max_batch)
            text = (f"{streams} streams, {seconds:g} s, batches of up to {result['max_batch']}: "
                    f"{result['turns']} of {result['turns_expected']} turns\n"
                    f"push call   p50 {result['push_ms']['p50']:.3f} ms  p99 {result['push_ms']['p99']:.3f} ms  "
                    f"max {result['push_ms']['max']:.1f} ms\n"
                    f"turn latency p50 {result['turn_latency_ms']['p50']:.0f} ms  p95 "
                    f"{result['turn_latency_ms']['p95']:.0f} ms  p99 {result['turn_latency_ms']['p99']:.0f} ms")
        else:
            result = bench_sessions(model, sessions, rounds=max(3, turns // 5), max_batch=max_batch, progress=True)
            text = format_sessions(result)
        click.echo(json.dumps(result, indent=2) if as_json else text)
    else:
        result = run_bench(bundle, backend, preset_name, turns, threads, not no_torch, steps,
                           log=lambda line: click.echo(line, err=True), spin=spin)
        click.echo(json.dumps(result, indent=2) if as_json else format_result(result))
    if json_out:
        write_json(json_out, result)


def write_json(path, data) -> None:
    """`--json-out FILE` of every tool: `data` as indented JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
