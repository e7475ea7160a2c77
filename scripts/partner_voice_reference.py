"""What "jaw vs the partner's voice" measures on the real recordings: reference figures for it.

    python scripts/partner_voice_reference.py --speech SPEECH_DIR --figures FIGURES_TOOL \
        [--motion runs/real_speech/smoothed]

For each ordered pair of the AMI speakers 0, 1 and 3 (agent, partner), with the figures tool's
own loudness, activity and Pearson r:
- the two tracks' loudness correlation (the conversation's turn-taking, no model involved);
- a reference jaw that follows only the agent's own loudness (open in proportion to its level
  above -40 dBFS, closed below): the figures the issue's targets name, for a mouth that cannot
  hear the partner at all;
- the same reference jaw held open by a constant while only the partner speaks, for a few
  constants: what a jaw must do to bring |r| with the partner's voice under 0.05;
- with --motion (a folder of `evaluate_real_speech.py --out` motion files): the model's r with
  the partner's voice over all frames, over the agent's silent frames only, and partial r given
  the agent's own loudness (what is left of the partner once the agent's own voice is accounted for).
"""
from __future__ import annotations

import argparse
from itertools import permutations
from pathlib import Path

import numpy as np

from evaluate_real_speech import PAIR_SPEAKERS, load_figures_tool

JAW_OPEN_RAD = 0.25        # the reference jaw's opening at full level
LEVEL_RANGE_DB = 30.0      # from -40 dBFS (closed) to -10 dBFS (fully open)
HOLD_OPEN_RAD = (0.0, 0.02, 0.04, 0.06)


def reference_jaw(tool, agent_loudness: np.ndarray, partner_loudness: np.ndarray, hold_open: float) -> np.ndarray:
    """Motion [T, 56] whose only non-zero column is the jaw opening (50): a function of the
    agent's own loudness [T], plus `hold_open` rad in the frames where only the partner speaks."""
    level = np.convolve(agent_loudness, np.ones(3) / 3, "same")
    db = 20 * np.log10(level + 1e-9)
    jaw = np.clip((db + 40.0) / LEVEL_RANGE_DB, 0.0, 1.0) * JAW_OPEN_RAD
    partner_only = tool.active(partner_loudness) & ~tool.active(agent_loudness)
    motion = np.zeros((len(jaw), 56))
    motion[:, 50] = jaw + hold_open * partner_only
    return motion


def partial_r(tool, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Pearson r of x and y with z partialled out of both."""
    rxy, rxz, ryz = tool.pearson(x, y), tool.pearson(x, z), tool.pearson(y, z)
    return float((rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speech", type=Path, required=True, help="folder of the real recordings")
    p.add_argument("--figures", type=Path, required=True, help="the figures tool (a Python file)")
    p.add_argument("--motion", type=Path, default=None, help="folder of evaluate_real_speech.py motion files")
    a = p.parse_args()
    tool = load_figures_tool(a.figures)
    loud = {k: tool.loudness(str(a.speech / f"conv_ami_spk{k}.flac")) for k in PAIR_SPEAKERS}
    rows = {"tracks' loudness r": [], **{f"reference jaw, held open {h} rad while the partner speaks": []
                                          for h in HOLD_OPEN_RAD}}
    model = {"model: r, all frames": [], "model: r, agent silent frames": [],
             "model: partial r given the agent's loudness": []}
    for agent, partner in permutations(PAIR_SPEAKERS, 2):
        n = min(len(loud[agent]), len(loud[partner]))
        ea, ep = loud[agent][:n], loud[partner][:n]
        rows["tracks' loudness r"].append({"r": tool.pearson(ea, ep)})
        for h in HOLD_OPEN_RAD:
            f = tool.figures(reference_jaw(tool, ea, ep, h), ea, ep)
            rows[f"reference jaw, held open {h} rad while the partner speaks"].append(
                {"r": f["jaw_r_partner_voice"], "own r": f["jaw_r_own_voice"],
                 "silent jaw": f["jaw_mean_in_silence_rad"]})
        if a.motion:
            jaw = np.load(a.motion / f"spk{agent}_agent__spk{partner}_user.npy")[:, 50].astype(np.float64)
            n = min(n, len(jaw))
            jaw, ea, ep = jaw[:n], ea[:n], ep[:n]
            silent = ~tool.active(ea)
            model["model: r, all frames"].append({"r": tool.pearson(jaw, ep)})
            model["model: r, agent silent frames"].append({"r": tool.pearson(jaw[silent], ep[silent])})
            model["model: partial r given the agent's loudness"].append({"r": partial_r(tool, jaw, ep, ea)})
    print(f"{'mean over the 6 pairs':62s} {'r':>7s} {'|r|':>6s} {'own r':>6s} {'silent jaw':>10s}")
    for name, runs in {**rows, **(model if a.motion else {})}.items():
        r = np.array([x["r"] for x in runs])
        extra = "".join(f" {np.mean([x[k] for x in runs]):{w}.3f}" for k, w in (("own r", 6), ("silent jaw", 10))
                        if k in runs[0])
        print(f"{name:62s} {r.mean():7.3f} {np.abs(r).mean():6.3f}{extra}")


if __name__ == "__main__":
    main()
