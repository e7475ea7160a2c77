"""What the runtime's cache must equal: a conversation generated with no state carried between
turns, every turn recomputing the model's forward over the conversation so far.

The runtime's `Session` (the one turn-by-turn loop; on a torch model: `Model.from_torch`) keeps
past turns as keys/values (the SDK's models) or as tokens (the authors'); `full_forward_motion`
keeps nothing but the inputs and the motion it generated, so with the same noise the two differ
only by what the Session carries from turn to turn (tests/test_model.py, tests/test_authors.py).
The ablations that cannot stream (an MLP head, full attention) generate with it too.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from timar_sdk.layout import MOTION_DIM
from timar_sdk.model.authors import WindowTimar
from timar_sdk.model.diffusion import MLPHead, numpy_denoiser
from timar_sdk.model.timar import Timar
from timar_sdk.sampler import NoiseSource, respaced_schedule, sample_turn

AUDIO_EPS = 1e-7
"""The authors' audio normalisation: (x - mean) / sqrt(var + 1e-7) (the manifest's eps)."""


@torch.no_grad()
def full_forward_motion(model: Timar | WindowTimar, user_audio: np.ndarray, user_motion: Sequence[np.ndarray | None],
                        agent_audio: np.ndarray, noise: NoiseSource, *, steps: int | None = None,
                        temperature: float = 1.0, cfg: float = 1.0, history: str = "masked",
                        audio_heard_before: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The agent's motion float32 [T, F, 56] for a conversation of T turns, on the CPU.

    user_audio, agent_audio [T, S] float; user_motion: per turn raw FLAME values [F, 56], or None
    when the user is not tracked. noise: the generator the Session would use (e.g.
    `PhiloxNormal(seed)`), drawn in the same order. steps (None: the model's), temperature, cfg,
    history ("masked" | "feedback": generated motion written back): as `Session`'s.
    audio_heard_before: window models, (user, agent) audio the normalisation has heard before the
    conversation (`Session.prime_audio_normalization`).

    Timar: turn t reruns `forward_full` over turns 0..t, whose mask crops each turn's context
    (band: turns t-W+1..t; full attention, an ablation: |d| < W). WindowTimar (the authors'):
    turn t embeds turns t-W+1..t, each with its audio normalised over everything heard up to that
    turn, and runs `forward_window` on them.
    """
    model = model.eval()
    f, w = model.cfg.frames_per_turn, model.cfg.context_turns
    turns, rows = len(user_audio), 1 if cfg == 1.0 else 2
    if history not in ("masked", "feedback") or (isinstance(model, WindowTimar) and history != "masked"):
        raise ValueError(f"history: expected 'masked' or 'feedback' ('masked' for a WindowTimar), got {history!r}")
    if isinstance(model, WindowTimar):
        user_audio, agent_audio = (_normalised_so_far(a, before) for a, before in
                                   zip((user_audio, agent_audio), audio_heard_before or (None, None)))
    wav = torch.as_tensor(np.stack([user_audio, agent_audio], axis=1), dtype=torch.float32)     # [T, 2, S]
    feats = model.audio_encoder(wav.reshape(2 * turns, -1)).reshape(turns, 2, f, -1)         # [T, 2, F, Da]
    absent = torch.tensor([float(m is None) for m in user_motion])                             # [T]
    raw = [np.zeros((f, MOTION_DIM), np.float32) if m is None else m for m in user_motion]
    motion = model.normalize(torch.as_tensor(np.stack(raw), dtype=torch.float32))             # [T, F, 56]
    if isinstance(model.head, MLPHead):                  # regression ablation: deterministic
        def sample(z):
            return model.head.net(z[0]).numpy()
    else:
        schedule = respaced_schedule(model.head.schedule, model.cfg.steps if steps is None else steps)
        denoise = numpy_denoiser(model.head.net)

        def sample(z):
            return sample_turn(denoise, z.reshape(-1, z.shape[-1]).numpy(), noise, schedule, temperature, cfg)

    agent = torch.zeros(turns, f, MOTION_DIM)            # generated, normalised
    if isinstance(model, WindowTimar):
        # Each turn's tokens, conditional (row 0) and with the user's tokens replaced (CFG row).
        tokens = [model.embed_turn(feats[:, 0], motion, feats[:, 1], torch.full((turns,), float(u)))
                  for u in range(rows)]                                                    # [T, P, D] each

        def backbone(t: int) -> torch.Tensor:
            past = tokens[0][max(0, t - w + 1):t].reshape(1, -1, tokens[0].shape[-1])
            return model.forward_window(torch.cat([past.expand(rows, -1, -1),
                                                   torch.stack([tok[t] for tok in tokens])], dim=1))
    else:
        def backbone(t: int) -> torch.Tensor:
            n = t + 1
            agent_mask = torch.ones(n, f)
            if history == "feedback":
                agent_mask[:-1] = 0.0                     # past turns show the motion generated for them
            uncond = torch.zeros(rows, n, 2 * f)
            uncond[1:, -1] = 1.0                          # CFG row: only the current turn's user tokens
            turn_rows = lambda x: x[None, :n].expand(rows, *x[:n].shape)  # noqa: E731
            return model.forward_full(turn_rows(feats[:, 0]), turn_rows(motion), turn_rows(feats[:, 1]),
                                      turn_rows(agent), agent_mask.expand(rows, -1, -1), uncond,
                                      turn_rows(absent))[:, -1]
    for t in range(turns):                               # z [rows, F, D] of turn t -> its motion
        agent[t] = torch.from_numpy(sample(backbone(t)))
    return model.denormalize(agent).numpy()


def _normalised_so_far(audio: np.ndarray, before: np.ndarray | None) -> np.ndarray:
    """audio [T, S], each turn normalised over everything heard up to its end (`before` first)."""
    heard = np.zeros(0) if before is None else np.asarray(before, np.float64)
    out = []
    for turn in np.asarray(audio, np.float64):
        heard = np.concatenate([heard, turn])
        out.append((turn - heard.mean()) / np.sqrt(heard.var() + AUDIO_EPS))
    return np.stack(out).astype(np.float32)
