"""DualTalk-protocol metrics (docs/DESIGN.md 7) for predicted agent motion.

Inputs are (T, 56) arrays in the SDK layout (``timar_sdk.layout``: exp 0..49, jaw 50..52, pose
53..55), raw FLAME units (unnormalised, unscaled). Every metric is computed per group
(``exp``, ``jaw``, ``pose``); keys are ``<metric>_<group>``:

====== ====================================================================================
fd     Frechet distance between prediction and ground-truth frame distributions
pfd    paired FD: FD of concat(partner, self) along features, prediction vs ground truth
mse    mean squared error
sid    entropy (bits) of k-means cluster usage: clusters fitted on gt, labelling pred
rsid   the reverse: clusters fitted on pred, labelling gt
rpcc   |pcc(gt, partner) - pcc(pred, partner)| on the flattened arrays
sts    sqrt(sum of squared velocity differences / 0.1)
var    mean over dims of the prediction's per-dim variance (ddof 0)
====== ====================================================================================

The reference's "diversity" metric (unseeded random frame pairs, needs T >= 100) is left out.
Per-file values are averaged with :func:`aggregate`; :func:`published_scale` applies the paper's
scales and :func:`format_table` prints them.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.linalg import LinAlgWarning, sqrtm
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from .layout import MOTION_DIM, MOTION_GROUPS

SID_CLUSTERS = {"exp": 40, "jaw": 10, "pose": 10}
METRICS = ("fd", "pfd", "mse", "sid", "rsid", "rpcc", "sts", "var")
GROUPS = tuple(MOTION_GROUPS)
PUBLISHED_SCALES = {
    "fd": {"exp": 1.0, "jaw": 1e3, "pose": 1e2},
    "pfd": {"exp": 1.0, "jaw": 1e3, "pose": 1e2},
    "mse": {"exp": 10.0, "jaw": 1e3, "pose": 1e2},
    "sid": {"exp": 1.0, "jaw": 1.0, "pose": 1.0},
    "rsid": {"exp": 1.0, "jaw": 1.0, "pose": 1.0},
    "rpcc": {"exp": 1e2, "jaw": 10.0, "pose": 10.0},
    "sts": {"exp": 1.0, "jaw": 1.0, "pose": 1.0},
    "var": {"exp": 1.0, "jaw": 1.0, "pose": 1.0},
}
"""Multipliers the paper's tables apply to each ``<metric>_<group>`` value."""


def frechet_distance(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians fitted to two sets of frames.

    Args:
        x, y: (T1, D) and (T2, D) frames (T >= 2).
        eps: added to both covariance diagonals when the matrix root is not finite.
    Returns:
        ||mu_x - mu_y||^2 + tr(S_x + S_y - 2 sqrtm(S_x S_y)), covariances by np.cov(rowvar=False).
    Raises:
        ValueError: the root has an imaginary diagonal component above 1e-3.
    """
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():  # singular covariances (e.g. a still group) are handled below
        warnings.simplefilter("ignore", LinAlgWarning)
        covmean = sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"imaginary component {imag:.3g} in the covariance root")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _sid(fit_on: np.ndarray, label: np.ndarray, k: int) -> float:
    """Entropy in bits of the k-means cluster histogram of `label`, clusters fitted on `fit_on`."""
    k = min(k, fit_on.shape[0])
    with warnings.catch_warnings():  # fewer distinct points than clusters: sklearn warns
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, random_state=0, n_init="auto").fit(fit_on)
        labels = km.predict(label)
    p = np.bincount(labels, minlength=k) / labels.shape[0]
    return float(-np.sum(p * np.log2(p + 1e-6)))


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _check(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != MOTION_DIM or a.shape[0] < 2:
        raise ValueError(f"{name} must have shape (T, {MOTION_DIM}) with T >= 2, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    return a


def compute_metrics(pred: np.ndarray, gt: np.ndarray, partner: np.ndarray) -> dict[str, float]:
    """All metrics of one file, unscaled.

    Args:
        pred: (T, 56) predicted agent motion.
        gt: (T, 56) ground-truth agent motion.
        partner: (T, 56) the user's (partner's) motion.
        The three are truncated to the shortest length.
    Returns:
        {"<metric>_<group>": value} for metric in METRICS and group in exp, jaw, pose.
        rpcc is NaN when a flattened group is constant (correlation undefined).
        Runs with BLAS/OpenMP limited to one thread: per-file work is small, and thread pools
        are slower than one thread on it (much slower on a busy machine); parallelise over files.
    Raises:
        ValueError: an input is not 2-D, not 56 wide, has fewer than 2 frames or non-finite values.
    """
    pred, gt, partner = _check("pred", pred), _check("gt", gt), _check("partner", partner)
    t = min(len(pred), len(gt), len(partner))
    with threadpool_limits(limits=1):
        out = _group_metrics(pred[:t], gt[:t], partner[:t])
    return {f"{m}_{g}": out[f"{m}_{g}"] for m in METRICS for g in GROUPS}


def _group_metrics(pred: np.ndarray, gt: np.ndarray, partner: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for g, sl in MOTION_GROUPS.items():
        p, y, u = pred[:, sl], gt[:, sl], partner[:, sl]
        dv = np.diff(p, axis=0) - np.diff(y, axis=0)
        out[f"fd_{g}"] = frechet_distance(p, y)
        out[f"pfd_{g}"] = frechet_distance(np.concatenate((u, p), axis=1),
                                           np.concatenate((u, y), axis=1))
        out[f"mse_{g}"] = float(np.mean((p - y) ** 2))
        out[f"sid_{g}"] = _sid(y, p, SID_CLUSTERS[g])
        out[f"rsid_{g}"] = _sid(p, y, SID_CLUSTERS[g])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"rpcc_{g}"] = abs(_pcc(y, u) - _pcc(p, u))
        out[f"sts_{g}"] = float(np.sqrt(np.sum(dv**2) / 0.1))
        out[f"var_{g}"] = float(np.mean(np.var(p, axis=0)))
    return out


def aggregate(per_file: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over files. All dicts must have the same keys; NaN propagates."""
    if not per_file:
        raise ValueError("aggregate needs at least one file's metrics")
    keys = list(per_file[0])
    for i, d in enumerate(per_file):
        if set(d) != set(keys):
            raise ValueError(f"file {i} has keys {sorted(d)}, expected {sorted(keys)}")
    return {k: float(np.mean([d[k] for d in per_file])) for k in keys}


def published_scale(d: Mapping[str, float]) -> dict[str, float]:
    """Apply PUBLISHED_SCALES to `<metric>_<group>` keys; other keys pass through unchanged."""
    out = {}
    for key, v in d.items():
        metric, _, group = key.rpartition("_")
        out[key] = v * PUBLISHED_SCALES.get(metric, {}).get(group, 1.0)
    return out


_TABLE_ROWS = (("FD", "fd"), ("P-FD", "pfd"), ("MSE", "mse"), ("SID", "sid"),
               ("rPCC", "rpcc"), ("STS", "sts"), ("var", "var"))


def format_table(scaled: Mapping[str, float]) -> str:
    """Paper-style table of already scaled values (2 decimals; '-' where a key is missing).

    Rows FD, P-FD, MSE, SID, rPCC, STS, var; columns EXP, JAW, POSE.
    """
    lines = [f"{'':<6}{'EXP':>10}{'JAW':>10}{'POSE':>10}"]
    for label, metric in _TABLE_ROWS:
        cells = [scaled.get(f"{metric}_{g}") for g in GROUPS]
        text = ["-" if c is None else f"{c:.2f}" for c in cells]
        lines.append(f"{label:<6}" + "".join(f"{c:>10}" for c in text))
    return "\n".join(lines)
