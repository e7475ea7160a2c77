"""Command-line tools. Each command imports its heavy dependencies lazily, so `timar-run` and
`timar-bench` on an edge device never import torch."""
from __future__ import annotations

import json

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
@click.option("--resume", default=None, type=click.Path(exists=True, dir_okay=False))
def train_cmd(preset_name, out, **kw):
    """Train a TIMAR model (runs under torchrun with DistributedDataParallel when launched so)."""
    try:
        from timar_sdk.train import TrainArgs, train
    except ImportError as e:
        raise click.ClickException(f"timar-train needs the train extra: pip install 'timar-sdk[train]' ({e})")
    result = train(TrainArgs(preset=preset_name, out=out, **kw))
    click.echo(json.dumps(result, indent=2))
