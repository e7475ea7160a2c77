"""The optional output smoothing: the documented one-pole filter per region, causal across turn
boundaries, carried in snapshots, the same batched or alone, and off means the exact output."""
import math

import numpy as np
import pytest
from scipy.signal import lfilter

from timar_sdk import Model, Session, TimarInputError, step_many
from timar_sdk.layout import EXP, JAW, NECK

TAUS = {"expression": 0.12, "jaw": 0.04, "neck": 0.3}
TURNS = 4


@pytest.fixture(scope="module")
def model():
    return Model()


def conversation(turns, seed=0):
    rng = np.random.default_rng(seed)
    ua = (rng.standard_normal((turns, 16000)) * 0.2).astype(np.float32)
    aa = (rng.standard_normal((turns, 16000)) * 0.2).astype(np.float32)
    return ua, aa


def run(session, data, turns=TURNS, start=0):
    ua, aa = data
    return np.concatenate([session.step(ua[i], None, aa[i]) for i in range(start, turns)])


def reference_filter(x: np.ndarray, taus: dict, fps: int = 25) -> np.ndarray:
    """The documented filter, written independently: scipy's lfilter per region, in float64,
    started so that the first frame passes through."""
    out = x.astype(np.float64).copy()
    for region, dims in (("expression", EXP), ("jaw", JAW), ("neck", NECK)):
        if taus.get(region, 0) > 0:
            a = 1 - math.exp(-1 / (fps * taus[region]))
            zi = (1 - a) * x[0, dims].astype(np.float64)        # y[-1] = x[0]
            out[:, dims], _ = lfilter([a], [1, -(1 - a)], x[:, dims].astype(np.float64), axis=0, zi=zi[None])
    return out


def test_smoothed_turns_equal_the_filter_over_the_whole_raw_sequence(model):
    data = conversation(TURNS)
    raw = run(Session(model, seed=5, smoothing=False), data)
    smoothed = run(Session(model, seed=5, smoothing=TAUS), data)
    np.testing.assert_allclose(smoothed, reference_filter(raw, TAUS), atol=1e-5)
    assert np.abs(smoothed - raw).max() > 0.01                     # it did something
    # smoother: smaller frame-to-frame steps in every smoothed region
    for dims in (EXP, JAW, NECK):
        assert np.abs(np.diff(smoothed[:, dims], axis=0)).mean() < np.abs(np.diff(raw[:, dims], axis=0)).mean()


def test_a_region_left_out_is_exactly_the_model_output(model):
    data = conversation(2)
    raw = run(Session(model, seed=1, smoothing=False), data, 2)
    jaw_only = run(Session(model, seed=1, smoothing={"jaw": 0.05}), data, 2)
    assert np.array_equal(jaw_only[:, EXP], raw[:, EXP]) and np.array_equal(jaw_only[:, NECK], raw[:, NECK])
    assert not np.array_equal(jaw_only[:, JAW], raw[:, JAW])


def test_default_takes_the_manifest_and_off_is_exact(model):
    s = Session(model, seed=2)
    assert s.smoothing == {k: float(model.bundle.manifest.get("smoothing", {}).get(k, 0.0)) for k in TAUS}
    assert Session(model, smoothing=True).smoothing == s.smoothing
    assert Session(model, smoothing=False).info["smoothing"] == {"expression": 0.0, "jaw": 0.0, "neck": 0.0}


def test_batched_smoothing_equals_alone(model):
    data = conversation(3)
    want = [run(Session(model, seed=k, smoothing=st), data, 3) for k, st in enumerate((TAUS, False))]
    sessions = [Session(model, seed=k, smoothing=st) for k, st in enumerate((TAUS, False))]
    ua, aa = data
    got = [[], []]
    for i in range(3):
        for k, m in enumerate(step_many([(s, ua[i], None, aa[i]) for s in sessions])):
            got[k].append(m)
    for k in range(2):
        np.testing.assert_allclose(np.concatenate(got[k]), want[k], atol=1e-5)


def test_snapshot_carries_the_filter_state_and_its_setting(model):
    data = conversation(TURNS)
    whole = run(Session(model, seed=3, smoothing=TAUS), data)
    first = Session(model, seed=3, smoothing=TAUS)
    run(first, data, 2)
    state = first.get_state()
    second = Session(model, seed=3, smoothing=TAUS)
    second.set_state(state)
    np.testing.assert_allclose(run(second, data, TURNS, start=2), whole[50:], atol=1e-6)
    other = Session(model, seed=3, smoothing={"jaw": 0.1})
    with pytest.raises(TimarInputError, match="smoothing"):
        other.set_state(state)
    assert other.turns == 0
    broken = dict(state, smoothed=None)
    with pytest.raises(TimarInputError, match="smoothed"):
        Session(model, seed=3, smoothing=TAUS).set_state(broken)


@pytest.mark.parametrize("bad", ["on", {"mouth": 0.1}, {"jaw": -0.1}, {"jaw": float("nan")}, {"neck": 5.0},
                                 {"jaw": True}, 0.1])
def test_bad_smoothing_is_refused_naming_it(model, bad):
    with pytest.raises(TimarInputError, match="smoothing"):
        Session(model, smoothing=bad)
