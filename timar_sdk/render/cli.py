"""``timar-render``: render motion to a preview MP4.

Entry point: ``timar-render = "timar_sdk.render.cli:render_cmd"``.
"""
from __future__ import annotations

import time

import click

from timar_sdk.cli import tool
from timar_sdk.layout import FPS


@tool("timar-render")
@click.argument("motion", type=click.Path(exists=True, dir_okay=False))
@click.option("--audio", type=click.Path(exists=True, dir_okay=False),
              help="The agent's audio (WAV/FLAC...), muxed into the video.")
@click.option("--partner", type=click.Path(exists=True, dir_okay=False),
              help="The user's (partner's) motion: both heads are shown side by side.")
@click.option("--partner-audio", type=click.Path(exists=True, dir_okay=False),
              help="The user's audio, mixed with the agent's.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output .mp4 (H.264 + AAC).")
@click.option("--fps", type=click.FloatRange(min=1.0), default=FPS, show_default=True,
              help="Frame rate of the motion (one video frame per motion frame).")
@click.option("--size", type=click.IntRange(min=32), default=512, show_default=True,
              help="Pixel size of one head's square panel.")
@click.option("--flame", type=click.Path(exists=True, dir_okay=False),
              help="FLAME model file (.npz, or the official .pkl) to render the FLAME mesh.")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True,
              help="x264 quality (lower = better).")
@click.option("--no-timecode", is_flag=True, help="Do not print the time and frame number.")
@click.option("--quiet", is_flag=True, help="No progress bar and no final line.")
def render_cmd(motion, audio, partner, partner_audio, out, fps, size, flame, crf, no_timecode,
               quiet):
    """Render MOTION (.npy (T, 56), or .npz with 'motion' or DualTalk 'exp'/'pose') to a
    preview video: the agent's head, or with --partner both people side by side."""
    from timar_sdk.render.video import render_video

    t0 = time.perf_counter()
    path = render_video(motion, out, audio=audio, partner=partner,
                        partner_audio=partner_audio, fps=fps, size=size, flame=flame,
                        progress=not quiet, crf=crf, timecode=not no_timecode)
    if not quiet:
        click.echo(f"wrote {path} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    render_cmd()
