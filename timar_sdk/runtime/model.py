"""`Model`: a bundle and its backend, loaded once and shared by any number of `Session`s.

    model = timar_sdk.Model()                        # the shipped bundle, loaded once
    a, b = timar_sdk.Session(model, seed=1), timar_sdk.Session(model, seed=2)
    reference = timar_sdk.Session(timar_sdk.Model.from_torch(torch_model), seed=1)   # unexported

A Model holds only what does not change while it serves conversations: the validated bundle,
the backend's loaded graphs and the motion statistics. Each Session holds its own conversation
(cache, ring ages, generator, buffers), so sessions of one Model may run on different threads at
once: ONNX Runtime's and torch's inference calls are thread-safe, and the TensorRT backend
serialises its calls on its CUDA stream.
"""
from __future__ import annotations

import os
import time

import numpy as np

from timar_sdk.errors import BundleError, TimarInputError
from timar_sdk.layout import MOTION_DIM
from timar_sdk.runtime.backends import BACKENDS, make_backend
from timar_sdk.runtime.bundle import Bundle
from timar_sdk.runtime.rng import PhiloxNormal


class Model:
    """A loaded bundle.

    bundle: a bundle folder (str or path), a `Bundle`, or None for the default bundle shipped in
        the package.
    backend: "auto" | "onnxruntime" | "tensorrt" | "torch".
    threads: intra-op threads of the backend, 1..(CPUs of this process) (None: the backend's
        default).
    spin: ONNX Runtime's threads spin between operators instead of sleeping: 3-6 ms faster per
        tiny turn on a machine that runs nothing else, 2.5x slower beside another busy process
        (BENCHMARKS.md), so off by default.
    Raises TimarInputError naming the argument, or BundleError naming the bundle file.
    """

    def __init__(self, bundle: str | os.PathLike | Bundle | None = None, backend: str = "auto",
                 threads: int | None = None, spin: bool = False):
        t0 = time.perf_counter()
        if bundle is not None and not isinstance(bundle, (str, os.PathLike, Bundle)):
            raise TimarInputError(f"bundle: expected a bundle folder (str or path), a Bundle or None, "
                                  f"got {bundle!r}")
        if backend not in BACKENDS:
            raise TimarInputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if threads is not None:
            threads = check_integer("threads", threads, 1, cpus())
        if not isinstance(spin, bool):
            raise TimarInputError(f"spin: expected True or False, got {spin!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        m = self.bundle.manifest
        if m["generator"]["name"] != PhiloxNormal.NAME:
            raise BundleError(f"manifest.json: generator {m['generator']['name']!r} is not implemented "
                              f"here (this runtime has {PhiloxNormal.NAME!r})")
        # "cached": past turns live as keys/values (the SDK's models). "window_recompute": past
        # turns live as token embeddings and the whole window runs each turn (the authors' models).
        self.window = m["attention"] == "window_recompute"
        if self.window and m["audio_normalization"]["mode"] != "running":
            raise BundleError(f"manifest.json: audio_normalization {m['audio_normalization']['mode']!r} is not "
                              f"implemented for window_recompute bundles (this runtime has 'running')")
        self.frames = m["frames_per_turn"]
        self.samples = m["samples_per_turn"]
        self.motion_mean, self.motion_std = self.bundle.motion_mean, self.bundle.motion_std
        self.backend = make_backend(backend, self.bundle, threads, spin)
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def from_torch(cls, module, threads: int | None = None) -> "Model":
        """A Model over an in-memory torch model (a `timar_sdk.model.timar.Timar`, or the authors'
        `timar_sdk.model.authors.WindowTimar`), on the torch backend (CPU), without exporting it:
        `Session(Model.from_torch(model), seed=...)` is the torch reference the exported bundle
        must reproduce. Its manifest is the one export would write (no graph files). Needs the
        train extra; raises ValueError for a model that cannot stream (an MLP head, full attention).
        """
        from timar_sdk.export.manifest import in_memory_bundle
        return cls(in_memory_bundle(module), backend="torch", threads=threads)

    @property
    def info(self) -> dict:
        """The bundle's facts and the backend (motion names: timar_sdk.MOTION_NAMES)."""
        m = self.bundle.manifest
        return {"fps": m["fps"], "frames_per_turn": self.frames, "sample_rate": m["sample_rate"],
                "samples_per_turn": self.samples, "motion_dim": MOTION_DIM,
                "motion_layout": {k: m["motion_layout"][k] for k in ("exp", "jaw", "neck")},
                "context_turns": m["context_turns"], "attention": m["attention"],
                "backend": self.backend.name, "providers": list(self.backend.providers),
                "model_preset": m["model"]["preset"]}


def check_integer(name: str, value, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi, else TimarInputError naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise TimarInputError(f"{name}: expected an integer in {lo}..{hi}, got {value!r}")
    return int(value)


def cpus() -> int:
    """CPUs this process may run on (the affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
