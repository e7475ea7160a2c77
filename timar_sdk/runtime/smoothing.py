"""Optional smoothing of the generated motion: causal, across turn boundaries, set per region.

Each region (FLAME expression, jaw, neck) has a time constant tau in seconds; every dimension of
the region runs a one-pole low-pass filter over the frames, in float32:

    y[t] = y[t-1] + a * (x[t] - y[t-1]),    a = 1 - exp(-1 / (fps * tau))

and y[t] = x[t] exactly for tau = 0 (a region not smoothed). The first frame of a conversation passes through unchanged (y[-1] = x[0]). The filter's state is
the last output frame, carried from turn to turn (and in snapshots), so a turn boundary is
invisible. The filter delays a region by about tau; tau = 0 leaves it exactly as generated.
Every runtime implements this same formula (the C ABI, and through it Unity).
"""
from __future__ import annotations

import math

import numpy as np

from timar_sdk.errors import TimarInputError
from timar_sdk.layout import EXP, JAW, MOTION_DIM, NECK

REGIONS = {"expression": EXP, "jaw": JAW, "neck": NECK}
MAX_TAU_SECONDS = 2.0
OFF = {"expression": 0.0, "jaw": 0.0, "neck": 0.0}


def check_smoothing(value, name: str = "smoothing") -> dict[str, float]:
    """A smoothing setting as {region: tau seconds} for every region of REGIONS.

    value: a dict naming some or all regions (missing ones are 0: not smoothed), or False for
    none. Raises TimarInputError naming `name` for anything else or a tau outside
    [0, MAX_TAU_SECONDS]."""
    if value is False:
        return dict(OFF)
    if not isinstance(value, dict) or not set(value) <= set(REGIONS):
        raise TimarInputError(f"{name}: expected False or a dict of time constants in seconds for "
                              f"{sorted(REGIONS)}, got {value!r}")
    taus = dict(OFF)
    for region, tau in value.items():
        if (isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating))
                or not (math.isfinite(tau) and 0.0 <= tau <= MAX_TAU_SECONDS)):
            raise TimarInputError(f"{name}: {region}: expected a time constant in seconds in "
                                  f"[0, {MAX_TAU_SECONDS:g}], got {tau!r}")
        taus[region] = float(tau)
    return taus


def filter_coefficients(taus: dict[str, float], fps: int) -> np.ndarray | None:
    """Per-dimension a of the filter, float32 [56]; None when every tau is 0 (smoothing off)."""
    if not any(taus.values()):
        return None
    a = np.ones(MOTION_DIM, np.float32)
    for region, dims in REGIONS.items():
        if taus[region] > 0:
            a[dims] = np.float32(1.0 - math.exp(-1.0 / (fps * taus[region])))
    return a


def smooth(motion: np.ndarray, previous: np.ndarray | None, a: np.ndarray | None):
    """Filter one turn's motion float32 [F, 56] given the last output frame before it (None at the
    start of a conversation). Returns (smoothed motion [F, 56], its last frame [56])."""
    if a is None or len(motion) == 0:
        return motion, previous
    out = np.empty_like(motion)
    y = motion[0] if previous is None else previous
    off = a == 1.0                           # regions not smoothed: exactly as generated
    for t in range(len(motion)):
        y = np.where(off, motion[t], y + a * (motion[t] - y))
        out[t] = y
    return out, out[-1].copy()
