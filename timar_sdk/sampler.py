"""The Gaussian-diffusion schedule and the respaced sampler of docs/DESIGN.md section 1 (numpy only).

One implementation serves every backend: the torch reference, ONNX Runtime and TensorRT all call
`sample_turn` with their own `denoise` function, so they differ only in how the denoiser runs.
Conventions follow improved DDPM / ADM: cosine schedule, x0 prediction, learned-range variance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from timar_sdk.layout import MOTION_DIM

NUM_TRAIN_STEPS = 1000


class NoiseSource(Protocol):
    """Anything that hands out standard normals (the portable Philox generator, or a test's rng)."""

    def normal(self, shape: tuple[int, ...]) -> np.ndarray: ...


def cosine_alphas_cumprod(num_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """float64 [num_steps]: cumprod(1 - beta) with the cosine betas clipped at 0.999."""
    def abar(t: float) -> float:
        return math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(num_steps)])
    return np.cumprod(1.0 - betas)


def respaced_timesteps(steps: int, num_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """int64 [steps]: the kept original timesteps, as the authors' `space_timesteps` keeps them.

    Python's round() is round-half-to-even, which is what they use (S=7 and S=21 show it).
    """
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_steps:
        raise ValueError(f"steps: expected an integer in 1..{num_steps}, got {steps!r}")
    if steps == 1:
        return np.array([0], dtype=np.int64)
    stride = (num_steps - 1) / (steps - 1)
    cur, kept = 0.0, []
    for _ in range(steps):
        kept.append(round(cur))
        cur += stride
    return np.array(kept, dtype=np.int64)


@dataclass(frozen=True)
class Schedule:
    """Per-step tables of a (possibly respaced) process, float64 [S] each; index k = step."""

    timesteps: np.ndarray        # original timestep index fed to the denoiser
    alphas_cumprod: np.ndarray
    log_beta: np.ndarray         # max of the learned log-variance range
    log_post_var: np.ndarray     # min of the range: "clipped" log posterior variance
    coef_x0: np.ndarray          # posterior mean = coef_x0 * x0 + coef_xt * x_t
    coef_xt: np.ndarray


def make_schedule(alphas_cumprod: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
    """Posterior tables for the process whose kept cumulative alphas are alphas_cumprod[timesteps]."""
    ac_all = np.asarray(alphas_cumprod, dtype=np.float64)
    if timesteps is None:
        timesteps = np.arange(len(ac_all))
    ac = ac_all[timesteps]
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1.0 - ac / ac_prev
    post_var = beta * (1.0 - ac_prev) / (1.0 - ac)
    # Entry 0 of the posterior variance is 0; ADM replaces it by entry 1 ("clipped").
    first = post_var[1] if len(post_var) > 1 else beta[0]
    log_post_var = np.log(np.concatenate([[first], post_var[1:]]))
    return Schedule(
        timesteps=np.asarray(timesteps, dtype=np.int64),
        alphas_cumprod=ac,
        log_beta=np.log(beta),
        log_post_var=log_post_var,
        coef_x0=beta * np.sqrt(ac_prev) / (1.0 - ac),
        coef_xt=(1.0 - ac_prev) * np.sqrt(1.0 - beta) / (1.0 - ac),
    )


def respaced_schedule(alphas_cumprod: np.ndarray, steps: int) -> Schedule:
    return make_schedule(alphas_cumprod, respaced_timesteps(steps, len(alphas_cumprod)))


def posterior(model_out: np.ndarray, x_t: np.ndarray, sched: Schedule, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and log-variance of p(x_{k-1} | x_k) from the denoiser output, float32.

    model_out [N, 112]: 56 predicted-x0 channels then 56 variance channels v in [-1, 1].
    """
    f32 = np.float32
    x0, v = model_out[:, :MOTION_DIM], model_out[:, MOTION_DIM:]
    frac = (v + f32(1)) / f32(2)
    log_var = frac * f32(sched.log_beta[k]) + (f32(1) - frac) * f32(sched.log_post_var[k])
    mean = f32(sched.coef_x0[k]) * x0 + f32(sched.coef_xt[k]) * x_t
    return mean, log_var


DenoiseFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""denoise(x_t [N, 56] f32, t [N] f32 original timestep, z [N, Dz] f32) -> [N, 112] f32."""


def sample_turn(denoise: DenoiseFn, z: np.ndarray, noise: NoiseSource, sched: Schedule,
                temperature: float = 1.0, cfg: float = 1.0) -> np.ndarray:
    """Sample one turn's motion (normalised space) from the backbone outputs z.

    z: [F, Dz] when cfg == 1; [2F, Dz] (conditional rows, then unconditional rows) otherwise.
    Noise order (docs/DESIGN.md 4.1): start noise, then one [F, 56] draw per step, the last discarded.
    Returns x0 samples [F, 56] float32.
    """
    return sample_turns(denoise, [z], [noise], sched, [temperature], [cfg])[0]


def sample_turns(denoise: DenoiseFn, zs: list[np.ndarray], noises: list[NoiseSource], sched: Schedule,
                 temperatures: list[float], cfgs: list[float]) -> list[np.ndarray]:
    """`sample_turn` for several turns (of different sessions) at once, with one denoiser call per
    step for all of them; each keeps its own noise, temperature and guidance. Same schedule."""
    frames = [z.shape[0] if cfg == 1.0 else z.shape[0] // 2 for z, cfg in zip(zs, cfgs)]
    steps = len(sched.timesteps)
    # One request per turn: [F, 56] holds a multiple of 4 values, so this is the same stream as
    # one request per draw (rng.py's counter rule) at a fraction of the cost.
    draws = [noise.normal((steps + 1, f, MOTION_DIM)).astype(np.float32) for noise, f in zip(noises, frames)]
    xs = [d[0] for d in draws]
    z_all = zs[0] if len(zs) == 1 else np.concatenate(zs)
    for i, k in enumerate(reversed(range(steps))):
        t = np.full(z_all.shape[0], sched.timesteps[k], dtype=np.float32)
        parts = [x if cfg == 1.0 else np.concatenate([x, x]) for x, cfg in zip(xs, cfgs)]
        x_in = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out_all = np.asarray(denoise(x_in, t, z_all), dtype=np.float32)
        start = 0
        for j, (f, cfg) in enumerate(zip(frames, cfgs)):
            rows = f if cfg == 1.0 else 2 * f
            out = out_all[start:start + rows]
            start += rows
            if cfg != 1.0:
                cond, uncond = out[:f], out[f:]
                guided = uncond[:, :MOTION_DIM] + np.float32(cfg) * (cond[:, :MOTION_DIM] - uncond[:, :MOTION_DIM])
                out = np.concatenate([guided, cond[:, MOTION_DIM:]], axis=1)
            mean, log_var = posterior(out, xs[j], sched, k)
            xs[j] = mean if k == 0 else (mean + np.exp(np.float32(0.5) * log_var) * draws[j][i + 1]
                                         * np.float32(temperatures[j]))
    return [x.astype(np.float32) for x in xs]
