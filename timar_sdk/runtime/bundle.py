"""Reading a bundle: manifest.json validated against the JSON schema, every file present and
matching its sha256. Torch-free: the runtime uses this on an edge device."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2   # 2: one encoder_step input per layer and key/value (cache.past_key_values_inputs)
GENERATOR = {"name": "philox4x32-10-boxmuller",
             "noise_order": "per turn: start noise [F,56], then one [F,56] per respaced step "
                            "(the last step's drawn and discarded); CFG rows share it"}
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "default_bundle"


class BundleError(ValueError):
    """A bundle that cannot be used: the message names the file and what is wrong."""


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A validated bundle folder. `manifest` is the parsed manifest.json."""

    def __init__(self, directory: str | Path | None = None, verify_hashes: bool = True):
        self.dir = Path(directory) if directory is not None else DEFAULT_BUNDLE
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise BundleError(f"bundle: no manifest.json in {str(self.dir)!r} (expected a folder written by timar-export)")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{path}: not valid JSON ({e})") from None
        validate_manifest(self.manifest, str(path))
        for name, graph in self.manifest["graphs"].items():
            self._check_file(self.dir / graph["file"], graph["sha256"], verify_hashes, f"graph {name!r}")

    @staticmethod
    def _check_file(path: Path, sha256: str, verify: bool, what: str) -> None:
        if not path.is_file():
            raise BundleError(f"{path}: missing ({what} listed in manifest.json)")
        if verify and sha256_of(path) != sha256:
            raise BundleError(f"{path}: sha256 does not match manifest.json ({what}); the file is "
                              f"truncated, modified or from another export")

    @property
    def id(self) -> str:
        """Identifies the bundle's graphs (a hash of their hashes): snapshots name it."""
        joined = ",".join(f"{k}={g['sha256']}" for k, g in sorted(self.manifest["graphs"].items()))
        return hashlib.sha256(joined.encode()).hexdigest()

    def graph_path(self, name: str) -> Path:
        return self.dir / self.manifest["graphs"][name]["file"]

    def graph(self, name: str) -> dict:
        return self.manifest["graphs"][name]

    def engine_set(self, gpu: str, tensorrt_version: str) -> dict | None:
        """The engines built for this GPU and TensorRT version, hashes checked, or None."""
        for entry in self.manifest["engines"]:
            if entry["gpu"] == gpu and entry["tensorrt"] == tensorrt_version:
                for name, f in entry["files"].items():
                    self._check_file(self.dir / f["file"], f["sha256"], True, f"engine {name!r}")
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
    def alphas_cumprod(self) -> np.ndarray:
        return np.asarray(self.manifest["diffusion"]["alphas_cumprod"], np.float64)
