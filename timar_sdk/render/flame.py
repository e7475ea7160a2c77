"""The real FLAME head for previews, for users who have the FLAME model file.

FLAME (Li et al., SIGGRAPH Asia 2017) needs registration at https://flame.is.tue.mpg.de, so it
is never shipped or downloaded here. This module reads a model file the user has, and computes
the mesh in numpy: expression blend shapes, pose-corrective blend shapes, joints regressed from
the shaped mesh, and linear blend skinning over FLAME's kinematic tree (global, neck, jaw, left
eye, right eye).

The 56-float motion vector maps onto FLAME as: expression 0..49 -> expression coefficients
0..49; jaw pose 50..52 -> the jaw joint; neck/global pose 53..55 -> the neck joint; the global
joint and the eyes stay at identity, and the shape coefficients are zero (the mean head).

File formats: ``.npz`` (recommended; ``convert_flame_pickle`` writes one) or FLAME's
official ``.pkl``, read by a restricted unpickler that builds numpy arrays only. Chumpy
objects (the official file stores arrays inside chumpy ``Ch`` objects) and scipy sparse
matrices are read as plain data without importing chumpy or scipy and without running any
code from the file; every other class is refused.

    python -m timar_sdk.render.flame generic_model.pkl flame.npz
"""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np

from timar_sdk.render.raster import Camera, axis_angle_to_matrix

REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table",
                 "weights", "f")
N_EXPRESSION_FLAME = 100  # FLAME's shapedirs = 300 shape components + 100 expression components

# FLAME's joints, in the order of its kinematic tree.
GLOBAL, NECK, JAW, EYE_L, EYE_R = range(5)


class FlameFileError(ValueError):
    """The FLAME file is missing keys, has inconsistent shapes or holds unsafe objects."""


# ------------------------------------------------------------------------------ safe loading
class _DataStub:
    """Placeholder for an object from the file: keeps its pickled state, runs nothing."""

    _kind = "object"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _ChumpyStub(_DataStub):
    _kind = "chumpy"


class _SparseStub(_DataStub):
    _kind = "sparse"


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_PLAIN_GLOBALS = {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                  ("__builtin__", "object"), ("builtins", "object"),
                  ("__builtin__", "set"), ("builtins", "set"),
                  ("__builtin__", "frozenset"), ("builtins", "frozenset"),
                  ("collections", "OrderedDict"),
                  ("_codecs", "encode")}  # how protocol-2 pickles spell bytes
_SPARSE_CLASSES = {"csc_matrix", "csr_matrix", "coo_matrix"}


def _numpy_global(name):
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
            "_frombuffer": numeric._frombuffer, "ndarray": np.ndarray, "dtype": np.dtype}[name]


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(name)
        if (module, name) in _PLAIN_GLOBALS:
            import codecs
            import collections
            import copyreg
            return {"_reconstructor": copyreg._reconstructor, "object": object, "set": set,
                    "frozenset": frozenset, "OrderedDict": collections.OrderedDict,
                    "encode": codecs.encode}[name]
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStub
        if module.startswith("scipy.sparse") and name in _SPARSE_CLASSES:
            stub = type(name, (_SparseStub,), {"_format": name[:3]})
            return stub
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a FLAME pickle: only numpy arrays, chumpy "
            "arrays and scipy sparse matrices are read (convert the file to .npz, see "
            "docs/RENDERING.md)")


def _to_array(key, value):
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise FlameFileError(f"FLAME key {key!r} holds Python objects, not numbers")
        return value
    if isinstance(value, _ChumpyStub):
        state = value.state if isinstance(value.state, dict) else {}
        x = state.get("x")
        if isinstance(x, np.ndarray) and x.dtype != object:
            return x
        raise FlameFileError(
            f"FLAME key {key!r} is a chumpy expression, not a stored array; convert the file "
            "with chumpy installed (docs/RENDERING.md)")
    if isinstance(value, _SparseStub):
        st = value.state if isinstance(value.state, dict) else {}
        shape = st.get("_shape", st.get("shape"))
        data, indices, indptr = st.get("data"), st.get("indices"), st.get("indptr")
        fmt = getattr(value, "_format", "csc")
        if shape is None or data is None or indices is None:
            raise FlameFileError(f"FLAME key {key!r}: unreadable sparse matrix")
        dense = np.zeros(tuple(int(s) for s in shape), dtype=np.float64)
        if fmt == "coo":
            row, col = st.get("row"), st.get("col")
            np.add.at(dense, (np.asarray(row), np.asarray(col)), np.asarray(data))
            return dense
        counts = np.diff(np.asarray(indptr))
        major = np.repeat(np.arange(len(counts)), counts)
        if fmt == "csc":
            np.add.at(dense, (np.asarray(indices), major), np.asarray(data))
        else:
            np.add.at(dense, (major, np.asarray(indices)), np.asarray(data))
        return dense
    if isinstance(value, (int, float, list, tuple)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise FlameFileError(f"FLAME key {key!r} holds Python objects, not numbers")
        return arr
    return value  # strings etc.: kept, never used


def load_flame_arrays(path) -> dict[str, np.ndarray]:
    """Read a FLAME model file (.npz, or .pkl through the restricted unpickler) into arrays and
    check that every key FLAME needs is there."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FLAME model file not found: {path}")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickle: refused
            raise FlameFileError(f"{path}: {e} (the .npz must hold numeric arrays only)") from e
    elif path.suffix.lower() in (".pkl", ".pickle"):
        data = path.read_bytes()
        try:
            obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise FlameFileError(f"{path}: {e}") from e
        if not isinstance(obj, dict):
            raise FlameFileError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
        raw = {str(k): _to_array(str(k), v) for k, v in obj.items()}
    else:
        raise FlameFileError(f"{path}: unknown FLAME file type {path.suffix!r} (use .npz or .pkl)")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise FlameFileError(
            f"{path} is not a FLAME model file: missing keys {', '.join(missing)} "
            f"(a FLAME file has {', '.join(REQUIRED_KEYS)})")
    return {k: np.asarray(v) for k, v in raw.items() if isinstance(v, np.ndarray)
            or k in REQUIRED_KEYS}


def convert_flame_pickle(src, dst) -> Path:
    """Convert FLAME's official pickle to a plain ``.npz`` (numeric arrays only)."""
    arrays = load_flame_arrays(src)
    keep = {k: np.asarray(v) for k, v in arrays.items()
            if isinstance(v, np.ndarray) and v.dtype != object and v.dtype.kind in "biuf"}
    dst = Path(dst)
    np.savez(dst, **keep)
    return dst


# ------------------------------------------------------------------------------ the model
class FlameModel:
    """FLAME in numpy: ``vertices(expression, jaw, neck)`` -> (V, 3)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str = "FLAME file"):
        a = arrays
        self.v_template = np.asarray(a["v_template"], dtype=np.float64)
        if self.v_template.ndim != 2 or self.v_template.shape[1] != 3:
            raise FlameFileError(
                f"{source}: v_template must be (V, 3), got {self.v_template.shape}")
        nv = self.v_template.shape[0]
        shapedirs = np.asarray(a["shapedirs"], dtype=np.float64)
        if shapedirs.ndim != 3 or shapedirs.shape[:2] != (nv, 3):
            raise FlameFileError(f"{source}: shapedirs must be (V, 3, K), got {shapedirs.shape}")
        k = shapedirs.shape[2]
        n_shape = None
        for key in ("n_shape", "num_shape", "shape_params"):
            if key in a and np.asarray(a[key]).size == 1:
                n_shape = int(np.asarray(a[key]))
        if n_shape is None:
            n_shape = k - N_EXPRESSION_FLAME if k > N_EXPRESSION_FLAME else 0
        n_exp = min(50, k - n_shape)
        if n_exp <= 0:
            raise FlameFileError(f"{source}: shapedirs has no expression components "
                                 f"({k} components, {n_shape} of them shape)")
        self.n_shape, self.n_exp = n_shape, n_exp
        self.exprdirs = shapedirs[:, :, n_shape:n_shape + n_exp]  # (V, 3, n_exp)
        self.faces = np.asarray(a["f"], dtype=np.int64)
        if self.faces.ndim != 2 or self.faces.shape[1] != 3 or self.faces.max() >= nv:
            raise FlameFileError(f"{source}: f must be (F, 3) vertex indices < {nv}")
        kt = np.asarray(a["kintree_table"]).astype(np.int64)
        if kt.ndim != 2 or kt.shape[0] != 2:
            raise FlameFileError(f"{source}: kintree_table must be (2, J), got {kt.shape}")
        nj = kt.shape[1]
        if nj < 3:
            raise FlameFileError(f"{source}: FLAME needs joints global, neck, jaw; got {nj}")
        col_of = {int(kt[1, i]): i for i in range(nj)}
        self.parents = np.array([-1] + [col_of.get(int(kt[0, i]) & 0xFFFFFFFF, -1)
                                         for i in range(1, nj)])
        if np.any(self.parents[1:] < 0) or np.any(self.parents[1:] >= np.arange(1, nj)):
            raise FlameFileError(f"{source}: kintree_table parents must precede their children")
        jr = np.asarray(a["J_regressor"], dtype=np.float64)
        if jr.shape != (nj, nv):
            raise FlameFileError(f"{source}: J_regressor must be ({nj}, {nv}), got {jr.shape}")
        self.J_regressor = jr
        w = np.asarray(a["weights"], dtype=np.float64)
        if w.shape != (nv, nj):
            raise FlameFileError(f"{source}: weights must be ({nv}, {nj}), got {w.shape}")
        self.weights = w
        pd = np.asarray(a["posedirs"], dtype=np.float64)
        npf = 9 * (nj - 1)
        if pd.shape == (nv, 3, npf):
            self.posedirs = pd.reshape(nv * 3, npf)
        elif pd.shape == (npf, nv * 3):
            self.posedirs = pd.T.copy()
        else:
            raise FlameFileError(f"{source}: posedirs must be ({nv}, 3, {npf}) or "
                                 f"({npf}, {nv * 3}), got {pd.shape}")
        self.n_joints = nj

    @classmethod
    def load(cls, path) -> FlameModel:
        return cls(load_flame_arrays(path), source=str(path))

    def vertices(self, expression=None, jaw=None, neck=None, global_pose=None,
                 return_joints: bool = False):
        """Posed vertices (V, 3): expression blend shapes, pose correctives, then LBS."""
        v = self.v_template.copy()
        if expression is not None:
            e = np.zeros(self.n_exp)
            ex = np.asarray(expression, dtype=np.float64).reshape(-1)[: self.n_exp]
            e[: len(ex)] = ex
            v += self.exprdirs @ e
        joints = self.J_regressor @ v  # (J, 3) from the shaped mesh
        pose = np.zeros((self.n_joints, 3))
        if global_pose is not None:
            pose[GLOBAL] = global_pose
        if neck is not None:
            pose[NECK] = neck
        if jaw is not None:
            pose[JAW] = jaw
        rots = axis_angle_to_matrix(pose)  # (J, 3, 3)
        feat = (rots[1:] - np.eye(3)).reshape(-1)
        v = v + (self.posedirs @ feat).reshape(-1, 3)
        # World transform of every joint along the tree.
        g = np.zeros((self.n_joints, 4, 4))
        for i in range(self.n_joints):
            local = np.eye(4)
            local[:3, :3] = rots[i]
            p = self.parents[i]
            local[:3, 3] = joints[i] - (joints[p] if p >= 0 else 0.0)
            g[i] = local if p < 0 else g[p] @ local
        posed_joints = g[:, :3, 3].copy()
        # Remove the rest joint position: A_i maps rest-pose points to posed points.
        a = g.copy()
        a[:, :3, 3] -= np.einsum("jab,jb->ja", g[:, :3, :3], joints)
        t = np.einsum("vj,jab->vab", self.weights, a)  # (V, 4, 4)
        out = np.einsum("vab,vb->va", t[:, :3, :3], v) + t[:, :3, 3]
        return (out, posed_joints) if return_joints else out


class FlameHead:
    """A FLAME model as a preview rig (same interface as ``ProceduralHead``)."""

    two_sided = True  # FLAME's mouth is an open hole: its inside is drawn, darkened

    def __init__(self, model: FlameModel | str | Path,
                 skin=(0.80, 0.62, 0.52), iris=(0.30, 0.20, 0.10)):
        if not isinstance(model, FlameModel):
            model = FlameModel.load(model)
        self.model = model
        self.faces = model.faces
        self.rest = model.vertices()
        nv = len(self.rest)
        self.albedo = np.broadcast_to(np.asarray(skin, np.float32), (nv, 3)).copy()
        self.spec = np.full(nv, 0.12, np.float32)
        # Eyeballs: vertices skinned to the eye joints get sclera, iris and pupil colours.
        if model.n_joints >= 5:
            _, joints = model.vertices(return_joints=True)
            for j in (EYE_L, EYE_R):
                m = model.weights[:, j] > 0.5
                if m.sum() < 8:
                    continue
                d = self.rest[m] - joints[j]
                d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
                cos = d[:, 2]
                col = np.where((cos > 0.97)[:, None], 0.04,
                               np.where((cos > 0.88)[:, None], np.asarray(iris),
                                        np.array([0.92, 0.90, 0.87])))
                self.albedo[m] = col
                self.spec[m] = 0.6
        self.static_vertices = None
        lo, hi = self.rest.min(axis=0), self.rest.max(axis=0)
        center = (lo + hi) / 2.0
        extent = float(max(hi[1] - lo[1], (hi[0] - lo[0]) * 1.1))
        fov = 20.0
        dist = 0.5 * extent / 0.78 / np.tan(np.radians(fov / 2)) + (hi[2] - center[2])
        self.camera = Camera(target=(float(center[0]), float(center[1]), float(center[2])),
                             distance=float(dist), fov_y_deg=fov)

    def pose(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame, dtype=np.float64)
        return self.model.vertices(expression=frame[0:50], jaw=frame[50:53], neck=frame[53:56])


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m timar_sdk.render.flame FLAME.pkl OUT.npz", file=sys.stderr)
        return 2
    out = convert_flame_pickle(argv[0], argv[1])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
