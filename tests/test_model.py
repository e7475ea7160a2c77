"""The foundation's core checks: the cache equals the band-masked full forward, the turn mask,
the respaced schedule and one sampling step against independent float64 formulas."""
import math

import numpy as np
import pytest
import torch

from conftest import RngNoise
from timar_sdk.model.config import preset
from timar_sdk.model.streaming import FullForwardReference, StreamingReference
from timar_sdk.model.timar import Timar, band_turn_index
from timar_sdk.sampler import cosine_alphas_cumprod, posterior, respaced_schedule, respaced_timesteps

W = 3   # small context so 2W+3 turns stay fast


def random_model(history="masked", **kw) -> Timar:
    """A tiny model whose zero-initialised parts (adaLN, biases) are perturbed, so every input
    and every learned bias influences the output."""
    torch.manual_seed(0)
    model = Timar(preset("tiny", context_turns=W, history=history, width=64, heads=4,
                         token_width=64, audio_dim=32, audio_channels=16, diff_width=64, depth=2, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.motion_mean.copy_(torch.randn(56) * 0.1)
        model.motion_std.copy_(torch.rand(56) + 0.5)
    return model.eval()


def conversation(turns, seed=1):
    rng = np.random.default_rng(seed)
    ua = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.3
    aa = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.3
    um = rng.standard_normal((turns, 25, 56)).astype(np.float32) * 0.2
    return ua, um, aa


def run(gen, turns, seed=1, drop_user_motion_every=3):
    ua, um, aa = conversation(turns, seed)
    return np.stack([gen.step(ua[i], None if i % drop_user_motion_every == 2 else um[i], aa[i])
                     for i in range(turns)])


@pytest.mark.parametrize("history", ["masked", "feedback"])
@pytest.mark.parametrize("turns", [1, W - 1, W, 2 * W + 3])
def test_streaming_cache_equals_full_forward(history, turns):
    model = random_model(history)
    cached = run(StreamingReference(model, RngNoise(7)), turns)
    full = run(FullForwardReference(model, RngNoise(7)), turns)
    assert np.abs(cached - full).max() < 1e-4


@pytest.mark.parametrize("cfg", [2.0])
def test_streaming_cache_equals_full_forward_with_guidance(cfg):
    model = random_model("feedback")
    cached = run(StreamingReference(model, RngNoise(3), cfg=cfg), 2 * W + 3)
    full = run(FullForwardReference(model, RngNoise(3), cfg=cfg), 2 * W + 3)
    assert np.abs(cached - full).max() < 1e-4


def test_history_matters():
    """The equality above would hold trivially if past turns had no influence: check they do."""
    model = random_model()
    ua, um, aa = conversation(W + 1)
    with_history = StreamingReference(model, RngNoise(7))
    for i in range(W):
        with_history.step(ua[i], um[i], aa[i])
    fresh = StreamingReference(model, RngNoise(9))
    with_history.noise = RngNoise(9)          # both sample the last turn with the same noise
    a = with_history.step(ua[W], um[W], aa[W])
    b = fresh.step(ua[W], um[W], aa[W])
    assert np.abs(a - b).max() > 1e-3


def test_broken_cache_is_detected():
    """A cache that drops a turn (here: never commits the newest turn) must break equality."""
    model = random_model()
    turns = 2 * W + 3

    class DroppingCache(StreamingReference):
        def step(self, *args):
            kv, ring = self.kv.clone(), self.ring
            out = super().step(*args)
            if len(self.seen) % 2:               # every other turn is lost
                self.kv, self.ring = kv, ring
            self.seen.append(1)
            return out

    broken = DroppingCache(model, RngNoise(7))
    broken.seen = []
    full = run(FullForwardReference(model, RngNoise(7)), turns)
    assert np.abs(run(broken, turns) - full).max() > 1e-3


def test_turn_mask_matches_brute_force():
    for w in (1, 2, 3, 8):
        for turns in (1, 5, 19):
            col = band_turn_index(turns, w).numpy()
            for i in range(turns):
                for j in range(turns):
                    allowed = i - w + 1 <= j <= i
                    assert (col[i, j] < w) == allowed
                    if allowed:
                        assert col[i, j] == i - j


def test_respaced_timesteps():
    assert respaced_timesteps(5).tolist() == [0, 250, 500, 749, 999]
    assert respaced_timesteps(1).tolist() == [0]
    assert respaced_timesteps(1000).tolist() == list(range(1000))
    # Half-to-even rounding: 7 steps keep 832 (832.5 -> 832); a half-up rounding keeps 833.
    assert respaced_timesteps(7).tolist() == [0, 166, 333, 500, 666, 832, 999]
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(0)


def test_sampling_step_equals_closed_form_posterior():
    """One respaced step from the tables equals docs/DESIGN.md section 1 written out in float64."""
    steps = 5
    # Independent schedule: the closed-form cosine betas, clipped, and their cumulative product.
    abar = [math.cos(((t / 1000) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    alphas_cumprod, prod = [], 1.0
    for i in range(1000):
        prod *= 1.0 - min(1.0 - abar[i + 1] / abar[i], 0.999)
        alphas_cumprod.append(prod)
    kept = [0, 250, 500, 749, 999]
    sched = respaced_schedule(cosine_alphas_cumprod(), steps)
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((4, 56)).astype(np.float32)
    out = np.concatenate([rng.standard_normal((4, 56)), rng.uniform(-1, 1, (4, 56))], 1).astype(np.float32)
    for k in range(steps):
        ab = alphas_cumprod[kept[k]]
        ab_prev = alphas_cumprod[kept[k - 1]] if k > 0 else 1.0
        b = 1 - ab / ab_prev
        c1 = b * math.sqrt(ab_prev) / (1 - ab)
        c2 = (1 - ab_prev) * math.sqrt(1 - b) / (1 - ab)

        def post_var(j):
            a_j = alphas_cumprod[kept[j]]
            a_prev = alphas_cumprod[kept[j - 1]] if j > 0 else 1.0
            b_j = 1 - a_j / a_prev
            return b_j * (1 - a_prev) / (1 - a_j)

        clipped = math.log(post_var(1) if k == 0 else post_var(k))
        frac = (out[:, 56:].astype(np.float64) + 1) / 2
        want_log_var = frac * math.log(b) + (1 - frac) * clipped
        want_mean = c1 * out[:, :56].astype(np.float64) + c2 * x_t.astype(np.float64)
        mean, log_var = posterior(out, x_t, sched, k)
        assert np.abs(mean - want_mean).max() < 1e-5
        assert np.abs(log_var - want_log_var).max() < 1e-4 * max(1.0, np.abs(want_log_var).max())
