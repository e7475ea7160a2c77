"""EVALUATION.md's real-speech figures: a bundle run on real recorded conversations.

    python scripts/evaluate_real_speech.py --speech SPEECH_DIR --figures FIGURES_TOOL \
        [--bundle DIR] [--seed 0] [--smoothing on|off|both] [--out runs/real_speech] [--json-out F]

SPEECH_DIR: a folder of real recordings (16 kHz mono): the conversation tracks
`conv_ami_spk{0,1,3}.flac` (one headset per speaker of one meeting) and single-speaker clips.
The recordings are evaluation material only: they are not part of this repository, never used
for training, and never shipped. FIGURES_TOOL: the Python file whose `figures(motion,
agent_loudness, partner_loudness)` and `loudness(path)` compute every figure one fixed way; this
script only runs the model and averages what that file computes.

Runs: every ordered pair of the speakers 0, 1 and 3 (agent, user: 6 runs of 60 s), and each
single-speaker clip as the agent with a silent user. Prints the per-run figures, their means over
the pairs and the issue's targets, and writes the motion of each run under --out.

With --synthetic N, the same figures on N held-out speech-like synthetic conversations
(timar_sdk.data.speechlike, clip seeds from seed 1; the training corpus uses seed 0): the model's
motion and, beside it, the figures of the data's own ground-truth motion.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from itertools import permutations
from pathlib import Path

import numpy as np
import soundfile as sf

from timar_sdk import Model, Session
from timar_sdk.audio import load_audio
from timar_sdk.conversation import run_conversation

PAIR_SPEAKERS = (0, 1, 3)
# The targets on the mean over the pairs: (figure, test, bound).
TARGETS = [("jaw_r_own_voice", ">=", 0.45), ("jaw_r_partner_voice_mean_abs", "<=", 0.05),
           ("jaw_mean_in_silence_rad", "<=", 0.05), ("silent_frames_jaw_above_0.08", "<=", 0.05),
           ("lag1_autocorr_expression", ">=", 0.85), ("lag1_autocorr_neck", ">=", 0.85),
           ("neck_velocity_std_rad_per_frame", "<=", 0.02),
           ("jaw_velocity_ratio_partner_only_vs_speaking", "<=", 0.5)]


def load_figures_tool(path: Path):
    spec = importlib.util.spec_from_file_location("real_speech_figures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meets(value: float, test: str, bound: float) -> bool:
    return value >= bound if test == ">=" else value <= bound


def runs(speech: Path) -> list[tuple[str, Path, Path | None]]:
    """(name, agent file, user file or None for a silent user)."""
    pairs = [(f"spk{a} agent, spk{u} user", speech / f"conv_ami_spk{a}.flac", speech / f"conv_ami_spk{u}.flac")
             for a, u in permutations(PAIR_SPEAKERS, 2)]
    clips = [(f"{p.stem}, silent user", p, None) for p in sorted(speech.glob("*.flac"))
             if not p.stem.startswith("conv_ami")]
    return pairs + clips


def agent_motion(model: Model, agent_audio: np.ndarray, user_audio: np.ndarray | None, seed: int,
                 **settings) -> np.ndarray:
    """The agent's motion [T, 56] for a recorded pair (user None: a silent user, untracked), both
    tracks cut to the shorter; settings as Session takes them (smoothing, temperature)."""
    session = Session(model, seed=seed, **settings)
    user_audio = np.zeros_like(agent_audio) if user_audio is None else user_audio
    n = min(len(agent_audio), len(user_audio))
    return run_conversation(session, user_audio[:n], None, agent_audio[:n], progress=False)


def smoothing_setting(smoothing: bool):
    return None if smoothing else False       # None: the bundle's defaults


def evaluate(speech: Path, tool, model: Model, seed: int, smoothing: bool, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    per_run = {}
    for name, agent, user in runs(speech):
        motion = agent_motion(model, load_audio(agent), None if user is None else load_audio(user), seed,
                              smoothing=smoothing_setting(smoothing))
        np.save(out / (name.replace(", ", "__").replace(" ", "_") + ".npy"), motion)
        agent_loudness = tool.loudness(str(agent))
        # a silent user's loudness is zero in every frame (what the tool gives for a silent file)
        user_loudness = np.zeros_like(agent_loudness) if user is None else tool.loudness(str(user))
        per_run[name] = tool.figures(motion, agent_loudness, user_loudness)
    pairs = [v for k, v in per_run.items() if k.startswith("spk")]
    mean = {k: float(np.nanmean([p[k] for p in pairs])) for k in pairs[0] if k != "frames"}
    mean["jaw_r_partner_voice_mean_abs"] = float(np.mean([abs(p["jaw_r_partner_voice"]) for p in pairs]))
    return {"smoothing": smoothing, "runs": per_run, "pairs_mean": mean,
            "targets": {k: {"test": t, "bound": b, "value": mean[k], "met": meets(mean[k], t, b)}
                        for k, t, b in TARGETS}}


def evaluate_synthetic(clips: int, tool, model: Model, seed: int, smoothing: bool, out: Path) -> dict:
    """Figures on held-out speech-like conversations: speaker 1 the agent, speaker 2 the user
    (untracked, as in the real-speech runs); the mean of the model's and of the ground truth's."""
    from timar_sdk.data.speechlike import generate_conversation
    out.mkdir(parents=True, exist_ok=True)
    model_figures, truth_figures = [], []
    for k in range(clips):
        clip_seed = int(np.random.SeedSequence([1, k]).generate_state(1)[0])
        conv = generate_conversation(30.0, clip_seed)
        agent, user = out / f"clip{k}_agent.wav", out / f"clip{k}_user.wav"
        sf.write(agent, conv["audio1"], 16000, subtype="FLOAT")
        sf.write(user, conv["audio2"], 16000, subtype="FLOAT")
        motion = agent_motion(model, conv["audio1"], conv["audio2"], seed, smoothing=smoothing_setting(smoothing))
        np.save(out / f"clip{k}_motion.npy", motion)
        loud = tool.loudness(str(agent)), tool.loudness(str(user))
        model_figures.append(tool.figures(motion, *loud))
        truth_figures.append(tool.figures(conv["motion1"], *loud))
    mean = lambda runs: {k: float(np.nanmean([r[k] for r in runs])) for k in runs[0] if k != "frames"}  # noqa: E731
    return {"smoothing": smoothing, "clips": clips, "model": mean(model_figures), "ground_truth": mean(truth_figures)}


def contact_sheet(motion: np.ndarray, agent: Path, tool, out_png: Path, per_row: int = 4) -> None:
    """Preview frames of one run: a row of frames where the agent is silent (quietest 40 ms
    frames) and a row where it speaks (loudest), each labelled with the jaw angle."""
    from PIL import Image, ImageDraw

    from timar_sdk.render.frame import render_frame
    loud = tool.loudness(str(agent))[:len(motion)]
    order = np.argsort(loud)
    rows = {"agent silent": order[:len(order) // 4][::max(1, len(order) // 4 // per_row)][:per_row],
            "agent speaking": order[::-1][:per_row * 8:8]}
    size = 256
    sheet = Image.new("RGB", (size * per_row, (size + 20) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, frames) in enumerate(rows.items()):
        for c, f in enumerate(sorted(frames)):
            sheet.paste(Image.fromarray(render_frame(motion[f], size)), (c * size, r * (size + 20) + 20))
            draw.text((c * size + 4, r * (size + 20) + 4),
                      f"{label}, t={f / 25:.2f} s, jaw {motion[f, 50]:.3f} rad", fill="black")
    sheet.save(out_png)


def report(result: dict) -> str:
    lines = [f"smoothing {'on' if result['smoothing'] else 'off'}: mean over the 6 AMI pairs"]
    for k, t in result["targets"].items():
        lines.append(f"  {k:46s} {t['value']:8.3f}   target {t['test']} {t['bound']}   "
                     f"{'met' if t['met'] else 'NOT met'}")
    lines.append("  per run: jaw r own / partner, jaw in silence, lag-1 exp / neck, neck vel, listen/speak")
    for name, f in result["runs"].items():
        lines.append(f"  {name:42s} {f['jaw_r_own_voice']:6.2f} {f['jaw_r_partner_voice']:6.2f} "
                     f"{f['jaw_mean_in_silence_rad']:6.3f} {f['lag1_autocorr_expression']:5.2f} "
                     f"{f['lag1_autocorr_neck']:5.2f} {f['neck_velocity_std_rad_per_frame']:6.3f} "
                     f"{f['jaw_velocity_ratio_partner_only_vs_speaking']:5.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speech", type=Path, required=True, help="folder of the real recordings")
    p.add_argument("--figures", type=Path, required=True, help="the figures tool (a Python file)")
    p.add_argument("--bundle", default=None, help="bundle folder (default: the shipped bundle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoothing", choices=("on", "off", "both"), default="both")
    p.add_argument("--out", type=Path, default=Path("runs/real_speech"))
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="also N held-out speech-like synthetic conversations of 30 s")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--frames", type=Path, default=None, metavar="PNG",
                   help="preview frames (silent / speaking) of the spk3-agent, spk1-user run, smoothing as run")
    a = p.parse_args()
    for what, path in (("--speech", a.speech / "conv_ami_spk0.flac"), ("--figures", a.figures)):
        if not path.is_file():
            raise SystemExit(f"Error: {what}: {path} not found")
    tool = load_figures_tool(a.figures)
    model = Model(a.bundle)
    results = []
    for smoothing in {"on": [True], "off": [False], "both": [True, False]}[a.smoothing]:
        results.append(evaluate(a.speech, tool, model, a.seed, smoothing,
                                a.out / ("smoothed" if smoothing else "raw")))
        print(report(results[-1]))
        if a.synthetic:
            syn = evaluate_synthetic(a.synthetic, tool, model, a.seed, smoothing,
                                     a.out / ("synthetic_smoothed" if smoothing else "synthetic_raw"))
            results[-1]["synthetic"] = syn
            print(f"  held-out synthetic ({a.synthetic} clips), model / ground truth:")
            for k, v in syn["model"].items():
                print(f"    {k:46s} {v:8.3f} {syn['ground_truth'][k]:8.3f}")
    if a.frames:
        sub = "smoothed" if results[0]["smoothing"] else "raw"
        motion = np.load(a.out / sub / "spk3_agent__spk1_user.npy")
        contact_sheet(motion, a.speech / "conv_ami_spk3.flac", tool, a.frames)
        print(f"wrote {a.frames}")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
