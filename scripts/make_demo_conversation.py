"""Write the demo conversation shipped with the package (timar_sdk/assets/demo_conversation):
30 s of a speech-like synthetic conversation (timar_sdk.data.speechlike, a seed no training or
evaluation split uses), so `timar-run --demo` needs no TTS installed.

    python scripts/make_demo_conversation.py      # needs espeak-ng and Festival (docs/TRAINING_DATA.md)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from timar_sdk.data.speechlike import generate_conversation

OUT = Path(__file__).resolve().parents[1] / "timar_sdk" / "assets" / "demo_conversation"
SEED = int(np.random.SeedSequence([7, 0]).generate_state(1)[0])   # training uses [0, i], evaluation [1, i]


def main() -> None:
    conv = generate_conversation(30.0, SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    sf.write(OUT / "agent.flac", conv["audio1"], 16000, subtype="PCM_16")
    sf.write(OUT / "user.flac", conv["audio2"], 16000, subtype="PCM_16")
    np.save(OUT / "user_motion.npy", conv["motion2"].astype(np.float32))
    np.save(OUT / "agent_motion_synthetic_truth.npy", conv["motion1"].astype(np.float32))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
