"""`timar-run --demo`: a synthetic two-person conversation through a session, with its inputs,
the agent's motion, a plot of jaw opening against agent audio level, and (with the render
extra) a preview video."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from timar_sdk.layout import FPS, JAW, SAMPLE_RATE

DEMO_CONVERSATION = Path(__file__).resolve().parent / "assets" / "demo_conversation"
DEMO_SECONDS = 30.0
SHIPPED_MODEL = "package:tiny_synthetic.pt"
SHIPPED_MODEL_NOTE = ("model: the shipped demo model (tiny, 5 M parameters, MODEL_CARD.md), trained on synthetic "
                      "conversations of TTS voices. On real recorded speech (EVALUATION.md) its jaw follows the "
                      "speaker's voice (r 0.59 on a meeting recording) and closes in silence and while listening; "
                      "its head barely moves and its mouth opens less wide than a person's")


def audio_level_per_frame(audio: np.ndarray, sample_rate: int, fps: int) -> np.ndarray:
    """RMS of each video frame's audio samples, float32 [frames]."""
    hop = sample_rate // fps
    n = len(audio) // hop
    return np.sqrt((audio[:n * hop].reshape(n, hop) ** 2).mean(1)).astype(np.float32)


def demo_conversation(seconds: float = DEMO_SECONDS) -> dict[str, np.ndarray]:
    """The shipped demo conversation (scripts/make_demo_conversation.py: speech-like synthetic
    TTS speakers, a seed no training split uses), its first `seconds` (at most 30): `audio1`
    (the agent) and `audio2` (the user), float32 [samples] at 16 kHz, and `motion1` (the agent's
    synthetic ground truth) and `motion2` (the user's), float32 [frames, 56] at 25 fps."""
    if not 0 < seconds <= DEMO_SECONDS:
        raise ValueError(f"seconds: expected 0 < seconds <= {DEMO_SECONDS:g} (the demo conversation's length), "
                         f"got {seconds}")
    samples, frames = int(seconds * SAMPLE_RATE), int(seconds * FPS)
    d = DEMO_CONVERSATION
    return {"audio1": sf.read(d / "agent.flac", dtype="float32")[0][:samples],
            "audio2": sf.read(d / "user.flac", dtype="float32")[0][:samples],
            "motion1": np.load(d / "agent_motion_synthetic_truth.npy")[:frames],
            "motion2": np.load(d / "user_motion.npy")[:frames]}


def run_demo(session, out_dir: Path, seconds: float = 20.0) -> Iterator[str]:
    """Run the demo into `out_dir`, yielding a line for each file written or step skipped (an
    optional package that is missing skips the plot or the video and says how to install it)."""
    from timar_sdk.conversation import align_inputs, run_conversation
    from timar_sdk.errors import install_hint

    out_dir.mkdir(parents=True, exist_ok=True)
    sr, fps = session.info["sample_rate"], session.info["fps"]
    if session.bundle.manifest.get("source_checkpoint") == SHIPPED_MODEL:
        yield SHIPPED_MODEL_NOTE
    conv = demo_conversation(seconds)             # speaker 1 is the agent, speaker 2 the user
    sf.write(out_dir / "agent.wav", conv["audio1"], sr, subtype="FLOAT")
    sf.write(out_dir / "user.wav", conv["audio2"], sr, subtype="FLOAT")
    np.save(out_dir / "user_motion.npy", conv["motion2"])
    np.save(out_dir / "agent_motion_synthetic_truth.npy", conv["motion1"])
    user_audio, user_motion, agent_audio, notes = align_inputs(session, conv["audio2"], conv["motion2"], conv["audio1"])
    yield from notes
    motion = run_conversation(session, user_audio, user_motion, agent_audio)
    np.save(out_dir / "agent_motion.npy", motion)
    yield f"wrote {out_dir}/agent_motion.npy: {len(motion)} frames ({len(motion) / fps:.0f} s), " \
          f"backend {session.info['backend']}"
    level = audio_level_per_frame(conv["audio1"], sr, fps)[:len(motion)]
    jaw = motion[:, JAW.start]
    corr = float(np.corrcoef(level, jaw)[0, 1]) if len(motion) > 2 else float("nan")
    yield f"correlation of generated jaw opening with agent audio level: {corr:+.2f}"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        yield f"plot skipped: matplotlib is not installed ({install_hint('render')})"
    else:
        t = np.arange(len(motion)) / fps
        fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
        ax.plot(t, level / (level.max() + 1e-9), color="0.6", lw=1, label="agent audio level (normalised)")
        ax.plot(t, jaw / (np.abs(jaw).max() + 1e-9), color="C3", lw=1.5, label="generated jaw opening (normalised)")
        ax.set_xlabel("time (s)")
        ax.set_title(f"TIMAR demo: generated jaw opening vs agent audio level (r = {corr:+.2f})")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "jaw_vs_audio.png")
        plt.close(fig)
        yield f"wrote {out_dir}/jaw_vs_audio.png"
    from timar_sdk.render.video import render_video, require_render_extra
    try:
        require_render_extra()
    except ImportError as e:
        yield f"preview video skipped: {e}"
        return
    yield f"rendering {out_dir}/preview.mp4 ({len(motion)} frames; progress on stderr)"
    render_video(motion, out_dir / "preview.mp4", audio=out_dir / "agent.wav", partner=conv["motion2"],
                 partner_audio=out_dir / "user.wav", fps=fps, progress=True)
    yield f"wrote {out_dir}/preview.mp4"
