"""DualTalk-protocol metrics (docs/DESIGN.md 7)."""
import numpy as np
import pytest

from timar_sdk import metrics
from timar_sdk.layout import MOTION_GROUPS
from timar_sdk.metrics import (aggregate, compute_metrics, format_table, frechet_distance,
                               published_scale)

GROUPS = ("exp", "jaw", "pose")


def _motion(seed: int, t: int = 120, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=(t, 56)), axis=0) * 0.1  # smooth-ish, non-trivial velocities
    return (walk + rng.normal(size=(t, 56))) * scale + shift


def _diag_cov_sample(seed: int, t: int, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Frames whose sample mean is mu and sample covariance (ddof 1) is exactly diag(sigma^2)."""
    a = np.random.default_rng(seed).normal(size=(t, len(mu) + 1))
    a[:, 0] = 1.0
    q = np.linalg.qr(a)[0][:, 1:]  # orthonormal columns, each orthogonal to ones (zero mean)
    return mu + np.sqrt(t - 1) * q * sigma


def test_fd_of_a_set_with_itself_is_zero():
    x = _motion(0, t=300)
    for sl in MOTION_GROUPS.values():
        assert abs(frechet_distance(x[:, sl], x[:, sl])) < 1e-6
    m = compute_metrics(x, x, _motion(1, t=300))
    for g in GROUPS:
        assert abs(m[f"fd_{g}"]) < 1e-6 and abs(m[f"pfd_{g}"]) < 1e-6
        assert m[f"mse_{g}"] == 0 and m[f"sts_{g}"] == 0 and m[f"rpcc_{g}"] == 0


@pytest.mark.parametrize("d", [3, 50])
def test_fd_matches_diagonal_closed_form(d):
    rng = np.random.default_rng(d)
    x = _diag_cov_sample(1, 200, rng.normal(size=d), rng.uniform(0.2, 2.0, size=d))
    y = _diag_cov_sample(2, 150, rng.normal(size=d), rng.uniform(0.2, 2.0, size=d))
    # closed form from the empirical statistics: |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    v1, v2 = x.var(axis=0, ddof=1), y.var(axis=0, ddof=1)
    assert np.allclose(np.cov(x, rowvar=False), np.diag(v1), atol=1e-12)  # construction is diagonal
    want = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-7, abs=1e-9)


def test_fd_retries_with_eps_and_rejects_large_imaginary_part(monkeypatch):
    calls = []

    def fake_sqrtm(m):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else np.zeros_like(m)

    x = _motion(3)[:, :3]
    monkeypatch.setattr(metrics, "sqrtm", fake_sqrtm)
    s = np.cov(x, rowvar=False)
    assert frechet_distance(x, x) == pytest.approx(2 * np.trace(s))
    assert np.allclose(calls[1], (s + 1e-6 * np.eye(3)) @ (s + 1e-6 * np.eye(3)))

    monkeypatch.setattr(metrics, "sqrtm", lambda m: m.astype(complex) + 1e-2j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(x, x)
    monkeypatch.setattr(metrics, "sqrtm", lambda m: m.astype(complex) + 1e-4j * np.eye(len(m)))
    assert np.isfinite(frechet_distance(x, x))


def test_direct_formulas():
    pred, gt, partner = _motion(10), _motion(11, scale=1.3, shift=0.2), _motion(12)
    m = compute_metrics(pred, gt, partner)
    assert set(m) == {f"{k}_{g}" for k in metrics.METRICS for g in GROUPS}
    for g, sl in MOTION_GROUPS.items():
        p, y, u = pred[:, sl], gt[:, sl], partner[:, sl]
        assert m[f"mse_{g}"] == pytest.approx(((p - y) ** 2).mean(), rel=1e-12)
        pcc = lambda a, b: np.corrcoef(a.flatten(), b.flatten())[0, 1]
        assert m[f"rpcc_{g}"] == pytest.approx(abs(pcc(y, u) - pcc(p, u)), rel=1e-9)
        vel = (p[1:] - p[:-1]) - (y[1:] - y[:-1])
        assert m[f"sts_{g}"] == pytest.approx(np.sqrt((vel**2).sum() / 0.1), rel=1e-12)
        assert m[f"var_{g}"] == pytest.approx(p.var(axis=0).mean(), rel=1e-12)
        pfd = frechet_distance(np.hstack([u, p]), np.hstack([u, y]))
        assert m[f"pfd_{g}"] == pytest.approx(pfd, rel=1e-9)
        assert m[f"fd_{g}"] > 0.1


def _clustered(t_per: dict, seed: int) -> np.ndarray:
    """Frames whose groups sit in well-separated tight clusters (k of them, equal sizes)."""
    rng = np.random.default_rng(seed)
    t = 400
    x = np.zeros((t, 56))
    for g, sl in MOTION_GROUPS.items():
        k = t_per[g]
        d = sl.stop - sl.start
        centres = rng.normal(size=(k, d)) * 50
        x[:, sl] = centres[np.arange(t) % k] + rng.normal(size=(t, d)) * 1e-3
    return x


def test_sid_entropy_in_bits():
    gt = _clustered({"exp": 40, "jaw": 10, "pose": 10}, seed=5)
    partner = _motion(6, t=400)
    m = compute_metrics(gt, gt, partner)
    for g, k in metrics.SID_CLUSTERS.items():
        assert m[f"sid_{g}"] == m[f"rsid_{g}"]
        assert m[f"sid_{g}"] == pytest.approx(np.log2(k), abs=1e-4)  # uniform use of k clusters
    still = np.repeat(gt[:1], 400, axis=0)  # a prediction that never moves uses one cluster
    m = compute_metrics(still, gt, partner)
    for g in GROUPS:
        assert abs(m[f"sid_{g}"]) < 1e-4
        assert m[f"rsid_{g}"] == pytest.approx(0.0, abs=1e-4)  # one distinct point: one cluster
    half = np.zeros_like(gt)  # frames from the first half of gt's clusters (row j is in j % k)
    for g, k in metrics.SID_CLUSTERS.items():
        half[:, MOTION_GROUPS[g]] = gt[np.arange(400) % (k // 2), MOTION_GROUPS[g]]
    m = compute_metrics(half, gt, partner)
    for g, k in metrics.SID_CLUSTERS.items():
        assert m[f"sid_{g}"] == pytest.approx(np.log2(k // 2), abs=1e-4)
        assert abs(m[f"rsid_{g}"] - m[f"sid_{g}"]) > 0.05


def test_sid_equals_rsid_when_prediction_is_ground_truth():
    gt = _motion(20)
    m = compute_metrics(gt.copy(), gt, _motion(21))
    for g in GROUPS:
        assert m[f"sid_{g}"] == m[f"rsid_{g}"] > 1.0


def test_kmeans_uses_at_most_t_clusters():
    gt = _motion(30, t=12)  # fewer frames than the 40 expression clusters
    m = compute_metrics(_motion(31, t=12), gt, _motion(32, t=12))
    assert 0 < m["rsid_exp"] <= np.log2(12) + 1e-9
    assert compute_metrics(gt, gt, gt)["sid_exp"] == pytest.approx(np.log2(12), abs=1e-4)


def test_truncation_to_shortest():
    pred, gt, partner = _motion(40, t=130), _motion(41, t=100), _motion(42, t=115)
    got = compute_metrics(pred, gt, partner)
    want = compute_metrics(pred[:100], gt, partner[:100])
    assert got == want
    assert got != compute_metrics(pred[30:], gt, partner[15:])


@pytest.mark.parametrize("bad", ["pred", "gt", "partner"])
def test_bad_shapes_name_the_argument(bad):
    good = {"pred": _motion(50), "gt": _motion(51), "partner": _motion(52)}
    for wrong in (good[bad][:, :55], good[bad][:, :, None], good[bad][:1], good[bad][:, 0]):
        args = dict(good, **{bad: wrong})
        with pytest.raises(ValueError, match=rf"^{bad} must have shape \(T, 56\)"):
            compute_metrics(**args)
    args = dict(good, **{bad: np.where(np.eye(120, 56) > 0, np.nan, good[bad])})
    with pytest.raises(ValueError, match=rf"^{bad} contains non-finite"):
        compute_metrics(**args)


def test_aggregate_scale_and_table():
    a = {"fd_exp": 1.0, "mse_jaw": 2.0, "rpcc_exp": 0.5, "sid_pose": 3.0}
    b = {"fd_exp": 3.0, "mse_jaw": 4.0, "rpcc_exp": 0.1, "sid_pose": 1.0}
    mean = aggregate([a, b])
    assert mean == pytest.approx({"fd_exp": 2.0, "mse_jaw": 3.0, "rpcc_exp": 0.3, "sid_pose": 2.0})
    with pytest.raises(ValueError):
        aggregate([a, {"fd_exp": 1.0}])
    with pytest.raises(ValueError):
        aggregate([])
    full = compute_metrics(_motion(60), _motion(61), _motion(62))
    scaled = published_scale(full)
    factors = {"fd": (1, 1e3, 1e2), "pfd": (1, 1e3, 1e2), "mse": (10, 1e3, 1e2), "sid": (1, 1, 1),
               "rsid": (1, 1, 1), "rpcc": (1e2, 10, 10), "sts": (1, 1, 1), "var": (1, 1, 1)}
    for metric, fs in factors.items():
        for g, f in zip(GROUPS, fs):
            assert scaled[f"{metric}_{g}"] == pytest.approx(full[f"{metric}_{g}"] * f, rel=1e-12)
    table = format_table(scaled).splitlines()
    assert table[0].split() == ["EXP", "JAW", "POSE"]
    assert [r.split()[0] for r in table[1:]] == ["FD", "P-FD", "MSE", "SID", "rPCC", "STS", "var"]
    assert table[3].split()[2] == f"{scaled['mse_jaw']:.2f}"
    assert format_table({"fd_exp": 1.234}).splitlines()[1].split() == ["FD", "1.23", "-", "-"]
