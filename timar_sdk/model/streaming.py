"""Turn-by-turn generation in torch: the streaming reference with an explicit KV cache, and the
no-cache reference that recomputes the band-masked full forward (what the cache must equal).

Both take their random numbers from a `NoiseSource` (docs/DESIGN.md 4.1 order) and share the numpy
sampler of `timar_sdk.sampler`, so any difference between them is the cache's.
"""
from __future__ import annotations

import numpy as np
import torch

from timar_sdk.layout import MOTION_DIM
from timar_sdk.model.diffusion import numpy_denoiser
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.ring import TurnRing
from timar_sdk.sampler import NoiseSource, respaced_schedule, sample_turn


class _Sampling:
    """Settings shared by both generators; None means the model config's default."""

    def __init__(self, model: Timar, noise: NoiseSource, steps=None, temperature=None, cfg=None, history=None):
        c = model.cfg
        self.model, self.noise = model.eval(), noise
        self.steps = c.steps if steps is None else steps
        self.temperature = c.temperature if temperature is None else temperature
        self.cfg = c.cfg if cfg is None else float(cfg)
        self.history = c.history if history is None else history
        if self.history not in ("masked", "feedback"):
            raise ValueError(f"history: expected 'masked' or 'feedback', got {self.history!r}")
        self.device = next(model.parameters()).device
        self.sched = respaced_schedule(model.head.schedule, self.steps) \
            if c.head == "diffusion" else None

    def tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)

    def rows(self) -> int:
        return 1 if self.cfg == 1.0 else 2

    def sample(self, z: torch.Tensor) -> np.ndarray:
        """z [rows, F, D] -> normalised motion [F, 56]."""
        head = self.model.head
        if self.sched is None:                   # MLP regression head: deterministic
            with torch.no_grad():
                return head.net(z[0]).cpu().numpy()
        return sample_turn(numpy_denoiser(head.net), z.reshape(-1, z.shape[-1]).cpu().numpy(),
                           self.noise, self.sched, self.temperature, self.cfg)

    def turn_inputs(self, user_audio, user_motion, agent_audio):
        """Per-turn tensors: features [2, F, Da], normalised user motion [F, 56], absent flag."""
        with torch.no_grad():
            feats = self.model.encode_audio(self.tensor(np.stack([user_audio, agent_audio])))
        f = self.model.cfg.frames_per_turn
        if user_motion is None:
            return feats, torch.zeros(f, MOTION_DIM, device=self.device), 1.0
        return feats, self.model.normalize(self.tensor(user_motion)), 0.0


class StreamingReference(_Sampling):
    """`step(user_audio [S], user_motion [F, 56] | None, agent_audio [S]) -> agent motion [F, 56]`,
    keeping the previous W-1 turns' keys/values in a ring of slots."""

    def __init__(self, model: Timar, noise: NoiseSource, **settings):
        super().__init__(model, noise, **settings)
        c = model.cfg
        self.ring = TurnRing.empty(c.context_turns, c.tokens_per_turn)
        self.kv = torch.zeros(c.depth, 2, 1, c.heads, c.cache_tokens, c.head_dim, device=self.device)

    @torch.no_grad()
    def step(self, user_audio, user_motion, agent_audio) -> np.ndarray:
        m = self.model
        f = m.cfg.frames_per_turn
        feats, umo, absent = self.turn_inputs(user_audio, user_motion, agent_audio)
        r = self.rows()
        ages = torch.as_tensor(self.ring.token_ages(r), device=self.device)
        zeros = torch.zeros(r, f, MOTION_DIM, device=self.device)
        args = dict(user_feats=feats[0:1].expand(r, -1, -1), user_motion=umo.expand(r, -1, -1),
                    agent_feats=feats[1:2].expand(r, -1, -1), user_absent=self.tensor([absent] * r),
                    past_key_values=self.kv.expand(-1, -1, r, -1, -1, -1), past_turn_age=ages)
        z, present = m.forward_step(agent_motion=zeros, agent_mask=torch.ones(r, f, device=self.device),
                                    user_uncond=self.tensor([0.0, 1.0][:r]), **args)
        x = self.sample(z)
        if self.history == "feedback":           # second call: the cache sees the generated motion
            _, present = m.forward_step(agent_motion=self.tensor(x)[None].expand(r, -1, -1),
                                        agent_mask=torch.zeros(r, f, device=self.device),
                                        user_uncond=torch.zeros(r, device=self.device), **args)
        slot = self.ring.next_slot()
        if slot >= 0:
            p = m.cfg.tokens_per_turn
            self.kv[:, :, :, :, slot * p:(slot + 1) * p] = present[:, :, :1]
        self.ring = self.ring.advance()
        return m.denormalize(self.tensor(x)).cpu().numpy()


class FullForwardReference(_Sampling):
    """No cache: each turn reruns `forward_full` over every turn so far (the band mask crops the
    context), with history agent motion masked or fed back. Slow; the cache's ground truth."""

    def __init__(self, model: Timar, noise: NoiseSource, **settings):
        super().__init__(model, noise, **settings)
        self.feats, self.user_motion, self.absent, self.agent_motion = [], [], [], []

    @torch.no_grad()
    def step(self, user_audio, user_motion, agent_audio) -> np.ndarray:
        m = self.model
        f = m.cfg.frames_per_turn
        feats, umo, absent = self.turn_inputs(user_audio, user_motion, agent_audio)
        self.feats.append(feats)
        self.user_motion.append(umo)
        self.absent.append(absent)
        t, r = len(self.feats), self.rows()
        agent = torch.stack(self.agent_motion + [torch.zeros(f, MOTION_DIM, device=self.device)])
        mask = torch.ones(t, f, device=self.device)
        if self.history == "feedback":
            mask[:-1] = 0.0
        uncond = torch.zeros(r, t, 2 * f, device=self.device)
        uncond[1:, -1] = 1.0                      # CFG row: only the current turn's user tokens
        feats_all = torch.stack(self.feats)       # [T, 2, F, Da]
        z = m.forward_full(
            user_feats=feats_all[:, 0].expand(r, -1, -1, -1), user_motion=torch.stack(self.user_motion).expand(r, -1, -1, -1),
            agent_feats=feats_all[:, 1].expand(r, -1, -1, -1), agent_motion=agent.expand(r, -1, -1, -1),
            agent_mask=mask.expand(r, -1, -1), user_uncond=uncond,
            user_absent=self.tensor(self.absent).expand(r, -1))
        x = self.sample(z[:, -1])
        self.agent_motion.append(self.tensor(x))
        return m.denormalize(self.tensor(x)).cpu().numpy()
