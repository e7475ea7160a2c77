"""Reading and writing a bundle's manifest. Torch-free: the runtime uses this on an edge device.

A bundle folder holds `manifest.json`, `manifest.sha256` (the sha256 of manifest.json's exact
bytes, lowercase hex, then a newline) and the files the manifest lists with their sha256. Loading
checks, in order: the manifest's digest, its JSON schema, the consistency of its numbers, that
every listed file stays inside the folder, and every file's sha256. The manifest's digest is the
bundle's id: it covers the graphs' hashes, so it names one exact bundle.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import os

import numpy as np

from timar_sdk.errors import BundleError
from timar_sdk.runtime.smoothing import check_smoothing

SCHEMA_VERSION = 2   # 2: one encoder_step input per layer and key/value (cache.past_key_values_inputs)
GENERATOR = {"name": "philox4x32-10-boxmuller",
             "noise_order": "per turn: start noise [F,56], then one [F,56] per respaced step "
                            "(the last step's drawn and discarded); CFG rows share it"}
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "default_bundle"
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
# Ranges of the sampling settings, shared by the manifest's defaults and Session's arguments.
TEMPERATURE_RANGE = (0.0, 10.0)
CFG_RANGE = (0.0, 20.0)


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    return json.loads(resources.files("timar_sdk").joinpath("schemas/manifest.schema.json").read_text())


def validate_manifest(manifest: dict, where: str = "manifest.json") -> None:
    """Schema version first (a clear message for a bundle from the future), then the JSON schema."""
    import jsonschema

    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{where}: no integer schema_version; not a timar-sdk bundle manifest")
    if version != SCHEMA_VERSION:
        newer = "newer" if version > SCHEMA_VERSION else "older"
        raise BundleError(f"{where}: schema_version {version} is {newer} than this timar-sdk reads "
                          f"({SCHEMA_VERSION}); re-export the bundle with this timar-sdk or upgrade")
    try:
        jsonschema.validate(manifest, manifest_schema())
    except jsonschema.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise BundleError(f"{where}: invalid at {path}: {e.message}") from None
    check_consistency(manifest, where)


def check_consistency(m: dict, where: str = "manifest.json") -> None:
    """The numbers the schema cannot check: finite statistics, a valid noise schedule, a turn
    whose audio and frames agree, a cache that matches the context, defaults in range."""
    def fail(field: str, expected: str, got) -> None:
        raise BundleError(f"{where}: {field}: expected {expected}, got {got}")

    for field in ("motion_mean", "motion_std"):
        v = np.asarray(m[field], np.float64)
        if not np.isfinite(v).all() or np.abs(v).max() > np.finfo(np.float32).max:
            fail(field, "56 finite float32 values", "NaN, Inf or an out-of-range value")
    if not (np.asarray(m["motion_std"], np.float64) > 0).all():
        fail("motion_std", "values > 0", f"min {min(m['motion_std'])}")
    d = m["diffusion"]
    ac = np.asarray(d["alphas_cumprod"], np.float64)
    if len(ac) != d["num_train_steps"]:
        fail("diffusion.alphas_cumprod", f"num_train_steps = {d['num_train_steps']} values", len(ac))
    if not (np.isfinite(ac).all() and (ac > 0).all() and (ac < 1).all() and (np.diff(ac) < 0).all()):
        fail("diffusion.alphas_cumprod", "finite values in (0, 1), strictly decreasing", "values that are not")
    if m["samples_per_turn"] * m["fps"] != m["frames_per_turn"] * m["sample_rate"]:
        fail("samples_per_turn", f"frames_per_turn * sample_rate / fps = "
             f"{m['frames_per_turn'] * m['sample_rate'] / m['fps']:g}", m["samples_per_turn"])
    w = m["context_turns"]
    if m["attention"] == "cached":
        c = m["cache"]
        for field, want in (("slots", w - 1), ("empty_age", w)):
            if c[field] != want:
                fail(f"cache.{field}", f"{want} (context_turns {w})", c[field])
        tokens = c["past_key_values_shape"][4]
        if tokens != (w - 1) * c["tokens_per_slot"]:
            fail("cache.past_key_values_shape[4]", f"(context_turns - 1) * tokens_per_slot = "
                 f"{(w - 1) * c['tokens_per_slot']}", tokens)
        if len(c["past_key_values_inputs"]) != 2 * c["layers"]:
            fail("cache.past_key_values_inputs", f"2 * layers = {2 * c['layers']} names",
                 len(c["past_key_values_inputs"]))
        step = {t["name"]: t["dtype"] for t in m["graphs"].get("encoder_step", {}).get("inputs", [])}
        dtype = cache_dtype_of(m)
        wrong = [n for n in c["past_key_values_inputs"] if n in step and step[n] != dtype]
        if wrong:
            fail(f"graphs.encoder_step.inputs {wrong[0]!r} dtype", f"cache.dtype {dtype!r}", step[wrong[0]])
    elif m["window"]["max_turns"] != w:
        fail("window.max_turns", f"context_turns = {w}", m["window"]["max_turns"])
    sampling = m["sampling"]
    if not 1 <= sampling["steps"] <= d["num_train_steps"]:
        fail("sampling.steps", f"1..{d['num_train_steps']}", sampling["steps"])
    for field, (lo, hi) in (("temperature", TEMPERATURE_RANGE), ("cfg", CFG_RANGE)):
        if not lo <= sampling[field] <= hi:
            fail(f"sampling.{field}", f"a number in {lo:g}..{hi:g}", sampling[field])
    if "smoothing" in m:
        try:
            check_smoothing(m["smoothing"], "smoothing")
        except ValueError as e:
            raise BundleError(f"{where}: {e}") from None


def manifest_bytes(manifest: dict) -> bytes:
    """manifest.json's content as the SDK writes it."""
    return (json.dumps(manifest, indent=1) + "\n").encode()


def write_manifest(directory: str | Path, manifest: dict) -> str:
    """Write manifest.json and manifest.sha256 into `directory`; returns the digest (bundle id).
    Each file is written to a temporary name and renamed, so a reader never sees half a file."""
    data = manifest_bytes(manifest)
    digest = hashlib.sha256(data).hexdigest()
    for name, content in ((MANIFEST, data), (MANIFEST_DIGEST, (digest + "\n").encode())):
        path = Path(directory) / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    return digest


PRECISIONS = ("fp32", "fp16", "int8")     # a graph's arithmetic (manifest graphs.<name>.precision)
CACHE_DTYPES = ("float32", "float16")      # a cached bundle's KV cache (manifest cache.dtype)


def graph_precision(graph: dict) -> str:
    """A manifest graph entry's precision; bundles from before issue 16 have none: "fp32"."""
    return graph.get("precision", "fp32")


def cache_dtype_of(manifest: dict) -> str:
    """A cached bundle's cache dtype ("float32" when not recorded)."""
    return manifest.get("cache", {}).get("dtype", "float32")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A validated bundle folder. `manifest` is the parsed manifest.json, `id` its sha256.
    `modules` is None, except in a bundle made in memory (`in_memory`)."""

    modules: dict | None = None

    def __init__(self, directory: str | os.PathLike | None = None, verify_hashes: bool = True):
        self.dir = Path(directory) if directory is not None else DEFAULT_BUNDLE
        path = self.dir / MANIFEST
        if not path.is_file():
            raise BundleError(f"bundle: no manifest.json in {str(self.dir)!r} (expected a folder written by timar-export)")
        data = path.read_bytes()
        self.id = hashlib.sha256(data).hexdigest()
        digest_path = self.dir / MANIFEST_DIGEST
        if not digest_path.is_file():
            raise BundleError(f"bundle: no {MANIFEST_DIGEST} in {str(self.dir)!r}: re-export the bundle with "
                              f"this timar-sdk (bundles now carry the sha256 of their manifest)")
        recorded = digest_path.read_bytes().decode("ascii", "replace").strip()
        if recorded != self.id:
            raise BundleError(f"{path}: does not match {MANIFEST_DIGEST} (edited or corrupted); re-export the "
                              f"bundle, or restore the original manifest.json")
        try:
            self.manifest = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise BundleError(f"{path}: not a text file (expected UTF-8 JSON)") from None
        except json.JSONDecodeError as e:
            raise BundleError(f"{path}: not valid JSON ({e})") from None
        validate_manifest(self.manifest, str(path))
        for name, graph in self.manifest["graphs"].items():
            self._check_file(self.file_path(graph["file"], f"graphs.{name}.file"), graph["sha256"],
                             verify_hashes, f"graph {name!r}")
        for i, entry in enumerate(self.manifest["engines"]):   # refused here, hashed when used
            for name, f in entry["files"].items():
                self.file_path(f["file"], f"engines[{i}].files.{name}.file")

    @classmethod
    def in_memory(cls, manifest: dict, modules: dict) -> "Bundle":
        """A bundle with no folder (`Model.from_torch`): a manifest built in memory and, standing
        for its graph files, the torch modules `modules` (graph name -> module). Only the torch
        backend runs it. The manifest's numbers are checked; the schema is not, as it requires
        the graph files."""
        check_consistency(manifest, "manifest (in memory)")
        bundle = cls.__new__(cls)
        bundle.dir, bundle.manifest, bundle.modules = None, manifest, modules
        bundle.id = hashlib.sha256(manifest_bytes(manifest)).hexdigest()
        return bundle

    def file_path(self, name: str, field: str) -> Path:
        """`name` from the manifest as a path inside the bundle folder; anything that would leave
        it (an absolute path, a '..' component, a symlink pointing out) is refused."""
        rel = Path(name)
        if not name or rel.is_absolute() or rel.drive or ".." in rel.parts or "\\" in name or "\0" in name:
            raise BundleError(f"{self.dir / MANIFEST}: {field}: expected a relative path inside the bundle "
                              f"folder, got {name!r}")
        path = self.dir / rel
        root = self.dir.resolve()
        if path.exists() and not path.resolve().is_relative_to(root):
            raise BundleError(f"{self.dir / MANIFEST}: {field}: {name!r} resolves outside the bundle folder "
                              f"({path.resolve()})")
        return path

    @staticmethod
    def _check_file(path: Path, sha256: str, verify: bool, what: str) -> None:
        if not path.is_file():
            raise BundleError(f"{path}: missing ({what} listed in manifest.json)")
        if verify and sha256_of(path) != sha256:
            raise BundleError(f"{path}: sha256 does not match manifest.json ({what}); the file is "
                              f"truncated, modified or from another export")

    def graph_path(self, name: str) -> Path:
        return self.file_path(self.manifest["graphs"][name]["file"], f"graphs.{name}.file")

    def graph(self, name: str) -> dict:
        return self.manifest["graphs"][name]

    def engine_set(self, gpu: str, tensorrt_version: str) -> dict | None:
        """The engines built for this GPU and TensorRT version, hashes checked, or None."""
        for i, entry in enumerate(self.manifest["engines"]):
            if entry["gpu"] == gpu and entry["tensorrt"] == tensorrt_version:
                for name, f in entry["files"].items():
                    path = self.file_path(f["file"], f"engines[{i}].files.{name}.file")
                    self._check_file(path, f["sha256"], True, f"engine {name!r}")
                return entry
        return None

    # convenient views of the manifest
    def __getitem__(self, key: str):
        return self.manifest[key]

    @property
    def motion_mean(self) -> np.ndarray:
        return np.asarray(self.manifest["motion_mean"], np.float32)

    @property
    def motion_std(self) -> np.ndarray:
        return np.asarray(self.manifest["motion_std"], np.float32)

    @property
    def cache_dtype(self) -> np.dtype:
        """The KV cache's element type (cached bundles): float32, or float16 in a bundle converted
        with a half-size cache (timar_sdk.export.precision); bundles that do not record it: float32."""
        return np.dtype(cache_dtype_of(self.manifest))

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.asarray(self.manifest["diffusion"]["alphas_cumprod"], np.float64)
