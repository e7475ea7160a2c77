"""The foundation's core checks: the runtime's loop on the torch model (its KV cache) equals the
band-masked full forward, the turn mask, the respaced schedule and one sampling step against
independent float64 formulas."""
import math

import numpy as np
import pytest
import torch

from timar_sdk.model.config import preset
from timar_sdk.model.full_forward import full_forward_motion
from timar_sdk.model.timar import Timar, band_turn_index
from timar_sdk.runtime.model import Model
from timar_sdk.runtime.rng import PhiloxNormal
from timar_sdk.runtime.session import Session
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
    """user audio [T, S], user motion (every third turn None: untracked), agent audio [T, S]."""
    rng = np.random.default_rng(seed)
    ua = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.3
    aa = rng.standard_normal((turns, 16000)).astype(np.float32) * 0.3
    um = rng.standard_normal((turns, 25, 56)).astype(np.float32) * 0.2
    return ua, [None if i % 3 == 2 else um[i] for i in range(turns)], aa


def cached(session: Session, turns: int) -> np.ndarray:
    """[T, F, 56]: the conversation turn by turn through the session (the KV cache)."""
    ua, um, aa = conversation(turns)
    return np.stack([session.step(ua[i], um[i], aa[i]) for i in range(turns)])


def full_forward(model: Timar, turns: int, seed: int, **settings) -> np.ndarray:
    """[T, F, 56]: the same conversation and noise, every turn recomputed without a cache."""
    return full_forward_motion(model, *conversation(turns), PhiloxNormal(seed), **settings)


@pytest.mark.parametrize("history", ["masked", "feedback"])
@pytest.mark.parametrize("turns", [1, W - 1, W, 2 * W + 3])
def test_session_cache_equals_full_forward(history, turns):
    model = random_model(history)
    got = cached(Session(Model.from_torch(model), seed=7), turns)
    assert np.abs(got - full_forward(model, turns, 7, history=history)).max() < 1e-4


@pytest.mark.parametrize("cfg", [2.0])
def test_session_cache_equals_full_forward_with_guidance(cfg):
    model = random_model("feedback")
    got = cached(Session(Model.from_torch(model), seed=3, cfg=cfg), 2 * W + 3)
    assert np.abs(got - full_forward(model, 2 * W + 3, 3, history="feedback", cfg=cfg)).max() < 1e-4


def test_history_matters():
    """The equality above would hold trivially if past turns had no influence: the same last turn
    with the same noise after another past must give other motion."""
    model = Model.from_torch(random_model())
    last = [x[W] for x in conversation(W + 1)]
    motion = []
    for past in (conversation(W), conversation(W, seed=2)):
        session = Session(model, seed=7)
        for turn in zip(*past):
            session.step(*turn)
        motion.append(session.step(*last))
    assert np.abs(motion[0] - motion[1]).max() > 1e-3


def test_broken_cache_is_detected():
    """A cache that drops a turn (here: every other turn's keys/values are never written) must
    break equality."""
    model = random_model()
    session = Session(Model.from_torch(model), seed=7)
    commit, writes = session.backend.commit, []

    def dropping(cache, present, slot):
        writes.append(slot)
        return cache if len(writes) % 2 else commit(cache, present, slot)
    session.backend.commit = dropping
    assert np.abs(cached(session, 2 * W + 3) - full_forward(model, 2 * W + 3, 7)).max() > 1e-3


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
