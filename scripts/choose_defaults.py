"""Choose a bundle's default temperature and smoothing by measurement on the training corpus's
validation clips (never on the real recordings EVALUATION.md reports on).

    python scripts/choose_defaults.py --bundle DIR --corpus runs/speech_corpus --figures FIGURES_TOOL

For each temperature the model runs every validation clip (speaker 1 the agent, speaker 2 the
user, untracked) without smoothing; the smoothing grid is then applied to that output (the
filter runs after the model, so the same raw motion serves every setting). Prints the figures of
EVALUATION.md's real-speech table per setting, beside the clips' own ground truth.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from evaluate_real_speech import agent_motion, load_figures_tool
from timar_sdk import Model
from timar_sdk.audio import load_audio
from timar_sdk.data.dualtalk import motion_from_npz
from timar_sdk.runtime.smoothing import filter_coefficients, smooth

TEMPERATURES = (0.0, 0.25, 0.5, 1.0)
GRID = {"expression": (0.0, 0.12, 0.2, 0.3), "jaw": (0.0, 0.03, 0.06), "neck": (0.0, 0.2, 0.3, 0.4)}
KEYS = ("jaw_r_own_voice", "jaw_r_partner_voice", "jaw_mean_in_silence_rad", "silent_frames_jaw_above_0.08",
        "lag1_autocorr_expression", "lag1_autocorr_neck", "neck_velocity_std_rad_per_frame",
        "jaw_velocity_ratio_partner_only_vs_speaking")


def mean_figures(tool, motions, clips) -> dict:
    runs = [tool.figures(m, tool.loudness(str(a)), tool.loudness(str(u))) for m, (a, u) in zip(motions, clips)]
    return {k: float(np.nanmean([r[k] for r in runs])) for k in KEYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--figures", type=Path, required=True)
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args()
    tool = load_figures_tool(a.figures)
    clips = [(f, f.with_name(f.name.replace("speaker1", "speaker2"))) for f in sorted((a.corpus / "val").glob("*_speaker1.wav"))]
    truth = [motion_from_npz(f.with_suffix(".npz")) for f, _ in clips]
    table = {"ground truth": mean_figures(tool, truth, clips)}
    model = Model(a.bundle)
    for temperature in TEMPERATURES:
        raw = [agent_motion(model, load_audio(agent), load_audio(user), 0, temperature=temperature, smoothing=False)
               for agent, user in clips]
        for taus in (dict(zip(GRID, v)) for v in itertools.product(*GRID.values())):
            coef = filter_coefficients(taus, 25)
            motions = [smooth(m, None, coef)[0] for m in raw]
            name = f"T={temperature} " + " ".join(f"{k}={v}" for k, v in taus.items())
            table[name] = mean_figures(tool, motions, clips)
    print(f"{'setting':50s} " + " ".join(k[:14].rjust(14) for k in KEYS))
    for name, f in table.items():
        print(f"{name:50s} " + " ".join(f"{f[k]:14.3f}" for k in KEYS))
    if a.json_out:
        a.json_out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
