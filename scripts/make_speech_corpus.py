#!/usr/bin/env python3
"""Write a speech-driven synthetic training corpus (timar_sdk.data.speechlike) for timar-train.

    python scripts/make_speech_corpus.py --out data/speech --train 96 --val 24 --seconds 30
    timar-train --data data/speech ...

Writes <out>/train/ and <out>/val/ in the DualTalk format (docs/TRAINING_DATA.md); needs
espeak-ng, and for the default engines Festival with its three English voices:
apt-get install espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
"""
from __future__ import annotations

import argparse
import sys
import time

from timar_sdk.data.speechlike import DEFAULT_ENGINES, LISTENERS, write_speech_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--train", type=int, default=96, help="training clips")
    p.add_argument("--val", type=int, default=24, help="validation clips")
    p.add_argument("--test", type=int, default=0, help="test clips (held out; 0 = none)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help="TTS engines, comma-separated: espeak, festival")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--listener", choices=LISTENERS, default="still",
                   help="listening mouth: still (the shipped model's data) or attentive (docs/TRAINING_DATA.md)")
    a = p.parse_args(argv)
    splits = {"train": a.train, "val": a.val}
    if a.test:
        splits["test"] = a.test
    total = sum(splits.values())
    done = [0]
    t0 = time.time()

    def progress(name):
        done[0] += 1
        print(f"\r{done[0]}/{total} clips ({time.time() - t0:.0f} s)", end="", file=sys.stderr,
              flush=True)

    out = write_speech_corpus(a.out, splits, seconds=a.seconds, seed=a.seed,
                              engines=tuple(e.strip() for e in a.engines.split(",") if e.strip()),
                              workers=a.workers, progress=progress, listener=a.listener)
    print(f"\nwrote {total} clips of {a.seconds:g} s to {out} ({', '.join(f'{k}: {v}' for k, v in splits.items())}) "
          f"in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
